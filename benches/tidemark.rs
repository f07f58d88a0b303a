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

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fs::File;
use std::io::{IsTerminal, Write as _};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use redis::{AsyncConnectionConfig, Value};
use serde_json::{json, Value as Json};
use tempfile::TempDir;
use tidemark::consume::{ConsumerBuilder, Element};
use tidemark::core::EntryId;
use tidemark::store::Conn;
use tidemark::store::{Keys, Scripts};
use tokio_util::sync::CancellationToken;

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
}

const USAGE: &str = "\
usage: cargo bench --bench tidemark -- [OPTIONS] [SCENARIO]...
       make bench ARGS=\"[OPTIONS] [SCENARIO]...\"

Scenarios (default: all): ingest release e2e single clock ceiling
  ceiling: the release scenario's work done by tidemark's release script called
  in a loop from here (no daemon): how fast this machine's Redis is right now

Options:
  --runs N     runs per scenario; the median is reported (default 3); with more
               than one, an ingest run first warms Redis up and is not counted
  --n N        elements for ingest, release and e2e (default 100000)
  --quick      N = 10000, 1 run (no warm-up), 200 single-element rounds, 2000 clock elements
  --profile    print Redis's INFO commandstats of each timed phase
  --aof POLICY Redis with the append-only file on and appendfsync POLICY
               (everysec or always; default: no persistence)
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
}

