//! Partitioned namespaces (DESIGN §7) on a real local Redis Cluster: the
//! seed scenario spread over partitions, agreement on the partition count,
//! and what the cluster does to a running daemon (slot migration, failover,
//! kill -9).

use std::collections::BTreeMap;
use std::time::Duration;

use tidemark::store::Namespace;

use testkit::{read_stream, run_cli, text, wait_until, xlen, Daemon, RedisCluster, RedisServer};

const WAIT: Duration = Duration::from_secs(60);

pub(crate) fn ns(partitions: u16) -> Namespace {
    Namespace::new("tidemark", "default", partitions)
}

/// Runs the CLI against `url`; asserts success; returns stdout.
pub(crate) fn cli(url: &str, args: &[&str]) -> String {
    let mut all = vec!["--redis-url", url];
    all.extend_from_slice(args);
    let out = run_cli(&all, &[]);
    assert!(out.status.success(), "tidemark {all:?}: {}\n{}", text(&out.stdout), text(&out.stderr));
    text(&out.stdout)
}

/// Each partition's released elements, as (id, ts).
fn released(conn: &mut redis::cluster::ClusterConnection, ns: &Namespace) -> BTreeMap<u16, Vec<(String, i64)>> {
    ns.all()
        .into_iter()
        .map(|keys| {
            let out = read_stream(conn, &keys.out);
            let got = out
                .into_iter()
                .map(|(_, fields)| {
                    assert_eq!(fields[0].0, b"id");
                    assert_eq!(fields[1].0, b"ts");
                    (text(&fields[0].1), text(&fields[1].1).parse().expect("ts"))
                })
                .collect();
            (keys.partition, got)
        })
        .collect()
}

fn total(r: &BTreeMap<u16, Vec<(String, i64)>>) -> usize {
    r.values().map(Vec::len).sum()
}

fn cluster_conn(c: &RedisCluster) -> redis::cluster::ClusterConnection {
    redis::cluster::ClusterClient::new(vec![c.url()]).expect("cluster client").get_connection().expect("connect")
}

pub(crate) fn start_daemon(url: &str, name: &str, partitions: u16, envs: &[(&str, &str)]) -> Daemon {
    let p = partitions.to_string();
    let mut all = vec![("TIDEMARK__DAEMON__BLOCK", "200ms"), ("TIDEMARK__LEASE__TTL", "1s")];
    all.extend_from_slice(envs);
    let d = Daemon::spawn(&["run", "--redis-url", url, "--consumer", name, "--partitions", &p], &all);
    d.wait_log("connected to Redis", WAIT);
    d
}

/// The seed scenario, with the namespace spread over 4 partitions on a
/// 3-master cluster: adds routed by crc32(id), the watermark written to
/// every partition, each partition releasing its own elements in (ts, id)
/// order, and nothing early.
#[test]
fn seed_scenario_on_four_partitions() {
    let cluster = RedisCluster::start(3, 0);
    let url = cluster.url();
    let d = start_daemon(&url, "d1", 4, &[]);
    let mut conn = cluster_conn(&cluster);
    let ns = ns(4);
    // Enough ids that every partition gets some.
    let ids: Vec<String> = (0..40).map(|i| format!("el-{i:07}")).collect();
    for (i, id) in ids.iter().enumerate() {
        cli(&url, &["add", "--id", id, "--ts", &(i % 4 + 1).to_string(), "--field", &format!("n={i}")]);
    }
    cli(&url, &["watermark", "2"]);
    let due: usize = (0..40).filter(|i| i % 4 < 2).count();
    wait_until("the elements due at 2 are out", WAIT, || total(&released(&mut conn, &ns)) == due);
    let out = released(&mut conn, &ns);
    for (p, got) in &out {
        for (id, ts) in got {
            assert_eq!(ns.route(id.as_bytes()), *p, "{id} released by the wrong partition");
            assert!(*ts <= 2, "{id} at ts {ts} released early");
        }
        let mut sorted = got.clone();
        sorted.sort_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(&b.0)));
        assert_eq!(got, &sorted, "partition {p} releases in (ts, id) order");
    }
    assert!(out.values().filter(|g| !g.is_empty()).count() == 4, "every partition released some: {out:?}");
    cli(&url, &["watermark", "4"]);
    wait_until("everything is out", WAIT, || total(&released(&mut conn, &ns)) == 40);

    // status adds the partitions up and shows each one.
    let status: serde_json::Value = serde_json::from_str(&cli(&url, &["status", "--json"])).expect("status JSON");
    assert_eq!(status["partitions"], 4);
    assert_eq!(status["watermark"], 4);
    assert_eq!(status["watermark_spread"], 0);
    assert_eq!(status["output"]["length"], 40);
    assert_eq!(status["by_partition"].as_array().map(Vec::len), Some(4));
    assert_eq!(status["daemons"], serde_json::json!(["d1"]));
    drop(d);
}

