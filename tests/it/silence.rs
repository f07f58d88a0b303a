//! Silent connections: a server that stops answering without closing the
//! socket (a wedged server, or a host that vanished and whose packets are
//! dropped) is noticed on every connection within the blocking read time
//! plus the reply timeout, `/readyz` is 503 meanwhile, and work resumes by
//! itself once the server answers again. A proxy in front of Redis stops
//! forwarding; the process has no peer to take over its work. Default
//! timeouts: `daemon.block`/`consume.block` 2 s, `redis.response_timeout`
//! 5 s.

use std::time::{Duration, Instant};

use testkit::{field, get, keys, read_stream, wait_until, xadd_fields, Daemon, Proxy, RedisServer};

const WAIT: Duration = Duration::from_secs(60);
/// The block time (2 s) plus the reply timeout (5 s) plus the longest
/// period between two uses of an otherwise idle connection (the lease's,
/// a third of its 5 s lifetime) and a second of slack.
const NOTICED_WITHIN: Duration = Duration::from_secs(10);

fn add(conn: &mut redis::Connection, id: &str, ts: i64) {
    let ts = ts.to_string();
    xadd_fields(conn, &keys("default").input, &[(b"op", b"add"), (b"id", id.as_bytes()), (b"ts", ts.as_bytes())]);
}

fn watermark(conn: &mut redis::Connection, ts: i64) {
    let ts = ts.to_string();
    xadd_fields(conn, &keys("default").input, &[(b"op", b"watermark"), (b"ts", ts.as_bytes())]);
}

fn released_ids(redis: &RedisServer) -> Vec<String> {
    read_stream(&mut redis.sync_conn(), &keys("default").out)
        .into_iter()
        .map(|(_, f)| String::from_utf8_lossy(field(&f, "id").unwrap_or_default()).into_owned())
        .collect()
}

