//! The report: medians of the runs as JSON (stdout) and as a table with
//! the targets (stderr), and progress on stderr while running.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write as _};
use std::sync::Mutex;
use std::time::Instant;

use serde_json::{json, Value as Json};

use crate::scaleout::{Phase, ScaleConfig, ScaleOut, MANY_DAEMONS};
use crate::{target, E2e, Figures, Options, Payload, E2E_CONCURRENCY};

/// Where the figures were measured.
#[derive(Debug, Clone)]
pub(crate) struct Machine {
    pub(crate) cpus: usize,
    pub(crate) cpu_model: String,
    pub(crate) redis_version: String,
    pub(crate) load_before: Option<[f64; 3]>,
    pub(crate) load_after: Option<[f64; 3]>,
}

impl Machine {
    pub(crate) fn probe() -> Machine {
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

pub(crate) fn load_average() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut it = text.split_whitespace().map(|v| v.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

/// Every run of every scenario that ran.
#[derive(Default)]
pub(crate) struct Results {
    pub(crate) ingest: Vec<(Payload, Vec<Figures>)>,
    /// The reference script doing the release work (no daemon).
    pub(crate) ceiling_release: Vec<(Payload, Vec<Figures>)>,
    pub(crate) release: Vec<(Payload, Vec<Figures>)>,
    pub(crate) e2e: Vec<(E2e, Vec<Figures>)>,
    pub(crate) single: Option<Vec<Figures>>,
    /// `--baseline`: the ingest runs of the other build.
    pub(crate) baseline_ingest: Vec<(Payload, Vec<Figures>)>,
    /// `--baseline`: the release runs of the other build.
    pub(crate) baseline_release: Vec<(Payload, Vec<Figures>)>,
    /// `--baseline`: the end-to-end runs of the other build.
    pub(crate) baseline_e2e: Vec<(E2e, Vec<Figures>)>,
    pub(crate) clock: Option<Vec<Figures>>,
    /// The scale-out section.
    pub(crate) scaleout: Option<ScaleOut>,
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
    pub(crate) fn json(&self, opts: &Options, m: &Machine, peak_rss_kib: u64) -> Json {
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
            // Tidemark's release rate as a share of the reference script's.
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
        if let Some(bin) = &opts.baseline {
            let e2e: serde_json::Map<String, Json> =
                self.baseline_e2e.iter().map(|(v, r)| (v.key(), medians(r))).collect();
            // This build's rate over the baseline's, run by run (median).
            let ratio = |this: &[(Payload, Vec<Figures>)], base: &[(Payload, Vec<Figures>)]| -> Json {
                Json::Object(
                    base.iter()
                        .filter_map(|(p, b)| {
                            let (_, t) = this.iter().find(|(q, _)| q == p)?;
                            Some((p.key().to_owned(), round(paired(t, b))))
                        })
                        .collect(),
                )
            };
            let e2e_ratio: serde_json::Map<String, Json> = self
                .baseline_e2e
                .iter()
                .filter_map(|(v, b)| {
                    let (_, t) = self.e2e.iter().find(|(w, _)| w == v)?;
                    Some((v.key(), round(paired(t, b))))
                })
                .collect();
            o.insert(
                "baseline".into(),
                json!({"bin": bin.display().to_string(), "ingest": by_payload(&self.baseline_ingest),
                       "release": by_payload(&self.baseline_release), "end_to_end": e2e,
                       "this_build_over_baseline": {"ingest": ratio(&self.ingest, &self.baseline_ingest),
                           "release": ratio(&self.release, &self.baseline_release), "end_to_end": e2e_ratio,
                           "statistic": "median over the rounds of the ratio within a round"}}),
            );
        }
        if let Some(r) = &self.single {
            o.insert("single_element".into(), medians(r));
        }
        if let Some(r) = &self.clock {
            o.insert("clock_mode_lateness".into(), medians(r));
        }
        if let Some(s) = &self.scaleout {
            o.insert("scale_out".into(), s.json());
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
        // The issue's targets name no payload; the 2-field variants are
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
            if let Some((_, b)) = self.baseline_ingest.iter().find(|(q, _)| q == p) {
                rows.push(baseline_row(r, b));
            }
        }
        for (p, r) in &self.release {
            let v = median(r, "elements_per_s");
            let met = Some(v >= target::RELEASE_PER_S);
            let key = if *p == Payload::None { "release" } else { "release_payload" };
            rows.push(Row::new(key, &format!("release, {}", p.label()), &want(*p, "≥ 500k/s"), rate(v), met));
            busy(&mut rows, r);
            if let Some((_, b)) = self.baseline_release.iter().find(|(q, _)| q == p) {
                rows.push(baseline_row(r, b));
            }
            // The same work by the reference script alone (no daemon).
            if let Some((_, c)) = self.ceiling_release.iter().find(|(q, _)| q == p) {
                let cv = median(c, "elements_per_s");
                let measured = format!("{} (tidemark {:.0}%)", rate(cv), 100.0 * v / cv);
                rows.push(Row::new("redis_alone", "  reference script alone, same work", "", measured, None));
                // Redis's CPU per element: what the scripts cost, whatever
                // else the machine is doing.
                let (t, c) = (redis_us_per_element(r), redis_us_per_element(c));
                let measured = format!("{t:.2} µs vs {c:.2} µs ({:.0}%)", 100.0 * c / t);
                rows.push(Row::new("redis_cpu", "  Redis CPU / element, tidemark vs reference", "", measured, None));
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
            if let Some((_, b)) = self.baseline_e2e.iter().find(|(w, _)| w == variant) {
                let (bv, bp99) = (median(b, "elements_per_s"), median(b, "p99_ms"));
                let change = 100.0 * (paired(r, b) - 1.0);
                let measured = format!("{}, p99 {} (this build {change:+.0}%)", rate(bv), ms(bp99));
                rows.push(Row::new("baseline", "  baseline build (--baseline)", "", measured, None));
            }
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
        if let Some(s) = &self.scaleout {
            s.rows(&mut rows);
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

    pub(crate) fn table(&self, opts: &Options, m: &Machine, peak_rss_kib: u64) -> String {
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

/// The median over the runs of `a`'s rate over `b`'s in the same round:
/// runs that take turns compare the same minutes of a machine whose
/// speed drifts, where a ratio of medians could pair a fast minute with a
/// slow one.
fn paired(a: &[Figures], b: &[Figures]) -> f64 {
    let per: Vec<Figures> = a
        .iter()
        .zip(b)
        .filter_map(|(a, b)| Some(BTreeMap::from([("r", a.get("elements_per_s")? / b.get("elements_per_s")?)])))
        .collect();
    median(&per, "r")
}

/// The `--baseline` build's line under a throughput row: its rate, this
/// build's change (run by run), and Redis's CPU per element for both
/// (which the machine's drift moves less).
fn baseline_row(this: &[Figures], base: &[Figures]) -> Row {
    let measured = format!(
        "{} (this build {:+.0}%; Redis {:.2} vs {:.2} µs/element)",
        rate(median(base, "elements_per_s")),
        100.0 * (paired(this, base) - 1.0),
        redis_us_per_element(this),
        redis_us_per_element(base),
    );
    Row::new("baseline", "  baseline build (--baseline)", "", measured, None)
}

/// One line of the table.
pub(crate) struct Row {
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

    pub(crate) fn new(key: &'static str, label: &str, target: &str, measured: String, met: Option<bool>) -> Row {
        Row { key, label: label.to_owned(), target: target.to_owned(), measured, met }
    }
}

pub(crate) fn rate(per_s: f64) -> String {
    format!("{:.0}k/s", per_s / 1000.0)
}

fn ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0} ms")
    } else {
        format!("{v:.2} ms")
    }
}

pub(crate) fn kib_to_mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The `p`th percentile (nearest rank) of `v`; sorts `v`.
pub(crate) fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// Redis's CPU time per released element over the runs (median), in µs.
fn redis_us_per_element(runs: &[Figures]) -> f64 {
    let per: Vec<Figures> = runs
        .iter()
        .map(|r| {
            let n =
                r.get("elements_per_s").copied().unwrap_or(f64::NAN) * r.get("seconds").copied().unwrap_or(f64::NAN);
            BTreeMap::from([("us", 1e6 * r.get("redis_cpu_seconds").copied().unwrap_or(f64::NAN) / n)])
        })
        .collect();
    median(&per, "us")
}

/// A latency scenario's figures: p50, p99 and max of `ms`, and the
/// daemon's peak RSS.
pub(crate) fn latency_figures(ms: &mut [f64], rss_kib: u64) -> Figures {
    BTreeMap::from([
        ("p50_ms", percentile(ms, 50.0)),
        ("p99_ms", percentile(ms, 99.0)),
        ("max_ms", percentile(ms, 100.0)),
        ("daemon_peak_rss_mib", kib_to_mib(rss_kib)),
    ])
}

pub(crate) fn summary(f: &Figures) -> String {
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
pub(crate) struct Progress {
    tty: bool,
    /// The current run's name and when it started.
    current: Mutex<(String, Instant)>,
}

impl Progress {
    pub(crate) fn new() -> Progress {
        Progress { tty: std::io::stderr().is_terminal(), current: Mutex::new((String::new(), Instant::now())) }
    }

    pub(crate) fn start(&self, name: &str) {
        if let Ok(mut c) = self.current.lock() {
            *c = (name.to_owned(), Instant::now());
        }
        if self.tty {
            self.update("");
        } else {
            eprintln!("bench: {name} …");
        }
    }

    pub(crate) fn update(&self, what: &str) {
        if !self.tty {
            return;
        }
        let name = self.current.lock().map(|c| c.0.clone()).unwrap_or_default();
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[K{name}: {what}");
        let _ = err.flush();
    }

    pub(crate) fn count(&self, label: &str, done: usize, total: usize) {
        if self.tty {
            self.update(&format!("{label} {done}/{total} ({:.0}%)", 100.0 * done as f64 / total.max(1) as f64));
        }
    }

    pub(crate) fn done(&self, summary: &str) {
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

// ---------------------------------------------------------------------------
// Scale-out
// ---------------------------------------------------------------------------

/// The median over the runs of one figure of each shard.
fn shard_medians(runs: &[Phase], key: &str) -> Vec<f64> {
    let shards = runs.first().map_or(0, |r| r.shards.len());
    (0..shards)
        .map(|i| {
            let per: Vec<Figures> = runs.iter().filter_map(|r| r.shards.get(i).cloned()).collect();
            median(&per, key)
        })
        .collect()
}

/// The median over the runs of `a`'s rate over `b`'s in the same round
/// (the configurations take turns, so each ratio compares the same
/// minutes).
fn paired_ratio(a: &[Phase], b: &[Phase]) -> f64 {
    let figures = |runs: &[Phase]| runs.iter().map(|r| r.figures.clone()).collect::<Vec<_>>();
    paired(&figures(a), &figures(b))
}

fn phase_figures(runs: &[Phase]) -> Json {
    let figures: Vec<Figures> = runs.iter().map(|r| r.figures.clone()).collect();
    let mut o = match medians(&figures) {
        Json::Object(o) => o,
        _ => unreachable!("medians() gives an object"),
    };
    o.remove("runs");
    let shards = runs.first().map_or(0, |r| r.shards.len());
    let per_shard: Vec<Json> = (0..shards)
        .map(|i| {
            let per: Vec<Figures> = runs.iter().filter_map(|r| r.shards.get(i).cloned()).collect();
            let mut m = match medians(&per) {
                Json::Object(m) => m,
                _ => unreachable!("medians() gives an object"),
            };
            m.remove("runs");
            Json::Object(m)
        })
        .collect();
    o.insert("shards".into(), json!(per_shard));
    let all: Vec<Json> = runs.iter().map(|r| json!({"figures": r.figures, "shards": r.shards})).collect();
    o.insert("runs".into(), json!(all));
    Json::Object(o)
}

/// `4.81` or `5.02 / 4.95 / 5.10`.
fn per_shard_text(v: &[f64], f: impl Fn(f64) -> String) -> String {
    v.iter().map(|x| f(*x)).collect::<Vec<_>>().join(" / ")
}

impl ScaleOut {
    fn config(&self, deployment: usize, daemons: usize) -> Option<&ScaleConfig> {
        self.configs.iter().find(|c| c.deployment == deployment && c.daemons == daemons)
    }

    fn config_key(&self, c: &ScaleConfig) -> String {
        let s = if c.daemons == 1 { "" } else { "s" };
        format!("{}_{}_daemon{s}", self.deployments[c.deployment].key, c.daemons)
    }

    /// The ratios the targets are about, by name: cluster over standalone
    /// (same daemons), and several daemons over one (same deployment).
    fn ratios(&self) -> Vec<(String, f64)> {
        let mut out = Vec::new();
        for (phase, runs) in [("ingest", Self::ingest as fn(&ScaleConfig) -> &[Phase]), ("release", Self::release)] {
            for daemons in [1, MANY_DAEMONS] {
                if let (Some(s), Some(c)) = (self.config(0, daemons), self.config(1, daemons)) {
                    let suffix = if daemons == 1 { "" } else { "s" };
                    let key = format!("{phase}_cluster_vs_standalone_{daemons}_daemon{suffix}");
                    out.push((key, paired_ratio(runs(c), runs(s))));
                }
            }
            for (d, info) in self.deployments.iter().enumerate() {
                if let (Some(one), Some(many)) = (self.config(d, 1), self.config(d, MANY_DAEMONS)) {
                    out.push((
                        format!("{phase}_{MANY_DAEMONS}_vs_1_daemons_{}", info.key),
                        paired_ratio(runs(many), runs(one)),
                    ));
                }
            }
        }
        if let [s, c] = &self.reference[..] {
            out.push(("reference_release_cluster_vs_standalone".into(), paired_ratio(c, s)));
        }
        // tidemark's release as a share of the reference script's, on each.
        for ((info, reference), d) in self.deployments.iter().zip(&self.reference).zip(0..) {
            if let Some(c) = self.config(d, 1) {
                out.push((format!("release_1_daemon_vs_reference_{}", info.key), paired_ratio(&c.release, reference)));
            }
        }
        out
    }

    fn ingest(c: &ScaleConfig) -> &[Phase] {
        &c.ingest
    }

    fn release(c: &ScaleConfig) -> &[Phase] {
        &c.release
    }

    fn ratio(&self, key: &str) -> f64 {
        self.ratios().into_iter().find(|(k, _)| k == key).map_or(f64::NAN, |(_, r)| r)
    }

    pub(crate) fn json(&self) -> Json {
        let deployments: serde_json::Map<String, Json> = self
            .deployments
            .iter()
            .map(|d| {
                (
                    d.key.to_owned(),
                    json!({"namespace": d.namespace, "partitions": d.partitions, "shards": d.partitions_per_shard.len(),
                           "partitions_per_shard": d.partitions_per_shard}),
                )
            })
            .collect();
        let phase = |runs: fn(&ScaleConfig) -> &[Phase]| -> Json {
            Json::Object(self.configs.iter().map(|c| (self.config_key(c), phase_figures(runs(c)))).collect())
        };
        let reference: serde_json::Map<String, Json> = self
            .deployments
            .iter()
            .zip(&self.reference)
            .map(|(d, runs)| (d.key.to_owned(), phase_figures(runs)))
            .collect();
        let ratios: serde_json::Map<String, Json> = self.ratios().into_iter().map(|(k, r)| (k, round(r))).collect();
        json!({
            "payload": "none",
            "deployments": deployments,
            "ingest": phase(Self::ingest),
            "release": phase(Self::release),
            "reference_release": reference,
            "ratios": ratios,
            "ratio_statistic": "median over the rounds of the ratio within a round (configurations take turns)",
            "shard_cpu": "each redis-server's CPU time (all threads, /proc/<pid>/task/*/schedstat) over the timed phase",
        })
    }

    pub(crate) fn rows(&self, rows: &mut Vec<Row>) {
        let (Some(s), Some(c)) = (self.deployments.first(), self.deployments.get(1)) else { return };
        let per = c.partitions_per_shard.first().copied().unwrap_or(0);
        rows.push(Row::new(
            "scaleout",
            &format!(
                "scale-out, no payload: standalone P = {} vs cluster of {} masters, P = {} ({per} per master)",
                s.partitions,
                c.partitions_per_shard.len(),
                c.partitions
            ),
            "",
            String::new(),
            None,
        ));
        let many = MANY_DAEMONS;
        for (phase, runs, target) in [
            ("ingest", Self::ingest as fn(&ScaleConfig) -> &[Phase], target::SCALE_INGEST),
            ("release", Self::release, target::SCALE_RELEASE),
        ] {
            let (Some(s1), Some(c1)) = (self.config(0, 1), self.config(1, 1)) else { continue };
            let eps = |c: &ScaleConfig| {
                median(&runs(c).iter().map(|r| r.figures.clone()).collect::<Vec<_>>(), "elements_per_s")
            };
            rows.push(Row::new(
                "scaleout_info",
                &format!("{phase}, standalone P = {}, 1 daemon", s.partitions),
                "",
                rate(eps(s1)),
                None,
            ));
            if let Some(s3) = self.config(0, many) {
                let r = self.ratio(&format!("{phase}_{many}_vs_1_daemons_standalone"));
                rows.push(Row::new(
                    if phase == "ingest" {
                        "scaleout_ingest_3_daemons_standalone"
                    } else {
                        "scaleout_release_3_daemons_standalone"
                    },
                    &format!("  {many} daemons (one owner, the others standing by)"),
                    &format!("≥ {:.1}× 1", target::SCALE_DAEMONS),
                    format!("{} ({r:.2}×)", rate(eps(s3))),
                    Some(r >= target::SCALE_DAEMONS),
                ));
            }
            let r = self.ratio(&format!("{phase}_cluster_vs_standalone_1_daemon"));
            rows.push(Row::new(
                if phase == "ingest" { "scaleout_ingest" } else { "scaleout_release" },
                &format!("{phase}, cluster P = {}, 1 daemon", c.partitions),
                &format!("≥ {target:.1}× stand."),
                format!("{} ({r:.2}×)", rate(eps(c1))),
                Some(r >= target),
            ));
            if let Some(c3) = self.config(1, many) {
                let r = self.ratio(&format!("{phase}_{many}_vs_1_daemons_cluster"));
                let vs = self.ratio(&format!("{phase}_cluster_vs_standalone_{many}_daemons"));
                rows.push(Row::new(
                    if phase == "ingest" {
                        "scaleout_ingest_3_daemons_cluster"
                    } else {
                        "scaleout_release_3_daemons_cluster"
                    },
                    &format!("  {many} daemons ({} partitions each)", c.partitions as usize / many),
                    &format!("≥ {:.1}× 1", target::SCALE_DAEMONS),
                    format!("{} ({r:.2}×; {vs:.2}× standalone, {many} daemons)", rate(eps(c3))),
                    Some(r >= target::SCALE_DAEMONS),
                ));
            }
            shard_rows(rows, runs(s1), runs(c1));
        }
        if let [sr, cr] = &self.reference[..] {
            let eps =
                |runs: &[Phase]| median(&runs.iter().map(|r| r.figures.clone()).collect::<Vec<_>>(), "elements_per_s");
            let r = self.ratio("reference_release_cluster_vs_standalone");
            rows.push(Row::new(
                "scaleout_info",
                "reference script release, standalone → cluster",
                "",
                format!("{} → {} ({r:.2}×)", rate(eps(sr)), rate(eps(cr))),
                None,
            ));
            let (ts, tc) = (
                self.ratio("release_1_daemon_vs_reference_standalone"),
                self.ratio("release_1_daemon_vs_reference_cluster"),
            );
            rows.push(Row::new(
                "scaleout_info",
                "  tidemark's release (1 daemon) of it: s. | c.",
                "",
                format!("{:.0}% | {:.0}%", 100.0 * ts, 100.0 * tc),
                None,
            ));
            shard_rows(rows, sr, cr);
        }
    }
}

/// Redis CPU per element and how busy each shard was, and how much of
/// the machine was in use, standalone against the cluster.
fn shard_rows(rows: &mut Vec<Row>, standalone: &[Phase], cluster: &[Phase]) {
    let us = |runs: &[Phase]| per_shard_text(&shard_medians(runs, "redis_us_per_element"), |x| format!("{x:.2}"));
    let busy = |runs: &[Phase]| per_shard_text(&shard_medians(runs, "redis_busy"), |x| format!("{:.0}%", 100.0 * x));
    let machine = |runs: &[Phase]| {
        let figures: Vec<Figures> = runs.iter().map(|r| r.figures.clone()).collect();
        let all = median(&figures, "cpu_share_all");
        let all = if all.is_finite() { format!(" ({:.0}%)", 100.0 * all) } else { String::new() };
        format!("{:.0}%{all}", 100.0 * median(&figures, "cpu_share_ours"))
    };
    rows.push(Row::new(
        "scaleout_info",
        "  Redis CPU µs/element per shard: stand. | cluster",
        "",
        format!("{} | {}", us(standalone), us(cluster)),
        None,
    ));
    rows.push(Row::new(
        "scaleout_info",
        "  Redis busy per shard: standalone | cluster",
        "",
        format!("{} | {}", busy(standalone), busy(cluster)),
        None,
    ));
    rows.push(Row::new(
        "scaleout_info",
        "  cores used by the bench's processes (by all)",
        "",
        format!("{} | {}", machine(standalone), machine(cluster)),
        None,
    ));
    // With a core for each shard, Redis-bound: n over the busiest shard's CPU.
    let bound = |runs: &[Phase]| {
        median(&runs.iter().map(|r| r.figures.clone()).collect::<Vec<_>>(), "redis_bound_elements_per_s")
    };
    let (b_s, b_c) = (bound(standalone), bound(cluster));
    rows.push(Row::new(
        "scaleout_info",
        "  Redis-bound rate, a core per shard: s. | c.",
        "",
        format!("{} | {} ({:.2}×)", rate(b_s), rate(b_c), b_c / b_s),
        None,
    ));
}
