//! Security: `rediss://` (rustls) against a TLS-enabled redis-server with a
//! private CA and mutual TLS, ACL users, the password from the URL, a file or
//! `REDIS_PASSWORD`, a wrong or missing password (exit 69 at once, no retry
//! storm), and the password never shown: not in logs (even at
//! `RUST_LOG=trace`), `status`, `/metrics`, the dashboard or messages.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use tempfile::TempDir;

use testkit::{
    describe, free_port, http_get, keys, read_stream, run_cli, text, total_connections, wait_until, Daemon,
    RedisOptions, RedisServer,
};

/// Extra environment of one run: (name, value) pairs.
type Vars<'a> = Vec<(&'a str, &'a str)>;

const WAIT: Duration = Duration::from_secs(60);
/// Generous bound for "exits at once" (CI has 2 cores); never a timing assertion.
const QUICK: Duration = Duration::from_secs(20);

/// A password with every character a URL treats specially.
const ODD_PASSWORD: &str = "p@ss:w/rd#?&=+ %ü";

/// The ACL the README recommends for tidemark's user.
const TIDEMARK_ACL: [&str; 5] = ["~tidemark:*", "&tidemark:*", "+@all", "-@dangerous", "+info"];

/// Every way `secret` could appear in text: as is and percent-encoded.
fn leaks(haystack: &str, secret: &str) -> bool {
    let encoded: String = url::form_urlencoded::byte_serialize(secret.as_bytes()).collect();
    let mut userinfo = url::Url::parse("redis://127.0.0.1").expect("url");
    userinfo.set_password(Some(secret)).expect("set_password");
    let in_url = userinfo.password().expect("password").to_owned();
    haystack.contains(secret) || haystack.contains(&encoded) || haystack.contains(&in_url)
}

fn assert_no_leak(what: &str, haystack: &str, secret: &str) {
    assert!(!leaks(haystack, secret), "{what} shows the password:\n{haystack}");
}

/// A Redis whose default user has password `default_password`, plus the
/// extra `ACL SETUSER` rules of `users` (name, password, rules).
fn redis_with_users(default_password: &str, users: &[(&str, &str, &[&str])]) -> (RedisServer, redis::Connection) {
    let redis = RedisServer::start_with(RedisOptions {
        extra_args: vec!["--requirepass".into(), default_password.into()],
        ..Default::default()
    });
    let mut admin = url::Url::parse(&redis.url()).expect("url");
    admin.set_password(Some(default_password)).expect("set_password");
    let client = redis::Client::open(admin.as_str()).expect("admin client");
    let mut conn = client.get_connection_with_timeout(Duration::from_secs(10)).expect("admin connection");
    for (user, password, rules) in users {
        let mut cmd = redis::cmd("ACL");
        cmd.arg("SETUSER").arg(*user).arg("on").arg(format!(">{password}"));
        for rule in *rules {
            cmd.arg(*rule);
        }
        let () = cmd.query(&mut conn).unwrap_or_else(|e| panic!("ACL SETUSER {user}: {e}"));
    }
    (redis, conn)
}

/// `ACL LOG` entries for commands, keys or channels Redis refused a user
/// (failed `AUTH` attempts, reason `auth`, are left out).
fn acl_denials(conn: &mut redis::Connection) -> Vec<String> {
    let log: Vec<Vec<redis::Value>> = redis::cmd("ACL").arg("LOG").query(conn).expect("ACL LOG");
    log.iter()
        .filter(|entry| {
            let reason = entry.chunks(2).find_map(|kv| match kv {
                [redis::Value::BulkString(k), v] if k.as_slice() == b"reason" => Some(format!("{v:?}")),
                _ => None,
            });
            !reason.is_some_and(|r| r.contains("auth"))
        })
        .map(|entry| format!("{entry:?}"))
        .collect()
}

fn url_with(redis: &RedisServer, user: &str, password: Option<&str>) -> String {
    let mut url = url::Url::parse(&redis.url()).expect("url");
    url.set_username(user).expect("set_username");
    url.set_password(password).expect("set_password");
    url.to_string()
}

