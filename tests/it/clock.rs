//! Clock mode (`tidemark run --clock`): the watermark follows the Redis
//! server's `TIME`. Release latency is measured on the server's clock: an
//! output entry's id holds the server time of its release (ms), its `ts`
//! field the time it was due. Latencies are printed, asserted only loosely.

use std::time::{Duration, Instant};

use testkit::default_keys as ks;
use testkit::{field, read_stream, text, wait_until, watermark, zcard, Daemon, RedisOptions, RedisServer, StreamEntry};

/// Generous: CI has two cores shared by everything.
const WAIT: Duration = Duration::from_secs(30);
/// The loose bound on release latency ("within a few milliseconds" is what
/// the printed figures show).
const LATENCY_BOUND_MS: i64 = 500;
/// The Redis server's `TIME` in milliseconds.
fn server_ms(conn: &mut redis::Connection) -> i64 {
    let (secs, micros): (i64, i64) = redis::cmd("TIME").query(conn).expect("TIME");
    secs * 1000 + micros / 1000
}

/// Starts a clock-mode daemon named `name`; `envs` add to the defaults.
fn clock_daemon(redis: &RedisServer, name: &str, envs: &[(&str, &str)]) -> Daemon {
    let url = redis.url();
    let mut all = vec![("TIDEMARK__DAEMON__BLOCK", "200ms"), ("TIDEMARK__DAEMON__CLAIM_IDLE", "1s")];
    all.extend_from_slice(envs);
    let d = Daemon::spawn(&["run", "--redis-url", &url, "--consumer", name, "--clock"], &all);
    d.wait_log("connected to Redis", WAIT);
    d
}

fn add(conn: &mut redis::Connection, id: &str, ts: i64) -> String {
    testkit::add(conn, &ks(), id, ts, &[("k", "v")])
}

/// The millisecond part of a stream entry id.
fn id_ms(id: &str) -> i64 {
    id.split_once('-').and_then(|(ms, _)| ms.parse().ok()).unwrap_or_else(|| panic!("not a stream id: {id}"))
}

/// One released element: (element id, ts, release time on the server).
fn released(out: &[StreamEntry]) -> Vec<(String, i64, i64)> {
    out.iter()
        .map(|(id, fields)| {
            let element = text(field(fields, "id").expect("id field"));
            let ts = text(field(fields, "ts").expect("ts field")).parse().expect("integer ts");
            (element, ts, id_ms(id))
        })
        .collect()
}

/// Prints p50 / p99 / max of `latencies` (ms) under `label`.
fn report(label: &str, latencies: &mut [i64]) {
    latencies.sort_unstable();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    eprintln!(
        "{label}: n={} min={}ms p50={}ms p99={}ms max={}ms",
        latencies.len(),
        latencies[0],
        at(0.5),
        at(0.99),
        latencies[latencies.len() - 1]
    );
}

fn wait_out_len(conn: &mut redis::Connection, n: usize, what: &str) -> Vec<StreamEntry> {
    let mut out = Vec::new();
    wait_until(what, WAIT, || {
        out = read_stream(conn, &ks().out);
        out.len() >= n
    });
    out
}

#[test]
fn elements_are_released_when_due_on_the_server_clock() {
    let redis = RedisServer::start();
    let mut conn = redis.sync_conn();
    // A long max sleep: an element released on time was woken for, not
    // found by a periodic check.
    let d = clock_daemon(&redis, "d1", &[("TIDEMARK__DAEMON__CLOCK_MAX_SLEEP", "30s")]);
    d.wait_log("clock leader", WAIT);

    // Each add is due earlier than every one before it (2 s ahead down to
    // 200 ms ahead), so each must wake the sleeping leader.
    let n = 40;
    let mut due = Vec::new();
    for i in 0..n {
        let ts = server_ms(&mut conn) + 2000 - i * 1800 / (n - 1);
        add(&mut conn, &format!("e{i:02}"), ts);
        due.push((format!("e{i:02}"), ts));
    }
    let out = wait_out_len(&mut conn, n as usize, "every element released");
    let got = released(&out);
    assert_eq!(got.len(), n as usize, "{got:?}");

    let mut latencies = Vec::new();
    for (element, ts) in &due {
        let (_, out_ts, at) = got.iter().find(|(e, ..)| e == element).unwrap_or_else(|| panic!("{element} missing"));
        assert_eq!(out_ts, ts, "{element}");
        let latency = at - ts;
        assert!(latency >= 0, "{element} released {}ms early (due {ts}, released {at})", -latency);
        assert!(latency < LATENCY_BOUND_MS, "{element} released {latency}ms late");
        latencies.push(latency);
    }
    // Released in ts order.
    let order: Vec<i64> = got.iter().map(|(_, ts, _)| *ts).collect();
    assert!(order.windows(2).all(|w| w[0] <= w[1]), "not in ts order: {order:?}");
    report("clock mode release latency (200ms..2s ahead, each add waking the leader)", &mut latencies);
}

