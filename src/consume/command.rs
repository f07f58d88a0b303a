//! `tidemark consume`: the consumer runtime running a command once per
//! element. The element arrives as one JSON object on stdin (see
//! [`super::element_json`]) with its metadata in `TIDEMARK_*` variables;
//! exit 0 acknowledges, any other end is a failure retried later. The
//! command runs in its own process group, killed whole on timeout. A
//! failure's message ends with the last lines the command wrote to stderr,
//! so a dead letter says why.

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rustix::process::{kill_process_group, Pid, Signal};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{ConsumeError, ConsumerBuilder, Element, Handler};
use crate::config::Settings;
use crate::health::Readiness;

/// Longest stdout/stderr line logged as one; longer lines are split.
const MAX_LINE: u64 = 16 * 1024;
/// After the command exits, how long its output may take to reach the log
/// (a background process it started may hold the pipes open for longer).
const OUTPUT_DRAIN: Duration = Duration::from_millis(500);
/// Longest failure message: how the command ended, then the end of its
/// stderr. The dead letter's detail puts `delivery N of M failed: ` before
/// it and is cut at the runtime's bound, which must never cut the end off.
const MAX_FAILURE: usize = super::runtime::MAX_DETAIL - 100;
/// Most stderr kept per run (its last lines), before fitting the message.
const STDERR_KEPT: usize = 4 * 1024;
/// Between how the command ended and the end of its stderr.
const STDERR_HEADER: &str = "; last lines of stderr:\n";

/// Runs `program` once per element of `group` until `shutdown`, reporting
/// its connection state to `readiness`.
pub async fn run(
    settings: Settings,
    group: String,
    program: Vec<String>,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> Result<(), ConsumeError> {
    let Some((command, args)) = program.split_first() else {
        return Err(ConsumeError::Invalid { option: "COMMAND", message: "no command given after `--`".into() });
    };
    if !on_path(command) {
        warn!(command = %command, "the command is not found: every element will fail until it is installed");
    }
    let handler = CommandHandler {
        program: command.clone(),
        args: args.to_vec(),
        group: group.clone(),
        consumer: settings.consume.consumer.clone(),
        max_deliveries: settings.consume.max_deliveries,
        timeout: settings.consume.timeout,
    };
    info!(command = ?program, timeout = ?handler.timeout, "running a command per element");
    ConsumerBuilder::from_settings(&settings, group).readiness(readiness).build(handler)?.run(shutdown).await
}

/// Whether `command` names an existing file, directly or through `$PATH`.
fn on_path(command: &str) -> bool {
    if command.contains('/') {
        return Path::new(command).is_file();
    }
    std::env::var_os("PATH").is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(command).is_file()))
}

/// Why one run of the command failed: how it ended, then (if it wrote any)
/// the last lines of its stderr, at most about 1.9 KB in all.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CommandFailure(String);

impl CommandFailure {
    /// This failure followed by the end of `stderr`, within [`MAX_FAILURE`].
    fn with_stderr(self, stderr: &StderrTail) -> CommandFailure {
        let room = MAX_FAILURE.saturating_sub(self.0.len() + STDERR_HEADER.len());
        match stderr.text(room) {
            Some(tail) => CommandFailure(format!("{}{STDERR_HEADER}{tail}", self.0)),
            None => self,
        }
    }
}

/// The last lines a command wrote to stderr, at most [`STDERR_KEPT`] bytes.
#[derive(Debug, Default)]
struct StderrTail {
    /// The lines, oldest first, without their line ends.
    lines: VecDeque<String>,
    /// Their total length in bytes.
    bytes: usize,
    /// Whether earlier output was dropped.
    cut: bool,
}

impl StderrTail {
    fn push(&mut self, line: &str) {
        self.bytes += line.len();
        self.lines.push_back(line.to_owned());
        while self.bytes > STDERR_KEPT && self.lines.len() > 1 {
            let dropped = self.lines.pop_front().expect("more than one line");
            self.bytes -= dropped.len();
            self.cut = true;
        }
    }

    /// The kept lines joined with `\n`, trailing blank lines left out,
    /// fitted into `room` bytes by dropping the oldest lines (and the start
    /// of a line too long on its own); `…` marks output left out. `None`
    /// when there is nothing to show.
    fn text(&self, room: usize) -> Option<String> {
        let end = self.lines.iter().rposition(|l| !l.trim().is_empty())?;
        let mut kept: Vec<&str> = Vec::new();
        let mut used = 0;
        let mut cut = self.cut;
        for line in self.lines.iter().take(end + 1).rev() {
            // Each line costs a separator, and a cut costs the `…` line.
            let cost = line.len() + 1;
            if used + cost + '…'.len_utf8() + 1 > room {
                cut = true;
                if kept.is_empty() {
                    let budget = room.saturating_sub('…'.len_utf8());
                    let mut start = line.len().saturating_sub(budget);
                    while !line.is_char_boundary(start) {
                        start += 1;
                    }
                    return (budget > 0).then(|| format!("…{}", &line[start..]));
                }
                break;
            }
            used += cost;
            kept.push(line);
        }
        kept.reverse();
        let joined = kept.join("\n");
        Some(if cut { format!("…\n{joined}") } else { joined })
    }
}

