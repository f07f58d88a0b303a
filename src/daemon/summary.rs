//! The daemon's periodic one-line summary at info level: what it did since
//! the last line (ingested by op, released, late, dead-lettered) and where
//! the namespace stands (watermark, input lag, scheduled). Logged only when
//! something changed, so an idle daemon stays quiet; `log.summary_interval`
//! sets the period (`0s`: off).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::Stats;
use crate::config::Settings;
use crate::store::{status, Conn, Namespace, StoreError, INPUT_GROUP};

/// Longest the Redis part of a summary may take; past it the line goes out
/// without it.
const REDIS_DEADLINE: Duration = Duration::from_secs(2);

/// Starts the summary task if `log.summary_interval` is not `0s`.
pub fn spawn(
    settings: &Settings,
    ns: &Namespace,
    stats: &Arc<Stats>,
    stop: &CancellationToken,
) -> Option<JoinHandle<()>> {
    let every = settings.log_summary_interval?;
    Some(tokio::spawn(run(settings.clone(), ns.clone(), Arc::clone(stats), every, stop.clone())))
}

/// The daemon's counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// `add` ops applied.
    pub adds: u64,
    /// `cancel` ops applied.
    pub cancels: u64,
    /// `watermark` ops applied.
    pub watermarks: u64,
    /// Input entries dead-lettered.
    pub dead: u64,
    /// Elements released (late ones included).
    pub released: u64,
    /// Adds released at once because they were already due.
    pub late: u64,
}

impl Counters {
    /// Reads `stats` now.
    pub fn of(stats: &Stats) -> Counters {
        Counters {
            adds: stats.adds.load(Relaxed),
            cancels: stats.cancels.load(Relaxed),
            watermarks: stats.watermarks.load(Relaxed),
            dead: stats.dead.load(Relaxed),
            released: stats.released.load(Relaxed),
            late: stats.late.load(Relaxed),
        }
    }

    /// What happened between `earlier` and `self`.
    fn since(&self, earlier: &Counters) -> Counters {
        Counters {
            adds: self.adds.saturating_sub(earlier.adds),
            cancels: self.cancels.saturating_sub(earlier.cancels),
            watermarks: self.watermarks.saturating_sub(earlier.watermarks),
            dead: self.dead.saturating_sub(earlier.dead),
            released: self.released.saturating_sub(earlier.released),
            late: self.late.saturating_sub(earlier.late),
        }
    }

    /// Input entries applied, whatever their op.
    fn ingested(&self) -> u64 {
        self.adds + self.cancels + self.watermarks + self.dead
    }
}

/// Where the namespace stands, as read from Redis (`None` where it could
/// not be read).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Standing {
    /// The watermark, if one has arrived.
    pub watermark: Option<i64>,
    /// Input entries no daemon has read yet.
    pub input_lag: Option<u64>,
    /// Elements in the schedule.
    pub scheduled: Option<u64>,
}

/// Whether a summary is worth a line: this daemon did something, or the
/// namespace moved. In clock mode the watermark moves by itself, so it
/// alone is no news.
pub fn worth_a_line(done: &Counters, before: &Standing, now: &Standing, clock: bool) -> bool {
    done != &Counters::default()
        || now.input_lag != before.input_lag
        || now.scheduled != before.scheduled
        || (!clock && now.watermark != before.watermark)
}

/// A ts read as milliseconds since the epoch (years 2000 to 2100), as a UTC
/// time; `None` for other values, whose unit is the producers' own.
pub fn epoch_ms_as_utc(ts: i64) -> Option<String> {
    if !(946_684_800_000..4_102_444_800_000).contains(&ts) {
        return None;
    }
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ts as u64);
    Some(humantime::format_rfc3339_millis(t).to_string())
}

async fn run(settings: Settings, ns: Namespace, stats: Arc<Stats>, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut conn: Option<Conn> = None;
    let mut last = Counters::of(&stats);
    let mut standing = Standing::default();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let now = Counters::of(&stats);
        let read = tokio::time::timeout(REDIS_DEADLINE, read_standing(&settings, &ns, &mut conn)).await;
        let current = match read {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                debug!(error = %e, "summary: cannot read the namespace's state");
                conn = None;
                Standing::default()
            }
            Err(_) => {
                conn = None;
                Standing::default()
            }
        };
        let done = now.since(&last);
        if worth_a_line(&done, &standing, &current, settings.daemon.clock) {
            log(&done, &current, every);
        }
        last = now;
        standing = current;
    }
}

