//! Guarantee 5, at-least-once to consumers: the consumer runtime (library)
//! and `tidemark consume` (real processes) against a real Redis: fan-out,
//! retries, dead letters, panics, fast failover through liveness leases
//! after `kill -9`, slow consumers keeping their work, dead-consumer
//! cleanup, and the command contract (stdin JSON, environment, exit codes,
//! timeout kill, logs, SIGTERM drain, Redis restart).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tidemark::consume::{ConsumerBuilder, Element};
use tidemark::store::Conn;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use testkit::default_keys as keys;
use testkit::{field, read_stream_async, wait_until, wait_until_async, Daemon, RedisOptions, RedisServer};

const WAIT: Duration = Duration::from_secs(15);

/// XADDs an element to `:out` in the output format; returns the entry id.
async fn release(conn: &mut Conn, id: &[u8], ts: i64, payload: &[(&[u8], &[u8])]) -> String {
    let ts = ts.to_string();
    let mut fields: Vec<(&[u8], &[u8])> = vec![(b"id", id), (b"ts", ts.as_bytes())];
    fields.extend_from_slice(payload);
    testkit::xadd_fields_async(conn, &keys().out, &fields).await
}

async fn create_group(conn: &mut Conn, group: &str) {
    tidemark::store::ensure_group(conn, &keys().out, group).await.expect("XGROUP CREATE");
}

/// Entries pending in `group` (at `consumer`, if given).
async fn pending(conn: &mut Conn, group: &str, consumer: Option<&str>) -> usize {
    let mut cmd = redis::cmd("XPENDING");
    cmd.arg(keys().out).arg(group).arg("-").arg("+").arg(100_000);
    if let Some(c) = consumer {
        cmd.arg(c);
    }
    let v: Vec<redis::Value> = cmd.query_async(conn).await.expect("XPENDING");
    v.len()
}

/// Names of the consumers of `group`.
async fn consumer_names(conn: &mut Conn, group: &str) -> BTreeSet<String> {
    let v: Vec<redis::Value> =
        redis::cmd("XINFO").arg("CONSUMERS").arg(keys().out).arg(group).query_async(conn).await.expect("XINFO");
    v.into_iter()
        .map(|c| {
            let map: BTreeMap<String, redis::Value> = redis::from_redis_value(c).expect("consumer info");
            redis::from_redis_value::<String>(map["name"].clone()).expect("name")
        })
        .collect()
}

/// A stream entry's field/value pairs.
type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// What a test handler saw: (element id, delivery), in order.
type Seen = Arc<Mutex<Vec<(String, u64)>>>;

fn seen_of(seen: &Seen, id: &str) -> Vec<u64> {
    seen.lock().unwrap().iter().filter(|(i, _)| i == id).map(|(_, d)| *d).collect()
}

/// A private Redis with output group `group` on `:out`, and a connection.
async fn with_group(group: &str) -> (RedisServer, Conn) {
    let redis = RedisServer::start();
    let mut conn = redis.conn().await;
    create_group(&mut conn, group).await;
    (redis, conn)
}

/// Waits until the handler was called `n` times.
async fn wait_seen(seen: &Seen, n: usize, what: &str) {
    wait_until_async(what, WAIT, || {
        let done = seen.lock().unwrap().len() == n;
        async move { done }
    })
    .await;
}

/// Waits until the handler was called `n` times and nothing is pending in
/// group `g`.
async fn wait_acked(conn: &Conn, seen: &Seen, n: usize, what: &str) {
    wait_until_async(what, WAIT, || {
        let mut c = conn.clone();
        let done = seen.lock().unwrap().len() == n;
        async move { done && pending(&mut c, "g", None).await == 0 }
    })
    .await;
}

/// Waits until `n` entries are pending in `group` (at `consumer`, if given).
async fn wait_pending(conn: &Conn, group: &str, consumer: Option<&str>, n: usize, what: &str) {
    wait_until_async(what, WAIT, || {
        let mut c = conn.clone();
        async move { pending(&mut c, group, consumer).await == n }
    })
    .await;
}

/// Waits until `:dead` holds `n` letters; returns them.
async fn wait_dead(conn: &Conn, n: usize, what: &str) -> Vec<testkit::StreamEntry> {
    wait_until_async(what, WAIT, || {
        let mut c = conn.clone();
        async move { read_stream_async(&mut c, &keys().dead).await.len() == n }
    })
    .await;
    read_stream_async(&mut conn.clone(), &keys().dead).await
}

/// A library consumer of `group` with short timings for tests.
fn builder(redis: &RedisServer, group: &str, name: &str) -> ConsumerBuilder {
    ConsumerBuilder::new(redis.client(), keys(), group)
        .consumer(name)
        .block(Duration::from_millis(500))
        .lease_ttl(Duration::from_millis(600))
        .claim_idle(Duration::from_millis(300))
        .shutdown_grace(Duration::from_secs(5))
}

/// A running library consumer; `stop` cancels it and checks it ended well.
struct Running {
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), tidemark::consume::ConsumeError>>,
}

impl Running {
    fn start<H: tidemark::consume::Handler>(consumer: tidemark::consume::Consumer<H>) -> Running {
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(consumer.run(shutdown.clone()));
        Running { shutdown, task }
    }

