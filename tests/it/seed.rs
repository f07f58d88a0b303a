//! The seed scenario and the basic semantics of DESIGN.md §3–4, end to end
//! against the real `tidemark` binary and one daemon per test.

use std::time::Duration;

use redis::streams::StreamInfoGroupsReply;

use testkit::default_keys as ks;
use testkit::{
    exists, input_applied, read_stream, wait_until, xadd_fields, xlen, Daemon, Fields, RedisServer, NO_PAYLOAD,
};

/// Generous: CI has two cores and runs tests in parallel.
const WAIT: Duration = Duration::from_secs(60);
/// The largest timestamp (2^53-1).
const TS_MAX: i64 = (1 << 53) - 1;
/// The smallest timestamp; an add at this ts is late as soon as any watermark
/// exists, which makes it a barrier that proves everything before it ran.
const TS_MIN: i64 = -TS_MAX;

/// One released element as read back from `:out`.
#[derive(Clone, PartialEq, Eq)]
struct Released {
    id: Vec<u8>,
    ts: Vec<u8>,
    payload: Fields,
}

/// Readable failure messages: `id@ts {k=v, ...}` with bytes escaped.
impl std::fmt::Debug for Released {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{} {{", self.id.escape_ascii(), self.ts.escape_ascii())?;
        for (i, (k, v)) in self.payload.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            if v.len() > 64 {
                write!(f, "{sep}{}=<{} bytes>", k.escape_ascii(), v.len())?;
            } else {
                write!(f, "{sep}{}={}", k.escape_ascii(), v.escape_ascii())?;
            }
        }
        write!(f, "}}")
    }
}

/// A private Redis, a connection to it and a daemon (see [`start_daemon`]).
fn with_daemon(extra_args: &[&str], envs: &[(&str, &str)]) -> (RedisServer, redis::Connection, Daemon) {
    let redis = RedisServer::start();
    let conn = redis.sync_conn();
    let d = start_daemon(&redis, extra_args, envs);
    (redis, conn, d)
}

/// Starts `tidemark run` as consumer `d1` and waits until it is connected.
fn start_daemon(redis: &RedisServer, extra_args: &[&str], envs: &[(&str, &str)]) -> Daemon {
    let url = redis.url();
    let mut args = vec!["run", "--redis-url", url.as_str(), "--consumer", "d1"];
    args.extend_from_slice(extra_args);
    let mut all_envs = vec![("TIDEMARK__DAEMON__CLAIM_IDLE", "500ms"), ("TIDEMARK__DAEMON__BLOCK", "200ms")];
    all_envs.extend_from_slice(envs);
    let d = Daemon::spawn(&args, &all_envs);
    d.wait_log("connected to Redis", WAIT);
    d
}

/// Reads `:out` and splits each entry into (id, ts, payload), checking that
/// every entry starts with exactly the fields `id` and `ts`.
fn released(conn: &mut redis::Connection) -> Vec<Released> {
    read_stream(conn, &ks().out)
        .into_iter()
        .map(|(entry_id, mut fields)| {
            assert!(fields.len() >= 2, "out entry {entry_id} has fewer than 2 fields: {fields:?}");
            let rest = fields.split_off(2);
            let [(f_id, id), (f_ts, ts)]: [(Vec<u8>, Vec<u8>); 2] = fields.try_into().expect("two fields");
            assert_eq!(f_id, b"id", "out entry {entry_id}: first field must be `id`");
            assert_eq!(f_ts, b"ts", "out entry {entry_id}: second field must be `ts`");
            Released { id, ts, payload: rest }
        })
        .collect()
}

/// An expected released element with a UTF-8 payload.
fn rel(id: &str, ts: i64, payload: &[(&str, &str)]) -> Released {
    Released {
        id: id.as_bytes().to_vec(),
        ts: ts.to_string().into_bytes(),
        payload: payload.iter().map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec())).collect(),
    }
}

/// Waits until `:out` holds at least `n` entries.
fn wait_out_len(conn: &mut redis::Connection, n: usize) {
    wait_until(&format!(":out has {n} entries"), WAIT, || xlen(conn, &ks().out) >= n);
}

