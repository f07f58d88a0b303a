//! `apply.lua`: a batch of input entries applied and acknowledged in one
//! atomic call. The batch is encoded once, in one of two forms (see
//! [`Form`]), and the reply is read by name into [`ApplyOutcome`].

use super::{named_integers, Scripts};
use crate::core::{codec, EntryId};
use crate::store::batch::Step;
use crate::store::{Conn, Keys, Prepared, StoreError, INPUT_GROUP};

/// What one `apply.lua` call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyOutcome {
    /// Leading entries of the batch that are done (applied now, or found
    /// already applied); the rest must be sent again later.
    pub processed: usize,
    /// Elements released into `:out` by watermark advances.
    pub released: u64,
    /// Due elements remain: call [`Scripts::release`] until none does.
    pub more_due: bool,
    /// An older entry is pending at another consumer; the unprocessed rest
    /// must wait for it.
    pub blocked: bool,
    /// `add` entries applied.
    pub adds: u64,
    /// `cancel` entries applied.
    pub cancels: u64,
    /// `watermark` entries applied.
    pub watermarks: u64,
    /// Entries dead-lettered.
    pub dead: u64,
    /// `add`s that were already due and went straight to `:out`.
    pub late: u64,
    /// Nothing was done: the partition's owner lock does not hold the
    /// caller's token (ownership moved to another daemon).
    pub fenced: bool,
    /// `add` entries dropped: their element was released less than
    /// `daemon.dedup_window` ago (a producer's retry).
    pub duplicates: u64,
}

impl ApplyOutcome {
    /// Reads the script's name/value reply.
    fn decode(reply: redis::Value) -> Result<ApplyOutcome, StoreError> {
        let mut o = ApplyOutcome::default();
        let mut seen = 0u16;
        for (name, value) in named_integers("apply.lua", reply)? {
            let n = value.max(0) as u64;
            let bit = match name.as_str() {
                "processed" => {
                    o.processed = n as usize;
                    1
                }
                "released" => {
                    o.released = n;
                    2
                }
                "more_due" => {
                    o.more_due = value == 1;
                    4
                }
                "blocked" => {
                    o.blocked = value == 1;
                    8
                }
                "adds" => {
                    o.adds = n;
                    16
                }
                "cancels" => {
                    o.cancels = n;
                    32
                }
                "watermarks" => {
                    o.watermarks = n;
                    64
                }
                "dead" => {
                    o.dead = n;
                    128
                }
                "late" => {
                    o.late = n;
                    256
                }
                "fenced" => {
                    o.fenced = value == 1;
                    512
                }
                "duplicates" => {
                    o.duplicates = n;
                    1024
                }
                other => return Err(StoreError::Reply(format!("apply.lua: unknown reply field {other:?}"))),
            };
            seen |= bit;
        }
        if seen != 2047 {
            return Err(StoreError::Reply(format!("apply.lua: reply fields missing (got mask {seen:#x})")));
        }
        Ok(o)
    }
}

/// `apply.lua`'s ARGV[7]: per entry of `batch` (sorted by id), `1` where
/// some other entry id could lie between it and the previous entry, `0`
/// where the two ids are adjacent. The script checks the pending list for
/// other entries only at the `1`s, so a `0` must never be wrong.
fn gaps(batch: &[&Prepared]) -> Vec<u8> {
    let mut out = Vec::with_capacity(batch.len());
    let mut prev = None;
    for p in batch {
        let adjacent = prev.and_then(EntryId::successor) == Some(p.id);
        out.push(if adjacent || prev.is_none() { b'0' } else { b'1' });
        prev = Some(p.id);
    }
    out
}

/// Most entries sent in bulk form: its argument lists are passed to Lua as
/// varargs, and Lua's C stack holds at most 8000 values.
const BULK_MAX: usize = 2000;

/// How the batch travels to `apply.lua` (ARGV[8] names the form). Either
/// way it is encoded once.
#[derive(Debug, PartialEq, Eq)]
enum Form {
    /// `E`: ARGV[9] holds every entry's id and step, in order, as one
    /// MessagePack array of `str` objects. One argument instead of
    /// thousands spares Redis parsing, allocating and freeing each one;
    /// `cmsgpack` builds the Lua table directly.
    Entries(Vec<u8>),
    /// `B`: a batch of plain adds with distinct element ids, as ready-made
    /// argument lists (see [`Bulk`]).
    Bulk(Bulk),
}

