//! `tidemark dead list | replay`: shows the dead-letter stream and sends
//! dead letters back where they came from (`:in`, or `:out` as fresh
//! entries), deleting each from `:dead` in the same atomic script call.

use std::fmt::Write as _;

use redis::Value;
use serde::ser::{SerializeStruct, Serializer};
use serde::Serialize;
use serde_json::Value as Json;

use crate::core::op::{Field, Reason};
use crate::core::{json as bin_json, EntryId};
use crate::store::entries::{decode_entries, StreamEntry};
use crate::store::scripts::{ReplayOutcome, ReplayPage};
use crate::store::{Conn, Keys, Namespace, Scripts, StoreError};

/// Dead letters examined per replay script call: bounds how long Redis is
/// held, however many letters there are.
pub const REPLAY_PAGE: usize = 500;
/// `dead replay --all` reports progress on stderr every this many letters.
const PROGRESS_EVERY: u64 = 5000;
/// Longest element id shown in the table, in characters.
const ELEMENT_WIDTH: usize = 24;
/// Longest detail shown in the table, in characters.
const DETAIL_WIDTH: usize = 60;

/// One entry of `:dead`: the header tidemark writes (`reason`, `detail`,
/// `origin`, `origin_id`, in this order) and the original fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Its entry id in `:dead`.
    pub id: EntryId,
    /// The partition whose `:dead` holds it (`None` when the namespace has
    /// one partition).
    pub partition: Option<u16>,
    /// The reason code, e.g. `bad_ts` (empty if the entry has no header).
    pub reason: Vec<u8>,
    /// A sentence saying what was wrong.
    pub detail: Vec<u8>,
    /// `in` or `out:<group>`.
    pub origin: Vec<u8>,
    /// The entry id it had in its origin stream.
    pub origin_id: Vec<u8>,
    /// The original fields, verbatim and in order.
    pub fields: Vec<Field>,
}

impl DeadLetter {
    /// Splits a stream entry into header and original fields. Header
    /// fields are taken only from the leading positions, in order, so an
    /// original field that happens to be named `reason` stays original.
    pub fn from_fields(id: EntryId, fields: Vec<Field>) -> DeadLetter {
        let mut header: [Vec<u8>; 4] = Default::default();
        let names: [&[u8]; 4] = [b"reason", b"detail", b"origin", b"origin_id"];
        let mut rest = fields.into_iter().peekable();
        for (slot, name) in header.iter_mut().zip(names) {
            match rest.next_if(|(k, _)| k.as_slice() == name) {
                Some((_, v)) => *slot = v,
                None => break,
            }
        }
        let [reason, detail, origin, origin_id] = header;
        DeadLetter { id, partition: None, reason, detail, origin, origin_id, fields: rest.collect() }
    }

    /// The element id (the first original `id` field), if it has one.
    pub fn element_id(&self) -> Option<&[u8]> {
        self.fields.iter().find(|(k, _)| k.as_slice() == b"id").map(|(_, v)| v.as_slice())
    }
}

/// As JSON, in this key order: `id`, `reason`, `detail`, `origin`,
/// `origin_id`, `element_id` (null if none), and `fields` as `[name, value]`
/// pairs (order and repeated names kept); any non-UTF-8 byte string as
/// `{"base64": …}`.
impl Serialize for DeadLetter {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("DeadLetter", 8)?;
        st.serialize_field("id", &self.id.to_string())?;
        if let Some(p) = self.partition {
            st.serialize_field("partition", &p)?;
        }
        st.serialize_field("reason", &bin_json::bytes(&self.reason))?;
        st.serialize_field("detail", &bin_json::bytes(&self.detail))?;
        st.serialize_field("origin", &bin_json::bytes(&self.origin))?;
        st.serialize_field("origin_id", &bin_json::bytes(&self.origin_id))?;
        st.serialize_field("element_id", &self.element_id().map(bin_json::bytes))?;
        let fields: Vec<[Json; 2]> =
            self.fields.iter().map(|(k, v)| [bin_json::bytes(k), bin_json::bytes(v)]).collect();
        st.serialize_field("fields", &fields)?;
        st.end()
    }
}

