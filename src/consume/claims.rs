//! The consumer runtime's leases and claims: its own liveness lease,
//! taking up its own pending entries after a restart, keeping held entries
//! fresh so peers do not claim them, retrying idle entries, taking over
//! dead peers' entries, and following the namespace's partition count. Part of [`super::runtime`]'s `Runtime`.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::runtime::{by_partition, Runtime};
use super::{At, Handler, FINISH_MARGIN};
use crate::core::op::Reason;
use crate::core::EntryId;
use crate::store::scripts::{ClaimFrom, ClaimOutcome};
use crate::store::{lease, meta, Conn, LayoutError, StoreError};

/// Most claim calls per idle-claim tick, so a huge pending list cannot
/// hold the loop for long.
const CLAIM_PAGES_PER_TICK: usize = 10;

impl<H: Handler> Runtime<H> {
    /// Sets our lease (warning if another process holds the same name) and
    /// starts keeping it.
    pub(super) async fn start_lease(&mut self, conn: &mut Conn) -> Result<(), StoreError> {
        let c = &self.c;
        let key = self.parts[0].lease("out", &c.group, &c.opts.consumer);
        let host = hostname::get().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default();
        let holder = format!("{host}:{}", std::process::id());
        let current: Option<String> = redis::cmd("GET").arg(&key).query_async(conn).await?;
        if let Some(other) = current.filter(|h| *h != holder) {
            warn!(
                consumer = %c.opts.consumer,
                holder = %other,
                "the lease of this consumer name is held by another process: unless that was an earlier run that \
                 just ended, give every consumer its own name"
            );
        }
        lease::refresh(conn, &key, &holder, c.opts.lease_ttl).await?;
        let stop = CancellationToken::new();
        let handle = lease::keep(c.redis.clone(), c.opts.retry, key, holder, c.opts.lease_ttl, stop.clone());
        self.lease = Some((handle, stop));
        Ok(())
    }

    /// Stops keeping the lease and deletes it, so peers take anything left
    /// pending here at once.
    pub(super) async fn stop_lease(&mut self) {
        if let Some((handle, stop)) = self.lease.take() {
            stop.cancel();
            let _ = tokio::time::timeout(FINISH_MARGIN / 3, handle).await;
        }
    }

    /// Takes up our own pending entries left by an earlier run under this
    /// name (up to the free slots; the rest follow after `claim_idle`).
    pub(super) async fn resume_own(&mut self, conn: &mut Conn) -> Result<(), StoreError> {
        let me = self.c.opts.consumer.clone();
        let mut total = 0;
        for p in 0..self.parts.len() as u16 {
            loop {
                let room = self.ledger.room();
                if room == 0 {
                    break;
                }
                let count = room.min(self.c.opts.batch_size);
                let o = self.claim(conn, p, ClaimFrom::Peer(&me), Duration::ZERO, count).await?;
                let n = o.claimed.len() + o.dead.len();
                total += o.claimed.len();
                self.take_claimed(p, o);
                if n < count {
                    break;
                }
            }
        }
        if total > 0 {
            info!(entries = total, "resuming entries left pending by an earlier run of this consumer");
        }
        Ok(())
    }

    /// Keeps every held entry fresh so that no peer claims it after
    /// `claim_idle`; warns about any a peer took over anyway.
    pub(super) async fn touch(&mut self, conn: &mut Conn) -> Result<(), StoreError> {
        let held: Vec<At> = self.ledger.held().copied().collect();
        if held.is_empty() {
            return Ok(());
        }
        let c = &self.c;
        let mut lost = Vec::new();
        for (p, ids) in by_partition(held.into_iter()) {
            let keys = &self.parts[usize::from(p)];
            let gone = self.scripts.touch(conn, keys, &c.group, &c.opts.consumer, &ids).await?;
            lost.extend(gone.into_iter().map(|id| At { partition: p, id }));
        }
        for id in lost {
            if self.ledger.lost(id) {
                warn!(
                    entry = %id,
                    "another consumer took over an entry still being handled here (Redis was unreachable for long?); \
                     it may be processed twice"
                );
            }
        }
        Ok(())
    }

    /// Retries entries idle for `claim_idle` at any consumer (failures, and
    /// work of consumers that died without us noticing their lease).
    ///
    /// The scan goes through the partitions in turn, [`CLAIM_PAGES_PER_TICK`]
    /// calls per tick at most, and goes on where it stopped.
    pub(super) async fn claim_idle(&mut self, conn: &mut Conn) -> Result<(), StoreError> {
        let partitions = self.parts.len() as u16;
        let mut finished = 0;
        for _ in 0..CLAIM_PAGES_PER_TICK {
            let room = self.ledger.room();
            if room == 0 || finished >= partitions {
                return Ok(());
            }
            let count = room.min(self.c.opts.batch_size);
            let (p, cursor) = self.cursor;
            let o = self.claim(conn, p, ClaimFrom::Idle(cursor), self.c.opts.claim_idle, count).await?;
            self.cursor = if o.cursor == EntryId::ZERO {
                finished += 1;
                ((p + 1) % partitions.max(1), EntryId::ZERO)
            } else {
                (p, o.cursor)
            };
            if !o.claimed.is_empty() {
                self.metrics.claimed.increment(o.claimed.len() as u64);
                info!(partition = p, entries = o.claimed.len(), idle = ?self.c.opts.claim_idle, "retrying idle entries");
            }
            self.take_claimed(p, o);
        }
        Ok(())
    }

