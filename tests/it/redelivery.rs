//! Guarantee 3, exactly once under redelivery: input read by a daemon that
//! died is applied once by another; a batch applied whose reply was lost is
//! not applied twice; a restart under the same name resumes its own pending
//! input at once.

use std::time::{Duration, Instant};

use tidemark::store::Conn;
use tidemark::store::{ApplyOutcome, Keys, Prepared, Scripts, INPUT_GROUP};

use crate::model::{
    assert_output_matches, claim_lines, daemon_args, get_wm, input_drained, input_group, last_entry_id, poll_until,
    schedule, spawn_daemon, Model, Payload,
};
use crate::order::{read_as, setup};
use testkit::{hlen_async as hlen, xlen_async as xlen};
use testkit::{Daemon, RedisServer};

async fn apply(conn: &mut Conn, keys: &Keys, batch: &[Prepared]) -> ApplyOutcome {
    let refs: Vec<&Prepared> = batch.iter().collect();
    Scripts::new().apply(conn, keys, &refs, 1000).await.expect("apply.lua")
}

fn add_op(id: &[u8], ts: i64, payload: &[(&[u8], &[u8])]) -> Payload {
    let mut op = vec![(b"op".to_vec(), b"add".to_vec()), (b"id".to_vec(), id.to_vec())];
    op.push((b"ts".to_vec(), ts.to_string().into_bytes()));
    op.extend(payload.iter().map(|(k, v)| (k.to_vec(), v.to_vec())));
    op
}

fn wm_op(ts: i64) -> Payload {
    vec![(b"op".to_vec(), b"watermark".to_vec()), (b"ts".to_vec(), ts.to_string().into_bytes())]
}

/// Element `i` of the bulk tests: ts values collide (ties broken by id bytes)
/// and come in a different order than the ids.
fn bulk_add(i: usize) -> Payload {
    let ts = ((i * 7919) % 10007) as i64 - 3000;
    let n = i.to_string();
    let bin = [(i % 251) as u8, 0, 0xff, b'\n'];
    add_op(format!("el-{i:05}").as_bytes(), ts, &[(b"n", n.as_bytes()), (b"bin", &bin)])
}

/// XADDs `ops` in pipelines of 1000; returns the entry ids.
async fn xadd_all(conn: &mut Conn, input: &str, ops: &[Payload]) -> Vec<String> {
    let mut ids = Vec::with_capacity(ops.len());
    for chunk in ops.chunks(1000) {
        let mut pipe = redis::pipe();
        for op in chunk {
            let cmd = pipe.cmd("XADD").arg(input).arg("*");
            for (k, v) in op {
                cmd.arg(k.as_slice()).arg(v.as_slice());
            }
        }
        let chunk_ids: Vec<String> = pipe.query_async(conn).await.expect("XADD pipeline");
        ids.extend(chunk_ids);
    }
    ids
}

/// How many input entries `consumer` holds pending.
async fn pending_of(conn: &mut Conn, input: &str, consumer: &str) -> usize {
    let v: Vec<redis::Value> = redis::cmd("XPENDING")
        .arg(input)
        .arg(INPUT_GROUP)
        .arg("-")
        .arg("+")
        .arg(100_000)
        .arg(consumer)
        .query_async(conn)
        .await
        .expect("XPENDING");
    v.len()
}

/// Waits until the input group is drained and `:out` holds `out_len`
/// entries; on timeout, panics with who holds what.
async fn wait_drained(conn: &Conn, keys: &Keys, out_len: usize, timeout: Duration, what: &str) {
    let done = poll_until(timeout, || {
        let mut c = conn.clone();
        let (input, out) = (keys.input.clone(), keys.out.clone());
        async move { input_drained(&mut c, &input).await && xlen(&mut c, &out).await >= out_len }
    })
    .await;
    if !done {
        let mut c = conn.clone();
        let summary: redis::Value =
            redis::cmd("XPENDING").arg(&keys.input).arg(INPUT_GROUP).query_async(&mut c).await.expect("XPENDING");
        let (pending, delivered) = input_group(&mut c, &keys.input).await;
        panic!(
            "timed out after {timeout:?} waiting for: {what}\n  input: last entry {}, last delivered {delivered}, \
             pending {pending}; XPENDING summary {summary:?}\n  scheduled {}, out {} (want {out_len})",
            last_entry_id(&mut c, &keys.input).await,
            schedule(&mut c, &keys.sched).await.len(),
            xlen(&mut c, &keys.out).await,
        );
    }
}

