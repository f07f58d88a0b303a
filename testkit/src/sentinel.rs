//! A Sentinel-managed Redis on loopback for failover tests: one master, one
//! replica and three Sentinels (`redis-server --sentinel`, quorum 2), each
//! on a free port with its own directory, all killed on drop.

use std::collections::HashMap;
use std::fs::OpenOptions;
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

/// A Sentinel process.
pub struct Sentinel {
    child: Option<Child>,
    port: u16,
    password: Option<&'static str>,
    dir: TempDir,
}

impl Sentinel {
    fn start(master_port: u16, passwords: Option<Passwords>) -> Sentinel {
        let dir = tempfile::Builder::new().prefix("tidemark-sentinel-").tempdir().expect("sentinel tempdir");
        for _ in 0..5 {
            let port = free_port();
            // Sentinel rewrites its configuration file: it must be writable.
            let conf = dir.path().join("sentinel.conf");
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\nprotected-mode no\ndaemonize no\ndir {dir}\nlogfile {log}\n\
                     sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n\
                     sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                     sentinel failover-timeout {MASTER_NAME} 5000\n\
                     sentinel parallel-syncs {MASTER_NAME} 1\n{auth}",
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
                Ok(()) => return Sentinel { child: Some(child), port, password: passwords.map(|p| p.sentinel), dir },
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

    /// The Sentinel's port.
    pub fn port(&self) -> u16 {
        self.port
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
}

impl SentinelSet {
    /// Starts the servers and Sentinels without passwords (see
    /// [`SentinelSet::start_with`]).
    pub fn start() -> SentinelSet {
        Self::start_with(None)
    }

    /// Starts the servers and Sentinels and waits until the replica is in
    /// sync and every Sentinel knows the replica and the other Sentinels
    /// (so that a failover can be agreed on). With `passwords`, the data
    /// nodes and the Sentinels each require theirs.
    pub fn start_with(passwords: Option<Passwords>) -> SentinelSet {
        let auth: Vec<String> = match passwords {
            None => Vec::new(),
            Some(p) => vec!["--requirepass".into(), p.data.into(), "--masterauth".into(), p.data.into()],
        };
        let master = RedisServer::start_with(RedisOptions { extra_args: auth.clone(), ..RedisOptions::default() });
        let mut replica_args = auth;
        replica_args.extend(["--replicaof".into(), "127.0.0.1".into(), master.port().to_string()]);
        let replica = RedisServer::start_with(RedisOptions { extra_args: replica_args, ..RedisOptions::default() });
        let set = SentinelSet {
            sentinels: (0..3).map(|_| Sentinel::start(master.port(), passwords)).collect(),
            servers: vec![master, replica],
            passwords,
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

    /// `redis+sentinel://[:DATA_PASSWORD@]127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3/mymaster`
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self.sentinels.iter().map(|s| format!("127.0.0.1:{}", s.port())).collect();
        let auth = self.passwords.map(|p| format!(":{}@", p.data)).unwrap_or_default();
        format!("redis+sentinel://{auth}{}/{MASTER_NAME}", hosts.join(","))
    }

    /// A connection to the data node on `port` (authenticated).
    pub fn data_conn(&self, port: u16) -> redis::Connection {
        let auth = self.passwords.map(|p| format!(":{}@", p.data)).unwrap_or_default();
        redis::Client::open(format!("redis://{auth}127.0.0.1:{port}"))
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(5)))
            .unwrap_or_else(|e| panic!("connect to the data node on {port}: {e}"))
    }

    /// The master's port as the first Sentinel that answers names it.
    pub fn master_port(&self) -> u16 {
        for s in &self.sentinels {
            let auth = s.password.map(|p| format!(":{p}@")).unwrap_or_default();
            let Ok(client) = redis::Client::open(format!("redis://{auth}127.0.0.1:{}", s.port())) else { continue };
            let Ok(mut c) = client.get_connection_with_timeout(Duration::from_secs(2)) else { continue };
            let addr: Result<(String, u16), _> =
                redis::cmd("SENTINEL").arg("GET-MASTER-ADDR-BY-NAME").arg(MASTER_NAME).query(&mut c);
            if let Ok((_, port)) = addr {
                return port;
            }
        }
        panic!("no sentinel names the master");
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
