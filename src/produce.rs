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
use std::time::{Duration, Instant};

use futures::future::join_all;

use crate::core::Fault;
use crate::store::{meta, Conn, Endpoint, Namespace, StoreError};

/// How often a connected producer looks at the namespace's record again:
/// after a `tidemark repartition`, operations go to the new layout from
/// then on (and are refused while it runs).
pub const LAYOUT_CHECK: Duration = Duration::from_secs(2);

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
    /// The count this producer was configured with, checked against the
    /// record; `None` when it takes the record's.
    configured: Option<u16>,
    /// When the record was last read (`None`: never again, a layout given
    /// to [`Producer::new`]).
    checked: Option<Instant>,
}

impl Producer {
    /// Connects and reads the namespace's layout: `configured` partitions
    /// (checked against the record), or the recorded count, or 1. It reads
    /// the record again every [`LAYOUT_CHECK`], so a long-lived producer
    /// follows a `tidemark repartition`.
    pub async fn connect(redis: &Endpoint, ns: &Namespace, configured: Option<u16>) -> Result<Self, StoreError> {
        let mut conn = redis.connect(redis.options().response_timeout).await?;
        let ns = meta::resolve(&mut conn, ns, configured, false).await??;
        Ok(Producer { conn, redis: Some(redis.clone()), ns, configured, checked: Some(Instant::now()) })
    }

    /// A producer on an open connection for a namespace whose layout is
    /// known (and is not read again: for one-shot use, like the CLI's).
    pub fn new(conn: Conn, ns: Namespace) -> Self {
        Producer { conn, redis: None, ns, configured: None, checked: None }
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

    /// Reads the namespace's record again if [`LAYOUT_CHECK`] has passed.
    /// While a `repartition` runs this fails (with
    /// [`crate::store::LayoutError::Repartitioning`]), and nothing is
    /// written.
    async fn current(&mut self) -> Result<&Namespace, StoreError> {
        if self.checked.is_some_and(|at| at.elapsed() >= LAYOUT_CHECK) {
            self.ns = meta::resolve(&mut self.conn, &self.ns, self.configured, false).await??;
            self.checked = Some(Instant::now());
        }
        Ok(&self.ns)
    }

    /// Schedules element `id` at `ts` with payload `fields`. Returns the
    /// input entry id.
    pub async fn add(&mut self, id: &[u8], ts: i64, fields: &[(&[u8], &[u8])]) -> Result<String, StoreError> {
        let stream = self.current().await?.keys_for(id).input;
        Ok(add_cmd(&stream, id, ts, fields).query_async(&mut self.conn).await?)
    }

    /// Cancels element `id`. Returns the input entry id.
    pub async fn cancel(&mut self, id: &[u8]) -> Result<String, StoreError> {
        let stream = self.current().await?.keys_for(id).input;
        Ok(cancel_cmd(&stream, id).query_async(&mut self.conn).await?)
    }

    /// Raises the watermark to `ts` on every partition, all at once.
    /// Returns each partition's input entry id.
    pub async fn watermark(&mut self, ts: i64) -> Result<Vec<String>, StoreError> {
        let writes = self.current().await?.all().into_iter().map(|keys| {
            let mut c = self.conn.clone();
            async move { watermark_cmd(&keys.input, ts).query_async::<String>(&mut c).await }
        });
        join_all(writes).await.into_iter().map(|r| r.map_err(StoreError::from)).collect()
    }

    /// A batch of operations to send together.
    pub fn batch(&self) -> Batch {
        Batch { ns: self.ns.clone(), parts: BTreeMap::new() }
    }
}

/// One operation of a [`Batch`].
#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Add { id: Vec<u8>, ts: i64, fields: Vec<(Vec<u8>, Vec<u8>)> },
    Cancel { id: Vec<u8> },
    Watermark { ts: i64 },
}

impl Op {
    fn cmd(&self, stream: &str) -> redis::Cmd {
        match self {
            Op::Add { id, ts, fields } => {
                let fields: Vec<(&[u8], &[u8])> = fields.iter().map(|(k, v)| (k.as_slice(), v.as_slice())).collect();
                add_cmd(stream, id, *ts, &fields)
            }
            Op::Cancel { id } => cancel_cmd(stream, id),
            Op::Watermark { ts } => watermark_cmd(stream, *ts),
        }
    }
}

/// Operations gathered to be sent in one transaction per partition (see
/// [`Producer::batch`]). Within a partition they keep their order.
pub struct Batch {
    /// The layout the operations are routed by.
    ns: Namespace,
    /// Each partition's operations.
    parts: BTreeMap<u16, Vec<Op>>,
}

impl Batch {
    /// Adds `add` of element `id`.
    pub fn add(&mut self, id: &[u8], ts: i64, fields: &[(&[u8], &[u8])]) -> &mut Self {
        let fields = fields.iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect();
        self.push(Op::Add { id: id.to_vec(), ts, fields })
    }

    /// Adds `cancel` of element `id`.
    pub fn cancel(&mut self, id: &[u8]) -> &mut Self {
        self.push(Op::Cancel { id: id.to_vec() })
    }

