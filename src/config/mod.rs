//! Configuration in two stages: [`RawConfig`] holds the layered values as
//! read (built-in defaults < file < environment < flags); [`Settings`] is
//! what the program runs with, validated before anything connects.
//!
//! One file per job: [`raw`] the keys and their defaults, [`layer`] the
//! layering (file, environment, flags), [`settings`] validation into the
//! settings the program runs with, [`secrets`] the password and TLS files
//! and masking URLs for display.
//!
//! Adding a knob touches: its field and default in a `Raw*` struct
//! (`raw.rs`), its validated field in the matching `*Settings` struct and
//! its check in [`Settings::from_raw`] (`settings.rs`; consumer knobs are
//! checked by `consume::rules`, shared with `ConsumerBuilder`), and its
//! line in `config/tidemark.toml` (a test checks that the bundled file
//! equals the defaults). A flag also needs a field in [`Overrides`]
//! (`layer.rs`) and one in `src/cli.rs`.

mod layer;
pub mod raw;
mod secrets;
mod settings;
#[cfg(test)]
mod tests;

pub use layer::{Env, Overrides, ProcessEnv};
pub use raw::*;
pub use secrets::{redact_url, REDIS_PASSWORD_ENV, REDIS_SENTINEL_PASSWORD_ENV};
pub(crate) use settings::consumer_name;
pub use settings::{
    ConsumeSettings, DaemonSettings, HousekeepingSettings, LeaseSettings, LogFormat, Settings, MAX_BATCH_SIZE,
    MAX_RELEASE_CHUNK,
};

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
