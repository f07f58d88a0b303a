//! The Lua scripts (lua/*.lua, each prefixed with lua/prelude.lua) and
//! their typed invocations. `redis::Script` sends `EVALSHA` and reloads the
//! script on `NOSCRIPT`, so a restarted Redis needs no special handling.

use futures::stream::{FuturesOrdered, StreamExt};
use redis::aio::MultiplexedConnection;
use redis::Script;

use super::batch::Kind;
use super::{Keys, Prepared, StoreError, INPUT_GROUP};
use crate::core::{codec, EntryId};

const PRELUDE: &str = include_str!("../../lua/prelude.lua");
const APPLY: &str = include_str!("../../lua/apply.lua");
const RELEASE: &str = include_str!("../../lua/release.lua");
const CLOCK: &str = include_str!("../../lua/clock.lua");
const CLOCK_LOCK: &str = include_str!("../../lua/clock_lock.lua");

/// What one `apply.lua` call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyOutcome {
    /// Leading entries of the batch that are done (applied now, or found
    /// already applied); the rest must be sent again later.
    pub processed: usize,
    /// Elements released into `:out` by watermark advances.
    pub released: u64,
    /// Due elements remain: call [`Scripts::release`] until none does.
    pub more_due: bool,
    /// An older entry is pending at another consumer; the unprocessed rest
    /// must wait for it.
    pub blocked: bool,
    /// `add` entries applied.
    pub adds: u64,
    /// `cancel` entries applied.
    pub cancels: u64,
    /// `watermark` entries applied.
    pub watermarks: u64,
    /// Entries dead-lettered.
    pub dead: u64,
    /// `add`s that were already due and went straight to `:out`.
    pub late: u64,
}

/// `apply.lua`'s ARGV[6]: per entry of `batch` (sorted by id), `1` where
/// some other entry id could lie between it and the previous entry, `0`
/// where the two ids are adjacent. The script checks the pending list for
/// other entries only at the `1`s, so a `0` must never be wrong.
fn gaps(batch: &[&Prepared]) -> Vec<u8> {
    let mut out = Vec::with_capacity(batch.len());
    let mut prev = None;
    for p in batch {
        let adjacent = prev.and_then(EntryId::successor) == Some(p.id);
        out.push(if adjacent || prev.is_none() { b'0' } else { b'1' });
        prev = Some(p.id);
    }
    out
}

/// `apply.lua`'s ARGV[7]: every entry's id and arguments, in order, as one
/// MessagePack array of `str` objects. One argument instead of thousands
/// spares Redis parsing, allocating and freeing each one; `cmsgpack`
/// builds the Lua table directly.
fn pack(batch: &[&Prepared]) -> Vec<u8> {
    let items: usize = batch.iter().map(|p| 1 + p.args.len()).sum();
    let bytes: usize = batch.iter().flat_map(|p| &p.args).map(|a| a.len() + 5).sum();
    let mut out = Vec::with_capacity(5 + bytes + batch.len() * 32);
    codec::push_array_len(&mut out, items);
    for p in batch {
        codec::push_str(&mut out, p.id.to_string().as_bytes());
        for a in &p.args {
            codec::push_str(&mut out, a);
        }
    }
    out
}

/// Most entries sent in bulk form: its argument lists are passed to Lua as
/// varargs, and Lua's C stack holds at most 8000 values.
const BULK_MAX: usize = 2000;

/// `apply.lua`'s ARGV[8..13]: a batch of plain adds with distinct element
/// ids, as ready-made argument lists (each a sequence of MessagePack `str`
/// objects that `cmsgpack.unpack` turns straight into command arguments).
/// When the script finds that the whole batch applies as it stands, it
/// needs these three or four calls and no per-entry work at all.
#[derive(Debug, Default, PartialEq, Eq)]
struct Bulk {
    /// The smallest ts of the batch, as text ('' for no bulk form).
    min_ts: Vec<u8>,
    /// `ZADD` arguments: ts, element id, …
    zadd: Vec<u8>,
    /// `HSET` arguments: element id, payload blob, … for adds with a payload.
    hset: Vec<u8>,
    /// Element ids of the adds without a payload (`HDEL` of older bodies).
    bare: Vec<u8>,
    /// The input entry ids (`XACK`).
    acks: Vec<u8>,
    /// Pairs of neighbouring entry ids between which another id could lie.
    gaps: Vec<u8>,
}

