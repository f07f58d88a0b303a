//! The daemon's main loop: registers the daemon in its namespace, agrees
//! with the other daemons which partitions it owns ([`super::assign`]),
//! holds each owned partition's lease lock, and starts and stops one
//! [`worker`] per owned partition. Runs every third of a lease lifetime.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::assign::assign;
use super::worker::{self, Job};
use super::{Stats, Validity};
use crate::config::Settings;
use crate::store::batch::Route;
use crate::store::{self, memory, Conn, Namespace, Reconnect, Scripts, StoreError, INPUT_GROUP};

/// A running partition worker.
struct Owned {
    /// Tells it to stop (handover, shutdown).
    stop: CancellationToken,
    /// Until when ownership is certain; the worker checks it.
    valid: Arc<Validity>,
    /// The worker.
    task: JoinHandle<()>,
}

/// The coordinator's state across sessions.
struct Coordinator<'a> {
    /// Validated settings.
    settings: &'a Settings,
    /// The namespace, with its agreed partition count.
    ns: &'a Namespace,
    /// Counters (owned partitions among them).
    stats: &'a Arc<Stats>,
    /// The scripts (lock, registry).
    scripts: Scripts,
    /// What this process writes into the partitions' owner locks: unique
    /// per process, so a restart under the same name (or a duplicate name)
    /// never passes another process's fence. `<consumer>:<random>`.
    token: String,
    /// The partitions this daemon owns now.
    owned: HashMap<u16, Owned>,
    /// The live daemons, for the workers' claims.
    live: watch::Sender<Arc<Vec<String>>>,
    /// When Redis's memory limit was last looked at.
    memory_checked: Option<Instant>,
}

/// Runs until `shutdown`: then stops the workers (each finishes what it
/// has read), releases the locks and leaves the registry, so other daemons
/// take over at once.
pub(super) async fn run(
    settings: &Settings,
    ns: &Namespace,
    stats: &Arc<Stats>,
    shutdown: &CancellationToken,
    reconnect: &mut Reconnect,
) -> Result<(), StoreError> {
    let (live, _) = watch::channel(Arc::new(Vec::new()));
    let mut c = Coordinator {
        settings,
        ns,
        stats,
        scripts: Scripts::new(),
        token: format!("{}:{:016x}", settings.daemon.consumer, rand::random::<u64>()),
        owned: HashMap::new(),
        live,
        memory_checked: None,
    };
    let result = loop {
        match c.session(shutdown, reconnect).await {
            Ok(()) => break Ok(()),
            Err(e) if e.is_fatal() => break Err(e),
            Err(e) => {
                c.reap();
                if !reconnect.wait(&e, shutdown).await {
                    break Ok(());
                }
            }
        }
    };
    c.leave().await;
    result
}

