//! Prometheus metrics: every name with its help text, the recorder for what
//! is counted where it happens, and the scrape-time rendering of the Redis
//! snapshot and the daemon's counters.
//!
//! Two sources, never overlapping in names:
//! - **Recorded at the source** through the [`metrics`](https://docs.rs/metrics) facade:
//!   script latency, dead letters by reason and the consumer runtime's
//!   counters. Without an installed recorder (a library user who wants
//!   none) these cost nothing; the binary installs the Prometheus recorder
//!   with [`install`].
//! - **Read at scrape time** by [`render_scrape`]: the Redis state (one
//!   [`snapshot`](crate::store::status::snapshot)) and the daemon's
//!   [`Stats`] atomics, into a fresh recorder per scrape, so an output group
//!   that was deleted, or a snapshot that failed, leaves no stale values.

use std::time::Duration;

use ::metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter, Gauge, Unit,
};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

use crate::core::op::Reason;
use crate::daemon::Stats;
use crate::store::batch::Kind;
use crate::store::status::Status;
use crate::store::Prepared;

// --- Read at scrape time: the Redis snapshot ------------------------------

/// Gauge: 1 if this scrape's Redis snapshot succeeded, else 0.
pub const REDIS_UP: &str = "tidemark_redis_up";
/// Gauge: the watermark (absent until the first one).
pub const WATERMARK: &str = "tidemark_watermark";
/// Gauge: watermark minus the oldest scheduled ts still waiting, 0 when
/// nothing due waits.
pub const EVENT_TIME_LAG: &str = "tidemark_event_time_lag";
/// Gauge: elements in the schedule.
pub const SCHEDULED: &str = "tidemark_scheduled";
/// Gauge: the smallest scheduled ts (absent when nothing is scheduled).
pub const NEXT_DUE_TS: &str = "tidemark_next_due_ts";
/// Gauge: entries in `:in`.
pub const INPUT_LENGTH: &str = "tidemark_input_length";
/// Gauge: input entries read by a daemon and not yet applied.
pub const INPUT_PENDING: &str = "tidemark_input_pending";
/// Gauge: input entries no daemon has read yet.
pub const INPUT_LAG: &str = "tidemark_input_lag";
/// Gauge: daemons in the input group.
pub const INPUT_DAEMONS: &str = "tidemark_input_daemons";
/// Gauge: entries in `:out`.
pub const OUTPUT_LENGTH: &str = "tidemark_output_length";
/// Gauge: entries in `:dead`.
pub const DEAD_STREAM_LENGTH: &str = "tidemark_dead_stream_length";
/// Gauge, label `group`: entries delivered and not yet acknowledged.
pub const GROUP_PENDING: &str = "tidemark_group_pending";
/// Gauge, label `group`: entries not yet delivered to the group.
pub const GROUP_LAG: &str = "tidemark_group_lag";
/// Gauge, label `group`: idle time of the oldest pending entry.
pub const GROUP_OLDEST_PENDING_IDLE: &str = "tidemark_group_oldest_pending_idle_seconds";
/// Gauge, label `group`: consumers in the group.
pub const GROUP_CONSUMERS: &str = "tidemark_group_consumers";
/// Gauge, label `group`: consumers holding a liveness lease.
pub const GROUP_LIVE_CONSUMERS: &str = "tidemark_group_live_consumers";

// --- Read at scrape time: the daemon's counters ---------------------------

/// Counter, label `op`: input entries applied by this daemon.
pub const INGESTED: &str = "tidemark_ingested_total";
/// Counter: adds that were already due and released at once.
pub const LATE: &str = "tidemark_late_total";
/// Counter: elements this daemon released into `:out`.
pub const RELEASED: &str = "tidemark_released_total";
/// Counter: input entries this daemon claimed from other daemons.
pub const INPUT_CLAIMED: &str = "tidemark_input_claimed_total";
/// Counter: daemons whose input this daemon took over after their lease
/// expired.
pub const INPUT_FAILOVERS: &str = "tidemark_input_failovers_total";
/// Counter: times the connection to Redis was re-established.
pub const REDIS_RECONNECTS: &str = "tidemark_redis_reconnects_total";
/// Gauge: 1 while this daemon holds the housekeeping lock.
pub const HOUSEKEEPING_LEADER: &str = "tidemark_housekeeping_leader";
/// Gauge, label `version`: always 1.
pub const BUILD_INFO: &str = "tidemark_build_info";

// --- Recorded at the source -----------------------------------------------

