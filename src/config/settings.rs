//! Validation: the layered values turned into the settings the program
//! runs with, every bad value refused with a message naming its key.

use std::time::Duration;

use super::secrets::{redact_url, redis_target, Target};
use super::{invalid, ConfigError, Env, RawConfig, DEFAULT_HTTP_ADDR};
use crate::consume::rules;
use crate::core::backoff::Backoff;
use crate::core::op::{Limits, HARD_MAX_PAYLOAD_FIELDS};
use crate::core::route::MAX_PARTITIONS;
use crate::core::RetryPolicy;
use crate::store::keys::{invalid_namespace, Namespace};
use crate::store::{ConnectOptions, Endpoint, GroupStart, Mode};

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The daemon's validated settings.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DaemonSettings {
    /// Consumer name in the input group.
    pub consumer: String,
    /// Output groups to create.
    pub groups: Vec<String>,
    /// Entries per read and per apply call.
    pub batch_size: usize,
    /// `XREADGROUP` block time.
    pub block: Duration,
    /// Most elements released per script call.
    pub release_chunk: usize,
    /// Idle time before another daemon's input entries are claimed.
    pub claim_idle: Duration,
    /// Sweep period for due elements.
    pub sweep_interval: Duration,
    /// Drain deadline on shutdown.
    pub shutdown_grace: Duration,
    /// Retry pace after Redis failures, by fault class.
    pub retry: RetryPolicy,
    /// Input size limits.
    pub limits: Limits,
    /// Clock mode.
    pub clock: bool,
    /// Clock mode: longest sleep between checks.
    pub clock_max_sleep: Duration,
    /// How often Redis's eviction policy and memory use are looked at.
    pub memory_check_interval: Duration,
    /// Adds of ids released less than this ago are dropped (`None`: off).
    pub dedup_window: Option<Duration>,
}

/// The consumer runtime's validated settings.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConsumeSettings {
    /// Consumer name in the output group.
    pub consumer: String,
    /// Most elements handled at once.
    pub concurrency: usize,
    /// Elements read ahead of free handler slots.
    pub prefetch: usize,
    /// Most entries per read.
    pub batch_size: usize,
    /// `XREADGROUP` block time.
    pub block: Duration,
    /// Idle time before failed or abandoned entries are retried.
    pub claim_idle: Duration,
    /// Deliveries before an entry is dead-lettered.
    pub max_deliveries: u64,
    /// Per-element command timeout (`tidemark consume`).
    pub timeout: Duration,
    /// Drain deadline on shutdown.
    pub shutdown_grace: Duration,
    /// Where a group that does not exist yet starts reading.
    pub from: GroupStart,
}

/// Liveness lease settings.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct LeaseSettings {
    /// Lease lifetime (refreshed every third of it).
    pub ttl: Duration,
    /// Idle time after which a dead consumer with nothing pending is removed.
    pub dead_consumer_grace: Duration,
}

/// Housekeeping settings.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HousekeepingSettings {
    /// Period of the leader's work.
    pub interval: Duration,
    /// Redlock lock lifetime.
    pub lock_ttl: Duration,
    /// Trim `:in`.
    pub trim_input: bool,
    /// Trim `:out`.
    pub trim_output: bool,
    /// Cap of `:dead` (0 = none).
    pub dead_maxlen: u64,
    /// Max age of `:out` entries (`None` = unlimited).
    pub output_max_age: Option<Duration>,
}

/// Everything the program runs with.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Settings {
    /// How to reach Redis (validated URL, password and TLS applied; not
    /// connected).
    pub redis: Endpoint,
    /// The URL with any password masked, for logs and status.
    pub redis_display: String,
    /// Connection timeouts.
    pub connect: ConnectOptions,
    /// Key names.
    pub namespace: Namespace,
    /// `partitions` as configured (`None`: take the namespace's record).
    pub partitions: Option<u16>,
    /// Daemon settings.
    pub daemon: DaemonSettings,
    /// Consumer settings.
    pub consume: ConsumeSettings,
    /// Lease settings.
    pub lease: LeaseSettings,
    /// Housekeeping settings.
    pub housekeeping: HousekeepingSettings,
    /// Log format.
    pub log_format: LogFormat,
    /// Period of the daemon's summary line (`None`: off).
    pub log_summary_interval: Option<Duration>,
    /// Where to serve HTTP (`None`: off).
    pub http_addr: Option<std::net::SocketAddr>,
    /// Whether `http_addr` is the built-in default rather than configured
    /// (flag, environment or file): the default gives way to a free port
    /// when it is taken, a configured address that is taken is an error.
    pub http_addr_is_default: bool,
}

