//! Integration-test harness: private `redis-server` instances, a wrapper
//! around the `tidemark` binary, polling helpers and stream helpers.
//!
//! Every test gets its own Redis on a free port with its own data directory,
//! so tests can run in parallel without sharing state.
#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long a freshly spawned `redis-server` may take to answer PING.
const REDIS_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How many fresh ports `RedisServer::start` tries before giving up.
const REDIS_START_ATTEMPTS: usize = 5;
/// How long `RedisServer::restart` keeps retrying to bind the same port.
const REDIS_REBIND_WINDOW: Duration = Duration::from_secs(5);
/// Safety timeout for one-shot CLI invocations.
const CLI_TIMEOUT: Duration = Duration::from_secs(60);
/// Poll interval of the waiting helpers.
const POLL_INTERVAL: Duration = Duration::from_millis(15);

const REDIS_NOT_FOUND: &str =
    "redis-server not found on PATH: run `make test` (it installs it) or install Redis >= 6.2";

// ---------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------

/// Options for [`RedisServer::start_with`].
#[derive(Debug, Clone, Default)]
pub struct RedisOptions {
    /// Enable the append-only file (`--appendonly yes --appendfsync always`),
    /// so data survives [`RedisServer::kill9`] + [`RedisServer::restart`].
    pub aof: bool,
    /// Extra command-line arguments appended verbatim, e.g.
    /// `vec!["--maxmemory".into(), "10mb".into()]`.
    pub extra_args: Vec<String>,
}

/// A private `redis-server` child process, killed on drop.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    opts: RedisOptions,
    // Declared last so the process is gone before the directory is removed
    // (`Drop::drop` runs first anyway, this is belt and braces).
    dir: TempDir,
}

enum Readiness {
    Ready,
    /// The child exited before answering PING.
    Exited(ExitStatus),
    /// Something answered on the port, but it is not our child.
    Foreign,
    TimedOut,
}

enum Probe {
    /// Answered PING; the pid from `INFO server` if it could be read.
    Pong(Option<u32>),
    Loading,
    Down,
}

impl RedisServer {
    /// Starts a server with default options (no persistence).
    pub fn start() -> RedisServer {
        Self::start_with(RedisOptions::default())
    }

    /// Starts a server on a fresh free port with its own data directory.
    pub fn start_with(opts: RedisOptions) -> RedisServer {
        let dir = tempfile::Builder::new().prefix("tidemark-redis-").tempdir().expect("create redis tempdir");
        let mut server = RedisServer { child: None, port: 0, opts, dir };
        for attempt in 1..=REDIS_START_ATTEMPTS {
            let port = free_port();
            server.port = port;
            let mut child = server.spawn_process();
            match wait_redis_ready(&mut child, port, Instant::now() + REDIS_READY_TIMEOUT) {
                Readiness::Ready => {
                    server.child = Some(child);
                    return server;
                }
                Readiness::Foreign => {
                    // Another process grabbed the port between our probe and
                    // redis binding it; try another one.
                    kill_and_reap(&mut child);
                }
                Readiness::Exited(status) => {
                    if !server.log_shows_bind_failure() || attempt == REDIS_START_ATTEMPTS {
                        panic!("redis-server on port {port} exited during startup ({status}); log:\n{}", server.log());
                    }
                }
                Readiness::TimedOut => {
                    kill_and_reap(&mut child);
                    panic!(
                        "redis-server on port {port} did not answer PING within {:?}; log:\n{}",
                        REDIS_READY_TIMEOUT,
                        server.log()
                    );
                }
            }
        }
        panic!("could not start redis-server after {REDIS_START_ATTEMPTS} attempts; log:\n{}", server.log());
    }