/// Runs a command per element.
#[derive(Debug, Clone)]
pub struct CommandHandler {
    /// The program (looked up on `$PATH`).
    pub program: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// `TIDEMARK_GROUP`.
    pub group: String,
    /// `TIDEMARK_CONSUMER`.
    pub consumer: String,
    /// `TIDEMARK_MAX_DELIVERIES`.
    pub max_deliveries: u64,
    /// A run lasting longer is killed (its whole process group) and fails.
    pub timeout: Duration,
}

impl Handler for CommandHandler {
    type Error = CommandFailure;

    async fn handle(&self, element: Element) -> Result<(), CommandFailure> {
        let id = element.id_lossy().into_owned();
        let entry = element.entry_id.to_string();
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .env("TIDEMARK_TS", element.ts.to_string())
            .env("TIDEMARK_GROUP", &self.group)
            .env("TIDEMARK_CONSUMER", &self.consumer)
            .env("TIDEMARK_DELIVERY", element.delivery.to_string())
            .env("TIDEMARK_MAX_DELIVERIES", self.max_deliveries.to_string())
            .env("TIDEMARK_ENTRY_ID", &entry)
            // Our Redis password is not the command's business.
            .env_remove(crate::config::REDIS_PASSWORD_ENV)
            .env_remove(crate::config::REDIS_SENTINEL_PASSWORD_ENV)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: a timeout kills everything it started,
            // and a Ctrl-C meant for tidemark does not cut it short.
            .process_group(0)
            .kill_on_drop(true);
        // Environment values cannot hold NUL bytes; such ids (and non-UTF-8
        // ones) go in base64, like in the JSON.
        match std::str::from_utf8(&element.id) {
            Ok(text) if !text.contains('\0') => {
                cmd.env("TIDEMARK_ID", OsStr::from_bytes(&element.id)).env_remove("TIDEMARK_ID_ENCODING");
            }
            _ => {
                cmd.env("TIDEMARK_ID", crate::core::json::base64(&element.id)).env("TIDEMARK_ID_ENCODING", "base64");
            }
        }
        let child = cmd.spawn().map_err(|e| {
            error!(id = %id, entry = %entry, command = %self.program, error = %e, "cannot run the command");
            CommandFailure(format!("cannot run {:?}: {e}", self.program))
        })?;
        let mut child = Group(child);
        let stderr = Arc::new(Mutex::new(StderrTail::default()));
        let pumps = [
            child.0.stdout.take().map(|out| tokio::spawn(log_lines(out, "stdout", id.clone(), entry.clone(), None))),
            child.0.stderr.take().map(|err| {
                tokio::spawn(log_lines(err, "stderr", id.clone(), entry.clone(), Some(Arc::clone(&stderr))))
            }),
        ];
        // Fed from its own task: a command that never reads stdin (or a
        // background process holding it) must not hold up its exit.
        let input = super::element_json(&element);
        let feed = child.0.stdin.take().map(|mut stdin| {
            tokio::spawn(async move {
                // A command that exits without reading everything is fine.
                let _ = stdin.write_all(&input).await;
                let _ = stdin.shutdown().await;
            })
        });
        let result = match tokio::time::timeout(self.timeout, child.0.wait()).await {
            Ok(Ok(status)) => describe(status),
            Ok(Err(e)) => Err(CommandFailure(format!("cannot wait for the command: {e}"))),
            Err(_) => {
                child.kill();
                let _ = child.0.wait().await;
                Err(CommandFailure(format!("timed out after {}; killed", humantime::format_duration(self.timeout))))
            }
        };
        if let Some(feed) = feed {
            feed.abort();
        }
        drain(pumps).await;
        result.map_err(|failure| failure.with_stderr(&stderr.lock().unwrap_or_else(PoisonError::into_inner)))
    }
}

/// Exit 0 is success; anything else is a failure worth a sentence.
fn describe(status: ExitStatus) -> Result<(), CommandFailure> {
    match (status.code(), status.signal()) {
        (Some(0), _) => Ok(()),
        (Some(code), _) => Err(CommandFailure(format!("exited with status {code}"))),
        (None, Some(signal)) => Err(CommandFailure(format!("was killed by signal {signal}"))),
        (None, None) => Err(CommandFailure(format!("ended with {status}"))),
    }
}

