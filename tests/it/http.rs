//! The HTTP endpoint of `run` and `consume`: `/healthz`, `/readyz` through
//! Redis outages and shutdown, exact `/metrics` values after a known
//! scenario, `--http off`, a bad address (exit 64) and a port in use.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

use testkit::{
    add, keys, read_stream, run_cli, wait_until, watermark, xadd_fields, Daemon, RedisOptions, RedisServer, NO_PAYLOAD,
};

const WAIT: Duration = Duration::from_secs(60);
const PASSWORD: &str = "http-s3cret-pw";

/// One HTTP response.
#[derive(Debug)]
struct Response {
    status: u16,
    headers: String,
    body: String,
}

/// `GET path` over HTTP/1.1 with `Connection: close`; `None` if nothing
/// accepts the connection.
fn get(addr: SocketAddr, path: &str) -> Option<Response> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(30))).expect("set_read_timeout");
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").expect("send request");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read response");
    let text = String::from_utf8(raw).expect("response is UTF-8");
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no header end in {text:?}"));
    let (status_line, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers = headers.to_ascii_lowercase();
    let body = if headers.contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_owned() };
    Some(Response { status, headers, body })
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").expect("chunk size line");
        let size = usize::from_str_radix(size.trim(), 16).expect("hex chunk size");
        if size == 0 {
            return out;
        }
        out.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
}

fn must_get(addr: SocketAddr, path: &str) -> Response {
    get(addr, path).unwrap_or_else(|| panic!("nothing listens on {addr} for GET {path}"))
}

/// The sample lines of a `/metrics` body.
fn samples(body: &str) -> Vec<&str> {
    body.lines().filter(|l| !l.starts_with('#') && !l.is_empty()).collect()
}

/// Each metric family is announced once (Prometheus rejects repeats).
fn assert_families_unique(body: &str) {
    let mut seen = std::collections::HashSet::new();
    for line in body.lines().filter(|l| l.starts_with("# TYPE ")) {
        assert!(seen.insert(line), "{line:?} appears twice in:\n{body}");
    }
}

/// The value of the sample `name_and_labels` (e.g. `x{a="b"}`), if present.
fn sample(body: &str, name_and_labels: &str) -> Option<f64> {
    samples(body).into_iter().find_map(|l| {
        let (key, value) = l.rsplit_once(' ')?;
        (key == name_and_labels).then(|| value.parse().expect("numeric sample"))
    })
}

/// TCP sockets that process `pid` listens on (from /proc: its socket
/// inodes matched against the LISTEN entries of /proc/net/tcp{,6}).
fn listening_sockets(pid: u32) -> usize {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read the process's fds")
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|target| {
            let t = target.to_string_lossy().into_owned();
            t.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')).map(str::to_owned)
        })
        .collect();
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(Path::new(p)).ok())
        .flat_map(|table| table.lines().skip(1).map(str::to_owned).collect::<Vec<_>>())
        .filter(|row| {
            let cols: Vec<&str> = row.split_whitespace().collect();
            // sl local rem st ... inode (column 9)
            cols.get(3) == Some(&"0A") && cols.get(9).is_some_and(|i| inodes.iter().any(|n| n == i))
        })
        .count()
}

fn authed_url(redis: &RedisServer) -> String {
    format!("redis://:{PASSWORD}@127.0.0.1:{}", redis.port())
}

fn authed_conn(redis: &RedisServer) -> redis::Connection {
    redis::Client::open(authed_url(redis))
        .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(10)))
        .expect("connect with the password")
}

