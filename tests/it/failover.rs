//! High availability: a Sentinel-managed master that fails over (`SENTINEL
//! FAILOVER`, and `kill -9` of the master), followed by the daemon, a
//! consumer, the CLI and the dashboard; and a failover behind one endpoint
//! (a proxy that switches its backend, as managed Redis switches a DNS
//! name), followed by every connection.
//!
//! A producer thread writes adds and watermarks all along, through the
//! current master, and records which server acknowledged each add: what
//! the new master acknowledged must all be released exactly once; what
//! only the old master acknowledged may be lost to asynchronous
//! replication, and the tests count it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use testkit::sentinel::MASTER_NAME;
use testkit::{
    field, keys, read_stream, run_cli, wait_until, Daemon, Passwords, Proxy, RedisOptions, RedisServer,
    SentinelOptions, SentinelSet, TlsFiles,
};

use crate::security::Pki;

const WAIT: Duration = Duration::from_secs(60);

/// Short leases and reconnect delays, so that a test measures tidemark's
/// reaction, not its defaults' patience; `:out` is kept whole so that the
/// tests can count what it received.
const ENVS: [(&str, &str); 4] = [
    ("TIDEMARK__LEASE__TTL", "1s"),
    ("TIDEMARK__DAEMON__RECONNECT_MAX", "500ms"),
    ("TIDEMARK__CONSUME__BLOCK", "1s"),
    ("TIDEMARK__HOUSEKEEPING__TRIM_OUTPUT", "false"),
];

/// An add the producer wrote and a server acknowledged.
#[derive(Debug, Clone)]
pub struct Acked {
    /// The element id.
    pub id: String,
    /// When the acknowledgement arrived.
    pub at: Instant,
    /// The port of the server that acknowledged it.
    pub server: u16,
}

/// Where the producer writes: a URL and the port of the server behind it.
type Resolve = Box<dyn Fn() -> Option<(String, u16)> + Send>;

/// A producer thread (see the module docs): an add every `pace` (ids
/// `el-000000`, …, ts = its number), and every fifth add a watermark a
/// few ts behind, so elements are released both late and by watermarks.
/// It resolves the master every 100 ms and after an error, and opens a
/// new connection when it moved; after an error it moves on to the next
/// id: an add whose outcome is unknown is never sent twice, so anything
/// doubled in `:out` is tidemark's doing.
pub struct Producer {
    acked: Arc<Mutex<Vec<Acked>>>,
    unknown: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Producer {
    pub fn spawn(resolve: Resolve, pace: Duration) -> Producer {
        let acked = Arc::new(Mutex::new(Vec::new()));
        let unknown = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, u, s) = (acked.clone(), unknown.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let input = keys("default").input;
            let mut conn: Option<(redis::Connection, u16)> = None;
            let mut i: i64 = 0;
            let mut resolved = Instant::now();
            while !s.load(Ordering::SeqCst) {
                if resolved.elapsed() >= Duration::from_millis(100) {
                    resolved = Instant::now();
                    let now = resolve().map(|(_, port)| port);
                    if now.is_some() && conn.as_ref().map(|(_, p)| *p) != now {
                        conn = None;
                    }
                }
                if conn.is_none() {
                    conn = resolve().and_then(|(url, port)| {
                        let c =
                            redis::Client::open(url).ok()?.get_connection_with_timeout(Duration::from_secs(1)).ok()?;
                        c.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
                        c.set_write_timeout(Some(Duration::from_secs(2))).ok()?;
                        Some((c, port))
                    });
                    if conn.is_none() {
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                }
                let (c, port) = conn.as_mut().expect("connected above");
                let port = *port;
                let id = format!("el-{i:06}");
                let added: redis::RedisResult<String> = redis::cmd("XADD")
                    .arg(&input)
                    .arg("*")
                    .arg("op")
                    .arg("add")
                    .arg("id")
                    .arg(&id)
                    .arg("ts")
                    .arg(i)
                    .query(c);
                match added {
                    Ok(_) => a.lock().unwrap().push(Acked { id, at: Instant::now(), server: port }),
                    Err(_) => {
                        u.lock().unwrap().push(id);
                        conn = None;
                    }
                }
                if i % 5 == 4 {
                    if let Some((c, _)) = conn.as_mut() {
                        let wm: redis::RedisResult<String> = redis::cmd("XADD")
                            .arg(&input)
                            .arg("*")
                            .arg("op")
                            .arg("watermark")
                            .arg("ts")
                            .arg(i - 3)
                            .query(c);
                        if wm.is_err() {
                            conn = None;
                        }
                    }
                }
                i += 1;
                std::thread::sleep(pace);
            }
        });
        Producer { acked, unknown, stop, thread: Some(thread) }
    }