/// Adds a late element at `TS_MIN` (a barrier: it is released at once, so
/// once it shows up in `:out` every earlier input entry has been applied)
/// and waits for it. Needs a watermark to exist.
fn barrier(conn: &mut redis::Connection, name: &str) -> Released {
    testkit::add(conn, &ks(), name, TS_MIN, NO_PAYLOAD);
    let what = format!("barrier {name} released");
    wait_until(&what, WAIT, || released(conn).iter().any(|r| r.id == name.as_bytes()));
    rel(name, TS_MIN, &[])
}

fn wm_value(conn: &mut redis::Connection) -> Option<String> {
    redis::cmd("GET").arg(&ks().wm).query(conn).expect("GET wm")
}

fn schedule(conn: &mut redis::Connection) -> Vec<(String, i64)> {
    let raw: Vec<(String, f64)> =
        redis::cmd("ZRANGE").arg(&ks().sched).arg(0).arg(-1).arg("WITHSCORES").query(conn).expect("ZRANGE sched");
    raw.into_iter().map(|(id, score)| (id, score as i64)).collect()
}

fn body_ids(conn: &mut redis::Connection) -> Vec<String> {
    let mut ids: Vec<String> = redis::cmd("HKEYS").arg(&ks().body).query(conn).expect("HKEYS body");
    ids.sort();
    ids
}

fn groups(conn: &mut redis::Connection, stream: &str) -> StreamInfoGroupsReply {
    redis::cmd("XINFO").arg("GROUPS").arg(stream).query(conn).expect("XINFO GROUPS")
}

fn dead_letters(conn: &mut redis::Connection) -> Vec<testkit::StreamEntry> {
    read_stream(conn, &ks().dead)
}

#[test]
fn seed_scenario() {
    let (_redis, mut conn, _d) = with_daemon(&[], &[]);

    testkit::add(&mut conn, &ks(), "a", 1, &[("payload", "alpha")]);
    testkit::add(&mut conn, &ks(), "b", 2, &[("payload", "bravo")]);
    testkit::add(&mut conn, &ks(), "c", 3, &[("payload", "charlie")]);
    testkit::watermark(&mut conn, &ks(), 2);
    wait_out_len(&mut conn, 2);
    // d comes after the watermark in the input, so once d is out, the
    // watermark 2 has been fully applied: c must not be out.
    testkit::add(&mut conn, &ks(), "d", 2, &[("payload", "delta")]);
    wait_out_len(&mut conn, 3);
    assert_eq!(
        released(&mut conn),
        vec![
            rel("a", 1, &[("payload", "alpha")]),
            rel("b", 2, &[("payload", "bravo")]),
            rel("d", 2, &[("payload", "delta")]),
        ],
        "watermark 2 releases exactly a and b, then the late d at once"
    );
    assert_eq!(schedule(&mut conn), vec![("c".to_string(), 3)], "c waits in :sched with score 3");
    assert_eq!(body_ids(&mut conn), vec!["c".to_string()]);
    assert_eq!(wm_value(&mut conn).as_deref(), Some("2"));

    testkit::watermark(&mut conn, &ks(), 3);
    wait_out_len(&mut conn, 4);
    wait_until("every input entry applied and acknowledged", WAIT, || input_applied(&mut conn, &ks()));
    assert_eq!(
        released(&mut conn),
        vec![
            rel("a", 1, &[("payload", "alpha")]),
            rel("b", 2, &[("payload", "bravo")]),
            rel("d", 2, &[("payload", "delta")]),
            rel("c", 3, &[("payload", "charlie")]),
        ]
    );
    assert!(!exists(&mut conn, &ks().sched), ":sched must be empty");
    assert!(!exists(&mut conn, &ks().body), ":body must be empty");
    assert_eq!(wm_value(&mut conn).as_deref(), Some("3"));
    assert!(dead_letters(&mut conn).is_empty());
}