/// Histogram, label `script`: duration of script calls, round trip included.
pub const SCRIPT_DURATION: &str = "tidemark_script_duration_seconds";
/// Counter, label `reason`: entries this process moved to `:dead`.
pub const DEAD_LETTERS: &str = "tidemark_dead_letters_total";
/// Counter, label `group`: elements whose handler succeeded.
pub const CONSUMER_HANDLED: &str = "tidemark_consumer_handled_total";
/// Counter, label `group`: handler failures (each failed delivery).
pub const CONSUMER_FAILED: &str = "tidemark_consumer_failed_total";
/// Counter, label `group`: entries claimed from other consumers.
pub const CONSUMER_CLAIMED: &str = "tidemark_consumer_claimed_total";
/// Counter, label `group`: dead consumers whose entries were taken over.
pub const CONSUMER_TAKEOVERS: &str = "tidemark_consumer_takeovers_total";
/// Gauge, label `group`: handlers running now.
pub const CONSUMER_IN_FLIGHT: &str = "tidemark_consumer_in_flight";
/// Gauge, label `group`: elements delivered here and waiting for a slot.
pub const CONSUMER_QUEUED: &str = "tidemark_consumer_queued";

/// Bucket bounds of [`SCRIPT_DURATION`], in seconds: a release chunk of
/// 1000 takes about 2.5 ms, so the interesting range is 100 µs to 1 s.
const SCRIPT_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// Why the recorder could not be installed.
#[derive(Debug, thiserror::Error)]
#[error("cannot install the metrics recorder: {0}")]
pub struct MetricsError(#[from] BuildError);

/// Builds the Prometheus recorder for the metrics recorded at the source,
/// installs it as the process's global recorder and returns the handle
/// that renders it. Call it once, before starting the daemon or consumer;
/// call [`PrometheusHandle::run_upkeep`] now and then (the HTTP server does).
pub fn install() -> Result<PrometheusHandle, MetricsError> {
    let handle = recorder_builder()?.install_recorder()?;
    describe_recorded();
    // Every reason from 0, so that rates and alerts see the series before
    // the first dead letter.
    for reason in Reason::ALL {
        counter!(DEAD_LETTERS, "reason" => reason.code()).increment(0);
    }
    Ok(handle)
}

fn recorder_builder() -> Result<PrometheusBuilder, BuildError> {
    PrometheusBuilder::new().set_buckets_for_metric(Matcher::Full(SCRIPT_DURATION.into()), SCRIPT_BUCKETS)
}

fn describe_recorded() {
    describe_histogram!(
        SCRIPT_DURATION,
        Unit::Seconds,
        "Duration of script calls (apply, release, clock), round trip included."
    );
    describe_counter!(DEAD_LETTERS, "Entries this process moved to the dead-letter stream, by reason code.");
    describe_counter!(CONSUMER_HANDLED, "Elements whose handler succeeded (acknowledged).");
    describe_counter!(CONSUMER_FAILED, "Handler failures: each failed delivery, retried later or dead-lettered.");
    describe_counter!(CONSUMER_CLAIMED, "Output entries claimed from other consumers (idle retries and takeovers).");
    describe_counter!(
        CONSUMER_TAKEOVERS,
        "Dead consumers (lease expired) whose pending entries this consumer took over."
    );
    describe_gauge!(CONSUMER_IN_FLIGHT, "Handlers running now.");
    describe_gauge!(
        CONSUMER_QUEUED,
        "Elements delivered to this consumer and waiting for a free handler slot (read ahead, or claimed)."
    );
    describe_counter!(REDIS_RECONNECTS, "Times the connection to Redis was re-established after a failure.");
}

/// The scripts whose latency is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Script {
    /// `apply.lua`
    Apply,
    /// `release.lua`
    Release,
    /// `clock.lua`
    Clock,
}

impl Script {
    fn label(self) -> &'static str {
        match self {
            Script::Apply => "apply",
            Script::Release => "release",
            Script::Clock => "clock",
        }
    }
}

/// Records one call of `script` that took `elapsed`.
pub fn record_script(script: Script, elapsed: Duration) {
    histogram!(SCRIPT_DURATION, "script" => script.label()).record(elapsed);
}

/// Records `n` entries moved to `:dead` with reason `code`.
pub fn record_dead_letters(code: &'static str, n: u64) {
    if n > 0 {
        counter!(DEAD_LETTERS, "reason" => code).increment(n);
    }
}