    /// What was acknowledged so far.
    pub fn acked(&self) -> Vec<Acked> {
        self.acked.lock().unwrap().clone()
    }

    /// Stops the thread; returns what was acknowledged and the ids whose
    /// add failed (outcome unknown).
    pub fn stop(mut self) -> (Vec<Acked>, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().expect("producer thread");
        }
        (self.acked(), self.unknown.lock().unwrap().clone())
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// `GET path` of the process serving HTTP at `addr`: status and body.
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    testkit::http_get(&addr.to_string(), path).unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// The element ids in `:out` on the server of `conn`, with how often each
/// appears.
fn released(conn: &mut redis::Connection) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for (_, fields) in read_stream(conn, &keys("default").out) {
        let id = field(&fields, "id").map(|v| String::from_utf8_lossy(v).into_owned());
        *seen.entry(id.unwrap_or_default()).or_insert(0) += 1;
    }
    seen
}

/// The element ids a `tidemark consume` recording into `file` handled.
fn handled(file: &Path) -> BTreeSet<String> {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let mut ids = BTreeSet::new();
    let mut rest = text.as_str();
    while let Some(at) = rest.find("el-") {
        let id: String = rest[at..].chars().take(9).collect();
        ids.insert(id);
        rest = &rest[at + 3..];
    }
    ids
}

/// `tidemark consume` of group `g` appending each element's JSON to `file`.
fn spawn_recording_consumer(url: &str, file: &Path, envs: &[(&str, &str)]) -> Daemon {
    let command = format!("cat >> '{}'; echo >> '{}'", file.display(), file.display());
    let d = Daemon::spawn(
        &[
            "consume",
            "--redis-url",
            url,
            "--group",
            "g",
            "--consumer",
            "c1",
            "--concurrency",
            "4",
            "--",
            "sh",
            "-c",
            &command,
        ],
        envs,
    );
    d.wait_log("consuming", WAIT);
    d
}

/// What a failover run measured, for the assertions and the report.
struct Outcome {
    /// From the failover's start until an add the new master acknowledged
    /// was in its `:out`.
    resumed_after: Duration,
    /// Adds only the old master acknowledged that the new one never saw.
    lost: usize,
    /// Adds acknowledged in all.
    acked: usize,
}

/// Checks the new master's `:out` after a failover (see the module docs)
/// and that the consumer handled everything in it: `new` is the new
/// master's port, `conn` a connection to it.
fn check_after_failover(
    new: u16,
    conn: &mut redis::Connection,
    acked: &[Acked],
    consumed: &Path,
    started: Instant,
) -> Outcome {
    let out = released(conn);
    let doubled: Vec<_> = out.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubled.is_empty(), "elements released twice into the new master's :out: {doubled:?}");
    let missing: Vec<&Acked> = acked.iter().filter(|a| a.server == new && !out.contains_key(&a.id)).collect();
    assert!(missing.is_empty(), "adds the new master acknowledged were never released: {missing:?}");
    let lost = acked.iter().filter(|a| a.server != new && !out.contains_key(&a.id)).count();
    let first_new = acked.iter().find(|a| a.server == new).expect("the new master acknowledged adds");
    wait_until("the consumer handled every element of the new master's :out", WAIT, || {
        let done = handled(consumed);
        out.keys().all(|id| done.contains(id))
    });
    Outcome { resumed_after: first_new.at.saturating_duration_since(started), lost, acked: acked.len() }
}