#[test]
fn late_elements_are_released_at_once() {
    let redis = RedisServer::start();
    let mut conn = redis.sync_conn();
    let d = clock_daemon(&redis, "d1", &[("TIDEMARK__DAEMON__CLOCK_MAX_SLEEP", "30s")]);
    d.wait_log("clock leader", WAIT);

    let now = server_ms(&mut conn);
    let mut input_ids = Vec::new();
    for (i, ts) in [now - 60_000, now - 1, now].into_iter().enumerate() {
        input_ids.push((add(&mut conn, &format!("late{i}"), ts), ts));
    }
    let out = wait_out_len(&mut conn, 3, "the late elements released");
    let got = released(&out);
    let mut latencies = Vec::new();
    for (i, (input_id, ts)) in input_ids.iter().enumerate() {
        let (element, out_ts, at) = &got[i];
        assert_eq!((element.as_str(), *out_ts), (format!("late{i}").as_str(), *ts));
        // From the add's arrival in :in to its release, on the server clock.
        let latency = at - id_ms(input_id);
        assert!((0..LATENCY_BOUND_MS).contains(&latency), "late{i}: {latency}ms after it was added");
        latencies.push(latency);
    }
    report("clock mode: late element, input -> output", &mut latencies);
    let wm: i64 = redis::cmd("GET").arg(&ks().wm).query(&mut conn).expect("GET wm");
    assert!(wm >= now, "the watermark {wm} follows the server clock ({now})");
}

#[test]
fn explicit_watermark_ops_run_ahead_of_the_clock() {
    let redis = RedisServer::start();
    let mut conn = redis.sync_conn();
    let d = clock_daemon(&redis, "d1", &[("TIDEMARK__DAEMON__CLOCK_MAX_SLEEP", "50ms")]);
    d.wait_log("clock leader", WAIT);

    let now = server_ms(&mut conn);
    let hour = 3_600_000;
    add(&mut conn, "in-an-hour", now + hour);
    add(&mut conn, "in-two-hours", now + 2 * hour);
    let ahead = now + hour;
    watermark(&mut conn, &ks(), ahead);

    let out = wait_out_len(&mut conn, 1, "the element an hour ahead released");
    let got = released(&out);
    assert_eq!(got.iter().map(|(e, ts, _)| (e.as_str(), *ts)).collect::<Vec<_>>(), [("in-an-hour", now + hour)]);
    // Several clock ticks (every 50 ms) later the watermark is still the
    // explicit one: the clock only ever raises it.
    let ticks_before = server_ms(&mut conn);
    wait_until("a few clock ticks", WAIT, || server_ms(&mut conn) > ticks_before + 300);
    let wm: String = redis::cmd("GET").arg(&ks().wm).query(&mut conn).expect("GET wm");
    assert_eq!(wm, ahead.to_string());
    let score: Option<f64> =
        redis::cmd("ZSCORE").arg(&ks().sched).arg("in-two-hours").query(&mut conn).expect("ZSCORE");
    assert_eq!(score, Some((now + 2 * hour) as f64), "the later element stays scheduled");
    assert_eq!(read_stream(&mut conn, &ks().out).len(), 1);
}

