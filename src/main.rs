//! The `tidemark` binary: parses the command line, validates the whole
//! configuration before connecting anything, and runs the command.
#![forbid(unsafe_code)]

mod cli;

use std::process::ExitCode;
use std::sync::Arc;

use clap::{CommandFactory, FromArgMatches};
use futures::StreamExt;
use signal_hook::consts::{SIGINT, SIGTERM};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use cli::{Cli, Command, EXIT_CONFIG, EXIT_UNAVAILABLE};
use tidemark::config::{LogFormat, Overrides, ProcessEnv, RawConfig, Settings};
use tidemark::core::watermark::parse_ts;
use tidemark::http::{self, Endpoints, Readiness};
use tidemark::produce::Producer;
use tidemark::store::{self, status, StoreError};

/// mimalloc: decoding stream replies allocates many small buffers, and it
/// cuts the daemon's CPU per entry noticeably compared with glibc malloc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let parsed = Cli::command().try_get_matches().and_then(|m| Cli::from_arg_matches(&m).map(|cli| (cli, m)));
    let (mut cli, matches) = match parsed {
        Ok(parsed) => parsed,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(EXIT_CONFIG) } else { ExitCode::SUCCESS };
        }
    };
    // The payload of `add`: files and stdin are read now, before anything
    // connects, in the order the options were given.
    if let (Command::Add(a), Some(m)) = (&mut cli.command, matches.subcommand_matches("add")) {
        match cli::fields::gather(&cli::fields::sources(m), std::io::stdin().lock()) {
            Ok(payload) => a.payload = payload,
            Err(e) => {
                eprintln!("tidemark: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        }
    }
    let mut overrides = Overrides::default();
    overrides.config_file = cli.global.config.clone();
    overrides.redis_url = cli.global.redis_url.clone();
    overrides.namespace = cli.global.namespace.clone();
    overrides.partitions = cli.global.partitions;
    overrides.log_format = cli.global.log_format.clone();
    overrides.http_addr = cli.global.http.clone();
    match &cli.command {
        Command::Run(run) => {
            overrides.consumer = run.consumer.clone();
            overrides.groups = run.groups.clone();
            overrides.clock = run.clock;
        }
        Command::Consume(c) => {
            overrides.consume_consumer = c.consumer.clone();
            overrides.consume_concurrency = c.concurrency;
            overrides.consume_max_deliveries = c.max_deliveries;
            overrides.consume_claim_idle = c.claim_idle.clone();
            overrides.consume_timeout = c.timeout.clone();
            overrides.consume_from = c.from.clone();
        }
        _ => {}
    }
    let settings = match RawConfig::load(&overrides, &ProcessEnv).and_then(|raw| Settings::from_raw(raw, &ProcessEnv)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("tidemark: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Err(e) = validate_command(&cli.command) {
        eprintln!("tidemark: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    init_logging(settings.log_format);

    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tidemark: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Run(_) => run_daemon(settings).await,
            Command::Consume(c) => run_consume(settings, c).await,
            other => match one_shot(&settings, other).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e @ StoreError::Layout(_)) => {
                    eprintln!("tidemark: {e}");
                    ExitCode::from(EXIT_CONFIG)
                }
                Err(e) if e.is_connection() || e.is_fatal() => {
                    eprintln!("tidemark: cannot use Redis at {}: {e}", settings.redis_display);
                    ExitCode::from(EXIT_UNAVAILABLE)
                }
                Err(e) => {
                    eprintln!("tidemark: {e}");
                    ExitCode::FAILURE
                }
            },
        }
    })
}

