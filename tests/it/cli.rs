//! The command line (DESIGN.md §6): one-shot commands and what they write,
//! argument and configuration errors (exit 64), Redis unreachable (exit 69),
//! `status`, signals, and never showing a password.

use std::net::TcpListener;
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::{json, Value as Json};

use testkit::default_keys as ks;
use testkit::{
    describe, read_group, read_stream, run_cli, text, total_connections, wait_until, xadd_fields, xlen, Daemon,
    RedisOptions, RedisServer,
};

const WAIT: Duration = Duration::from_secs(60);
/// "Within a few seconds" for things that must not hang or retry.
const QUICK: Duration = Duration::from_secs(10);

/// A port on 127.0.0.1 with nothing listening on it.
fn closed_port_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let port = listener.local_addr().expect("local_addr").port();
    drop(listener);
    format!("redis://127.0.0.1:{port}")
}

fn code(out: &Output) -> Option<i32> {
    out.status.code()
}

fn dbsize(conn: &mut redis::Connection) -> i64 {
    redis::cmd("DBSIZE").query(conn).expect("DBSIZE")
}

fn fields(pairs: &[(&str, &str)]) -> Vec<(Vec<u8>, Vec<u8>)> {
    pairs.iter().map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec())).collect()
}

/// Runs a one-shot that must succeed and print exactly one stream id; returns it.
fn one_shot_id(args: &[&str], envs: &[(&str, &str)]) -> String {
    let out = run_cli(args, envs);
    assert_eq!(code(&out), Some(0), "tidemark {args:?}: {}", describe(&out));
    let stdout = text(&out.stdout);
    let id = stdout.strip_suffix('\n').unwrap_or_else(|| panic!("no trailing newline: {stdout:?}"));
    let (ms, seq) = id.split_once('-').unwrap_or_else(|| panic!("not a stream id: {stdout:?}"));
    assert!(
        !ms.is_empty() && !seq.is_empty() && (ms.to_owned() + seq).bytes().all(|b| b.is_ascii_digit()),
        "not a stream id: {stdout:?}"
    );
    id.to_owned()
}

#[test]
fn add_cancel_watermark_write_the_right_entries() {
    let redis = RedisServer::start();
    let url = redis.url();
    let mut conn = redis.sync_conn();

    let add = one_shot_id(
        &[
            "--redis-url",
            &url,
            "add",
            "--id",
            "order-42",
            "--ts",
            "1700000000000",
            "--field",
            "customer=7",
            "--field",
            "z=1",
            "--field",
            "a=2",
            "--field",
            "z=3",
            "--field",
            "empty=",
            "--field",
            "eq=a=b",
        ],
        &[],
    );
    // Global flags after the subcommand, and a negative ts.
    let add_neg = one_shot_id(&["add", "--id", "neg", "--ts", "-7", "--redis-url", &url], &[]);
    // REDIS_URL from the environment.
    let cancel = one_shot_id(&["cancel", "--id", "order-42"], &[("REDIS_URL", &url)]);
    let wm = one_shot_id(&["--redis-url", &url, "watermark", "5"], &[]);
    let wm_neg = one_shot_id(&["--redis-url", &url, "watermark", "-3"], &[]);

    let got = read_stream(&mut conn, &ks().input);
    let want = vec![
        (
            add,
            fields(&[
                ("op", "add"),
                ("id", "order-42"),
                ("ts", "1700000000000"),
                ("customer", "7"),
                ("z", "1"),
                ("a", "2"),
                ("z", "3"),
                ("empty", ""),
                ("eq", "a=b"),
            ]),
        ),
        (add_neg, fields(&[("op", "add"), ("id", "neg"), ("ts", "-7")])),
        (cancel, fields(&[("op", "cancel"), ("id", "order-42")])),
        (wm, fields(&[("op", "watermark"), ("ts", "5")])),
        (wm_neg, fields(&[("op", "watermark"), ("ts", "-3")])),
    ];
    assert_eq!(got, want);
}

