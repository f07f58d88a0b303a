//! What a new user trips over in the first hour (issue 10), each checked
//! against real processes: dead letters of `tidemark consume` say why (the
//! end of the command's stderr), a mistyped namespace is reported, big
//! payloads go in from files and stdin, several processes share one host
//! with the default HTTP settings, `consume --from new`, the daemon's
//! periodic summary, and `make run`'s script stopping on SIGTERM.

use std::os::unix::process::CommandExt;
use std::time::Duration;

use testkit::repo_dir as repo;
use testkit::{field, keys, read_stream, run_cli, wait_until, Daemon, RedisServer};

const WAIT: Duration = Duration::from_secs(30);

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `XADD`s an element to `:out` as a daemon releases it.
fn release(conn: &mut redis::Connection, id: &str) -> String {
    redis::cmd("XADD")
        .arg(keys("default").out)
        .arg("*")
        .arg("id")
        .arg(id)
        .arg("ts")
        .arg(1)
        .query(conn)
        .expect("XADD :out")
}

/// A command that fails after writing to stderr: the dead letter's detail
/// ends with the last lines it wrote (bounded), and `dead list` shows them.
#[test]
fn dead_letters_of_consume_end_with_the_commands_stderr() {
    let redis = RedisServer::start();
    let mut conn = redis.sync_conn();
    let url = redis.url();
    // A short traceback for one element, 100 KB of noise then a last line
    // for the other.
    let script = r#"
        if [ "$TIDEMARK_ID" = noisy ]; then
          i=0; while [ $i -lt 2000 ]; do echo "noise line $i ................................................"; i=$((i+1)); done >&2
          echo "the last word" >&2
          exit 3
        fi
        echo "working on $TIDEMARK_ID"
        echo 'Traceback (most recent call last):' >&2
        echo '  File "remind.py", line 14, in <module>' >&2
        echo "KeyError: 'customer'" >&2
        exit 1
    "#;
    let consume = Daemon::spawn(
        &[
            "consume",
            "--redis-url",
            &url,
            "--group",
            "g",
            "--consumer",
            "c",
            "--max-deliveries",
            "2",
            "--claim-idle",
            "300ms",
            "--",
            "sh",
            "-c",
            script,
        ],
        &[],
    );
    consume.wait_log("consuming", WAIT);
    let hello = release(&mut conn, "hello");
    let noisy = release(&mut conn, "noisy");
    wait_until("both elements are dead-lettered", WAIT, || read_stream(&mut conn, &keys("default").dead).len() == 2);
    let dead = read_stream(&mut conn, &keys("default").dead);
    let detail_of = |origin_id: &str| {
        let letter = dead.iter().find(|(_, f)| field(f, "origin_id") == Some(origin_id.as_bytes())).expect("letter");
        String::from_utf8(field(&letter.1, "detail").expect("detail").to_vec()).expect("UTF-8 detail")
    };
    assert_eq!(
        detail_of(&hello),
        "delivery 2 of 2 failed: exited with status 1; last lines of stderr:\n\
         Traceback (most recent call last):\n  File \"remind.py\", line 14, in <module>\nKeyError: 'customer'"
    );
    let detail = detail_of(&noisy);
    assert!(detail.starts_with("delivery 2 of 2 failed: exited with status 3; last lines of stderr:\n…\nnoise line "));
    assert!(detail.ends_with("\nnoise line 1999 ................................................\nthe last word"));
    assert!(detail.len() <= 2000, "bounded: {} bytes", detail.len());
    assert!(detail.len() > 1500, "about 2 KB of stderr kept: {} bytes", detail.len());

    // The table shows the end of each detail.
    let out = run_cli(&["dead", "list", "--redis-url", &url], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let table = stdout(&out);
    let row = |origin_id: &str| table.lines().find(|l| l.contains(origin_id)).unwrap_or_else(|| panic!("{table}"));
    assert!(row(&hello).ends_with("KeyError: 'customer'"), "{table}");
    assert!(row(&noisy).ends_with("the last word"), "{table}");
    assert!(row(&hello).contains("delivery 2 of 2 failed"), "{table}");
}

/// Runs `tidemark ARGS` with `input` on stdin, in a clean environment (as
/// `run_cli` does), and returns its output.
fn run_cli_with_stdin(args: &[&str], input: &[u8]) -> std::process::Output {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut cmd = Command::new(testkit::bin_path());
    cmd.args(args).current_dir(std::env::temp_dir());
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if matches!(&*k, "REDIS_URL" | "REDIS_PASSWORD" | "POD_NAME" | "TIDEMARK_CONFIG") || k.starts_with("TIDEMARK__")
        {
            cmd.env_remove(&key);
        }
    }
    let mut child =
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn tidemark");
    let mut stdin = child.stdin.take().expect("stdin");
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().expect("wait for tidemark");
    writer.join().expect("stdin writer");
    out
}