/// The first daemon records the partition count; a process configured with
/// another count refuses to start (exit 64, naming both counts), and one
/// with none configured takes it from the record.
#[test]
fn a_mismatched_partition_count_is_refused() {
    let redis = RedisServer::start();
    let url = redis.url();
    let _d = start_daemon(&url, "d1", 4, &[]);
    let meta: Option<String> =
        redis::cmd("HGET").arg(ns(4).meta()).arg("partitions").query(&mut redis.sync_conn()).expect("HGET");
    assert_eq!(meta.as_deref(), Some("4"));

    let mut other = Daemon::spawn(&["run", "--redis-url", &url, "--consumer", "d2", "--partitions", "2"], &[]);
    let status = other.wait_exit(WAIT).expect("the mismatched daemon exits");
    assert_eq!(status.code(), Some(64), "{}", other.log());
    let log = other.log();
    assert!(log.contains("has 4 partition(s)") && log.contains("configured with 2"), "{log}");

    let out = run_cli(&["--redis-url", &url, "--partitions", "3", "watermark", "5"], &[]);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out.stderr));
    // Without a count the record decides: the watermark reaches all four.
    cli(&url, &["watermark", "5"]);
    let mut conn = redis.sync_conn();
    for keys in ns(4).all() {
        let len = xlen(&mut conn, &keys.input);
        assert_eq!(len, 1, "{} got the watermark", keys.input);
    }
}

pub(crate) fn sched_all(conn: &mut impl redis::ConnectionLike, ns: &Namespace) -> BTreeMap<String, (u16, i64)> {
    let mut all = BTreeMap::new();
    for keys in ns.all() {
        let members: Vec<(String, i64)> =
            redis::cmd("ZRANGE").arg(&keys.sched).arg(0).arg(-1).arg("WITHSCORES").query(conn).expect("ZRANGE");
        for (id, ts) in members {
            assert!(all.insert(id.clone(), (keys.partition, ts)).is_none(), "{id} scheduled twice");
        }
    }
    all
}

/// A namespace grows from one partition on a standalone Redis to six on a
/// cluster: the scheduled elements move with their payloads to
/// crc32(id) mod 6, the watermark and dead letters follow, the refusals
/// hold while a daemon runs or output waits unread, a second run changes
/// nothing, and daemons on the cluster then release everything correctly.
#[test]
fn repartition_from_one_standalone_partition_to_six_on_a_cluster() {
    let redis = RedisServer::start();
    let url = redis.url();
    let mut d = start_daemon(&url, "d1", 1, &[]);
    let mut src = redis.sync_conn();
    for i in 0..300 {
        cli(
            &url,
            &["add", "--id", &format!("el-{i:07}"), "--ts", &(1000 + i).to_string(), "--field", &format!("n={i}")],
        );
    }
    // One malformed entry: a dead letter.
    testkit::xadd_fields(&mut src, &ns(1).partition(0).input, &[(b"op", b"add"), (b"ts", b"5")]);
    cli(&url, &["watermark", "999"]);
    wait_until("all 300 scheduled", WAIT, || sched_all(&mut src, &ns(1)).len() == 300);

    let cluster = RedisCluster::start(3, 0);
    let to = cluster.url();
    let refused = run_cli(&["--redis-url", &url, "repartition", "--to", "6", "--to-redis-url", &to], &[]);
    assert_ne!(refused.status.code(), Some(0), "refused while a daemon serves the namespace");
    assert!(text(&refused.stderr).contains("serve namespace"), "{}", text(&refused.stderr));
    d.sigterm();
    d.wait_exit(WAIT).expect("the daemon stops");

    let out = cli(&url, &["repartition", "--to", "6", "--to-redis-url", &to]);
    assert!(out.contains("moved 300 elements") && out.contains("1 dead letters"), "{out}");
    let mut dst = cluster_conn(&cluster);
    let moved = sched_all(&mut dst, &ns(6));
    assert_eq!(moved.len(), 300);
    for (id, (p, ts)) in &moved {
        assert_eq!(*p, ns(6).route(id.as_bytes()), "{id} in the wrong partition");
        let i: i64 = id.trim_start_matches("el-").parse().expect("number");
        assert_eq!(*ts, 1000 + i);
        let body: Option<Vec<u8>> =
            redis::cmd("HGET").arg(ns(6).partition(*p).body).arg(id).query(&mut dst).expect("HGET");
        assert!(body.is_some(), "{id} lost its payload");
    }
    assert!(sched_all(&mut src, &ns(1)).is_empty(), "the old schedule is emptied");
    for keys in ns(6).all() {
        let wm: Option<String> = redis::cmd("GET").arg(&keys.wm).query(&mut dst).expect("GET");
        assert_eq!(wm.as_deref(), Some("999"), "{}", keys.wm);
    }
    let meta: Option<String> = redis::cmd("HGET").arg(ns(6).meta()).arg("partitions").query(&mut dst).expect("HGET");
    assert_eq!(meta.as_deref(), Some("6"));
    let status: serde_json::Value = serde_json::from_str(&cli(&to, &["status", "--json"])).expect("status");
    assert_eq!(status["dead_letters"], 1);

    // Safe to run again: nothing moves twice.
    let again = cli(&url, &["repartition", "--to", "6", "--to-redis-url", &to]);
    assert!(again.contains("moved 0 elements") && again.contains("0 dead letters"), "{again}");
    assert_eq!(sched_all(&mut dst, &ns(6)).len(), 300);

    // Daemons on the cluster, which take the count from the record, release
    // everything in (ts, id) order within each partition.
    let _a = start_daemon(&to, "a", 6, &[]);
    let _b = Daemon::spawn(&["run", "--redis-url", &to, "--consumer", "b"], &[("TIDEMARK__LEASE__TTL", "1s")]);
    cli(&to, &["watermark", "2000"]);
    wait_until("all 300 released", WAIT, || total(&released(&mut dst, &ns(6))) == 300);
    for (p, got) in released(&mut dst, &ns(6)) {
        let mut sorted = got.clone();
        sorted.sort_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(&b.0)));
        assert_eq!(got, sorted, "partition {p}");
    }
}