#[test]
fn invalid_arguments_exit_64_and_write_nothing() {
    let redis = RedisServer::start();
    let url = redis.url();
    let mut conn = redis.sync_conn();
    // (arguments after `--redis-url URL`, something stderr must mention)
    let cases: &[(&[&str], &str)] = &[
        (&["add", "--id", "x", "--ts", "abc"], "abc"),
        (&["add", "--id", "x", "--ts", "1.5"], "1.5"),
        (&["add", "--id", "x", "--ts", "9007199254740992"], "9007199254740992"),
        (&["add", "--id", "x", "--ts", "1", "--field", "noequals"], "noequals"),
        (&["add", "--id", "x", "--ts", "1", "--field", "op=x"], "op"),
        (&["add", "--id", "x", "--ts", "1", "--field", "ts=2"], "ts"),
        (&["add", "--id", "x", "--ts", "1", "--field", "=v"], "=v"),
        (&["add", "--id", "", "--ts", "1"], "--id"),
        (&["add", "--ts", "1"], "--id"),
        (&["add", "--id", "x"], "--ts"),
        (&["cancel", "--id", ""], "--id"),
        (&["cancel"], "--id"),
        (&["watermark", "1.5"], "1.5"),
        (&["watermark", "soon"], "soon"),
        (&["watermark"], "TS"),
        (&["frobnicate"], "frobnicate"),
    ];
    for (args, hint) in cases {
        let mut all = vec!["--redis-url", url.as_str()];
        all.extend_from_slice(args);
        let out = run_cli(&all, &[]);
        assert_eq!(code(&out), Some(64), "tidemark {args:?}: {}", describe(&out));
        let stderr = text(&out.stderr);
        assert!(stderr.contains(hint), "tidemark {args:?}: stderr does not mention {hint:?}: {}", describe(&out));
        assert!(out.stdout.is_empty(), "tidemark {args:?}: {}", describe(&out));
    }
    assert_eq!(dbsize(&mut conn), 0, "invalid commands must write nothing");
}

/// A configuration file in a temporary directory.
fn config_file(contents: &str) -> tempfile::TempPath {
    let mut f = tempfile::Builder::new().prefix("tidemark-cli-").suffix(".toml").tempfile().unwrap();
    std::io::Write::write_all(&mut f, contents.as_bytes()).unwrap();
    f.into_temp_path()
}

#[test]
fn bad_configuration_exits_64_naming_the_key() {
    let closed = closed_port_url();
    let unknown_key = config_file("namespace = \"ok\"\n\n[daemon]\nbatch_size = 10\nnope = 1\n");
    let unknown_key = unknown_key.to_str().unwrap();
    let missing = std::env::temp_dir().join("tidemark-cli-no-such-config.toml");
    let missing = missing.to_str().unwrap();
    // (global arguments, environment, the key the message must name)
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        (&["--redis-url", "not a url"], &[], "redis.url"),
        (&["--redis-url", "http://127.0.0.1:6379"], &[], "redis.url"),
        (&["--redis-url", &closed], &[("TIDEMARK__DAEMON__BATCH_SIZE", "0")], "daemon.batch_size"),
        (&["--redis-url", &closed, "--log-format", "xml"], &[], "log.format"),
        (&["--redis-url", &closed, "--config", unknown_key], &[], "nope"),
        (&["--redis-url", &closed, "--config", missing], &[], "--config"),
    ];
    for (global, envs, key) in cases {
        // One-shots: with a closed port, a command that skipped validation
        // would fail with 69 instead.
        for command in [&["status"][..], &["watermark", "5"][..]] {
            let mut args = global.to_vec();
            args.extend_from_slice(command);
            let out = run_cli(&args, envs);
            assert_eq!(code(&out), Some(64), "tidemark {args:?} {envs:?}: {}", describe(&out));
            assert!(text(&out.stderr).contains(key), "tidemark {args:?}: stderr must name {key}: {}", describe(&out));
        }
        // The daemon: refused at once, before any attempt to connect (which
        // would retry forever against the closed port).
        let mut args = global.to_vec();
        args.extend_from_slice(&["run", "--consumer", "d1"]);
        let mut d = Daemon::spawn(&args, envs);
        let status = d.wait_exit(QUICK).unwrap_or_else(|| panic!("tidemark {args:?} did not exit:\n{}", d.log()));
        assert_eq!(status.code(), Some(64), "tidemark {args:?}:\n{}", d.log());
        let log = d.log();
        assert!(log.contains(key), "tidemark {args:?}: the message must name {key}:\n{log}");
        assert!(!log.contains("cannot reach Redis"), "tidemark {args:?} tried to connect:\n{log}");
    }
}