    async fn stop(self) {
        assert!(!self.task.is_finished(), "the consumer ended before it was stopped");
        self.shutdown.cancel();
        let result = tokio::time::timeout(WAIT, self.task).await.expect("consumer stops").expect("consumer task");
        result.expect("consumer ends cleanly");
    }
}

/// A handler recording every call; fails (or panics) as `fail` says.
fn recording(
    seen: &Seen,
    fail: impl Fn(&Element) -> Option<String> + Send + Sync + 'static,
) -> impl tidemark::consume::Handler {
    let seen = seen.clone();
    let fail = Arc::new(fail);
    move |el: Element| {
        let seen = seen.clone();
        let fail = fail.clone();
        async move {
            seen.lock().unwrap().push((el.id_lossy().into_owned(), el.delivery));
            match fail(&el) {
                Some(e) => Err(e),
                None => Ok(()),
            }
        }
    }
}

/// Two groups fed by a real daemon each receive every element and
/// acknowledge independently: while one group's consumer is stopped, the
/// other keeps acknowledging, and the stopped one catches up later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_groups_each_receive_every_element() {
    let redis = RedisServer::start();
    let mut conn = redis.conn().await;
    let daemon = Daemon::spawn(
        &["run", "--redis-url", &redis.url(), "--consumer", "d1", "--group", "billing", "--group", "mail"],
        &[("TIDEMARK__DAEMON__BLOCK", "100ms")],
    );
    daemon.wait_log("connected to Redis", WAIT);
    let add = |i: usize| {
        let id = format!("el-{i:02}");
        let ts = (i as i64).to_string();
        let n = i.to_string();
        vec![
            (b"op".to_vec(), b"add".to_vec()),
            (b"id".to_vec(), id.into_bytes()),
            (b"ts".to_vec(), ts.into_bytes()),
            (b"n".to_vec(), n.into_bytes()),
        ]
    };
    let xadd_input = |conn: &mut Conn, fields: Vec<(Vec<u8>, Vec<u8>)>| {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(keys().input).arg("*");
        for (k, v) in fields {
            cmd.arg(k).arg(v);
        }
        let mut conn = conn.clone();
        async move {
            let _: String = cmd.query_async(&mut conn).await.expect("XADD :in");
        }
    };
    for i in 0..10 {
        xadd_input(&mut conn, add(i)).await;
    }
    xadd_input(&mut conn, vec![(b"op".to_vec(), b"watermark".to_vec()), (b"ts".to_vec(), b"100".to_vec())]).await;

    let billing_seen: Seen = Arc::default();
    let mail_seen: Seen = Arc::default();
    let billing = Running::start(builder(&redis, "billing", "b1").build(recording(&billing_seen, |_| None)).unwrap());
    let mail = Running::start(builder(&redis, "mail", "m1").build(recording(&mail_seen, |_| None)).unwrap());
    let first: Vec<(String, u64)> = (0..10).map(|i| (format!("el-{i:02}"), 1)).collect();
    // Handlers run concurrently, so calls may be recorded out of order.
    let sorted = |s: &Seen| {
        let mut v = s.lock().unwrap().clone();
        v.sort();
        v
    };
    wait_until_async("both groups handle the 10 elements", WAIT, || {
        let done = billing_seen.lock().unwrap().len() == 10 && mail_seen.lock().unwrap().len() == 10;
        async move { done }
    })
    .await;
    mail.stop().await;

    // Only billing runs now: it gets and acknowledges the next ones alone.
    for i in 10..15 {
        xadd_input(&mut conn, add(i)).await;
    }
    xadd_input(&mut conn, vec![(b"op".to_vec(), b"watermark".to_vec()), (b"ts".to_vec(), b"200".to_vec())]).await;
    wait_seen(&billing_seen, 15, "billing handles the next 5").await;
    wait_pending(&conn, "billing", None, 0, "billing acknowledges everything").await;
    assert_eq!(pending(&mut conn, "mail", None).await, 0, "mail acknowledged its first 10 before stopping");
    assert_eq!(sorted(&mail_seen), first, "mail saw nothing while stopped");

    let mail = Running::start(builder(&redis, "mail", "m1").build(recording(&mail_seen, |_| None)).unwrap());
    wait_seen(&mail_seen, 15, "mail catches up").await;
    let all: Vec<(String, u64)> = (0..15).map(|i| (format!("el-{i:02}"), 1)).collect();
    assert_eq!(sorted(&billing_seen), all);
    assert_eq!(sorted(&mail_seen), all);
    billing.stop().await;
    mail.stop().await;
    assert_eq!(pending(&mut conn, "billing", None).await, 0);
    assert_eq!(pending(&mut conn, "mail", None).await, 0);
}

