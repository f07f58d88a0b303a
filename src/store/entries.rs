//! Decoding stream replies (`XREADGROUP`, `XAUTOCLAIM`, `XRANGE`) into
//! binary-safe entries.

use redis::Value;

use crate::core::op::Field;
use crate::core::EntryId;

use super::StoreError;

/// One stream entry. `fields` is `None` when the entry was deleted from the
/// stream while still pending (Redis then reports its id without fields).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamEntry {
    /// The entry id.
    pub id: EntryId,
    /// Field/value pairs in order, or `None` for a deleted entry.
    pub fields: Option<Vec<Field>>,
}

fn bytes(v: Value) -> Result<Vec<u8>, StoreError> {
    match v {
        Value::BulkString(b) => Ok(b),
        Value::SimpleString(s) => Ok(s.into_bytes()),
        Value::Int(i) => Ok(i.to_string().into_bytes()),
        other => Err(StoreError::Reply(format!("expected a string, got {other:?}"))),
    }
}

fn array(v: Value) -> Result<Vec<Value>, StoreError> {
    match v {
        Value::Array(a) | Value::Set(a) => Ok(a),
        Value::Nil => Ok(Vec::new()),
        other => Err(StoreError::Reply(format!("expected an array, got {other:?}"))),
    }
}

pub(crate) fn entry_id(v: Value) -> Result<EntryId, StoreError> {
    let raw = bytes(v)?;
    let text = String::from_utf8_lossy(&raw);
    text.parse().map_err(|e| StoreError::Reply(format!("{e}")))
}

/// Decodes a list of entries: `[[id, [f, v, ...] | nil], ...]`.
pub fn decode_entries(v: Value) -> Result<Vec<StreamEntry>, StoreError> {
    array(v)?
        .into_iter()
        .map(|item| {
            let mut parts = array(item)?.into_iter();
            let id = entry_id(parts.next().ok_or_else(|| StoreError::Reply("empty entry".into()))?)?;
            let fields = match parts.next() {
                None | Some(Value::Nil) => None,
                Some(flat) => {
                    let flat = array(flat)?;
                    let mut pairs = Vec::with_capacity(flat.len() / 2);
                    let mut it = flat.into_iter();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        pairs.push((bytes(k)?, bytes(v)?));
                    }
                    Some(pairs)
                }
            };
            Ok(StreamEntry { id, fields })
        })
        .collect()
}

/// Decodes an `XREADGROUP` reply for one stream: nil on timeout, else
/// `[[stream, entries]]`.
pub fn decode_read(v: Value) -> Result<Vec<StreamEntry>, StoreError> {
    match v {
        Value::Nil => Ok(Vec::new()),
        Value::Map(streams) => match streams.into_iter().next() {
            Some((_, entries)) => decode_entries(entries),
            None => Ok(Vec::new()),
        },
        other => {
            let mut streams = array(other)?.into_iter();
            match streams.next() {
                None => Ok(Vec::new()),
                Some(stream) => {
                    let mut parts = array(stream)?.into_iter();
                    let _name = parts.next();
                    decode_entries(parts.next().unwrap_or(Value::Nil))
                }
            }
        }
    }
}

/// A stream's name and the entries read from it.
pub type StreamEntries = (Vec<u8>, Vec<StreamEntry>);

/// Decodes an `XREADGROUP` reply for several streams: nil on timeout, else
/// each stream that has entries, with its name.
pub fn decode_read_streams(v: Value) -> Result<Vec<StreamEntries>, StoreError> {
    let streams: Vec<(Value, Value)> = match v {
        Value::Nil => return Ok(Vec::new()),
        Value::Map(streams) => streams,
        other => array(other)?
            .into_iter()
            .map(|stream| {
                let mut parts = array(stream)?.into_iter();
                Ok((parts.next().unwrap_or(Value::Nil), parts.next().unwrap_or(Value::Nil)))
            })
            .collect::<Result<_, StoreError>>()?,
    };
    streams.into_iter().map(|(name, entries)| Ok((bytes(name)?, decode_entries(entries)?))).collect()
}

/// Decodes an `XAUTOCLAIM` reply: `[next_cursor, entries, deleted_ids?]`.
/// Ids of entries deleted from the stream (Redis 7 lists them separately and
/// drops them from the pending list itself) are returned as entries without
/// fields, so callers treat both Redis versions alike.
pub fn decode_autoclaim(v: Value) -> Result<(EntryId, Vec<StreamEntry>), StoreError> {
    let mut parts = array(v)?.into_iter();
    let cursor = entry_id(parts.next().ok_or_else(|| StoreError::Reply("empty XAUTOCLAIM reply".into()))?)?;
    let entries = decode_entries(parts.next().unwrap_or(Value::Nil))?;
    Ok((cursor, entries))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bs(s: &[u8]) -> Value {
        Value::BulkString(s.to_vec())
    }

    #[test]
    fn decodes_read_reply_with_deleted_entry() {
        let reply = Value::Array(vec![Value::Array(vec![
            bs(b"tidemark:{default}:in"),
            Value::Array(vec![
                Value::Array(vec![bs(b"1-0"), Value::Array(vec![bs(b"op"), bs(b"add"), bs(b"k"), bs(&[0, 255])])]),
                Value::Array(vec![bs(b"2-5"), Value::Nil]),
            ]),
        ])]);
        let entries = decode_read(reply).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].id, EntryId { ms: 1, seq: 0 });
        assert_eq!(
            entries[0].fields.as_deref(),
            Some(&[(b"op".to_vec(), b"add".to_vec()), (b"k".to_vec(), vec![0, 255])][..])
        );
        assert_eq!(entries[1].fields, None);
        assert!(decode_read(Value::Nil).unwrap().is_empty());
    }

    #[test]
    fn decodes_a_read_of_several_streams() {
        let one = |id: &[u8]| Value::Array(vec![Value::Array(vec![bs(id), Value::Array(vec![bs(b"k"), bs(b"v")])])]);
        let reply =
            Value::Array(vec![Value::Array(vec![bs(b"a"), one(b"1-0")]), Value::Array(vec![bs(b"b"), one(b"2-0")])]);
        let streams = decode_read_streams(reply).unwrap();
        assert_eq!(streams.len(), 2);
        assert_eq!(streams[1].0, b"b");
        assert_eq!(streams[1].1[0].id, EntryId { ms: 2, seq: 0 });
        assert!(decode_read_streams(Value::Nil).unwrap().is_empty());
    }
}