/// Runs a daemon (with the dashboard), a consumer and the producer against
/// the Sentinel set, fails the master over with `fail`, and checks that
/// everything follows: work resumes on the new master, nothing the new
/// master acknowledged is lost, nothing is doubled into its `:out`, and the
/// consumer, the CLI and the dashboard work through the Sentinel URL
/// (with `opts`' passwords and TLS; `extra_envs` for every tidemark
/// process, the CLI's included).
fn sentinel_run(
    name: &str,
    opts: SentinelOptions,
    extra_envs: &[(&str, &str)],
    fail: impl FnOnce(&mut SentinelSet, u16),
) -> Outcome {
    let mut set = SentinelSet::start_with(opts);
    let url = set.url();
    let old = set.master_port();
    let envs: Vec<(&str, &str)> = ENVS.iter().chain(extra_envs).copied().collect();
    let daemon = Daemon::spawn(
        &["run", "--redis-url", &url, "--consumer", "d1", "--group", "g", "--http", "127.0.0.1:0"],
        &envs,
    );
    let addr: SocketAddr = daemon.http_addr(WAIT);
    wait_until("/readyz answers 200", WAIT, || get(addr, "/readyz").0 == 200);
    let dir = tempfile::tempdir().expect("tempdir");
    let consumed = dir.path().join("consumed");
    let consumer = spawn_recording_consumer(&url, &consumed, &envs);
    let lookup = set.lookup();
    let producer = Producer::spawn(Box::new(move || lookup.master()), Duration::from_millis(4));
    wait_until("work flows before the failover", WAIT, || released(&mut set.data_conn(old)).len() >= 100);

    let started = Instant::now();
    fail(&mut set, old);
    wait_until("the Sentinels name a new master", WAIT, || set.master_port() != old);
    let switched = started.elapsed();
    let new = set.master_port();
    wait_until("the new master acknowledges adds and releases them", WAIT, || {
        let out = released(&mut set.data_conn(new));
        producer.acked().iter().filter(|a| a.server == new).any(|a| out.contains_key(&a.id))
    });
    let resumed = started.elapsed();
    wait_until("200 more adds on the new master", WAIT, || {
        producer.acked().iter().filter(|a| a.server == new).count() >= 200
    });
    let (acked, unknown) = producer.stop();

    // The CLI finds the new master through the Sentinels too: its
    // watermark releases everything still scheduled.
    let cli = run_cli(&["--redis-url", &url, "watermark", "1000000000"], extra_envs);
    assert!(cli.status.success(), "watermark through Sentinel: {}", String::from_utf8_lossy(&cli.stderr));
    wait_until("every add the new master acknowledged is released", WAIT, || {
        let out = released(&mut set.data_conn(new));
        acked.iter().filter(|a| a.server == new).all(|a| out.contains_key(&a.id))
    });
    let outcome = check_after_failover(new, &mut set.data_conn(new), &acked, &consumed, started);

    let status = run_cli(&["--redis-url", &url, "status", "--json"], extra_envs);
    assert!(status.status.success(), "status through Sentinel: {}", String::from_utf8_lossy(&status.stderr));
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status --json");
    assert_eq!(json["watermark"], serde_json::json!(1_000_000_000), "{json}");
    let (status, dashboard) = get(addr, "/api/dashboard");
    assert_eq!(status, 200, "{dashboard}");
    assert!(dashboard.contains("1000000000"), "the dashboard reads the new master: {dashboard}");
    wait_until("/readyz answers 200 on the new master", WAIT, || get(addr, "/readyz").0 == 200);

    eprintln!(
        "{name}: Sentinels switched after {switched:?}; work resumed on the new master {resumed:?} after the \
         failover began (first add it acknowledged released after {:?}); {} adds acknowledged, {} lost (only the \
         old master had them), {} with unknown outcome, {} released on the new master, none twice",
        outcome.resumed_after,
        outcome.acked,
        outcome.lost,
        unknown.len(),
        released(&mut set.data_conn(new)).len()
    );
    drop(consumer);
    drop(daemon);
    outcome
}

