//! The HTTP endpoint of `tidemark run` and `tidemark consume`: `/healthz`,
//! `/readyz`, `/metrics` (Prometheus text format) and the dashboard's
//! routes, on one port.

pub mod dashboard;
pub mod scrape;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use crate::health::{Readiness, Ready};

use crate::config::Settings;
use crate::core::Fault;
use crate::health::Stats;
use crate::store::{meta, status, Conn, StoreError};

/// Longest a scrape waits for the Redis snapshot; past it, `/metrics`
/// answers without the Redis state (and `tidemark_redis_up 0`).
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest `/readyz` waits for Redis to take its probe write.
pub const PING_TIMEOUT: Duration = Duration::from_secs(1);
/// Lifetime of the probe key `/readyz` writes.
const PROBE_TTL_MS: u64 = 10_000;
/// Time requests in flight get to finish once the work has drained.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// How often the recorder's histograms are folded (they buffer samples
/// until then or the next scrape).
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);
/// The Prometheus text exposition format.
const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    /// The address is taken, or not ours to bind.
    #[error("cannot listen for HTTP on {addr}: {source}")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The server failed while running.
    #[error("the HTTP server failed: {0}")]
    Serve(std::io::Error),
}

/// What the endpoints report on.
#[derive(Clone)]
#[non_exhaustive]
pub struct Endpoints {
    /// The configuration (Redis, namespace; passed to the dashboard).
    pub settings: Settings,
    /// The daemon's or consumer's readiness.
    pub readiness: Readiness,
    /// Cancelled when the process begins to shut down: `/readyz` answers
    /// 503 from then on, while the work drains.
    pub shutdown: CancellationToken,
    /// The daemon's counters (`None` for `tidemark consume`).
    pub stats: Option<Arc<Stats>>,
    /// The recorder of the metrics counted at their source, if installed.
    pub prometheus: Option<PrometheusHandle>,
}

impl Endpoints {
    /// Endpoints for a process configured by `settings`, reporting
    /// `readiness`, shutting down with `shutdown`.
    pub fn new(settings: Settings, readiness: Readiness, shutdown: CancellationToken) -> Self {
        Endpoints { settings, readiness, shutdown, stats: None, prometheus: None }
    }

    /// Also report a daemon's counters.
    pub fn stats(mut self, stats: Arc<Stats>) -> Self {
        self.stats = Some(stats);
        self
    }

    /// Also render the recorder of the metrics counted at their source.
    pub fn prometheus(mut self, handle: PrometheusHandle) -> Self {
        self.prometheus = Some(handle);
        self
    }
}

/// The state behind the routes.
struct Shared {
    /// What to report on.
    endpoints: Endpoints,
    /// A connection of our own for `PING` and snapshots (never the work's,
    /// so a probe cannot delay it); made on first use, dropped on error.
    conn: tokio::sync::Mutex<Option<Conn>>,
    /// Whether the last snapshot worked, so a failing Redis is logged once
    /// per outage rather than once per scrape.
    snapshot_ok: AtomicBool,
    /// The Redis password, if any: scrubbed from every reason served.
    password: Option<String>,
}

impl Shared {
    async fn conn(&self) -> Result<Conn, StoreError> {
        let mut cached = self.conn.lock().await;
        if let Some(conn) = cached.as_ref() {
            return Ok(conn.clone());
        }
        let s = &self.endpoints.settings;
        let conn = s.redis.connect(SNAPSHOT_TIMEOUT).await?;
        *cached = Some(conn.clone());
        Ok(conn)
    }

    async fn forget_conn(&self) {
        *self.conn.lock().await = None;
    }

    /// Runs `f` on our connection within `limit`; a failure drops the
    /// connection so the next call makes a new one. The error is its class
    /// and its text (the password scrubbed).
    ///
    /// A connection kept from an earlier request may have gone stale while
    /// idle (its server restarted, or turned into a replica behind the same
    /// address in a failover): when it fails that way, `f` runs once more
    /// on a new connection (resolving the name again) within what is left
    /// of `limit`, so the first request after a failover answers for the
    /// new server, not the old one. (Reads work on a replica: `/metrics`
    /// alone may read the old server, now a replica of the new one, until
    /// a `/readyz` probe's write moves the connection.)
    async fn with_redis<T, F, Fut>(&self, limit: Duration, f: F) -> Result<T, (Fault, String)>
    where
        F: Fn(Conn) -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let attempts = async {
            let kept = self.conn.lock().await.is_some();
            match f(self.conn().await?).await {
                Err(e) if kept && matches!(e.fault(), Fault::ReadOnly | Fault::Disconnected) => {
                    debug!(error = %e, "HTTP: our kept Redis connection went stale; trying a new one");
                    self.forget_conn().await;
                    f(self.conn().await?).await
                }
                result => result,
            }
        };
        let (fault, text) = match tokio::time::timeout(limit, attempts).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => (e.fault(), e.to_string()),
            Err(_) => (Fault::Unresponsive, format!("no answer within {limit:?}")),
        };
        self.forget_conn().await;
        Err((fault, self.scrub(text)))
    }

    fn scrub(&self, text: String) -> String {
        match &self.password {
            Some(p) if !p.is_empty() => text.replace(p.as_str(), "***"),
            _ => text,
        }
    }
}

