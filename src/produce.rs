//! The producer API: writes operations to a namespace's input, each where
//! it belongs (DESIGN §7). An `add` or `cancel` of element `id` goes to
//! partition `crc32(id) mod P`; a watermark goes to every partition (the
//! namespace's watermark is the lowest partition's). Batches are
//! pipelined: one round trip per partition, all partitions at once.
//!
//! ```no_run
//! use tidemark::produce::Producer;
//! use tidemark::store::{Endpoint, Mode, Namespace, ConnectOptions};
//! use std::time::Duration;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let client = redis::Client::open("redis://127.0.0.1:6379")?;
//! let opts = ConnectOptions { connect_timeout: Duration::from_secs(5), response_timeout: Duration::from_secs(30) };
//! let redis = Endpoint::new(client, None, Mode::Auto, opts);
//! // The partition count is read from the namespace's record.
//! let mut producer = Producer::connect(&redis, &Namespace::new("tidemark", "orders", 1), None).await?;
//! producer.add(b"order-42", 1_700_000_000_000, &[(b"customer", b"7")]).await?;
//! let mut batch = producer.batch();
//! for i in 0..1000 {
//!     batch.add(format!("el-{i}").as_bytes(), 1_700_000_000_000 + i, &[]);
//! }
//! batch.watermark(1_700_000_000_500);
//! while let Err(e) = batch.send(&mut producer).await {
//!     // What failed stays in the batch: sending again retries only that.
//!     eprintln!("retrying: {e}");
//! }
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;

use futures::future::join_all;

use crate::core::Fault;
use crate::store::{meta, Conn, Endpoint, Namespace, StoreError};

/// Writes to one namespace's input (see the module docs).
#[derive(Clone)]
pub struct Producer {
    /// Commands go here.
    conn: Conn,
    /// Where `conn` came from, to open a new one after a cluster's slots
    /// moved (`None` for a connection given to [`Producer::new`]).
    redis: Option<Endpoint>,
    /// The namespace with its agreed partition count.
    ns: Namespace,
}

impl Producer {
    /// Connects and reads the namespace's layout: `configured` partitions
    /// (checked against the record), or the recorded count, or 1.
    pub async fn connect(redis: &Endpoint, ns: &Namespace, configured: Option<u16>) -> Result<Self, StoreError> {
        let mut conn = redis.connect(redis.options().response_timeout).await?;
        let ns = meta::resolve(&mut conn, ns, configured, false).await??;
        Ok(Producer { conn, redis: Some(redis.clone()), ns })
    }

    /// A producer on an open connection for a namespace whose layout is
    /// known.
    pub fn new(conn: Conn, ns: Namespace) -> Self {
        Producer { conn, redis: None, ns }
    }

    /// Opens a new connection, if this producer knows how (a failed
    /// attempt keeps the old one).
    async fn reconnect(&mut self) {
        if let Some(redis) = &self.redis {
            if let Ok(conn) = redis.connect(redis.options().response_timeout).await {
                self.conn = conn;
            }
        }
    }

    /// The namespace, with its partition count.
    pub fn namespace(&self) -> &Namespace {
        &self.ns
    }

    /// Schedules element `id` at `ts` with payload `fields`. Returns the
    /// input entry id.
    pub async fn add(&mut self, id: &[u8], ts: i64, fields: &[(&[u8], &[u8])]) -> Result<String, StoreError> {
        let stream = self.ns.keys_for(id).input;
        Ok(add_cmd(&stream, id, ts, fields).query_async(&mut self.conn).await?)
    }

    /// Cancels element `id`. Returns the input entry id.
    pub async fn cancel(&mut self, id: &[u8]) -> Result<String, StoreError> {
        let stream = self.ns.keys_for(id).input;
        Ok(cancel_cmd(&stream, id).query_async(&mut self.conn).await?)
    }

    /// Raises the watermark to `ts` on every partition, all at once.
    /// Returns each partition's input entry id.
    pub async fn watermark(&mut self, ts: i64) -> Result<Vec<String>, StoreError> {
        let writes = self.ns.all().into_iter().map(|keys| {
            let mut c = self.conn.clone();
            async move { watermark_cmd(&keys.input, ts).query_async::<String>(&mut c).await }
        });
        join_all(writes).await.into_iter().map(|r| r.map_err(StoreError::from)).collect()
    }

    /// A batch of operations to send together.
    pub fn batch(&self) -> Batch {
        Batch { ns: self.ns.clone(), pipes: BTreeMap::new(), ops: 0 }
    }
}

