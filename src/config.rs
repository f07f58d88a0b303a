//! Configuration in two stages: [`RawConfig`] holds the layered values as
//! read (built-in defaults < file < environment < flags); [`Settings`] is
//! what the program runs with, validated before anything connects.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::core::backoff::Backoff;
use crate::core::op::{Limits, HARD_MAX_PAYLOAD_FIELDS};
use crate::core::route::MAX_PARTITIONS;
use crate::core::RetryPolicy;
use crate::store::keys::{invalid_namespace, Namespace};
use crate::store::{ConnectOptions, Endpoint, GroupStart, Mode};

/// The configuration file read when `--config` is not given, if it exists.
pub const DEFAULT_CONFIG_PATH: &str = "config/tidemark.toml";

/// Why the configuration was refused. Always names the offending key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A value is out of range or unparseable.
    #[error("invalid configuration: {key}: {message}")]
    Invalid {
        /// The dotted key, e.g. `daemon.batch_size`.
        key: String,
        /// What is wrong with it.
        message: String,
    },
    /// The file or environment could not be read or has the wrong shape.
    #[error("invalid configuration: {0}")]
    Load(#[from] config::ConfigError),
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.to_owned(), message: message.into() }
}

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
    /// Time allowed for a reply.
    #[serde(with = "humantime_serde")]
    pub response_timeout: Duration,
    /// `auto` (ask the server), `standalone` or `cluster` (the URL names
    /// any node of a Redis Cluster).
    pub mode: String,
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
            response_timeout: Duration::from_secs(30),
            mode: "auto".into(),
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

/// Values given on the command line; they override everything else.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Overrides {
    /// `--config`
    pub config_file: Option<PathBuf>,
    /// `--redis-url`
    pub redis_url: Option<String>,
    /// `--namespace`
    pub namespace: Option<String>,
    /// `--partitions`
    pub partitions: Option<u16>,
    /// `--log-format`
    pub log_format: Option<String>,
    /// `--consumer`
    pub consumer: Option<String>,
    /// `--group` (replaces the configured list when non-empty)
    pub groups: Vec<String>,
    /// `run --clock`
    pub clock: bool,
    /// `consume --consumer`
    pub consume_consumer: Option<String>,
    /// `consume --concurrency`
    pub consume_concurrency: Option<usize>,
    /// `consume --max-deliveries`
    pub consume_max_deliveries: Option<u64>,
    /// `consume --claim-idle` (as written, e.g. "30s")
    pub consume_claim_idle: Option<String>,
    /// `consume --timeout` (as written)
    pub consume_timeout: Option<String>,
    /// `consume --from` (`start` or `new`)
    pub consume_from: Option<String>,
    /// `--http` (`run` and `consume`)
    pub http_addr: Option<String>,
}

/// Where the process environment comes from (injected for tests).
pub trait Env {
    /// The value of variable `name`, if set and valid UTF-8.
    fn var(&self, name: &str) -> Option<String>;
    /// Every variable, for the `TIDEMARK__…` layer.
    fn vars(&self) -> Vec<(String, String)>;
}

/// The real process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
    fn vars(&self) -> Vec<(String, String)> {
        std::env::vars().collect()
    }
}

impl RawConfig {
    /// The built-in defaults.
    pub fn defaults() -> RawConfig {
        RawConfig { namespace: "default".into(), key_prefix: "tidemark".into(), ..RawConfig::default() }
    }

