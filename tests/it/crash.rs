//! Crash and restart behaviour with real processes: `kill -9` of the daemon
//! in the middle of a large release, `kill -9` + restart of Redis (with an
//! append-only file) while idle and mid-release, Redis being down when the
//! daemon starts, SIGTERM during a large ingest, and input left pending by a
//! dead daemon.
//!
//! The oracle is always the whole output stream: every element exactly once,
//! in `(ts, id)` order, with its payload byte for byte.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use testkit::{exists, watermark, xlen, zcard, Daemon, Keys, RedisOptions, RedisServer, StreamEntry};
use tidemark::store::INPUT_GROUP;

/// Deadline for anything that should happen "soon" on a loaded CI box.
const LONG: Duration = Duration::from_secs(60);
/// XADDs per pipeline when filling the input stream.
const FILL_BATCH: usize = 1_000;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// One element as the model sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Elem {
    id: String,
    ts: i64,
    payload: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Element number `i` of the bulk tests: id `e{i:06}`, ts `i`, and a small
/// payload with a binary value (so "intact" means byte for byte).
fn bulk_elem(i: usize) -> Elem {
    Elem {
        id: format!("e{i:06}"),
        ts: i as i64,
        payload: vec![(b"n".to_vec(), i.to_string().into_bytes()), (b"b".to_vec(), vec![0xff, 0x00, (i % 251) as u8])],
    }
}

fn small_elem(id: &str, ts: i64) -> Elem {
    Elem { id: id.to_string(), ts, payload: vec![(b"k".to_vec(), format!("v-{id}").into_bytes())] }
}

fn add_cmd(keys: &Keys, e: &Elem) -> redis::Cmd {
    testkit::add_cmd(keys, &e.id, e.ts, &e.payload)
}

/// XADDs `op add` for every element, pipelined in batches of [`FILL_BATCH`].
fn fill_adds(conn: &mut redis::Connection, keys: &Keys, elems: &[Elem]) {
    for chunk in elems.chunks(FILL_BATCH) {
        let mut pipe = redis::pipe();
        for e in chunk {
            pipe.add_command(add_cmd(keys, e)).ignore();
        }
        pipe.query::<()>(conn).unwrap_or_else(|err| panic!("pipelined XADD to {}: {err}", keys.input));
    }
}

fn add(conn: &mut redis::Connection, keys: &Keys, e: &Elem) -> String {
    testkit::add(conn, keys, &e.id, e.ts, &e.payload)
}

fn get_wm(conn: &mut redis::Connection, keys: &Keys) -> Option<String> {
    redis::cmd("GET").arg(&keys.wm).query(conn).unwrap_or_else(|e| panic!("GET {}: {e}", keys.wm))
}

/// Number of pending entries of the input group; `None` while the group
/// does not exist yet.
fn input_pending(conn: &mut redis::Connection, keys: &Keys) -> Option<i64> {
    let reply: redis::RedisResult<redis::Value> = redis::cmd("XPENDING").arg(&keys.input).arg(INPUT_GROUP).query(conn);
    match reply {
        Ok(redis::Value::Array(parts)) => match parts.first() {
            Some(redis::Value::Int(n)) => Some(*n),
            other => panic!("XPENDING summary: unexpected first element {other:?}"),
        },
        Ok(other) => panic!("XPENDING summary: unexpected reply {other:?}"),
        Err(e) if e.code() == Some("NOGROUP") => None,
        Err(e) => panic!("XPENDING {}: {e}", keys.input),
    }
}