    /// Adds a watermark, written to every partition.
    pub fn watermark(&mut self, ts: i64) -> &mut Self {
        self.push(Op::Watermark { ts })
    }

    fn push(&mut self, op: Op) -> &mut Self {
        match &op {
            Op::Add { id, .. } | Op::Cancel { id } => {
                let p = self.ns.route(id);
                self.parts.entry(p).or_default().push(op);
            }
            Op::Watermark { .. } => {
                for p in 0..self.ns.partitions() {
                    self.parts.entry(p).or_default().push(op.clone());
                }
            }
        }
        self
    }

    /// Routes what is left by `ns` (the layout changed since it was
    /// gathered). Each element's operations stay together and in order;
    /// a watermark left in any partition goes to every one (raising a
    /// watermark again is harmless).
    fn reroute(&mut self, ns: &Namespace) {
        let old = std::mem::take(&mut self.parts);
        self.ns = ns.clone();
        let mut watermarks: Vec<i64> = Vec::new();
        for op in old.into_values().flatten() {
            match op {
                Op::Watermark { ts } => {
                    if !watermarks.contains(&ts) {
                        watermarks.push(ts);
                    }
                }
                op => {
                    self.push(op);
                }
            }
        }
        for ts in watermarks {
            self.push(Op::Watermark { ts });
        }
    }

    /// How many input entries the batch writes.
    pub fn len(&self) -> usize {
        self.parts.values().map(Vec::len).sum()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// Sends every partition's transaction at once and returns how many
    /// entries were written. Each partition's entries are written all or
    /// none: on an error, the batch keeps the partitions that failed (the
    /// others are done), so sending it again retries only those. If the
    /// namespace was repartitioned meanwhile, what is left goes to the new
    /// layout. (Only a failure that leaves the outcome unknown, such as a
    /// timeout after the server executed, can make a retry write entries
    /// twice; `daemon.dedup_window` drops such repeated adds.)
    pub async fn send(&mut self, producer: &mut Producer) -> Result<usize, StoreError> {
        let ns = producer.current().await?;
        if ns.partitions() != self.ns.partitions() {
            let ns = ns.clone();
            self.reroute(&ns);
        }
        let parts = std::mem::take(&mut self.parts);
        let sends = parts.into_iter().map(|(partition, ops)| {
            let c = producer.conn.clone();
            let stream = self.ns.partition(partition).input;
            async move {
                let mut pipe = redis::pipe();
                // MULTI/EXEC: a partition's entries are written all or
                // none. On a cluster, a slot that migrates half-way through
                // a plain pipeline would have it re-sent whole after `ASK`,
                // writing its first entries twice; a transaction is refused
                // whole instead.
                pipe.atomic();
                for op in &ops {
                    pipe.add_command(op.cmd(&stream));
                }
                let result = transact(c, &pipe).await;
                (partition, ops, result)
            }
        });
        let mut first_error = None;
        let mut written = 0;
        let mut moved = false;
        for (partition, ops, result) in join_all(sends).await {
            match result {
                Ok(()) => written += ops.len(),
                Err(e) => {
                    moved |= e.fault() == Fault::Moved || e.to_string().contains("ClusterConnectionNotFound");
                    first_error.get_or_insert(e);
                    self.parts.insert(partition, ops);
                }
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(partitions: u16) -> Batch {
        Batch { ns: Namespace::new("tidemark", "orders", partitions), parts: BTreeMap::new() }
    }

    #[test]
    fn operations_go_to_their_partition_and_watermarks_to_all() {
        let mut b = batch(8);
        b.add(b"order-42", 5, &[(b"k", b"v")]).cancel(b"el-0000007").watermark(9);
        // Test vectors of DESIGN §7: order-42 -> 6, el-0000007 -> 1 (P = 8).
        assert_eq!(
            b.parts[&6][0],
            Op::Add { id: b"order-42".to_vec(), ts: 5, fields: vec![(b"k".to_vec(), b"v".to_vec())] }
        );
        assert_eq!(b.parts[&1][0], Op::Cancel { id: b"el-0000007".to_vec() });
        assert!((0..8).all(|p| b.parts[&p].last() == Some(&Op::Watermark { ts: 9 })));
        assert_eq!(b.len(), 2 + 8);
    }

    #[test]
    fn a_new_layout_reroutes_what_is_left_in_order() {
        let mut b = batch(8);
        b.add(b"order-42", 5, &[]).cancel(b"order-42").add(b"el-0000007", 6, &[]).watermark(9).watermark(10);
        b.reroute(&Namespace::new("tidemark", "orders", 16));
        // order-42 -> 14 with P = 16: its add and cancel stay together, in order.
        assert_eq!(
            b.parts[&14][..2],
            [Op::Add { id: b"order-42".to_vec(), ts: 5, fields: vec![] }, Op::Cancel { id: b"order-42".to_vec() }]
        );
        let wm = |p: u16| b.parts[&p].iter().filter(|o| matches!(o, Op::Watermark { .. })).count();
        assert!((0..16).all(|p| wm(p) == 2), "each watermark once on every partition");
        assert_eq!(b.len(), 3 + 2 * 16);
    }
}
