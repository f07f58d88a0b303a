//! The scheduled backlog by due time: how many elements wait in `:sched`
//! per ts range, for the dashboard's chart.

use serde::Serialize;

use futures::future::join_all;

use super::{Conn, Keys, StoreError};

/// Scheduled elements whose ts lies in `from..=to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Bucket {
    /// The smallest ts of the range.
    pub from: i64,
    /// The largest ts of the range (inclusive).
    pub to: i64,
    /// Elements scheduled in it.
    pub count: u64,
    /// How many of them are due (`ts <= watermark`): all, none, or some
    /// for the range the watermark falls inside.
    pub due: u64,
}

/// The schedule's shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Backlog {
    /// Elements in `:sched` (`ZCARD`).
    pub scheduled: u64,
    /// The smallest scheduled ts, if any.
    pub first_ts: Option<i64>,
    /// The largest scheduled ts, if any.
    pub last_ts: Option<i64>,
    /// Scheduled elements that are already due (`ts <= watermark`) and wait
    /// for a daemon to release them; 0 without a watermark.
    pub due: u64,
    /// Consecutive ts ranges from `first_ts` to `last_ts`, in order; empty
    /// when nothing is scheduled. Counted one range after another, so the
    /// counts may not add up to `scheduled` while the schedule changes.
    pub buckets: Vec<Bucket>,
}

/// Splits `first..=last` into at most `n` consecutive ranges of equal width
/// (the last one may be narrower), each at least one ts wide. Empty when
/// `n` is 0 or `last < first`.
pub fn ranges(first: i64, last: i64, n: usize) -> Vec<(i64, i64)> {
    if n == 0 || last < first {
        return Vec::new();
    }
    // i128: `last - first + 1` overflows i64 for extreme scores.
    let span = i128::from(last) - i128::from(first) + 1;
    let width = (span + n as i128 - 1) / n as i128;
    let mut out = Vec::with_capacity(n);
    let mut from = i128::from(first);
    while from <= i128::from(last) {
        let to = (from + width - 1).min(i128::from(last));
        // Both ends lie within first..=last, so they fit in i64.
        out.push((from as i64, to as i64));
        from = to + 1;
    }
    out
}

/// `ZRANGE … WITHSCORES` of one member: empty, or its (member, score).
type Extreme = Vec<(String, f64)>;

/// A sorted-set score as a ts: scores tidemark writes are integers within
/// ±(2^53-1); anything else is truncated and saturated.
fn ts(score: f64) -> i64 {
    score as i64
}