/// A handler that fails on the first delivery: the element is retried
/// after claim_idle, then acknowledged; nothing goes to :dead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_once_is_redelivered_then_acknowledged() {
    let (redis, mut conn) = with_group("g").await;
    let seen: Seen = Arc::default();
    let failed_at = Arc::new(Mutex::new(None::<Instant>));
    let retried_at = Arc::new(Mutex::new(None::<Instant>));
    let (f, r) = (failed_at.clone(), retried_at.clone());
    let handler = recording(&seen, move |el| {
        if el.delivery == 1 {
            f.lock().unwrap().get_or_insert_with(Instant::now);
            Some(format!("transient failure of {}", el.id_lossy()))
        } else {
            r.lock().unwrap().get_or_insert_with(Instant::now);
            None
        }
    });
    let consumer = Running::start(builder(&redis, "g", "c1").build(handler).unwrap());
    for id in ["a", "b", "c"] {
        release(&mut conn, id.as_bytes(), 1, &[(b"k", b"v")]).await;
    }
    wait_acked(&conn, &seen, 6, "each element is handled twice and acknowledged").await;
    for id in ["a", "b", "c"] {
        assert_eq!(seen_of(&seen, id), [1, 2], "deliveries of {id}");
    }
    let (failed, retried) = (failed_at.lock().unwrap().unwrap(), retried_at.lock().unwrap().unwrap());
    eprintln!("retry after a failure came {:?} later (claim_idle 300ms)", retried - failed);
    assert!(retried - failed >= Duration::from_millis(200), "retried before claim_idle");
    consumer.stop().await;
    assert_eq!(read_stream_async(&mut conn, &keys().dead).await, vec![]);
    assert_eq!(seen.lock().unwrap().len(), 6, "no delivery after the acknowledgement");
}

/// A handler that always fails: exactly max_deliveries attempts, then the
/// element is in :dead with reason, detail, origin, origin_id and the
/// original fields, and no longer pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn always_failing_goes_to_dead_after_max_deliveries() {
    let (redis, mut conn) = with_group("g").await;
    let seen: Seen = Arc::default();
    let handler = recording(&seen, |el| Some(format!("boom on delivery {}", el.delivery)));
    let consumer = Running::start(builder(&redis, "g", "c1").max_deliveries(3).build(handler).unwrap());
    let bin: &[u8] = &[0, 0xff, b'\n'];
    let e1 = release(&mut conn, b"poison", -7, &[(b"k", b"v"), (b"bin", bin), (b"k", b"w")]).await;
    let e2 = release(&mut conn, b"poison-2", 8, &[]).await;
    wait_until_async("both elements are dead-lettered and acknowledged", WAIT, || {
        let mut c = conn.clone();
        async move { read_stream_async(&mut c, &keys().dead).await.len() == 2 && pending(&mut c, "g", None).await == 0 }
    })
    .await;
    assert_eq!(seen_of(&seen, "poison"), [1, 2, 3]);
    assert_eq!(seen_of(&seen, "poison-2"), [1, 2, 3]);
    let dead = read_stream_async(&mut conn, &keys().dead).await;
    let by_origin: BTreeMap<Vec<u8>, Fields> =
        dead.into_iter().map(|(_, f)| (field(&f, "origin_id").unwrap().to_vec(), f)).collect();
    let p = |k: &[u8], v: &[u8]| (k.to_vec(), v.to_vec());
    assert_eq!(
        by_origin[e1.as_bytes()],
        vec![
            p(b"reason", b"max_deliveries"),
            p(b"detail", b"delivery 3 of 3 failed: boom on delivery 3"),
            p(b"origin", b"out:g"),
            p(b"origin_id", e1.as_bytes()),
            p(b"id", b"poison"),
            p(b"ts", b"-7"),
            p(b"k", b"v"),
            p(b"bin", bin),
            p(b"k", b"w"),
        ]
    );
    assert_eq!(
        by_origin[e2.as_bytes()],
        vec![
            p(b"reason", b"max_deliveries"),
            p(b"detail", b"delivery 3 of 3 failed: boom on delivery 3"),
            p(b"origin", b"out:g"),
            p(b"origin_id", e2.as_bytes()),
            p(b"id", b"poison-2"),
            p(b"ts", b"8"),
        ]
    );
    // Nothing pending means nothing can be delivered again; a later element
    // still flows.
    let seen_ok: Seen = Arc::default();
    consumer.stop().await;
    let consumer = Running::start(builder(&redis, "g", "c1").build(recording(&seen_ok, |_| None)).unwrap());
    release(&mut conn, b"fine", 9, &[]).await;
    wait_seen(&seen_ok, 1, "a healthy element after the poison ones").await;
    assert_eq!(seen_ok.lock().unwrap().clone(), [("fine".to_string(), 1)]);
    assert_eq!(seen.lock().unwrap().len(), 6, "exactly max_deliveries attempts per poison element");
    consumer.stop().await;
}

/// An entry whose last allowed delivery went to a consumer that died is
/// dead-lettered when claimed, without running the handler again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_entry_of_a_dead_consumer_is_dead_lettered_on_claim() {
    let (redis, mut conn) = with_group("g").await;
    let e1 = release(&mut conn, b"x", 1, &[(b"k", b"v")]).await;
    // The ghost (no lease) is delivered it twice: read, then claimed.
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("g")
        .arg("ghost")
        .arg("STREAMS")
        .arg(keys().out)
        .arg(">")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: redis::Value = redis::cmd("XCLAIM")
        .arg(keys().out)
        .arg("g")
        .arg("ghost")
        .arg(0)
        .arg(&e1)
        .query_async(&mut conn)
        .await
        .unwrap();
    let seen: Seen = Arc::default();
    let consumer =
        Running::start(builder(&redis, "g", "c1").max_deliveries(2).build(recording(&seen, |_| None)).unwrap());
    wait_dead(&conn, 1, "the exhausted entry is dead-lettered").await;
    let dead = read_stream_async(&mut conn, &keys().dead).await;
    assert_eq!(field(&dead[0].1, "reason"), Some(&b"max_deliveries"[..]));
    assert_eq!(
        field(&dead[0].1, "detail"),
        Some(&b"delivered 2 times without being acknowledged (max_deliveries 2)"[..])
    );
    assert_eq!(field(&dead[0].1, "origin_id"), Some(e1.as_bytes()));
    assert_eq!(pending(&mut conn, "g", None).await, 0);
    assert!(seen.lock().unwrap().is_empty(), "the handler never saw a third delivery");
    consumer.stop().await;
}