/// The router: the three endpoints merged with the dashboard's routes.
pub fn router(endpoints: Endpoints) -> Router {
    let settings = endpoints.settings.clone();
    let password = settings.redis.client().get_connection_info().redis_settings().password().map(str::to_owned);
    let shared = Arc::new(Shared {
        endpoints,
        conn: tokio::sync::Mutex::new(None),
        snapshot_ok: AtomicBool::new(true),
        password,
    });
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(shared)
        .merge(dashboard::router(settings))
}

/// `/healthz`: the process is alive.
async fn healthz() -> impl IntoResponse {
    (StatusCode::OK, "ok\n")
}

/// `/readyz`: 200 while connected and Redis takes a write now; 503 with
/// the reason while starting, disconnected, unresponsive, read-only,
/// loading, out of memory, paused or shutting down.
///
/// The probe is a write (a `SET` of the namespace's probe key with a short
/// lifetime), not a `PING`: a replica, a full Redis (`noeviction`) and one
/// whose writes are paused for a failover all answer `PING`, but none of
/// them can do tidemark's work.
async fn readyz(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    let unavailable = |reason: String| (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n"));
    if s.endpoints.shutdown.is_cancelled() {
        return unavailable(Ready::ShuttingDown.to_string());
    }
    match s.endpoints.readiness.get() {
        Ready::Ready => {}
        other => return unavailable(s.scrub(other.to_string())),
    }
    let key = s.endpoints.settings.namespace.partition(0).probe();
    let probe = s
        .with_redis(PING_TIMEOUT, |mut conn| {
            let key = &key;
            async move {
                let mut set = redis::cmd("SET");
                set.arg(key).arg(1).arg("PX").arg(PROBE_TTL_MS);
                set.query_async::<()>(&mut conn).await.map_err(StoreError::from)
            }
        })
        .await;
    match probe {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err((Fault::Unresponsive, e)) => {
            unavailable(format!("Redis does not answer (or its writes are paused for a failover): {e}"))
        }
        Err((Fault::Disconnected, e)) => unavailable(format!("Redis does not answer: {e}")),
        Err((fault, e)) => unavailable(Ready::Unavailable(fault, e).to_string()),
    }
}

/// `/metrics`: the Redis snapshot and the daemon's counters read now, then
/// what was recorded at the source.
async fn metrics(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    let (ns, configured) = (s.endpoints.settings.namespace.clone(), s.endpoints.settings.partitions);
    let snapshot = s
        .with_redis(SNAPSHOT_TIMEOUT, |mut conn| {
            let ns = &ns;
            async move {
                let ns = meta::resolve(&mut conn, ns, configured, false).await??;
                status::snapshot(&mut conn, &ns).await
            }
        })
        .await;
    let status = match snapshot.map_err(|(_, text)| text) {
        Ok(status) => {
            if !s.snapshot_ok.swap(true, Ordering::Relaxed) {
                info!("metrics: reading the Redis state works again");
            }
            Some(status)
        }
        Err(e) => {
            if s.snapshot_ok.swap(false, Ordering::Relaxed) {
                warn!(error = %e, "metrics: cannot read the Redis state; serving tidemark_redis_up 0 until it works");
            } else {
                debug!(error = %e, "metrics: still cannot read the Redis state");
            }
            None
        }
    };
    let mut body = scrape::render(status.as_ref(), s.endpoints.stats.as_deref());
    if let Some(handle) = &s.endpoints.prometheus {
        body.push_str(&handle.render());
    }
    ([(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], body)
}

/// A running HTTP server.
pub struct Server {
    /// The address it listens on (the configured one, with the port the OS
    /// chose if it was 0).
    addr: SocketAddr,
    /// Tells the server (and the upkeep task) to stop.
    stop: CancellationToken,
    /// The server task.
    task: JoinHandle<Result<(), HttpError>>,
}

impl Server {
    /// Binds `addr` (failing at once if it is taken) and serves
    /// `endpoints` until [`Server::stop`].
    pub async fn start(addr: SocketAddr, endpoints: Endpoints) -> Result<Server, HttpError> {
        let listener = TcpListener::bind(addr).await.map_err(|source| HttpError::Bind { addr, source })?;
        let addr = listener.local_addr().map_err(|source| HttpError::Bind { addr, source })?;
        let stop = CancellationToken::new();
        if let Some(handle) = endpoints.prometheus.clone() {
            tokio::spawn(upkeep(handle, stop.clone()));
        }
        let app = router(endpoints);
        let graceful = stop.clone().cancelled_owned();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).with_graceful_shutdown(graceful).await.map_err(HttpError::Serve)
        });
        info!(addr = %addr, "serving /healthz, /readyz, /metrics and the dashboard over HTTP");
        Ok(Server { addr, stop, task })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, lets requests in flight finish within
    /// [`SHUTDOWN_GRACE`], then closes.
    pub async fn stop(mut self) {
        self.stop.cancel();
        match tokio::time::timeout(SHUTDOWN_GRACE, &mut self.task).await {
            Ok(Ok(Ok(()))) => debug!("HTTP server stopped"),
            Ok(Ok(Err(e))) => warn!(error = %e, "HTTP server stopped with an error"),
            Ok(Err(e)) => warn!(error = %e, "HTTP server task failed"),
            Err(_) => {
                warn!(grace = ?SHUTDOWN_GRACE, "HTTP requests still running after the grace period; closing them");
                self.task.abort();
            }
        }
    }
}

async fn upkeep(handle: PrometheusHandle, stop: CancellationToken) {
    let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => handle.run_upkeep(),
            _ = stop.cancelled() => return,
        }
    }
}