/// A batch of plain adds with distinct element ids as ready-made argument
/// lists (each a sequence of MessagePack `str` objects that
/// `cmsgpack.unpack` turns straight into command arguments). When the
/// script finds that the whole batch applies as it stands, it needs three
/// or four calls and no per-entry work at all; otherwise it rebuilds the
/// per-entry view from these lists.
#[derive(Debug, Default, PartialEq, Eq)]
struct Bulk {
    /// ARGV[9]: the smallest ts of the batch, as text.
    min_ts: Vec<u8>,
    /// ARGV[10]: `ZADD` arguments: ts, element id, …
    zadd: Vec<u8>,
    /// ARGV[11]: `HSET` arguments: element id, payload blob, … for adds
    /// with a payload.
    hset: Vec<u8>,
    /// ARGV[12]: element ids of the adds without a payload (`HDEL` of
    /// older bodies).
    bare: Vec<u8>,
    /// ARGV[13]: the input entry ids (`XACK`).
    acks: Vec<u8>,
    /// ARGV[14]: pairs of neighbouring entry ids between which another id
    /// could lie.
    gaps: Vec<u8>,
}

impl Bulk {
    /// The bulk form of `batch`, if it holds only adds, each element id
    /// once, and not too many.
    fn of(batch: &[&Prepared]) -> Option<Bulk> {
        if batch.is_empty() || batch.len() > BULK_MAX {
            return None;
        }
        let mut seen = std::collections::HashSet::with_capacity(batch.len());
        let mut min_ts = i64::MAX;
        let mut bulk = Bulk::default();
        let mut prev = None;
        for p in batch {
            let Step::Add { element, ts, payload } = &p.step else { return None };
            if !seen.insert(element.as_slice()) {
                return None;
            }
            min_ts = min_ts.min(*ts);
            codec::push_str(&mut bulk.zadd, ts.to_string().as_bytes());
            codec::push_str(&mut bulk.zadd, element);
            if payload.is_empty() {
                codec::push_str(&mut bulk.bare, element);
            } else {
                codec::push_str(&mut bulk.hset, element);
                codec::push_str(&mut bulk.hset, payload);
            }
            let sid = p.id.to_string();
            codec::push_str(&mut bulk.acks, sid.as_bytes());
            if let Some(prev) = prev {
                if EntryId::successor(prev) != Some(p.id) {
                    codec::push_str(&mut bulk.gaps, prev.to_string().as_bytes());
                    codec::push_str(&mut bulk.gaps, sid.as_bytes());
                }
            }
            prev = Some(p.id);
        }
        bulk.min_ts = min_ts.to_string().into_bytes();
        Some(bulk)
    }
}

/// The per-entry form: each entry as `<entry id> <code> <arguments…>`
/// (see `lua/apply.lua`, ARGV[9]).
fn entries(batch: &[&Prepared]) -> Vec<u8> {
    let items: usize = batch
        .iter()
        .map(|p| match p.step {
            Step::Add { .. } | Step::Dead { .. } => 5,
            Step::Cancel { .. } | Step::Watermark { .. } => 3,
            Step::Deleted => 2,
        })
        .sum();
    let bytes: usize = batch
        .iter()
        .map(|p| match &p.step {
            Step::Add { element, payload, .. } => element.len() + payload.len() + 64,
            Step::Dead { detail, fields, .. } => detail.len() + fields.len() + 64,
            Step::Cancel { element } => element.len() + 32,
            Step::Watermark { .. } | Step::Deleted => 48,
        })
        .sum();
    let mut out = Vec::with_capacity(5 + bytes);
    codec::push_array_len(&mut out, items);
    for p in batch {
        codec::push_str(&mut out, p.id.to_string().as_bytes());
        match &p.step {
            Step::Add { element, ts, payload } => {
                codec::push_str(&mut out, b"A");
                codec::push_str(&mut out, element);
                codec::push_str(&mut out, ts.to_string().as_bytes());
                codec::push_str(&mut out, payload);
            }
            Step::Cancel { element } => {
                codec::push_str(&mut out, b"C");
                codec::push_str(&mut out, element);
            }
            Step::Watermark { ts } => {
                codec::push_str(&mut out, b"W");
                codec::push_str(&mut out, ts.to_string().as_bytes());
            }
            Step::Dead { reason, detail, fields } => {
                codec::push_str(&mut out, b"D");
                codec::push_str(&mut out, reason.code().as_bytes());
                codec::push_str(&mut out, detail.as_bytes());
                codec::push_str(&mut out, fields);
            }
            Step::Deleted => codec::push_str(&mut out, b"X"),
        }
    }
    out
}

