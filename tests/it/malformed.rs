//! Malformed input (DESIGN.md §3): every reason code goes to `:dead` with the
//! original fields verbatim, nothing else in the same batch is lost, and the
//! daemon keeps running. Also input entries deleted while pending.

use std::time::Duration;

use testkit::default_keys as ks;
use testkit::{fields, input_applied, read_stream, wait_until, xadd_fields, Daemon, Fields, RedisServer};

const WAIT: Duration = Duration::from_secs(60);

/// Escaped text of a field list, for assertion messages.
fn show(f: &[(Vec<u8>, Vec<u8>)]) -> String {
    f.iter().map(|(k, v)| format!("{}={}", k.escape_ascii(), v.escape_ascii())).collect::<Vec<_>>().join(" ")
}

fn start_daemon(redis: &RedisServer, envs: &[(&str, &str)]) -> Daemon {
    let url = redis.url();
    let mut all = vec![("TIDEMARK__DAEMON__CLAIM_IDLE", "500ms"), ("TIDEMARK__DAEMON__BLOCK", "200ms")];
    all.extend_from_slice(envs);
    let d = Daemon::spawn(&["run", "--redis-url", &url, "--consumer", "d1"], &all);
    d.wait_log("connected to Redis", WAIT);
    d
}

fn xadd(conn: &mut redis::Connection, f: &Fields) -> String {
    let refs: Vec<(&[u8], &[u8])> = f.iter().map(|(k, v)| (k.as_slice(), v.as_slice())).collect();
    xadd_fields(conn, &ks().input, &refs)
}

fn pending_count(conn: &mut redis::Connection) -> u64 {
    let v: redis::Value = redis::cmd("XPENDING").arg(&ks().input).arg("tidemark").query(conn).expect("XPENDING");
    match v {
        redis::Value::Array(parts) => match parts.first() {
            Some(redis::Value::Int(n)) => *n as u64,
            other => panic!("XPENDING summary: {other:?}"),
        },
        other => panic!("XPENDING summary: {other:?}"),
    }
}

/// `:out` as (id, ts, payload) with the payload shown as text.
fn released(conn: &mut redis::Connection) -> Vec<(String, String, String)> {
    read_stream(conn, &ks().out)
        .into_iter()
        .map(|(eid, f)| {
            assert!(f.len() >= 2 && f[0].0 == b"id" && f[1].0 == b"ts", "out entry {eid}: {}", show(&f));
            (f[0].1.escape_ascii().to_string(), f[1].1.escape_ascii().to_string(), show(&f[2..]))
        })
        .collect()
}

fn rel(id: &str, ts: &str, payload: &str) -> (String, String, String) {
    (id.to_string(), ts.to_string(), payload.to_string())
}

