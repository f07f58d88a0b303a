//! `make bench` (`cargo bench --bench tidemark`): drives the release build of
//! the `tidemark` daemon against a private `redis-server` and reports
//! throughput, latency and memory: one JSON object on stdout, a readable
//! table and progress on stderr.
//!
//! Each scenario runs `--runs` times (3) on a flushed Redis with a fresh
//! daemon; the median of each figure is reported. Nothing here asserts a
//! speed: the figures are compared with the targets in the table only.
//!
//! Run without `--bench` (as `cargo test --all-targets` does) it performs a
//! quick smoke run (small N, one run) so the harness itself is tested.
#![forbid(unsafe_code)]

mod clock;
mod end_to_end;
mod ingest;
mod release;
mod report;
mod scaleout;
mod single;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use redis::streams::StreamInfoGroupsReply;
use testkit::{Daemon, Keys, RedisCluster, RedisOptions, RedisServer};
use tidemark::core::EntryId;
use tidemark::store::Conn;

use report::{load_average, summary, Machine, Progress, Results};

/// The allocator of the `tidemark` binary, so the consumer runtime measured
/// here runs as it does in `tidemark consume`.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The namespace of every scenario (the server is private and flushed
/// between runs).
const NAMESPACE: &str = "bench";
/// The output group the daemon creates and the end-to-end consumer reads.
const GROUP: &str = "bench";
/// The daemon's consumer name in the input group.
const DAEMON_CONSUMER: &str = "bench-daemon";
/// Entries per pipelined `XADD` batch.
const WRITE_BATCH: usize = 1000;
/// How often completion conditions are polled.
const POLL: Duration = Duration::from_millis(2);
/// Longest wait for any one condition before the bench gives up.
const PATIENCE: Duration = Duration::from_secs(180);
/// Scheduled timestamps start here; the watermark stays below until a
/// scenario raises it.
const TS_BASE: i64 = 1_000_000_000;
/// Handlers at once in the end-to-end scenario.
const E2E_CONCURRENCY: usize = 50;

/// The targets of issue 4 (2-core machine; client, daemon and Redis sharing it).
mod target {
    pub const INGEST_PER_S: f64 = 150_000.0;
    pub const RELEASE_PER_S: f64 = 500_000.0;
    pub const E2E_PER_S: f64 = 100_000.0;
    pub const E2E_P99_MS: f64 = 1000.0;
    pub const SINGLE_P99_MS: f64 = 2.0;
    pub const CLOCK_P99_MS: f64 = 10.0;
    pub const RSS_MIB: f64 = 30.0;
    /// Issue 11: release on the cluster (P = 6 on 3 masters) over standalone (P = 1).
    pub const SCALE_RELEASE: f64 = 1.8;
    /// Issue 11: ingest on the cluster over standalone.
    pub const SCALE_INGEST: f64 = 1.3;
    /// Issue 11: several daemons over one, ingest and release, on either.
    pub const SCALE_DAEMONS: f64 = 0.9;
}

const USAGE: &str = "\
usage: cargo bench --bench tidemark -- [OPTIONS] [SCENARIO]...
       make bench ARGS=\"[OPTIONS] [SCENARIO]...\"