/// Checks command arguments that clap cannot (timestamps, field syntax).
fn validate_command(command: &Command) -> Result<(), String> {
    let ts = |raw: &str| {
        parse_ts(raw.as_bytes()).map(|_| ()).ok_or_else(|| format!("--ts {raw:?} is not an integer within ±(2^53-1)"))
    };
    match command {
        Command::Add(a) => {
            if a.id.is_empty() {
                return Err("--id must not be empty".into());
            }
            // The payload's fields were checked while gathering them.
            ts(&a.ts)
        }
        Command::Cancel(c) if c.id.is_empty() => Err("--id must not be empty".into()),
        Command::Watermark(w) => ts(&w.ts),
        _ => Ok(()),
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Installs SIGTERM/SIGINT handling: the first signal cancels the returned
/// token (stop reading, drain within the grace period); a second one exits
/// at once with code 130.
fn install_signals(grace: std::time::Duration) -> std::io::Result<(CancellationToken, signal_hook_tokio::Handle)> {
    let shutdown = CancellationToken::new();
    let mut signals = signal_hook_tokio::Signals::new([SIGTERM, SIGINT])?;
    let handle = signals.handle();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        let mut seen = 0;
        while let Some(signal) = signals.next().await {
            seen += 1;
            let name = if signal == SIGTERM { "SIGTERM" } else { "SIGINT" };
            if seen == 1 {
                info!(signal = name, grace = ?grace, "shutting down: finishing the work in flight");
                on_signal.cancel();
            } else {
                warn!(signal = name, "second signal: exiting now");
                std::process::exit(130);
            }
        }
    });
    Ok((shutdown, handle))
}

/// Runs `work` until it ends; once `shutdown` fires, allows it `grace` more.
async fn supervise<E>(
    work: impl std::future::Future<Output = Result<(), E>> + Send + 'static,
    shutdown: CancellationToken,
    grace: std::time::Duration,
    fatal_code: impl Fn(&E) -> u8,
) -> ExitCode
where
    E: std::fmt::Display + Send + 'static,
{
    let mut task = tokio::spawn(work);
    let result = tokio::select! {
        r = &mut task => r,
        _ = shutdown.cancelled() => match tokio::time::timeout(grace, &mut task).await {
            Ok(r) => r,
            Err(_) => {
                error!(grace = ?grace, "shutdown did not finish within the grace period; exiting");
                return ExitCode::FAILURE;
            }
        },
    };
    match result {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            error!(error = %e, "cannot continue");
            ExitCode::from(fatal_code(&e))
        }
        Err(e) => {
            error!(error = %e, "the task failed");
            ExitCode::FAILURE
        }
    }
}

/// `tidemark run`: the daemon under signal handling.
async fn run_daemon(settings: Settings) -> ExitCode {
    let grace = settings.daemon.shutdown_grace;
    let (shutdown, handle) = match install_signals(grace) {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "cannot install signal handlers");
            return ExitCode::FAILURE;
        }
    };
    let stats = Arc::new(tidemark::health::Stats::default());
    let endpoints =
        Endpoints::new(settings.clone(), stats.readiness.clone(), shutdown.clone()).stats(Arc::clone(&stats));
    let http = match start_http(&settings, endpoints).await {
        Ok(http) => http,
        Err(code) => return code,
    };
    let work = tidemark::daemon::run(settings, stats, shutdown.clone());
    let code = supervise(work, shutdown, grace, |e: &StoreError| match e {
        StoreError::Layout(_) => EXIT_CONFIG,
        e if e.is_fatal() => EXIT_UNAVAILABLE,
        _ => 1,
    })
    .await;
    if let Some(http) = http {
        http.stop().await;
    }
    handle.close();
    code
}

/// Starts the HTTP server unless `http.addr` is off, with the Prometheus
/// recorder installed. A configured address that is taken is a startup
/// error (exit 1); the built-in default gives way to a free port, so that
/// any number of processes share a host.
async fn start_http(settings: &Settings, mut endpoints: Endpoints) -> Result<Option<http::Server>, ExitCode> {
    let Some(addr) = settings.http_addr else {
        return Ok(None);
    };
    match tidemark::metrics::install() {
        Ok(handle) => endpoints = endpoints.prometheus(handle),
        Err(e) => warn!(error = %e, "serving /metrics without script latency, dead-letter and consumer metrics"),
    }
    let started = match http::Server::start(addr, endpoints.clone()).await {
        Err(http::HttpError::Bind { source, .. })
            if settings.http_addr_is_default && source.kind() == std::io::ErrorKind::AddrInUse =>
        {
            info!(
                taken = %addr,
                "the default HTTP address is taken (another tidemark on this host?): serving on a free port; \
                 set http.addr or --http to choose one"
            );
            http::Server::start(std::net::SocketAddr::new(addr.ip(), 0), endpoints).await
        }
        other => other,
    };
    match started {
        Ok(server) => Ok(Some(server)),
        Err(e) => {
            error!(error = %e, "cannot start: choose another address with --http IP:PORT (or --http off)");
            Err(ExitCode::FAILURE)
        }
    }
}

