//! A consumer's Redis I/O on the output stream: reading its group, batched
//! acknowledgements, and the Lua scripts that claim, dead-letter and keep
//! entries (lua/claim_out.lua, dead_out.lua, touch_out.lua, each prefixed
//! with lua/prelude.lua like every tidemark script).

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{Script, Value};

use crate::core::op::{Field, Reason};
use crate::core::EntryId;
use crate::store::{entries, Keys, StoreError};

const PRELUDE: &str = include_str!("../../lua/prelude.lua");
const CLAIM: &str = include_str!("../../lua/claim_out.lua");
const DEAD: &str = include_str!("../../lua/dead_out.lua");
const TOUCH: &str = include_str!("../../lua/touch_out.lua");

/// Most ids per `XACK` and per touch call (Lua's stack bounds `unpack`).
const IDS_PER_CALL: usize = 1000;

/// Which pending entries [`Scripts::claim`] looks at.
#[derive(Debug, Clone, Copy)]
pub enum ClaimFrom<'a> {
    /// Any consumer's entries idle long enough, scanning from this cursor.
    Idle(EntryId),
    /// The entries of this consumer (one whose lease expired, or ourselves
    /// at start-up).
    Peer(&'a str),
}

/// An entry now pending at this consumer, with the delivery it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    /// The output entry id.
    pub id: EntryId,
    /// This delivery's number (1-based).
    pub delivery: u64,
    /// The entry's fields.
    pub fields: Vec<Field>,
}

/// What one claim call did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimOutcome {
    /// Where the next idle scan goes on (`0-0`: the scan is complete).
    pub cursor: EntryId,
    /// Entries delivered to us now.
    pub claimed: Vec<Claimed>,
    /// Entries moved to `:dead`: delivered `max_deliveries` times already.
    pub dead: Vec<EntryId>,
}

/// An entry to move to `:dead`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The output entry id.
    pub id: EntryId,
    /// Why.
    pub reason: Reason,
    /// A human sentence (the handler's last error, for instance).
    pub detail: String,
}

/// The consumer's scripts, hashed once; `EVALSHA` reloads them on `NOSCRIPT`.
#[derive(Clone)]
pub struct Scripts {
    claim: Script,
    dead: Script,
    touch: Script,
}

impl Scripts {
    /// Prepares the scripts (nothing is sent yet).
    pub fn new() -> Self {
        let script = |body: &str| Script::new(&format!("{PRELUDE}\n{body}"));
        Scripts { claim: script(CLAIM), dead: script(DEAD), touch: script(TOUCH) }
    }

    /// Loads the scripts into the server's script cache.
    pub async fn load(&self, conn: &mut MultiplexedConnection) -> Result<(), StoreError> {
        for script in [&self.claim, &self.dead, &self.touch] {
            let _: String = script.prepare_invoke().load_async(conn).await?;
        }
        Ok(())
    }

    /// Claims up to `count` entries idle at least `min_idle` for `me`, and
    /// dead-letters (atomically, with their acknowledgement) those already
    /// delivered `max_deliveries` times.
    #[allow(clippy::too_many_arguments)]
    pub async fn claim(
        &self,
        conn: &mut MultiplexedConnection,
        keys: &Keys,
        group: &str,
        me: &str,
        from: ClaimFrom<'_>,
        min_idle: Duration,
        count: usize,
        max_deliveries: u64,
    ) -> Result<ClaimOutcome, StoreError> {
        let mut inv = self.claim.prepare_invoke();
        inv.key(&keys.out)
            .key(&keys.dead)
            .arg(group)
            .arg(me)
            .arg(min_idle.as_millis() as u64)
            .arg(count.max(1))
            .arg(max_deliveries);
        match from {
            ClaimFrom::Idle(cursor) => inv.arg("idle").arg(cursor.to_string()),
            ClaimFrom::Peer(peer) => inv.arg("peer").arg(peer),
        };
        decode_claim(inv.invoke_async(conn).await?)
    }

    /// Moves `letters` to `:dead` and acknowledges them, each only if it is
    /// still pending at `me`. Returns the ids moved.
    pub async fn dead_letter(
        &self,
        conn: &mut MultiplexedConnection,
        keys: &Keys,
        group: &str,
        me: &str,
        letters: &[DeadLetter],
    ) -> Result<Vec<EntryId>, StoreError> {
        let mut moved = Vec::with_capacity(letters.len());
        for chunk in letters.chunks(IDS_PER_CALL) {
            let mut inv = self.dead.prepare_invoke();
            inv.key(&keys.out).key(&keys.dead).arg(group).arg(me);
            for l in chunk {
                inv.arg(l.id.to_string()).arg(l.reason.code()).arg(&l.detail);
            }
            let ids: Vec<Value> = inv.invoke_async(conn).await?;
            for id in ids {
                moved.push(entries::entry_id(id)?);
            }
        }
        Ok(moved)
    }

