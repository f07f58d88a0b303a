//! What went wrong with Redis, in classes an operator (and the retry
//! policy) can act on, and how fast to retry each. Pure: the store maps a
//! client error to a [`Fault`]; [`RetryPolicy`] turns a fault and an attempt
//! count into a delay.

use std::fmt;
use std::time::Duration;

use super::backoff::Backoff;

/// A class of Redis failure. Each has its own log line, `/readyz` reason,
/// metric label ([`Fault::label`]) and retry pace ([`RetryPolicy`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Fault {
    /// The connection was refused, reset or closed: Redis is down or
    /// restarting, or the network is cut.
    Disconnected,
    /// Redis did not answer in time: a wedged server, a vanished host or a
    /// network blackhole (or writes paused for a failover).
    Unresponsive,
    /// `OOM`: Redis is at `maxmemory` with `noeviction` and refuses writes.
    OutOfMemory,
    /// `READONLY` or `UNBLOCKED … master -> replica`: the server under the
    /// connection is (now) a replica, as after a failover.
    ReadOnly,
    /// `LOADING`: Redis is loading its data set after a restart.
    Loading,
    /// `BUSY`: a script (ours or someone's) runs longer than
    /// `busy-reply-threshold`.
    Busy,
    /// `NOSCRIPT`: the script cache was flushed (restart, `SCRIPT FLUSH`).
    NoScript,
    /// `MASTERDOWN`, `CLUSTERDOWN` or `TRYAGAIN`: the replica lost its
    /// master, the cluster is not serving the slot, or a slot is migrating.
    ClusterDown,
    /// `MOVED` or `ASK`: a cluster slot moved to another node (resharding,
    /// failover) and a connection tied to the old node must follow it.
    Moved,
    /// `WRONGTYPE`: a key of tidemark's holds another type of value
    /// (another program overwrote it). Nothing works on it until it is
    /// repaired or deleted.
    WrongType,
    /// `NOGROUP`: a consumer group tidemark uses, or its stream, was deleted
    /// (`XGROUP DESTROY`, `DEL`, `FLUSHALL`); the next session recreates it.
    NoGroup,
    /// `WRONGPASS`/`NOAUTH`/authentication failed: wrong or missing
    /// password. Retrying cannot help.
    Auth,
    /// `NOPERM`: the ACL user lacks a permission tidemark needs.
    Permission,
    /// Anything else (an unexpected reply, an unknown server error).
    Other,
}

impl Fault {
    /// Classifies a server error by its code (the first word of the error
    /// reply, e.g. `OOM`) and message.
    pub fn from_server(code: &str, message: &str) -> Fault {
        match code {
            "OOM" => Fault::OutOfMemory,
            "READONLY" => Fault::ReadOnly,
            // Blocked clients are unblocked with this when the server turns
            // into a replica (`UNBLOCKED force unblock from blocking operation,
            // instance state changed (master -> replica?)`).
            "UNBLOCKED" if message.contains("replica") || message.contains("slave") => Fault::ReadOnly,
            "LOADING" => Fault::Loading,
            "BUSY" => Fault::Busy,
            "NOSCRIPT" => Fault::NoScript,
            "MASTERDOWN" | "CLUSTERDOWN" | "TRYAGAIN" => Fault::ClusterDown,
            "MOVED" | "ASK" => Fault::Moved,
            "WRONGTYPE" => Fault::WrongType,
            "NOGROUP" => Fault::NoGroup,
            "WRONGPASS" | "NOAUTH" => Fault::Auth,
            "NOPERM" => Fault::Permission,
            _ => Fault::Other,
        }
    }

