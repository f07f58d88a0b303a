//! Producers that retry (`daemon.dedup_window`): an `add` written again
//! after its element was released (the producer's `XADD` timed out after
//! Redis had applied it, and the producer sent it again) is dropped and
//! counted while the release is younger than the window, through the
//! per-entry path and the bulk path of the apply script alike; later it is
//! an add like any other; the record of releases is pruned as it ages.

use std::time::Duration;

use testkit::{field, get, keys, metric, read_stream, run_cli, wait_until, Daemon, RedisServer};

const WAIT: Duration = Duration::from_secs(60);

fn released(redis: &RedisServer) -> Vec<String> {
    read_stream(&mut redis.sync_conn(), &keys("default").out)
        .into_iter()
        .map(|(_, f)| String::from_utf8_lossy(field(&f, "id").unwrap_or_default()).into_owned())
        .collect()
}

/// A producer that retries: `tidemark add` (or a plain `XADD`) of the same
/// element once more after its release.
fn add(redis: &RedisServer, id: &str, ts: i64) {
    let out = run_cli(&["--redis-url", &redis.url(), "add", "--id", id, "--ts", &ts.to_string()], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn watermark(redis: &RedisServer, ts: i64) {
    let out = run_cli(&["--redis-url", &redis.url(), "watermark", &ts.to_string()], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// With a window, retries of released adds are dropped and counted; a
/// retry of an add still scheduled is the usual upsert; after the window a
/// re-add is released again. Without a window the retry is released twice
/// (the behaviour this option exists for).
#[test]
fn a_retrying_producer_releases_each_element_once_within_the_window() {
    let redis = RedisServer::start();
    let d = Daemon::spawn(
        &["run", "--redis-url", &redis.url(), "--consumer", "d1", "--http", "127.0.0.1:0"],
        &[("TIDEMARK__DAEMON__DEDUP_WINDOW", "3s")],
    );
    let addr = d.http_addr(WAIT);
    wait_until("/readyz answers 200", WAIT, || get(addr, "/readyz").0 == 200);

    // Released by a watermark, then retried: dropped.
    add(&redis, "order-1", 10);
    watermark(&redis, 10);
    wait_until("order-1 is released", WAIT, || released(&redis) == ["order-1"]);
    add(&redis, "order-1", 10);
    // A late add (released at once), retried: dropped too.
    add(&redis, "order-2", 5);
    add(&redis, "order-2", 5);
    // Still scheduled, retried: the usual upsert, released once.
    add(&redis, "order-3", 20);
    add(&redis, "order-3", 20);
    watermark(&redis, 20);
    wait_until("order-2 and order-3 are released", WAIT, || released(&redis).len() >= 3);
    let dropped = || metric(&get(addr, "/metrics").1, "tidemark_duplicates_dropped_total");
    wait_until("both retries of released adds are counted", WAIT, || dropped() == Some(2.0));
    assert_eq!(released(&redis), ["order-1", "order-2", "order-3"]);

    // Past the window, the id is an ordinary new add again.
    std::thread::sleep(Duration::from_millis(3500));
    add(&redis, "order-1", 30);
    watermark(&redis, 30);
    wait_until("order-1 is released again after the window", WAIT, || released(&redis).len() == 4);
    assert_eq!(dropped(), Some(2.0));
}

/// Without a window, the same retry releases the element twice.
#[test]
fn without_a_window_a_retry_is_released_twice() {
    let redis = RedisServer::start();
    let _d = Daemon::spawn(&["run", "--redis-url", &redis.url(), "--consumer", "d1"], &[]);
    add(&redis, "order-1", 10);
    watermark(&redis, 10);
    wait_until("order-1 is released", WAIT, || released(&redis) == ["order-1"]);
    add(&redis, "order-1", 10);
    wait_until("the retry is released again", WAIT, || released(&redis) == ["order-1", "order-1"]);
    let record: u64 = redis::cmd("EXISTS").arg("tidemark:{default}:released").query(&mut redis.sync_conn()).unwrap();
    assert_eq!(record, 0, "no record of releases is kept without a window");
}

/// A batch of plain adds (the apply script's bulk path) retried by a
/// producer after 1,000 of them were released: the released ones are
/// dropped, the others scheduled; the record of releases shrinks once the
/// window has passed.
#[test]
fn bulk_retries_are_dropped_and_the_record_is_pruned() {
    let redis = RedisServer::start();
    let k = keys("default");
    let d = Daemon::spawn(
        &["run", "--redis-url", &redis.url(), "--consumer", "d1", "--http", "127.0.0.1:0"],
        &[("TIDEMARK__DAEMON__DEDUP_WINDOW", "2s")],
    );
    let addr = d.http_addr(WAIT);
    wait_until("/readyz answers 200", WAIT, || get(addr, "/readyz").0 == 200);
    let mut conn = redis.sync_conn();
    let xadd_adds = |conn: &mut redis::Connection, ids: std::ops::Range<i64>, ts: i64| {
        let mut pipe = redis::pipe();
        for i in ids {
            pipe.cmd("XADD")
                .arg(&k.input)
                .arg("*")
                .arg("op")
                .arg("add")
                .arg("id")
                .arg(format!("el-{i:05}"))
                .arg("ts")
                .arg(ts);
        }
        let _: Vec<String> = pipe.query(conn).unwrap();
    };
    xadd_adds(&mut conn, 0..1000, 100);
    let _: String = redis::cmd("XADD")
        .arg(&k.input)
        .arg("*")
        .arg("op")
        .arg("watermark")
        .arg("ts")
        .arg(100)
        .query(&mut conn)
        .unwrap();
    wait_until("1,000 released", WAIT, || released(&redis).len() == 1000);
    let recorded: u64 = redis::cmd("ZCARD").arg(k.input.replace(":in", ":released")).query(&mut conn).unwrap();
    assert_eq!(recorded, 1000, "every release is recorded");

    // The retry: the first 1,000 again plus 500 new ones, all above the
    // watermark (the bulk path's case).
    xadd_adds(&mut conn, 0..1500, 200);
    let dropped = || metric(&get(addr, "/metrics").1, "tidemark_duplicates_dropped_total");
    wait_until("the 1,000 retries are dropped", WAIT, || dropped() == Some(1000.0));
    wait_until("the 500 new ones are scheduled", WAIT, || {
        redis::cmd("ZCARD").arg(&k.sched).query::<u64>(&mut redis.sync_conn()).unwrap_or(0) == 500
    });
    assert_eq!(released(&redis).len(), 1000, "nothing released twice");

    // Once the window has passed, the next releases prune the record.
    std::thread::sleep(Duration::from_millis(2500));
    let _: String = redis::cmd("XADD")
        .arg(&k.input)
        .arg("*")
        .arg("op")
        .arg("watermark")
        .arg("ts")
        .arg(200)
        .query(&mut conn)
        .unwrap();
    wait_until("the 500 are released", WAIT, || released(&redis).len() == 1500);
    let recorded: u64 = redis::cmd("ZCARD").arg(k.input.replace(":in", ":released")).query(&mut conn).unwrap();
    assert_eq!(recorded, 500, "only releases younger than the window are kept");
}
