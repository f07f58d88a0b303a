//! Release: `n` scheduled elements and one watermark above them all, timed
//! from the watermark's `XADD` until all are in `:out` — and the reference
//! it is compared with ("ceiling"): the same work done by the best script
//! we could write for it, called in a loop from here with no daemon.
//!
//! The reference is written here, independent of tidemark's scripts, for
//! the same data model (`:sched` ids scored by ts, `:body` id → payload
//! blob, `XADD :out * id <id> ts <ts> <payload…>` in (ts, id) order, both
//! removed, a bounded chunk per call). It may store its blobs as it likes;
//! it keeps `ts` first in them, so no score is fetched or printed for an
//! element with a payload, decodes them straight into `XADD`'s arguments,
//! and makes no checks tidemark needs (watermark key, older data, mixed
//! chunks, whether more is due).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Instant;

use anyhow::{bail, Result};
use futures::stream::{FuturesOrdered, StreamExt};
use tidemark::store::{Conn, Keys};

use crate::report::{kib_to_mib, Progress};
use crate::{add_pipelines, payload_fields, write_all, Bench, Figures, Payload, TS_BASE, WRITE_BATCH};

/// The reference for elements without payload: ids and scores in one
/// `ZRANGE`, one `XADD` each, one `ZREMRANGEBYRANK`.
/// KEYS: schedule, output stream; ARGV: watermark, chunk. Returns: released.
const REFERENCE_IDS_ONLY: &str = r"
local call = redis.call
local sched, out = KEYS[1], KEYS[2]
local due = call('ZRANGE', sched, '-inf', ARGV[1], 'BYSCORE', 'LIMIT', 0, tonumber(ARGV[2]), 'WITHSCORES')
local n = #due / 2
for i = 1, #due, 2 do
  call('XADD', out, '*', 'id', due[i], 'ts', due[i + 1])
end
if n > 0 then
  call('ZREMRANGEBYRANK', sched, 0, n - 1)
end
return n
";

/// The reference for elements with a payload, whose blob is `ts` <ts> then
/// the payload pairs as concatenated MessagePack `str`s: ids only from the
/// schedule, one `HMGET`, each blob unpacked straight into `XADD` (no Lua
/// table), one `HDEL`, one `ZREMRANGEBYRANK`.
/// KEYS: schedule, bodies, output stream; ARGV: watermark, chunk.
/// Returns: released.
const REFERENCE_WITH_PAYLOAD: &str = r"
local call, unpack, msgunpack = redis.call, unpack, cmsgpack.unpack
local sched, body, out = KEYS[1], KEYS[2], KEYS[3]
local ids = call('ZRANGE', sched, '-inf', ARGV[1], 'BYSCORE', 'LIMIT', 0, tonumber(ARGV[2]))
local n = #ids
if n == 0 then
  return 0
end
local blobs = call('HMGET', body, unpack(ids))
for i = 1, n do
  call('XADD', out, '*', 'id', ids[i], msgunpack(blobs[i]))
end
call('HDEL', body, unpack(ids))
call('ZREMRANGEBYRANK', sched, 0, n - 1)
return n
";

/// Schedules the elements numbered `ks` in `keys` directly (no daemon),
/// as the reference script expects them: `:sched` ids scored by ts and,
/// with a payload, `:body` blobs that hold `ts` first.
pub(crate) async fn schedule_directly(conn: &mut Conn, keys: &Keys, ks: &[usize], payload: Payload) -> Result<()> {
    for chunk in ks.chunks(WRITE_BATCH) {
        let mut pipe = redis::pipe();
        for &k in chunk {
            let id = format!("e{k}");
            let ts = TS_BASE + k as i64;
            pipe.cmd("ZADD").arg(&keys.sched).arg(ts).arg(&id).ignore();
            if payload == Payload::TwoFields {
                let (customer, amount) = payload_fields(k);
                let ts = ts.to_string();
                let fields =
                    [&b"ts"[..], ts.as_bytes(), b"customer", customer.as_bytes(), b"amount", amount.as_bytes()];
                pipe.cmd("HSET").arg(&keys.body).arg(&id).arg(tidemark::core::codec::encode(fields)).ignore();
            }
        }
        pipe.query_async::<()>(conn).await?;
    }
    Ok(())
}

/// The reference script's call releasing what is due in `keys` up to `wm`,
/// [`WRITE_BATCH`] per call, loaded on `conn`'s server.
pub(crate) async fn reference_call(
    conn: &mut Conn,
    keys: &Keys,
    wm: i64,
    payload: Payload,
) -> Result<redis::ScriptInvocation<'static>> {
    static IDS_ONLY: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(REFERENCE_IDS_ONLY));
    static WITH_PAYLOAD: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(REFERENCE_WITH_PAYLOAD));
    let mut call = match payload {
        Payload::None => {
            let mut call = IDS_ONLY.prepare_invoke();
            call.key(&keys.sched).key(&keys.out);
            call
        }
        Payload::TwoFields => {
            let mut call = WITH_PAYLOAD.prepare_invoke();
            call.key(&keys.sched).key(&keys.body).key(&keys.out);
            call
        }
    };
    call.arg(wm).arg(WRITE_BATCH);
    call.load_async(conn).await?;
    Ok(call)
}