#[test]
fn lower_or_equal_watermark_changes_nothing() {
    let (_redis, mut conn, _d) = with_daemon(&[], &[]);

    testkit::add(&mut conn, &ks(), "later", 11, &[("k", "v")]);
    testkit::watermark(&mut conn, &ks(), 10);
    testkit::watermark(&mut conn, &ks(), 8); // lower: ignored
    testkit::watermark(&mut conn, &ks(), 10); // equal: ignored

    // If the watermark had dropped to 8, y@9 would be scheduled instead of
    // released at once.
    testkit::add(&mut conn, &ks(), "y", 9, &[("n", "1")]);
    testkit::add(&mut conn, &ks(), "z", 10, &[("n", "2")]); // inclusive
    let b = barrier(&mut conn, "barrier");
    assert_eq!(released(&mut conn), vec![rel("y", 9, &[("n", "1")]), rel("z", 10, &[("n", "2")]), b]);
    assert_eq!(wm_value(&mut conn).as_deref(), Some("10"));
    assert_eq!(schedule(&mut conn), vec![("later".to_string(), 11)]);
    assert!(dead_letters(&mut conn).is_empty(), "a lower watermark is not an error");
}

#[test]
fn upsert_replaces_ts_and_payload() {
    let (_redis, mut conn, _d) = with_daemon(&[], &[]);

    // Moved later: not released at the old time.
    testkit::add(&mut conn, &ks(), "u", 5, &[("v", "old"), ("extra", "x")]);
    testkit::add(&mut conn, &ks(), "u", 8, &[("v", "new"), ("w", "2")]);
    // Moved earlier.
    testkit::add(&mut conn, &ks(), "e", 20, &[("v", "old")]);
    testkit::add(&mut conn, &ks(), "e", 6, &[("v", "new")]);
    testkit::watermark(&mut conn, &ks(), 5);
    let b1 = barrier(&mut conn, "b1");
    assert_eq!(released(&mut conn), vec![b1.clone()], "nothing is due at 5 any more");
    assert_eq!(schedule(&mut conn), vec![("e".to_string(), 6), ("u".to_string(), 8)]);

    testkit::watermark(&mut conn, &ks(), 7);
    let b2 = barrier(&mut conn, "b2");
    assert_eq!(released(&mut conn), vec![b1.clone(), rel("e", 6, &[("v", "new")]), b2.clone()]);

    testkit::watermark(&mut conn, &ks(), 8);
    let b3 = barrier(&mut conn, "b3");
    wait_until("every input entry applied and acknowledged", WAIT, || input_applied(&mut conn, &ks()));
    assert_eq!(
        released(&mut conn),
        vec![b1, rel("e", 6, &[("v", "new")]), b2, rel("u", 8, &[("v", "new"), ("w", "2")]), b3],
        "u is released once, with the new payload, at the new time"
    );
    assert!(!exists(&mut conn, &ks().sched));
    assert!(!exists(&mut conn, &ks().body));

    // Upserts that drop or gain a payload: no stale body survives.
    testkit::add(&mut conn, &ks(), "drops", 30, &[("stale", "yes")]);
    testkit::add(&mut conn, &ks(), "gains", 30, NO_PAYLOAD);
    testkit::add(&mut conn, &ks(), "drops", 31, NO_PAYLOAD);
    testkit::add(&mut conn, &ks(), "gains", 31, &[("fresh", "yes")]);
    testkit::watermark(&mut conn, &ks(), 31);
    wait_out_len(&mut conn, 7);
    wait_until("every input entry applied and acknowledged", WAIT, || input_applied(&mut conn, &ks()));
    assert_eq!(released(&mut conn)[5..], [rel("drops", 31, &[]), rel("gains", 31, &[("fresh", "yes")])]);
    assert_eq!(xlen(&mut conn, &ks().out), 7);
    assert!(!exists(&mut conn, &ks().sched));
    assert!(!exists(&mut conn, &ks().body));
}

