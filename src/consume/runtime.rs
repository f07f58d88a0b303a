//! The consumer's event loop: one reader, up to `concurrency` handler tasks,
//! batched acknowledgements, periodic claims, touches and peer scans, and a
//! drain on shutdown. Handler tasks outlive Redis sessions, so a reconnect
//! never interrupts work in flight.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::{JoinError, JoinHandle, JoinSet};
use tokio::time::{interval, sleep_until, Instant, Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::element::{self, Element};
use super::ledger::{Ledger, Settled};
use super::reader::OutputReader;
use super::At;
use super::{ConsumeError, Consumer, Handler, FINISH_MARGIN};
use crate::core::op::Field;
use crate::core::EntryId;
use crate::metrics::ConsumerMetrics;
use crate::store::scripts::Condemned;
use crate::store::{self, meta, Conn, Keys, Reconnect, Scripts, StoreError, StreamEntry};

/// Longest `detail` written to `:dead` (a handler's error can be huge).
pub(super) const MAX_DETAIL: usize = 2000;

/// Scheduler rounds given to just-started handlers before the next read.
const QUICK_ROUNDS: usize = 4;

/// A read in flight; it hands the reader back with its result.
type ReadFuture = Pin<Box<dyn Future<Output = (OutputReader, Result<Vec<(At, StreamEntry)>, StoreError>)> + Send>>;
type TaskResult = Result<(), String>;

/// A handler task's element, for logs.
struct Running {
    /// The output entry it handles.
    entry: At,
    /// The element id.
    id: String,
}

/// Counters for the closing log line.
#[derive(Default)]
pub(super) struct Counters {
    pub(super) handled: u64,
    pub(super) failed: u64,
    pub(super) dead: u64,
}

pub(super) struct Runtime<H> {
    /// Configuration and handler.
    pub(super) c: Consumer<H>,
    /// The consumer's scripts.
    pub(super) scripts: Scripts,
    /// Running handlers. Outlives sessions: a reconnect does not stop work.
    pub(super) tasks: JoinSet<TaskResult>,
    /// What each running task handles.
    tasks_of: HashMap<tokio::task::Id, Running>,
    /// Which entries this consumer holds, and in which state: queued (read
    /// ahead up to `prefetch`, or claimed beyond the free slots by at most
    /// one batch), running, awaiting ack, or bound for `:dead`.
    pub(super) ledger: Ledger<At, Element>,
    /// Each partition's keys, once the namespace's layout is known.
    pub(super) parts: Vec<Keys>,
    /// When the buffered acknowledgements must go out.
    pub(super) flush_at: Option<Instant>,
    /// Where the next idle claim scan goes on: a partition, and the cursor
    /// in it.
    pub(super) cursor: (u16, EntryId),
    /// Set once shutdown began: the deadline of the drain.
    pub(super) stopping: Option<Instant>,
    /// The namespace's partition count changed (a `repartition`): no more
    /// reads or claims; the entries in hand are finished and acknowledged
    /// in the layout they came from, then the next session reads the new
    /// one.
    pub(super) relayout: bool,
    /// Our own pending entries (from a previous run under this name) have
    /// been taken up.
    pub(super) resumed: bool,
    /// The lease keeper and its stop signal, once started.
    pub(super) lease: Option<(JoinHandle<()>, CancellationToken)>,
    /// Counters.
    pub(super) counters: Counters,
    /// The same counts (and more) for `/metrics`.
    pub(super) metrics: ConsumerMetrics,
}

/// Runs `consumer` until shutdown (see [`Consumer::run`]).
pub(super) async fn run<H: Handler>(consumer: Consumer<H>, shutdown: CancellationToken) -> Result<(), ConsumeError> {
    let mut rt = Runtime {
        scripts: Scripts::new(),
        tasks: JoinSet::new(),
        tasks_of: HashMap::new(),
        ledger: Ledger::new(consumer.opts.concurrency, consumer.opts.prefetch, consumer.opts.max_deliveries),
        flush_at: None,
        parts: Vec::new(),
        cursor: (0, EntryId::ZERO),
        stopping: None,
        resumed: false,
        relayout: false,
        lease: None,
        counters: Counters::default(),
        metrics: ConsumerMetrics::new(&consumer.group),
        c: consumer,
    };
    let result = rt.run(&shutdown).await;
    rt.stop_lease().await;
    let Counters { handled, failed, dead } = rt.counters;
    info!(group = %rt.c.group, consumer = %rt.c.opts.consumer, handled, failed, dead, "consumer stopped");
    result
}

impl<H: Handler> Runtime<H> {
    async fn run(&mut self, shutdown: &CancellationToken) -> Result<(), ConsumeError> {
        let o = &self.c.opts;
        info!(
            redis = %self.c.redis_display,
            namespace = %self.c.namespace.name(),
            group = %self.c.group,
            consumer = %o.consumer,
            concurrency = o.concurrency,
            max_deliveries = o.max_deliveries,
            claim_idle = ?o.claim_idle,
            lease_ttl = ?o.lease_ttl,
            "consumer starting"
        );
        let mut reconnect = Reconnect::new("consumer", o.retry).readiness(o.readiness.clone());
        loop {
            match self.session(shutdown, &mut reconnect).await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_fatal() => {
                    self.c.opts.readiness.set_unavailable(e.fault(), &e);
                    self.tasks.abort_all();
                    return Err(e.into());
                }
                Err(e) => {
                    // Running handlers go on while Redis is unavailable.
                    let delay = reconnect.down(&e);
                    if self.stopping.is_some() && self.tasks.is_empty() {
                        self.final_flush().await;
                        return Ok(());
                    }
                    self.wait_offline(delay, shutdown).await;
                    if self.stopping.is_some() && self.tasks.is_empty() {
                        self.final_flush().await;
                        return Ok(());
                    }
                }
            }
        }
    }

    /// One connected period: until the drain is over (`Ok`) or Redis fails.
    /// A reconnect (an earlier session was set up) is counted once set up.
    async fn session(&mut self, shutdown: &CancellationToken, reconnect: &mut Reconnect) -> Result<(), StoreError> {
        let c = &self.c;
        let o = &c.opts;
        let response = c.redis.options().response_timeout;
        let mut conn = c.redis.connect(response).await?;
        let mut ns = meta::resolve(&mut conn, &c.namespace, c.partitions, false).await??;
        // Entries in hand are acknowledged in the layout they came from.
        self.relayout = !self.parts.is_empty() && usize::from(ns.partitions()) != self.parts.len() && !self.idle();
        if self.relayout {
            ns = ns.with_partitions(self.parts.len() as u16);
        }
        let version = store::check_version(&mut conn, &ns.meta()).await?;
        let parts = ns.all();
        for keys in &parts {
            if store::ensure_group_from(&mut conn, &keys.out, &c.group, o.from).await? {
                info!(group = %c.group, stream = %keys.out, at = %o.from.id(), "created output group");
            }
        }
        self.scripts.load(&mut conn).await?;
        // The reader's blocking XREADGROUP would hold up every other command
        // queued behind it on a shared connection.
        let mut reader = Some(OutputReader::open(&c.redis, &conn, &parts, response, o.block).await?);
        self.parts = parts;
        if self.lease.is_none() {
            self.start_lease(&mut conn).await?;
        }
        if reconnect.up() {
            self.metrics.reconnects.increment(1);
        }
        info!(
            redis_version = %version,
            group = %self.c.group,
            consumer = %self.c.opts.consumer,
            partitions = self.parts.len(),
            "connected to Redis; consuming"
        );
        self.flush(&mut conn).await?;
        if !self.resumed && self.stopping.is_none() {
            self.resume_own(&mut conn).await?;
            self.resumed = true;
        }

        let o = &self.c.opts;
        let mut claim_tick = ticker((o.claim_idle / 4).min(Duration::from_secs(5)));
        let mut touch_tick = ticker(o.claim_idle / 3);
        let mut peer_tick = ticker(o.lease_ttl / 2);
        // At most one read in flight; it asks for no more than the free
        // slots at the time plus the read-ahead allowance (claims meanwhile
        // may overfill the queue by at most one batch).
        let mut read: Option<ReadFuture> = None;
        loop {
            self.start_queued();
            self.metrics.queued.set(self.ledger.queued() as f64);
            if self.stopping.is_some() && self.tasks.is_empty() {
                break;
            }
            if read.is_none()
                && self.stopping.is_none()
                && !self.relayout
                && self.ledger.queued() <= self.c.opts.prefetch / 2
            {
                // Let the handlers just started run first: quick ones finish,
                // and the read asks for all the slots they free at once
                // instead of a few at a time. A few scheduler rounds at most,
                // and only while handlers keep finishing.
                for _ in 0..QUICK_ROUNDS {
                    if self.ledger.running() == 0 {
                        break;
                    }
                    tokio::task::yield_now().await;
                    let before = self.ledger.running();
                    while let Some(joined) = self.tasks.try_join_next_with_id() {
                        self.settle(joined);
                    }
                    if self.ledger.running() == before {
                        break;
                    }
                }
                let free = self.ledger.free_for_read();
                if free > 0 {
                    if let Some(conn) = reader.take() {
                        read = Some(self.read(conn, free.min(self.c.opts.batch_size)));
                    }
                }
            }
            let deadline = self.stopping;
            let flush_at = self.flush_at;
            tokio::select! {
                biased;
                _ = shutdown.cancelled(), if deadline.is_none() => {
                    // Entries of a read still in flight stay pending here;
                    // the lease goes away on exit, so peers take them at once.
                    read = None;
                    self.begin_stop();
                }
                _ = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    self.abort_running().await;
                }
                // Polled before the arms below run, so a new read is on its
                // way to Redis while they (an acknowledgement, a claim) wait
                // for their own replies.
                (back, entries) = async { read.as_mut().expect("guarded").await }, if read.is_some() => {
                    read = None;
                    reader = Some(back);
                    self.accept_new(entries?);
                }
                Some(joined) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    self.settle(joined);
                    // Every other handler that has finished too, so the next
                    // read asks for all the slots they freed at once.
                    while let Some(joined) = self.tasks.try_join_next_with_id() {
                        self.settle(joined);
                    }
                }
                _ = sleep_until(flush_at.unwrap_or_else(Instant::now)), if flush_at.is_some() => {
                    self.flush(&mut conn).await?;
                }
                _ = touch_tick.tick() => self.touch(&mut conn).await?,
                _ = claim_tick.tick(), if deadline.is_none() && !self.relayout => self.claim_idle(&mut conn).await?,
                _ = peer_tick.tick(), if deadline.is_none() => {
                    if !self.relayout {
                        self.scan_peers(&mut conn).await?;
                    }
                    self.check_layout(&mut conn).await?;
                }
            }
        }
        self.flush(&mut conn).await?;
        Ok(())
    }

    /// Nothing in hand and nothing to send.
    pub(super) fn idle(&self) -> bool {
        self.ledger.held().next().is_none() && self.ledger.nothing_to_flush()
    }

    fn read(&self, mut reader: OutputReader, count: usize) -> ReadFuture {
        let group = self.c.group.clone();
        let me = self.c.opts.consumer.clone();
        let block = self.c.opts.block;
        Box::pin(async move {
            let result = reader.read(&group, &me, count, block).await;
            (reader, result)
        })
    }

    // Leases, claims and peers: see `claims.rs`.

    fn accept_new(&mut self, entries: Vec<(At, StreamEntry)>) {
        for (at, e) in entries {
            // A new delivery always has fields; `None` means deleted.
            if let Some(fields) = e.fields {
                self.accept(at, fields, 1);
            }
        }
    }

    /// Queues an element delivered to us, or dead-letters an entry that is
    /// not an element.
    pub(super) fn accept(&mut self, entry: At, fields: Vec<Field>, delivery: u64) {
        if self.ledger.holds(&entry) {
            debug!(entry = %entry, "entry is already being handled here; ignoring its extra delivery");
            return;
        }
        match element::parse(entry.id, fields, delivery) {
            Ok(mut el) => {
                el.partition = entry.partition;
                self.ledger.accept(entry, delivery, el);
            }
            Err(rejection) => {
                warn!(
                    entry = %entry,
                    reason = %rejection.reason,
                    detail = %rejection.detail,
                    "output entry is not an element; moving it to the dead-letter stream"
                );
                self.ledger.reject(entry, rejection.reason, rejection.detail);
                self.schedule_flush();
            }
        }
    }

    fn start_queued(&mut self) {
        while let Some((entry, delivery, el)) = self.ledger.start_next() {
            self.start(entry, delivery, el);
        }
        self.metrics.in_flight.set(self.ledger.running() as f64);
    }

    fn start(&mut self, entry: At, delivery: u64, el: Element) {
        let handler = Arc::clone(&self.c.handler);
        let timeout = self.c.opts.handler_timeout;
        let running = Running { entry, id: el.id_lossy().into_owned() };
        debug!(id = %running.id, entry = %entry, delivery, "handling element");
        let task = self.tasks.spawn(async move {
            let handled = handler.handle(el);
            match timeout {
                None => handled.await.map_err(|e| e.to_string()),
                Some(limit) => match tokio::time::timeout(limit, handled).await {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(_) => Err(format!("the handler did not finish within {limit:?}")),
                },
            }
        });
        self.tasks_of.insert(task.id(), running);
    }

    /// Records a finished handler: success is acknowledged at the next
    /// flush; failure stays pending for a retry, or goes to `:dead` when it
    /// was the last allowed delivery.
    fn settle(&mut self, joined: Result<(tokio::task::Id, TaskResult), JoinError>) {
        let (task, result) = match joined {
            Ok((task, result)) => (task, result),
            Err(e) if e.is_panic() => {
                let task = e.id();
                (task, Err(format!("the handler panicked: {}", panic_message(e))))
            }
            Err(e) => {
                // Aborted at the end of the shutdown grace: unfinished, not
                // failed. It stays pending for another consumer.
                if let Some(r) = self.tasks_of.remove(&e.id()) {
                    self.ledger.abandon(r.entry);
                }
                self.metrics.in_flight.set(self.ledger.running() as f64);
                return;
            }
        };
        let Some(r) = self.tasks_of.remove(&task) else { return };
        let result = result.map_err(truncate);
        let settled = self.ledger.settle(r.entry, result);
        self.metrics.in_flight.set(self.ledger.running() as f64);
        let max = self.c.opts.max_deliveries;
        match settled {
            (Settled::Ack, _) => {
                self.counters.handled += 1;
                self.metrics.handled.increment(1);
                debug!(id = %r.id, entry = %r.entry, "element handled");
                self.schedule_flush();
            }
            (Settled::Dead { delivery }, error) => {
                self.counters.failed += 1;
                self.metrics.failed.increment(1);
                warn!(
                    id = %r.id,
                    entry = %r.entry,
                    delivery,
                    max_deliveries = max,
                    error = %error.unwrap_or_default(),
                    "handler failed on the last allowed delivery; moving the element to the dead-letter stream"
                );
                self.schedule_flush();
            }
            (Settled::Retry { delivery }, error) => {
                self.counters.failed += 1;
                self.metrics.failed.increment(1);
                warn!(
                    id = %r.id,
                    entry = %r.entry,
                    delivery,
                    max_deliveries = max,
                    error = %error.unwrap_or_default(),
                    retry_after = ?self.c.opts.claim_idle,
                    "handler failed; the element will be retried"
                );
            }
            (Settled::Unknown, _) => {}
        }
    }

    pub(super) fn schedule_flush(&mut self) {
        let now = Instant::now();
        let at = if self.ledger.to_flush() >= self.c.opts.batch_size { now } else { now + self.c.opts.ack_interval };
        self.flush_at = Some(self.flush_at.map_or(at, |t| t.min(at)));
    }

    /// Sends the buffered acknowledgements and dead letters. On failure they
    /// stay buffered for the next session.
    async fn flush(&mut self, conn: &mut Conn) -> Result<(), StoreError> {
        self.flush_at = None;
        let c = &self.c;
        if !self.ledger.acks().is_empty() {
            for (p, ids) in by_partition(self.ledger.acks().iter().copied()) {
                store::ack_output(conn, &self.parts[usize::from(p)], &c.group, &ids).await?;
            }
            self.ledger.acked();
        }
        if !self.ledger.condemned().is_empty() {
            let mut moved: HashSet<At> = HashSet::new();
            let doomed = self.ledger.condemned();
            for p in 0..self.parts.len() as u16 {
                let letters: Vec<Condemned> = doomed
                    .iter()
                    .filter(|d| d.key.partition == p)
                    .map(|d| Condemned { id: d.key.id, reason: d.reason, detail: d.detail.clone() })
                    .collect();
                if letters.is_empty() {
                    continue;
                }
                let keys = &self.parts[usize::from(p)];
                let ids = self.scripts.dead_letter(conn, keys, &c.group, &c.opts.consumer, &letters).await?;
                moved.extend(ids.into_iter().map(|id| At { partition: p, id }));
            }
            for letter in self.ledger.condemned_sent() {
                if moved.contains(&letter.key) {
                    self.counters.dead += 1;
                    crate::metrics::record_dead_letters(letter.reason.code(), 1);
                    info!(entry = %letter.key, reason = %letter.reason, "moved to the dead-letter stream");
                } else {
                    info!(entry = %letter.key, "not dead-lettered: another consumer has taken the entry over");
                }
            }
        }
        Ok(())
    }

    fn begin_stop(&mut self) {
        self.c.opts.readiness.set_shutting_down();
        let grace = self.c.opts.shutdown_grace;
        self.stopping = Some(Instant::now() + grace);
        self.ledger.begin_stop();
        info!(
            running = self.ledger.running(),
            grace = ?grace,
            "stopping: no more reads; waiting for running handlers (unstarted elements stay pending for peers)"
        );
    }

    async fn abort_running(&mut self) {
        warn!(
            running = self.ledger.running(),
            "handlers did not finish within the shutdown grace period; aborting them (their elements stay pending \
             for other consumers)"
        );
        self.tasks.abort_all();
        while let Some(joined) = self.tasks.join_next_with_id().await {
            self.settle(joined);
        }
    }

    /// Between sessions: keeps settling handlers and watching for shutdown
    /// until `delay` is over.
    async fn wait_offline(&mut self, delay: Duration, shutdown: &CancellationToken) {
        let until = Instant::now() + delay;
        loop {
            self.start_queued();
            if self.stopping.is_some() && self.tasks.is_empty() {
                return;
            }
            let deadline = self.stopping;
            tokio::select! {
                biased;
                _ = shutdown.cancelled(), if deadline.is_none() => self.begin_stop(),
                _ = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    self.abort_running().await;
                }
                Some(joined) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => self.settle(joined),
                _ = sleep_until(until) => return,
            }
        }
    }

    /// The last attempt to send acknowledgements while Redis is failing.
    async fn final_flush(&mut self) {
        if self.ledger.nothing_to_flush() {
            return;
        }
        let redis = self.c.redis.clone();
        let attempt = async {
            let mut conn = redis.connect(redis.options().response_timeout).await?;
            self.flush(&mut conn).await
        };
        let result = tokio::time::timeout(FINISH_MARGIN / 3, attempt).await;
        if !matches!(result, Ok(Ok(()))) {
            warn!(
                unacknowledged = self.ledger.acks().len(),
                "Redis is unreachable: handled elements could not be acknowledged and will be processed again"
            );
        }
    }
}

