//! The read-only dashboard: one self-contained page at `/` that polls
//! `/api/dashboard`, a JSON snapshot of the namespace read from Redis.
//!
//! The snapshot is taken at most every `FRESH_FOR` whatever the number of
//! viewers (requests in between get the cached one), under a
//! `REDIS_DEADLINE`: a slow or absent Redis turns into a 503 with a
//! reason, which the page shows as a banner, instead of a hanging request.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use serde::Serialize;
use tokio::sync::Mutex;

use crate::config::Settings;
use crate::dead::{self, DeadLetter};
use crate::store::backlog::{self, Backlog};
use crate::store::status::{self, InputInfo, OutputInfo, PartitionRow};
use crate::store::{meta, retention, Conn, Endpoint, Keys, Namespace, StoreError};

/// The page: HTML with inline CSS and JS, no external assets.
const PAGE: &str = include_str!("dashboard.html");
/// Where the page fetches its data (relative to the page: `api/dashboard`).
pub const API_PATH: &str = "/api/dashboard";
/// Bars in the backlog chart.
const BUCKETS: usize = 20;
/// Dead letters listed, newest first.
const LATEST_DEAD: usize = 10;
/// Longest a snapshot (connecting included) may take before the request
/// answers 503: the page polls every 1.5 s, so it should never wait long.
const REDIS_DEADLINE: Duration = Duration::from_secs(2);
/// A snapshot younger than this is served again rather than re-read, so
/// many open pages cost Redis no more than one.
const FRESH_FOR: Duration = Duration::from_millis(500);
/// The watermark's speed is measured over the samples of this window.
const RATE_WINDOW: Duration = Duration::from_secs(10);
/// No speed is shown until the samples span at least this long.
const RATE_MIN_SPAN: Duration = Duration::from_secs(1);
/// Longest reason code, origin and origin id shown for a dead letter, in characters.
const REASON_WIDTH: usize = 40;
/// Longest element id shown for a dead letter, in characters.
const ELEMENT_WIDTH: usize = 80;
/// Longest detail shown for a dead letter, in characters.
const DETAIL_WIDTH: usize = 200;
/// The page runs only its own inline script and style and talks only to
/// this origin: nothing external can load, even if a value were misused.
const CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The dashboard's routes (`GET /` and `GET /api/dashboard`), to be merged
/// into the HTTP server of `tidemark run` and `tidemark consume`. Nothing
/// connects until the first request; the Redis connection is then reused,
/// and re-opened after it breaks.
pub fn router(settings: Settings) -> Router {
    let state = Arc::new(Dashboard::new(&settings));
    Router::new().route("/", get(page)).route(API_PATH, get(api)).with_state(state)
}

/// What the handlers share.
struct Dashboard {
    /// How to reach Redis (not connected).
    redis: Endpoint,
    /// The namespace, with the configured partition count (if any).
    namespace: Namespace,
    /// `partitions` as configured; the namespace's record decides.
    partitions: Option<u16>,
    /// The Redis URL with the password masked: the only form ever shown.
    redis_display: String,
    /// The password, kept only to scrub it out of error texts.
    password: Option<String>,
    /// Clock mode: ts are Unix milliseconds, which the page shows as times.
    clock: bool,
    /// The connection, the last answer and the watermark samples. Held
    /// across a snapshot so that concurrent requests share one.
    inner: Mutex<Inner>,
}

/// Mutable state behind [`Dashboard::inner`].
#[derive(Default)]
struct Inner {
    /// The open connection; `None` before the first request and after it broke.
    conn: Option<Conn>,
    /// The last answer and when it was produced, served while fresh.
    last: Option<(Instant, Answer)>,
    /// Recent watermarks, oldest first, to measure how fast it moves.
    samples: VecDeque<Sample>,
    /// Whether the last snapshot failed: errors are logged as a warning once
    /// per outage, not once per poll.
    failing: bool,
}

/// A serialized answer of the JSON endpoint.
#[derive(Clone)]
struct Answer {
    /// 200, or 503 when Redis could not be read.
    status: StatusCode,
    /// The JSON body.
    body: Bytes,
}

/// The watermark seen at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Sample {
    /// When it was read.
    at: Instant,
    /// Its value.
    watermark: i64,
}