/// `tidemark consume`: the consumer runtime running a command per element.
async fn run_consume(settings: Settings, args: cli::ConsumeArgs) -> ExitCode {
    let grace = settings.consume.shutdown_grace;
    let (shutdown, handle) = match install_signals(grace) {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "cannot install signal handlers");
            return ExitCode::FAILURE;
        }
    };
    let readiness = Readiness::default();
    let http = match start_http(&settings, Endpoints::new(settings.clone(), readiness.clone(), shutdown.clone())).await
    {
        Ok(http) => http,
        Err(code) => return code,
    };
    let work = tidemark::consume::command::run(settings, args.group, args.command, readiness, shutdown.clone());
    let exit_code = |e: &tidemark::consume::ConsumeError| {
        if matches!(
            e,
            tidemark::consume::ConsumeError::Invalid { .. }
                | tidemark::consume::ConsumeError::Store(StoreError::Layout(_))
        ) {
            EXIT_CONFIG
        } else if e.is_fatal() {
            EXIT_UNAVAILABLE
        } else {
            1
        }
    };
    // The runtime drains handlers within `grace`, then acknowledges and
    // drops its lease.
    let code = supervise(work, shutdown, grace + tidemark::consume::FINISH_MARGIN, exit_code).await;
    if let Some(http) = http {
        http.stop().await;
    }
    handle.close();
    code
}

async fn one_shot(settings: &Settings, command: Command) -> Result<(), StoreError> {
    let mut conn = settings.redis.connect(settings.connect.response_timeout).await?;
    let ns = match store::meta::resolve(&mut conn, &settings.namespace, settings.partitions, false).await? {
        Ok(ns) => ns,
        // `status` shows, and `repartition` resumes, a repartition under
        // way, from the old layout (recorded until it finishes).
        Err(store::LayoutError::Repartitioning { .. })
            if matches!(command, Command::Status(_) | Command::Repartition(_)) =>
        {
            let old = store::meta::recorded(&mut conn, &settings.namespace).await?;
            settings.namespace.with_partitions(old.unwrap_or(1))
        }
        Err(e) => return Err(e.into()),
    };
    let writes = matches!(command, Command::Add(_) | Command::Cancel(_) | Command::Watermark(_));
    if writes && settings.partitions.is_none() && store::meta::recorded(&mut conn, &ns).await?.is_none() {
        eprintln!(
            "tidemark: warning: namespace {:?} has no partition count recorded yet (no daemon has started on it): \
             writing as 1 partition; give --partitions N if its daemons will run with more",
            ns.name()
        );
    }
    let mut producer = Producer::new(conn.clone(), ns.clone());
    let id = match command {
        Command::Add(a) => {
            let ts = parse_ts(a.ts.as_bytes()).expect("validated");
            let mut entry: Vec<tidemark::core::op::Field> = vec![
                (b"op".to_vec(), b"add".to_vec()),
                (b"id".to_vec(), a.id.clone().into_bytes()),
                (b"ts".to_vec(), ts.to_string().into()),
            ];
            entry.extend(a.payload);
            // The daemons judge the entry by their own limits; these are
            // ours, which are usually theirs.
            if let Err(rejection) = tidemark::core::op::parse(&entry, &settings.daemon.limits) {
                eprintln!(
                    "tidemark: warning: a daemon with this configuration's limits (limits.*) will dead-letter \
                     this entry as {}: {}",
                    rejection.reason.code(),
                    rejection.detail
                );
            }
            let fields: Vec<(&[u8], &[u8])> = entry[3..].iter().map(|(k, v)| (k.as_slice(), v.as_slice())).collect();
            producer.add(a.id.as_bytes(), ts, &fields).await?
        }
        Command::Cancel(c) => producer.cancel(c.id.as_bytes()).await?,
        Command::Watermark(w) => {
            let ts = parse_ts(w.ts.as_bytes()).expect("validated");
            let ids = producer.watermark(ts).await?;
            if ids.len() > 1 {
                eprintln!("tidemark: watermark written to all {} partitions", ids.len());
            }
            ids.into_iter().next().unwrap_or_default()
        }
        Command::Status(s) => {
            let snapshot = status::snapshot(&mut conn, &ns).await?;
            if s.json {
                println!("{}", serde_json::to_string_pretty(&snapshot).expect("status serializes"));
            } else {
                print!("{}", status::render(&snapshot));
            }
            return Ok(());
        }
        Command::Dead(cli::DeadCommand::List(l)) => {
            return tidemark::dead::cli_list(&mut conn, &ns.all(), l.count, l.json).await
        }
        Command::Dead(cli::DeadCommand::Replay(r)) => {
            return tidemark::dead::cli_replay(&mut conn, &ns, r.id.as_deref(), r.reason.as_deref()).await
        }
        Command::Repartition(r) => return repartition(settings, &mut conn, ns, r).await,
        Command::Run(_) | Command::Consume(_) => unreachable!("long-running commands are handled above"),
    };
    println!("{id}");
    warn_if_nobody_serves(&mut conn, &ns).await;
    Ok(())
}

