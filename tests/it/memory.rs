//! Redis's memory limit: an evicting `maxmemory-policy` is a warning naming
//! the policy at start and at every check, and so is a Redis over 90% of
//! its limit; a full Redis (`noeviction`) refuses the apply script's first
//! write, so a batch is applied whole or not at all, the daemon says why
//! in its log and in `/readyz`, retries no faster than a second, and
//! resumes by itself when memory frees.

use std::time::{Duration, Instant};

use testkit::{field, get, keys, metric, read_stream, wait_until, Daemon, RedisOptions, RedisServer};

const WAIT: Duration = Duration::from_secs(60);

/// The daemon warns about an evicting policy at start and at every check
/// (`daemon.memory_check_interval`), naming it, and stops once the policy
/// is `noeviction`.
#[test]
fn an_evicting_policy_is_a_warning_at_start_and_at_every_check() {
    let redis = RedisServer::start_with(RedisOptions {
        extra_args: vec!["--maxmemory".into(), "100mb".into(), "--maxmemory-policy".into(), "allkeys-lru".into()],
        ..RedisOptions::default()
    });
    let d = Daemon::spawn(
        &["run", "--redis-url", &redis.url(), "--consumer", "d1"],
        &[("TIDEMARK__DAEMON__MEMORY_CHECK_INTERVAL", "500ms"), ("TIDEMARK__LEASE__TTL", "1s")],
    );
    d.wait_log("maxmemory-policy allkeys-lru", WAIT);
    let mut conn = redis.sync_conn();
    let () = redis::cmd("CONFIG").arg("SET").arg("maxmemory-policy").arg("volatile-ttl").query(&mut conn).unwrap();
    let warnings = |policy: &str| d.log().matches(&format!("(maxmemory-policy {policy})")).count();
    wait_until("the warning names the new policy, again and again", WAIT, || warnings("volatile-ttl") >= 2);
    let () = redis::cmd("CONFIG").arg("SET").arg("maxmemory-policy").arg("noeviction").query(&mut conn).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let before = warnings("volatile-ttl");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(warnings("volatile-ttl"), before, "no warning once the policy is noeviction:\n{}", d.log());
    assert!(d.log().contains("WARN"), "the warning is a warning");
}

/// A Redis over 90% of its `maxmemory` (under `noeviction`) is a warning at
/// every check, saying what happens at the limit; none once the limit is
/// raised.
#[test]
fn a_nearly_full_redis_is_a_warning_at_every_check() {
    let redis = RedisServer::start();
    let mut conn = redis.sync_conn();
    let d = Daemon::spawn(
        &["run", "--redis-url", &redis.url(), "--consumer", "d1", "--http", "127.0.0.1:0"],
        &[("TIDEMARK__DAEMON__MEMORY_CHECK_INTERVAL", "500ms"), ("TIDEMARK__LEASE__TTL", "1s")],
    );
    let addr = d.http_addr(WAIT);
    wait_until("/readyz answers 200", WAIT, || get(addr, "/readyz").0 == 200);
    let warnings = || d.log().matches("Redis is over 90% of maxmemory").count();
    assert_eq!(warnings(), 0, "no warning without a limit:\n{}", d.log());
    // About 95% full once the daemon runs, with 10 MiB of other data, so
    // that the ups and downs of buffers (some 100 KiB) neither reach the
    // limit nor fall under the warning's threshold.
    // (Appended in small pieces: one 10 MiB command would leave as much
    // again in a query buffer for a while.)
    for _ in 0..160 {
        let _: u64 = redis::cmd("APPEND").arg("filler").arg(vec![b'x'; 64 << 10]).query(&mut conn).unwrap();
    }
    let info: String = redis::cmd("INFO").arg("memory").query(&mut conn).unwrap();
    let used: u64 = info.lines().find_map(|l| l.strip_prefix("used_memory:")).unwrap().trim().parse().unwrap();
    let () = redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg(used * 100 / 95).query(&mut conn).unwrap();
    wait_until("the warning, again and again", WAIT, || warnings() >= 3);
    let log = d.log();
    let line = log.lines().find(|l| l.contains("over 90% of maxmemory")).expect("the warning");
    assert!(line.contains("WARN") && line.contains("refuses writes (OOM)"), "{line}");
    assert!(!log.contains("out of memory"), "the limit itself was never reached:\n{log}");
    assert_eq!(get(addr, "/readyz").0, 200, "nearly full is a warning, not unreadiness");
    let () = redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg("100mb").query(&mut conn).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let before = warnings();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(warnings(), before, "no warning once the limit is far away:\n{}", d.log());
}