/// Tightly polls (every 1 ms) until `f` is true; returns the time it took.
/// Used where the window to act in is short (a release in progress).
fn poll_tight<F: FnMut() -> bool>(what: &str, timeout: Duration, mut f: F) -> Duration {
    let start = Instant::now();
    loop {
        if f() {
            return start.elapsed();
        }
        if start.elapsed() >= timeout {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Waits until every input entry is applied (none pending, none left
/// unread by the group) and the schedule holds `n` elements.
fn wait_scheduled(conn: &mut redis::Connection, keys: &Keys, n: usize) {
    testkit::wait_until(&format!("{n} elements scheduled and no input pending"), LONG, || {
        zcard(conn, &keys.sched) == n && input_pending(conn, keys) == Some(0) && group_lag(conn, keys) == Some(0)
    });
}

/// Entries of `:in` not yet delivered to the input group (`lag` of
/// `XINFO GROUPS`), `None` if unknown.
fn group_lag(conn: &mut redis::Connection, keys: &Keys) -> Option<i64> {
    let reply: redis::RedisResult<redis::Value> = redis::cmd("XINFO").arg("GROUPS").arg(&keys.input).query(conn);
    let Ok(redis::Value::Array(groups)) = reply else { return None };
    for g in groups {
        let pairs: Vec<(redis::Value, redis::Value)> = match g {
            redis::Value::Array(flat) => {
                let mut it = flat.into_iter();
                let mut v = Vec::new();
                while let (Some(a), Some(b)) = (it.next(), it.next()) {
                    v.push((a, b));
                }
                v
            }
            redis::Value::Map(m) => m,
            _ => continue,
        };
        let text = |v: &redis::Value| match v {
            redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
            redis::Value::SimpleString(s) => s.clone(),
            _ => String::new(),
        };
        let name = pairs.iter().find(|(k, _)| text(k) == "name").map(|(_, v)| text(v));
        if name.as_deref() != Some(INPUT_GROUP) {
            continue;
        }
        return match pairs.iter().find(|(k, _)| text(k) == "lag").map(|(_, v)| v) {
            Some(redis::Value::Int(n)) => Some(*n),
            _ => None,
        };
    }
    None
}

/// Decodes an output entry into an element: fields `id`, `ts`, then payload.
fn decode_out(entry: &StreamEntry) -> Elem {
    let (eid, fields) = entry;
    assert!(fields.len() >= 2, "output entry {eid} has fewer than 2 fields: {fields:?}");
    assert_eq!(fields[0].0, b"id", "output entry {eid}: first field must be `id`: {fields:?}");
    assert_eq!(fields[1].0, b"ts", "output entry {eid}: second field must be `ts`: {fields:?}");
    let id = String::from_utf8(fields[0].1.clone()).expect("utf-8 element id");
    let ts = std::str::from_utf8(&fields[1].1)
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .unwrap_or_else(|| panic!("output entry {eid}: ts is not an integer: {:?}", fields[1].1));
    Elem { id, ts, payload: fields[2..].to_vec() }
}

/// Asserts that `out` is exactly `expected`, element for element, and that
/// ts never decreases along the stream. Failure messages summarise
/// (duplicates, missing ids, first difference) instead of dumping 100k entries.
fn assert_output(out: &[StreamEntry], expected: &[Elem]) {
    let got: Vec<Elem> = out.iter().map(decode_out).collect();

    let mut counts: HashMap<&str, usize> = HashMap::new();
    for e in &got {
        *counts.entry(e.id.as_str()).or_default() += 1;
    }
    let mut doubled: Vec<(&str, usize)> = counts.iter().filter(|(_, n)| **n > 1).map(|(id, n)| (*id, *n)).collect();
    doubled.sort();
    let mut missing: Vec<&str> = expected.iter().map(|e| e.id.as_str()).filter(|id| !counts.contains_key(id)).collect();
    missing.sort();
    assert!(
        doubled.is_empty() && missing.is_empty(),
        "output has {} entries, expected {}; {} ids released more than once (first: {:?}); {} ids missing (first: {:?})",
        got.len(),
        expected.len(),
        doubled.len(),
        &doubled[..doubled.len().min(10)],
        missing.len(),
        &missing[..missing.len().min(10)],
    );

    if let Some(i) = got.iter().zip(expected).position(|(g, e)| g != e) {
        let lo = i.saturating_sub(2);
        panic!(
            "output differs from the model at position {i} (entry {}):\n got: {:?}\nwant: {:?}",
            out[i].0,
            &got[lo..(i + 3).min(got.len())],
            &expected[lo..(i + 3).min(expected.len())],
        );
    }
    assert_eq!(got.len(), expected.len(), "output length");
}

/// Asserts that ts strictly increases along `out` (distinct ts in the bulk
/// tests, so "in ts order" is strict).
fn assert_ts_strictly_increasing(out: &[StreamEntry]) {
    let mut prev: Option<(i64, &str)> = None;
    for entry in out {
        let e = decode_out(entry);
        if let Some((p, pid)) = prev {
            assert!(
                e.ts > p,
                "ts not strictly increasing: entry {pid} has ts {p}, next entry {} has ts {}",
                entry.0,
                e.ts
            );
        }
        prev = Some((e.ts, entry.0.as_str()));
    }
}

/// Asserts nothing is left behind: schedule and bodies empty, no dead letters.
fn assert_drained(conn: &mut redis::Connection, keys: &Keys) {
    assert_eq!(zcard(conn, &keys.sched), 0, ":sched must be empty");
    assert!(!exists(conn, &keys.sched), ":sched must not exist");
    assert!(!exists(conn, &keys.body), ":body must be empty");
    assert_eq!(testkit::read_stream(conn, &keys.dead), Vec::new(), ":dead must be empty");
}

fn spawn_daemon(redis_url: &str, consumer: &str, extra_env: &[(&str, &str)]) -> Daemon {
    let mut env: Vec<(&str, &str)> =
        vec![("TIDEMARK__DAEMON__CLAIM_IDLE", "500ms"), ("TIDEMARK__DAEMON__BLOCK", "200ms")];
    env.extend_from_slice(extra_env);
    Daemon::spawn(&["run", "--redis-url", redis_url, "--consumer", consumer, "--group", "g1"], &env)
}

/// Removes ANSI colour codes from a log line.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Log lines (colours removed) that contain `needle`.
fn log_lines_with(log: &str, needle: &str) -> Vec<String> {
    log.lines().map(strip_ansi).filter(|l| l.contains(needle)).collect()
}

/// Log lines at WARN or ERROR level saying that Redis is gone.
fn disconnect_warnings(log: &str) -> Vec<String> {
    log.lines()
        .map(strip_ansi)
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .filter(|l| l.contains("lost the connection") || l.contains("cannot reach Redis"))
        .collect()
}

/// Successful session starts (`connected to Redis` lines).
fn connect_count(d: &Daemon) -> usize {
    log_lines_with(&d.log(), "connected to Redis").len()
}

/// Retries logged at debug level while Redis is unreachable.
fn retry_count(d: &Daemon) -> usize {
    log_lines_with(&d.log(), "still cannot reach Redis").len()
}

// ---------------------------------------------------------------------------
// 1. kill -9 of the daemon during a 100k-element release
// ---------------------------------------------------------------------------

const BULK: usize = 100_000;

/// Release chunk for the kill-mid-release tests, smaller than the default
/// (1000) for margin: with 1000 the kill landed after 1000–3000 of 100k
/// elements in local runs, close enough to the start that a loaded CI box
/// could let a whole release slip between two polls; with 100 the release
/// takes ~1000 script calls and the kill lands after a few hundred.
const KILL_RELEASE_CHUNK: &str = "100";

fn kill9_during_release_then_restart(second_consumer: &str) {
    let redis = RedisServer::start();
    let keys = testkit::keys("default");
    let mut conn = redis.sync_conn();
    let elems: Vec<Elem> = (0..BULK).map(bulk_elem).collect();

    let started = Instant::now();
    fill_adds(&mut conn, &keys, &elems);
    let filled = started.elapsed();

    let chunk_env = [("TIDEMARK__DAEMON__RELEASE_CHUNK", KILL_RELEASE_CHUNK)];
    let mut d1 = spawn_daemon(&redis.url(), "d1", &chunk_env);
    d1.wait_log("connected to Redis", LONG);
    wait_scheduled(&mut conn, &keys, BULK);
    let scheduled = started.elapsed();
    assert_eq!(xlen(&mut conn, &keys.out), 0, "nothing may be released before a watermark");

    watermark(&mut conn, &keys, BULK as i64);
    let waited = poll_tight("the release to start", LONG, || xlen(&mut conn, &keys.out) > 0);
    d1.kill9();
    // One atomic read: a release call the daemon sent just before dying may
    // still run, and must not land between the two counts.
    let (at_kill, left): (usize, usize) = redis::pipe()
        .atomic()
        .cmd("XLEN")
        .arg(&keys.out)
        .cmd("ZCARD")
        .arg(&keys.sched)
        .query(&mut conn)
        .expect("MULTI XLEN ZCARD EXEC");
    assert!(
        at_kill < BULK,
        "the release finished before the kill ({at_kill} released, seen after {waited:?}); lower KILL_RELEASE_CHUNK"
    );
    assert_eq!(left + at_kill, BULK, "released + still scheduled must account for every element at the kill");
    assert_eq!(get_wm(&mut conn, &keys).as_deref(), Some(BULK.to_string().as_str()), "watermark is stored");

    let d2 = spawn_daemon(&redis.url(), second_consumer, &[]);
    d2.wait_log("connected to Redis", LONG);
    testkit::wait_until("all 100k elements released after the restart", LONG, || xlen(&mut conn, &keys.out) >= BULK);
    // Let anything wrongly re-released show up before reading: a later op
    // must be applied after all of it (ops take effect in input order).
    let marker = small_elem("marker", BULK as i64 + 1);
    add(&mut conn, &keys, &marker);
    watermark(&mut conn, &keys, BULK as i64 + 1);
    testkit::wait_until("the marker released", LONG, || xlen(&mut conn, &keys.out) > BULK);

    let out = testkit::read_stream(&mut conn, &keys.out);
    let mut expected = elems;
    expected.push(marker);
    assert_output(&out, &expected);
    assert_ts_strictly_increasing(&out);
    assert_drained(&mut conn, &keys);
    assert_eq!(input_pending(&mut conn, &keys), Some(0), "no input left pending");
    eprintln!(
        "kill9 during release ({second_consumer}): filled in {filled:?}, scheduled at {scheduled:?}, \
         killed with {at_kill}/{BULK} released, done at {:?}",
        started.elapsed()
    );
}

#[test]
fn kill9_during_release_then_restart_same_consumer() {
    kill9_during_release_then_restart("d1");
}

#[test]
fn kill9_during_release_then_restart_other_consumer() {
    kill9_during_release_then_restart("d2");
}

// ---------------------------------------------------------------------------
// 2. Redis kill -9 + restart while the daemon runs
// ---------------------------------------------------------------------------

#[test]
fn redis_restart_daemon_reconnects_and_continues() {
    let mut redis = RedisServer::start_with(RedisOptions { aof: true, ..Default::default() });
    let keys = testkit::keys("default");
    let mut d = spawn_daemon(&redis.url(), "d1", &[("TIDEMARK__DAEMON__RECONNECT_MAX", "500ms")]);
    d.wait_log("connected to Redis", LONG);

    let before: Vec<Elem> = (1..=5).map(|i| small_elem(&format!("a{i}"), i)).collect();
    {
        let mut conn = redis.sync_conn();
        for e in &before {
            add(&mut conn, &keys, e);
        }
        watermark(&mut conn, &keys, 3);
        wait_scheduled(&mut conn, &keys, 2);
        let out: Vec<Elem> = testkit::read_stream(&mut conn, &keys.out).iter().map(decode_out).collect();
        assert_eq!(out, before[..3].to_vec(), "a1..a3 released before the crash");
    }

    redis.kill9();
    let down_at = Instant::now();
    testkit::wait_until("the daemon noticed that Redis is gone", LONG, || !disconnect_warnings(&d.log()).is_empty());
    // Let the outage last ~3 s, with several reconnect attempts (each logged
    // at debug level only). Nothing is written while Redis is down.
    testkit::wait_until("at least 4 reconnect attempts", LONG, || retry_count(&d) >= 4);
    if let Some(rest) = Duration::from_secs(3).checked_sub(down_at.elapsed()) {
        std::thread::sleep(rest);
    }
    assert!(d.is_running(), "the daemon must keep running while Redis is down; log:\n{}", d.log());
    assert_eq!(connect_count(&d), 1, "no session can start while Redis is down");

    redis.restart();
    testkit::wait_until("the daemon reconnected (second `connected to Redis`)", LONG, || connect_count(&d) >= 2);

    let mut conn = redis.sync_conn();
    // The AOF kept everything from before the crash.
    assert_eq!(get_wm(&mut conn, &keys).as_deref(), Some("3"), "watermark survives the restart");
    assert_eq!(zcard(&mut conn, &keys.sched), 2, "a4, a5 still scheduled after the restart");

    let a6 = small_elem("a6", 6);
    let a7 = small_elem("a7", 2); // late: ts 2 <= wm 3, released at once
    let a8 = small_elem("a8", 11); // stays scheduled
    add(&mut conn, &keys, &a6);
    add(&mut conn, &keys, &a7);
    add(&mut conn, &keys, &a8);
    watermark(&mut conn, &keys, 10);
    testkit::wait_until("a7, a4, a5, a6 released after the reconnect", LONG, || xlen(&mut conn, &keys.out) >= 7);
    wait_scheduled(&mut conn, &keys, 1);

    let out = testkit::read_stream(&mut conn, &keys.out);
    let expected =
        vec![before[0].clone(), before[1].clone(), before[2].clone(), a7, before[3].clone(), before[4].clone(), a6];
    assert_output(&out, &expected);
    assert_eq!(get_wm(&mut conn, &keys).as_deref(), Some("10"));

    let log = d.log();
    let warnings = disconnect_warnings(&log);
    assert!(
        !warnings.is_empty() && warnings.len() <= 2,
        "the outage must be logged once at WARN, not once per retry ({} retries); got {} lines:\n{}",
        retry_count(&d),
        warnings.len(),
        warnings.join("\n")
    );
    assert_eq!(connect_count(&d), 2, "exactly one reconnect");
    assert!(d.is_running(), "the daemon must never exit; log:\n{log}");
    assert!(!log.contains("tidemark daemon stopped"), "the daemon must never stop; log:\n{log}");
}

// ---------------------------------------------------------------------------
// 3. Redis kill -9 + restart in the middle of a large release
// ---------------------------------------------------------------------------

#[test]
fn redis_restart_mid_release_releases_everything_once_in_order() {
    let mut redis = RedisServer::start_with(RedisOptions { aof: true, ..Default::default() });
    let keys = testkit::keys("default");
    let elems: Vec<Elem> = (0..BULK).map(bulk_elem).collect();
    let started = Instant::now();
    {
        let mut conn = redis.sync_conn();
        fill_adds(&mut conn, &keys, &elems);
    }
    let filled = started.elapsed();

    let mut d = spawn_daemon(
        &redis.url(),
        "d1",
        &[("TIDEMARK__DAEMON__RELEASE_CHUNK", KILL_RELEASE_CHUNK), ("TIDEMARK__DAEMON__RECONNECT_MAX", "500ms")],
    );
    d.wait_log("connected to Redis", LONG);
    let at_kill = {
        let mut conn = redis.sync_conn();
        wait_scheduled(&mut conn, &keys, BULK);
        watermark(&mut conn, &keys, BULK as i64);
        poll_tight("the release to start", LONG, || xlen(&mut conn, &keys.out) > 0);
        // With appendfsync always, what this connection saw is in the AOF.
        xlen(&mut conn, &keys.out)
    };
    redis.kill9();
    assert!(at_kill < BULK, "the release finished before Redis was killed ({at_kill} released)");
    let scheduled = started.elapsed();

    redis.restart();
    let restarted = started.elapsed();
    let mut conn = redis.sync_conn();
    let after_restart = xlen(&mut conn, &keys.out);
    // The daemon may already be back and releasing, so only the lower bound
    // is certain: what a client saw before the crash is durable.
    assert!(
        after_restart >= at_kill,
        "after the restart :out has {after_restart} entries; {at_kill} were seen before the crash"
    );
    testkit::wait_until("the daemon reconnected", LONG, || connect_count(&d) >= 2);
    testkit::wait_until("all elements released after the Redis restart", LONG, || xlen(&mut conn, &keys.out) >= BULK);
    let marker = small_elem("marker", BULK as i64 + 1);
    add(&mut conn, &keys, &marker);
    watermark(&mut conn, &keys, BULK as i64 + 1);
    testkit::wait_until("the marker released", LONG, || xlen(&mut conn, &keys.out) > BULK);

    let out = testkit::read_stream(&mut conn, &keys.out);
    let mut expected = elems;
    expected.push(marker);
    assert_output(&out, &expected);
    assert_ts_strictly_increasing(&out);
    assert_drained(&mut conn, &keys);
    assert_eq!(input_pending(&mut conn, &keys), Some(0), "no input left pending");
    assert!(d.is_running(), "the daemon must survive the Redis restart");
    eprintln!(
        "redis restart mid-release: filled in {filled:?}, killed at {scheduled:?} with {at_kill}/{BULK} released \
         ({after_restart} after the AOF reload), restarted at {restarted:?}, done at {:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------
// 4. Redis down when the daemon starts
// ---------------------------------------------------------------------------

#[test]
fn daemon_started_before_redis_waits_and_then_works() {
    let mut redis = RedisServer::start();
    redis.kill9();
    let keys = testkit::keys("default");

    let mut d = spawn_daemon(&redis.url(), "d1", &[("TIDEMARK__DAEMON__RECONNECT_MAX", "500ms")]);
    d.wait_log("cannot reach Redis", LONG);
    testkit::wait_until("at least 3 reconnect attempts", LONG, || retry_count(&d) >= 3);
    assert!(d.is_running(), "the daemon must keep retrying, not exit; log:\n{}", d.log());
    assert_eq!(connect_count(&d), 0);

    redis.restart();
    d.wait_log("connected to Redis", LONG);

    let mut conn = redis.sync_conn();
    let x1 = small_elem("x1", 10);
    let x2 = small_elem("x2", 20);
    let x3 = small_elem("x3", 30);
    add(&mut conn, &keys, &x2);
    add(&mut conn, &keys, &x3);
    add(&mut conn, &keys, &x1);
    watermark(&mut conn, &keys, 25);
    testkit::wait_until("x1, x2 released", LONG, || xlen(&mut conn, &keys.out) >= 2);
    wait_scheduled(&mut conn, &keys, 1);
    assert_output(&testkit::read_stream(&mut conn, &keys.out), &[x1, x2]);

    let warnings = disconnect_warnings(&d.log());
    assert_eq!(warnings.len(), 1, "one warning for the whole outage, got:\n{}", warnings.join("\n"));
    assert_eq!(connect_count(&d), 1);
    assert!(d.is_running());
}

// ---------------------------------------------------------------------------
// 5. SIGTERM during a large ingest
// ---------------------------------------------------------------------------

#[test]
fn sigterm_during_ingest_exits_cleanly_and_a_new_daemon_finishes() {
    const N: usize = 50_000;
    const GRACE: Duration = Duration::from_secs(10);
    let redis = RedisServer::start();
    let keys = testkit::keys("default");
    let mut conn = redis.sync_conn();
    let elems: Vec<Elem> = (0..N).map(bulk_elem).collect();
    fill_adds(&mut conn, &keys, &elems);

    let mut d1 = spawn_daemon(&redis.url(), "d1", &[("TIDEMARK__DAEMON__SHUTDOWN_GRACE", "10s")]);
    d1.wait_log("connected to Redis", LONG);
    poll_tight("the ingest to start", LONG, || zcard(&mut conn, &keys.sched) > 0);
    d1.sigterm();
    let signalled = Instant::now();
    let at_signal = zcard(&mut conn, &keys.sched);
    let status = d1.wait_exit(LONG).expect("the daemon must exit after SIGTERM");
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(0), "SIGTERM must exit 0; log:\n{}", d1.log());
    assert!(took < GRACE, "exit took {took:?}, more than the grace period");
    assert!(d1.log().contains("tidemark daemon stopped"), "clean stop is logged; log:\n{}", d1.log());
    let after_exit = zcard(&mut conn, &keys.sched);
    assert!(after_exit < N, "SIGTERM must stop reading: all {N} got scheduled anyway ({at_signal} at the signal)");
    assert_eq!(xlen(&mut conn, &keys.out), 0);
    // Entries the stopped daemon read but did not apply (a read in flight
    // at the signal) stay pending at d1; d2 must claim them (see test 6).
    let left_pending = input_pending(&mut conn, &keys).expect("input group exists");

    let d2 = spawn_daemon(&redis.url(), "d2", &[]);
    d2.wait_log("connected to Redis", LONG);
    wait_scheduled(&mut conn, &keys, N);
    // Every element is scheduled exactly once, with its ts as score.
    let scheduled: Vec<(String, i64)> = redis::cmd("ZRANGE")
        .arg(&keys.sched)
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query(&mut conn)
        .expect("ZRANGE WITHSCORES");
    let want: Vec<(String, i64)> = elems.iter().map(|e| (e.id.clone(), e.ts)).collect();
    assert!(scheduled == want, "schedule differs from the {N} adds ({} entries)", scheduled.len());

    // Releasing everything shows the bodies: each element once, intact.
    watermark(&mut conn, &keys, N as i64);
    testkit::wait_until("all elements released", LONG, || xlen(&mut conn, &keys.out) >= N);
    let marker = small_elem("marker", N as i64 + 1);
    add(&mut conn, &keys, &marker);
    watermark(&mut conn, &keys, N as i64 + 1);
    testkit::wait_until("the marker released", LONG, || xlen(&mut conn, &keys.out) > N);
    let out = testkit::read_stream(&mut conn, &keys.out);
    let mut expected = elems;
    expected.push(marker);
    assert_output(&out, &expected);
    assert_drained(&mut conn, &keys);
    eprintln!(
        "sigterm: {at_signal} scheduled at the signal, {after_exit} after exit (took {took:?}), \
         {left_pending} left pending at d1"
    );
}

// ---------------------------------------------------------------------------
// 6. Input left pending by a dead daemon, behind a full backlog
// ---------------------------------------------------------------------------

/// What a daemon killed right after its `XREADGROUP` leaves behind: the
/// oldest input entries delivered to it and never acknowledged. A live
/// daemon then reads the newer entries, which must wait for the old ones
/// (ops take effect in input order), so it has to claim them once they are
/// idle for `claim_idle` — even though it already holds a full backlog of
/// newer entries (more than 2 × batch_size are waiting here).
///
/// Test 5 runs into the same situation by chance: SIGTERM can land while
/// the reader's `XREADGROUP` is in flight, leaving its batch pending at the
/// stopped daemon.
#[test]
fn input_pending_at_a_dead_daemon_is_claimed_behind_a_full_backlog() {
    const N: usize = 5_000;
    const CRASHED: usize = 10;
    let redis = RedisServer::start();
    let keys = testkit::keys("default");
    let mut conn = redis.sync_conn();

    // Entry 0 adds `victim`, a later entry cancels it: if the claimed entry
    // were applied after the cancel, `victim` would stay scheduled.
    let victim = small_elem("victim", 1);
    add(&mut conn, &keys, &victim);
    let elems: Vec<Elem> = (0..N).map(|i| bulk_elem(i + 10)).collect();
    fill_adds(&mut conn, &keys, &elems[..N / 2]);
    testkit::xadd_fields(&mut conn, &keys.input, &[(b"op", b"cancel"), (b"id", b"victim")]);
    fill_adds(&mut conn, &keys, &elems[N / 2..]);

    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&keys.input)
        .arg(INPUT_GROUP)
        .arg("0")
        .query(&mut conn)
        .expect("XGROUP CREATE");
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(INPUT_GROUP)
        .arg("crashed")
        .arg("COUNT")
        .arg(CRASHED)
        .arg("STREAMS")
        .arg(&keys.input)
        .arg(">")
        .query(&mut conn)
        .expect("XREADGROUP as the crashed daemon");
    assert_eq!(input_pending(&mut conn, &keys), Some(CRASHED as i64));

    // claim_idle 2 s: the live daemon certainly starts (and runs its startup
    // claim) before the crashed daemon's entries are that idle, so they
    // must be claimed later, while its backlog is full.
    let d = spawn_daemon(&redis.url(), "live", &[("TIDEMARK__DAEMON__CLAIM_IDLE", "2s")]);
    d.wait_log("connected to Redis", LONG);
    wait_scheduled(&mut conn, &keys, N);
    assert!(
        d.log().contains("claimed input entries left pending by another daemon"),
        "the crashed daemon's entries must have been claimed; log:\n{}",
        d.log()
    );

    watermark(&mut conn, &keys, (N + 10) as i64);
    testkit::wait_until("all elements released", LONG, || xlen(&mut conn, &keys.out) >= N);
    let marker = small_elem("marker", (N + 11) as i64);
    add(&mut conn, &keys, &marker);
    watermark(&mut conn, &keys, (N + 11) as i64);
    testkit::wait_until("the marker released", LONG, || xlen(&mut conn, &keys.out) > N);
    let mut expected = elems;
    expected.push(marker);
    assert_output(&testkit::read_stream(&mut conn, &keys.out), &expected);
    assert_drained(&mut conn, &keys);
}
