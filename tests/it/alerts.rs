//! The operator's files under `deploy/`, for real: the Prometheus rules
//! pass `promtool check rules` and their unit tests (`promtool test rules`,
//! a case per alert); the Grafana dashboard and the rules query only names
//! a real daemon and a real `tidemark consume` serve at `/metrics`, and the
//! dashboard has a panel for every one; and a real Prometheus, scraping a
//! real daemon and consumer on loopback, fires the alerts for conditions
//! the test causes (the daemon killed: no daemon serves the namespace, its
//! target is down; Redis killed: Redis unreachable).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value as Json;

use testkit::http_get;
use testkit::{keys, wait_until, xadd_fields, Daemon, RedisOptions, RedisServer};
use testkit::{read_file as read, repo_dir as repo};

const WAIT: Duration = Duration::from_secs(60);

/// A Prometheus binary: `TIDEMARK_<NAME>` if set, else `name` on `PATH`.
/// Missing, the test fails saying how to get it; it never skips.
fn tool(name: &str) -> PathBuf {
    let var = format!("TIDEMARK_{}", name.to_ascii_uppercase());
    let path = std::env::var_os(&var).map_or_else(|| PathBuf::from(name), PathBuf::from);
    let runs = Command::new(&path)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        runs,
        "{} not found: the alert tests need Prometheus's `{name}`. Run `make test` (scripts/ensure-prometheus.sh \
         installs the Debian package `prometheus`), or point {var} at the binary",
        path.display()
    );
    path
}

fn promtool(args: &[&str], dir: &Path) -> String {
    let out = Command::new(tool("promtool")).args(args).current_dir(dir).output().expect("run promtool");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

/// Every document of a YAML file, as JSON.
fn yaml(path: &Path) -> Json {
    serde_norway::from_str(&read(path)).unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()))
}

/// The alerting rules of `alerts.yml`: name → expression.
fn alert_rules() -> BTreeMap<String, String> {
    let rules = yaml(&repo().join("deploy/prometheus/alerts.yml"));
    let mut found = BTreeMap::new();
    for group in rules["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            let name = rule["alert"].as_str().expect("an alerting rule").to_owned();
            let expr = rule["expr"].as_str().expect("an expression").to_owned();
            assert!(rule["labels"]["severity"].is_string(), "{name} has no severity");
            assert!(rule["annotations"]["summary"].is_string(), "{name} has no summary");
            assert!(found.insert(name.clone(), expr).is_none(), "{name} twice");
        }
    }
    found
}

/// The `tidemark_*` names a PromQL expression reads.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("tidemark_") {
        let before_ok = at == 0 || !rest.as_bytes()[at - 1].is_ascii_alphanumeric() && rest.as_bytes()[at - 1] != b'_';
        let word: String =
            rest[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect::<String>();
        if before_ok {
            names.insert(word.clone());
        }
        rest = &rest[at + word.len()..];
    }
    names
}

/// Every `expr` of the Grafana dashboard (panels, rows, variables), with
/// the panel title it belongs to.
fn dashboard_exprs(value: &Json, title: &str, out: &mut Vec<(String, String)>) {
    match value {
        Json::Object(map) => {
            let title = map.get("title").and_then(Json::as_str).unwrap_or(title);
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", Json::String(e)) => out.push((title.to_owned(), e.clone())),
                    ("query", Json::Object(q)) => {
                        if let Some(Json::String(e)) = q.get("query") {
                            out.push((title.to_owned(), e.clone()));
                        }
                    }
                    _ => dashboard_exprs(v, title, out),
                }
            }
        }
        Json::Array(items) => items.iter().for_each(|v| dashboard_exprs(v, title, out)),
        _ => {}
    }
}

