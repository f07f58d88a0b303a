//! Turning an input-stream entry into an [`Op`], or a [`Rejection`] with a
//! stable reason code. Parsing only: applying is the store's job.

use super::watermark::{parse_ts, Timestamp};

/// One field/value pair of a stream entry, byte-for-byte.
pub type Field = (Vec<u8>, Vec<u8>);

/// The largest number of payload fields an element may carry whatever the
/// configuration says: the release script passes them to `XADD` as Lua
/// varargs, and Redis's Lua stack holds about 8000 values.
pub const HARD_MAX_PAYLOAD_FIELDS: usize = 3900;

/// Size limits on input entries. Anything over them is dead-lettered as
/// `too_large`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Longest element id, in bytes.
    pub max_id_bytes: usize,
    /// Largest payload (sum of field and value lengths), in bytes.
    pub max_payload_bytes: usize,
    /// Most payload fields (pairs) per element.
    pub max_payload_fields: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_id_bytes: 1024, max_payload_bytes: 1 << 20, max_payload_fields: 1000 }
    }
}

impl Limits {
    /// Limits with the given values (the struct is `#[non_exhaustive]`).
    pub fn new(max_id_bytes: usize, max_payload_bytes: usize, max_payload_fields: usize) -> Self {
        Limits { max_id_bytes, max_payload_bytes, max_payload_fields }
    }
}

/// An input operation, as DESIGN.md §3 defines it, borrowing from the
/// entry it was parsed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op<'a> {
    /// Schedule an element, or release it at once if already due; replaces a
    /// still-scheduled element with the same id.
    Add {
        /// The element id (non-empty, binary-safe).
        id: &'a [u8],
        /// Its timestamp.
        ts: Timestamp,
        /// Payload fields in their original order.
        payload: Vec<&'a Field>,
    },
    /// Remove a still-scheduled element.
    Cancel {
        /// The element id.
        id: &'a [u8],
    },
    /// Raise the watermark.
    Watermark {
        /// The new watermark; a lower or equal value changes nothing.
        ts: Timestamp,
    },
}

/// Stable reason codes of dead letters (the `reason` field of `:dead`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reason {
    /// The entry has no `op` field.
    MissingOp,
    /// `op` is not `add`, `cancel` or `watermark`.
    UnknownOp,
    /// `add` or `cancel` without a non-empty `id`.
    MissingId,
    /// `add` or `watermark` without a `ts`.
    MissingTs,
    /// `ts` is not a decimal integer within ±(2^53-1).
    BadTs,
    /// The id or payload is over the configured limits.
    TooLarge,
    /// A reserved field (`op`, `id`, `ts`) appears more than once.
    DuplicateField,
    /// A consumer failed to process an output entry `max_deliveries` times.
    MaxDeliveries,
    /// An `add` or `cancel` written to another partition than its id's
    /// (`crc32(id) mod P`, DESIGN §7).
    WrongPartition,
}

impl Reason {
    /// Every reason, for documentation and metrics.
    pub const ALL: [Reason; 9] = [
        Reason::MissingOp,
        Reason::UnknownOp,
        Reason::MissingId,
        Reason::MissingTs,
        Reason::BadTs,
        Reason::TooLarge,
        Reason::DuplicateField,
        Reason::MaxDeliveries,
        Reason::WrongPartition,
    ];

    /// The code written to the `reason` field.
    pub fn code(self) -> &'static str {
        match self {
            Reason::MissingOp => "missing_op",
            Reason::UnknownOp => "unknown_op",
            Reason::MissingId => "missing_id",
            Reason::MissingTs => "missing_ts",
            Reason::BadTs => "bad_ts",
            Reason::TooLarge => "too_large",
            Reason::DuplicateField => "duplicate_field",
            Reason::MaxDeliveries => "max_deliveries",
            Reason::WrongPartition => "wrong_partition",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code())
    }
}

/// Why an input entry cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The stable code.
    pub reason: Reason,
    /// A human sentence for the `detail` field.
    pub detail: String,
}

impl Rejection {
    fn new(reason: Reason, detail: impl Into<String>) -> Self {
        Rejection { reason, detail: detail.into() }
    }
}

/// The reserved fields, found once each.
#[derive(Default)]
struct Reserved<'a> {
    op: Option<&'a [u8]>,
    id: Option<&'a [u8]>,
    ts: Option<&'a [u8]>,
}

