//! The deployment files under `deploy/`, checked without a container
//! engine: every YAML file parses; the Dockerfile builds the binary with
//! `--locked` and runs it as a numeric non-root user; ports, probe paths,
//! mount paths, environment names and grace periods agree with each other
//! and with the binary; and the commands of the compose file and of the
//! Kubernetes Deployments really run (with their configuration and
//! environment) against a real Redis, answer their probes, and move an
//! element from `:in` through the daemons to the consumer.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value as Json;
use tempfile::TempDir;

use testkit::{http_get, keys, run_cli, wait_until, Daemon, RedisOptions, RedisServer};
use testkit::{read_file as read, repo_dir as repo};

const WAIT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// HTTP helpers (also used by tests/it/security.rs)
// ---------------------------------------------------------------------------

// ---------------------------------------------------------------------------
// Reading the files
// ---------------------------------------------------------------------------

fn deploy_dir() -> PathBuf {
    repo().join("deploy")
}

/// Every document of a YAML file, merge keys (`<<: *anchor`) applied, as
/// JSON values.
fn yaml_docs(path: &Path) -> Vec<Json> {
    use serde::Deserialize;
    let text = read(path);
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| {
            let mut value = serde_norway::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()));
            value.apply_merge().unwrap_or_else(|e| panic!("{}: merge keys: {e}", path.display()));
            serde_json::to_value(&value).unwrap_or_else(|e| panic!("{}: not JSON-like: {e}", path.display()))
        })
        .filter(|doc| !doc.is_null())
        .collect()
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display())) {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            found.extend(yaml_files(&path));
        } else if matches!(path.extension().and_then(|e| e.to_str()), Some("yml" | "yaml")) {
            found.push(path);
        }
    }
    found.sort();
    found
}

fn str_at<'a>(value: &'a Json, pointer: &str) -> &'a str {
    value.pointer(pointer).and_then(Json::as_str).unwrap_or_else(|| panic!("no string at {pointer} in {value}"))
}

fn strings(value: &Json) -> Vec<String> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {value}"))
        .iter()
        .map(|v| v.as_str().unwrap_or_else(|| panic!("not a string: {v}")).to_owned())
        .collect()
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).unwrap_or_else(|| panic!("no port in {addr:?}"))
}

fn duration(text: &str) -> Duration {
    humantime::parse_duration(text).unwrap_or_else(|e| panic!("{text:?} is not a duration: {e}"))
}

/// No environment at all: only the file and the defaults count.
struct NoEnv;

impl tidemark::config::Env for NoEnv {
    fn var(&self, _: &str) -> Option<String> {
        None
    }
    fn vars(&self) -> Vec<(String, String)> {
        Vec::new()
    }
}

/// The configuration as the binary's loader reads it from `file` (over the
/// built-in defaults), as JSON; `None` = the defaults alone.
fn raw_config(file: Option<&Path>) -> Json {
    let mut overrides = tidemark::config::Overrides::default();
    overrides.config_file = file.map(Path::to_path_buf);
    let raw =
        tidemark::config::RawConfig::load(&overrides, &NoEnv).unwrap_or_else(|e| panic!("{file:?} does not load: {e}"));
    serde_json::to_value(&raw).expect("RawConfig serializes")
}

/// The port `run` and `consume` serve HTTP on by default.
fn default_http_port() -> u16 {
    assert!(raw_config(None).pointer("/http/addr").is_some_and(Json::is_null), "http.addr is unset by default");
    port_of(tidemark::config::DEFAULT_HTTP_ADDR)
}

/// One Dockerfile instruction: keyword (upper case), arguments, and the
/// stage it belongs to (0 = the first `FROM`).
#[derive(Debug)]
struct Instruction {
    keyword: String,
    args: String,
    stage: usize,
}

/// Parses the Dockerfile: comments dropped, `\` continuations joined.
fn dockerfile() -> Vec<Instruction> {
    let text = read(&deploy_dir().join("Dockerfile"));
    let mut instructions = Vec::new();
    let mut stage = 0;
    let mut pending = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if pending.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            pending.push_str(head);
            pending.push(' ');
            continue;
        }
        pending.push_str(trimmed);
        let full = std::mem::take(&mut pending);
        let (keyword, args) = full.split_once(char::is_whitespace).unwrap_or((&full, ""));
        let keyword = keyword.to_ascii_uppercase();
        if keyword == "FROM" && instructions.iter().any(|i: &Instruction| i.keyword == "FROM") {
            stage += 1;
        }
        instructions.push(Instruction { keyword, args: args.trim().to_owned(), stage });
    }
    assert!(pending.is_empty(), "the Dockerfile ends in a continuation line");
    instructions
}