Scenarios (default: all): ingest release e2e single clock ceiling scaleout
  ceiling: the release scenario's work done by the best script we could write
  for it (benches/tidemark/release.rs, independent of tidemark's scripts),
  called in a loop from here with no daemon: the reference for release
  scaleout: ingest and release (no payload) on this Redis with P = 1 and on a
  local 3-master Redis Cluster with P = 6, with 1 and with 3 daemons, taking
  turns; the reference script on both; Redis CPU per element on each shard

Options:
  --runs N     runs per scenario; the median is reported (default 3); with more
               than one, an ingest run first warms Redis up and is not counted
  --n N        elements for ingest, release and e2e (default 100000)
  --quick      N = 10000, 1 run (no warm-up), 200 single-element rounds, 2000 clock elements
  --profile    print Redis's INFO commandstats of each timed phase
  --aof POLICY Redis with the append-only file on and appendfsync POLICY
               (everysec or always; default: no persistence)
  --baseline BIN  also run the ingest, release and e2e scenarios with another
               build of tidemark, alternating run by run with this one, and show
               both (e.g. the previous commit's target/release/tidemark)
  -h, --help   this text

Environment: TIDEMARK_BENCH_BIN=path runs another build of the daemon (A/B).

One JSON object goes to stdout; progress and a readable table to stderr.";

/// What to run, and how big.
#[derive(Debug, Clone)]
struct Options {
    /// Runs per scenario.
    runs: usize,
    /// Elements for ingest, release and end to end.
    n: usize,
    /// Rounds of the single-element scenario.
    single_rounds: usize,
    /// Elements of the clock scenario.
    clock_n: usize,
    /// Span over which the clock scenario's elements fall due.
    clock_span: Duration,
    /// Scenarios to run (empty: all).
    only: Vec<String>,
    /// Started without `--bench` (by `cargo test`): a small smoke run.
    smoke: bool,
    /// Print Redis's `INFO commandstats` of each timed phase to stderr.
    profile: bool,
    /// Redis's `appendfsync` policy with the AOF on; `None`: no persistence.
    aof: Option<String>,
    /// Another build of `tidemark` run alongside in release and e2e.
    baseline: Option<PathBuf>,
}

const SCENARIOS: [&str; 7] = ["ingest", "release", "e2e", "single", "clock", "ceiling", "scaleout"];

impl Options {
    fn parse(args: impl IntoIterator<Item = String>) -> Result<Option<Options>> {
        let mut o = Options {
            runs: 3,
            n: 100_000,
            single_rounds: 1000,
            clock_n: 10_000,
            clock_span: Duration::from_secs(5),
            only: Vec::new(),
            smoke: true,
            profile: false,
            aof: None,
            baseline: None,
        };
        let mut args = args.into_iter();
        let number = |flag: &str, v: Option<String>| -> Result<usize> {
            let v = v.ok_or_else(|| anyhow!("{flag} needs a value"))?;
            match v.parse::<usize>() {
                Ok(n) if n > 0 => Ok(n),
                _ => bail!("{flag} {v:?}: expected a positive integer"),
            }
        };
        let mut quick = false;
        let mut runs = None;
        let mut n = None;
        while let Some(a) = args.next() {
            match a.as_str() {
                // `cargo bench` passes --bench; `cargo test` does not.
                "--bench" => o.smoke = false,
                "--runs" => runs = Some(number("--runs", args.next())?),
                "--n" => n = Some(number("--n", args.next())?),
                "--quick" => quick = true,
                "--profile" => o.profile = true,
                "--aof" => match args.next().as_deref() {
                    Some(p @ ("everysec" | "always")) => o.aof = Some(p.to_owned()),
                    Some(other) if !other.starts_with("--") => bail!("--aof {other:?}: expected everysec or always"),
                    _ => bail!("--aof needs a value: everysec or always"),
                },
                "--baseline" => match args.next() {
                    Some(bin) if !bin.starts_with("--") => o.baseline = Some(PathBuf::from(bin)),
                    _ => bail!("--baseline needs the path of a tidemark binary"),
                },
                "-h" | "--help" => {
                    println!("{USAGE}");
                    return Ok(None);
                }
                s if SCENARIOS.contains(&s) => o.only.push(s.to_owned()),
                // Other flags cargo's test runner may pass (e.g. --nocapture).
                s if s.starts_with("--") && o.smoke => {}
                other => bail!("unknown argument {other:?}\n\n{USAGE}"),
            }
        }
        if quick || o.smoke {
            o.runs = 1;
            o.n = 10_000;
            o.single_rounds = 200;
            o.clock_n = 2000;
        }
        if o.smoke {
            o.n = 2000;
            o.single_rounds = 20;
            o.clock_n = 200;
            o.clock_span = Duration::from_secs(1);
        }
        o.runs = runs.unwrap_or(o.runs);
        o.n = n.unwrap_or(o.n);
        Ok(Some(o))
    }

    fn wants(&self, scenario: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == scenario)
    }
}

fn main() -> ExitCode {
    let opts = match Options::parse(std::env::args().skip(1)) {
        Ok(Some(o)) => o,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e}");
            return ExitCode::from(64);
        }
    };
    // The consumer runtime's logs, when asked for (RUST_LOG=tidemark=debug).
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(opts: Options) -> Result<()> {
    let progress = Progress::new();
    let machine = Machine::probe();
    let redis = RedisServer::start_with(RedisOptions {
        aof: opts.aof.is_some(),
        appendfsync: opts.aof.clone(),
        ..Default::default()
    });
    // TIDEMARK_BENCH_BIN compares another build of the daemon (A/B runs).
    let bin = std::env::var_os("TIDEMARK_BENCH_BIN").map_or_else(|| testkit::bin_path().to_owned(), PathBuf::from);
    let mut bench = Bench::connect(redis, bin, progress, opts.profile).await?;
    let redis_version = bench.redis_version().await?;
    if opts.smoke {
        eprintln!("bench: smoke run (started without --bench); use `make bench` for the figures");
    }
    // The scale-out section's cluster forms in the background (2–3 s,
    // mostly waiting) and idles until the section runs.
    let mut forming = opts
        .wants("scaleout")
        .then(|| tokio::task::spawn_blocking(|| RedisCluster::start(scaleout::CLUSTER_MASTERS, 0)));
    let mut cluster = None;
    if !opts.smoke && opts.runs > 1 {
        // A fresh Redis grows its memory during the first run (page faults,
        // allocator warm-up); later runs reuse it, as a long-running one does.
        bench.repeat("warm-up (not counted)", 1, |b| Box::pin(b.ingest(opts.n, Payload::TwoFields))).await?;
    }
    if !opts.smoke {
        // Formed before anything is timed.
        if let Some(forming) = forming.take() {
            cluster = Some(forming.await.context("starting the local Redis Cluster")?);
        }
    }
    let mut results = Results::default();
    if opts.wants("ingest") {
        for payload in [Payload::None, Payload::TwoFields] {
            let name = format!("ingest, {}", payload.label());
            let (r, base) = bench
                .repeat_ab(&name, opts.runs, opts.baseline.as_deref(), |b| Box::pin(b.ingest(opts.n, payload)))
                .await?;
            results.ingest.push((payload, r));
            results.baseline_ingest.extend(base.map(|base| (payload, base)));
        }
    }
    if opts.wants("release") || opts.wants("ceiling") {
        for payload in [Payload::None, Payload::TwoFields] {
            // The release, the baseline build's and the reference script
            // take turns run by run, so that their ratios compare the same
            // minutes of a machine whose speed drifts.
            let name = format!("release, {}", payload.label());
            let reference = format!("reference script, release work, {}", payload.label());
            let (mut this, mut base, mut alone) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..opts.runs {
                if opts.wants("release") {
                    if let Some(bin) = &opts.baseline {
                        base.extend(bench.once_with(&name, bin, |b| Box::pin(b.release(opts.n, payload))).await?);
                    }
                    this.extend(bench.repeat(&name, 1, |b| Box::pin(b.release(opts.n, payload))).await?);
                }
                if opts.wants("ceiling") {
                    alone.extend(bench.repeat(&reference, 1, |b| Box::pin(b.ceiling_release(opts.n, payload))).await?);
                }
            }
            if opts.wants("release") {
                results.release.push((payload, this));
            }
            if opts.baseline.is_some() && opts.wants("release") {
                results.baseline_release.push((payload, base));
            }
            if opts.wants("ceiling") {
                results.ceiling_release.push((payload, alone));
            }
        }
    }
    if opts.wants("e2e") {
        for v in E2E_VARIANTS {
            let name = format!("end to end, {}", v.label());
            let (r, base) = bench
                .repeat_ab(&name, opts.runs, opts.baseline.as_deref(), |b| Box::pin(b.end_to_end(opts.n, v)))
                .await?;
            results.e2e.push((v, r));
            results.baseline_e2e.extend(base.map(|base| (v, base)));
        }
    }
    if opts.wants("single") {
        let rounds = opts.single_rounds;
        results.single = Some(bench.repeat("single element", opts.runs, |b| Box::pin(b.single(rounds))).await?);
    }
    if opts.wants("clock") {
        let (n, span) = (opts.clock_n, opts.clock_span);
        results.clock = Some(bench.repeat("clock mode", opts.runs, |b| Box::pin(b.clock(n, span))).await?);
    }
    if let Some(forming) = forming {
        bench.progress.start("scale-out: the local Redis Cluster");
        cluster = Some(forming.await.context("starting the local Redis Cluster")?);
        bench.progress.done("ready");
    }
    if let Some(cluster) = &cluster {
        results.scaleout = Some(bench.scaleout(cluster, &opts).await?);
    }
    if opts.smoke {
        // `cargo test --all-targets`: the harness works; figures from a debug
        // build with N = 2000 mean nothing.
        eprintln!("bench: smoke run passed (every scenario completed)");
        return Ok(());
    }
    let machine = Machine { load_after: load_average(), redis_version, ..machine };
    let report = results.json(&opts, &machine, bench.peak_rss_kib);
    eprintln!();
    eprint!("{}", results.table(&opts, &machine, bench.peak_rss_kib));
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

// ---------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------

/// The payload of the elements a scenario schedules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Payload {
    /// `id` and `ts` only.
    None,
    /// Two small fields (`customer`, `amount`), like a typical job.
    TwoFields,
}

