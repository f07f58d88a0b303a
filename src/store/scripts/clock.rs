//! Clock mode's scripts: `clock.lua` (the tick) and `clock_lock.lua` (the
//! leader's lock).

use std::time::Duration;

use super::Scripts;
use crate::store::{Conn, Keys, StoreError};

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

impl Scripts {
    /// Clock mode's tick: raises the watermark to the server's `TIME`,
    /// releases up to `chunk` due elements and reports the next due ts.
    pub async fn clock(&self, conn: &mut Conn, keys: &Keys, chunk: usize) -> Result<ClockTick, StoreError> {
        let started = std::time::Instant::now();
        let r: Vec<i64> = self
            .sources
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
        conn: &mut Conn,
        key: &str,
        token: &str,
        ttl: Option<Duration>,
    ) -> Result<bool, StoreError> {
        let ms = ttl.map_or(0, |t| t.as_millis().max(1) as u64);
        let held: i64 = self.sources.clock_lock.key(key).arg(token).arg(ms).invoke_async(conn).await?;
        Ok(held == 1)
    }
}
