//! The dashboard in a real browser: a daemon serves it, headless Chromium
//! renders it, and the numbers it shows are checked against Redis; then
//! Redis goes away and the page shows an error banner. Also the backlog
//! buckets the chart is drawn from, against a hand-made schedule.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use scraper::{ElementRef, Html, Selector};
use serde_json::Value as Json;

use testkit::{keys, query, read_group, wait_until, Daemon, RedisOptions, RedisServer};

const WAIT: Duration = Duration::from_secs(60);
const PASSWORD: &str = "dash-s3cret-pw";
/// The watermark the scenario sets.
const WATERMARK: i64 = 1_000_000;
/// Elements scheduled after the watermark: more than a thousand, so the
/// page must show a thousands separator.
const SCHEDULED: i64 = 1_234;
/// Elements added at or before the watermark: released at once.
const LATE: i64 = 5;
/// Longest one Chromium run may take.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(90);
const CHROMIUM_MISSING: &str =
    "Chromium is needed for the dashboard test: run `make test` (scripts/ensure-chromium.sh \
                                installs it) or install the `chromium` package; TIDEMARK_CHROMIUM may point at another \
                                browser binary";

/// The browser: `TIDEMARK_CHROMIUM`, else `/usr/bin/chromium`. A missing
/// browser fails the test; it never skips it.
pub(crate) fn chromium() -> PathBuf {
    let path = std::env::var_os("TIDEMARK_CHROMIUM").map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
    assert!(path.is_file(), "{} not found. {CHROMIUM_MISSING}", path.display());
    path
}

/// Runs headless Chromium on `url` with `extra` arguments (e.g.
/// `--dump-dom`) in a fresh profile, and returns its stdout.
pub(crate) fn browse(url: &str, extra: &[&str]) -> String {
    let browser = chromium();
    let profile = tempfile::Builder::new().prefix("tidemark-chromium-").tempdir().expect("chromium profile dir");
    let mut out = tempfile::tempfile().expect("stdout tempfile");
    let mut err = tempfile::tempfile().expect("stderr tempfile");
    let mut child = Command::new(&browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--mute-audio",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        // Run the page's timers up to 5 s of virtual time (network loads
        // pause it) before dumping: enough for several refreshes.
        .arg("--virtual-time-budget=5000")
        .args(extra)
        .arg(url)
        .env("HOME", profile.path())
        .stdin(Stdio::null())
        .stdout(Stdio::from(out.try_clone().expect("clone stdout file")))
        .stderr(Stdio::from(err.try_clone().expect("clone stderr file")))
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}. {CHROMIUM_MISSING}", browser.display()));
    let deadline = Instant::now() + BROWSER_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for chromium") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within {BROWSER_TIMEOUT:?}; stderr:\n{}", read_all(&mut err));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = read_all(&mut out);
    assert!(status.success(), "chromium failed ({status}); stderr:\n{}", read_all(&mut err));
    stdout
}

fn read_all(f: &mut File) -> String {
    let mut buf = Vec::new();
    f.seek(SeekFrom::Start(0)).expect("seek");
    f.read_to_end(&mut buf).expect("read");
    String::from_utf8_lossy(&buf).into_owned()
}

/// The page as Chromium rendered it, once the script has shown a snapshot
/// (`state` is `ok`) or an error (`error`).
pub(crate) fn rendered(addr: SocketAddr, state: &str) -> Html {
    let url = format!("http://{addr}/");
    let mut last = String::new();
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        let dom = Html::parse_document(&browse(&url, &["--dump-dom"]));
        let got = one(&dom, "body").value().attr("data-state").unwrap_or_default().to_owned();
        if got == state {
            return dom;
        }
        last = got;
    }
    panic!("the page never reached state {state:?} (last {last:?})");
}

fn sel(css: &str) -> Selector {
    Selector::parse(css).unwrap_or_else(|e| panic!("bad selector {css}: {e}"))
}

pub(crate) fn one<'a>(dom: &'a Html, css: &str) -> ElementRef<'a> {
    let selector = sel(css);
    let mut found = dom.select(&selector);
    let first = found.next().unwrap_or_else(|| panic!("no {css} in the page:\n{}", dom.html()));
    assert!(found.next().is_none(), "more than one {css}");
    first
}

fn all<'a>(dom: &'a Html, css: &str) -> Vec<ElementRef<'a>> {
    dom.select(&sel(css)).collect()
}

pub(crate) fn text(e: ElementRef<'_>) -> String {
    e.text().collect::<String>().trim().to_owned()
}

