//! The command-line surface (DESIGN.md §6), parsed with clap.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Exit code for bad configuration or usage (sysexits `EX_USAGE`).
pub const EXIT_CONFIG: u8 = 64;
/// Exit code when Redis cannot be reached by a one-shot command
/// (sysexits `EX_UNAVAILABLE`).
pub const EXIT_UNAVAILABLE: u8 = 69;

/// Watermark-driven release daemon on Redis Streams.
///
/// Producers XADD elements and watermark updates to tidemark:{NS}:in;
/// tidemark releases each element into tidemark:{NS}:out once the watermark
/// reaches its timestamp: never early, never lost, exactly once, in order.
#[derive(Debug, Parser)]
#[command(name = "tidemark", version, propagate_version = true, max_term_width = 100)]
pub struct Cli {
    /// Options every command takes.
    #[command(flatten)]
    pub global: GlobalArgs,
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Configuration file [default: config/tidemark.toml if it exists]
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Redis URL: redis://[user:password@]host:port[/db], rediss://… or unix:///path
    /// (overrides REDIS_URL and the config file)
    #[arg(long, global = true, value_name = "URL")]
    pub redis_url: Option<String>,
    /// Namespace: one independent pipeline [default: default]
    #[arg(long, global = true, value_name = "NS")]
    pub namespace: Option<String>,
    /// Log format: text or json [default: text]; the level comes from RUST_LOG
    #[arg(long, global = true, value_name = "FORMAT")]
    pub log_format: Option<String>,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground (SIGTERM/SIGINT stop it cleanly).
    Run(RunArgs),
    /// Schedule an element: XADD an `add` op to the input stream.
    Add(AddArgs),
    /// Cancel a scheduled element: XADD a `cancel` op.
    Cancel(CancelArgs),
    /// Raise the watermark: XADD a `watermark` op.
    Watermark(WatermarkArgs),
    /// Show the watermark, schedule, streams and groups of a namespace.
    Status(StatusArgs),
}

/// `tidemark run`
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Consumer name in the input group [default: $POD_NAME, then the host name]
    #[arg(long, value_name = "NAME")]
    pub consumer: Option<String>,
    /// Output consumer group to create at startup (repeatable; replaces daemon.groups)
    #[arg(long = "group", value_name = "G")]
    pub groups: Vec<String>,
}

/// `tidemark add`
#[derive(Debug, Args)]
pub struct AddArgs {
    /// Element id
    #[arg(long)]
    pub id: String,
    /// Timestamp: an integer within ±(2^53-1)
    #[arg(long, allow_hyphen_values = true)]
    pub ts: String,
    /// Payload field (repeatable, kept in order)
    #[arg(long = "field", value_name = "KEY=VALUE")]
    pub fields: Vec<String>,
}

/// `tidemark cancel`
#[derive(Debug, Args)]
pub struct CancelArgs {
    /// Element id
    #[arg(long)]
    pub id: String,
}

/// `tidemark watermark`
#[derive(Debug, Args)]
pub struct WatermarkArgs {
    /// The new watermark; a lower or equal value changes nothing
    #[arg(allow_hyphen_values = true)]
    pub ts: String,
}

/// `tidemark status`
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print one JSON object instead of a table
    #[arg(long)]
    pub json: bool,
}
