//! The partition count as every process follows it (DESIGN §7): the fence
//! a `repartition` puts on the namespace while it runs (and after a crash
//! midway), a long-lived producer following a new count, misrouted input
//! replayed to its element's partition, and (on a cluster) one silent
//! master costing only the partitions it serves.

use std::time::Duration;

use tidemark::store::{LayoutError, StoreError};

use tidemark::core::route::key_slot;

use testkit::{read_stream, run_cli, text, wait_until, xadd_fields, Daemon, RedisCluster, RedisServer};

use crate::cluster::{cli, ns, sched_all, start_daemon};

const WAIT: Duration = Duration::from_secs(60);

/// A `repartition` that stopped midway (its mark on the meta record, the
/// record still the old count) fences the namespace: the CLI's writes exit
/// 64 saying what to do, a daemon waits instead of applying with the old
/// layout, `status` still answers, a re-run with another count is refused,
/// and the re-run with the same count finishes, lifts the mark, and the
/// waiting daemon goes on with the new layout and releases everything.
#[test]
fn a_repartition_stopped_midway_fences_the_namespace_until_it_is_run_again() {
    let redis = RedisServer::start();
    let url = redis.url();
    let mut d = start_daemon(&url, "d1", 2, &[]);
    for i in 0..50 {
        cli(&url, &["add", "--id", &format!("el-{i:07}"), "--ts", &(1000 + i).to_string()]);
    }
    cli(&url, &["watermark", "1"]);
    let mut conn = redis.sync_conn();
    wait_until("scheduled", WAIT, || sched_all(&mut conn, &ns(2)).len() == 50);
    d.sigterm();
    d.wait_exit(WAIT).expect("stopped");
    // What `repartition --to 4` writes first, before it moves anything.
    let () = redis::cmd("HSET").arg(ns(2).meta()).arg("repartitioning").arg(4).query(&mut conn).expect("HSET");

    let add = run_cli(&["--redis-url", &url, "add", "--id", "late", "--ts", "5"], &[]);
    assert_eq!(add.status.code(), Some(64), "{}", text(&add.stderr));
    assert!(text(&add.stderr).contains("tidemark repartition --to 4"), "{}", text(&add.stderr));
    cli(&url, &["status"]);

    let mut waiting = Daemon::spawn(
        &["run", "--redis-url", &url, "--consumer", "d2"],
        &[("TIDEMARK__DAEMON__BLOCK", "200ms"), ("TIDEMARK__LEASE__TTL", "1s")],
    );
    waiting.wait_log("being repartitioned", WAIT);
    assert!(waiting.is_running(), "{}", waiting.log());
    assert!(!waiting.log().contains("connected to Redis"), "{}", waiting.log());

    let other = run_cli(&["--redis-url", &url, "repartition", "--to", "3"], &[]);
    assert!(!other.status.success());
    assert!(text(&other.stderr).contains("--to 4"), "{}", text(&other.stderr));

    let out = cli(&url, &["repartition", "--to", "4"]);
    assert!(out.contains("4 partition(s)"), "{out}");
    let mark: Option<String> = redis::cmd("HGET").arg(ns(4).meta()).arg("repartitioning").query(&mut conn).unwrap();
    assert_eq!(mark, None);
    assert_eq!(sched_all(&mut conn, &ns(4)).len(), 50);

    waiting.wait_log("partitions=4", WAIT);
    cli(&url, &["watermark", "2000"]);
    wait_until("all 50 released over the 4 partitions", WAIT, || {
        ns(4).all().iter().map(|k| read_stream(&mut conn, &k.out).len()).sum::<usize>() == 50
    });
}