/// Blackholes the proxy and waits until every connection opened before was
/// closed by the process; returns how long the last one took (and
/// asserts it is within [`NOTICED_WITHIN`]), and what `/readyz` said.
fn blackhole_and_wait(proxy: &Proxy, addr: std::net::SocketAddr, process: &Daemon) -> (Duration, Duration, String) {
    let open_before = proxy.connections().iter().filter(|c| c.closed_by_client.is_none()).count();
    assert!(open_before >= 3, "the process holds its connections through the proxy");
    let started = Instant::now();
    proxy.blackhole();
    wait_until("/readyz answers 503 while Redis is silent", WAIT, || get(addr, "/readyz").0 == 503);
    let unready = started.elapsed();
    let reason = get(addr, "/readyz").1;
    let deadline = Instant::now() + WAIT;
    while !proxy.connections().iter().filter(|c| c.opened < started).all(|c| c.closed_by_client.is_some()) {
        if Instant::now() > deadline {
            let table: Vec<String> = proxy
                .connections()
                .iter()
                .map(|c| {
                    format!(
                        "opened {:?} before, closed {:?} after",
                        started.saturating_duration_since(c.opened),
                        c.closed_by_client.map(|t| t.saturating_duration_since(started))
                    )
                })
                .collect();
            panic!("connections not given up: {table:#?}\nlog:\n{}", process.log());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let last = proxy
        .connections()
        .iter()
        .filter(|c| c.opened < started)
        .filter_map(|c| c.closed_by_client)
        .max()
        .expect("connections")
        .saturating_duration_since(started);
    assert!(
        last <= NOTICED_WITHIN,
        "the last connection was given up {last:?} after Redis went silent; log:\n{}",
        process.log()
    );
    (last, unready, reason)
}

/// A single daemon behind a silent server: every connection (coordinator,
/// worker, blocking reader, lease, housekeeping, the probe) is given up
/// within the bound, `/readyz` is 503 with the reason, and once the server
/// answers again the input written meanwhile is applied and released,
/// exactly once.
#[test]
fn a_silent_server_is_noticed_by_a_single_daemon() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(redis.port());
    let daemon = Daemon::spawn(
        &["run", "--redis-url", &proxy.url(), "--consumer", "d1", "--http", "127.0.0.1:0"],
        &[("TIDEMARK__DAEMON__RECONNECT_MAX", "1s")],
    );
    let addr = daemon.http_addr(WAIT);
    wait_until("/readyz answers 200", WAIT, || get(addr, "/readyz").0 == 200);
    daemon.wait_log("became the housekeeping leader", WAIT);
    let mut conn = redis.sync_conn();
    add(&mut conn, "before", 1);
    watermark(&mut conn, 1);
    wait_until("the daemon works", WAIT, || released_ids(&redis) == ["before"]);

    let (last, unready, reason) = blackhole_and_wait(&proxy, addr, &daemon);
    daemon.wait_log("lost the connection to Redis", WAIT);
    add(&mut conn, "during", 2);
    watermark(&mut conn, 2);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(released_ids(&redis), ["before"], "nothing can be applied while the server is silent");

    let restored = Instant::now();
    proxy.restore();
    wait_until("the input written meanwhile is released", WAIT, || released_ids(&redis).len() == 2);
    let resumed = restored.elapsed();
    wait_until("/readyz answers 200 again", WAIT, || get(addr, "/readyz").0 == 200);
    assert_eq!(released_ids(&redis), ["before", "during"], "released once each");
    assert!(reason.contains("does not answer"), "{reason}");
    eprintln!(
        "silent server, one daemon: /readyz 503 after {unready:?} ({:?}); every connection given up within \
         {last:?}; work resumed {resumed:?} after the server answered again",
        reason.trim()
    );
}

/// A single `tidemark consume` behind a silent server (the daemon reaches
/// Redis directly and keeps releasing): every connection of the consumer
/// is given up within the bound, `/readyz` is 503, and once the server
/// answers again every element is handled.
#[test]
fn a_silent_server_is_noticed_by_a_single_consumer() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(redis.port());
    let _daemon = Daemon::spawn(&["run", "--redis-url", &redis.url(), "--consumer", "d1", "--group", "g"], &[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("handled");
    let command = format!("cat >> '{}'; echo >> '{}'", file.display(), file.display());
    let consumer = Daemon::spawn(
        &[
            "consume",
            "--redis-url",
            &proxy.url(),
            "--group",
            "g",
            "--consumer",
            "c1",
            "--http",
            "127.0.0.1:0",
            "--",
            "sh",
            "-c",
            &command,
        ],
        &[("TIDEMARK__DAEMON__RECONNECT_MAX", "1s")],
    );
    let addr = consumer.http_addr(WAIT);
    wait_until("/readyz answers 200", WAIT, || get(addr, "/readyz").0 == 200);
    let handled = |id: &str| std::fs::read_to_string(&file).unwrap_or_default().matches(&format!("\"{id}\"")).count();
    let mut conn = redis.sync_conn();
    add(&mut conn, "before", 1);
    watermark(&mut conn, 1);
    wait_until("the consumer works", WAIT, || handled("before") == 1);

    let (last, unready, reason) = blackhole_and_wait(&proxy, addr, &consumer);
    add(&mut conn, "during", 2);
    watermark(&mut conn, 2);
    wait_until("the daemon released it", WAIT, || released_ids(&redis).iter().any(|id| id == "during"));

    let restored = Instant::now();
    proxy.restore();
    wait_until("the element released meanwhile is handled", WAIT, || handled("during") == 1);
    let resumed = restored.elapsed();
    wait_until("/readyz answers 200 again", WAIT, || get(addr, "/readyz").0 == 200);
    eprintln!(
        "silent server, one consumer: /readyz 503 after {unready:?} ({:?}); every connection given up within \
         {last:?}; handling resumed {resumed:?} after the server answered again",
        reason.trim()
    );
}