/// Operations gathered to be sent in one pipeline per partition (see
/// [`Producer::batch`]). Within a partition they keep their order.
pub struct Batch {
    /// Where each operation goes.
    ns: Namespace,
    /// Each partition's pipeline.
    pipes: BTreeMap<u16, redis::Pipeline>,
    /// Commands gathered.
    ops: usize,
}

impl Batch {
    fn pipe(&mut self, partition: u16) -> &mut redis::Pipeline {
        self.ops += 1;
        self.pipes.entry(partition).or_insert_with(|| {
            // MULTI/EXEC: a partition's entries are written all or none. On
            // a cluster, a slot that migrates half-way through a plain
            // pipeline would have it re-sent whole after `ASK`, writing its
            // first entries twice; a transaction is refused whole instead.
            let mut p = redis::pipe();
            p.atomic();
            p
        })
    }

    /// Adds `add` of element `id`.
    pub fn add(&mut self, id: &[u8], ts: i64, fields: &[(&[u8], &[u8])]) -> &mut Self {
        let keys = self.ns.keys_for(id);
        self.pipe(keys.partition).add_command(add_cmd(&keys.input, id, ts, fields));
        self
    }

    /// Adds `cancel` of element `id`.
    pub fn cancel(&mut self, id: &[u8]) -> &mut Self {
        let keys = self.ns.keys_for(id);
        self.pipe(keys.partition).add_command(cancel_cmd(&keys.input, id));
        self
    }

    /// Adds a watermark, written to every partition.
    pub fn watermark(&mut self, ts: i64) -> &mut Self {
        for keys in self.ns.all() {
            self.pipe(keys.partition).add_command(watermark_cmd(&keys.input, ts));
        }
        self
    }

    /// How many input entries the batch writes.
    pub fn len(&self) -> usize {
        self.ops
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.ops == 0
    }

    /// Sends every partition's transaction at once and returns how many
    /// entries were written. Each partition's entries are written all or
    /// none: on an error, the batch keeps the partitions that failed (the
    /// others are done), so sending it again retries only those. (Only a
    /// failure that leaves the outcome unknown, such as a timeout after
    /// the server executed, can make a retry write entries twice.)
    pub async fn send(&mut self, producer: &mut Producer) -> Result<usize, StoreError> {
        let pipes = std::mem::take(&mut self.pipes);
        let sends = pipes.into_iter().map(|(partition, pipe)| {
            let c = producer.conn.clone();
            async move {
                let result = transact(c, &pipe).await;
                (partition, pipe, result)
            }
        });
        let mut first_error = None;
        let mut written = 0;
        let mut moved = false;
        for (partition, pipe, result) in join_all(sends).await {
            match result {
                Ok(()) => written += pipe.cmd_iter().count(),
                Err(e) => {
                    moved |= e.fault() == Fault::Moved || e.to_string().contains("ClusterConnectionNotFound");
                    first_error.get_or_insert(e);
                    self.pipes.insert(partition, pipe);
                }
            }
        }
        self.ops = self.pipes.values().map(|p| p.cmd_iter().count()).sum();
        if moved {
            // A transaction refused because its slot moved does not teach
            // the cluster client where the slot went (and its slot map
            // refresh can fail while a dead node is still listed): a new
            // connection starts from the cluster's current map.
            producer.reconnect().await;
        }
        match first_error {
            None => Ok(written),
            Some(e) => Err(e),
        }
    }
}

/// Sends one partition's transaction and checks every reply.
async fn transact(mut conn: Conn, pipe: &redis::Pipeline) -> Result<(), StoreError> {
    let replies: Vec<redis::Value> = pipe.query_async(&mut conn).await?;
    for reply in replies {
        reply.extract_error()?;
    }
    Ok(())
}

fn add_cmd(stream: &str, id: &[u8], ts: i64, fields: &[(&[u8], &[u8])]) -> redis::Cmd {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream).arg("*").arg("op").arg("add").arg("id").arg(id).arg("ts").arg(ts);
    for (k, v) in fields {
        cmd.arg(*k).arg(*v);
    }
    cmd
}

fn cancel_cmd(stream: &str, id: &[u8]) -> redis::Cmd {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream).arg("*").arg("op").arg("cancel").arg("id").arg(id);
    cmd
}

fn watermark_cmd(stream: &str, ts: i64) -> redis::Cmd {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream).arg("*").arg("op").arg("watermark").arg("ts").arg(ts);
    cmd
}