#[test]
fn cancel_semantics() {
    let (_redis, mut conn, _d) = with_daemon(&[], &[]);

    testkit::add(&mut conn, &ks(), "k1", 5, &[("p", "1")]);
    testkit::add(&mut conn, &ks(), "k2", 6, &[("p", "2")]);
    testkit::add(&mut conn, &ks(), "k3", 50, &[("p", "3")]);
    testkit::cancel(&mut conn, &ks(), "k1");
    testkit::watermark(&mut conn, &ks(), 10);
    let b1 = barrier(&mut conn, "b1");
    assert_eq!(released(&mut conn), vec![rel("k2", 6, &[("p", "2")]), b1.clone()]);
    assert_eq!(schedule(&mut conn), vec![("k3".to_string(), 50)]);

    // Cancel after release: a no-op. Cancel of an unknown id: harmless.
    testkit::cancel(&mut conn, &ks(), "k2");
    testkit::cancel(&mut conn, &ks(), "never-added");
    let b2 = barrier(&mut conn, "b2");
    wait_until("every input entry applied and acknowledged", WAIT, || input_applied(&mut conn, &ks()));
    assert_eq!(released(&mut conn), vec![rel("k2", 6, &[("p", "2")]), b1, b2]);
    assert_eq!(schedule(&mut conn), vec![("k3".to_string(), 50)], "the schedule is unchanged");
    assert_eq!(body_ids(&mut conn), vec!["k3".to_string()]);
    assert_eq!(wm_value(&mut conn).as_deref(), Some("10"));
    assert!(dead_letters(&mut conn).is_empty());

    // k1 stays cancelled for good: a later watermark does not bring it back.
    testkit::watermark(&mut conn, &ks(), 100);
    wait_out_len(&mut conn, 4);
    wait_until("every input entry applied and acknowledged", WAIT, || input_applied(&mut conn, &ks()));
    let ids: Vec<Vec<u8>> = released(&mut conn).into_iter().map(|r| r.id).collect();
    assert_eq!(ids, vec![b"k2".to_vec(), b"b1".to_vec(), b"b2".to_vec(), b"k3".to_vec()]);
}

#[test]
fn release_order_is_ts_then_id_bytes() {
    let (_redis, mut conn, _d) = with_daemon(&[], &[]);

    for (id, ts) in [("z", 1), ("a", 2), ("m", 2), ("b", 1), ("a9", 3), ("a10", 3), ("B", 3), ("neg", -4)] {
        testkit::add(&mut conn, &ks(), id, ts, &[("id_was", id)]);
    }
    testkit::watermark(&mut conn, &ks(), 3);
    wait_out_len(&mut conn, 8);
    wait_until("every input entry applied and acknowledged", WAIT, || input_applied(&mut conn, &ks()));
    let got: Vec<(String, String)> = released(&mut conn)
        .into_iter()
        .map(|r| (String::from_utf8(r.id).unwrap(), String::from_utf8(r.ts).unwrap()))
        .collect();
    let want: Vec<(String, String)> =
        [("neg", "-4"), ("b", "1"), ("z", "1"), ("a", "2"), ("m", "2"), ("B", "3"), ("a10", "3"), ("a9", "3")]
            .iter()
            .map(|(id, ts)| (id.to_string(), ts.to_string()))
            .collect();
    assert_eq!(got, want);
}

/// A payload with every awkward byte: NUL, 0xff, CR/LF, empty values,
/// duplicate field names, a 100 KB value and ~50 fields.
fn awkward_payload() -> Fields {
    let mut p: Fields = vec![
        (b"nul\0name".to_vec(), b"nul\0value\0".to_vec()),
        (vec![0xff, 0xfe, 0x80], vec![0xff, 0x00, 0xff]),
        (b"lines\r\n".to_vec(), b"one\ntwo\r\nthree\n".to_vec()),
        (b"empty".to_vec(), Vec::new()),
        (b"dup".to_vec(), b"first".to_vec()),
        (b"big".to_vec(), (0..100 * 1024).map(|i| (i % 251) as u8).collect()),
        (b"dup".to_vec(), b"second".to_vec()),
        (b" spaces ".to_vec(), b"  ".to_vec()),
        (b"42".to_vec(), b"-0".to_vec()),
    ];
    for i in 0..41 {
        p.push((format!("f{i:02}").into_bytes(), format!("v{i}").into_bytes()));
    }
    p.push((b"dup".to_vec(), Vec::new()));
    p
}