/// Four partitions to eight on the same Redis, where the layouts share
/// keys: an output group with unread entries stops it unless --force, and
/// elements that stay in their partition are left alone.
#[test]
fn repartition_in_place_from_four_to_eight() {
    let redis = RedisServer::start();
    let url = redis.url();
    let mut d = start_daemon(&url, "d1", 4, &[]);
    cli(&url, &["add", "--id", "early", "--ts", "1"]);
    for i in 0..200 {
        cli(&url, &["add", "--id", &format!("el-{i:07}"), "--ts", &(1000 + i).to_string()]);
    }
    cli(&url, &["watermark", "1"]);
    let mut conn = redis.sync_conn();
    wait_until("scheduled", WAIT, || sched_all(&mut conn, &ns(4)).len() == 200);
    d.sigterm();
    d.wait_exit(WAIT).expect("stopped");
    // An output group that has not read `early` yet.
    let () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(ns(4).keys_for(b"early").out)
        .arg("g")
        .arg("0")
        .query(&mut conn)
        .expect("XGROUP CREATE");
    wait_until("the daemon's lease is gone", WAIT, || {
        let out = run_cli(&["--redis-url", &url, "repartition", "--to", "8"], &[]);
        text(&out.stderr).contains("output group g")
    });
    let out = cli(&url, &["repartition", "--to", "8", "--force"]);
    let moved: u64 = out.split_whitespace().nth(1).and_then(|n| n.parse().ok()).expect("moved count");
    let after = sched_all(&mut conn, &ns(8));
    assert_eq!(after.len(), 200, "{out}");
    let stayed = after.iter().filter(|(id, (p, _))| ns(4).route(id.as_bytes()) == *p).count() as u64;
    assert_eq!(moved + stayed, 200, "{out}");
    assert!(stayed > 0 && moved > 0, "{out}");
    for (id, (p, _)) in &after {
        assert_eq!(*p, ns(8).route(id.as_bytes()));
    }
}

// ---------------------------------------------------------------------------
// What a cluster does to a running namespace
// ---------------------------------------------------------------------------

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// What a background producer wrote.
struct Written {
    /// Every element added, with its ts (each above the watermark then).
    elements: Vec<(String, i64)>,
    /// The last watermark, above every ts.
    final_watermark: i64,
}

/// A producer writing in the background through tidemark's producer API
/// (adds routed by crc32(id), watermarks to every partition), until
/// stopped. Batches that fail (a failover, a migrating slot) are written
/// again, so an element may be in `:in` twice: the checks count that.
struct Workload {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Written>,
}

impl Workload {
    fn start(url: &str, partitions: u16) -> Workload {
        Self::start_after(url, partitions, None)
    }

