//! Hostile data and keys through a real Redis: generated entries (binary and
//! NUL ids, 1 MiB values, 10,000 fields, ts at and one past ±(2^53-1),
//! repeated reserved fields, empty strings) never panic the daemon or stall
//! a batch, and each ends up released exactly once, byte for byte, or
//! dead-lettered with its reason; keys of the wrong type are named in the
//! log and retried slowly until repaired; a deleted output group, a deleted
//! `:in` and `FLUSHALL` are recreated and the work goes on. The volume of
//! generated cases lives in the parser's property test
//! (`src/store/hostile.rs`); here `TIDEMARK_FUZZ_REDIS_CASES` entries (default
//! 100,000) go through Redis.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tidemark::core::op::{parse, Limits, Op};

use testkit::{field, get, keys, metric, read_stream, wait_until, Daemon, RedisServer};

const WAIT: Duration = Duration::from_secs(120);
const TS_MAX: i64 = (1 << 53) - 1;
/// Entries among which the heavy shapes (1 MiB values, 10,000 fields) fall.
const HEAVY_CASES: u64 = 2000;

/// xorshift64*: a small deterministic generator (the seed is printed, so a
/// failing run can be repeated with `TIDEMARK_FUZZ_SEED`).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bytes(&mut self, max: u64) -> Vec<u8> {
        let n = self.below(max + 1);
        (0..n).map(|_| self.next() as u8).collect()
    }
    fn ts(&mut self) -> i64 {
        match self.below(6) {
            0 => TS_MAX,
            1 => -TS_MAX,
            2 => self.below(1000) as i64 - 500,
            _ => (self.next() % (2 * TS_MAX as u64 + 1)) as i64 - TS_MAX,
        }
    }
}

type Fields = Vec<(Vec<u8>, Vec<u8>)>;

fn f(name: &[u8], value: impl Into<Vec<u8>>) -> (Vec<u8>, Vec<u8>) {
    (name.to_vec(), value.into())
}

/// Entry number `i`: a valid add most of the time, otherwise one of the
/// hostile shapes. Valid adds have unique (binary) ids.
fn generate(rng: &mut Rng, i: u64) -> Fields {
    let mut id = format!("{i:06}").into_bytes();
    id.extend(rng.bytes(24));
    let payload = |rng: &mut Rng| -> Fields {
        (0..rng.below(5))
            .map(|_| {
                let mut name = b"p".to_vec();
                name.extend(rng.bytes(6));
                (name, rng.bytes(40))
            })
            .collect()
    };
    let ts = rng.ts().to_string();
    let add = |id: Vec<u8>, ts: String, mut rest: Fields| {
        let mut fields = vec![f(b"op", "add"), f(b"id", id), f(b"ts", ts)];
        fields.append(&mut rest);
        fields
    };
    // The 1 MiB values and 10,000-field entries only among the first
    // HEAVY_CASES (about 60 of them): past that, Redis's memory, not the
    // variety, would grow.
    let roll = match rng.below(100) {
        55..=57 if i >= HEAVY_CASES => 0,
        roll => roll,
    };
    match roll {
        0..=54 => add(id, ts, payload(rng)),
        55 => add(id, ts, vec![f(b"big", vec![0u8; (1 << 20) - 100])]),
        56 => add(id, ts, vec![f(b"big", vec![7u8; 1 << 20])]),
        57 => add(id, ts, (0..10_000).map(|k| (format!("f{k}").into_bytes(), b"v".to_vec())).collect()),
        58..=61 => add(id, (TS_MAX + 1).to_string(), vec![]),
        62..=63 => add(id, (-TS_MAX - 1).to_string(), vec![]),
        64..=65 => add(id, "+00042".into(), payload(rng)),
        66..=67 => add(id, String::new(), vec![]),
        68..=69 => add(Vec::new(), ts, vec![]),
        70..=71 => vec![f(b"op", "add"), f(b"op", "add"), f(b"id", id), f(b"ts", ts)],
        72..=73 => vec![f(b"op", "add"), f(b"id", id.clone()), f(b"id", id), f(b"ts", ts)],
        74..=75 => vec![f(b"op", "add"), f(b"id", id), f(b"ts", ts.clone()), f(b"ts", ts)],
        76..=77 => vec![f(b"id", id), f(b"ts", ts)],
        78..=79 => vec![f(b"op", rng.bytes(6)), f(b"id", id)],
        80..=81 => vec![f(b"", ""), f(b"op", ""), f(b"id", ""), f(b"ts", "")],
        82..=85 => vec![f(b"op", "cancel"), f(b"id", format!("never-{i}"))],
        86..=89 => vec![f(b"op", "watermark"), f(b"ts", rng.ts().to_string())],
        90..=91 => vec![f(b"op", "add"), f(b"id", vec![0u8; 2000]), f(b"ts", ts)],
        _ => {
            let mut fields = payload(rng);
            fields.insert(0, f(b"op", "add"));
            fields.push(f(b"id", id));
            fields.push(f(b"ts", ts));
            fields
        }
    }
}

