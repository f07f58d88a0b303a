//! `/metrics`, the part read at scrape time: the Redis snapshot (one
//! [`snapshot`](crate::store::status::snapshot)) and the daemon's
//! [`Stats`] atomics, rendered into a fresh recorder per scrape, so an
//! output group that was deleted, or a snapshot that failed, leaves no
//! stale values. The names live in [`crate::metrics`].

use ::metrics::{counter, describe_counter, describe_gauge, gauge, Unit};
use metrics_exporter_prometheus::PrometheusBuilder;

use crate::health::Stats;
use crate::metrics::*;
use crate::store::status::Status;

/// Renders, in the Prometheus text format, what is read at scrape time:
/// the Redis snapshot (`None`: it failed, and only [`REDIS_UP`] 0 says so)
/// and the daemon's counters (`None` for `tidemark consume`).
pub fn render(status: Option<&Status>, stats: Option<&Stats>) -> String {
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
    describe_gauge!(INPUT_LIVE_DAEMONS, "Daemons holding a liveness lease; 0: no daemon serves the namespace.");
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
    describe_counter!(
        DUPLICATES_DROPPED,
        "Adds this daemon dropped because their element was released less than daemon.dedup_window ago."
    );
    describe_counter!(INPUT_CLAIMED, "Input entries this daemon claimed from other daemons.");
    describe_counter!(INPUT_FAILOVERS, "Daemons whose pending input this daemon took over after their lease expired.");
    describe_counter!(REDIS_RECONNECTS, "Times the connection to Redis was re-established after a failure.");
    describe_gauge!(HOUSEKEEPING_LEADER, "1 while this daemon holds the housekeeping lock, else 0.");
    describe_gauge!(PARTITIONS, "Partitions of the namespace.");
    describe_gauge!(
        WATERMARK_SPREAD,
        "The highest partition watermark minus the lowest (the namespace's watermark is the lowest)."
    );
    describe_gauge!(PARTITION_WATERMARK, "Each partition's watermark (namespaces of at most 64 partitions).");
    describe_gauge!(PARTITION_INPUT_LAG, "Each partition's unread input (namespaces of at most 64 partitions).");
    describe_gauge!(PARTITIONS_OWNED, "Partitions whose input this daemon applies now (the others stand by).");
}

fn record_status(s: &Status) {
    gauge!(PARTITIONS).set(f64::from(s.partitions));
    if let Some(spread) = s.watermark_spread {
        gauge!(WATERMARK_SPREAD).set(spread as f64);
    }
    if s.partitions <= PER_PARTITION_MAX {
        for p in &s.by_partition {
            let label = p.partition.to_string();
            if let Some(wm) = p.watermark {
                gauge!(PARTITION_WATERMARK, "partition" => label.clone()).set(wm as f64);
            }
            if let Some(lag) = p.input_lag {
                gauge!(PARTITION_INPUT_LAG, "partition" => label).set(lag as f64);
            }
        }
    }
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
    gauge!(INPUT_LIVE_DAEMONS).set(s.input.live_daemons as f64);
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
    counter!(DUPLICATES_DROPPED).absolute(s.duplicates.load(Relaxed));
    counter!(INPUT_CLAIMED).absolute(s.claimed.load(Relaxed));
    counter!(INPUT_FAILOVERS).absolute(s.failovers.load(Relaxed));
    counter!(REDIS_RECONNECTS).absolute(s.reconnects.load(Relaxed));
    gauge!(HOUSEKEEPING_LEADER).set(if s.housekeeping_leader.load(Relaxed) { 1.0 } else { 0.0 });
    gauge!(PARTITIONS_OWNED).set(s.partitions_owned.load(Relaxed) as f64);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::status::{ConsumerStatus, InputInfo, OldestPending, OutputGroup, OutputInfo};
    use std::sync::atomic::Ordering::Relaxed;

    fn status() -> Status {
        Status {
            namespace: "default".into(),
            partitions: 1,
            watermark_spread: Some(0),
            daemons: vec!["d1".into()],
            by_partition: Vec::new(),
            watermark: Some(100),
            scheduled: 3,
            next_due_ts: Some(90),
            input: InputInfo { length: 7, pending: 2, lag: Some(1), daemons: 2, live_daemons: 1 },
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
    fn partitions_get_their_own_series_up_to_a_bound() {
        use crate::store::status::PartitionRow;
        let row = |p: u16, wm: i64| PartitionRow {
            partition: p,
            watermark: Some(wm),
            scheduled: 0,
            input_length: 0,
            input_lag: Some(u64::from(p)),
            output_length: 0,
            dead_letters: 0,
            owner: None,
        };
        let mut s = status();
        s.partitions = 3;
        s.watermark_spread = Some(7);
        s.by_partition = vec![row(0, 100), row(1, 107), row(2, 101)];
        let stats = Stats::default();
        stats.partitions_owned.store(2, Relaxed);
        let text = render(Some(&s), Some(&stats));
        let lines = samples(&text);
        for expected in [
            "tidemark_partitions 3",
            "tidemark_watermark_spread 7",
            "tidemark_watermark 100",
            r#"tidemark_partition_watermark{partition="1"} 107"#,
            r#"tidemark_partition_input_lag{partition="2"} 2"#,
            "tidemark_partitions_owned 2",
        ] {
            assert!(lines.contains(&expected), "missing {expected:?} in:\n{text}");
        }
        // A namespace of many partitions keeps only its totals.
        s.partitions = PER_PARTITION_MAX + 1;
        s.by_partition = (0..=PER_PARTITION_MAX).map(|p| row(p, 100)).collect();
        let text = render(Some(&s), None);
        assert!(!text.contains("tidemark_partition_watermark"), "{text}");
        assert!(text.contains("tidemark_watermark_spread 7"), "{text}");
    }

    #[test]
    fn snapshot_and_counters_render_exactly() {
        let stats = Stats::default();
        stats.adds.store(3, Relaxed);
        stats.watermarks.store(1, Relaxed);
        stats.released.store(2, Relaxed);
        stats.failovers.store(1, Relaxed);
        stats.housekeeping_leader.store(true, Relaxed);
        let text = render(Some(&status()), Some(&stats));
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
            "tidemark_input_live_daemons 1",
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
        let text = render(Some(&s), None);
        assert!(samples(&text).contains(&"tidemark_event_time_lag 0"), "{text}");
        assert!(!text.contains("tidemark_ingested_total"), "no daemon counters for a consumer: {text}");

        let text = render(None, None);
        let mut lines = samples(&text);
        lines.sort_unstable();
        let build = format!("tidemark_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));
        assert_eq!(lines, [build.as_str(), "tidemark_redis_up 0"]);
    }
}
