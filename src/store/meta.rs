//! The namespace's meta record (`<prefix>:{NS}:meta`, a hash): how many
//! partitions it has, written once by the first daemon, so that every
//! process agrees on the layout (DESIGN §7).

use super::{Conn, Namespace, StoreError};

/// The configured partition count disagrees with the namespace's record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "namespace {namespace:?} has {recorded} partition(s) (recorded in {key}), but this process is configured with \
     {configured}: use partitions = {recorded}, or grow the namespace with `tidemark repartition --to {configured}`"
)]
pub struct LayoutError {
    /// The namespace.
    pub namespace: String,
    /// The meta key.
    pub key: String,
    /// What the record says.
    pub recorded: u16,
    /// What this process was configured with.
    pub configured: u16,
}

/// The partition count in the meta record, if any.
pub async fn recorded(conn: &mut Conn, ns: &Namespace) -> Result<Option<u16>, StoreError> {
    let raw: Option<String> = redis::cmd("HGET").arg(ns.meta()).arg("partitions").query_async(conn).await?;
    raw.map(|r| r.parse::<u16>().map_err(|_| StoreError::Reply(format!("{}: partitions = {r:?}", ns.meta()))))
        .transpose()
}

/// The namespace's layout: `configured` partitions (if set) checked
/// against the record, or the recorded count, or 1. With `record`, the
/// count is written when no record exists yet (the first daemon does that;
/// a race between two first daemons is settled by `HSETNX`).
pub async fn resolve(
    conn: &mut Conn,
    ns: &Namespace,
    configured: Option<u16>,
    record: bool,
) -> Result<Result<Namespace, LayoutError>, StoreError> {
    let mut found = recorded(conn, ns).await?;
    if found.is_none() && record {
        let count = configured.unwrap_or(1);
        let _: i64 = redis::cmd("HSETNX").arg(ns.meta()).arg("partitions").arg(count).query_async(conn).await?;
        found = recorded(conn, ns).await?;
    }
    Ok(decide(ns, configured, found))
}

/// Writes the record (after `repartition`), replacing any earlier one.
pub async fn write(conn: &mut Conn, ns: &Namespace) -> Result<(), StoreError> {
    let _: i64 = redis::cmd("HSET").arg(ns.meta()).arg("partitions").arg(ns.partitions()).query_async(conn).await?;
    Ok(())
}

fn decide(ns: &Namespace, configured: Option<u16>, found: Option<u16>) -> Result<Namespace, LayoutError> {
    match (configured, found) {
        (Some(c), Some(r)) if c != r => {
            Err(LayoutError { namespace: ns.name().to_owned(), key: ns.meta(), recorded: r, configured: c })
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
        assert_eq!(decide(&ns, None, Some(8)).unwrap().partitions(), 8);
        assert_eq!(decide(&ns, Some(8), Some(8)).unwrap().partitions(), 8);
        assert_eq!(decide(&ns, Some(4), None).unwrap().partitions(), 4);
        assert_eq!(decide(&ns, None, None).unwrap().partitions(), 1);
        let e = decide(&ns, Some(4), Some(8)).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("8 partition(s)") && text.contains("configured with 4"), "{text}");
        assert!(text.contains("tidemark:{orders}:meta"), "{text}");
    }
}
