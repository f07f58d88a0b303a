//! Housekeeping and input failover with real processes: retention of `:in`
//! and `:out` (randomized, with groups reading at different speeds), the
//! housekeeping lock moving on `kill -9`, removal of dead consumers, the
//! `output_max_age` warning, the `:dead` cap, and fast claiming of the
//! pending input of a daemon whose lease is gone.
//!
//! Redis runs with `stream-node-max-entries 10`, so approximate trimming
//! (whole stream nodes only) leaves at most 9 entries below the trim point:
//! "acknowledged history does get trimmed" is asserted to that precision.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use redis::{Connection, Value};

use testkit::default_keys as ks;
use testkit::{
    exists, field, parse_read, read_group, wait_until, xlen, Daemon, RedisOptions, RedisServer, StreamEntry,
};
use tidemark::store::INPUT_GROUP;

/// Deadline for anything that should happen "soon" on a loaded CI box.
const WAIT: Duration = Duration::from_secs(20);
/// Entries per stream node in the test Redis.
const NODE: usize = 10;
fn start_redis() -> RedisServer {
    RedisServer::start_with(RedisOptions {
        extra_args: vec!["--stream-node-max-entries".into(), NODE.to_string()],
        ..RedisOptions::default()
    })
}

/// A daemon with fast housekeeping (every 200 ms, lock TTL 2 s), 1 s leases
/// and a `claim_idle` (60 s) far beyond any deadline here, so whatever is
/// claimed in time was claimed through the lease.
fn spawn(url: &str, consumer: &str, groups: &[&str], extra_env: &[(&str, &str)]) -> Daemon {
    let mut args = vec!["run", "--redis-url", url, "--consumer", consumer];
    for g in groups {
        args.extend(["--group", g]);
    }
    let mut env: Vec<(&str, &str)> = vec![
        ("TIDEMARK__DAEMON__BLOCK", "200ms"),
        ("TIDEMARK__DAEMON__CLAIM_IDLE", "60s"),
        ("TIDEMARK__LEASE__TTL", "1s"),
        ("TIDEMARK__HOUSEKEEPING__INTERVAL", "200ms"),
        ("TIDEMARK__HOUSEKEEPING__LOCK_TTL", "2s"),
    ];
    env.extend_from_slice(extra_env);
    let d = Daemon::spawn(&args, &env);
    d.wait_log("connected to Redis", WAIT);
    d
}

fn set_lease(conn: &mut Connection, key: &str) {
    redis::cmd("SET").arg(key).arg("1").arg("PX").arg(60_000).query::<()>(conn).expect("SET lease");
}

fn text(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        other => panic!("expected a string, got {other:?}"),
    }
}

