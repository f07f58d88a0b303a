//! Turning input entries into typed [`Step`]s for `apply.lua`. Parsing
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

/// What the apply script does with one input entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Schedule element `element` at `ts` (or release it at once if due).
    Add {
        /// The element id.
        element: Vec<u8>,
        /// Its timestamp.
        ts: i64,
        /// Its body, encoded (see [`codec`]): `ts` and its value, then the
        /// payload pairs, so that releasing passes it to `XADD` as it
        /// stands (lua/prelude.lua); empty for no payload.
        payload: Vec<u8>,
    },
    /// Remove element `element` from the schedule.
    Cancel {
        /// The element id.
        element: Vec<u8>,
    },
    /// Raise the watermark to `ts`.
    Watermark {
        /// The new watermark.
        ts: i64,
    },
    /// Move the entry to `:dead`.
    Dead {
        /// Why.
        reason: op::Reason,
        /// A sentence for the operator.
        detail: String,
        /// The original fields, encoded (see [`codec`]).
        fields: Vec<u8>,
    },
    /// The entry was deleted from the stream while pending: acknowledge it.
    Deleted,
}

/// An input entry parsed and ready for the apply script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// The input entry id.
    pub id: EntryId,
    /// What applying it does.
    pub step: Step,
}

/// Most bytes of payloads and dead letters sent in one apply call (a
/// batch holds at least one entry, whatever its size): a thousand 1 MiB
/// payloads must not travel as one gigabyte-sized call, which Redis would
/// parse and run for seconds while every other client waits.
pub const MAX_BATCH_BYTES: usize = 8 << 20;

impl Prepared {
    /// About how many bytes the entry adds to an apply call.
    pub fn weight(&self) -> usize {
        64 + match &self.step {
            Step::Add { element, payload, .. } => element.len() + payload.len(),
            Step::Cancel { element } => element.len(),
            Step::Dead { detail, fields, .. } => detail.len() + fields.len(),
            Step::Watermark { .. } | Step::Deleted => 0,
        }
    }

    /// What the entry does, for counting and logs.
    pub fn kind(&self) -> Kind {
        match &self.step {
            Step::Add { .. } => Kind::Add,
            Step::Cancel { .. } => Kind::Cancel,
            Step::Watermark { .. } => Kind::Watermark,
            Step::Dead { reason, .. } => Kind::Dead(*reason),
            Step::Deleted => Kind::Deleted,
        }
    }
}

/// Which partition entries are read from, to catch misrouted ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// The partition read.
    pub partition: u16,
    /// How many the namespace has.
    pub partitions: u16,
}

/// [`prepare`], dead-lettering an `add` or `cancel` whose id belongs to
/// another partition than the one it was read from (reason
/// `wrong_partition`): applying it here would break the order of its id's
/// operations in the right partition.
pub fn prepare_routed(entry: &StreamEntry, limits: &Limits, route: Route) -> Prepared {
    let prepared = prepare(entry, limits);
    if route.partitions <= 1 {
        return prepared;
    }
    let element = match &prepared.step {
        Step::Add { element, .. } | Step::Cancel { element } => element,
        _ => return prepared,
    };
    let belongs = crate::core::route::partition_of(element, route.partitions);
    if belongs == route.partition {
        return prepared;
    }
    let fields = entry.fields.as_deref().unwrap_or_default();
    let (kept, detail) = truncate_fields(
        fields,
        format!(
            "element {:?} belongs to partition {belongs} (crc32(id) mod {}), not {}",
            String::from_utf8_lossy(element),
            route.partitions,
            route.partition
        ),
    );
    let blob = codec::encode(kept.iter().flat_map(|(k, v)| [k.as_slice(), v.as_slice()]));
    Prepared { id: prepared.id, step: Step::Dead { reason: op::Reason::WrongPartition, detail, fields: blob } }
}