impl Bulk {
    /// The bulk form of `batch`, or the empty form if it holds anything but
    /// adds, an element id twice, or too many entries.
    fn of(batch: &[&Prepared]) -> Bulk {
        if batch.is_empty() || batch.len() > BULK_MAX {
            return Bulk::default();
        }
        let mut seen = std::collections::HashSet::with_capacity(batch.len());
        let mut min_ts = i64::MAX;
        let mut bulk = Bulk::default();
        let mut prev = None;
        for p in batch {
            let (Kind::Add, [_, id, ts, blob]) = (p.kind, &p.args[..]) else { return Bulk::default() };
            let Some(ts_value) = std::str::from_utf8(ts).ok().and_then(|t| t.parse::<i64>().ok()) else {
                return Bulk::default();
            };
            if !seen.insert(id.as_slice()) {
                return Bulk::default();
            }
            min_ts = min_ts.min(ts_value);
            codec::push_str(&mut bulk.zadd, ts);
            codec::push_str(&mut bulk.zadd, id);
            if blob.is_empty() {
                codec::push_str(&mut bulk.bare, id);
            } else {
                codec::push_str(&mut bulk.hset, id);
                codec::push_str(&mut bulk.hset, blob);
            }
            let sid = p.id.to_string();
            codec::push_str(&mut bulk.acks, sid.as_bytes());
            if let Some(prev) = prev {
                if EntryId::successor(prev) != Some(p.id) {
                    codec::push_str(&mut bulk.gaps, prev.to_string().as_bytes());
                    codec::push_str(&mut bulk.gaps, sid.as_bytes());
                }
            }
            prev = Some(p.id);
        }
        bulk.min_ts = min_ts.to_string().into_bytes();
        bulk
    }
}

/// An `apply.lua` call ready to be sent (see [`Scripts::apply_call`]).
pub struct ApplyCall<'a> {
    inv: redis::ScriptInvocation<'a>,
}

impl ApplyCall<'_> {
    /// Sends the call (the request is queued on the connection at the first
    /// poll) and decodes its outcome.
    pub async fn invoke(self, conn: &mut MultiplexedConnection) -> Result<ApplyOutcome, StoreError> {
        let started = std::time::Instant::now();
        let r: Vec<i64> = self.inv.invoke_async(conn).await?;
        crate::metrics::record_script(crate::metrics::Script::Apply, started.elapsed());
        if r.len() != 9 {
            return Err(StoreError::Reply(format!("apply.lua returned {r:?}")));
        }
        let n = |i: usize| r[i].max(0) as u64;
        Ok(ApplyOutcome {
            processed: n(0) as usize,
            released: n(1),
            more_due: r[2] == 1,
            blocked: r[3] == 1,
            adds: n(4),
            cancels: n(5),
            watermarks: n(6),
            dead: n(7),
            late: n(8),
        })
    }
}

/// What one `clock.lua` tick did and found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockTick {
    /// Elements released into `:out`.
    pub released: u64,
    /// Due elements remain: tick again at once.
    pub more_due: bool,
    /// The lowest scheduled ts (above the watermark unless `more_due`).
    pub next_due: Option<i64>,
    /// The Redis server's `TIME`, in milliseconds.
    pub now_ms: i64,
}

/// The loaded scripts.
#[derive(Clone)]
pub struct Scripts {
    apply: Script,
    release: Script,
    clock: Script,
    clock_lock: Script,
    /// Clock mode: `apply` first raises the watermark to the server's
    /// `TIME` and wakes the clock leader for adds due before it expects.
    clock_mode: bool,
}

impl Default for Scripts {
    fn default() -> Self {
        Self::new()
    }
}

impl Scripts {
    /// Prepares the scripts (hashing them; nothing is sent yet).
    pub fn new() -> Self {
        Scripts {
            apply: Script::new(&format!("{PRELUDE}\n{APPLY}")),
            release: Script::new(&format!("{PRELUDE}\n{RELEASE}")),
            clock: Script::new(&format!("{PRELUDE}\n{CLOCK}")),
            clock_lock: Script::new(&format!("{PRELUDE}\n{CLOCK_LOCK}")),
            clock_mode: false,
        }
    }

