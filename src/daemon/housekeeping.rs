//! The housekeeping leader: one daemon at a time, elected with a Redlock
//! lock (`rslock`) that another daemon takes over when it lapses, trims
//! acknowledged input, output that every group is done with, and old dead
//! letters, and removes dead consumers from their groups.
//!
//! The lock only saves work: every step is safe when two daemons run it at
//! once (trims only ever remove entries below what every group still needs,
//! computed afresh each pass).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rslock::{Lock, LockManager};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::Stats;
use crate::config::Settings;
use crate::core::EntryId;
use crate::store::retention::{self, GroupCursor};
use crate::store::{self, lease, Conn, Keys, Namespace, Reconnect, StoreError, INPUT_GROUP};

/// Competes for the housekeeping lock and does the periodic work while
/// holding it, until `shutdown`; then releases the lock. Whether this daemon
/// is the leader is kept in `stats.housekeeping_leader`.
pub async fn run(settings: Settings, ns: Namespace, stats: Arc<Stats>, shutdown: CancellationToken) {
    let h = &settings.housekeeping;
    // Wake often enough to extend the lock well before it lapses, to work
    // every `interval`, and to notice a server that stopped answering
    // within a second or two (and never spin on absurdly small settings).
    let wake = h.interval.min(h.lock_ttl / 3).min(Duration::from_secs(1)).max(Duration::from_millis(10));
    let mut keeper = Housekeeper::new(&settings, &ns, &stats.housekeeping_leader);
    let mut reconnect = Reconnect::side_task("housekeeping", settings.daemon.retry);
    loop {
        let pause = match keeper.step().await {
            Ok(passed) => {
                if passed {
                    reconnect.up();
                }
                wake
            }
            Err(e) => {
                if e.fault().needs_new_connection() {
                    keeper.reconnect();
                }
                // Never longer than a wake period: a leader must extend its
                // lock in time even while its passes fail.
                reconnect.down(&e).min(wake)
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.cancelled() => break,
        }
    }
    keeper.release().await;
}

/// The leader election and the work, between wake-ups.
struct Housekeeper<'a> {
    /// Validated settings.
    settings: &'a Settings,
    /// The namespace: every partition is kept.
    ns: &'a Namespace,
    /// Whether we hold the lock, for whoever reports it (metrics).
    leader: &'a AtomicBool,
    /// The Redlock manager, once made. It keeps its own connection (rslock
    /// opens it from our validated client, or cluster client); rebuilt after
    /// a connection failure, since rslock reconnects only after some errors.
    locks: Option<LockManager>,
    /// The lock while we hold it.
    lock: Option<Lock>,
    /// Connection for the work, opened when first needed.
    conn: Option<Conn>,
    /// When the last pass ran; `None` until the first one as leader.
    last_pass: Option<Instant>,
}

impl<'a> Housekeeper<'a> {
    fn new(settings: &'a Settings, ns: &'a Namespace, leader: &'a AtomicBool) -> Self {
        Housekeeper { settings, ns, leader, locks: None, lock: None, conn: None, last_pass: None }
    }

    /// The time allowed for one lock call (rslock sets no overall timeout).
    fn lock_call_timeout(&self) -> Duration {
        self.settings.connect.response_timeout
    }

    /// Drops every connection, so the next step opens fresh ones.
    fn reconnect(&mut self) {
        self.conn = None;
        self.locks = None;
    }

    /// Takes or extends the lock, then does a pass if one is due. Returns
    /// whether a pass ran.
    async fn step(&mut self) -> Result<bool, StoreError> {
        if self.locks.is_none() {
            self.locks = Some(lock_manager(self.settings).await?);
        }
        if self.hold_lock().await {
            self.check_after_failed_take().await?;
        }
        if self.lock.is_none() {
            return Ok(false);
        }
        if self.last_pass.is_some_and(|t| t.elapsed() < self.settings.housekeeping.interval) {
            return Ok(false);
        }
        let (settings, ns) = (self.settings, self.ns);
        let result = pass(self.conn().await?, settings, ns).await;
        self.last_pass = Some(Instant::now());
        result.map(|()| true)
    }

    /// Our connection for the work, opened when first needed.
    async fn conn(&mut self) -> Result<&mut Conn, StoreError> {
        if self.conn.is_none() {
            self.conn = Some(self.settings.redis.connect(self.settings.connect.response_timeout).await?);
        }
        Ok(self.conn.as_mut().expect("connected above"))
    }