fn attr<'a>(e: ElementRef<'a>, name: &str) -> &'a str {
    e.value().attr(name).unwrap_or_else(|| panic!("no {name} on {}", e.html()))
}

/// `(data-value, text)` of the element with id `id`.
pub(crate) fn shown(dom: &Html, id: &str) -> (String, String) {
    let e = one(dom, &format!("#{id}"));
    (attr(e, "data-value").to_owned(), text(e))
}

/// The texts of a table row's cells.
fn cells(row: ElementRef<'_>) -> Vec<String> {
    row.select(&sel("td, th")).map(text).collect()
}

/// `1234567` → `1,234,567`, as the page must show counts.
fn thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        out.insert(0, '-');
    }
    out
}

/// A short duration as `tidemark status` writes it (`850ms`, `4.2s`, `3m05s`…).
fn is_human_duration(s: &str) -> bool {
    let digits = |t: &str| !t.is_empty() && t.chars().all(|c| c.is_ascii_digit());
    if let Some(ms) = s.strip_suffix("ms") {
        return digits(ms);
    }
    if let Some(secs) = s.strip_suffix('s') {
        if let Some((m, s2)) = secs.split_once('m') {
            return digits(m) && digits(s2) && s2.len() == 2;
        }
        return secs.split_once('.').is_some_and(|(a, b)| digits(a) && digits(b) && b.len() == 1);
    }
    false
}

/// `GET path` over HTTP/1.1; (status, body).
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect to the daemon's HTTP");
    stream.set_read_timeout(Some(Duration::from_secs(30))).expect("set_read_timeout");
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").expect("send request");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read response");
    let text = String::from_utf8(raw).expect("response is UTF-8");
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no header end in {text:?}"));
    assert!(!head.to_ascii_lowercase().contains("transfer-encoding: chunked"), "unexpected chunked body: {head}");
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("bad head {head:?}"));
    (status, body.to_owned())
}

fn api(addr: SocketAddr) -> (u16, Json) {
    let (status, body) = get(addr, "/api/dashboard");
    (status, serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}")))
}

fn xadd(conn: &mut redis::Connection, key: &str, fields: &[(&str, String)]) -> String {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(key).arg("*");
    for (f, v) in fields {
        cmd.arg(*f).arg(v);
    }
    cmd.query(conn).unwrap_or_else(|e| panic!("XADD {key}: {e}"))
}

/// `XINFO GROUPS key` as (name, pending, lag) triples.
fn groups(conn: &mut redis::Connection, key: &str) -> Vec<(String, u64, u64)> {
    let reply: Vec<std::collections::HashMap<String, redis::Value>> =
        query(conn, redis::cmd("XINFO").arg("GROUPS").arg(key));
    let num = |v: &redis::Value| -> u64 { redis::from_redis_value_ref(v).expect("a number") };
    reply
        .iter()
        .map(|g| {
            let name: String = redis::from_redis_value_ref(&g["name"]).expect("group name");
            (name, num(&g["pending"]), num(&g["lag"]))
        })
        .collect()
}