/// Records the dead letters of one apply call: `dead` of the malformed
/// entries among `processed` (the batch's done prefix) went to `:dead`.
/// They are fewer only when some were found already applied (a redelivery
/// another daemon dead-lettered), in which case the first ones are counted.
pub fn record_input_dead_letters(processed: &[&Prepared], dead: u64) {
    let mut left = dead;
    for p in processed {
        if left == 0 {
            return;
        }
        if let Kind::Dead(reason) = p.kind {
            record_dead_letters(reason.code(), 1);
            left -= 1;
        }
    }
}

/// The consumer runtime's counters for one group, bound to the recorder
/// installed when they are created.
#[derive(Debug, Clone)]
pub struct ConsumerMetrics {
    /// [`CONSUMER_HANDLED`]
    pub handled: Counter,
    /// [`CONSUMER_FAILED`]
    pub failed: Counter,
    /// [`CONSUMER_CLAIMED`]
    pub claimed: Counter,
    /// [`CONSUMER_TAKEOVERS`]
    pub takeovers: Counter,
    /// [`CONSUMER_IN_FLIGHT`]
    pub in_flight: Gauge,
    /// [`CONSUMER_QUEUED`]
    pub queued: Gauge,
    /// [`REDIS_RECONNECTS`]
    pub reconnects: Counter,
}

impl ConsumerMetrics {
    /// The handles for `group`.
    pub fn new(group: &str) -> Self {
        let g = group.to_owned();
        ConsumerMetrics {
            handled: counter!(CONSUMER_HANDLED, "group" => g.clone()),
            failed: counter!(CONSUMER_FAILED, "group" => g.clone()),
            claimed: counter!(CONSUMER_CLAIMED, "group" => g.clone()),
            takeovers: counter!(CONSUMER_TAKEOVERS, "group" => g.clone()),
            in_flight: gauge!(CONSUMER_IN_FLIGHT, "group" => g.clone()),
            queued: gauge!(CONSUMER_QUEUED, "group" => g),
            reconnects: counter!(REDIS_RECONNECTS),
        }
    }
}

/// Renders, in the Prometheus text format, what is read at scrape time:
/// the Redis snapshot (`None`: it failed, and only [`REDIS_UP`] 0 says so)
/// and the daemon's counters (`None` for `tidemark consume`).
pub fn render_scrape(status: Option<&Status>, stats: Option<&Stats>) -> String {
    let recorder = PrometheusBuilder::new().build_recorder();
    ::metrics::with_local_recorder(&recorder, || {
        describe_scraped();
        gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        gauge!(REDIS_UP).set(if status.is_some() { 1.0 } else { 0.0 });
        if let Some(s) = status {
            record_status(s);
        }
        if let Some(s) = stats {
            record_stats(s);
        }
    });
    recorder.handle().render()
}

fn describe_scraped() {
    describe_gauge!(BUILD_INFO, "Always 1; the label says which tidemark version runs.");
    describe_gauge!(REDIS_UP, "1 if this scrape could read the namespace's state from Redis, else 0.");
    describe_gauge!(WATERMARK, "The watermark (absent until the first one arrives).");
    describe_gauge!(
        EVENT_TIME_LAG,
        "Watermark minus the oldest scheduled ts still waiting (due but not yet released); 0 when none waits."
    );
    describe_gauge!(SCHEDULED, "Elements waiting in the schedule.");
    describe_gauge!(NEXT_DUE_TS, "The smallest scheduled ts (absent when nothing is scheduled).");
    describe_gauge!(INPUT_LENGTH, "Entries in the input stream (acknowledged ones stay until trimmed).");
    describe_gauge!(INPUT_PENDING, "Input entries read by a daemon and not yet applied.");
    describe_gauge!(INPUT_LAG, "Input entries no daemon has read yet (absent where Redis cannot tell).");
    describe_gauge!(INPUT_DAEMONS, "Daemons known to the input group.");
    describe_gauge!(OUTPUT_LENGTH, "Entries in the output stream.");
    describe_gauge!(DEAD_STREAM_LENGTH, "Entries in the dead-letter stream.");
    describe_gauge!(GROUP_PENDING, "Output entries delivered to a consumer of the group and not yet acknowledged.");
    describe_gauge!(GROUP_LAG, "Output entries not yet delivered to the group (absent where Redis cannot tell).");
    describe_gauge!(
        GROUP_OLDEST_PENDING_IDLE,
        Unit::Seconds,
        "Seconds since the group's oldest pending entry was delivered; 0 when none is pending."
    );
    describe_gauge!(GROUP_CONSUMERS, "Consumers known to the group.");
    describe_gauge!(GROUP_LIVE_CONSUMERS, "Consumers of the group holding a liveness lease.");
    describe_counter!(INGESTED, "Input entries applied by this daemon, by op (dead: malformed, dead-lettered).");
    describe_counter!(LATE, "Adds that were already due when applied and were released at once.");
    describe_counter!(RELEASED, "Elements this daemon released into the output stream (late adds included).");
    describe_counter!(INPUT_CLAIMED, "Input entries this daemon claimed from other daemons.");
    describe_counter!(INPUT_FAILOVERS, "Daemons whose pending input this daemon took over after their lease expired.");
    describe_counter!(REDIS_RECONNECTS, "Times the connection to Redis was re-established after a failure.");
    describe_gauge!(HOUSEKEEPING_LEADER, "1 while this daemon holds the housekeeping lock, else 0.");
}

