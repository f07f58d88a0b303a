//! The one owner of tidemark's Lua scripts (`lua/*.lua`). Each script is
//! built once per process (the prelude prepended, the SHA1 computed),
//! loaded into a server's script cache by [`Scripts::load`], and called
//! through a typed method that encodes its arguments and decodes its reply
//! (one submodule per job). `EVALSHA` reloads a script on `NOSCRIPT`, so a
//! restarted or flushed Redis needs no special handling.
//!
//! Adding a script: its `.lua` file (with a KEYS/ARGV/Returns header), a
//! field in [`Sources`], and a typed call in the submodule of its job.

mod apply;
mod clock;
mod lock;
mod output;
mod release;
mod replay;

use std::sync::LazyLock;

use redis::Script;

use super::{Conn, StoreError};

pub use apply::{ApplyCall, ApplyOutcome};
pub use clock::ClockTick;
pub use output::{ClaimFrom, ClaimOutcome, Claimed, Condemned};
pub use replay::{ReplayOutcome, ReplayPage, Replayed};

const PRELUDE: &str = include_str!("../../../lua/prelude.lua");

/// Every script, built once.
struct Sources {
    /// `apply.lua`: a batch of input entries, applied and acknowledged.
    apply: Script,
    /// `release.lua`: one bounded chunk of due elements.
    release: Script,
    /// `clock.lua`: clock mode's tick.
    clock: Script,
    /// `lock.lua`: lease locks (the clock leader, partition owners).
    lock: Script,
    /// `registry.lua`: the namespace's live daemons.
    registry: Script,
    /// `claim_out.lua`: a consumer's claims, dead-lettering the exhausted.
    claim_out: Script,
    /// `dead_out.lua`: a consumer's dead letters.
    dead_out: Script,
    /// `touch_out.lua`: keeps a consumer's entries from being claimed.
    touch_out: Script,
    /// `replay.lua`: `tidemark dead replay` (no prelude: it needs none).
    replay: Script,
    /// `forget_consumer.lua`: housekeeping's removal of a dead consumer.
    forget_consumer: Script,
}

static SOURCES: LazyLock<Sources> = LazyLock::new(|| {
    let with_prelude = |body: &str| Script::new(&format!("{PRELUDE}\n{body}"));
    Sources {
        apply: with_prelude(include_str!("../../../lua/apply.lua")),
        release: with_prelude(include_str!("../../../lua/release.lua")),
        clock: with_prelude(include_str!("../../../lua/clock.lua")),
        lock: with_prelude(include_str!("../../../lua/lock.lua")),
        registry: with_prelude(include_str!("../../../lua/registry.lua")),
        claim_out: with_prelude(include_str!("../../../lua/claim_out.lua")),
        dead_out: with_prelude(include_str!("../../../lua/dead_out.lua")),
        touch_out: with_prelude(include_str!("../../../lua/touch_out.lua")),
        replay: Script::new(include_str!("../../../lua/replay.lua")),
        forget_consumer: with_prelude(include_str!("../../../lua/forget_consumer.lua")),
    }
});

/// The scripts, with the options their calls depend on. Cheap to copy.
#[derive(Clone, Copy)]
pub struct Scripts {
    /// The built scripts (shared by the whole process).
    sources: &'static Sources,
    /// Clock mode: `apply` first raises the watermark to the server's
    /// `TIME` and wakes the clock leader for adds due before it expects.
    clock_mode: bool,
    /// `daemon.dedup_window` in ms (0: off): releases are recorded, and an
    /// add of an id released less than this ago is dropped.
    dedup_ms: u64,
}

impl Default for Scripts {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Scripts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scripts")
            .field("clock_mode", &self.clock_mode)
            .field("dedup_ms", &self.dedup_ms)
            .finish_non_exhaustive()
    }
}

impl Scripts {
    /// The scripts (built on first use; nothing is sent yet).
    pub fn new() -> Self {
        Scripts { sources: &SOURCES, clock_mode: false, dedup_ms: 0 }
    }

    /// The same scripts with the dedup window `window` (`None`: off; see
    /// `daemon.dedup_window`).
    pub fn dedup_window(mut self, window: Option<std::time::Duration>) -> Self {
        self.dedup_ms = window.map_or(0, |w| (w.as_millis() as u64).max(1));
        self
    }

    /// The same scripts with clock mode on or off (see [`Scripts::apply`]).
    pub fn clock_mode(mut self, on: bool) -> Self {
        self.clock_mode = on;
        self
    }

    /// Loads every script into the server's script cache.
    pub async fn load(&self, conn: &mut Conn) -> Result<(), StoreError> {
        let s = self.sources;
        for script in [
            &s.apply,
            &s.release,
            &s.clock,
            &s.lock,
            &s.registry,
            &s.claim_out,
            &s.dead_out,
            &s.touch_out,
            &s.replay,
            &s.forget_consumer,
        ] {
            let _: String = script.prepare_invoke().load_async(conn).await?;
        }
        Ok(())
    }
}

/// Decodes a script reply of name/value pairs (`{'name', value, …}`) into
/// `(name, integer)` pairs, so replies are read by name, not position.
fn named_integers(script: &str, reply: redis::Value) -> Result<Vec<(String, i64)>, StoreError> {
    let bad = |what: String| StoreError::Reply(format!("{script}: {what}"));
    let redis::Value::Array(items) = reply else { return Err(bad(format!("expected an array, got {reply:?}"))) };
    if items.len() % 2 != 0 {
        return Err(bad("odd number of items in a name/value reply".into()));
    }
    let mut pairs = Vec::with_capacity(items.len() / 2);
    let mut it = items.into_iter();
    while let (Some(name), Some(value)) = (it.next(), it.next()) {
        let name = match name {
            redis::Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
            other => return Err(bad(format!("expected a name, got {other:?}"))),
        };
        let value = match value {
            redis::Value::Int(n) => n,
            other => return Err(bad(format!("{name}: expected an integer, got {other:?}"))),
        };
        pairs.push((name, value));
    }
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::Value;

    #[test]
    fn named_replies_decode_by_name() {
        let bs = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let reply = Value::Array(vec![bs("a"), Value::Int(1), bs("b"), Value::Int(-2)]);
        assert_eq!(named_integers("x", reply).unwrap(), [("a".to_owned(), 1), ("b".to_owned(), -2)]);
        assert!(named_integers("x", Value::Array(vec![bs("a")])).is_err());
        assert!(named_integers("x", Value::Array(vec![Value::Int(1), Value::Int(1)])).is_err());
    }
}