/// Hard upper bound on `batch_size`: the apply script unpacks two values
/// per entry into one Lua call, and Lua's stack holds about 8000.
pub const MAX_BATCH_SIZE: usize = 3000;
/// Hard upper bound on `release_chunk`, for the same reason.
pub const MAX_RELEASE_CHUNK: usize = 5000;

fn valid_name(key: &str, value: &str) -> Result<(), ConfigError> {
    if value.is_empty() {
        return Err(invalid(key, "must not be empty"));
    }
    if value.chars().any(|c| c.is_control() || c.is_whitespace() || c == '{' || c == '}') {
        return Err(invalid(key, format!("{value:?} must not contain blanks, control characters or braces")));
    }
    Ok(())
}

fn positive(key: &str, d: Duration) -> Result<Duration, ConfigError> {
    if d.is_zero() {
        return Err(invalid(key, "must be greater than zero"));
    }
    Ok(d)
}

fn range(key: &str, v: usize, lo: usize, hi: usize) -> Result<usize, ConfigError> {
    if !(lo..=hi).contains(&v) {
        return Err(invalid(key, format!("must be between {lo} and {hi} (got {v})")));
    }
    Ok(v)
}

/// A consumer name: the configured one, else `POD_NAME`, else the host name.
pub(crate) fn consumer_name(configured: &str, env: &dyn Env) -> String {
    if !configured.is_empty() {
        return configured.to_owned();
    }
    if let Some(pod) = env.var("POD_NAME").filter(|p| !p.is_empty()) {
        return pod;
    }
    hostname::get()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "tidemark".into())
}

