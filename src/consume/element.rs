//! A released element as handlers see it, parsed from an output-stream
//! entry (`id`, `ts`, then the payload fields). Parsing only, no I/O.

use std::borrow::Cow;

use crate::core::op::{Field, Reason, Rejection};
use crate::core::watermark::{parse_ts, Timestamp};
use crate::core::EntryId;

/// One released element, delivered to a handler.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Element {
    /// The output-stream entry that carries it (`:out`), as acknowledged.
    pub entry_id: EntryId,
    /// The partition whose `:out` carries it (0 when the namespace has one).
    pub partition: u16,
    /// The element id (binary-safe).
    pub id: Vec<u8>,
    /// The element's timestamp.
    pub ts: Timestamp,
    /// The payload fields in their original order, byte-for-byte (a name
    /// may repeat).
    pub fields: Vec<Field>,
    /// Which delivery this is: 1 the first time, then one more each time the
    /// entry is claimed again. Never above the consumer's `max_deliveries`.
    pub delivery: u64,
}

impl Element {
    /// An element as a handler would receive it, e.g. to test a handler
    /// without Redis.
    pub fn new(entry_id: EntryId, id: impl Into<Vec<u8>>, ts: Timestamp, fields: Vec<Field>, delivery: u64) -> Self {
        Element { entry_id, partition: 0, id: id.into(), ts, fields, delivery }
    }

    /// The id as text, with invalid UTF-8 replaced (for logs).
    pub fn id_lossy(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.id)
    }

    /// The value of the first field called `name`, if any.
    pub fn field(&self, name: &[u8]) -> Option<&[u8]> {
        self.fields.iter().find(|(n, _)| n.as_slice() == name).map(|(_, v)| v.as_slice())
    }
}

/// Parses an output entry: `id`, `ts`, then the payload (DESIGN.md §3).
/// An entry in another shape (written to `:out` by something other than
/// tidemark) is rejected with the reason it is dead-lettered under.
pub fn parse(entry_id: EntryId, fields: Vec<Field>, delivery: u64) -> Result<Element, Rejection> {
    let mut it = fields.into_iter();
    let id = match it.next() {
        Some((name, id)) if name == b"id" && !id.is_empty() => id,
        _ => {
            return Err(Rejection {
                reason: Reason::MissingId,
                detail: "the output entry does not start with a non-empty `id` field".into(),
            })
        }
    };
    let ts = match it.next() {
        Some((name, raw)) if name == b"ts" => parse_ts(&raw).ok_or_else(|| Rejection {
            reason: Reason::BadTs,
            detail: format!(
                "ts {:?} is not an integer within ±(2^53-1)",
                String::from_utf8_lossy(&raw[..raw.len().min(64)])
            ),
        })?,
        _ => {
            return Err(Rejection {
                reason: Reason::MissingTs,
                detail: "the output entry has no `ts` field after `id`".into(),
            })
        }
    };
    Ok(Element { entry_id, partition: 0, id, ts, fields: it.collect(), delivery })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(k: &[u8], v: &[u8]) -> Field {
        (k.to_vec(), v.to_vec())
    }

    const E: EntryId = EntryId { ms: 7, seq: 1 };

    #[test]
    fn parses_the_output_format() {
        let el = parse(E, vec![f(b"id", b"a"), f(b"ts", b"-5"), f(b"x", &[0, 255]), f(b"x", b"2")], 3).unwrap();
        assert_eq!(el.entry_id, E);
        assert_eq!(el.id, b"a");
        assert_eq!(el.ts, -5);
        assert_eq!(el.fields, vec![f(b"x", &[0, 255]), f(b"x", b"2")]);
        assert_eq!(el.delivery, 3);
        assert_eq!(el.field(b"x"), Some(&[0u8, 255][..]));
        assert_eq!(el.field(b"y"), None);
    }

    #[test]
    fn rejects_other_shapes() {
        let reason = |fields: Vec<Field>| parse(E, fields, 1).unwrap_err().reason;
        assert_eq!(reason(vec![]), Reason::MissingId);
        assert_eq!(reason(vec![f(b"ts", b"1"), f(b"id", b"a")]), Reason::MissingId);
        assert_eq!(reason(vec![f(b"id", b""), f(b"ts", b"1")]), Reason::MissingId);
        assert_eq!(reason(vec![f(b"id", b"a")]), Reason::MissingTs);
        assert_eq!(reason(vec![f(b"id", b"a"), f(b"x", b"1")]), Reason::MissingTs);
        assert_eq!(reason(vec![f(b"id", b"a"), f(b"ts", b"1.5")]), Reason::BadTs);
    }
}