impl Payload {
    fn label(self) -> &'static str {
        match self {
            Payload::None => "no payload",
            Payload::TwoFields => "2-field payload",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Payload::None => "no_payload",
            Payload::TwoFields => "payload_2_fields",
        }
    }
}

/// A variant of the end-to-end scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct E2e {
    payload: Payload,
    /// The consumer runtime's read-ahead (`ConsumerBuilder::prefetch`).
    prefetch: usize,
}

/// The end-to-end variants: the library's defaults (the target row), a
/// payload, and read-ahead.
const E2E_VARIANTS: [E2e; 3] = [
    E2e { payload: Payload::None, prefetch: 0 },
    E2e { payload: Payload::TwoFields, prefetch: 0 },
    E2e { payload: Payload::None, prefetch: E2E_CONCURRENCY },
];

impl E2e {
    /// The variant the targets are for.
    fn is_target(self) -> bool {
        self == E2E_VARIANTS[0]
    }

    fn label(self) -> String {
        match self.prefetch {
            0 => self.payload.label().to_owned(),
            n => format!("{}, prefetch {n}", self.payload.label()),
        }
    }

    fn key(self) -> String {
        match self.prefetch {
            0 => self.payload.key().to_owned(),
            n => format!("{}_prefetch_{n}", self.payload.key()),
        }
    }
}

