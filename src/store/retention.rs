//! Retention: which stream entries may be trimmed (pure, from each consumer
//! group's position), and the Redis reads and bounded trims housekeeping
//! runs on `:in`, `:out` and `:dead`.
//!
//! A group still needs every entry it has pending (delivered, not
//! acknowledged) and every entry after its last-delivered id (unread). The
//! smallest such id is the group's *floor*; a stream may be trimmed below
//! the smallest floor of its groups and never above it.

use std::time::Duration;

use redis::Value;

use super::{entries, status, Conn, StoreError};
use crate::core::EntryId;

/// Most `XTRIM` calls per stream in one housekeeping pass. Each call removes
/// at most Redis's own limit for approximate trims (100 stream nodes, 10,000
/// entries by default), so Redis is never blocked for long and a huge
/// backlog is worked off over a few passes.
pub const MAX_TRIM_CALLS: usize = 100;

/// Where one consumer group stands on a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupCursor {
    /// Group name.
    pub name: String,
    /// The last entry delivered to the group (`XINFO GROUPS`
    /// `last-delivered-id`); everything after it is unread.
    pub last_delivered: EntryId,
    /// Its oldest pending entry (`XPENDING` summary), if any.
    pub oldest_pending: Option<EntryId>,
}

impl GroupCursor {
    /// The smallest entry id the group may still need: its oldest pending
    /// entry, or else the first id after its last-delivered one.
    pub fn floor(&self) -> EntryId {
        let first_unread = next_id(self.last_delivered);
        self.oldest_pending.map_or(first_unread, |p| p.min(first_unread))
    }
}

/// The smallest id greater than `id`.
pub fn next_id(id: EntryId) -> EntryId {
    match id.seq.checked_add(1) {
        Some(seq) => EntryId { ms: id.ms, seq },
        None => EntryId { ms: id.ms.saturating_add(1), seq: 0 },
    }
}

/// The first id not older than `max_age` at server time `now_ms`: entries
/// below it are older (their id's milliseconds are Redis's clock at `XADD`).
pub fn age_floor(now_ms: u64, max_age: Duration) -> EntryId {
    let age_ms = u64::try_from(max_age.as_millis()).unwrap_or(u64::MAX);
    EntryId { ms: now_ms.saturating_sub(age_ms), seq: 0 }
}

/// A planned trim of the output stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputTrim {
    /// Remove entries with ids below this (`XTRIM MINID`).
    pub min_id: EntryId,
    /// Groups whose floor is below `min_id` (only when the age limit binds):
    /// they may lose entries they have not acknowledged. Name and floor.
    pub overtaken: Vec<(String, EntryId)>,
}

/// Plans the output trim. `below_acknowledged`: trim below the smallest
/// group floor (never with no groups at all: then nobody has read anything,
/// and a group created later would expect the history). `age_floor`: also
/// trim below this id even past groups that fell behind. `None` when
/// nothing is to be trimmed.
pub fn plan_output_trim(
    groups: &[GroupCursor],
    below_acknowledged: bool,
    age_floor: Option<EntryId>,
) -> Option<OutputTrim> {
    let acknowledged = if below_acknowledged { groups.iter().map(GroupCursor::floor).min() } else { None };
    let min_id = acknowledged.into_iter().chain(age_floor).max()?;
    let overtaken = groups.iter().filter(|g| g.floor() < min_id).map(|g| (g.name.clone(), g.floor())).collect();
    Some(OutputTrim { min_id, overtaken })
}

