//! Clock mode: the watermark follows the Redis server's `TIME` (ms). One
//! daemon at a time, the clock leader (holder of a short lease lock), ticks
//! exactly when the next element falls due, or at once when `apply.lua`
//! announces an earlier one on the wake-up channel; the other daemons stand
//! by to take over. Every clock-mode daemon also raises the watermark to
//! the server's time in each apply call, so an add that is already due is
//! released at once by whichever daemon applies it.
//!
//! Correctness never rests on the leader: a tick is idempotent (anyone may
//! run it), nothing is released before the script's own `TIME` reaches its
//! ts, and a lost wake-up only delays a release until `clock_max_sleep`.

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use futures::{FutureExt, StreamExt};
use redis::aio::PubSubStream;
use tokio::time::{sleep, sleep_until, timeout, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::Stats;
use crate::config::Settings;
use crate::store::scripts::ClockTick;
use crate::store::{Conn, Keys, Namespace, Reconnect, Scripts, StoreError};

/// Lifetime of the clock leader's lock: a dead leader is replaced within
/// about this long (plus one [`FOLLOWER_POLL`]). Short, because losing the
/// lock to a stall costs nothing (ticks are idempotent) while a dead
/// leader's lock delays releases that no input triggers.
const LOCK_TTL: Duration = Duration::from_secs(1);
/// How often the leader extends its lock: four times per lifetime, so a
/// slow reply or two do not cost the lock.
const LOCK_REFRESH: Duration = Duration::from_millis(250);
/// How often a standby daemon tries to take the lock.
const FOLLOWER_POLL: Duration = Duration::from_millis(100);

/// Runs the clock until `shutdown` is cancelled: stands by, leads while it
/// holds the lock, and reconnects with backoff after Redis failures.
pub async fn run(settings: Settings, ns: Namespace, stats: Arc<Stats>, shutdown: CancellationToken) {
    let clock = Clock {
        scripts: Scripts::new().dedup_window(settings.daemon.dedup_window),
        lock: ns.partition(0).lock("clock"),
        partitions: ns.all(),
        // Unique per process, so a restart under the same consumer name (or
        // a misconfigured duplicate name) never extends someone else's lock.
        token: format!("{}:{:016x}", settings.daemon.consumer, rand::random::<u64>()),
        settings: &settings,
        stats: &stats,
    };
    let mut reconnect = Reconnect::side_task("clock", settings.daemon.retry);
    loop {
        match clock.session(&shutdown, &mut reconnect).await {
            Ok(()) => return,
            Err(e) => {
                if !reconnect.wait(&e, &shutdown).await {
                    return;
                }
            }
        }
    }
}

/// How a leadership ended without a Redis error.
enum Led {
    /// Shutdown was requested; the lock is still ours.
    Shutdown,
    /// Another daemon holds the lock now.
    Lost,
}

/// The clock's fixed state.
struct Clock<'a> {
    /// The clock scripts (`clock.lua`, `lock.lua`).
    scripts: Scripts,
    /// The leader lock's key.
    lock: String,
    /// Every partition's keys: the leader ticks them all.
    partitions: Vec<Keys>,
    /// What this process writes into the lock, to recognise it as its own.
    token: String,
    /// Validated settings.
    settings: &'a Settings,
    /// The daemon's counters (releases by the clock count too).
    stats: &'a Stats,
}