fn grafana() -> Json {
    let path = repo().join("deploy/grafana/tidemark.json");
    serde_json::from_str(&read(&path)).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// `promtool check rules` and the unit tests, with a firing case for every
/// alert of the file.
#[test]
fn alert_rules_pass_promtool_with_a_unit_test_per_alert() {
    let dir = repo().join("deploy/prometheus");
    let checked = promtool(&["check", "rules", "alerts.yml"], &dir);
    let rules = alert_rules();
    assert!(checked.contains(&format!("SUCCESS: {} rules found", rules.len())), "{checked}");
    let tested = promtool(&["test", "rules", "alerts_test.yml"], &dir);
    assert!(tested.contains("SUCCESS"), "{tested}");

    let tests = yaml(&dir.join("alerts_test.yml"));
    let mut fired = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for case in tests["tests"].as_array().expect("tests") {
        for check in case["alert_rule_test"].as_array().expect("alert_rule_test") {
            let name = check["alertname"].as_str().expect("alertname").to_owned();
            if check["exp_alerts"].as_array().is_some_and(|a| !a.is_empty()) {
                fired.insert(name);
            } else {
                quiet.insert(name);
            }
        }
    }
    let names: BTreeSet<String> = rules.keys().cloned().collect();
    assert_eq!(fired, names, "every alert has a case where it fires");
    assert_eq!(quiet, names, "every alert has a case where it does not fire (yet)");
    for required in [
        "TidemarkRedisUnreachable",
        "TidemarkNoDaemon",
        "TidemarkInputLagGrowing",
        "TidemarkWatermarkStalled",
        "TidemarkOutputGroupLagging",
        "TidemarkOutputPendingTooOld",
        "TidemarkDeadLettersRising",
    ] {
        assert!(names.contains(required), "no {required} in alerts.yml");
    }
}

/// The sample names a process serves at `/metrics`, and its metric
/// families (from `# TYPE`).
fn served(addr: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let (code, body) = http_get(addr, "/metrics").expect("GET /metrics");
    assert_eq!(code, 200, "{body}");
    let mut samples = BTreeSet::new();
    let mut families = BTreeSet::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            families.insert(rest.split_whitespace().next().expect("a name").to_owned());
        } else if !line.starts_with('#') && !line.is_empty() {
            samples.insert(line.split(['{', ' ']).next().expect("a name").to_owned());
        }
    }
    (samples, families)
}

/// A daemon and a `tidemark consume` with some work done, so that every
/// labelled series exists (groups, dead letters, script latency, consumer
/// counters): the union of what they serve.
fn everything_served(redis: &mut RedisServer) -> (BTreeSet<String>, BTreeSet<String>, Vec<Daemon>) {
    let url = redis.url();
    let mut conn = redis.sync_conn();
    let k = keys("default");
    let daemon = Daemon::spawn(
        &["run", "--redis-url", &url, "--consumer", "d1", "--group", "billing", "--http", "127.0.0.1:0"],
        &[],
    );
    let consumer = Daemon::spawn(
        &[
            "consume",
            "--redis-url",
            &url,
            "--group",
            "billing",
            "--consumer",
            "c1",
            "--max-deliveries",
            "1",
            "--http",
            "127.0.0.1:0",
            "--",
            "sh",
            "-c",
            r#"[ "$TIDEMARK_ID" != bad ]"#,
        ],
        &[],
    );
    let (daemon_addr, consumer_addr) = (daemon.http_addr(WAIT).to_string(), consumer.http_addr(WAIT).to_string());
    for (id, ts) in [("good", "1"), ("bad", "2"), ("later", "50")] {
        xadd_fields(&mut conn, &k.input, &[(b"op", b"add"), (b"id", id.as_bytes()), (b"ts", ts.as_bytes())]);
    }
    xadd_fields(&mut conn, &k.input, &[(b"op", b"watermark"), (b"ts", b"5")]);
    xadd_fields(&mut conn, &k.input, &[(b"op", b"nonsense")]);
    wait_until("the work is done: two handled or dead, one dead input", WAIT, || {
        let (out, dead): (usize, usize) = redis::pipe().xlen(&k.out).xlen(&k.dead).query(&mut conn).unwrap();
        let (samples, _) = served(&consumer_addr);
        out == 2 && dead == 2 && samples.contains("tidemark_consumer_failed_total")
    });
    // A Redis failure, so that the error counters have a series too.
    redis.kill9();
    redis.restart();
    wait_until("both processes counted the Redis failure and reconnected", WAIT, || {
        [&daemon_addr, &consumer_addr].iter().all(|a| {
            let (samples, _) = served(a);
            samples.contains("tidemark_redis_errors_total") && http_get(a, "/readyz").is_ok_and(|(c, _)| c == 200)
        })
    });
    let (mut samples, mut families) = served(&daemon_addr);
    let (more_samples, more_families) = served(&consumer_addr);
    samples.extend(more_samples);
    families.extend(more_families);
    (samples, families, vec![daemon, consumer])
}