/// Checks the output stream against the model of the whole input stream,
/// plus that no element id appears twice.
async fn assert_released_exactly_once(conn: &mut Conn, keys: &Keys, context: &str) -> Model {
    let input = testkit::read_stream_async(conn, &keys.input).await;
    let model = Model::run(&input);
    let out = testkit::read_stream_async(conn, &keys.out).await;
    assert_output_matches(context, &out, &model);
    let mut ids: Vec<&[u8]> = out.iter().map(|(_, f)| testkit::field(f, "id").expect("id field")).collect();
    ids.sort();
    let n = ids.len();
    ids.dedup();
    assert_eq!(ids.len(), n, "{context}: an element was released twice");
    model
}

/// A batch read by a consumer that dies before applying it is claimed by
/// another daemon after claim_idle and released exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_of_a_dead_consumer_is_claimed_and_released_once() {
    let redis = RedisServer::start();
    let (mut conn, keys) = setup(&redis).await;
    let mut ops: Vec<Payload> = (0..500).map(bulk_add).collect();
    ops.push(wm_op(100_000));
    xadd_all(&mut conn, &keys.input, &ops).await;
    let ghost = read_as(&mut conn, &keys, "ghost", 1000).await;
    assert_eq!(ghost.len(), 501, "the ghost holds the whole batch");

    let d2 = spawn_daemon(
        &redis.url(),
        "d2",
        &[("TIDEMARK__DAEMON__CLAIM_IDLE", "1s"), ("TIDEMARK__DAEMON__BLOCK", "200ms")],
    );
    wait_drained(&conn, &keys, 500, Duration::from_secs(30), "d2 claims and applies the ghost's batch").await;
    let model = assert_released_exactly_once(&mut conn, &keys, "claimed batch").await;
    assert_eq!(model.out.len(), 500);
    assert_eq!(schedule(&mut conn, &keys.sched).await, vec![]);
    assert_eq!(hlen(&mut conn, &keys.body).await, 0);
    assert_eq!(pending_of(&mut conn, &keys.input, "ghost").await, 0);
    assert!(!claim_lines(&d2.log()).is_empty(), "d2 claimed input entries; log:\n{}", d2.log());
}