/// `SENTINEL FAILOVER` mid-run: the daemon, a consumer, the CLI and the
/// dashboard follow the master to the promoted replica within seconds;
/// nothing is doubled into `:out`, nothing the new master acknowledged is
/// lost.
#[test]
fn sentinel_failover_is_followed() {
    let outcome = sentinel_run("SENTINEL FAILOVER", SentinelOptions::default(), &[], sentinel_failover);
    assert!(outcome.resumed_after < Duration::from_secs(5), "work resumed only after {:?}", outcome.resumed_after);
}

/// Asks a Sentinel to fail the master over.
fn sentinel_failover(set: &mut SentinelSet, _old: u16) {
    let reply: String =
        redis::cmd("SENTINEL").arg("FAILOVER").arg(MASTER_NAME).query(&mut set.sentinels[0].conn()).unwrap();
    assert_eq!(reply, "OK");
}

/// The same through `rediss+sentinel://` with passwords everywhere: TLS to
/// the Sentinels and the data nodes (a private CA, `redis.tls_ca_file`),
/// the data nodes' password in the URL and the Sentinels' from
/// `REDIS_SENTINEL_PASSWORD`. The daemon, the consumer, the CLI and the
/// dashboard follow `SENTINEL FAILOVER` as without them.
#[test]
fn sentinel_failover_is_followed_over_tls_with_passwords() {
    let pki = Pki::new();
    let tls = TlsFiles { cert: pki.path("server.crt"), key: pki.path("server.key"), ca: pki.path("ca.crt") };
    let p = Passwords { data: "data-s3cret", sentinel: "sentinel-s3cret" };
    let ca = pki.arg("ca.crt");
    let envs = [("TIDEMARK__REDIS__TLS_CA_FILE", ca.as_str()), ("REDIS_SENTINEL_PASSWORD", p.sentinel)];
    let opts = SentinelOptions { passwords: Some(p), tls: Some(tls) };
    let outcome = sentinel_run("SENTINEL FAILOVER over TLS with passwords", opts, &envs, sentinel_failover);
    assert!(outcome.resumed_after < Duration::from_secs(5), "work resumed only after {:?}", outcome.resumed_after);
}

/// `kill -9` of the master: the Sentinels promote the replica, and work
/// resumes there. What only the dead master had acknowledged (asynchronous
/// replication) is counted, not asserted.
#[test]
fn sentinel_promotes_the_replica_after_kill9_of_the_master() {
    let outcome =
        sentinel_run("kill -9 of the master", SentinelOptions::default(), &[], |set, old| set.server_mut(old).kill9());
    assert!(outcome.resumed_after < Duration::from_secs(10), "work resumed only after {:?}", outcome.resumed_after);
}

/// Passwords: the data nodes' in the URL, the Sentinels' from
/// `REDIS_SENTINEL_PASSWORD` or `redis.sentinel_password`; without it the
/// CLI exits 69 saying which setting to check, and no password is shown.
#[test]
fn sentinel_and_data_node_passwords() {
    let p = Passwords { data: "data-s3cret", sentinel: "sentinel-s3cret" };
    let set = SentinelSet::start_with(SentinelOptions { passwords: Some(p), tls: None });
    let url = set.url();
    let ok =
        run_cli(&["--redis-url", &url, "add", "--id", "a", "--ts", "1"], &[("REDIS_SENTINEL_PASSWORD", p.sentinel)]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let input = read_stream(&mut set.data_conn(set.master_port()), &keys("default").input);
    assert_eq!(input.len(), 1, "the add reached the master");
    let ok = run_cli(&["--redis-url", &url, "status"], &[("TIDEMARK__REDIS__SENTINEL_PASSWORD", p.sentinel)]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));

    let refused = run_cli(&["--redis-url", &url, "status"], &[]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(69), "{stderr}");
    assert!(stderr.contains("REDIS_SENTINEL_PASSWORD"), "{stderr}");
    for out in [&ok.stdout, &ok.stderr, &refused.stdout, &refused.stderr] {
        let text = String::from_utf8_lossy(out);
        assert!(!text.contains(p.data) && !text.contains(p.sentinel), "a password leaked: {text}");
    }
}