    /// A producer that goes on where `before` stopped: ids after its ids and
    /// ts above its final watermark, so that nothing it writes is late (a
    /// late element is released at once, out of (ts, id) order).
    fn start_after(url: &str, partitions: u16, before: Option<&Written>) -> Workload {
        let (first_n, first_wm) = before.map_or((0, 1_000), |w| (w.elements.len() as u64, w.final_watermark));
        let stop = Arc::new(AtomicBool::new(false));
        let url = url.to_owned();
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                let opts = tidemark::store::ConnectOptions {
                    connect_timeout: Duration::from_secs(2),
                    response_timeout: Duration::from_secs(5),
                };
                let client = redis::Client::open(url.as_str()).expect("client");
                let redis = tidemark::store::Endpoint::new(client, None, tidemark::store::Mode::Auto, opts);
                let ns = ns(partitions);
                let mut producer = loop {
                    match tidemark::produce::Producer::connect(&redis, &ns, Some(partitions)).await {
                        Ok(p) => break p,
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                };
                let mut written = Written { elements: Vec::new(), final_watermark: 0 };
                let mut wm = first_wm;
                let mut n = first_n;
                while !flag.load(Ordering::SeqCst) {
                    let mut batch = producer.batch();
                    let mut these = Vec::new();
                    for _ in 0..40 {
                        let id = format!("w-{n:08}");
                        let ts = wm + 1 + (n * 7919 % 100) as i64;
                        batch.add(id.as_bytes(), ts, &[(b"n", n.to_string().as_bytes())]);
                        these.push((id, ts));
                        n += 1;
                    }
                    wm += 40;
                    batch.watermark(wm);
                    // Until it is written: what fails stays in the batch,
                    // and sending again retries only that.
                    while batch.send(&mut producer).await.is_err() {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    written.elements.extend(these);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                let last = wm + 1_000;
                let mut batch = producer.batch();
                batch.watermark(last);
                while batch.send(&mut producer).await.is_err() {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                written.final_watermark = last;
                written
            })
        });
        Workload { stop, thread }
    }

    fn finish(self) -> Written {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("producer thread")
    }
}

/// Waits until everything written is released, then checks: each element
/// released by its own partition, in (ts, id) order there, never more often
/// than it was added (tidemark doubles nothing), and returns how many
/// elements were lost (`lost_ok` of them may be, after a master's kill -9:
/// asynchronous replication).
fn check_released(
    conn: &mut redis::cluster::ClusterConnection,
    ns: &Namespace,
    written: &Written,
    lost_ok: bool,
) -> usize {
    let expected: BTreeMap<&str, i64> = written.elements.iter().map(|(id, ts)| (id.as_str(), *ts)).collect();
    let settle = if lost_ok { Duration::from_secs(20) } else { WAIT };
    let counts = |conn: &mut redis::cluster::ClusterConnection| -> BTreeMap<String, usize> {
        let mut c = BTreeMap::new();
        for got in released(conn, ns).into_values() {
            for (id, _) in got {
                *c.entry(id).or_insert(0) += 1;
            }
        }
        c
    };
    let started = std::time::Instant::now();
    loop {
        let c = counts(conn);
        if expected.keys().all(|id| c.contains_key(*id)) || started.elapsed() > settle {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = released(conn, ns);
    let mut added: BTreeMap<String, usize> = BTreeMap::new();
    for keys in ns.all() {
        for (_, fields) in read_stream(conn, &keys.input) {
            if fields.first().map(|(_, v)| v.as_slice()) == Some(b"add") {
                *added.entry(text(&fields[1].1)).or_insert(0) += 1;
            }
        }
    }
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for (p, got) in &out {
        // Order: each element's first release (a second one can only come
        // from a second add, checked below).
        let mut firsts: Vec<(String, i64)> = Vec::new();
        for e in got {
            if !firsts.contains(e) {
                firsts.push(e.clone());
            }
        }
        let mut sorted = firsts.clone();
        sorted.sort_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(&b.0)));
        assert_eq!(firsts, sorted, "partition {p} releases in (ts, id) order");
        for (id, ts) in got {
            assert_eq!(ns.route(id.as_bytes()), *p, "{id} released by partition {p}");
            assert_eq!(expected.get(id.as_str()), Some(ts), "{id} released with another ts");
            *seen.entry(id.clone()).or_insert(0) += 1;
        }
    }
    for (id, n) in &seen {
        let adds = added.get(id).copied().unwrap_or(0);
        assert!(*n <= adds.max(1), "{id} released {n} times but added {adds} times: tidemark doubled it");
    }
    let lost = expected.keys().filter(|id| !seen.contains_key(**id)).count();
    if !lost_ok {
        assert_eq!(
            lost,
            0,
            "elements lost: {:?}",
            expected.keys().filter(|id| !seen.contains_key(**id)).take(10).collect::<Vec<_>>()
        );
    }
    lost
}

fn fault_daemon(url: &str, name: &str, partitions: u16) -> Daemon {
    start_daemon(url, name, partitions, &[("TIDEMARK__HOUSEKEEPING__TRIM_INPUT", "false")])
}

