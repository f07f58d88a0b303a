//! Single element: one add, then its watermark; latency until a blocked
//! reader of `:out` sees it.

use std::time::Instant;

use anyhow::{anyhow, bail, Result};
use redis::Value;

use crate::report::latency_figures;
use crate::{Bench, Figures, TS_BASE};

impl Bench {
    /// Single element: `rounds` times one add, then its watermark; latency
    /// from the watermark's `XADD` until a blocked `XREAD` on `:out` (its own
    /// connection) returns the element.
    pub(crate) async fn single(&mut self, rounds: usize) -> Result<Figures> {
        let mut daemon = self.fresh_daemon(false).await?;
        let mut reader = self.redis.conn().await;
        let mut last_out = "0-0".to_owned();
        let mut lat = Vec::with_capacity(rounds);
        for i in 0..rounds {
            daemon.check_alive()?;
            let ts = TS_BASE + i as i64;
            let id = format!("s{i}");
            let _: String = redis::cmd("XADD")
                .arg(&self.keys.input)
                .arg("*")
                .arg("op")
                .arg("add")
                .arg("id")
                .arg(&id)
                .arg("ts")
                .arg(ts)
                .query_async(&mut self.conn)
                .await?;
            let read = async {
                let reply: Result<Value, redis::RedisError> = redis::cmd("XREAD")
                    .arg("COUNT")
                    .arg(1)
                    .arg("BLOCK")
                    .arg(10_000)
                    .arg("STREAMS")
                    .arg(&self.keys.out)
                    .arg(&last_out)
                    .query_async(&mut reader)
                    .await;
                (reply, Instant::now())
            };
            let mut writer = self.conn.clone();
            let start = Instant::now();
            let write = async {
                redis::cmd("XADD")
                    .arg(&self.keys.input)
                    .arg("*")
                    .arg("op")
                    .arg("watermark")
                    .arg("ts")
                    .arg(ts)
                    .query_async::<String>(&mut writer)
                    .await
            };
            let ((reply, seen), written) = tokio::join!(read, write);
            written?;
            let (entry, elem) = first_entry(reply?)?.ok_or_else(|| anyhow!("no release of {id} within 10 s"))?;
            if elem != id {
                bail!("expected {id} in :out, read {elem}");
            }
            lat.push((seen - start).as_secs_f64() * 1000.0);
            last_out = entry;
            if i % 50 == 0 {
                self.progress.count("rounds", i, rounds);
            }
        }
        let rss = self.stop(daemon)?;
        Ok(latency_figures(&mut lat, rss))
    }
}

/// The first entry of an `XREAD` reply: its entry id and element id.
fn first_entry(reply: Value) -> Result<Option<(String, String)>> {
    let Some((entry, fields)) = testkit::parse_read(reply).into_iter().next() else { return Ok(None) };
    let elem = testkit::field(&fields, "id").ok_or_else(|| anyhow!(":out entry {entry} has no id field"))?;
    Ok(Some((entry, testkit::text(elem))))
}
