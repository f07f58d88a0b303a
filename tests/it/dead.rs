//! `tidemark dead list | replay`: listing (table and JSON, binary-safe),
//! replaying input letters back to `:in` (a still-malformed one comes back
//! with a new dead-letter id) and output letters to `:out` as fresh
//! entries for the group, `--reason`, `--all` in pages, and errors.

use std::time::Duration;

use serde_json::{json, Value as Json};

use testkit::default_keys as ks;
use testkit::{
    describe, field, fields as owned, read_stream, run_cli, text, wait_until, xadd_fields, Daemon, RedisServer,
};

const WAIT: Duration = Duration::from_secs(30);

/// Runs `tidemark --redis-url URL <args>`, which must succeed; returns stdout.
fn ok(url: &str, args: &[&str]) -> String {
    let mut all = vec!["--redis-url", url];
    all.extend_from_slice(args);
    let out = run_cli(&all, &[]);
    assert_eq!(out.status.code(), Some(0), "tidemark {args:?}: {}", describe(&out));
    text(&out.stdout)
}

/// Runs a command that must fail with exit code 1; returns stderr.
fn fails(url: &str, args: &[&str]) -> String {
    let mut all = vec!["--redis-url", url];
    all.extend_from_slice(args);
    let out = run_cli(&all, &[]);
    assert_eq!(out.status.code(), Some(1), "tidemark {args:?} must fail: {}", describe(&out));
    assert!(out.stdout.is_empty(), "{}", describe(&out));
    text(&out.stderr)
}

fn list_json(url: &str, extra: &[&str]) -> Vec<Json> {
    let mut args = vec!["dead", "list", "--json"];
    args.extend_from_slice(extra);
    let stdout = ok(url, &args);
    match serde_json::from_str(&stdout) {
        Ok(Json::Array(items)) => items,
        other => panic!("dead list --json is not a JSON array ({other:?}): {stdout}"),
    }
}

/// Writes a dead letter the way tidemark does: header, then original fields.
fn dead_letter(
    conn: &mut redis::Connection,
    reason: &str,
    origin: &str,
    origin_id: &str,
    original: &[(&[u8], &[u8])],
) -> String {
    let mut fields: Vec<(&[u8], &[u8])> = vec![
        (b"reason", reason.as_bytes()),
        (b"detail", b"a human sentence"),
        (b"origin", origin.as_bytes()),
        (b"origin_id", origin_id.as_bytes()),
    ];
    fields.extend_from_slice(original);
    xadd_fields(conn, &ks().dead, &fields)
}

/// Parses a replay line `<dead id> (<reason>) -> <stream> <new id>`.
fn replay_line(line: &str) -> (String, String, String, String) {
    let parts: Vec<&str> = line.split(' ').collect();
    match parts[..] {
        [dead, reason, "->", stream, new] if reason.starts_with('(') && reason.ends_with(')') => {
            (dead.into(), reason[1..reason.len() - 1].into(), stream.into(), new.into())
        }
        _ => panic!("not a replay line: {line:?}"),
    }
}

fn dead_ids(conn: &mut redis::Connection) -> Vec<String> {
    read_stream(conn, &ks().dead).into_iter().map(|(id, _)| id).collect()
}

