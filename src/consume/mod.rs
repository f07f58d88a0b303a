//! The consumer runtime: reads one consumer group of the output stream with
//! bounded concurrency, acknowledges what its handler finished, retries
//! failures, dead-letters poison elements, takes over the work of dead
//! consumers, and drains on shutdown. `tidemark consume` is this runtime
//! running a command per element ([`command`]).
//!
//! ```no_run
//! use std::time::Duration;
//! use tidemark::consume::{ConsumerBuilder, Element};
//! use tidemark::store::Keys;
//! use tokio_util::sync::CancellationToken;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let client = redis::Client::open("redis://127.0.0.1:6379")?;
//! let consumer = ConsumerBuilder::new(client, Keys::new("tidemark", "default"), "billing")
//!     .consumer("billing-1")
//!     .concurrency(8)
//!     .claim_idle(Duration::from_secs(30))
//!     .max_deliveries(5)
//!     .build(|element: Element| async move {
//!         println!("{} is due (ts {})", element.id_lossy(), element.ts);
//!         Ok::<(), std::io::Error>(())
//!     })?;
//! let shutdown = CancellationToken::new();
//! consumer.run(shutdown).await?;
//! # Ok(()) }
//! ```
//!
//! Semantics, precisely:
//! - **Deliveries.** An element is handed to a handler at most
//!   `max_deliveries` times (the group's delivery counter counts each read
//!   and each claim). When the handler fails on delivery `max_deliveries` the
//!   element goes to `:dead` at once, with the error as `detail`; an element
//!   whose last delivery never finished (its consumer died) goes there when
//!   it is next claimed. Moving and acknowledging are one atomic script.
//! - **Retries.** A failed element stays pending and is retried by whichever
//!   live consumer of the group claims it first once it has been idle for
//!   `claim_idle`. While a handler runs, its consumer keeps the entry fresh
//!   (every `claim_idle / 3`), so a long handler is not started twice.
//! - **Dead consumers.** Each consumer keeps a lease key
//!   (`<prefix>:{NS}:lease:out:<group>:<consumer>`, `SET … PX ttl`,
//!   refreshed every `ttl / 3`). Every `ttl / 2` a consumer looks at its
//!   group: a peer with pending entries and no lease is dead, and its entries
//!   are claimed at once; a dead peer with nothing pending is removed from
//!   the group after `dead_consumer_grace`. A plain `XREADGROUP` consumer
//!   (not this runtime) in the same group must keep such a lease too, or it
//!   is treated as dead.
//! - **Shutdown.** Stop reading, let running handlers finish within
//!   `shutdown_grace` (then abort them), acknowledge, and delete the lease so
//!   that peers take whatever is left at once.

mod claims;
pub mod command;
mod element;
mod json;
mod ledger;
mod reader;
pub(crate) mod rules;
mod runtime;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

pub use element::{parse as parse_element, Element};
pub use json::encode as element_json;

use crate::config::{consumer_name, ProcessEnv, Settings};
use crate::core::backoff::Backoff;
use crate::core::EntryId;
use crate::core::RetryPolicy;
use crate::health::Readiness;
use crate::store::{ConnectOptions, Endpoint, GroupStart, Mode, Namespace, StoreError};

/// Where an output entry is: its partition, and its id in that partition's
/// `:out`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct At {
    /// The partition (0 when the namespace has one).
    pub partition: u16,
    /// The entry id in the partition's `:out`.
    pub id: EntryId,
}

impl std::fmt::Display for At {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.partition {
            0 => write!(f, "{}", self.id),
            p => write!(f, "{p}/{}", self.id),
        }
    }
}

/// Time the binary allows after `shutdown_grace` for the last
/// acknowledgements and for deleting the lease.
pub const FINISH_MARGIN: Duration = Duration::from_secs(5);

/// Errors of the consumer runtime.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConsumeError {
    /// Redis failed in a way that retrying cannot fix (wrong password,
    /// server too old). Connection failures are retried, never returned.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An option is out of range.
    #[error("invalid consumer option {option}: {message}")]
    Invalid {
        /// The option's name.
        option: &'static str,
        /// What is wrong with it.
        message: String,
    },
}

impl ConsumeError {
    /// Retrying cannot help.
    pub fn is_fatal(&self) -> bool {
        match self {
            ConsumeError::Store(e) => e.is_fatal(),
            ConsumeError::Invalid { .. } => true,
        }
    }
}

/// Processes one element. `Ok` acknowledges it; `Err` leaves it pending to
/// be retried (and, on the last allowed delivery, moves it to `:dead` with
/// the error's text as `detail`). A panic counts as an `Err`.
///
/// Implemented for every `Fn(Element) -> impl Future<Output = Result<(), E>>`
/// where `E: Display`, so an async closure is a handler.
pub trait Handler: Send + Sync + 'static {
    /// Why handling failed.
    type Error: std::fmt::Display + Send + 'static;

    /// Handles `element`.
    fn handle(&self, element: Element) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

impl<F, Fut, E> Handler for F
where
    F: Fn(Element) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    type Error = E;

    fn handle(&self, element: Element) -> impl Future<Output = Result<(), E>> + Send {
        self(element)
    }
}