fn record_status(s: &Status) {
    if let Some(wm) = s.watermark {
        gauge!(WATERMARK).set(wm as f64);
        let waiting = s.next_due_ts.filter(|ts| *ts <= wm);
        gauge!(EVENT_TIME_LAG).set(waiting.map_or(0.0, |ts| wm.saturating_sub(ts) as f64));
    }
    gauge!(SCHEDULED).set(s.scheduled as f64);
    if let Some(ts) = s.next_due_ts {
        gauge!(NEXT_DUE_TS).set(ts as f64);
    }
    gauge!(INPUT_LENGTH).set(s.input.length as f64);
    gauge!(INPUT_PENDING).set(s.input.pending as f64);
    if let Some(lag) = s.input.lag {
        gauge!(INPUT_LAG).set(lag as f64);
    }
    gauge!(INPUT_DAEMONS).set(s.input.daemons as f64);
    gauge!(OUTPUT_LENGTH).set(s.output.length as f64);
    gauge!(DEAD_STREAM_LENGTH).set(s.dead_letters as f64);
    for g in &s.output.groups {
        let group = g.name.clone();
        gauge!(GROUP_PENDING, "group" => group.clone()).set(g.pending as f64);
        if let Some(lag) = g.lag {
            gauge!(GROUP_LAG, "group" => group.clone()).set(lag as f64);
        }
        let idle = g.oldest_pending.as_ref().map_or(0.0, |o| o.idle_ms as f64 / 1000.0);
        gauge!(GROUP_OLDEST_PENDING_IDLE, "group" => group.clone()).set(idle);
        gauge!(GROUP_CONSUMERS, "group" => group.clone()).set(g.consumers.len() as f64);
        let live = g.consumers.iter().filter(|c| c.leased).count();
        gauge!(GROUP_LIVE_CONSUMERS, "group" => group).set(live as f64);
    }
}