    /// The same scripts with clock mode on or off (see [`Scripts::apply`]).
    pub fn clock_mode(mut self, on: bool) -> Self {
        self.clock_mode = on;
        self
    }

    /// Loads the scripts into the server's script cache.
    pub async fn load(&self, conn: &mut MultiplexedConnection) -> Result<(), StoreError> {
        for script in [&self.apply, &self.release, &self.clock, &self.clock_lock] {
            let _: String = script.prepare_invoke().load_async(conn).await?;
        }
        Ok(())
    }

    /// Applies `batch` (sorted by entry id) and acknowledges what it applied,
    /// atomically. Watermark advances release at most `chunk` elements. In
    /// clock mode the watermark is first raised to the server's `TIME`.
    pub async fn apply(
        &self,
        conn: &mut MultiplexedConnection,
        keys: &Keys,
        batch: &[&Prepared],
        chunk: usize,
    ) -> Result<ApplyOutcome, StoreError> {
        self.apply_call(keys, batch, chunk).invoke(conn).await
    }

    /// [`Scripts::apply`] in two steps: the call, with every argument
    /// encoded (it no longer borrows `batch`), to be invoked later.
    pub fn apply_call(&self, keys: &Keys, batch: &[&Prepared], chunk: usize) -> ApplyCall<'_> {
        let mut inv = self.apply.prepare_invoke();
        inv.key(&keys.input)
            .key(&keys.wm)
            .key(&keys.sched)
            .key(&keys.body)
            .key(&keys.out)
            .key(&keys.dead)
            .key(keys.clock_next())
            .arg(INPUT_GROUP)
            .arg(chunk)
            .arg(batch.len())
            .arg(if self.clock_mode { "1" } else { "0" })
            .arg(keys.wake_channel())
            .arg(gaps(batch))
            .arg(pack(batch));
        let bulk = Bulk::of(batch);
        inv.arg(bulk.min_ts).arg(bulk.zadd).arg(bulk.hset).arg(bulk.bare).arg(bulk.acks).arg(bulk.gaps);
        ApplyCall { inv }
    }

    /// Releases up to `chunk` due elements. Returns how many, and whether
    /// more are due.
    pub async fn release(
        &self,
        conn: &mut MultiplexedConnection,
        keys: &Keys,
        chunk: usize,
    ) -> Result<(u64, bool), StoreError> {
        let started = std::time::Instant::now();
        let (released, more): (u64, i64) = self
            .release
            .key(&keys.wm)
            .key(&keys.sched)
            .key(&keys.body)
            .key(&keys.out)
            .arg(chunk)
            .invoke_async(conn)
            .await?;
        crate::metrics::record_script(crate::metrics::Script::Release, started.elapsed());
        Ok((released, more == 1))
    }

    /// Releases until nothing is due, one bounded chunk per call so Redis is
    /// never held for long. Returns the total released.
    ///
    /// While due elements remain, the next call is sent before the reply to
    /// the previous one arrives (two in flight), so Redis goes from chunk to
    /// chunk without waiting a round trip; a call sent after the last due
    /// element just finds nothing to do.
    pub async fn release_all(
        &self,
        conn: &mut MultiplexedConnection,
        keys: &Keys,
        chunk: usize,
    ) -> Result<u64, StoreError> {
        let (mut total, more) = self.release(conn, keys, chunk).await?;
        if !more {
            return Ok(total);
        }
        let call = |mut c: MultiplexedConnection| async move { self.release(&mut c, keys, chunk).await };
        let mut in_flight = FuturesOrdered::new();
        in_flight.push_back(call(conn.clone()));
        in_flight.push_back(call(conn.clone()));
        while let Some(reply) = in_flight.next().await {
            let (n, more) = reply?;
            total += n;
            if more {
                in_flight.push_back(call(conn.clone()));
            }
        }
        Ok(total)
    }

    /// Clock mode's tick: raises the watermark to the server's `TIME`,
    /// releases up to `chunk` due elements and reports the next due ts.
    pub async fn clock(
        &self,
        conn: &mut MultiplexedConnection,
        keys: &Keys,
        chunk: usize,
    ) -> Result<ClockTick, StoreError> {
        let started = std::time::Instant::now();
        let r: Vec<i64> = self
            .clock
            .key(&keys.wm)
            .key(&keys.sched)
            .key(&keys.body)
            .key(&keys.out)
            .key(keys.clock_next())
            .arg(chunk)
            .invoke_async(conn)
            .await?;
        crate::metrics::record_script(crate::metrics::Script::Clock, started.elapsed());
        let [released, more, has_next, next, now] = r[..] else {
            return Err(StoreError::Reply(format!("clock.lua returned {r:?}")));
        };
        Ok(ClockTick {
            released: released.max(0) as u64,
            more_due: more == 1,
            next_due: (has_next == 1).then_some(next),
            now_ms: now,
        })
    }

    /// The clock leader's lock `key`: takes it if free or extends it if
    /// `token` holds it (`Some(ttl)`), or releases it if `token` holds it
    /// (`None`). Returns whether `token` holds (or held) it.
    pub async fn clock_lock(
        &self,
        conn: &mut MultiplexedConnection,
        key: &str,
        token: &str,
        ttl: Option<std::time::Duration>,
    ) -> Result<bool, StoreError> {
        let ms = ttl.map_or(0, |t| t.as_millis().max(1) as u64);
        let held: i64 = self.clock_lock.key(key).arg(token).arg(ms).invoke_async(conn).await?;
        Ok(held == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_mark_where_another_id_could_lie() {
        let p = |ms, seq| Prepared { id: EntryId { ms, seq }, kind: Kind::Deleted, args: vec![b"X".to_vec()] };
        let batch = [p(5, 1), p(5, 2), p(5, 4), p(6, 0), p(6, u64::MAX), p(7, 0), p(9, 0)];
        let refs: Vec<&Prepared> = batch.iter().collect();
        assert_eq!(gaps(&refs), b"0011101");
        assert_eq!(gaps(&refs[..1]), b"0");
    }

    fn add(ms: u64, seq: u64, id: &str, ts: i64, blob: &[u8]) -> Prepared {
        Prepared {
            id: EntryId { ms, seq },
            kind: Kind::Add,
            args: vec![b"A".to_vec(), id.as_bytes().to_vec(), ts.to_string().into_bytes(), blob.to_vec()],
        }
    }

    fn strs(blob: &[u8]) -> Vec<String> {
        codec::decode(blob).unwrap().into_iter().map(|v| String::from_utf8(v).unwrap()).collect()
    }

    #[test]
    fn bulk_form_lists_each_command_s_arguments() {
        let batch = [add(5, 1, "a", 30, b"pa"), add(5, 2, "b", -7, b""), add(9, 0, "c", 12, b"pc")];
        let refs: Vec<&Prepared> = batch.iter().collect();
        let bulk = Bulk::of(&refs);
        assert_eq!(bulk.min_ts, b"-7");
        assert_eq!(strs(&bulk.zadd), ["30", "a", "-7", "b", "12", "c"]);
        assert_eq!(strs(&bulk.hset), ["a", "pa", "c", "pc"]);
        assert_eq!(strs(&bulk.bare), ["b"]);
        assert_eq!(strs(&bulk.acks), ["5-1", "5-2", "9-0"]);
        assert_eq!(strs(&bulk.gaps), ["5-2", "9-0"]);
    }

    #[test]
    fn no_bulk_form_for_other_ops_or_an_id_twice() {
        let twice = [add(1, 0, "a", 1, b""), add(1, 1, "a", 2, b"")];
        assert_eq!(Bulk::of(&twice.iter().collect::<Vec<_>>()), Bulk::default());
        let cancel =
            Prepared { id: EntryId { ms: 1, seq: 2 }, kind: Kind::Cancel, args: vec![b"C".to_vec(), b"x".to_vec()] };
        let mixed = [add(1, 0, "a", 1, b""), cancel];
        assert_eq!(Bulk::of(&mixed.iter().collect::<Vec<_>>()), Bulk::default());
        let many: Vec<Prepared> = (0..=BULK_MAX as u64).map(|i| add(1, i, &i.to_string(), 1, b"")).collect();
        assert_eq!(Bulk::of(&many.iter().collect::<Vec<_>>()), Bulk::default());
        assert_ne!(Bulk::of(&many[..BULK_MAX].iter().collect::<Vec<_>>()), Bulk::default());
    }
}
