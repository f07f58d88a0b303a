//! Scale-out (issue 11): the ingest and release work of the standalone rows
//! (no payload) on two deployments, in the same process and taking turns
//! run by run:
//!
//! - the bench's standalone Redis, namespace of one partition (P = 1);
//! - a local Redis Cluster of [`CLUSTER_MASTERS`] masters without replicas
//!   (a replica would double the Redis work on the same cores), namespace
//!   of [`CLUSTER_PARTITIONS`] partitions, two per master (the namespace's
//!   name is picked so that its partitions' slots fall that way);
//!
//! each with one daemon and with [`MANY_DAEMONS`] (which share the
//! partitions: one owner each, the others standing by). Then the reference
//! release script (the "ceiling" of `release.rs`) on the same shards: what
//! Redis processes alone manage, the machine's ceiling for the ratio.
//!
//! Every run also reads each `redis-server`'s own CPU time (all its
//! threads, `/proc/<pid>/task/*/schedstat`: nanoseconds, where
//! `/proc/<pid>/stat` counts 10 ms ticks, too coarse for runs of a fraction
//! of a second) and divides it by the elements of the partitions it holds:
//! Redis CPU µs per element on each shard, from which the rate on a machine
//! with a core per shard can be worked out.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures::future::{join_all, try_join_all};
use testkit::{RedisCluster, RedisServer, PREFIX};
use tidemark::core::route::key_slot;
use tidemark::core::EntryId;
use tidemark::store::{Conn, Keys, Namespace, INPUT_GROUP};

use crate::release::{reference_call, reference_release, schedule_directly};
use crate::report::rate;
use crate::{
    add_pipelines_of, group_state, parse_id, write_all, Bench, BenchDaemon, Figures, Options, Payload, DAEMON_CONSUMER,
    NAMESPACE, PATIENCE, POLL, TS_BASE,
};

/// Masters of the local cluster.
pub(crate) const CLUSTER_MASTERS: usize = 3;
/// Partitions of the namespace on the cluster (two per master).
pub(crate) const CLUSTER_PARTITIONS: u16 = 6;
/// Daemons of the "several daemons" configurations.
pub(crate) const MANY_DAEMONS: usize = 3;
/// Longest wait for the daemons to share out the partitions: a daemon
/// that joins takes its share within a few coordinator rounds (a third of
/// the 5 s lease each).
const SHARING_PATIENCE: Duration = Duration::from_secs(60);
/// The daemons' environment in a smoke run: a short lease, so that they
/// share out the partitions within a second (the measured runs keep the
/// defaults).
const SMOKE_ENV: &[(&str, &str)] = &[("TIDEMARK__LEASE__TTL", "1s")];

/// One `redis-server` of a deployment.
struct Shard {
    /// Its process, whose CPU time is read.
    pid: u32,
    /// A connection to it (`FLUSHALL`).
    conn: Conn,
}

/// One partition of the namespace.
struct Part {
    keys: Keys,
    /// A plain connection to the server that holds the partition's slot.
    conn: Conn,
    /// Index of that server in [`Deployment::shards`].
    shard: usize,
}

/// Where a configuration runs: the Redis processes and the namespace's
/// partitions on them.
pub(crate) struct Deployment {
    /// `standalone` or `cluster` (JSON keys).
    pub(crate) key: &'static str,
    /// What the daemons are given (a cluster's first node).
    url: String,
    /// The namespace, with its partition count.
    pub(crate) ns: Namespace,
    shards: Vec<Shard>,
    parts: Vec<Part>,
    /// A connection that reaches the namespace-wide keys (the daemon
    /// registry): cluster-aware on the cluster.
    control: Conn,
}

impl Deployment {
    /// The bench's own Redis with namespace [`NAMESPACE`] of one partition:
    /// the keys of the standalone rows.
    pub(crate) async fn standalone(redis: &RedisServer) -> Result<Deployment> {
        let pid = redis.pid().ok_or_else(|| anyhow!("the standalone Redis is not running"))?;
        let conn = redis.conn().await;
        let ns = Namespace::new(PREFIX, NAMESPACE, 1);
        let parts = vec![Part { keys: ns.partition(0), conn: conn.clone(), shard: 0 }];
        Ok(Deployment {
            key: "standalone",
            url: redis.url(),
            ns,
            shards: vec![Shard { pid, conn: conn.clone() }],
            parts,
            control: conn,
        })
    }