fn record_stats(s: &Stats) {
    use std::sync::atomic::Ordering::Relaxed;
    for (op, n) in [("add", &s.adds), ("cancel", &s.cancels), ("watermark", &s.watermarks), ("dead", &s.dead)] {
        counter!(INGESTED, "op" => op).absolute(n.load(Relaxed));
    }
    counter!(LATE).absolute(s.late.load(Relaxed));
    counter!(RELEASED).absolute(s.released.load(Relaxed));
    counter!(INPUT_CLAIMED).absolute(s.claimed.load(Relaxed));
    counter!(INPUT_FAILOVERS).absolute(s.failovers.load(Relaxed));
    counter!(REDIS_RECONNECTS).absolute(s.reconnects.load(Relaxed));
    gauge!(HOUSEKEEPING_LEADER).set(if s.housekeeping_leader.load(Relaxed) { 1.0 } else { 0.0 });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::status::{ConsumerStatus, InputInfo, OldestPending, OutputGroup, OutputInfo};
    use std::sync::atomic::Ordering::Relaxed;

    fn status() -> Status {
        Status {
            namespace: "default".into(),
            watermark: Some(100),
            scheduled: 3,
            next_due_ts: Some(90),
            input: InputInfo { length: 7, pending: 2, lag: Some(1), daemons: 2 },
            output: OutputInfo {
                length: 5,
                groups: vec![OutputGroup {
                    name: "bill\"ing".into(),
                    pending: 4,
                    lag: None,
                    last_delivered_id: "1-0".into(),
                    oldest_pending: Some(OldestPending {
                        id: "1-0".into(),
                        consumer: "a".into(),
                        idle_ms: 1500,
                        deliveries: 1,
                    }),
                    consumers: vec![
                        ConsumerStatus { name: "a".into(), pending: 4, idle_ms: 1500, leased: true },
                        ConsumerStatus { name: "b".into(), pending: 0, idle_ms: 9, leased: false },
                    ],
                }],
            },
            dead_letters: 6,
        }
    }

    /// The sample lines (no comments) of a rendering.
    fn samples(text: &str) -> Vec<&str> {
        text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()).collect()
    }

    #[test]
    fn snapshot_and_counters_render_exactly() {
        let stats = Stats::default();
        stats.adds.store(3, Relaxed);
        stats.watermarks.store(1, Relaxed);
        stats.released.store(2, Relaxed);
        stats.failovers.store(1, Relaxed);
        stats.housekeeping_leader.store(true, Relaxed);
        let text = render_scrape(Some(&status()), Some(&stats));
        let lines = samples(&text);
        for expected in [
            "tidemark_redis_up 1",
            "tidemark_watermark 100",
            "tidemark_event_time_lag 10",
            "tidemark_scheduled 3",
            "tidemark_next_due_ts 90",
            "tidemark_input_pending 2",
            "tidemark_input_lag 1",
            "tidemark_input_daemons 2",
            "tidemark_output_length 5",
            "tidemark_dead_stream_length 6",
            r#"tidemark_group_pending{group="bill\"ing"} 4"#,
            r#"tidemark_group_oldest_pending_idle_seconds{group="bill\"ing"} 1.5"#,
            r#"tidemark_group_consumers{group="bill\"ing"} 2"#,
            r#"tidemark_group_live_consumers{group="bill\"ing"} 1"#,
            r#"tidemark_ingested_total{op="add"} 3"#,
            r#"tidemark_ingested_total{op="cancel"} 0"#,
            r#"tidemark_ingested_total{op="watermark"} 1"#,
            r#"tidemark_ingested_total{op="dead"} 0"#,
            "tidemark_released_total 2",
            "tidemark_input_failovers_total 1",
            "tidemark_housekeeping_leader 1",
        ] {
            assert!(lines.contains(&expected), "missing {expected:?} in:\n{text}");
        }
        // Unknown lag is absent, not 0.
        assert!(!text.contains("tidemark_group_lag"), "{text}");
        assert!(text.contains("# HELP tidemark_watermark The watermark"), "{text}");
        assert!(text.contains("# TYPE tidemark_ingested_total counter"), "{text}");
    }

    #[test]
    fn nothing_due_waiting_is_zero_lag_and_failed_snapshot_is_redis_down() {
        let mut s = status();
        s.next_due_ts = Some(150);
        let text = render_scrape(Some(&s), None);
        assert!(samples(&text).contains(&"tidemark_event_time_lag 0"), "{text}");
        assert!(!text.contains("tidemark_ingested_total"), "no daemon counters for a consumer: {text}");

        let text = render_scrape(None, None);
        let mut lines = samples(&text);
        lines.sort_unstable();
        let build = format!("tidemark_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));
        assert_eq!(lines, [build.as_str(), "tidemark_redis_up 0"]);
    }

    #[test]
    fn script_latency_is_a_histogram_with_buckets() {
        let recorder = recorder_builder().unwrap().build_recorder();
        ::metrics::with_local_recorder(&recorder, || {
            describe_recorded();
            record_script(Script::Apply, Duration::from_micros(300));
            record_script(Script::Apply, Duration::from_millis(20));
            record_dead_letters("bad_ts", 2);
            record_dead_letters("bad_ts", 0);
        });
        let text = recorder.handle().render();
        let lines = samples(&text);
        for expected in [
            r#"tidemark_script_duration_seconds_bucket{script="apply",le="0.00025"} 0"#,
            r#"tidemark_script_duration_seconds_bucket{script="apply",le="0.0005"} 1"#,
            r#"tidemark_script_duration_seconds_bucket{script="apply",le="0.025"} 2"#,
            r#"tidemark_script_duration_seconds_bucket{script="apply",le="+Inf"} 2"#,
            r#"tidemark_script_duration_seconds_count{script="apply"} 2"#,
            r#"tidemark_dead_letters_total{reason="bad_ts"} 2"#,
        ] {
            assert!(lines.contains(&expected), "missing {expected:?} in:\n{text}");
        }
        assert!(text.contains("# TYPE tidemark_script_duration_seconds histogram"), "{text}");
    }
}
