//! A read-only snapshot of a namespace for `tidemark status`.

use redis::Value;
use serde::Serialize;

use super::{lease, Conn, Keys, Namespace, StoreError, INPUT_GROUP};

/// One consumer group as `XINFO GROUPS` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupInfo {
    /// Group name.
    pub name: String,
    /// Entries delivered to a consumer and not yet acknowledged.
    pub pending: u64,
    /// Entries not yet delivered to the group; `None` where Redis cannot
    /// tell (Redis < 7, or after some deletions).
    pub lag: Option<u64>,
    /// Consumers known to the group.
    pub consumers: u64,
    /// The last entry id delivered to the group.
    pub last_delivered_id: String,
}

/// The input stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InputInfo {
    /// Entries in `:in` (acknowledged ones stay until trimmed).
    pub length: u64,
    /// Entries read by a daemon and not yet applied.
    pub pending: u64,
    /// Entries no daemon has read yet.
    pub lag: Option<u64>,
    /// Daemons known to the input group.
    pub daemons: u64,
    /// Daemons holding a liveness lease: 0 means nothing serves the
    /// namespace (its input is never applied).
    pub live_daemons: u64,
}

/// A consumer of an output group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConsumerStatus {
    /// Consumer name.
    pub name: String,
    /// Entries delivered to it and not yet acknowledged.
    pub pending: u64,
    /// Milliseconds since it last read or claimed.
    pub idle_ms: u64,
    /// Whether its liveness lease is held: a consumer without one is dead
    /// (or not a tidemark consumer), and live consumers claim its entries.
    pub leased: bool,
}

/// The oldest entry still pending in a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OldestPending {
    /// Its entry id in `:out`.
    pub id: String,
    /// The consumer it was last delivered to.
    pub consumer: String,
    /// Milliseconds since that delivery.
    pub idle_ms: u64,
    /// How many times it has been delivered.
    pub deliveries: u64,
}

/// An output consumer group: how far it is, and who works on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OutputGroup {
    /// Group name.
    pub name: String,
    /// Entries delivered to a consumer and not yet acknowledged.
    pub pending: u64,
    /// Entries not yet delivered to the group; `None` where Redis cannot
    /// tell (Redis < 7, or after some deletions).
    pub lag: Option<u64>,
    /// The last entry id delivered to the group.
    pub last_delivered_id: String,
    /// The oldest pending entry, if any.
    pub oldest_pending: Option<OldestPending>,
    /// Its consumers with their lease state.
    pub consumers: Vec<ConsumerStatus>,
}

/// The output stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OutputInfo {
    /// Entries in `:out`.
    pub length: u64,
    /// Its consumer groups.
    pub groups: Vec<OutputGroup>,
}

/// One partition's row (namespaces with more than one partition).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartitionRow {
    /// Which partition.
    pub partition: u16,
    /// Its watermark, if one has arrived.
    pub watermark: Option<i64>,
    /// Elements waiting in its schedule.
    pub scheduled: u64,
    /// Entries in its `:in`.
    pub input_length: u64,
    /// Its input entries no daemon has read yet.
    pub input_lag: Option<u64>,
    /// Entries in its `:out`.
    pub output_length: u64,
    /// Entries in its `:dead`.
    pub dead_letters: u64,
    /// The daemon that owns it (applies its input), if any.
    pub owner: Option<String>,
}

/// Everything `tidemark status` shows: a namespace, with every partition's
/// figures added up (the watermark is the lowest partition's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Status {
    /// The namespace.
    pub namespace: String,
    /// How many partitions it has.
    pub partitions: u16,
    /// The watermark, if one has arrived: the lowest of the partitions'
    /// (none until every partition has one).
    pub watermark: Option<i64>,
    /// The highest partition watermark minus the lowest (0 with one
    /// partition; absent until every partition has one).
    pub watermark_spread: Option<i64>,
    /// Live daemons (registered, lease not expired), by name.
    pub daemons: Vec<String>,
    /// Elements waiting in the schedule.
    pub scheduled: u64,
    /// The smallest scheduled ts, if any.
    pub next_due_ts: Option<i64>,
    /// The input stream.
    pub input: InputInfo,
    /// The output stream.
    pub output: OutputInfo,
    /// Entries in `:dead`.
    pub dead_letters: u64,
    /// Each partition's row (empty with one partition).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub by_partition: Vec<PartitionRow>,
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