/// The exec form `["a", "b"]` of ENTRYPOINT/CMD.
fn exec_form(args: &str) -> Vec<String> {
    let parsed: Json = serde_json::from_str(args).unwrap_or_else(|e| panic!("{args:?} is not the exec form: {e}"));
    strings(&parsed)
}

/// `ARG NAME=value` defaults, for expanding `${NAME}` in `FROM`.
fn expand_args(instructions: &[Instruction], text: &str) -> String {
    let mut out = text.to_owned();
    for i in instructions.iter().filter(|i| i.keyword == "ARG") {
        if let Some((name, value)) = i.args.split_once('=') {
            out = out.replace(&format!("${{{name}}}"), value);
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Static checks
// ---------------------------------------------------------------------------

#[test]
fn every_yaml_file_parses_and_kustomization_lists_every_manifest() {
    let files = yaml_files(&deploy_dir());
    let names: Vec<String> =
        files.iter().map(|p| p.strip_prefix(deploy_dir()).expect("under deploy/").display().to_string()).collect();
    for expected in ["docker-compose.yml", "k8s/daemon.yaml", "k8s/consumer.yaml", "k8s/pdb.yaml", "k8s/configmap.yaml"]
    {
        assert!(names.iter().any(|n| n == expected), "deploy/{expected} is missing: {names:?}");
    }
    for file in &files {
        let docs = yaml_docs(file);
        assert!(!docs.is_empty(), "{} holds no document", file.display());
        if file.starts_with(deploy_dir().join("k8s")) {
            for doc in &docs {
                for key in ["/apiVersion", "/kind"] {
                    str_at(doc, key);
                }
                if doc["kind"] != "Kustomization" {
                    str_at(doc, "/metadata/name");
                }
            }
        }
    }
    let k8s = deploy_dir().join("k8s");
    let kustomization = &yaml_docs(&k8s.join("kustomization.yaml"))[0];
    let mut listed = strings(&kustomization["resources"]);
    listed.sort();
    let mut manifests: Vec<String> = yaml_files(&k8s)
        .iter()
        .map(|p| p.file_name().expect("file name").to_string_lossy().into_owned())
        .filter(|n| n != "kustomization.yaml" && !n.contains(".example."))
        .collect();
    manifests.sort();
    assert_eq!(listed, manifests, "kustomization.yaml must list every manifest (examples excepted)");
}

#[test]
fn dockerfile_builds_locked_and_runs_as_a_numeric_non_root_user() {
    let instructions = dockerfile();
    let stages: Vec<&Instruction> = instructions.iter().filter(|i| i.keyword == "FROM").collect();
    assert!(stages.len() >= 2, "not a multi-stage build: {stages:?}");
    let last = stages.len() - 1;
    let in_stage = |n: usize, keyword: &str| -> Vec<&Instruction> {
        instructions.iter().filter(|i| i.stage == n && i.keyword == keyword).collect()
    };

    // The builder: the official Rust image, no older than rust-version.
    let builder_from = expand_args(&instructions, &stages[0].args);
    let (image, alias) = builder_from.split_once(" AS ").unwrap_or_else(|| panic!("unnamed builder: {builder_from}"));
    assert!(image.starts_with("rust:"), "the builder is not the official rust image: {image}");
    let version = |v: &str| -> Vec<u32> { v.split('.').map(|p| p.parse().expect("numeric version")).collect() };
    let image_version = image["rust:".len()..].split('-').next().expect("tag");
    let manifest = read(&repo().join("Cargo.toml"));
    let msrv = manifest
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .map(|v| v.trim_matches('"'))
        .expect("rust-version in Cargo.toml");
    assert!(version(image_version) >= version(msrv), "rust:{image_version} is older than rust-version {msrv}");
    let build = in_stage(0, "RUN");
    let build = build
        .iter()
        .find(|i| i.args.contains("cargo build"))
        .unwrap_or_else(|| panic!("the builder runs no cargo build: {build:?}"));
    assert!(build.args.contains("--release") && build.args.contains("--locked"), "{}", build.args);
    assert!(repo().join("Cargo.lock").is_file(), "--locked needs Cargo.lock in the repository");

    // The binary goes from target/release to the runtime's entrypoint.
    let produced = build
        .args
        .split_whitespace()
        .skip_while(|w| *w != "target/release/tidemark")
        .nth(1)
        .unwrap_or_else(|| panic!("the builder does not copy target/release/tidemark anywhere: {}", build.args));
    let copied = in_stage(last, "COPY");
    let from_builder = copied
        .iter()
        .find(|i| i.args.starts_with(&format!("--from={alias}")))
        .unwrap_or_else(|| panic!("the runtime copies nothing from {alias}: {copied:?}"));
    let parts: Vec<&str> = from_builder.args.split_whitespace().collect();
    assert_eq!(parts[1], produced, "the runtime copies another path than the builder produced");
    let entrypoint = in_stage(last, "ENTRYPOINT");
    assert_eq!(entrypoint.len(), 1, "{entrypoint:?}");
    assert_eq!(exec_form(&entrypoint[0].args), [parts[2]], "ENTRYPOINT is not the copied binary");
    assert!(parts[2].ends_with("/tidemark"), "{}", parts[2]);
    let cmd = in_stage(last, "CMD");
    assert_eq!(exec_form(&cmd[0].args), ["run"]);

    // A numeric, non-root user (Kubernetes' runAsNonRoot can check it).
    let user = in_stage(last, "USER");
    let user = user.last().unwrap_or_else(|| panic!("the runtime stage sets no USER"));
    let (uid, gid) = user.args.split_once(':').unwrap_or((&user.args, "0"));
    let uid: u32 = uid.parse().unwrap_or_else(|_| panic!("USER {} is not numeric", user.args));
    assert!(uid != 0 && gid.parse::<u32>().is_ok(), "USER {}", user.args);
    let last_run = instructions.iter().rposition(|i| i.stage == last && i.keyword == "RUN");
    let user_at = instructions.iter().rposition(|i| i.stage == last && i.keyword == "USER");
    assert!(user_at > last_run, "USER must come after the runtime's RUN steps");

    // The port and the configuration file.
    let exposed = in_stage(last, "EXPOSE");
    assert_eq!(exposed.len(), 1, "{exposed:?}");
    let exposed: u16 = exposed[0].args.trim_end_matches("/tcp").parse().expect("EXPOSE port");
    assert_eq!(exposed, default_http_port(), "EXPOSE differs from the default HTTP port");
    let config_copy = copied
        .iter()
        .find(|i| i.args.starts_with("deploy/tidemark.toml "))
        .unwrap_or_else(|| panic!("deploy/tidemark.toml is not copied into the image: {copied:?}"));
    let config_path = config_copy.args.split_whitespace().nth(1).expect("COPY destination");
    let env = in_stage(last, "ENV").iter().map(|i| i.args.clone()).collect::<Vec<_>>().join(" ");
    assert!(env.contains(&format!("TIDEMARK_CONFIG={config_path}")), "TIDEMARK_CONFIG is not {config_path}: {env}");
    let image_config = raw_config(Some(&deploy_dir().join("tidemark.toml")));
    assert_eq!(
        str_at(&image_config, "/http/addr"),
        format!("0.0.0.0:{exposed}"),
        "the image must listen on all interfaces"
    );

    let ignored = read(&repo().join(".dockerignore"));
    for must in ["target", ".git"] {
        assert!(ignored.lines().any(|l| l.trim().trim_matches('/') == must), ".dockerignore lacks {must}");
    }
}

/// The environment names a manifest may set: the binary reads these (and
/// `TIDEMARK__…` keys, which the runs below check: unknown keys exit 64).
const KNOWN_ENV: [&str; 5] = ["POD_NAME", "TIDEMARK_CONFIG", "RUST_LOG", "REDIS_URL", "REDIS_PASSWORD"];

fn assert_known_env(name: &str, context: &str) {
    assert!(
        KNOWN_ENV.contains(&name) || name.starts_with("TIDEMARK__"),
        "{context}: unknown environment variable {name}"
    );
}

// ---------------------------------------------------------------------------
// Running what the files run
// ---------------------------------------------------------------------------

/// The value after `flag` in a command line.
fn arg_after<'a>(args: &'a [String], flag: &str) -> &'a str {
    let at = args.iter().position(|a| a == flag).unwrap_or_else(|| panic!("no {flag} in {args:?}"));
    args.get(at + 1).unwrap_or_else(|| panic!("{flag} without a value in {args:?}"))
}

/// Spawns `tidemark args` as a manifest would, with `env`.
fn spawn(args: &[String], env: &BTreeMap<String, String>) -> Daemon {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Daemon::spawn(&args, &env)
}

/// Waits until `/readyz` answers 200, then checks `/healthz`.
fn wait_ready(process: &Daemon, what: &str) -> String {
    let addr = process.http_addr(WAIT).to_string();
    wait_until(&format!("{what}: /readyz 200"), WAIT, || matches!(http_get(&addr, "/readyz"), Ok((200, _))));
    let (code, body) = http_get(&addr, "/healthz").unwrap_or_else(|e| panic!("{what}: GET /healthz: {e}"));
    assert_eq!(code, 200, "{what}: /healthz: {body}");
    addr
}

fn sync_conn(url: &str) -> redis::Connection {
    let client = redis::Client::open(url).unwrap_or_else(|e| panic!("{url}: {e}"));
    client.get_connection_with_timeout(Duration::from_secs(10)).unwrap_or_else(|e| panic!("connect {url}: {e}"))
}

/// Adds an element and its watermark, and waits until group `group` has
/// acknowledged it (read and nothing pending).
fn element_reaches_the_consumer(url: &str, group: &str, consumer: &Daemon) {
    for args in [&["add", "--id", "deploy-check", "--ts", "3"][..], &["watermark", "3"]] {
        let mut all = vec!["--redis-url", url];
        all.extend_from_slice(args);
        let out = run_cli(&all, &[]);
        assert_eq!(out.status.code(), Some(0), "tidemark {all:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    wait_until("the consumer ran its command for deploy-check", WAIT, || consumer.log().contains("deploy-check"));
    let mut conn = sync_conn(url);
    let out_key = keys("default").out;
    wait_until("deploy-check acknowledged", WAIT, || {
        let groups: Vec<BTreeMap<String, redis::Value>> =
            redis::cmd("XINFO").arg("GROUPS").arg(&out_key).query(&mut conn).expect("XINFO GROUPS");
        groups.iter().any(|g| {
            g.get("name") == Some(&redis::Value::BulkString(group.as_bytes().to_vec()))
                && g.get("pending") == Some(&redis::Value::Int(0))
                && g.get("last-delivered-id") != Some(&redis::Value::BulkString(b"0-0".to_vec()))
        })
    });
}

/// Consumer names of `group` on `stream`.
fn consumer_names(url: &str, stream: &str, group: &str) -> Vec<String> {
    let mut conn = sync_conn(url);
    let consumers: Vec<BTreeMap<String, redis::Value>> =
        redis::cmd("XINFO").arg("CONSUMERS").arg(stream).arg(group).query(&mut conn).expect("XINFO CONSUMERS");
    consumers
        .iter()
        .filter_map(|c| match c.get("name") {
            Some(redis::Value::BulkString(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        })
        .collect()
}

fn stop_cleanly(mut process: Daemon, what: &str, deadline: Duration) {
    process.sigterm();
    let status = process.wait_exit(deadline).unwrap_or_else(|| panic!("{what} ignored SIGTERM:\n{}", process.log()));
    assert_eq!(status.code(), Some(0), "{what}:\n{}", process.log());
}

#[test]
fn compose_file_agrees_with_the_binary_and_its_services_run() {
    let compose = &yaml_docs(&deploy_dir().join("docker-compose.yml"))[0];
    let services = compose["services"].as_object().expect("services");
    let port = default_http_port();

    // Redis: AOF on, fsync policy stated, a healthcheck.
    let (redis_name, redis_service) = services
        .iter()
        .find(|(_, s)| s["image"].as_str().is_some_and(|i| i.starts_with("redis:")))
        .expect("a redis service");
    let redis_command = strings(&redis_service["command"]).join(" ");
    assert!(redis_command.contains("--appendonly yes"), "{redis_command}");
    assert!(
        redis_command.contains("--appendfsync always") || redis_command.contains("--appendfsync everysec"),
        "{redis_command}"
    );
    assert!(redis_service["healthcheck"]["test"].is_array(), "redis has no healthcheck");

    let tidemark: Vec<(&String, &Json)> = services.iter().filter(|(name, _)| *name != redis_name).collect();
    let commands = |verb: &str| tidemark.iter().filter(|(_, s)| s["command"][0] == verb).count();
    assert_eq!((commands("run"), commands("consume")), (2, 1), "two daemons and one consume worker");
    let mut host_ports = Vec::new();
    let server = RedisServer::start();
    let image_config = deploy_dir().join("tidemark.toml");
    let mut running = Vec::new();
    for (name, service) in &tidemark {
        let context = deploy_dir().join(str_at(service, "/build/context"));
        let dockerfile = context.join(str_at(service, "/build/dockerfile"));
        assert_eq!(
            dockerfile.canonicalize().expect("the Dockerfile exists"),
            deploy_dir().join("Dockerfile").canonicalize().expect("deploy/Dockerfile")
        );
        assert_eq!(str_at(service, "/depends_on/redis/condition"), "service_healthy", "{name}");
        let mapping = strings(&service["ports"]);
        assert_eq!(mapping.len(), 1, "{name}: {mapping:?}");
        let (host, container) = mapping[0].rsplit_once(':').expect("host:container");
        assert_eq!(container.parse::<u16>().expect("container port"), port, "{name}: container port");
        host_ports.push(host.to_owned());
        // Long enough for the daemon's and the consumer's drain.
        let stop = duration(str_at(service, "/stop_grace_period"));
        let image = raw_config(Some(&image_config));
        let daemon_grace = duration(str_at(&image, "/daemon/shutdown_grace"));
        let consume_grace = duration(str_at(&image, "/consume/shutdown_grace")) + tidemark::consume::FINISH_MARGIN;
        assert!(stop > daemon_grace && stop > consume_grace, "{name}: stop_grace_period {stop:?}");

        // Its environment, with REDIS_URL pointing at the redis service.
        let mut env = BTreeMap::new();
        for (key, value) in service["environment"].as_object().expect("environment map") {
            assert_known_env(key, name);
            env.insert(key.clone(), value.as_str().expect("string value").to_owned());
        }
        let redis_url = url::Url::parse(&env["REDIS_URL"]).expect("REDIS_URL");
        assert_eq!(
            redis_url.host_str(),
            Some(redis_name.as_str()),
            "{name}: REDIS_URL does not name the redis service"
        );
        // The image's configuration and environment; here Redis is local and
        // the HTTP port is any free one (the environment beats the file).
        env.insert("REDIS_URL".into(), server.url());
        env.insert("TIDEMARK_CONFIG".into(), image_config.to_str().expect("utf-8").into());
        env.insert("TIDEMARK__HTTP__ADDR".into(), "127.0.0.1:0".into());
        let process = spawn(&strings(&service["command"]), &env);
        let addr = wait_ready(&process, name);

        // The healthcheck, as compose runs it (bash is in the image).
        let check = strings(&service["healthcheck"]["test"]);
        assert_eq!(check[..3], ["CMD", "bash", "-c"], "{name}");
        let script = &check[3];
        let in_container = format!("/dev/tcp/127.0.0.1/{port}");
        assert!(script.contains(&in_container), "{name}: the healthcheck does not ask port {port}: {script}");
        let here = script.replace(&in_container, &format!("/dev/tcp/127.0.0.1/{}", port_of(&addr)));
        let status = Command::new("bash").arg("-c").arg(&here).stdin(Stdio::null()).status().expect("run bash");
        assert!(status.success(), "{name}: the healthcheck fails against a ready process: {here}");
        running.push((name.to_string(), process, strings(&service["command"])));
    }
    host_ports.sort();
    host_ports.dedup();
    assert_eq!(host_ports.len(), 3, "each service needs its own host port");

    let (_, consumer, command) = running.iter().find(|(_, _, command)| command[0] == "consume").expect("consumer");
    element_reaches_the_consumer(&server.url(), arg_after(command, "--group"), consumer);
    // Every daemon serves the namespace: registered (one owns the input of
    // its one partition, the other stands by to take over).
    let registry = tidemark::store::Namespace::new("tidemark", "default", 1).daemons();
    let mut conn = redis::Client::open(server.url()).expect("client").get_connection().expect("connect");
    let daemons: Vec<String> = redis::cmd("ZRANGE").arg(&registry).arg(0).arg(-1).query(&mut conn).expect("ZRANGE");
    for (name, _, command) in running.iter().filter(|(_, _, command)| command[0] == "run") {
        let consumer = arg_after(command, "--consumer");
        assert!(daemons.iter().any(|d| d == consumer), "{name}: {consumer} is not a live daemon: {daemons:?}");
    }

    // The healthcheck can fail: a consumer whose Redis is gone is not ready.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let mut env = BTreeMap::new();
    env.insert("REDIS_URL".to_owned(), format!("redis://127.0.0.1:{closed}"));
    env.insert("TIDEMARK__HTTP__ADDR".to_owned(), "127.0.0.1:0".to_owned());
    let stranded = spawn(&["consume".into(), "--group".into(), "g".into(), "--".into(), "cat".into()], &env);
    let addr = stranded.http_addr(WAIT).to_string();
    let (code, _) = http_get(&addr, "/readyz").expect("GET /readyz");
    assert_eq!(code, 503);
    let script = strings(&services[running[0].0.as_str()]["healthcheck"]["test"])[3]
        .replace(&format!("/dev/tcp/127.0.0.1/{port}"), &format!("/dev/tcp/127.0.0.1/{}", port_of(&addr)));
    let status = Command::new("bash").arg("-c").arg(&script).stdin(Stdio::null()).status().expect("run bash");
    assert!(!status.success(), "the healthcheck passes for a process that is not ready");

    for (name, process, _) in running {
        stop_cleanly(process, &name, Duration::from_secs(30));
    }
}

/// A Deployment's pod template, checked against the ConfigMap, the Secret
/// and the binary; returns its container.
struct Pod<'a> {
    name: String,
    template: &'a Json,
    container: &'a Json,
}

impl<'a> Pod<'a> {
    fn of(deployment: &'a Json) -> Pod<'a> {
        let template = &deployment["spec"]["template"];
        let containers = template["spec"]["containers"].as_array().expect("containers");
        assert_eq!(containers.len(), 1, "one container per pod");
        Pod { name: str_at(deployment, "/metadata/name").to_owned(), template, container: &containers[0] }
    }

    fn env(&self) -> BTreeMap<String, &'a Json> {
        self.container["env"].as_array().expect("env list").iter().map(|e| (str_at(e, "/name").to_owned(), e)).collect()
    }

    /// The mount path of the volume `volume` refers to.
    fn mount_of(&self, predicate: impl Fn(&Json) -> bool) -> (String, &'a Json) {
        let volume = self.template["spec"]["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .find(|v| predicate(v))
            .unwrap_or_else(|| panic!("{}: no such volume", self.name));
        let name = str_at(volume, "/name");
        let mount = self.container["volumeMounts"]
            .as_array()
            .expect("volumeMounts")
            .iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("{}: volume {name} is not mounted", self.name));
        assert_eq!(mount["readOnly"], true, "{}: {name} must be mounted read-only", self.name);
        (str_at(mount, "/mountPath").to_owned(), volume)
    }
}

#[test]
fn kubernetes_manifests_agree_with_the_binary_and_their_pods_run() {
    let k8s = deploy_dir().join("k8s");
    let docs: Vec<Json> = yaml_files(&k8s).iter().flat_map(|f| yaml_docs(f)).collect();
    let of_kind = |kind: &str| -> Vec<&Json> { docs.iter().filter(|d| d["kind"] == kind).collect() };
    let port = default_http_port();

    // The ConfigMap's file, as the binary reads it.
    let config_maps = of_kind("ConfigMap");
    assert_eq!(config_maps.len(), 1);
    let config_map = config_maps[0];
    let config_map_name = str_at(config_map, "/metadata/name");
    let data = config_map["data"].as_object().expect("ConfigMap data");
    assert_eq!(data.len(), 1, "one file in the ConfigMap");
    let (config_key, config_text) = data.iter().next().expect("one entry");
    let dir = TempDir::new().expect("tempdir");
    let config_file = dir.path().join(config_key);
    std::fs::write(&config_file, config_text.as_str().expect("file text")).expect("write config");
    let config = raw_config(Some(&config_file));
    let addr = str_at(&config, "/http/addr");
    assert_eq!(addr, format!("0.0.0.0:{port}"), "the pods must listen on all interfaces, on the default port");
    let groups = strings(&config["daemon"]["groups"]);
    let password_file = str_at(&config, "/redis/password_file").to_owned();

    let secrets = of_kind("Secret");
    assert_eq!(secrets.len(), 1, "secret.example.yaml");
    let secret_name = str_at(secrets[0], "/metadata/name");
    let secret_keys: Vec<&String> = secrets[0]["stringData"].as_object().expect("stringData").keys().collect();

    let deployments = of_kind("Deployment");
    assert_eq!(deployments.len(), 2, "the daemon and the consume worker");
    let server = RedisServer::start_with(RedisOptions {
        extra_args: vec!["--requirepass".into(), "k8s-Secret".into()],
        ..Default::default()
    });
    let mut admin_url = url::Url::parse(&server.url()).expect("url");
    admin_url.set_password(Some("k8s-Secret")).expect("set_password");
    let admin_url = admin_url.to_string();
    let secret_file = dir.path().join("redis-password");
    std::fs::write(&secret_file, "k8s-Secret").expect("write secret");
    let mut running = Vec::new();

    for deployment in &deployments {
        let pod = Pod::of(deployment);
        let name = pod.name.clone();
        let args = strings(&pod.container["args"]);
        let verb = args[0].as_str();
        assert!(matches!(verb, "run" | "consume"), "{name}: {args:?}");

        // Labels: the selector picks the template's pods.
        let labels = pod.template["metadata"]["labels"].as_object().expect("template labels");
        for (k, v) in deployment["spec"]["selector"]["matchLabels"].as_object().expect("matchLabels") {
            assert_eq!(labels.get(k), Some(v), "{name}: the selector does not match the template");
        }
        // A PodDisruptionBudget covers it.
        let pdbs: Vec<&Json> = of_kind("PodDisruptionBudget")
            .into_iter()
            .filter(|p| {
                p["spec"]["selector"]["matchLabels"]
                    .as_object()
                    .expect("pdb selector")
                    .iter()
                    .all(|(k, v)| labels.get(k) == Some(v))
            })
            .collect();
        assert_eq!(pdbs.len(), 1, "{name}: exactly one PodDisruptionBudget must select its pods");

        // Ports and probes.
        let ports = pod.container["ports"].as_array().expect("ports");
        let http = ports.iter().find(|p| p["name"] == "http").unwrap_or_else(|| panic!("{name}: no port named http"));
        assert_eq!(http["containerPort"], port, "{name}: containerPort");
        for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
            let get = &pod.container[probe]["httpGet"];
            assert_eq!(get["path"], path, "{name}: {probe}");
            assert!(get["port"] == "http" || get["port"] == port, "{name}: {probe} port {}", get["port"]);
        }
        let annotations = &pod.template["metadata"]["annotations"];
        assert_eq!(annotations["prometheus.io/port"], port.to_string(), "{name}");
        assert_eq!(annotations["prometheus.io/path"], "/metrics", "{name}");

        // Resources.
        for (kind, resource) in [("requests", "cpu"), ("requests", "memory"), ("limits", "cpu"), ("limits", "memory")] {
            assert!(pod.container["resources"][kind][resource].is_string(), "{name}: resources.{kind}.{resource}");
        }

        // Non-root, the Dockerfile's user.
        let security = &pod.template["spec"]["securityContext"];
        assert_eq!(security["runAsNonRoot"], true, "{name}");
        let user = dockerfile().into_iter().rfind(|i| i.keyword == "USER").expect("USER").args;
        assert_eq!(security["runAsUser"].to_string(), user.split(':').next().expect("uid"), "{name}: runAsUser");

        // The grace period outlasts the drain.
        let grace =
            pod.template["spec"]["terminationGracePeriodSeconds"].as_u64().expect("terminationGracePeriodSeconds");
        let grace = Duration::from_secs(grace);
        let drain = if verb == "run" {
            duration(str_at(&config, "/daemon/shutdown_grace"))
        } else {
            duration(str_at(&config, "/consume/shutdown_grace")) + tidemark::consume::FINISH_MARGIN
        };
        assert!(grace > drain, "{name}: terminationGracePeriodSeconds {grace:?} <= {drain:?}");

        // Environment: POD_NAME from the downward API, known names only.
        let env = pod.env();
        assert_eq!(
            env.get("POD_NAME").map(|e| &e["valueFrom"]["fieldRef"]["fieldPath"]),
            Some(&Json::from("metadata.name")),
            "{name}: POD_NAME must come from the downward API"
        );
        for key in env.keys() {
            assert_known_env(key, &name);
        }
        // The ConfigMap is mounted where TIDEMARK_CONFIG points.
        let (config_dir, _) = pod.mount_of(|v| v["configMap"]["name"] == config_map_name);
        let config_path = env.get("TIDEMARK_CONFIG").map(|e| str_at(e, "/value").to_owned());
        assert_eq!(config_path, Some(format!("{config_dir}/{config_key}")), "{name}: TIDEMARK_CONFIG");
        // The Secret is mounted where redis.password_file points.
        let (secret_dir, secret_volume) = pod.mount_of(|v| v["secret"]["secretName"] == secret_name);
        let items = secret_volume["secret"]["items"].as_array().expect("secret items");
        let item = items
            .iter()
            .find(|i| format!("{secret_dir}/{}", str_at(i, "/path")) == password_file)
            .unwrap_or_else(|| panic!("{name}: redis.password_file {password_file} is not a mounted secret item"));
        assert!(
            secret_keys.iter().any(|k| *k == str_at(item, "/key")),
            "{name}: the Secret has no key {}",
            item["key"]
        );
        if verb == "consume" {
            let group = arg_after(&args, "--group");
            assert!(groups.iter().any(|g| g == group), "{name}: the daemons do not create group {group}: {groups:?}");
        }

        // Run it: its args and environment, the ConfigMap's file, the
        // Secret's file; here Redis is local and the HTTP port any free one.
        let pod_name = format!("{name}-5d8f7b9c4-x2x7q");
        let mut run_env: BTreeMap<String, String> =
            env.iter().filter_map(|(k, e)| e["value"].as_str().map(|v| (k.clone(), v.to_owned()))).collect();
        run_env.insert("POD_NAME".into(), pod_name.clone());
        run_env.insert("TIDEMARK_CONFIG".into(), config_file.to_str().expect("utf-8").into());
        run_env.insert("TIDEMARK__REDIS__PASSWORD_FILE".into(), secret_file.to_str().expect("utf-8").into());
        run_env.insert("REDIS_URL".into(), server.url());
        run_env.insert("TIDEMARK__HTTP__ADDR".into(), "127.0.0.1:0".into());
        let process = spawn(&args, &run_env);
        wait_ready(&process, &name);
        running.push((name, pod_name, args, process, grace));
    }

    // Services: their pods and the named port exist.
    for service in of_kind("Service") {
        let selector = service["spec"]["selector"].as_object().expect("service selector");
        let target = deployments
            .iter()
            .map(|d| Pod::of(d))
            .find(|pod| {
                let labels = pod.template["metadata"]["labels"].as_object().expect("labels");
                selector.iter().all(|(k, v)| labels.get(k) == Some(v))
            })
            .unwrap_or_else(|| panic!("service {} selects no Deployment", service["metadata"]["name"]));
        for p in service["spec"]["ports"].as_array().expect("service ports") {
            assert_eq!(p["port"], port, "service port");
            let named =
                target.container["ports"].as_array().expect("ports").iter().any(|c| c["name"] == p["targetPort"]);
            assert!(named || p["targetPort"] == port, "targetPort {} is not a container port", p["targetPort"]);
        }
    }

    let (_, _, consumer_args, consumer, _) = running.iter().find(|r| r.2[0] == "consume").expect("consume worker");
    let group = arg_after(consumer_args, "--group");
    element_reaches_the_consumer(&admin_url, group, consumer);
    // The consumer names are the pod names.
    let input = consumer_names(&admin_url, &keys("default").input, "tidemark");
    let output = consumer_names(&admin_url, &keys("default").out, group);
    for (name, pod_name, args, _, _) in &running {
        let names = if args[0] == "consume" { &output } else { &input };
        assert!(names.contains(pod_name), "{name}: consumer {pod_name} not in {names:?}");
    }
    for (name, _, _, process, grace) in running {
        stop_cleanly(process, &name, grace);
    }
}
