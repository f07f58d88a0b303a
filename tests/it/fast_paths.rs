//! The apply script's quick paths — a batch whose first entry is the oldest
//! pending one, checked only where another entry id could lie between two of
//! its entries, and a batch of plain adds applied in bulk — stop exactly
//! where the entry-by-entry walk would: at another consumer's entry in
//! between, at an add that is already due, at an element id seen twice.

use tidemark::store::Conn;
use tidemark::store::{ApplyOutcome, Keys, Prepared, Scripts};

use crate::model::schedule;
use crate::order::{pending, read_as, setup};
use testkit::hlen_async as hlen;
use testkit::RedisServer;

const CHUNK: usize = 100;

/// `XADD` with an explicit entry id.
async fn xadd(conn: &mut Conn, keys: &Keys, id: &str, fields: &[(&str, &str)]) {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(&keys.input).arg(id);
    for (k, v) in fields {
        cmd.arg(*k).arg(*v);
    }
    let written: String = cmd.query_async(conn).await.expect("XADD");
    assert_eq!(written, id);
}

async fn apply(conn: &mut Conn, keys: &Keys, batch: &[&Prepared]) -> ApplyOutcome {
    Scripts::new().apply(conn, keys, batch, CHUNK).await.expect("apply.lua")
}

/// The input group's pending entry ids, oldest first.
async fn pending_ids(conn: &mut Conn, keys: &Keys) -> Vec<String> {
    pending(conn, keys).await.into_iter().map(|(id, _)| id).collect()
}

fn sched(pairs: &[(&str, i64)]) -> Vec<(Vec<u8>, i64)> {
    pairs.iter().map(|(id, ts)| (id.as_bytes().to_vec(), *ts)).collect()
}

/// c1 holds adds 1-1, 3-1 and 4-1, c2 holds 2-1 in between: c1's batch
/// applies up to 1-1 only; once c2 has applied 2-1, the rest applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_of_adds_waits_for_another_consumers_entry_in_between() {
    let redis = RedisServer::start();
    let (mut conn, keys) = setup(&redis).await;
    for (entry, id, ts) in [("1-1", "A", "10"), ("2-1", "B", "20"), ("3-1", "C", "30"), ("4-1", "D", "40")] {
        xadd(&mut conn, &keys, entry, &[("op", "add"), ("id", id), ("ts", ts), ("k", id)]).await;
    }
    let mut c1 = read_as(&mut conn, &keys, "c1", 1).await;
    let c2 = read_as(&mut conn, &keys, "c2", 1).await;
    c1.extend(read_as(&mut conn, &keys, "c1", 10).await);
    assert_eq!(c1.iter().map(|p| p.id.to_string()).collect::<Vec<_>>(), ["1-1", "3-1", "4-1"]);

    let o = apply(&mut conn, &keys, &c1.iter().collect::<Vec<_>>()).await;
    assert_eq!((o.processed, o.blocked, o.adds), (1, true, 1), "{o:?}");
    assert_eq!(schedule(&mut conn, &keys.sched).await, sched(&[("A", 10)]));
    assert_eq!(pending_ids(&mut conn, &keys).await, ["2-1", "3-1", "4-1"]);

    let o = apply(&mut conn, &keys, &[&c2[0]]).await;
    assert_eq!((o.processed, o.blocked, o.adds), (1, false, 1), "{o:?}");
    let o = apply(&mut conn, &keys, &[&c1[1], &c1[2]]).await;
    assert_eq!((o.processed, o.blocked, o.adds), (2, false, 2), "{o:?}");
    assert_eq!(schedule(&mut conn, &keys.sched).await, sched(&[("A", 10), ("B", 20), ("C", 30), ("D", 40)]));
    assert_eq!(hlen(&mut conn, &keys.body).await, 4);
    assert!(pending_ids(&mut conn, &keys).await.is_empty());
}