/// Calls `call` until it releases less than a full chunk, with two calls
/// in flight, as the daemon keeps them, so that Redis never waits for this
/// process between two calls. Adds what it releases to `released` and
/// shows it against `n`; returns what it released.
pub(crate) async fn reference_release(
    conn: &Conn,
    call: &redis::ScriptInvocation<'_>,
    released: &AtomicUsize,
    progress: &Progress,
    n: usize,
) -> Result<usize> {
    let send = |mut conn: Conn| async move { call.invoke_async::<usize>(&mut conn).await };
    let mut mine = 0;
    let mut in_flight = FuturesOrdered::new();
    in_flight.push_back(send(conn.clone()));
    in_flight.push_back(send(conn.clone()));
    while let Some(got) = in_flight.next().await {
        let got = got?;
        mine += got;
        progress.count("released", released.fetch_add(got, Ordering::Relaxed) + got, n);
        if got == WRITE_BATCH {
            in_flight.push_back(send(conn.clone()));
        }
    }
    Ok(mine)
}

impl Bench {
    /// The reference ("ceiling"): `n` elements scheduled directly (no
    /// daemon), released by the reference script called in a loop from
    /// here, [`WRITE_BATCH`] per call.
    pub(crate) async fn ceiling_release(&mut self, n: usize, payload: Payload) -> Result<Figures> {
        redis::cmd("FLUSHALL").query_async::<()>(&mut self.conn).await?;
        let keys = self.keys.clone();
        let all: Vec<usize> = (0..n).collect();
        schedule_directly(&mut self.conn, &keys, &all, payload).await?;
        // Loaded before the clock starts.
        let call = reference_call(&mut self.conn, &keys, TS_BASE + n as i64, payload).await?;
        let redis_cpu = self.redis_cpu().await?;
        let start = Instant::now();
        let released = reference_release(&self.conn, &call, &AtomicUsize::new(0), &self.progress, n).await?;
        let elapsed = start.elapsed().as_secs_f64();
        let out_len = testkit::xlen_async(&mut self.conn, &keys.out).await;
        if released != n || out_len != n {
            bail!("the reference script released {released} and :out holds {out_len} (expected {n} each)");
        }
        let redis_cpu = self.redis_cpu().await? - redis_cpu;
        Ok(BTreeMap::from([
            ("elements_per_s", n as f64 / elapsed),
            ("seconds", elapsed),
            ("redis_cpu_seconds", redis_cpu),
        ]))
    }

    /// Release: `n` scheduled elements, then one watermark above them all;
    /// from that watermark's `XADD` until all are in `:out`. Also measures
    /// Redis memory per scheduled element.
    pub(crate) async fn release(&mut self, n: usize, payload: Payload) -> Result<Figures> {
        let mut daemon = self.fresh_daemon(false).await?;
        let before = self.used_memory().await?;
        let pipes = add_pipelines(&self.keys.input, n, |k| TS_BASE + k as i64, payload);
        let last = write_all(self.conn.clone(), pipes, Arc::default()).await?;
        self.wait_applied(&mut daemon, n, last).await?;
        // Acknowledged input is garbage for this figure; drop it now rather
        // than wait for housekeeping.
        redis::cmd("XTRIM").arg(&self.keys.input).arg("MAXLEN").arg(0).query_async::<()>(&mut self.conn).await?;
        let after = self.used_memory().await?;
        let meter = self.meter(&daemon).await?;

        let start = Instant::now();
        self.add_watermark(TS_BASE + n as i64).await?;
        let end = self
            .wait("every element to be released", &mut daemon, move |b| {
                Box::pin(async move {
                    let out: usize = redis::cmd("XLEN").arg(&b.keys.out).query_async(&mut b.conn).await?;
                    b.progress.count("released", out, n);
                    Ok(out >= n)
                })
            })
            .await?;
        let elapsed = (end - start).as_secs_f64();
        let cpu = self.read_meter(meter, &daemon).await?;
        let left: usize = redis::cmd("ZCARD").arg(&self.keys.sched).query_async(&mut self.conn).await?;
        let out: usize = redis::cmd("XLEN").arg(&self.keys.out).query_async(&mut self.conn).await?;
        if left != 0 || out != n {
            bail!("after the release {left} elements are still scheduled and :out holds {out} (expected 0 and {n})");
        }
        let rss = self.stop(daemon)?;
        let mut figures = BTreeMap::from([
            ("elements_per_s", n as f64 / elapsed),
            ("seconds", elapsed),
            ("redis_bytes_per_element", (after as f64 - before as f64) / n as f64),
            ("daemon_peak_rss_mib", kib_to_mib(rss)),
        ]);
        figures.extend(cpu);
        Ok(figures)
    }
}
