//! Clock mode's tick, `clock.lua`.

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
            .key(keys.released())
            .arg(chunk)
            .arg(self.dedup_ms)
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
}