/// A batch of adds one of which is already due: that one is released at
/// once, the other scheduled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_of_adds_with_one_already_due_releases_it_at_once() {
    let redis = RedisServer::start();
    let (mut conn, keys) = setup(&redis).await;
    xadd(&mut conn, &keys, "1-1", &[("op", "watermark"), ("ts", "100")]).await;
    let w = read_as(&mut conn, &keys, "c1", 10).await;
    assert_eq!(apply(&mut conn, &keys, &[&w[0]]).await.watermarks, 1);
    xadd(&mut conn, &keys, "2-1", &[("op", "add"), ("id", "late"), ("ts", "50")]).await;
    xadd(&mut conn, &keys, "2-2", &[("op", "add"), ("id", "later"), ("ts", "500")]).await;
    let batch = read_as(&mut conn, &keys, "c1", 10).await;

    let o = apply(&mut conn, &keys, &batch.iter().collect::<Vec<_>>()).await;
    assert_eq!((o.processed, o.adds, o.late), (2, 2, 1), "{o:?}");
    assert_eq!(schedule(&mut conn, &keys.sched).await, sched(&[("later", 500)]));
    let out: Vec<(String, Vec<(String, String)>)> =
        redis::cmd("XRANGE").arg(&keys.out).arg("-").arg("+").query_async(&mut conn).await.expect("XRANGE");
    let fields: Vec<_> = out.into_iter().map(|(_, f)| f).collect();
    assert_eq!(fields, vec![vec![("id".to_string(), "late".to_string()), ("ts".to_string(), "50".to_string())]]);
}

/// Re-adding without a payload drops the body of the earlier add, in a
/// batch of distinct ids and in one that holds the same id twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn re_adding_without_payload_drops_the_old_body() {
    let redis = RedisServer::start();
    let (mut conn, keys) = setup(&redis).await;
    xadd(&mut conn, &keys, "1-1", &[("op", "add"), ("id", "E"), ("ts", "10"), ("v", "old")]).await;
    xadd(&mut conn, &keys, "1-2", &[("op", "add"), ("id", "G"), ("ts", "10"), ("v", "old")]).await;
    let first = read_as(&mut conn, &keys, "c1", 10).await;
    assert_eq!(apply(&mut conn, &keys, &first.iter().collect::<Vec<_>>()).await.adds, 2);
    assert_eq!(hlen(&mut conn, &keys.body).await, 2);

    // Distinct ids: E again without payload, F with one.
    xadd(&mut conn, &keys, "2-1", &[("op", "add"), ("id", "E"), ("ts", "20")]).await;
    xadd(&mut conn, &keys, "2-2", &[("op", "add"), ("id", "F"), ("ts", "30"), ("v", "new")]).await;
    // The same id twice: G with a payload, then without.
    xadd(&mut conn, &keys, "3-1", &[("op", "add"), ("id", "G"), ("ts", "40"), ("v", "newer")]).await;
    xadd(&mut conn, &keys, "3-2", &[("op", "add"), ("id", "G"), ("ts", "50")]).await;
    let second = read_as(&mut conn, &keys, "c1", 2).await;
    let o = apply(&mut conn, &keys, &second.iter().collect::<Vec<_>>()).await;
    assert_eq!((o.processed, o.adds), (2, 2), "{o:?}");
    let third = read_as(&mut conn, &keys, "c1", 2).await;
    let o = apply(&mut conn, &keys, &third.iter().collect::<Vec<_>>()).await;
    assert_eq!((o.processed, o.adds), (2, 2), "{o:?}");

    assert_eq!(schedule(&mut conn, &keys.sched).await, sched(&[("E", 20), ("F", 30), ("G", 50)]));
    let bodies: Vec<Option<Vec<u8>>> =
        redis::cmd("HMGET").arg(&keys.body).arg("E").arg("F").arg("G").query_async(&mut conn).await.expect("HMGET");
    assert_eq!(bodies.iter().map(Option::is_some).collect::<Vec<_>>(), [false, true, false]);
}
