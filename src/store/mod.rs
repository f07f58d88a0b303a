//! All Redis I/O: connections, key names, scripts, stream reads and writes.

pub mod backlog;
pub mod batch;
pub mod endpoint;
pub mod entries;
pub mod error;
#[cfg(test)]
mod hostile;
pub mod keys;
pub mod lease;
pub mod memory;
pub mod meta;
pub mod reader;
pub mod reconnect;
pub mod retention;
pub mod scripts;
pub mod sentinel;
pub mod serving;
pub mod status;

use std::time::Duration;

use redis::Value;

pub use batch::{prepare, Prepared};
pub use endpoint::{Conn, Endpoint, Mode};
pub use entries::StreamEntry;
pub use error::StoreError;
pub use keys::Namespace;
pub use keys::{Keys, INPUT_GROUP};
pub use meta::LayoutError;
pub use reconnect::Reconnect;
pub use scripts::{ApplyOutcome, Scripts};

use crate::core::EntryId;

/// The oldest Redis that tidemark supports: `XAUTOCLAIM` and
/// `ZRANGE … BYSCORE` arrived in 6.2.
pub const MIN_REDIS: (u32, u32) = (6, 2);

/// How to reach Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectOptions {
    /// Time allowed to establish a connection.
    pub connect_timeout: Duration,
    /// Time allowed for any reply (blocking reads add their block time).
    pub response_timeout: Duration,
}

/// Reads the server version from `INFO server` and refuses anything older
/// than [`MIN_REDIS`]. Returns the version text.
pub async fn check_version(conn: &mut Conn, key: &str) -> Result<String, StoreError> {
    let info: String = conn.query_at(key, redis::cmd("INFO").arg("server")).await?;
    let version = info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .map(|v| v.trim().to_owned())
        .ok_or_else(|| StoreError::Reply("INFO server has no redis_version".into()))?;
    if parse_version(&version) < MIN_REDIS {
        return Err(StoreError::TooOld(version));
    }
    Ok(version)
}

/// Fails with `READONLY` unless the server that serves `key` is a master
/// (`INFO replication`, which the least-privilege ACL allows). For users
/// that only read, where nothing else would tell them that their server
/// became a replica.
pub async fn ensure_master(conn: &mut Conn, key: &str) -> Result<(), StoreError> {
    let info: String = conn.query_at(key, redis::cmd("INFO").arg("replication")).await?;
    match info.lines().find_map(|l| l.strip_prefix("role:")).map(str::trim) {
        Some("master") | None => Ok(()),
        Some(_) => Err(StoreError::replica()),
    }
}

fn parse_version(v: &str) -> (u32, u32) {
    let mut parts = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// Creates consumer group `group` on `stream` at id `0` (so entries written
/// before the group existed are delivered too), creating the stream if
/// needed. An existing group is left as it is.
pub async fn ensure_group(conn: &mut Conn, stream: &str, group: &str) -> Result<bool, StoreError> {
    ensure_group_from(conn, stream, group, GroupStart::Start).await
}

/// Where a consumer group that does not exist yet starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum GroupStart {
    /// At id `0`: every entry still in the stream is delivered.
    #[default]
    Start,
    /// At `$`: only entries added after the group was created.
    New,
}

impl GroupStart {
    /// The id `XGROUP CREATE` takes.
    pub fn id(self) -> &'static str {
        match self {
            GroupStart::Start => "0",
            GroupStart::New => "$",
        }
    }

    /// `start` or `new` (the configuration's words).
    pub fn parse(word: &str) -> Option<GroupStart> {
        match word {
            "start" => Some(GroupStart::Start),
            "new" => Some(GroupStart::New),
            _ => None,
        }
    }
}

