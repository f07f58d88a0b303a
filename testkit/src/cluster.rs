//! A local Redis Cluster on loopback ports for the tests: `masters` master
//! processes (and `replicas` per master), each a [`RedisServer`] with its
//! own port and directory, joined with `redis-cli --cluster create`, torn
//! down on drop.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{wait_until, RedisOptions, RedisServer};

/// How long the cluster may take to agree on its slots after creation.
const FORM_TIMEOUT: Duration = Duration::from_secs(60);

/// A local Redis Cluster (see the module docs).
pub struct RedisCluster {
    /// Every node, masters first, in creation order.
    pub nodes: Vec<RedisServer>,
    /// Masters at creation.
    pub masters: usize,
}

impl RedisCluster {
    /// Starts `masters` masters with `replicas` replicas each.
    pub fn start(masters: usize, replicas: usize) -> RedisCluster {
        Self::start_with(masters, replicas, |_| Vec::new())
    }

    /// [`RedisCluster::start`], node `i` with the extra `redis-server`
    /// arguments `args(i)` (TLS, say).
    pub fn start_with(masters: usize, replicas: usize, args: impl Fn(usize) -> Vec<String>) -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..masters * (1 + replicas))
            .map(|i| {
                let mut extra = args(i);
                RedisServer::start_with(RedisOptions {
                    aof: false,
                    extra_args: vec![
                        "--cluster-enabled".into(),
                        "yes".into(),
                        "--cluster-config-file".into(),
                        "nodes.conf".into(),
                        "--cluster-node-timeout".into(),
                        "2000".into(),
                        // A replica may take over at once (no data age limit).
                        "--cluster-replica-validity-factor".into(),
                        "0".into(),
                    ]
                    .into_iter()
                    .chain(extra.drain(..))
                    .collect(),
                    ..Default::default()
                })
            })
            .collect();
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for n in &nodes {
            create.arg(format!("127.0.0.1:{}", n.port()));
        }
        create.arg("--cluster-replicas").arg(replicas.to_string()).arg("--cluster-yes");
        // `redis-cli` waits forever for nodes that cannot meet (a cluster
        // bus they cannot reach): bound it, and show what it printed.
        let dir = tempfile::TempDir::new().expect("tempdir");
        let out_path = dir.path().join("create.out");
        let out_file = std::fs::File::create(&out_path).expect("create.out");
        let mut child = create
            .stdin(Stdio::null())
            .stdout(out_file.try_clone().expect("dup"))
            .stderr(out_file)
            .spawn()
            .expect("run redis-cli --cluster create");
        let deadline = Instant::now() + FORM_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait redis-cli") {
                break Some(status);
            }
            if Instant::now() >= deadline {
                crate::process::kill_and_reap(&mut child);
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(
            status.is_some_and(|s| s.success()),
            "redis-cli --cluster create {} ({status:?}):\n{}",
            if status.is_none() { "did not finish within the deadline" } else { "failed" },
            crate::process::read_file(&out_path)
        );
        let cluster = RedisCluster { nodes, masters };
        cluster.wait_ok();
        cluster
    }

    /// A seed URL (the first node).
    pub fn url(&self) -> String {
        self.nodes[0].url()
    }

    /// Waits until every running node says `cluster_state:ok` and knows
    /// every slot.
    pub fn wait_ok(&self) {
        let deadline = Instant::now() + FORM_TIMEOUT;
        for n in &self.nodes {
            if n.pid().is_none() {
                continue;
            }
            loop {
                let info: String = redis::cmd("CLUSTER").arg("INFO").query(&mut n.sync_conn()).unwrap_or_default();
                if info.contains("cluster_state:ok") && info.contains("cluster_slots_assigned:16384") {
                    break;
                }
                assert!(Instant::now() < deadline, "the cluster did not form:\n{info}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// The node that serves `slot` as master, by index in `nodes`.
    pub fn master_of(&self, slot: u16) -> usize {
        let node = self.nodes.iter().find(|n| n.pid().is_some()).expect("a running node");
        let slots: redis::Value =
            redis::cmd("CLUSTER").arg("SLOTS").query(&mut node.sync_conn()).expect("CLUSTER SLOTS");
        let redis::Value::Array(ranges) = slots else { panic!("CLUSTER SLOTS: {slots:?}") };
        for r in ranges {
            let redis::Value::Array(parts) = r else { continue };
            let (Some(redis::Value::Int(lo)), Some(redis::Value::Int(hi)), Some(redis::Value::Array(master))) =
                (parts.first(), parts.get(1), parts.get(2))
            else {
                continue;
            };
            if (*lo..=*hi).contains(&i64::from(slot)) {
                let Some(redis::Value::Int(port)) = master.get(1) else { panic!("no port") };
                return self.nodes.iter().position(|n| i64::from(n.port()) == *port).expect("a known node");
            }
        }
        panic!("no master serves slot {slot}");
    }

    /// A node's cluster id.
    pub fn node_id(&self, i: usize) -> String {
        redis::cmd("CLUSTER").arg("MYID").query(&mut self.nodes[i].sync_conn()).expect("CLUSTER MYID")
    }

    /// Moves `slot` from its master to node `to` (which must be a master),
    /// keys and all, as `redis-cli --cluster reshard` does: `SETSLOT
    /// IMPORTING/MIGRATING`, `MIGRATE` in batches, then `SETSLOT NODE` on
    /// every master. Calls `between` after each batch of keys moved (to
    /// write while the slot migrates).
    pub fn migrate_slot(&self, slot: u16, to: usize, mut between: impl FnMut()) {
        let from = self.master_of(slot);
        assert_ne!(from, to, "slot {slot} is already on node {to}");
        let (from_id, to_id) = (self.node_id(from), self.node_id(to));
        let mut src = self.nodes[from].sync_conn();
        let mut dst = self.nodes[to].sync_conn();
        let () = redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg("IMPORTING")
            .arg(&from_id)
            .query(&mut dst)
            .expect("IMPORTING");
        let () = redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg("MIGRATING")
            .arg(&to_id)
            .query(&mut src)
            .expect("MIGRATING");
        loop {
            let keys: Vec<String> =
                redis::cmd("CLUSTER").arg("GETKEYSINSLOT").arg(slot).arg(1).query(&mut src).expect("GETKEYSINSLOT");
            if keys.is_empty() {
                break;
            }
            let mut migrate = redis::cmd("MIGRATE");
            migrate.arg("127.0.0.1").arg(self.nodes[to].port()).arg("").arg(0).arg(5000).arg("KEYS");
            for k in &keys {
                migrate.arg(k);
            }
            let _: redis::Value = migrate.query(&mut src).expect("MIGRATE");
            between();
        }
        for n in self.nodes.iter().filter(|n| n.pid().is_some()) {
            let role: Vec<redis::Value> = redis::cmd("ROLE").query(&mut n.sync_conn()).expect("ROLE");
            if role.first().and_then(|r| redis::from_redis_value_ref::<String>(r).ok()).as_deref() == Some("master") {
                let _: redis::Value = redis::cmd("CLUSTER")
                    .arg("SETSLOT")
                    .arg(slot)
                    .arg("NODE")
                    .arg(&to_id)
                    .query(&mut n.sync_conn())
                    .expect("SETSLOT NODE");
            }
        }
        wait_until("every node agrees on the slot's new master", FORM_TIMEOUT, || self.master_of(slot) == to);
    }

    /// `CLUSTER FAILOVER` on replica `replica`: it becomes the master of its
    /// master's slots, which becomes its replica.
    pub fn failover(&self, replica: usize) {
        let deadline = Instant::now() + FORM_TIMEOUT;
        'attempt: loop {
            // A manual failover waits for the replica to catch up with its
            // master, and times out (after 5 s) if it is still syncing.
            self.wait_synced(replica);
            let () =
                redis::cmd("CLUSTER").arg("FAILOVER").query(&mut self.nodes[replica].sync_conn()).expect("FAILOVER");
            let try_until = Instant::now() + Duration::from_secs(8);
            while Instant::now() < try_until {
                if self.role(replica) == "master" {
                    break 'attempt;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            assert!(
                Instant::now() < deadline,
                "the replica did not take over; its log:\n{}",
                self.nodes[replica].log()
            );
        }
        self.wait_ok();
    }

    /// Waits until replica `i` is linked to its master and not syncing.
    pub fn wait_synced(&self, i: usize) {
        wait_until("the replica is in sync", FORM_TIMEOUT, || {
            let info: String =
                redis::cmd("INFO").arg("replication").query(&mut self.nodes[i].sync_conn()).unwrap_or_default();
            info.contains("master_link_status:up") && info.contains("master_sync_in_progress:0")
        });
    }

    /// `master` or `slave`, as node `i` says.
    pub fn role(&self, i: usize) -> String {
        let role: Vec<redis::Value> = redis::cmd("ROLE").query(&mut self.nodes[i].sync_conn()).expect("ROLE");
        role.first().and_then(|r| redis::from_redis_value_ref::<String>(r).ok()).unwrap_or_default()
    }

    /// The replica of master `master`, by index.
    pub fn replica_of(&self, master: usize) -> usize {
        let id = self.node_id(master);
        (0..self.nodes.len())
            .find(|&i| {
                if self.nodes[i].pid().is_none() {
                    return false;
                }
                self.role(i) == "slave" && {
                    let nodes: String =
                        redis::cmd("CLUSTER").arg("NODES").query(&mut self.nodes[i].sync_conn()).expect("NODES");
                    nodes.lines().any(|l| l.contains("myself") && l.contains(&id))
                }
            })
            .expect("a replica of the master")
    }
}
