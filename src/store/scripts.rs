//! The Lua scripts (lua/*.lua, each prefixed with lua/prelude.lua) and
//! their typed invocations. `redis::Script` sends `EVALSHA` and reloads the
//! script on `NOSCRIPT`, so a restarted Redis needs no special handling.

use redis::aio::MultiplexedConnection;
use redis::Script;

use super::{Keys, Prepared, StoreError, INPUT_GROUP};

const PRELUDE: &str = include_str!("../../lua/prelude.lua");
const APPLY: &str = include_str!("../../lua/apply.lua");
const RELEASE: &str = include_str!("../../lua/release.lua");

/// What one `apply.lua` call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyOutcome {
    /// Leading entries of the batch that are done (applied now, or found
    /// already applied); the rest must be sent again later.
    pub processed: usize,
    /// Elements released into `:out` by watermark advances.
    pub released: u64,
    /// Due elements remain: call [`Scripts::release`] until none does.
    pub more_due: bool,
    /// An older entry is pending at another consumer; the unprocessed rest
    /// must wait for it.
    pub blocked: bool,
    /// `add` entries applied.
    pub adds: u64,
    /// `cancel` entries applied.
    pub cancels: u64,
    /// `watermark` entries applied.
    pub watermarks: u64,
    /// Entries dead-lettered.
    pub dead: u64,
    /// `add`s that were already due and went straight to `:out`.
    pub late: u64,
}

/// The loaded scripts.
#[derive(Clone)]
pub struct Scripts {
    apply: Script,
    release: Script,
}

impl Default for Scripts {
    fn default() -> Self {
        Self::new()
    }
}

impl Scripts {
    /// Prepares the scripts (hashing them; nothing is sent yet).
    pub fn new() -> Self {
        Scripts {
            apply: Script::new(&format!("{PRELUDE}\n{APPLY}")),
            release: Script::new(&format!("{PRELUDE}\n{RELEASE}")),
        }
    }

    /// Loads both scripts into the server's script cache.
    pub async fn load(&self, conn: &mut MultiplexedConnection) -> Result<(), StoreError> {
        for script in [&self.apply, &self.release] {
            let _: String = script.prepare_invoke().load_async(conn).await?;
        }
        Ok(())
    }

    /// Applies `batch` (sorted by entry id) and acknowledges what it applied,
    /// atomically. Watermark advances release at most `chunk` elements.
    pub async fn apply(
        &self,
        conn: &mut MultiplexedConnection,
        keys: &Keys,
        batch: &[&Prepared],
        chunk: usize,
    ) -> Result<ApplyOutcome, StoreError> {
        let mut inv = self.apply.prepare_invoke();
        inv.key(&keys.input)
            .key(&keys.wm)
            .key(&keys.sched)
            .key(&keys.body)
            .key(&keys.out)
            .key(&keys.dead)
            .arg(INPUT_GROUP)
            .arg(chunk)
            .arg(batch.len());
        for p in batch {
            inv.arg(p.id.to_string());
            for a in &p.args {
                inv.arg(a.as_slice());
            }
        }
        let r: Vec<i64> = inv.invoke_async(conn).await?;
        if r.len() != 9 {
            return Err(StoreError::Reply(format!("apply.lua returned {r:?}")));
        }
        let n = |i: usize| r[i].max(0) as u64;
        Ok(ApplyOutcome {
            processed: n(0) as usize,
            released: n(1),
            more_due: r[2] == 1,
            blocked: r[3] == 1,
            adds: n(4),
            cancels: n(5),
            watermarks: n(6),
            dead: n(7),
            late: n(8),
        })
    }

    /// Releases up to `chunk` due elements. Returns how many, and whether
    /// more are due.
    pub async fn release(
        &self,
        conn: &mut MultiplexedConnection,
        keys: &Keys,
        chunk: usize,
    ) -> Result<(u64, bool), StoreError> {
        let (released, more): (u64, i64) = self
            .release
            .key(&keys.wm)
            .key(&keys.sched)
            .key(&keys.body)
            .key(&keys.out)
            .arg(chunk)
            .invoke_async(conn)
            .await?;
        Ok((released, more == 1))
    }

    /// Releases until nothing is due, one bounded chunk per call so Redis is
    /// never held for long. Returns the total released.
    pub async fn release_all(
        &self,
        conn: &mut MultiplexedConnection,
        keys: &Keys,
        chunk: usize,
    ) -> Result<u64, StoreError> {
        let mut total = 0;
        loop {
            let (n, more) = self.release(conn, keys, chunk).await?;
            total += n;
            if !more {
                return Ok(total);
            }
        }
    }
}