impl Form {
    fn of(batch: &[&Prepared]) -> Form {
        match Bulk::of(batch) {
            Some(bulk) => Form::Bulk(bulk),
            None => Form::Entries(entries(batch)),
        }
    }
}

/// An `apply.lua` call ready to be sent (see [`Scripts::apply_call`]).
pub struct ApplyCall<'a> {
    inv: redis::ScriptInvocation<'a>,
}

impl ApplyCall<'_> {
    /// Sends the call (the request is queued on the connection at the first
    /// poll) and decodes its outcome.
    pub async fn invoke(self, conn: &mut Conn) -> Result<ApplyOutcome, StoreError> {
        let started = std::time::Instant::now();
        let reply: redis::Value = self.inv.invoke_async(conn).await?;
        crate::metrics::record_script(crate::metrics::Script::Apply, started.elapsed());
        ApplyOutcome::decode(reply)
    }
}

impl Scripts {
    /// Applies `batch` (sorted by entry id) and acknowledges what it applied,
    /// atomically. Watermark advances release at most `chunk` elements. In
    /// clock mode the watermark is first raised to the server's `TIME`.
    pub async fn apply(
        &self,
        conn: &mut Conn,
        keys: &Keys,
        batch: &[&Prepared],
        chunk: usize,
    ) -> Result<ApplyOutcome, StoreError> {
        self.apply_call(keys, batch, chunk, None).invoke(conn).await
    }

    /// [`Scripts::apply`] in two steps: the call, with every argument
    /// encoded (it no longer borrows `batch`), to be invoked later. With a
    /// `fence` token, the call does nothing (and says `fenced`) unless the
    /// partition's owner lock holds that token.
    pub fn apply_call(
        &self,
        keys: &Keys,
        batch: &[&Prepared],
        chunk: usize,
        fence: Option<&str>,
    ) -> ApplyCall<'static> {
        let mut inv = self.sources.apply.prepare_invoke();
        inv.key(&keys.input)
            .key(&keys.wm)
            .key(&keys.sched)
            .key(&keys.body)
            .key(&keys.out)
            .key(&keys.dead)
            .key(keys.clock_next())
            .key(keys.owner())
            .key(keys.released())
            .arg(INPUT_GROUP)
            .arg(chunk)
            .arg(batch.len())
            .arg(if self.clock_mode { "1" } else { "0" })
            .arg(keys.wake_channel())
            .arg(fence.unwrap_or(""))
            .arg(gaps(batch));
        match Form::of(batch) {
            Form::Entries(packed) => {
                inv.arg("E").arg(packed);
            }
            Form::Bulk(b) => {
                inv.arg("B").arg(b.min_ts).arg(b.zadd).arg(b.hset).arg(b.bare).arg(b.acks).arg(b.gaps);
            }
        }
        inv.arg(self.dedup_ms);
        ApplyCall { inv }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::op::Reason;

    #[test]
    fn gaps_mark_where_another_id_could_lie() {
        let p = |ms, seq| Prepared { id: EntryId { ms, seq }, step: Step::Deleted };
        let batch = [p(5, 1), p(5, 2), p(5, 4), p(6, 0), p(6, u64::MAX), p(7, 0), p(9, 0)];
        let refs: Vec<&Prepared> = batch.iter().collect();
        assert_eq!(gaps(&refs), b"0011101");
        assert_eq!(gaps(&refs[..1]), b"0");
    }

    fn add(ms: u64, seq: u64, id: &str, ts: i64, payload: &[u8]) -> Prepared {
        Prepared {
            id: EntryId { ms, seq },
            step: Step::Add { element: id.as_bytes().to_vec(), ts, payload: payload.to_vec() },
        }
    }

    fn strs(blob: &[u8]) -> Vec<String> {
        codec::decode(blob).unwrap().into_iter().map(|v| String::from_utf8(v).unwrap()).collect()
    }