impl Coordinator<'_> {
    /// One connected period: set up the partitions' groups, then keep the
    /// registration and the ownerships current until shutdown (`Ok`) or a
    /// Redis failure (`Err`).
    async fn session(&mut self, shutdown: &CancellationToken, reconnect: &mut Reconnect) -> Result<(), StoreError> {
        let s = self.settings;
        let d = &s.daemon;
        let mut conn = s.redis.connect(s.connect.response_timeout).await?;
        let version = store::check_version(&mut conn, &self.ns.meta()).await?;
        self.check_memory(&mut conn).await?;
        for keys in self.ns.all() {
            store::ensure_group(&mut conn, &keys.input, INPUT_GROUP).await?;
            for group in &d.groups {
                if store::ensure_group(&mut conn, &keys.out, group).await? {
                    info!(group = %group, stream = %keys.out, "created output group at id 0");
                }
            }
        }
        self.scripts.load(&mut conn).await?;
        // Up only once a round has worked: a Redis that answers but refuses
        // writes (full, a replica) is not a working connection.
        self.tick(&mut conn).await?;
        if reconnect.up() {
            self.stats.reconnects.fetch_add(1, Relaxed);
        }
        info!(
            redis_version = %version,
            redis = %s.redis_display,
            consumer = %d.consumer,
            partitions = self.ns.partitions(),
            "connected to Redis"
        );
        let period = (s.lease.ttl / 3).max(Duration::from_millis(50));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(period) => {}
            }
            self.tick(&mut conn).await?;
            if self.memory_checked.is_none_or(|t| t.elapsed() >= d.memory_check_interval) {
                self.check_memory(&mut conn).await?;
            }
        }
    }

    /// Looks at the memory limit of the partitions' servers (every one of
    /// up to 8 partitions, else 8 spread over them: a cluster's nodes are
    /// normally configured alike) and warns, at
    /// every check, about an evicting policy (it can drop scheduled elements
    /// without a trace) and about a server over 90% full (it will refuse
    /// writes at its limit, and the work waits until memory frees).
    async fn check_memory(&mut self, conn: &mut Conn) -> Result<(), StoreError> {
        self.memory_checked = Some(Instant::now());
        let mut seen = Vec::new();
        let all = self.ns.all();
        let step = all.len().div_ceil(8).max(1);
        for keys in all.into_iter().step_by(step) {
            let m = memory::read(conn, &keys.input).await?;
            if seen.contains(&(m.policy.clone(), m.max)) {
                continue;
            }
            if m.evicting() {
                warn!(
                    policy = %m.policy,
                    maxmemory = m.max,
                    used_memory = m.used,
                    partition = keys.partition,
                    "Redis evicts keys when it is full (maxmemory-policy {}): scheduled elements, their payloads, \
                     leases and whole streams can vanish without a trace; set maxmemory-policy noeviction (tidemark \
                     then waits while Redis is full and resumes when memory frees)",
                    m.policy
                );
            } else if m.nearly_full() {
                warn!(
                    maxmemory = m.max,
                    used_memory = m.used,
                    partition = keys.partition,
                    "Redis is over 90% of maxmemory: at the limit it refuses writes (OOM) and the work waits until \
                     memory frees (consumers catching up, trims, a larger maxmemory)"
                );
            }
            seen.push((m.policy, m.max));
        }
        Ok(())
    }

    /// One round: register, look at the owners, then renew, take and hand
    /// over partitions as the assignment says.
    async fn tick(&mut self, conn: &mut Conn) -> Result<(), StoreError> {
        let s = self.settings;
        let ttl = s.lease.ttl;
        let me = &s.daemon.consumer;
        self.reap();
        let live = self.scripts.register(conn, &self.ns.daemons(), me, Some(ttl)).await?;
        self.live.send_replace(Arc::new(live.clone()));
        let holders = self.holders(conn).await?;
        let owners: Vec<Option<String>> = holders
            .iter()
            .map(|h| h.as_deref().map(|t| t.rsplit_once(':').map_or(t, |(name, _)| name).to_owned()))
            .collect();
        let target = assign(&live, &owners);

        // Renew first, so that a slow handover below never costs a lease.
        let mine: Vec<u16> = self.owned.keys().copied().collect();
        for p in mine {
            let sent = Instant::now();
            let held = self.scripts.lock(conn, &self.ns.partition(p).owner(), &self.token, Some(ttl)).await?;
            let owned = self.owned.get(&p).expect("listed above");
            if held {
                owned.valid.renew(sent, ttl);
            } else {
                warn!(
                    partition = p,
                    "lost the ownership of a partition (this daemon was cut off for longer than the lease)"
                );
                owned.valid.end();
                owned.stop.cancel();
                self.owned.remove(&p);
            }
        }
        for (p, target) in target.iter().enumerate() {
            let p = p as u16;
            let mine = target.as_deref() == Some(me.as_str());
            if mine && !self.owned.contains_key(&p) {
                let sent = Instant::now();
                if self.scripts.lock(conn, &self.ns.partition(p).owner(), &self.token, Some(ttl)).await? {
                    self.start(p, sent);
                } else {
                    debug!(partition = p, "the partition's previous owner still holds it");
                }
            } else if !mine && self.owned.contains_key(&p) {
                self.hand_over(conn, p, target.as_deref()).await?;
            }
        }
        self.stats.partitions_owned.store(self.owned.len() as u64, Relaxed);
        Ok(())
    }

    /// Each partition's owner lock holder (a token), read concurrently.
    async fn holders(&self, conn: &Conn) -> Result<Vec<Option<String>>, StoreError> {
        let gets = self.ns.all().into_iter().map(|keys| {
            let mut c = conn.clone();
            async move { redis::cmd("GET").arg(keys.owner()).query_async::<Option<String>>(&mut c).await }
        });
        join_all(gets).await.into_iter().map(|r| r.map_err(StoreError::from)).collect()
    }

    /// Starts the worker of partition `p`, whose lock was taken at `at`.
    fn start(&mut self, p: u16, at: Instant) {
        let s = self.settings;
        let valid = Arc::new(Validity::new());
        valid.renew(at, s.lease.ttl);
        let stop = CancellationToken::new();
        let job = Job {
            keys: self.ns.partition(p),
            route: Route { partition: p, partitions: self.ns.partitions() },
            token: self.token.clone(),
            valid: valid.clone(),
            live: self.live.subscribe(),
            stop: stop.clone(),
            meta: self.ns.meta(),
        };
        let task = tokio::spawn(worker::run(s.clone(), self.stats.clone(), job));
        self.owned.insert(p, Owned { stop, valid, task });
    }

    /// Gives partition `p` up to the daemon the assignment names: stops
    /// the worker (it finishes what it has read), then releases the lock so
    /// that the new owner takes it at its next round.
    async fn hand_over(&mut self, conn: &mut Conn, p: u16, to: Option<&str>) -> Result<(), StoreError> {
        let Some(owned) = self.owned.remove(&p) else { return Ok(()) };
        info!(partition = p, to = to.unwrap_or("-"), "handing the partition over");
        owned.stop.cancel();
        if tokio::time::timeout(self.settings.lease.ttl / 3, owned.task).await.is_err() {
            debug!(partition = p, "the worker is still finishing; its calls are fenced from now on");
        }
        owned.valid.end();
        self.scripts.lock(conn, &self.ns.partition(p).owner(), &self.token, None).await?;
        Ok(())
    }

    /// Forgets workers that ended on their own (ownership lapsed while
    /// Redis was unreachable, or they found themselves fenced).
    fn reap(&mut self) {
        self.owned.retain(|p, o| {
            if o.task.is_finished() {
                debug!(partition = p, "partition worker ended");
                o.valid.end();
                false
            } else {
                if !o.valid.ok() {
                    o.stop.cancel();
                }
                true
            }
        });
        self.stats.partitions_owned.store(self.owned.len() as u64, Relaxed);
    }

    /// On shutdown: stops every worker, waits for them within the shutdown
    /// grace, releases the locks and leaves the registry.
    async fn leave(mut self) {
        let s = self.settings;
        for owned in self.owned.values() {
            owned.stop.cancel();
        }
        let owned: Vec<(u16, Owned)> = self.owned.drain().collect();
        let grace = s.daemon.shutdown_grace;
        let tasks = join_all(owned.iter().map(|(_, o)| async {
            while !o.task.is_finished() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
        if tokio::time::timeout(grace, tasks).await.is_err() {
            warn!(grace = ?grace, "partition workers still running after the shutdown grace");
        }
        self.stats.partitions_owned.store(0, Relaxed);
        let release = async {
            let mut conn = s.redis.connect(s.connect.response_timeout.min(Duration::from_secs(2))).await?;
            for (p, o) in &owned {
                o.valid.end();
                self.scripts.lock(&mut conn, &self.ns.partition(*p).owner(), &self.token, None).await?;
            }
            self.scripts.register(&mut conn, &self.ns.daemons(), &s.daemon.consumer, None).await?;
            Ok::<(), StoreError>(())
        };
        match tokio::time::timeout(Duration::from_secs(3), release).await {
            Ok(Ok(())) => {
                if !owned.is_empty() {
                    info!(partitions = owned.len(), "released the partitions for the other daemons");
                }
            }
            _ => warn!("could not release the partitions; they lapse within a lease lifetime"),
        }
        for (_, o) in owned {
            o.task.abort();
        }
    }
}
