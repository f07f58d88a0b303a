//! The command-line surface (DESIGN.md §6), parsed with clap.

pub mod fields;

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
    #[arg(long, global = true, value_name = "FILE", env = "TIDEMARK_CONFIG")]
    pub config: Option<PathBuf>,
    /// Redis URL: redis://[user:password@]host:port[/db], rediss://…, unix:///path, or
    /// redis+sentinel://[user:password@]host:port[,host:port…]/MASTER[/db] (Sentinel; the
    /// Sentinels' password in REDIS_SENTINEL_PASSWORD) (overrides REDIS_URL and the config file)
    #[arg(long, global = true, value_name = "URL")]
    pub redis_url: Option<String>,
    /// Namespace: one independent pipeline [default: default]
    #[arg(long, global = true, value_name = "NS")]
    pub namespace: Option<String>,
    /// Partitions of the namespace, 1..=1024 [default: the namespace's record, else 1]
    #[arg(long, global = true, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub partitions: Option<u16>,
    /// Log format: text or json [default: text]; the level comes from RUST_LOG
    #[arg(long, global = true, value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// For run and consume: serve /healthz, /readyz, /metrics and the dashboard on
    /// IP:PORT, or "off" [default: 127.0.0.1:9464, or a free port when it is taken]
    #[arg(long, global = true, value_name = "ADDR")]
    pub http: Option<String>,
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
    /// Run a command once per released element of an output group.
    ///
    /// The element arrives as one JSON object on stdin, then a newline:
    ///   {"id":"order-42","ts":1700000000000,"fields":{"customer":"7","raw":{"base64":"AP8="}}}
    /// An id, field name or value that is not UTF-8 is written {"base64":"..."}. A field name
    /// that repeats maps to an array of its values; when a name repeats or is not UTF-8,
    /// "pairs" also lists every field as [name, value], in order.
    ///
    /// Environment: TIDEMARK_ID, TIDEMARK_TS, TIDEMARK_GROUP, TIDEMARK_CONSUMER,
    /// TIDEMARK_DELIVERY (1, 2, ...), TIDEMARK_MAX_DELIVERIES, TIDEMARK_ENTRY_ID (the :out
    /// entry id). An id that is not UTF-8 (or holds NUL) is given in base64, with
    /// TIDEMARK_ID_ENCODING=base64.
    ///
    /// Exit 0 acknowledges the element. Any other exit, or running past --timeout (its
    /// process group is killed), is a failure retried after --claim-idle; the failure of
    /// delivery --max-deliveries moves it to the dead-letter stream, its detail ending with
    /// the last lines the command wrote to stderr. Its stdout and stderr are logged line by
    /// line, tagged with the element id. SIGTERM/SIGINT: stop reading,
    /// let running commands finish within consume.shutdown_grace, then exit 0.
    #[command(verbatim_doc_comment)]
    Consume(ConsumeArgs),
    /// Inspect and replay dead letters.
    #[command(subcommand)]
    Dead(DeadCommand),
    /// Move a namespace to N partitions, on this Redis or another one (daemons stopped).
    ///
    /// Moves the scheduled elements with their payloads (to partition crc32(id) mod N), the
    /// watermark (the lowest partition's, on every new partition) and the dead letters; creates
    /// the output groups on the new :out streams at their end; then records N in the
    /// namespace's meta record. Refuses while a daemon serves the namespace, or while input
    /// waits to be applied or an output group has unread or pending entries (unless --force,
    /// which leaves them in the old streams and says so). Safe to run again after a crash.
    #[command(verbatim_doc_comment)]
    Repartition(RepartitionArgs),
}

/// `tidemark repartition`
#[derive(Debug, Args)]
pub struct RepartitionArgs {
    /// The new partition count, 1..=1024
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub to: u16,
    /// Move onto this Redis (a server, or any node of a cluster) [default: the same one]
    #[arg(long, value_name = "URL")]
    pub to_redis_url: Option<String>,
    /// Go on although entries wait to be read in the old layout (they stay there)
    #[arg(long)]
    pub force: bool,
}