    #[test]
    fn bulk_form_lists_each_command_s_arguments() {
        let batch = [add(5, 1, "a", 30, b"pa"), add(5, 2, "b", -7, b""), add(9, 0, "c", 12, b"pc")];
        let refs: Vec<&Prepared> = batch.iter().collect();
        let Form::Bulk(bulk) = Form::of(&refs) else { panic!("a batch of distinct adds has a bulk form") };
        assert_eq!(bulk.min_ts, b"-7");
        assert_eq!(strs(&bulk.zadd), ["30", "a", "-7", "b", "12", "c"]);
        assert_eq!(strs(&bulk.hset), ["a", "pa", "c", "pc"]);
        assert_eq!(strs(&bulk.bare), ["b"]);
        assert_eq!(strs(&bulk.acks), ["5-1", "5-2", "9-0"]);
        assert_eq!(strs(&bulk.gaps), ["5-2", "9-0"]);
    }

    #[test]
    fn other_batches_travel_entry_by_entry() {
        let twice = [add(1, 0, "a", 1, b""), add(1, 1, "a", 2, b"")];
        assert!(matches!(Form::of(&twice.iter().collect::<Vec<_>>()), Form::Entries(_)));
        let cancel = Prepared { id: EntryId { ms: 1, seq: 2 }, step: Step::Cancel { element: b"x".to_vec() } };
        let dead = Prepared {
            id: EntryId { ms: 1, seq: 3 },
            step: Step::Dead { reason: Reason::BadTs, detail: "no".into(), fields: codec::encode([&b"ts"[..]]) },
        };
        let wm = Prepared { id: EntryId { ms: 2, seq: 0 }, step: Step::Watermark { ts: -5 } };
        let gone = Prepared { id: EntryId { ms: 3, seq: 0 }, step: Step::Deleted };
        let mixed = [add(1, 0, "a", 1, b"p"), cancel, dead, wm, gone];
        let Form::Entries(packed) = Form::of(&mixed.iter().collect::<Vec<_>>()) else { panic!("mixed batch") };
        // An array header (18 items), then the items in order (the payload
        // blob as given; the dead letter's fields an encoded sequence).
        assert_eq!(packed[..3], [0xdc, 0, 18]);
        let items = codec::decode(&packed[3..]).unwrap();
        let fields = codec::encode([&b"ts"[..]]);
        let expect: Vec<&[u8]> = vec![
            b"1-0", b"A", b"a", b"1", b"p", b"1-2", b"C", b"x", b"1-3", b"D", b"bad_ts", b"no", &fields, b"2-0", b"W",
            b"-5", b"3-0", b"X",
        ];
        assert_eq!(items, expect);
        let many: Vec<Prepared> = (0..=BULK_MAX as u64).map(|i| add(1, i, &i.to_string(), 1, b"")).collect();
        assert!(matches!(Form::of(&many.iter().collect::<Vec<_>>()), Form::Entries(_)));
        assert!(matches!(Form::of(&many[..BULK_MAX].iter().collect::<Vec<_>>()), Form::Bulk(_)));
    }

    #[test]
    fn outcome_is_read_by_name() {
        let bs = |s: &str| redis::Value::BulkString(s.as_bytes().to_vec());
        let mut items = Vec::new();
        for (name, v) in [
            ("late", 9),
            ("processed", 3),
            ("released", 2),
            ("more_due", 1),
            ("blocked", 0),
            ("adds", 4),
            ("cancels", 5),
            ("watermarks", 6),
            ("dead", 7),
            ("fenced", 0),
            ("duplicates", 8),
        ] {
            items.push(bs(name));
            items.push(redis::Value::Int(v));
        }
        let o = ApplyOutcome::decode(redis::Value::Array(items.clone())).unwrap();
        assert_eq!(
            o,
            ApplyOutcome {
                processed: 3,
                released: 2,
                more_due: true,
                blocked: false,
                adds: 4,
                cancels: 5,
                watermarks: 6,
                dead: 7,
                late: 9,
                fenced: false,
                duplicates: 8
            }
        );
        assert!(ApplyOutcome::decode(redis::Value::Array(items[2..].to_vec())).is_err(), "a missing field");
    }
}