/// A panicking handler is a failure: the element is retried, and the
/// consumer goes on with other elements.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panicking_handler_is_a_failure_not_a_crash() {
    let (redis, mut conn) = with_group("g").await;
    let seen: Seen = Arc::default();
    let handler = recording(&seen, |el| {
        if el.id == b"bomb" && el.delivery == 1 {
            panic!("handler exploded on {}", el.id_lossy());
        }
        None
    });
    let consumer = Running::start(builder(&redis, "g", "c1").build(handler).unwrap());
    release(&mut conn, b"bomb", 1, &[]).await;
    wait_until_async("the panicking element is retried and acknowledged", WAIT, || {
        let mut c = conn.clone();
        let n = seen_of(&seen, "bomb").len();
        async move { n == 2 && pending(&mut c, "g", None).await == 0 }
    })
    .await;
    release(&mut conn, b"after", 2, &[]).await;
    wait_until_async("the consumer keeps going", WAIT, || {
        let n = seen_of(&seen, "after").len();
        async move { n == 1 }
    })
    .await;
    assert_eq!(seen_of(&seen, "bomb"), [1, 2]);
    assert_eq!(seen_of(&seen, "after"), [1]);
    consumer.stop().await;
}

/// A handler over `handler_timeout` is cancelled and counts as a failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_timeout_is_a_failure() {
    let (redis, mut conn) = with_group("g").await;
    let handler = |_: Element| async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        Ok::<(), String>(())
    };
    let consumer = Running::start(
        builder(&redis, "g", "c1")
            .handler_timeout(Duration::from_millis(200))
            .max_deliveries(1)
            .build(handler)
            .unwrap(),
    );
    release(&mut conn, b"stuck", 1, &[]).await;
    wait_dead(&conn, 1, "the stuck element is dead-lettered").await;
    let dead = read_stream_async(&mut conn, &keys().dead).await;
    assert_eq!(
        field(&dead[0].1, "detail"),
        Some(&b"delivery 1 of 1 failed: the handler did not finish within 200ms"[..])
    );
    assert_eq!(pending(&mut conn, "g", None).await, 0);
    consumer.stop().await;
}

/// Shutdown with a handler that outlives the grace period: `run` returns,
/// the unfinished element stays pending, the lease is gone, and another
/// consumer takes the element over at once (not after claim_idle).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_leaves_unfinished_work_to_peers() {
    let (redis, mut conn) = with_group("g").await;
    let started: Seen = Arc::default();
    let s = started.clone();
    let endless = move |el: Element| {
        let s = s.clone();
        async move {
            s.lock().unwrap().push((el.id_lossy().into_owned(), el.delivery));
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok::<(), String>(())
        }
    };
    let a = Running::start(
        builder(&redis, "g", "a")
            .claim_idle(Duration::from_secs(60))
            .shutdown_grace(Duration::from_millis(300))
            .build(endless)
            .unwrap(),
    );
    release(&mut conn, b"long", 1, &[]).await;
    wait_seen(&started, 1, "a starts the element").await;
    let stopping = Instant::now();
    a.stop().await;
    eprintln!("stop with a handler over the 300ms grace took {:?}", stopping.elapsed());
    assert_eq!(pending(&mut conn, "g", Some("a")).await, 1, "the unfinished element stays pending");
    let lease: bool = redis::cmd("EXISTS").arg(keys().lease("out", "g", "a")).query_async(&mut conn).await.unwrap();
    assert!(!lease, "the lease is deleted on exit");

    let seen: Seen = Arc::default();
    let b = Running::start(
        builder(&redis, "g", "b").claim_idle(Duration::from_secs(60)).build(recording(&seen, |_| None)).unwrap(),
    );
    wait_acked(&conn, &seen, 1, "b takes the element over and finishes it").await;
    eprintln!("taken over {:?} after the stop began (claim_idle 60s)", stopping.elapsed());
    assert_eq!(seen.lock().unwrap().clone(), [("long".to_string(), 2)]);
    b.stop().await;
}

/// A consumer whose handler runs far longer than the lease refresh and
/// than claim_idle keeps its entries: a second live consumer of the group
/// takes none of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_keeps_its_entries() {
    let (redis, mut conn) = with_group("g").await;
    let slow_seen: Seen = Arc::default();
    let s = slow_seen.clone();
    let slow = move |el: Element| {
        let s = s.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(2500)).await;
            s.lock().unwrap().push((el.id_lossy().into_owned(), el.delivery));
            Ok::<(), String>(())
        }
    };
    // lease ttl 600ms (refreshed every 200ms, peers scan every 300ms),
    // claim_idle 300ms: the handler outlives both many times over.
    let a = Running::start(builder(&redis, "g", "slow").build(slow).unwrap());
    release(&mut conn, b"s1", 1, &[]).await;
    release(&mut conn, b"s2", 2, &[]).await;
    wait_pending(&conn, "g", Some("slow"), 2, "the slow consumer holds both").await;
    let other_seen: Seen = Arc::default();
    let b = Running::start(builder(&redis, "g", "other").build(recording(&other_seen, |_| None)).unwrap());
    wait_acked(&conn, &slow_seen, 2, "the slow consumer finishes both").await;
    assert!(other_seen.lock().unwrap().is_empty(), "the live peer took work: {:?}", other_seen.lock().unwrap());
    let mut got = slow_seen.lock().unwrap().clone();
    got.sort();
    assert_eq!(got, [("s1".to_string(), 1), ("s2".to_string(), 1)]);
    a.stop().await;
    b.stop().await;
}