/// The daemon: `/healthz`, `/readyz` once connected, exact metrics after 3
/// adds, a watermark releasing 2 and a malformed entry, `/readyz` 503 with
/// a reason while Redis is down and 200 after it is back; the password
/// appears nowhere.
#[test]
fn daemon_health_readiness_and_metrics() {
    let mut redis = RedisServer::start_with(RedisOptions {
        extra_args: vec!["--requirepass".into(), PASSWORD.into()],
        ..RedisOptions::default()
    });
    let url = authed_url(&redis);
    let mut d = Daemon::spawn(
        &["run", "--redis-url", &url, "--consumer", "d1", "--group", "billing", "--http", "127.0.0.1:0"],
        &[("TIDEMARK__DAEMON__RECONNECT_MAX", "300ms")],
    );
    let addr = d.http_addr(WAIT);

    let health = must_get(addr, "/healthz");
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
    wait_until("/readyz answers 200", WAIT, || must_get(addr, "/readyz").status == 200);
    assert_eq!(must_get(addr, "/readyz").body, "ready\n");

    let mut conn = authed_conn(&redis);
    add(&mut conn, &keys("default"), "a", 10, NO_PAYLOAD);
    add(&mut conn, &keys("default"), "b", 20, NO_PAYLOAD);
    add(&mut conn, &keys("default"), "c", 30, NO_PAYLOAD);
    watermark(&mut conn, &keys("default"), 20);
    xadd_fields(&mut conn, &keys("default").input, &[(b"id", b"no-op")]);
    wait_until("2 elements are released", WAIT, || read_stream(&mut conn, &keys("default").out).len() == 2);
    wait_until("the daemon counted the malformed entry", WAIT, || {
        sample(&must_get(addr, "/metrics").body, r#"tidemark_ingested_total{op="dead"}"#) == Some(1.0)
    });
    wait_until("the daemon leads housekeeping", WAIT, || {
        sample(&must_get(addr, "/metrics").body, "tidemark_housekeeping_leader") == Some(1.0)
    });

    let metrics = must_get(addr, "/metrics");
    assert_eq!(metrics.status, 200);
    assert!(metrics.headers.contains("content-type: text/plain; version=0.0.4"), "{}", metrics.headers);
    let body = &metrics.body;
    for (name, value) in [
        ("tidemark_redis_up", 1.0),
        (r#"tidemark_ingested_total{op="add"}"#, 3.0),
        (r#"tidemark_ingested_total{op="cancel"}"#, 0.0),
        (r#"tidemark_ingested_total{op="watermark"}"#, 1.0),
        (r#"tidemark_ingested_total{op="dead"}"#, 1.0),
        (r#"tidemark_dead_letters_total{reason="missing_op"}"#, 1.0),
        (r#"tidemark_dead_letters_total{reason="bad_ts"}"#, 0.0),
        ("tidemark_released_total", 2.0),
        ("tidemark_late_total", 0.0),
        ("tidemark_watermark", 20.0),
        ("tidemark_scheduled", 1.0),
        ("tidemark_next_due_ts", 30.0),
        ("tidemark_event_time_lag", 0.0),
        ("tidemark_input_pending", 0.0),
        ("tidemark_input_lag", 0.0),
        ("tidemark_input_daemons", 1.0),
        ("tidemark_output_length", 2.0),
        ("tidemark_dead_stream_length", 1.0),
        (r#"tidemark_group_pending{group="billing"}"#, 0.0),
        (r#"tidemark_group_lag{group="billing"}"#, 2.0),
        (r#"tidemark_group_oldest_pending_idle_seconds{group="billing"}"#, 0.0),
        (r#"tidemark_group_consumers{group="billing"}"#, 0.0),
        (r#"tidemark_group_live_consumers{group="billing"}"#, 0.0),
        ("tidemark_input_claimed_total", 0.0),
        ("tidemark_input_failovers_total", 0.0),
        ("tidemark_redis_reconnects_total", 0.0),
        ("tidemark_housekeeping_leader", 1.0),
    ] {
        assert_eq!(sample(body, name), Some(value), "{name} in:\n{body}");
    }
    let applies = sample(body, r#"tidemark_script_duration_seconds_count{script="apply"}"#).unwrap_or(0.0);
    assert!(applies >= 1.0, "apply calls are timed:\n{body}");
    assert_eq!(
        sample(body, r#"tidemark_script_duration_seconds_bucket{script="apply",le="+Inf"}"#),
        Some(applies),
        "{body}"
    );
    for name in ["tidemark_watermark", "tidemark_ingested_total", "tidemark_script_duration_seconds"] {
        assert!(body.contains(&format!("# HELP {name} ")), "no HELP for {name}:\n{body}");
    }
    assert!(body.contains("# TYPE tidemark_script_duration_seconds histogram"), "{body}");
    assert_families_unique(body);

    redis.kill9();
    wait_until("/readyz answers 503 while Redis is down", WAIT, || must_get(addr, "/readyz").status == 503);
    let down = must_get(addr, "/readyz");
    assert!(
        down.body.starts_with("disconnected from Redis: ") || down.body.starts_with("Redis does not answer"),
        "{down:?}"
    );
    assert_eq!(must_get(addr, "/healthz").status, 200, "alive while Redis is down");
    let body = must_get(addr, "/metrics").body;
    assert_eq!(sample(&body, "tidemark_redis_up"), Some(0.0), "{body}");
    assert_eq!(sample(&body, r#"tidemark_ingested_total{op="add"}"#), Some(3.0), "counters survive: {body}");
    assert_eq!(sample(&body, "tidemark_watermark"), None, "no stale Redis state: {body}");

    redis.restart();
    wait_until("/readyz answers 200 after Redis is back", WAIT, || must_get(addr, "/readyz").status == 200);
    wait_until("the reconnect is counted", WAIT, || {
        sample(&must_get(addr, "/metrics").body, "tidemark_redis_reconnects_total") == Some(1.0)
    });
    let body = must_get(addr, "/metrics").body;
    assert_eq!(sample(&body, "tidemark_redis_up"), Some(1.0), "{body}");

    for text in [body, down.body, d.log()] {
        assert!(!text.contains(PASSWORD), "the password leaked:\n{text}");
    }
    d.sigterm();
    assert_eq!(d.wait_exit(WAIT).and_then(|s| s.code()), Some(0), "{}", d.log());
    assert!(get(addr, "/healthz").is_none(), "nothing listens once the daemon is gone");
}

/// Before Redis ever answers, `/readyz` is 503 with the reason and
/// `/healthz` is 200; once Redis is up, `/readyz` is 200.
#[test]
fn readyz_waits_for_redis() {
    let mut redis = RedisServer::start();
    redis.kill9();
    let d = Daemon::spawn(
        &["run", "--redis-url", &redis.url(), "--consumer", "d1", "--http", "127.0.0.1:0"],
        &[("TIDEMARK__DAEMON__RECONNECT_MAX", "300ms")],
    );
    let addr = d.http_addr(WAIT);
    assert_eq!(must_get(addr, "/healthz").status, 200);
    let ready = must_get(addr, "/readyz");
    assert_eq!(ready.status, 503, "{ready:?}");
    assert!(
        ready.body == "starting: not connected to Redis yet\n" || ready.body.starts_with("disconnected from Redis: "),
        "{ready:?}"
    );
    redis.restart();
    wait_until("/readyz answers 200", WAIT, || must_get(addr, "/readyz").status == 200);
}

/// `tidemark consume` serves the endpoints too: its counters and in-flight
/// gauge are exact, and while it drains after SIGTERM `/readyz` is 503
/// "shutting down" and `/healthz` still 200.
#[test]
fn consume_serves_endpoints_and_is_unready_while_draining() {
    let redis = RedisServer::start();
    let url = redis.url();
    let _daemon = Daemon::spawn(&["run", "--redis-url", &url, "--consumer", "d1", "--group", "g"], &[]);
    let dir = tempfile::tempdir().unwrap();
    let (started, finish) = (dir.path().join("started"), dir.path().join("finish"));
    // "slow" runs until the test creates the finish file; anything else
    // succeeds at once.
    let script =
        r#"if [ "$TIDEMARK_ID" = slow ]; then : > "$STARTED"; while [ ! -e "$FINISH" ]; do sleep 0.05; done; fi"#;
    let mut c = Daemon::spawn(
        &[
            "consume",
            "--redis-url",
            &url,
            "--group",
            "g",
            "--consumer",
            "c1",
            "--http",
            "127.0.0.1:0",
            "--",
            "sh",
            "-c",
            script,
        ],
        &[
            ("STARTED", started.to_str().unwrap()),
            ("FINISH", finish.to_str().unwrap()),
            ("TIDEMARK__CONSUME__SHUTDOWN_GRACE", "60s"),
        ],
    );
    let addr = c.http_addr(WAIT);
    assert_eq!(must_get(addr, "/healthz").status, 200);
    wait_until("/readyz answers 200", WAIT, || must_get(addr, "/readyz").status == 200);

    let mut conn = redis.sync_conn();
    add(&mut conn, &keys("default"), "fast", 1, NO_PAYLOAD);
    watermark(&mut conn, &keys("default"), 1);
    wait_until("fast is handled", WAIT, || {
        sample(&must_get(addr, "/metrics").body, r#"tidemark_consumer_handled_total{group="g"}"#) == Some(1.0)
    });
    wait_until("fast is acknowledged", WAIT, || {
        sample(&must_get(addr, "/metrics").body, r#"tidemark_group_pending{group="g"}"#) == Some(0.0)
    });
    add(&mut conn, &keys("default"), "slow", 1, NO_PAYLOAD);
    wait_until("slow is running", WAIT, || started.exists());
    wait_until("the in-flight gauge shows it", WAIT, || {
        sample(&must_get(addr, "/metrics").body, r#"tidemark_consumer_in_flight{group="g"}"#) == Some(1.0)
    });
    let body = must_get(addr, "/metrics").body;
    for (name, value) in [
        (r#"tidemark_consumer_handled_total{group="g"}"#, 1.0),
        (r#"tidemark_consumer_failed_total{group="g"}"#, 0.0),
        (r#"tidemark_consumer_claimed_total{group="g"}"#, 0.0),
        (r#"tidemark_consumer_takeovers_total{group="g"}"#, 0.0),
        (r#"tidemark_consumer_queued{group="g"}"#, 0.0),
        (r#"tidemark_group_pending{group="g"}"#, 1.0),
        (r#"tidemark_group_consumers{group="g"}"#, 1.0),
        (r#"tidemark_group_live_consumers{group="g"}"#, 1.0),
        ("tidemark_redis_up", 1.0),
        ("tidemark_redis_reconnects_total", 0.0),
        ("tidemark_watermark", 1.0),
    ] {
        assert_eq!(sample(&body, name), Some(value), "{name} in:\n{body}");
    }
    assert_eq!(sample(&body, r#"tidemark_ingested_total{op="add"}"#), None, "no daemon counters in consume:\n{body}");
    assert_families_unique(&body);

    c.sigterm();
    wait_until("/readyz answers 503 while draining", WAIT, || must_get(addr, "/readyz").status == 503);
    assert_eq!(must_get(addr, "/readyz").body, "shutting down\n");
    assert_eq!(must_get(addr, "/healthz").status, 200, "alive while draining");
    assert!(c.is_running(), "still draining: the handler has not finished");
    std::fs::write(&finish, b"").unwrap();
    assert_eq!(c.wait_exit(WAIT).and_then(|s| s.code()), Some(0), "{}", c.log());
    assert!(get(addr, "/readyz").is_none(), "nothing listens once consume is gone");
}

/// `consume.prefetch` from the environment, seen through `/metrics`: with
/// one handler slot and prefetch 2, one command runs while two elements
/// wait (`tidemark_consumer_queued`), a fourth stays unread, and all four
/// are handled once the command may finish.
#[test]
fn consume_prefetch_reads_ahead_and_shows_in_the_queued_gauge() {
    let redis = RedisServer::start();
    let url = redis.url();
    let _daemon = Daemon::spawn(&["run", "--redis-url", &url, "--consumer", "d1", "--group", "g"], &[]);
    let dir = tempfile::tempdir().unwrap();
    let finish = dir.path().join("finish");
    let script = r#"while [ ! -e "$FINISH" ]; do sleep 0.05; done"#;
    let mut c = Daemon::spawn(
        &[
            "consume",
            "--redis-url",
            &url,
            "--group",
            "g",
            "--consumer",
            "c1",
            "--concurrency",
            "1",
            "--http",
            "127.0.0.1:0",
            "--",
            "sh",
            "-c",
            script,
        ],
        &[("FINISH", finish.to_str().unwrap()), ("TIDEMARK__CONSUME__PREFETCH", "2")],
    );
    let addr = c.http_addr(WAIT);
    wait_until("/readyz answers 200", WAIT, || must_get(addr, "/readyz").status == 200);
    let mut conn = redis.sync_conn();
    for id in ["a", "b", "c", "d"] {
        add(&mut conn, &keys("default"), id, 1, NO_PAYLOAD);
    }
    watermark(&mut conn, &keys("default"), 1);
    let gauge = |name: &str| sample(&must_get(addr, "/metrics").body, &format!(r#"{name}{{group="g"}}"#));
    wait_until("one command runs and two elements wait", WAIT, || {
        gauge("tidemark_consumer_in_flight") == Some(1.0) && gauge("tidemark_consumer_queued") == Some(2.0)
    });
    let pending: Vec<redis::Value> =
        redis::cmd("XPENDING").arg(&keys("default").out).arg("g").arg("-").arg("+").arg(10).query(&mut conn).unwrap();
    assert_eq!(pending.len(), 3, "the fourth element is not read ahead");

    std::fs::write(&finish, b"").unwrap();
    wait_until("all four handled, none waiting", WAIT, || {
        gauge("tidemark_consumer_handled_total") == Some(4.0) && gauge("tidemark_consumer_queued") == Some(0.0)
    });
    c.sigterm();
    assert_eq!(c.wait_exit(WAIT).and_then(|s| s.code()), Some(0), "{}", c.log());
}

/// `--http off` binds nothing; the same daemon with an address binds one
/// listening socket (so the check can tell).
#[test]
fn http_off_binds_nothing() {
    let redis = RedisServer::start();
    let url = redis.url();
    let off = Daemon::spawn(&["run", "--redis-url", &url, "--consumer", "off", "--http", "off"], &[]);
    let on = Daemon::spawn(&["run", "--redis-url", &url, "--consumer", "on", "--http", "127.0.0.1:0"], &[]);
    off.wait_log("connected to Redis", WAIT);
    on.wait_log("connected to Redis", WAIT);
    on.http_addr(WAIT);
    assert_eq!(listening_sockets(off.pid()), 0, "{}", off.log());
    assert_eq!(listening_sockets(on.pid()), 1, "{}", on.log());
    assert!(!off.log().contains("over HTTP"), "{}", off.log());
}

/// A bad address is refused before anything connects: exit 64 naming
/// `http.addr`, for the flag and the environment, for run and consume.
#[test]
fn bad_http_address_exits_64() {
    let redis = RedisServer::start();
    let url = redis.url();
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)]);
    let cases: [Case; 4] = [
        (&["--http", "localhost:9464", "run"], &[]),
        (&["--http", "127.0.0.1:99999", "consume", "--group", "g", "--", "true"], &[]),
        (&["run"], &[("TIDEMARK__HTTP__ADDR", "9464")]),
        (&["run", "--http", "nowhere"], &[]),
    ];
    for (args, envs) in cases {
        let mut all = vec!["--redis-url", url.as_str()];
        all.extend_from_slice(args);
        let out = run_cli(&all, envs);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?} {envs:?}: {stderr}");
        assert!(stderr.contains("http.addr"), "{args:?}: {stderr}");
    }
    let dbsize: i64 = redis::cmd("DBSIZE").query(&mut redis.sync_conn()).unwrap();
    assert_eq!(dbsize, 0, "nothing was written");
}

/// A port already in use is a startup error with a clear message, before
/// the daemon touches Redis.
#[test]
fn port_in_use_is_a_startup_error() {
    let redis = RedisServer::start();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let url = redis.url();
    for command in [&["run"][..], &["consume", "--group", "g", "--", "true"][..]] {
        let mut args = vec!["--redis-url", url.as_str(), "--http", addr.as_str()];
        args.extend_from_slice(command);
        let out = run_cli(&args, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{command:?}: {stderr}");
        assert!(stderr.contains(&format!("cannot listen for HTTP on {addr}")), "{command:?}: {stderr}");
        assert!(stderr.contains("Address already in use"), "{command:?}: {stderr}");
    }
    let dbsize: i64 = redis::cmd("DBSIZE").query(&mut redis.sync_conn()).unwrap();
    assert_eq!(dbsize, 0, "nothing was written");
}