/// Parses an entry into its step. Never fails: malformed entries become
/// dead letters.
pub fn prepare(entry: &StreamEntry, limits: &Limits) -> Prepared {
    let id = entry.id;
    let Some(fields) = &entry.fields else {
        return Prepared { id, step: Step::Deleted };
    };
    let step = match op::parse(fields, limits) {
        Ok(Op::Add { id: element, ts, payload }) => {
            let mut blob = Vec::new();
            if !payload.is_empty() {
                blob.reserve(payload.iter().map(|(k, v)| k.len() + v.len() + 10).sum::<usize>() + 32);
                codec::push_str(&mut blob, b"ts");
                codec::push_str(&mut blob, ts.to_string().as_bytes());
                for (k, v) in &payload {
                    codec::push_str(&mut blob, k);
                    codec::push_str(&mut blob, v);
                }
            }
            Step::Add { element: element.to_vec(), ts, payload: blob }
        }
        Ok(Op::Cancel { id: element }) => Step::Cancel { element: element.to_vec() },
        Ok(Op::Watermark { ts }) => Step::Watermark { ts },
        Err(rejection) => {
            let (kept, detail) = truncate_fields(fields, rejection.detail);
            let blob = codec::encode(kept.iter().flat_map(|(k, v)| [k.as_slice(), v.as_slice()]));
            Step::Dead { reason: rejection.reason, detail, fields: blob }
        }
    };
    Prepared { id, step }
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
    fn add_blob_holds_the_canonical_ts_then_the_payload() {
        let p = prepare(&entry(&[("op", b"add"), ("id", b"e"), ("ts", b"+7"), ("k", &[0, 1])]), &Limits::default());
        assert_eq!(p.kind(), Kind::Add);
        let Step::Add { element, ts, payload } = p.step else { panic!("{p:?}") };
        assert_eq!((element.as_slice(), ts), (&b"e"[..], 7));
        assert_eq!(codec::decode(&payload).unwrap(), vec![b"ts".to_vec(), b"7".to_vec(), b"k".to_vec(), vec![0, 1]]);
        // lua/prelude.lua tells this form from bodies written before by
        // their first bytes: the MessagePack `str` "ts".
        assert_eq!(payload[..3], [0xa2, b't', b's']);
        let bare = prepare(&entry(&[("op", b"add"), ("id", b"e"), ("ts", b"7")]), &Limits::default());
        assert!(matches!(bare.step, Step::Add { payload, .. } if payload.is_empty()));
    }

    #[test]
    fn malformed_becomes_dead_letter_with_original_fields() {
        let p = prepare(&entry(&[("op", b"nope"), ("x", b"1")]), &Limits::default());
        assert_eq!(p.kind(), Kind::Dead(op::Reason::UnknownOp));
        let Step::Dead { fields, .. } = p.step else { panic!("{p:?}") };
        assert_eq!(
            codec::decode(&fields).unwrap(),
            vec![b"op".to_vec(), b"nope".to_vec(), b"x".to_vec(), b"1".to_vec()]
        );
    }

    #[test]
    fn huge_dead_letters_are_truncated_and_say_so() {
        let mut fields = vec![(b"op".to_vec(), b"add".to_vec())];
        fields.extend((0..5000).map(|i| (format!("f{i}").into_bytes(), b"v".to_vec())));
        let p = prepare(&StreamEntry { id: EntryId::ZERO, fields: Some(fields) }, &Limits::default());
        assert_eq!(p.kind(), Kind::Dead(op::Reason::MissingId));
        let Step::Dead { fields, detail, .. } = p.step else { panic!() };
        assert_eq!(codec::decode(&fields).unwrap().len(), 2 * HARD_MAX_PAYLOAD_FIELDS);
        assert!(detail.contains("dropped"));
    }

    #[test]
    fn misrouted_adds_and_cancels_are_dead_letters() {
        let add = entry(&[("op", b"add"), ("id", b"order-42"), ("ts", b"7"), ("k", b"v")]);
        let route = |partition| Route { partition, partitions: 8 };
        assert_eq!(prepare_routed(&add, &Limits::default(), route(6)).kind(), Kind::Add);
        let p = prepare_routed(&add, &Limits::default(), route(5));
        assert_eq!(p.kind(), Kind::Dead(op::Reason::WrongPartition));
        let Step::Dead { detail, fields, .. } = p.step else { panic!() };
        assert!(detail.contains("belongs to partition 6"), "{detail}");
        assert_eq!(codec::decode(&fields).unwrap().len(), 8, "the original fields are kept");
        let cancel = entry(&[("op", b"cancel"), ("id", b"order-42")]);
        assert_eq!(
            prepare_routed(&cancel, &Limits::default(), route(1)).kind(),
            Kind::Dead(op::Reason::WrongPartition)
        );
        // Watermarks go to every partition; one partition checks nothing.
        let wm = entry(&[("op", b"watermark"), ("ts", b"7")]);
        assert_eq!(prepare_routed(&wm, &Limits::default(), route(1)).kind(), Kind::Watermark);
        let one = Route { partition: 0, partitions: 1 };
        assert_eq!(prepare_routed(&add, &Limits::default(), one).kind(), Kind::Add);
    }

    #[test]
    fn deleted_entries_are_only_acknowledged() {
        let p = prepare(&StreamEntry { id: EntryId::ZERO, fields: None }, &Limits::default());
        assert_eq!(p.step, Step::Deleted);
    }
}
