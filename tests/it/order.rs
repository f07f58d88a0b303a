//! Guarantee 4, order across daemons: input operations take effect in
//! input-stream order even when different consumers hold them.

use std::time::Duration;

use tidemark::core::op::Limits;
use tidemark::store::entries::decode_entries;
use tidemark::store::Conn;
use tidemark::store::{ensure_group, prepare, read_new, ApplyOutcome, Keys, Prepared, Scripts, INPUT_GROUP};

use crate::model::{claim_lines, get_wm, input_drained, schedule, spawn_daemon, Model};
use testkit::RedisServer;
use testkit::{hlen_async as hlen, xlen_async as xlen};

const CHUNK: usize = 100;

/// A connection to `redis` and the default namespace's keys, with the
/// input group created.
pub async fn setup(redis: &RedisServer) -> (Conn, Keys) {
    let mut conn = redis.conn().await;
    let keys = testkit::default_keys();
    ensure_group(&mut conn, &keys.input, INPUT_GROUP).await.expect("create input group");
    (conn, keys)
}

/// Reads up to `count` new entries as `consumer` and prepares them.
pub async fn read_as(conn: &mut Conn, keys: &Keys, consumer: &str, count: usize) -> Vec<Prepared> {
    let entries = read_new(conn, keys, consumer, count, Duration::from_millis(100)).await.expect("XREADGROUP");
    entries.iter().map(|e| prepare(e, &Limits::default())).collect()
}

async fn apply(conn: &mut Conn, keys: &Keys, batch: &[&Prepared]) -> ApplyOutcome {
    Scripts::new().apply(conn, keys, batch, CHUNK).await.expect("apply.lua")
}

fn ids(batch: &[Prepared]) -> Vec<String> {
    batch.iter().map(|p| p.id.to_string()).collect()
}

/// The input group's pending list as (entry id, consumer), oldest first.
pub async fn pending(conn: &mut Conn, keys: &Keys) -> Vec<(String, String)> {
    let raw: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
        .arg(&keys.input)
        .arg(INPUT_GROUP)
        .arg("-")
        .arg("+")
        .arg(1000)
        .query_async(conn)
        .await
        .expect("XPENDING");
    raw.into_iter().map(|(id, consumer, _, _)| (id, consumer)).collect()
}

fn owned(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
}

/// The state a test can observe: schedule, body count, output, watermark.
async fn state(conn: &mut Conn, keys: &Keys) -> (Vec<(Vec<u8>, i64)>, usize, usize, Option<String>) {
    (
        schedule(conn, &keys.sched).await,
        hlen(conn, &keys.body).await,
        xlen(conn, &keys.out).await,
        get_wm(conn, &keys.wm).await,
    )
}

/// add(X) read by c1, cancel(X) read by c2: whichever applies first, X ends
/// cancelled, and c2 cannot apply its cancel before c1's add.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_and_cancel_held_by_different_consumers_apply_in_stream_order() {
    let redis = RedisServer::start();
    let (mut conn, keys) = setup(&redis).await;
    let add = testkit::xadd_fields_async(
        &mut conn,
        &keys.input,
        &[(b"op", b"add"), (b"id", b"X"), (b"ts", b"10"), (b"k", b"v")],
    )
    .await;
    let cancel = testkit::xadd_fields_async(&mut conn, &keys.input, &[(b"op", b"cancel"), (b"id", b"X")]).await;

    let c1 = read_as(&mut conn, &keys, "c1", 1).await;
    let c2 = read_as(&mut conn, &keys, "c2", 1).await;
    assert_eq!(ids(&c1), [add.as_str()]);
    assert_eq!(ids(&c2), [cancel.as_str()]);

    // c2 first: the older add is pending at c1, so nothing happens.
    let before = state(&mut conn, &keys).await;
    let o = apply(&mut conn, &keys, &[&c2[0]]).await;
    assert!(o.blocked, "c2's cancel must wait for c1's add: {o:?}");
    assert_eq!((o.processed, o.cancels, o.adds, o.released), (0, 0, 0, 0), "{o:?}");
    assert_eq!(state(&mut conn, &keys).await, before, "a blocked call changes nothing");
    assert_eq!(pending(&mut conn, &keys).await, owned(&[(&add, "c1"), (&cancel, "c2")]), "both still pending");

    // c1 applies the add, then c2 the cancel.
    let o = apply(&mut conn, &keys, &[&c1[0]]).await;
    assert_eq!((o.processed, o.adds, o.blocked), (1, 1, false), "{o:?}");
    assert_eq!(schedule(&mut conn, &keys.sched).await, vec![(b"X".to_vec(), 10)]);
    assert_eq!(pending(&mut conn, &keys).await, owned(&[(&cancel, "c2")]));

    let o = apply(&mut conn, &keys, &[&c2[0]]).await;
    assert_eq!((o.processed, o.cancels, o.blocked), (1, 1, false), "{o:?}");
    assert_eq!(pending(&mut conn, &keys).await, vec![]);

    // A watermark above X's ts proves X is gone, not just unscheduled for now.
    testkit::xadd_fields_async(&mut conn, &keys.input, &[(b"op", b"watermark"), (b"ts", b"100")]).await;
    let w = read_as(&mut conn, &keys, "c1", 10).await;
    let o = apply(&mut conn, &keys, &w.iter().collect::<Vec<_>>()).await;
    assert_eq!((o.processed, o.watermarks, o.released), (1, 1, 0), "{o:?}");
    assert_eq!(
        state(&mut conn, &keys).await,
        (vec![], 0, 0, Some("100".into())),
        "X is neither scheduled nor released"
    );
}