#[test]
fn binary_safe_payload_roundtrip() {
    let (_redis, mut conn, _d) = with_daemon(&[], &[]);
    let payload = awkward_payload();
    assert!(payload.len() >= 50);

    let xadd = |conn: &mut redis::Connection, id: &[u8], ts: &[u8]| {
        let mut fields: Vec<(&[u8], &[u8])> = Vec::new();
        // Payload fields before and after the reserved ones: order is kept.
        fields.push((&payload[0].0, &payload[0].1));
        fields.extend([(&b"op"[..], &b"add"[..]), (&b"id"[..], id)]);
        fields.extend(payload[1..10].iter().map(|(k, v)| (k.as_slice(), v.as_slice())));
        fields.push((b"ts", ts));
        fields.extend(payload[10..].iter().map(|(k, v)| (k.as_slice(), v.as_slice())));
        xadd_fields(conn, &ks().input, &fields);
    };
    // Scheduled, then released by a watermark (payload stored in :body)...
    xadd(&mut conn, b"scheduled \xc3\xa9l\xc3\xa9ment", b"7");
    testkit::watermark(&mut conn, &ks(), 7);
    // ... and late (released straight from the input entry).
    xadd(&mut conn, b"late", b"3");
    wait_out_len(&mut conn, 2);
    wait_until("every input entry applied and acknowledged", WAIT, || input_applied(&mut conn, &ks()));

    let out = released(&mut conn);
    assert_eq!(out.len(), 2);
    let expected = [("scheduled élément".as_bytes(), b"7"), (b"late".as_slice(), b"3")];
    for (Released { id, ts, payload: got }, (want_id, want_ts)) in out.iter().zip(expected) {
        assert_eq!(id.as_slice(), want_id);
        assert_eq!(ts.as_slice(), want_ts);
        assert_eq!(got.len(), payload.len(), "field count of {}", String::from_utf8_lossy(id));
        for (i, (g, w)) in got.iter().zip(&payload).enumerate() {
            assert!(g == w, "{}: payload field #{i} differs (name {:?})", String::from_utf8_lossy(id), w.0);
        }
    }
}

/// An upgrade in place: bodies written before `ts` moved into them (payload
/// pairs only, as an older daemon left them) are released with the right
/// `ts` and payload, interleaved in (ts, id) order with elements scheduled
/// now and elements without a payload, in chunks that mix all three.
#[test]
fn bodies_from_before_ts_moved_into_them_are_still_released() {
    let redis = RedisServer::start();
    let mut conn = redis.sync_conn();
    let k = ks();
    let old_body = |pairs: &[(&[u8], &[u8])]| tidemark::core::codec::encode(pairs.iter().flat_map(|(f, v)| [*f, *v]));
    let bin: &[u8] = &[0, 0xff, b't', b's'];
    let mut pipe = redis::pipe();
    pipe.cmd("ZADD").arg(&k.sched).arg(1).arg("o1").arg(3).arg("o3").arg(5).arg("o5").ignore();
    pipe.cmd("HSET").arg(&k.body).arg("o1").arg(old_body(&[(b"k", b"old1")])).ignore();
    pipe.cmd("HSET").arg(&k.body).arg("o3").arg(old_body(&[(b"tz", b"x"), (b"bin", bin)])).ignore();
    let () = pipe.query(&mut conn).expect("write an older daemon's schedule");

    let _d = start_daemon(&redis, &[], &[("TIDEMARK__DAEMON__RELEASE_CHUNK", "2")]);
    testkit::add(&mut conn, &k, "n2", 2, &[("k", "new2")]);
    testkit::add(&mut conn, &k, "n4", 4, NO_PAYLOAD);
    testkit::add(&mut conn, &k, "n6", 6, &[("k", "new6"), ("k", "again")]);
    testkit::add(&mut conn, &k, "n7", 7, &[("k", "new7")]);
    testkit::watermark(&mut conn, &k, 10);
    wait_out_len(&mut conn, 7);

    let mut o3 = rel("o3", 3, &[("tz", "x")]);
    o3.payload.push((b"bin".to_vec(), bin.to_vec()));
    let want = vec![
        rel("o1", 1, &[("k", "old1")]),
        rel("n2", 2, &[("k", "new2")]),
        o3,
        rel("n4", 4, &[]),
        rel("o5", 5, &[]),
        rel("n6", 6, &[("k", "new6"), ("k", "again")]),
        rel("n7", 7, &[("k", "new7")]),
    ];
    assert_eq!(released(&mut conn), want);
    assert!(!exists(&mut conn, &k.sched));
    assert!(!exists(&mut conn, &k.body));
}