/// `XADD`s `entries` in pipelines of about 1 MiB.
fn write(conn: &mut redis::Connection, stream: &str, entries: &[Fields]) {
    let mut pipe = redis::pipe();
    let mut bytes = 0;
    for e in entries {
        let cmd = pipe.cmd("XADD").arg(stream).arg("*");
        for (k, v) in e {
            cmd.arg(k.as_slice()).arg(v.as_slice());
            bytes += k.len() + v.len();
        }
        cmd.ignore();
        if bytes > 1 << 20 {
            let () = pipe.query(conn).unwrap();
            pipe = redis::pipe();
            bytes = 0;
        }
    }
    let () = pipe.query(conn).unwrap();
}

/// Generated hostile entries through a daemon: every one is applied or
/// dead-lettered, valid adds released once each byte for byte, within the
/// deadline, and the daemon never panics.
#[test]
fn hostile_entries_through_redis_are_applied_or_dead_lettered() {
    let n: u64 = std::env::var("TIDEMARK_FUZZ_REDIS_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let seed: u64 = std::env::var("TIDEMARK_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x5eed_7fde);
    let mut rng = Rng(seed | 1);
    let entries: Vec<Fields> = (0..n).map(|i| generate(&mut rng, i)).collect();
    let limits = Limits::default();
    let mut adds: BTreeMap<Vec<u8>, (i64, Fields)> = BTreeMap::new();
    let mut dead: BTreeMap<&'static str, usize> = BTreeMap::new();
    for e in &entries {
        match parse(e, &limits) {
            Ok(Op::Add { id, ts, payload }) => {
                adds.insert(id.to_vec(), (ts, payload.into_iter().cloned().collect()));
            }
            Ok(_) => {}
            Err(r) => *dead.entry(r.reason.code()).or_default() += 1,
        }
    }
    let dead_total: usize = dead.values().sum();
    assert!(adds.len() > (n as usize) / 3 && dead.len() >= 6, "the generator covers the cases: {dead:?}");

    let redis = RedisServer::start();
    let k = keys("default");
    // Every dead letter is counted: housekeeping must not cap `:dead` first.
    let dead_maxlen = (n + 1000).to_string();
    let daemon = Daemon::spawn(
        &["run", "--redis-url", &redis.url(), "--consumer", "d1"],
        &[("RUST_LOG", "info"), ("TIDEMARK__HOUSEKEEPING__DEAD_MAXLEN", &dead_maxlen)],
    );
    daemon.wait_log("connected to Redis", WAIT);
    let mut conn = redis.sync_conn();
    let started = Instant::now();
    write(&mut conn, &k.input, &entries);
    write(&mut conn, &k.input, &[vec![f(b"op", "watermark"), f(b"ts", TS_MAX.to_string())]]);
    wait_until("every entry is applied or dead-lettered", WAIT, || {
        let out: usize = redis::cmd("XLEN").arg(&k.out).query(&mut redis.sync_conn()).unwrap_or(0);
        let dl: usize = redis::cmd("XLEN").arg(&k.dead).query(&mut redis.sync_conn()).unwrap_or(0);
        out == adds.len() && dl == dead_total
    });
    let elapsed = started.elapsed();

    let mut released: BTreeMap<Vec<u8>, usize> = BTreeMap::new();
    for (_, fields) in read_stream(&mut conn, &k.out) {
        let id = field(&fields, "id").expect("id").to_vec();
        let (ts, payload) = adds.get(&id).unwrap_or_else(|| panic!("released an unknown id {id:?}"));
        assert_eq!(field(&fields, "ts"), Some(ts.to_string().as_bytes()), "canonical ts");
        assert_eq!(&fields[2..], payload.as_slice(), "the payload byte for byte");
        *released.entry(id).or_default() += 1;
    }
    assert!(released.values().all(|n| *n == 1) && released.len() == adds.len(), "each valid add released once");
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    for (_, fields) in read_stream(&mut conn, &k.dead) {
        *reasons.entry(String::from_utf8_lossy(field(&fields, "reason").unwrap()).into_owned()).or_default() += 1;
    }
    let want: BTreeMap<String, usize> = dead.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    assert_eq!(reasons, want, "dead letters by reason");
    let pending: (u64, Option<String>, Option<String>, redis::Value) =
        redis::cmd("XPENDING").arg(&k.input).arg("tidemark").query(&mut conn).unwrap();
    assert_eq!(pending.0, 0, "nothing left pending");
    assert!(!daemon.log().contains("panicked"), "{}", daemon.log());
    eprintln!(
        "hostile entries through Redis: {n} entries (seed {seed:#x}), {} adds released, {dead_total} dead letters \
         {dead:?}, all done {elapsed:?} after the first was written",
        adds.len()
    );
}