    /// Layers defaults < file < `TIDEMARK__SECTION__KEY` and `REDIS_URL` <
    /// flags.
    pub fn load(overrides: &Overrides, env: &dyn Env) -> Result<RawConfig, ConfigError> {
        let defaults = RawConfig { namespace: "default".into(), key_prefix: "tidemark".into(), ..RawConfig::default() };
        let mut builder = config::Config::builder().add_source(config::Config::try_from(&defaults)?);
        match &overrides.config_file {
            Some(path) => {
                if !path.is_file() {
                    return Err(invalid(
                        "--config (or TIDEMARK_CONFIG)",
                        format!("{} does not exist or is not a file", path.display()),
                    ));
                }
                builder = builder.add_source(config::File::from(path.as_path()).format(config::FileFormat::Toml));
            }
            None if Path::new(DEFAULT_CONFIG_PATH).is_file() => {
                builder = builder.add_source(config::File::new(DEFAULT_CONFIG_PATH, config::FileFormat::Toml));
            }
            None => {}
        }
        let vars: config::Map<String, String> =
            env.vars().into_iter().filter(|(k, _)| k.starts_with("TIDEMARK__")).collect();
        builder = builder.add_source(
            config::Environment::with_prefix("TIDEMARK")
                .prefix_separator("__")
                .separator("__")
                .list_separator(",")
                .with_list_parse_key("daemon.groups")
                .try_parsing(true)
                .source(Some(vars)),
        );
        if let Some(url) = env.var("REDIS_URL").filter(|u| !u.is_empty()) {
            builder = builder.set_override("redis.url", url)?;
        }
        if let Some(url) = &overrides.redis_url {
            builder = builder.set_override("redis.url", url.as_str())?;
        }
        if let Some(ns) = &overrides.namespace {
            builder = builder.set_override("namespace", ns.as_str())?;
        }
        if let Some(p) = overrides.partitions {
            builder = builder.set_override("partitions", u64::from(p))?;
        }
        if let Some(f) = &overrides.log_format {
            builder = builder.set_override("log.format", f.as_str())?;
        }
        if let Some(c) = &overrides.consumer {
            builder = builder.set_override("daemon.consumer", c.as_str())?;
        }
        if !overrides.groups.is_empty() {
            builder = builder.set_override("daemon.groups", overrides.groups.clone())?;
        }
        if overrides.clock {
            builder = builder.set_override("daemon.clock", true)?;
        }
        if let Some(c) = &overrides.consume_consumer {
            builder = builder.set_override("consume.consumer", c.as_str())?;
        }
        if let Some(n) = overrides.consume_concurrency {
            builder = builder.set_override("consume.concurrency", n as u64)?;
        }
        if let Some(n) = overrides.consume_max_deliveries {
            builder = builder.set_override("consume.max_deliveries", n)?;
        }
        if let Some(d) = &overrides.consume_claim_idle {
            builder = builder.set_override("consume.claim_idle", d.as_str())?;
        }
        if let Some(d) = &overrides.consume_timeout {
            builder = builder.set_override("consume.timeout", d.as_str())?;
        }
        if let Some(f) = &overrides.consume_from {
            builder = builder.set_override("consume.from", f.as_str())?;
        }
        if let Some(a) = &overrides.http_addr {
            builder = builder.set_override("http.addr", a.as_str())?;
        }
        Ok(builder.build()?.try_deserialize()?)
    }
}

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

/// Masks the password of a Redis URL: `redis://user:***@host:6379/0`, and
/// the `pass` query parameter of a `unix://` URL. A URL that does not parse
/// is shown as written, with only what could be a password masked, so that
/// the typo stays visible.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            if u.query_pairs().any(|(k, _)| k == "pass") {
                let pairs: Vec<(String, String)> = u
                    .query_pairs()
                    .map(|(k, v)| {
                        let v = if k == "pass" { "***".to_owned() } else { v.into_owned() };
                        (k.into_owned(), v)
                    })
                    .collect();
                u.query_pairs_mut().clear().extend_pairs(pairs);
            }
            u.to_string()
        }
        Err(_) => redact_unparsed(url),
    }
}

/// [`redact_url`] for text that is not a URL: the userinfo's part after
/// the first `:` (up to the last `@`; without an `@`, a "port" that is not
/// a number) and every `pass=`/`password=` query value become `***`;
/// everything else is kept.
fn redact_unparsed(text: &str) -> String {
    let (scheme, rest) = match text.find("://") {
        Some(i) => text.split_at(i + 3),
        None => ("", text),
    };
    let mut out = scheme.to_owned();
    let rest = match rest.rfind('@') {
        Some(at) => {
            let (userinfo, host) = rest.split_at(at);
            match userinfo.find(':') {
                Some(colon) => {
                    out.push_str(&userinfo[..=colon]);
                    out.push_str("***");
                }
                // No scheme: no telling a user from a password.
                None if scheme.is_empty() => out.push_str("***"),
                None => out.push_str(userinfo),
            }
            host
        }
        // `user:password` without `@host`: a "port" that is not a number
        // may be a password.
        None => {
            let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            match rest[..end].rfind(':') {
                Some(colon) if !rest[colon + 1..end].chars().all(|c| c.is_ascii_digit()) => {
                    out.push_str(&rest[..=colon]);
                    out.push_str("***");
                    &rest[end..]
                }
                _ => rest,
            }
        }
    };
    match rest.split_once('?') {
        Some((path, query)) => {
            out.push_str(path);
            out.push('?');
            let pairs: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((k, _)) if k == "pass" || k == "password" => format!("{k}=***"),
                    _ => pair.to_owned(),
                })
                .collect();
            out.push_str(&pairs.join("&"));
        }
        None => out.push_str(rest),
    }
    out
}

