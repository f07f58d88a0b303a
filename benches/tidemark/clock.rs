//! Clock mode: elements due over a few seconds on Redis's clock; lateness
//! of each release.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};

use crate::report::latency_figures;
use crate::{add_pipelines, parse_id, write_all, Bench, Figures, Payload};

impl Bench {
    /// Clock mode: `n` elements due evenly over `span` from one second after
    /// they are written, daemon with `--clock`; lateness of each release is
    /// its `:out` entry id's milliseconds minus its ts (both Redis's clock).
    pub(crate) async fn clock(&mut self, n: usize, span: Duration) -> Result<Figures> {
        let mut daemon = self.fresh_daemon(true).await?;
        let (secs, micros): (i64, i64) = redis::cmd("TIME").query_async(&mut self.conn).await?;
        let first_due = secs * 1000 + micros / 1000 + 1000;
        let span_ms = span.as_millis() as i64;
        let ts = move |k: usize| first_due + (k as i64 * span_ms) / n as i64;
        let pipes = add_pipelines(&self.keys.input, n, ts, Payload::None);
        write_all(self.conn.clone(), pipes, Arc::default()).await?;
        self.wait("every element to be released", &mut daemon, move |b| {
            Box::pin(async move {
                let out = testkit::xlen_async(&mut b.conn, &b.keys.out).await;
                b.progress.count("released", out, n);
                Ok(out >= n)
            })
        })
        .await?;
        let mut lateness = Vec::with_capacity(n);
        for (id, fields) in testkit::read_stream_async(&mut self.conn, &self.keys.out).await {
            let ms = parse_id(&id)?.ms as i64;
            let ts: i64 = testkit::field(&fields, "ts")
                .and_then(|t| testkit::text(t).parse().ok())
                .ok_or_else(|| anyhow!(":out entry {id} has no integer ts"))?;
            if ms < ts {
                bail!("element released early: :out entry {id} for ts {ts}");
            }
            lateness.push((ms - ts) as f64);
        }
        if lateness.len() != n {
            bail!(":out holds {} entries for {n} elements", lateness.len());
        }
        let rss = self.stop(daemon)?;
        Ok(latency_figures(&mut lateness, rss))
    }
}
