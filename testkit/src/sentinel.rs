//! A Sentinel-managed Redis on loopback for failover tests: one master, one
//! replica and three Sentinels (`redis-server --sentinel`, quorum 2), each
//! on a free port with its own directory, all killed on drop. Optionally
//! with passwords (data nodes and Sentinels each their own) and TLS: then
//! every process also listens on a TLS port, the Sentinels monitor the
//! data nodes' TLS ports and talk to them and to each other over TLS
//! (`tls-replication yes`), and the plain ports stay for the harness.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::process::{free_port, kill_and_reap};
use crate::server::{server_binary, wait_answers, RedisOptions, RedisServer};
use crate::wait::wait_until;

/// The name the Sentinels monitor the master under.
pub const MASTER_NAME: &str = "mymaster";

/// Passwords of a [`SentinelSet`]: the data nodes' and the Sentinels'.
#[derive(Debug, Clone, Copy)]
pub struct Passwords {
    pub data: &'static str,
    pub sentinel: &'static str,
}

/// PEM files for a [`SentinelSet`] with TLS: the certificate (valid for
/// 127.0.0.1) and key every process serves, and the CA that signed it.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl TlsFiles {
    /// The `redis-server` settings for a TLS port beside the plain one:
    /// clients need no certificate, replication and Sentinel links use TLS.
    fn settings(&self, tls_port: u16) -> Vec<(&'static str, String)> {
        let path = |p: &PathBuf| p.to_str().expect("utf-8 path").to_owned();
        vec![
            ("tls-port", tls_port.to_string()),
            ("tls-cert-file", path(&self.cert)),
            ("tls-key-file", path(&self.key)),
            ("tls-ca-cert-file", path(&self.ca)),
            ("tls-auth-clients", "no".into()),
            ("tls-replication", "yes".into()),
        ]
    }
}

/// Options for [`SentinelSet::start_with`].
#[derive(Debug, Clone, Default)]
pub struct SentinelOptions {
    /// Passwords for the data nodes and the Sentinels.
    pub passwords: Option<Passwords>,
    /// TLS for every process (see the module docs).
    pub tls: Option<TlsFiles>,
}

/// A Sentinel process.
pub struct Sentinel {
    child: Option<Child>,
    port: u16,
    tls_port: Option<u16>,
    password: Option<&'static str>,
    dir: TempDir,
}

impl Sentinel {
    fn start(master_port: u16, opts: &SentinelOptions) -> Sentinel {
        let passwords = opts.passwords;
        let dir = tempfile::Builder::new().prefix("tidemark-sentinel-").tempdir().expect("sentinel tempdir");
        for _ in 0..5 {
            let port = free_port();
            let tls_port = opts.tls.as_ref().map(|_| free_port());
            let tls: String = match (&opts.tls, tls_port) {
                (Some(files), Some(p)) => files.settings(p).iter().map(|(k, v)| format!("{k} {v}\n")).collect(),
                _ => String::new(),
            };
            // Sentinel rewrites its configuration file: it must be writable.
            let conf = dir.path().join("sentinel.conf");
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\nprotected-mode no\ndaemonize no\ndir {dir}\nlogfile {log}\n\
                     sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n\
                     sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                     sentinel failover-timeout {MASTER_NAME} 5000\n\
                     sentinel parallel-syncs {MASTER_NAME} 1\n{auth}{tls}",
                    dir = dir.path().display(),
                    log = dir.path().join("sentinel.log").display(),
                    auth = match passwords {
                        None => String::new(),
                        Some(p) => format!(
                            "requirepass {s}\nsentinel sentinel-pass {s}\nsentinel auth-pass {MASTER_NAME} {d}\n",
                            s = p.sentinel,
                            d = p.data
                        ),
                    },
                ),
            )
            .expect("write sentinel.conf");
            let stdio = OpenOptions::new().create(true).append(true).open(dir.path().join("stdio")).expect("stdio");
            let mut child = Command::new(server_binary())
                .arg(&conf)
                .arg("--sentinel")
                .stdin(Stdio::null())
                .stdout(Stdio::from(stdio.try_clone().expect("clone")))
                .stderr(Stdio::from(stdio))
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {} --sentinel: {e}", server_binary().display()));
            match wait_answers(&mut child, port, Duration::from_secs(10)) {
                Ok(()) => {
                    return Sentinel {
                        child: Some(child),
                        port,
                        tls_port,
                        password: passwords.map(|p| p.sentinel),
                        dir,
                    }
                }
                Err(why) => {
                    kill_and_reap(&mut child);
                    let log = std::fs::read_to_string(dir.path().join("sentinel.log")).unwrap_or_default();
                    if !log.contains("Address already in use") {
                        panic!("sentinel on port {port}: {why}; log:\n{log}");
                    }
                }
            }
        }
        panic!("could not start a sentinel");
    }

    /// The Sentinel's (plain) port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The Sentinel's TLS port, with TLS.
    pub fn tls_port(&self) -> Option<u16> {
        self.tls_port
    }

    /// A connection to the Sentinel.
    pub fn conn(&self) -> redis::Connection {
        let auth = self.password.map(|p| format!(":{p}@")).unwrap_or_default();
        redis::Client::open(format!("redis://{auth}127.0.0.1:{}", self.port))
            .expect("client")
            .get_connection_with_timeout(Duration::from_secs(5))
            .expect("connect to the sentinel")
    }

    /// The Sentinel's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sentinel.log")).unwrap_or_default()
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_and_reap(&mut c);
        }
    }
}