/// What one input entry of the mixed batch must lead to.
enum Want {
    /// Applied normally.
    Valid,
    /// Dead-lettered with this reason code.
    Dead(&'static str),
}

#[test]
fn one_batch_with_every_reason_code() {
    use Want::{Dead, Valid};
    let redis = RedisServer::start();
    let mut conn = redis.sync_conn();
    let big40 = vec![b'x'; 40];
    let exact31 = vec![b'y'; 31];
    let long_id: &[u8] = b"123456789"; // 9 bytes, limit 8
    let cases: Vec<(Fields, Want)> = vec![
        (fields(&[(b"op", b"add"), (b"id", b"v1"), (b"ts", b"1"), (b"k", b"1")]), Valid),
        (fields(&[(b"id", b"x"), (b"ts", b"1"), (b"\0bin", b"\xff\n\r")]), Dead("missing_op")),
        (fields(&[(b"op", b"add"), (b"id", b"v2"), (b"ts", b"2")]), Valid),
        (fields(&[(b"op", b"ADD"), (b"id", b"x"), (b"ts", b"1")]), Dead("unknown_op")),
        (fields(&[(b"op", b"delete"), (b"id", b"v1")]), Dead("unknown_op")),
        (fields(&[(b"op", b"add"), (b"ts", b"1"), (b"k", b"v")]), Dead("missing_id")),
        (fields(&[(b"op", b"add"), (b"id", b""), (b"ts", b"1")]), Dead("missing_id")),
        (fields(&[(b"op", b"cancel"), (b"note", b"no id")]), Dead("missing_id")),
        (fields(&[(b"op", b"add"), (b"id", b"v3"), (b"ts", b"3")]), Valid),
        (fields(&[(b"op", b"add"), (b"id", b"x")]), Dead("missing_ts")),
        (fields(&[(b"op", b"watermark"), (b"note", b"n")]), Dead("missing_ts")),
        (fields(&[(b"op", b"add"), (b"id", b"x"), (b"ts", b"abc")]), Dead("bad_ts")),
        (fields(&[(b"op", b"add"), (b"id", b"x"), (b"ts", b"9007199254740992")]), Dead("bad_ts")),
        (fields(&[(b"op", b"add"), (b"id", b"x"), (b"ts", b"-9007199254740992")]), Dead("bad_ts")),
        (fields(&[(b"op", b"watermark"), (b"ts", b"1.5")]), Dead("bad_ts")),
        (fields(&[(b"op", b"watermark"), (b"ts", b"")]), Dead("bad_ts")),
        (fields(&[(b"op", b"watermark"), (b"ts", b"1e3")]), Dead("bad_ts")),
        (fields(&[(b"op", b"cancel"), (b"id", b"v3")]), Valid),
        (fields(&[(b"op", b"add"), (b"id", long_id), (b"ts", b"1")]), Dead("too_large")),
        (fields(&[(b"op", b"cancel"), (b"id", long_id)]), Dead("too_large")),
        (fields(&[(b"op", b"add"), (b"id", b"p"), (b"ts", b"1"), (b"k", &big40)]), Dead("too_large")),
        (
            fields(&[
                (b"op", b"add"),
                (b"id", b"f"),
                (b"ts", b"1"),
                (b"a", b"1"),
                (b"b", b"2"),
                (b"c", b"3"),
                (b"d", b"4"),
            ]),
            Dead("too_large"),
        ),
        (fields(&[(b"op", b"add"), (b"op", b"add"), (b"id", b"x"), (b"ts", b"1")]), Dead("duplicate_field")),
        (fields(&[(b"op", b"add"), (b"id", b"x"), (b"id", b"y"), (b"ts", b"1")]), Dead("duplicate_field")),
        (fields(&[(b"op", b"add"), (b"id", b"x"), (b"ts", b"1"), (b"ts", b"2")]), Dead("duplicate_field")),
        (fields(&[(b"op", b"watermark"), (b"ts", b"9"), (b"ts", b"9")]), Dead("duplicate_field")),
        (fields(&[(b"op", b"watermark"), (b"ts", b"2")]), Valid),
        // Exactly at the limits: accepted.
        (
            fields(&[(b"op", b"add"), (b"id", b"12345678"), (b"ts", b"1"), (b"a", b"1"), (b"b", b"2"), (b"c", b"3")]),
            Valid,
        ),
        (fields(&[(b"op", b"add"), (b"id", b"k32"), (b"ts", b"0"), (b"k", &exact31)]), Valid),
        (fields(&[(b"op", b"add"), (b"id", b"v5"), (b"ts", b"5")]), Valid),
        // cancel and watermark ignore extra non-reserved fields.
        (fields(&[(b"op", b"cancel"), (b"id", b"unknown"), (b"trace", b"t")]), Valid),
        (fields(&[(b"op", b"watermark"), (b"ts", b"2"), (b"source", b"s")]), Valid),
    ];

    // Everything is in :in before the daemon starts, so its first read takes
    // the whole mix as one batch.
    let ids: Vec<String> = cases.iter().map(|(f, _)| xadd(&mut conn, f)).collect();
    let mut d = start_daemon(
        &redis,
        &[
            ("TIDEMARK__LIMITS__MAX_ID_BYTES", "8"),
            ("TIDEMARK__LIMITS__MAX_PAYLOAD_BYTES", "32"),
            ("TIDEMARK__LIMITS__MAX_PAYLOAD_FIELDS", "3"),
        ],
    );
    wait_until("every input entry applied and acknowledged", WAIT, || input_applied(&mut conn, &ks()));

    // Dead letters: one per malformed entry, in input order, exactly.
    let dead = read_stream(&mut conn, &ks().dead);
    let want_dead: Vec<(&String, &Fields, &str)> = ids
        .iter()
        .zip(&cases)
        .filter_map(|(id, (f, w))| match w {
            Dead(reason) => Some((id, f, *reason)),
            Valid => None,
        })
        .collect();
    assert_eq!(
        dead.len(),
        want_dead.len(),
        "dead letters: {:#?}",
        dead.iter().map(|(_, f)| show(f)).collect::<Vec<_>>()
    );
    for ((_, got), (origin_id, original, reason)) in dead.iter().zip(&want_dead) {
        let ctx = format!("dead letter for {origin_id} ({})", show(original));
        assert!(got.len() >= 4, "{ctx}: {}", show(got));
        assert_eq!(got[0], (b"reason".to_vec(), reason.as_bytes().to_vec()), "{ctx}: {}", show(got));
        assert_eq!(got[1].0, b"detail", "{ctx}");
        assert!(!got[1].1.is_empty(), "{ctx}: empty detail");
        assert_eq!(got[2], (b"origin".to_vec(), b"in".to_vec()), "{ctx}");
        assert_eq!(got[3], (b"origin_id".to_vec(), origin_id.as_bytes().to_vec()), "{ctx}");
        assert!(&got[4..] == original.as_slice(), "{ctx}: original fields not verbatim: {}", show(&got[4..]));
    }

    // The valid entries around them were all applied.
    let xs = "y".repeat(31);
    assert_eq!(
        released(&mut conn),
        vec![
            rel("v1", "1", "k=1"),
            rel("v2", "2", ""),
            rel("12345678", "1", "a=1 b=2 c=3"),
            rel("k32", "0", &format!("k={xs}")),
        ]
    );
    let sched: Vec<(String, i64)> =
        redis::cmd("ZRANGE").arg(&ks().sched).arg(0).arg(-1).arg("WITHSCORES").query(&mut conn).unwrap();
    assert_eq!(sched, vec![("v5".to_string(), 5)], "v3 was cancelled, v5 waits");
    let wm: Option<String> = redis::cmd("GET").arg(&ks().wm).query(&mut conn).unwrap();
    assert_eq!(wm.as_deref(), Some("2"));
    assert_eq!(pending_count(&mut conn), 0);
    assert!(d.is_running(), "the daemon must survive malformed input");

    // And it keeps working.
    xadd(&mut conn, &fields(&[(b"op", b"watermark"), (b"ts", b"5")]));
    wait_until("v5 released", WAIT, || released(&mut conn).len() == 5);
    assert_eq!(released(&mut conn)[4], rel("v5", "5", ""));
    assert_eq!(read_stream(&mut conn, &ks().dead).len(), want_dead.len());
    assert!(d.is_running());
}

fn create_input_group(conn: &mut redis::Connection) {
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&ks().input)
        .arg("tidemark")
        .arg("0")
        .arg("MKSTREAM")
        .query(conn)
        .expect("XGROUP CREATE");
}