    /// The cluster's masters with a namespace of [`CLUSTER_PARTITIONS`]
    /// partitions, as many on each master.
    pub(crate) async fn cluster(cluster: &RedisCluster) -> Result<Deployment> {
        let masters = cluster.masters;
        let (ns, shard_of) = tokio::task::block_in_place(|| spread_namespace(cluster, CLUSTER_PARTITIONS))?;
        let mut shards = Vec::with_capacity(masters);
        for node in &cluster.nodes[..masters] {
            let pid = node.pid().ok_or_else(|| anyhow!("a cluster node is not running"))?;
            shards.push(Shard { pid, conn: node.conn().await });
        }
        let parts = ns
            .all()
            .into_iter()
            .zip(shard_of)
            .map(|(keys, shard)| Part { keys, conn: shards[shard].conn.clone(), shard })
            .collect();
        let client = redis::cluster::ClusterClient::new(vec![cluster.url()])?;
        let control = Conn::Cluster(client.get_async_connection().await?);
        Ok(Deployment { key: "cluster", url: cluster.url(), ns, shards, parts, control })
    }

    /// Partitions held by each shard.
    pub(crate) fn partitions_per_shard(&self) -> Vec<usize> {
        let mut per = vec![0; self.shards.len()];
        for part in &self.parts {
            per[part.shard] += 1;
        }
        per
    }

    /// Empties every shard.
    async fn flush(&self) -> Result<()> {
        for shard in &self.shards {
            redis::cmd("FLUSHALL").query_async::<()>(&mut shard.conn.clone()).await?;
        }
        Ok(())
    }

    /// The element numbers (element `k` is `e<k>`) of each partition, as
    /// the producer routes them (`crc32(id) mod P`).
    fn route(&self, n: usize) -> Vec<Vec<usize>> {
        let mut routed = vec![Vec::new(); self.parts.len()];
        for k in 0..n {
            routed[usize::from(self.ns.route(format!("e{k}").as_bytes()))].push(k);
        }
        routed
    }

    /// Per shard, the sum of `per_part` over the partitions it holds.
    fn by_shard(&self, per_part: &[usize]) -> Vec<usize> {
        let mut per = vec![0; self.shards.len()];
        for (part, count) in self.parts.iter().zip(per_part) {
            per[part.shard] += count;
        }
        per
    }

    /// Elements scheduled, over all partitions.
    async fn scheduled(&self) -> Result<usize> {
        let counts = try_join_all(self.parts.iter().map(|p| {
            let mut conn = p.conn.clone();
            async move { redis::cmd("ZCARD").arg(&p.keys.sched).query_async::<usize>(&mut conn).await }
        }))
        .await?;
        Ok(counts.into_iter().sum())
    }

    /// Entries in each partition's `:out`.
    async fn released(&self) -> Result<Vec<usize>> {
        Ok(try_join_all(self.parts.iter().map(|p| {
            let mut conn = p.conn.clone();
            async move { redis::cmd("XLEN").arg(&p.keys.out).query_async::<usize>(&mut conn).await }
        }))
        .await?)
    }

