//! A private `redis-server` per test: a free port, its own data directory,
//! killed on drop, its log shown when it fails to start; `kill9`/`restart`,
//! the append-only file and extra arguments on request.
//!
//! The binary is `redis-server` on `PATH`, or the one named by
//! [`SERVER_ENV`], so a CI step can run the suite against other builds
//! (Redis 7.2, Valkey, …).

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::process::{free_port, kill_and_reap};

/// The environment variable naming the `redis-server` binary to run
/// (default: `redis-server` on `PATH`).
pub const SERVER_ENV: &str = "TIDEMARK_TEST_REDIS_SERVER";

/// How long a freshly spawned `redis-server` may take to answer PING.
const REDIS_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How many fresh ports `RedisServer::start` tries before giving up.
const REDIS_START_ATTEMPTS: usize = 5;
/// How long `RedisServer::restart` keeps retrying to bind the same port.
const REDIS_REBIND_WINDOW: Duration = Duration::from_secs(5);

/// The `redis-server` binary: [`SERVER_ENV`] if set, else `redis-server`.
pub fn server_binary() -> PathBuf {
    binary_named(std::env::var_os(SERVER_ENV))
}

/// The binary a value of [`SERVER_ENV`] names (unset or empty: the one on
/// `PATH`).
fn binary_named(var: Option<std::ffi::OsString>) -> PathBuf {
    var.filter(|v| !v.is_empty()).map_or_else(|| PathBuf::from("redis-server"), PathBuf::from)
}

/// Options for [`RedisServer::start_with`].
#[derive(Debug, Clone, Default)]
pub struct RedisOptions {
    /// Enable the append-only file (`--appendonly yes`), so data survives
    /// [`RedisServer::kill9`] + [`RedisServer::restart`].
    pub aof: bool,
    /// With `aof`, the `appendfsync` policy (default `always`).
    pub appendfsync: Option<String>,
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

    /// The TCP port it listens on (kept across [`RedisServer::restart`]).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's `--dir` (holds the AOF and `redis.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's log file.
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

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// A client for [`RedisServer::url`].
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
        let mut cmd = Command::new(server_binary());
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
            cmd.arg("--appendfsync").arg(self.opts.appendfsync.as_deref().unwrap_or("always"));
        }
        // stdout/stderr go to a file rather than /dev/null: nothing can block
        // on a pipe, and startup errors still end up in panic messages.
        let stdio =
            OpenOptions::new().create(true).append(true).open(self.stdio_path()).expect("open redis stdio file");
        let stdio_err = stdio.try_clone().expect("clone redis stdio file");
        cmd.args(&self.opts.extra_args).stdin(Stdio::null()).stdout(Stdio::from(stdio)).stderr(Stdio::from(stdio_err));
        match cmd.spawn() {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "{} not found: run `make test` (it installs redis-server) or install Redis >= 6.2, \
                 or name another server in {SERVER_ENV}",
                server_binary().display()
            ),
            Err(e) => panic!("spawn {}: {e}", server_binary().display()),
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

/// Waits until `child`, a server (or Sentinel) started on `port`, answers
/// PING; the error says why not.
pub fn wait_answers(child: &mut Child, port: u16, timeout: Duration) -> Result<(), String> {
    match wait_redis_ready(child, port, Instant::now() + timeout) {
        Readiness::Ready => Ok(()),
        Readiness::Exited(status) => Err(format!("exited during startup ({status})")),
        Readiness::Foreign => Err(format!("port {port} is taken by another server")),
        Readiness::TimedOut => Err(format!("did not answer PING within {timeout:?}")),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_binary_comes_from_the_environment_or_path() {
        assert_eq!(binary_named(None), PathBuf::from("redis-server"));
        assert_eq!(binary_named(Some("".into())), PathBuf::from("redis-server"));
        let valkey = "/opt/valkey-8.0.1/src/valkey-server";
        assert_eq!(binary_named(Some(valkey.into())), PathBuf::from(valkey));
    }
}
