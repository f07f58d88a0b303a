//! `tidemark repartition --to N [--to-redis-url URL]`: moves a namespace
//! from its current layout to `N` partitions, on the same Redis or onto
//! another one (a standalone server to a cluster, say), with the daemons
//! stopped.
//!
//! What moves: every scheduled element with its payload (to partition
//! `crc32(id) mod N`), the watermark (every new partition gets the
//! namespace's, the lowest of the old ones: nothing becomes due early) and
//! the dead letters. Output groups are created on the new `:out` streams
//! at their end. Last, the meta record is written.
//!
//! Safe to re-run after a crash midway: an element is written to its new
//! partition before it is removed from its old one (both writes are
//! idempotent), and a dead letter keeps its entry id in its new stream, so
//! a second copy is recognised and skipped. Where the old and the new
//! layout share keys (4 → 16 partitions on the same Redis), elements that
//! stay in the same partition are not touched.

use std::collections::BTreeMap;

use redis::Value;

use crate::core::EntryId;
use crate::store::entries::decode_entries;
use crate::store::{meta, serving, status, Conn, Keys, Namespace, StoreError};

/// Elements and dead letters moved per round trip.
const PAGE: usize = 500;

/// What to do.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The namespace where it is now.
    pub from: Namespace,
    /// The namespace as it will be (same name and prefix; `N` partitions).
    pub to: Namespace,
    /// Whether the target is the same Redis.
    pub same_redis: bool,
    /// Go on although output groups have unread or pending entries (they
    /// stay in the old `:out` streams).
    pub force: bool,
}

/// What was moved.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Moved {
    /// Scheduled elements written to their new partition.
    pub elements: u64,
    /// Elements that stayed where they were (shared keys).
    pub kept: u64,
    /// Dead letters moved.
    pub dead_letters: u64,
    /// What `--force` left behind: output groups' unread or pending entries.
    pub left_behind: Vec<String>,
}

/// Why repartitioning refused to start.
#[derive(Debug, thiserror::Error)]
pub enum RepartitionError {
    /// Redis failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Something must be done first; the message says what.
    #[error("{0}")]
    Refused(String),
}

impl From<redis::RedisError> for RepartitionError {
    fn from(e: redis::RedisError) -> Self {
        RepartitionError::Store(e.into())
    }
}

/// Checks that nothing runs and nothing waits to be read, then moves the
/// namespace (see the module docs). `progress` is told of each page.
pub async fn run(
    src: &mut Conn,
    dst: &mut Conn,
    plan: &Plan,
    mut progress: impl FnMut(&str),
) -> Result<Moved, RepartitionError> {
    let mut moved = Moved::default();
    if let Some(to) = meta::read(src, &plan.from).await?.repartitioning.filter(|to| *to != plan.to.partitions()) {
        return Err(RepartitionError::Refused(format!(
            "a repartition of namespace {:?} to {to} partition(s) stopped midway: finish it first with \
             `tidemark repartition --to {to}{}`",
            plan.from.name(),
            if plan.same_redis { "" } else { " --to-redis-url …" }
        )));
    }
    check_idle(src, plan, &mut moved).await?;
    if !plan.same_redis {
        let daemons = serving::live_daemons(dst, &plan.to).await?;
        if daemons > 0 {
            return Err(RepartitionError::Refused(format!(
                "{daemons} daemon(s) serve namespace {:?} on the target Redis: stop them first",
                plan.to.name()
            )));
        }
    }
    // From here until the new record is written, every other process
    // refuses the namespace (a daemon started now would apply with the old
    // layout what is being moved), on both sides.
    meta::begin_repartition(src, &plan.to).await?;
    if !plan.same_redis {
        meta::begin_repartition(dst, &plan.to).await?;
    }
    // The namespace's watermark: the lowest partition's (none until all
    // have one).
    let mut watermark: Option<i64> = None;
    let mut every = true;
    for keys in plan.from.all() {
        let wm: Option<String> = redis::cmd("GET").arg(&keys.wm).query_async(src).await?;
        match wm.and_then(|w| w.parse::<i64>().ok()) {
            Some(w) => watermark = Some(watermark.map_or(w, |have| have.min(w))),
            None => every = false,
        }
    }
    let watermark = watermark.filter(|_| every);
    if let Some(wm) = watermark {
        for keys in plan.to.all() {
            let () = redis::cmd("SET").arg(&keys.wm).arg(wm).query_async(dst).await?;
        }
        progress(&format!("watermark {wm} set on all {} partitions", plan.to.partitions()));
    }
    // Output groups, at the end of the new streams.
    let mut groups: Vec<String> = Vec::new();
    for keys in plan.from.all() {
        for g in status::groups(src, &keys.out).await? {
            if !groups.contains(&g.name) {
                groups.push(g.name);
            }
        }
    }
    for keys in plan.to.all() {
        for g in &groups {
            crate::store::ensure_group_from(dst, &keys.out, g, crate::store::GroupStart::New).await?;
        }
    }
    for keys in plan.from.all() {
        move_schedule(src, dst, plan, &keys, &mut moved, &mut progress).await?;
    }
    move_dead_letters(src, dst, plan, &mut moved, &mut progress).await?;
    let () = redis::cmd("DEL").arg(plan.to.repartition_letters()).query_async(dst).await?;
    meta::finish_repartition(dst, &plan.to).await?;
    if !plan.same_redis {
        // The old Redis keeps its (now empty) namespace as it was.
        meta::end_repartition_elsewhere(src, &plan.from).await?;
    }
    progress(&format!("recorded {} partition(s) in {}", plan.to.partitions(), plan.to.meta()));
    Ok(moved)
}