#[test]
fn clock_continues_when_the_leader_is_killed() {
    let redis = RedisServer::start();
    let mut conn = redis.sync_conn();
    // The input of a dead daemon's partition moves within a lease lifetime
    // (the element added after the kill is applied by d2 once it owns the
    // partition): a short lease, like the clock's own lock.
    let lease = [("TIDEMARK__LEASE__TTL", "1s")];
    let mut d1 = clock_daemon(&redis, "d1", &lease);
    d1.wait_log("clock leader", WAIT);
    let d2 = clock_daemon(&redis, "d2", &lease);
    d2.wait_log("standing by", WAIT);
    let holder: String = redis::cmd("GET").arg(ks().lock("clock")).query(&mut conn).expect("GET lock");
    assert!(holder.starts_with("d1:"), "the first daemon leads: {holder}");

    // Something scheduled before the kill, so the clock has work pending.
    let before = server_ms(&mut conn);
    add(&mut conn, "due-soon", before + 500);
    wait_until("the add applied", WAIT, || {
        let n = zcard(&mut conn, &ks().sched);
        n == 1
    });
    d1.kill9();
    let killed = Instant::now();
    let killed_ms = server_ms(&mut conn);
    let due = killed_ms + 1000;
    add(&mut conn, "due-after-kill", due);

    wait_until("d2 holds the clock lock", WAIT, || {
        let h: Option<String> = redis::cmd("GET").arg(ks().lock("clock")).query(&mut conn).expect("GET lock");
        h.is_some_and(|h| h.starts_with("d2:"))
    });
    let takeover = killed.elapsed();
    let out = wait_out_len(&mut conn, 2, "both elements released");
    let got = released(&out);
    assert_eq!(got.iter().map(|(e, ..)| e.as_str()).collect::<Vec<_>>(), ["due-soon", "due-after-kill"]);
    let (_, ts, at) = &got[1];
    assert_eq!(*ts, due);
    let late = at - due;
    assert!(late >= 0, "released {}ms early", -late);
    // The lock lapses within 1 s of the last refresh before the kill and d2
    // polls every 100 ms, so d2 leads ~1.1 s after the kill at the latest:
    // about when the element falls due. Allow a loaded machine 1 s more.
    assert!(late < 1000, "released {late}ms after it was due");
    assert!(takeover < Duration::from_millis(2500), "d2 took over only after {takeover:?}");
    let (_, ts0, at0) = &got[0];
    assert!(at0 >= ts0, "due-soon released early");
    eprintln!(
        "clock failover after kill -9 of the leader: d2 led after {takeover:?}; an element due 1s after the kill \
         was released {late}ms late; one scheduled just before the kill (due 500ms after scheduling) {}ms late",
        at0 - ts0
    );
}

#[test]
fn clock_survives_a_redis_restart_and_releases_its_lock_on_shutdown() {
    let mut redis = RedisServer::start_with(RedisOptions { aof: true, ..RedisOptions::default() });
    let mut d = clock_daemon(&redis, "d1", &[("TIDEMARK__DAEMON__CLOCK_MAX_SLEEP", "30s")]);
    d.wait_log("clock leader", WAIT);
    let log_len = d.log().len();

    redis.restart();
    let mut conn = redis.sync_conn();
    // The clock reconnects and leads again (a new subscription included).
    wait_until("the daemon leads the clock again after the restart", WAIT, || {
        d.log()[log_len..].contains("clock leader")
    });
    let due = server_ms(&mut conn) + 300;
    add(&mut conn, "after-restart", due);
    let out = wait_out_len(&mut conn, 1, "the element released after the restart");
    let got = released(&out);
    assert_eq!(got[0].0, "after-restart");
    let late = got[0].2 - due;
    assert!((0..LATENCY_BOUND_MS).contains(&late), "released {late}ms after it was due");
    eprintln!("clock mode after a Redis restart: released {late}ms after due");

    d.sigterm();
    let status = d.wait_exit(WAIT).unwrap_or_else(|| panic!("the daemon did not stop:\n{}", d.log()));
    assert_eq!(status.code(), Some(0), "{}", d.log());
    let lock: Option<String> = redis::cmd("GET").arg(ks().lock("clock")).query(&mut conn).expect("GET lock");
    assert_eq!(lock, None, "the clock lock is released on shutdown");
}
