//! End to end: elements due at once, read and acknowledged by the library's
//! consumer runtime in this process; throughput and per-element latency.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tidemark::consume::{ConsumerBuilder, Element};
use tokio_util::sync::CancellationToken;

use crate::report::{kib_to_mib, percentile};
use crate::{add_pipelines, group_state, write_all, Bench, E2e, Figures, E2E_CONCURRENCY, GROUP, TS_BASE};

impl Bench {
    /// End to end: `n` elements due at once, read by the library's consumer
    /// runtime (no-op handler, concurrency 50); from the watermark's `XADD`
    /// until every element is acknowledged. Latency is per element, from the
    /// watermark until its handler finished (the runtime acknowledges
    /// finished handlers within its 5 ms ack interval).
    pub(crate) async fn end_to_end(&mut self, n: usize, variant: E2e) -> Result<Figures> {
        let mut daemon = self.fresh_daemon(false).await?;
        let pipes = add_pipelines(&self.keys.input, n, |k| TS_BASE + k as i64, variant.payload);
        let last = write_all(self.conn.clone(), pipes, Arc::default()).await?;
        self.wait_applied(&mut daemon, n, last).await?;

        let recorder = Arc::new(Recorder::new(n));
        let handler_recorder = Arc::clone(&recorder);
        let consumer = ConsumerBuilder::new(self.redis.client(), self.keys.clone(), GROUP)
            .consumer("bench-consumer")
            .concurrency(E2E_CONCURRENCY)
            .prefetch(variant.prefetch)
            .build(move |_element: Element| {
                let r = Arc::clone(&handler_recorder);
                async move {
                    r.record();
                    Ok::<(), Infallible>(())
                }
            })
            .context("build the consumer")?;
        let stop = CancellationToken::new();
        let mut task = tokio::spawn(consumer.run(stop.clone()));
        // The consumer sets its liveness lease right before its first read
        // (a blocked XREADGROUP does not show it in the group on Redis 7.0).
        let lease = self.keys.lease("out", GROUP, "bench-consumer");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if redis::cmd("EXISTS").arg(&lease).query_async::<bool>(&mut self.conn).await? {
                break;
            }
            if task.is_finished() {
                task.await.context("the consumer task failed")?.context("the consumer failed")?;
                bail!("the consumer stopped before reading");
            }
            if Instant::now() >= deadline {
                bail!("the consumer did not start within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let meter = self.meter(&daemon).await?;

        let start = Instant::now();
        let _ = recorder.start.set(start);
        self.add_watermark(TS_BASE + n as i64).await?;
        let handled = Arc::clone(&recorder);
        // When the last element reached :out (the rest is the consumer's).
        let released_at: Arc<OnceLock<Instant>> = Arc::new(OnceLock::new());
        let released = Arc::clone(&released_at);
        let end = self
            .wait("every element to be acknowledged", &mut daemon, move |b| {
                let handled = Arc::clone(&handled);
                let released = Arc::clone(&released);
                Box::pin(async move {
                    if released.get().is_none() {
                        let out: usize = redis::cmd("XLEN").arg(&b.keys.out).query_async(&mut b.conn).await?;
                        if out >= n {
                            let _ = released.set(Instant::now());
                        }
                    }
                    let done = handled.count.load(Ordering::Relaxed);
                    b.progress.count("handled", done, n);
                    if done < n {
                        return Ok(false);
                    }
                    let g = group_state(&mut b.conn, &b.keys.out, GROUP).await?;
                    let out: usize = redis::cmd("XLEN").arg(&b.keys.out).query_async(&mut b.conn).await?;
                    Ok(out >= n && g.is_some_and(|g| g.pending == 0 && g.last_delivered.ms > 0))
                })
            })
            .await?;
        let elapsed = (end - start).as_secs_f64();
        let cpu = self.read_meter(meter, &daemon).await?;
        stop.cancel();
        match tokio::time::timeout(Duration::from_secs(30), &mut task).await {
            Ok(joined) => joined.context("the consumer task failed")?.context("the consumer failed")?,
            Err(_) => {
                task.abort();
                bail!("the consumer did not stop within 30 s");
            }
        }
        let mut lat = recorder.latencies();
        if lat.len() != n {
            bail!("the handler ran {} times for {n} elements", lat.len());
        }
        let rss = self.stop(daemon)?;
        let mut figures = BTreeMap::from([
            ("elements_per_s", n as f64 / elapsed),
            ("seconds", elapsed),
            ("p50_ms", percentile(&mut lat, 50.0)),
            ("p99_ms", percentile(&mut lat, 99.0)),
            ("max_ms", percentile(&mut lat, 100.0)),
            ("all_released_ms", released_at.get().map_or(f64::NAN, |t| (*t - start).as_secs_f64() * 1000.0)),
            ("daemon_peak_rss_mib", kib_to_mib(rss)),
        ]);
        figures.extend(cpu);
        Ok(figures)
    }
}

/// The handler's record of the end-to-end scenario.
struct Recorder {
    /// When the watermark was written.
    start: OnceLock<Instant>,
    /// Handlers finished.
    count: AtomicUsize,
    /// Per element: milliseconds from the watermark until its handler ran.
    latencies: Mutex<Vec<f64>>,
}

impl Recorder {
    fn new(n: usize) -> Recorder {
        Recorder { start: OnceLock::new(), count: AtomicUsize::new(0), latencies: Mutex::new(Vec::with_capacity(n)) }
    }

    fn record(&self) {
        let ms = self.start.get().map_or(0.0, |s| s.elapsed().as_secs_f64() * 1000.0);
        if let Ok(mut l) = self.latencies.lock() {
            l.push(ms);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn latencies(&self) -> Vec<f64> {
        self.latencies.lock().map(|l| l.clone()).unwrap_or_default()
    }
}