    /// rslock says the same when another daemon holds the lock and when its
    /// own connection cannot write (its server turned into a replica behind
    /// the same address: a failover), so after a failed take our own
    /// connection looks: a replica is an error (both connections are
    /// replaced), and a lock that nobody holds means rslock's connection is
    /// the problem (it is replaced). Without this a standby would never
    /// lead again after such a failover.
    async fn check_after_failed_take(&mut self) -> Result<(), StoreError> {
        let resource = self.ns.partition(0).lock("housekeeping");
        let conn = self.conn().await?;
        store::ensure_master(conn, &resource).await?;
        // EXISTS, not GET: rslock's values are random bytes, not UTF-8.
        let held: bool = redis::cmd("EXISTS").arg(&resource).query_async(conn).await?;
        if !held {
            debug!("housekeeping: the lock is free but could not be taken; renewing rslock's connection");
            self.locks = None;
        }
        Ok(())
    }

    /// Extends the lock we hold, or tries to take it. Logs every change of
    /// leadership. Redis errors read as "not the leader" (rslock does not
    /// tell them apart from a lock held elsewhere). Returns whether it
    /// tried to take the lock and failed.
    async fn hold_lock(&mut self) -> bool {
        let ttl = self.settings.housekeeping.lock_ttl;
        let limit = self.lock_call_timeout();
        let Some(locks) = &self.locks else { return false };
        match self.lock.take() {
            Some(held) => {
                let reason = match tokio::time::timeout(limit, locks.extend(&held, ttl)).await {
                    Ok(Ok(extended)) => {
                        self.lock = Some(extended);
                        return false;
                    }
                    // A failed extend already deleted our key where it
                    // could, so another daemon (or we) can take over at once.
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => {
                        self.locks = None;
                        format!("no answer within {limit:?}")
                    }
                };
                self.leader.store(false, Ordering::Relaxed);
                self.last_pass = None;
                warn!(reason = %reason, "lost the housekeeping lock; another daemon may take over");
                false
            }
            None => {
                let resource = self.ns.partition(0).lock("housekeeping");
                match tokio::time::timeout(limit, locks.lock(resource.as_bytes(), ttl)).await {
                    Ok(Ok(lock)) => {
                        self.lock = Some(lock);
                        self.leader.store(true, Ordering::Relaxed);
                        info!(
                            consumer = %self.settings.daemon.consumer,
                            lock = %resource,
                            ttl = ?ttl,
                            "became the housekeeping leader"
                        );
                        false
                    }
                    // Held by another daemon, or Redis unreachable.
                    Ok(Err(_)) => true,
                    Err(_) => {
                        self.locks = None;
                        false
                    }
                }
            }
        }
    }

    /// On shutdown: gives the lock up so another daemon takes over at once.
    async fn release(mut self) {
        let (Some(lock), Some(locks)) = (self.lock.take(), &self.locks) else { return };
        self.leader.store(false, Ordering::Relaxed);
        if tokio::time::timeout(self.lock_call_timeout(), locks.unlock(&lock)).await.is_ok() {
            info!("released the housekeeping lock");
        } else {
            warn!("could not release the housekeeping lock; it lapses on its own");
        }
    }
}

/// rslock's manager over our one Redis (quorum 1), one attempt per call:
/// the housekeeper's own loop retries. On a cluster, rslock's cluster
/// client: the lock key (`{NS}`) lives on the node of its slot, and the
/// cluster counts as one Redis (quorum 1), like a standalone server.
async fn lock_manager(settings: &Settings) -> Result<LockManager, StoreError> {
    let mut m = match settings.redis.cluster_client().await? {
        Some(cluster) => LockManager::from_cluster_client(cluster),
        // The server now (with Sentinel: the master named now).
        None => LockManager::from_clients(vec![settings.redis.server().await?]),
    };
    m.set_retry(1, Duration::from_millis(100));
    Ok(m)
}

/// What one pass did.
#[derive(Debug, Default)]
struct PassReport {
    /// Entries removed from `:in`.
    input_trimmed: u64,
    /// Entries removed from `:out`.
    output_trimmed: u64,
    /// Entries removed from `:dead`.
    dead_trimmed: u64,
    /// Consumers removed from their groups.
    consumers_removed: usize,
}

/// One round of housekeeping, over every partition.
async fn pass(conn: &mut Conn, settings: &Settings, ns: &Namespace) -> Result<(), StoreError> {
    for keys in ns.all() {
        pass_partition(conn, settings, &keys).await?;
    }
    Ok(())
}