/// Read-ahead is bounded: with one handler slot, a consumer without
/// prefetch holds exactly the element it is handling; with prefetch 3 it
/// holds 1 + 3 while one handler runs, and the waiting ones are kept fresh
/// (claim_idle 300 ms) so nobody claims them. Every element is then handled
/// once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_reads_ahead_of_free_slots_and_no_further() {
    let redis = RedisServer::start();
    let mut conn = redis.conn().await;
    create_group(&mut conn, "g0").await;
    create_group(&mut conn, "g3").await;
    for i in 0..8 {
        release(&mut conn, format!("p{i}").as_bytes(), i, &[]).await;
    }
    for (prefetch, held) in [(0, 1), (3, 4)] {
        let group = format!("g{prefetch}");
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let seen: Seen = Arc::default();
        let handler = {
            let (seen, gate) = (seen.clone(), gate.clone());
            move |el: Element| {
                let (seen, gate) = (seen.clone(), gate.clone());
                async move {
                    gate.acquire().await.expect("gate open").forget();
                    seen.lock().unwrap().push((el.id_lossy().into_owned(), el.delivery));
                    Ok::<(), String>(())
                }
            }
        };
        let consumer = builder(&redis, &group, "c").concurrency(1).prefetch(prefetch).build(handler);
        let running = Running::start(consumer.unwrap());
        wait_pending(&conn, &group, Some("c"), held, &format!("prefetch {prefetch}: the consumer holds {held}")).await;
        // No more than that, after several read, touch and claim rounds.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(pending(&mut conn, &group, None).await, held, "prefetch {prefetch}");
        let delivered: usize = {
            let v: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
                .arg(keys().out)
                .arg(&group)
                .arg("-")
                .arg("+")
                .arg(100)
                .query_async(&mut conn)
                .await
                .expect("XPENDING");
            v.iter().map(|(_, _, _, deliveries)| *deliveries as usize).sum()
        };
        assert_eq!(delivered, held, "prefetch {prefetch}: each held element delivered once (none claimed)");

        gate.add_permits(8);
        wait_until_async(&format!("prefetch {prefetch}: all handled"), WAIT, || {
            let mut c = conn.clone();
            let (g, n) = (group.clone(), seen.lock().unwrap().len());
            async move { n == 8 && pending(&mut c, &g, None).await == 0 }
        })
        .await;
        running.stop().await;
        let got: Vec<(String, u64)> = seen.lock().unwrap().clone();
        let want: Vec<(String, u64)> = (0..8).map(|i| (format!("p{i}"), 1)).collect();
        assert_eq!(got, want, "prefetch {prefetch}");
    }
}

/// A database number in the URL reaches every connection, the blocking
/// readers' included (they speak RESP themselves and must `SELECT`): a
/// daemon and a library consumer on db 3 move an element through, and db 0
/// stays empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_number_in_the_url_reaches_every_connection() {
    let redis = RedisServer::start();
    let url = format!("{}/3", redis.url());
    let d = Daemon::spawn(
        &["run", "--redis-url", &url, "--consumer", "d1", "--group", "g"],
        &[("TIDEMARK__DAEMON__BLOCK", "200ms")],
    );
    d.wait_log("connected to Redis", WAIT);
    let client = redis::Client::open(url.as_str()).expect("URL with a database");
    let seen: Seen = Arc::default();
    let consumer = ConsumerBuilder::new(client.clone(), keys(), "g")
        .consumer("c")
        .block(Duration::from_millis(300))
        .build(recording(&seen, |_| None))
        .expect("consumer");
    let running = Running::start(consumer);

    let mut db3 = Conn::Single(client.get_multiplexed_async_connection().await.expect("connect to db 3"));
    testkit::xadd_fields_async(&mut db3, &keys().input, &[(b"op", b"add"), (b"id", b"e1"), (b"ts", b"5")]).await;
    testkit::xadd_fields_async(&mut db3, &keys().input, &[(b"op", b"watermark"), (b"ts", b"10")]).await;
    wait_until_async("e1 handled and acknowledged on db 3", WAIT, || {
        let mut c = db3.clone();
        let n = seen.lock().unwrap().len();
        async move { n == 1 && pending(&mut c, "g", None).await == 0 }
    })
    .await;
    running.stop().await;
    assert_eq!(seen.lock().unwrap().clone(), [("e1".to_string(), 1)]);
    let mut db0 = redis.conn().await;
    let keys_in_db0: i64 = redis::cmd("DBSIZE").query_async(&mut db0).await.expect("DBSIZE");
    assert_eq!(keys_in_db0, 0, "nothing was written to db 0");
}