/// Refuses while a daemon serves the namespace, or (unless `force`) while
/// input waits to be applied or an output group has unread or pending
/// entries.
async fn check_idle(src: &mut Conn, plan: &Plan, moved: &mut Moved) -> Result<(), RepartitionError> {
    let daemons = serving::live_daemons(src, &plan.from).await?;
    if daemons > 0 {
        return Err(RepartitionError::Refused(format!(
            "{daemons} daemon(s) serve namespace {:?}: stop every `tidemark run` of it first (their leases \
             lapse within lease.ttl)",
            plan.from.name()
        )));
    }
    let snapshot = status::snapshot(src, &plan.from).await?;
    let mut waiting = Vec::new();
    if snapshot.input.pending > 0 || snapshot.input.lag.is_some_and(|l| l > 0) {
        waiting.push(format!(
            "input: {} entries not yet applied (start a daemon with the old layout to apply them)",
            snapshot.input.pending + snapshot.input.lag.unwrap_or(0)
        ));
    }
    for g in &snapshot.output.groups {
        if g.pending > 0 || g.lag.is_some_and(|l| l > 0) {
            waiting.push(format!(
                "output group {}: {} pending, {} unread",
                g.name,
                g.pending,
                g.lag.map_or_else(|| "some".into(), |l| l.to_string())
            ));
        }
    }
    if waiting.is_empty() {
        return Ok(());
    }
    if plan.force {
        moved.left_behind = waiting;
        return Ok(());
    }
    Err(RepartitionError::Refused(format!(
        "entries wait to be read in the old layout: {}; let them drain, or give --force to leave them in the old \
         streams",
        waiting.join("; ")
    )))
}

/// A scheduled element on its way: id, ts, payload blob.
type Element<'a> = (&'a [u8], i64, Option<&'a Vec<u8>>);

/// Moves the elements of old partition `keys` that belong elsewhere.
async fn move_schedule(
    src: &mut Conn,
    dst: &mut Conn,
    plan: &Plan,
    keys: &Keys,
    moved: &mut Moved,
    progress: &mut impl FnMut(&str),
) -> Result<(), RepartitionError> {
    let stays = |p: u16| plan.same_redis && plan.from.partition(keys.partition).sched == plan.to.partition(p).sched;
    // Elements that stay are skipped by rank: the scan goes on after them.
    let mut skip = 0usize;
    loop {
        let page: Vec<(Vec<u8>, f64)> = redis::cmd("ZRANGE")
            .arg(&keys.sched)
            .arg(skip)
            .arg(skip + PAGE - 1)
            .arg("WITHSCORES")
            .query_async(src)
            .await?;
        if page.is_empty() {
            return Ok(());
        }
        let ids: Vec<&[u8]> = page.iter().map(|(id, _)| id.as_slice()).collect();
        let bodies: Vec<Option<Vec<u8>>> = if ids.is_empty() {
            Vec::new()
        } else {
            redis::cmd("HMGET").arg(&keys.body).arg(&ids).query_async(src).await?
        };
        let mut by_target: BTreeMap<u16, Vec<Element<'_>>> = BTreeMap::new();
        let mut leaving: Vec<&[u8]> = Vec::new();
        for ((id, score), body) in page.iter().zip(&bodies) {
            let p = plan.to.route(id);
            if stays(p) {
                skip += 1;
                moved.kept += 1;
                continue;
            }
            by_target.entry(p).or_default().push((id, *score as i64, body.as_ref()));
            leaving.push(id);
        }
        for (p, elements) in &by_target {
            let to = plan.to.partition(*p);
            let mut pipe = redis::pipe();
            for (id, ts, body) in elements {
                pipe.cmd("ZADD").arg(&to.sched).arg(*ts).arg(*id).ignore();
                if let Some(body) = body {
                    pipe.cmd("HSET").arg(&to.body).arg(*id).arg(body.as_slice()).ignore();
                }
            }
            let () = pipe.query_async(dst).await?;
        }
        if !leaving.is_empty() {
            let mut pipe = redis::pipe();
            pipe.cmd("ZREM").arg(&keys.sched).arg(&leaving).ignore();
            pipe.cmd("HDEL").arg(&keys.body).arg(&leaving).ignore();
            let () = pipe.query_async(src).await?;
            moved.elements += leaving.len() as u64;
            progress(&format!("partition {}: {} elements moved so far", keys.partition, moved.elements));
        }
    }
}