/// A partition's slot migrates to another master while elements are
/// ingested and released: nothing lost, nothing doubled, order kept.
#[test]
fn slot_migration_under_load_loses_and_doubles_nothing() {
    let cluster = RedisCluster::start(3, 0);
    let url = cluster.url();
    let ns = ns(6);
    let _d = fault_daemon(&url, "d1", 6);
    let work = Workload::start(&url, 6);
    let mut conn = cluster_conn(&cluster);
    wait_until("work flows", WAIT, || total(&released(&mut conn, &ns)) > 500);
    let slot = tidemark::core::route::key_slot(ns.partition(2).input.as_bytes());
    let from = cluster.master_of(slot);
    let to = (from + 1) % 3;
    let started = std::time::Instant::now();
    cluster.migrate_slot(slot, to, || std::thread::sleep(Duration::from_millis(20)));
    eprintln!("slot {slot} (partition 2) migrated from node {from} to node {to} in {:?}", started.elapsed());
    let before = total(&released(&mut conn, &ns));
    wait_until("work flows on after the migration", WAIT, || total(&released(&mut conn, &ns)) > before + 500);
    let written = work.finish();
    check_released(&mut conn, &ns, &written, false);
    eprintln!("slot migration: {} elements, none lost or doubled", written.elements.len());
}

/// A manual failover (`CLUSTER FAILOVER` on a replica) mid-run loses and
/// doubles nothing; then a master killed with kill -9 and its replica
/// promoted: what asynchronous replication lost is counted, nothing is
/// doubled by tidemark, and work resumes.
#[test]
fn failovers_mid_run() {
    let cluster = RedisCluster::start(3, 1);
    let url = cluster.url();
    let ns = ns(6);
    let _d = fault_daemon(&url, "d1", 6);
    let work = Workload::start(&url, 6);
    let mut conn = cluster_conn(&cluster);
    wait_until("work flows", WAIT, || total(&released(&mut conn, &ns)) > 300);
    let slot = tidemark::core::route::key_slot(ns.partition(0).input.as_bytes());
    let master = cluster.master_of(slot);
    let replica = cluster.replica_of(master);
    let started = std::time::Instant::now();
    cluster.failover(replica);
    eprintln!("manual failover of partition 0's master took {:?}", started.elapsed());
    let before = total(&released(&mut conn, &ns));
    wait_until("work flows on after the manual failover", WAIT, || total(&released(&mut conn, &ns)) > before + 300);
    let written = work.finish();
    check_released(&mut conn, &ns, &written, false);

    // kill -9 of a master: its replica is promoted after the node timeout.
    let work = Workload::start_after(&url, 6, Some(&written));
    wait_until("work flows again", WAIT, || total(&released(&mut conn, &ns)) > written.elements.len() + 200);
    let slot = tidemark::core::route::key_slot(ns.partition(1).input.as_bytes());
    let victim = cluster.master_of(slot);
    let mut nodes = cluster;
    let killed = std::time::Instant::now();
    nodes.nodes[victim].kill9();
    wait_until("a replica is promoted", WAIT, || nodes.master_of(slot) != victim);
    eprintln!("kill -9 of a master: promotion after {:?}", killed.elapsed());
    let mut conn = cluster_conn_from(&nodes, victim);
    let before = total(&released(&mut conn, &ns));
    wait_until("work flows on after the promotion", WAIT, || total(&released(&mut conn, &ns)) > before + 300);
    let second = work.finish();
    let mut all = written;
    all.elements.extend(second.elements);
    all.final_watermark = second.final_watermark;
    let lost = check_released(&mut conn, &ns, &all, true);
    eprintln!(
        "kill -9 of a master: {lost} of {} elements lost by asynchronous replication, none doubled",
        all.elements.len()
    );
}

fn cluster_conn_from(c: &RedisCluster, skip: usize) -> redis::cluster::ClusterConnection {
    let seeds: Vec<String> = (0..c.nodes.len()).filter(|&i| i != skip).map(|i| c.nodes[i].url()).collect();
    redis::cluster::ClusterClient::new(seeds).expect("cluster client").get_connection().expect("connect")
}