/// The dashboard and the rules read only names that `/metrics` serves, and
/// the dashboard has a panel for every metric family served; its panels
/// are well formed and all use the `datasource` variable.
#[test]
fn grafana_dashboard_and_rules_read_names_served_at_metrics() {
    // With the append-only file, the state survives the restart in the middle.
    let mut redis = RedisServer::start_with(RedisOptions { aof: true, ..RedisOptions::default() });
    let (samples, families, _processes) = everything_served(&mut redis);
    assert!(samples.contains("tidemark_script_duration_seconds_bucket"), "{samples:?}");

    let dashboard = grafana();
    assert_eq!(dashboard["uid"], "tidemark");
    assert!(dashboard["title"].is_string() && dashboard["schemaVersion"].is_u64(), "title and schemaVersion");
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    for p in panels {
        let title = p["title"].as_str().expect("every panel has a title");
        assert!(ids.insert(p["id"].as_u64().expect("a numeric id")), "panel id {} twice", p["id"]);
        for key in ["h", "w", "x", "y"] {
            assert!(p["gridPos"][key].is_u64(), "{title}: gridPos.{key}");
        }
        if p["type"] != "row" {
            assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}: datasource");
            let targets = p["targets"].as_array().unwrap_or_else(|| panic!("{title}: no targets"));
            let refs: BTreeSet<&str> = targets.iter().map(|t| t["refId"].as_str().expect("refId")).collect();
            assert_eq!(refs.len(), targets.len(), "{title}: refIds are unique");
        }
    }
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
        .iter()
        .map(|v| v["name"].as_str().expect("name"))
        .collect();
    assert_eq!(variables, ["datasource", "job"]);

    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard, "", &mut exprs);
    assert!(exprs.len() > 20, "{exprs:?}");
    let mut used = BTreeSet::new();
    for (title, expr) in &exprs {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{title}: {expr} reads no tidemark metric");
        for name in names {
            assert!(samples.contains(&name), "panel {title:?} reads {name}, which /metrics does not serve ({expr})");
            used.insert(name);
        }
    }
    for family in &families {
        let covered =
            used.iter().any(|u| u == family || u.strip_prefix(family.as_str()).is_some_and(|s| s.starts_with('_')));
        assert!(covered, "no panel shows {family}");
    }
    for (alert, expr) in alert_rules() {
        for name in metric_names(&expr) {
            assert!(samples.contains(&name), "{alert} reads {name}, which /metrics does not serve ({expr})");
        }
    }
}

/// A Prometheus server in a temporary directory on a free loopback port;
/// killed on drop (its log is printed if the test fails).
struct Prometheus {
    child: Child,
    addr: String,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus with `config` (a prometheus.yml) and the files
    /// `extra` (name, content) beside it, and waits until it is ready.
    fn start(config: &str, extra: &[(&str, String)]) -> Prometheus {
        let binary = tool("prometheus");
        let dir = tempfile::Builder::new().prefix("tidemark-prometheus-").tempdir().expect("tempdir");
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        for (name, content) in extra {
            std::fs::write(dir.path().join(name), content).unwrap();
        }
        let log_path = dir.path().join("prometheus.log");
        for _ in 0..3 {
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let addr = format!("127.0.0.1:{port}");
            let log = std::fs::File::create(&log_path).unwrap();
            let mut child = Command::new(&binary)
                .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
                .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
                .arg(format!("--web.listen-address={addr}"))
                .current_dir(dir.path())
                .stdin(Stdio::null())
                .stdout(Stdio::from(log.try_clone().unwrap()))
                .stderr(Stdio::from(log))
                .spawn()
                .unwrap_or_else(|e| panic!("start {}: {e}", binary.display()));
            let deadline = Instant::now() + WAIT;
            while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
                if matches!(http_get(&addr, "/-/ready"), Ok((200, _))) {
                    return Prometheus { child, addr, dir };
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
            // The port may have been taken in between: try another one.
            if !read(&log_path).contains("address already in use") {
                break;
            }
        }
        panic!("Prometheus did not start; its log:\n{}", read(&log_path));
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// `GET /api/v1/<path>`, the `data` of a successful answer.
    fn api(&self, path: &str) -> Json {
        let (code, body) = http_get(&self.addr, &format!("/api/v1/{path}")).expect("ask Prometheus");
        let json: Json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
        assert_eq!((code, json["status"].as_str()), (200, Some("success")), "{path}: {body}");
        json["data"].clone()
    }

    /// The result of an instant query.
    fn query(&self, promql: &str) -> Vec<Json> {
        let data = self.api(&format!("query?query={}", encode(promql)));
        data["result"].as_array().cloned().unwrap_or_default()
    }

    /// The alerts in state `firing`, as (name, labels).
    fn firing(&self) -> Vec<(String, Json)> {
        self.api("alerts")["alerts"]
            .as_array()
            .expect("alerts")
            .iter()
            .filter(|a| a["state"] == "firing")
            .map(|a| (a["labels"]["alertname"].as_str().unwrap_or_default().to_owned(), a["labels"].clone()))
            .collect()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("----- prometheus log -----\n{}\n----- end -----", self.log());
        }
    }
}

/// Percent-encodes a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A real Prometheus scrapes a real daemon and a real consumer every
/// second with the repository's rules (their `for:` shortened to 2 s):
/// nothing fires while all is well; killing the daemon fires
/// TidemarkNoDaemon (reported by the consumer) and TidemarkTargetDown;
/// killing Redis fires TidemarkRedisUnreachable. The dashboard's queries
/// all run on it.
#[test]
fn a_real_prometheus_fires_the_alerts() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    let lease = [("TIDEMARK__LEASE__TTL", "1s")];
    let mut daemon = Daemon::spawn(
        &["run", "--redis-url", &url, "--consumer", "d1", "--group", "g", "--http", "127.0.0.1:0"],
        &lease,
    );
    let consumer = Daemon::spawn(
        &["consume", "--redis-url", &url, "--group", "g", "--consumer", "c1", "--http", "127.0.0.1:0", "--", "true"],
        &lease,
    );
    let (daemon_addr, consumer_addr) = (daemon.http_addr(WAIT).to_string(), consumer.http_addr(WAIT).to_string());