/// Waits a little for the command's output to reach the log.
async fn drain(pumps: [Option<JoinHandle<()>>; 2]) {
    let all = async {
        for pump in pumps.into_iter().flatten() {
            let _ = pump.await;
        }
    };
    let _ = tokio::time::timeout(OUTPUT_DRAIN, all).await;
}

/// Logs `stream` line by line, tagged with the element, keeping the last
/// lines in `tail` if given.
async fn log_lines(
    stream: impl AsyncRead + Unpin,
    name: &'static str,
    id: String,
    entry: String,
    tail: Option<Arc<Mutex<StderrTail>>>,
) {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut reader).take(MAX_LINE).read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let text = String::from_utf8_lossy(line.strip_suffix(b"\n").unwrap_or(&line));
                let text = text.strip_suffix('\r').unwrap_or(&text);
                info!(id = %id, entry = %entry, stream = %name, "{text}");
                if let Some(tail) = &tail {
                    tail.lock().unwrap_or_else(PoisonError::into_inner).push(text);
                }
            }
        }
    }
}

/// A running command; kills its whole process group when dropped before it
/// was reaped (its task aborted at the end of the shutdown grace).
struct Group(Child);

impl Group {
    /// SIGKILLs the process group. Only while the leader is not reaped: its
    /// pid, and so the group id, cannot have been reused yet.
    fn kill(&mut self) {
        if let Some(pid) = self.0.id().and_then(|p| Pid::from_raw(p as i32)) {
            let _ = kill_process_group(pid, Signal::KILL);
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses() {
        assert!(describe(ExitStatus::from_raw(0)).is_ok());
        assert_eq!(describe(ExitStatus::from_raw(1 << 8)).unwrap_err().to_string(), "exited with status 1");
        assert_eq!(describe(ExitStatus::from_raw(9)).unwrap_err().to_string(), "was killed by signal 9");
    }

    fn tail(lines: &[&str]) -> StderrTail {
        let mut t = StderrTail::default();
        for l in lines {
            t.push(l);
        }
        t
    }

    #[test]
    fn failure_ends_with_the_last_lines_of_stderr() {
        let failure = || CommandFailure("exited with status 1".into());
        assert_eq!(failure().with_stderr(&tail(&[])).to_string(), "exited with status 1");
        assert_eq!(failure().with_stderr(&tail(&["", "  "])).to_string(), "exited with status 1");
        let t = tail(&["Traceback (most recent call last):", "  File \"remind.py\"", "KeyError: 'customer'", ""]);
        assert_eq!(
            failure().with_stderr(&t).to_string(),
            "exited with status 1; last lines of stderr:\nTraceback (most recent call last):\n  File \"remind.py\"\n\
             KeyError: 'customer'"
        );
    }

    #[test]
    fn stderr_is_bounded_and_keeps_its_end() {
        // Much more output than fits: the message stays within the bound,
        // says that output was left out, and ends with the last line.
        let lines: Vec<String> = (0..2_000).map(|i| format!("line {i} {}", "x".repeat(i % 50))).collect();
        let t = tail(&lines.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(t.bytes <= STDERR_KEPT);
        let message = CommandFailure("exited with status 3".into()).with_stderr(&t).to_string();
        assert!(message.len() <= MAX_FAILURE, "{} bytes", message.len());
        assert!(message.len() > MAX_FAILURE - 100, "the room is used: {} bytes", message.len());
        assert!(message.starts_with("exited with status 3; last lines of stderr:\n…\n"), "{message}");
        assert!(message.ends_with(&lines[1_999]), "{message}");
        // One line longer than everything: its end, on a char boundary.
        let long = format!("start{}end", "é".repeat(3_000));
        let message = CommandFailure("was killed by signal 9".into()).with_stderr(&tail(&[&long])).to_string();
        assert!(message.len() <= MAX_FAILURE, "{} bytes", message.len());
        assert!(message.ends_with("ééend") && message.contains("stderr:\n…é"), "{message}");
        // The dead letter's detail, with its prefix, is never cut.
        assert!(MAX_FAILURE + "delivery 1000000 of 1000000 failed: ".len() <= super::super::runtime::MAX_DETAIL);
    }

    #[test]
    fn finds_commands() {
        assert!(on_path("sh"));
        assert!(on_path("/bin/sh"));
        assert!(!on_path("tidemark-no-such-command"));
        assert!(!on_path("/no/such/file"));
    }
}
