//! Partitioned namespaces (DESIGN §7) on a real local Redis Cluster: the
//! seed scenario spread over partitions, agreement on the partition count,
//! and what the cluster does to a running daemon (slot migration, failover,
//! kill -9).

use std::collections::BTreeMap;
use std::time::Duration;

use tidemark::store::Namespace;

use crate::cluster_harness::RedisCluster;
use crate::harness::{read_stream, run_cli, wait_until, Daemon, RedisServer};

const WAIT: Duration = Duration::from_secs(60);

fn ns(partitions: u16) -> Namespace {
    Namespace::new("tidemark", "default", partitions)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs the CLI against `url`; asserts success; returns stdout.
fn cli(url: &str, args: &[&str]) -> String {
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

fn start_daemon(url: &str, name: &str, partitions: u16, envs: &[(&str, &str)]) -> Daemon {
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
        let len: usize = redis::cmd("XLEN").arg(&keys.input).query(&mut conn).expect("XLEN");
        assert_eq!(len, 1, "{} got the watermark", keys.input);
    }
}

fn sched_all(conn: &mut impl redis::ConnectionLike, ns: &Namespace) -> BTreeMap<String, (u16, i64)> {
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
    crate::harness::xadd_fields(&mut src, &ns(1).partition(0).input, &[(b"op", b"add"), (b"ts", b"5")]);
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