#[test]
fn dashboard_shows_what_redis_holds_then_an_error_banner() {
    chromium(); // fail at once, not after the setup, without a browser
    let mut redis = RedisServer::start_with(RedisOptions {
        extra_args: vec!["--requirepass".into(), PASSWORD.into()],
        ..RedisOptions::default()
    });
    let url = format!("redis://:{PASSWORD}@127.0.0.1:{}", redis.port());
    let mut conn = redis::Client::open(url.as_str())
        .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(10)))
        .expect("connect with the password");
    let k = keys("default");
    let d = Daemon::spawn(
        &[
            "run",
            "--redis-url",
            &url,
            "--consumer",
            "d1",
            "--group",
            "billing",
            "--group",
            "audit",
            "--http",
            "127.0.0.1:0",
        ],
        &[
            // Keep the streams as they are while the page is compared with them.
            ("TIDEMARK__HOUSEKEEPING__TRIM_INPUT", "false"),
            ("TIDEMARK__HOUSEKEEPING__TRIM_OUTPUT", "false"),
        ],
    );
    let addr = d.http_addr(WAIT);

    // A known state, written as producers do: a watermark, late elements
    // (released at once), scheduled ones spread over 250,000 ts, and two
    // malformed entries that become dead letters.
    let mut pipe = redis::pipe();
    pipe.cmd("XADD").arg(&k.input).arg("*").arg("op").arg("watermark").arg("ts").arg(WATERMARK).ignore();
    for i in 0..LATE {
        let ts = WATERMARK - i;
        pipe.cmd("XADD")
            .arg(&k.input)
            .arg("*")
            .arg("op")
            .arg("add")
            .arg("id")
            .arg(format!("late{i}"))
            .arg("ts")
            .arg(ts);
        pipe.ignore();
    }
    for i in 0..SCHEDULED {
        let ts = WATERMARK + 1 + (i * 7_919) % 250_000;
        pipe.cmd("XADD").arg(&k.input).arg("*").arg("op").arg("add").arg("id").arg(format!("e{i}")).arg("ts").arg(ts);
        pipe.ignore();
    }
    let () = pipe.query(&mut conn).expect("write the input");
    xadd(&mut conn, &k.input, &[("op", "add".into()), ("id", "broken".into()), ("ts", "soon".into())]);
    xadd(&mut conn, &k.input, &[("op", "bogus".into()), ("id", "weird".into())]);

    wait_until("the daemon applied the input", WAIT, || {
        let (sched, out, dead): (i64, i64, i64) =
            redis::pipe().zcard(&k.sched).xlen(&k.out).xlen(&k.dead).query(&mut conn).expect("ZCARD/XLEN");
        sched == SCHEDULED && out == LATE && dead == 2
    });
    // Consumers: worker-a holds its liveness lease, worker-b is gone.
    assert_eq!(read_group(&mut conn, &k.out, "billing", "worker-a", 2).len(), 2);
    assert_eq!(read_group(&mut conn, &k.out, "billing", "worker-b", 1).len(), 1);
    let () = query(
        &mut conn,
        redis::cmd("SET").arg(k.lease("out", "billing", "worker-a")).arg("alive").arg("PX").arg(600_000),
    );

    // The watermark's speed needs samples a second apart: once the endpoint
    // reports one, it must be exactly 0 (nothing moves).
    wait_until("the endpoint measured the watermark's speed", WAIT, || !api(addr).1["watermark_rate"].is_null());
    let (status, json) = api(addr);
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["watermark_rate"], 0.0, "{json}");

    let dom = rendered(addr, "ok");
    let html = dom.html();
    assert!(!html.contains(PASSWORD), "the password is on the page:\n{html}");
    assert!(!json.to_string().contains(PASSWORD), "the password is in the JSON: {json}");

    // Header and overview cards, against Redis.
    assert_eq!(shown(&dom, "namespace"), ("default".into(), "default".into()));
    assert_eq!(text(one(&dom, "#redis")), format!("redis://:***@127.0.0.1:{}", redis.port()));
    let wm: i64 = query(&mut conn, redis::cmd("GET").arg(&k.wm));
    assert_eq!(wm, WATERMARK);
    assert_eq!(shown(&dom, "watermark"), (wm.to_string(), "1,000,000".into()));
    assert_eq!(shown(&dom, "watermark-rate"), ("0".into(), "0 ts/s (not moving)".into()));
    let scheduled: i64 = query(&mut conn, redis::cmd("ZCARD").arg(&k.sched));
    assert_eq!(shown(&dom, "scheduled"), (scheduled.to_string(), "1,234".into()));
    let first: Vec<(String, i64)> =
        query(&mut conn, redis::cmd("ZRANGE").arg(&k.sched).arg(0).arg(0).arg("WITHSCORES"));
    let last: Vec<(String, i64)> =
        query(&mut conn, redis::cmd("ZRANGE").arg(&k.sched).arg(-1).arg(-1).arg("WITHSCORES"));
    let (first_ts, last_ts) = (first[0].1, last[0].1);
    assert_eq!(first_ts, WATERMARK + 1);
    assert_eq!(
        shown(&dom, "next-due"),
        (first_ts.to_string(), format!("at ts {} (1 after the watermark)", thousands(first_ts)))
    );
    let due: i64 = query(&mut conn, redis::cmd("ZCOUNT").arg(&k.sched).arg("-inf").arg(wm));
    assert_eq!(shown(&dom, "due"), (due.to_string(), thousands(due)));

    let in_len: i64 = query(&mut conn, redis::cmd("XLEN").arg(&k.input));
    assert_eq!(in_len, 1 + LATE + SCHEDULED + 2);
    assert_eq!(shown(&dom, "input-length"), (in_len.to_string(), thousands(in_len)));
    let input = groups(&mut conn, &k.input);
    assert_eq!(input, [("tidemark".to_owned(), 0, 0)]);
    assert_eq!(shown(&dom, "input-pending"), ("0".into(), "0".into()));
    assert_eq!(shown(&dom, "input-lag"), ("0".into(), "0".into()));
    assert_eq!(shown(&dom, "input-daemons"), ("1".into(), "1".into()));
    assert_eq!(shown(&dom, "input-live-daemons"), ("1".into(), "1".into()));
    assert!(one(&dom, "#no-daemon").value().attr("hidden").is_some(), "a daemon serves the namespace");
    let out_len: i64 = query(&mut conn, redis::cmd("XLEN").arg(&k.out));
    assert_eq!(shown(&dom, "output-length"), (out_len.to_string(), LATE.to_string()));
    assert_eq!(shown(&dom, "output-groups"), ("2".into(), "2 consumer groups".into()));
    let dead_len: i64 = query(&mut conn, redis::cmd("XLEN").arg(&k.dead));
    assert_eq!(shown(&dom, "dead-count"), (dead_len.to_string(), "2".into()));

    // The backlog chart: 20 contiguous ranges from the first to the last
    // scheduled ts, each bar's count what ZCOUNT says, none due.
    let chart = one(&dom, "#backlog-chart");
    assert_eq!(attr(chart, "role"), "img");
    let bars = all(&dom, "#backlog-chart g.bucket");
    assert_eq!(bars.len(), 20);
    assert_eq!(attr(chart, "data-buckets"), "20");
    let mut expect_from = first_ts;
    let mut total = 0;
    let mut tallest = 0;
    for bar in &bars {
        let num = |name: &str| -> i64 { attr(*bar, name).parse().expect("numeric data attribute") };
        let (from, to, count) = (num("data-from"), num("data-to"), num("data-count"));
        assert_eq!(from, expect_from, "ranges are contiguous");
        assert!(to >= from);
        let in_redis: i64 = query(&mut conn, redis::cmd("ZCOUNT").arg(&k.sched).arg(from).arg(to));
        assert_eq!(count, in_redis, "bar {from}..={to}");
        assert_eq!(num("data-due"), 0, "nothing is due");
        // A bar for every range that holds elements.
        let rects = bar.select(&sel("rect")).count();
        assert_eq!(rects, 1, "{}", bar.html());
        total += count;
        tallest = tallest.max(count);
        expect_from = to + 1;
    }
    assert_eq!(expect_from - 1, last_ts, "the last range ends at the last scheduled ts");
    assert_eq!(total, scheduled);
    assert_eq!(attr(chart, "data-max"), tallest.to_string());
    let table_rows = all(&dom, "#backlog-table tbody tr");
    assert_eq!(table_rows.len(), 20);
    for (row, bar) in table_rows.iter().zip(&bars) {
        assert_eq!(attr(*row, "data-from"), attr(*bar, "data-from"));
        assert_eq!(attr(*row, "data-count"), attr(*bar, "data-count"));
        let count: i64 = attr(*row, "data-count").parse().expect("count");
        assert_eq!(cells(*row)[2], thousands(count));
    }
    let caption = text(one(&dom, "#backlog-caption"));
    assert!(caption.starts_with(&format!("1,234 scheduled from ts {} to {}", thousands(first_ts), thousands(last_ts))));

    // Output groups, against XINFO GROUPS.
    let mut out_groups = groups(&mut conn, &k.out);
    out_groups.sort();
    assert_eq!(out_groups, [("audit".to_owned(), 0, LATE as u64), ("billing".to_owned(), 3, LATE as u64 - 3)]);
    let rows = all(&dom, "#groups tbody tr");
    assert_eq!(rows.len(), 2);
    for (row, (name, pending, lag)) in rows.iter().zip(&out_groups) {
        assert_eq!(attr(*row, "data-group"), name);
        assert_eq!(attr(*row, "data-pending"), pending.to_string());
        assert_eq!(attr(*row, "data-lag"), lag.to_string());
        let c = cells(*row);
        assert_eq!(c[..3], [name.clone(), pending.to_string(), lag.to_string()], "{}", row.html());
    }
    let billing = one(&dom, "#groups tr[data-group=billing]");
    assert_eq!((attr(billing, "data-consumers"), attr(billing, "data-live")), ("2", "1"));
    let c = cells(billing);
    assert_eq!(c[3], "2 (1 live)");
    let oldest = c[4].split(" · ").collect::<Vec<_>>();
    assert_eq!(oldest.len(), 3, "{c:?}");
    assert!(oldest[0].strip_prefix("idle ").is_some_and(is_human_duration), "{c:?}");
    assert_eq!(oldest[1..], ["worker-a", "1 delivery"]);
    let audit = one(&dom, "#groups tr[data-group=audit]");
    assert_eq!(cells(audit)[3..5], ["0 (0 live)", "—"]);

    // Consumers with their lease state, against XINFO CONSUMERS.
    let consumers: Vec<std::collections::HashMap<String, redis::Value>> =
        query(&mut conn, redis::cmd("XINFO").arg("CONSUMERS").arg(&k.out).arg("billing"));
    let mut expected: Vec<(String, u64)> = consumers
        .iter()
        .map(|c| {
            (
                redis::from_redis_value_ref(&c["name"]).expect("name"),
                redis::from_redis_value_ref(&c["pending"]).expect("pending"),
            )
        })
        .collect();
    expected.sort();
    assert_eq!(expected, [("worker-a".to_owned(), 2), ("worker-b".to_owned(), 1)]);
    let rows = all(&dom, "#consumers tbody tr");
    assert_eq!(rows.len(), 2);
    for (row, (name, pending)) in rows.iter().zip(&expected) {
        assert_eq!((attr(*row, "data-group"), attr(*row, "data-consumer")), ("billing", name.as_str()));
        assert_eq!(attr(*row, "data-pending"), pending.to_string());
        let c = cells(*row);
        assert_eq!(c[..3], ["billing".to_owned(), name.clone(), pending.to_string()]);
        assert!(is_human_duration(&c[3]), "idle {:?}", c[3]);
    }
    let a = one(&dom, "#consumers tr[data-consumer=worker-a]");
    assert_eq!((attr(a, "data-leased"), cells(a)[4].as_str()), ("true", "held · alive"));
    let b = one(&dom, "#consumers tr[data-consumer=worker-b]");
    assert_eq!((attr(b, "data-leased"), cells(b)[4].as_str()), ("false", "none · dead"));

    // Dead letters, newest first, against XREVRANGE.
    let newest: Vec<(String, Vec<(String, String)>)> =
        query(&mut conn, redis::cmd("XREVRANGE").arg(&k.dead).arg("+").arg("-"));
    let rows = all(&dom, "#dead-letters tbody tr");
    assert_eq!(rows.len(), newest.len());
    for (row, (id, fields)) in rows.iter().zip(&newest) {
        let field = |name: &str| fields.iter().find(|(f, _)| f == name).map(|(_, v)| v.clone()).expect("field");
        assert_eq!(attr(*row, "data-entry-id"), id);
        assert_eq!(attr(*row, "data-reason"), field("reason"));
        let c = cells(*row);
        assert!(c[0].strip_suffix(" ago").is_some_and(is_human_duration), "{c:?}");
        assert_eq!(
            c[1..],
            [field("reason"), field("detail"), format!("in {}", field("origin_id")), field("id"), id.clone()]
        );
    }
    assert_eq!(
        rows.iter().map(|r| attr(*r, "data-reason")).collect::<Vec<_>>(),
        ["unknown_op", "bad_ts"],
        "newest first"
    );

    // The watermark moves: the endpoint measures a positive speed, at most
    // the whole step per second (its samples span at least a second).
    xadd(&mut conn, &k.input, &[("op", "watermark".into()), ("ts", (WATERMARK + 50_000).to_string())]);
    wait_until("the endpoint saw the watermark move", WAIT, || {
        let (_, json) = api(addr);
        json["watermark"] == WATERMARK + 50_000 && json["watermark_rate"].as_f64().is_some_and(|r| r > 0.0)
    });
    let rate = api(addr).1["watermark_rate"].as_f64().expect("a rate");
    assert!(rate > 0.0 && rate <= 50_000.0, "rate {rate}");

    // Redis goes away: the page still loads, and says so in a banner.
    redis.kill9();
    wait_until("the endpoint answers 503", WAIT, || api(addr).0 == 503);
    let (status, json) = api(addr);
    assert_eq!(status, 503, "{json}");
    assert!(json["error"].as_str().is_some_and(|e| !e.is_empty()), "{json}");
    assert_eq!(json["redis"], format!("redis://:***@127.0.0.1:{}", redis.port()));
    let dom = rendered(addr, "error");
    let banner = one(&dom, "#error");
    assert!(banner.value().attr("hidden").is_none(), "the banner is shown");
    assert_eq!(attr(banner, "role"), "alert");
    let message = text(banner);
    assert!(message.starts_with("Cannot read Redis: "), "{message}");
    assert_eq!(text(one(&dom, "#redis")), format!("redis://:***@127.0.0.1:{}", redis.port()));
    assert!(!dom.html().contains(PASSWORD), "the password is on the error page");
    drop(d);
}

