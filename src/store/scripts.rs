//! The Lua scripts (lua/*.lua, each prefixed with lua/prelude.lua) and
//! their typed invocations. `redis::Script` sends `EVALSHA` and reloads the
//! script on `NOSCRIPT`, so a restarted Redis needs no special handling.

use redis::aio::MultiplexedConnection;
use redis::Script;

use super::{Keys, Prepared, StoreError, INPUT_GROUP};

const PRELUDE: &str = include_str!("../../lua/prelude.lua");
const APPLY: &str = include_str!("../../lua/apply.lua");
const RELEASE: &str = include_str!("../../lua/release.lua");
const CLOCK: &str = include_str!("../../lua/clock.lua");
const CLOCK_LOCK: &str = include_str!("../../lua/clock_lock.lua");

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

/// What one `clock.lua` tick did and found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockTick {
    /// Elements released into `:out`.
    pub released: u64,
    /// Due elements remain: tick again at once.
    pub more_due: bool,
    /// The lowest scheduled ts (above the watermark unless `more_due`).
    pub next_due: Option<i64>,
    /// The Redis server's `TIME`, in milliseconds.
    pub now_ms: i64,
}

/// The loaded scripts.
#[derive(Clone)]
pub struct Scripts {
    apply: Script,
    release: Script,
    clock: Script,
    clock_lock: Script,
    /// Clock mode: `apply` first raises the watermark to the server's
    /// `TIME` and wakes the clock leader for adds due before it expects.
    clock_mode: bool,
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
            clock: Script::new(&format!("{PRELUDE}\n{CLOCK}")),
            clock_lock: Script::new(&format!("{PRELUDE}\n{CLOCK_LOCK}")),
            clock_mode: false,
        }
    }

    /// The same scripts with clock mode on or off (see [`Scripts::apply`]).
    pub fn clock_mode(mut self, on: bool) -> Self {
        self.clock_mode = on;
        self
    }

    /// Loads the scripts into the server's script cache.
    pub async fn load(&self, conn: &mut MultiplexedConnection) -> Result<(), StoreError> {
        for script in [&self.apply, &self.release, &self.clock, &self.clock_lock] {
            let _: String = script.prepare_invoke().load_async(conn).await?;
        }
        Ok(())
    }

    /// Applies `batch` (sorted by entry id) and acknowledges what it applied,
    /// atomically. Watermark advances release at most `chunk` elements. In
    /// clock mode the watermark is first raised to the server's `TIME`.
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
            .key(keys.clock_next())
            .arg(INPUT_GROUP)
            .arg(chunk)
            .arg(batch.len())
            .arg(if self.clock_mode { "1" } else { "0" })
            .arg(keys.wake_channel());
        for p in batch {
            inv.arg(p.id.to_string());
            for a in &p.args {
                inv.arg(a.as_slice());
            }
        }
        let started = std::time::Instant::now();
        let r: Vec<i64> = inv.invoke_async(conn).await?;
        crate::metrics::record_script(crate::metrics::Script::Apply, started.elapsed());
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
        let started = std::time::Instant::now();
        let (released, more): (u64, i64) = self
            .release
            .key(&keys.wm)
            .key(&keys.sched)
            .key(&keys.body)
            .key(&keys.out)
            .arg(chunk)
            .invoke_async(conn)
            .await?;
        crate::metrics::record_script(crate::metrics::Script::Release, started.elapsed());
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

    /// Clock mode's tick: raises the watermark to the server's `TIME`,
    /// releases up to `chunk` due elements and reports the next due ts.
    pub async fn clock(
        &self,
        conn: &mut MultiplexedConnection,
        keys: &Keys,
        chunk: usize,
    ) -> Result<ClockTick, StoreError> {
        let started = std::time::Instant::now();
        let r: Vec<i64> = self
            .clock
            .key(&keys.wm)
            .key(&keys.sched)
            .key(&keys.body)
            .key(&keys.out)
            .key(keys.clock_next())
            .arg(chunk)
            .invoke_async(conn)
            .await?;
        crate::metrics::record_script(crate::metrics::Script::Clock, started.elapsed());
        let [released, more, has_next, next, now] = r[..] else {
            return Err(StoreError::Reply(format!("clock.lua returned {r:?}")));
        };
        Ok(ClockTick {
            released: released.max(0) as u64,
            more_due: more == 1,
            next_due: (has_next == 1).then_some(next),
            now_ms: now,
        })
    }

    /// The clock leader's lock `key`: takes it if free or extends it if
    /// `token` holds it (`Some(ttl)`), or releases it if `token` holds it
    /// (`None`). Returns whether `token` holds (or held) it.
    pub async fn clock_lock(
        &self,
        conn: &mut MultiplexedConnection,
        key: &str,
        token: &str,
        ttl: Option<std::time::Duration>,
    ) -> Result<bool, StoreError> {
        let ms = ttl.map_or(0, |t| t.as_millis().max(1) as u64);
        let held: i64 = self.clock_lock.key(key).arg(token).arg(ms).invoke_async(conn).await?;
        Ok(held == 1)
    }
}
