//! Tests of the shared harness itself (`testkit`: Redis lifecycle, the
//! tidemark binary, waiting, stream helpers).

use std::time::Duration;

use testkit::{RedisOptions, RedisServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_starts_and_aof_survives_kill9_restart() {
    let mut server = RedisServer::start_with(RedisOptions { aof: true, ..Default::default() });
    let port = server.port();
    let dir = server.dir().to_path_buf();
    assert_eq!(server.url(), format!("redis://127.0.0.1:{port}"));

    let mut conn = server.conn().await;
    let pong: String = redis::cmd("PING").query_async(&mut conn).await.unwrap();
    assert_eq!(pong, "PONG");
    let _: () = redis::cmd("SET").arg("harness:survivor").arg("still here").query_async(&mut conn).await.unwrap();
    drop(conn);

    server.kill9();
    server.restart();
    assert_eq!(server.port(), port, "restart must reuse the port");
    assert_eq!(server.dir(), dir, "restart must reuse the dir");

    let mut conn = server.conn().await;
    let value: Option<String> = redis::cmd("GET").arg("harness:survivor").query_async(&mut conn).await.unwrap();
    assert_eq!(value.as_deref(), Some("still here"));
}

#[test]
fn two_servers_get_different_ports() {
    let a = RedisServer::start();
    let b = RedisServer::start();
    assert_ne!(a.port(), b.port());
    assert_ne!(a.dir(), b.dir());
    for server in [&a, &b] {
        let mut conn = server.sync_conn();
        let pong: String = redis::cmd("PING").query(&mut conn).unwrap();
        assert_eq!(pong, "PONG");
    }
}

#[test]
#[should_panic(expected = "never true")]
fn wait_until_panics_on_timeout() {
    testkit::wait_until("never true", Duration::from_millis(50), || false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[should_panic(expected = "never true async")]
async fn wait_until_async_panics_on_timeout() {
    testkit::wait_until_async("never true async", Duration::from_millis(50), || async { false }).await;
}

#[test]
fn the_binary_is_the_one_cargo_built_for_this_run() {
    assert_eq!(testkit::bin_path(), std::path::Path::new(env!("CARGO_BIN_EXE_tidemark")));
}

#[test]
fn input_helpers_write_the_producer_format() {
    let server = RedisServer::start();
    let mut conn = server.sync_conn();
    let k = testkit::keys("selftest");
    testkit::add(&mut conn, &k, "a", -3, &[("customer", "7")]);
    testkit::cancel(&mut conn, &k, "a");
    testkit::watermark(&mut conn, &k, 9);
    let fields: Vec<Vec<String>> = testkit::read_stream(&mut conn, &k.input)
        .into_iter()
        .map(|(_, f)| f.iter().flat_map(|(f, v)| [testkit::text(f), testkit::text(v)]).collect())
        .collect();
    assert_eq!(
        fields,
        [
            vec!["op", "add", "id", "a", "ts", "-3", "customer", "7"],
            vec!["op", "cancel", "id", "a"],
            vec!["op", "watermark", "ts", "9"],
        ]
    );
    assert_eq!(testkit::xlen(&mut conn, &k.input), 3);
    assert_eq!(testkit::zcard(&mut conn, &k.sched), 0);
    assert!(testkit::exists(&mut conn, &k.input));
    assert!(!testkit::exists(&mut conn, &k.out));
}

#[test]
fn keys_have_literal_hash_tag() {
    let k = testkit::keys("default");
    assert_eq!(k.input, "tidemark:{default}:in");
    assert_eq!(k.wm, "tidemark:{default}:wm");
    assert_eq!(k.sched, "tidemark:{default}:sched");
    assert_eq!(k.body, "tidemark:{default}:body");
    assert_eq!(k.out, "tidemark:{default}:out");
    assert_eq!(k.dead, "tidemark:{default}:dead");
}

#[test]
fn stream_helpers_are_binary_safe_and_page() {
    let server = RedisServer::start();
    let mut conn = server.sync_conn();
    let key = "harness:stream";

    assert!(testkit::read_stream(&mut conn, key).is_empty());

    let binary: &[u8] = &[0, 0xff, b'\r', b'\n', 0x80];
    let first = testkit::xadd_fields(&mut conn, key, &[(b"f\0", binary), (b"n", b"0")]);

    // More than one XRANGE page.
    let total = 10_000 + 7;
    let mut pipe = redis::pipe();
    for i in 1..total {
        pipe.cmd("XADD").arg(key).arg("*").arg("n").arg(i.to_string()).ignore();
    }
    let _: () = pipe.query(&mut conn).unwrap();

    let entries = testkit::read_stream(&mut conn, key);
    assert_eq!(entries.len(), total);
    assert_eq!(entries[0].0, first);
    assert_eq!(entries[0].1, vec![(b"f\0".to_vec(), binary.to_vec()), (b"n".to_vec(), b"0".to_vec())]);
    for (i, (_, fields)) in entries.iter().enumerate() {
        assert_eq!(testkit::field(fields, "n"), Some(i.to_string().as_bytes()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_stream_helpers_round_trip() {
    let server = RedisServer::start();
    let mut conn = server.conn().await;
    let key = testkit::keys("selftest").input;

    let id = testkit::xadd_fields_async(&mut conn, &key, &[(b"body", b"\x00\x01")]).await;
    let entries = testkit::read_stream_async(&mut conn, &key).await;
    assert_eq!(entries, vec![(id, vec![(b"body".to_vec(), vec![0u8, 1])])]);

    let mut probe = conn.clone();
    testkit::wait_until_async("stream has one entry", Duration::from_secs(5), || {
        let mut c = probe.clone();
        let key = key.clone();
        async move {
            let n: usize = redis::cmd("XLEN").arg(&key).query_async(&mut c).await.unwrap();
            n == 1
        }
    })
    .await;
    let _: () = redis::cmd("DEL").arg(&key).query_async(&mut probe).await.unwrap();
}

#[test]
fn restart_waits_for_a_busy_port() {
    let mut server = RedisServer::start();
    let port = server.port();
    server.kill9();
    // Hold the port for a moment, as a lingering socket would.
    let blocker = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        drop(blocker);
    });
    server.restart();
    releaser.join().unwrap();
    assert_eq!(server.port(), port);
    let pong: String = redis::cmd("PING").query(&mut server.sync_conn()).unwrap();
    assert_eq!(pong, "PONG");
}

#[test]
#[should_panic(expected = "Bad directive")]
fn startup_failure_reports_redis_output() {
    let _server = RedisServer::start_with(RedisOptions {
        extra_args: vec!["--no-such-directive".into(), "1".into()],
        ..Default::default()
    });
}