/// The ranges the chart is drawn from, and how many of each are due, on a
/// schedule written by hand (no daemon).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_buckets_count_every_scheduled_element_once() {
    use tidemark::store::backlog::{backlog, Bucket};

    let redis = RedisServer::start();
    let mut conn = redis.conn().await;
    let k = tidemark::store::Keys::new("tidemark", "default");

    let empty = backlog(&mut conn, &[(k.clone(), Some(5))], 20).await.expect("backlog");
    assert_eq!((empty.scheduled, empty.first_ts, empty.due, empty.buckets.len()), (0, None, 0, 0));

    // ts 0..=99, one element each, plus three more at 40: the watermark 42
    // falls inside the range 40..=44.
    let mut pipe = redis::pipe();
    for ts in 0..100 {
        pipe.zadd(&k.sched, format!("e{ts}"), ts).ignore();
    }
    for extra in ["x1", "x2", "x3"] {
        pipe.zadd(&k.sched, extra, 40).ignore();
    }
    let () = pipe.query_async(&mut conn).await.expect("ZADD");

    let b = backlog(&mut conn, &[(k.clone(), Some(42))], 20).await.expect("backlog");
    assert_eq!((b.scheduled, b.first_ts, b.last_ts), (103, Some(0), Some(99)));
    assert_eq!(b.due, 46, "ts 0..=42 plus the three extras");
    assert_eq!(b.buckets.len(), 20);
    for (i, bucket) in b.buckets.iter().enumerate() {
        let from = 5 * i as i64;
        let (count, due) = match i {
            0..8 => (5, 5),
            8 => (8, 6), // 40..=44: three extras at 40, so 40, 41, 42 + 3
            _ => (5, 0),
        };
        assert_eq!(*bucket, Bucket { from, to: from + 4, count, due }, "bucket {i}");
    }

    // No watermark: nothing is due.
    let b = backlog(&mut conn, &[(k.clone(), None)], 4).await.expect("backlog");
    assert_eq!(b.due, 0);
    assert_eq!(
        b.buckets.iter().map(|x| (x.from, x.to, x.count, x.due)).collect::<Vec<_>>(),
        [(0, 24, 25, 0), (25, 49, 28, 0), (50, 74, 25, 0), (75, 99, 25, 0)]
    );
}