/// A producer connected before a `repartition` writes by the new count
/// once it has read the record again (within `LAYOUT_CHECK`), and while a
/// repartition runs it refuses to write, keeping the batch for later.
#[test]
fn a_long_lived_producer_follows_the_partition_count() {
    let redis = RedisServer::start();
    let mut conn = redis.sync_conn();
    let () = redis::cmd("HSET").arg(ns(2).meta()).arg("partitions").arg(2).query(&mut conn).expect("HSET");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let client = redis::Client::open(redis.url()).expect("client");
        let opts = tidemark::store::ConnectOptions {
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(5),
        };
        let endpoint = tidemark::store::Endpoint::new(client, None, tidemark::store::Mode::Auto, opts);
        let mut producer = tidemark::produce::Producer::connect(&endpoint, &ns(1), None).await.expect("producer");
        assert_eq!(producer.namespace().partitions(), 2);

        // A repartition to 4 begins: the producer stops writing.
        let () = redis::cmd("HSET").arg(ns(2).meta()).arg("repartitioning").arg(4).query(&mut conn).unwrap();
        let mut batch = producer.batch();
        batch.add(b"order-42", 5, &[(b"k", b"v")]).watermark(7);
        assert_eq!(batch.len(), 1 + 2);
        let deadline = std::time::Instant::now() + WAIT;
        let refused = loop {
            match batch.send(&mut producer).await {
                Err(e @ StoreError::Layout(LayoutError::Repartitioning { .. })) => break e,
                Err(e) => panic!("{e}"),
                Ok(_) => {
                    assert!(std::time::Instant::now() < deadline, "the producer never saw the repartition");
                    batch.add(b"order-42", 5, &[(b"k", b"v")]).watermark(7);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        assert!(refused.to_string().contains("being repartitioned"), "{refused}");
        assert_eq!(batch.len(), 1 + 2, "the batch keeps what it could not send");
        let before: Vec<usize> = ns(4).all().iter().map(|k| testkit::xlen(&mut conn, &k.input)).collect();

        // It finishes: the batch goes to the new layout.
        let () = redis::pipe()
            .cmd("HSET")
            .arg(ns(4).meta())
            .arg("partitions")
            .arg(4)
            .cmd("HDEL")
            .arg(ns(4).meta())
            .arg("repartitioning")
            .query(&mut conn)
            .unwrap();
        let written = batch.send(&mut producer).await.expect("sent after the repartition");
        assert_eq!(written, 1 + 4, "the add once, the watermark on each of the 4 partitions");
        assert_eq!(producer.namespace().partitions(), 4);
        let after: Vec<usize> = ns(4).all().iter().map(|k| testkit::xlen(&mut conn, &k.input)).collect();
        let target = usize::from(ns(4).route(b"order-42"));
        for (p, (b, a)) in before.iter().zip(&after).enumerate() {
            assert_eq!(a - b, if p == target { 2 } else { 1 }, "partition {p}");
        }
    });
}

/// An `add` written to the wrong partition's input (a producer with its
/// own, wrong routing) is dead-lettered there as `wrong_partition`;
/// `tidemark dead replay --all` sends it to its element's partition, where
/// it is applied and released.
#[test]
fn wrong_partition_letters_are_replayed_to_their_partition() {
    let redis = RedisServer::start();
    let url = redis.url();
    let _d = start_daemon(&url, "d1", 4, &[]);
    let mut conn = redis.sync_conn();
    let right = ns(4).route(b"order-42");
    let wrong = ns(4).partition((right + 1) % 4);
    xadd_fields(&mut conn, &wrong.input, &[(b"op", b"add"), (b"id", b"order-42"), (b"ts", b"10"), (b"k", b"v")]);
    wait_until("dead-lettered as wrong_partition", WAIT, || {
        read_stream(&mut conn, &wrong.dead).iter().any(|(_, f)| f[0].1 == b"wrong_partition")
    });
    let out = cli(&url, &["dead", "replay", "--all"]);
    let target = ns(4).partition(right);
    assert!(out.contains(&format!("-> {}", target.input)), "{out}");
    assert!(read_stream(&mut conn, &wrong.dead).is_empty(), "the letter left :dead");
    cli(&url, &["watermark", "10"]);
    wait_until("released from its own partition", WAIT, || {
        read_stream(&mut conn, &target.out).iter().any(|(_, f)| f[0].1 == b"order-42" && f.last().unwrap().1 == b"v")
    });
}

/// A cluster master that stops answering with its sockets open (SIGSTOP:
/// a wedged host) costs only the partitions it serves: for several lease
/// lifetimes the daemon keeps owning and releasing the others (their
/// leases are renewed concurrently, each call bounded, and the round is
/// not failed by one partition's server), and once the master answers
/// again its partitions are served too.
#[test]
fn a_silent_master_costs_only_its_own_partitions() {
    // Without full coverage required, the other masters keep serving their
    // slots once the silent one is marked failed (no replica to promote).
    let cluster = RedisCluster::start_with(3, 0, |_| vec!["--cluster-require-full-coverage".into(), "no".into()]);
    let url = cluster.url();
    let ns = ns(6);
    let mut d = start_daemon(&url, "d1", 6, &[]);
    wait_until("the daemon owns all six partitions", WAIT, || d.log().matches("owning the partition").count() == 6);
    let master_of = |key: &str| cluster.master_of(key_slot(key.as_bytes()));
    // Not the registry's master: without the registry no daemon can work.
    let registry = master_of(&ns.daemons());
    let serves: Vec<usize> = (0..6).map(|p| master_of(&ns.partition(p).input)).collect();
    let silent = (0..3).find(|m| *m != registry && serves.contains(m)).expect("a master with partitions");
    let (quiet, healthy): (Vec<u16>, Vec<u16>) = (0..6u16).partition(|&p| serves[p as usize] == silent);
    let pid = cluster.nodes[silent].pid().expect("running").to_string();
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill").args([sig, &pid]).status().expect("kill").success();
        assert!(ok, "kill {sig} {pid}");
    };
    // Writes go straight to each partition's master, so that nothing here
    // waits on the silent one.
    let release = |p: u16, tag: &str| {
        let id = (0..).map(|i| format!("{tag}-{i}")).find(|id| ns.route(id.as_bytes()) == p).expect("an id");
        let keys = ns.partition(p);
        let mut conn = cluster.nodes[serves[p as usize]].sync_conn();
        xadd_fields(&mut conn, &keys.input, &[(b"op", b"add"), (b"id", id.as_bytes()), (b"ts", b"10")]);
        xadd_fields(&mut conn, &keys.input, &[(b"op", b"watermark"), (b"ts", b"10")]);
        (p, id)
    };
    let released = |(p, id): &(u16, String)| {
        let mut conn = cluster.nodes[serves[*p as usize]].sync_conn();
        read_stream(&mut conn, &ns.partition(*p).out).iter().any(|(_, f)| f[0].1 == id.as_bytes())
    };

    // Every worker up and applying (the daemon in its steady state).
    let sent: Vec<_> = (0..6u16).map(|p| release(p, "before")).collect();
    for el in &sent {
        wait_until(&format!("partition {} released {}", el.0, el.1), WAIT, || released(el));
    }

    signal("-STOP");
    eprintln!("master {silent} (partitions {quiet:?}) silent; partitions {healthy:?} elsewhere");
    // Several lease lifetimes (1 s each) of silence: enough for every lease
    // of the daemon to lapse, were the healthy partitions' renewals held up.
    std::thread::sleep(Duration::from_secs(4));
    let sent: Vec<_> = healthy.iter().map(|&p| release(p, "during")).collect();
    for el in &sent {
        wait_until(&format!("partition {} released {} while a master is silent", el.0, el.1), WAIT, || released(el));
    }
    assert!(d.is_running(), "the daemon exited:\n{}", d.log());
    let log = d.log();
    assert!(log.contains("could not renew the partition's ownership"), "the silent partitions were noticed:\n{log}");

    signal("-CONT");
    let sent: Vec<_> = quiet.iter().map(|&p| release(p, "after")).collect();
    for el in &sent {
        wait_until(&format!("partition {} released {} once its master answers", el.0, el.1), WAIT, || released(el));
    }
}