/// The JSON snapshot the page renders.
#[derive(Debug, Serialize)]
struct View {
    /// The namespace.
    namespace: String,
    /// The Redis URL, password masked.
    redis: String,
    /// Clock mode: ts are Unix milliseconds.
    clock: bool,
    /// When the snapshot was taken (Unix ms, the Redis server's clock, like
    /// entry ids): the reference for the ages of dead letters.
    at_ms: u64,
    /// How many partitions the namespace has.
    partitions: u16,
    /// The namespace's watermark (the lowest partition's).
    watermark: Option<i64>,
    /// The highest partition watermark minus the lowest.
    watermark_spread: Option<i64>,
    /// Live daemons.
    daemons: Vec<String>,
    /// Each partition's row (empty with one partition).
    by_partition: Vec<PartitionRow>,
    /// How fast the watermark moves, in ts units per second, over the last
    /// [`RATE_WINDOW`]; `None` until samples span [`RATE_MIN_SPAN`].
    watermark_rate: Option<f64>,
    /// The schedule by due time.
    backlog: Backlog,
    /// The input stream.
    input: InputInfo,
    /// The output stream and its groups, with consumers and lease state.
    output: OutputInfo,
    /// The dead-letter stream.
    dead_letters: DeadView,
}

/// The dead-letter stream: its length and the newest letters.
#[derive(Debug, Serialize)]
struct DeadView {
    /// Entries in `:dead`.
    total: u64,
    /// Up to [`LATEST_DEAD`] letters, newest first.
    latest: Vec<DeadRow>,
}

/// One dead letter as the page shows it: text only, control characters
/// escaped and long values cut (see [`dead::cell`]; a detail keeps its end,
/// see [`dead::cell_ends`]); payloads are not shown.
#[derive(Debug, Serialize)]
struct DeadRow {
    /// Its entry id in `:dead`.
    id: String,
    /// When it was dead-lettered (Unix ms, from the entry id).
    at_ms: u64,
    /// Reason code, e.g. `bad_ts`.
    reason: String,
    /// What was wrong.
    detail: String,
    /// `in` or `out:<group>`.
    origin: String,
    /// Its entry id in the origin stream.
    origin_id: String,
    /// The element id, if the entry had one.
    element: Option<String>,
}

impl From<&DeadLetter> for DeadRow {
    fn from(l: &DeadLetter) -> Self {
        DeadRow {
            id: l.id.to_string(),
            at_ms: l.id.ms,
            reason: dead::cell(&l.reason, REASON_WIDTH),
            detail: dead::cell_ends(&l.detail, DETAIL_WIDTH),
            origin: dead::cell(&l.origin, REASON_WIDTH),
            origin_id: dead::cell(&l.origin_id, REASON_WIDTH),
            element: l.element_id().map(|e| dead::cell(e, ELEMENT_WIDTH)),
        }
    }
}

/// The body of a 503.
#[derive(Debug, Serialize)]
struct Failure<'a> {
    /// Why there is no snapshot.
    error: &'a str,
    /// The namespace.
    namespace: &'a str,
    /// The Redis URL, password masked.
    redis: &'a str,
}

/// Why a snapshot failed.
#[derive(Debug, thiserror::Error)]
enum SnapshotError {
    /// Redis answered with an error or the connection failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Redis did not answer in time.
    #[error("Redis did not answer within {}", humantime::format_duration(REDIS_DEADLINE))]
    Deadline,
}