/// Reads the backlog of a namespace's partitions in at most `n` buckets
/// over the ts span of all of them: two rounds of pipelined reads per
/// partition (`ZCARD`, the extremes and the due count, then one `ZCOUNT`
/// per bucket and one for the due part of the bucket holding the
/// watermark), run for every partition at once. `watermarks` are each
/// partition's; buckets count as due against the lowest of them (the
/// namespace's watermark), `due` adds up each partition's own.
pub async fn backlog(conn: &mut Conn, partitions: &[(Keys, Option<i64>)], n: usize) -> Result<Backlog, StoreError> {
    let firsts = join_all(partitions.iter().map(|(keys, watermark)| {
        let mut c = conn.clone();
        async move {
            let mut pipe = redis::pipe();
            pipe.zcard(&keys.sched)
                .cmd("ZRANGE")
                .arg(&keys.sched)
                .arg(0)
                .arg(0)
                .arg("WITHSCORES")
                .cmd("ZRANGE")
                .arg(&keys.sched)
                .arg(-1)
                .arg(-1)
                .arg("WITHSCORES")
                .zcount(&keys.sched, "-inf", watermark.map_or_else(|| "-inf".to_owned(), |w| w.to_string()));
            let (scheduled, first, last, due): (u64, Extreme, Extreme, u64) = pipe.query_async(&mut c).await?;
            // Without a watermark nothing is due, even at ts = -inf.
            let due = if watermark.is_some() { due } else { 0 };
            Ok::<_, StoreError>((scheduled, first.first().map(|(_, s)| ts(*s)), last.first().map(|(_, s)| ts(*s)), due))
        }
    }))
    .await
    .into_iter()
    .collect::<Result<Vec<_>, _>>()?;
    let scheduled = firsts.iter().map(|f| f.0).sum();
    let first_ts = firsts.iter().filter_map(|f| f.1).min();
    let last_ts = firsts.iter().filter_map(|f| f.2).max();
    let due = firsts.iter().map(|f| f.3).sum();
    let watermark = partitions.iter().map(|(_, w)| *w).collect::<Option<Vec<i64>>>().and_then(|w| w.into_iter().min());
    let (Some(lo), Some(hi)) = (first_ts, last_ts) else {
        return Ok(Backlog { scheduled, first_ts, last_ts, due, buckets: Vec::new() });
    };
    let spans = ranges(lo, hi, n);
    // Each range ends just before the next one starts (exclusive), and the
    // outer ones are open-ended, so every score is counted once even if it
    // is not an integer.
    let bounds: Vec<(String, String)> = spans
        .iter()
        .enumerate()
        .map(|(i, (from, _))| {
            let lower = if i == 0 { "-inf".to_owned() } else { from.to_string() };
            let upper = spans.get(i + 1).map_or_else(|| "+inf".to_owned(), |(next, _)| format!("({next}"));
            (lower, upper)
        })
        .collect();
    // The range the watermark falls inside, if any: its due part is counted
    // separately.
    let straddled = watermark.and_then(|w| spans.iter().position(|(from, to)| *from <= w && w < *to));
    let expected = spans.len() + usize::from(straddled.is_some());
    let counts = join_all(partitions.iter().map(|(keys, _)| {
        let mut c = conn.clone();
        let bounds = &bounds;
        async move {
            let mut pipe = redis::pipe();
            for (lower, upper) in bounds {
                pipe.zcount(&keys.sched, lower, upper);
            }
            if let Some(((lower, _), w)) = straddled.and_then(|i| bounds.get(i)).zip(watermark) {
                pipe.zcount(&keys.sched, lower, w);
            }
            let counts: Vec<u64> = pipe.query_async(&mut c).await?;
            if counts.len() != expected {
                return Err(StoreError::Reply(format!("expected {expected} ZCOUNT replies, got {}", counts.len())));
            }
            Ok(counts)
        }
    }))
    .await
    .into_iter()
    .collect::<Result<Vec<Vec<u64>>, _>>()?;
    let mut counts: Vec<u64> = (0..expected).map(|i| counts.iter().map(|c| c[i]).sum()).collect();
    let straddled_due = if straddled.is_some() { counts.pop() } else { None };
    let buckets = spans
        .into_iter()
        .zip(counts)
        .enumerate()
        .map(|(i, ((from, to), count))| {
            let due = match watermark {
                Some(w) if to <= w => count,
                _ if straddled == Some(i) => straddled_due.unwrap_or(0).min(count),
                _ => 0,
            };
            Bucket { from, to, count, due }
        })
        .collect();
    Ok(Backlog { scheduled, first_ts, last_ts, due, buckets })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cover_the_span_without_gaps() {
        assert_eq!(ranges(0, 99, 4), vec![(0, 24), (25, 49), (50, 74), (75, 99)]);
        // 21 ts in 20 buckets: width 2, so 11 buckets, the last one narrower.
        let r = ranges(100, 120, 20);
        assert_eq!(r.len(), 11);
        assert_eq!(r[0], (100, 101));
        assert_eq!(r[10], (120, 120));
        for pair in r.windows(2) {
            assert_eq!(pair[0].1 + 1, pair[1].0);
        }
    }

    #[test]
    fn ranges_of_a_narrow_span_are_one_ts_wide() {
        assert_eq!(ranges(5, 7, 20), vec![(5, 5), (6, 6), (7, 7)]);
        assert_eq!(ranges(-3, -3, 20), vec![(-3, -3)]);
    }

    #[test]
    fn ranges_handle_the_extremes() {
        let max = (1i64 << 53) - 1;
        let r = ranges(-max, max, 20);
        assert_eq!(r.len(), 20);
        assert_eq!(r[0].0, -max);
        assert_eq!(r[19].1, max);
        let r = ranges(i64::MIN, i64::MAX, 3);
        assert_eq!(r.len(), 3);
        assert_eq!((r[0].0, r[2].1), (i64::MIN, i64::MAX));
    }

    #[test]
    fn no_ranges_when_empty() {
        assert!(ranges(1, 0, 20).is_empty());
        assert!(ranges(0, 10, 0).is_empty());
    }
}
