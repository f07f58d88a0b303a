//! `tidemark status` per output group: pending, lag, the oldest pending
//! entry's idle time, and each consumer with its lease state.

use std::time::Instant;

use serde_json::{json, Value as Json};

use testkit::{default_keys, read_group, run_cli, text, xadd_fields, RedisServer};

#[test]
fn status_shows_each_groups_pending_work_and_consumer_leases() {
    let redis = RedisServer::start();
    let url = redis.url();
    let mut conn = redis.sync_conn();
    let k = default_keys();
    let ids: Vec<String> =
        (0..3).map(|i| xadd_fields(&mut conn, &k.out, &[(b"id", format!("e{i}").as_bytes()), (b"ts", b"1")])).collect();
    for group in ["g1", "g2"] {
        let () = redis::cmd("XGROUP").arg("CREATE").arg(&k.out).arg(group).arg("0").query(&mut conn).expect("XGROUP");
    }
    let read_at = Instant::now();
    assert_eq!(read_group(&mut conn, &k.out, "g1", "gone", 1).len(), 1);
    assert_eq!(read_group(&mut conn, &k.out, "g1", "alive", 2).len(), 2);
    // `alive` holds its liveness lease (as the consumer runtime does);
    // `gone` has none, like a consumer that was killed.
    let () = redis::cmd("SET")
        .arg(k.lease("out", "g1", "alive"))
        .arg("alive")
        .arg("PX")
        .arg(60_000)
        .query(&mut conn)
        .expect("SET lease");

    let out = run_cli(&["--redis-url", &url, "status", "--json"], &[]);
    let since_read = read_at.elapsed();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let mut got: Json = serde_json::from_slice(&out.stdout).expect("status --json is JSON");
    let groups = got["output"]["groups"].take();

    // Idle times: present, and no older than the reads themselves.
    let idle = |v: &Json| -> u64 {
        let ms = v["idle_ms"].as_u64().unwrap_or_else(|| panic!("no idle_ms in {v}"));
        assert!(u128::from(ms) <= since_read.as_millis() + 5, "idle {ms}ms > {since_read:?} since the read");
        ms
    };
    idle(&groups[0]["oldest_pending"]);
    for c in groups[0]["consumers"].as_array().expect("consumers") {
        idle(c);
    }
    let mut groups = groups;
    for g in groups.as_array_mut().expect("groups") {
        if let Some(o) = g["oldest_pending"].as_object_mut() {
            o.remove("idle_ms");
        }
        for c in g["consumers"].as_array_mut().expect("consumers") {
            c.as_object_mut().expect("consumer object").remove("idle_ms");
        }
    }
    assert_eq!(
        groups,
        json!([
            {
                "name": "g1", "pending": 3, "lag": 0, "last_delivered_id": ids[2],
                "oldest_pending": {"id": ids[0], "consumer": "gone", "deliveries": 1},
                "consumers": [
                    {"name": "alive", "pending": 2, "leased": true},
                    {"name": "gone", "pending": 1, "leased": false},
                ],
            },
            {
                "name": "g2", "pending": 0, "lag": 3, "last_delivered_id": "0-0",
                "oldest_pending": null, "consumers": [],
            },
        ])
    );

    // The table: a line per group, one per consumer below it, durations
    // for humans.
    let out = run_cli(&["--redis-url", &url, "status"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    let lines: Vec<&str> = table.lines().collect();
    let at = |label: &str, name: &str| {
        lines
            .iter()
            .position(|l| l.split_whitespace().take(2).eq([label, name]))
            .unwrap_or_else(|| panic!("no {label} {name} line:\n{table}"))
    };
    let g1 = at("group", "g1");
    let words: Vec<&str> = lines[g1].split_whitespace().collect();
    assert_eq!(
        words[..10],
        ["group", "g1", "pending", "3", "lag", "0", "consumers", "2", "oldest", "pending"],
        "{table}"
    );
    assert_eq!(words[10], "idle", "{table}");
    assert!(words[11].ends_with("ms") || words[11].ends_with('s'), "a human duration: {table}");
    assert_eq!(words[12..], [&format!("({}", ids[0]), "at", "gone,", "deliveries", "1)"], "{table}");
    let alive: Vec<&str> = lines[g1 + 1].split_whitespace().collect();
    assert_eq!(alive[..4], ["consumer", "alive", "pending", "2"], "{table}");
    assert!(lines[g1 + 1].contains("lease held (alive)"), "{table}");
    let gone: Vec<&str> = lines[g1 + 2].split_whitespace().collect();
    assert_eq!(gone[..4], ["consumer", "gone", "pending", "1"], "{table}");
    assert!(lines[g1 + 2].contains("no lease"), "{table}");
    let g2 = at("group", "g2");
    assert_eq!(g2, g1 + 3, "{table}");
    assert!(!lines[g2].contains("oldest"), "{table}");
}
