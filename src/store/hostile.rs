//! Hostile input, property-tested without Redis: entries with binary and
//! NUL names and values, empty strings, reserved fields repeated, `ts` at
//! and one past ±(2^53-1) in every spelling, values of a mebibyte and ten
//! thousand fields. Parsing and preparing them never panics, agrees with an
//! oracle written independently from the rules of DESIGN §3, keeps every
//! byte of a payload or of a dead letter's fields, and bounds what goes to
//! Redis.
//!
//! `TIDEMARK_FUZZ_CASES` sets the number of cases (default 100,000, about
//! 4 s in a debug build; the documented run, `TIDEMARK_FUZZ_CASES=1000000
//! cargo test --release --lib hostile`, passed 1,000,000 cases in 14.4 s).

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use super::batch::{prepare, Step};
use super::StreamEntry;
use crate::core::op::{Field, Limits, Reason, HARD_MAX_PAYLOAD_FIELDS};
use crate::core::{codec, EntryId};

/// What DESIGN §3 says an entry is, worked out without the parser.
#[derive(Debug, PartialEq, Eq)]
enum Expected {
    Add,
    Cancel,
    Watermark,
    Dead(Reason),
}

const TS_LIMIT: i128 = (1 << 53) - 1;

/// A decimal integer (optional sign, at least one ASCII digit, nothing
/// else) within ±(2^53-1).
fn valid_ts(raw: &[u8]) -> bool {
    let digits = match raw.first() {
        Some(b'+' | b'-') => &raw[1..],
        _ => raw,
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return false;
    }
    let magnitude = digits.iter().fold(0i128, |n, d| (n * 10 + i128::from(d - b'0')).min(TS_LIMIT + 10));
    magnitude <= TS_LIMIT
}

fn oracle(fields: &[Field], limits: &Limits) -> Expected {
    let reserved =
        |name: &[u8]| fields.iter().filter(|(k, _)| k == name).map(|(_, v)| v.as_slice()).collect::<Vec<_>>();
    let (op, id, ts) = (reserved(b"op"), reserved(b"id"), reserved(b"ts"));
    if op.len() > 1 || id.len() > 1 || ts.len() > 1 {
        return Expected::Dead(Reason::DuplicateField);
    }
    let id_check = || match id.first() {
        None | Some([]) => Some(Reason::MissingId),
        Some(i) if i.len() > limits.max_id_bytes => Some(Reason::TooLarge),
        Some(_) => None,
    };
    let ts_check = || match ts.first() {
        None => Some(Reason::MissingTs),
        Some(t) if !valid_ts(t) => Some(Reason::BadTs),
        Some(_) => None,
    };
    let dead = |r: Option<Reason>, ok: Expected| r.map_or(ok, Expected::Dead);
    match op.first().copied() {
        None => Expected::Dead(Reason::MissingOp),
        Some(b"add") => {
            if let Some(r) = id_check().or_else(ts_check) {
                return Expected::Dead(r);
            }
            let payload: Vec<&Field> =
                fields.iter().filter(|(k, _)| !matches!(k.as_slice(), b"op" | b"id" | b"ts")).collect();
            let bytes: usize = payload.iter().map(|(k, v)| k.len() + v.len()).sum();
            if payload.len() > limits.max_payload_fields.min(HARD_MAX_PAYLOAD_FIELDS)
                || bytes > limits.max_payload_bytes
            {
                return Expected::Dead(Reason::TooLarge);
            }
            Expected::Add
        }
        Some(b"cancel") => dead(id_check(), Expected::Cancel),
        Some(b"watermark") => dead(ts_check(), Expected::Watermark),
        Some(_) => Expected::Dead(Reason::UnknownOp),
    }
}

fn ts_text() -> impl Strategy<Value = Vec<u8>> {
    let edges = [
        "9007199254740991",
        "-9007199254740991",
        "9007199254740992",
        "-9007199254740992",
        "+9007199254740991",
        "0009007199254740991",
        "9223372036854775807",
        "9223372036854775808",
        "-9223372036854775809",
        "99999999999999999999999",
        "+0",
        "-0",
        "+",
        "-",
        "",
        " 5",
        "5 ",
        "1e3",
        "1.5",
        "0x10",
        "--5",
        "+-5",
        "\u{0661}\u{0662}",
        "5\0",
    ];
    prop_oneof![
        4 => any::<i64>().prop_map(|n| n.to_string().into_bytes()),
        4 => (-TS_LIMIT as i64 - 3..=TS_LIMIT as i64 + 3).prop_map(|n| n.to_string().into_bytes()),
        3 => proptest::sample::select(edges.to_vec()).prop_map(|s| s.as_bytes().to_vec()),
        1 => proptest::collection::vec(any::<u8>(), 0..24),
    ]
}

fn name() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => Just(b"op".to_vec()),
        3 => Just(b"id".to_vec()),
        3 => Just(b"ts".to_vec()),
        1 => Just(Vec::new()),
        1 => Just(b"OP".to_vec()),
        4 => proptest::collection::vec(any::<u8>(), 0..8),
    ]
}