/// Dead peers (no lease) are cleaned up: one with pending entries is taken
/// over at once, and once nothing is pending and it has been idle past the
/// grace period it is removed from the group. A leased peer stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_peers_are_taken_over_and_removed_after_the_grace_period() {
    let (redis, mut conn) = with_group("g").await;
    release(&mut conn, b"orphan", 1, &[]).await;
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("g")
        .arg("ghost-pending")
        .arg("STREAMS")
        .arg(keys().out)
        .arg(">")
        .query_async(&mut conn)
        .await
        .unwrap();
    for name in ["ghost", "alive"] {
        let _: i64 = redis::cmd("XGROUP")
            .arg("CREATECONSUMER")
            .arg(keys().out)
            .arg("g")
            .arg(name)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let _: () = redis::cmd("SET")
        .arg(keys().lease("out", "g", "alive"))
        .arg("elsewhere")
        .arg("PX")
        .arg(60_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    let seen: Seen = Arc::default();
    let started = Instant::now();
    let consumer = Running::start(
        builder(&redis, "g", "live")
            .claim_idle(Duration::from_secs(60))
            .dead_consumer_grace(Duration::from_secs(1))
            .build(recording(&seen, |_| None))
            .unwrap(),
    );
    wait_seen(&seen, 1, "the orphan is taken over from the dead peer").await;
    eprintln!("orphan of a lease-less peer taken over after {:?} (claim_idle 60s)", started.elapsed());
    assert_eq!(seen.lock().unwrap().clone(), [("orphan".to_string(), 2)]);
    wait_until_async("dead peers are removed", WAIT, || {
        let mut c = conn.clone();
        async move { consumer_names(&mut c, "g").await == BTreeSet::from(["alive".to_string(), "live".to_string()]) }
    })
    .await;
    eprintln!("dead peers removed {:?} after start (grace 1s)", started.elapsed());
    consumer.stop().await;
}

// ---------------------------------------------------------------------------
// tidemark consume
// ---------------------------------------------------------------------------

fn consume_args<'a>(url: &'a str, consumer: &'a str, extra: &[&'a str], command: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["consume", "--redis-url", url, "--group", "g", "--consumer", consumer];
    args.extend_from_slice(extra);
    args.push("--");
    args.extend_from_slice(command);
    args
}

fn spawn_consume(url: &str, consumer: &str, extra: &[&str], command: &[&str], envs: &[(&str, &str)]) -> Daemon {
    let d = Daemon::spawn(&consume_args(url, consumer, extra, command), envs);
    d.wait_log("consuming", WAIT);
    d
}

/// Waits until the file at `path` holds `n` lines.
async fn wait_lines(path: &Path, n: usize, what: &str) {
    wait_until_async(what, WAIT, || {
        let done = lines(path).len() == n;
        async move { done }
    })
    .await;
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).map(|t| t.lines().map(str::to_owned).collect()).unwrap_or_default()
}

/// On drop, kills the process groups whose leaders' pids are listed in the
/// file (commands that a killed `tidemark consume` left running).
struct KillGroups(PathBuf);