#[test]
fn bounded_chunks_release_everything_once_in_order() {
    const N: usize = 5000;
    let (_redis, mut conn, _d) = with_daemon(&[], &[("TIDEMARK__DAEMON__RELEASE_CHUNK", "100")]);

    // ts is a permutation of 0..N/2 with each ts used twice, so neither the
    // insertion order nor the ts alone gives the output order.
    let mut want: Vec<(i64, String)> = (0..N).map(|i| (((i * 761) % N / 2) as i64, format!("e{i:05}"))).collect();
    let mut pipe = redis::pipe();
    for (ts, id) in &want {
        pipe.cmd("XADD")
            .arg(&ks().input)
            .arg("*")
            .arg("of")
            .arg(id)
            .arg("op")
            .arg("add")
            .arg("id")
            .arg(id)
            .arg("ts")
            .arg(ts)
            .ignore();
    }
    pipe.query::<()>(&mut conn).expect("pipeline of adds");
    testkit::watermark(&mut conn, &ks(), (N / 2) as i64);
    wait_out_len(&mut conn, N);
    wait_until("every input entry applied and acknowledged", WAIT, || input_applied(&mut conn, &ks()));

    want.sort();
    let got: Vec<(i64, String)> = released(&mut conn)
        .into_iter()
        .map(|r| {
            let id = String::from_utf8(r.id).unwrap();
            assert_eq!(r.payload, vec![(b"of".to_vec(), id.clone().into_bytes())]);
            (String::from_utf8(r.ts).unwrap().parse().unwrap(), id)
        })
        .collect();
    assert_eq!(got.len(), N, "every element exactly once");
    assert!(got == want, "released in (ts, id) order, each once");
    assert!(!exists(&mut conn, &ks().sched));
    assert!(!exists(&mut conn, &ks().body));
}

/// A watermark advance that uses up the release budget of one apply call
/// exactly (and leaves nothing due) must not make a later advance in the
/// same call skip its releases: with chunk 2, `add a@1, add b@2, wm 2,
/// add c@3, wm 3, cancel c` must release a, b, c (c is released by wm 3,
/// before the cancel). All six entries are written before the daemon starts,
/// so they are applied in one call.
#[test]
fn exhausted_release_budget_does_not_skip_a_later_advance() {
    let redis = RedisServer::start();
    let mut conn = redis.sync_conn();
    testkit::add(&mut conn, &ks(), "a", 1, NO_PAYLOAD);
    testkit::add(&mut conn, &ks(), "b", 2, NO_PAYLOAD);
    testkit::watermark(&mut conn, &ks(), 2);
    testkit::add(&mut conn, &ks(), "c", 3, NO_PAYLOAD);
    testkit::watermark(&mut conn, &ks(), 3);
    testkit::cancel(&mut conn, &ks(), "c");
    let _d = start_daemon(&redis, &[], &[("TIDEMARK__DAEMON__RELEASE_CHUNK", "2")]);
    let b = barrier(&mut conn, "barrier");
    wait_until("every input entry applied and acknowledged", WAIT, || input_applied(&mut conn, &ks()));
    assert_eq!(
        released(&mut conn),
        vec![rel("a", 1, &[]), rel("b", 2, &[]), rel("c", 3, &[]), b],
        "c was due at watermark 3, before the cancel: it must be released, not lost"
    );
    assert!(!exists(&mut conn, &ks().sched));
}

fn assert_groups_at_zero(conn: &mut redis::Connection, want: &[&str]) {
    let mut info = groups(conn, &ks().out).groups;
    info.sort_by(|a, b| a.name.cmp(&b.name));
    let names: Vec<&str> = info.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(names, want, "output groups on :out");
    for g in &info {
        assert_eq!(g.last_delivered_id, "0-0", "group {} must be created at id 0", g.name);
        assert_eq!((g.pending, g.consumers), (0, 0), "group {}", g.name);
    }
}