    let rules = read(&repo().join("deploy/prometheus/alerts.yml"));
    let mut shortened = 0;
    let fast: String = rules
        .lines()
        .map(|l| match l.trim_start().strip_prefix("for: ") {
            Some(_) => {
                shortened += 1;
                format!("{}for: 2s\n", &l[..l.len() - l.trim_start().len()])
            }
            None => format!("{l}\n"),
        })
        .collect();
    assert_eq!(shortened, alert_rules().len(), "every rule has a for:");
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - alerts.yml\n\
         scrape_configs:\n  - job_name: tidemark\n    static_configs:\n      - targets: ['{daemon_addr}', '{consumer_addr}']\n"
    );
    let prometheus = Prometheus::start(&config, &[("alerts.yml", fast)]);

    // Scraped and healthy: both targets up, a daemon alive, Redis readable.
    wait_until("Prometheus scrapes both processes", WAIT, || {
        let up = prometheus.query(r#"up{job="tidemark"} == 1"#).len();
        let alive = prometheus.query("tidemark_input_live_daemons == 1").len();
        up == 2 && alive == 2
    });
    let rules = prometheus.api("rules");
    let loaded: usize =
        rules["groups"].as_array().expect("groups").iter().map(|g| g["rules"].as_array().unwrap().len()).sum();
    assert_eq!(loaded, alert_rules().len(), "{rules}");
    for group in rules["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            assert_eq!(rule["health"], "ok", "{rule}");
        }
    }
    let calm = prometheus.firing();
    assert!(calm.is_empty(), "alerts fire while all is well: {calm:?}");

    // Every query of the Grafana dashboard runs.
    let mut exprs = Vec::new();
    dashboard_exprs(&grafana(), "", &mut exprs);
    for (_, expr) in exprs {
        let promql = expr.replace("$__rate_interval", "1m").replace("$job", ".*");
        // A variable's label_values(METRIC, LABEL) is Grafana's: its PromQL is METRIC.
        let promql = match promql.strip_prefix("label_values(").and_then(|r| r.rsplit_once(',')) {
            Some((metric, _)) => metric.to_owned(),
            None => promql,
        };
        prometheus.query(&promql);
    }

    // The daemon dies: its lease lapses, the consumer reports no daemon.
    daemon.kill9();
    let fired = |name: &str, instance: Option<&str>| {
        prometheus.firing().iter().any(|(n, labels)| {
            n == name && instance.is_none_or(|i| labels["instance"] == i) && labels["job"] == "tidemark"
        })
    };
    wait_until("TidemarkNoDaemon fires", WAIT, || fired("TidemarkNoDaemon", None));
    wait_until("TidemarkTargetDown fires for the daemon", WAIT, || fired("TidemarkTargetDown", Some(&daemon_addr)));
    assert!(!fired("TidemarkRedisUnreachable", None), "Redis is still there");

    // Redis dies: the consumer's scrape says so.
    redis.kill9();
    wait_until("TidemarkRedisUnreachable fires for the consumer", WAIT, || {
        fired("TidemarkRedisUnreachable", Some(&consumer_addr))
    });
    drop(consumer);
}