/// One master, one replica and three Sentinels (see the module docs).
pub struct SentinelSet {
    /// The two data nodes: `servers[0]` starts as the master.
    pub servers: Vec<RedisServer>,
    /// The Sentinels.
    pub sentinels: Vec<Sentinel>,
    /// The passwords, if any.
    pub passwords: Option<Passwords>,
    /// With TLS, the data nodes' TLS ports, in the order of `servers`: the
    /// ports the Sentinels name.
    tls_ports: Vec<u16>,
}

impl SentinelSet {
    /// Starts the servers and Sentinels without passwords or TLS (see
    /// [`SentinelSet::start_with`]).
    pub fn start() -> SentinelSet {
        Self::start_with(SentinelOptions::default())
    }

    /// Starts the servers and Sentinels and waits until the replica is in
    /// sync and every Sentinel knows the replica and the other Sentinels
    /// (so that a failover can be agreed on). With `passwords`, the data
    /// nodes and the Sentinels each require theirs; with `tls`, see the
    /// module docs.
    pub fn start_with(opts: SentinelOptions) -> SentinelSet {
        let passwords = opts.passwords;
        let tls_ports: Vec<u16> = match opts.tls {
            Some(_) => vec![free_port(), free_port()],
            None => Vec::new(),
        };
        let args = |node: usize| -> Vec<String> {
            let mut args: Vec<String> = match passwords {
                None => Vec::new(),
                Some(p) => vec!["--requirepass".into(), p.data.into(), "--masterauth".into(), p.data.into()],
            };
            if let Some(files) = &opts.tls {
                for (k, v) in files.settings(tls_ports[node]) {
                    args.extend([format!("--{k}"), v]);
                }
            }
            args
        };
        let master = RedisServer::start_with(RedisOptions { extra_args: args(0), ..RedisOptions::default() });
        // The address the Sentinels monitor and the replica follows: the
        // TLS port with TLS.
        let master_addr_port = tls_ports.first().copied().unwrap_or(master.port());
        let mut replica_args = args(1);
        replica_args.extend(["--replicaof".into(), "127.0.0.1".into(), master_addr_port.to_string()]);
        let replica = RedisServer::start_with(RedisOptions { extra_args: replica_args, ..RedisOptions::default() });
        let set = SentinelSet {
            sentinels: (0..3).map(|_| Sentinel::start(master_addr_port, &opts)).collect(),
            servers: vec![master, replica],
            passwords,
            tls_ports,
        };
        set.wait_in_sync(Duration::from_secs(20));
        wait_until("every sentinel knows the replica and the other sentinels", Duration::from_secs(30), || {
            set.sentinels.iter().all(|s| {
                let mut c = s.conn();
                let replicas: Vec<HashMap<String, String>> =
                    redis::cmd("SENTINEL").arg("REPLICAS").arg(MASTER_NAME).query(&mut c).unwrap_or_default();
                let others: Vec<HashMap<String, String>> =
                    redis::cmd("SENTINEL").arg("SENTINELS").arg(MASTER_NAME).query(&mut c).unwrap_or_default();
                let up = |n: &HashMap<String, String>| n.get("flags").is_some_and(|f| !f.contains("down"));
                replicas.len() == 1 && replicas.iter().all(up) && others.len() == 2 && others.iter().all(up)
            })
        });
        set
    }