/// 1 MiB values go in through `--field-file` and `--json -` (the command
/// line holds at most 128 KiB per argument) and come out of `:out` byte for
/// byte, in command-line order; over the configured limit, `add` warns that
/// the daemons will dead-letter the entry, and they do.
#[test]
fn big_payloads_from_files_and_stdin() {
    const MIB: usize = 1 << 20;
    let redis = RedisServer::start();
    let mut conn = redis.sync_conn();
    let url = redis.url();
    let k = keys("default");
    let daemon = Daemon::spawn(
        &["run", "--redis-url", &url, "--consumer", "d1"],
        &[("TIDEMARK__LIMITS__MAX_PAYLOAD_BYTES", "4194304")],
    );
    // Connected: it has recorded the namespace's layout, so the CLI below
    // has nothing to warn about.
    daemon.wait_log("connected to Redis", WAIT);
    let dir = tempfile::tempdir().unwrap();
    // 1 MiB of binary, every byte value, and a newline at the end.
    let blob: Vec<u8> = (0..MIB).map(|i| (i * 7 % 256) as u8).collect();
    let blob_path = dir.path().join("blob.bin");
    std::fs::write(&blob_path, &blob).unwrap();
    let blob_arg = format!("blob={}", blob_path.display());

    let big_limit = [("TIDEMARK__LIMITS__MAX_PAYLOAD_BYTES", "4194304")];
    let out = run_cli(
        &[
            "--redis-url",
            &url,
            "add",
            "--id",
            "from-file",
            "--ts",
            "1",
            "--field",
            "a=1",
            "--field-file",
            &blob_arg,
            "--field",
            "z=2",
        ],
        &big_limit,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).is_empty(), "no warning within the limit: {}", stderr(&out));

    // A JSON object on stdin: a 1 MiB text value, a binary one, a repeat.
    let text: String = "grüße ".repeat(MIB / 8);
    let json = serde_json::json!({"note": text, "raw": {"base64": "AP8="}, "tag": ["x", "y"]});
    let out = run_cli_with_stdin(
        &["--redis-url", &url, "add", "--id", "from-stdin", "--ts", "2", "--field", "first=0", "--json", "-"],
        json.to_string().as_bytes(),
    );
    // run_cli_with_stdin does not set the limit: the default 1 MiB applies
    // to the CLI's check, and this payload is over it.
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("warning: a daemon with this configuration's limits"), "{}", stderr(&out));
    assert!(stderr(&out).contains("too_large"), "{}", stderr(&out));

    let out = run_cli(&["--redis-url", &url, "watermark", "2"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_until("both elements are released", WAIT, || read_stream(&mut conn, &k.out).len() == 2);
    let released = read_stream(&mut conn, &k.out);
    let names = |fields: &[(Vec<u8>, Vec<u8>)]| -> Vec<String> {
        fields.iter().map(|(n, _)| String::from_utf8_lossy(n).into_owned()).collect()
    };
    let file_el = &released[0].1;
    assert_eq!(names(file_el), ["id", "ts", "a", "blob", "z"]);
    assert_eq!(field(file_el, "blob"), Some(blob.as_slice()), "the file's bytes, exactly");
    let stdin_el = &released[1].1;
    assert_eq!(names(stdin_el), ["id", "ts", "first", "note", "raw", "tag", "tag"]);
    assert_eq!(field(stdin_el, "note"), Some(text.as_bytes()));
    assert_eq!(field(stdin_el, "raw"), Some(&[0u8, 0xff][..]));
    assert_eq!(stdin_el[6].1, b"y");

    // Over the daemon's limit too: the warning was right.
    let mut over = br#"{"big": ""#.to_vec();
    over.extend(std::iter::repeat_n(b'x', 4 * MIB));
    over.extend(br#""}"#);
    let out = run_cli_with_stdin(&["--redis-url", &url, "add", "--id", "too-big", "--ts", "1", "--json", "-"], &over);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("too_large"), "{}", stderr(&out));
    wait_until("the oversized entry is dead-lettered", WAIT, || read_stream(&mut conn, &k.dead).len() == 1);
    let dead = read_stream(&mut conn, &k.dead);
    assert_eq!(field(&dead[0].1, "reason"), Some(&b"too_large"[..]));
}

/// A `tidemark` process started with the built-in HTTP default (the
/// harness turns HTTP off unless asked, which is what this checks), its
/// output in a log file; killed on drop.
struct DefaultHttp {
    child: std::process::Child,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl DefaultHttp {
    fn spawn(args: &[&str]) -> DefaultHttp {
        use std::process::{Command, Stdio};
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("tidemark.log");
        let out = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(testkit::bin_path());
        // Its own directory: no config/tidemark.toml, no developer's environment.
        cmd.args(args).current_dir(dir.path()).env("RUST_LOG", "info");
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if matches!(&*k, "REDIS_URL" | "REDIS_PASSWORD" | "POD_NAME" | "TIDEMARK_CONFIG")
                || k.starts_with("TIDEMARK__")
            {
                cmd.env_remove(&key);
            }
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone().expect("clone log")))
            .stderr(Stdio::from(out))
            .spawn()
            .expect("spawn tidemark");
        DefaultHttp { child, log, _dir: dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The address it serves HTTP on, from its log.
    fn addr(&self) -> String {
        const LINE: &str = "over HTTP addr=";
        wait_until("the process serves HTTP", WAIT, || self.log().contains(LINE));
        let log = self.log();
        let at = log.find(LINE).expect("the line") + LINE.len();
        log[at..].split_whitespace().next().expect("an address").to_owned()
    }
}

impl Drop for DefaultHttp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("----- {} -----\n{}", self.log.display(), self.log());
        }
    }
}