/// The environment variable that may hold the Redis password (for example
/// from a Kubernetes secret); it replaces the URL's password.
pub const REDIS_PASSWORD_ENV: &str = "REDIS_PASSWORD";

/// Builds the (unconnected) Redis client from `[redis]`: the URL, the
/// password from `password_file` or `REDIS_PASSWORD`, and the TLS files.
/// Every message masks the password.
fn redis_client(r: &RawRedis, env: &dyn Env) -> Result<(redis::Client, Option<redis::TlsCertificates>), ConfigError> {
    let url = r.url.trim();
    let mut parsed =
        url::Url::parse(url).map_err(|e| invalid("redis.url", format!("{} is not a URL: {e}", redact_url(url))))?;
    if !matches!(parsed.scheme(), "redis" | "rediss" | "unix" | "redis+unix") {
        return Err(invalid(
            "redis.url",
            format!("scheme {:?} is not one of redis, rediss, unix, redis+unix", parsed.scheme()),
        ));
    }
    if let Some((key, password)) = password(r, env)? {
        if matches!(parsed.scheme(), "redis" | "rediss") {
            parsed.set_password(Some(&password)).map_err(|()| invalid(key, "this URL cannot carry a password"))?;
        } else {
            parsed.query_pairs_mut().append_pair("pass", &password);
        }
    }
    match tls_certificates(r, &parsed)? {
        None => redis::Client::open(parsed.as_str())
            .map(|c| (c, None))
            .map_err(|e| invalid("redis.url", format!("{}: {e}", redact_url(url)))),
        Some(certs) => redis::Client::build_with_tls(parsed.as_str(), certs.clone())
            .map(|c| (c, Some(certs)))
            .map_err(|e| invalid("redis.tls_ca_file/tls_cert_file/tls_key_file", format!("{}: {e}", redact_url(url)))),
    }
}

/// The password from `redis.password_file` or `REDIS_PASSWORD` (not both),
/// with the key to blame if it cannot be used.
fn password(r: &RawRedis, env: &dyn Env) -> Result<Option<(&'static str, String)>, ConfigError> {
    // A secret written with a trailing newline (`echo`, `--from-file`) must
    // not turn into a different password.
    let from_env = env.var(REDIS_PASSWORD_ENV).map(|p| p.trim_end_matches(['\r', '\n']).to_owned());
    match (&r.password_file, from_env.filter(|p| !p.is_empty())) {
        (Some(_), Some(_)) => {
            Err(invalid("redis.password_file", format!("{REDIS_PASSWORD_ENV} is set too; give the password only once")))
        }
        (Some(path), None) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| invalid("redis.password_file", format!("cannot read {}: {e}", path.display())))?;
            let password = text.trim_end_matches(['\r', '\n']);
            if password.is_empty() {
                return Err(invalid("redis.password_file", format!("{} is empty", path.display())));
            }
            Ok(Some(("redis.password_file", password.to_owned())))
        }
        (None, from_env) => Ok(from_env.map(|p| (REDIS_PASSWORD_ENV, p))),
    }
}

/// The TLS material of `redis.tls_*`, read and checked now so that a wrong
/// file is a configuration error naming its key, not a failed connection.
fn tls_certificates(r: &RawRedis, url: &url::Url) -> Result<Option<redis::TlsCertificates>, ConfigError> {
    let files = [
        ("redis.tls_ca_file", &r.tls_ca_file),
        ("redis.tls_cert_file", &r.tls_cert_file),
        ("redis.tls_key_file", &r.tls_key_file),
    ];
    let Some((first, _)) = files.iter().find(|(_, path)| path.is_some()) else {
        return Ok(None);
    };
    if url.scheme() != "rediss" {
        return Err(invalid(first, "needs a rediss:// URL"));
    }
    if url.fragment() == Some("insecure") && r.tls_ca_file.is_some() {
        return Err(invalid(
            "redis.tls_ca_file",
            "has no effect with #insecure in the URL, which skips certificate checks",
        ));
    }
    let root_cert = match &r.tls_ca_file {
        Some(path) => Some(read_certificates("redis.tls_ca_file", path)?),
        None => None,
    };
    let client_tls = match (&r.tls_cert_file, &r.tls_key_file) {
        (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
            client_cert: read_certificates("redis.tls_cert_file", cert)?,
            client_key: read_private_key("redis.tls_key_file", key)?,
        }),
        (None, None) => None,
        (Some(_), None) => return Err(invalid("redis.tls_key_file", "must be set with redis.tls_cert_file")),
        (None, Some(_)) => return Err(invalid("redis.tls_cert_file", "must be set with redis.tls_key_file")),
    };
    Ok(Some(redis::TlsCertificates { client_tls, root_cert }))
}

