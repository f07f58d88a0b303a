//! A read-only snapshot of a namespace for `tidemark status`.

use redis::aio::MultiplexedConnection;
use redis::Value;
use serde::Serialize;

use super::{Keys, StoreError, INPUT_GROUP};

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
}

/// The output stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OutputInfo {
    /// Entries in `:out`.
    pub length: u64,
    /// Its consumer groups.
    pub groups: Vec<GroupInfo>,
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
pub async fn groups(conn: &mut MultiplexedConnection, stream: &str) -> Result<Vec<GroupInfo>, StoreError> {
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

/// Takes a snapshot of namespace `keys`.
pub async fn snapshot(conn: &mut MultiplexedConnection, keys: &Keys) -> Result<Status, StoreError> {
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
    let out_groups = groups(conn, &keys.out).await?;
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
            "length {}  pending {}  lag {}  daemons {}",
            thousands(s.input.length),
            thousands(s.input.pending),
            opt(s.input.lag),
            s.input.daemons
        ),
    );
    row("output", format!("length {}", thousands(s.output.length)));
    let width = s.output.groups.iter().map(|g| g.name.len()).max().unwrap_or(0);
    for g in &s.output.groups {
        row(
            "  group",
            format!(
                "{:<width$}  pending {}  lag {}  consumers {}",
                g.name,
                thousands(g.pending),
                opt(g.lag),
                g.consumers
            ),
        );
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
}