impl Dashboard {
    fn new(settings: &Settings) -> Dashboard {
        let password = settings.redis.client().get_connection_info().redis_settings().password().map(str::to_owned);
        Dashboard {
            redis: settings.redis.clone(),
            namespace: settings.namespace.clone(),
            partitions: settings.partitions,
            redis_display: settings.redis_display.clone(),
            password: password.filter(|p| !p.is_empty()),
            clock: settings.daemon.clock,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// The current answer: the cached one while fresh, else a new snapshot.
    async fn answer(&self) -> Answer {
        let mut inner = self.inner.lock().await;
        if let Some((at, answer)) = &inner.last {
            if at.elapsed() < FRESH_FOR {
                return answer.clone();
            }
        }
        let result = tokio::time::timeout(REDIS_DEADLINE, self.snapshot(&mut inner))
            .await
            .unwrap_or(Err(SnapshotError::Deadline));
        let answer = match result {
            Ok(view) => {
                if inner.failing {
                    tracing::info!(redis = %self.redis_display, "dashboard: Redis readable again");
                    inner.failing = false;
                }
                encode(StatusCode::OK, &view)
            }
            Err(e) => {
                // A broken or stuck connection is re-opened next time.
                if matches!(&e, SnapshotError::Deadline) || matches!(&e, SnapshotError::Store(s) if s.is_connection()) {
                    inner.conn = None;
                }
                let reason = self.scrub(e.to_string());
                if inner.failing {
                    tracing::debug!(redis = %self.redis_display, error = %reason, "dashboard: cannot read Redis");
                } else {
                    tracing::warn!(redis = %self.redis_display, error = %reason, "dashboard: cannot read Redis");
                    inner.failing = true;
                }
                let failure = Failure { error: &reason, namespace: self.namespace.name(), redis: &self.redis_display };
                encode(StatusCode::SERVICE_UNAVAILABLE, &failure)
            }
        };
        inner.last = Some((Instant::now(), answer.clone()));
        answer
    }

    /// Removes the Redis password from `text` (an error message).
    fn scrub(&self, text: String) -> String {
        match &self.password {
            Some(p) => text.replace(p.as_str(), "***"),
            None => text,
        }
    }

    /// Reads everything the page shows and records the watermark sample.
    async fn snapshot(&self, inner: &mut Inner) -> Result<View, SnapshotError> {
        let mut conn = match &inner.conn {
            Some(c) => c.clone(),
            None => {
                let c = self.redis.connect(REDIS_DEADLINE).await?;
                inner.conn = Some(c.clone());
                c
            }
        };
        let ns = meta::resolve(&mut conn, &self.namespace, self.partitions, false).await?.map_err(StoreError::from)?;
        let status = status::snapshot(&mut conn, &ns).await?;
        let parts = ns.all();
        let watermarks: Vec<Option<i64>> = if status.by_partition.is_empty() {
            vec![status.watermark]
        } else {
            status.by_partition.iter().map(|r| r.watermark).collect()
        };
        let with_watermarks: Vec<(Keys, Option<i64>)> = parts.iter().cloned().zip(watermarks).collect();
        let backlog = backlog::backlog(&mut conn, &with_watermarks, BUCKETS).await?;
        let (letters, total) = dead::list(&mut conn, &parts, LATEST_DEAD).await?;
        let at_ms = retention::server_time_ms(&mut conn, &ns.meta()).await?;
        let watermark_rate = record(&mut inner.samples, Instant::now(), status.watermark);
        Ok(View {
            namespace: status.namespace,
            redis: self.redis_display.clone(),
            clock: self.clock,
            at_ms,
            partitions: status.partitions,
            watermark: status.watermark,
            watermark_spread: status.watermark_spread,
            daemons: status.daemons,
            by_partition: status.by_partition,
            watermark_rate,
            backlog,
            input: status.input,
            output: status.output,
            dead_letters: DeadView { total, latest: letters.iter().map(DeadRow::from).collect() },
        })
    }
}

/// Serializes `value` as the body of an answer with `status`.
fn encode<T: Serialize>(status: StatusCode, value: &T) -> Answer {
    match serde_json::to_vec(value) {
        Ok(body) => Answer { status, body: Bytes::from(body) },
        Err(e) => {
            tracing::error!(error = %e, "dashboard: cannot encode the snapshot");
            Answer {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                body: Bytes::from_static(br#"{"error":"cannot encode the snapshot"}"#),
            }
        }
    }
}

/// Adds the watermark seen at `now` to `samples`, drops the samples that
/// are older than [`RATE_WINDOW`] except the newest of them (the anchor: so
/// after a pause without viewers the speed is the average over the pause),
/// and returns the speed over what remains (see [`rate`]). Without a
/// watermark, or when it went down (the keys were reset), the history
/// starts over.
fn record(samples: &mut VecDeque<Sample>, now: Instant, watermark: Option<i64>) -> Option<f64> {
    let Some(watermark) = watermark else {
        samples.clear();
        return None;
    };
    if samples.back().is_some_and(|s| s.watermark > watermark) {
        samples.clear();
    }
    samples.push_back(Sample { at: now, watermark });
    while samples.get(1).is_some_and(|s| now.duration_since(s.at) >= RATE_WINDOW) {
        samples.pop_front();
    }
    rate(samples)
}

/// Units per second between the oldest and the newest sample, or `None`
/// while they span less than [`RATE_MIN_SPAN`].
fn rate(samples: &VecDeque<Sample>) -> Option<f64> {
    let (first, last) = (samples.front()?, samples.back()?);
    let span = last.at.checked_duration_since(first.at)?;
    if span < RATE_MIN_SPAN {
        return None;
    }
    // i128: the difference of two ts may not fit in i64.
    let moved = i128::from(last.watermark) - i128::from(first.watermark);
    Some(moved as f64 / span.as_secs_f64())
}

/// `GET /`: the page.
async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8")),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP)),
            (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
            (header::REFERRER_POLICY, HeaderValue::from_static("no-referrer")),
        ],
        PAGE,
    )
        .into_response()
}

/// `GET /api/dashboard`: the snapshot as JSON (503 with `error` when Redis
/// cannot be read).
async fn api(State(dashboard): State<Arc<Dashboard>>) -> Response {
    let Answer { status, body } = dashboard.answer().await;
    let headers: [(HeaderName, HeaderValue); 3] = [
        (header::CONTENT_TYPE, HeaderValue::from_static("application/json")),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
    ];
    (status, headers, body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    #[test]
    fn no_rate_until_the_samples_span_a_second() {
        let t = Instant::now();
        let mut s = VecDeque::new();
        assert_eq!(record(&mut s, t, Some(100)), None);
        assert_eq!(record(&mut s, at(t, 999), Some(200)), None);
        assert_eq!(record(&mut s, at(t, 2_000), Some(300)), Some(100.0));
    }

    #[test]
    fn rate_is_measured_over_the_window() {
        let t = Instant::now();
        let mut s = VecDeque::new();
        record(&mut s, t, Some(0));
        record(&mut s, at(t, 5_000), Some(5_000));
        // Nothing is 10 s older than the newest but the first: 0 → 12 s.
        assert_eq!(record(&mut s, at(t, 12_000), Some(24_000)), Some(2_000.0));
        // Now the sample at 5 s is 10 s old and anchors: 5 s → 15 s moved 30,000.
        assert_eq!(record(&mut s, at(t, 15_000), Some(35_000)), Some(3_000.0));
        assert_eq!(s.iter().map(|x| x.watermark).collect::<Vec<_>>(), [5_000, 24_000, 35_000]);
        // After a minute without viewers: the average over that minute.
        assert_eq!(record(&mut s, at(t, 75_000), Some(95_000)), Some(1_000.0));
        assert_eq!(s.len(), 2);
        // A steady watermark moves at 0/s.
        let mut s = VecDeque::new();
        record(&mut s, t, Some(7));
        assert_eq!(record(&mut s, at(t, 1_500), Some(7)), Some(0.0));
    }

    #[test]
    fn history_restarts_without_a_watermark_or_when_it_goes_down() {
        let t = Instant::now();
        let mut s = VecDeque::new();
        record(&mut s, t, Some(1_000));
        assert_eq!(record(&mut s, at(t, 2_000), None), None);
        assert!(s.is_empty());
        record(&mut s, at(t, 3_000), Some(1_000));
        assert_eq!(record(&mut s, at(t, 5_000), Some(10)), None);
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn extreme_watermarks_do_not_overflow() {
        let t = Instant::now();
        let max = (1i64 << 53) - 1;
        let mut s = VecDeque::new();
        record(&mut s, t, Some(-max));
        let r = record(&mut s, at(t, 2_000), Some(max)).expect("a rate");
        assert_eq!(r, max as f64);
    }

    #[test]
    fn the_page_is_self_contained() {
        // No external scripts, styles, fonts or images: works offline.
        for needle in ["http://", "https://", "src=", "@import", "url("] {
            assert!(!PAGE.contains(needle), "dashboard.html contains {needle:?}");
        }
        assert!(PAGE.contains("api/dashboard"), "the page polls the JSON endpoint");
    }
}