    /// The metric label (`tidemark_redis_errors_total{class=…}`).
    pub fn label(self) -> &'static str {
        match self {
            Fault::Disconnected => "disconnected",
            Fault::Unresponsive => "unresponsive",
            Fault::OutOfMemory => "oom",
            Fault::ReadOnly => "readonly",
            Fault::Loading => "loading",
            Fault::Busy => "busy",
            Fault::NoScript => "noscript",
            Fault::ClusterDown => "clusterdown",
            Fault::Moved => "moved",
            Fault::WrongType => "wrongtype",
            Fault::NoGroup => "nogroup",
            Fault::Auth => "auth",
            Fault::Permission => "noperm",
            Fault::Other => "other",
        }
    }

    /// Retrying cannot help: the process should stop and say why.
    pub fn is_fatal(self) -> bool {
        matches!(self, Fault::Auth | Fault::Permission)
    }

    /// The connection itself is suspect and must be replaced (the others are
    /// answers from a working connection).
    pub fn needs_new_connection(self) -> bool {
        // A replica keeps answering READONLY on this connection; behind one
        // endpoint (managed Redis), only a new connection reaches the new
        // master.
        matches!(self, Fault::Disconnected | Fault::Unresponsive | Fault::ReadOnly | Fault::Moved)
    }

    /// What it means, in words for an operator's log line and `/readyz`.
    pub fn describe(self) -> &'static str {
        match self {
            Fault::Disconnected => "Redis closed or refused the connection (down, restarting, or unreachable)",
            Fault::Unresponsive => "Redis does not answer in time (wedged server, lost host or network)",
            Fault::OutOfMemory => {
                "Redis is out of memory (maxmemory reached with noeviction): it refuses writes until memory frees"
            }
            Fault::ReadOnly => "the Redis server became a read-only replica (failover): reconnecting to the master",
            Fault::Loading => "Redis is loading its data set after a restart",
            Fault::Busy => "Redis is busy running a long script",
            Fault::NoScript => "Redis lost its script cache (restart or SCRIPT FLUSH): reloading the scripts",
            Fault::ClusterDown => "the Redis master or cluster slot is unavailable (failover or slot migration)",
            Fault::Moved => "a Redis Cluster slot moved to another node (resharding or failover): following it",
            Fault::WrongType => {
                "a key of tidemark's holds the wrong type of value (overwritten by another program?): nothing works \
                 on it until it is repaired or deleted"
            }
            Fault::NoGroup => {
                "a consumer group or stream of tidemark's was deleted (XGROUP DESTROY, DEL or FLUSHALL?): recreating it"
            }
            Fault::Auth => "Redis refused the credentials (wrong or missing password)",
            Fault::Permission => "the Redis ACL user lacks a permission tidemark needs",
            Fault::Other => "a Redis command failed",
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

/// How fast to retry after each [`Fault`]: the configured reconnect backoff
/// for lost connections, and a floor per class so that a full, loading or
/// busy Redis is not stormed with retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// `daemon.reconnect_min` / `reconnect_max`.
    reconnect: Backoff,
}

impl RetryPolicy {
    /// A policy built on the configured reconnect backoff.
    pub fn new(reconnect: Backoff) -> Self {
        RetryPolicy { reconnect }
    }

    /// The backoff for `fault`: its own first delay and cap, never below
    /// the configured ones.
    pub fn backoff(&self, fault: Fault) -> Backoff {
        let (min, max) = (self.reconnect.min(), self.reconnect.max());
        let (floor, cap) = match fault {
            Fault::Disconnected | Fault::Unresponsive | Fault::Other => return self.reconnect,
            // A failover completes in about a second: look again quickly.
            Fault::ReadOnly | Fault::ClusterDown | Fault::Moved | Fault::NoGroup => {
                (min, max.min(Duration::from_secs(2)).max(min))
            }
            // Needs an operator: look now and then, without a storm.
            Fault::WrongType => (Duration::from_secs(1), Duration::from_secs(30)),
            Fault::NoScript => (min, max),
            Fault::Loading | Fault::Busy => (Duration::from_millis(500), Duration::from_secs(5)),
            // Memory frees when consumers catch up and trims run: seconds.
            Fault::OutOfMemory => (Duration::from_secs(1), Duration::from_secs(30)),
            // Fatal; a caller that retries anyway does so slowly.
            Fault::Auth | Fault::Permission => (Duration::from_secs(5), Duration::from_secs(60)),
        };
        let floor = floor.max(min);
        Backoff::try_new(floor, cap.max(floor)).expect("floor > 0 and cap >= floor")
    }