    /// `redis://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's `--dir` (holds the AOF and `redis.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// Contents of the server's log file so far, followed by anything the
    /// process wrote to stdout/stderr (config errors are reported there, before
    /// the log file is opened).
    pub fn log(&self) -> String {
        let mut text = match std::fs::read(self.log_path()) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) => format!("<could not read {}: {e}>", self.log_path().display()),
        };
        if let Ok(bytes) = std::fs::read(self.stdio_path()) {
            if !bytes.is_empty() {
                text.push_str("\n--- redis-server stdout/stderr ---\n");
                text.push_str(&String::from_utf8_lossy(&bytes));
            }
        }
        text
    }

    fn stdio_path(&self) -> PathBuf {
        self.dir.path().join("redis.stdio")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).expect("open redis client")
    }

    /// A multiplexed async connection with a 30 s response timeout, as
    /// tidemark's store functions take it.
    pub async fn conn(&self) -> tidemark::store::Conn {
        let config = redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(30)));
        let conn = self
            .client()
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.url()));
        tidemark::store::Conn::Single(conn)
    }

    /// A blocking connection.
    pub fn sync_conn(&self) -> redis::Connection {
        self.client()
            .get_connection_with_timeout(Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.url()))
    }

    /// SIGKILLs the server and reaps it. No-op if it is not running.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child);
        }
    }

    /// Starts the server again on the same port and data directory (so an AOF
    /// is reloaded) and waits until it answers PING. Kills the current process
    /// first if it is still running.
    pub fn restart(&mut self) {
        self.kill9();
        let port = self.port;
        let rebind_deadline = Instant::now() + REDIS_REBIND_WINDOW;
        loop {
            let mut child = self.spawn_process();
            match wait_redis_ready(&mut child, port, Instant::now() + REDIS_READY_TIMEOUT) {
                Readiness::Ready => {
                    self.child = Some(child);
                    return;
                }
                Readiness::Exited(status) => {
                    if !self.log_shows_bind_failure() || Instant::now() >= rebind_deadline {
                        panic!("redis-server restart on port {port} failed ({status}); log:\n{}", self.log());
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                Readiness::Foreign => {
                    kill_and_reap(&mut child);
                    if Instant::now() >= rebind_deadline {
                        panic!("redis-server restart: port {port} is taken by another server; log:\n{}", self.log());
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                Readiness::TimedOut => {
                    kill_and_reap(&mut child);
                    panic!(
                        "restarted redis-server on port {port} did not answer PING within {:?}; log:\n{}",
                        REDIS_READY_TIMEOUT,
                        self.log()
                    );
                }
            }
        }
    }

    fn spawn_process(&self) -> Child {
        let dir = self.dir.path();
        let mut cmd = Command::new("redis-server");
        cmd.arg("--port")
            .arg(self.port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--protected-mode")
            .arg("no")
            .arg("--dir")
            .arg(dir)
            .arg("--logfile")
            .arg(dir.join("redis.log"))
            .arg("--daemonize")
            .arg("no")
            .arg("--save")
            .arg("")
            .arg("--appendonly")
            .arg(if self.opts.aof { "yes" } else { "no" });
        if self.opts.aof {
            cmd.arg("--appendfsync").arg("always");
        }
        // stdout/stderr go to a file rather than /dev/null: nothing can block
        // on a pipe, and startup errors still end up in panic messages.
        let stdio =
            OpenOptions::new().create(true).append(true).open(self.stdio_path()).expect("open redis stdio file");
        let stdio_err = stdio.try_clone().expect("clone redis stdio file");
        cmd.args(&self.opts.extra_args).stdin(Stdio::null()).stdout(Stdio::from(stdio)).stderr(Stdio::from(stdio_err));
        match cmd.spawn() {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!("{REDIS_NOT_FOUND}"),
            Err(e) => panic!("spawn redis-server: {e}"),
        }
    }

    fn log_shows_bind_failure(&self) -> bool {
        let log = self.log();
        log.contains("Address already in use") || log.contains("Could not create server TCP")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Asks the OS for a currently free TCP port on 127.0.0.1.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

fn kill_and_reap(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn wait_redis_ready(child: &mut Child, port: u16, deadline: Instant) -> Readiness {
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Readiness::Exited(status);
        }
        match probe_redis(port) {
            Probe::Pong(Some(pid)) if pid != child.id() => {
                // Our child may still be about to fail its bind; either way the
                // port is not ours.
                return Readiness::Foreign;
            }
            Probe::Pong(_) => return Readiness::Ready,
            Probe::Loading | Probe::Down => {}
        }
        if Instant::now() >= deadline {
            return Readiness::TimedOut;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Speaks just enough RESP over a raw socket to tell "ready", "loading" and
/// "not there" apart, and to learn which process answered.
fn probe_redis(port: u16) -> Probe {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return Probe::Down;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    if stream.write_all(b"*1\r\n$4\r\nPING\r\n").is_err() {
        return Probe::Down;
    }
    let mut reader = BufReader::new(match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return Probe::Down,
    });
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return Probe::Down;
    }
    if line.starts_with("-LOADING") {
        return Probe::Loading;
    }
    if line.starts_with("-NOAUTH") {
        // A password was configured via extra_args: the server is up, but we
        // cannot ask it for its pid.
        return Probe::Pong(None);
    }
    if !line.starts_with("+PONG") {
        return Probe::Down;
    }
    if stream.write_all(b"*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n").is_err() {
        return Probe::Pong(None);
    }
    let mut header = String::new();
    if reader.read_line(&mut header).is_err() {
        return Probe::Pong(None);
    }
    let Some(len) = header.strip_prefix('$').and_then(|n| n.trim().parse::<usize>().ok()) else {
        return Probe::Pong(None);
    };
    let mut body = vec![0u8; len];
    if reader.read_exact(&mut body).is_err() {
        return Probe::Pong(None);
    }
    let pid = String::from_utf8_lossy(&body)
        .lines()
        .find_map(|l| l.strip_prefix("process_id:").and_then(|p| p.trim().parse::<u32>().ok()));
    Probe::Pong(pid)
}

// ---------------------------------------------------------------------------
// The tidemark binary
// ---------------------------------------------------------------------------

/// Path of the `tidemark` binary built by cargo for this test run.
pub fn bin_path() -> &'static str {
    env!("CARGO_BIN_EXE_tidemark")
}

/// A running `tidemark` child process. Its stdout and stderr both go to a log
/// file (so they never block on a full pipe). SIGKILLed on drop; if the test
/// is panicking, the log is printed to stderr.
pub struct Daemon {
    child: Child,
    log_path: PathBuf,
    dir: TempDir,
}

impl Daemon {
    /// Spawns `tidemark <args>` with extra environment `envs`. `RUST_LOG`
    /// defaults to `info,tidemark=debug` unless given in `envs`.
    pub fn spawn(args: &[&str], envs: &[(&str, &str)]) -> Daemon {
        let dir = tempfile::Builder::new().prefix("tidemark-daemon-").tempdir().expect("create daemon tempdir");
        let log_path = dir.path().join("daemon.log");
        let log = OpenOptions::new().create(true).append(true).open(&log_path).expect("open daemon log");
        let log_err = log.try_clone().expect("clone daemon log handle");

        let mut cmd = Command::new(bin_path());
        http_off_unless_asked(&mut cmd, args, envs);
        // Run in the private dir so the repository's config/tidemark.toml is
        // not picked up, and clear the environment layers a developer's
        // shell may set: each test says exactly what it configures.
        cmd.args(args).current_dir(dir.path());
        scrub_env(&mut cmd);
        if !envs.iter().any(|(k, _)| *k == "RUST_LOG") {
            cmd.env("RUST_LOG", "info,tidemark=debug");
        }
        cmd.envs(envs.iter().copied()).stdin(Stdio::null()).stdout(Stdio::from(log)).stderr(Stdio::from(log_err));
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {} {args:?}: {e}", bin_path()));
        Daemon { child, log_path, dir }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The daemon's private temporary directory (holds the log file).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// stdout + stderr of the daemon so far.
    pub fn log(&self) -> String {
        match std::fs::read(&self.log_path) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) => format!("<could not read {}: {e}>", self.log_path.display()),
        }
    }

    /// SIGKILLs the daemon and reaps it.
    pub fn kill9(&mut self) {
        kill_and_reap(&mut self.child);
    }

    /// Sends SIGTERM (does not wait; see [`Daemon::wait_exit`]).
    pub fn sigterm(&self) {
        self.signal("TERM");
    }

    /// Sends SIGINT (does not wait; see [`Daemon::wait_exit`]).
    pub fn sigint(&self) {
        self.signal("INT");
    }

    /// Sends a signal by name (`"TERM"`, `"INT"`, `"HUP"`, `"KILL"`, ...) via `kill(1)`.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .stdin(Stdio::null())
            .status()
            .unwrap_or_else(|e| panic!("run kill -{name}: {e}"));
        assert!(status.success(), "kill -{name} {} failed: {status}", self.pid());
    }

    /// Waits up to `timeout` for the daemon to exit; `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) => {}
                Err(e) => panic!("try_wait on daemon {}: {e}", self.pid()),
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits until the log contains `needle`; panics with the log on timeout.
    pub fn wait_log(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return;
            }
            if Instant::now() >= deadline {
                panic!("daemon log did not contain {needle:?} within {timeout:?}; log:\n{}", self.log());
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.is_running() {
            kill_and_reap(&mut self.child);
        }
        if std::thread::panicking() {
            eprintln!(
                "----- tidemark daemon (pid {}) log -----\n{}\n----- end of daemon log -----",
                self.child.id(),
                self.log()
            );
        }
    }
}

/// Runs `tidemark <args>` to completion and returns its output. Panics (after
/// killing it) if it runs longer than 60 s.
/// Removes `REDIS_URL`, `REDIS_PASSWORD`, `POD_NAME`, `TIDEMARK_CONFIG` and
/// every `TIDEMARK__…` variable.
fn scrub_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if matches!(&*k, "REDIS_URL" | "REDIS_PASSWORD" | "POD_NAME" | "TIDEMARK_CONFIG") || k.starts_with("TIDEMARK__")
        {
            cmd.env_remove(&key);
        }
    }
}

/// Parallel tests would all want the default 127.0.0.1:9464, so HTTP is off
/// (`--http off`, which also beats a config file) unless the test gives
/// `--http` (before any `--`) or `TIDEMARK__HTTP__ADDR`.
fn http_off_unless_asked(cmd: &mut Command, args: &[&str], envs: &[(&str, &str)]) {
    let mut own = args.iter().take_while(|a| **a != "--");
    let asked = own.any(|a| *a == "--http" || a.starts_with("--http="))
        || envs.iter().any(|(k, _)| *k == "TIDEMARK__HTTP__ADDR");
    if !asked {
        cmd.args(["--http", "off"]);
    }
}

pub fn run_cli(args: &[&str], envs: &[(&str, &str)]) -> Output {
    // Anonymous temp files instead of pipes: no reader threads, no blocking.
    let mut out = tempfile::tempfile().expect("stdout tempfile");
    let mut err = tempfile::tempfile().expect("stderr tempfile");
    let mut cmd = Command::new(bin_path());
    cmd.current_dir(std::env::temp_dir());
    scrub_env(&mut cmd);
    http_off_unless_asked(&mut cmd, args, envs);
    let mut child = cmd
        .args(args)
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::from(out.try_clone().expect("clone stdout file")))
        .stderr(Stdio::from(err.try_clone().expect("clone stderr file")))
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {} {args:?}: {e}", bin_path()));
    let deadline = Instant::now() + CLI_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => panic!("try_wait on tidemark {args:?}: {e}"),
        }
        if Instant::now() >= deadline {
            kill_and_reap(&mut child);
            panic!(
                "tidemark {args:?} did not finish within {CLI_TIMEOUT:?}\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&read_all(&mut out)),
                String::from_utf8_lossy(&read_all(&mut err)),
            );
        }
        std::thread::sleep(POLL_INTERVAL);
    };
    Output { status, stdout: read_all(&mut out), stderr: read_all(&mut err) }
}