/// A real `kill -9` of a daemon in the middle of a 20k-entry input: another
/// daemon claims what the dead one held, every element is scheduled once and
/// then released exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_mid_stream_then_another_daemon_finishes_exactly_once() {
    const N: usize = 20_000;
    let redis = RedisServer::start();
    let (mut conn, keys) = setup(&redis).await;
    let ops: Vec<Payload> = (0..N).map(bulk_add).collect();
    xadd_all(&mut conn, &keys.input, &ops).await;

    let env = [
        ("TIDEMARK__DAEMON__BATCH_SIZE", "1000"),
        ("TIDEMARK__DAEMON__CLAIM_IDLE", "1s"),
        ("TIDEMARK__DAEMON__BLOCK", "200ms"),
        ("RUST_LOG", "info"),
    ];
    let args = daemon_args(&redis.url(), "d1");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut d1 = Daemon::spawn(&args, &env);
    // Kill it as soon as it has applied something and holds entries it has
    // read but not applied. Polled without pause: it is quick.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let scheduled = testkit::zcard_async(&mut conn, &keys.sched).await;
        assert!(scheduled < N, "d1 finished all {N} entries before it could be killed mid-way");
        if scheduled > 0 && pending_of(&mut conn, &keys.input, "d1").await > 0 {
            d1.kill9();
            break;
        }
        assert!(Instant::now() < deadline, "d1 made no progress; log:\n{}", d1.log());
    }
    let at_kill = testkit::zcard_async(&mut conn, &keys.sched).await;
    let held = pending_of(&mut conn, &keys.input, "d1").await;
    eprintln!("killed d1 with {at_kill} of {N} scheduled and {held} entries pending at d1");
    assert!(at_kill > 0 && at_kill < N, "killed mid-way: {at_kill} scheduled");

    let d2 = spawn_daemon(&redis.url(), "d2", &env);
    wait_drained(&conn, &keys, 0, Duration::from_secs(30), "d2 applies everything").await;
    let mut expected: Vec<(i64, Vec<u8>)> =
        ops.iter().map(|op| (std::str::from_utf8(&op[2].1).unwrap().parse().unwrap(), op[1].1.clone())).collect();
    expected.sort();
    let scheduled = schedule(&mut conn, &keys.sched).await;
    assert_eq!(scheduled.len(), N, "every element scheduled");
    assert_eq!(
        scheduled,
        expected.iter().map(|(ts, id)| (id.clone(), *ts)).collect::<Vec<_>>(),
        "the schedule holds exactly the {N} elements with their ts"
    );
    assert_eq!(hlen(&mut conn, &keys.body).await, N);
    assert_eq!(xlen(&mut conn, &keys.out).await, 0, "nothing is due yet");
    if held > 0 {
        assert!(!claim_lines(&d2.log()).is_empty(), "d2 claimed input entries; log:\n{}", d2.log());
    }

    testkit::xadd_fields_async(&mut conn, &keys.input, &[(b"op", b"watermark"), (b"ts", b"1000000")]).await;
    wait_drained(&conn, &keys, N, Duration::from_secs(30), "d2 releases everything").await;
    let model = assert_released_exactly_once(&mut conn, &keys, "after kill -9").await;
    assert_eq!(model.out.len(), N);
    assert_eq!(schedule(&mut conn, &keys.sched).await, vec![]);
    assert_eq!(hlen(&mut conn, &keys.body).await, 0);
}