/// Parses one input entry's fields.
///
/// `cancel` and `watermark` ignore non-reserved fields, so producers may
/// attach metadata (trace ids and the like) to any operation.
pub fn parse<'a>(fields: &'a [Field], limits: &Limits) -> Result<Op<'a>, Rejection> {
    let mut reserved = Reserved::default();
    for (name, value) in fields {
        let slot = match name.as_slice() {
            b"op" => &mut reserved.op,
            b"id" => &mut reserved.id,
            b"ts" => &mut reserved.ts,
            _ => continue,
        };
        if slot.replace(value).is_some() {
            return Err(Rejection::new(
                Reason::DuplicateField,
                format!("reserved field `{}` appears more than once", String::from_utf8_lossy(name)),
            ));
        }
    }

    let op = reserved.op.ok_or_else(|| Rejection::new(Reason::MissingOp, "the entry has no `op` field"))?;
    match op {
        b"add" => {
            let id = element_id(reserved.id, limits)?;
            let ts = timestamp(reserved.ts)?;
            let payload = payload(fields, limits)?;
            Ok(Op::Add { id, ts, payload })
        }
        b"cancel" => Ok(Op::Cancel { id: element_id(reserved.id, limits)? }),
        b"watermark" => Ok(Op::Watermark { ts: timestamp(reserved.ts)? }),
        other => Err(Rejection::new(
            Reason::UnknownOp,
            format!(
                "unknown op {:?}: expected add, cancel or watermark",
                String::from_utf8_lossy(&other[..other.len().min(64)])
            ),
        )),
    }
}

fn element_id<'a>(raw: Option<&'a [u8]>, limits: &Limits) -> Result<&'a [u8], Rejection> {
    match raw {
        None => Err(Rejection::new(Reason::MissingId, "the entry has no `id` field")),
        Some([]) => Err(Rejection::new(Reason::MissingId, "the `id` field is empty")),
        Some(id) if id.len() > limits.max_id_bytes => Err(Rejection::new(
            Reason::TooLarge,
            format!("the id is {} bytes, over the limit of {}", id.len(), limits.max_id_bytes),
        )),
        Some(id) => Ok(id),
    }
}

fn timestamp(raw: Option<&[u8]>) -> Result<Timestamp, Rejection> {
    let raw = raw.ok_or_else(|| Rejection::new(Reason::MissingTs, "the entry has no `ts` field"))?;
    parse_ts(raw).ok_or_else(|| {
        Rejection::new(
            Reason::BadTs,
            format!("ts {:?} is not an integer within ±(2^53-1)", String::from_utf8_lossy(&raw[..raw.len().min(64)])),
        )
    })
}

