//! A consumer's scripts on the output stream: `claim_out.lua` (claims,
//! dead-lettering entries delivered too often), `dead_out.lua` (dead
//! letters of failed handlers) and `touch_out.lua` (keeping entries in work
//! from being claimed).

use std::time::Duration;

use redis::Value;

use super::Scripts;
use crate::core::op::{Field, Reason};
use crate::core::EntryId;
use crate::store::{entries, Conn, Keys, StoreError};

/// Most ids per touch or dead-letter call (Lua's stack bounds `unpack`).
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

/// An output entry condemned to `:dead` (by a consumer: a handler that
/// failed on its last allowed delivery, or an entry that is no element).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condemned {
    /// The output entry id.
    pub id: EntryId,
    /// Why.
    pub reason: Reason,
    /// A human sentence (the handler's last error, for instance).
    pub detail: String,
}

impl Scripts {
    /// Claims up to `count` entries idle at least `min_idle` for `me`, and
    /// dead-letters (atomically, with their acknowledgement) those already
    /// delivered `max_deliveries` times.
    #[allow(clippy::too_many_arguments)]
    pub async fn claim(
        &self,
        conn: &mut Conn,
        keys: &Keys,
        group: &str,
        me: &str,
        from: ClaimFrom<'_>,
        min_idle: Duration,
        count: usize,
        max_deliveries: u64,
    ) -> Result<ClaimOutcome, StoreError> {
        let mut inv = self.sources.claim_out.prepare_invoke();
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
        conn: &mut Conn,
        keys: &Keys,
        group: &str,
        me: &str,
        letters: &[Condemned],
    ) -> Result<Vec<EntryId>, StoreError> {
        let mut moved = Vec::with_capacity(letters.len());
        for chunk in letters.chunks(IDS_PER_CALL) {
            let mut inv = self.sources.dead_out.prepare_invoke();
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
        conn: &mut Conn,
        keys: &Keys,
        group: &str,
        me: &str,
        ids: &[EntryId],
    ) -> Result<Vec<EntryId>, StoreError> {
        let mut lost = Vec::new();
        for chunk in ids.chunks(IDS_PER_CALL) {
            let mut inv = self.sources.touch_out.prepare_invoke();
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

    /// Removes `consumer` from `group` of `stream` unless it has entries
    /// pending (checked in the same call). Whether it was removed.
    pub async fn forget_consumer(
        &self,
        conn: &mut Conn,
        stream: &str,
        group: &str,
        consumer: &str,
    ) -> Result<bool, StoreError> {
        let removed: i64 = self.sources.forget_consumer.key(stream).arg(group).arg(consumer).invoke_async(conn).await?;
        Ok(removed == 1)
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