#[test]
fn malformed_input_round_trip_through_list_and_replay() {
    let redis = RedisServer::start();
    let url = redis.url();
    let mut conn = redis.sync_conn();
    let k = ks();
    let d = Daemon::spawn(&["run", "--redis-url", &url, "--consumer", "d1"], &[("TIDEMARK__DAEMON__BLOCK", "200ms")]);
    d.wait_log("connected to Redis", WAIT);

    let bad_in = xadd_fields(&mut conn, &k.input, &[(b"op", b"add"), (b"id", b"m1"), (b"ts", b"soon")]);
    let missing_in = xadd_fields(&mut conn, &k.input, &[(b"id", b"m2"), (b"k", b"v")]);
    wait_until("two dead letters", WAIT, || dead_ids(&mut conn).len() == 2);
    let ids = dead_ids(&mut conn);
    let (bad, missing) = (ids[0].clone(), ids[1].clone());

    // JSON, newest first.
    let got = list_json(&url, &[]);
    assert_eq!(got.len(), 2, "{got:?}");
    let detail = |i: usize| got[i]["detail"].as_str().expect("detail is a string").to_owned();
    assert_eq!(
        got[0],
        json!({"id": missing, "reason": "missing_op", "detail": detail(0), "origin": "in", "origin_id": missing_in,
               "element_id": "m2", "fields": [["id", "m2"], ["k", "v"]]})
    );
    assert_eq!(
        got[1],
        json!({"id": bad, "reason": "bad_ts", "detail": detail(1), "origin": "in", "origin_id": bad_in,
               "element_id": "m1", "fields": [["op", "add"], ["id", "m1"], ["ts", "soon"]]})
    );
    assert!(!detail(1).is_empty());
    assert_eq!(list_json(&url, &["--count", "1"]).len(), 1);

    // The table: header, newest first, footer.
    let table = ok(&url, &["dead", "list"]);
    let lines: Vec<Vec<&str>> = table.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(lines.len(), 4, "{table}");
    assert_eq!(lines[0][..6], ["ENTRY", "ID", "REASON", "ORIGIN", "ORIGIN", "ID"], "{table}");
    assert_eq!(lines[1][..4], [missing.as_str(), "missing_op", "in", missing_in.as_str()], "{table}");
    assert_eq!(lines[1][4], "m2", "{table}");
    assert_eq!(lines[2][..5], [bad.as_str(), "bad_ts", "in", bad_in.as_str(), "m1"], "{table}");
    assert_eq!(table.lines().last(), Some("(2 of 2 dead letters, newest first)"), "{table}");

    // Replay the bad_ts letter: back to :in, out of :dead.
    let stdout = ok(&url, &["dead", "replay", "--id", &bad]);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    let (dead_id, reason, stream, new_in) = replay_line(lines[0]);
    assert_eq!((dead_id.as_str(), reason.as_str(), stream.as_str()), (bad.as_str(), "bad_ts", k.input.as_str()));
    assert_eq!(lines[1], format!("replayed 1 dead letter (1 to {}, 0 to {})", k.input, k.out));
    let input = read_stream(&mut conn, &k.input);
    let replayed = input.iter().find(|(id, _)| *id == new_in).expect("the replayed entry is in :in");
    assert_eq!(replayed.1, owned(&[(b"op", b"add"), (b"id", b"m1"), (b"ts", b"soon")]));

    // Still malformed: the daemon dead-letters it again, under a new id.
    let mut again = None;
    wait_until("the replayed entry is dead again", WAIT, || {
        again = read_stream(&mut conn, &k.dead)
            .into_iter()
            .find(|(_, f)| field(f, "origin_id") == Some(new_in.as_bytes()))
            .map(|(id, _)| id);
        again.is_some()
    });
    let again = again.expect("found above");
    assert_ne!(again, bad);
    assert_eq!(dead_ids(&mut conn), [missing.clone(), again.clone()]);

    // The old id is gone; nonsense ids are refused.
    let err = fails(&url, &["dead", "replay", "--id", &bad]);
    assert!(err.contains(&format!("no dead letter with id {bad}")), "{err}");
    let err = fails(&url, &["dead", "replay", "--id", "not-an-id"]);
    assert!(err.contains("not a stream entry id"), "{err}");
    // --id with a different --reason replays nothing.
    let err = fails(&url, &["dead", "replay", "--id", &missing, "--reason", "bad_ts"]);
    assert!(err.contains("has reason missing_op"), "{err}");
    assert_eq!(dead_ids(&mut conn).len(), 2);

    // --all replays each letter existing at the start exactly once, even
    // though the daemon keeps dead-lettering them again meanwhile.
    let stdout = ok(&url, &["dead", "replay", "--all"]);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    let replayed: Vec<String> = lines[..2].iter().map(|l| replay_line(l).0).collect();
    assert_eq!(replayed, [missing.clone(), again.clone()]);
    wait_until("both dead again under new ids", WAIT, || {
        let ids = dead_ids(&mut conn);
        ids.len() == 2 && !ids.contains(&missing) && !ids.contains(&again)
    });
}