fn read_all(f: &mut File) -> Vec<u8> {
    let mut buf = Vec::new();
    f.seek(SeekFrom::Start(0)).expect("seek output file");
    f.read_to_end(&mut buf).expect("read output file");
    buf
}

// ---------------------------------------------------------------------------
// Waiting
// ---------------------------------------------------------------------------

/// Polls `f` every ~15 ms until it returns true; panics naming `what` on timeout.
pub fn wait_until<F: FnMut() -> bool>(what: &str, timeout: Duration, mut f: F) {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Async version of [`wait_until`], sleeping with `tokio::time::sleep`.
pub async fn wait_until_async<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if f().await {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

// ---------------------------------------------------------------------------
// Keys and streams
// ---------------------------------------------------------------------------

/// The Redis keys of one tidemark namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    /// `tidemark:{NS}:in`
    pub input: String,
    /// `tidemark:{NS}:wm`
    pub wm: String,
    /// `tidemark:{NS}:sched`
    pub sched: String,
    /// `tidemark:{NS}:body`
    pub body: String,
    /// `tidemark:{NS}:out`
    pub out: String,
    /// `tidemark:{NS}:dead`
    pub dead: String,
}

/// Keys for namespace `ns`; the braces are literal (a cluster hash tag),
/// e.g. `keys("default").input == "tidemark:{default}:in"`.
pub fn keys(ns: &str) -> Keys {
    let k = |suffix: &str| format!("tidemark:{{{ns}}}:{suffix}");
    Keys { input: k("in"), wm: k("wm"), sched: k("sched"), body: k("body"), out: k("out"), dead: k("dead") }
}

/// One stream entry: (entry id, field/value pairs in order).
pub type StreamEntry = (String, Vec<(Vec<u8>, Vec<u8>)>);

const XRANGE_PAGE: usize = 10_000;

fn xadd_cmd(key: &str, fields: &[(&[u8], &[u8])]) -> redis::Cmd {
    assert!(!fields.is_empty(), "XADD needs at least one field");
    let mut cmd = redis::cmd("XADD");
    cmd.arg(key).arg("*");
    for (f, v) in fields {
        cmd.arg(*f).arg(*v);
    }
    cmd
}

fn xrange_cmd(key: &str, start: &str) -> redis::Cmd {
    let mut cmd = redis::cmd("XRANGE");
    cmd.arg(key).arg(start).arg("+").arg("COUNT").arg(XRANGE_PAGE);
    cmd
}

/// `XADD key * f1 v1 ...` (binary-safe); returns the new entry id.
pub fn xadd_fields<C: redis::ConnectionLike>(conn: &mut C, key: &str, fields: &[(&[u8], &[u8])]) -> String {
    xadd_cmd(key, fields).query::<String>(conn).unwrap_or_else(|e| panic!("XADD {key}: {e}"))
}

/// Async version of [`xadd_fields`].
pub async fn xadd_fields_async<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    key: &str,
    fields: &[(&[u8], &[u8])],
) -> String {
    xadd_cmd(key, fields).query_async::<String>(conn).await.unwrap_or_else(|e| panic!("XADD {key}: {e}"))
}