/// `XREADGROUP GROUP g c COUNT 100 STREAMS :out >` → (entry id, element id).
fn read_group(conn: &mut redis::Connection, group: &str) -> Vec<(String, String)> {
    let reply: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(group)
        .arg("late-consumer")
        .arg("COUNT")
        .arg(100)
        .arg("STREAMS")
        .arg(&ks().out)
        .arg(">")
        .query(conn)
        .expect("XREADGROUP out");
    reply
        .keys
        .into_iter()
        .flat_map(|k| k.ids)
        .map(|e| {
            let id: String = e.get("id").expect("out entry has an id");
            (e.id, id)
        })
        .collect()
}

fn check_groups_created_at_start(extra_args: &[&str], envs: &[(&str, &str)], want: &[&str]) {
    let redis = RedisServer::start();
    let mut conn = redis.sync_conn();
    // An entry already in :out before the groups exist: a group created at
    // `$` instead of 0 would never deliver it.
    let old = xadd_fields(&mut conn, &ks().out, &[(b"id", b"from-before"), (b"ts", b"0")]);
    let _d = start_daemon(&redis, extra_args, envs);
    assert_groups_at_zero(&mut conn, want);

    testkit::add(&mut conn, &ks(), "early", 1, &[("k", "v")]);
    testkit::watermark(&mut conn, &ks(), 1);
    wait_out_len(&mut conn, 2);
    let out = read_stream(&mut conn, &ks().out);
    let new = out[1].0.clone();
    for g in want {
        assert_eq!(
            read_group(&mut conn, g),
            vec![(old.clone(), "from-before".to_string()), (new.clone(), "early".to_string())],
            "group {g} sees everything released before any consumer connected"
        );
    }
}

#[test]
fn output_groups_from_flags_exist_at_start() {
    // --group replaces daemon.groups from the environment.
    check_groups_created_at_start(
        &["--group", "billing", "--group", "mail"],
        &[("TIDEMARK__DAEMON__GROUPS", "envonly")],
        &["billing", "mail"],
    );
}

#[test]
fn output_groups_from_env_exist_at_start() {
    check_groups_created_at_start(&[], &[("TIDEMARK__DAEMON__GROUPS", "audit,search")], &["audit", "search"]);
}

#[test]
fn output_group_exists_before_anything_is_released() {
    let (_redis, mut conn, _d) = with_daemon(&["--group", "g1", "--group", "g2"], &[]);
    assert_groups_at_zero(&mut conn, &["g1", "g2"]);
    let len: usize = redis::cmd("XLEN").arg(&ks().out).query(&mut conn).unwrap();
    assert_eq!(len, 0);
}

#[test]
fn input_written_before_the_first_daemon_is_processed() {
    let redis = RedisServer::start();
    let mut conn = redis.sync_conn();
    assert!(!exists(&mut conn, &ks().input));
    testkit::add(&mut conn, &ks(), "p1", 2, &[("n", "1")]);
    testkit::add(&mut conn, &ks(), "p2", 1, &[("n", "2")]);
    testkit::watermark(&mut conn, &ks(), 2);
    testkit::add(&mut conn, &ks(), "p3", 9, &[("n", "3")]);
    let last = testkit::add(&mut conn, &ks(), "p4", 0, &[("n", "4")]);

    let _d = start_daemon(&redis, &[], &[]);
    wait_out_len(&mut conn, 3);
    wait_until("every input entry applied and acknowledged", WAIT, || input_applied(&mut conn, &ks()));
    assert_eq!(
        released(&mut conn),
        vec![rel("p2", 1, &[("n", "2")]), rel("p1", 2, &[("n", "1")]), rel("p4", 0, &[("n", "4")])]
    );
    assert_eq!(schedule(&mut conn), vec![("p3".to_string(), 9)]);
    let input = groups(&mut conn, &ks().input);
    let g = input.groups.iter().find(|g| g.name == "tidemark").expect("input group `tidemark`");
    assert_eq!((g.pending, g.last_delivered_id.as_str()), (0, last.as_str()));
}