fn payload<'a>(fields: &'a [Field], limits: &Limits) -> Result<Vec<&'a Field>, Rejection> {
    let payload: Vec<&Field> =
        fields.iter().filter(|(name, _)| !matches!(name.as_slice(), b"op" | b"id" | b"ts")).collect();
    let max_fields = limits.max_payload_fields.min(HARD_MAX_PAYLOAD_FIELDS);
    if payload.len() > max_fields {
        return Err(Rejection::new(
            Reason::TooLarge,
            format!("the payload has {} fields, over the limit of {max_fields}", payload.len()),
        ));
    }
    let bytes: usize = payload.iter().map(|(k, v)| k.len() + v.len()).sum();
    if bytes > limits.max_payload_bytes {
        return Err(Rejection::new(
            Reason::TooLarge,
            format!("the payload is {bytes} bytes, over the limit of {}", limits.max_payload_bytes),
        ));
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn fields(pairs: &[(&str, &str)]) -> Vec<Field> {
        pairs.iter().map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec())).collect()
    }

    fn reason(pairs: &[(&str, &str)]) -> Option<Reason> {
        parse(&fields(pairs), &Limits::default()).err().map(|r| r.reason)
    }

    type Case<'a> = (&'a [(&'a str, &'a str)], Option<Reason>);

    #[test]
    fn rejections_table() {
        use Reason::*;
        let cases: &[Case] = &[
            (&[("id", "a"), ("ts", "1")], Some(MissingOp)),
            (&[("op", "ad"), ("id", "a"), ("ts", "1")], Some(UnknownOp)),
            (&[("op", "ADD"), ("id", "a"), ("ts", "1")], Some(UnknownOp)),
            (&[("op", "add"), ("ts", "1")], Some(MissingId)),
            (&[("op", "add"), ("id", ""), ("ts", "1")], Some(MissingId)),
            (&[("op", "add"), ("id", "a")], Some(MissingTs)),
            (&[("op", "add"), ("id", "a"), ("ts", "soon")], Some(BadTs)),
            (&[("op", "add"), ("id", "a"), ("ts", "9007199254740992")], Some(BadTs)),
            (&[("op", "add"), ("op", "add"), ("id", "a"), ("ts", "1")], Some(DuplicateField)),
            (&[("op", "add"), ("id", "a"), ("id", "b"), ("ts", "1")], Some(DuplicateField)),
            (&[("op", "add"), ("id", "a"), ("ts", "1"), ("ts", "2")], Some(DuplicateField)),
            (&[("op", "cancel")], Some(MissingId)),
            (&[("op", "watermark")], Some(MissingTs)),
            (&[("op", "watermark"), ("ts", "x")], Some(BadTs)),
            (&[("op", "add"), ("id", "a"), ("ts", "1")], None),
            (&[("op", "cancel"), ("id", "a"), ("trace", "t")], None),
            (&[("op", "watermark"), ("ts", "-3"), ("source", "s")], None),
        ];
        for (pairs, want) in cases {
            assert_eq!(reason(pairs), *want, "{pairs:?}");
        }
    }

    #[test]
    fn add_keeps_payload_in_order_and_binary() {
        let mut f = fields(&[("z", "1"), ("op", "add"), ("a", "2"), ("id", "x"), ("ts", "5")]);
        f.push((b"bin".to_vec(), vec![0, 255, 10]));
        f.push((b"z".to_vec(), b"dup keys are payload".to_vec()));
        let op = parse(&f, &Limits::default()).unwrap();
        let want = [
            (b"z".to_vec(), b"1".to_vec()),
            (b"a".to_vec(), b"2".to_vec()),
            (b"bin".to_vec(), vec![0, 255, 10]),
            (b"z".to_vec(), b"dup keys are payload".to_vec()),
        ];
        assert_eq!(op, Op::Add { id: b"x", ts: 5, payload: want.iter().collect() });
    }

    #[test]
    fn limits_apply() {
        let limits = Limits::new(3, 10, 2);
        let too = |pairs: &[(&str, &str)]| parse(&fields(pairs), &limits).err().map(|r| r.reason);
        assert_eq!(too(&[("op", "add"), ("id", "abcd"), ("ts", "1")]), Some(Reason::TooLarge));
        assert_eq!(too(&[("op", "cancel"), ("id", "abcd")]), Some(Reason::TooLarge));
        assert_eq!(too(&[("op", "add"), ("id", "abc"), ("ts", "1"), ("k", "0123456789")]), Some(Reason::TooLarge));
        assert_eq!(
            too(&[("op", "add"), ("id", "a"), ("ts", "1"), ("a", "1"), ("b", "2"), ("c", "3")]),
            Some(Reason::TooLarge)
        );
        assert_eq!(too(&[("op", "add"), ("id", "abc"), ("ts", "1"), ("k", "01234567")]), None);
    }

    #[test]
    fn reason_codes_are_stable_and_distinct() {
        let codes: std::collections::HashSet<_> = Reason::ALL.iter().map(|r| r.code()).collect();
        assert_eq!(codes.len(), Reason::ALL.len());
        assert_eq!(Reason::BadTs.to_string(), "bad_ts");
    }

    proptest! {
        /// Arbitrary entries never panic the parser, and a parsed add keeps
        /// every non-reserved field.
        #[test]
        fn never_panics(entry in proptest::collection::vec(
            (prop_oneof![Just(b"op".to_vec()), Just(b"id".to_vec()), Just(b"ts".to_vec()),
                         proptest::collection::vec(any::<u8>(), 0..4)],
             prop_oneof![Just(b"add".to_vec()), Just(b"cancel".to_vec()), Just(b"watermark".to_vec()),
                         Just(b"12".to_vec()), proptest::collection::vec(any::<u8>(), 0..4)]),
            0..8)) {
            if let Ok(Op::Add { payload, .. }) = parse(&entry, &Limits::default()) {
                let expected = entry.iter().filter(|(k, _)| !matches!(k.as_slice(), b"op" | b"id" | b"ts")).count();
                prop_assert_eq!(payload.len(), expected);
            }
        }
    }
}