/// Reads the whole stream at `key` (empty if missing) with paged XRANGE.
pub fn read_stream<C: redis::ConnectionLike>(conn: &mut C, key: &str) -> Vec<StreamEntry> {
    let mut all = Vec::new();
    let mut start = "-".to_string();
    loop {
        let value: redis::Value = xrange_cmd(key, &start).query(conn).unwrap_or_else(|e| panic!("XRANGE {key}: {e}"));
        let page = parse_xrange(value);
        let n = page.len();
        all.extend(page);
        if n < XRANGE_PAGE {
            return all;
        }
        start = format!("({}", all.last().expect("non-empty page").0);
    }
}

/// Async version of [`read_stream`].
pub async fn read_stream_async<C: redis::aio::ConnectionLike>(conn: &mut C, key: &str) -> Vec<StreamEntry> {
    let mut all = Vec::new();
    let mut start = "-".to_string();
    loop {
        let value: redis::Value =
            xrange_cmd(key, &start).query_async(conn).await.unwrap_or_else(|e| panic!("XRANGE {key}: {e}"));
        let page = parse_xrange(value);
        let n = page.len();
        all.extend(page);
        if n < XRANGE_PAGE {
            return all;
        }
        start = format!("({}", all.last().expect("non-empty page").0);
    }
}