/// With default settings, two daemons and a `tidemark consume` share one
/// host: each serves HTTP (the first free one on 127.0.0.1:9464, the others
/// on free ports, said in the log) and answers its probes; an explicitly
/// configured address that is taken stays an error, from the flag, the
/// environment or a file, before Redis is touched.
#[test]
fn several_processes_share_a_host_with_default_settings() {
    let redis = RedisServer::start();
    let url = redis.url();
    let a = DefaultHttp::spawn(&["run", "--redis-url", &url, "--consumer", "a"]);
    let b = DefaultHttp::spawn(&["run", "--redis-url", &url, "--consumer", "b"]);
    let c = DefaultHttp::spawn(&["consume", "--redis-url", &url, "--group", "g", "--consumer", "c", "--", "true"]);
    let addrs = [a.addr(), b.addr(), c.addr()];
    let mut distinct = addrs.to_vec();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "three addresses: {addrs:?}");
    for (p, addr) in [&a, &b, &c].into_iter().zip(&addrs) {
        assert!(addr.starts_with("127.0.0.1:"), "{addr}");
        let (code, body) = testkit::http_get(addr, "/healthz").expect("GET /healthz");
        assert_eq!((code, body.as_str()), (200, "ok\n"), "{}", p.log());
        wait_until(&format!("{addr}: /readyz 200"), WAIT, || {
            matches!(testkit::http_get(addr, "/readyz"), Ok((200, _)))
        });
    }
    // Those that did not get the default port said so.
    let moved = [&a, &b, &c].iter().filter(|p| p.log().contains("the default HTTP address is taken")).count();
    let on_default = addrs.iter().filter(|a| a.as_str() == tidemark::config::DEFAULT_HTTP_ADDR).count();
    assert_eq!(moved + on_default, 3, "{addrs:?}");

    // Configured explicitly, a taken address is an error (exit 1).
    let fresh = RedisServer::start();
    let fresh_url = fresh.url();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tidemark.toml");
    std::fs::write(&file, format!("[http]\naddr = \"{taken_addr}\"\n")).unwrap();
    let file = file.to_str().unwrap();
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>);
    let cases: [Case; 2] = [
        (vec!["--http", &taken_addr, "run"], vec![]),
        (vec!["consume", "--group", "g", "--", "true"], vec![("TIDEMARK__HTTP__ADDR", &taken_addr)]),
    ];
    for (args, envs) in cases {
        let mut all = vec!["--redis-url", fresh_url.as_str()];
        all.extend(args.iter().copied());
        let out = run_cli(&all, &envs);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(&format!("cannot listen for HTTP on {taken_addr}")), "{}", stderr(&out));
    }
    // From a file (run_cli would add `--http off`, which beats the file).
    let mut from_file = DefaultHttp::spawn(&["--redis-url", &fresh_url, "--config", file, "run"]);
    let deadline = std::time::Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = from_file.child.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "still running: {}", from_file.log());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(1), "{}", from_file.log());
    assert!(from_file.log().contains(&format!("cannot listen for HTTP on {taken_addr}")), "{}", from_file.log());
    let dbsize: i64 = redis::cmd("DBSIZE").query(&mut fresh.sync_conn()).unwrap();
    assert_eq!(dbsize, 0, "Redis was not touched");
}