fn log(done: &Counters, s: &Standing, every: Duration) {
    let watermark_utc = s.watermark.and_then(epoch_ms_as_utc);
    info!(
        every = %humantime::format_duration(every),
        ingested = done.ingested(),
        adds = done.adds,
        cancels = done.cancels,
        watermarks = done.watermarks,
        dead = done.dead,
        released = done.released,
        late = done.late,
        watermark = s.watermark.map_or_else(|| "none".to_owned(), |w| w.to_string()),
        watermark_utc = watermark_utc.as_deref().unwrap_or("-"),
        input_lag = s.input_lag.map_or_else(|| "unknown".to_owned(), |l| l.to_string()),
        scheduled = s.scheduled.map_or_else(|| "unknown".to_owned(), |n| n.to_string()),
        "summary"
    );
}

/// The watermark, the input group's lag and the schedule's size, on a
/// connection of our own (made on first use).
/// Over every partition: the namespace's watermark (the lowest), the sum
/// of the input lags and of the schedules.
async fn read_standing(settings: &Settings, ns: &Namespace, conn: &mut Option<Conn>) -> Result<Standing, StoreError> {
    if conn.is_none() {
        *conn = Some(settings.redis.connect(REDIS_DEADLINE).await?);
    }
    let c = conn.as_mut().expect("connected above");
    let mut standing = Standing { watermark: None, input_lag: Some(0), scheduled: Some(0) };
    let mut every_watermark = true;
    for keys in ns.all() {
        let (watermark, scheduled): (Option<String>, u64) =
            redis::pipe().get(&keys.wm).zcard(&keys.sched).query_async(c).await?;
        let lag = status::groups(c, &keys.input).await?.into_iter().find(|g| g.name == INPUT_GROUP).and_then(|g| g.lag);
        match watermark.and_then(|w| w.parse::<i64>().ok()) {
            Some(w) => standing.watermark = Some(standing.watermark.map_or(w, |have: i64| have.min(w))),
            None => every_watermark = false,
        }
        standing.input_lag = standing.input_lag.zip(lag).map(|(a, b)| a + b);
        standing.scheduled = standing.scheduled.map(|n| n + scheduled);
    }
    if !every_watermark {
        standing.watermark = None;
    }
    Ok(standing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_only_when_something_changed() {
        let idle = Counters::default();
        let at = |wm: i64, lag: u64, scheduled: u64| Standing {
            watermark: Some(wm),
            input_lag: Some(lag),
            scheduled: Some(scheduled),
        };
        let busy = Counters { adds: 3, released: 2, ..Counters::default() };
        assert!(!worth_a_line(&idle, &at(5, 0, 1), &at(5, 0, 1), false), "nothing happened");
        assert!(worth_a_line(&busy, &at(5, 0, 1), &at(5, 0, 1), false), "this daemon worked");
        assert!(worth_a_line(&idle, &at(5, 0, 1), &at(6, 0, 1), false), "the watermark moved");
        assert!(!worth_a_line(&idle, &at(5, 0, 1), &at(6, 0, 1), true), "clock mode: it moves by itself");
        assert!(worth_a_line(&idle, &at(5, 0, 1), &at(5, 7, 1), true), "input waits unread");
        assert!(worth_a_line(&idle, &at(5, 0, 1), &at(5, 0, 0), true), "another daemon released");
        assert!(worth_a_line(&idle, &Standing::default(), &at(5, 0, 0), false), "Redis readable again");
    }

    #[test]
    fn counters_since_and_ingested() {
        let a = Counters { adds: 10, cancels: 1, watermarks: 2, dead: 1, released: 8, late: 1 };
        let b = Counters { adds: 15, cancels: 1, watermarks: 3, dead: 2, released: 12, late: 3 };
        let d = b.since(&a);
        assert_eq!(d, Counters { adds: 5, cancels: 0, watermarks: 1, dead: 1, released: 4, late: 2 });
        assert_eq!(d.ingested(), 7);
    }

    #[test]
    fn epoch_milliseconds_read_as_utc() {
        assert_eq!(epoch_ms_as_utc(1_800_000_000_000).as_deref(), Some("2027-01-15T08:00:00.000Z"));
        assert_eq!(epoch_ms_as_utc(1_000_000), None);
        assert_eq!(epoch_ms_as_utc(-5), None);
        assert_eq!(epoch_ms_as_utc(i64::MAX), None);
    }
}