/// [`ensure_group`] for a group that, when created, starts at `from`.
/// Returns whether it was created (an existing group is left as it is).
pub async fn ensure_group_from(
    conn: &mut Conn,
    stream: &str,
    group: &str,
    from: GroupStart,
) -> Result<bool, StoreError> {
    let created: Result<(), redis::RedisError> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(group)
        .arg(from.id())
        .arg("MKSTREAM")
        .query_async(conn)
        .await;
    match created {
        Ok(()) => Ok(true),
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// `XREADGROUP` of new input entries (`>`) in the input group, blocking up
/// to `block`.
pub async fn read_new(
    conn: &mut Conn,
    keys: &Keys,
    consumer: &str,
    count: usize,
    block: Duration,
) -> Result<Vec<StreamEntry>, StoreError> {
    read_group(conn, &keys.input, INPUT_GROUP, consumer, count, block).await
}

/// `XREADGROUP` of new entries (`>`) of `stream` in `group`, blocking up to
/// `block`.
pub async fn read_group(
    conn: &mut Conn,
    stream: &str,
    group: &str,
    consumer: &str,
    count: usize,
    block: Duration,
) -> Result<Vec<StreamEntry>, StoreError> {
    let reply: Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(group)
        .arg(consumer)
        .arg("COUNT")
        .arg(count.max(1))
        .arg("BLOCK")
        .arg(block.as_millis().max(1) as u64)
        .arg("STREAMS")
        .arg(stream)
        .arg(">")
        .query_async(conn)
        .await?;
    entries::decode_read(reply)
}

/// This consumer's own pending entries with ids above `after`.
pub async fn read_own_pending(
    conn: &mut Conn,
    keys: &Keys,
    consumer: &str,
    after: EntryId,
    count: usize,
) -> Result<Vec<StreamEntry>, StoreError> {
    let reply: Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(INPUT_GROUP)
        .arg(consumer)
        .arg("COUNT")
        .arg(count)
        .arg("STREAMS")
        .arg(&keys.input)
        .arg(after.to_string())
        .query_async(conn)
        .await?;
    entries::decode_read(reply)
}

/// `XAUTOCLAIM` of input entries idle for at least `min_idle`, from
/// `cursor`. Returns the next cursor (`0-0` when the scan is complete).
pub async fn autoclaim(
    conn: &mut Conn,
    keys: &Keys,
    consumer: &str,
    min_idle: Duration,
    cursor: EntryId,
    count: usize,
) -> Result<(EntryId, Vec<StreamEntry>), StoreError> {
    let reply: Value = redis::cmd("XAUTOCLAIM")
        .arg(&keys.input)
        .arg(INPUT_GROUP)
        .arg(consumer)
        .arg(min_idle.as_millis() as u64)
        .arg(cursor.to_string())
        .arg("COUNT")
        .arg(count)
        .query_async(conn)
        .await?;
    entries::decode_autoclaim(reply)
}

/// Acknowledges output entries `ids` in `group`, in as few calls as
/// possible (at most 1000 ids each).
pub async fn ack_output(conn: &mut Conn, keys: &Keys, group: &str, ids: &[EntryId]) -> Result<(), StoreError> {
    for chunk in ids.chunks(1000) {
        let mut cmd = redis::cmd("XACK");
        cmd.arg(&keys.out).arg(group);
        for id in chunk {
            cmd.arg(id.to_string());
        }
        let _: u64 = cmd.query_async(conn).await?;
    }
    Ok(())
}

/// Appends one entry to a stream and returns its id.
pub async fn xadd(conn: &mut Conn, stream: &str, fields: &[(&[u8], &[u8])]) -> Result<String, StoreError> {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream).arg("*");
    for (k, v) in fields {
        cmd.arg(*k).arg(*v);
    }
    Ok(cmd.query_async(conn).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_parsing() {
        assert_eq!(parse_version("7.0.15"), (7, 0));
        assert_eq!(parse_version("6.2.0"), (6, 2));
        assert!(parse_version("6.0.16") < MIN_REDIS);
        assert!(parse_version("255.255.255") >= MIN_REDIS);
    }
}
