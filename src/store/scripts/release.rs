//! `release.lua`: due elements into `:out`, one bounded chunk per call.

use futures::stream::{FuturesOrdered, StreamExt};

use super::Scripts;
use crate::store::{Conn, Keys, StoreError};

impl Scripts {
    /// Releases up to `chunk` due elements. Returns how many, and whether
    /// more are due.
    pub async fn release(&self, conn: &mut Conn, keys: &Keys, chunk: usize) -> Result<(u64, bool), StoreError> {
        let started = std::time::Instant::now();
        let (released, more): (u64, i64) = self
            .sources
            .release
            .key(&keys.wm)
            .key(&keys.sched)
            .key(&keys.body)
            .key(&keys.out)
            .key(keys.released())
            .arg(chunk)
            .arg(self.dedup_ms)
            .invoke_async(conn)
            .await?;
        crate::metrics::record_script(crate::metrics::Script::Release, started.elapsed());
        Ok((released, more == 1))
    }

    /// Releases until nothing is due, one bounded chunk per call so Redis is
    /// never held for long. Returns the total released.
    ///
    /// While due elements remain, the next call is sent before the reply to
    /// the previous one arrives (two in flight), so Redis goes from chunk to
    /// chunk without waiting a round trip; a call sent after the last due
    /// element just finds nothing to do.
    pub async fn release_all(&self, conn: &mut Conn, keys: &Keys, chunk: usize) -> Result<u64, StoreError> {
        let (mut total, more) = self.release(conn, keys, chunk).await?;
        if !more {
            return Ok(total);
        }
        let call = |mut c: Conn| async move { self.release(&mut c, keys, chunk).await };
        let mut in_flight = FuturesOrdered::new();
        in_flight.push_back(call(conn.clone()));
        in_flight.push_back(call(conn.clone()));
        while let Some(reply) = in_flight.next().await {
            let (n, more) = reply?;
            total += n;
            if more {
                in_flight.push_back(call(conn.clone()));
            }
        }
        Ok(total)
    }
}