#[test]
fn bad_url_message_does_not_show_the_password() {
    let out = run_cli(&["--redis-url", "redis://app:s3cret@[::1/0", "status"], &[]);
    assert_eq!(code(&out), Some(64), "{}", describe(&out));
    assert!(text(&out.stderr).contains("redis.url"), "{}", describe(&out));
    assert!(!text(&out.stderr).contains("s3cret") && !text(&out.stdout).contains("s3cret"), "{}", describe(&out));
}

/// `run` with a bad configuration and a live Redis: exits 64 without ever
/// opening a connection (the server's connection counter does not move).
#[test]
fn run_with_bad_config_never_connects() {
    let redis = RedisServer::start();
    let mut conn = redis.sync_conn();
    let before = total_connections(&mut conn);
    let url = redis.url();
    let args = ["run", "--redis-url", url.as_str(), "--consumer", "d1", "--group", "g1"];
    let mut d = Daemon::spawn(&args, &[("TIDEMARK__DAEMON__RELEASE_CHUNK", "0")]);
    let status = d.wait_exit(QUICK).unwrap_or_else(|| panic!("run did not exit:\n{}", d.log()));
    assert_eq!(status.code(), Some(64), "{}", d.log());
    assert!(d.log().contains("daemon.release_chunk"), "{}", d.log());
    assert_eq!(total_connections(&mut conn), before, "run connected to Redis despite a bad configuration");
    assert_eq!(dbsize(&mut conn), 0);
}

#[test]
fn one_shot_with_redis_unreachable_exits_69_quickly() {
    let closed = closed_port_url();
    for command in [&["status"][..], &["status", "--json"][..], &["add", "--id", "x", "--ts", "1"][..]] {
        let mut args = vec!["--redis-url", closed.as_str()];
        args.extend_from_slice(command);
        let started = Instant::now();
        let out = run_cli(&args, &[]);
        let took = started.elapsed();
        assert_eq!(code(&out), Some(69), "tidemark {args:?}: {}", describe(&out));
        assert!(took < QUICK, "tidemark {args:?} took {took:?}");
        assert!(!out.stderr.is_empty(), "tidemark {args:?}: no message: {}", describe(&out));
        assert!(out.stdout.is_empty(), "tidemark {args:?}: {}", describe(&out));
    }
}

fn status_json(url: &str) -> Json {
    let out = run_cli(&["--redis-url", url, "status", "--json"], &[]);
    assert_eq!(code(&out), Some(0), "{}", describe(&out));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {}", describe(&out)))
}

#[test]
fn status_of_an_empty_namespace_is_read_only() {
    let redis = RedisServer::start();
    let mut conn = redis.sync_conn();
    let got = status_json(&redis.url());
    let want = json!({
        "namespace": "default",
        "partitions": 1,
        "watermark": null,
        "watermark_spread": null,
        "daemons": [],
        "scheduled": 0,
        "next_due_ts": null,
        "input": {"length": 0, "pending": 0, "lag": 0, "daemons": 0, "live_daemons": 0},
        "output": {"length": 0, "groups": []},
        "dead_letters": 0,
    });
    assert_eq!(got, want);
    assert_eq!(dbsize(&mut conn), 0, "status must not create anything");
}

