//! Liveness leases: a key per live daemon or consumer (`SET … PX ttl`),
//! refreshed every third of its lifetime. A peer whose lease key is gone is
//! dead, and its pending entries can be claimed at once. Plain keys, so no
//! `notify-keyspace-events` or `CONFIG SET` is needed (managed Redis).

use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{Conn, Endpoint, Reconnect, StoreError};
use crate::core::RetryPolicy;

/// Sets `key` to `holder` for `ttl`.
pub async fn refresh(conn: &mut Conn, key: &str, holder: &str, ttl: Duration) -> Result<(), StoreError> {
    let () = redis::cmd("SET").arg(key).arg(holder).arg("PX").arg(ttl.as_millis() as u64).query_async(conn).await?;
    Ok(())
}

/// Whether each lease key exists (one round trip).
pub async fn alive(conn: &mut Conn, keys: &[String]) -> Result<Vec<bool>, StoreError> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for k in keys {
        pipe.exists(k);
    }
    Ok(pipe.query_async(conn).await?)
}

/// Keeps `key` alive until `stop` is cancelled, then deletes it so peers see
/// the holder gone at once. Survives Redis outages: it reconnects on its own
/// and logs an outage once.
pub fn keep(
    redis: Endpoint,
    retry: RetryPolicy,
    key: String,
    holder: String,
    ttl: Duration,
    stop: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let period = ttl / 3;
        let mut conn: Option<Conn> = None;
        let mut reconnect = Reconnect::side_task("lease", retry);
        loop {
            let result = async {
                if conn.is_none() {
                    conn = Some(redis.connect(redis.options().response_timeout.min(ttl)).await?);
                }
                let c = conn.as_mut().expect("connected above");
                refresh(c, &key, &holder, ttl).await
            }
            .await;
            if let Err(e) = result {
                // Peers may take over our work meanwhile; the pace is the
                // lease's own, whatever the failure.
                reconnect.down(&e);
                conn = None;
            } else if reconnect.outage().is_some() {
                reconnect.up();
            }
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = stop.cancelled() => break,
            }
        }
        if let Some(c) = conn.as_mut() {
            let _: Result<(), _> = redis::cmd("DEL").arg(&key).query_async(c).await;
        }
    })
}

/// A consumer of a group as `XINFO CONSUMERS` reports it, with its lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Consumer name.
    pub name: String,
    /// Entries delivered to it and not acknowledged.
    pub pending: u64,
    /// Milliseconds since its last attempted interaction (a blocking read
    /// counts, so a live reader's idle time stays below its block time).
    pub idle_ms: u64,
    /// Whether its lease key exists.
    pub leased: bool,
}

/// Lists the consumers of `group` on `stream` with their lease state.
/// `stream_tag` is `"in"` or `"out"` (see [`super::Keys::lease`]).
pub async fn peers(
    conn: &mut Conn,
    keys: &super::Keys,
    stream: &str,
    stream_tag: &str,
    group: &str,
) -> Result<Vec<Peer>, StoreError> {
    let reply: redis::Value = match redis::cmd("XINFO").arg("CONSUMERS").arg(stream).arg(group).query_async(conn).await
    {
        Ok(v) => v,
        Err(e) if e.code() == Some("ERR") && e.to_string().contains("no such key") => return Ok(Vec::new()),
        Err(e) if e.code() == Some("NOGROUP") => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let redis::Value::Array(items) = reply else { return Ok(Vec::new()) };
    let mut peers: Vec<Peer> = items
        .iter()
        .filter_map(|item| {
            let pairs: Vec<(&redis::Value, &redis::Value)> = match item {
                redis::Value::Array(flat) => flat.chunks(2).filter_map(|c| Some((c.first()?, c.get(1)?))).collect(),
                redis::Value::Map(m) => m.iter().map(|(k, v)| (k, v)).collect(),
                _ => return None,
            };
            let get = |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| redis::from_redis_value_ref::<String>(k).ok().as_deref() == Some(name))
                    .map(|(_, v)| *v)
            };
            Some(Peer {
                name: redis::from_redis_value_ref::<String>(get("name")?).ok()?,
                pending: get("pending").and_then(|v| redis::from_redis_value_ref::<u64>(v).ok()).unwrap_or(0),
                idle_ms: get("idle").and_then(|v| redis::from_redis_value_ref::<u64>(v).ok()).unwrap_or(0),
                leased: false,
            })
        })
        .collect();
    let lease_keys: Vec<String> = peers.iter().map(|p| keys.lease(stream_tag, group, &p.name)).collect();
    for (peer, leased) in peers.iter_mut().zip(alive(conn, &lease_keys).await?) {
        peer.leased = leased;
    }
    Ok(peers)
}

/// Removes from `group` every consumer other than `me` that has no lease,
/// nothing pending, and has been idle longer than `grace`, so pod churn does
/// not grow `XINFO CONSUMERS` forever. Returns the names removed.
pub async fn remove_dead_consumers(
    conn: &mut Conn,
    stream: &str,
    group: &str,
    me: &str,
    peers: &[Peer],
    grace: Duration,
) -> Result<Vec<String>, StoreError> {
    let mut removed = Vec::new();
    for p in peers {
        if p.name != me && !p.leased && p.pending == 0 && p.idle_ms > grace.as_millis() as u64 {
            // DELCONSUMER drops the consumer's pending entries too: the
            // script checks there are none in the same call (a consumer that
            // came back since `peers` was read may have read some). One
            // that only reads again later is recreated by that read.
            if super::Scripts::new().forget_consumer(conn, stream, group, &p.name).await? {
                removed.push(p.name.clone());
            }
        }
    }
    Ok(removed)
}

/// Claims up to `count` pending entries of `peer` (a consumer whose lease
/// expired) for `me`, skipping entries idle less than `min_idle` (so two
/// live consumers claiming at once do not take the same entry twice).
/// Returns the claimed entries. Like any delivery, the claim increments
/// each entry's delivery count (no `JUSTID`), which `max_deliveries` needs.
pub async fn claim_from_peer(
    conn: &mut Conn,
    stream: &str,
    group: &str,
    peer: &str,
    me: &str,
    min_idle: Duration,
    count: usize,
) -> Result<Vec<super::StreamEntry>, StoreError> {
    let pending: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .arg("IDLE")
        .arg(min_idle.as_millis() as u64)
        .arg("-")
        .arg("+")
        .arg(count)
        .arg(peer)
        .query_async(conn)
        .await?;
    if pending.is_empty() {
        return Ok(Vec::new());
    }
    let mut cmd = redis::cmd("XCLAIM");
    cmd.arg(stream).arg(group).arg(me).arg(min_idle.as_millis() as u64);
    for (id, ..) in &pending {
        cmd.arg(id);
    }
    super::entries::decode_entries(cmd.query_async(conn).await?)
}