#[test]
fn negative_and_extreme_timestamps() {
    let (_redis, mut conn, _d) = with_daemon(&[], &[]);

    testkit::add(&mut conn, &ks(), "n1", -5, NO_PAYLOAD);
    testkit::add(&mut conn, &ks(), "min", TS_MIN, NO_PAYLOAD);
    testkit::add(&mut conn, &ks(), "max", TS_MAX, NO_PAYLOAD);
    testkit::add(&mut conn, &ks(), "zero", 0, NO_PAYLOAD);
    testkit::add(&mut conn, &ks(), "m1", -1, NO_PAYLOAD);
    testkit::add(&mut conn, &ks(), "almost-max", TS_MAX - 1, NO_PAYLOAD);
    testkit::watermark(&mut conn, &ks(), TS_MIN);
    wait_out_len(&mut conn, 1);
    assert_eq!(released(&mut conn), vec![rel("min", TS_MIN, &[])]);
    assert_eq!(wm_value(&mut conn), Some(TS_MIN.to_string()));

    testkit::watermark(&mut conn, &ks(), -3);
    wait_out_len(&mut conn, 2);
    testkit::watermark(&mut conn, &ks(), TS_MAX - 1);
    wait_out_len(&mut conn, 5);
    // Nothing more until the very last timestamp.
    testkit::add(&mut conn, &ks(), "late-neg", -1_000_000, NO_PAYLOAD);
    wait_out_len(&mut conn, 6);
    assert_eq!(
        released(&mut conn),
        vec![
            rel("min", TS_MIN, &[]),
            rel("n1", -5, &[]),
            rel("m1", -1, &[]),
            rel("zero", 0, &[]),
            rel("almost-max", TS_MAX - 1, &[]),
            rel("late-neg", -1_000_000, &[]),
        ]
    );
    assert_eq!(schedule(&mut conn), vec![("max".to_string(), TS_MAX)]);

    testkit::watermark(&mut conn, &ks(), TS_MAX);
    wait_out_len(&mut conn, 7);
    wait_until("every input entry applied and acknowledged", WAIT, || input_applied(&mut conn, &ks()));
    assert_eq!(released(&mut conn)[6], rel("max", TS_MAX, &[]));
    assert_eq!(released(&mut conn).len(), 7);
    assert_eq!(wm_value(&mut conn), Some(TS_MAX.to_string()));
    assert!(!exists(&mut conn, &ks().sched));
    assert!(dead_letters(&mut conn).is_empty());
}

/// The largest payload the configuration allows (3900 fields: Lua's stack
/// bounds the release script's XADD) is released whole, in order, both
/// scheduled and late; one field more is refused as too_large.
#[test]
fn payload_at_the_field_limit() {
    const MAX: usize = 3900;
    let (_redis, mut conn, _d) = with_daemon(&[], &[("TIDEMARK__LIMITS__MAX_PAYLOAD_FIELDS", "3900")]);
    let owned: Vec<(String, String)> = (0..MAX).map(|i| (format!("f{i}"), format!("v{}", MAX - i))).collect();
    let payload: Vec<(&str, &str)> = owned.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    testkit::add(&mut conn, &ks(), "scheduled", 5, &payload);
    testkit::watermark(&mut conn, &ks(), 5);
    testkit::add(&mut conn, &ks(), "late", 5, &payload);
    let mut one_more = payload.clone();
    one_more.push(("extra", "x"));
    let refused = testkit::add(&mut conn, &ks(), "too-many", 5, &one_more);
    wait_until("every input entry applied and acknowledged", WAIT, || input_applied(&mut conn, &ks()));
    assert!(released(&mut conn) == vec![rel("scheduled", 5, &payload), rel("late", 5, &payload)]);
    let dead = dead_letters(&mut conn);
    assert_eq!(dead.len(), 1);
    assert_eq!(testkit::field(&dead[0].1, "reason"), Some(&b"too_large"[..]));
    assert_eq!(testkit::field(&dead[0].1, "origin_id"), Some(refused.as_bytes()));
}
