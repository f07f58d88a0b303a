//! The daemon. Each partition's input is applied by one daemon at a time,
//! its owner: the daemons register in the namespace, spread the
//! partitions evenly among the live ones ([`assign`]), hold each owned
//! partition with a lease lock whose token fences every apply call, and
//! run one [`worker`] per owned partition; the others stand by and take a
//! partition over within about a lease lifetime when its owner dies or
//! leaves. Beside them run the liveness lease, the housekeeping leader
//! election and, in clock mode, the clock.

mod assign;
pub mod clock;
mod coordinator;
pub mod housekeeping;
pub mod summary;
mod window;
mod worker;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::info;

pub use crate::health::Stats;

use crate::config::Settings;
use crate::store::batch::Kind;
use crate::store::{self, meta, ApplyOutcome, Conn, Namespace, Prepared, Reconnect, StoreError, INPUT_GROUP};

/// Runs the daemon until `shutdown` is cancelled. Returns an error only for
/// failures that retrying cannot fix (wrong password, Redis too old, a
/// partition count that disagrees with the namespace's record).
pub async fn run(settings: Settings, stats: Arc<Stats>, shutdown: CancellationToken) -> Result<(), StoreError> {
    info!(
        redis = %settings.redis_display,
        namespace = %settings.namespace.name(),
        consumer = %settings.daemon.consumer,
        "tidemark daemon starting"
    );
    let mut reconnect = Reconnect::new("daemon", settings.daemon.retry).readiness(stats.readiness.clone());
    // The layout first: nothing runs before the partition count is agreed.
    let ns = loop {
        match layout(&settings).await {
            Ok(ns) => break ns,
            Err(e) if e.is_fatal() => return Err(e),
            Err(e) => {
                if !reconnect.wait(&e, &shutdown).await {
                    info!("tidemark daemon stopped while Redis was unavailable");
                    return Ok(());
                }
            }
        }
    };
    // Side tasks live as long as the daemon: its liveness lease (so peers
    // claim its input at once if it dies), the housekeeping leader
    // election, and in clock mode the clock.
    let stop_side = CancellationToken::new();
    let keys0 = ns.partition(0);
    let mut side = vec![
        store::lease::keep(
            settings.redis.clone(),
            settings.daemon.retry,
            keys0.lease("in", INPUT_GROUP, &settings.daemon.consumer),
            settings.daemon.consumer.clone(),
            settings.lease.ttl,
            stop_side.clone(),
        ),
        tokio::spawn(housekeeping::run(settings.clone(), ns.clone(), stats.clone(), stop_side.clone())),
    ];
    if settings.daemon.clock {
        side.push(tokio::spawn(clock::run(settings.clone(), ns.clone(), stats.clone(), stop_side.clone())));
    }
    side.extend(summary::spawn(&settings, &ns, &stats, &stop_side));
    let result = coordinator::run(&settings, &ns, &stats, &shutdown, &mut reconnect).await;
    stats.readiness.set_shutting_down();
    stop_side.cancel();
    for task in side {
        let _ = task.await;
    }
    info!("tidemark daemon stopped");
    result
}

/// Connects and agrees on the namespace's layout (recording it if this is
/// the first daemon).
async fn layout(settings: &Settings) -> Result<Namespace, StoreError> {
    let mut conn: Conn = settings.redis.connect(settings.connect.response_timeout).await?;
    store::check_version(&mut conn, &settings.namespace.meta()).await?;
    Ok(meta::resolve(&mut conn, &settings.namespace, settings.partitions, true).await??)
}

/// Until when this daemon's ownership of a partition is certain: the lease
/// lifetime from the last successful renewal, by the local monotonic clock
/// (a daemon that was frozen past it stops before doing anything else).
#[derive(Debug)]
pub(crate) struct Validity {
    /// The origin of `until_ms`.
    epoch: Instant,
    /// Milliseconds after `epoch`; 0 = not valid.
    until_ms: AtomicU64,
}

impl Validity {
    fn new() -> Self {
        Validity { epoch: Instant::now(), until_ms: AtomicU64::new(0) }
    }

    /// Ownership was confirmed just before `at`, for `ttl`.
    fn renew(&self, at: Instant, ttl: Duration) {
        let until = (at + ttl).duration_since(self.epoch).as_millis() as u64;
        self.until_ms.store(until, Relaxed);
    }

    /// Ownership ended.
    fn end(&self) {
        self.until_ms.store(0, Relaxed);
    }

    /// Whether ownership is still certain now.
    pub(crate) fn ok(&self) -> bool {
        (Instant::now().duration_since(self.epoch).as_millis() as u64) < self.until_ms.load(Relaxed)
    }
}

/// Adds one apply call's outcome to the counters.
fn record_apply(stats: &Stats, o: &ApplyOutcome) {
    let applied = o.adds + o.cancels + o.watermarks + o.dead + o.duplicates;
    stats.ingested.fetch_add(applied, Relaxed);
    stats.adds.fetch_add(o.adds, Relaxed);
    stats.cancels.fetch_add(o.cancels, Relaxed);
    stats.watermarks.fetch_add(o.watermarks, Relaxed);
    stats.dead.fetch_add(o.dead, Relaxed);
    stats.late.fetch_add(o.late, Relaxed);
    stats.duplicates.fetch_add(o.duplicates, Relaxed);
    stats.released.fetch_add(o.released + o.late, Relaxed);
}

/// Counts the dead letters of one apply call by reason: `dead` of the
/// malformed entries among `processed` (the batch's done prefix) went to
/// `:dead`. They are fewer only when some were found already applied (a
/// redelivery another daemon dead-lettered); then the first ones count.
fn record_input_dead_letters(processed: &[&Prepared], dead: u64) {
    let reasons = processed.iter().filter_map(|p| match p.kind() {
        Kind::Dead(reason) => Some(reason),
        _ => None,
    });
    for reason in reasons.take(dead as usize) {
        crate::metrics::record_dead_letters(reason.code(), 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn validity_lapses_after_its_lifetime() {
        let v = Validity::new();
        assert!(!v.ok(), "not valid before the first renewal");
        v.renew(Instant::now(), Duration::from_secs(5));
        assert!(v.ok());
        tokio::time::advance(Duration::from_millis(4900)).await;
        assert!(v.ok());
        tokio::time::advance(Duration::from_millis(200)).await;
        assert!(!v.ok(), "lapsed");
        v.renew(Instant::now(), Duration::from_secs(5));
        v.end();
        assert!(!v.ok());
    }
}
