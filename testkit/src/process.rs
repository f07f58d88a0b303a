//! The `tidemark` binary under test: long-running processes ([`Daemon`],
//! killed on drop, their log printed when the test fails), one-shot
//! commands ([`run_cli`]), signals, and what the bench reads of a process
//! (CPU time, peak memory).
//!
//! Each process runs in a private directory with the environment layers a
//! developer's shell may set removed, so it sees exactly what the test
//! configures.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::wait::POLL_INTERVAL;

/// Safety timeout for one-shot CLI invocations.
const CLI_TIMEOUT: Duration = Duration::from_secs(60);

/// The `tidemark` binary cargo built for this test or bench run: it sits
/// in the profile directory above the running executable
/// (`target/<profile>/deps/it-…` → `target/<profile>/tidemark`), where
/// cargo puts a package's binaries before it runs its tests and benches.
pub fn bin_path() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("the path of the running test executable");
        let profile_dir = exe.parent().and_then(Path::parent).expect("the executable lies in target/<profile>/deps");
        let bin = profile_dir.join(format!("tidemark{}", std::env::consts::EXE_SUFFIX));
        assert!(bin.is_file(), "no tidemark binary at {} (run the tests through cargo)", bin.display());
        bin
    })
}

/// The repository's top directory (where `Cargo.toml`, `deploy/` and
/// `docs/` are).
pub fn repo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("testkit/ lies in the repository").to_owned()
}

/// A file's text; panics naming the file when it cannot be read.
pub fn read_file(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// SIGKILLs a child process and reaps it.
pub fn kill_and_reap(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// CPU time used by all threads of process `pid` so far (from
/// `/proc/<pid>/task/*/schedstat`, nanoseconds on CPU); zero once it is gone.
pub fn process_cpu(pid: u32) -> Duration {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Duration::ZERO;
    };
    let ns: u64 = tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    Duration::from_nanos(ns)
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
        Self::spawn_bin(bin_path(), args, envs)
    }

    /// [`Daemon::spawn`] of another build of `tidemark` (the bench's A/B runs).
    pub fn spawn_bin(bin: &Path, args: &[&str], envs: &[(&str, &str)]) -> Daemon {
        let dir = tempfile::Builder::new().prefix("tidemark-daemon-").tempdir().expect("create daemon tempdir");
        let log_path = dir.path().join("daemon.log");
        let log = OpenOptions::new().create(true).append(true).open(&log_path).expect("open daemon log");
        let log_err = log.try_clone().expect("clone daemon log handle");

        let mut cmd = Command::new(bin);
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
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {} {args:?}: {e}", bin.display()));
        Daemon { child, log_path, dir }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The daemon's private temporary directory (holds the log file).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The file its stdout and stderr go to.
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

    /// Whether the process has not exited yet.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Its exit status, if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap_or_else(|e| panic!("try_wait on process {}: {e}", self.pid()))
    }

    /// CPU time used by all its threads so far.
    pub fn cpu_time(&self) -> Duration {
        process_cpu(self.pid())
    }

    /// Its peak resident set size so far (`VmHWM`), in KiB; `None` once it
    /// has exited.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let line = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?;
        line.trim().trim_end_matches("kB").trim().parse().ok()
    }

    /// The address its HTTP endpoint listens on, from its log line (text or
    /// JSON log format); waits up to `timeout` for that line.
    pub fn http_addr(&self, timeout: Duration) -> SocketAddr {
        const LINE: &str = "serving /healthz";
        self.wait_log(LINE, timeout);
        let log = self.log();
        let line = log.lines().find(|l| l.contains(LINE)).expect("the line waited for");
        let after = ["addr=", "\"addr\":"]
            .iter()
            .find_map(|key| line.find(key).map(|at| &line[at + key.len()..]))
            .unwrap_or_else(|| panic!("no addr in {line:?}"));
        let addr = after.split([' ', ',', '}']).next().expect("an address").trim_matches('"');
        addr.parse().unwrap_or_else(|e| panic!("{addr:?} is not an address: {e}\n{log}"))
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

/// `GET path` of a daemon's HTTP endpoint at `addr` over HTTP/1.0 (the server closes the connection after the
/// response): the status code and the body.
pub fn http_get(addr: &str, path: &str) -> Result<(u16, String), String> {
    let mut stream = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| e.to_string())?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(|e| format!("write: {e}"))?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).map_err(|e| format!("read: {e}"))?;
    let response = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = response.split_once("\r\n\r\n").ok_or_else(|| format!("no header end in {response:?}"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status code in {head:?}"))?;
    Ok((code, body.to_owned()))
}

/// [`http_get`] of a process's endpoint at `addr`, which must answer:
/// the status code and the body.
pub fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_get(&addr.to_string(), path).unwrap_or_else(|e| panic!("GET {path} from {addr}: {e}"))
}

/// The value of the Prometheus sample `name_and_labels` (e.g.
/// `x_total{class="oom"}`) in a `/metrics` body, if present.
pub fn metric(body: &str, name_and_labels: &str) -> Option<f64> {
    body.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (key, value) = l.rsplit_once(' ')?;
        (key == name_and_labels).then(|| value.parse().ok()).flatten()
    })
}

/// A one-shot's exit status, stdout and stderr, for assertion messages.
pub fn describe(out: &Output) -> String {
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    format!("status {:?}\nstdout:\n{}\nstderr:\n{}", out.status, text(&out.stdout), text(&out.stderr))
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// Removes `REDIS_URL`, `REDIS_PASSWORD`, `REDIS_SENTINEL_PASSWORD`, `POD_NAME`, `TIDEMARK_CONFIG`,
/// every `TIDEMARK__…` variable and the harness's own `TIDEMARK_TEST_…` ones.
fn scrub_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if matches!(&*k, "REDIS_URL" | "REDIS_PASSWORD" | "REDIS_SENTINEL_PASSWORD" | "POD_NAME" | "TIDEMARK_CONFIG")
            || k.starts_with("TIDEMARK__")
            || k.starts_with("TIDEMARK_TEST_")
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

/// Runs `tidemark <args>` to completion and returns its output. Panics (after
/// killing it) if it runs longer than 60 s.
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
        .unwrap_or_else(|e| panic!("spawn {} {args:?}: {e}", bin_path().display()));
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
