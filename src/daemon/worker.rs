//! One partition's input, applied by the daemon that owns it: reads `:in`
//! in the input group, applies batches atomically and in order (each call
//! fenced by the owner token, so a deposed owner applies nothing),
//! releases due elements in bounded chunks, claims what dead or deposed
//! daemons left pending, and reconnects after Redis failures until its
//! ownership ends.

use std::collections::BTreeMap;
use std::ops::Bound::{Excluded, Unbounded};
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{FuturesOrdered, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio::time::{interval, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::window::{Reply, RoundEnd, Window};
use super::{record_apply, record_input_dead_letters, Stats, Validity};
use crate::config::Settings;
use crate::core::{EntryId, Fault};
use crate::store::batch::{prepare_routed, Route, MAX_BATCH_BYTES};
use crate::store::reader::StreamReader;
use crate::store::{self, Conn, Keys, Prepared, Reconnect, Scripts, StoreError, StreamEntry, INPUT_GROUP};

/// How long to wait before retrying a batch that an older entry, pending at
/// another consumer, holds back. Doubles from the first to the last value.
const BLOCKED_RETRY: (Duration, Duration) = (Duration::from_millis(2), Duration::from_millis(100));

/// Most apply calls in flight at once (see [`Worker::drain`]).
const APPLY_WINDOW: usize = 2;

/// Most batches [`Worker::drain`] takes from the reader in one call.
const DRAIN_INTAKE: usize = 16;

/// What a worker applies and until when.
pub(super) struct Job {
    /// The partition's keys.
    pub keys: Keys,
    /// Where misrouted adds and cancels are caught.
    pub route: Route,
    /// The owner token: every apply call is fenced with it.
    pub token: String,
    /// Until when ownership is certain (renewed by the coordinator).
    pub valid: Arc<Validity>,
    /// The live daemons (from the registry), for claims.
    pub live: watch::Receiver<Arc<Vec<String>>>,
    /// Cancelled when the worker must stop (handover, shutdown).
    pub stop: CancellationToken,
    /// The namespace's meta record (recreated if it vanished).
    pub meta: String,
}

/// Applies the partition's input until `job.stop` is cancelled or
/// ownership ends. Redis failures are retried here, as long as ownership
/// holds.
pub(super) async fn run(settings: Settings, stats: Arc<Stats>, job: Job) {
    let scripts = Scripts::new().clock_mode(settings.daemon.clock).dedup_window(settings.daemon.dedup_window);
    let partition = job.keys.partition;
    let mut reconnect = Reconnect::side_task("partition worker", settings.daemon.retry);
    info!(partition, "owning the partition: applying its input");
    loop {
        match session(&settings, &scripts, &stats, &job, &mut reconnect).await {
            Ok(()) => {
                debug!(partition, "partition worker stopped");
                return;
            }
            Err(e) if !job.valid.ok() || matches!(e, StoreError::Deposed(_)) => {
                info!(partition, "ownership of the partition ended here");
                return;
            }
            Err(e) => {
                if e.fault() == Fault::WrongType && reconnect.outage() != Some(Fault::WrongType) {
                    name_wrong_keys(&settings, &job.keys).await;
                }
                if !reconnect.wait(&e, &job.stop).await {
                    return;
                }
            }
        }
    }
}

/// The partition's keys, each with the type it must have.
fn expected_types(keys: &Keys) -> [(String, &'static str); 8] {
    [
        (keys.input.clone(), "stream"),
        (keys.wm.clone(), "string"),
        (keys.sched.clone(), "zset"),
        (keys.body.clone(), "hash"),
        (keys.out.clone(), "stream"),
        (keys.dead.clone(), "stream"),
        (keys.released(), "zset"),
        (keys.owner(), "string"),
    ]
}

/// After a `WRONGTYPE`, says which of the partition's keys holds what
/// (another program wrote over it), so the operator knows what to repair
/// or delete.
async fn name_wrong_keys(settings: &Settings, keys: &Keys) {
    let look = async {
        let mut conn = settings.redis.connect(settings.connect.response_timeout).await?;
        let mut wrong = Vec::new();
        for (key, want) in expected_types(keys) {
            let found: String = redis::cmd("TYPE").arg(&key).query_async(&mut conn).await?;
            if found != "none" && found != want {
                wrong.push((key, want, found));
            }
        }
        Ok::<_, StoreError>(wrong)
    };
    match look.await {
        Ok(wrong) => {
            for (key, want, found) in wrong {
                warn!(
                    key = %key,
                    expected = want,
                    found = %found,
                    "{key} holds a {found}, not a {want} (written over by another program?): the partition's work \
                     waits until it is repaired or deleted"
                );
            }
        }
        Err(e) => debug!(error = %e, "could not look at the partition's key types"),
    }
}

/// One connected period: set up, recover, then read and apply until
/// stopped (`Ok`) or a Redis failure (`Err`).
async fn session(
    settings: &Settings,
    scripts: &Scripts,
    stats: &Arc<Stats>,
    job: &Job,
    reconnect: &mut Reconnect,
) -> Result<(), StoreError> {
    let d = &settings.daemon;
    let keys = &job.keys;
    let mut conn = settings.redis.connect(settings.connect.response_timeout).await?;
    recreate(&mut conn, settings, job).await?;
    reconnect.up();
    let mut worker = Worker { settings, keys, job, scripts, stats, conn, backlog: BTreeMap::new() };
    // Our own pending entries first: a restart under the same name resumes
    // its work at once. Then what dead or deposed daemons left, then what
    // a crashed release left due.
    worker.load_own_pending().await?;
    worker.claim_from_dead_peers().await?;
    worker.release_all().await?;
    worker.drain(None).await?;
    worker.claim().await?;

    let reader_conn = settings.redis.reader(&keys.input, settings.connect.response_timeout + d.block).await?;
    let (tx, rx) = mpsc::channel(1);
    let stop_reader = job.stop.child_token();
    let reader =
        tokio::spawn(read_loop(reader_conn, settings.clone(), keys.clone(), job.route, tx, stop_reader.clone()));
    let result = worker.run(rx, &job.stop).await;
    stop_reader.cancel();
    reader.abort();
    result
}

/// What the partition needs and something may have deleted since the
/// daemon started (`XGROUP DESTROY`, `DEL` of a stream, `FLUSHALL`): the
/// input group, the configured output groups and the namespace's meta
/// record. Cheap when all exist (one refused create each).
async fn recreate(conn: &mut Conn, settings: &Settings, job: &Job) -> Result<(), StoreError> {
    let keys = &job.keys;
    if store::ensure_group(conn, &keys.input, INPUT_GROUP).await? {
        warn!(stream = %keys.input, "the input group was missing (its stream deleted, or FLUSHALL?): recreated it at id 0");
    }
    for group in &settings.daemon.groups {
        if store::ensure_group(conn, &keys.out, group).await? {
            warn!(group = %group, stream = %keys.out, "an output group was missing (deleted, or FLUSHALL?): recreated it at id 0");
        }
    }
    let recorded: bool =
        redis::cmd("HSETNX").arg(&job.meta).arg("partitions").arg(job.route.partitions).query_async(conn).await?;
    if recorded {
        warn!(key = %job.meta, "the namespace's meta record was missing (FLUSHALL?): wrote it again");
    }
    Ok(())
}

/// Reads new input in batches and hands them over parsed; reads the next
/// batch only once the previous one has been taken (backpressure), so Redis
/// can serve the next read while the applier's script runs, and parsing
/// here overlaps it too.
async fn read_loop(
    mut reader: StreamReader,
    settings: Settings,
    keys: Keys,
    route: Route,
    tx: mpsc::Sender<Result<Vec<Prepared>, StoreError>>,
    stop: CancellationToken,
) {
    let d = &settings.daemon;
    loop {
        let Ok(permit) = tx.reserve().await else { return };
        let read = tokio::select! {
            r = reader.read_group(&keys.input, INPUT_GROUP, &d.consumer, d.batch_size, d.block) => r,
            _ = stop.cancelled() => return,
        };
        match read {
            Ok(entries) if entries.is_empty() => {}
            Ok(entries) => permit.send(Ok(entries.iter().map(|e| prepare_routed(e, &d.limits, route)).collect())),
            Err(e) => {
                permit.send(Err(e));
                return;
            }
        }
    }
}

/// Adds entries the reader prepared to the backlog (keeping the first of
/// any duplicate).
fn take_prepared(backlog: &mut BTreeMap<EntryId, Prepared>, prepared: Vec<Prepared>) {
    for p in prepared {
        backlog.entry(p.id).or_insert(p);
    }
}

/// The next batch from the reader; a reader that stopped is an error.
async fn recv(
    input: &mut Option<&mut mpsc::Receiver<Result<Vec<Prepared>, StoreError>>>,
) -> Result<Vec<Prepared>, StoreError> {
    match input.as_mut() {
        Some(rx) => match rx.recv().await {
            Some(msg) => msg,
            None => Err(StoreError::Reply("the input reader stopped".into())),
        },
        None => std::future::pending().await,
    }
}

/// The applier's state within one session.
struct Worker<'a> {
    /// Validated settings.
    settings: &'a Settings,
    /// The partition's keys.
    keys: &'a Keys,
    /// What this worker may apply, and when it must stop.
    job: &'a Job,
    /// The scripts, loaded on this connection's server.
    scripts: &'a Scripts,
    /// Counters.
    stats: &'a Arc<Stats>,
    /// Connection for scripts and claims (the reader has its own, since a
    /// blocking read would stall everything queued behind it).
    conn: Conn,
    /// Entries delivered to us and not yet applied, in id order. Entries
    /// arrive from reads, from our own pending list and from claims; the map
    /// also removes duplicates among them.
    backlog: BTreeMap<EntryId, Prepared>,
}

impl Worker<'_> {
    /// Most entries held before reading more: two batches.
    fn capacity(&self) -> usize {
        self.settings.daemon.batch_size * 2
    }

    fn take(&mut self, entries: Vec<StreamEntry>) {
        let limits = &self.settings.daemon.limits;
        let route = self.job.route;
        for e in entries {
            self.backlog.entry(e.id).or_insert_with(|| prepare_routed(&e, limits, route));
        }
    }

    /// `Err(Deposed)` once ownership is no longer certain: a worker that
    /// wakes up after its lease lapsed (SIGSTOP, a long pause) must not
    /// claim what is now the new owner's. The apply script checks the owner
    /// token itself; this spares the claims and the calls that would only
    /// come back fenced.
    fn still_owner(&self) -> Result<(), StoreError> {
        if self.job.valid.ok() {
            Ok(())
        } else {
            Err(StoreError::Deposed(self.keys.partition))
        }
    }

    async fn load_own_pending(&mut self) -> Result<(), StoreError> {
        self.still_owner()?;
        let d = &self.settings.daemon;
        let mut after = EntryId::ZERO;
        let mut total = 0;
        loop {
            let entries = store::read_own_pending(&mut self.conn, self.keys, &d.consumer, after, d.batch_size).await?;
            let Some(last) = entries.last() else { break };
            after = last.id;
            total += entries.len();
            self.take(entries);
        }
        if total > 0 {
            info!(entries = total, "resuming our own pending input entries");
        }
        Ok(())
    }

    /// Claims at once the pending input of daemons whose liveness lease is
    /// gone (killed, or cut off from Redis), instead of waiting for
    /// `claim_idle`. Entries idle less than half a lease lifetime are left
    /// alone, so two daemons claiming at once do not take the same entry.
    ///
    /// Live daemons other than us are claimed from too, at once: only the
    /// partition's owner may apply its input (the others are fenced), so
    /// whatever another daemon holds is left from before ownership moved.
    async fn claim_from_dead_peers(&mut self) -> Result<(), StoreError> {
        self.still_owner()?;
        let s = self.settings;
        let me = &s.daemon.consumer;
        let peers = store::lease::peers(&mut self.conn, self.keys, &self.keys.input, "in", INPUT_GROUP).await?;
        let daemons = self.job.live.borrow().clone();
        for peer in peers.iter().filter(|p| p.pending > 0 && &p.name != me) {
            let daemon = daemons.contains(&peer.name);
            if peer.leased && !daemon {
                continue;
            }
            let min_idle = if daemon { Duration::ZERO } else { s.lease.ttl / 2 };
            let mut total = 0u64;
            // Not bounded by the backlog's capacity, like `claim`: the dead
            // peer's older entries are what our newer ones wait for. The loop
            // ends when the peer has nothing pending left.
            loop {
                self.still_owner()?;
                let entries = store::lease::claim_from_peer(
                    &mut self.conn,
                    &self.keys.input,
                    INPUT_GROUP,
                    &peer.name,
                    me,
                    min_idle,
                    s.daemon.batch_size,
                )
                .await?;
                if entries.is_empty() {
                    break;
                }
                total += entries.len() as u64;
                self.take(entries);
            }
            if total > 0 {
                self.stats.claimed.fetch_add(total, std::sync::atomic::Ordering::Relaxed);
                self.stats.failovers.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let partition = self.keys.partition;
                if daemon && peer.leased {
                    info!(peer = %peer.name, partition, entries = total, "took over the input entries of the partition's previous owner");
                } else {
                    info!(peer = %peer.name, partition, entries = total, "claimed the input entries of a daemon whose lease expired");
                }
            }
        }
        Ok(())
    }

    /// Claims input entries idle for `claim_idle` (left by dead daemons).
    ///
    /// The scan is not bounded by the backlog's capacity: when older entries
    /// of a dead daemon hold our newer ones back, a backlog full of the newer
    /// ones is exactly when the claim is needed. What can be claimed is
    /// bounded anyway: only what dead or stalled daemons had read.
    async fn claim(&mut self) -> Result<(), StoreError> {
        let d = &self.settings.daemon;
        let mut cursor = EntryId::ZERO;
        let mut total = 0u64;
        loop {
            self.still_owner()?;
            let (next, entries) =
                store::autoclaim(&mut self.conn, self.keys, &d.consumer, d.claim_idle, cursor, d.batch_size).await?;
            total += entries.len() as u64;
            self.take(entries);
            if next == EntryId::ZERO {
                break;
            }
            cursor = next;
        }
        if total > 0 {
            self.stats.claimed.fetch_add(total, std::sync::atomic::Ordering::Relaxed);
            info!(entries = total, idle = ?d.claim_idle, "claimed input entries left pending by another daemon");
        }
        Ok(())
    }

    async fn release_all(&mut self) -> Result<(), StoreError> {
        let n = self.scripts.release_all(&mut self.conn, self.keys, self.settings.daemon.release_chunk).await?;
        if n > 0 {
            self.stats.record_release(n);
            debug!(released = n, "released due elements");
        }
        Ok(())
    }

    /// Applies the backlog in id order, a batch per call, until it is empty
    /// (`Ok(false)`) or held back by an older entry elsewhere (`Ok(true)`).
    ///
    /// Up to [`APPLY_WINDOW`] calls are in flight: the next batch is sent
    /// before the reply to the previous one arrives, so Redis goes from one
    /// to the next without waiting for us. With `input`, batches the reader
    /// hands over meanwhile join the window (at most [`DRAIN_INTAKE`] per
    /// call, so the caller's timers still run under endless input).
    ///
    /// A batch sent before the previous one's outcome is known is safe: the
    /// script applies nothing while an older entry is pending, so should
    /// the previous call stop early (an older entry elsewhere, due elements
    /// to release first), the next one finds its leftovers pending and
    /// applies nothing either; its entries are simply sent again.
    async fn drain(
        &mut self,
        mut input: Option<&mut mpsc::Receiver<Result<Vec<Prepared>, StoreError>>>,
    ) -> Result<bool, StoreError> {
        let d = &self.settings.daemon;
        let mut intake = 0;
        loop {
            if self.backlog.is_empty() {
                return Ok(false);
            }
            let mut calls = FuturesOrdered::new();
            let mut window = Window::new(APPLY_WINDOW);
            loop {
                while window.may_send() {
                    let after = window.after().map_or(Unbounded, Excluded);
                    let mut bytes = 0;
                    let batch: Vec<&Prepared> = self
                        .backlog
                        .range((after, Unbounded))
                        .map(|(_, p)| p)
                        .take(d.batch_size)
                        .take_while(|p| {
                            let first = bytes == 0;
                            bytes += p.weight();
                            first || bytes <= MAX_BATCH_BYTES
                        })
                        .collect();
                    if batch.is_empty() {
                        break;
                    }
                    window.sent(batch.iter().map(|p| p.id).collect());
                    let call = self.scripts.apply_call(self.keys, &batch, d.release_chunk, Some(&self.job.token));
                    let mut conn = self.conn.clone();
                    calls.push_back(async move { call.invoke(&mut conn).await });
                }
                let room = self.backlog.len() < self.capacity() && intake < DRAIN_INTAKE;
                // Only while a call is in flight: with nothing left to send,
                // the round ends and the caller waits for input.
                let take_input = window.may_take_input() && room && input.is_some();
                let outcome = tokio::select! {
                    biased;
                    outcome = calls.next(), if window.in_flight() > 0 => match outcome {
                        Some(outcome) => outcome?,
                        None => unreachable!("polled only while calls are in flight"),
                    },
                    msg = recv(&mut input), if take_input => {
                        intake += 1;
                        take_prepared(&mut self.backlog, msg?);
                        continue;
                    }
                    else => break,
                };
                if outcome.fenced {
                    // Another daemon holds the partition now: nothing was
                    // applied, and nothing more will be from here.
                    return Err(StoreError::Deposed(self.keys.partition));
                }
                let reply =
                    Reply { processed: outcome.processed, blocked: outcome.blocked, more_due: outcome.more_due };
                let done = window.completed(reply);
                if outcome.dead > 0 {
                    let processed: Vec<&Prepared> = done.iter().filter_map(|id| self.backlog.get(id)).collect();
                    record_input_dead_letters(&processed, outcome.dead);
                    warn!(entries = outcome.dead, "malformed input entries moved to the dead-letter stream");
                }
                for id in &done {
                    self.backlog.remove(id);
                }
                record_apply(self.stats, &outcome);
                debug!(
                    processed = outcome.processed,
                    adds = outcome.adds,
                    cancels = outcome.cancels,
                    watermarks = outcome.watermarks,
                    released = outcome.released + outcome.late,
                    "applied input batch"
                );
            }
            drop(calls);
            match window.end() {
                RoundEnd::Release => self.release_all().await?,
                RoundEnd::Blocked => return Ok(true),
                RoundEnd::Again => {}
            }
        }
    }

    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Result<Vec<Prepared>, StoreError>>,
        stop: &CancellationToken,
    ) -> Result<(), StoreError> {
        let d = &self.settings.daemon;
        let mut sweep = interval(d.sweep_interval);
        sweep.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut claim = interval((d.claim_idle / 2).max(Duration::from_millis(10)));
        claim.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut failover = interval(self.settings.lease.ttl / 2);
        failover.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut retry = BLOCKED_RETRY.0;
        let mut blocked_since: Option<Instant> = None;
        loop {
            let before = self.backlog.len();
            let blocked = self.drain(Some(&mut rx)).await?;
            if !blocked || self.backlog.len() < before {
                // Progress: when daemons take turns on interleaved batches,
                // each is briefly blocked by the other; retry quickly again.
                blocked_since = None;
                retry = BLOCKED_RETRY.0;
            }
            if blocked {
                let since = *blocked_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= d.claim_idle {
                    self.claim().await?;
                    blocked_since = Some(Instant::now());
                }
            }
            if stop.is_cancelled() {
                return self.finish().await;
            }
            self.still_owner()?;
            let room = self.backlog.len() < self.capacity();
            tokio::select! {
                biased;
                _ = stop.cancelled() => return self.finish().await,
                msg = rx.recv(), if room => match msg {
                    Some(Ok(prepared)) => take_prepared(&mut self.backlog, prepared),
                    Some(Err(e)) => return Err(e),
                    None => return Err(StoreError::Reply("the input reader stopped".into())),
                },
                _ = tokio::time::sleep(retry), if blocked => {
                    retry = (retry * 2).min(BLOCKED_RETRY.1);
                }
                _ = sweep.tick() => self.release_all().await?,
                _ = claim.tick() => self.claim().await?,
                _ = failover.tick() => self.claim_from_dead_peers().await?,
            }
        }
    }

    /// On shutdown: one last try at what we already read (no waiting on
    /// other daemons). Whatever stays pending is resumed by a restart under
    /// the same name, or claimed by another daemon after `claim_idle`.
    async fn finish(mut self) -> Result<(), StoreError> {
        if !self.backlog.is_empty() && self.job.valid.ok() {
            self.drain(None).await?;
        }
        if !self.backlog.is_empty() {
            info!(entries = self.backlog.len(), "leaving input entries pending for a restart or another daemon");
        }
        Ok(())
    }
}
