//! `make soak DURATION=30m`: a long run at a steady load, to see whether
//! memory stays flat.
//!
//! Against a private `redis-server` (no persistence, `noeviction`) it runs
//! the release build of `tidemark run` and a consumer in a process of its
//! own (this program again, with `--consumer`: the library's consumer
//! runtime with a no-op handler). It first measures the maximum end-to-end
//! rate (elements added, released and acknowledged per second), then
//! produces at half of it for the duration: every 100 ms a pipelined batch
//! of adds due one second later and a watermark at the current time, like
//! a clock. Every `--sample` it prints a row (and a JSON line on stdout):
//! the RSS of the daemon and of the consumer, Redis's `used_memory` and
//! RSS, the input lag, the schedule, the streams' lengths and how far the
//! consumer is behind. At the end it compares the first and the last third
//! of the samples.
//!
//! `cargo bench --bench soak -- --duration 30m [--rate N] [--sample 30s]`.
//! Started without `--bench` (by `cargo test --all-targets`) it makes a
//! short smoke run instead.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use tidemark::consume::{ConsumerBuilder, Element};
use tidemark::store::Keys;
use tokio_util::sync::CancellationToken;

const GROUP: &str = "soak";

struct Args {
    duration: Duration,
    rate: Option<u64>,
    sample: Duration,
    /// Elements of the calibration run.
    calibration: usize,
    consumer: Option<String>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        duration: Duration::from_secs(30 * 60),
        rate: None,
        sample: Duration::from_secs(30),
        calibration: 200_000,
        consumer: None,
    };
    let mut smoke = true;
    let (mut duration, mut sample) = (None, None);
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--duration" => duration = Some(humantime::parse_duration(&value()?)?),
            "--rate" => args.rate = Some(value()?.parse()?),
            "--sample" => sample = Some(humantime::parse_duration(&value()?)?),
            "--consumer" => args.consumer = Some(value()?),
            // `cargo bench` passes --bench; `cargo test` does not.
            "--bench" => smoke = false,
            // Other flags cargo's test runner may pass (e.g. --nocapture).
            s if s.starts_with("--") && smoke => {}
            other => bail!("unknown argument {other:?} (--duration D, --rate N, --sample D)"),
        }
    }
    if smoke && args.consumer.is_none() {
        (args.duration, args.sample, args.calibration) = (Duration::from_secs(6), Duration::from_secs(2), 5000);
    }
    args.duration = duration.unwrap_or(args.duration);
    args.sample = sample.unwrap_or(args.sample);
    Ok(args)
}