/// Waits until `replica` has caught up with `master` (same replication
/// offset, link up).
fn wait_caught_up(master: &RedisServer, replica: &RedisServer) {
    let offset = |server: &RedisServer, field: &str| -> Option<i64> {
        let info: String = redis::cmd("INFO").arg("replication").query(&mut server.sync_conn()).ok()?;
        info.lines().find_map(|l| l.strip_prefix(field)).and_then(|v| v.trim().parse().ok())
    };
    wait_until("the replica caught up with the master", WAIT, || {
        let m = offset(master, "master_repl_offset:");
        m.is_some() && m == offset(replica, "slave_repl_offset:")
    });
}

/// A master and its replica, caught up.
fn master_and_replica() -> (RedisServer, RedisServer) {
    let a = RedisServer::start();
    let b = RedisServer::start_with(RedisOptions {
        extra_args: vec!["--replicaof".into(), "127.0.0.1".into(), a.port().to_string()],
        ..RedisOptions::default()
    });
    wait_caught_up(&a, &b);
    (a, b)
}

/// [`ENVS`], and housekeeping fast enough to see it led again after a
/// failover.
fn endpoint_envs() -> Vec<(&'static str, &'static str)> {
    let mut envs = ENVS.to_vec();
    envs.extend([("TIDEMARK__HOUSEKEEPING__INTERVAL", "300ms"), ("TIDEMARK__HOUSEKEEPING__LOCK_TTL", "1s")]);
    envs
}

/// The rest of a failover behind one endpoint, once the master `a`'s
/// writes are paused: the replica `b` catches up and is promoted, the
/// endpoint moves to it (`switch`), `a` becomes its replica and is
/// unpaused.
fn promote(a: &RedisServer, b: &RedisServer, switch: impl FnOnce()) {
    wait_caught_up(a, b);
    let () = redis::cmd("REPLICAOF").arg("NO").arg("ONE").query(&mut b.sync_conn()).unwrap();
    switch();
    let () = redis::cmd("REPLICAOF").arg("127.0.0.1").arg(b.port()).query(&mut a.sync_conn()).unwrap();
    let () = redis::cmd("CLIENT").arg("UNPAUSE").query(&mut a.sync_conn()).unwrap();
}

