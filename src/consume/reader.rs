//! A consumer's reads of its group on every partition's `:out`, fair
//! (every read asks each partition for the same share, so a busy partition
//! cannot starve the others) and with a bounded number of connections:
//!
//! - one partition: a blocking read on a dedicated connection to the node
//!   that serves it (the fast decoder);
//! - several partitions on one server: one blocking `XREADGROUP` over all
//!   of their streams, on one dedicated connection;
//! - several partitions on a cluster (whose streams live in different
//!   slots, so no one command can read them together): a non-blocking read
//!   of every partition at once on the shared cluster connection, and a
//!   short pause, growing up to `block / 10`, while all are empty.

use std::time::Duration;

use super::At;
use crate::store::entries::{decode_read, decode_read_streams};
use crate::store::reader::StreamReader;
use crate::store::{Conn, Endpoint, Keys, StoreError, StreamEntry};

/// The first pause of a polling reader after an empty round.
const FIRST_PAUSE: Duration = Duration::from_millis(1);

/// Reads a group on every partition (see the module docs).
pub(super) enum OutputReader {
    /// One partition.
    One {
        /// A dedicated connection to its node.
        reader: StreamReader,
        /// Its `:out`.
        stream: String,
        /// Which partition.
        partition: u16,
    },
    /// Several partitions on one server.
    Many {
        /// A dedicated connection.
        conn: Conn,
        /// Each partition's `:out`.
        streams: Vec<String>,
    },
    /// Several partitions on a cluster.
    Poll {
        /// The shared cluster connection.
        conn: Conn,
        /// Each partition's `:out`.
        streams: Vec<String>,
        /// The pause after the last empty round (zero after a full one).
        pause: Duration,
    },
}

impl OutputReader {
    /// Opens the reader for `partitions` (one or more keys). Replies time
    /// out after `response` plus the block time.
    pub(super) async fn open(
        redis: &Endpoint,
        shared: &Conn,
        partitions: &[Keys],
        response: Duration,
        block: Duration,
    ) -> Result<Self, StoreError> {
        let streams: Vec<String> = partitions.iter().map(|k| k.out.clone()).collect();
        if let [keys] = partitions {
            let reader = redis.reader(&keys.out, response + block).await?;
            return Ok(OutputReader::One { reader, stream: keys.out.clone(), partition: keys.partition });
        }
        if shared.is_cluster() {
            return Ok(OutputReader::Poll { conn: shared.clone(), streams, pause: Duration::ZERO });
        }
        let conn = redis.connect(response + block).await?;
        Ok(OutputReader::Many { conn, streams })
    }

    /// New entries (`>`) for `me`: at most `count` in all (at least one per
    /// partition that has some), waiting up to `block` when none has any.
    pub(super) async fn read(
        &mut self,
        group: &str,
        me: &str,
        count: usize,
        block: Duration,
    ) -> Result<Vec<(At, StreamEntry)>, StoreError> {
        match self {
            OutputReader::One { reader, stream, partition } => {
                let entries = reader.read_group(stream, group, me, count, block).await?;
                Ok(entries.into_iter().map(|e| (At { partition: *partition, id: e.id }, e)).collect())
            }
            OutputReader::Many { conn, streams } => {
                let share = count.div_ceil(streams.len()).max(1);
                let mut cmd = xreadgroup(group, me, share);
                cmd.arg("BLOCK").arg(block.as_millis().max(1) as u64).arg("STREAMS");
                for s in streams.iter() {
                    cmd.arg(s);
                }
                for _ in streams.iter() {
                    cmd.arg(">");
                }
                let reply: redis::Value = cmd.query_async(conn).await?;
                let mut out = Vec::new();
                for (name, entries) in decode_read_streams(reply)? {
                    let Some(p) = streams.iter().position(|s| s.as_bytes() == name.as_slice()) else { continue };
                    out.extend(entries.into_iter().map(|e| (At { partition: p as u16, id: e.id }, e)));
                }
                Ok(out)
            }
            OutputReader::Poll { conn, streams, pause } => {
                if !pause.is_zero() {
                    tokio::time::sleep(*pause).await;
                }
                let share = count.div_ceil(streams.len()).max(1);
                let reads = streams.iter().enumerate().map(|(p, stream)| {
                    let mut c = conn.clone();
                    let mut cmd = xreadgroup(group, me, share);
                    cmd.arg("STREAMS").arg(stream).arg(">");
                    async move {
                        let reply: redis::Value = cmd.query_async(&mut c).await?;
                        let entries = decode_read(reply)?;
                        Ok::<_, StoreError>(entries.into_iter().map(move |e| (At { partition: p as u16, id: e.id }, e)))
                    }
                });
                let mut out = Vec::new();
                for r in futures::future::join_all(reads).await {
                    out.extend(r?);
                }
                *pause = if out.is_empty() {
                    (*pause * 2).clamp(FIRST_PAUSE, (block / 10).max(FIRST_PAUSE))
                } else {
                    Duration::ZERO
                };
                Ok(out)
            }
        }
    }
}

fn xreadgroup(group: &str, me: &str, count: usize) -> redis::Cmd {
    let mut cmd = redis::cmd("XREADGROUP");
    cmd.arg("GROUP").arg(group).arg(me).arg("COUNT").arg(count);
    cmd
}