/// One round of housekeeping on one partition.
async fn pass_partition(conn: &mut Conn, settings: &Settings, keys: &Keys) -> Result<(), StoreError> {
    let h = &settings.housekeeping;
    let mut report = PassReport::default();

    if h.trim_input {
        // Only the input group matters on :in (other groups there are not ours).
        let input = retention::cursors(conn, &keys.input).await?;
        if let Some(group) = input.as_deref().and_then(|gs| gs.iter().find(|g| g.name == INPUT_GROUP)) {
            report.input_trimmed = retention::trim_below(conn, &keys.input, group.floor()).await?;
        }
    }

    let out_groups = retention::cursors(conn, &keys.out).await?;
    if let Some(groups) = &out_groups {
        report.output_trimmed = trim_output(conn, settings, keys, groups).await?;
    }

    if h.dead_maxlen > 0 {
        report.dead_trimmed = retention::cap_length(conn, &keys.dead, h.dead_maxlen).await?;
    }

    report.consumers_removed =
        remove_dead_consumers(conn, settings, keys, out_groups.as_deref().unwrap_or(&[])).await?;

    debug!(
        partition = keys.partition,
        input_trimmed = report.input_trimmed,
        output_trimmed = report.output_trimmed,
        dead_trimmed = report.dead_trimmed,
        consumers_removed = report.consumers_removed,
        "housekeeping pass"
    );
    Ok(())
}

/// Trims `:out` below what every group still needs, and by age if
/// configured, warning about each group that loses entries it has not
/// acknowledged. Returns how many entries it removed.
async fn trim_output(
    conn: &mut Conn,
    settings: &Settings,
    keys: &Keys,
    groups: &[GroupCursor],
) -> Result<u64, StoreError> {
    let h = &settings.housekeeping;
    let stream = &keys.out;
    let age_floor = match h.output_max_age {
        Some(age) => Some(retention::age_floor(retention::server_time_ms(conn, stream).await?, age)),
        None => None,
    };
    let Some(plan) = retention::plan_output_trim(groups, h.trim_output, age_floor) else { return Ok(0) };
    // For each overtaken group: its oldest needed entry that the trim may
    // remove (the trim is approximate, so we look again afterwards).
    let ranges: Vec<(EntryId, EntryId)> = plan.overtaken.iter().map(|(_, floor)| (*floor, plan.min_id)).collect();
    let doomed = retention::first_ids_in(conn, stream, &ranges).await?;
    let removed = retention::trim_below(conn, stream, plan.min_id).await?;
    if removed > 0 && doomed.iter().any(Option::is_some) {
        let first_kept = retention::first_id(conn, stream).await?;
        for ((group, floor), oldest) in plan.overtaken.iter().zip(doomed) {
            let Some(oldest) = oldest else { continue };
            if first_kept.is_none_or(|kept| oldest < kept) {
                warn!(
                    group = %group,
                    needed_from = %floor,
                    trimmed_below = %plan.min_id,
                    first_kept = %first_kept.map_or_else(|| "none (stream empty)".into(), |k| k.to_string()),
                    max_age = ?h.output_max_age.unwrap_or_default(),
                    "output_max_age trimmed entries that group {group} had not yet read or acknowledged"
                );
            }
        }
    }
    Ok(removed)
}

/// Removes consumers that are gone (no lease, nothing pending, idle longer
/// than `lease.dead_consumer_grace`) from the input group and from every
/// group of `:out`. Returns how many it removed.
async fn remove_dead_consumers(
    conn: &mut Conn,
    settings: &Settings,
    keys: &Keys,
    out_groups: &[GroupCursor],
) -> Result<usize, StoreError> {
    let grace = settings.lease.dead_consumer_grace;
    let me = &settings.daemon.consumer;
    let streams = std::iter::once((&keys.input, "in", INPUT_GROUP))
        .chain(out_groups.iter().map(|g| (&keys.out, "out", g.name.as_str())));
    let mut total = 0;
    for (stream, tag, group) in streams {
        let peers = lease::peers(conn, keys, stream, tag, group).await?;
        // On :out no consumer is us (an empty name matches nobody).
        let skip = if tag == "in" { me.as_str() } else { "" };
        let removed = lease::remove_dead_consumers(conn, stream, group, skip, &peers, grace).await?;
        if !removed.is_empty() {
            info!(stream = %stream, group = %group, consumers = ?removed, "removed dead consumers with nothing pending");
            total += removed.len();
        }
    }
    Ok(total)
}