    /// Resets the idle time of `ids` still pending at `me`. Returns the ids
    /// that are not (claimed by another consumer, or acknowledged).
    pub async fn touch(
        &self,
        conn: &mut MultiplexedConnection,
        keys: &Keys,
        group: &str,
        me: &str,
        ids: &[EntryId],
    ) -> Result<Vec<EntryId>, StoreError> {
        let mut lost = Vec::new();
        for chunk in ids.chunks(IDS_PER_CALL) {
            let mut inv = self.touch.prepare_invoke();
            inv.key(&keys.out).arg(group).arg(me);
            for id in chunk {
                inv.arg(id.to_string());
            }
            let ids: Vec<Value> = inv.invoke_async(conn).await?;
            for id in ids {
                lost.push(entries::entry_id(id)?);
            }
        }
        Ok(lost)
    }
}

impl Default for Scripts {
    fn default() -> Self {
        Self::new()
    }
}

fn decode_claim(v: Value) -> Result<ClaimOutcome, StoreError> {
    let bad = |what: &str| StoreError::Reply(format!("claim_out.lua: {what}"));
    let Value::Array(parts) = v else { return Err(bad("not an array")) };
    let [cursor, claimed, dead]: [Value; 3] = parts.try_into().map_err(|_| bad("expected three parts"))?;
    let cursor = entries::entry_id(cursor)?;
    let claimed = match claimed {
        Value::Array(flat) => flat,
        Value::Nil => Vec::new(),
        _ => return Err(bad("claimed is not an array")),
    };
    let mut out = Vec::with_capacity(claimed.len() / 3);
    let mut it = claimed.into_iter();
    while let (Some(id), Some(delivery), Some(fields)) = (it.next(), it.next(), it.next()) {
        let id = entries::entry_id(id)?;
        let delivery = match delivery {
            Value::Int(n) => u64::try_from(n).map_err(|_| bad("negative delivery count"))?,
            _ => return Err(bad("delivery is not an integer")),
        };
        out.push(Claimed { id, delivery, fields: decode_fields(fields)? });
    }
    let dead = match dead {
        Value::Array(ids) => ids.into_iter().map(entries::entry_id).collect::<Result<_, _>>()?,
        Value::Nil => Vec::new(),
        _ => return Err(bad("dead is not an array")),
    };
    Ok(ClaimOutcome { cursor, claimed: out, dead })
}

/// A flat `[f1, v1, f2, v2, ...]` list.
fn decode_fields(v: Value) -> Result<Vec<Field>, StoreError> {
    let bytes = |v: Value| match v {
        Value::BulkString(b) => Ok(b),
        other => Err(StoreError::Reply(format!("claim_out.lua: expected a string, got {other:?}"))),
    };
    let flat = match v {
        Value::Array(flat) => flat,
        Value::Nil => return Ok(Vec::new()),
        other => return Err(StoreError::Reply(format!("claim_out.lua: expected fields, got {other:?}"))),
    };
    let mut pairs = Vec::with_capacity(flat.len() / 2);
    let mut it = flat.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        pairs.push((bytes(k)?, bytes(v)?));
    }
    Ok(pairs)
}

/// Acknowledges `ids` in `group`, in as few calls as possible.
pub async fn ack(
    conn: &mut MultiplexedConnection,
    keys: &Keys,
    group: &str,
    ids: &[EntryId],
) -> Result<(), StoreError> {
    for chunk in ids.chunks(IDS_PER_CALL) {
        let mut cmd = redis::cmd("XACK");
        cmd.arg(&keys.out).arg(group);
        for id in chunk {
            cmd.arg(id.to_string());
        }
        let _: u64 = cmd.query_async(conn).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bs(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn decodes_claim_replies() {
        let reply = Value::Array(vec![
            bs("5-1"),
            Value::Array(vec![
                bs("3-0"),
                Value::Int(2),
                Value::Array(vec![bs("id"), bs("a"), bs("ts"), bs("1")]),
                bs("4-0"),
                Value::Int(5),
                Value::Array(vec![]),
            ]),
            Value::Array(vec![bs("2-0")]),
        ]);
        let o = decode_claim(reply).unwrap();
        assert_eq!(o.cursor, EntryId { ms: 5, seq: 1 });
        assert_eq!(o.claimed.len(), 2);
        assert_eq!(o.claimed[0].id, EntryId { ms: 3, seq: 0 });
        assert_eq!(o.claimed[0].delivery, 2);
        assert_eq!(o.claimed[0].fields, vec![(b"id".to_vec(), b"a".to_vec()), (b"ts".to_vec(), b"1".to_vec())]);
        assert_eq!(o.claimed[1].fields, vec![]);
        assert_eq!(o.dead, vec![EntryId { ms: 2, seq: 0 }]);
        assert!(decode_claim(Value::Array(vec![bs("0-0")])).is_err());
    }
}