/// The randomized model test on a cluster: two daemons share eight
/// partitions; producers write random operations (adds and cancels routed
/// by crc32(id), watermarks to every partition, malformed entries, ids of
/// every shape); each partition's output must be exactly what the model
/// computes from that partition's input stream.
#[test]
fn two_daemons_on_eight_partitions_match_the_model() {
    use rand::{RngExt, SeedableRng};
    let cluster = RedisCluster::start(3, 0);
    let url = cluster.url();
    let ns = ns(8);
    let envs = [("TIDEMARK__DAEMON__RELEASE_CHUNK", "5"), ("TIDEMARK__HOUSEKEEPING__TRIM_INPUT", "false")];
    let d1 = start_daemon(&url, "d1", 8, &envs);
    let d2 = start_daemon(&url, "d2", 8, &envs);
    let mut conn = cluster_conn(&cluster);
    let seed: u64 = std::env::var("TIDEMARK_MODEL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(8);
    eprintln!("partitioned model run: seed {seed} (rerun with TIDEMARK_MODEL_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let pool = crate::model::id_pool();
    let ops = 2_000;
    for n in 0..ops {
        let op = crate::model::random_op(&mut rng, &pool, n as i64 / 3);
        let field = |name: &[u8]| op.iter().find(|(k, _)| k.as_slice() == name).map(|(_, v)| v.clone());
        let targets: Vec<u16> = match (field(b"op").as_deref(), field(b"id")) {
            (Some(b"watermark"), _) => (0..8).collect(),
            (_, Some(id)) => vec![ns.route(&id)],
            _ => vec![rng.random_range(0..8)],
        };
        for p in targets {
            let fields: Vec<(&[u8], &[u8])> = op.iter().map(|(k, v)| (k.as_slice(), v.as_slice())).collect();
            testkit::xadd_fields(&mut conn, &ns.partition(p).input, &fields);
        }
    }
    for keys in ns.all() {
        testkit::xadd_fields(&mut conn, &keys.input, &[(b"op", b"watermark"), (b"ts", b"1000000000")]);
    }
    let models: Vec<crate::model::Model> =
        ns.all().iter().map(|keys| crate::model::Model::run(&read_stream(&mut conn, &keys.input))).collect();
    wait_until("every partition's output is complete", WAIT, || {
        ns.all().iter().zip(&models).all(|(keys, m)| {
            let len: usize = redis::cmd("XLEN").arg(&keys.out).query(&mut conn).expect("XLEN");
            len >= m.out.len()
        })
    });
    // A release still running finishes; an extra entry would show below.
    std::thread::sleep(Duration::from_millis(200));
    for (keys, m) in ns.all().iter().zip(&models) {
        let out = read_stream(&mut conn, &keys.out);
        crate::model::assert_output_matches(&format!("seed {seed}, partition {}", keys.partition), &out, m);
    }
    let applied = |d: &Daemon| d.log().lines().filter(|l| l.contains("applied input batch")).count();
    assert!(applied(&d1) > 0 && applied(&d2) > 0, "both daemons own partitions");
}

/// A daemon killed with kill -9 while it releases a large backlog on a
/// cluster: the other daemon takes its partitions over within about a
/// lease lifetime and everything is released exactly once, in order.
#[test]
fn kill9_of_a_daemon_during_a_release() {
    let cluster = RedisCluster::start(3, 0);
    let url = cluster.url();
    let ns = ns(6);
    let envs = [("TIDEMARK__DAEMON__RELEASE_CHUNK", "50")];
    let mut d1 = start_daemon(&url, "d1", 6, &envs);
    let _d2 = start_daemon(&url, "d2", 6, &envs);
    let mut conn = cluster_conn(&cluster);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    const N: usize = 30_000;
    rt.block_on(async {
        let opts = tidemark::store::ConnectOptions {
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(10),
        };
        let client = redis::Client::open(url.as_str()).expect("client");
        let redis = tidemark::store::Endpoint::new(client, None, tidemark::store::Mode::Auto, opts);
        let mut producer = tidemark::produce::Producer::connect(&redis, &ns, None).await.expect("producer");
        for chunk in 0..(N / 1000) {
            let mut batch = producer.batch();
            for i in chunk * 1000..(chunk + 1) * 1000 {
                batch.add(format!("k-{i:06}").as_bytes(), 10 + (i % 977) as i64, &[(b"p", b"payload")]);
            }
            batch.send(&mut producer).await.expect("send");
        }
    });
    let scheduled = |conn: &mut redis::cluster::ClusterConnection| -> usize {
        ns.all().iter().map(|k| redis::cmd("ZCARD").arg(&k.sched).query::<usize>(conn).expect("ZCARD")).sum()
    };
    wait_until("everything scheduled", WAIT, || scheduled(&mut conn) == N);
    let out_len = |conn: &mut redis::cluster::ClusterConnection| -> usize {
        ns.all().iter().map(|k| redis::cmd("XLEN").arg(&k.out).query::<usize>(conn).expect("XLEN")).sum()
    };
    cli(&url, &["watermark", "100000"]);
    wait_until("the release is under way", WAIT, || out_len(&mut conn) > 0);
    d1.kill9();
    let at_kill = out_len(&mut conn);
    let killed = std::time::Instant::now();
    assert!(at_kill < N, "the release finished before the kill");
    wait_until("everything released", WAIT, || out_len(&mut conn) >= N);
    eprintln!("kill -9 during a release: {at_kill} of {N} out at the kill, the rest {:?} later", killed.elapsed());
    let out = released(&mut conn, &ns);
    assert_eq!(total(&out), N, "nothing doubled");
    for (p, got) in out {
        let mut sorted = got.clone();
        sorted.sort_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(&b.0)));
        assert_eq!(got, sorted, "partition {p} in (ts, id) order");
    }
}