/// One run's figures, by name (`elements_per_s`, `p99_ms`, …).
type Figures = BTreeMap<&'static str, f64>;

/// The shared state of a bench: the private Redis, a control connection,
/// the daemon binary and what was observed across runs.
struct Bench {
    /// The private server (killed on drop).
    redis: RedisServer,
    /// Control and polling connection.
    conn: Conn,
    /// The `tidemark` binary under test.
    bin: PathBuf,
    /// Key names of [`NAMESPACE`].
    keys: Keys,
    /// Progress on stderr.
    progress: Progress,
    /// Highest `VmHWM` of any daemon so far.
    peak_rss_kib: u64,
    /// Print command stats of each timed phase.
    profile: bool,
}

type RunFuture<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Figures>> + 'a>>;

impl Bench {
    async fn connect(redis: RedisServer, bin: PathBuf, progress: Progress, profile: bool) -> Result<Bench> {
        let conn = redis.conn().await;
        Ok(Bench { redis, conn, bin, keys: testkit::keys(NAMESPACE), progress, peak_rss_kib: 0, profile })
    }

    async fn redis_version(&mut self) -> Result<String> {
        let info: String = redis::cmd("INFO").arg("server").query_async(&mut self.conn).await?;
        Ok(info_field(&info, "redis_version").unwrap_or("?").to_owned())
    }