#[test]
fn status_reports_exact_numbers() {
    let redis = RedisServer::start();
    let url = redis.url();
    let mut conn = redis.sync_conn();
    let k = ks();

    let mut d = Daemon::spawn(
        &["run", "--redis-url", &url, "--consumer", "d1", "--group", "g1", "--group", "g2"],
        &[("TIDEMARK__DAEMON__BLOCK", "200ms")],
    );
    d.wait_log("connected to Redis", WAIT);
    for (id, ts) in [("s1", "1"), ("s2", "2"), ("s3", "10"), ("s4", "20")] {
        xadd_fields(&mut conn, &k.input, &[(b"op", b"add"), (b"id", id.as_bytes()), (b"ts", ts.as_bytes())]);
    }
    xadd_fields(&mut conn, &k.input, &[(b"op", b"watermark"), (b"ts", b"5")]);
    xadd_fields(&mut conn, &k.input, &[(b"id", b"no-op-field")]);
    wait_until("s1, s2 released and one dead letter", WAIT, || {
        xlen(&mut conn, &k.out) == 2 && xlen(&mut conn, &k.dead) == 1
    });
    wait_until("the daemon has acknowledged all 6 input entries", WAIT, || {
        let v: redis::Value = redis::cmd("XPENDING").arg(&k.input).arg("tidemark").query(&mut conn).unwrap();
        matches!(&v, redis::Value::Array(p) if p.first() == Some(&redis::Value::Int(0)))
    });
    // Freeze the state: stop the daemon cleanly.
    d.sigterm();
    let status = d.wait_exit(QUICK).unwrap_or_else(|| panic!("daemon did not stop:\n{}", d.log()));
    assert_eq!(status.code(), Some(0), "{}", d.log());

    // g1: one entry read by c1 and not acknowledged; g2 untouched.
    let first_out: Vec<String> = read_group(&mut conn, &k.out, "g1", "c1", 1).into_iter().map(|(id, _)| id).collect();
    assert_eq!(first_out.len(), 1);
    // Input: two more entries, one read (pending) by a ghost consumer.
    xadd_fields(&mut conn, &k.input, &[(b"op", b"add"), (b"id", b"s5"), (b"ts", b"30")]);
    xadd_fields(&mut conn, &k.input, &[(b"op", b"watermark"), (b"ts", b"6")]);
    assert_eq!(read_group(&mut conn, &k.input, "tidemark", "ghost", 1).len(), 1);

    let mut got = status_json(&url);
    // Idle times depend on timing (tests/it/status.rs checks them).
    let g1 = &mut got["output"]["groups"][0];
    assert!(g1["oldest_pending"]["idle_ms"].take().is_u64(), "{got}");
    assert!(g1["consumers"][0]["idle_ms"].take().is_u64(), "{got}");
    let want = json!({
        "namespace": "default",
        "partitions": 1,
        "watermark": 5,
        "watermark_spread": 0,
        "daemons": [],
        "scheduled": 2,
        "next_due_ts": 10,
        "input": {"length": 8, "pending": 1, "lag": 1, "daemons": 2, "live_daemons": 0},
        "output": {
            "length": 2,
            "groups": [
                {"name": "g1", "pending": 1, "lag": 1, "last_delivered_id": first_out[0],
                 "oldest_pending": {"id": first_out[0], "consumer": "c1", "idle_ms": null, "deliveries": 1},
                 "consumers": [{"name": "c1", "pending": 1, "idle_ms": null, "leased": false}]},
                {"name": "g2", "pending": 0, "lag": 2, "last_delivered_id": "0-0", "oldest_pending": null,
                 "consumers": []},
            ],
        },
        "dead_letters": 1,
    });
    assert_eq!(got, want);

    // The human table.
    let out = run_cli(&["--redis-url", &url, "status"], &[]);
    assert_eq!(code(&out), Some(0), "{}", describe(&out));
    let table = text(&out.stdout);
    let line = |label: &str| -> Vec<String> {
        table
            .lines()
            .find(|l| l.starts_with(label))
            .unwrap_or_else(|| panic!("no {label:?} line in:\n{table}"))
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(line("watermark"), ["watermark", "5"], "{table}");
    assert_eq!(line("namespace"), ["namespace", "default"], "{table}");
    let group_lines: Vec<&str> = table.lines().filter(|l| l.trim_start().starts_with("group")).collect();
    assert_eq!(group_lines.len(), 2, "{table}");
    assert!(group_lines[0].split_whitespace().nth(1) == Some("g1"), "{table}");
    assert!(group_lines[1].split_whitespace().nth(1) == Some("g2"), "{table}");
}

fn check_clean_stop(signal: &str) {
    let redis = RedisServer::start();
    let url = redis.url();
    let mut d = Daemon::spawn(&["run", "--redis-url", &url, "--consumer", "d1"], &[("TIDEMARK__DAEMON__BLOCK", "2s")]);
    d.wait_log("connected to Redis", WAIT);
    // Some work first, so the daemon is in its steady state.
    let mut conn = redis.sync_conn();
    xadd_fields(&mut conn, &ks().input, &[(b"op", b"add"), (b"id", b"e"), (b"ts", b"1")]);
    xadd_fields(&mut conn, &ks().input, &[(b"op", b"watermark"), (b"ts", b"1")]);
    wait_until("e released", WAIT, || xlen(&mut conn, &ks().out) == 1);

    let sent = Instant::now();
    d.signal(signal);
    let status = d.wait_exit(QUICK).unwrap_or_else(|| panic!("SIG{signal} did not stop the daemon:\n{}", d.log()));
    assert_eq!(status.code(), Some(0), "SIG{signal}: {status:?}\n{}", d.log());
    assert!(sent.elapsed() < QUICK);
    assert!(d.log().contains("tidemark daemon stopped"), "{}", d.log());
}

#[test]
fn sigterm_stops_the_daemon_cleanly() {
    check_clean_stop("TERM");
}

#[test]
fn sigint_stops_the_daemon_cleanly() {
    check_clean_stop("INT");
}

#[test]
fn password_never_appears_in_logs_or_status() {
    const SECRET: &str = "s3cret";
    let redis = RedisServer::start_with(RedisOptions {
        extra_args: ["--requirepass", SECRET, "--user", "app", "on", ">s3cret", "~*", "&*", "+@all"]
            .map(String::from)
            .to_vec(),
        ..Default::default()
    });
    let port = redis.port();
    let user_url = format!("redis://app:{SECRET}@127.0.0.1:{port}");
    let default_url = format!("redis://:{SECRET}@127.0.0.1:{port}");
    let client = redis::Client::open(default_url.as_str()).unwrap();
    let mut conn = client.get_connection_with_timeout(Duration::from_secs(10)).unwrap();

    let mut d = Daemon::spawn(
        &["run", "--redis-url", &user_url, "--consumer", "d1", "--group", "g1"],
        &[("TIDEMARK__DAEMON__BLOCK", "200ms")],
    );
    d.wait_log("connected to Redis", WAIT);
    // The daemon really works through the authenticated connection.
    one_shot_id(&["--redis-url", &default_url, "add", "--id", "e", "--ts", "1", "--field", "k=v"], &[]);
    one_shot_id(&["--redis-url", &user_url, "watermark", "1"], &[]);
    wait_until("e released", WAIT, || xlen(&mut conn, &ks().out) == 1);

    for url in [&user_url, &default_url] {
        for json in [false, true] {
            let mut args = vec!["--redis-url", url.as_str(), "status"];
            if json {
                args.push("--json");
            }
            let out = run_cli(&args, &[]);
            assert_eq!(code(&out), Some(0), "{}", describe(&out));
            assert!(text(&out.stdout).contains("g1"), "{}", describe(&out));
            assert!(!describe(&out).contains(SECRET), "status shows the password: {}", describe(&out));
        }
    }
    // A wrong password: refused (69), and not echoed either.
    let out = run_cli(&["--redis-url", &format!("redis://app:wr0ngpass@127.0.0.1:{port}"), "status"], &[]);
    assert_eq!(code(&out), Some(69), "{}", describe(&out));
    assert!(!describe(&out).contains("wr0ngpass"), "{}", describe(&out));

    d.sigterm();
    let status = d.wait_exit(QUICK).unwrap_or_else(|| panic!("daemon did not stop:\n{}", d.log()));
    assert_eq!(status.code(), Some(0), "{}", d.log());
    let log = d.log();
    assert!(log.contains("tidemark daemon stopped"), "{log}");
    assert!(!log.contains(SECRET), "the daemon log shows the password:\n{log}");
    assert!(log.contains("app:***@") || !log.contains("app:"), "{log}");
}

#[test]
fn help_of_every_command_exits_0() {
    for command in [&[][..], &["run"], &["add"], &["cancel"], &["watermark"], &["status"]] {
        let mut args = command.to_vec();
        args.push("--help");
        let out = run_cli(&args, &[]);
        assert_eq!(code(&out), Some(0), "tidemark {args:?}: {}", describe(&out));
        assert!(text(&out.stdout).contains("Usage"), "tidemark {args:?}: {}", describe(&out));
    }
    let out = run_cli(&["--version"], &[]);
    assert_eq!(code(&out), Some(0), "{}", describe(&out));
    assert!(text(&out.stdout).starts_with("tidemark "), "{}", describe(&out));
}