/// A namespace of three partitions: the page shows each partition (its
/// watermark, how far behind the highest it is, its owner) and the spread.
#[test]
fn dashboard_shows_each_partition_and_the_spread() {
    chromium();
    let redis = RedisServer::start();
    let url = redis.url();
    let d = Daemon::spawn(
        &["run", "--redis-url", &url, "--consumer", "d1", "--partitions", "3", "--http", "127.0.0.1:0"],
        &[],
    );
    d.wait_log("connected to Redis", WAIT);
    let addr = d.http_addr(WAIT);
    let ns = tidemark::store::Namespace::new("tidemark", "default", 3);
    let mut conn = redis.sync_conn();
    // Partition 1 is ahead of the others by 40.
    for (p, wm) in [(0u16, 100), (1, 140), (2, 100)] {
        xadd(&mut conn, &ns.partition(p).input, &[("op", "watermark".into()), ("ts", wm.to_string())]);
    }
    testkit::wait_until("every partition applied its watermark", WAIT, || {
        ns.all().iter().all(|k| {
            let wm: Option<String> = redis::cmd("GET").arg(&k.wm).query(&mut conn).expect("GET");
            wm.is_some()
        })
    });
    let dom = rendered(addr, "ok");
    assert_eq!(shown(&dom, "watermark").0, "100", "the namespace's watermark is the lowest");
    let (spread, words) = shown(&dom, "watermark-spread");
    assert_eq!(spread, "40");
    assert!(words.contains("lowest of 3 partitions") && words.contains("40 ahead"), "{words}");
    let rows = all(&dom, "#partitions tbody tr");
    assert_eq!(rows.len(), 3, "{}", dom.html());
    let row1 = cells(rows[1]);
    assert_eq!(row1[..3], ["1", "140", "0"], "{row1:?}");
    assert_eq!(cells(rows[0])[2], "40", "partition 0 is 40 behind");
    assert!(rows.iter().all(|r| cells(*r)[7] == "d1"), "d1 owns every partition");
}
