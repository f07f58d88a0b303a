//! Ingest: `n` adds written with pipelined `XADD`, from the first write
//! until all are scheduled and acknowledged.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::report::kib_to_mib;
use crate::{add_pipelines, write_all, Bench, Figures, Payload, TS_BASE};

impl Bench {
    /// Ingest: `n` adds written with pipelined `XADD`, from the first write
    /// until all are scheduled and acknowledged.
    pub(crate) async fn ingest(&mut self, n: usize, payload: Payload) -> Result<Figures> {
        let mut daemon = self.fresh_daemon(false).await?;
        let pipes = add_pipelines(&self.keys.input, n, |k| TS_BASE + k as i64, payload);
        let meter = self.meter(&daemon).await?;
        let start = Instant::now();
        let written = Arc::new(AtomicUsize::new(0));
        let writer = tokio::spawn(write_all(self.conn.clone(), pipes, Arc::clone(&written)));
        let last = {
            // Poll progress while the writer runs.
            let mut handle = writer;
            loop {
                tokio::select! {
                    r = &mut handle => break r.context("the writer task failed")??,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {
                        self.progress.count("written", written.load(Ordering::Relaxed), n);
                    }
                }
            }
        };
        let write_s = start.elapsed().as_secs_f64();
        let end = self.wait_applied(&mut daemon, n, last).await?;
        let elapsed = (end - start).as_secs_f64();
        let cpu = self.read_meter(meter, &daemon).await?;
        let rss = self.stop(daemon)?;
        let mut figures = BTreeMap::from([
            ("elements_per_s", n as f64 / elapsed),
            ("seconds", elapsed),
            ("write_seconds", write_s),
            ("daemon_peak_rss_mib", kib_to_mib(rss)),
        ]);
        figures.extend(cpu);
        Ok(figures)
    }
}