/// The script ran and acknowledged the batch, but the reply was lost: the
/// same batch sent again (before and after newer entries) is recognised as
/// applied and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reapplying_a_batch_after_a_lost_reply_changes_nothing() {
    let redis = RedisServer::start();
    let (mut conn, keys) = setup(&redis).await;
    let first: Vec<Payload> = vec![
        wm_op(10),
        add_op(b"A", 5, &[(b"v", b"a-late")]),
        add_op(b"B", 50, &[(b"v", b"b1")]),
        add_op(b"C", 60, &[(b"v", b"c1")]),
        vec![(b"op".to_vec(), b"cancel".to_vec()), (b"id".to_vec(), b"C".to_vec())],
        add_op(b"D", 70, &[(b"v", b"d1")]),
    ];
    xadd_all(&mut conn, &keys.input, &first).await;
    let batch1 = read_as(&mut conn, &keys, "c1", 100).await;
    assert_eq!(batch1.len(), 6);
    let o = apply(&mut conn, &keys, &batch1).await;
    assert_eq!(
        (o.processed, o.adds, o.late, o.cancels, o.watermarks, o.released, o.blocked),
        (6, 4, 1, 1, 1, 0, false),
        "{o:?}"
    );
    let sched1 = vec![(b"B".to_vec(), 50), (b"D".to_vec(), 70)];
    assert_eq!(schedule(&mut conn, &keys.sched).await, sched1);
    assert_eq!(xlen(&mut conn, &keys.out).await, 1, "the late add A");

    let nothing = |o: ApplyOutcome| {
        assert_eq!(
            (o.processed, o.adds, o.late, o.cancels, o.watermarks, o.dead, o.released, o.blocked, o.more_due),
            (6, 0, 0, 0, 0, 0, 0, false, false),
            "a redelivered batch is skipped: {o:?}"
        );
    };

    // Redelivered at once.
    nothing(apply(&mut conn, &keys, &batch1).await);
    assert_eq!(schedule(&mut conn, &keys.sched).await, sched1);
    assert_eq!(xlen(&mut conn, &keys.out).await, 1);

    // Newer entries re-add C and update B; redelivered while they are pending…
    let second = vec![add_op(b"C", 80, &[(b"v", b"c2")]), add_op(b"B", 55, &[(b"v", b"b2")])];
    xadd_all(&mut conn, &keys.input, &second).await;
    let batch2 = read_as(&mut conn, &keys, "c1", 100).await;
    assert_eq!(batch2.len(), 2);
    nothing(apply(&mut conn, &keys, &batch1).await);
    assert_eq!(schedule(&mut conn, &keys.sched).await, sched1);
    assert_eq!(pending_of(&mut conn, &keys.input, "c1").await, 2, "the newer entries are untouched");

    // …and after they are applied: the old cancel of C and the old B stay applied once.
    let o = apply(&mut conn, &keys, &batch2).await;
    assert_eq!((o.processed, o.adds), (2, 2), "{o:?}");
    nothing(apply(&mut conn, &keys, &batch1).await);
    let o = apply(&mut conn, &keys, &batch2).await;
    assert_eq!((o.processed, o.adds, o.released), (2, 0, 0), "{o:?}");
    let body_b: Vec<u8> = redis::cmd("HGET").arg(&keys.body).arg("B").query_async(&mut conn).await.unwrap();
    assert!(body_b.windows(2).any(|w| w == b"b2"), "B keeps its newer payload");
    assert_eq!(
        schedule(&mut conn, &keys.sched).await,
        vec![(b"B".to_vec(), 55), (b"D".to_vec(), 70), (b"C".to_vec(), 80)]
    );
    assert_eq!(get_wm(&mut conn, &keys.wm).await.as_deref(), Some("10"));

    // Release everything, then redeliver every batch once more.
    xadd_all(&mut conn, &keys.input, &[wm_op(100)]).await;
    let batch3 = read_as(&mut conn, &keys, "c1", 100).await;
    let o = apply(&mut conn, &keys, &batch3).await;
    assert_eq!((o.processed, o.watermarks, o.released), (1, 1, 3), "{o:?}");
    for batch in [&batch1, &batch2, &batch3] {
        let o = apply(&mut conn, &keys, batch).await;
        assert_eq!((o.processed, o.adds, o.late, o.watermarks, o.released), (batch.len(), 0, 0, 0, 0), "{o:?}");
    }
    let model = assert_released_exactly_once(&mut conn, &keys, "lost replies").await;
    let released: Vec<(&[u8], i64)> = model.out.iter().map(|r| (r.id.as_slice(), r.ts)).collect();
    assert_eq!(released, [(&b"A"[..], 5), (b"B", 55), (b"D", 70), (b"C", 80)]);
    assert_eq!(schedule(&mut conn, &keys.sched).await, vec![]);
    assert_eq!(get_wm(&mut conn, &keys.wm).await.as_deref(), Some("100"));
}

/// A daemon restarted under the same consumer name resumes the entries it
/// had read at once, without waiting for claim_idle (60 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_under_the_same_name_resumes_its_own_pending_at_once() {
    let redis = RedisServer::start();
    let (mut conn, keys) = setup(&redis).await;
    let mut ops: Vec<Payload> = (0..100).map(bulk_add).collect();
    ops.push(wm_op(100_000));
    xadd_all(&mut conn, &keys.input, &ops).await;
    // As if daemon d1 had read them and died.
    let held = read_as(&mut conn, &keys, "d1", 1000).await;
    assert_eq!(held.len(), 101);

    let started = Instant::now();
    let d1 = spawn_daemon(
        &redis.url(),
        "d1",
        &[("TIDEMARK__DAEMON__CLAIM_IDLE", "60s"), ("TIDEMARK__DAEMON__BLOCK", "200ms")],
    );
    wait_drained(&conn, &keys, 100, Duration::from_secs(15), "d1 resumes its own pending entries").await;
    eprintln!("resumed and released 100 elements in {:?}", started.elapsed());
    let model = assert_released_exactly_once(&mut conn, &keys, "restart under the same name").await;
    assert_eq!(model.out.len(), 100);
    assert_eq!(schedule(&mut conn, &keys.sched).await, vec![]);
    assert!(d1.log().contains("resuming our own pending input entries"), "log:\n{}", d1.log());
    assert_eq!(claim_lines(&d1.log()), Vec::<&str>::new(), "nothing needed claiming");
}