/// A failover behind one endpoint, done the way managed Redis does it: the
/// master's writes are paused (`CLIENT PAUSE WRITE`), the replica catches
/// up and is promoted (`REPLICAOF NO ONE`), the endpoint (here a proxy)
/// sends new connections to it, and the old master becomes its replica.
/// Connections opened before stay with the old server. Every one of them
/// must notice (`READONLY`, `UNBLOCKED`) and reconnect through the
/// endpoint: the daemon's and the consumer's work resumes on the new
/// master, housekeeping is led there again (it was not: a standby's rslock
/// connection stayed with the old server), `/readyz` is 503 while writes
/// are paused and 200 after, and no client connection is left on the old
/// server.
#[test]
fn failover_behind_one_endpoint_moves_every_connection() {
    let (a, b) = master_and_replica();
    let proxy = Proxy::start(a.port());
    let url = proxy.url();
    let envs = endpoint_envs();
    let daemon = Daemon::spawn(
        &["run", "--redis-url", &url, "--consumer", "d1", "--group", "g", "--http", "127.0.0.1:0"],
        &envs,
    );
    let addr = daemon.http_addr(WAIT);
    wait_until("/readyz answers 200", WAIT, || get(addr, "/readyz").0 == 200);
    daemon.wait_log("became the housekeeping leader", WAIT);
    let dir = tempfile::tempdir().expect("tempdir");
    let consumed = dir.path().join("consumed");
    let consumer = spawn_recording_consumer(&url, &consumed, &envs);
    let backend = Arc::new(std::sync::atomic::AtomicU16::new(a.port()));
    let (producer_url, current) = (url.clone(), backend.clone());
    let producer = Producer::spawn(
        Box::new(move || Some((producer_url.clone(), current.load(Ordering::SeqCst)))),
        Duration::from_millis(4),
    );
    wait_until("work flows before the failover", WAIT, || released(&mut a.sync_conn()).len() >= 100);

    let started = Instant::now();
    let () = redis::cmd("CLIENT").arg("PAUSE").arg(3000).arg("WRITE").query(&mut a.sync_conn()).unwrap();
    wait_until("/readyz answers 503 while writes are paused", Duration::from_millis(2500), || {
        get(addr, "/readyz").0 == 503
    });
    let paused = get(addr, "/readyz").1;
    promote(&a, &b, || {
        proxy.switch(b.port());
        backend.store(b.port(), Ordering::SeqCst);
    });
    let switched = started.elapsed();

    wait_until("the new master acknowledges adds and releases them", WAIT, || {
        let out = released(&mut b.sync_conn());
        producer.acked().iter().filter(|a| a.server == b.port()).any(|a| out.contains_key(&a.id))
    });
    let resumed = started.elapsed();
    wait_until("no client connection is left on the old server", WAIT, || proxy.open_to(a.port()) == 0);
    let last_left = proxy
        .connections()
        .iter()
        .filter(|c| c.backend == a.port())
        .filter_map(|c| c.closed_by_client)
        .max()
        .expect("connections to the old server")
        .saturating_duration_since(started);
    wait_until("housekeeping is led again, on the new master", WAIT, || {
        daemon.log().matches("became the housekeeping leader").count() >= 2
    });
    let led = started.elapsed();
    wait_until("/readyz answers 200 on the new master", WAIT, || get(addr, "/readyz").0 == 200);
    wait_until("200 more adds on the new master", WAIT, || {
        producer.acked().iter().filter(|a| a.server == b.port()).count() >= 200
    });
    let (acked, unknown) = producer.stop();
    let () = redis::cmd("XADD")
        .arg(keys("default").input)
        .arg("*")
        .arg("op")
        .arg("watermark")
        .arg("ts")
        .arg(1_000_000_000)
        .query::<String>(&mut b.sync_conn())
        .map(|_| ())
        .unwrap();
    wait_until("every add the new master acknowledged is released", WAIT, || {
        let out = released(&mut b.sync_conn());
        acked.iter().filter(|x| x.server == b.port()).all(|x| out.contains_key(&x.id))
    });
    let outcome = check_after_failover(b.port(), &mut b.sync_conn(), &acked, &consumed, started);
    eprintln!(
        "failover behind one endpoint: promoted and switched after {switched:?} (writes paused meanwhile; /readyz \
         said {paused:?}); work resumed on the new master {resumed:?} after the pause began; the last client \
         connection left the old server after {last_left:?}; housekeeping led again after {led:?}; {} adds \
         acknowledged, {} lost, {} with unknown outcome",
        outcome.acked,
        outcome.lost,
        unknown.len()
    );
    assert!(paused.contains("paused") || paused.contains("readonly"), "{paused}");
    assert!(resumed < Duration::from_secs(10), "work resumed only after {resumed:?}");
    assert!(last_left < Duration::from_secs(15), "connections stayed on the old server for {last_left:?}");
    assert_eq!(outcome.lost, 0, "writes paused and the replica caught up before the switch: nothing may be lost");
    drop(consumer);
}