fn wait_exit(d: &mut Daemon, what: &str) -> Option<i32> {
    let status = d.wait_exit(QUICK).unwrap_or_else(|| panic!("{what} did not exit within {QUICK:?}:\n{}", d.log()));
    status.code()
}

/// Stops a daemon or consumer with SIGTERM and asserts a clean exit.
fn stop(mut d: Daemon, what: &str) -> String {
    d.sigterm();
    assert_eq!(wait_exit(&mut d, what), Some(0), "{what}:\n{}", d.log());
    d.log()
}

/// An ACL user with the README's ACL runs everything tidemark has (clock
/// mode, housekeeping, a consumer, status, dead letters) without a single
/// refused command, and its password appears nowhere: not in trace logs,
/// `status`, `/metrics` or the dashboard.
#[test]
fn acl_user_with_the_recommended_acl_runs_everything_and_the_password_never_shows() {
    const SECRET: &str = "Tm-Acl-S3cret";
    let (redis, mut admin) = redis_with_users("admin-only", &[("tidemark", SECRET, &TIDEMARK_ACL)]);
    let url = url_with(&redis, "tidemark", Some(SECRET));
    let trace = [
        ("RUST_LOG", "trace"),
        ("TIDEMARK__HOUSEKEEPING__INTERVAL", "300ms"),
        ("TIDEMARK__HOUSEKEEPING__LOCK_TTL", "2s"),
    ];
    let daemon = Daemon::spawn(
        &["--redis-url", &url, "--http", "127.0.0.1:0", "run", "--consumer", "d1", "--clock", "--group", "billing"],
        &trace,
    );
    let consumer = Daemon::spawn(
        &[
            "--redis-url",
            &url,
            "--http",
            "127.0.0.1:0",
            "consume",
            "--group",
            "billing",
            "--consumer",
            "c1",
            "--",
            "cat",
        ],
        &trace,
    );
    daemon.wait_log("connected to Redis", WAIT);
    let ks = keys("default");

    // An element already due on the Redis clock, and a dead letter.
    let out = run_cli(&["--redis-url", &url, "add", "--id", "job-1", "--ts", "1", "--field", "k=v"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let () = redis::cmd("XADD").arg(&ks.input).arg("*").arg("bogus").arg("1").query(&mut admin).expect("XADD");
    wait_until("job-1 delivered to the consumer", WAIT, || consumer.log().contains("job-1"));
    wait_until("job-1 acknowledged", WAIT, || {
        let summary: (u64, redis::Value, redis::Value, redis::Value) =
            redis::cmd("XPENDING").arg(&ks.out).arg("billing").query(&mut admin).expect("XPENDING");
        summary.0 == 0
    });
    wait_until("the dead letter", WAIT, || read_stream(&mut admin, &ks.dead).len() == 1);

    let mut shown = String::new();
    for args in [&["status"][..], &["status", "--json"], &["dead", "list"], &["dead", "list", "--json"]] {
        let mut all = vec!["--redis-url", url.as_str()];
        all.extend_from_slice(args);
        let out = run_cli(&all, &[("RUST_LOG", "trace")]);
        assert_eq!(out.status.code(), Some(0), "tidemark {args:?}: {}", describe(&out));
        shown.push_str(&describe(&out));
    }
    assert!(shown.contains("billing") && shown.contains("missing_op"), "{shown}");
    for (process, name) in [(&daemon, "daemon"), (&consumer, "consumer")] {
        let addr = process.http_addr(WAIT).to_string();
        for path in ["/metrics", "/", "/api/dashboard", "/readyz"] {
            let (code, body) = http_get(&addr, path).unwrap_or_else(|e| panic!("GET {path} of the {name}: {e}"));
            assert_eq!(code, 200, "GET {path} of the {name}: {body}");
            shown.push_str(&body);
        }
    }
    assert!(shown.contains("tidemark_"), "no metrics in:\n{shown}");

    let daemon_log = stop(daemon, "daemon");
    let consumer_log = stop(consumer, "consumer");
    assert!(daemon_log.contains("became the housekeeping leader"), "{daemon_log}");
    assert!(daemon_log.contains(" TRACE "), "RUST_LOG=trace was not in effect:\n{daemon_log}");
    assert_no_leak("status, dead list, /metrics or the dashboard", &shown, SECRET);
    assert_no_leak("the daemon log", &daemon_log, SECRET);
    assert_no_leak("the consumer log", &consumer_log, SECRET);
    assert!(daemon_log.contains("tidemark:***@"), "the masked URL is not logged:\n{daemon_log}");
    assert_eq!(acl_denials(&mut admin), Vec::<String>::new(), "Redis refused commands of the recommended ACL");
}

/// The password from `redis.password_file` (env layer or config file) or
/// `REDIS_PASSWORD`, for an ACL user named in the URL; characters that URLs
/// treat specially survive; the value is never shown, and `tidemark consume`
/// does not hand `REDIS_PASSWORD` to the commands it runs.
#[test]
fn password_from_a_file_or_redis_password_with_an_acl_user() {
    let (redis, mut admin) = redis_with_users("admin-only", &[("app", ODD_PASSWORD, &TIDEMARK_ACL)]);
    let user_url = url_with(&redis, "app", None);
    let dir = TempDir::new().expect("tempdir");
    let password_file = dir.path().join("redis-password");
    // As Kubernetes writes a secret made with --from-file: a trailing newline.
    std::fs::write(&password_file, format!("{ODD_PASSWORD}\n")).expect("write password file");
    let config = dir.path().join("tidemark.toml");
    std::fs::write(&config, format!("[redis]\nurl = {user_url:?}\npassword_file = {password_file:?}\n"))
        .expect("write config");
    let file_env = password_file.to_str().expect("utf-8 path").to_owned();

    let routes: [(&str, Vec<&str>, Vars); 3] = [
        (
            "TIDEMARK__REDIS__PASSWORD_FILE",
            vec!["--redis-url", &user_url],
            vec![("TIDEMARK__REDIS__PASSWORD_FILE", &file_env)],
        ),
        ("password_file in --config", vec!["--config", config.to_str().expect("utf-8")], vec![]),
        ("REDIS_PASSWORD", vec!["--redis-url", &user_url], vec![("REDIS_PASSWORD", ODD_PASSWORD)]),
    ];
    for (route, global, env) in &routes {
        let mut args = global.clone();
        args.extend_from_slice(&["status", "--json"]);
        let mut envs = env.clone();
        envs.push(("RUST_LOG", "trace"));
        let out = run_cli(&args, &envs);
        assert_eq!(out.status.code(), Some(0), "{route}: {}", describe(&out));
        assert_no_leak(route, &describe(&out), ODD_PASSWORD);
        // Without the password, the same user is refused: the route is what
        // made it work.
        let out = run_cli(&args, &[]);
        if *route != "password_file in --config" {
            assert_eq!(out.status.code(), Some(69), "{route} without the password: {}", describe(&out));
        }
    }

    // The daemon and a consumer with REDIS_PASSWORD; the command prints its
    // environment, which tidemark logs line by line.
    let env = [("REDIS_PASSWORD", ODD_PASSWORD), ("RUST_LOG", "trace")];
    let daemon =
        Daemon::spawn(&["--redis-url", &user_url, "--http", "off", "run", "--consumer", "d1", "--group", "g"], &env);
    let consumer = Daemon::spawn(
        &["--redis-url", &user_url, "--http", "off", "consume", "--group", "g", "--consumer", "c1", "--", "env"],
        &env,
    );
    daemon.wait_log("connected to Redis", WAIT);
    for args in [&["add", "--id", "e1", "--ts", "5"][..], &["watermark", "5"]] {
        let mut all = vec!["--redis-url", user_url.as_str()];
        all.extend_from_slice(args);
        let out = run_cli(&all, &[("REDIS_PASSWORD", ODD_PASSWORD)]);
        assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    }
    wait_until("the command ran for e1", WAIT, || consumer.log().contains("TIDEMARK_ID=e1"));
    let daemon_log = stop(daemon, "daemon");
    let consumer_log = stop(consumer, "consumer");
    assert!(!consumer_log.contains("REDIS_PASSWORD="), "the command got REDIS_PASSWORD:\n{consumer_log}");
    assert_no_leak("the daemon log", &daemon_log, ODD_PASSWORD);
    assert_no_leak("the consumer log", &consumer_log, ODD_PASSWORD);
    assert_eq!(acl_denials(&mut admin), Vec::<String>::new());

    // Both at once, or an empty file: refused before connecting (64),
    // naming the key.
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\n").expect("write empty file");
    let empty_env = empty.to_str().expect("utf-8").to_owned();
    let cases: [(Vars, &str); 2] = [
        (
            vec![("TIDEMARK__REDIS__PASSWORD_FILE", &file_env), ("REDIS_PASSWORD", ODD_PASSWORD)],
            "REDIS_PASSWORD is set too",
        ),
        (vec![("TIDEMARK__REDIS__PASSWORD_FILE", &empty_env)], "is empty"),
    ];
    for (env, message) in cases {
        let out = run_cli(&["--redis-url", &user_url, "status"], &env);
        assert_eq!(out.status.code(), Some(64), "{env:?}: {}", describe(&out));
        let stderr = text(&out.stderr);
        assert!(stderr.contains("redis.password_file") && stderr.contains(message), "{env:?}: {stderr}");
        assert_no_leak("the message", &stderr, ODD_PASSWORD);
    }
}

/// A wrong or missing password: every command exits 69 at once with a
/// message saying what to check, never echoes the password, and opens only
/// its first connections (no retry loop).
#[test]
fn wrong_or_missing_password_exits_69_at_once_without_retrying() {
    const WRONG: &str = "Wr0ng-Passw0rd";
    let (redis, mut admin) = redis_with_users("right-one", &[("app", "app-password", &TIDEMARK_ACL)]);
    let wrong_user = url_with(&redis, "app", Some(WRONG));
    let wrong_default = url_with(&redis, "", Some(WRONG));
    let missing = redis.url();
    let cases = [
        (wrong_user.as_str(), "wrong user name or password"),
        (wrong_default.as_str(), "wrong user name or password"),
        (missing.as_str(), "Redis requires a password"),
    ];
    // Connections each command may open in all: `run` starts its ingest
    // loop, liveness lease and housekeeping (each connects once); the
    // others connect once.
    for (url, hint) in cases {
        for (command, most) in [(&["run", "--consumer", "d1"][..], 5), (&["consume", "--group", "g", "--", "cat"], 2)] {
            let before = total_connections(&mut admin);
            let mut args = vec!["--redis-url", url, "--http", "off"];
            args.extend_from_slice(command);
            let mut d = Daemon::spawn(&args, &[("RUST_LOG", "trace")]);
            assert_eq!(wait_exit(&mut d, &format!("{args:?}")), Some(69), "{args:?}:\n{}", d.log());
            let opened = total_connections(&mut admin) - before;
            let log = d.log();
            assert!(log.contains(hint), "{args:?}: no {hint:?} in:\n{log}");
            assert_no_leak("the log", &log, WRONG);
            assert!((1..=most).contains(&opened), "{args:?} opened {opened} connections (at most {most}):\n{log}");
        }
        for command in [&["status"][..], &["add", "--id", "x", "--ts", "1"], &["dead", "list"]] {
            let before = total_connections(&mut admin);
            let mut args = vec!["--redis-url", url];
            args.extend_from_slice(command);
            let out = run_cli(&args, &[]);
            assert_eq!(out.status.code(), Some(69), "{args:?}: {}", describe(&out));
            assert_eq!(total_connections(&mut admin) - before, 1, "{args:?}");
            assert!(text(&out.stderr).contains(hint), "{args:?}: {}", describe(&out));
            assert_no_leak("the message", &describe(&out), WRONG);
        }
    }
    assert_eq!(redis::cmd("DBSIZE").query::<i64>(&mut admin).expect("DBSIZE"), 0, "something was written");
}

/// An ACL user without a permission tidemark needs: `run` exits 69 at
/// once, naming the refused command and pointing at the README.
#[test]
fn acl_user_without_a_needed_permission_exits_69_with_a_hint() {
    let (redis, _admin) = redis_with_users("admin-only", &[("reader", "reader-pw", &["~*", "+@read", "+@connection"])]);
    let url = url_with(&redis, "reader", Some("reader-pw"));
    let mut d = Daemon::spawn(&["--redis-url", &url, "--http", "off", "run", "--consumer", "d1"], &[]);
    assert_eq!(wait_exit(&mut d, "run"), Some(69), "{}", d.log());
    let log = d.log();
    assert!(log.contains("no permissions to run") && log.contains("section Security"), "{log}");
    assert_no_leak("the log", &log, "reader-pw");
}

/// A `unix://` URL carries its password as `?pass=`: masked too. The
/// daemon works over the socket, its blocking reader included.
#[test]
fn unix_socket_password_is_masked() {
    const SECRET: &str = "Unix-S3cret";
    let socket_dir = TempDir::new().expect("tempdir");
    let socket = socket_dir.path().join("redis.sock");
    let redis = RedisServer::start_with(RedisOptions {
        extra_args: vec![
            "--requirepass".into(),
            SECRET.into(),
            "--unixsocket".into(),
            socket.to_str().expect("utf-8").into(),
            "--unixsocketperm".into(),
            "700".into(),
        ],
        ..Default::default()
    });
    let url = format!("unix://{}?pass={SECRET}", socket.display());
    let out = run_cli(&["--redis-url", &url, "status"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let d = Daemon::spawn(&["--redis-url", &url, "--http", "off", "run", "--consumer", "d1"], &[("RUST_LOG", "trace")]);
    d.wait_log("connected to Redis", WAIT);
    let mut conn =
        redis::Client::open(url.as_str()).expect("unix URL").get_connection().expect("connect over the socket");
    let k = keys("default");
    let _: String = redis::cmd("XADD")
        .arg(&k.input)
        .arg("*")
        .arg("op")
        .arg("add")
        .arg("id")
        .arg("u1")
        .arg("ts")
        .arg(5)
        .query(&mut conn)
        .expect("XADD add");
    let _: String = redis::cmd("XADD")
        .arg(&k.input)
        .arg("*")
        .arg("op")
        .arg("watermark")
        .arg("ts")
        .arg(5)
        .query(&mut conn)
        .expect("XADD");
    wait_until("u1 released over the unix socket", WAIT, || read_stream(&mut conn, &k.out).len() == 1);
    let log = stop(d, "daemon");
    assert!(log.contains("pass=***"), "{log}");
    assert_no_leak("the daemon log", &log, SECRET);
    drop(redis);
}

// ---------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------

/// Certificates for the TLS tests, written as PEM files.
pub(crate) struct Pki {
    dir: TempDir,
}

impl Pki {
    /// A CA with a server certificate (127.0.0.1, localhost) and a client
    /// certificate, plus a second, untrusted CA with its own client
    /// certificate.
    pub(crate) fn new() -> Pki {
        let dir = TempDir::new().expect("tempdir");
        let write = |name: &str, pem: String| std::fs::write(dir.path().join(name), pem).expect("write pem");
        for (prefix, cn) in [("", "tidemark test CA"), ("other-", "some other CA")] {
            let ca_key = KeyPair::generate().expect("CA key");
            let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
            ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            ca.distinguished_name.push(DnType::CommonName, cn);
            ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let ca_cert = ca.self_signed(&ca_key).expect("self-sign CA");
            let issuer = Issuer::new(ca, ca_key);
            write(&format!("{prefix}ca.crt"), ca_cert.pem());

            let mut server =
                CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).expect("server params");
            server.distinguished_name.push(DnType::CommonName, "redis");
            server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            let server_key = KeyPair::generate().expect("server key");
            write(&format!("{prefix}server.crt"), server.signed_by(&server_key, &issuer).expect("sign").pem());
            write(&format!("{prefix}server.key"), server_key.serialize_pem());

            let mut client = CertificateParams::new(Vec::<String>::new()).expect("client params");
            client.distinguished_name.push(DnType::CommonName, "tidemark");
            client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            let client_key = KeyPair::generate().expect("client key");
            write(&format!("{prefix}client.crt"), client.signed_by(&client_key, &issuer).expect("sign").pem());
            write(&format!("{prefix}client.key"), client_key.serialize_pem());
        }
        Pki { dir }
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub(crate) fn arg(&self, name: &str) -> String {
        self.path(name).to_str().expect("utf-8 path").to_owned()
    }
}

/// A Redis with a plain port (for the harness and for checking results) and
/// a TLS port. Fails, saying what to build, when redis-server has no TLS.
fn tls_redis(pki: &Pki, auth_clients: bool) -> (RedisServer, u16) {
    let tls_port = free_port();
    let args = [
        "--tls-port",
        &tls_port.to_string(),
        "--tls-cert-file",
        &pki.arg("server.crt"),
        "--tls-key-file",
        &pki.arg("server.key"),
        "--tls-ca-cert-file",
        &pki.arg("ca.crt"),
        "--tls-auth-clients",
        if auth_clients { "yes" } else { "no" },
    ]
    .map(String::from)
    .to_vec();
    let started =
        std::panic::catch_unwind(|| RedisServer::start_with(RedisOptions { extra_args: args, ..Default::default() }));
    match started {
        Ok(redis) => (redis, tls_port),
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            // Redis 7.0's words, and those of 7.2 and Valkey 8. A test fails,
            // never skips: say what to build instead.
            let no_tls = ["not supported", "not built", "Failed finding TLS support"];
            if message.contains("TLS") && no_tls.iter().any(|w| message.contains(w)) {
                panic!(
                    "this redis-server was built without TLS support: build it with BUILD_TLS=yes \
                     (scripts/build-servers.sh does)\n{message}"
                );
            }
            std::panic::resume_unwind(panic)
        }
    }
}

/// `rediss://` with a private CA (`redis.tls_ca_file`): the daemon and the
/// CLI work over TLS; the certificate really is checked (system roots or
/// another CA are refused, 69), `#insecure` skips the check, and the port
/// speaks only TLS.
#[test]
fn tls_with_a_private_ca() {
    let pki = Pki::new();
    let (redis, tls_port) = tls_redis(&pki, false);
    let tls_url = format!("rediss://127.0.0.1:{tls_port}");
    let ca = pki.arg("ca.crt");
    let other_ca = pki.arg("other-ca.crt");
    let with_ca = [("TIDEMARK__REDIS__TLS_CA_FILE", ca.as_str())];

    let out = run_cli(&["--redis-url", &tls_url, "status"], &with_ca);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let insecure = format!("{tls_url}/#insecure");
    let out = run_cli(&["--redis-url", &insecure, "status"], &[]);
    assert_eq!(out.status.code(), Some(0), "#insecure: {}", describe(&out));

    let refused: [(&str, Vars, &str); 3] = [
        (&tls_url, vec![], "certificate"),
        (&tls_url, vec![("TIDEMARK__REDIS__TLS_CA_FILE", other_ca.as_str())], "certificate"),
        (&format!("redis://127.0.0.1:{tls_port}"), vec![], ""),
    ];
    for (url, env, needle) in &refused {
        let out = run_cli(&["--redis-url", url, "status"], env);
        assert_eq!(out.status.code(), Some(69), "{url} {env:?}: {}", describe(&out));
        assert!(text(&out.stderr).contains(needle), "{url} {env:?}: {}", describe(&out));
    }

    // The daemon releases an element over TLS; checked on the plain port.
    let d =
        Daemon::spawn(&["--redis-url", &tls_url, "--http", "off", "run", "--consumer", "d1", "--group", "g"], &with_ca);
    d.wait_log("connected to Redis", WAIT);
    for args in [&["add", "--id", "over-tls", "--ts", "7", "--field", "k=v"][..], &["watermark", "7"]] {
        let mut all = vec!["--redis-url", tls_url.as_str()];
        all.extend_from_slice(args);
        let out = run_cli(&all, &with_ca);
        assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    }
    let mut conn = redis.sync_conn();
    let out_key = keys("default").out;
    wait_until("over-tls released", WAIT, || read_stream(&mut conn, &out_key).len() == 1);
    let released = read_stream(&mut conn, &out_key);
    assert_eq!(testkit::field(&released[0].1, "id"), Some(&b"over-tls"[..]));
    let log = stop(d, "daemon");
    assert!(log.contains(&format!("redis={tls_url}")), "{log}");
}

/// Mutual TLS (`tls-auth-clients yes`): refused without a client
/// certificate or with one from another CA, accepted with
/// `redis.tls_cert_file` + `redis.tls_key_file`.
#[test]
fn mutual_tls_with_a_client_certificate() {
    let pki = Pki::new();
    let (_redis, tls_port) = tls_redis(&pki, true);
    let tls_url = format!("rediss://127.0.0.1:{tls_port}");
    let (ca, cert, key) = (pki.arg("ca.crt"), pki.arg("client.crt"), pki.arg("client.key"));
    let (other_cert, other_key) = (pki.arg("other-client.crt"), pki.arg("other-client.key"));
    let env = |cert: &str, key: &str| {
        vec![
            ("TIDEMARK__REDIS__TLS_CA_FILE", ca.clone()),
            ("TIDEMARK__REDIS__TLS_CERT_FILE", cert.to_owned()),
            ("TIDEMARK__REDIS__TLS_KEY_FILE", key.to_owned()),
        ]
    };
    let cases = [
        (vec![("TIDEMARK__REDIS__TLS_CA_FILE", ca.clone())], 69),
        (env(&other_cert, &other_key), 69),
        (env(&cert, &key), 0),
    ];
    for (env, expected) in cases {
        let envs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let out = run_cli(&["--redis-url", &tls_url, "status"], &envs);
        assert_eq!(out.status.code(), Some(expected), "{envs:?}: {}", describe(&out));
    }
}

/// TLS settings that cannot work are refused before connecting (64), naming
/// the key, and never quoting a key file.
#[test]
fn bad_tls_settings_exit_64_naming_the_key() {
    let pki = Pki::new();
    let dir = TempDir::new().expect("tempdir");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "-----BEGIN PRIVATE KEY-----\nNOT-A-KEY-SECRET-MATERIAL\n-----END PRIVATE KEY-----\n")
        .expect("write");
    let garbage = garbage.to_str().expect("utf-8").to_owned();
    let missing = dir.path().join("missing.pem").to_str().expect("utf-8").to_owned();
    let (ca, cert, key) = (pki.arg("ca.crt"), pki.arg("client.crt"), pki.arg("client.key"));
    let tls = "rediss://127.0.0.1:1";
    let cases: Vec<(&str, Vars, &str)> = vec![
        (
            "redis://127.0.0.1:1",
            vec![("TIDEMARK__REDIS__TLS_CA_FILE", &ca)],
            "redis.tls_ca_file: needs a rediss:// URL",
        ),
        (tls, vec![("TIDEMARK__REDIS__TLS_CERT_FILE", &cert)], "redis.tls_key_file"),
        (tls, vec![("TIDEMARK__REDIS__TLS_KEY_FILE", &key)], "redis.tls_cert_file"),
        (tls, vec![("TIDEMARK__REDIS__TLS_CA_FILE", &garbage)], "redis.tls_ca_file"),
        (tls, vec![("TIDEMARK__REDIS__TLS_CA_FILE", &key)], "redis.tls_ca_file"),
        (tls, vec![("TIDEMARK__REDIS__TLS_CA_FILE", &missing)], "redis.tls_ca_file"),
        (
            tls,
            vec![("TIDEMARK__REDIS__TLS_CERT_FILE", &cert), ("TIDEMARK__REDIS__TLS_KEY_FILE", &garbage)],
            "redis.tls_key_file",
        ),
        ("rediss://127.0.0.1:1/#insecure", vec![("TIDEMARK__REDIS__TLS_CA_FILE", &ca)], "redis.tls_ca_file"),
    ];
    for (url, env, key) in cases {
        let out = run_cli(&["--redis-url", url, "status"], &env);
        assert_eq!(out.status.code(), Some(64), "{url} {env:?}: {}", describe(&out));
        let stderr = text(&out.stderr);
        assert!(stderr.contains(key), "{url} {env:?}: {key:?} not in {stderr}");
        assert!(!stderr.contains("NOT-A-KEY-SECRET-MATERIAL"), "{stderr}");
    }
    assert!(Path::new(&ca).is_file());
}