#[test]
fn replay_all_with_a_reason_replays_only_that_reason() {
    let redis = RedisServer::start();
    let url = redis.url();
    let mut conn = redis.sync_conn();
    let k = ks();
    let l1 = dead_letter(&mut conn, "bad_ts", "in", "1-0", &[(b"op", b"add"), (b"id", b"a"), (b"ts", b"x")]);
    let l2 = dead_letter(&mut conn, "missing_op", "in", "2-0", &[(b"id", b"b")]);
    let l3 = dead_letter(&mut conn, "bad_ts", "in", "3-0", &[(b"op", b"watermark"), (b"ts", b"y")]);

    let out = run_cli(&["--redis-url", &url, "dead", "replay", "--all", "--reason", "nope"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(text(&out.stderr).contains("\"nope\" is not one of tidemark's reason codes"), "{}", describe(&out));
    assert_eq!(text(&out.stdout), format!("replayed 0 dead letters (0 to {}, 0 to {})\n", k.input, k.out));

    let stdout = ok(&url, &["dead", "replay", "--all", "--reason", "bad_ts"]);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    let (d1, r1, s1, n1) = replay_line(lines[0]);
    let (d3, r3, s3, n3) = replay_line(lines[1]);
    assert_eq!((d1, r1, s1), (l1, "bad_ts".to_owned(), k.input.clone()));
    assert_eq!((d3, r3, s3), (l3, "bad_ts".to_owned(), k.input.clone()));
    assert_eq!(dead_ids(&mut conn), [l2]);
    let input = read_stream(&mut conn, &k.input);
    assert_eq!(
        input,
        [
            (n1, owned(&[(b"op", b"add"), (b"id", b"a"), (b"ts", b"x")])),
            (n3, owned(&[(b"op", b"watermark"), (b"ts", b"y")]))
        ]
    );
}

#[test]
fn replayed_output_letter_is_a_fresh_entry_for_the_group() {
    let redis = RedisServer::start();
    let url = redis.url();
    let mut conn = redis.sync_conn();
    let k = ks();
    let binary: &[u8] = &[0x00, 0xff, 0xfe];
    let original: [(&[u8], &[u8]); 3] = [(b"id", b"order-7"), (b"ts", b"1700000000000"), (b"raw", binary)];
    let () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&k.out)
        .arg("billing")
        .arg("0")
        .arg("MKSTREAM")
        .query(&mut conn)
        .expect("XGROUP CREATE");
    let first = xadd_fields(&mut conn, &k.out, &original);
    // A consumer kept failing on it: its runtime dead-lettered and acked it.
    let read: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("billing")
        .arg("c1")
        .arg("STREAMS")
        .arg(&k.out)
        .arg(">")
        .query(&mut conn)
        .expect("XREADGROUP");
    assert_ne!(read, redis::Value::Nil);
    let letter = dead_letter(&mut conn, "max_deliveries", "out:billing", &first, &original);
    let () = redis::cmd("XACK").arg(&k.out).arg("billing").arg(&first).query(&mut conn).map(|_: i64| ()).unwrap();

    // Listed binary-safe.
    let got = list_json(&url, &[]);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["origin"], "out:billing");
    assert_eq!(got[0]["element_id"], "order-7");
    assert_eq!(got[0]["fields"], json!([["id", "order-7"], ["ts", "1700000000000"], ["raw", {"base64": "AP/+"}]]));

    let stdout = ok(&url, &["dead", "replay", "--id", &letter]);
    let (dead_id, reason, stream, fresh) = replay_line(stdout.lines().next().expect("a replay line"));
    assert_eq!((dead_id, reason, stream), (letter, "max_deliveries".to_owned(), k.out.clone()));
    assert!(dead_ids(&mut conn).is_empty());

    // The group reads it as a new entry, with the original fields.
    let reply: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("billing")
        .arg("c2")
        .arg("STREAMS")
        .arg(&k.out)
        .arg(">")
        .query(&mut conn)
        .expect("XREADGROUP");
    let redis::Value::Array(streams) = reply else { panic!("nothing for the group: {reply:?}") };
    let redis::Value::Array(stream) = &streams[0] else { panic!("{streams:?}") };
    let entries = testkit::parse_xrange(stream[1].clone());
    assert_eq!(entries, [(fresh, owned(&original))]);
}

#[test]
fn replay_all_pages_through_many_letters_and_keeps_unreplayable_ones() {
    let redis = RedisServer::start();
    let url = redis.url();
    let mut conn = redis.sync_conn();
    let k = ks();
    let n = 1201;
    let mut pipe = redis::pipe();
    for i in 0..n {
        if i == 600 {
            // Not written by tidemark: no header. Must be left alone.
            pipe.cmd("XADD").arg(&k.dead).arg("*").arg("something").arg("else").ignore();
        }
        let idx = i.to_string();
        pipe.cmd("XADD")
            .arg(&k.dead)
            .arg("*")
            .arg("reason")
            .arg("max_deliveries")
            .arg("detail")
            .arg("failed 5 times")
            .arg("origin")
            .arg("out:g")
            .arg("origin_id")
            .arg(format!("{}-0", i + 1))
            .arg("id")
            .arg(format!("e{i}"))
            .arg("ts")
            .arg("1")
            .arg("n")
            .arg(&idx)
            .ignore();
    }
    let () = pipe.query(&mut conn).expect("write dead letters");
    let foreign = read_stream(&mut conn, &k.dead)[600].0.clone();

    let out = run_cli(&["--redis-url", &url, "dead", "replay", "--all"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), n + 1, "one line per letter and a summary");
    assert_eq!(
        lines[n],
        format!(
            "replayed {n} dead letters (0 to {}, {n} to {}); 1 could not be replayed and stay in {}",
            k.input, k.out, k.dead
        )
    );
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!("dead letter {foreign} cannot be replayed: not a tidemark dead letter")),
        "{stderr}"
    );

    assert_eq!(dead_ids(&mut conn), [foreign]);
    let out_entries = read_stream(&mut conn, &k.out);
    assert_eq!(out_entries.len(), n);
    for (i, (id, fields)) in out_entries.iter().enumerate() {
        assert_eq!(field(fields, "n"), Some(i.to_string().as_bytes()), "out entry {id} out of order");
        assert_eq!(replay_line(lines[i]).3, *id);
    }
}