/// `tidemark consume`
#[derive(Debug, Args)]
pub struct ConsumeArgs {
    /// Output consumer group to read (created if missing; see --from)
    #[arg(long, value_name = "G")]
    pub group: String,
    /// Consumer name in the group [default: $POD_NAME, then the host name]
    #[arg(long, value_name = "NAME")]
    pub consumer: Option<String>,
    /// Most elements handled at once [default: 16]
    #[arg(long, value_name = "N")]
    pub concurrency: Option<usize>,
    /// Deliveries before an element goes to the dead-letter stream [default: 5]
    #[arg(long, value_name = "N")]
    pub max_deliveries: Option<u64>,
    /// Retry failed elements once idle this long, e.g. 30s [default: 30s]
    #[arg(long, value_name = "DUR")]
    pub claim_idle: Option<String>,
    /// Kill the command after this long, e.g. 5m; counts as a failure [default: 5m]
    #[arg(long, value_name = "DUR")]
    pub timeout: Option<String>,
    /// Where the group starts if it does not exist yet: "start" (every element still in
    /// the output stream) or "new" (only elements released from now on); an existing
    /// group is left as it is [default: start]
    #[arg(long, value_name = "WHERE", value_parser = ["start", "new"])]
    pub from: Option<String>,
    /// The command and its arguments (after `--`)
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// `tidemark dead`
#[derive(Debug, Subcommand)]
pub enum DeadCommand {
    /// List dead letters, newest first, with their reason.
    List(DeadListArgs),
    /// Send dead letters back where they came from and delete them from :dead.
    Replay(DeadReplayArgs),
}

/// `tidemark dead list`
#[derive(Debug, Args)]
pub struct DeadListArgs {
    /// How many to show
    #[arg(long, default_value_t = 20, value_name = "N")]
    pub count: usize,
    /// Print JSON instead of a table
    #[arg(long)]
    pub json: bool,
}

/// `tidemark dead replay`
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["id", "all"])))]
pub struct DeadReplayArgs {
    /// Replay this dead letter (its entry id in :dead)
    #[arg(long, value_name = "ENTRY_ID")]
    pub id: Option<String>,
    /// Replay every dead letter (of --reason, if given)
    #[arg(long)]
    pub all: bool,
    /// Only dead letters with this reason code
    #[arg(long, value_name = "CODE")]
    pub reason: Option<String>,
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
    /// Clock mode: the watermark follows the Redis server's TIME in milliseconds
    #[arg(long)]
    pub clock: bool,
}

/// `tidemark add`
#[derive(Debug, Args)]
#[command(after_help = "The payload's fields keep the order in which --field, --field-file and --json \
                        are given. Values are sent byte for byte: a file's trailing newline is part of \
                        its value. The command line holds at most about 128 KiB per argument; bigger \
                        values go through --field-file or --json.")]
pub struct AddArgs {
    /// Element id
    #[arg(long)]
    pub id: String,
    /// Timestamp: an integer within ±(2^53-1)
    #[arg(long, allow_hyphen_values = true)]
    pub ts: String,
    /// Payload field (repeatable)
    #[arg(long = "field", value_name = "KEY=VALUE")]
    pub fields: Vec<String>,
    /// Payload field whose value is the content of PATH, byte for byte; `-` reads stdin
    /// (repeatable)
    #[arg(long = "field-file", value_name = "KEY=PATH")]
    pub field_files: Vec<String>,
    /// Payload fields from a JSON object in FILE (`-`: stdin), in its order:
    /// {"customer": "7", "raw": {"base64": "AP8="}, "tag": ["a", "b"]}
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// The payload gathered from the three options above (filled after parsing).
    #[arg(skip)]
    pub payload: Vec<tidemark::core::op::Field>,
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