/// `tidemark repartition`: moves the namespace to `--to` partitions.
async fn repartition(
    settings: &Settings,
    src: &mut store::Conn,
    from: store::Namespace,
    args: cli::RepartitionArgs,
) -> Result<(), StoreError> {
    use tidemark::repartition::{self, Plan, RepartitionError};
    let (mut dst, same_redis) = match &args.to_redis_url {
        None => (src.clone(), true),
        Some(url) => {
            let client = redis::Client::open(url.as_str()).map_err(|e| {
                StoreError::Rejected(format!("--to-redis-url {}: {e}", tidemark::config::redact_url(url)))
            })?;
            let target = store::Endpoint::new(client, None, store::Mode::Auto, settings.connect.clone());
            (target.connect(settings.connect.response_timeout).await?, false)
        }
    };
    let plan = Plan { from: from.clone(), to: from.with_partitions(args.to), same_redis, force: args.force };
    eprintln!(
        "tidemark: moving namespace {:?} from {} to {} partition(s){}",
        from.name(),
        from.partitions(),
        args.to,
        if same_redis {
            String::new()
        } else {
            format!(" on {}", args.to_redis_url.as_deref().map(tidemark::config::redact_url).unwrap_or_default())
        }
    );
    match repartition::run(src, &mut dst, &plan, |line| eprintln!("tidemark: {line}")).await {
        Ok(moved) => {
            println!(
                "moved {} elements ({} stayed in place) and {} dead letters; namespace {:?} has {} partition(s)",
                moved.elements,
                moved.kept,
                moved.dead_letters,
                from.name(),
                args.to
            );
            for left in &moved.left_behind {
                eprintln!("tidemark: warning: --force left behind in the old layout: {left}");
            }
            Ok(())
        }
        Err(RepartitionError::Store(e)) => Err(e),
        Err(RepartitionError::Refused(why)) => Err(StoreError::Rejected(why)),
    }
}

/// After writing to `:in`: a warning on stderr when no daemon serves the
/// namespace (a mistyped `--namespace`, or the daemons are down), naming
/// the namespaces that are served. The entry stays written; a failure to
/// tell is not an error.
async fn warn_if_nobody_serves(conn: &mut store::Conn, ns: &store::Namespace) {
    use tidemark::store::serving;
    let keys = &ns.partition(0);
    match serving::live_daemons(conn, ns).await {
        Ok(0) => {
            let served = serving::served_namespaces(conn, keys).await.unwrap_or_default();
            eprintln!("tidemark: warning: {}", serving::nobody_serves(keys, &served));
        }
        Ok(_) => {}
        Err(e) => {
            eprintln!("tidemark: warning: cannot tell whether a daemon serves namespace {:?}: {e}", keys.namespace)
        }
    }
}
