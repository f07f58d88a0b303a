//! Redis stream entry ids (`<ms>-<seq>`), ordered as Redis orders them.

use std::fmt;
use std::str::FromStr;

/// A stream entry id. Ordering is Redis's: by milliseconds, then sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntryId {
    /// Milliseconds part.
    pub ms: u64,
    /// Sequence part.
    pub seq: u64,
}

impl EntryId {
    /// The smallest id, `0-0`.
    pub const ZERO: EntryId = EntryId { ms: 0, seq: 0 };

    /// The smallest id greater than this one (`None` after the largest):
    /// no entry can lie between an id and its successor.
    pub fn successor(self) -> Option<EntryId> {
        match self.seq.checked_add(1) {
            Some(seq) => Some(EntryId { ms: self.ms, seq }),
            None => self.ms.checked_add(1).map(|ms| EntryId { ms, seq: 0 }),
        }
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// The text was not a `<ms>-<seq>` stream entry id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a stream entry id: {0:?}")]
pub struct BadEntryId(pub String);

impl FromStr for EntryId {
    type Err = BadEntryId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadEntryId(s.to_owned());
        let (ms, seq) = s.split_once('-').ok_or_else(bad)?;
        Ok(EntryId { ms: ms.parse().map_err(|_| bad())?, seq: seq.parse().map_err(|_| bad())? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_orders_like_redis() {
        let a: EntryId = "1700000000000-0".parse().unwrap();
        let b: EntryId = "1700000000000-10".parse().unwrap();
        let c: EntryId = "1700000000001-2".parse().unwrap();
        assert!(a < b && b < c);
        assert_eq!(b.to_string(), "1700000000000-10");
        assert!("1-".parse::<EntryId>().is_err());
        assert!("abc".parse::<EntryId>().is_err());
        assert!("-1-2".parse::<EntryId>().is_err());
    }

    #[test]
    fn successor_is_the_next_possible_id() {
        let id = |ms, seq| EntryId { ms, seq };
        assert_eq!(id(5, 7).successor(), Some(id(5, 8)));
        assert_eq!(id(5, u64::MAX).successor(), Some(id(6, 0)));
        assert_eq!(id(u64::MAX, u64::MAX).successor(), None);
        assert!(id(5, 7) < id(5, 8) && id(5, u64::MAX) < id(6, 0));
    }
}