    /// `redis+sentinel://[:DATA_PASSWORD@]127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3/mymaster`,
    /// with TLS `rediss+sentinel://` and the Sentinels' TLS ports.
    pub fn url(&self) -> String {
        let hosts: Vec<String> =
            self.sentinels.iter().map(|s| format!("127.0.0.1:{}", s.tls_port().unwrap_or(s.port()))).collect();
        let auth = self.passwords.map(|p| format!(":{}@", p.data)).unwrap_or_default();
        let scheme = if self.tls_ports.is_empty() { "redis+sentinel" } else { "rediss+sentinel" };
        format!("{scheme}://{auth}{}/{MASTER_NAME}", hosts.join(","))
    }

    /// What a thread needs to find the master itself (see [`MasterLookup`]).
    pub fn lookup(&self) -> MasterLookup {
        MasterLookup {
            sentinels: self.sentinels.iter().map(|s| (s.port(), s.password)).collect(),
            data_password: self.passwords.map(|p| p.data),
            ports: self.tls_ports.iter().copied().zip(self.servers.iter().map(RedisServer::port)).collect(),
        }
    }

    /// A connection to the data node on `port` (authenticated).
    pub fn data_conn(&self, port: u16) -> redis::Connection {
        let auth = self.passwords.map(|p| format!(":{}@", p.data)).unwrap_or_default();
        redis::Client::open(format!("redis://{auth}127.0.0.1:{port}"))
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(5)))
            .unwrap_or_else(|e| panic!("connect to the data node on {port}: {e}"))
    }

    /// The (plain) port of the master the Sentinels name (see
    /// [`MasterLookup::master`]).
    pub fn master_port(&self) -> u16 {
        self.lookup().master().map(|(_, port)| port).expect("no sentinel names the master")
    }

    /// The data node on `port`.
    pub fn server(&self, port: u16) -> &RedisServer {
        self.servers.iter().find(|s| s.port() == port).expect("a data node on that port")
    }

    /// The data node on `port`, mutably (to kill it).
    pub fn server_mut(&mut self, port: u16) -> &mut RedisServer {
        self.servers.iter_mut().find(|s| s.port() == port).expect("a data node on that port")
    }

    /// Waits until the master reports its replica online and caught up.
    pub fn wait_in_sync(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query(&mut self.data_conn(self.servers[0].port()))
                .unwrap_or_default();
            let offset = info.lines().find_map(|l| l.strip_prefix("master_repl_offset:")).unwrap_or("-1").trim();
            if info.contains("state=online") && info.contains(&format!("offset={offset},")) {
                return;
            }
            if Instant::now() >= deadline {
                panic!("the replica did not catch up within {timeout:?}:\n{info}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every Sentinel's log, for a failing test.
    pub fn logs(&self) -> String {
        self.sentinels.iter().map(|s| format!("--- sentinel {} ---\n{}", s.port(), s.log())).collect()
    }
}

/// Finds the master as a careful client does, from any thread: every
/// Sentinel is asked and the answer with the highest configuration epoch
/// wins (one that has not heard of the latest failover yet is outvoted).
#[derive(Debug, Clone)]
pub struct MasterLookup {
    /// The Sentinels' plain ports and password.
    sentinels: Vec<(u16, Option<&'static str>)>,
    data_password: Option<&'static str>,
    /// (TLS port, plain port) of each data node, with TLS.
    ports: Vec<(u16, u16)>,
}

impl MasterLookup {
    /// `redis://[:PASSWORD@]127.0.0.1:PORT` of the master's plain port, and
    /// that port; `None` when no Sentinel answers.
    pub fn master(&self) -> Option<(String, u16)> {
        let mut best: Option<(u64, u16)> = None;
        for (port, password) in &self.sentinels {
            let auth = password.map(|p| format!(":{p}@")).unwrap_or_default();
            let Ok(client) = redis::Client::open(format!("redis://{auth}127.0.0.1:{port}")) else { continue };
            let Ok(mut c) = client.get_connection_with_timeout(Duration::from_millis(500)) else { continue };
            let info: redis::RedisResult<HashMap<String, String>> =
                redis::cmd("SENTINEL").arg("MASTER").arg(MASTER_NAME).query(&mut c);
            let Ok(info) = info else { continue };
            let epoch = info.get("config-epoch").and_then(|e| e.parse().ok()).unwrap_or(0);
            let Some(named) = info.get("port").and_then(|p| p.parse::<u16>().ok()) else { continue };
            let plain = self.ports.iter().find(|(tls, _)| *tls == named).map_or(named, |(_, plain)| *plain);
            if best.is_none_or(|(e, _)| epoch > e) {
                best = Some((epoch, plain));
            }
        }
        let auth = self.data_password.map(|p| format!(":{p}@")).unwrap_or_default();
        best.map(|(_, port)| (format!("redis://{auth}127.0.0.1:{port}"), port))
    }
}