/// Moves every dead letter to the partition of its element (of its old
/// partition's number modulo `N` if it has none), keeping its entry id
/// where the new stream allows (a re-run then skips what a crashed run had
/// copied).
async fn move_dead_letters(
    src: &mut Conn,
    dst: &mut Conn,
    plan: &Plan,
    moved: &mut Moved,
    progress: &mut impl FnMut(&str),
) -> Result<(), RepartitionError> {
    for keys in plan.from.all() {
        // Letters that stay (same keys in both layouts) are passed over.
        let mut start = "-".to_owned();
        loop {
            let page: Value = redis::cmd("XRANGE")
                .arg(&keys.dead)
                .arg(&start)
                .arg("+")
                .arg("COUNT")
                .arg(PAGE)
                .query_async(src)
                .await?;
            let letters = decode_entries(page)?;
            let Some(last) = letters.last() else { break };
            start = format!("({}", last.id);
            let mut done: Vec<EntryId> = Vec::new();
            for letter in &letters {
                let Some(fields) = &letter.fields else {
                    done.push(letter.id);
                    continue;
                };
                let element = fields
                    .iter()
                    .skip_while(|(k, _)| k.as_slice() != b"origin_id")
                    .skip(1)
                    .find(|(k, _)| k.as_slice() == b"id")
                    .map(|(_, v)| v.as_slice());
                let p = match element {
                    Some(id) => plan.to.route(id),
                    None => keys.partition % plan.to.partitions(),
                };
                let to = plan.to.partition(p);
                if plan.same_redis && to.dead == keys.dead {
                    continue;
                }
                copy_letter(dst, &plan.to.repartition_letters(), &to.dead, letter.id, fields).await?;
                done.push(letter.id);
            }
            if done.is_empty() {
                continue;
            }
            let mut xdel = redis::cmd("XDEL");
            xdel.arg(&keys.dead);
            for id in &done {
                xdel.arg(id.to_string());
            }
            let _: u64 = xdel.query_async(src).await?;
            moved.dead_letters += done.len() as u64;
            progress(&format!("{} dead letters moved so far", moved.dead_letters));
        }
    }
    Ok(())
}

/// Appends a dead letter to `stream` under its own id, or, when the
/// stream has moved past it, under the next free id, noted in the hash
/// `letters` before it is written; nothing if it is there already under
/// either (so a re-run after a crash copies each letter once).
async fn copy_letter(
    dst: &mut Conn,
    letters: &str,
    stream: &str,
    id: EntryId,
    fields: &[(Vec<u8>, Vec<u8>)],
) -> Result<(), StoreError> {
    if exists(dst, stream, &id.to_string()).await? {
        return Ok(());
    }
    let note = format!("{stream} {id}");
    let noted: Option<String> = redis::cmd("HGET").arg(letters).arg(&note).query_async(dst).await?;
    if let Some(at) = &noted {
        if exists(dst, stream, at).await? {
            return Ok(());
        }
    }
    let add = |at: &str| {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(stream).arg(at);
        for (k, v) in fields {
            cmd.arg(k.as_slice()).arg(v.as_slice());
        }
        cmd
    };
    for at in noted.into_iter().chain(std::iter::once(id.to_string())) {
        match add(&at).query_async::<String>(dst).await {
            Ok(_) => return Ok(()),
            Err(e) if e.to_string().contains("equal or smaller") => continue,
            Err(e) => return Err(e.into()),
        }
    }
    // Past the stream's last id: the next one, noted first.
    let info: redis::streams::StreamInfoStreamReply =
        redis::cmd("XINFO").arg("STREAM").arg(stream).query_async(dst).await?;
    let next = info
        .last_generated_id
        .parse::<EntryId>()
        .ok()
        .and_then(EntryId::successor)
        .ok_or_else(|| StoreError::Reply(format!("{stream}: no id after {}", info.last_generated_id)))?;
    let () = redis::cmd("HSET").arg(letters).arg(&note).arg(next.to_string()).query_async(dst).await?;
    let _: String = add(&next.to_string()).query_async(dst).await?;
    Ok(())
}

/// Whether `stream` has an entry `id`.
async fn exists(dst: &mut Conn, stream: &str, id: &str) -> Result<bool, StoreError> {
    let there: Value = redis::cmd("XRANGE").arg(stream).arg(id).arg(id).query_async(dst).await?;
    Ok(!decode_entries(there)?.is_empty())
}