/// The repository's root.
/// Fails, naming the fix, unless `program` runs.
fn require(program: &str, why: &str) {
    let found = std::process::Command::new(program)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(found, "{program} is needed {why}: run `make test` (it installs it), or install it yourself");
}

/// Runs one line of `make run`'s banner with `sh -c` and returns its output.
fn banner_line(line: &str) -> std::process::Output {
    std::process::Command::new("sh").arg("-c").arg(line).output().expect("run sh")
}

/// `make run` started in the background by a script (so SIGINT is ignored,
/// which no trap can undo): the banner says so and how to stop it; every
/// line it prints works as printed, the README's examples included (the
/// output group `billing` exists, `examples/remind.py` handles the banner's
/// `hello` element and the README's `order-42`); SIGTERM stops the daemon
/// and the private Redis cleanly.
#[test]
fn make_run_banner_lines_work_and_sigterm_stops_it() {
    require("redis-cli", "to paste make run's banner lines");
    require("python3", "to run examples/remind.py, the README's consumer");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("make-run.log");
    let pidfile = dir.path().join("pid");
    let mut cmd = std::process::Command::new("bash");
    // As a script does it: `scripts/run-local.sh &` in a non-interactive shell.
    cmd.arg("-c")
        .arg(r#""$RUN_LOCAL" >"$LOG" 2>&1 & echo $! >"$PIDFILE"; wait $!"#)
        .env("RUN_LOCAL", repo().join("scripts/run-local.sh"))
        .env("LOG", &log)
        .env("PIDFILE", &pidfile)
        .env("TIDEMARK_BIN", testkit::bin_path())
        .env("RUST_LOG", "info")
        .current_dir(repo());
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if matches!(&*k, "REDIS_URL" | "REDIS_PASSWORD" | "POD_NAME" | "TIDEMARK_CONFIG") || k.starts_with("TIDEMARK__")
        {
            cmd.env_remove(&key);
        }
    }
    let mut shell = cmd.spawn().expect("start bash");
    struct Stop(Option<String>);
    impl Drop for Stop {
        fn drop(&mut self) {
            if let Some(pid) = &self.0 {
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", pid])
                    .stderr(std::process::Stdio::null())
                    .status();
            }
        }
    }
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_until("run-local.sh started", WAIT, || std::fs::read_to_string(&pidfile).is_ok_and(|p| !p.trim().is_empty()));
    let pid = std::fs::read_to_string(&pidfile).unwrap().trim().to_owned();
    let _stop = Stop(Some(pid.clone()));
    wait_until("the daemon is connected", Duration::from_secs(60), || read_log().contains("connected to Redis"));
    let banner = read_log();
    assert!(banner.contains(r#"Output group "billing" created"#), "{banner}");
    assert!(
        banner.contains(&format!("Stop with: kill {pid}   (SIGTERM; SIGINT is ignored here")),
        "the banner says how to stop it:\n{banner}"
    );
    let lines: Vec<&str> =
        banner.lines().map(str::trim).filter(|l| l.starts_with("redis-cli ") || l.starts_with("REDIS_URL=")).collect();
    let consume_line = *lines.iter().find(|l| l.contains(" consume ")).expect("a consume line in the banner");
    let port = lines[0].split_whitespace().nth(2).expect("redis-cli -p PORT").to_owned();

    // Every one-shot line as printed, in order: hello is added, released,
    // and read in group billing.
    for line in lines.iter().filter(|l| !l.contains(" consume ")) {
        let out = banner_line(line);
        let text = format!("{}{}", stdout(&out), stderr(&out));
        assert!(out.status.success(), "{line}: {text}");
        assert!(!text.contains("ERR") && !text.contains("NOGROUP"), "{line}: {text}");
        if line.contains("XRANGE") {
            wait_until("hello is released", WAIT, || stdout(&banner_line(line)).contains("hello"));
        }
        if line.contains("XREADGROUP") {
            // hello is in :out by now (the XRANGE line waited for it).
            assert!(text.contains("hello") && text.contains("world"), "{line}: {text}");
        }
        if line.contains(" status") {
            assert!(text.contains("billing"), "{line}: {text}");
        }
    }
    // Every redis-cli line of the README's wire-format and output sections,
    // read from README.md, with the `-p PORT` the README says to add for
    // `make run`'s Redis: order-42 and order-43 added, order-43 cancelled,
    // the watermark, then reading `:out` as the README shows.
    let readme = testkit::read_file(&repo().join("README.md"));
    let readme_lines: Vec<&str> =
        readme.lines().filter(|l| l.starts_with("redis-cli ") && l.contains("'tidemark:{default}:")).collect();
    assert!(readme_lines.len() >= 6, "the README's redis-cli lines: {readme_lines:?}");
    for readme_line in readme_lines {
        let line = readme_line.replacen("redis-cli ", &format!("redis-cli -p {port} "), 1);
        if line.contains(" XRANGE ") {
            wait_until("order-42 is released", WAIT, || stdout(&banner_line(&line)).contains("order-42"));
        }
        let out = banner_line(&line);
        let text = format!("{}{}", stdout(&out), stderr(&out));
        assert!(out.status.success() && !text.contains("ERR") && !text.contains("NOGROUP"), "{line}: {text}");
        if line.contains(" XREADGROUP ") {
            assert!(text.contains("order-42") && !text.contains("order-43"), "{line}: {text}");
        }
    }
    // The consumer from the banner: both elements handled and acknowledged.
    let consumer_log = dir.path().join("consume.log");
    let mut consumer = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{consume_line} >'{}' 2>&1", consumer_log.display()))
        .process_group(0)
        .spawn()
        .expect("start the banner's consume line");
    let consumer_group = format!("-{}", consumer.id());
    let consumer_text = || std::fs::read_to_string(&consumer_log).unwrap_or_default();
    let handled = || {
        let t = consumer_text();
        t.contains("hello: no customer field, nothing to remind") && t.contains("reminding customer 7 of order-42")
    };
    let deadline = std::time::Instant::now() + WAIT;
    while !handled() {
        assert!(std::time::Instant::now() < deadline, "remind.py did not handle both elements:\n{}", consumer_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::process::Command::new("kill").args(["-TERM", "--", &consumer_group]).status();
    let _ = consumer.wait();
    assert!(!consumer_text().contains("KeyError"), "{}", consumer_text());
    let dead = banner_line(&format!("redis-cli -p {port} XLEN 'tidemark:{{default}}:dead'"));
    assert_eq!(stdout(&dead).trim(), "0", "no dead letters:\n{}", consumer_text());

    // SIGTERM, as the banner says: the daemon stops, then Redis, cleanly.
    let status = std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(status.success());
    let deadline = std::time::Instant::now() + WAIT;
    let exit = loop {
        if let Some(exit) = shell.try_wait().unwrap() {
            break exit;
        }
        assert!(std::time::Instant::now() < deadline, "make run did not stop on SIGTERM:\n{}", read_log());
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = read_log();
    assert_eq!(exit.code(), Some(0), "{text}");
    assert!(text.contains("tidemark exited with status 0"), "{text}");
    assert!(text.contains("stopped the private redis-server"), "{text}");
    let ping = banner_line(&format!("redis-cli -p {port} PING"));
    assert!(!stdout(&ping).contains("PONG"), "the private Redis is gone");
}

/// `consume --from new` creates a missing group at `$`: only elements
/// released from then on; the default (`start`) creates it at `0`: every
/// element still in `:out`; a group that exists keeps its place whatever
/// `--from` says.
#[test]
fn consume_from_new_skips_the_history_of_a_new_group() {
    let redis = RedisServer::start();
    let mut conn = redis.sync_conn();
    let url = redis.url();
    for id in ["old-1", "old-2", "old-3"] {
        release(&mut conn, id);
    }
    let dir = tempfile::tempdir().unwrap();
    let seen = |name: &str| dir.path().join(name);
    let record = r#"echo "$TIDEMARK_ID" >> "$SEEN""#;
    let consume = |group: &str, consumer: &str, from: Option<&str>, file: &std::path::Path| {
        let mut args = vec!["consume", "--redis-url", &url, "--group", group, "--consumer", consumer];
        if let Some(from) = from {
            args.extend(["--from", from]);
        }
        args.extend(["--", "sh", "-c", record]);
        let d = Daemon::spawn(&args, &[("SEEN", file.to_str().unwrap())]);
        d.wait_log("consuming", WAIT);
        d
    };
    let lines = |file: &std::path::Path| -> Vec<String> {
        std::fs::read_to_string(file).map(|t| t.lines().map(str::to_owned).collect()).unwrap_or_default()
    };
    let fresh = consume("fresh", "c1", Some("new"), &seen("fresh"));
    let _replay = consume("replay", "c2", None, &seen("replay"));
    assert!(fresh.log().contains("created output group") && fresh.log().contains("at=$"), "{}", fresh.log());
    release(&mut conn, "new-1");
    wait_until("both groups handled new-1", WAIT, || {
        lines(&seen("fresh")).contains(&"new-1".to_owned()) && lines(&seen("replay")).len() == 4
    });
    assert_eq!(lines(&seen("fresh")), ["new-1"], "--from new: nothing from before");
    let mut replayed = lines(&seen("replay"));
    replayed.sort();
    assert_eq!(replayed, ["new-1", "old-1", "old-2", "old-3"], "the default starts at the beginning");
    drop(fresh);

    // An existing group goes on where it is: --from start does not rewind it.
    release(&mut conn, "new-2");
    let again = consume("fresh", "c3", Some("start"), &seen("fresh"));
    wait_until("the existing group handled new-2", WAIT, || lines(&seen("fresh")).len() == 2);
    assert_eq!(lines(&seen("fresh")), ["new-1", "new-2"]);
    assert!(!again.log().contains("created output group"), "{}", again.log());

    // Anything else is refused before connecting.
    let out = run_cli(&["--redis-url", &url, "consume", "--group", "g", "--from", "end", "--", "true"], &[]);
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(stderr(&out).contains("end"), "{}", stderr(&out));
}

/// A mistyped namespace: `add` (and `cancel`, `watermark`) still write the
/// entry and exit 0, but warn on stderr that no daemon serves it, naming
/// the namespaces that are served; `status` and the dashboard (served by a
/// `consume` of that namespace) say plainly that nothing serves it. In the
/// served namespace nothing is said.
#[test]
fn a_namespace_no_daemon_serves_is_reported() {
    let redis = RedisServer::start();
    let mut conn = redis.sync_conn();
    let url = redis.url();
    let daemon = Daemon::spawn(&["run", "--redis-url", &url, "--consumer", "d1"], &[]);
    daemon.wait_log("connected to Redis", WAIT);

    let out = run_cli(&["--redis-url", &url, "add", "--id", "a", "--ts", "1"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stderr(&out), "", "served: no warning");

    for args in [
        &["--namespace", "nosuch", "add", "--id", "a", "--ts", "1"][..],
        &["--namespace", "nosuch", "cancel", "--id", "a"][..],
        &["--namespace", "nosuch", "watermark", "5"][..],
    ] {
        let mut all = vec!["--redis-url", url.as_str()];
        all.extend_from_slice(args);
        let out = run_cli(&all, &[]);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        assert!(!stdout(&out).trim().is_empty(), "the entry id is printed");
        let err = stderr(&out);
        assert!(
            err.contains("warning: no daemon is serving namespace \"nosuch\"")
                && err.contains("tidemark --namespace nosuch run")
                && err.contains("namespaces with a daemon: default"),
            "{args:?}: {err}"
        );
    }
    assert_eq!(read_stream(&mut conn, &keys("nosuch").input).len(), 3, "the entries are written");

    // status, in text and JSON.
    let out = run_cli(&["--redis-url", &url, "--namespace", "nosuch", "status"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("NO DAEMON serves namespace \"nosuch\": nothing is applied or released"),
        "{}",
        stdout(&out)
    );
    let out = run_cli(&["--redis-url", &url, "--namespace", "nosuch", "status", "--json"], &[]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(json["input"]["live_daemons"], 0, "{json}");
    let out = run_cli(&["--redis-url", &url, "status", "--json"], &[]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(json["input"]["live_daemons"], 1, "{json}");
    let out = run_cli(&["--redis-url", &url, "status"], &[]);
    assert!(!stdout(&out).contains("NO DAEMON"), "{}", stdout(&out));

    // The dashboard of a consumer in that namespace.
    crate::dashboard::chromium();
    let consumer = Daemon::spawn(
        &[
            "consume",
            "--redis-url",
            &url,
            "--namespace",
            "nosuch",
            "--group",
            "g",
            "--http",
            "127.0.0.1:0",
            "--",
            "true",
        ],
        &[],
    );
    let addr: std::net::SocketAddr = consumer.http_addr(Duration::from_secs(60));
    let dom = crate::dashboard::rendered(addr, "ok");
    let notice = crate::dashboard::one(&dom, "#no-daemon");
    assert!(notice.value().attr("hidden").is_none(), "the notice is shown:\n{}", dom.html());
    assert_eq!(
        crate::dashboard::text(notice),
        "No daemon is serving namespace nosuch: nothing is applied or released until one runs \
         (tidemark --namespace nosuch run)."
    );
    assert_eq!(crate::dashboard::shown(&dom, "input-live-daemons"), ("0".into(), "0".into()));
}

/// Serves `page` at `/` with `script` added before `</body>`, and proxies
/// `/api/dashboard` to the real process at `upstream`: a way to measure the
/// real page's layout in Chromium (whose `--dump-dom` shows what the added
/// script wrote). Returns the proxy's address.
fn measuring_proxy(upstream: String, script: &'static str) -> std::net::SocketAddr {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut first = String::new();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            if reader.read_line(&mut first).is_err() {
                continue;
            }
            // The rest of the head.
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let path = first.split_whitespace().nth(1).unwrap_or("/").to_owned();
            let (code, kind, body) = match path.as_str() {
                "/" => {
                    let (code, page) = testkit::http_get(&upstream, "/").unwrap_or((502, String::new()));
                    (
                        code,
                        "text/html; charset=utf-8",
                        page.replace("</body>", &format!("<script>{script}</script></body>")),
                    )
                }
                p if p.starts_with("/api/dashboard") => {
                    let (code, json) = testkit::http_get(&upstream, "/api/dashboard").unwrap_or((502, String::new()));
                    (code, "application/json", json)
                }
                _ => (404, "text/plain", String::new()),
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {code} X\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    addr
}

/// Measures, once the page shows data: every number in the overview cards
/// must lie on one line, and no big value may overflow its card.
const MEASURE: &str = r#"
(function measure() {
  if (document.body.dataset.state !== "ok") { setTimeout(measure, 50); return; }
  var broken = [], overflowing = [];
  var walker = document.createTreeWalker(document.querySelector(".cards"), NodeFilter.SHOW_TEXT);
  for (var node = walker.nextNode(); node; node = walker.nextNode()) {
    var re = /\d[\d,]*\d/g, m;
    while ((m = re.exec(node.data)) !== null) {
      var range = document.createRange();
      range.setStart(node, m.index);
      range.setEnd(node, m.index + m[0].length);
      var tops = {};
      Array.prototype.forEach.call(range.getClientRects(), function (r) {
        if (r.width > 0) { tops[Math.round(r.top)] = true; }
      });
      if (Object.keys(tops).length > 1) { broken.push(m[0]); }
    }
  }
  Array.prototype.forEach.call(document.querySelectorAll(".card .big"), function (el) {
    if (el.scrollWidth > el.clientWidth + 1) { overflowing.push(el.id + ": " + el.textContent); }
  });
  document.body.dataset.layout = JSON.stringify({ broken: broken, overflowing: overflowing,
    width: window.innerWidth, watermarkTime: document.getElementById("watermark-time").textContent });
})();
"#;

/// A watermark in milliseconds since the epoch (13 digits with separators)
/// stays on one line on a desktop and on a phone, and is shown as a UTC
/// time too, as is the next due ts.
#[test]
fn dashboard_keeps_numbers_on_one_line_and_shows_epoch_ms_as_utc() {
    crate::dashboard::chromium();
    let redis = RedisServer::start();
    let mut conn = redis.sync_conn();
    let url = redis.url();
    let k = keys("default");
    let daemon = Daemon::spawn(&["run", "--redis-url", &url, "--consumer", "d1", "--http", "127.0.0.1:0"], &[]);
    let upstream = daemon.http_addr(Duration::from_secs(60)).to_string();
    // 2027-01-15 08:00:00 UTC, and an element a minute later.
    testkit::xadd_fields(&mut conn, &k.input, &[(b"op", b"watermark"), (b"ts", b"1800000000000")]);
    testkit::xadd_fields(&mut conn, &k.input, &[(b"op", b"add"), (b"id", b"later"), (b"ts", b"1800000060000")]);
    wait_until("applied", WAIT, || {
        let n: i64 = redis::cmd("ZCARD").arg(&k.sched).query(&mut conn).unwrap();
        n == 1
    });
    let proxy = measuring_proxy(upstream, MEASURE);
    for (width, height) in [(1280, 900), (1024, 768), (500, 900)] {
        let window = format!("--window-size={width},{height}");
        let deadline = std::time::Instant::now() + WAIT;
        let (layout, dom) = loop {
            let dom = scraper::Html::parse_document(&crate::dashboard::browse(
                &format!("http://{proxy}/"),
                &["--dump-dom", &window],
            ));
            let layout = crate::dashboard::one(&dom, "body").value().attr("data-layout").map(str::to_owned);
            if let Some(layout) = layout {
                break (serde_json::from_str::<serde_json::Value>(&layout).unwrap(), dom);
            }
            assert!(std::time::Instant::now() < deadline, "the page never showed data:\n{}", dom.html());
        };
        assert_eq!(layout["width"], width, "{layout}");
        assert_eq!(layout["broken"], serde_json::json!([]), "numbers wrapped at {width}px: {layout}");
        assert_eq!(layout["overflowing"], serde_json::json!([]), "values overflow their card at {width}px: {layout}");
        let wm = crate::dashboard::shown(&dom, "watermark");
        assert_eq!(wm, ("1800000000000".into(), "1,800,000,000,000".into()));
        assert_eq!(layout["watermarkTime"], "2027-01-15 08:00:00.000 UTC (as Unix ms)", "{layout}");
        let next = crate::dashboard::shown(&dom, "next-due").1;
        assert!(next.ends_with(" · 2027-01-15 08:01:00.000 UTC"), "{next}");
    }
}

/// The JSON log lines of a process whose message is `message`.
fn log_events(log: &str, message: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["message"] == message)
        .collect()
}

/// The daemon logs a periodic summary at info: what it ingested (by op),
/// released, late and dead-lettered since the last line, the watermark
/// (also as UTC when it reads as epoch ms), input lag and scheduled count;
/// the lines add up to exactly what was done.
#[test]
fn the_daemon_logs_a_periodic_summary() {
    let redis = RedisServer::start();
    let mut conn = redis.sync_conn();
    let url = redis.url();
    let k = keys("default");
    let daemon = Daemon::spawn(
        &["--log-format", "json", "run", "--redis-url", &url, "--consumer", "d1"],
        &[("TIDEMARK__LOG__SUMMARY_INTERVAL", "200ms"), ("RUST_LOG", "info")],
    );
    daemon.wait_log("connected to Redis", WAIT);
    let add = |conn: &mut redis::Connection, id: &str, ts: &str| {
        testkit::xadd_fields(conn, &k.input, &[(b"op", b"add"), (b"id", id.as_bytes()), (b"ts", ts.as_bytes())]);
    };
    testkit::xadd_fields(&mut conn, &k.input, &[(b"op", b"watermark"), (b"ts", b"1800000000000")]);
    add(&mut conn, "late", "1799999999000");
    add(&mut conn, "a", "1800000001000");
    add(&mut conn, "b", "1800000002000");
    testkit::xadd_fields(&mut conn, &k.input, &[(b"op", b"cancel"), (b"id", b"b")]);
    testkit::xadd_fields(&mut conn, &k.input, &[(b"op", b"bogus")]);
    testkit::xadd_fields(&mut conn, &k.input, &[(b"op", b"watermark"), (b"ts", b"1800000001500")]);

    let total = |field: &str| -> u64 {
        log_events(&daemon.log(), "summary").iter().map(|e| e[field].as_u64().unwrap_or(0)).sum()
    };
    wait_until("the summaries add up to the work", WAIT, || {
        total("ingested") == 7 && total("released") == 2 && {
            let lines = log_events(&daemon.log(), "summary");
            lines.last().is_some_and(|l| l["scheduled"] == "0" && l["watermark"] == "1800000001500")
        }
    });
    let lines = log_events(&daemon.log(), "summary");
    for (field, want) in [("adds", 3), ("cancels", 1), ("watermarks", 2), ("dead", 1), ("released", 2), ("late", 1)] {
        assert_eq!(total(field), want, "{field}: {lines:#?}");
    }
    let last = lines.last().unwrap();
    assert_eq!(last["level"], "INFO", "{last}");
    assert_eq!(last["target"], "tidemark::daemon::summary", "{last}");
    assert_eq!(last["watermark_utc"], "2027-01-15T08:00:01.500Z", "{last}");
    assert_eq!(last["input_lag"], "0", "{last}");
    assert_eq!(last["every"], "200ms", "{last}");
}