fn letters(entries: Vec<StreamEntry>) -> Vec<DeadLetter> {
    entries.into_iter().filter_map(|e| Some(DeadLetter::from_fields(e.id, e.fields?))).collect()
}

/// The newest `count` dead letters of every partition, newest first, and
/// how many there are.
pub async fn list(conn: &mut Conn, parts: &[Keys], count: usize) -> Result<(Vec<DeadLetter>, u64), StoreError> {
    let pages = futures::future::join_all(parts.iter().map(|keys| {
        let mut c = conn.clone();
        async move {
            let (total, newest): (u64, Value) = redis::pipe()
                .xlen(&keys.dead)
                .cmd("XREVRANGE")
                .arg(&keys.dead)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(count.max(1))
                .query_async(&mut c)
                .await?;
            let mut found = letters(decode_entries(newest)?);
            if parts.len() > 1 {
                for l in &mut found {
                    l.partition = Some(keys.partition);
                }
            }
            Ok::<_, StoreError>((found, total))
        }
    }))
    .await;
    let mut found = Vec::new();
    let mut total = 0;
    for page in pages {
        let (letters, n) = page?;
        found.extend(letters);
        total += n;
    }
    found.sort_by(|a, b| b.id.cmp(&a.id).then(a.partition.cmp(&b.partition)));
    found.truncate(count);
    Ok((found, total))
}