/// Redis full under `noeviction`: input written before Redis filled up is
/// read but not applied, not half of it, not any of it (nothing scheduled,
/// released or acknowledged); the log says Redis is out of memory and
/// `/readyz` is 503 with the `oom` class; retries are paced (a second at
/// first, growing); once memory frees, everything is applied and released
/// exactly once, without a restart.
#[test]
fn a_full_redis_applies_nothing_half_way_and_resumes_when_memory_frees() {
    let redis = RedisServer::start();
    let k = keys("default");
    let d = Daemon::spawn(
        &["run", "--redis-url", &redis.url(), "--consumer", "d1", "--http", "127.0.0.1:0"],
        &[("TIDEMARK__DAEMON__RECONNECT_MAX", "2s")],
    );
    let addr = d.http_addr(WAIT);
    wait_until("/readyz answers 200", WAIT, || get(addr, "/readyz").0 == 200);
    let mut conn = redis.sync_conn();

    // The input arrives while the daemon is stopped, then Redis fills up.
    d.signal("STOP");
    let mut pipe = redis::pipe();
    for i in 0..250 {
        pipe.cmd("XADD")
            .arg(&k.input)
            .arg("*")
            .arg("op")
            .arg("add")
            .arg("id")
            .arg(format!("el-{i:03}"))
            .arg("ts")
            .arg(i);
        if i == 199 {
            pipe.cmd("XADD").arg(&k.input).arg("*").arg("op").arg("watermark").arg("ts").arg(99);
        }
    }
    let _: Vec<String> = pipe.query(&mut conn).unwrap();
    let info: String = redis::cmd("INFO").arg("memory").query(&mut conn).unwrap();
    let used: u64 = info.lines().find_map(|l| l.strip_prefix("used_memory:")).unwrap().trim().parse().unwrap();
    let () = redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg(used + (1 << 20)).query(&mut conn).unwrap();
    let filler = vec![b'x'; 64 * 1024];
    let mut fillers = 0;
    loop {
        match redis::cmd("SET").arg(format!("filler:{fillers}")).arg(&filler).query::<()>(&mut conn) {
            Ok(()) => fillers += 1,
            Err(e) if e.code() == Some("OOM") => break,
            Err(e) => panic!("filling Redis: {e}"),
        }
        assert!(fillers < 1000, "Redis never filled up");
    }
    // Memory use wobbles (buffers come and go): keep it over the limit
    // until the fillers are deleted, which frees about 1 MiB.
    let info: String = redis::cmd("INFO").arg("memory").query(&mut conn).unwrap();
    let used: u64 = info.lines().find_map(|l| l.strip_prefix("used_memory:")).unwrap().trim().parse().unwrap();
    let () = redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg(used - (256 << 10)).query(&mut conn).unwrap();
    let full = Instant::now();
    d.signal("CONT");

    d.wait_log("Redis is out of memory", WAIT);
    wait_until("/readyz answers 503 with the oom class", WAIT, || {
        let (status, body) = get(addr, "/readyz");
        status == 503 && body.contains("(oom)")
    });
    let reason = get(addr, "/readyz").1;
    let oom_errors = || metric(&get(addr, "/metrics").1, r#"tidemark_redis_errors_total{class="oom"}"#);
    wait_until("an oom error is counted", WAIT, || oom_errors().is_some());
    let first = oom_errors().unwrap_or(0.0);
    std::thread::sleep(Duration::from_secs(4));
    let during = oom_errors().unwrap_or(0.0) - first;
    let scheduled: u64 = redis::cmd("ZCARD").arg(&k.sched).query(&mut conn).unwrap();
    let wm: Option<String> = redis::cmd("GET").arg(&k.wm).query(&mut conn).unwrap();
    assert_eq!((scheduled, wm, read_stream(&mut conn, &k.out).len()), (0, None, 0), "nothing is applied while full");
    let pending: (u64, Option<String>, Option<String>, redis::Value) =
        redis::cmd("XPENDING").arg(&k.input).arg("tidemark").query(&mut conn).unwrap();
    assert_eq!(pending.0, 251, "read, and nothing acknowledged: {pending:?}");
    // Paced: the daemon's few Redis users retry about once a second at
    // first, then less often; a hot loop would count thousands.
    assert!(during <= 40.0, "{during} oom errors in 4 s: retries are not paced");

    let mut pipe = redis::pipe();
    for i in 0..fillers {
        pipe.cmd("DEL").arg(format!("filler:{i}"));
    }
    let _: Vec<u64> = pipe.query(&mut conn).unwrap();
    let freed = Instant::now();
    wait_until("the batch is applied once memory frees", WAIT, || {
        let scheduled: u64 = redis::cmd("ZCARD").arg(&k.sched).query(&mut redis.sync_conn()).unwrap_or(0);
        scheduled == 150
    });
    let resumed = freed.elapsed();
    let out = read_stream(&mut conn, &k.out);
    let ids: Vec<String> =
        out.iter().map(|(_, f)| String::from_utf8_lossy(field(f, "id").unwrap_or_default()).into_owned()).collect();
    let expected: Vec<String> = (0..100).map(|i| format!("el-{i:03}")).collect();
    assert_eq!(ids, expected, "the elements due are released once each, in order");
    wait_until("/readyz answers 200 again", WAIT, || get(addr, "/readyz").0 == 200);
    eprintln!(
        "full Redis: {fillers} fillers of 64 KiB filled it; /readyz said {:?}; {during} oom errors counted in 4 s; \
         work resumed {resumed:?} after memory freed ({:?} after Redis filled up)",
        reason.trim(),
        full.elapsed()
    );
}