/// Reads where each group of `stream` stands. `None` when a group vanished
/// between the two reads (try again next pass).
///
/// Group positions are read before pending lists: an entry delivered in
/// between lies after the last-delivered id read first, so it counts as
/// unread; one delivered before is in the pending list read second unless
/// it was acknowledged meanwhile. Either way no needed entry falls below
/// the floor.
pub async fn cursors(conn: &mut Conn, stream: &str) -> Result<Option<Vec<GroupCursor>>, StoreError> {
    let groups = status::groups(conn, stream).await?;
    if groups.is_empty() {
        return Ok(Some(Vec::new()));
    }
    let mut last = Vec::with_capacity(groups.len());
    for g in &groups {
        let id = g
            .last_delivered_id
            .parse::<EntryId>()
            .map_err(|e| StoreError::Reply(format!("group {} of {stream} has last-delivered-id {e}", g.name)))?;
        last.push(id);
    }
    let mut pipe = redis::pipe();
    for g in &groups {
        pipe.cmd("XPENDING").arg(stream).arg(&g.name);
    }
    let summaries: Vec<Value> = match pipe.query_async(conn).await {
        Ok(v) => v,
        Err(e) if e.code() == Some("NOGROUP") => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    if summaries.len() != groups.len() {
        return Err(StoreError::Reply(format!("{} XPENDING replies for {} groups", summaries.len(), groups.len())));
    }
    groups
        .into_iter()
        .zip(last)
        .zip(summaries)
        .map(|((g, last_delivered), summary)| {
            Ok(GroupCursor { oldest_pending: oldest_pending(summary)?, name: g.name, last_delivered })
        })
        .collect::<Result<Vec<_>, StoreError>>()
        .map(Some)
}

/// The smallest id of an `XPENDING key group` summary:
/// `[count, smallest | nil, greatest | nil, consumers | nil]`.
fn oldest_pending(summary: Value) -> Result<Option<EntryId>, StoreError> {
    let Value::Array(parts) = summary else {
        return Err(StoreError::Reply(format!("XPENDING summary: expected an array, got {summary:?}")));
    };
    match parts.into_iter().nth(1) {
        None | Some(Value::Nil) => Ok(None),
        Some(id) => entries::entry_id(id).map(Some),
    }
}

/// Removes entries below `min_id` from `stream`, approximately (`~`: whole
/// stream nodes only, so it may keep a few entries below `min_id`, never
/// removing one at or above it), in bounded calls. Returns how many it
/// removed.
pub async fn trim_below(conn: &mut Conn, stream: &str, min_id: EntryId) -> Result<u64, StoreError> {
    let min_id = min_id.to_string();
    trim_loop(conn, |cmd| {
        cmd.arg(stream).arg("MINID").arg("~").arg(&min_id);
    })
    .await
}

/// Caps `stream` at about `max_len` entries (`MAXLEN ~`: it may keep a few
/// more), oldest first, in bounded calls. Returns how many it removed.
pub async fn cap_length(conn: &mut Conn, stream: &str, max_len: u64) -> Result<u64, StoreError> {
    trim_loop(conn, |cmd| {
        cmd.arg(stream).arg("MAXLEN").arg("~").arg(max_len);
    })
    .await
}

async fn trim_loop(conn: &mut Conn, args: impl Fn(&mut redis::Cmd)) -> Result<u64, StoreError> {
    let mut total = 0;
    for _ in 0..MAX_TRIM_CALLS {
        let mut cmd = redis::cmd("XTRIM");
        args(&mut cmd);
        let removed: u64 = cmd.query_async(conn).await?;
        total += removed;
        if removed == 0 {
            break;
        }
    }
    Ok(total)
}

/// The clock in milliseconds (`TIME`) of the Redis server that holds `key`.
pub async fn server_time_ms(conn: &mut Conn, key: &str) -> Result<u64, StoreError> {
    let (secs, micros): (u64, u64) = conn.query_at(key, &redis::cmd("TIME")).await?;
    Ok(secs.saturating_mul(1000).saturating_add(micros / 1000))
}

/// The first id of each range `[from, below)` of `stream`, one round trip
/// for all of them; `None` for an empty range.
pub async fn first_ids_in(
    conn: &mut Conn,
    stream: &str,
    ranges: &[(EntryId, EntryId)],
) -> Result<Vec<Option<EntryId>>, StoreError> {
    if ranges.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for (from, below) in ranges {
        pipe.cmd("XRANGE").arg(stream).arg(from.to_string()).arg(format!("({below}")).arg("COUNT").arg(1);
    }
    let replies: Vec<Value> = pipe.query_async(conn).await?;
    replies.into_iter().map(|r| Ok(entries::decode_entries(r)?.first().map(|e| e.id))).collect()
}

/// The id of the oldest entry of `stream`, `None` if it is empty.
pub async fn first_id(conn: &mut Conn, stream: &str) -> Result<Option<EntryId>, StoreError> {
    let reply: Value = redis::cmd("XRANGE").arg(stream).arg("-").arg("+").arg("COUNT").arg(1).query_async(conn).await?;
    Ok(entries::decode_entries(reply)?.first().map(|e| e.id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> EntryId {
        s.parse().expect("test id")
    }

    fn group(name: &str, last: &str, pending: Option<&str>) -> GroupCursor {
        GroupCursor { name: name.into(), last_delivered: id(last), oldest_pending: pending.map(id) }
    }

    #[test]
    fn next_id_steps_the_sequence_then_the_milliseconds() {
        assert_eq!(next_id(id("5-0")), id("5-1"));
        assert_eq!(next_id(id("5-7")), id("5-8"));
        assert_eq!(next_id(EntryId { ms: 5, seq: u64::MAX }), id("6-0"));
        assert_eq!(next_id(EntryId::ZERO), id("0-1"));
    }

    #[test]
    fn group_floor_is_the_oldest_pending_or_first_unread_entry() {
        // (last delivered, oldest pending, floor)
        let cases = [
            // Never read: everything is needed (the stream's ids are > 0-0).
            ("0-0", None, "0-1"),
            // Read and acknowledged everything up to 10-3.
            ("10-3", None, "10-4"),
            // A pending entry older than the last delivered one.
            ("10-3", Some("7-0"), "7-0"),
            // Same milliseconds, different sequence.
            ("10-3", Some("10-1"), "10-1"),
            ("10-3", Some("10-3"), "10-3"),
            // Oldest pending is the last delivered one's neighbour.
            ("10-0", Some("9-18446744073709551615"), "9-18446744073709551615"),
        ];
        for (last, pending, floor) in cases {
            assert_eq!(group("g", last, pending).floor(), id(floor), "last {last}, pending {pending:?}");
        }
    }

    #[test]
    fn output_trim_stays_below_every_group_floor() {
        // (groups as (last delivered, oldest pending), expected trim id)
        type Case<'a> = (&'a [(&'a str, Option<&'a str>)], Option<&'a str>);
        let cases: &[Case] = &[
            // No groups: nobody has read anything, keep everything.
            (&[], None),
            // One group that acknowledged everything it read.
            (&[("20-0", None)], Some("20-1")),
            // A fast group and a slow group with pending entries.
            (&[("20-0", None), ("15-2", Some("12-0"))], Some("12-0")),
            // A group that read without acknowledging.
            (&[("20-0", None), ("18-0", Some("3-5"))], Some("3-5")),
            // A group that never read keeps everything.
            (&[("20-0", None), ("0-0", None)], Some("0-1")),
            // Pending entries in the same millisecond: the smaller sequence wins.
            (&[("30-4", Some("30-2")), ("30-4", Some("30-1"))], Some("30-1")),
            // Unread beats pending when it is older.
            (&[("30-4", Some("30-2")), ("29-9", None)], Some("29-10")),
        ];
        for (spec, expected) in cases {
            let groups: Vec<GroupCursor> =
                spec.iter().enumerate().map(|(i, (last, p))| group(&format!("g{i}"), last, *p)).collect();
            let plan = plan_output_trim(&groups, true, None);
            assert_eq!(plan.as_ref().map(|p| p.min_id), expected.map(id), "groups {spec:?}");
            if let Some(plan) = plan {
                assert!(plan.overtaken.is_empty(), "no age limit, so no group is overtaken: {plan:?}");
                for g in &groups {
                    assert!(plan.min_id <= g.floor(), "trim {} passes group {g:?}", plan.min_id);
                }
            }
        }
    }

    #[test]
    fn trimming_below_acknowledged_can_be_turned_off() {
        let groups = [group("a", "20-0", None)];
        assert_eq!(plan_output_trim(&groups, false, None), None);
    }

    #[test]
    fn age_limit_trims_past_groups_that_fell_behind_and_names_them() {
        let groups = [group("fast", "100-0", None), group("slow", "60-0", Some("40-0")), group("idle", "0-0", None)];
        let plan = plan_output_trim(&groups, true, Some(id("50-0"))).expect("a trim");
        assert_eq!(plan.min_id, id("50-0"));
        assert_eq!(plan.overtaken, vec![("slow".to_string(), id("40-0")), ("idle".to_string(), id("0-1"))]);

        // An age floor below every group floor changes nothing.
        let plan = plan_output_trim(&groups[..1], true, Some(id("50-0"))).expect("a trim");
        assert_eq!(plan, OutputTrim { min_id: id("100-1"), overtaken: vec![] });

        // The age limit applies without groups, and without trim_output.
        assert_eq!(plan_output_trim(&[], true, Some(id("50-0"))).map(|p| p.min_id), Some(id("50-0")));
        let plan = plan_output_trim(&groups, false, Some(id("50-0"))).expect("a trim");
        assert_eq!(plan.overtaken.len(), 2);
    }

    #[test]
    fn age_floor_uses_whole_milliseconds() {
        assert_eq!(age_floor(10_000, Duration::from_millis(2_500)), id("7500-0"));
        assert_eq!(age_floor(1_000, Duration::from_secs(3600)), id("0-0"));
        assert_eq!(age_floor(1_000, Duration::MAX), id("0-0"));
    }
}