impl Settings {
    /// Validates `raw`. `env` supplies `POD_NAME` and the host name fallback.
    pub fn from_raw(raw: RawConfig, env: &dyn Env) -> Result<Settings, ConfigError> {
        valid_name("namespace", &raw.namespace)?;
        valid_name("key_prefix", &raw.key_prefix)?;

        let url = raw.redis.url.trim();
        let target = redis_target(&raw.redis, env)?;
        if let Some(why) = invalid_namespace(&raw.namespace) {
            return Err(invalid("namespace", why));
        }
        let partitions = match raw.partitions {
            Some(p) if !(1..=MAX_PARTITIONS).contains(&p) => {
                return Err(invalid("partitions", format!("must be between 1 and {MAX_PARTITIONS} (got {p})")))
            }
            p => p,
        };
        let mode = match raw.redis.mode.as_str() {
            "auto" => Mode::Auto,
            "standalone" => Mode::Standalone,
            "cluster" => Mode::Cluster,
            other => return Err(invalid("redis.mode", format!("{other:?} is not one of auto, standalone, cluster"))),
        };

        let connect = ConnectOptions {
            connect_timeout: positive("redis.connect_timeout", raw.redis.connect_timeout)?,
            response_timeout: positive("redis.response_timeout", raw.redis.response_timeout)?,
        };

        let d = &raw.daemon;
        let consumer = consumer_name(&d.consumer, env);
        valid_name("daemon.consumer", &consumer)?;
        for g in &d.groups {
            valid_name("daemon.groups", g)?;
        }
        let backoff = Backoff::try_new(d.reconnect_min, d.reconnect_max)
            .map_err(|e| invalid("daemon.reconnect_min/reconnect_max", e.to_string()))?;
        let l = &raw.limits;
        let daemon = DaemonSettings {
            consumer,
            groups: d.groups.clone(),
            batch_size: range("daemon.batch_size", d.batch_size, 1, MAX_BATCH_SIZE)?,
            block: positive("daemon.block", d.block)?,
            release_chunk: range("daemon.release_chunk", d.release_chunk, 1, MAX_RELEASE_CHUNK)?,
            claim_idle: positive("daemon.claim_idle", d.claim_idle)?,
            sweep_interval: positive("daemon.sweep_interval", d.sweep_interval)?,
            shutdown_grace: positive("daemon.shutdown_grace", d.shutdown_grace)?,
            retry: RetryPolicy::new(backoff),
            limits: Limits::new(
                range("limits.max_id_bytes", l.max_id_bytes, 1, 1 << 20)?,
                range("limits.max_payload_bytes", l.max_payload_bytes, 0, 512 << 20)?,
                range("limits.max_payload_fields", l.max_payload_fields, 0, HARD_MAX_PAYLOAD_FIELDS)?,
            ),
            clock: d.clock,
            clock_max_sleep: positive("daemon.clock_max_sleep", d.clock_max_sleep)?,
            memory_check_interval: positive("daemon.memory_check_interval", d.memory_check_interval)?,
            dedup_window: match d.dedup_window {
                w if w.is_zero() => None,
                w if w < Duration::from_millis(1) => {
                    return Err(invalid("daemon.dedup_window", "must be 0s (off) or at least 1ms"))
                }
                w if w > Duration::from_secs(30 * 24 * 3600) => {
                    return Err(invalid("daemon.dedup_window", "must be at most 30 days"))
                }
                w => Some(w),
            },
        };
        let c = &raw.consume;
        let lease = LeaseSettings { ttl: raw.lease.ttl, dead_consumer_grace: raw.lease.dead_consumer_grace };
        let consume = ConsumeSettings {
            consumer: consumer_name(&c.consumer, env),
            concurrency: c.concurrency,
            prefetch: c.prefetch,
            batch_size: c.batch_size,
            block: c.block,
            claim_idle: c.claim_idle,
            max_deliveries: c.max_deliveries,
            timeout: positive("consume.timeout", c.timeout)?,
            shutdown_grace: c.shutdown_grace,
            from: GroupStart::parse(c.from.trim())
                .ok_or_else(|| invalid("consume.from", format!("{:?} is not one of start, new", c.from)))?,
        };
        valid_name("consume.consumer", &consume.consumer)?;
        // The same rules as `ConsumerBuilder::build`, named by their keys.
        rules::check(&rules::Knobs {
            consumer: &consume.consumer,
            concurrency: consume.concurrency,
            prefetch: consume.prefetch,
            batch_size: consume.batch_size,
            max_deliveries: consume.max_deliveries,
            block: consume.block,
            claim_idle: consume.claim_idle,
            shutdown_grace: consume.shutdown_grace,
            lease_ttl: lease.ttl,
            dead_consumer_grace: lease.dead_consumer_grace,
        })
        .map_err(|(knob, message)| {
            let key = match knob {
                "lease_ttl" => "lease.ttl".to_owned(),
                "dead_consumer_grace" => "lease.dead_consumer_grace".to_owned(),
                other => format!("consume.{other}"),
            };
            invalid(&key, message)
        })?;
        let h = &raw.housekeeping;
        let housekeeping = HousekeepingSettings {
            interval: positive("housekeeping.interval", h.interval)?,
            lock_ttl: positive("housekeeping.lock_ttl", h.lock_ttl)?,
            trim_input: h.trim_input,
            trim_output: h.trim_output,
            dead_maxlen: h.dead_maxlen,
            output_max_age: (!h.output_max_age.is_zero()).then_some(h.output_max_age),
        };
        if housekeeping.lock_ttl <= housekeeping.interval {
            return Err(invalid("housekeeping.lock_ttl", "must be longer than housekeeping.interval"));
        }
        let log_format = match raw.log.format.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => return Err(invalid("log.format", format!("{other:?} is not one of text, json"))),
        };
        let http_addr = parse_http_addr(raw.http.addr.as_deref().unwrap_or(DEFAULT_HTTP_ADDR))?;
        Ok(Settings {
            redis: match target {
                Target::Node(client, certs) => Endpoint::new(client, certs, mode, connect.clone()),
                Target::Sentinel(..) if mode == Mode::Cluster => {
                    return Err(invalid(
                        "redis.mode",
                        "cluster does not go with a Sentinel URL (Sentinel serves one master)",
                    ))
                }
                Target::Sentinel(url, password, certs) => {
                    Endpoint::sentinel(&url, password.as_deref(), certs, connect.clone())
                        .map_err(|e| invalid("redis.url", format!("{}: {e}", redact_url(raw.redis.url.trim()))))?
                }
            },
            redis_display: redact_url(url),
            connect,
            namespace: Namespace::new(&raw.key_prefix, &raw.namespace, partitions.unwrap_or(1)),
            partitions,
            daemon,
            consume,
            lease,
            housekeeping,
            log_format,
            log_summary_interval: (!raw.log.summary_interval.is_zero()).then_some(raw.log.summary_interval),
            http_addr,
            http_addr_is_default: raw.http.addr.is_none(),
        })
    }
}

/// `http.addr`: `IP:PORT`, or `off` / empty for no HTTP server.
fn parse_http_addr(raw: &str) -> Result<Option<std::net::SocketAddr>, ConfigError> {
    let raw = raw.trim();
    if raw.is_empty() || raw.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    raw.parse().map(Some).map_err(|_| {
        invalid("http.addr", format!("{raw:?} is not IP:PORT (e.g. 127.0.0.1:9464 or [::]:9464) or \"off\""))
    })
}
