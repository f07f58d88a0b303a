//! Timestamps and the watermark: due-ness and monotonic advance.

/// An element timestamp or watermark value. The unit is the producer's choice.
pub type Timestamp = i64;

/// Largest timestamp accepted: exact as a sorted-set score (a double).
pub const TS_MAX: Timestamp = (1 << 53) - 1;
/// Smallest timestamp accepted.
pub const TS_MIN: Timestamp = -TS_MAX;

/// Parses a timestamp as producers write it: a decimal integer within
/// [`TS_MIN`, `TS_MAX`]. Returns `None` for anything else.
pub fn parse_ts(raw: &[u8]) -> Option<Timestamp> {
    let text = std::str::from_utf8(raw).ok()?;
    // `i64::from_str` accepts a leading '+', which is harmless; it rejects
    // blanks, decimals and exponents, which is what we want.
    let ts: Timestamp = text.parse().ok()?;
    (TS_MIN..=TS_MAX).contains(&ts).then_some(ts)
}

/// The latest timestamp of a namespace. Absent until the first watermark
/// arrives; while absent, nothing is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Watermark(Option<Timestamp>);

impl Watermark {
    /// No watermark has arrived yet.
    pub const ABSENT: Watermark = Watermark(None);

    /// A watermark at `ts`.
    pub fn at(ts: Timestamp) -> Self {
        Watermark(Some(ts))
    }

    /// The current value, if any.
    pub fn get(self) -> Option<Timestamp> {
        self.0
    }

    /// Raises the watermark to `ts`. A lower or equal value changes nothing.
    /// Returns whether the watermark moved.
    pub fn advance(&mut self, ts: Timestamp) -> bool {
        match self.0 {
            Some(current) if ts <= current => false,
            _ => {
                self.0 = Some(ts);
                true
            }
        }
    }

    /// Whether an element at `ts` is due: `ts <= watermark` (inclusive).
    pub fn is_due(self, ts: Timestamp) -> bool {
        self.0.is_some_and(|wm| ts <= wm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parse_ts_table() {
        let cases: &[(&[u8], Option<i64>)] = &[
            (b"0", Some(0)),
            (b"42", Some(42)),
            (b"-7", Some(-7)),
            (b"+5", Some(5)),
            (b"9007199254740991", Some(TS_MAX)),
            (b"-9007199254740991", Some(TS_MIN)),
            (b"9007199254740992", None),
            (b"-9007199254740992", None),
            (b"", None),
            (b" 1", None),
            (b"1 ", None),
            (b"1.0", None),
            (b"1e3", None),
            (b"abc", None),
            (b"\xff", None),
            (b"99999999999999999999999", None),
        ];
        for (raw, want) in cases {
            assert_eq!(parse_ts(raw), *want, "parse_ts({:?})", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn absent_watermark_makes_nothing_due() {
        assert!(!Watermark::ABSENT.is_due(TS_MIN));
    }

    #[test]
    fn due_is_inclusive() {
        let wm = Watermark::at(2);
        assert!(wm.is_due(1));
        assert!(wm.is_due(2));
        assert!(!wm.is_due(3));
    }

    proptest! {
        #[test]
        fn watermark_never_decreases(updates in proptest::collection::vec(TS_MIN..=TS_MAX, 0..50)) {
            let mut wm = Watermark::ABSENT;
            let mut max_seen: Option<i64> = None;
            for ts in updates {
                let before = wm.get();
                let moved = wm.advance(ts);
                max_seen = Some(max_seen.map_or(ts, |m| m.max(ts)));
                prop_assert_eq!(wm.get(), max_seen);
                prop_assert_eq!(moved, before != wm.get());
                if let (Some(b), Some(a)) = (before, wm.get()) {
                    prop_assert!(a >= b);
                }
            }
        }

        #[test]
        fn due_matches_definition(wm in TS_MIN..=TS_MAX, ts in TS_MIN..=TS_MAX) {
            prop_assert_eq!(Watermark::at(wm).is_due(ts), ts <= wm);
        }

        #[test]
        fn parse_ts_roundtrips_in_range(ts in TS_MIN..=TS_MAX) {
            prop_assert_eq!(parse_ts(ts.to_string().as_bytes()), Some(ts));
        }
    }
}
