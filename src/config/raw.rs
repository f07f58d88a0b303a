//! The configuration's keys as read, with their built-in defaults: one
//! struct per `[section]`, deserialized from the layered sources.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::core::op::Limits;

/// `[redis]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRedis {
    /// `redis://[user:password@]host:port[/db]`, `rediss://…` or `unix:///path`.
    pub url: String,
    /// Read the password from this file (Kubernetes secrets); overrides the URL's.
    pub password_file: Option<PathBuf>,
    /// `rediss://` only: PEM file of the CA certificates to trust instead of
    /// the system's (a private CA).
    pub tls_ca_file: Option<PathBuf>,
    /// `rediss://` only: PEM client certificate (chain) for mutual TLS.
    pub tls_cert_file: Option<PathBuf>,
    /// `rediss://` only: PEM private key of `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
    /// Time allowed to connect.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time allowed for a reply (a blocking read adds its block time): how
    /// fast a server that stops answering is noticed.
    #[serde(with = "humantime_serde")]
    pub response_timeout: Duration,
    /// `auto` (ask the server), `standalone` or `cluster` (the URL names
    /// any node of a Redis Cluster).
    pub mode: String,
    /// `redis+sentinel://` only: the Sentinels' password (the URL's is the
    /// data nodes'); or `REDIS_SENTINEL_PASSWORD`.
    pub sentinel_password: Option<String>,
}

impl Default for RawRedis {
    fn default() -> Self {
        RawRedis {
            url: "redis://127.0.0.1:6379".into(),
            password_file: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(5),
            mode: "auto".into(),
            sentinel_password: None,
        }
    }
}

/// `[daemon]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawDaemon {
    /// Consumer name in the input group; empty = `POD_NAME`, then host name.
    pub consumer: String,
    /// Output consumer groups to create at startup.
    pub groups: Vec<String>,
    /// Input entries per `XREADGROUP` and per apply call.
    pub batch_size: usize,
    /// How long one `XREADGROUP` blocks waiting for input.
    #[serde(with = "humantime_serde")]
    pub block: Duration,
    /// Most elements released per script call.
    pub release_chunk: usize,
    /// Input entries idle this long at another daemon are claimed.
    #[serde(with = "humantime_serde")]
    pub claim_idle: Duration,
    /// How often to sweep for due elements a crashed daemon left behind.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
    /// Time allowed to finish in-flight work after SIGTERM/SIGINT.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// First reconnect delay.
    #[serde(with = "humantime_serde")]
    pub reconnect_min: Duration,
    /// Longest reconnect delay.
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// Clock mode: the watermark follows the Redis server's `TIME` (ms).
    pub clock: bool,
    /// Clock mode: longest sleep between checks when nothing is due soon.
    #[serde(with = "humantime_serde")]
    pub clock_max_sleep: Duration,
    /// How often Redis's eviction policy and memory use are looked at (also
    /// at every connect).
    #[serde(with = "humantime_serde")]
    pub memory_check_interval: Duration,
    /// Producers that retry: an `add` for an id released less than this
    /// ago is dropped and counted (`0s`: off).
    #[serde(with = "humantime_serde")]
    pub dedup_window: Duration,
}

impl Default for RawDaemon {
    fn default() -> Self {
        RawDaemon {
            consumer: String::new(),
            groups: Vec::new(),
            batch_size: 1000,
            block: Duration::from_secs(2),
            release_chunk: 1000,
            claim_idle: Duration::from_secs(30),
            sweep_interval: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(10),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(10),
            clock: false,
            clock_max_sleep: Duration::from_secs(1),
            memory_check_interval: Duration::from_secs(60),
            dedup_window: Duration::ZERO,
        }
    }
}

/// `[consume]`: the consumer runtime and `tidemark consume`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConsume {
    /// Consumer name in the output group; empty = `POD_NAME`, then host name.
    pub consumer: String,
    /// Most elements handled at once.
    pub concurrency: usize,
    /// Elements read ahead of free handler slots.
    pub prefetch: usize,
    /// Most entries per `XREADGROUP` (never more than free handler slots
    /// plus `prefetch`).
    pub batch_size: usize,
    /// How long one `XREADGROUP` blocks.
    #[serde(with = "humantime_serde")]
    pub block: Duration,
    /// Failed entries are retried once idle this long (any live consumer).
    #[serde(with = "humantime_serde")]
    pub claim_idle: Duration,
    /// After this many deliveries an entry goes to `:dead`.
    pub max_deliveries: u64,
    /// `tidemark consume`: a command running longer is killed (a failure).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Time allowed for in-flight handlers after SIGTERM/SIGINT.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Where a group that does not exist yet starts: `start` (every entry
    /// still in `:out`) or `new` (only what is released from now on).
    pub from: String,
}