/// Display text for a table cell: lossy UTF-8, control characters escaped
/// (so a value cannot break the table), cut to `max` characters with `…`;
/// `-` when empty.
pub fn cell(b: &[u8], max: usize) -> String {
    if b.is_empty() {
        return "-".to_owned();
    }
    let mut text = String::new();
    for c in String::from_utf8_lossy(b).chars() {
        if c.is_control() {
            text.extend(c.escape_default());
        } else {
            text.push(c);
        }
    }
    if text.chars().count() <= max {
        return text;
    }
    let mut cut: String = text.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// Like [`cell`], but a long value keeps its start and its end, cut in the
/// middle: a detail's end says why (e.g. the last line of a failing
/// command's stderr).
pub fn cell_ends(b: &[u8], max: usize) -> String {
    let text = cell(b, usize::MAX);
    let count = text.chars().count();
    if count <= max {
        return text;
    }
    let head = max.saturating_sub(1) / 2;
    let tail = max.saturating_sub(1) - head;
    let mut cut: String = text.chars().take(head).collect();
    cut.push('…');
    cut.extend(text.chars().skip(count - tail));
    cut
}

/// Renders dead letters as an aligned table with a header line.
pub fn render_table(letters: &[DeadLetter]) -> String {
    let header = ["ENTRY ID", "REASON", "ORIGIN", "ORIGIN ID", "ELEMENT", "DETAIL"];
    let rows: Vec<[String; 6]> = letters
        .iter()
        .map(|l| {
            [
                l.id.to_string(),
                cell(&l.reason, 32),
                cell(&l.origin, 32),
                cell(&l.origin_id, 32),
                l.element_id().map_or_else(|| "-".to_owned(), |e| cell(e, ELEMENT_WIDTH)),
                cell_ends(&l.detail, DETAIL_WIDTH),
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for row in &rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: [&str; 6]| {
        let mut l = String::new();
        for (i, (c, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                let pad = w - c.chars().count();
                let _ = write!(l, "{c}{}  ", " ".repeat(pad));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header);
    for row in &rows {
        line(row.each_ref().map(String::as_str));
    }
    out
}

/// `tidemark dead list`: prints up to `count` dead letters, newest first,
/// as a table or (`json`) as a JSON array.
pub async fn cli_list(conn: &mut Conn, parts: &[Keys], count: usize, json: bool) -> Result<(), StoreError> {
    let (found, total) = list(conn, parts, count).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&found).map_err(|e| StoreError::Reply(e.to_string()))?);
        return Ok(());
    }
    if total == 0 {
        println!("no dead letters in {}", dead_streams(parts));
        return Ok(());
    }
    print!("{}", render_table(&found));
    println!("({} of {} dead letters, newest first)", found.len(), crate::store::status::thousands(total));
    Ok(())
}

/// Tallies of one `dead replay` run.
#[derive(Debug, Default)]
struct Tally {
    examined: u64,
    to_input: u64,
    to_output: u64,
    invalid: u64,
}

impl Tally {
    /// Prints one line per replayed letter (stdout) or unreplayable one
    /// (stderr) and counts them.
    fn record(&mut self, keys: &Keys, page: &ReplayPage) {
        self.examined += page.examined as u64;
        for l in &page.letters {
            match &l.outcome {
                ReplayOutcome::ToInput(new_id) => {
                    self.to_input += 1;
                    println!("{} ({}) -> {} {new_id}", l.dead_id, l.reason, keys.input);
                }
                ReplayOutcome::ToOutput(new_id) => {
                    self.to_output += 1;
                    println!("{} ({}) -> {} {new_id}", l.dead_id, l.reason, keys.out);
                }
                ReplayOutcome::Routed { stream, id } => {
                    self.to_input += 1;
                    println!("{} ({}) -> {stream} {id}", l.dead_id, l.reason);
                }
                ReplayOutcome::Skipped | ReplayOutcome::Route => {}
                ReplayOutcome::Invalid(why) => {
                    self.invalid += 1;
                    let reason = if l.reason.is_empty() { String::new() } else { format!(" ({})", l.reason) };
                    eprintln!("tidemark: dead letter {}{reason} cannot be replayed: {why}", l.dead_id);
                }
            }
        }
    }

    fn summary_all(&self, partitions: usize) -> String {
        let mut s = format!(
            "replayed {} dead letter{} over {partitions} partitions ({} to :in, {} to :out)",
            self.to_input + self.to_output,
            if self.to_input + self.to_output == 1 { "" } else { "s" },
            self.to_input,
            self.to_output,
        );
        if self.invalid > 0 {
            let _ = write!(s, "; {} could not be replayed and stay in :dead", self.invalid);
        }
        s
    }

    fn summary(&self, keys: &Keys) -> String {
        let mut s = format!(
            "replayed {} dead letter{} ({} to {}, {} to {})",
            self.to_input + self.to_output,
            if self.to_input + self.to_output == 1 { "" } else { "s" },
            self.to_input,
            keys.input,
            self.to_output,
            keys.out
        );
        if self.invalid > 0 {
            let _ = write!(s, "; {} could not be replayed and stay in {}", self.invalid, keys.dead);
        }
        s
    }
}

/// `tidemark dead replay`: `id` = that one letter (an error if it does not
/// exist, has another reason than `reason`, or cannot be replayed);
/// `None` = every letter (of `reason`, if given) that exists when the
/// command starts, in pages of [`REPLAY_PAGE`].
pub async fn cli_replay(
    conn: &mut Conn,
    ns: &Namespace,
    id: Option<&str>,
    reason: Option<&str>,
) -> Result<(), StoreError> {
    let parts = &ns.all()[..];
    if let Some(r) = reason {
        if !Reason::ALL.iter().any(|known| known.code() == r) {
            eprintln!("tidemark: note: {r:?} is not one of tidemark's reason codes");
        }
    }
    let mut tally = Tally::default();
    match id {
        Some(raw) => {
            let id: EntryId = raw.parse().map_err(|_| {
                StoreError::Rejected(format!("--id {raw:?} is not a stream entry id (like 1700000000000-0)"))
            })?;
            let id = id.to_string();
            let mut found = None;
            for keys in parts {
                let exists: Value = redis::cmd("XRANGE").arg(&keys.dead).arg(&id).arg(&id).query_async(conn).await?;
                if !decode_entries(exists)?.is_empty() {
                    found = Some(keys);
                    break;
                }
            }
            let Some(keys) = found else {
                return Err(StoreError::Rejected(format!("no dead letter with id {id} in {}", dead_streams(parts))));
            };
            let mut page = Scripts::new().replay_page(conn, keys, &id, &id, 1, reason).await?;
            route_letters(conn, ns, keys, &mut page).await?;
            let Some(letter) = page.letters.first() else {
                return Err(StoreError::Rejected(format!("no dead letter with id {id} in {}", keys.dead)));
            };
            match &letter.outcome {
                ReplayOutcome::Skipped => {
                    return Err(StoreError::Rejected(format!(
                        "dead letter {id} has reason {}, not {}: nothing replayed",
                        letter.reason,
                        reason.unwrap_or_default()
                    )))
                }
                ReplayOutcome::Invalid(why) => {
                    return Err(StoreError::Rejected(format!("dead letter {id} cannot be replayed: {why}")))
                }
                ReplayOutcome::ToInput(_) | ReplayOutcome::ToOutput(_) | ReplayOutcome::Routed { .. } => {
                    tally.record(keys, &page)
                }
                ReplayOutcome::Route => unreachable!("routed above"),
            }
        }
        None => {
            let mut any = false;
            for keys in parts {
                any |= replay_all(conn, ns, keys, reason, &mut tally).await?;
            }
            if !any {
                println!("no dead letters in {}", dead_streams(parts));
                return Ok(());
            }
        }
    }
    if let [keys] = parts {
        println!("{}", tally.summary(keys));
    } else {
        println!("{}", tally.summary_all(parts.len()));
    }
    Ok(())
}

/// The dead-letter streams, for messages: the one, or the pattern.
fn dead_streams(parts: &[Keys]) -> String {
    match parts {
        [keys] => keys.dead.clone(),
        _ => format!("the {} partitions' :dead streams", parts.len()),
    }
}

/// Replays every letter of one partition that exists now (of `reason`,
/// if given). Returns whether there was any.
async fn replay_all(
    conn: &mut Conn,
    ns: &Namespace,
    keys: &Keys,
    reason: Option<&str>,
    tally: &mut Tally,
) -> Result<bool, StoreError> {
    {
        {
            // Only letters that exist now: a replayed input entry that is
            // still malformed comes back as a new, later letter, and must
            // not be replayed again by this same run.
            let newest: Value =
                redis::cmd("XREVRANGE").arg(&keys.dead).arg("+").arg("-").arg("COUNT").arg(1).query_async(conn).await?;
            let Some(newest) = decode_entries(newest)?.first().map(|e| e.id.to_string()) else {
                return Ok(false);
            };
            let mut start = "-".to_owned();
            let mut next_progress = PROGRESS_EVERY;
            loop {
                let mut page = Scripts::new().replay_page(conn, keys, &start, &newest, REPLAY_PAGE, reason).await?;
                route_letters(conn, ns, keys, &mut page).await?;
                tally.record(keys, &page);
                if tally.examined >= next_progress {
                    eprintln!(
                        "tidemark: {} dead letters examined, {} replayed so far",
                        tally.examined,
                        tally.to_input + tally.to_output
                    );
                    next_progress = tally.examined + PROGRESS_EVERY;
                }
                match page.last {
                    Some(last) if page.examined == REPLAY_PAGE && last != newest => start = format!("({last}"),
                    _ => break,
                }
            }
        }
    }
    Ok(true)
}

/// Sends each input letter `replay.lua` left for routing (a
/// `wrong_partition` entry) to its element's partition: appended there,
/// then deleted from `keys.dead`. Two steps, as the partitions may live on
/// different nodes: a crash between them leaves the letter to be replayed
/// again (an `add` applied twice is harmless while it waits; see
/// `daemon.dedup_window` for one already released).
async fn route_letters(conn: &mut Conn, ns: &Namespace, keys: &Keys, page: &mut ReplayPage) -> Result<(), StoreError> {
    for letter in page.letters.iter_mut().filter(|l| l.outcome == ReplayOutcome::Route) {
        let raw: Value =
            redis::cmd("XRANGE").arg(&keys.dead).arg(&letter.dead_id).arg(&letter.dead_id).query_async(conn).await?;
        let Some(fields) = decode_entries(raw)?.into_iter().next().and_then(|e| e.fields) else {
            letter.outcome = ReplayOutcome::Invalid("it is gone (replayed by someone else?)".into());
            continue;
        };
        // The original entry: what follows the four header pairs.
        let original = fields.get(4..).unwrap_or_default();
        let Some((_, id)) = original.iter().find(|(k, _)| k.as_slice() == b"id") else {
            letter.outcome = ReplayOutcome::Invalid("its original entry has no id".into());
            continue;
        };
        let target = ns.keys_for(id);
        let mut xadd = redis::cmd("XADD");
        xadd.arg(&target.input).arg("*");
        for (k, v) in original {
            xadd.arg(k.as_slice()).arg(v.as_slice());
        }
        let new_id: String = xadd.query_async(conn).await?;
        let _: u64 = redis::cmd("XDEL").arg(&keys.dead).arg(&letter.dead_id).query_async(conn).await?;
        letter.outcome = ReplayOutcome::Routed { stream: target.input, id: new_id };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn f(k: &str, v: &[u8]) -> Field {
        (k.as_bytes().to_vec(), v.to_vec())
    }

    fn letter() -> DeadLetter {
        DeadLetter::from_fields(
            EntryId { ms: 7, seq: 1 },
            vec![
                f("reason", b"bad_ts"),
                f("detail", b"`ts` is not an integer"),
                f("origin", b"in"),
                f("origin_id", b"5-0"),
                f("op", b"add"),
                f("id", b"order-1"),
                f("ts", b"soon"),
                f("reason", &[0xff, 0x00]),
            ],
        )
    }

    #[test]
    fn splits_header_from_original_fields() {
        let l = letter();
        assert_eq!(l.reason, b"bad_ts");
        assert_eq!(l.origin, b"in");
        assert_eq!(l.origin_id, b"5-0");
        assert_eq!(l.fields.len(), 4);
        assert_eq!(l.fields[3], f("reason", &[0xff, 0x00]), "a payload field named `reason` stays original");
        assert_eq!(l.element_id(), Some(&b"order-1"[..]));

        // Without a header, everything is original.
        let foreign = DeadLetter::from_fields(EntryId::ZERO, vec![f("op", b"add"), f("reason", b"x")]);
        assert!(foreign.reason.is_empty());
        assert_eq!(foreign.fields.len(), 2);
    }

    #[test]
    fn json_keeps_order_repeats_and_bytes() {
        let mut l = letter();
        l.fields.push(f("op", b"again"));
        let text = serde_json::to_string(&l).unwrap();
        assert!(text.starts_with(r#"{"id":"7-1","reason":"bad_ts","detail":"#), "{text}");
        assert_eq!(
            serde_json::to_value(&l).unwrap(),
            json!({
                "id": "7-1",
                "reason": "bad_ts",
                "detail": "`ts` is not an integer",
                "origin": "in",
                "origin_id": "5-0",
                "element_id": "order-1",
                "fields": [["op", "add"], ["id", "order-1"], ["ts", "soon"], ["reason", {"base64": "/wA="}], ["op", "again"]],
            })
        );
    }

    #[test]
    fn table_cells_are_one_line_and_bounded() {
        assert_eq!(cell(b"a\nb\tc", 10), "a\\nb\\tc");
        assert_eq!(cell(&[b'x', 0xff], 10), "x\u{fffd}");
        assert_eq!(cell(b"say \"hi\"", 20), "say \"hi\"");
        assert_eq!(cell(b"abcdefghij", 5), "abcd…");
        assert_eq!(cell(b"", 5), "-", "an empty cell keeps the columns readable");
        assert_eq!(cell_ends(b"abcdefghij", 5), "ab…ij");
        assert_eq!(cell_ends(b"failed; stderr:\nKeyError", 12), "faile…yError");
        assert_eq!(cell_ends(b"short", 5), "short");
        let table = render_table(&[letter()]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 2, "{table}");
        assert!(lines[0].starts_with("ENTRY ID  REASON  ORIGIN  ORIGIN ID  ELEMENT  DETAIL"), "{table}");
        assert!(lines[1].starts_with("7-1       bad_ts  in      5-0        order-1  `ts` is not"), "{table}");
    }
}