const SCENARIOS: [&str; 6] = ["ingest", "release", "e2e", "single", "clock", "ceiling"];

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
    let redis = RedisServer::start(opts.aof.as_deref())?;
    // TIDEMARK_BENCH_BIN compares another build of the daemon (A/B runs).
    let bin = std::env::var_os("TIDEMARK_BENCH_BIN")
        .map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_tidemark")), PathBuf::from);
    let mut bench = Bench::connect(redis, bin, progress, opts.profile).await?;
    let redis_version = bench.redis_version().await?;
    if opts.smoke {
        eprintln!("bench: smoke run (started without --bench); use `make bench` for the figures");
    }
    if !opts.smoke && opts.runs > 1 {
        // A fresh Redis grows its memory during the first run (page faults,
        // allocator warm-up); later runs reuse it, as a long-running one does.
        bench.repeat("warm-up (not counted)", 1, |b| Box::pin(b.ingest(opts.n, Payload::TwoFields))).await?;
    }
    let mut results = Results::default();
    if opts.wants("ingest") {
        for payload in [Payload::None, Payload::TwoFields] {
            let name = format!("ingest, {}", payload.label());
            let r = bench.repeat(&name, opts.runs, |b| Box::pin(b.ingest(opts.n, payload))).await?;
            results.ingest.push((payload, r));
        }
    }
    if opts.wants("release") {
        for payload in [Payload::None, Payload::TwoFields] {
            let name = format!("release, {}", payload.label());
            let r = bench.repeat(&name, opts.runs, |b| Box::pin(b.release(opts.n, payload))).await?;
            results.release.push((payload, r));
        }
    }
    if opts.wants("ceiling") {
        for payload in [Payload::None, Payload::TwoFields] {
            let name = format!("Redis alone, release work, {}", payload.label());
            let r = bench.repeat(&name, opts.runs, |b| Box::pin(b.ceiling_release(opts.n, payload))).await?;
            results.ceiling_release.push((payload, r));
        }
    }
    if opts.wants("e2e") {
        for v in E2E_VARIANTS {
            let name = format!("end to end, {}", v.label());
            let r = bench.repeat(&name, opts.runs, |b| Box::pin(b.end_to_end(opts.n, v))).await?;
            results.e2e.push((v, r));
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
        let conn = redis.conn().await?;
        Ok(Bench { redis, conn, bin, keys: Keys::new("tidemark", NAMESPACE), progress, peak_rss_kib: 0, profile })
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

    /// Flushes Redis and starts a daemon that has applied a first entry.
    async fn fresh_daemon(&mut self, clock: bool) -> Result<Daemon> {
        redis::cmd("FLUSHALL").query_async::<()>(&mut self.conn).await?;
        let mut daemon = Daemon::spawn(&self.bin, &self.redis.url(), clock)?;
        self.progress.update("starting the daemon");
        // Ready once it has applied an entry: a cancel of nothing.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut warmup: Option<EntryId> = None;
        loop {
            daemon.check_alive()?;
            if warmup.is_none() && group_state(&mut self.conn, &self.keys.out, GROUP).await?.is_some() {
                let id: String = redis::cmd("XADD")
                    .arg(&self.keys.input)
                    .arg("*")
                    .arg("op")
                    .arg("cancel")
                    .arg("id")
                    .arg("bench-warmup")
                    .query_async(&mut self.conn)
                    .await?;
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
    fn stop(&mut self, daemon: Daemon) -> Result<u64> {
        let peak = daemon.stop()?;
        self.peak_rss_kib = self.peak_rss_kib.max(peak);
        Ok(peak)
    }

    /// Polls `done` every [`POLL`] until it holds; fails after [`PATIENCE`]
    /// or when the daemon dies.
    async fn wait<F>(&mut self, what: &str, daemon: &mut Daemon, mut done: F) -> Result<Instant>
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
    async fn wait_applied(&mut self, daemon: &mut Daemon, n: usize, last: EntryId) -> Result<Instant> {
        let label = "applied";
        self.wait("every add to be applied", daemon, move |b| {
            Box::pin(async move {
                let scheduled: usize = redis::cmd("ZCARD").arg(&b.keys.sched).query_async(&mut b.conn).await?;
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

    /// Ingest: `n` adds written with pipelined `XADD`, from the first write
    /// until all are scheduled and acknowledged.
    async fn ingest(&mut self, n: usize, payload: Payload) -> Result<Figures> {
        let mut daemon = self.fresh_daemon(false).await?;
        let pipes = add_pipelines(&self.keys.input, n, |k| TS_BASE + k as i64, payload);
        let meter = self.meter(&daemon).await?;
        let start = Instant::now();
        let written = Arc::new(AtomicUsize::new(0));
        let writer = tokio::spawn(write_all(self.conn.clone(), pipes, Arc::clone(&written)));
        let last = {
            // Poll progress while the writer runs.
            let mut handle = writer;
            loop {
                tokio::select! {
                    r = &mut handle => break r.context("the writer task failed")??,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {
                        self.progress.count("written", written.load(Ordering::Relaxed), n);
                    }
                }
            }
        };
        let write_s = start.elapsed().as_secs_f64();
        let end = self.wait_applied(&mut daemon, n, last).await?;
        let elapsed = (end - start).as_secs_f64();
        let cpu = self.read_meter(meter, &daemon).await?;
        let rss = self.stop(daemon)?;
        let mut figures = BTreeMap::from([
            ("elements_per_s", n as f64 / elapsed),
            ("seconds", elapsed),
            ("write_seconds", write_s),
            ("daemon_peak_rss_mib", kib_to_mib(rss)),
        ]);
        figures.extend(cpu);
        Ok(figures)
    }

    /// Redis alone, release work: `n` scheduled elements released by
    /// tidemark's release script called in a loop from here, one call of
    /// [`WRITE_BATCH`] at a time: the daemon's release work without the
    /// daemon.
    async fn ceiling_release(&mut self, n: usize, payload: Payload) -> Result<Figures> {
        redis::cmd("FLUSHALL").query_async::<()>(&mut self.conn).await?;
        let keys = self.keys.clone();
        for from in (0..n).step_by(WRITE_BATCH) {
            let mut pipe = redis::pipe();
            for k in from..(from + WRITE_BATCH).min(n) {
                let id = format!("e{k}");
                pipe.cmd("ZADD").arg(&keys.sched).arg(TS_BASE + k as i64).arg(&id).ignore();
                if payload == Payload::TwoFields {
                    let (customer, amount) = payload_fields(k);
                    let blob = tidemark::core::codec::encode([
                        &b"customer"[..],
                        customer.as_bytes(),
                        b"amount",
                        amount.as_bytes(),
                    ]);
                    pipe.cmd("HSET").arg(&keys.body).arg(&id).arg(blob).ignore();
                }
            }
            pipe.query_async::<()>(&mut self.conn).await?;
        }
        redis::cmd("SET").arg(&keys.wm).arg(TS_BASE + n as i64).query_async::<()>(&mut self.conn).await?;
        let scripts = Scripts::new();
        scripts.load(&mut self.conn).await?;
        let start = Instant::now();
        let mut released = 0;
        loop {
            let (got, more) = scripts.release(&mut self.conn, &keys, WRITE_BATCH).await?;
            released += got as usize;
            self.progress.count("released", released, n);
            if !more {
                break;
            }
        }
        let elapsed = start.elapsed().as_secs_f64();
        let out_len: usize = redis::cmd("XLEN").arg(&keys.out).query_async(&mut self.conn).await?;
        if released != n || out_len != n {
            bail!("the release script released {released} and :out holds {out_len} (expected {n} each)");
        }
        Ok(BTreeMap::from([("elements_per_s", n as f64 / elapsed), ("seconds", elapsed)]))
    }

    /// Release: `n` scheduled elements, then one watermark above them all;
    /// from that watermark's `XADD` until all are in `:out`. Also measures
    /// Redis memory per scheduled element.
    async fn release(&mut self, n: usize, payload: Payload) -> Result<Figures> {
        let mut daemon = self.fresh_daemon(false).await?;
        let before = self.used_memory().await?;
        let pipes = add_pipelines(&self.keys.input, n, |k| TS_BASE + k as i64, payload);
        let last = write_all(self.conn.clone(), pipes, Arc::default()).await?;
        self.wait_applied(&mut daemon, n, last).await?;
        // Acknowledged input is garbage for this figure; drop it now rather
        // than wait for housekeeping.
        redis::cmd("XTRIM").arg(&self.keys.input).arg("MAXLEN").arg(0).query_async::<()>(&mut self.conn).await?;
        let after = self.used_memory().await?;
        let meter = self.meter(&daemon).await?;

        let start = Instant::now();
        self.add_watermark(TS_BASE + n as i64).await?;
        let end = self
            .wait("every element to be released", &mut daemon, move |b| {
                Box::pin(async move {
                    let out: usize = redis::cmd("XLEN").arg(&b.keys.out).query_async(&mut b.conn).await?;
                    b.progress.count("released", out, n);
                    Ok(out >= n)
                })
            })
            .await?;
        let elapsed = (end - start).as_secs_f64();
        let cpu = self.read_meter(meter, &daemon).await?;
        let left: usize = redis::cmd("ZCARD").arg(&self.keys.sched).query_async(&mut self.conn).await?;
        let out: usize = redis::cmd("XLEN").arg(&self.keys.out).query_async(&mut self.conn).await?;
        if left != 0 || out != n {
            bail!("after the release {left} elements are still scheduled and :out holds {out} (expected 0 and {n})");
        }
        let rss = self.stop(daemon)?;
        let mut figures = BTreeMap::from([
            ("elements_per_s", n as f64 / elapsed),
            ("seconds", elapsed),
            ("redis_bytes_per_element", (after as f64 - before as f64) / n as f64),
            ("daemon_peak_rss_mib", kib_to_mib(rss)),
        ]);
        figures.extend(cpu);
        Ok(figures)
    }

    /// End to end: `n` elements due at once, read by the library's consumer
    /// runtime (no-op handler, concurrency 50); from the watermark's `XADD`
    /// until every element is acknowledged. Latency is per element, from the
    /// watermark until its handler finished (the runtime acknowledges
    /// finished handlers within its 5 ms ack interval).
    async fn end_to_end(&mut self, n: usize, variant: E2e) -> Result<Figures> {
        let mut daemon = self.fresh_daemon(false).await?;
        let pipes = add_pipelines(&self.keys.input, n, |k| TS_BASE + k as i64, variant.payload);
        let last = write_all(self.conn.clone(), pipes, Arc::default()).await?;
        self.wait_applied(&mut daemon, n, last).await?;

        let recorder = Arc::new(Recorder::new(n));
        let handler_recorder = Arc::clone(&recorder);
        let consumer = ConsumerBuilder::new(self.redis.client()?, self.keys.clone(), GROUP)
            .consumer("bench-consumer")
            .concurrency(E2E_CONCURRENCY)
            .prefetch(variant.prefetch)
            .build(move |_element: Element| {
                let r = Arc::clone(&handler_recorder);
                async move {
                    r.record();
                    Ok::<(), Infallible>(())
                }
            })
            .context("build the consumer")?;
        let stop = CancellationToken::new();
        let mut task = tokio::spawn(consumer.run(stop.clone()));
        // The consumer sets its liveness lease right before its first read
        // (a blocked XREADGROUP does not show it in the group on Redis 7.0).
        let lease = self.keys.lease("out", GROUP, "bench-consumer");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if redis::cmd("EXISTS").arg(&lease).query_async::<bool>(&mut self.conn).await? {
                break;
            }
            if task.is_finished() {
                task.await.context("the consumer task failed")?.context("the consumer failed")?;
                bail!("the consumer stopped before reading");
            }
            if Instant::now() >= deadline {
                bail!("the consumer did not start within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let meter = self.meter(&daemon).await?;

        let start = Instant::now();
        let _ = recorder.start.set(start);
        self.add_watermark(TS_BASE + n as i64).await?;
        let handled = Arc::clone(&recorder);
        // When the last element reached :out (the rest is the consumer's).
        let released_at: Arc<OnceLock<Instant>> = Arc::new(OnceLock::new());
        let released = Arc::clone(&released_at);
        let end = self
            .wait("every element to be acknowledged", &mut daemon, move |b| {
                let handled = Arc::clone(&handled);
                let released = Arc::clone(&released);
                Box::pin(async move {
                    if released.get().is_none() {
                        let out: usize = redis::cmd("XLEN").arg(&b.keys.out).query_async(&mut b.conn).await?;
                        if out >= n {
                            let _ = released.set(Instant::now());
                        }
                    }
                    let done = handled.count.load(Ordering::Relaxed);
                    b.progress.count("handled", done, n);
                    if done < n {
                        return Ok(false);
                    }
                    let g = group_state(&mut b.conn, &b.keys.out, GROUP).await?;
                    let out: usize = redis::cmd("XLEN").arg(&b.keys.out).query_async(&mut b.conn).await?;
                    Ok(out >= n && g.is_some_and(|g| g.pending == 0 && g.last_delivered.ms > 0))
                })
            })
            .await?;
        let elapsed = (end - start).as_secs_f64();
        let cpu = self.read_meter(meter, &daemon).await?;
        stop.cancel();
        match tokio::time::timeout(Duration::from_secs(30), &mut task).await {
            Ok(joined) => joined.context("the consumer task failed")?.context("the consumer failed")?,
            Err(_) => {
                task.abort();
                bail!("the consumer did not stop within 30 s");
            }
        }
        let mut lat = recorder.latencies();
        if lat.len() != n {
            bail!("the handler ran {} times for {n} elements", lat.len());
        }
        let rss = self.stop(daemon)?;
        let mut figures = BTreeMap::from([
            ("elements_per_s", n as f64 / elapsed),
            ("seconds", elapsed),
            ("p50_ms", percentile(&mut lat, 50.0)),
            ("p99_ms", percentile(&mut lat, 99.0)),
            ("max_ms", percentile(&mut lat, 100.0)),
            ("all_released_ms", released_at.get().map_or(f64::NAN, |t| (*t - start).as_secs_f64() * 1000.0)),
            ("daemon_peak_rss_mib", kib_to_mib(rss)),
        ]);
        figures.extend(cpu);
        Ok(figures)
    }

    /// Single element: `rounds` times one add, then its watermark; latency
    /// from the watermark's `XADD` until a blocked `XREAD` on `:out` (its own
    /// connection) returns the element.
    async fn single(&mut self, rounds: usize) -> Result<Figures> {
        let mut daemon = self.fresh_daemon(false).await?;
        let mut reader = self.redis.conn().await?;
        let mut last_out = "0-0".to_owned();
        let mut lat = Vec::with_capacity(rounds);
        for i in 0..rounds {
            daemon.check_alive()?;
            let ts = TS_BASE + i as i64;
            let id = format!("s{i}");
            let _: String = redis::cmd("XADD")
                .arg(&self.keys.input)
                .arg("*")
                .arg("op")
                .arg("add")
                .arg("id")
                .arg(&id)
                .arg("ts")
                .arg(ts)
                .query_async(&mut self.conn)
                .await?;
            let read = async {
                let reply: Result<Value, redis::RedisError> = redis::cmd("XREAD")
                    .arg("COUNT")
                    .arg(1)
                    .arg("BLOCK")
                    .arg(10_000)
                    .arg("STREAMS")
                    .arg(&self.keys.out)
                    .arg(&last_out)
                    .query_async(&mut reader)
                    .await;
                (reply, Instant::now())
            };
            let mut writer = self.conn.clone();
            let start = Instant::now();
            let write = async {
                redis::cmd("XADD")
                    .arg(&self.keys.input)
                    .arg("*")
                    .arg("op")
                    .arg("watermark")
                    .arg("ts")
                    .arg(ts)
                    .query_async::<String>(&mut writer)
                    .await
            };
            let ((reply, seen), written) = tokio::join!(read, write);
            written?;
            let (entry, elem) = first_entry(reply?)?.ok_or_else(|| anyhow!("no release of {id} within 10 s"))?;
            if elem != id {
                bail!("expected {id} in :out, read {elem}");
            }
            lat.push((seen - start).as_secs_f64() * 1000.0);
            last_out = entry;
            if i % 50 == 0 {
                self.progress.count("rounds", i, rounds);
            }
        }
        let rss = self.stop(daemon)?;
        Ok(BTreeMap::from([
            ("p50_ms", percentile(&mut lat, 50.0)),
            ("p99_ms", percentile(&mut lat, 99.0)),
            ("max_ms", percentile(&mut lat, 100.0)),
            ("daemon_peak_rss_mib", kib_to_mib(rss)),
        ]))
    }

    /// Clock mode: `n` elements due evenly over `span` from one second after
    /// they are written, daemon with `--clock`; lateness of each release is
    /// its `:out` entry id's milliseconds minus its ts (both Redis's clock).
    async fn clock(&mut self, n: usize, span: Duration) -> Result<Figures> {
        let mut daemon = self.fresh_daemon(true).await?;
        let (secs, micros): (i64, i64) = redis::cmd("TIME").query_async(&mut self.conn).await?;
        let first_due = secs * 1000 + micros / 1000 + 1000;
        let span_ms = span.as_millis() as i64;
        let ts = move |k: usize| first_due + (k as i64 * span_ms) / n as i64;
        let pipes = add_pipelines(&self.keys.input, n, ts, Payload::None);
        write_all(self.conn.clone(), pipes, Arc::default()).await?;
        self.wait("every element to be released", &mut daemon, move |b| {
            Box::pin(async move {
                let out: usize = redis::cmd("XLEN").arg(&b.keys.out).query_async(&mut b.conn).await?;
                b.progress.count("released", out, n);
                Ok(out >= n)
            })
        })
        .await?;
        let mut lateness = Vec::with_capacity(n);
        let mut cursor = "-".to_owned();
        loop {
            let page: Value = redis::cmd("XRANGE")
                .arg(&self.keys.out)
                .arg(&cursor)
                .arg("+")
                .arg("COUNT")
                .arg(5000)
                .query_async(&mut self.conn)
                .await?;
            let entries = array(page)?;
            let Some(last_entry) = entries.last() else { break };
            let last_id = entry_parts(last_entry.clone())?.0;
            for entry in entries {
                let (id, fields) = entry_parts(entry)?;
                let ms = parse_id(&id)?.ms as i64;
                let ts: i64 = field(&fields, "ts")
                    .and_then(|t| t.parse().ok())
                    .ok_or_else(|| anyhow!(":out entry {id} has no integer ts"))?;
                if ms < ts {
                    bail!("element released early: :out entry {id} for ts {ts}");
                }
                lateness.push((ms - ts) as f64);
            }
            cursor = format!("({last_id}");
        }
        if lateness.len() != n {
            bail!(":out holds {} entries for {n} elements", lateness.len());
        }
        let rss = self.stop(daemon)?;
        Ok(BTreeMap::from([
            ("p50_ms", percentile(&mut lateness, 50.0)),
            ("p99_ms", percentile(&mut lateness, 99.0)),
            ("max_ms", percentile(&mut lateness, 100.0)),
            ("daemon_peak_rss_mib", kib_to_mib(rss)),
        ]))
    }

    /// Starts measuring CPU use (and, with `--profile`, command stats).
    async fn meter(&mut self, daemon: &Daemon) -> Result<Meter> {
        if self.profile {
            redis::cmd("CONFIG").arg("RESETSTAT").query_async::<()>(&mut self.conn).await?;
        }
        Ok(Meter { daemon: daemon.cpu_time(), redis: self.redis_cpu().await?, bench: process_cpu(std::process::id()) })
    }

    /// CPU seconds used since `start` by the daemon, Redis and this process
    /// (producer, pollers and, end to end, the consumer runtime).
    async fn read_meter(&mut self, start: Meter, daemon: &Daemon) -> Result<[(&'static str, f64); 3]> {
        let daemon_cpu = daemon.cpu_time().saturating_sub(start.daemon).as_secs_f64();
        let bench_cpu = process_cpu(std::process::id()).saturating_sub(start.bench).as_secs_f64();
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
        let _: String = redis::cmd("XADD")
            .arg(&self.keys.input)
            .arg("*")
            .arg("op")
            .arg("watermark")
            .arg("ts")
            .arg(ts)
            .query_async(&mut self.conn)
            .await?;
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

/// The handler's record of the end-to-end scenario.
struct Recorder {
    /// When the watermark was written.
    start: OnceLock<Instant>,
    /// Handlers finished.
    count: AtomicUsize,
    /// Per element: milliseconds from the watermark until its handler ran.
    latencies: Mutex<Vec<f64>>,
}

impl Recorder {
    fn new(n: usize) -> Recorder {
        Recorder { start: OnceLock::new(), count: AtomicUsize::new(0), latencies: Mutex::new(Vec::with_capacity(n)) }
    }

    fn record(&self) {
        let ms = self.start.get().map_or(0.0, |s| s.elapsed().as_secs_f64() * 1000.0);
        if let Ok(mut l) = self.latencies.lock() {
            l.push(ms);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn latencies(&self) -> Vec<f64> {
        self.latencies.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

/// Builds the `XADD`s of `n` adds, [`WRITE_BATCH`] per pipeline, so that
/// encoding is done before the clock starts.
fn add_pipelines(stream: &str, n: usize, ts: impl Fn(usize) -> i64, payload: Payload) -> Vec<(usize, redis::Pipeline)> {
    (0..n)
        .step_by(WRITE_BATCH)
        .map(|from| {
            let to = (from + WRITE_BATCH).min(n);
            let mut pipe = redis::pipe();
            for k in from..to {
                let cmd = pipe.cmd("XADD").arg(stream).arg("*");
                cmd.arg("op").arg("add").arg("id").arg(format!("e{k}")).arg("ts").arg(ts(k));
                if payload == Payload::TwoFields {
                    let (customer, amount) = payload_fields(k);
                    cmd.arg("customer").arg(customer).arg("amount").arg(amount);
                }
            }
            (to - from, pipe)
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
    let reply: Result<Value, redis::RedisError> = redis::cmd("XINFO").arg("GROUPS").arg(stream).query_async(conn).await;
    let reply = match reply {
        Ok(v) => v,
        Err(e) if e.to_string().contains("no such key") => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    for g in array(reply)? {
        let info = pairs(g)?;
        if info.get("name").and_then(text).as_deref() != Some(group) {
            continue;
        }
        let pending = match info.get("pending") {
            Some(Value::Int(i)) => *i as u64,
            other => bail!("XINFO GROUPS: unexpected pending {other:?}"),
        };
        let last = info.get("last-delivered-id").and_then(text).ok_or_else(|| anyhow!("XINFO GROUPS: no last id"))?;
        return Ok(Some(GroupState { pending, last_delivered: parse_id(&last)? }));
    }
    Ok(None)
}

fn array(v: Value) -> Result<Vec<Value>> {
    match v {
        Value::Array(a) | Value::Set(a) => Ok(a),
        Value::Nil => Ok(Vec::new()),
        other => bail!("expected an array, got {other:?}"),
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

/// A flat `[k, v, k, v, …]` array or a map, as a map with text keys.
fn pairs(v: Value) -> Result<BTreeMap<String, Value>> {
    let list: Vec<(Value, Value)> = match v {
        Value::Map(m) => m,
        other => {
            let mut out = Vec::new();
            let mut it = array(other)?.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                out.push((k, v));
            }
            out
        }
    };
    list.into_iter().map(|(k, v)| Ok((text(&k).ok_or_else(|| anyhow!("non-text key {k:?}"))?, v))).collect()
}

/// A stream entry `[id, [f, v, …]]` as its id and text fields.
fn entry_parts(v: Value) -> Result<(String, Vec<(String, String)>)> {
    let mut parts = array(v)?.into_iter();
    let id = parts.next().as_ref().and_then(text).ok_or_else(|| anyhow!("stream entry without id"))?;
    let mut fields = Vec::new();
    let mut it = array(parts.next().unwrap_or(Value::Nil))?.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        fields.push((text(&k).unwrap_or_default(), text(&v).unwrap_or_default()));
    }
    Ok((id, fields))
}

fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// The first entry of an `XREAD` reply: its id and element id.
fn first_entry(reply: Value) -> Result<Option<(String, String)>> {
    let streams = match reply {
        Value::Nil => return Ok(None),
        Value::Map(m) => m.into_iter().map(|(_, v)| v).collect(),
        other => array(other)?.into_iter().filter_map(|s| array(s).ok()?.into_iter().nth(1)).collect::<Vec<_>>(),
    };
    let Some(entries) = streams.into_iter().next() else { return Ok(None) };
    let Some(entry) = array(entries)?.into_iter().next() else { return Ok(None) };
    let (id, fields) = entry_parts(entry)?;
    let elem = field(&fields, "id").ok_or_else(|| anyhow!(":out entry {id} has no id field"))?.to_owned();
    Ok(Some((id, elem)))
}

fn parse_id(s: &str) -> Result<EntryId> {
    s.parse().map_err(|e| anyhow!("{e}"))
}

fn info_field<'a>(info: &'a str, key: &str) -> Option<&'a str> {
    info.lines().find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(':'))).map(str::trim)
}

// ---------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------

/// A private `redis-server` (no persistence) on a free port; killed on drop.
struct RedisServer {
    child: Child,
    port: u16,
    /// Its working directory (log file); removed after the process is gone.
    _dir: TempDir,
}

impl RedisServer {
    /// With `aof`, the append-only file is on with that `appendfsync`.
    fn start(aof: Option<&str>) -> Result<RedisServer> {
        let dir = tempfile::Builder::new().prefix("tidemark-bench-redis-").tempdir()?;
        for _attempt in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let mut child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""])
                .args(match aof {
                    None => vec!["--appendonly", "no"],
                    Some(policy) => vec!["--appendonly", "yes", "--appendfsync", policy],
                })
                .arg("--dir")
                .arg(dir.path())
                .args(["--logfile", "redis.log", "--daemonize", "no"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("cannot start redis-server (run `make ensure-redis`, or install Redis >= 6.2)")?;
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if child.try_wait()?.is_some() {
                    break; // most likely the port was taken meanwhile: try another
                }
                let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
                let pong = client
                    .get_connection_with_timeout(Duration::from_millis(200))
                    .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
                if pong.is_ok() {
                    return Ok(RedisServer { child, port, _dir: dir });
                }
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!("redis-server did not answer PING within 10 s");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let log = std::fs::read_to_string(dir.path().join("redis.log")).unwrap_or_default();
        bail!("redis-server would not start; log:\n{log}")
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn client(&self) -> Result<redis::Client> {
        Ok(redis::Client::open(self.url())?)
    }

    async fn conn(&self) -> Result<Conn> {
        let config = AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(60)));
        Ok(Conn::Single(self.client()?.get_multiplexed_async_connection_with_config(&config).await?))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU time used by all threads of process `pid` so far (from
/// `/proc/<pid>/task/*/schedstat`, nanoseconds on CPU).
fn process_cpu(pid: u32) -> Duration {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Duration::ZERO;
    };
    let ns: u64 = tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    Duration::from_nanos(ns)
}

/// A `tidemark run` child process; its output goes to a log file.
struct Daemon {
    child: Child,
    /// Holds `daemon.log`; also the working directory, so that no
    /// `config/tidemark.toml` of the caller is picked up.
    dir: TempDir,
}

impl Daemon {
    fn spawn(bin: &Path, url: &str, clock: bool) -> Result<Daemon> {
        let dir = tempfile::Builder::new().prefix("tidemark-bench-daemon-").tempdir()?;
        let log = File::create(dir.path().join("daemon.log"))?;
        let mut cmd = Command::new(bin);
        // The HTTP endpoint stays on, as in production, on a port of its own
        // (a daemon already serving the default port must not stop the bench).
        cmd.args([
            "--redis-url",
            url,
            "--namespace",
            NAMESPACE,
            "--http",
            "127.0.0.1:0",
            "run",
            "--consumer",
            DAEMON_CONSUMER,
            "--group",
            GROUP,
        ]);
        if clock {
            cmd.arg("--clock");
        }
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if k == "REDIS_URL" || k == "POD_NAME" || k.starts_with("TIDEMARK__") {
                cmd.env_remove(&key);
            }
        }
        cmd.current_dir(dir.path())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log));
        let child = cmd.spawn().with_context(|| format!("cannot start {}", bin.display()))?;
        Ok(Daemon { child, dir })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    fn check_alive(&mut self) -> Result<()> {
        match self.child.try_wait()? {
            Some(status) => bail!("the daemon exited ({status}); log:\n{}", self.log()),
            None => Ok(()),
        }
    }

    /// Peak resident set size so far (`VmHWM`), in KiB.
    fn peak_rss_kib(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        info_field(&status, "VmHWM")
            .and_then(|v| v.trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| anyhow!("no VmHWM in /proc/{}/status", self.child.id()))
    }

    /// CPU time used by all of the daemon's threads so far (from
    /// `/proc/<pid>/task/*/schedstat`, nanoseconds on CPU).
    fn cpu_time(&self) -> Duration {
        process_cpu(self.child.id())
    }

    /// SIGTERM, then waits for a clean exit. Returns the peak RSS in KiB.
    fn stop(mut self) -> Result<u64> {
        self.check_alive()?;
        let peak = self.peak_rss_kib()?;
        let status = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status()?;
        if !status.success() {
            bail!("kill -TERM {} failed", self.child.id());
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("the daemon exited with {status} after SIGTERM; log:\n{}", self.log());
                }
                return Ok(peak);
            }
            if Instant::now() >= deadline {
                bail!("the daemon did not stop within 20 s of SIGTERM; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------
// Reporting
// ---------------------------------------------------------------------------

/// Where the figures were measured.
#[derive(Debug, Clone)]
struct Machine {
    cpus: usize,
    cpu_model: String,
    redis_version: String,
    load_before: Option<[f64; 3]>,
    load_after: Option<[f64; 3]>,
}

impl Machine {
    fn probe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, m)| m.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        Machine {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model,
            redis_version: String::new(),
            load_before: load_average(),
            load_after: None,
        }
    }
}

fn load_average() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut it = text.split_whitespace().map(|v| v.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

/// Every run of every scenario that ran.
#[derive(Default)]
struct Results {
    ingest: Vec<(Payload, Vec<Figures>)>,
    /// Redis alone doing the release work (no daemon).
    ceiling_release: Vec<(Payload, Vec<Figures>)>,
    release: Vec<(Payload, Vec<Figures>)>,
    e2e: Vec<(E2e, Vec<Figures>)>,
    single: Option<Vec<Figures>>,
    clock: Option<Vec<Figures>>,
}

/// The median of `key` over the runs.
fn median(runs: &[Figures], key: &str) -> f64 {
    let mut v: Vec<f64> = runs.iter().filter_map(|r| r.get(key).copied()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn medians(runs: &[Figures]) -> Json {
    let keys: Vec<&str> = runs.first().map(|r| r.keys().copied().collect()).unwrap_or_default();
    let mut obj = serde_json::Map::new();
    for k in keys {
        obj.insert(k.to_owned(), round(median(runs, k)));
    }
    obj.insert("runs".into(), json!(runs));
    Json::Object(obj)
}

fn round(x: f64) -> Json {
    if !x.is_finite() {
        return Json::Null;
    }
    let digits = if x.abs() >= 100.0 { 0 } else { 3 };
    let p = 10f64.powi(digits);
    json!((x * p).round() / p)
}

impl Results {
    fn json(&self, opts: &Options, m: &Machine, peak_rss_kib: u64) -> Json {
        let mut o = serde_json::Map::new();
        o.insert(
            "machine".into(),
            json!({
                "cpus": m.cpus,
                "cpu_model": m.cpu_model,
                "redis_version": m.redis_version,
                "load_average_before": m.load_before,
                "load_average_after": m.load_after,
            }),
        );
        o.insert(
            "config".into(),
            json!({"n": opts.n, "runs": opts.runs, "single_rounds": opts.single_rounds, "clock_n": opts.clock_n,
                   "clock_span_s": opts.clock_span.as_secs_f64(), "e2e_concurrency": E2E_CONCURRENCY,
                   "smoke": opts.smoke, "statistic": "median of runs",
                   "redis_appendfsync": opts.aof.as_deref().unwrap_or("off (no persistence)")}),
        );
        let by_payload = |v: &[(Payload, Vec<Figures>)]| -> Json {
            Json::Object(v.iter().map(|(p, r)| (p.key().to_owned(), medians(r))).collect())
        };
        if !self.ingest.is_empty() {
            o.insert("ingest".into(), by_payload(&self.ingest));
        }
        if !self.ceiling_release.is_empty() {
            // Tidemark's release rate as a share of what Redis alone manages.
            let share: serde_json::Map<String, Json> = self
                .ceiling_release
                .iter()
                .filter_map(|(p, alone)| {
                    let (_, t) = self.release.iter().find(|(q, _)| q == p)?;
                    let ratio = median(t, "elements_per_s") / median(alone, "elements_per_s");
                    Some((p.key().to_owned(), round(ratio)))
                })
                .collect();
            o.insert(
                "redis_alone_release".into(),
                json!({"elements_per_s": by_payload(&self.ceiling_release), "tidemark_share": share}),
            );
        }
        if !self.release.is_empty() {
            let rel: serde_json::Map<String, Json> =
                self.release.iter().map(|(p, r)| (p.key().to_owned(), medians(r))).collect();
            o.insert("release".into(), Json::Object(rel));
            let mem: serde_json::Map<String, Json> = self
                .release
                .iter()
                .map(|(p, r)| (p.key().to_owned(), round(median(r, "redis_bytes_per_element"))))
                .collect();
            o.insert("redis_bytes_per_scheduled_element".into(), Json::Object(mem));
        }
        if !self.e2e.is_empty() {
            let e2e: serde_json::Map<String, Json> = self.e2e.iter().map(|(v, r)| (v.key(), medians(r))).collect();
            o.insert("end_to_end".into(), Json::Object(e2e));
        }
        if let Some(r) = &self.single {
            o.insert("single_element".into(), medians(r));
        }
        if let Some(r) = &self.clock {
            o.insert("clock_mode_lateness".into(), medians(r));
        }
        o.insert("daemon_peak_rss_mib".into(), round(kib_to_mib(peak_rss_kib)));
        let rows = self.rows(peak_rss_kib);
        let verdicts = |required: bool| -> serde_json::Map<String, Json> {
            rows.iter()
                .filter(|r| r.required() == required)
                .filter_map(|r| Some((r.key.to_owned(), json!(r.met?))))
                .collect()
        };
        o.insert("targets_met".into(), Json::Object(verdicts(true)));
        // The 2-field payload variants, compared with the same targets.
        o.insert("payload_variants_vs_targets".into(), Json::Object(verdicts(false)));
        Json::Object(o)
    }

    fn rows(&self, peak_rss_kib: u64) -> Vec<Row> {
        let mut rows = Vec::new();
        // The targets name no payload; the 2-field variants are
        // compared with the same targets, shown in parentheses.
        let want = |p: Payload, t: &str| if p == Payload::None { t.to_owned() } else { format!("({t})") };
        // How busy Redis was: near 100%, Redis is what limits the rate.
        let busy = |rows: &mut Vec<Row>, r: &[Figures]| {
            let share = median(r, "redis_cpu_seconds") / median(r, "seconds");
            if share.is_finite() {
                let measured = format!("{:.0}% of the time", 100.0 * share);
                rows.push(Row::new("redis_busy", "  Redis CPU busy", "", measured, None));
            }
        };
        for (p, r) in &self.ingest {
            let v = median(r, "elements_per_s");
            let key = if *p == Payload::None { "ingest" } else { "ingest_payload" };
            let met = Some(v >= target::INGEST_PER_S);
            rows.push(Row::new(key, &format!("ingest, {}", p.label()), &want(*p, "≥ 150k/s"), rate(v), met));
            busy(&mut rows, r);
        }
        for (p, r) in &self.release {
            let v = median(r, "elements_per_s");
            let met = Some(v >= target::RELEASE_PER_S);
            let key = if *p == Payload::None { "release" } else { "release_payload" };
            rows.push(Row::new(key, &format!("release, {}", p.label()), &want(*p, "≥ 500k/s"), rate(v), met));
            busy(&mut rows, r);
            // The same work by a minimal script on Redis alone.
            if let Some((_, c)) = self.ceiling_release.iter().find(|(q, _)| q == p) {
                let c = median(c, "elements_per_s");
                let measured = format!("{} (tidemark {:.0}%)", rate(c), 100.0 * v / c);
                rows.push(Row::new("redis_alone", "  Redis alone, same work", "", measured, None));
            }
        }
        for (variant, r) in &self.e2e {
            let v = median(r, "elements_per_s");
            let target = variant.is_target();
            let (key, key_p99) = match (variant.payload, variant.prefetch) {
                (Payload::None, 0) => ("e2e", "e2e_p99"),
                (Payload::TwoFields, 0) => ("e2e_payload", "e2e_payload_p99"),
                _ => ("e2e_prefetch", "e2e_prefetch_p99"),
            };
            let want = |t: &str| if target { t.to_owned() } else { format!("({t})") };
            let label = format!("end to end, {} (c = 50)", variant.label());
            rows.push(Row::new(key, &label, &want("≥ 100k/s"), rate(v), Some(v >= target::E2E_PER_S)));
            let (p50, p99) = (median(r, "p50_ms"), median(r, "p99_ms"));
            rows.push(Row::new(
                key_p99,
                "  watermark → handled, p50 / p99",
                &want("p99 ≤ 1 s"),
                format!("{} / {}", ms(p50), ms(p99)),
                Some(p99 <= target::E2E_P99_MS),
            ));
        }
        if let Some(r) = &self.single {
            let (p50, p99) = (median(r, "p50_ms"), median(r, "p99_ms"));
            rows.push(Row::new(
                "single_p99",
                "single element, p50 / p99",
                "p99 ≤ 2 ms",
                format!("{} / {}", ms(p50), ms(p99)),
                Some(p99 <= target::SINGLE_P99_MS),
            ));
        }
        if let Some(r) = &self.clock {
            let (p50, p99, max) = (median(r, "p50_ms"), median(r, "p99_ms"), median(r, "max_ms"));
            rows.push(Row::new(
                "clock_p99",
                "clock lateness, p50 / p99 / max",
                "p99 ≤ 10 ms",
                format!("{} / {} / {}", ms(p50), ms(p99), ms(max)),
                Some(p99 <= target::CLOCK_P99_MS),
            ));
        }
        let rss = kib_to_mib(peak_rss_kib);
        rows.push(Row::new(
            "rss",
            "daemon peak RSS",
            "≤ 30 MiB",
            format!("{rss:.1} MiB"),
            Some(rss <= target::RSS_MIB),
        ));
        for (p, r) in &self.release {
            let b = median(r, "redis_bytes_per_element");
            rows.push(Row::new(
                "memory",
                &format!("Redis memory / element, {}", p.label()),
                "",
                format!("{b:.0} B"),
                None,
            ));
        }
        rows
    }

    fn table(&self, opts: &Options, m: &Machine, peak_rss_kib: u64) -> String {
        let load = |l: Option<[f64; 3]>| l.map_or("?".into(), |l| format!("{:.2}", l[0]));
        let mut s = format!(
            "tidemark bench: {} × {}, Redis {} ({}), load {} → {}, N = {}, median of {} run(s)\n\n",
            m.cpus,
            m.cpu_model,
            m.redis_version,
            opts.aof.as_ref().map_or_else(|| "no persistence".to_owned(), |p| format!("AOF, appendfsync {p}")),
            load(m.load_before),
            load(m.load_after),
            opts.n,
            opts.runs
        );
        let rows = self.rows(peak_rss_kib);
        s.push_str(&format!("{:<48} {:<13} {:<28} {}\n", "scenario", "target", "measured", ""));
        for r in rows {
            let verdict = match (r.met, r.required()) {
                (Some(true), true) => "ok",
                (Some(false), true) => "MISSED",
                (Some(true), false) => "(ok)",
                (Some(false), false) => "(missed)",
                (None, _) => "",
            };
            s.push_str(&format!("{:<48} {:<13} {:<28} {}\n", r.label, r.target, r.measured, verdict));
        }
        s.push_str(
            "\nTargets in parentheses: the issue's targets are for the library's defaults without payload; other \
             variants are compared with them.\n",
        );
        s
    }
}

/// One line of the table.
struct Row {
    key: &'static str,
    label: String,
    target: String,
    measured: String,
    met: Option<bool>,
}

impl Row {
    /// A target of the issue (not a comparison, shown in parentheses).
    fn required(&self) -> bool {
        !self.target.starts_with('(')
    }

    fn new(key: &'static str, label: &str, target: &str, measured: String, met: Option<bool>) -> Row {
        Row { key, label: label.to_owned(), target: target.to_owned(), measured, met }
    }
}

fn rate(per_s: f64) -> String {
    format!("{:.0}k/s", per_s / 1000.0)
}

fn ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0} ms")
    } else {
        format!("{v:.2} ms")
    }
}

fn kib_to_mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The `p`th percentile (nearest rank) of `v`; sorts `v`.
fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn summary(f: &Figures) -> String {
    let mut parts = Vec::new();
    if let Some(v) = f.get("elements_per_s") {
        parts.push(rate(*v));
    }
    for (k, label) in [("p50_ms", "p50"), ("p99_ms", "p99"), ("max_ms", "max")] {
        if let Some(v) = f.get(k) {
            parts.push(format!("{label} {}", ms(*v)));
        }
    }
    if let Some(v) = f.get("redis_bytes_per_element") {
        parts.push(format!("{v:.0} B/element in Redis"));
    }
    parts.join(", ")
}

/// Progress on stderr: a live line on a terminal, one line per run
/// otherwise.
struct Progress {
    tty: bool,
    /// The current run's name and when it started.
    current: Mutex<(String, Instant)>,
}

impl Progress {
    fn new() -> Progress {
        Progress { tty: std::io::stderr().is_terminal(), current: Mutex::new((String::new(), Instant::now())) }
    }

    fn start(&self, name: &str) {
        if let Ok(mut c) = self.current.lock() {
            *c = (name.to_owned(), Instant::now());
        }
        if self.tty {
            self.update("");
        } else {
            eprintln!("bench: {name} …");
        }
    }

    fn update(&self, what: &str) {
        if !self.tty {
            return;
        }
        let name = self.current.lock().map(|c| c.0.clone()).unwrap_or_default();
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[K{name}: {what}");
        let _ = err.flush();
    }

    fn count(&self, label: &str, done: usize, total: usize) {
        if self.tty {
            self.update(&format!("{label} {done}/{total} ({:.0}%)", 100.0 * done as f64 / total.max(1) as f64));
        }
    }

    fn done(&self, summary: &str) {
        let (name, started) =
            self.current.lock().map(|c| c.clone()).unwrap_or_else(|_| (String::new(), Instant::now()));
        let took = started.elapsed().as_secs_f64();
        if self.tty {
            eprintln!("\r\x1b[K{name}: {summary} ({took:.1} s)");
        } else {
            eprintln!("bench: {name}: {summary} ({took:.1} s)");
        }
    }
}
