//! Prometheus metrics: every name with its help text, and the recorder for
//! what is counted where it happens. A leaf: the scrape-time part (the
//! Redis snapshot and the daemon's counters) is rendered by
//! [`crate::http::scrape`].
//!
//! Two sources, never overlapping in names:
//! - **Recorded at the source** through the [`metrics`](https://docs.rs/metrics) facade:
//!   script latency, dead letters by reason and the consumer runtime's
//!   counters. Without an installed recorder (a library user who wants
//!   none) these cost nothing; the binary installs the Prometheus recorder
//!   with [`install`].
//! - **Read at scrape time** by [`crate::http::scrape::render`]: the Redis
//!   state and the daemon's counters.

use std::time::Duration;

use ::metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter, Gauge, Unit,
};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

use crate::core::op::Reason;
use crate::core::Fault;

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
/// Gauge: daemons holding a liveness lease (0: nothing serves the namespace).
pub const INPUT_LIVE_DAEMONS: &str = "tidemark_input_live_daemons";
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
/// Counter: adds dropped because their element was released less than
/// `daemon.dedup_window` ago.
pub const DUPLICATES_DROPPED: &str = "tidemark_duplicates_dropped_total";
/// Counter: input entries this daemon claimed from other daemons.
pub const INPUT_CLAIMED: &str = "tidemark_input_claimed_total";
/// Counter: daemons whose input this daemon took over after their lease
/// expired.
pub const INPUT_FAILOVERS: &str = "tidemark_input_failovers_total";
/// Counter: times the connection to Redis was re-established.
pub const REDIS_RECONNECTS: &str = "tidemark_redis_reconnects_total";
/// Gauge: the namespace's partitions.
pub const PARTITIONS: &str = "tidemark_partitions";
/// Gauge: the highest partition watermark minus the lowest (absent until
/// every partition has one).
pub const WATERMARK_SPREAD: &str = "tidemark_watermark_spread";
/// Gauge, label `partition`: each partition's watermark, for namespaces of
/// at most [`PER_PARTITION_MAX`] partitions.
pub const PARTITION_WATERMARK: &str = "tidemark_partition_watermark";
/// Gauge, label `partition`: each partition's unread input, for namespaces
/// of at most [`PER_PARTITION_MAX`] partitions.
pub const PARTITION_INPUT_LAG: &str = "tidemark_partition_input_lag";
/// Above this many partitions, per-partition series are left out (the
/// namespace's min, spread and totals remain), so a namespace of 1,024
/// partitions does not explode the series count.
pub const PER_PARTITION_MAX: u16 = 64;
/// Gauge: partitions this daemon owns (applies the input of) right now.
pub const PARTITIONS_OWNED: &str = "tidemark_partitions_owned";
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
/// Counter, label `class`: failed Redis calls by fault class (see
/// [`Fault::label`]).
pub const REDIS_ERRORS: &str = "tidemark_redis_errors_total";

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
    describe_counter!(
        REDIS_ERRORS,
        "Failed Redis calls by class: disconnected, unresponsive, oom, readonly, loading, busy, noscript, \
         clusterdown, moved, wrongtype, nogroup, auth, noperm, other."
    );
}

/// Records a failed Redis call of class `fault`.
pub fn record_redis_error(fault: Fault) {
    counter!(REDIS_ERRORS, "class" => fault.label()).increment(1);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(text: &str) -> Vec<&str> {
        text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()).collect()
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