/// Two `tidemark consume` processes read one group on all six partitions;
/// one is killed with kill -9 mid-way: the other takes its pending entries
/// over (its lease expired) and every element is handled, on every
/// partition, with nothing left pending.
#[test]
fn consumers_across_partitions_survive_a_kill9() {
    let cluster = RedisCluster::start(3, 0);
    let url = cluster.url();
    let ns = ns(6);
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Daemon::spawn(
        &["run", "--redis-url", &url, "--consumer", "d1", "--partitions", "6", "--group", "g"],
        &[("TIDEMARK__LEASE__TTL", "1s")],
    );
    d.wait_log("connected to Redis", WAIT);
    let consume = |name: &str| {
        let done = dir.path().join(format!("{name}.done"));
        Daemon::spawn(
            &[
                "consume",
                "--redis-url",
                &url,
                "--group",
                "g",
                "--consumer",
                name,
                "--concurrency",
                "4",
                "--",
                "sh",
                "-c",
                r#"sleep 0.02; echo "$TIDEMARK_ID" >> "$DONE""#,
            ],
            &[
                ("DONE", done.to_str().expect("utf-8")),
                ("TIDEMARK__LEASE__TTL", "1s"),
                ("TIDEMARK__CONSUME__BLOCK", "200ms"),
            ],
        )
    };
    let mut a = consume("a");
    let b = consume("b");
    a.wait_log("consuming", WAIT);
    b.wait_log("consuming", WAIT);
    let lines = |name: &str| -> Vec<String> {
        std::fs::read_to_string(dir.path().join(format!("{name}.done")))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    };
    const N: usize = 600;
    let mut conn = cluster_conn(&cluster);
    for i in 0..N {
        let id = format!("c-{i:05}");
        testkit::xadd_fields(
            &mut conn,
            &ns.keys_for(id.as_bytes()).input,
            &[(b"op", b"add"), (b"id", id.as_bytes()), (b"ts", b"1")],
        );
    }
    cli(&url, &["watermark", "5"]);
    wait_until("consumer a handled some", WAIT, || lines("a").len() >= 10);
    a.kill9();
    wait_until("every element handled", WAIT, || {
        let mut all: Vec<String> = lines("a").into_iter().chain(lines("b")).collect();
        all.sort();
        all.dedup();
        all.len() == N
    });
    let handled_b = lines("b");
    let mut per_partition = [0usize; 6];
    for id in &handled_b {
        per_partition[usize::from(ns.route(id.as_bytes()))] += 1;
    }
    assert!(per_partition.iter().all(|n| *n > 0), "b read every partition: {per_partition:?}");
    wait_until("nothing left pending", WAIT, || {
        ns.all().iter().all(|k| {
            let summary: Vec<redis::Value> =
                redis::cmd("XPENDING").arg(&k.out).arg("g").query(&mut conn).expect("XPENDING");
            matches!(summary.first(), Some(redis::Value::Int(0)))
        })
    });
    let doubled = lines("a").len() + handled_b.len() - N;
    eprintln!("consumers across partitions, kill -9 of one: {N} handled, {doubled} twice (in flight at the kill)");
    // At most what the killed consumer was running (4) and what it had
    // finished but not yet acknowledged (acknowledgements go out within
    // 5 ms, by then at most another 4) runs twice.
    assert!(doubled <= 8, "at most the killed consumer's unacknowledged elements run twice, got {doubled}");
}

/// A consumer started before any daemon reads the namespace as one
/// partition; once the first daemon records four, the consumer notices
/// (within half a lease lifetime) and reads all four.
#[test]
fn a_consumer_follows_the_recorded_partition_count() {
    let redis = RedisServer::start();
    let url = redis.url();
    let dir = tempfile::tempdir().expect("tempdir");
    let done = dir.path().join("done");
    let c = Daemon::spawn(
        &[
            "consume",
            "--redis-url",
            &url,
            "--group",
            "g",
            "--consumer",
            "c",
            "--",
            "sh",
            "-c",
            r#"echo "$TIDEMARK_ID" >> "$DONE""#,
        ],
        &[("DONE", done.to_str().expect("utf-8")), ("TIDEMARK__LEASE__TTL", "1s")],
    );
    c.wait_log("partitions=1", WAIT);
    let _d = Daemon::spawn(
        &["run", "--redis-url", &url, "--consumer", "d1", "--partitions", "4", "--group", "g"],
        &[("TIDEMARK__LEASE__TTL", "1s")],
    );
    c.wait_log("partitions=4", WAIT);
    for i in 0..20 {
        cli(&url, &["add", "--id", &format!("f-{i}"), "--ts", "1"]);
    }
    cli(&url, &["watermark", "1"]);
    wait_until("all 20 handled", WAIT, || std::fs::read_to_string(&done).unwrap_or_default().lines().count() == 20);
}

