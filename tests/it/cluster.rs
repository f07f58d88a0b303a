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
