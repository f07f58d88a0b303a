//! Whether any daemon serves a namespace: one holding a liveness lease in
//! its input group. A namespace nobody serves (a typo in `--namespace`, a
//! daemon that is down) takes input that is never applied, so the CLI warns
//! and `status` and the dashboard say so.

use std::collections::BTreeSet;

use super::{lease, Conn, Keys, Namespace, StoreError, INPUT_GROUP};

/// Most `SCAN` calls [`served_namespaces`] makes (of 1,000 keys each), so
/// a huge keyspace costs a bounded amount of work.
const SCAN_CALLS: usize = 100;

/// How many daemons serve namespace `ns`: those registered and not
/// expired (standby daemons included), or, for daemons of versions
/// without the registry, those holding a liveness lease in the input group.
pub async fn live_daemons(conn: &mut Conn, ns: &Namespace) -> Result<u64, StoreError> {
    let now = super::retention::server_time_ms(conn, &ns.daemons()).await?;
    let registered: u64 =
        redis::cmd("ZCOUNT").arg(ns.daemons()).arg(format!("({now}")).arg("+inf").query_async(conn).await?;
    if registered > 0 {
        return Ok(registered);
    }
    leased_readers(conn, &ns.partition(0)).await
}

/// How many consumers of a partition's input group hold a daemon's
/// liveness lease.
pub async fn leased_readers(conn: &mut Conn, keys: &Keys) -> Result<u64, StoreError> {
    let peers = lease::peers(conn, keys, &keys.input, "in", INPUT_GROUP).await?;
    Ok(peers.iter().filter(|p| p.leased).count() as u64)
}

/// The namespaces under `keys`' prefix that some daemon serves right now,
/// sorted, as far as a bounded `SCAN` finds them (`complete` is false when
/// it stopped before the end of the keyspace).
pub async fn served_namespaces(conn: &mut Conn, keys: &Keys) -> Result<(Vec<String>, bool), StoreError> {
    let pattern = keys.daemon_leases_everywhere();
    let mut found = BTreeSet::new();
    let mut cursor: u64 = 0;
    for _ in 0..SCAN_CALLS {
        let (next, batch): (u64, Vec<String>) =
            redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(&pattern).arg("COUNT").arg(1000).query_async(conn).await?;
        found.extend(batch.iter().filter_map(|k| keys.namespace_of_daemon_lease(k)).map(str::to_owned));
        if next == 0 {
            return Ok((found.into_iter().collect(), true));
        }
        cursor = next;
    }
    Ok((found.into_iter().collect(), false))
}

/// The warning for input written to a namespace no daemon serves, naming
/// the namespaces that are served (`served` as [`served_namespaces`]
/// returns it).
pub fn nobody_serves(keys: &Keys, served: &(Vec<String>, bool)) -> String {
    let ns = &keys.namespace;
    let mut text = format!(
        "no daemon is serving namespace {ns:?} (none holds a lease {}): what is written to {} waits there until \
         one runs (tidemark --namespace {ns} run)",
        keys.lease("in", INPUT_GROUP, "*"),
        keys.input
    );
    let (names, complete) = served;
    let others: Vec<&str> = names.iter().map(String::as_str).filter(|n| n != ns).collect();
    if others.is_empty() {
        text.push_str(if *complete { "; no namespace on this Redis has a daemon" } else { "" });
    } else {
        text.push_str(&format!("; namespaces with a daemon: {}", others.join(", ")));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_warning_names_the_served_namespaces() {
        let keys = Keys::new("tidemark", "nosuch");
        let text = nobody_serves(&keys, &(vec!["default".into(), "orders".into()], true));
        assert_eq!(
            text,
            "no daemon is serving namespace \"nosuch\" (none holds a lease tidemark:{nosuch}:lease:in:tidemark:*): \
             what is written to tidemark:{nosuch}:in waits there until one runs (tidemark --namespace nosuch run); \
             namespaces with a daemon: default, orders"
        );
        let text = nobody_serves(&keys, &(Vec::new(), true));
        assert!(text.ends_with("; no namespace on this Redis has a daemon"), "{text}");
        let text = nobody_serves(&keys, &(Vec::new(), false));
        assert!(text.ends_with("nosuch run)"), "{text}");
    }
}