fn main() -> ExitCode {
    let result = parse_args().and_then(|args| {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        match args.consumer.clone() {
            Some(url) => rt.block_on(consume(url)),
            None => rt.block_on(soak(args)),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("soak: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The consumer process: no-op handler, runs until killed.
async fn consume(url: String) -> Result<()> {
    let client = redis::Client::open(url)?;
    let consumer = ConsumerBuilder::new(client, Keys::new("tidemark", "default"), GROUP)
        .consumer("soak-consumer")
        .concurrency(50)
        .prefetch(100)
        .build(|_e: Element| async { Ok::<(), std::convert::Infallible>(()) })?;
    consumer.run(CancellationToken::new()).await?;
    Ok(())
}

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn start_redis(dir: &Path) -> Result<(Proc, u16)> {
    let port = free_port()?;
    let child = Command::new(std::env::var_os("TIDEMARK_TEST_REDIS_SERVER").unwrap_or_else(|| "redis-server".into()))
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(["--maxmemory-policy", "noeviction", "--dir"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start redis-server")?;
    let proc = Proc(child);
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    for _ in 0..200 {
        if let Ok(mut c) = client.get_connection() {
            if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                return Ok((proc, port));
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("redis-server did not answer within 10 s")
}

/// Resident memory of `pid` in MiB (VmRSS).
fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("VmRSS:")).map(|v| v.trim().trim_end_matches("kB").trim().to_owned())
        })
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// The group's (entries read, pending, lag) on `stream`.
async fn group_state(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
    group: &str,
) -> Result<(u64, u64, u64)> {
    let groups: Vec<BTreeMap<String, redis::Value>> =
        redis::cmd("XINFO").arg("GROUPS").arg(stream).query_async(conn).await.unwrap_or_default();
    let Some(g) = groups
        .into_iter()
        .find(|g| matches!(g.get("name"), Some(redis::Value::BulkString(n)) if n == group.as_bytes()))
    else {
        return Ok((0, 0, 0));
    };
    let int = |k: &str| match g.get(k) {
        Some(redis::Value::Int(n)) => *n as u64,
        _ => 0,
    };
    Ok((int("entries-read"), int("pending"), int("lag")))
}

async fn info_field(conn: &mut redis::aio::MultiplexedConnection, field: &str) -> Result<u64> {
    let info: String = redis::cmd("INFO").arg("memory").query_async(conn).await?;
    Ok(info
        .lines()
        .find_map(|l| l.strip_prefix(field).and_then(|v| v.strip_prefix(':')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0))
}

/// Adds `n` elements at `ts` (pipelined, 1,000 per round trip) starting
/// at number `from`.
async fn add(conn: &mut redis::aio::MultiplexedConnection, keys: &Keys, from: u64, n: u64, ts: i64) -> Result<()> {
    let mut i = from;
    while i < from + n {
        let end = (i + 1000).min(from + n);
        let mut pipe = redis::pipe();
        for k in i..end {
            pipe.cmd("XADD")
                .arg(&keys.input)
                .arg("*")
                .arg("op")
                .arg("add")
                .arg("id")
                .arg(format!("e{k}"))
                .arg("ts")
                .arg(ts)
                .ignore();
        }
        pipe.query_async::<()>(conn).await?;
        i = end;
    }
    Ok(())
}

async fn watermark(conn: &mut redis::aio::MultiplexedConnection, keys: &Keys, ts: i64) -> Result<()> {
    redis::cmd("XADD")
        .arg(&keys.input)
        .arg("*")
        .arg("op")
        .arg("watermark")
        .arg("ts")
        .arg(ts)
        .query_async::<String>(conn)
        .await?;
    Ok(())
}

async fn soak(args: Args) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (_redis, port) = start_redis(dir.path())?;
    let url = format!("redis://127.0.0.1:{port}");
    let keys = Keys::new("tidemark", "default");
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_tidemark"));
    let log = std::fs::File::create(dir.path().join("daemon.log"))?;
    let daemon = Proc(
        Command::new(&bin)
            .args(["run", "--redis-url", &url, "--consumer", "soak-daemon", "--group", GROUP, "--http", "off"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .context("start tidemark run")?,
    );
    let consumer = Proc(
        Command::new(std::env::current_exe()?)
            .args(["--consumer", &url])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .context("start the consumer")?,
    );
    let client = redis::Client::open(url.as_str())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Calibration: CALIBRATION elements added, released and acknowledged.
    let rate = match args.rate {
        Some(r) => r,
        None => {
            let calibration = args.calibration;
            eprintln!("soak: calibrating with {calibration} elements end to end");
            let ts = now_ms() - 1_000_000;
            let start = Instant::now();
            add(&mut conn, &keys, 0, calibration as u64, ts).await?;
            watermark(&mut conn, &keys, ts).await?;
            loop {
                let (read, pending, _) = group_state(&mut conn, &keys.out, GROUP).await?;
                if read >= calibration as u64 && pending == 0 {
                    break;
                }
                if start.elapsed() > Duration::from_secs(600) {
                    bail!("calibration did not finish within 10 min");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let max = calibration as f64 / start.elapsed().as_secs_f64();
            eprintln!("soak: maximum end-to-end rate {max:.0} elements/s; producing at half of it");
            (max / 2.0) as u64
        }
    };

    let produced = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let producer = {
        let (mut conn, keys, produced, stop) = (conn.clone(), keys.clone(), produced.clone(), stop.clone());
        let first = args.calibration as u64;
        tokio::spawn(async move {
            let per_tick = (rate / 10).max(1);
            let mut next = first;
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            while !stop.is_cancelled() {
                tick.tick().await;
                let now = now_ms();
                add(&mut conn, &keys, next, per_tick, now + 1000).await?;
                watermark(&mut conn, &keys, now).await?;
                next += per_tick;
                produced.fetch_add(per_tick, Ordering::Relaxed);
            }
            Ok::<(), anyhow::Error>(())
        })
    };

    eprintln!("soak: {rate} elements/s for {}", humantime::format_duration(args.duration));
    eprintln!(
        "{:>8} {:>11} {:>10} {:>12} {:>12} {:>12} {:>10} {:>10} {:>9} {:>9} {:>10}",
        "t",
        "produced",
        "daemon",
        "consumer",
        "redis used",
        "redis rss",
        "input lag",
        "scheduled",
        ":in",
        ":out",
        "behind"
    );
    let started = Instant::now();
    let baseline = if args.rate.is_some() { 0 } else { args.calibration as u64 };
    let mut samples: Vec<BTreeMap<&str, f64>> = Vec::new();
    loop {
        tokio::time::sleep(args.sample).await;
        if producer.is_finished() {
            producer.await??;
            bail!("the producer stopped");
        }
        let (read, pending, _) = group_state(&mut conn, &keys.out, GROUP).await?;
        let (_, _, input_lag) = group_state(&mut conn, &keys.input, "tidemark").await?;
        let scheduled: u64 = redis::cmd("ZCARD").arg(&keys.sched).query_async(&mut conn).await?;
        let in_len: u64 = redis::cmd("XLEN").arg(&keys.input).query_async(&mut conn).await?;
        let out_len: u64 = redis::cmd("XLEN").arg(&keys.out).query_async(&mut conn).await?;
        let produced = produced.load(Ordering::Relaxed);
        let handled = read.saturating_sub(pending).saturating_sub(baseline);
        let s = BTreeMap::from([
            ("t_s", started.elapsed().as_secs_f64()),
            ("produced", produced as f64),
            ("daemon_rss_mib", rss_mib(daemon.0.id())),
            ("consumer_rss_mib", rss_mib(consumer.0.id())),
            ("redis_used_mib", info_field(&mut conn, "used_memory").await? as f64 / 1048576.0),
            ("redis_rss_mib", info_field(&mut conn, "used_memory_rss").await? as f64 / 1048576.0),
            ("input_lag", input_lag as f64),
            ("scheduled", scheduled as f64),
            ("in_len", in_len as f64),
            ("out_len", out_len as f64),
            ("behind", produced.saturating_sub(handled) as f64),
        ]);
        eprintln!(
            "{:>7.0}s {:>11} {:>6.1} MiB {:>8.1} MiB {:>8.1} MiB {:>8.1} MiB {:>10} {:>10} {:>9} {:>9} {:>10}",
            s["t_s"],
            produced,
            s["daemon_rss_mib"],
            s["consumer_rss_mib"],
            s["redis_used_mib"],
            s["redis_rss_mib"],
            input_lag,
            scheduled,
            in_len,
            out_len,
            s["behind"]
        );
        println!("{}", serde_json::to_string(&s)?);
        samples.push(s);
        if started.elapsed() >= args.duration {
            break;
        }
    }
    stop.cancel();
    let _ = producer.await;

    let third = (samples.len() / 3).max(1);
    let mean = |rows: &[BTreeMap<&str, f64>], k: &str| rows.iter().map(|r| r[k]).sum::<f64>() / rows.len() as f64;
    eprintln!("soak: {} samples; first third vs last third (means):", samples.len());
    for k in ["daemon_rss_mib", "consumer_rss_mib", "redis_used_mib", "redis_rss_mib", "behind"] {
        let (a, b) = (mean(&samples[..third], k), mean(&samples[samples.len() - third..], k));
        eprintln!("  {k:<18} {a:>10.1} -> {b:>10.1}  ({:+.1}%)", if a > 0.0 { (b - a) / a * 100.0 } else { 0.0 });
    }
    Ok(())
}