    /// Runs a scenario `runs` times; returns every run's figures.
    async fn repeat<F>(&mut self, name: &str, runs: usize, mut one: F) -> Result<Vec<Figures>>
    where
        F: for<'a> FnMut(&'a mut Bench) -> RunFuture<'a>,
    {
        let mut all = Vec::with_capacity(runs);
        for run in 1..=runs {
            self.progress.start(&format!("{name} {run}/{runs}"));
            let figures = one(self).await.with_context(|| format!("scenario {name}, run {run}"))?;
            self.progress.done(&summary(&figures));
            all.push(figures);
        }
        Ok(all)
    }

    /// [`Bench::repeat`], and with a `baseline` build also the same runs with
    /// it, alternating (baseline first) so that both see the same machine.
    /// Returns this build's runs and the baseline's.
    async fn repeat_ab<F>(
        &mut self,
        name: &str,
        runs: usize,
        baseline: Option<&Path>,
        mut one: F,
    ) -> Result<(Vec<Figures>, Option<Vec<Figures>>)>
    where
        F: for<'a> FnMut(&'a mut Bench) -> RunFuture<'a>,
    {
        let Some(baseline) = baseline else { return Ok((self.repeat(name, runs, one).await?, None)) };
        let (mut this, mut base) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
        for _ in 0..runs {
            base.extend(self.once_with(name, baseline, &mut one).await?);
            this.extend(self.repeat(name, 1, &mut one).await?);
        }
        Ok((this, Some(base)))
    }

    /// One run of a scenario with daemons of another build (`--baseline`).
    async fn once_with<F>(&mut self, name: &str, bin: &Path, one: F) -> Result<Vec<Figures>>
    where
        F: for<'a> FnMut(&'a mut Bench) -> RunFuture<'a>,
    {
        let own = std::mem::replace(&mut self.bin, bin.to_owned());
        let r = self.repeat(&format!("{name} (baseline build)"), 1, one).await;
        self.bin = own;
        r
    }

    /// Flushes Redis and starts a daemon that has applied a first entry.
    async fn fresh_daemon(&mut self, clock: bool) -> Result<BenchDaemon> {
        redis::cmd("FLUSHALL").query_async::<()>(&mut self.conn).await?;
        let mut daemon = BenchDaemon::spawn(&self.bin, &self.redis.url(), clock);
        self.progress.update("starting the daemon");
        // Ready once it has applied an entry: a cancel of nothing.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut warmup: Option<EntryId> = None;
        loop {
            daemon.check_alive()?;
            if warmup.is_none() && group_state(&mut self.conn, &self.keys.out, GROUP).await?.is_some() {
                let id: String = testkit::cancel_cmd(&self.keys, "bench-warmup").query_async(&mut self.conn).await?;
                warmup = Some(parse_id(&id)?);
            }
            if let Some(w) = warmup {
                if let Some(g) = group_state(&mut self.conn, &self.keys.input, tidemark::store::INPUT_GROUP).await? {
                    if g.last_delivered >= w && g.pending == 0 {
                        break;
                    }
                }
            }
            if Instant::now() >= deadline {
                bail!("the daemon did not become ready within 30 s; log:\n{}", daemon.log());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if clock {
            // The clock leader is elected right after start.
            let lock = self.keys.lock("clock");
            self.wait("the clock leader", &mut daemon, |b| {
                let lock = lock.clone();
                Box::pin(async move { Ok(redis::cmd("EXISTS").arg(&lock).query_async::<bool>(&mut b.conn).await?) })
            })
            .await?;
        }
        Ok(daemon)
    }

    /// Stops `daemon`, keeping its peak RSS.
    fn stop(&mut self, daemon: BenchDaemon) -> Result<u64> {
        let peak = daemon.stop()?;
        self.peak_rss_kib = self.peak_rss_kib.max(peak);
        Ok(peak)
    }

    /// Polls `done` every [`POLL`] until it holds; fails after [`PATIENCE`]
    /// or when the daemon dies.
    async fn wait<F>(&mut self, what: &str, daemon: &mut BenchDaemon, mut done: F) -> Result<Instant>
    where
        F: for<'a> FnMut(&'a mut Bench) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<bool>> + 'a>>,
    {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if done(self).await? {
                return Ok(Instant::now());
            }
            daemon.check_alive()?;
            if Instant::now() >= deadline {
                bail!("gave up waiting for {what} after {PATIENCE:?}; daemon log:\n{}", daemon.log());
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until `n` elements are scheduled and the input group has
    /// nothing pending up to `last` (every written entry applied).
    async fn wait_applied(&mut self, daemon: &mut BenchDaemon, n: usize, last: EntryId) -> Result<Instant> {
        let label = "applied";
        self.wait("every add to be applied", daemon, move |b| {
            Box::pin(async move {
                let scheduled = testkit::zcard_async(&mut b.conn, &b.keys.sched).await;
                b.progress.count(label, scheduled, n);
                if scheduled < n {
                    return Ok(false);
                }
                let input = group_state(&mut b.conn, &b.keys.input, tidemark::store::INPUT_GROUP).await?;
                Ok(input.is_some_and(|g| g.pending == 0 && g.last_delivered >= last))
            })
        })
        .await
    }

    /// Starts measuring CPU use (and, with `--profile`, command stats).
    async fn meter(&mut self, daemon: &BenchDaemon) -> Result<Meter> {
        if self.profile {
            redis::cmd("CONFIG").arg("RESETSTAT").query_async::<()>(&mut self.conn).await?;
        }
        Ok(Meter {
            daemon: daemon.cpu_time(),
            redis: self.redis_cpu().await?,
            bench: testkit::process_cpu(std::process::id()),
        })
    }

    /// CPU seconds used since `start` by the daemon, Redis and this process
    /// (producer, pollers and, end to end, the consumer runtime).
    async fn read_meter(&mut self, start: Meter, daemon: &BenchDaemon) -> Result<[(&'static str, f64); 3]> {
        let daemon_cpu = daemon.cpu_time().saturating_sub(start.daemon).as_secs_f64();
        let bench_cpu = testkit::process_cpu(std::process::id()).saturating_sub(start.bench).as_secs_f64();
        let redis_cpu = self.redis_cpu().await? - start.redis;
        if self.profile {
            let info: String = redis::cmd("INFO").arg("commandstats").query_async(&mut self.conn).await?;
            let mut lines: Vec<(f64, String)> = info
                .lines()
                .filter_map(|l| {
                    let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
                    let usec: f64 = rest.split(',').find_map(|kv| kv.strip_prefix("usec="))?.parse().ok()?;
                    Some((usec, format!("{name:<16} {rest}")))
                })
                .collect();
            lines.sort_by(|a, b| b.0.total_cmp(&a.0));
            eprintln!();
            for (_, l) in lines.iter().take(8) {
                eprintln!("  {l}");
            }
        }
        Ok([("daemon_cpu_seconds", daemon_cpu), ("redis_cpu_seconds", redis_cpu), ("bench_cpu_seconds", bench_cpu)])
    }

    async fn add_watermark(&mut self, ts: i64) -> Result<()> {
        let _: String = testkit::watermark_cmd(&self.keys, ts).query_async(&mut self.conn).await?;
        Ok(())
    }

    async fn used_memory(&mut self) -> Result<u64> {
        let info: String = redis::cmd("INFO").arg("memory").query_async(&mut self.conn).await?;
        info_field(&info, "used_memory")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("INFO memory has no used_memory"))
    }

    /// Redis's CPU time so far (user + system), in seconds.
    async fn redis_cpu(&mut self) -> Result<f64> {
        let info: String = redis::cmd("INFO").arg("cpu").query_async(&mut self.conn).await?;
        let get = |k: &str| info_field(&info, k).and_then(|v| v.parse::<f64>().ok());
        match (get("used_cpu_user"), get("used_cpu_sys")) {
            (Some(u), Some(s)) => Ok(u + s),
            _ => bail!("INFO cpu has no used_cpu_user/used_cpu_sys"),
        }
    }
}

/// CPU times at the start of a timed phase.
struct Meter {
    daemon: Duration,
    redis: f64,
    bench: Duration,
}

/// Builds the `XADD`s of `n` adds, [`WRITE_BATCH`] per pipeline, so that
/// encoding is done before the clock starts.
fn add_pipelines(stream: &str, n: usize, ts: impl Fn(usize) -> i64, payload: Payload) -> Vec<(usize, redis::Pipeline)> {
    let all: Vec<usize> = (0..n).collect();
    add_pipelines_of(stream, &all, ts, payload)
}

/// [`add_pipelines`] of the elements numbered `ks` (element `k` is `e<k>`).
fn add_pipelines_of(
    stream: &str,
    ks: &[usize],
    ts: impl Fn(usize) -> i64,
    payload: Payload,
) -> Vec<(usize, redis::Pipeline)> {
    ks.chunks(WRITE_BATCH)
        .map(|chunk| {
            let mut pipe = redis::pipe();
            for &k in chunk {
                let cmd = pipe.cmd("XADD").arg(stream).arg("*");
                cmd.arg("op").arg("add").arg("id").arg(format!("e{k}")).arg("ts").arg(ts(k));
                if payload == Payload::TwoFields {
                    let (customer, amount) = payload_fields(k);
                    cmd.arg("customer").arg(customer).arg("amount").arg(amount);
                }
            }
            (chunk.len(), pipe)
        })
        .collect()
}

/// The 2-field payload of element `k`: `customer` and `amount`.
fn payload_fields(k: usize) -> (String, String) {
    (format!("c{}", k % 1000), format!("{}.{:02}", k % 500, k % 100))
}

/// Pipelines a producer keeps in flight (see [`write_all`]).
const WRITES_IN_FLIGHT: usize = 2;

/// Sends the pipelines in order, [`WRITES_IN_FLIGHT`] at a time so that
/// Redis has the next one while this process decodes a reply, counting the
/// entries written in `written`; returns the last entry id.
async fn write_all(conn: Conn, pipes: Vec<(usize, redis::Pipeline)>, written: Arc<AtomicUsize>) -> Result<EntryId> {
    use futures::stream::{FuturesOrdered, StreamExt};
    let send = |(count, pipe): (usize, redis::Pipeline)| {
        let mut conn = conn.clone();
        async move { pipe.query_async::<Vec<String>>(&mut conn).await.map(|ids| (count, ids)) }
    };
    let mut pipes = pipes.into_iter();
    let mut in_flight: FuturesOrdered<_> = pipes.by_ref().take(WRITES_IN_FLIGHT).map(send).collect();
    let mut last = EntryId::ZERO;
    while let Some(reply) = in_flight.next().await {
        let (count, ids) = reply?;
        if let Some(next) = pipes.next() {
            in_flight.push_back(send(next));
        }
        // Replies come in the order sent, so the last one has the largest id.
        if let Some(id) = ids.last() {
            last = parse_id(id)?;
        }
        written.fetch_add(count, Ordering::Relaxed);
    }
    Ok(last)
}

// ---------------------------------------------------------------------------
// Redis replies
// ---------------------------------------------------------------------------

/// A consumer group's state from `XINFO GROUPS`.
struct GroupState {
    /// Entries delivered and not acknowledged.
    pending: u64,
    /// The group's last delivered entry id.
    last_delivered: EntryId,
}

/// The state of `group` on `stream`; `None` if the stream or group is missing.
async fn group_state(conn: &mut Conn, stream: &str, group: &str) -> Result<Option<GroupState>> {
    let reply: Result<StreamInfoGroupsReply, redis::RedisError> =
        redis::cmd("XINFO").arg("GROUPS").arg(stream).query_async(conn).await;
    let groups = match reply {
        Ok(r) => r.groups,
        Err(e) if e.to_string().contains("no such key") => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let Some(g) = groups.into_iter().find(|g| g.name == group) else { return Ok(None) };
    Ok(Some(GroupState { pending: g.pending as u64, last_delivered: parse_id(&g.last_delivered_id)? }))
}

fn parse_id(s: &str) -> Result<EntryId> {
    s.parse().map_err(|e| anyhow!("{e}"))
}

fn info_field<'a>(info: &'a str, key: &str) -> Option<&'a str> {
    info.lines().find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(':'))).map(str::trim)
}