/// Groups entries by partition (each partition's ids in order).
pub(super) fn by_partition(entries: impl Iterator<Item = At>) -> Vec<(u16, Vec<EntryId>)> {
    let mut groups: std::collections::BTreeMap<u16, Vec<EntryId>> = std::collections::BTreeMap::new();
    for at in entries {
        groups.entry(at.partition).or_default().push(at.id);
    }
    groups
        .into_iter()
        .map(|(p, mut ids)| {
            ids.sort_unstable();
            (p, ids)
        })
        .collect()
}

fn ticker(period: Duration) -> Interval {
    let mut t = interval(period.max(Duration::from_millis(10)));
    t.set_missed_tick_behavior(MissedTickBehavior::Delay);
    t
}

fn panic_message(e: JoinError) -> String {
    let payload = e.into_panic();
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".into()
    }
}

/// Bounds a handler's error text (it becomes a dead letter's `detail`).
fn truncate(mut s: String) -> String {
    if s.len() > MAX_DETAIL {
        let mut end = MAX_DETAIL;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncates_on_a_char_boundary() {
        assert_eq!(truncate("abc".into()), "abc");
        let long = "é".repeat(MAX_DETAIL);
        let t = truncate(long);
        assert!(t.len() <= MAX_DETAIL + '…'.len_utf8());
        assert!(t.ends_with('…'));
    }
}