fn add(redis: &RedisServer, id: &str, ts: i64) {
    let _: String = redis::cmd("XADD")
        .arg(keys("default").input)
        .arg("*")
        .arg("op")
        .arg("add")
        .arg("id")
        .arg(id)
        .arg("ts")
        .arg(ts)
        .query(&mut redis.sync_conn())
        .unwrap();
}

fn watermark(redis: &RedisServer, ts: i64) {
    let _: String = redis::cmd("XADD")
        .arg(keys("default").input)
        .arg("*")
        .arg("op")
        .arg("watermark")
        .arg("ts")
        .arg(ts)
        .query(&mut redis.sync_conn())
        .unwrap();
}

fn released_ids(redis: &RedisServer) -> Vec<String> {
    read_stream(&mut redis.sync_conn(), &keys("default").out)
        .into_iter()
        .map(|(_, f)| String::from_utf8_lossy(field(&f, "id").unwrap_or_default()).into_owned())
        .collect()
}

/// `:out` and then `:sched` overwritten with a string: the daemon names the
/// key in its log, retries slowly (no hot loop, no crash), and the work
/// resumes once the key is deleted.
#[test]
fn a_key_of_the_wrong_type_is_named_and_the_work_resumes_once_it_is_deleted() {
    let redis = RedisServer::start();
    let k = keys("default");
    let mut d = Daemon::spawn(
        &["run", "--redis-url", &redis.url(), "--consumer", "d1", "--group", "g", "--http", "127.0.0.1:0"],
        &[],
    );
    let addr = d.http_addr(WAIT);
    wait_until("/readyz answers 200", WAIT, || get(addr, "/readyz").0 == 200);
    let mut conn = redis.sync_conn();
    add(&redis, "a", 1);
    watermark(&redis, 1);
    wait_until("a is released", WAIT, || released_ids(&redis) == ["a"]);

    let () = redis::cmd("SET").arg(&k.out).arg("not a stream").query(&mut conn).unwrap();
    add(&redis, "b", 2);
    watermark(&redis, 2);
    d.wait_log(&format!("{} holds a string, not a stream", k.out), WAIT);
    let errors = || metric(&get(addr, "/metrics").1, r#"tidemark_redis_errors_total{class="wrongtype"}"#);
    wait_until("the refusals are counted", WAIT, || errors().is_some());
    let first = errors().unwrap_or(0.0);
    std::thread::sleep(Duration::from_secs(4));
    let during = errors().unwrap_or(0.0) - first;
    assert!(during <= 20.0, "{during} wrongtype errors in 4 s: a hot loop");
    let () = redis::cmd("DEL").arg(&k.out).query(&mut conn).unwrap();
    wait_until("b is released once :out is deleted", WAIT, || released_ids(&redis) == ["b"]);
    d.wait_log("an output group was missing", WAIT);

    let () = redis::cmd("SET").arg(&k.sched).arg("not a sorted set").query(&mut conn).unwrap();
    add(&redis, "c", 100);
    d.wait_log(&format!("{} holds a string, not a zset", k.sched), WAIT);
    let () = redis::cmd("DEL").arg(&k.sched).query(&mut conn).unwrap();
    watermark(&redis, 100);
    wait_until("c is released once :sched is deleted", WAIT, || released_ids(&redis) == ["b", "c"]);
    assert!(d.is_running(), "the daemon never exits over a key");
    eprintln!("wrong-type keys: {during} refusals counted in 4 s while :out was a string");
}

/// A deleted output group, a deleted `:in` and `FLUSHALL`, each while a
/// daemon and a consumer run: each is recreated (groups at id 0, the meta
/// record), and the next element is handled; nothing loops hot, nothing
/// exits.
#[test]
fn deleted_groups_streams_and_flushall_are_recreated() {
    let redis = RedisServer::start();
    let k = keys("default");
    let envs = [("TIDEMARK__CONSUME__BLOCK", "500ms"), ("TIDEMARK__DAEMON__BLOCK", "500ms")];
    let mut d = Daemon::spawn(
        &["run", "--redis-url", &redis.url(), "--consumer", "d1", "--group", "g", "--http", "127.0.0.1:0"],
        &envs,
    );
    let addr = d.http_addr(WAIT);
    wait_until("/readyz answers 200", WAIT, || get(addr, "/readyz").0 == 200);
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("handled");
    let command = format!("cat >> '{}'; echo >> '{}'", file.display(), file.display());
    let mut c = Daemon::spawn(
        &["consume", "--redis-url", &redis.url(), "--group", "g", "--consumer", "c1", "--", "sh", "-c", &command],
        &envs,
    );
    c.wait_log("consuming", WAIT);
    let handled = |id: &str| std::fs::read_to_string(&file).unwrap_or_default().contains(&format!("\"{id}\""));
    let mut conn = redis.sync_conn();
    add(&redis, "a", 1);
    watermark(&redis, 1);
    wait_until("a is handled", WAIT, || handled("a"));

    let started = Instant::now();
    let _: u64 = redis::cmd("XGROUP").arg("DESTROY").arg(&k.out).arg("g").query(&mut conn).unwrap();
    add(&redis, "b", 2);
    watermark(&redis, 2);
    wait_until("b is handled after the group was destroyed", WAIT, || handled("b"));
    let group = started.elapsed();

    let started = Instant::now();
    let () = redis::cmd("DEL").arg(&k.input).query(&mut conn).unwrap();
    add(&redis, "c", 3);
    watermark(&redis, 3);
    wait_until("c is handled after :in was deleted", WAIT, || handled("c"));
    let input = started.elapsed();
    d.wait_log("the input group was missing", WAIT);

    let started = Instant::now();
    let () = redis::cmd("FLUSHALL").query(&mut conn).unwrap();
    add(&redis, "d", 4);
    watermark(&redis, 4);
    wait_until("d is handled after FLUSHALL", WAIT, || handled("d"));
    let flushed = started.elapsed();
    wait_until("the meta record is written again", WAIT, || {
        redis::cmd("HGET")
            .arg("tidemark:{default}:meta")
            .arg("partitions")
            .query::<Option<String>>(&mut redis.sync_conn())
            .ok()
            .flatten()
            == Some("1".into())
    });
    let nogroup = metric(&get(addr, "/metrics").1, r#"tidemark_redis_errors_total{class="nogroup"}"#).unwrap_or(0.0);
    assert!(nogroup <= 20.0, "{nogroup} nogroup errors: a hot loop");
    assert!(d.is_running() && c.is_running(), "nothing exits");
    eprintln!(
        "recreation: handling resumed {group:?} after XGROUP DESTROY, {input:?} after DEL :in, {flushed:?} after \
         FLUSHALL; the daemon counted {nogroup} nogroup errors"
    );
}