impl Clock<'_> {
    /// One connected period: stands by until the lock is free, leads while
    /// it holds it. `Ok` on shutdown, `Err` on a Redis failure (the lock
    /// then lapses on its own within [`LOCK_TTL`]).
    async fn session(&self, shutdown: &CancellationToken, reconnect: &mut Reconnect) -> Result<(), StoreError> {
        let s = self.settings;
        // Replies slower than the lock's lifetime mean we could not lead
        // anyway; failing fast also bounds how long shutdown can wait.
        let mut conn = s.redis.connect(s.connect.response_timeout.min(LOCK_TTL)).await?;
        reconnect.up();
        let mut standing_by = false;
        loop {
            if self.scripts.lock(&mut conn, &self.lock, &self.token, Some(LOCK_TTL)).await? {
                info!(consumer = %s.daemon.consumer, "clock leader: the watermark follows the Redis server's TIME");
                standing_by = false;
                match self.lead(&mut conn, shutdown).await? {
                    Led::Shutdown => {
                        // Let a standby daemon take over at once.
                        let released = self.scripts.lock(&mut conn, &self.lock, &self.token, None).await;
                        if let Err(e) = released {
                            debug!(error = %e, "clock: could not release the lock; it lapses on its own");
                        }
                        info!("clock leader stopped");
                        return Ok(());
                    }
                    Led::Lost => warn!("clock: lost the clock lock; another daemon advances the clock now"),
                }
            } else if !standing_by {
                debug!("clock: another daemon leads the clock; standing by");
                standing_by = true;
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(()),
                _ = sleep(FOLLOWER_POLL) => {}
            }
        }
    }

    /// Leads the clock while the lock is ours: tick, then sleep until the
    /// next element is due, a wake-up arrives, or `clock_max_sleep` passes;
    /// extends the lock every [`LOCK_REFRESH`] meanwhile.
    async fn lead(&self, conn: &mut Conn, shutdown: &CancellationToken) -> Result<Led, StoreError> {
        let d = &self.settings.daemon;
        // Subscribed before the first tick, so an add scheduled after that
        // tick cannot be missed.
        let mut wake = self.subscribe().await?;
        let mut refresh_at = Instant::now() + LOCK_REFRESH;
        loop {
            if Instant::now() >= refresh_at {
                if !self.extend(conn).await? {
                    return Ok(Led::Lost);
                }
                refresh_at = Instant::now() + LOCK_REFRESH;
            }
            let tick = self.tick_all(conn, d.release_chunk).await?;
            if tick.released > 0 {
                self.stats.record_release(tick.released);
                debug!(released = tick.released, now_ms = tick.now_ms, "clock: released due elements");
            }
            if shutdown.is_cancelled() {
                return Ok(Led::Shutdown);
            }
            if tick.more_due {
                continue;
            }
            let wake_at = Instant::now() + until_next_tick(tick.next_due, tick.now_ms, d.clock_max_sleep);
            loop {
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return Ok(Led::Shutdown),
                    msg = wake.next() => {
                        if msg.is_none() {
                            return Err(subscription_closed());
                        }
                        // One tick covers every announcement queued so far.
                        loop {
                            match wake.next().now_or_never() {
                                Some(Some(_)) => {}
                                Some(None) => return Err(subscription_closed()),
                                None => break,
                            }
                        }
                        break;
                    }
                    _ = sleep_until(wake_at) => break,
                    _ = sleep_until(refresh_at) => {
                        if !self.extend(conn).await? {
                            return Ok(Led::Lost);
                        }
                        refresh_at = Instant::now() + LOCK_REFRESH;
                    }
                }
            }
        }
    }

    /// Ticks every partition at once; the result is their sum (released),
    /// any (more due), and the earliest next due ts.
    async fn tick_all(&self, conn: &Conn, chunk: usize) -> Result<ClockTick, StoreError> {
        let ticks = self.partitions.iter().map(|keys| {
            let mut c = conn.clone();
            async move { self.scripts.clock(&mut c, keys, chunk).await }
        });
        let mut all = ClockTick { released: 0, more_due: false, next_due: None, now_ms: i64::MIN };
        for tick in join_all(ticks).await {
            let tick = tick?;
            all.released += tick.released;
            all.more_due |= tick.more_due;
            all.next_due = match (all.next_due, tick.next_due) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            all.now_ms = all.now_ms.max(tick.now_ms);
        }
        Ok(all)
    }

    /// Extends the lock; `false` if another daemon holds it now.
    async fn extend(&self, conn: &mut Conn) -> Result<bool, StoreError> {
        self.scripts.lock(conn, &self.lock, &self.token, Some(LOCK_TTL)).await
    }

    /// Subscribes to the wake-up channel on a dedicated connection.
    async fn subscribe(&self) -> Result<PubSubStream, StoreError> {
        let s = self.settings;
        let server = s.redis.server().await?;
        let mut pubsub = timeout(s.connect.connect_timeout, server.get_async_pubsub())
            .await
            .map_err(|_| timed_out("connecting for the wake-up subscription"))??;
        timeout(s.connect.response_timeout, pubsub.subscribe(self.partitions[0].wake_channel()))
            .await
            .map_err(|_| timed_out("subscribing to the wake-up channel"))??;
        Ok(pubsub.into_on_message())
    }
}

/// How long the leader sleeps after a tick that left nothing due: until
/// the next due ts on the server's clock, at most `max_sleep` (which also
/// bounds the delay a lost wake-up can cause).
fn until_next_tick(next_due: Option<i64>, now_ms: i64, max_sleep: Duration) -> Duration {
    match next_due {
        Some(ts) => {
            let ms = u64::try_from(ts.saturating_sub(now_ms)).unwrap_or(0);
            Duration::from_millis(ms).min(max_sleep)
        }
        None => max_sleep,
    }
}

fn subscription_closed() -> StoreError {
    StoreError::io(std::io::ErrorKind::ConnectionReset, "the wake-up subscription was closed")
}

fn timed_out(what: &'static str) -> StoreError {
    StoreError::io(std::io::ErrorKind::TimedOut, what)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sleeps_until_the_next_due_ts_at_most_max_sleep() {
        let max = Duration::from_secs(1);
        assert_eq!(until_next_tick(Some(1_000_250), 1_000_000, max), Duration::from_millis(250));
        assert_eq!(until_next_tick(Some(1_005_000), 1_000_000, max), max);
        assert_eq!(until_next_tick(None, 1_000_000, max), max);
        // Not expected after a tick (it releases up to now), but harmless: tick again.
        assert_eq!(until_next_tick(Some(999_999), 1_000_000, max), Duration::ZERO);
        // Extreme timestamps neither overflow nor panic.
        assert_eq!(until_next_tick(Some(i64::MAX), i64::MIN, max), max);
        assert_eq!(until_next_tick(Some(i64::MIN), i64::MAX, max), Duration::ZERO);
    }
}