impl Default for RawConsume {
    fn default() -> Self {
        RawConsume {
            consumer: String::new(),
            concurrency: 16,
            prefetch: 0,
            batch_size: 100,
            block: Duration::from_secs(2),
            claim_idle: Duration::from_secs(30),
            max_deliveries: 5,
            timeout: Duration::from_secs(300),
            shutdown_grace: Duration::from_secs(10),
            from: "start".into(),
        }
    }
}

/// `[lease]`: liveness leases of daemons and consumers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLease {
    /// Lease lifetime; refreshed every third of it.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// A consumer without a lease and with nothing pending is removed from
    /// its group once idle this long.
    #[serde(with = "humantime_serde")]
    pub dead_consumer_grace: Duration,
}

impl Default for RawLease {
    fn default() -> Self {
        RawLease { ttl: Duration::from_secs(5), dead_consumer_grace: Duration::from_secs(60) }
    }
}

/// `[housekeeping]`: periodic work done by one elected daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawHousekeeping {
    /// How often the leader works.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Lifetime of the leader's Redlock lock (extended while it lives).
    #[serde(with = "humantime_serde")]
    pub lock_ttl: Duration,
    /// Trim acknowledged input from `:in`.
    pub trim_input: bool,
    /// Trim `:out` below what every group has acknowledged.
    pub trim_output: bool,
    /// Cap `:dead` at about this many entries (0 = no cap).
    pub dead_maxlen: u64,
    /// Also trim `:out` entries older than this even if a group has not
    /// acknowledged them, with a warning naming the group (0s = never).
    #[serde(with = "humantime_serde")]
    pub output_max_age: Duration,
}

impl Default for RawHousekeeping {
    fn default() -> Self {
        RawHousekeeping {
            interval: Duration::from_secs(5),
            lock_ttl: Duration::from_secs(15),
            trim_input: true,
            trim_output: true,
            dead_maxlen: 100_000,
            output_max_age: Duration::ZERO,
        }
    }
}

/// `[limits]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLimits {
    /// Longest element id in bytes.
    pub max_id_bytes: usize,
    /// Largest payload in bytes.
    pub max_payload_bytes: usize,
    /// Most payload fields per element.
    pub max_payload_fields: usize,
}

impl Default for RawLimits {
    fn default() -> Self {
        let l = Limits::default();
        RawLimits {
            max_id_bytes: l.max_id_bytes,
            max_payload_bytes: l.max_payload_bytes,
            max_payload_fields: l.max_payload_fields,
        }
    }
}

/// `[log]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLog {
    /// `text` or `json`.
    pub format: String,
    /// How often the daemon logs a one-line summary of its work, when
    /// something changed (`0s`: never).
    #[serde(with = "humantime_serde")]
    pub summary_interval: Duration,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog { format: "text".into(), summary_interval: Duration::from_secs(10) }
    }
}

/// `[http]`: `/healthz`, `/readyz`, `/metrics` and the dashboard.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawHttp {
    /// `IP:PORT` to listen on (`run` and `consume`); `off` or empty: none.
    /// Unset: [`DEFAULT_HTTP_ADDR`], or a free port when it is taken.
    pub addr: Option<String>,
}

/// Where `run` and `consume` serve HTTP unless configured otherwise; when
/// it is taken (another tidemark process on the host), a free port of the
/// same IP instead.
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:9464";

/// The configuration as read, before validation.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    /// The pipeline's namespace.
    pub namespace: String,
    /// Partitions of the namespace (1..=1024; unset: whatever the
    /// namespace's meta record says, else 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partitions: Option<u16>,
    /// Prefix of every key.
    pub key_prefix: String,
    /// `[redis]`
    pub redis: RawRedis,
    /// `[daemon]`
    pub daemon: RawDaemon,
    /// `[consume]`
    pub consume: RawConsume,
    /// `[lease]`
    pub lease: RawLease,
    /// `[housekeeping]`
    pub housekeeping: RawHousekeeping,
    /// `[limits]`
    pub limits: RawLimits,
    /// `[log]`
    pub log: RawLog,
    /// `[http]`
    pub http: RawHttp,
}
