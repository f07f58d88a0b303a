//! Turning input entries into the argument groups of `apply.lua`. Parsing
//! happens here, on the client, so the script only applies.

use crate::core::op::{self, Field, Limits, Op, HARD_MAX_PAYLOAD_FIELDS};
use crate::core::{codec, EntryId};

use super::StreamEntry;

/// What an input entry does, for counting and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `add`
    Add,
    /// `cancel`
    Cancel,
    /// `watermark`
    Watermark,
    /// malformed: goes to `:dead`
    Dead(op::Reason),
    /// deleted from the stream while pending: only acknowledged
    Deleted,
}

/// An input entry ready to be sent to `apply.lua`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// The input entry id.
    pub id: EntryId,
    /// What the entry does.
    pub kind: Kind,
    /// The script arguments after the entry id (see lua/apply.lua).
    pub args: Vec<Vec<u8>>,
}

/// Parses an entry and encodes it for the apply script. Never fails:
/// malformed entries become dead letters.
pub fn prepare(entry: &StreamEntry, limits: &Limits) -> Prepared {
    let id = entry.id;
    let Some(fields) = &entry.fields else {
        return Prepared { id, kind: Kind::Deleted, args: vec![b"X".to_vec()] };
    };
    match op::parse(fields, limits) {
        Ok(Op::Add { id: elem, ts, payload }) => {
            let ts = ts.to_string().into_bytes();
            let mut blob = Vec::with_capacity(payload.iter().map(|(k, v)| k.len() + v.len() + 10).sum::<usize>());
            for (k, v) in &payload {
                codec::push_str(&mut blob, k);
                codec::push_str(&mut blob, v);
            }
            Prepared { id, kind: Kind::Add, args: vec![b"A".to_vec(), elem.to_vec(), ts, blob] }
        }
        Ok(Op::Cancel { id: elem }) => Prepared { id, kind: Kind::Cancel, args: vec![b"C".to_vec(), elem.to_vec()] },
        Ok(Op::Watermark { ts }) => {
            Prepared { id, kind: Kind::Watermark, args: vec![b"W".to_vec(), ts.to_string().into_bytes()] }
        }
        Err(rejection) => {
            let (kept, detail) = truncate_fields(fields, rejection.detail);
            let blob = codec::encode(kept.iter().flat_map(|(k, v)| [k.as_slice(), v.as_slice()]));
            Prepared {
                id,
                kind: Kind::Dead(rejection.reason),
                args: vec![b"D".to_vec(), rejection.reason.code().as_bytes().to_vec(), detail.into_bytes(), blob],
            }
        }
    }
}

/// A dead letter carries the original fields verbatim, but Lua can pass at
/// most [`HARD_MAX_PAYLOAD_FIELDS`] pairs to one `XADD`; beyond that the
/// detail says how many were dropped.
fn truncate_fields(fields: &[Field], detail: String) -> (&[Field], String) {
    if fields.len() <= HARD_MAX_PAYLOAD_FIELDS {
        return (fields, detail);
    }
    let dropped = fields.len() - HARD_MAX_PAYLOAD_FIELDS;
    (
        &fields[..HARD_MAX_PAYLOAD_FIELDS],
        format!("{detail} (the last {dropped} of {} fields were dropped from this dead letter)", fields.len()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(pairs: &[(&str, &[u8])]) -> StreamEntry {
        StreamEntry {
            id: EntryId { ms: 9, seq: 1 },
            fields: Some(pairs.iter().map(|(k, v)| (k.as_bytes().to_vec(), v.to_vec())).collect()),
        }
    }

    #[test]
    fn add_blob_holds_the_payload() {
        let p = prepare(&entry(&[("op", b"add"), ("id", b"e"), ("ts", b"+7"), ("k", &[0, 1])]), &Limits::default());
        assert_eq!(p.kind, Kind::Add);
        assert_eq!(p.args[..3], [b"A".to_vec(), b"e".to_vec(), b"7".to_vec()]);
        assert_eq!(codec::decode(&p.args[3]).unwrap(), vec![b"k".to_vec(), vec![0, 1]]);
        let bare = prepare(&entry(&[("op", b"add"), ("id", b"e"), ("ts", b"7")]), &Limits::default());
        assert_eq!(bare.args[3], b"");
    }

    #[test]
    fn malformed_becomes_dead_letter_with_original_fields() {
        let p = prepare(&entry(&[("op", b"nope"), ("x", b"1")]), &Limits::default());
        assert_eq!(p.kind, Kind::Dead(op::Reason::UnknownOp));
        assert_eq!(p.args[1], b"unknown_op");
        assert_eq!(
            codec::decode(&p.args[3]).unwrap(),
            vec![b"op".to_vec(), b"nope".to_vec(), b"x".to_vec(), b"1".to_vec()]
        );
    }

    #[test]
    fn huge_dead_letters_are_truncated_and_say_so() {
        let mut fields = vec![(b"op".to_vec(), b"add".to_vec())];
        fields.extend((0..5000).map(|i| (format!("f{i}").into_bytes(), b"v".to_vec())));
        let p = prepare(&StreamEntry { id: EntryId::ZERO, fields: Some(fields) }, &Limits::default());
        assert_eq!(p.kind, Kind::Dead(op::Reason::MissingId));
        assert_eq!(codec::decode(&p.args[3]).unwrap().len(), 2 * HARD_MAX_PAYLOAD_FIELDS);
        assert!(String::from_utf8_lossy(&p.args[2]).contains("dropped"));
    }

    #[test]
    fn deleted_entries_are_only_acknowledged() {
        let p = prepare(&StreamEntry { id: EntryId::ZERO, fields: None }, &Limits::default());
        assert_eq!((p.kind, p.args), (Kind::Deleted, vec![b"X".to_vec()]));
    }
}