fn read_file(key: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))
}

/// A PEM file holding at least one certificate; returns its bytes.
fn read_certificates(key: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let pem = read_file(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(key, format!("{} is not valid PEM: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(invalid(key, format!("{} holds no PEM certificate", path.display())));
    }
    Ok(pem)
}

/// A PEM file holding a private key; returns its bytes. The message never
/// quotes the file.
fn read_private_key(key: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    use rustls::pki_types::{pem::PemObject, PrivateKeyDer};
    let pem = read_file(key, path)?;
    if PrivateKeyDer::from_pem_slice(&pem).is_err() {
        return Err(invalid(key, format!("{} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)", path.display())));
    }
    Ok(pem)
}

impl Settings {
    /// Validates `raw`. `env` supplies `POD_NAME` and the host name fallback.
    pub fn from_raw(raw: RawConfig, env: &dyn Env) -> Result<Settings, ConfigError> {
        valid_name("namespace", &raw.namespace)?;
        valid_name("key_prefix", &raw.key_prefix)?;

        let url = raw.redis.url.trim();
        let (client, certs) = redis_client(&raw.redis, env)?;
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
        };
        let c = &raw.consume;
        let consume = ConsumeSettings {
            consumer: consumer_name(&c.consumer, env),
            concurrency: range("consume.concurrency", c.concurrency, 1, 10_000)?,
            prefetch: range("consume.prefetch", c.prefetch, 0, 10_000)?,
            batch_size: range("consume.batch_size", c.batch_size, 1, MAX_BATCH_SIZE)?,
            block: positive("consume.block", c.block)?,
            claim_idle: positive("consume.claim_idle", c.claim_idle)?,
            max_deliveries: range("consume.max_deliveries", c.max_deliveries as usize, 1, 1_000_000)? as u64,
            timeout: positive("consume.timeout", c.timeout)?,
            shutdown_grace: positive("consume.shutdown_grace", c.shutdown_grace)?,
            from: GroupStart::parse(c.from.trim())
                .ok_or_else(|| invalid("consume.from", format!("{:?} is not one of start, new", c.from)))?,
        };
        valid_name("consume.consumer", &consume.consumer)?;
        let lease = LeaseSettings {
            ttl: positive("lease.ttl", raw.lease.ttl)?,
            dead_consumer_grace: positive("lease.dead_consumer_grace", raw.lease.dead_consumer_grace)?,
        };
        if lease.ttl < Duration::from_millis(300) {
            return Err(invalid("lease.ttl", "must be at least 300ms"));
        }
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
            redis: Endpoint::new(client, certs, mode, connect.clone()),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct FakeEnv(HashMap<String, String>);

    impl Env for FakeEnv {
        fn var(&self, name: &str) -> Option<String> {
            self.0.get(name).cloned()
        }
        fn vars(&self) -> Vec<(String, String)> {
            self.0.clone().into_iter().collect()
        }
    }

    fn env(pairs: &[(&str, &str)]) -> FakeEnv {
        FakeEnv(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    fn settings(pairs: &[(&str, &str)], o: Overrides) -> Result<Settings, ConfigError> {
        let e = env(pairs);
        Settings::from_raw(RawConfig::load(&o, &e)?, &e)
    }

    fn bad_key(pairs: &[(&str, &str)]) -> String {
        match settings(pairs, Overrides::default()) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{pairs:?} was accepted"),
        }
    }

    #[test]
    fn defaults_are_valid() {
        let s = settings(&[("POD_NAME", "pod-1")], Overrides::default()).unwrap();
        assert_eq!(s.daemon.consumer, "pod-1");
        assert_eq!(s.daemon.batch_size, 1000);
        assert_eq!(s.namespace.partition(0).input, "tidemark:{default}:in");
        assert_eq!(s.partitions, None);
        assert_eq!(s.log_format, LogFormat::Text);
    }

    #[test]
    fn layering_env_then_flags() {
        let pairs = [
            ("TIDEMARK__DAEMON__BATCH_SIZE", "250"),
            ("TIDEMARK__DAEMON__GROUPS", "billing,mail"),
            ("TIDEMARK__NAMESPACE", "envns"),
            ("TIDEMARK__DAEMON__CLAIM_IDLE", "5s"),
            ("REDIS_URL", "redis://10.0.0.1:6380"),
            ("POD_NAME", "pod-1"),
        ];
        let s = settings(&pairs, Overrides::default()).unwrap();
        assert_eq!(s.daemon.batch_size, 250);
        assert_eq!(s.daemon.groups, ["billing", "mail"]);
        assert_eq!(s.namespace.name(), "envns");
        assert_eq!(s.daemon.claim_idle, Duration::from_secs(5));
        assert_eq!(s.redis_display, "redis://10.0.0.1:6380");

        let o = Overrides {
            namespace: Some("flagns".into()),
            consumer: Some("me".into()),
            groups: vec!["g".into()],
            redis_url: Some("redis://127.0.0.1:1".into()),
            ..Overrides::default()
        };
        let s = settings(&pairs, o).unwrap();
        assert_eq!(s.namespace.name(), "flagns");
        assert_eq!(s.daemon.consumer, "me");
        assert_eq!(s.daemon.groups, ["g"]);
        assert_eq!(s.redis_display, "redis://127.0.0.1:1");
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            ("TIDEMARK__DAEMON__BATCH_SIZE", "0", "daemon.batch_size"),
            ("TIDEMARK__CONSUME__PREFETCH", "10001", "consume.prefetch"),
            ("TIDEMARK__DAEMON__BATCH_SIZE", "100000", "daemon.batch_size"),
            ("TIDEMARK__DAEMON__RELEASE_CHUNK", "0", "daemon.release_chunk"),
            ("TIDEMARK__LOG__FORMAT", "xml", "log.format"),
            ("REDIS_URL", "not a url", "redis.url"),
            ("REDIS_URL", "http://x", "redis.url"),
            ("TIDEMARK__DAEMON__CLAIM_IDLE", "0s", "daemon.claim_idle"),
            ("TIDEMARK__DAEMON__BLOCK", "soon", "block"),
            ("TIDEMARK__NAMESPACE", "a}b", "namespace"),
            ("TIDEMARK__DAEMON__NOPE", "1", "nope"),
            ("TIDEMARK__CONSUME__FROM", "end", "consume.from"),
        ];
        for (k, v, key) in cases {
            let msg = bad_key(&[(k, v), ("POD_NAME", "p")]);
            assert!(msg.contains(key), "{k}={v}: {msg:?} does not name {key}");
        }
    }

    #[test]
    fn summary_interval_default_and_off() {
        let s = settings(&[("POD_NAME", "p")], Overrides::default()).unwrap();
        assert_eq!(s.log_summary_interval, Some(Duration::from_secs(10)));
        let s =
            settings(&[("POD_NAME", "p"), ("TIDEMARK__LOG__SUMMARY_INTERVAL", "1m")], Overrides::default()).unwrap();
        assert_eq!(s.log_summary_interval, Some(Duration::from_secs(60)));
        let s =
            settings(&[("POD_NAME", "p"), ("TIDEMARK__LOG__SUMMARY_INTERVAL", "0s")], Overrides::default()).unwrap();
        assert_eq!(s.log_summary_interval, None);
        assert!(
            bad_key(&[("POD_NAME", "p"), ("TIDEMARK__LOG__SUMMARY_INTERVAL", "often")]).contains("summary_interval")
        );
    }

    #[test]
    fn http_addr_default_env_flag_and_off() {
        let s = settings(&[("POD_NAME", "p")], Overrides::default()).unwrap();
        assert_eq!(s.http_addr, Some("127.0.0.1:9464".parse().unwrap()));
        assert!(s.http_addr_is_default);
        let s = settings(&[("POD_NAME", "p"), ("TIDEMARK__HTTP__ADDR", "0.0.0.0:8080")], Overrides::default()).unwrap();
        assert_eq!(s.http_addr, Some("0.0.0.0:8080".parse().unwrap()));
        assert!(!s.http_addr_is_default);
        // The default address, written out, is configured: taken, it is an error.
        let o = Overrides { http_addr: Some(DEFAULT_HTTP_ADDR.into()), ..Overrides::default() };
        assert!(!settings(&[("POD_NAME", "p")], o).unwrap().http_addr_is_default);
        for off in ["off", "OFF", ""] {
            let o = Overrides { http_addr: Some(off.into()), ..Overrides::default() };
            let s = settings(&[("POD_NAME", "p"), ("TIDEMARK__HTTP__ADDR", "0.0.0.0:8080")], o).unwrap();
            assert_eq!(s.http_addr, None, "--http {off:?}");
        }
        let o = Overrides { http_addr: Some("[::1]:9000".into()), ..Overrides::default() };
        assert_eq!(settings(&[("POD_NAME", "p")], o).unwrap().http_addr, Some("[::1]:9000".parse().unwrap()));
        for bad in ["localhost:9464", "9464", "127.0.0.1", "127.0.0.1:99999", "on"] {
            let o = Overrides { http_addr: Some(bad.into()), ..Overrides::default() };
            match settings(&[("POD_NAME", "p")], o) {
                Err(e) => assert!(e.to_string().contains("http.addr"), "{bad:?}: {e}"),
                Ok(s) => panic!("--http {bad:?} was accepted as {:?}", s.http_addr),
            }
        }
    }

    #[test]
    fn password_never_shown() {
        let s =
            settings(&[("REDIS_URL", "redis://app:s3cret@127.0.0.1:6379/0"), ("POD_NAME", "p")], Overrides::default())
                .unwrap();
        assert!(!s.redis_display.contains("s3cret"));
        assert!(s.redis_display.contains("app:***@"));
        let msg = bad_key(&[("REDIS_URL", "redis://app:s3cret@[bad/0")]);
        assert!(!msg.contains("s3cret"), "{msg}");
        // The typo stays visible; only the password is masked.
        assert!(msg.contains("redis://app:***@[bad/0"), "{msg}");
        assert_eq!(redact_url("unix:///run/redis.sock?db=2&pass=s3cret"), "unix:///run/redis.sock?db=2&pass=***");
    }

    #[test]
    fn unparseable_urls_are_shown_with_only_the_password_masked() {
        for (written, shown) in [
            ("redis://app:s3cret@[bad/0", "redis://app:***@[bad/0"),
            ("redis://:s3:cr@et@127.0.0.1:63 79", "redis://:***@127.0.0.1:63 79"),
            ("redis://[::1:6379/0", "redis://[::1:6379/0"),
            ("redis://127.0.0.1:99999", "redis://127.0.0.1:99999"),
            ("redis://app:s3cret/0", "redis://app:***/0"),
            ("redis://app@[::1:6379", "redis://app@[::1:6379"),
            ("unix:///run/redis.sock?pass=s3cret&db=x y", "unix:///run/redis.sock?pass=***&db=x y"),
            ("s3cret@host", "***@host"),
            ("not a url", "not a url"),
        ] {
            assert_eq!(redact_unparsed(written), shown, "{written}");
        }
        assert_eq!(redact_url("redis://app:s3cret@[bad/0"), "redis://app:***@[bad/0");
    }

    #[test]
    fn tls_files_need_a_rediss_url_and_each_other() {
        let cases = [
            ("redis://h:1", "TIDEMARK__REDIS__TLS_CA_FILE", "redis.tls_ca_file: needs a rediss:// URL"),
            ("rediss://h:1", "TIDEMARK__REDIS__TLS_CERT_FILE", "redis.tls_key_file: must be set with"),
            ("rediss://h:1", "TIDEMARK__REDIS__TLS_KEY_FILE", "redis.tls_cert_file: must be set with"),
        ];
        for (url, key, message) in cases {
            let msg = bad_key(&[("REDIS_URL", url), (key, "/nonexistent.pem"), ("POD_NAME", "p")]);
            assert!(msg.contains(message), "{url} {key}: {msg}");
        }
    }
}

#[cfg(test)]
mod bundled_file {
    use super::*;

    /// `config/tidemark.toml` documents every key with its built-in default:
    /// loading it must give exactly the defaults.
    #[test]
    fn bundled_config_matches_defaults() {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_CONFIG_PATH);
        let text = std::fs::read_to_string(&path).expect("read bundled config");
        let from_file: RawConfig = config::Config::builder()
            .add_source(config::File::from_str(&text, config::FileFormat::Toml))
            .build()
            .and_then(|c| c.try_deserialize())
            .expect("bundled config parses");
        assert_eq!(
            serde_json::to_value(&from_file).unwrap(),
            serde_json::to_value(RawConfig::defaults()).unwrap(),
            "config/tidemark.toml and the built-in defaults disagree"
        );
        // Unset by default, so only a comment can document it.
        assert!(text.contains("password_file"), "redis.password_file is not documented in the bundled config");
    }
}