/// A failover behind a DNS name, as managed Redis does it: the name moves
/// from the demoted server to the promoted one, and every connection must
/// resolve it again when it reconnects (a client that kept the address it
/// resolved first would stay with the old server, now a replica, forever).
/// The name lives in a private `/etc/hosts`: the daemon runs in its own
/// user and mount namespace (`unshare -r -m`) with a test-owned file bound over
/// `/etc/hosts`, which the test rewrites. The two servers sit behind
/// proxies on 127.0.0.2 and 127.0.0.3 with the same port, so only the
/// name's address changes.
#[test]
fn failover_behind_a_dns_name_resolves_it_again() {
    let unshare = std::process::Command::new("unshare").args(["-r", "-m", "true"]).output();
    assert!(
        unshare.as_ref().is_ok_and(|o| o.status.success()),
        "this test needs `unshare -r -m` (util-linux; user namespaces, which Debian and Ubuntu allow any user) \
         for a private /etc/hosts: {unshare:?}"
    );
    let (a, b) = master_and_replica();
    let (via_a, via_b) = (0..20)
        .find_map(|_| {
            let via_a = Proxy::bind([127, 0, 0, 2].into(), 0, a.port()).ok()?;
            let via_b = Proxy::bind([127, 0, 0, 3].into(), via_a.port(), b.port()).ok()?;
            Some((via_a, via_b))
        })
        .expect("one port free on both 127.0.0.2 and 127.0.0.3");
    let dir = tempfile::tempdir().expect("tempdir");
    let hosts = dir.path().join("hosts");
    // Rewritten in place (the bind mount follows the file, not its name).
    let point = |ip: &str| std::fs::write(&hosts, format!("127.0.0.1 localhost\n{ip} redis-ha.test\n")).unwrap();
    point("127.0.0.2");
    let url = format!("redis://redis-ha.test:{}", via_a.port());
    let (hosts_arg, bin) = (hosts.to_str().unwrap().to_owned(), testkit::bin_path().to_str().unwrap().to_owned());
    let envs = endpoint_envs();
    let daemon = Daemon::spawn_bin(
        Path::new("unshare"),
        &[
            "-r",
            "-m",
            "sh",
            "-c",
            "mount --bind \"$0\" /etc/hosts && exec \"$@\"",
            &hosts_arg,
            &bin,
            "run",
            "--redis-url",
            &url,
            "--consumer",
            "d1",
            "--group",
            "g",
            "--http",
            "127.0.0.1:0",
        ],
        &envs,
    );
    let addr = daemon.http_addr(WAIT);
    wait_until("/readyz answers 200", WAIT, || get(addr, "/readyz").0 == 200);
    let add = |conn: &mut redis::Connection, id: &str, ts: i64| {
        let k = keys("default");
        testkit::add::<_, &str, &str>(conn, &k, id, ts, &[]);
        testkit::watermark(conn, &k, ts);
    };
    add(&mut a.sync_conn(), "before", 1);
    wait_until("released through the name's first address", WAIT, || {
        released(&mut a.sync_conn()).contains_key("before")
    });
    assert!(via_b.connections().is_empty(), "nothing went to 127.0.0.3 before the name moved");

    let started = Instant::now();
    let () = redis::cmd("CLIENT").arg("PAUSE").arg(3000).arg("WRITE").query(&mut a.sync_conn()).unwrap();
    promote(&a, &b, || point("127.0.0.3"));

    add(&mut b.sync_conn(), "after", 2);
    wait_until("released on the server the name points to now", WAIT, || {
        released(&mut b.sync_conn()).contains_key("after")
    });
    let resumed = started.elapsed();
    wait_until("housekeeping is led again, on the new master", WAIT, || {
        daemon.log().matches("became the housekeeping leader").count() >= 2
    });
    // The HTTP server's connection sat idle on the old server since the
    // first /readyz: the next request finds it stale and opens a new one.
    wait_until("/readyz answers 200 on the new master", WAIT, || get(addr, "/readyz").0 == 200);
    assert!(daemon.log().contains("HTTP: our kept Redis connection went stale"), "{}", daemon.log());
    wait_until("no connection is left on the old address", WAIT, || via_a.open_to(a.port()) == 0);
    let moved = started.elapsed();
    let opened = via_b.connections().len();
    assert!(opened >= 3, "the daemon's connections reached 127.0.0.3: {opened}");
    let out = released(&mut b.sync_conn());
    assert_eq!((out.get("before"), out.get("after")), (Some(&1), Some(&1)), "each released once: {out:?}");
    eprintln!(
        "failover behind a DNS name: work resumed through the new address {resumed:?} after the pause began; \
         the last connection left the old address after {moved:?}; {opened} connections opened to the new one"
    );
}