fn number(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        other => text(other)?.parse().ok(),
    }
}

/// Reads `XINFO GROUPS` (empty when the stream does not exist).
pub async fn groups(conn: &mut Conn, stream: &str) -> Result<Vec<GroupInfo>, StoreError> {
    let reply: Result<Value, redis::RedisError> = redis::cmd("XINFO").arg("GROUPS").arg(stream).query_async(conn).await;
    let reply = match reply {
        Ok(v) => v,
        Err(e) if e.to_string().contains("no such key") => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let Value::Array(groups) = reply else {
        return Ok(Vec::new());
    };
    Ok(groups
        .iter()
        .map(|g| {
            let pairs: Vec<(&Value, &Value)> = match g {
                Value::Array(flat) => flat.chunks(2).filter_map(|c| Some((c.first()?, c.get(1)?))).collect(),
                Value::Map(m) => m.iter().map(|(k, v)| (k, v)).collect(),
                _ => Vec::new(),
            };
            let get = |name: &str| pairs.iter().find(|(k, _)| text(k).as_deref() == Some(name)).map(|(_, v)| *v);
            GroupInfo {
                name: get("name").and_then(text).unwrap_or_default(),
                pending: get("pending").and_then(number).unwrap_or(0),
                lag: get("lag").and_then(number),
                consumers: get("consumers").and_then(number).unwrap_or(0),
                last_delivered_id: get("last-delivered-id").and_then(text).unwrap_or_default(),
            }
        })
        .collect())
}

/// The oldest pending entry of `group` on `stream` (`XPENDING … - + 1`).
async fn oldest_pending(conn: &mut Conn, stream: &str, group: &str) -> Result<Option<OldestPending>, StoreError> {
    let reply: Result<Vec<(String, String, u64, u64)>, redis::RedisError> =
        redis::cmd("XPENDING").arg(stream).arg(group).arg("-").arg("+").arg(1).query_async(conn).await;
    match reply {
        Ok(entries) => Ok(entries.into_iter().next().map(|(id, consumer, idle_ms, deliveries)| OldestPending {
            id,
            consumer,
            idle_ms,
            deliveries,
        })),
        // The group vanished since XINFO GROUPS.
        Err(e) if e.code() == Some("NOGROUP") => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Reads one output group's pending entries and consumers.
async fn output_group(conn: &mut Conn, keys: &Keys, g: GroupInfo) -> Result<OutputGroup, StoreError> {
    let oldest_pending = oldest_pending(conn, &keys.out, &g.name).await?;
    let consumers = lease::peers(conn, keys, &keys.out, "out", &g.name)
        .await?
        .into_iter()
        .map(|p| ConsumerStatus { name: p.name, pending: p.pending, idle_ms: p.idle_ms, leased: p.leased })
        .collect();
    Ok(OutputGroup {
        name: g.name,
        pending: g.pending,
        lag: g.lag,
        last_delivered_id: g.last_delivered_id,
        oldest_pending,
        consumers,
    })
}

/// Takes a snapshot of namespace `ns`: every partition at once, added up.
pub async fn snapshot(conn: &mut Conn, ns: &Namespace) -> Result<Status, StoreError> {
    let partitions = ns.all();
    let parts = futures::future::join_all(partitions.iter().map(|keys| {
        let mut c = conn.clone();
        async move { partition_snapshot(&mut c, keys).await }
    }))
    .await
    .into_iter()
    .collect::<Result<Vec<_>, _>>()?;
    let owners = futures::future::join_all(partitions.iter().map(|keys| {
        let mut c = conn.clone();
        async move { redis::cmd("GET").arg(keys.owner()).query_async::<Option<String>>(&mut c).await }
    }))
    .await
    .into_iter()
    .collect::<Result<Vec<_>, _>>()?;
    let registered: Vec<(String, f64)> =
        redis::cmd("ZRANGE").arg(ns.daemons()).arg(0).arg(-1).arg("WITHSCORES").query_async(conn).await?;
    let now = super::retention::server_time_ms(conn, &ns.daemons()).await? as f64;
    let daemons: Vec<String> = registered.into_iter().filter(|(_, until)| *until > now).map(|(d, _)| d).collect();
    Ok(combine(ns, parts, owners, daemons))
}

/// Adds up the partitions' snapshots.
fn combine(ns: &Namespace, parts: Vec<Status>, owners: Vec<Option<String>>, daemons: Vec<String>) -> Status {
    let watermarks: Option<Vec<i64>> = parts.iter().map(|p| p.watermark).collect();
    let (watermark, watermark_spread) = match watermarks {
        Some(w) if !w.is_empty() => {
            let (lo, hi) = (*w.iter().min().expect("non-empty"), *w.iter().max().expect("non-empty"));
            (Some(lo), Some(hi - lo))
        }
        _ => (None, None),
    };
    let sum_opt = |f: &dyn Fn(&Status) -> Option<u64>| -> Option<u64> { parts.iter().map(f).sum() };
    let mut groups: Vec<OutputGroup> = Vec::new();
    for g in parts.iter().flat_map(|p| p.output.groups.iter()) {
        match groups.iter_mut().find(|have| have.name == g.name) {
            None => groups.push(g.clone()),
            Some(have) => {
                have.pending += g.pending;
                have.lag = have.lag.zip(g.lag).map(|(a, b)| a + b);
                if g.last_delivered_id > have.last_delivered_id {
                    have.last_delivered_id = g.last_delivered_id.clone();
                }
                let older = match (&have.oldest_pending, &g.oldest_pending) {
                    (Some(a), Some(b)) => b.idle_ms > a.idle_ms,
                    (None, Some(_)) => true,
                    _ => false,
                };
                if older {
                    have.oldest_pending = g.oldest_pending.clone();
                }
                for c in &g.consumers {
                    match have.consumers.iter_mut().find(|h| h.name == c.name) {
                        None => have.consumers.push(c.clone()),
                        Some(h) => {
                            h.pending += c.pending;
                            h.idle_ms = h.idle_ms.min(c.idle_ms);
                            h.leased |= c.leased;
                        }
                    }
                }
            }
        }
    }
    let owner_name = |o: &Option<String>| o.as_deref().map(|t| t.rsplit_once(':').map_or(t, |(n, _)| n).to_owned());
    let by_partition = if parts.len() > 1 {
        parts
            .iter()
            .zip(&owners)
            .enumerate()
            .map(|(p, (s, o))| PartitionRow {
                partition: p as u16,
                watermark: s.watermark,
                scheduled: s.scheduled,
                input_length: s.input.length,
                input_lag: s.input.lag,
                output_length: s.output.length,
                dead_letters: s.dead_letters,
                owner: owner_name(o),
            })
            .collect()
    } else {
        Vec::new()
    };
    // Daemons of versions without the registry show up in the input group.
    let readers = parts.iter().map(|p| p.input.daemons).max().unwrap_or(0);
    Status {
        namespace: ns.name().to_owned(),
        partitions: ns.partitions(),
        watermark,
        watermark_spread,
        scheduled: parts.iter().map(|p| p.scheduled).sum(),
        next_due_ts: parts.iter().filter_map(|p| p.next_due_ts).min(),
        input: InputInfo {
            length: parts.iter().map(|p| p.input.length).sum(),
            pending: parts.iter().map(|p| p.input.pending).sum(),
            lag: sum_opt(&|p| p.input.lag),
            daemons: (daemons.len() as u64).max(readers),
            live_daemons: (daemons.len() as u64).max(parts.iter().map(|p| p.input.live_daemons).max().unwrap_or(0)),
        },
        output: OutputInfo { length: parts.iter().map(|p| p.output.length).sum(), groups },
        dead_letters: parts.iter().map(|p| p.dead_letters).sum(),
        daemons,
        by_partition,
    }
}

/// Takes a snapshot of one partition (`daemons` and the partition rows
/// are left empty).
pub async fn partition_snapshot(conn: &mut Conn, keys: &Keys) -> Result<Status, StoreError> {
    #[allow(clippy::type_complexity)]
    let (wm, scheduled, first, in_len, out_len, dead_len): (
        Option<String>,
        u64,
        Vec<(String, f64)>,
        u64,
        u64,
        u64,
    ) = redis::pipe()
        .get(&keys.wm)
        .zcard(&keys.sched)
        .cmd("ZRANGE")
        .arg(&keys.sched)
        .arg(0)
        .arg(0)
        .arg("WITHSCORES")
        .xlen(&keys.input)
        .xlen(&keys.out)
        .xlen(&keys.dead)
        .query_async(conn)
        .await?;
    let input_group = groups(conn, &keys.input).await?.into_iter().find(|g| g.name == INPUT_GROUP);
    let live_daemons = match input_group {
        Some(_) => super::serving::leased_readers(conn, keys).await?,
        None => 0,
    };
    let mut out_groups = Vec::new();
    for g in groups(conn, &keys.out).await? {
        out_groups.push(output_group(conn, keys, g).await?);
    }
    let watermark = wm.and_then(|w| w.parse().ok());
    Ok(Status {
        namespace: keys.namespace.clone(),
        partitions: 1,
        watermark,
        watermark_spread: watermark.map(|_| 0),
        daemons: Vec::new(),
        by_partition: Vec::new(),
        scheduled,
        next_due_ts: first.first().map(|(_, score)| *score as i64),
        input: InputInfo {
            length: in_len,
            pending: input_group.as_ref().map_or(0, |g| g.pending),
            lag: match &input_group {
                Some(g) => g.lag,
                None => Some(in_len),
            },
            daemons: input_group.as_ref().map_or(0, |g| g.consumers),
            live_daemons,
        },
        output: OutputInfo { length: out_len, groups: out_groups },
        dead_letters: dead_len,
    })
}

/// Formats a count with thousands separators: `1234567` → `1,234,567`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn opt(n: Option<u64>) -> String {
    n.map_or_else(|| "n/a".into(), thousands)
}

/// A short human duration: `850ms`, `4.2s`, `3m05s`, `2h07m`, `3d04h`.
pub fn human_ms(ms: u64) -> String {
    const MIN: u64 = 60_000;
    const HOUR: u64 = 60 * MIN;
    const DAY: u64 = 24 * HOUR;
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..MIN => format!("{}.{}s", ms / 1_000, ms % 1_000 / 100),
        MIN..HOUR => format!("{}m{:02}s", ms / MIN, ms % MIN / 1_000),
        HOUR..DAY => format!("{}h{:02}m", ms / HOUR, ms % HOUR / MIN),
        _ => format!("{}d{:02}h", ms / DAY, ms % DAY / HOUR),
    }
}

/// Renders a status as an aligned, human-readable table.
pub fn render(s: &Status) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let mut row = |label: &str, value: String| {
        let _ = writeln!(out, "{label:<16}{value}");
    };
    row("namespace", s.namespace.clone());
    if s.partitions > 1 {
        row("partitions", s.partitions.to_string());
    }
    row(
        "watermark",
        match (s.watermark, s.watermark_spread) {
            (None, _) if s.partitions > 1 => "none yet (not every partition has one; nothing is due)".into(),
            (None, _) => "none yet (nothing is due)".into(),
            (Some(w), Some(spread)) if s.partitions > 1 => {
                format!("{w} (lowest partition; highest is {spread} ahead)")
            }
            (Some(w), _) => w.to_string(),
        },
    );
    if !s.daemons.is_empty() {
        row("daemons", s.daemons.join(", "));
    }
    row(
        "scheduled",
        match s.next_due_ts {
            Some(ts) => format!("{} (next due at ts {ts})", thousands(s.scheduled)),
            None => thousands(s.scheduled),
        },
    );
    row(
        "input",
        format!(
            "length {}  pending {}  lag {}  daemons {} ({} alive)",
            thousands(s.input.length),
            thousands(s.input.pending),
            opt(s.input.lag),
            s.input.daemons,
            s.input.live_daemons
        ),
    );
    if s.input.live_daemons == 0 {
        row(
            "serving",
            format!(
                "NO DAEMON serves namespace {:?}: nothing is applied or released until one runs \
                 (tidemark --namespace {} run)",
                s.namespace, s.namespace
            ),
        );
    }
    row("output", format!("length {}", thousands(s.output.length)));
    let width = s.output.groups.iter().map(|g| g.name.len()).max().unwrap_or(0);
    for g in &s.output.groups {
        let mut line = format!(
            "{:<width$}  pending {}  lag {}  consumers {}",
            g.name,
            thousands(g.pending),
            opt(g.lag),
            g.consumers.len()
        );
        if let Some(o) = &g.oldest_pending {
            let _ = write!(
                line,
                "  oldest pending idle {} ({} at {}, deliveries {})",
                human_ms(o.idle_ms),
                o.id,
                o.consumer,
                o.deliveries
            );
        }
        row("  group", line);
        let cwidth = g.consumers.iter().map(|c| c.name.len()).max().unwrap_or(0);
        for c in &g.consumers {
            row(
                "    consumer",
                format!(
                    "{:<cwidth$}  pending {}  idle {}  {}",
                    c.name,
                    thousands(c.pending),
                    human_ms(c.idle_ms),
                    if c.leased { "lease held (alive)" } else { "no lease (dead or not a tidemark consumer)" }
                ),
            );
        }
    }
    if s.output.groups.is_empty() {
        row("  group", "(none: configure daemon.groups or run with --group)".into());
    }
    row("dead letters", thousands(s.dead_letters));
    if !s.by_partition.is_empty() {
        let _ = writeln!(
            out,
            "\n{:>9}  {:>20}  {:>12}  {:>10}  {:>10}  {:>10}  {:>8}  owner",
            "partition", "watermark", "scheduled", "input", "input lag", "output", "dead"
        );
        for p in &s.by_partition {
            let _ = writeln!(
                out,
                "{:>9}  {:>20}  {:>12}  {:>10}  {:>10}  {:>10}  {:>8}  {}",
                p.partition,
                p.watermark.map_or_else(|| "-".into(), |w| w.to_string()),
                thousands(p.scheduled),
                thousands(p.input_length),
                opt(p.input_lag),
                thousands(p.output_length),
                thousands(p.dead_letters),
                p.owner.as_deref().unwrap_or("-")
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1234567), "1,234,567");
    }

    #[test]
    fn human_durations() {
        assert_eq!(human_ms(0), "0ms");
        assert_eq!(human_ms(999), "999ms");
        assert_eq!(human_ms(1_000), "1.0s");
        assert_eq!(human_ms(4_250), "4.2s");
        assert_eq!(human_ms(59_999), "59.9s");
        assert_eq!(human_ms(185_000), "3m05s");
        assert_eq!(human_ms(2 * 3_600_000 + 7 * 60_000 + 5_000), "2h07m");
        assert_eq!(human_ms(3 * 86_400_000 + 4 * 3_600_000), "3d04h");
        assert_eq!(human_ms(u64::MAX), "213503982334d14h");
    }
}