/// An ACL user with the README's least-privilege rules works on a cluster as
/// on one server: the daemon, a consumer and the CLI authenticate on every
/// node they reach (scripts, blocking readers, the lock).
#[test]
fn an_acl_user_works_on_a_cluster() {
    let cluster = RedisCluster::start(3, 0);
    for n in &cluster.nodes {
        let () = redis::cmd("ACL")
            .arg("SETUSER")
            .arg("tidemark")
            .arg("on")
            .arg(">s3cret-acl")
            .arg("~tidemark:*")
            .arg("&tidemark:*")
            .arg("+@all")
            .arg("-@dangerous")
            .arg("+info")
            .query(&mut n.sync_conn())
            .expect("ACL SETUSER");
    }
    let url = format!("redis://tidemark:s3cret-acl@127.0.0.1:{}", cluster.nodes[1].port());
    let d = Daemon::spawn(
        &["run", "--redis-url", &url, "--consumer", "d1", "--partitions", "3", "--group", "g"],
        &[("TIDEMARK__LEASE__TTL", "1s")],
    );
    d.wait_log("connected to Redis", WAIT);
    let dir = tempfile::tempdir().expect("tempdir");
    let done = dir.path().join("done");
    let c = Daemon::spawn(
        &[
            "consume",
            "--redis-url",
            &url,
            "--group",
            "g",
            "--consumer",
            "c",
            "--",
            "sh",
            "-c",
            r#"echo "$TIDEMARK_ID" >> "$DONE""#,
        ],
        &[("DONE", done.to_str().expect("utf-8"))],
    );
    c.wait_log("consuming", WAIT);
    for i in 0..12 {
        cli(&url, &["add", "--id", &format!("acl-{i}"), "--ts", "1"]);
    }
    cli(&url, &["watermark", "1"]);
    wait_until("all 12 handled", WAIT, || std::fs::read_to_string(&done).unwrap_or_default().lines().count() == 12);
    for log in [d.log(), c.log()] {
        assert!(!log.contains("NOPERM") && !log.contains("s3cret-acl"), "{log}");
    }
}

/// TLS works on a cluster as on one server: every node serves TLS (and its
/// cluster bus is TLS); a `rediss://` URL of one node with the private CA
/// (`redis.tls_ca_file`) is enough for the daemon and the CLI, which reach
/// the other nodes over TLS too.
#[test]
fn tls_works_on_a_cluster() {
    let pki = crate::security::Pki::new();
    // The cluster bus listens on the TLS port + 10000 (with `tls-cluster`),
    // which must be a port too.
    let tls_ports: Vec<u16> =
        (0..3).map(|_| std::iter::repeat_with(testkit::free_port).find(|p| *p <= 55_535).expect("a port")).collect();
    let cluster = RedisCluster::start_with(3, 0, |i| {
        [
            "--tls-port",
            &tls_ports[i].to_string(),
            "--tls-cert-file",
            &pki.arg("server.crt"),
            "--tls-key-file",
            &pki.arg("server.key"),
            "--tls-ca-cert-file",
            &pki.arg("ca.crt"),
            "--tls-auth-clients",
            "no",
            // Nodes authenticate each other on the bus whatever
            // tls-auth-clients says: a certificate made for clients.
            "--tls-client-cert-file",
            &pki.arg("client.crt"),
            "--tls-client-key-file",
            &pki.arg("client.key"),
            "--tls-cluster",
            "yes",
        ]
        .map(String::from)
        .to_vec()
    });
    let url = format!("rediss://127.0.0.1:{}", tls_ports[2]);
    let ca = pki.arg("ca.crt");
    let envs = [("TIDEMARK__REDIS__TLS_CA_FILE", ca.as_str()), ("TIDEMARK__LEASE__TTL", "1s")];
    let d = Daemon::spawn(&["run", "--redis-url", &url, "--consumer", "d1", "--partitions", "3"], &envs);
    d.wait_log("connected to Redis", WAIT);
    let cli_tls = |args: &[&str]| {
        let mut all = vec!["--redis-url", url.as_str()];
        all.extend_from_slice(args);
        let out = run_cli(&all, &envs);
        assert!(out.status.success(), "tidemark {all:?}: {}", text(&out.stderr));
    };
    for i in 0..12 {
        cli_tls(&["add", "--id", &format!("tls-{i}"), "--ts", "1"]);
    }
    cli_tls(&["watermark", "1"]);
    let mut conn = cluster_conn(&cluster);
    wait_until("all 12 released", WAIT, || total(&released(&mut conn, &ns(3))) == 12);
    assert!(released(&mut conn, &ns(3)).values().filter(|v| !v.is_empty()).count() > 1, "spread over partitions");
}