/// Reads new input as `consumer` (so it is pending there) and returns the ids.
fn read_as(conn: &mut redis::Connection, consumer: &str) -> Vec<String> {
    let reply: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("tidemark")
        .arg(consumer)
        .arg("COUNT")
        .arg(100)
        .arg("STREAMS")
        .arg(&ks().input)
        .arg(">")
        .query(conn)
        .expect("XREADGROUP in");
    reply.keys.into_iter().flat_map(|k| k.ids).map(|e| e.id).collect()
}

/// Sets up: an `add gone@1` read by `consumer` and then deleted from `:in`,
/// followed by `add after@1` and `watermark 1` that nobody has read yet.
/// Returns the deleted entry's id.
fn deleted_while_pending(conn: &mut redis::Connection, consumer: &str) -> String {
    create_input_group(conn);
    let gone = xadd(conn, &fields(&[(b"op", b"add"), (b"id", b"gone"), (b"ts", b"1"), (b"k", b"v")]));
    assert_eq!(read_as(conn, consumer), vec![gone.clone()]);
    let deleted: i64 = redis::cmd("XDEL").arg(&ks().input).arg(&gone).query(conn).unwrap();
    assert_eq!(deleted, 1);
    assert_eq!(pending_count(conn), 1, "the deleted entry is still pending at {consumer}");
    xadd(conn, &fields(&[(b"op", b"add"), (b"id", b"after"), (b"ts", b"1")]));
    xadd(conn, &fields(&[(b"op", b"watermark"), (b"ts", b"1")]));
    gone
}

fn check_deleted_entry_was_only_acknowledged(conn: &mut redis::Connection, d: &mut Daemon) {
    wait_until("`after` released", WAIT, || !released(conn).is_empty());
    wait_until("nothing pending in the input group", WAIT, || pending_count(conn) == 0);
    wait_until("every input entry applied and acknowledged", WAIT, || input_applied(conn, &ks()));
    assert_eq!(released(conn), vec![rel("after", "1", "")], "the deleted entry is never released");
    assert!(read_stream(conn, &ks().dead).is_empty(), "a deleted entry is not a dead letter");
    let sched: i64 = redis::cmd("ZCARD").arg(&ks().sched).query(conn).unwrap();
    assert_eq!(sched, 0);
    assert!(d.is_running(), "the daemon must survive a deleted pending entry");
}

/// An entry read by another consumer ("ghost") and deleted before it was
/// applied: the daemon claims it after claim_idle, and it must end up
/// acknowledged without an output entry or a dead letter.
#[test]
fn entry_deleted_while_pending_at_a_dead_consumer() {
    let redis = RedisServer::start();
    let mut conn = redis.sync_conn();
    deleted_while_pending(&mut conn, "ghost");
    let mut d = start_daemon(&redis, &[("TIDEMARK__DAEMON__CLAIM_IDLE", "300ms")]);
    check_deleted_entry_was_only_acknowledged(&mut conn, &mut d);
}

/// The same entry pending at the daemon's own consumer name (a restart after
/// the entry was read and deleted): resumed from its own pending list.
#[test]
fn entry_deleted_while_pending_at_our_own_name() {
    let redis = RedisServer::start();
    let mut conn = redis.sync_conn();
    deleted_while_pending(&mut conn, "d1");
    // A long claim_idle: only resuming our own pending list can clear it.
    let mut d = start_daemon(&redis, &[("TIDEMARK__DAEMON__CLAIM_IDLE", "10min")]);
    check_deleted_entry_was_only_acknowledged(&mut conn, &mut d);
}