/// Pending entries per consumer (`XPENDING` summary).
fn pending_by_consumer(conn: &mut Connection, stream: &str, group: &str) -> BTreeMap<String, u64> {
    let v: Value = redis::cmd("XPENDING").arg(stream).arg(group).query(conn).expect("XPENDING summary");
    let Value::Array(parts) = v else { panic!("XPENDING summary: {v:?}") };
    match parts.get(3) {
        Some(Value::Array(consumers)) => consumers
            .iter()
            .map(|c| match c {
                Value::Array(pair) if pair.len() == 2 => (text(&pair[0]), text(&pair[1]).parse().expect("count")),
                other => panic!("XPENDING consumer: {other:?}"),
            })
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// Consumer names of `group` (`XINFO CONSUMERS`).
fn consumers(conn: &mut Connection, stream: &str, group: &str) -> BTreeSet<String> {
    let v: Value = redis::cmd("XINFO").arg("CONSUMERS").arg(stream).arg(group).query(conn).expect("XINFO CONSUMERS");
    let Value::Array(items) = v else { panic!("XINFO CONSUMERS: {v:?}") };
    items
        .iter()
        .map(|item| {
            let pairs: Vec<(&Value, &Value)> = match item {
                Value::Array(flat) => flat.chunks(2).map(|c| (&c[0], &c[1])).collect(),
                Value::Map(m) => m.iter().map(|(k, v)| (k, v)).collect(),
                other => panic!("XINFO CONSUMERS item: {other:?}"),
            };
            pairs.iter().find(|(k, _)| text(k) == "name").map(|(_, v)| text(v)).expect("consumer name")
        })
        .collect()
}

fn ack(conn: &mut Connection, stream: &str, group: &str, ids: &[String]) {
    if ids.is_empty() {
        return;
    }
    let n: usize = redis::cmd("XACK").arg(stream).arg(group).arg(ids).query(conn).expect("XACK");
    assert_eq!(n, ids.len(), "XACK {group}: every id was pending");
}

/// XADDs `op add id <id> ts <ts> n <id>` for each element and a watermark
/// at the largest ts, in one pipeline.
fn add_and_release(conn: &mut Connection, elems: &[(String, i64)]) {
    let mut pipe = redis::pipe();
    for (id, ts) in elems {
        pipe.cmd("XADD")
            .arg(&ks().input)
            .arg("*")
            .arg("op")
            .arg("add")
            .arg("id")
            .arg(id)
            .arg("ts")
            .arg(*ts)
            .arg("n")
            .arg(id);
    }
    let top = elems.iter().map(|(_, ts)| *ts).max().expect("elements");
    pipe.cmd("XADD").arg(&ks().input).arg("*").arg("op").arg("watermark").arg("ts").arg(top);
    pipe.query::<()>(conn).expect("XADD pipeline");
}

fn elem_id(entry: &StreamEntry) -> String {
    String::from_utf8(field(&entry.1, "id").unwrap_or_else(|| panic!("entry {} has no id", entry.0)).to_vec())
        .expect("utf-8 element id")
}

/// Stream ids as numbers, for ordering.
fn sid(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').expect("stream id");
    (ms.parse().expect("ms"), seq.parse().expect("seq"))
}

/// Waits until the last entry of `:out` is element `last`; returns the
/// entries after `after` (exclusive, `None` = all).
fn wait_released(conn: &mut Connection, last: &str, after: Option<&str>) -> Vec<StreamEntry> {
    wait_until(&format!("element {last} released"), WAIT, || {
        let v: Value = redis::cmd("XREVRANGE")
            .arg(&ks().out)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query(conn)
            .expect("XREVRANGE");
        testkit::parse_xrange(v).first().is_some_and(|e| elem_id(e) == last)
    });
    let start = after.map_or_else(|| "-".to_string(), |a| format!("({a}"));
    let v: Value = redis::cmd("XRANGE").arg(&ks().out).arg(start).arg("+").query(conn).expect("XRANGE");
    testkit::parse_xrange(v)
}

fn passes(d: &Daemon) -> usize {
    d.log().matches("housekeeping pass").count()
}

/// Waits for `n` more housekeeping passes of `d`.
fn wait_passes(d: &Daemon, n: usize) {
    let start = passes(d);
    wait_until(&format!("{n} housekeeping passes"), WAIT, || passes(d) >= start + n);
}

fn is_leader(d: &Daemon) -> bool {
    d.log().contains("became the housekeeping leader")
}

// ---------------------------------------------------------------------------
// Retention
// ---------------------------------------------------------------------------

/// One output group as the test drives it, and what it has done.
struct Reader {
    name: &'static str,
    /// How many released entries it has read (always a prefix: `>` reads in order).
    read: usize,
    /// Entries it acknowledged.
    acked: HashSet<String>,
    /// Destroyed (no longer constrains trimming).
    gone: bool,
}

impl Reader {
    /// Index of the first released entry it still needs, if any.
    fn first_needed(&self, released: &[(String, String)]) -> Option<usize> {
        if self.gone {
            return None;
        }
        let pending = released[..self.read].iter().position(|(sid, _)| !self.acked.contains(sid));
        pending.or((self.read < released.len()).then_some(self.read))
    }

    fn needs(&self, i: usize, released: &[(String, String)]) -> bool {
        !self.gone && (i >= self.read || !self.acked.contains(&released[i].0))
    }
}

/// Reads `count` entries as `reader` and checks they are exactly the next
/// unread ones (an unread entry trimmed away would be skipped by `>`).
fn read_next(conn: &mut Connection, reader: &mut Reader, released: &[(String, String)], count: usize) -> Vec<String> {
    if count == 0 {
        return Vec::new();
    }
    let got = read_group(conn, &ks().out, reader.name, "c", count.max(1));
    let want = &released[reader.read..(reader.read + count).min(released.len())];
    let got_pairs: Vec<(String, String)> = got.iter().map(|e| (e.0.clone(), elem_id(e))).collect();
    assert_eq!(got_pairs, want, "group {} read something other than its next unread entries", reader.name);
    reader.read += got.len();
    got_pairs.into_iter().map(|(sid, _)| sid).collect()
}

/// Several groups read `:out` at different speeds over random rounds (one
/// acknowledges everything, one a prefix of what it read, one reads without
/// acknowledging and later acknowledges with holes, one never reads until it
/// is destroyed): after each round, every entry some group has not
/// acknowledged (pending or unread) is still in `:out` with its content, and
/// the history below the oldest needed entry gets trimmed (to stream-node
/// precision); acknowledged input is trimmed from `:in` too.
#[test]
fn retention_keeps_what_any_group_needs_and_trims_the_rest() {
    let seed: u64 =
        std::env::var("TIDEMARK_RETENTION_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("retention: seed {seed} (rerun with TIDEMARK_RETENTION_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let redis = start_redis();
    let d = spawn(&redis.url(), "d1", &["fast", "slow", "reader", "never"], &[]);
    d.wait_log("became the housekeeping leader", WAIT);
    let mut conn = redis.sync_conn();

    let reader = |name| Reader { name, read: 0, acked: HashSet::new(), gone: false };
    let mut groups = [reader("fast"), reader("slow"), reader("reader"), reader("never")];
    // Every released entry: (stream id, element id), in stream order.
    let mut released: Vec<(String, String)> = Vec::new();
    let mut ts = 0i64;
    let rounds = 8;
    for round in 0..rounds {
        if round == 2 {
            // The group that never read held everything so far; once it is
            // gone, the others decide.
            let _: i64 =
                redis::cmd("XGROUP").arg("DESTROY").arg(&ks().out).arg("never").query(&mut conn).expect("DESTROY");
            groups[3].gone = true;
        }
        let n = rng.random_range(5..60usize);
        let elems: Vec<(String, i64)> = (0..n)
            .map(|i| {
                ts += 1;
                (format!("r{round}-{i:02}"), ts)
            })
            .collect();
        add_and_release(&mut conn, &elems);
        let fresh = wait_released(&mut conn, &elems[n - 1].0, released.last().map(|(s, _)| s.as_str()));
        let fresh_ids: Vec<String> = fresh.iter().map(elem_id).collect();
        let want: Vec<String> = elems.iter().map(|(id, _)| id.clone()).collect();
        assert_eq!(fresh_ids, want, "round {round}: released entries");
        released.extend(fresh.iter().map(|e| (e.0.clone(), elem_id(e))));

        // fast: reads and acknowledges everything.
        let unread = released.len() - groups[0].read;
        let ids = read_next(&mut conn, &mut groups[0], &released, unread);
        ack(&mut conn, &ks().out, "fast", &ids);
        groups[0].acked.extend(ids);
        // slow: reads some, acknowledges a prefix of what it has pending.
        let unread = released.len() - groups[1].read;
        let k = rng.random_range(0..=unread);
        read_next(&mut conn, &mut groups[1], &released, k);
        let pending: Vec<String> = released[..groups[1].read]
            .iter()
            .map(|(s, _)| s.clone())
            .filter(|s| !groups[1].acked.contains(s))
            .collect();
        let j = rng.random_range(0..=pending.len());
        ack(&mut conn, &ks().out, "slow", &pending[..j]);
        groups[1].acked.extend(pending[..j].iter().cloned());
        // reader: reads some without acknowledging; from round 4 on it
        // acknowledges a random subset (leaving holes) of what it holds.
        let unread = released.len() - groups[2].read;
        let k = rng.random_range(0..=unread);
        read_next(&mut conn, &mut groups[2], &released, k);
        if round >= 4 {
            let pending: Vec<String> = released[..groups[2].read]
                .iter()
                .map(|(s, _)| s.clone())
                .filter(|s| !groups[2].acked.contains(s) && rng.random_bool(0.7))
                .collect();
            ack(&mut conn, &ks().out, "reader", &pending);
            groups[2].acked.extend(pending);
        }

        let oldest_needed = groups.iter().filter_map(|g| g.first_needed(&released)).min();
        let below = oldest_needed.unwrap_or(released.len());
        let status: Vec<String> =
            groups.iter().map(|g| format!("{} read {} acked {}", g.name, g.read, g.acked.len())).collect();
        eprintln!("round {round}: {} released, oldest needed #{below}; {}", released.len(), status.join(", "));

        // Acknowledged history gets trimmed (to node precision) ...
        let floor = released.get(below).map(|(s, _)| sid(s));
        wait_until(&format!("round {round}: :out trimmed below entry #{below}"), WAIT, || {
            let out = testkit::read_stream(&mut conn, &ks().out);
            out.iter().filter(|e| floor.is_none_or(|f| sid(&e.0) < f)).count() < NODE
        });
        // ... and acknowledged input too (the daemon applied all of it).
        wait_until(&format!("round {round}: :in trimmed"), WAIT, || xlen(&mut conn, &ks().input) == 0);
        // A few more passes, then: nothing any group needs is gone.
        wait_passes(&d, 3);
        let out: BTreeMap<String, String> =
            testkit::read_stream(&mut conn, &ks().out).iter().map(|e| (e.0.clone(), elem_id(e))).collect();
        for (i, (s, element)) in released.iter().enumerate() {
            let needed_by: Vec<&str> = groups.iter().filter(|g| g.needs(i, &released)).map(|g| g.name).collect();
            if !needed_by.is_empty() {
                assert_eq!(
                    out.get(s),
                    Some(element),
                    "round {round}: entry #{i} ({s}) needed by {needed_by:?} is gone"
                );
            }
        }
        eprintln!("round {round}: :out keeps {} of {} entries", out.len(), released.len());
    }

    // Everyone catches up: the whole output goes.
    for g in &mut groups[..3] {
        let unread = released.len() - g.read;
        read_next(&mut conn, g, &released, unread);
        let pending: Vec<String> = released.iter().map(|(s, _)| s.clone()).filter(|s| !g.acked.contains(s)).collect();
        ack(&mut conn, &ks().out, g.name, &pending);
    }
    wait_until(":out empty once every group acknowledged everything", WAIT, || xlen(&mut conn, &ks().out) == 0);
}

/// Input entries held by another consumer (leased, so alive) and the ones
/// waiting behind them are never trimmed; once that consumer's lease is
/// gone, the daemon claims its entries at once, not after `claim_idle`.
#[test]
fn pending_input_is_kept_and_claimed_fast_once_its_lease_is_gone() {
    let redis = start_redis();
    let d = spawn(&redis.url(), "d1", &[], &[]);
    d.wait_log("became the housekeeping leader", WAIT);
    let mut conn = redis.sync_conn();

    // Applied history is trimmed from :in.
    let history: Vec<(String, i64)> = (1..=30).map(|i| (format!("h{i:02}"), i)).collect();
    add_and_release(&mut conn, &history);
    wait_released(&mut conn, "h30", None);
    wait_until("applied input trimmed", WAIT, || xlen(&mut conn, &ks().input) == 0);

    // A live "ghost" consumer (its lease exists) takes the next two entries
    // in the same transaction that adds them, before the daemon can.
    let ghost_lease = ks().lease("in", INPUT_GROUP, "ghost");
    set_lease(&mut conn, &ghost_lease);
    let (_, _, read): (String, String, Value) = redis::pipe()
        .atomic()
        .cmd("XADD")
        .arg(&ks().input)
        .arg("*")
        .arg("op")
        .arg("add")
        .arg("id")
        .arg("g1")
        .arg("ts")
        .arg(100)
        .arg("n")
        .arg("g1")
        .cmd("XADD")
        .arg(&ks().input)
        .arg("*")
        .arg("op")
        .arg("add")
        .arg("id")
        .arg("g2")
        .arg("ts")
        .arg(101)
        .arg("n")
        .arg("g2")
        .cmd("XREADGROUP")
        .arg("GROUP")
        .arg(INPUT_GROUP)
        .arg("ghost")
        .arg("COUNT")
        .arg(2)
        .arg("STREAMS")
        .arg(&ks().input)
        .arg(">")
        .query(&mut conn)
        .expect("MULTI XADD + XREADGROUP");
    assert_eq!(parse_read(read).len(), 2, "the ghost holds g1 and g2");
    // The daemon reads the rest but must wait for g1 and g2 (input order).
    let rest: Vec<(String, i64)> = (1..=25).map(|i| (format!("e{i:02}"), 101 + i)).collect();
    add_and_release(&mut conn, &rest);
    wait_until("d1 holds the 26 entries behind the ghost's", WAIT, || {
        pending_by_consumer(&mut conn, &ks().input, INPUT_GROUP).get("d1") == Some(&26)
    });
    let held = testkit::read_stream(&mut conn, &ks().input);
    assert_eq!(held.len(), 28);

    // Housekeeping runs and leaves every one of them alone.
    wait_passes(&d, 5);
    assert_eq!(testkit::read_stream(&mut conn, &ks().input), held, "pending input was trimmed");
    assert_eq!(xlen(&mut conn, &ks().out), 30, "nothing behind the ghost's entries may be released yet");

    // The ghost dies (its lease is gone): claimed within about a lease
    // lifetime, although claim_idle is 60 s.
    let t0 = Instant::now();
    let _: () = redis::cmd("DEL").arg(&ghost_lease).query(&mut conn).expect("DEL lease");
    let h30 = history_last(&mut conn);
    let fresh = wait_released(&mut conn, "e25", Some(&h30));
    eprintln!("fast input failover (lease deleted → all applied): {:?}", t0.elapsed());
    let got: Vec<String> = fresh.iter().map(elem_id).collect();
    let mut want = vec!["g1".to_string(), "g2".to_string()];
    want.extend(rest.iter().map(|(id, _)| id.clone()));
    assert_eq!(got, want, "released in input order, once each");
    assert_eq!(xlen(&mut conn, &ks().out), 57);
    assert!(d.log().contains("claimed the input entries of a daemon whose lease expired"), "{}", d.log());
    wait_until("all input trimmed", WAIT, || xlen(&mut conn, &ks().input) == 0);
    // Without output groups :out is never trimmed: nobody has read it.
    assert_eq!(xlen(&mut conn, &ks().out), 57);
}

/// The stream id of the 30th (last history) output entry.
fn history_last(conn: &mut Connection) -> String {
    let out = testkit::read_stream(conn, &ks().out);
    out.iter().find(|e| elem_id(e) == "h30").map(|e| e.0.clone()).expect("h30 in :out")
}

/// A daemon killed with `kill -9` while holding pending input: a live
/// daemon claims those entries within about a lease lifetime (1 s here),
/// not after `claim_idle` (60 s), and everything is applied once, in order.
#[test]
fn kill9_daemon_holding_input_is_taken_over_within_a_lease() {
    let redis = start_redis();
    let mut d1 = spawn(&redis.url(), "d1", &[], &[]);
    let mut conn = redis.sync_conn();

    // d1 takes 21 entries that must wait behind an entry a leased "ghost" holds.
    let ghost_lease = ks().lease("in", INPUT_GROUP, "ghost");
    set_lease(&mut conn, &ghost_lease);
    let (_, read): (String, Value) = redis::pipe()
        .atomic()
        .cmd("XADD")
        .arg(&ks().input)
        .arg("*")
        .arg("op")
        .arg("add")
        .arg("id")
        .arg("g1")
        .arg("ts")
        .arg(1)
        .arg("n")
        .arg("g1")
        .cmd("XREADGROUP")
        .arg("GROUP")
        .arg(INPUT_GROUP)
        .arg("ghost")
        .arg("COUNT")
        .arg(1)
        .arg("STREAMS")
        .arg(&ks().input)
        .arg(">")
        .query(&mut conn)
        .expect("MULTI XADD + XREADGROUP");
    assert_eq!(parse_read(read).len(), 1);
    let rest: Vec<(String, i64)> = (1..=20).map(|i| (format!("e{i:02}"), 1 + i)).collect();
    add_and_release(&mut conn, &rest);
    wait_until("d1 holds 21 pending input entries", WAIT, || {
        pending_by_consumer(&mut conn, &ks().input, INPUT_GROUP).get("d1") == Some(&21)
    });
    let d2 = spawn(&redis.url(), "d2", &[], &[]);
    wait_until("d2 holds its lease", WAIT, || exists(&mut conn, &ks().lease("in", INPUT_GROUP, "d2")));

    let t0 = Instant::now();
    d1.kill9();
    wait_until("d2 claimed d1's 21 entries", WAIT, || {
        let p = pending_by_consumer(&mut conn, &ks().input, INPUT_GROUP);
        p.get("d2") == Some(&21) && !p.contains_key("d1")
    });
    eprintln!("input failover after kill -9 (kill → d2 holds d1's entries): {:?}", t0.elapsed());
    assert_eq!(xlen(&mut conn, &ks().out), 0, "still waiting for the ghost's entry");

    let t1 = Instant::now();
    let _: () = redis::cmd("DEL").arg(&ghost_lease).query(&mut conn).expect("DEL lease");
    let out = wait_released(&mut conn, "e20", None);
    eprintln!("input failover (ghost lease deleted → all applied): {:?}", t1.elapsed());
    let got: Vec<String> = out.iter().map(elem_id).collect();
    let mut want = vec!["g1".to_string()];
    want.extend(rest.iter().map(|(id, _)| id.clone()));
    assert_eq!(got, want, "every element once, in input order");
    assert!(d2.log().contains("claimed the input entries of a daemon whose lease expired"), "{}", d2.log());
}

// ---------------------------------------------------------------------------
// The lock
// ---------------------------------------------------------------------------

/// One leader at a time; `kill -9` of the leader hands the lock to the
/// other daemon within about the lock TTL, and trimming continues; SIGTERM
/// releases the lock at once.
#[test]
fn housekeeping_lock_moves_to_another_daemon_when_its_holder_is_killed() {
    let redis = start_redis();
    let url = redis.url();
    let mut conn = redis.sync_conn();
    let a = spawn(&url, "a", &["g1"], &[]);
    let b = spawn(&url, "b", &["g1"], &[]);
    wait_until("a housekeeping leader", WAIT, || is_leader(&a) || is_leader(&b));
    let (mut holder, mut other) = if is_leader(&a) { (a, b) } else { (b, a) };
    assert!(!is_leader(&other), "both daemons became leader:\n{}\n{}", holder.log(), other.log());
    let pttl: i64 = redis::cmd("PTTL").arg(ks().lock("housekeeping")).query(&mut conn).expect("PTTL");
    assert!(pttl > 0 && pttl <= 2000, "the housekeeping lock with PTTL {pttl}");
    // The leader extends the lock well past its TTL.
    wait_passes(&holder, 15);
    assert!(!is_leader(&other), "the lock moved while its holder was alive:\n{}", other.log());
    // A standby finding the lock held is no Redis trouble (its check once
    // read rslock's binary value as text and logged a failure every time).
    assert!(!other.log().contains("housekeeping: Redis unavailable"), "the standby:\n{}", other.log());

    let t0 = Instant::now();
    holder.kill9();
    wait_until("the other daemon becomes leader", WAIT, || is_leader(&other));
    eprintln!("housekeeping lock takeover after kill -9 (lock_ttl 2s): {:?}", t0.elapsed());

    // Trimming continues under the new leader.
    let elems: Vec<(String, i64)> = (1..=40).map(|i| (format!("x{i:02}"), i)).collect();
    add_and_release(&mut conn, &elems);
    wait_released(&mut conn, "x40", None);
    let read = read_group(&mut conn, &ks().out, "g1", "c", 100);
    assert_eq!(read.len(), 40);
    ack(&mut conn, &ks().out, "g1", &read.iter().map(|e| e.0.clone()).collect::<Vec<_>>());
    wait_until(":out and :in trimmed by the new leader", WAIT, || {
        xlen(&mut conn, &ks().out) == 0 && xlen(&mut conn, &ks().input) == 0
    });

    // A clean shutdown hands the lock back at once.
    other.sigterm();
    let status = other.wait_exit(WAIT).expect("daemon exits on SIGTERM");
    assert!(status.success(), "{status}:\n{}", other.log());
    assert!(!exists(&mut conn, &ks().lock("housekeeping")), "the lock must be released on shutdown, not left to lapse");
    assert!(other.log().contains("released the housekeeping lock"), "{}", other.log());
}

// ---------------------------------------------------------------------------
// Dead consumers, max age, dead-letter cap
// ---------------------------------------------------------------------------

/// Consumers with no lease and nothing pending are removed from the input
/// group and from output groups after the grace period; leased ones, and
/// ones with pending entries, stay.
#[test]
fn dead_consumers_are_removed_from_input_and_output_groups() {
    let redis = start_redis();
    let mut conn = redis.sync_conn();
    let d = spawn(&redis.url(), "d1", &["g1"], &[("TIDEMARK__LEASE__DEAD_CONSUMER_GRACE", "1s")]);
    let elems: Vec<(String, i64)> = (1..=3).map(|i| (format!("x{i}"), i)).collect();
    add_and_release(&mut conn, &elems);
    wait_released(&mut conn, "x3", None);

    let create = |conn: &mut Connection, stream: &str, group: &str, name: &str| {
        let n: i64 = redis::cmd("XGROUP")
            .arg("CREATECONSUMER")
            .arg(stream)
            .arg(group)
            .arg(name)
            .query(conn)
            .expect("CREATECONSUMER");
        assert_eq!(n, 1, "created {name}");
    };
    create(&mut conn, &ks().input, INPUT_GROUP, "in-dead");
    create(&mut conn, &ks().input, INPUT_GROUP, "in-alive");
    set_lease(&mut conn, &ks().lease("in", INPUT_GROUP, "in-alive"));
    create(&mut conn, &ks().out, "g1", "out-dead");
    create(&mut conn, &ks().out, "g1", "out-alive");
    set_lease(&mut conn, &ks().lease("out", "g1", "out-alive"));
    assert_eq!(read_group(&mut conn, &ks().out, "g1", "out-busy", 2).len(), 2, "out-busy holds 2 entries");

    let t0 = Instant::now();
    wait_until("in-dead and out-dead removed", WAIT, || {
        !consumers(&mut conn, &ks().input, INPUT_GROUP).contains("in-dead")
            && !consumers(&mut conn, &ks().out, "g1").contains("out-dead")
    });
    eprintln!("dead consumers removed after {:?} (grace 1s)", t0.elapsed());
    wait_passes(&d, 3);
    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(consumers(&mut conn, &ks().input, INPUT_GROUP), names(&["d1", "in-alive"]));
    assert_eq!(consumers(&mut conn, &ks().out, "g1"), names(&["out-alive", "out-busy"]));
    assert_eq!(pending_by_consumer(&mut conn, &ks().out, "g1").get("out-busy"), Some(&2));
    let log = d.log();
    assert!(log.contains("removed dead consumers") && log.contains("in-dead") && log.contains("out-dead"), "{log}");
}

/// `output_max_age` trims past a group that fell behind, with a warning
/// naming that group (and not the group that kept up).
#[test]
fn output_max_age_trims_past_a_lagging_group_and_names_it() {
    let redis = start_redis();
    let mut conn = redis.sync_conn();
    let d = spawn(&redis.url(), "d1", &["keeps-up", "lagging"], &[("TIDEMARK__HOUSEKEEPING__OUTPUT_MAX_AGE", "1s")]);
    let elems: Vec<(String, i64)> = (1..=30).map(|i| (format!("x{i:02}"), i)).collect();
    add_and_release(&mut conn, &elems);
    wait_released(&mut conn, "x30", None);
    let all = read_group(&mut conn, &ks().out, "keeps-up", "c", 100);
    assert_eq!(all.len(), 30);
    ack(&mut conn, &ks().out, "keeps-up", &all.iter().map(|e| e.0.clone()).collect::<Vec<_>>());
    assert_eq!(read_group(&mut conn, &ks().out, "lagging", "c", 5).len(), 5, "lagging holds 5 pending, 25 unread");

    let t0 = Instant::now();
    wait_until(":out trimmed by age", WAIT, || xlen(&mut conn, &ks().out) == 0);
    eprintln!("output_max_age 1s: :out emptied {:?} after the last ack", t0.elapsed());
    // The warning follows the trim.
    wait_until("the output_max_age warning", WAIT, || d.log().contains("output_max_age trimmed entries"));
    let log = d.log();
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("output_max_age trimmed entries")).collect();
    assert!(warnings.iter().all(|l| l.contains("WARN") && l.contains("lagging")), "{warnings:#?}");
    assert!(!warnings.iter().any(|l| l.contains("keeps-up")), "the group that kept up lost nothing: {warnings:#?}");
}

/// `:dead` is capped at about `dead_maxlen`, keeping the newest letters.
#[test]
fn dead_letters_are_capped_keeping_the_newest() {
    let redis = start_redis();
    let mut conn = redis.sync_conn();
    let _d = spawn(&redis.url(), "d1", &[], &[("TIDEMARK__HOUSEKEEPING__DEAD_MAXLEN", "10")]);
    let mut pipe = redis::pipe();
    for i in 0..45 {
        pipe.cmd("XADD").arg(&ks().input).arg("*").arg("op").arg("bogus").arg("i").arg(i);
    }
    let ids: Vec<String> = pipe.query(&mut conn).expect("XADD");
    wait_until("45 inputs dead-lettered and :dead capped", WAIT, || {
        let dead = testkit::read_stream(&mut conn, &ks().dead);
        dead.last().and_then(|e| field(&e.1, "origin_id")) == Some(ids[44].as_bytes()) && dead.len() < 10 + NODE
    });
    let dead = testkit::read_stream(&mut conn, &ks().dead);
    assert!(dead.len() >= 10, "capped below dead_maxlen: {}", dead.len());
    let origins: Vec<&[u8]> = dead.iter().map(|e| field(&e.1, "origin_id").expect("origin_id")).collect();
    let newest: Vec<&[u8]> = ids[45 - dead.len()..].iter().map(|s| s.as_bytes()).collect();
    assert_eq!(origins, newest, "the newest dead letters are kept, in order");
}

/// Housekeeping survives a Redis restart: the leader reconnects, takes the
/// lock again, and trimming continues.
#[test]
fn housekeeping_survives_a_redis_restart() {
    let mut redis = RedisServer::start_with(RedisOptions {
        aof: true,
        extra_args: vec!["--stream-node-max-entries".into(), NODE.to_string()],
        ..Default::default()
    });
    let d = spawn(&redis.url(), "d1", &["g1"], &[]);
    d.wait_log("became the housekeeping leader", WAIT);
    redis.restart();
    let t0 = Instant::now();
    let mut conn = redis.sync_conn();
    let elems: Vec<(String, i64)> = (1..=40).map(|i| (format!("x{i:02}"), i)).collect();
    add_and_release(&mut conn, &elems);
    wait_released(&mut conn, "x40", None);
    let read = read_group(&mut conn, &ks().out, "g1", "c", 100);
    assert_eq!(read.len(), 40);
    ack(&mut conn, &ks().out, "g1", &read.iter().map(|e| e.0.clone()).collect::<Vec<_>>());
    wait_until(":out and :in trimmed after the restart", WAIT, || {
        xlen(&mut conn, &ks().out) == 0 && xlen(&mut conn, &ks().input) == 0
    });
    eprintln!("housekeeping trimming again {:?} after the Redis restart", t0.elapsed());
}