    /// Whether every partition's input group has delivered up to its
    /// `last` entry and has nothing pending.
    async fn applied_up_to(&self, last: &[EntryId]) -> Result<bool> {
        for (part, last) in self.parts.iter().zip(last) {
            let g = group_state(&mut part.conn.clone(), &part.keys.input, INPUT_GROUP).await?;
            if !g.is_some_and(|g| g.pending == 0 && g.last_delivered >= *last) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Each shard's CPU time so far.
    fn cpu(&self) -> Vec<Duration> {
        self.shards.iter().map(|s| testkit::process_cpu(s.pid)).collect()
    }
}

/// A namespace of `partitions` partitions whose slots fall evenly on the
/// cluster's masters (`bench`, else `bench1`, `bench2`, …), and the master
/// of each partition.
fn spread_namespace(cluster: &RedisCluster, partitions: u16) -> Result<(Namespace, Vec<usize>)> {
    let masters = cluster.masters;
    for i in 0..1000 {
        let name = if i == 0 { NAMESPACE.to_owned() } else { format!("{NAMESPACE}{i}") };
        let ns = Namespace::new(PREFIX, &name, partitions);
        let shard_of: Vec<usize> = ns.all().iter().map(|k| cluster.master_of(key_slot(k.input.as_bytes()))).collect();
        let even =
            (0..masters).all(|m| shard_of.iter().filter(|&&s| s == m).count() == usize::from(partitions) / masters);
        if even {
            return Ok((ns, shard_of));
        }
    }
    bail!("no namespace name spreads {partitions} partitions evenly over {masters} masters")
}

/// An element id that routes to partition `p` of `ns` (for a first entry
/// the daemon applies there).
fn id_in(ns: &Namespace, p: u16) -> String {
    (0..).map(|i| format!("bench-warmup-{i}")).find(|id| ns.route(id.as_bytes()) == p).expect("some id routes there")
}

/// Polls `done` every [`POLL`] until it holds; fails after `patience` or
/// when a daemon dies.
async fn wait_for(
    what: &str,
    daemons: &mut [BenchDaemon],
    patience: Duration,
    mut done: impl AsyncFnMut() -> Result<bool>,
) -> Result<Instant> {
    let deadline = Instant::now() + patience;
    loop {
        if done().await? {
            return Ok(Instant::now());
        }
        for d in daemons.iter_mut() {
            d.check_alive()?;
        }
        if Instant::now() >= deadline {
            let logs: Vec<String> = daemons.iter().map(BenchDaemon::log).collect();
            bail!("gave up waiting for {what} after {patience:?}; daemon logs:\n{}", logs.join("\n---\n"));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// A timed phase's figures: the whole (`elements_per_s`, `seconds`, CPU
/// seconds of Redis, the daemons and this process, `cpu_share_ours`: all
/// that CPU over the machine's cores × the wall time, `cpu_share_all`:
/// how busy the machine's cores were, whoever used them, from
/// `/proc/stat`) and each shard's (`redis_cpu_seconds`, `elements`,
/// `redis_us_per_element`, `redis_busy`). `redis_bound_elements_per_s`:
/// the rate if Redis were all that limits it and each shard had a core of
/// its own (`n` over the busiest shard's CPU time).
#[derive(Debug, Clone)]
pub(crate) struct Phase {
    pub(crate) figures: Figures,
    pub(crate) shards: Vec<Figures>,
}

/// CPU times at the start of a timed phase, and the start.
struct Meter {
    shards: Vec<Duration>,
    daemons: Duration,
    bench: Duration,
    /// The machine's busy and total CPU time (`/proc/stat`, in ticks).
    machine: Option<(u64, u64)>,
    start: Instant,
}

/// The machine's busy and total CPU time so far, in clock ticks (the
/// `cpu` line of `/proc/stat`; idle and iowait are not busy).
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is in user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4)?;
    Some((total - idle, total))
}

impl Meter {
    fn start(d: &Deployment, daemons: &[BenchDaemon]) -> Meter {
        Meter {
            shards: d.cpu(),
            daemons: daemons.iter().map(BenchDaemon::cpu_time).sum(),
            bench: testkit::process_cpu(std::process::id()),
            machine: machine_ticks(),
            start: Instant::now(),
        }
    }

    /// The phase that ended at `end` after `n` elements, `per_shard` of
    /// them handled by each shard.
    fn finish(self, d: &Deployment, daemons: &[BenchDaemon], end: Instant, n: usize, per_shard: &[usize]) -> Phase {
        let seconds = (end - self.start).as_secs_f64();
        let shard_cpu: Vec<f64> =
            d.cpu().iter().zip(&self.shards).map(|(now, then)| now.saturating_sub(*then).as_secs_f64()).collect();
        let daemons_cpu =
            daemons.iter().map(BenchDaemon::cpu_time).sum::<Duration>().saturating_sub(self.daemons).as_secs_f64();
        let bench_cpu = testkit::process_cpu(std::process::id()).saturating_sub(self.bench).as_secs_f64();
        let redis_cpu: f64 = shard_cpu.iter().sum();
        let busiest = shard_cpu.iter().copied().fold(0.0, f64::max);
        let cpus = std::thread::available_parallelism().map_or(1, |c| c.get()) as f64;
        let mut figures = BTreeMap::from([
            ("elements_per_s", n as f64 / seconds),
            ("seconds", seconds),
            ("redis_cpu_seconds", redis_cpu),
            ("daemon_cpu_seconds", daemons_cpu),
            ("bench_cpu_seconds", bench_cpu),
            ("cpu_share_ours", (redis_cpu + daemons_cpu + bench_cpu) / (cpus * seconds)),
            ("redis_bound_elements_per_s", n as f64 / busiest),
        ]);
        if let (Some((busy0, total0)), Some((busy1, total1))) = (self.machine, machine_ticks()) {
            if total1 > total0 {
                figures.insert("cpu_share_all", (busy1 - busy0) as f64 / (total1 - total0) as f64);
            }
        }
        let shards = shard_cpu
            .iter()
            .zip(per_shard)
            .map(|(&cpu, &elements)| {
                BTreeMap::from([
                    ("redis_cpu_seconds", cpu),
                    ("elements", elements as f64),
                    ("redis_us_per_element", 1e6 * cpu / elements as f64),
                    ("redis_busy", cpu / seconds),
                ])
            })
            .collect();
        Phase { figures, shards }
    }
}

/// The runs of one deployment with a number of daemons.
pub(crate) struct ScaleConfig {
    /// Index into [`ScaleOut::deployments`].
    pub(crate) deployment: usize,
    pub(crate) daemons: usize,
    pub(crate) ingest: Vec<Phase>,
    pub(crate) release: Vec<Phase>,
}

/// What a deployment was.
pub(crate) struct DeploymentInfo {
    pub(crate) key: &'static str,
    pub(crate) namespace: String,
    pub(crate) partitions: u16,
    pub(crate) partitions_per_shard: Vec<usize>,
}

/// Every run of the scale-out section.
pub(crate) struct ScaleOut {
    pub(crate) deployments: Vec<DeploymentInfo>,
    /// Standalone and cluster with one daemon, then with [`MANY_DAEMONS`].
    pub(crate) configs: Vec<ScaleConfig>,
    /// The reference script's release on each deployment (by index).
    pub(crate) reference: Vec<Vec<Phase>>,
}

impl Bench {
    /// The scale-out section (see the module docs): `opts.runs` rounds, each
    /// running every configuration once, then the reference script on each
    /// deployment.
    pub(crate) async fn scaleout(&mut self, cluster: &RedisCluster, opts: &Options) -> Result<ScaleOut> {
        let deployments = [Deployment::standalone(&self.redis).await?, Deployment::cluster(cluster).await?];
        let n = opts.n;
        let env = if opts.smoke { SMOKE_ENV } else { &[] };
        let mut configs: Vec<ScaleConfig> = [1, MANY_DAEMONS]
            .into_iter()
            .flat_map(|daemons| {
                (0..deployments.len()).map(move |deployment| ScaleConfig {
                    deployment,
                    daemons,
                    ingest: Vec::new(),
                    release: Vec::new(),
                })
            })
            .collect();
        let mut reference = vec![Vec::new(); deployments.len()];
        let name = |d: &Deployment, daemons: usize| {
            let s = if daemons == 1 { "" } else { "s" };
            format!("scale-out, {} P = {}, {daemons} daemon{s}", d.key, d.ns.partitions())
        };
        if !opts.smoke && opts.runs > 1 {
            // The cluster's fresh servers grow their memory in a first run,
            // as the standalone one did in the bench's warm-up.
            let d = &deployments[1];
            self.progress.start(&format!("{} (warm-up, not counted)", name(d, 1)));
            let (i, r) = self.scale_run(d, 1, n, env).await.context("scale-out warm-up")?;
            self.progress.done(&phases_summary(&i, &r));
        }
        for run in 1..=opts.runs {
            for c in configs.iter_mut() {
                let d = &deployments[c.deployment];
                let label = format!("{} {run}/{}", name(d, c.daemons), opts.runs);
                self.progress.start(&label);
                let (i, r) = self.scale_run(d, c.daemons, n, env).await.with_context(|| label.clone())?;
                self.progress.done(&phases_summary(&i, &r));
                c.ingest.push(i);
                c.release.push(r);
            }
            for (d, runs) in deployments.iter().zip(reference.iter_mut()) {
                let label =
                    format!("scale-out, reference script, {} P = {} {run}/{}", d.key, d.ns.partitions(), opts.runs);
                self.progress.start(&label);
                let r = self.scale_reference(d, n).await.with_context(|| label.clone())?;
                self.progress.done(&rate(r.figures["elements_per_s"]));
                runs.push(r);
            }
        }
        let deployments = deployments
            .iter()
            .map(|d| DeploymentInfo {
                key: d.key,
                namespace: d.ns.name().to_owned(),
                partitions: d.ns.partitions(),
                partitions_per_shard: d.partitions_per_shard(),
            })
            .collect();
        Ok(ScaleOut { deployments, configs, reference })
    }

    /// Flushes the deployment and starts `count` daemons on it; returns
    /// once each partition has an owner, the daemons own as many
    /// partitions each (± 1) and every partition has applied a first entry.
    async fn start_daemons(&mut self, d: &Deployment, count: usize, env: &[(&str, &str)]) -> Result<Vec<BenchDaemon>> {
        d.flush().await?;
        let names: Vec<String> = (0..count).map(|i| format!("{DAEMON_CONSUMER}-{i}")).collect();
        let mut daemons: Vec<BenchDaemon> = names
            .iter()
            .map(|name| BenchDaemon::spawn_as(&self.bin, &d.url, d.ns.name(), d.ns.partitions(), name, false, env))
            .collect();
        self.progress.update("starting the daemons");
        let registry = d.ns.daemons();
        wait_for("the daemons to share the partitions", &mut daemons, SHARING_PATIENCE, async || {
            let live: Vec<String> =
                redis::cmd("ZRANGE").arg(&registry).arg(0).arg(-1).query_async(&mut d.control.clone()).await?;
            if !names.iter().all(|n| live.contains(n)) {
                return Ok(false);
            }
            let mut owned: BTreeMap<&str, usize> = names.iter().map(|n| (n.as_str(), 0)).collect();
            for part in &d.parts {
                let token: Option<String> =
                    redis::cmd("GET").arg(part.keys.owner()).query_async(&mut part.conn.clone()).await?;
                // The owner lock holds `<consumer>:<random>`.
                let Some(owner) = token.as_deref().and_then(|t| t.rsplit_once(':')).map(|(name, _)| name) else {
                    return Ok(false);
                };
                match owned.get_mut(owner) {
                    Some(c) => *c += 1,
                    None => return Ok(false),
                }
            }
            let (lo, hi) = (owned.values().min().copied(), owned.values().max().copied());
            Ok(lo.zip(hi).is_some_and(|(lo, hi)| hi - lo <= 1))
        })
        .await?;
        // Ready once each partition has applied an entry: a cancel of nothing.
        let mut first = Vec::with_capacity(d.parts.len());
        for (p, part) in d.parts.iter().enumerate() {
            let id = id_in(&d.ns, p as u16);
            let entry: String = testkit::cancel_cmd(&part.keys, &id).query_async(&mut part.conn.clone()).await?;
            first.push(parse_id(&entry)?);
        }
        wait_for("each partition to apply a first entry", &mut daemons, SHARING_PATIENCE, async || {
            d.applied_up_to(&first).await
        })
        .await?;
        Ok(daemons)
    }

    /// One run of a configuration: `count` daemons on `d`; `n` adds written
    /// with pipelined `XADD`s, each partition's own (as in the ingest
    /// scenario, two pipelines in flight per partition), timed until all
    /// are applied; then one watermark written to every partition, timed
    /// until all `n` are in the partitions' `:out`. The daemons get extra
    /// environment `env`.
    async fn scale_run(
        &mut self,
        d: &Deployment,
        count: usize,
        n: usize,
        env: &[(&str, &str)],
    ) -> Result<(Phase, Phase)> {
        let mut daemons = self.start_daemons(d, count, env).await?;
        let routed = d.route(n);
        let per_shard = d.by_shard(&routed.iter().map(Vec::len).collect::<Vec<_>>());
        let pipes: Vec<_> = d
            .parts
            .iter()
            .zip(&routed)
            .map(|(part, ks)| add_pipelines_of(&part.keys.input, ks, |k| TS_BASE + k as i64, Payload::None))
            .collect();

        // Ingest.
        let meter = Meter::start(d, &daemons);
        let written = Arc::new(AtomicUsize::new(0));
        let writers = d
            .parts
            .iter()
            .zip(pipes)
            .map(|(part, pipes)| tokio::spawn(write_all(part.conn.clone(), pipes, Arc::clone(&written))));
        let mut writers = std::pin::pin!(join_all(writers));
        let results = loop {
            tokio::select! {
                r = &mut writers => break r,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {
                    self.progress.count("written", written.load(Ordering::Relaxed), n);
                }
            }
        };
        let mut last = Vec::with_capacity(results.len());
        for r in results {
            last.push(r.context("a writer task failed")??);
        }
        let progress = &self.progress;
        let end = wait_for("every add to be applied", &mut daemons, PATIENCE, async || {
            let scheduled = d.scheduled().await?;
            progress.count("applied", scheduled, n);
            Ok(scheduled >= n && d.applied_up_to(&last).await?)
        })
        .await?;
        let ingest = meter.finish(d, &daemons, end, n, &per_shard);
        if d.scheduled().await? != n {
            bail!("after ingest {} elements are scheduled (expected {n})", d.scheduled().await?);
        }
        // Applied input is garbage for the release; drop it now rather than
        // wait for housekeeping (as the release scenario does).
        for part in &d.parts {
            redis::cmd("XTRIM")
                .arg(&part.keys.input)
                .arg("MAXLEN")
                .arg(0)
                .query_async::<()>(&mut part.conn.clone())
                .await?;
        }

        // Release.
        let wm = TS_BASE + n as i64;
        let meter = Meter::start(d, &daemons);
        try_join_all(d.parts.iter().map(|part| {
            let (mut conn, cmd) = (part.conn.clone(), testkit::watermark_cmd(&part.keys, wm));
            async move { cmd.query_async::<String>(&mut conn).await }
        }))
        .await?;
        let end = wait_for("every element to be released", &mut daemons, PATIENCE, async || {
            let out: usize = d.released().await?.iter().sum();
            progress.count("released", out, n);
            Ok(out >= n)
        })
        .await?;
        let release = meter.finish(d, &daemons, end, n, &per_shard);
        let (left, out) = (d.scheduled().await?, d.released().await?);
        let expected: Vec<usize> = routed.iter().map(Vec::len).collect();
        if left != 0 || out != expected {
            bail!("after the release {left} elements are still scheduled and the partitions' :out hold {out:?} (expected 0 and {expected:?})");
        }
        for daemon in daemons {
            self.stop(daemon)?;
        }
        Ok((ingest, release))
    }

    /// The reference script's release of `n` elements scheduled directly
    /// on `d`'s partitions: every partition released at once, two calls in
    /// flight each (as a daemon keeps them); no daemon.
    async fn scale_reference(&mut self, d: &Deployment, n: usize) -> Result<Phase> {
        d.flush().await?;
        let routed = d.route(n);
        let per_part: Vec<usize> = routed.iter().map(Vec::len).collect();
        let per_shard = d.by_shard(&per_part);
        let wm = TS_BASE + n as i64;
        let mut calls = Vec::with_capacity(d.parts.len());
        for (part, ks) in d.parts.iter().zip(&routed) {
            schedule_directly(&mut part.conn.clone(), &part.keys, ks, Payload::None).await?;
            calls.push(reference_call(&mut part.conn.clone(), &part.keys, wm, Payload::None).await?);
        }
        let released = AtomicUsize::new(0);
        let meter = Meter::start(d, &[]);
        let got = try_join_all(
            d.parts
                .iter()
                .zip(&calls)
                .map(|(part, call)| reference_release(&part.conn, call, &released, &self.progress, n)),
        )
        .await?;
        let end = Instant::now();
        let out = d.released().await?;
        if got != per_part || out != per_part {
            bail!(
                "the reference script released {got:?} and the partitions' :out hold {out:?} (expected {per_part:?})"
            );
        }
        Ok(meter.finish(d, &[], end, n, &per_shard))
    }
}

/// A run's progress line: both rates.
fn phases_summary(ingest: &Phase, release: &Phase) -> String {
    format!("ingest {}, release {}", rate(ingest.figures["elements_per_s"]), rate(release.figures["elements_per_s"]))
}
