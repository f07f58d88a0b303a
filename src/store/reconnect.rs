//! The one reconnect policy of every long-running Redis user (the daemon's
//! ingest loop, the consumer runtime, the clock, housekeeping, leases): it
//! owns the attempt count and the sleep, logs an outage once when it begins
//! (and again only if its class changes) and once when it ends, keeps
//! `/readyz` and the error metric current, and paces retries by the
//! failure's [`Fault`] class so that a full, loading or busy Redis is not
//! stormed.

use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::StoreError;
use crate::core::{Fault, RetryPolicy};
use crate::health::Readiness;

/// An outage in progress.
#[derive(Debug, Clone, Copy)]
struct Outage {
    /// Its class now (the last failure's).
    fault: Fault,
    /// When its first failure happened.
    since: Instant,
}

/// Reconnect bookkeeping of one Redis user (see the module docs).
#[derive(Debug)]
pub struct Reconnect {
    /// Who reconnects, for log lines (`daemon`, `consumer`, `clock`, …).
    what: &'static str,
    /// The pace per fault class.
    policy: RetryPolicy,
    /// Set on every change when this user decides readiness.
    readiness: Option<Readiness>,
    /// Failed attempts in the current outage (drives the backoff).
    attempts: u32,
    /// The current outage, if any.
    outage: Option<Outage>,
    /// Whether a session was ever set up: the first failures are "cannot
    /// reach", later ones "lost".
    ever_up: bool,
    /// A side task (lease, clock, housekeeping) of a process whose main
    /// loop reports outages: its lines name it and never repeat the main
    /// loop's "lost the connection" warning.
    side: bool,
}

impl Reconnect {
    /// Reconnect bookkeeping for `what`, paced by `policy`.
    pub fn new(what: &'static str, policy: RetryPolicy) -> Self {
        Reconnect { what, policy, readiness: None, attempts: 0, outage: None, ever_up: false, side: false }
    }

    /// Reconnect bookkeeping for a side task `what` (see `side`): its log lines name it.
    pub fn side_task(what: &'static str, policy: RetryPolicy) -> Self {
        Reconnect { side: true, ..Reconnect::new(what, policy) }
    }

    /// Also keep `readiness` current.
    pub fn readiness(mut self, readiness: Readiness) -> Self {
        self.readiness = Some(readiness);
        self
    }

    /// The failure class of the outage in progress, if any.
    pub fn outage(&self) -> Option<Fault> {
        self.outage.map(|o| o.fault)
    }

    /// A session is set up: ends the outage (logged once) and marks the
    /// user ready. Returns whether this was a reconnect (a session had been
    /// set up before).
    pub fn up(&mut self) -> bool {
        if let Some(outage) = self.outage.take() {
            if self.ever_up || self.side {
                info!(
                    what = self.what,
                    class = outage.fault.label(),
                    after = ?outage.since.elapsed(),
                    attempts = self.attempts,
                    "{}: Redis works again",
                    self.what
                );
            }
        }
        self.attempts = 0;
        if let Some(r) = &self.readiness {
            r.set_ready();
        }
        let reconnect = self.ever_up;
        self.ever_up = true;
        reconnect
    }

    /// Records a failure: logs it if it begins an outage or changes its
    /// class, counts it, marks the user unavailable, and returns how long
    /// to wait before the next attempt.
    pub fn down(&mut self, error: &StoreError) -> Duration {
        let fault = error.fault();
        crate::metrics::record_redis_error(fault);
        if let Some(r) = &self.readiness {
            r.set_unavailable(fault, error);
        }
        let delay = self.policy.delay(fault, self.attempts, rand::random::<f64>());
        let connection = fault.needs_new_connection();
        let what = self.what;
        match self.outage {
            Some(o) if o.fault == fault => {
                let attempts = self.attempts;
                match (self.side, connection) {
                    (false, true) => debug!(what, error = %error, attempts, "still cannot reach Redis"),
                    (false, false) => debug!(what, error = %error, attempts, "Redis still refuses the work"),
                    (true, _) => debug!(what, error = %error, attempts, "{what}: Redis still unavailable"),
                }
            }
            _ => {
                let class = fault.label();
                match (self.side, connection, self.ever_up) {
                    (false, true, true) => {
                        warn!(what, class, error = %error, retry_in = ?delay, "lost the connection to Redis ({fault}); reconnecting")
                    }
                    (false, true, false) => {
                        warn!(what, class, error = %error, retry_in = ?delay, "cannot reach Redis ({fault}); retrying with backoff")
                    }
                    (false, false, _) => {
                        warn!(what, class, error = %error, retry_in = ?delay, "Redis refuses the work: {fault}; retrying")
                    }
                    (true, _, _) => {
                        warn!(what, class, error = %error, retry_in = ?delay, "{what}: Redis unavailable: {fault}")
                    }
                }
                let since = self.outage.map_or_else(Instant::now, |o| o.since);
                self.outage = Some(Outage { fault, since });
            }
        }
        self.attempts = self.attempts.saturating_add(1);
        delay
    }

    /// [`Reconnect::down`], then the wait, cut short by `shutdown`. Returns
    /// `false` if shutdown came first.
    pub async fn wait(&mut self, error: &StoreError, shutdown: &CancellationToken) -> bool {
        let delay = self.down(error);
        tokio::select! {
            _ = tokio::time::sleep(delay) => true,
            _ = shutdown.cancelled() => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::backoff::Backoff;
    use crate::health::Ready;

    fn policy() -> RetryPolicy {
        RetryPolicy::new(Backoff::try_new(Duration::from_millis(10), Duration::from_millis(80)).unwrap())
    }

    #[test]
    fn an_outage_sets_readiness_and_ends_with_up() {
        let ready = Readiness::default();
        let mut r = Reconnect::new("test", policy()).readiness(ready.clone());
        let lost = StoreError::io(std::io::ErrorKind::ConnectionRefused, "refused");
        assert!(r.down(&lost) <= Duration::from_millis(10));
        assert!(matches!(ready.get(), Ready::Unavailable(Fault::Disconnected, _)));
        assert_eq!(r.outage(), Some(Fault::Disconnected));
        // Backoff grows with the attempts, up to the cap.
        for _ in 0..10 {
            r.down(&lost);
        }
        assert!(r.down(&lost) >= Duration::from_millis(40));
        assert!(!r.up(), "the first session is not a reconnect");
        assert_eq!(ready.get(), Ready::Ready);
        assert_eq!(r.outage(), None);
        // After a reconnect the backoff starts over.
        assert!(r.down(&lost) <= Duration::from_millis(10));
        assert!(r.up(), "a later session is a reconnect");
    }

    #[tokio::test(start_paused = true)]
    async fn wait_sleeps_and_shutdown_cuts_it_short() {
        let mut r = Reconnect::new("test", policy());
        let lost = StoreError::io(std::io::ErrorKind::ConnectionReset, "reset");
        let stop = CancellationToken::new();
        assert!(r.wait(&lost, &stop).await);
        stop.cancel();
        assert!(!r.wait(&lost, &stop).await);
    }
}