fn value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => Just(b"add".to_vec()),
        2 => Just(b"cancel".to_vec()),
        2 => Just(b"watermark".to_vec()),
        4 => ts_text(),
        1 => Just(Vec::new()),
        1 => Just(vec![0u8]),
        4 => proptest::collection::vec(any::<u8>(), 0..32),
        // Ids around the 1,024-byte limit.
        1 => (1020usize..1030).prop_map(|n| vec![b'i'; n]),
    ]
}

/// An entry: usually a dozen fields at most; now and then a mebibyte
/// value (just under, at and just over the payload limit) or ten thousand
/// fields.
fn entry() -> impl Strategy<Value = Vec<Field>> {
    let small = || proptest::collection::vec((name(), value()), 0..12);
    let huge_value = (small(), (-64i64..64)).prop_map(|(mut f, delta)| {
        let len = ((1i64 << 20) - 8 + delta).max(0) as usize;
        f.push((b"big".to_vec(), vec![0xAB; len]));
        f
    });
    let many_fields = (small(), 9_990usize..10_010).prop_map(|(mut f, n)| {
        f.extend((0..n).map(|i| (format!("f{i}").into_bytes(), Vec::new())));
        f
    });
    prop_oneof![4000 => small(), 2 => huge_value, 1 => many_fields]
}

fn cases() -> u32 {
    std::env::var("TIDEMARK_FUZZ_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(100_000)
}

/// Parses and prepares one entry, checking everything the module docs
/// promise.
fn check(fields: Vec<Field>, limits: &Limits) -> Result<(), TestCaseError> {
    let expected = oracle(&fields, limits);
    let entry = StreamEntry { id: EntryId { ms: 7, seq: 1 }, fields: Some(fields) };
    let prepared = prepare(&entry, limits);
    let fields = entry.fields.as_deref().unwrap_or_default();
    prop_assert!(prepared.weight() < 64 + 2 * (1 << 20) + 2 * (3900 * 64) + 1024, "bounded weight");
    match (&expected, &prepared.step) {
        (Expected::Add, Step::Add { element, ts, payload }) => {
            let id = fields.iter().find(|(k, _)| k == b"id").map(|(_, v)| v.clone());
            prop_assert_eq!(Some(element.clone()), id);
            let ts_field = fields.iter().find(|(k, _)| k == b"ts").map(|(_, v)| v.as_slice()).unwrap_or_default();
            prop_assert_eq!(crate::core::watermark::parse_ts(ts_field), Some(*ts));
            prop_assert!(i128::from(*ts).abs() <= TS_LIMIT);
            let mut flat: Vec<Vec<u8>> = fields
                .iter()
                .filter(|(k, _)| !matches!(k.as_slice(), b"op" | b"id" | b"ts"))
                .flat_map(|(k, v)| [k.clone(), v.clone()])
                .collect();
            // A body holds the canonical ts first (`ts`, then the payload),
            // and an element without payload has no body.
            if !flat.is_empty() {
                flat.splice(0..0, [b"ts".to_vec(), ts.to_string().into_bytes()]);
            }
            prop_assert_eq!(codec::decode(payload).expect("a payload blob decodes"), flat);
        }
        (Expected::Cancel, Step::Cancel { element }) => {
            prop_assert_eq!(Some(element), fields.iter().find(|(k, _)| k == b"id").map(|(_, v)| v));
        }
        (Expected::Watermark, Step::Watermark { ts }) => prop_assert!(i128::from(*ts).abs() <= TS_LIMIT),
        (Expected::Dead(want), Step::Dead { reason, detail, fields: blob }) => {
            prop_assert_eq!(want, reason);
            prop_assert!(!detail.is_empty() && detail.len() < 512, "a short detail: {}", detail.len());
            let kept = fields.len().min(HARD_MAX_PAYLOAD_FIELDS);
            let flat: Vec<Vec<u8>> = fields[..kept].iter().flat_map(|(k, v)| [k.clone(), v.clone()]).collect();
            prop_assert_eq!(codec::decode(blob).expect("dead-letter fields decode"), flat);
            prop_assert_eq!(fields.len() > kept, detail.contains("dropped"));
        }
        (want, got) => prop_assert!(false, "expected {want:?}, prepared {got:?}"),
    }
    Ok(())
}

#[test]
fn hostile_entries_are_parsed_as_designed() {
    let limits = Limits::default();
    let mut runner = TestRunner::new(Config { cases: cases(), failure_persistence: None, ..Config::default() });
    let started = std::time::Instant::now();
    runner.run(&entry(), |fields| check(fields, &limits)).unwrap();
    eprintln!("hostile entries: {} cases in {:?}", cases(), started.elapsed());
}

#[test]
fn the_oracle_agrees_on_the_edges() {
    assert!(valid_ts(b"9007199254740991") && valid_ts(b"-9007199254740991") && valid_ts(b"+0"));
    assert!(!valid_ts(b"9007199254740992") && !valid_ts(b"-9007199254740992") && !valid_ts(b"+"));
    assert!(valid_ts(b"0009007199254740991") && !valid_ts(b"99999999999999999999999"));
    assert!(!valid_ts(b" 5") && !valid_ts(b"1e3") && !valid_ts(b"") && !valid_ts("١".as_bytes()));
}