    /// Ends the session if the namespace's partition count is not the one
    /// this session reads (no record yet when it started, or a
    /// `repartition` since): the next session reads the new layout.
    pub(super) async fn check_layout(&mut self, conn: &mut Conn) -> Result<(), StoreError> {
        let c = &self.c;
        let ns = match meta::resolve(conn, &c.namespace, c.partitions, false).await? {
            Ok(ns) => ns,
            // Until it has finished, the layout read so far stays.
            Err(LayoutError::Repartitioning { .. }) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        if usize::from(ns.partitions()) == self.parts.len() {
            return Ok(());
        }
        if !self.idle() {
            if !self.relayout {
                info!(
                    partitions = ns.partitions(),
                    "the namespace was repartitioned: finishing the entries in hand before reading the new layout"
                );
            }
            self.relayout = true;
            return Ok(());
        }
        Err(StoreError::Rejected(format!(
            "namespace {:?} now has {} partition(s), not {}: reading them all from now on",
            ns.name(),
            ns.partitions(),
            self.parts.len()
        )))
    }

    /// Takes over the entries of peers whose lease expired, and removes
    /// long-dead peers with nothing pending from the group.
    pub(super) async fn scan_peers(&mut self, conn: &mut Conn) -> Result<(), StoreError> {
        for p in 0..self.parts.len() as u16 {
            self.scan_peers_of(conn, p).await?;
        }
        Ok(())
    }

    /// [`Runtime::scan_peers`] on partition `p`.
    async fn scan_peers_of(&mut self, conn: &mut Conn, p: u16) -> Result<(), StoreError> {
        let c = &self.c;
        let keys = &self.parts[usize::from(p)];
        let peers = lease::peers(conn, keys, &keys.out, "out", &c.group).await?;
        let me = c.opts.consumer.clone();
        for peer in peers.iter().filter(|p| p.name != me && !p.leased && p.pending > 0) {
            let room = self.ledger.room();
            if room == 0 {
                break;
            }
            // Entries younger than half a lease were just claimed by another
            // live consumer scanning at the same time: leave them.
            let min_idle = self.c.opts.lease_ttl / 2;
            let count = room.min(self.c.opts.batch_size);
            let o = self.claim(conn, p, ClaimFrom::Peer(&peer.name), min_idle, count).await?;
            if !o.claimed.is_empty() || !o.dead.is_empty() {
                self.metrics.claimed.increment(o.claimed.len() as u64);
                self.metrics.takeovers.increment(1);
                info!(
                    peer = %peer.name,
                    partition = p,
                    claimed = o.claimed.len(),
                    dead = o.dead.len(),
                    "took over the pending entries of a consumer whose lease expired"
                );
            }
            self.take_claimed(p, o);
        }
        let c = &self.c;
        let out = &self.parts[usize::from(p)].out;
        let removed =
            lease::remove_dead_consumers(conn, out, &c.group, &me, &peers, c.opts.dead_consumer_grace).await?;
        for name in removed {
            info!(peer = %name, "removed a dead consumer with nothing pending from the group");
        }
        Ok(())
    }

    async fn claim(
        &mut self,
        conn: &mut Conn,
        p: u16,
        from: ClaimFrom<'_>,
        min_idle: Duration,
        count: usize,
    ) -> Result<ClaimOutcome, StoreError> {
        let c = &self.c;
        let keys = &self.parts[usize::from(p)];
        let o = self
            .scripts
            .claim(conn, keys, &c.group, &c.opts.consumer, from, min_idle, count, c.opts.max_deliveries)
            .await?;
        crate::metrics::record_dead_letters(Reason::MaxDeliveries.code(), o.dead.len() as u64);
        for id in &o.dead {
            self.counters.dead += 1;
            warn!(
                entry = %At { partition: p, id: *id },
                max_deliveries = c.opts.max_deliveries,
                "element delivered max_deliveries times without being acknowledged; moved to the dead-letter stream"
            );
        }
        Ok(o)
    }

    fn take_claimed(&mut self, partition: u16, o: ClaimOutcome) {
        for claimed in o.claimed {
            self.accept(At { partition, id: claimed.id }, claimed.fields, claimed.delivery);
        }
    }
}