/// The runtime's knobs (see [`ConsumerBuilder`] for each one's meaning).
#[derive(Debug, Clone)]
struct Options {
    consumer: String,
    concurrency: usize,
    prefetch: usize,
    batch_size: usize,
    block: Duration,
    claim_idle: Duration,
    max_deliveries: u64,
    lease_ttl: Duration,
    dead_consumer_grace: Duration,
    shutdown_grace: Duration,
    handler_timeout: Option<Duration>,
    ack_interval: Duration,
    retry: RetryPolicy,
    readiness: Readiness,
    from: GroupStart,
}

/// Builds a [`Consumer`]. Defaults are those of `config/tidemark.toml`.
#[derive(Debug, Clone)]
#[must_use]
pub struct ConsumerBuilder {
    client: redis::Client,
    connect: ConnectOptions,
    redis_display: String,
    namespace: Namespace,
    partitions: Option<u16>,
    mode: Mode,
    certs: Option<redis::TlsCertificates>,
    redis: Option<Endpoint>,
    group: String,
    opts: Options,
}

impl ConsumerBuilder {
    /// A consumer of `group` on the output of namespace `namespace` (a
    /// [`Namespace`], or the [`Keys`](crate::store::Keys) of an unpartitioned one), connecting
    /// with `client` (a server, or any node of a cluster). The partition
    /// count is taken from the namespace's record. The consumer name
    /// defaults to `$POD_NAME`, then the host name.
    pub fn new(client: redis::Client, namespace: impl Into<Namespace>, group: impl Into<String>) -> Self {
        let raw = crate::config::RawConfig::defaults();
        // host:port or a socket path: never a password.
        let redis_display = client.get_connection_info().addr().to_string();
        ConsumerBuilder {
            client,
            connect: ConnectOptions {
                connect_timeout: raw.redis.connect_timeout,
                response_timeout: raw.redis.response_timeout,
            },
            redis_display,
            namespace: namespace.into(),
            partitions: None,
            mode: Mode::Auto,
            certs: None,
            redis: None,
            group: group.into(),
            opts: Options {
                consumer: consumer_name("", &ProcessEnv),
                concurrency: raw.consume.concurrency,
                prefetch: raw.consume.prefetch,
                batch_size: raw.consume.batch_size,
                block: raw.consume.block,
                claim_idle: raw.consume.claim_idle,
                max_deliveries: raw.consume.max_deliveries,
                lease_ttl: raw.lease.ttl,
                dead_consumer_grace: raw.lease.dead_consumer_grace,
                shutdown_grace: raw.consume.shutdown_grace,
                handler_timeout: None,
                ack_interval: Duration::from_millis(5),
                retry: RetryPolicy::new(
                    Backoff::try_new(raw.daemon.reconnect_min, raw.daemon.reconnect_max)
                        .expect("the built-in reconnect bounds are valid"),
                ),
                readiness: Readiness::default(),
                from: GroupStart::Start,
            },
        }
    }

    /// A consumer of `group` configured by `settings` (`[consume]`,
    /// `[lease]`, the reconnect backoff and the Redis connection).
    pub fn from_settings(settings: &Settings, group: impl Into<String>) -> Self {
        let c = &settings.consume;
        ConsumerBuilder {
            client: settings.redis.client().clone(),
            connect: settings.connect.clone(),
            redis_display: settings.redis_display.clone(),
            namespace: settings.namespace.clone(),
            partitions: settings.partitions,
            mode: Mode::Auto,
            certs: None,
            redis: Some(settings.redis.clone()),
            group: group.into(),
            opts: Options {
                consumer: c.consumer.clone(),
                concurrency: c.concurrency,
                prefetch: c.prefetch,
                batch_size: c.batch_size,
                block: c.block,
                claim_idle: c.claim_idle,
                max_deliveries: c.max_deliveries,
                lease_ttl: settings.lease.ttl,
                dead_consumer_grace: settings.lease.dead_consumer_grace,
                shutdown_grace: c.shutdown_grace,
                handler_timeout: None,
                ack_interval: Duration::from_millis(5),
                retry: settings.daemon.retry,
                readiness: Readiness::default(),
                from: c.from,
            },
        }
    }

    /// This consumer's name in the group; must be unique among the group's
    /// live consumers (a restart may reuse it: it resumes its own pending
    /// entries at once).
    pub fn consumer(mut self, name: impl Into<String>) -> Self {
        self.opts.consumer = name.into();
        self
    }

    /// Connection timeouts.
    pub fn connect_options(mut self, connect: ConnectOptions) -> Self {
        self.connect = connect;
        self
    }

    /// Most handlers running at once (default 16). Never more entries are
    /// read than there are free slots plus [`ConsumerBuilder::prefetch`].
    pub fn concurrency(mut self, n: usize) -> Self {
        self.opts.concurrency = n;
        self
    }

    /// Elements read ahead of free handler slots (default 0): a read may
    /// bring up to `concurrency + prefetch` elements in all, so handlers
    /// that finish find the next element here instead of waiting for a
    /// round trip to Redis. Read-ahead elements are held (kept fresh, never
    /// claimed by peers) like running ones; at shutdown the unstarted ones
    /// are left pending for the group's other consumers.
    pub fn prefetch(mut self, n: usize) -> Self {
        self.opts.prefetch = n;
        self
    }