/// c1 holds entries 1 and 3, c2 holds entry 2 (claimed from c1). Calls made
/// in the "wrong" order still take effect in stream order: each call applies
/// only the prefix that no older entry elsewhere holds back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interleaved_batches_applied_out_of_order_take_effect_in_stream_order() {
    let redis = RedisServer::start();
    let (mut conn, keys) = setup(&redis).await;
    let e1 = testkit::xadd_fields_async(
        &mut conn,
        &keys.input,
        &[(b"op", b"add"), (b"id", b"A"), (b"ts", b"10"), (b"v", b"first")],
    )
    .await;
    let e2 = testkit::xadd_fields_async(&mut conn, &keys.input, &[(b"op", b"cancel"), (b"id", b"A")]).await;
    let e3 = testkit::xadd_fields_async(
        &mut conn,
        &keys.input,
        &[(b"op", b"add"), (b"id", b"A"), (b"ts", b"20"), (b"v", b"third")],
    )
    .await;

    // c1 reads all three, c2 claims the middle one.
    let all = read_as(&mut conn, &keys, "c1", 10).await;
    assert_eq!(ids(&all), [e1.clone(), e2.clone(), e3.clone()]);
    let claimed: redis::Value = redis::cmd("XCLAIM")
        .arg(&keys.input)
        .arg(INPUT_GROUP)
        .arg("c2")
        .arg(0)
        .arg(&e2)
        .query_async(&mut conn)
        .await
        .expect("XCLAIM");
    let c2: Vec<Prepared> =
        decode_entries(claimed).expect("decode XCLAIM").iter().map(|e| prepare(e, &Limits::default())).collect();
    assert_eq!(ids(&c2), [e2.as_str()]);
    let c1 = [&all[0], &all[2]];
    assert_eq!(pending(&mut conn, &keys).await, owned(&[(&e1, "c1"), (&e2, "c2"), (&e3, "c1")]));

    // c2 first: entry 1 is older and pending at c1.
    let o = apply(&mut conn, &keys, &[&c2[0]]).await;
    assert_eq!((o.processed, o.blocked, o.cancels), (0, true, 0), "{o:?}");
    assert_eq!(state(&mut conn, &keys).await, (vec![], 0, 0, None));

    // c1's batch [1, 3]: only entry 1 applies, entry 3 waits for entry 2.
    let o = apply(&mut conn, &keys, &c1).await;
    assert_eq!((o.processed, o.blocked, o.adds), (1, true, 1), "{o:?}");
    assert_eq!(schedule(&mut conn, &keys.sched).await, vec![(b"A".to_vec(), 10)]);
    assert_eq!(pending(&mut conn, &keys).await, owned(&[(&e2, "c2"), (&e3, "c1")]));

    // c1 retries entry 3 alone: still held back.
    let o = apply(&mut conn, &keys, &[c1[1]]).await;
    assert_eq!((o.processed, o.blocked, o.adds), (0, true, 0), "{o:?}");
    assert_eq!(schedule(&mut conn, &keys.sched).await, vec![(b"A".to_vec(), 10)]);

    // c2's cancel, then c1's re-add.
    let o = apply(&mut conn, &keys, &[&c2[0]]).await;
    assert_eq!((o.processed, o.blocked, o.cancels), (1, false, 1), "{o:?}");
    assert_eq!(schedule(&mut conn, &keys.sched).await, vec![]);
    let o = apply(&mut conn, &keys, &[c1[1]]).await;
    assert_eq!((o.processed, o.blocked, o.adds), (1, false, 1), "{o:?}");
    assert_eq!(schedule(&mut conn, &keys.sched).await, vec![(b"A".to_vec(), 20)]);
    assert_eq!(pending(&mut conn, &keys).await, vec![]);

    // Release it: exactly the third entry's version, once.
    testkit::xadd_fields_async(&mut conn, &keys.input, &[(b"op", b"watermark"), (b"ts", b"100")]).await;
    let w = read_as(&mut conn, &keys, "c2", 10).await;
    let o = apply(&mut conn, &keys, &w.iter().collect::<Vec<_>>()).await;
    assert_eq!((o.processed, o.released), (1, 1), "{o:?}");
    let out = testkit::read_stream_async(&mut conn, &keys.out).await;
    let fields: Vec<_> = out.iter().map(|(_, f)| f.clone()).collect();
    let pair = |k: &[u8], v: &[u8]| (k.to_vec(), v.to_vec());
    assert_eq!(fields, vec![vec![pair(b"id", b"A"), pair(b"ts", b"20"), pair(b"v", b"third")]]);
    let input = testkit::read_stream_async(&mut conn, &keys.input).await;
    crate::model::assert_output_matches("stream order", &out, &Model::run(&input));
}