    /// The delay before retry number `attempt` (0-based) of an outage of
    /// class `fault`, given a uniform random `unit` in `[0, 1]`.
    pub fn delay(&self, fault: Fault, attempt: u32, unit: f64) -> Duration {
        self.backoff(fault).delay(attempt, unit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn server_codes_map_to_classes() {
        let cases = [
            ("OOM", "command not allowed when used memory > 'maxmemory'.", Fault::OutOfMemory),
            ("READONLY", "You can't write against a read only replica.", Fault::ReadOnly),
            (
                "UNBLOCKED",
                "force unblock from blocking operation, instance state changed (master -> replica?)",
                Fault::ReadOnly,
            ),
            ("UNBLOCKED", "client unblocked via CLIENT UNBLOCK", Fault::Other),
            ("LOADING", "Redis is loading the dataset in memory", Fault::Loading),
            ("BUSY", "Redis is busy running a script.", Fault::Busy),
            ("NOSCRIPT", "No matching script.", Fault::NoScript),
            ("MASTERDOWN", "Link with MASTER is down", Fault::ClusterDown),
            ("CLUSTERDOWN", "The cluster is down", Fault::ClusterDown),
            ("TRYAGAIN", "Multiple keys request during rehashing of slot", Fault::ClusterDown),
            ("MOVED", "3999 127.0.0.1:6381", Fault::Moved),
            ("WRONGTYPE", "Operation against a key holding the wrong kind of value", Fault::WrongType),
            ("NOGROUP", "No such key 'x' or consumer group 'g' in XREADGROUP with GROUP option", Fault::NoGroup),
            ("ASK", "3999 127.0.0.1:6381", Fault::Moved),
            ("WRONGPASS", "invalid username-password pair", Fault::Auth),
            ("NOAUTH", "Authentication required.", Fault::Auth),
            ("NOPERM", "this user has no permissions", Fault::Permission),
            ("ERR", "unknown command", Fault::Other),
        ];
        for (code, message, fault) in cases {
            assert_eq!(Fault::from_server(code, message), fault, "{code} {message}");
        }
    }

    #[test]
    fn only_credentials_are_fatal_and_labels_are_distinct() {
        let all = [
            Fault::Disconnected,
            Fault::Unresponsive,
            Fault::OutOfMemory,
            Fault::ReadOnly,
            Fault::Loading,
            Fault::Busy,
            Fault::NoScript,
            Fault::ClusterDown,
            Fault::Moved,
            Fault::WrongType,
            Fault::NoGroup,
            Fault::Auth,
            Fault::Permission,
            Fault::Other,
        ];
        let fatal: Vec<Fault> = all.iter().copied().filter(|f| f.is_fatal()).collect();
        assert_eq!(fatal, [Fault::Auth, Fault::Permission]);
        let labels: std::collections::HashSet<&str> = all.iter().map(|f| f.label()).collect();
        assert_eq!(labels.len(), all.len());
    }

    #[test]
    fn a_full_redis_is_retried_slowly() {
        let policy = RetryPolicy::new(Backoff::try_new(Duration::from_millis(100), Duration::from_secs(10)).unwrap());
        // The first retry of a lost connection comes fast; of a full Redis, not.
        assert!(policy.delay(Fault::Disconnected, 0, 1.0) <= Duration::from_millis(100));
        assert!(policy.delay(Fault::OutOfMemory, 0, 0.0) >= Duration::from_millis(500));
        assert!(policy.delay(Fault::OutOfMemory, 30, 1.0) == Duration::from_secs(30));
        // A failover is looked at again within two seconds at most.
        assert!(policy.delay(Fault::ReadOnly, 30, 1.0) <= Duration::from_secs(2));
    }

    proptest! {
        #[test]
        fn every_class_stays_within_its_bounds(min_ms in 1u64..3_000, extra_ms in 0u64..60_000,
                                               attempt in 0u32..100, unit in 0.0f64..=1.0, class in 0usize..14) {
            let all = [Fault::Disconnected, Fault::Unresponsive, Fault::OutOfMemory, Fault::ReadOnly,
                       Fault::Loading, Fault::Busy, Fault::NoScript, Fault::ClusterDown, Fault::Moved,
                       Fault::WrongType, Fault::NoGroup, Fault::Auth, Fault::Permission, Fault::Other];
            let min = Duration::from_millis(min_ms);
            let max = Duration::from_millis(min_ms + extra_ms);
            let policy = RetryPolicy::new(Backoff::try_new(min, max).unwrap());
            let fault = all[class];
            let d = policy.delay(fault, attempt, unit);
            // Never faster than configured, never slower than a minute.
            prop_assert!(d >= min / 2);
            prop_assert!(d <= max.max(Duration::from_secs(60)));
        }
    }
}