    /// Most entries per read or claim (default 100).
    pub fn batch_size(mut self, n: usize) -> Self {
        self.opts.batch_size = n;
        self
    }

    /// How long one `XREADGROUP` blocks (default 2 s).
    pub fn block(mut self, d: Duration) -> Self {
        self.opts.block = d;
        self
    }

    /// A failed element is retried once idle this long (default 30 s).
    pub fn claim_idle(mut self, d: Duration) -> Self {
        self.opts.claim_idle = d;
        self
    }

    /// Deliveries before an element goes to `:dead` (default 5).
    pub fn max_deliveries(mut self, n: u64) -> Self {
        self.opts.max_deliveries = n;
        self
    }

    /// Lifetime of the liveness lease (default 5 s, at least 300 ms). A dead
    /// consumer's entries are taken over about this long after it died.
    pub fn lease_ttl(mut self, d: Duration) -> Self {
        self.opts.lease_ttl = d;
        self
    }

    /// A dead consumer with nothing pending is removed from the group once
    /// idle this long (default 60 s).
    pub fn dead_consumer_grace(mut self, d: Duration) -> Self {
        self.opts.dead_consumer_grace = d;
        self
    }

    /// Time running handlers get to finish after shutdown (default 10 s).
    pub fn shutdown_grace(mut self, d: Duration) -> Self {
        self.opts.shutdown_grace = d;
        self
    }

    /// A handler running longer is cancelled (dropped), which counts as a
    /// failure (default: no limit).
    pub fn handler_timeout(mut self, d: Duration) -> Self {
        self.opts.handler_timeout = Some(d);
        self
    }

    /// Acknowledgements are sent in batches at most this late (default 5 ms).
    pub fn ack_interval(mut self, d: Duration) -> Self {
        self.opts.ack_interval = d;
        self
    }

    /// The reconnect backoff after lost connections (other Redis failures,
    /// such as a full or loading Redis, are retried no faster than their
    /// class allows: see [`RetryPolicy`]).
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.opts.retry = RetryPolicy::new(backoff);
        self
    }

    /// Where the group starts reading if it does not exist yet (default
    /// [`GroupStart::Start`]: every entry still in `:out`; [`GroupStart::New`]:
    /// only what is released from now on). An existing group is left as
    /// it is.
    pub fn start_from(mut self, from: GroupStart) -> Self {
        self.opts.from = from;
        self
    }

    /// Where the runtime reports whether it is connected and set up, or
    /// shutting down (what `/readyz` answers from).
    pub fn readiness(mut self, readiness: Readiness) -> Self {
        self.opts.readiness = readiness;
        self
    }

    /// Validates the options and attaches `handler`.
    pub fn build<H: Handler>(self, handler: H) -> Result<Consumer<H>, ConsumeError> {
        let invalid = |option: &'static str, message: String| ConsumeError::Invalid { option, message };
        let o = &self.opts;
        if self.group.is_empty() || self.group.chars().any(char::is_control) {
            return Err(invalid("group", "must be non-empty, without control characters".into()));
        }
        rules::check(&rules::Knobs {
            consumer: &o.consumer,
            concurrency: o.concurrency,
            prefetch: o.prefetch,
            batch_size: o.batch_size,
            max_deliveries: o.max_deliveries,
            block: o.block,
            claim_idle: o.claim_idle,
            shutdown_grace: o.shutdown_grace,
            lease_ttl: o.lease_ttl,
            dead_consumer_grace: o.dead_consumer_grace,
        })
        .map_err(|(option, message)| invalid(option, message))?;
        // Knobs only the library has.
        if o.ack_interval.is_zero() {
            return Err(invalid("ack_interval", "must be greater than zero".into()));
        }
        if o.handler_timeout.is_some_and(|d| d.is_zero()) {
            return Err(invalid("handler_timeout", "must be greater than zero".into()));
        }
        let redis = match self.redis {
            Some(redis) => redis.with_options(self.connect),
            _ => Endpoint::new(self.client, self.certs, self.mode, self.connect),
        };
        Ok(Consumer {
            redis,
            redis_display: self.redis_display,
            namespace: self.namespace,
            partitions: self.partitions,
            group: self.group,
            opts: self.opts,
            handler: Arc::new(handler),
        })
    }
}

/// A configured consumer; [`Consumer::run`] runs it.
pub struct Consumer<H> {
    redis: Endpoint,
    redis_display: String,
    namespace: Namespace,
    partitions: Option<u16>,
    group: String,
    opts: Options,
    handler: Arc<H>,
}

impl<H: Handler> Consumer<H> {
    /// The consumer's name in its group.
    pub fn name(&self) -> &str {
        &self.opts.consumer
    }

    /// Runs until `shutdown` is cancelled and the drain is over. Redis
    /// failures are retried with backoff; only what retrying cannot fix is
    /// returned.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ConsumeError> {
        runtime::run(self, shutdown).await
    }
}
