//! A read-only snapshot of a namespace for `tidemark status`.

use redis::Value;
use serde::Serialize;

use super::{lease, Conn, Keys, StoreError, INPUT_GROUP};

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

/// Everything `tidemark status` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Status {
    /// The namespace.
    pub namespace: String,
    /// The watermark, if one has arrived.
    pub watermark: Option<i64>,
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

/// Takes a snapshot of namespace `keys`.
pub async fn snapshot(conn: &mut Conn, keys: &Keys) -> Result<Status, StoreError> {
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
        Some(_) => super::serving::live_daemons(conn, keys).await?,
        None => 0,
    };
    let mut out_groups = Vec::new();
    for g in groups(conn, &keys.out).await? {
        out_groups.push(output_group(conn, keys, g).await?);
    }
    Ok(Status {
        namespace: keys.namespace.clone(),
        watermark: wm.and_then(|w| w.parse().ok()),
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
    row("watermark", s.watermark.map_or_else(|| "none yet (nothing is due)".into(), |w| w.to_string()));
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