/// Parses an XRANGE reply: Array of [id, Array of field/value bulk strings].
pub fn parse_xrange(value: redis::Value) -> Vec<StreamEntry> {
    use redis::Value;
    let entries = match value {
        Value::Array(entries) => entries,
        Value::Nil => return Vec::new(),
        other => panic!("XRANGE: expected an array, got {other:?}"),
    };
    entries
        .into_iter()
        .map(|entry| {
            let Value::Array(parts) = entry else {
                panic!("XRANGE entry: expected an array, got {entry:?}");
            };
            let [id, fields]: [Value; 2] =
                parts.try_into().unwrap_or_else(|p| panic!("XRANGE entry: expected [id, fields], got {p:?}"));
            let id = String::from_utf8(value_bytes(id)).expect("stream id is utf-8");
            let pairs = match fields {
                Value::Array(flat) => {
                    assert!(flat.len().is_multiple_of(2), "XRANGE entry {id}: odd field count");
                    let mut it = flat.into_iter();
                    let mut pairs = Vec::new();
                    while let (Some(f), Some(v)) = (it.next(), it.next()) {
                        pairs.push((value_bytes(f), value_bytes(v)));
                    }
                    pairs
                }
                Value::Map(map) => map.into_iter().map(|(f, v)| (value_bytes(f), value_bytes(v))).collect(),
                Value::Nil => Vec::new(),
                other => panic!("XRANGE entry {id}: expected field array, got {other:?}"),
            };
            (id, pairs)
        })
        .collect()
}

fn value_bytes(v: redis::Value) -> Vec<u8> {
    match v {
        redis::Value::BulkString(b) => b,
        redis::Value::SimpleString(s) => s.into_bytes(),
        redis::Value::Int(i) => i.to_string().into_bytes(),
        other => panic!("expected a string value, got {other:?}"),
    }
}

/// Looks up a field in an entry's field list.
pub fn field<'a>(fields: &'a [(Vec<u8>, Vec<u8>)], name: &str) -> Option<&'a [u8]> {
    fields.iter().find(|(f, _)| f.as_slice() == name.as_bytes()).map(|(_, v)| v.as_slice())
}
