//! The namespace's meta record (`<prefix>:{NS}:meta`, a hash): how many
//! partitions it has, written once by the first daemon, so that every
//! process agrees on the layout (DESIGN §7).

use super::{Conn, Namespace, StoreError};
use crate::core::route::MAX_PARTITIONS;

/// Field of the meta record holding the partition count.
const PARTITIONS: &str = "partitions";
/// Field set while `tidemark repartition` runs (the count it moves to):
/// nothing may use the namespace until it has finished.
const REPARTITIONING: &str = "repartitioning";

/// The namespace cannot be used with this process's layout.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// The configured partition count disagrees with the record.
    #[error(
        "namespace {namespace:?} has {recorded} partition(s) (recorded in {key}), but this process is configured \
         with {configured}: use partitions = {recorded}, or grow the namespace with `tidemark repartition --to \
         {configured}`"
    )]
    Mismatch {
        /// The namespace.
        namespace: String,
        /// The meta key.
        key: String,
        /// What the record says.
        recorded: u16,
        /// What this process was configured with.
        configured: u16,
    },
    /// `tidemark repartition` is moving the namespace (or crashed while
    /// it did).
    #[error(
        "namespace {namespace:?} is being repartitioned to {to} partition(s) ({key} has repartitioning = {to}): \
         wait until `tidemark repartition` has finished, or, if it stopped midway, run `tidemark repartition --to \
         {to}` again"
    )]
    Repartitioning {
        /// The namespace.
        namespace: String,
        /// The meta key.
        key: String,
        /// The count it moves to.
        to: u16,
    },
}

/// What the meta record says.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Record {
    /// The partition count, once recorded.
    pub partitions: Option<u16>,
    /// The count a running (or crashed) `repartition` moves to.
    pub repartitioning: Option<u16>,
}

/// Reads the meta record.
pub async fn read(conn: &mut Conn, ns: &Namespace) -> Result<Record, StoreError> {
    let (partitions, repartitioning): (Option<String>, Option<String>) =
        redis::cmd("HMGET").arg(ns.meta()).arg(PARTITIONS).arg(REPARTITIONING).query_async(conn).await?;
    let count = |field: &str, raw: Option<String>| -> Result<Option<u16>, StoreError> {
        let Some(raw) = raw else { return Ok(None) };
        match raw.parse::<u16>() {
            Ok(n) if (1..=MAX_PARTITIONS).contains(&n) => Ok(Some(n)),
            _ => Err(StoreError::Reply(format!(
                "{}: {field} = {raw:?} is not a partition count (1..={MAX_PARTITIONS}); was the record written by hand?",
                ns.meta()
            ))),
        }
    };
    Ok(Record { partitions: count(PARTITIONS, partitions)?, repartitioning: count(REPARTITIONING, repartitioning)? })
}

/// The partition count in the meta record, if any.
pub async fn recorded(conn: &mut Conn, ns: &Namespace) -> Result<Option<u16>, StoreError> {
    Ok(read(conn, ns).await?.partitions)
}

/// The namespace's layout: `configured` partitions (if set) checked
/// against the record, or the recorded count, or 1; refused while a
/// `repartition` moves it. With `record`, the count is written when no
/// record exists yet (the first daemon does that; a race between two first
/// daemons is settled by `HSETNX`).
pub async fn resolve(
    conn: &mut Conn,
    ns: &Namespace,
    configured: Option<u16>,
    record: bool,
) -> Result<Result<Namespace, LayoutError>, StoreError> {
    let mut found = read(conn, ns).await?;
    if found.partitions.is_none() && found.repartitioning.is_none() && record {
        let count = configured.unwrap_or(1);
        let _: i64 = redis::cmd("HSETNX").arg(ns.meta()).arg(PARTITIONS).arg(count).query_async(conn).await?;
        found = read(conn, ns).await?;
    }
    Ok(decide(ns, configured, found))
}

/// Marks the namespace as being repartitioned to `to`'s count (see
/// [`LayoutError::Repartitioning`]).
pub async fn begin_repartition(conn: &mut Conn, to: &Namespace) -> Result<(), StoreError> {
    let _: i64 = redis::cmd("HSET").arg(to.meta()).arg(REPARTITIONING).arg(to.partitions()).query_async(conn).await?;
    Ok(())
}

/// Writes the record after `repartition`, replacing any earlier one, and
/// lifts the mark, in one step.
pub async fn finish_repartition(conn: &mut Conn, ns: &Namespace) -> Result<(), StoreError> {
    let _: Vec<i64> = redis::pipe()
        .atomic()
        .cmd("HSET")
        .arg(ns.meta())
        .arg(PARTITIONS)
        .arg(ns.partitions())
        .cmd("HDEL")
        .arg(ns.meta())
        .arg(REPARTITIONING)
        .query_async(conn)
        .await?;
    Ok(())
}

/// Lifts the mark on the Redis a namespace moved away from (its record
/// stays as it was).
pub async fn end_repartition_elsewhere(conn: &mut Conn, ns: &Namespace) -> Result<(), StoreError> {
    let _: i64 = redis::cmd("HDEL").arg(ns.meta()).arg(REPARTITIONING).query_async(conn).await?;
    Ok(())
}

fn decide(ns: &Namespace, configured: Option<u16>, found: Record) -> Result<Namespace, LayoutError> {
    if let Some(to) = found.repartitioning {
        return Err(LayoutError::Repartitioning { namespace: ns.name().to_owned(), key: ns.meta(), to });
    }
    match (configured, found.partitions) {
        (Some(c), Some(r)) if c != r => {
            Err(LayoutError::Mismatch { namespace: ns.name().to_owned(), key: ns.meta(), recorded: r, configured: c })
        }
        (_, Some(r)) => Ok(ns.with_partitions(r)),
        (Some(c), None) => Ok(ns.with_partitions(c)),
        (None, None) => Ok(ns.with_partitions(1)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_wins_and_a_mismatch_names_both_counts() {
        let ns = Namespace::new("tidemark", "orders", 1);
        let rec = |p| Record { partitions: p, repartitioning: None };
        assert_eq!(decide(&ns, None, rec(Some(8))).unwrap().partitions(), 8);
        assert_eq!(decide(&ns, Some(8), rec(Some(8))).unwrap().partitions(), 8);
        assert_eq!(decide(&ns, Some(4), rec(None)).unwrap().partitions(), 4);
        assert_eq!(decide(&ns, None, rec(None)).unwrap().partitions(), 1);
        let e = decide(&ns, Some(4), rec(Some(8))).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("8 partition(s)") && text.contains("configured with 4"), "{text}");
        assert!(text.contains("tidemark:{orders}:meta"), "{text}");
    }

    #[test]
    fn a_repartition_under_way_refuses_every_layout() {
        let ns = Namespace::new("tidemark", "orders", 1);
        for (configured, partitions) in [(None, None), (Some(4), Some(4)), (None, Some(4)), (Some(16), None)] {
            let e = decide(&ns, configured, Record { partitions, repartitioning: Some(16) }).unwrap_err();
            assert!(matches!(e, LayoutError::Repartitioning { to: 16, .. }), "{e}");
            assert!(e.to_string().contains("tidemark repartition --to 16"), "{e}");
        }
    }
}