// ---------------------------------------------------------------------------
// The daemon under test
// ---------------------------------------------------------------------------

/// `tidemark run` as the bench runs it: the binary under test, the HTTP
/// endpoint on (as in production) on a port of its own, warnings only.
struct BenchDaemon(Daemon);

impl BenchDaemon {
    fn spawn(bin: &Path, url: &str, clock: bool) -> BenchDaemon {
        BenchDaemon::spawn_as(bin, url, NAMESPACE, 1, DAEMON_CONSUMER, clock, &[])
    }

    /// A daemon named `consumer` serving `namespace` of `partitions`
    /// partitions (`--partitions` only when more than 1, so that builds from
    /// before partitions existed run too), with extra environment `envs`.
    fn spawn_as(
        bin: &Path,
        url: &str,
        namespace: &str,
        partitions: u16,
        consumer: &str,
        clock: bool,
        envs: &[(&str, &str)],
    ) -> BenchDaemon {
        let p = partitions.to_string();
        let mut args = vec!["--redis-url", url, "--namespace", namespace, "--http", "127.0.0.1:0"];
        if partitions > 1 {
            args.extend(["--partitions", p.as_str()]);
        }
        args.extend(["run", "--consumer", consumer, "--group", GROUP]);
        if clock {
            args.push("--clock");
        }
        let mut all = vec![("RUST_LOG", "warn")];
        all.extend_from_slice(envs);
        BenchDaemon(Daemon::spawn_bin(bin, &args, &all))
    }

    fn log(&self) -> String {
        self.0.log()
    }

    fn check_alive(&mut self) -> Result<()> {
        match self.0.exited() {
            Some(status) => bail!("the daemon exited ({status}); log:\n{}", self.log()),
            None => Ok(()),
        }
    }

    fn cpu_time(&self) -> Duration {
        self.0.cpu_time()
    }

    /// SIGTERM, then waits for a clean exit. Returns the peak RSS in KiB.
    fn stop(mut self) -> Result<u64> {
        self.check_alive()?;
        let peak = self.0.peak_rss_kib().ok_or_else(|| anyhow!("no VmHWM for pid {}", self.0.pid()))?;
        self.0.sigterm();
        match self.0.wait_exit(Duration::from_secs(20)) {
            Some(status) if status.success() => Ok(peak),
            Some(status) => bail!("the daemon exited with {status} after SIGTERM; log:\n{}", self.log()),
            None => bail!("the daemon did not stop within 20 s of SIGTERM; log:\n{}", self.log()),
        }
    }
}
