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
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::assign::assign;
use super::worker::{self, Job};
use super::{Stats, Validity};
use crate::config::Settings;
use crate::store::batch::Route;
use crate::store::{self, memory, Conn, Keys, Namespace, Reconnect, Scripts, StoreError, INPUT_GROUP};

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
            // One partition's server out of reach (a cluster master failing
            // over) holds up none of the others: its owner's worker creates
            // what is missing when it starts.
            if let Err(e) = ensure_groups(&mut conn, &keys, &d.groups).await {
                if e.is_fatal() {
                    return Err(e);
                }
                warn!(partition = keys.partition, error = %e, "could not create the partition's groups yet");
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
        // Rounds start every third of a lease lifetime however long the
        // last one took (a slow round is followed at once by the next).
        let mut rounds = tokio::time::interval((s.lease.ttl / 3).max(Duration::from_millis(50)));
        rounds.set_missed_tick_behavior(MissedTickBehavior::Delay);
        rounds.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = rounds.tick() => {}
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
            // Bounded like a lock call, and one server's silence only skips
            // it: this runs between the rounds that renew the leases.
            let m = match bounded(self.lock_call_limit(), memory::read(conn, &keys.input)).await {
                Ok(m) => m,
                Err(e) if e.is_fatal() => return Err(e),
                Err(e) => {
                    debug!(partition = keys.partition, error = %e, "could not read the memory limit");
                    continue;
                }
            };
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
    ///
    /// Only the registry (one key, on one server) fails the round. Each
    /// partition's lock is on its own server: one that does not answer (a
    /// cluster master failing over) costs that partition alone, whose
    /// ownership lapses if the outage outlasts the lease.
    async fn tick(&mut self, conn: &mut Conn) -> Result<(), StoreError> {
        let s = self.settings;
        let ttl = s.lease.ttl;
        let me = &s.daemon.consumer;
        self.reap();
        let live = self.scripts.register(conn, &self.ns.daemons(), me, Some(ttl)).await?;
        self.live.send_replace(Arc::new(live.clone()));
        // The renewals go out with the reads of the owners, all at once:
        // nothing a round does waits for them.
        let mine: Vec<u16> = self.owned.keys().copied().collect();
        let (holders, renewed) = tokio::join!(self.holders(conn), self.locks(conn, mine, Some(ttl)));
        let owners: Vec<Option<String>> = holders
            .iter()
            .enumerate()
            .map(|(p, h)| match h {
                Ok(h) => h.as_deref().map(|t| t.rsplit_once(':').map_or(t, |(name, _)| name).to_owned()),
                // Unknown: ours if we hold it, so the assignment stays put.
                Err(_) => self.owned.contains_key(&(p as u16)).then(|| me.clone()),
            })
            .collect();
        let target = assign(&live, &owners);

        for (p, sent, held) in renewed {
            let held = match held {
                Ok(held) => held,
                Err(e) if e.is_fatal() => return Err(e),
                Err(e) => {
                    warn!(
                        partition = p,
                        error = %e,
                        "could not renew the partition's ownership; its worker stops if this lasts past the lease"
                    );
                    continue;
                }
            };
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
        let mut take = Vec::new();
        let mut give = Vec::new();
        for (p, target) in target.iter().enumerate() {
            let p16 = p as u16;
            let mine = target.as_deref() == Some(me.as_str());
            if mine && !self.owned.contains_key(&p16) && holders[p].is_ok() {
                take.push(p16);
            } else if !mine && self.owned.contains_key(&p16) {
                give.push((p16, target.clone()));
            }
        }
        for (p, sent, taken) in self.locks(conn, take, Some(ttl)).await {
            match taken {
                Ok(true) => self.start(p, sent),
                Ok(false) => debug!(partition = p, "the partition's previous owner still holds it"),
                Err(e) if e.is_fatal() => return Err(e),
                Err(e) => warn!(partition = p, error = %e, "could not take the partition yet"),
            }
        }
        self.hand_over(conn, give).await?;
        self.stats.partitions_owned.store(self.owned.len() as u64, Relaxed);
        Ok(())
    }

    /// Each partition's owner lock holder (a token), read concurrently; an
    /// error for a partition whose server did not answer in time.
    async fn holders(&self, conn: &Conn) -> Vec<Result<Option<String>, StoreError>> {
        let limit = self.lock_call_limit();
        let gets = self.ns.all().into_iter().map(|keys| {
            let mut c = conn.clone();
            bounded(limit, async move {
                Ok(redis::cmd("GET").arg(keys.owner()).query_async::<Option<String>>(&mut c).await?)
            })
        });
        join_all(gets).await
    }

    /// Takes or renews (`ttl`), or releases (`None`), the owner locks of
    /// `partitions`, concurrently, each call bounded by
    /// [`Self::lock_call_limit`]: one server that does not answer delays
    /// none of the other partitions' renewals past their leases. Each with
    /// the time its call was sent.
    async fn locks(
        &self,
        conn: &Conn,
        partitions: Vec<u16>,
        ttl: Option<Duration>,
    ) -> Vec<(u16, Instant, Result<bool, StoreError>)> {
        let limit = self.lock_call_limit();
        let calls = partitions.into_iter().map(|p| {
            let mut c = conn.clone();
            let key = self.ns.partition(p).owner();
            async move {
                let sent = Instant::now();
                (p, sent, bounded(limit, self.scripts.lock(&mut c, &key, &self.token, ttl)).await)
            }
        });
        join_all(calls).await
    }

    /// How long one lock call may take: a sixth of a lease lifetime. A
    /// round makes at most three such waits in a row (renewals with the
    /// owners' reads, takes, releases) besides the hand-over's third, so
    /// consecutive renewals stay less than a lease lifetime apart even with
    /// a server that does not answer.
    fn lock_call_limit(&self) -> Duration {
        (self.settings.lease.ttl / 6).max(Duration::from_millis(50))
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

    /// Gives partitions up to the daemons the assignment names: stops their
    /// workers together (each finishes what it has read, all within one
    /// third of a lease lifetime, so the round never outlasts the other
    /// leases), then releases the locks so that the new owners take them at
    /// their next round.
    async fn hand_over(&mut self, conn: &mut Conn, give: Vec<(u16, Option<String>)>) -> Result<(), StoreError> {
        let mut leaving: Vec<(u16, Owned)> = give
            .into_iter()
            .filter_map(|(p, to)| {
                let owned = self.owned.remove(&p)?;
                info!(partition = p, to = to.as_deref().unwrap_or("-"), "handing the partition over");
                owned.stop.cancel();
                Some((p, owned))
            })
            .collect();
        if leaving.is_empty() {
            return Ok(());
        }
        let finished = join_all(leaving.iter_mut().map(|(_, o)| &mut o.task));
        if tokio::time::timeout(self.settings.lease.ttl / 3, finished).await.is_err() {
            debug!("a worker is still finishing; its calls are fenced from now on");
        }
        let parts: Vec<u16> = leaving
            .iter()
            .map(|(p, owned)| {
                owned.valid.end();
                *p
            })
            .collect();
        for (p, _, released) in self.locks(conn, parts, None).await {
            match released {
                Ok(_) => {}
                Err(e) if e.is_fatal() => return Err(e),
                Err(e) => {
                    warn!(partition = p, error = %e, "could not release the partition; it lapses within a lease lifetime")
                }
            }
        }
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

/// The partition's input group and the configured output groups.
async fn ensure_groups(conn: &mut Conn, keys: &Keys, groups: &[String]) -> Result<(), StoreError> {
    store::ensure_group(conn, &keys.input, INPUT_GROUP).await?;
    for group in groups {
        if store::ensure_group(conn, &keys.out, group).await? {
            info!(group = %group, stream = %keys.out, "created output group at id 0");
        }
    }
    Ok(())
}

/// `call`, or an `Unresponsive` error once `limit` has passed.
async fn bounded<T>(
    limit: Duration,
    call: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(limit, call).await {
        Ok(result) => result,
        Err(_) => Err(StoreError::io(std::io::ErrorKind::TimedOut, "no answer within a sixth of a lease lifetime")),
    }
}
