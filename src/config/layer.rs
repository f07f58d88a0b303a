//! Layering: built-in defaults < the file (`--config`, or
//! `config/tidemark.toml`) < environment (`TIDEMARK__SECTION__KEY`,
//! `REDIS_URL`) < flags.

use std::path::{Path, PathBuf};

use super::{invalid, ConfigError, RawConfig, DEFAULT_CONFIG_PATH};

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