/// End to end: a consumer that read the add and died ("ghost") holds it;
/// the real daemon reads the cancel and a watermark after it and must not
/// apply them first. It claims the add after claim_idle and applies all three
/// in order: X is cancelled, nothing is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_waits_for_an_add_held_by_a_dead_consumer_before_its_cancel() {
    let redis = RedisServer::start();
    let (mut conn, keys) = setup(&redis).await;
    let add = testkit::xadd_fields_async(
        &mut conn,
        &keys.input,
        &[(b"op", b"add"), (b"id", b"X"), (b"ts", b"10"), (b"k", b"v")],
    )
    .await;
    let ghost = read_as(&mut conn, &keys, "ghost", 1).await;
    assert_eq!(ids(&ghost), [add.as_str()]);
    let cancel = testkit::xadd_fields_async(&mut conn, &keys.input, &[(b"op", b"cancel"), (b"id", b"X")]).await;
    let wm = testkit::xadd_fields_async(&mut conn, &keys.input, &[(b"op", b"watermark"), (b"ts", b"50")]).await;

    let d = spawn_daemon(
        &redis.url(),
        "d1",
        &[("TIDEMARK__DAEMON__CLAIM_IDLE", "1s"), ("TIDEMARK__DAEMON__BLOCK", "200ms")],
    );
    let input = keys.input.clone();
    testkit::wait_until_async("the daemon applies all three entries", Duration::from_secs(30), || {
        let mut c = conn.clone();
        let input = input.clone();
        async move { input_drained(&mut c, &input).await }
    })
    .await;

    assert_eq!(
        state(&mut conn, &keys).await,
        (vec![], 0, 0, Some("50".into())),
        "X was added, then cancelled, then the watermark passed: nothing scheduled, nothing released"
    );
    assert_eq!(pending(&mut conn, &keys).await, vec![]);
    let log = d.log();
    let blocked = log.find("applied input batch processed=0");
    let claimed = claim_lines(&log).first().and_then(|line| log.find(line));
    assert!(
        matches!((blocked, claimed), (Some(b), Some(c)) if b < c),
        "the daemon first found its batch held back by the ghost's add, then claimed the add; log:\n{log}"
    );
    let all = testkit::read_stream_async(&mut conn, &keys.input).await;
    let ids_in: Vec<&str> = all.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids_in, [add.as_str(), cancel.as_str(), wm.as_str()]);
    let model = Model::run(&all);
    assert!(model.out.is_empty() && model.sched.is_empty());
    let out = testkit::read_stream_async(&mut conn, &keys.out).await;
    crate::model::assert_output_matches("ghost add", &out, &model);
}