impl Drop for KillGroups {
    fn drop(&mut self) {
        for pid in lines(&self.0) {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

/// Whether a live (not zombie) process is in process group `pgid`.
fn group_alive(pgid: &str) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else { return false };
    dir.flatten().any(|e| {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { return false };
        // "pid (comm) state ppid pgrp ...": comm may hold anything, so
        // split after its closing parenthesis.
        let Some((_, rest)) = stat.rsplit_once(')') else { return false };
        let mut f = rest.split_whitespace();
        let (state, _ppid, pgrp) = (f.next(), f.next(), f.next());
        pgrp == Some(pgid) && state != Some("Z")
    })
}

/// `kill -9` of a `tidemark consume` whose commands hold entries: a second
/// consumer finishes them within about a lease lifetime (1 s), not after
/// claim_idle (60 s), and every element is processed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_a_consumer_fails_over_within_the_lease_time() {
    let redis = RedisServer::start();
    let mut conn = redis.conn().await;
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    let done = dir.path().join("done");
    let _cleanup = KillGroups(pids.clone());
    let (pids_s, done_s) = (pids.to_str().unwrap(), done.to_str().unwrap());
    let envs = [("TIDEMARK__LEASE__TTL", "1s"), ("PIDS", pids_s), ("DONE", done_s)];
    let url = redis.url();
    let fast = ["--claim-idle", "60s", "--concurrency", "4"];
    let mut a = spawn_consume(
        &url,
        "a",
        &fast,
        &["sh", "-c", r#"echo $$ >> "$PIDS"; sleep 30; echo "$TIDEMARK_ID a" >> "$DONE""#],
        &envs,
    );
    let ids = ["k1", "k2", "k3", "k4"];
    for id in ids {
        release(&mut conn, id.as_bytes(), 1, &[]).await;
    }
    wait_until_async("consumer a runs all four commands", WAIT, || {
        let n = lines(&pids).len();
        let mut c = conn.clone();
        async move { n == 4 && pending(&mut c, "g", Some("a")).await == 4 }
    })
    .await;
    let b = spawn_consume(
        &url,
        "b",
        &fast,
        &["sh", "-c", r#"echo "$TIDEMARK_ID $TIDEMARK_CONSUMER $TIDEMARK_DELIVERY" >> "$DONE""#],
        &envs,
    );
    a.kill9();
    let killed = Instant::now();
    wait_until_async("consumer b finishes a's four elements", WAIT, || {
        let n = lines(&done).len();
        let mut c = conn.clone();
        async move { n == 4 && pending(&mut c, "g", None).await == 0 }
    })
    .await;
    let failover = killed.elapsed();
    eprintln!("failover after kill -9: {failover:?} (lease ttl 1s, claim_idle 60s)");
    let mut got = lines(&done);
    got.sort();
    assert_eq!(got, ["k1 b 2", "k2 b 2", "k3 b 2", "k4 b 2"], "log of b:\n{}", b.log());
    assert!(failover < Duration::from_secs(10), "failover took {failover:?}: not the lease but claim_idle?");
    assert!(b.log().contains("took over the pending entries of a consumer whose lease expired"), "{}", b.log());
}

/// The command contract: the JSON on stdin (exactly, with binary values),
/// the environment, exit 0 acknowledges and exit 1 is retried, and the
/// command's stdout reaches the log tagged with the element id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consume_contract_stdin_env_exit_codes_and_logs() {
    let redis = RedisServer::start();
    let mut conn = redis.conn().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let script = r#"
        f="$OUT/$TIDEMARK_ENTRY_ID.$TIDEMARK_DELIVERY"
        cat > "$f.json"
        env | grep '^TIDEMARK_' | LC_ALL=C sort > "$f.env"
        echo "hello from $TIDEMARK_ID"
        echo "to stderr" >&2
        [ "$TIDEMARK_ID" != flaky ] || [ "$TIDEMARK_DELIVERY" -ge 2 ]
    "#;
    let d = spawn_consume(
        &redis.url(),
        "c",
        &["--claim-idle", "300ms", "--max-deliveries", "3"],
        &["sh", "-c", script],
        &[("OUT", out)],
    );
    let plain =
        release(&mut conn, b"plain", 1_700_000_000_000, &[(b"customer", b"7"), (b"note", "\"é\"\n".as_bytes())]).await;
    let binary =
        release(&mut conn, &[0xff, b'x'], -5, &[(b"raw", &[0, 0xff]), (&[0xc3], b"v"), (b"raw", b"again")]).await;
    let flaky = release(&mut conn, b"flaky", 2, &[]).await;
    wait_until_async("all three are acknowledged", WAIT, || {
        let mut c = conn.clone();
        let done = dir.path().join(format!("{flaky}.2.json")).exists();
        async move { done && pending(&mut c, "g", None).await == 0 }
    })
    .await;
    let read = |name: String| std::fs::read_to_string(dir.path().join(name)).unwrap();
    assert_eq!(
        read(format!("{plain}.1.json")),
        "{\"id\":\"plain\",\"ts\":1700000000000,\"fields\":{\"customer\":\"7\",\"note\":\"\\\"é\\\"\\n\"}}\n"
    );
    assert_eq!(
        read(format!("{binary}.1.json")),
        concat!(
            "{\"id\":{\"base64\":\"/3g=\"},\"ts\":-5,",
            "\"fields\":{\"raw\":[{\"base64\":\"AP8=\"},\"again\"]},",
            "\"pairs\":[[\"raw\",{\"base64\":\"AP8=\"}],[{\"base64\":\"ww==\"},\"v\"],[\"raw\",\"again\"]]}\n"
        )
    );
    assert_eq!(read(format!("{flaky}.2.json")), "{\"id\":\"flaky\",\"ts\":2,\"fields\":{}}\n");
    let env = |entry: &str, delivery: u64, id: &str, ts: &str| {
        format!(
            "TIDEMARK_CONSUMER=c\nTIDEMARK_DELIVERY={delivery}\nTIDEMARK_ENTRY_ID={entry}\nTIDEMARK_GROUP=g\n\
             TIDEMARK_ID={id}\nTIDEMARK_MAX_DELIVERIES=3\nTIDEMARK_TS={ts}\n"
        )
    };
    assert_eq!(read(format!("{plain}.1.env")), env(&plain, 1, "plain", "1700000000000"));
    assert_eq!(
        read(format!("{binary}.1.env")),
        env(&binary, 1, "/3g=", "-5").replace("TIDEMARK_ID=/3g=\n", "TIDEMARK_ID=/3g=\nTIDEMARK_ID_ENCODING=base64\n")
    );
    assert_eq!(read(format!("{flaky}.1.env")), env(&flaky, 1, "flaky", "2"));
    assert_eq!(read(format!("{flaky}.2.env")), env(&flaky, 2, "flaky", "2"));
    assert!(!dir.path().join(format!("{plain}.2.json")).exists(), "exit 0 acknowledged plain at once");
    assert_eq!(read_stream_async(&mut conn, &keys().dead).await, vec![]);
    let log = d.log();
    let tagged = |needle: &str, id: &str| log.lines().any(|l| l.contains(needle) && l.contains(&format!("id={id} ")));
    assert!(tagged("hello from plain", "plain"), "stdout line tagged with the id; log:\n{log}");
    assert!(tagged("to stderr", "flaky") && log.contains("stream=stderr"), "stderr tagged; log:\n{log}");
    assert!(log.contains("exited with status 1"), "the failure is logged; log:\n{log}");
}

/// A command running past --timeout is killed with its whole process
/// group and retried; after --max-deliveries it is in :dead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consume_timeout_kills_the_command_and_retries() {
    let redis = RedisServer::start();
    let mut conn = redis.conn().await;
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    let _cleanup = KillGroups(pids.clone());
    let _d = spawn_consume(
        &redis.url(),
        "c",
        &["--timeout", "500ms", "--claim-idle", "300ms", "--max-deliveries", "2"],
        &["sh", "-c", r#"echo $$ >> "$PIDS"; sleep 30 & sleep 30"#],
        &[("PIDS", pids.to_str().unwrap())],
    );
    let started = Instant::now();
    let entry = release(&mut conn, b"sleepy", 1, &[]).await;
    wait_dead(&conn, 1, "the sleepy element is dead-lettered").await;
    eprintln!("two 500ms timeouts and a retry took {:?}", started.elapsed());
    let dead = read_stream_async(&mut conn, &keys().dead).await;
    assert_eq!(field(&dead[0].1, "detail"), Some(&b"delivery 2 of 2 failed: timed out after 500ms; killed"[..]));
    assert_eq!(field(&dead[0].1, "origin_id"), Some(entry.as_bytes()));
    assert_eq!(pending(&mut conn, "g", None).await, 0);
    let runs = lines(&pids);
    assert_eq!(runs.len(), 2, "killed once, retried once");
    for pid in &runs {
        wait_until(&format!("process group {pid} (with a background sleep) is gone"), Duration::from_secs(2), || {
            !group_alive(pid)
        });
    }
}

/// SIGTERM: no more reads, the running command finishes and is
/// acknowledged, the lease is deleted, exit code 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consume_sigterm_drains_and_exits_0() {
    let redis = RedisServer::start();
    let mut conn = redis.conn().await;
    let dir = tempfile::tempdir().unwrap();
    let started = dir.path().join("started");
    let done = dir.path().join("done");
    let mut d = spawn_consume(
        &redis.url(),
        "c",
        &[],
        &["sh", "-c", r#"echo "$TIDEMARK_ID" >> "$STARTED"; sleep 1; echo "$TIDEMARK_ID" >> "$DONE""#],
        &[("STARTED", started.to_str().unwrap()), ("DONE", done.to_str().unwrap())],
    );
    release(&mut conn, b"in-flight", 1, &[]).await;
    wait_lines(&started, 1, "the command starts").await;
    d.sigterm();
    let status = d.wait_exit(WAIT).expect("consume exits after SIGTERM");
    assert_eq!(status.code(), Some(0), "log:\n{}", d.log());
    assert_eq!(lines(&done), ["in-flight"], "the running command was allowed to finish");
    assert_eq!(pending(&mut conn, "g", None).await, 0, "and its element was acknowledged");
    assert_eq!(lines(&started), ["in-flight"], "started once");
    let lease: bool = redis::cmd("EXISTS").arg(keys().lease("out", "g", "c")).query_async(&mut conn).await.unwrap();
    assert!(!lease, "the lease is deleted on exit");
    assert!(d.log().contains("consumer stopped"), "{}", d.log());
}

/// A command that cannot be started is a failure, logged clearly, and
/// ends in :dead like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consume_missing_command_is_a_failure() {
    let redis = RedisServer::start();
    let mut conn = redis.conn().await;
    let d = spawn_consume(&redis.url(), "c", &["--max-deliveries", "1"], &["/nonexistent/tidemark-handler"], &[]);
    release(&mut conn, b"x", 1, &[]).await;
    wait_dead(&conn, 1, "the element is dead-lettered").await;
    let dead = read_stream_async(&mut conn, &keys().dead).await;
    let detail = String::from_utf8_lossy(field(&dead[0].1, "detail").unwrap()).into_owned();
    assert!(detail.contains("cannot run \"/nonexistent/tidemark-handler\""), "{detail}");
    let log = d.log();
    assert!(log.contains("the command is not found"), "{log}");
    assert!(log.contains("cannot run the command"), "{log}");
}

/// `tidemark consume` survives a Redis restart: it reconnects and goes on
/// with new elements.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consume_survives_a_redis_restart() {
    let mut redis = RedisServer::start_with(RedisOptions { aof: true, ..RedisOptions::default() });
    let dir = tempfile::tempdir().unwrap();
    let done = dir.path().join("done");
    let mut d = spawn_consume(
        &redis.url(),
        "c",
        &[],
        &["sh", "-c", r#"echo "$TIDEMARK_ID" >> "$DONE""#],
        &[("DONE", done.to_str().unwrap()), ("TIDEMARK__DAEMON__RECONNECT_MAX", "500ms")],
    );
    let mut conn = redis.conn().await;
    release(&mut conn, b"before", 1, &[]).await;
    wait_lines(&done, 1, "before is handled").await;
    redis.restart();
    let mut conn = redis.conn().await;
    release(&mut conn, b"after", 2, &[]).await;
    wait_until_async("after is handled once Redis is back", WAIT, || {
        let n = lines(&done).len();
        let mut c = conn.clone();
        async move { n == 2 && pending(&mut c, "g", None).await == 0 }
    })
    .await;
    assert_eq!(lines(&done), ["before", "after"]);
    assert!(d.is_running());
    assert!(d.log().contains("lost the connection to Redis"), "{}", d.log());
}
