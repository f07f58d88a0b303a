//! Redis helpers of the tests and the bench: the keys of a namespace (built
//! by [`tidemark::store::Keys`], never spelled out here), producer entries
//! for `:in` (`add`, `cancel`, `watermark`), reading streams, counting, and
//! field lookup. Every helper comes blocking and `_async`; both run the
//! same command and panic with the command's name when Redis refuses it.

use redis::{Cmd, FromRedisValue};
use tidemark::store::Keys;

/// The key prefix tidemark uses unless configured otherwise.
pub const PREFIX: &str = "tidemark";

/// The keys of namespace `ns` under the default prefix; the braces are
/// literal (a cluster hash tag): `keys("default").input == "tidemark:{default}:in"`.
pub fn keys(ns: &str) -> Keys {
    Keys::new(PREFIX, ns)
}

/// The keys of the namespace `default`.
pub fn default_keys() -> Keys {
    keys("default")
}

/// Runs `cmd` on a blocking connection; panics naming the command on error.
pub fn query<T: FromRedisValue, C: redis::ConnectionLike>(conn: &mut C, cmd: &Cmd) -> T {
    cmd.query(conn).unwrap_or_else(|e| panic!("{}: {e}", cmd_name(cmd)))
}

/// Async version of [`query`].
pub async fn query_async<T: FromRedisValue, C: redis::aio::ConnectionLike>(conn: &mut C, cmd: &Cmd) -> T {
    cmd.query_async(conn).await.unwrap_or_else(|e| panic!("{}: {e}", cmd_name(cmd)))
}

/// The command's name and first argument (the key), for panic messages.
fn cmd_name(cmd: &Cmd) -> String {
    let mut args = cmd.args_iter().filter_map(|a| match a {
        redis::Arg::Simple(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
        _ => None,
    });
    let name = args.next().unwrap_or_default();
    match args.next() {
        Some(key) => format!("{name} {key}"),
        None => name,
    }
}

/// Owned field/value pairs.
pub fn fields(pairs: &[(&[u8], &[u8])]) -> Fields {
    pairs.iter().map(|(f, v)| (f.to_vec(), v.to_vec())).collect()
}

/// Bytes as text (lossy), for assertions and messages.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

// ---------------------------------------------------------------------------
// Producer entries on `:in`
// ---------------------------------------------------------------------------

/// An empty payload, for [`add`] and friends.
pub const NO_PAYLOAD: &[(&str, &str)] = &[];

/// `XADD <keys.input> * op add id <id> ts <ts> <payload…>` (binary-safe).
pub fn add_cmd<F: AsRef<[u8]>, V: AsRef<[u8]>>(keys: &Keys, id: &str, ts: i64, payload: &[(F, V)]) -> Cmd {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(&keys.input).arg("*").arg("op").arg("add").arg("id").arg(id).arg("ts").arg(ts);
    for (f, v) in payload {
        cmd.arg(f.as_ref()).arg(v.as_ref());
    }
    cmd
}

/// `XADD <keys.input> * op cancel id <id>`.
pub fn cancel_cmd(keys: &Keys, id: &str) -> Cmd {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(&keys.input).arg("*").arg("op").arg("cancel").arg("id").arg(id);
    cmd
}

/// `XADD <keys.input> * op watermark ts <ts>`.
pub fn watermark_cmd(keys: &Keys, ts: i64) -> Cmd {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(&keys.input).arg("*").arg("op").arg("watermark").arg("ts").arg(ts);
    cmd
}

/// Writes an `add` of `id` at `ts` with `payload`; returns the entry id.
pub fn add<C: redis::ConnectionLike, F: AsRef<[u8]>, V: AsRef<[u8]>>(
    conn: &mut C,
    keys: &Keys,
    id: &str,
    ts: i64,
    payload: &[(F, V)],
) -> String {
    query(conn, &add_cmd(keys, id, ts, payload))
}

/// Async version of [`add`].
pub async fn add_async<C: redis::aio::ConnectionLike, F: AsRef<[u8]>, V: AsRef<[u8]>>(
    conn: &mut C,
    keys: &Keys,
    id: &str,
    ts: i64,
    payload: &[(F, V)],
) -> String {
    query_async(conn, &add_cmd(keys, id, ts, payload)).await
}

/// Writes a `cancel` of `id`; returns the entry id.
pub fn cancel<C: redis::ConnectionLike>(conn: &mut C, keys: &Keys, id: &str) -> String {
    query(conn, &cancel_cmd(keys, id))
}

/// Writes a `watermark` entry; returns the entry id.
pub fn watermark<C: redis::ConnectionLike>(conn: &mut C, keys: &Keys, ts: i64) -> String {
    query(conn, &watermark_cmd(keys, ts))
}

/// Async version of [`watermark`].
pub async fn watermark_async<C: redis::aio::ConnectionLike>(conn: &mut C, keys: &Keys, ts: i64) -> String {
    query_async(conn, &watermark_cmd(keys, ts)).await
}

// ---------------------------------------------------------------------------
// Counting
// ---------------------------------------------------------------------------

/// For each `name, name_async: COMMAND -> type`, a blocking and an async
/// helper that run `COMMAND key` and return its reply.
macro_rules! key_queries {
    ($($(#[$doc:meta])* $name:ident, $name_async:ident: $cmd:literal -> $t:ty;)*) => {$(
        $(#[$doc])*
        pub fn $name<C: redis::ConnectionLike>(conn: &mut C, key: &str) -> $t {
            query(conn, redis::cmd($cmd).arg(key))
        }

        #[doc = concat!("Async version of [`", stringify!($name), "`].")]
        pub async fn $name_async<C: redis::aio::ConnectionLike>(conn: &mut C, key: &str) -> $t {
            query_async(conn, redis::cmd($cmd).arg(key)).await
        }
    )*};
}

key_queries! {
    /// `XLEN key` (0 if missing).
    xlen, xlen_async: "XLEN" -> usize;
    /// `ZCARD key` (0 if missing).
    zcard, zcard_async: "ZCARD" -> usize;
    /// `HLEN key` (0 if missing).
    hlen, hlen_async: "HLEN" -> usize;
    /// `EXISTS key`.
    exists, exists_async: "EXISTS" -> bool;
}

/// `total_connections_received` from `INFO stats`: how many connections
/// the server has accepted so far.
pub fn total_connections<C: redis::ConnectionLike>(conn: &mut C) -> u64 {
    let info: String = query(conn, redis::cmd("INFO").arg("stats"));
    info.lines()
        .find_map(|l| l.strip_prefix("total_connections_received:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("total_connections_received in INFO stats")
}

/// Whether every entry of `keys.input` has been delivered to the daemons'
/// input group and acknowledged: applying an entry and acknowledging it are
/// one script, so each has been applied. True for an empty (or trimmed)
/// stream.
pub fn input_applied<C: redis::ConnectionLike>(conn: &mut C, keys: &Keys) -> bool {
    let last: redis::Value =
        query(conn, redis::cmd("XREVRANGE").arg(&keys.input).arg("+").arg("-").arg("COUNT").arg(1));
    let Some((last, _)) = parse_xrange(last).into_iter().next() else { return true };
    let groups: redis::streams::StreamInfoGroupsReply = query(conn, redis::cmd("XINFO").arg("GROUPS").arg(&keys.input));
    groups
        .groups
        .iter()
        .any(|g| g.name == tidemark::store::INPUT_GROUP && g.pending == 0 && g.last_delivered_id == last)
}

// ---------------------------------------------------------------------------
// Streams
// ---------------------------------------------------------------------------

/// `XREADGROUP GROUP <group> <consumer> COUNT <count> STREAMS <stream> >`:
/// up to `count` new entries delivered to `consumer` (empty if none).
pub fn read_group<C: redis::ConnectionLike>(
    conn: &mut C,
    stream: &str,
    group: &str,
    consumer: &str,
    count: usize,
) -> Vec<StreamEntry> {
    let mut cmd = redis::cmd("XREADGROUP");
    cmd.arg("GROUP").arg(group).arg(consumer).arg("COUNT").arg(count).arg("STREAMS").arg(stream).arg(">");
    let reply: redis::Value = query(conn, &cmd);
    parse_read(reply)
}

/// Parses an `XREAD`/`XREADGROUP` reply of one stream into its entries.
pub fn parse_read(reply: redis::Value) -> Vec<StreamEntry> {
    use redis::Value;
    let entries = match reply {
        Value::Nil => return Vec::new(),
        Value::Map(streams) => streams.into_iter().next().map(|(_, e)| e),
        Value::Array(streams) => streams.into_iter().next().and_then(|s| match s {
            Value::Array(parts) => parts.into_iter().nth(1),
            other => panic!("XREAD stream: expected [name, entries], got {other:?}"),
        }),
        other => panic!("XREAD: expected streams, got {other:?}"),
    };
    entries.map_or_else(Vec::new, parse_xrange)
}

/// An entry's field/value pairs, in order.
pub type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// One stream entry: (entry id, field/value pairs in order).
pub type StreamEntry = (String, Fields);

const XRANGE_PAGE: usize = 10_000;

fn xadd_cmd(key: &str, fields: &[(&[u8], &[u8])]) -> redis::Cmd {
    assert!(!fields.is_empty(), "XADD needs at least one field");
    let mut cmd = redis::cmd("XADD");
    cmd.arg(key).arg("*");
    for (f, v) in fields {
        cmd.arg(*f).arg(*v);
    }
    cmd
}

fn xrange_cmd(key: &str, start: &str) -> redis::Cmd {
    let mut cmd = redis::cmd("XRANGE");
    cmd.arg(key).arg(start).arg("+").arg("COUNT").arg(XRANGE_PAGE);
    cmd
}

/// `XADD key * f1 v1 ...` (binary-safe); returns the new entry id.
pub fn xadd_fields<C: redis::ConnectionLike>(conn: &mut C, key: &str, fields: &[(&[u8], &[u8])]) -> String {
    xadd_cmd(key, fields).query::<String>(conn).unwrap_or_else(|e| panic!("XADD {key}: {e}"))
}

/// Async version of [`xadd_fields`].
pub async fn xadd_fields_async<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    key: &str,
    fields: &[(&[u8], &[u8])],
) -> String {
    xadd_cmd(key, fields).query_async::<String>(conn).await.unwrap_or_else(|e| panic!("XADD {key}: {e}"))
}

/// Reads the whole stream at `key` (empty if missing) with paged XRANGE.
pub fn read_stream<C: redis::ConnectionLike>(conn: &mut C, key: &str) -> Vec<StreamEntry> {
    let mut all = Vec::new();
    let mut start = "-".to_string();
    loop {
        let value: redis::Value = xrange_cmd(key, &start).query(conn).unwrap_or_else(|e| panic!("XRANGE {key}: {e}"));
        let page = parse_xrange(value);
        let n = page.len();
        all.extend(page);
        if n < XRANGE_PAGE {
            return all;
        }
        start = format!("({}", all.last().expect("non-empty page").0);
    }
}

/// Async version of [`read_stream`].
pub async fn read_stream_async<C: redis::aio::ConnectionLike>(conn: &mut C, key: &str) -> Vec<StreamEntry> {
    let mut all = Vec::new();
    let mut start = "-".to_string();
    loop {
        let value: redis::Value =
            xrange_cmd(key, &start).query_async(conn).await.unwrap_or_else(|e| panic!("XRANGE {key}: {e}"));
        let page = parse_xrange(value);
        let n = page.len();
        all.extend(page);
        if n < XRANGE_PAGE {
            return all;
        }
        start = format!("({}", all.last().expect("non-empty page").0);
    }
}

/// Parses an XRANGE reply: Array of [id, Array of field/value bulk strings].
pub fn parse_xrange(value: redis::Value) -> Vec<StreamEntry> {
    use redis::Value;
    let entries = match value {
        Value::Array(entries) => entries,
        Value::Nil => return Vec::new(),
        other => panic!("XRANGE: expected an array, got {other:?}"),
    };
    entries
        .into_iter()
        .map(|entry| {
            let Value::Array(parts) = entry else {
                panic!("XRANGE entry: expected an array, got {entry:?}");
            };
            let [id, fields]: [Value; 2] =
                parts.try_into().unwrap_or_else(|p| panic!("XRANGE entry: expected [id, fields], got {p:?}"));
            let id = String::from_utf8(value_bytes(id)).expect("stream id is utf-8");
            let pairs = match fields {
                Value::Array(flat) => {
                    assert!(flat.len().is_multiple_of(2), "XRANGE entry {id}: odd field count");
                    let mut it = flat.into_iter();
                    let mut pairs = Vec::new();
                    while let (Some(f), Some(v)) = (it.next(), it.next()) {
                        pairs.push((value_bytes(f), value_bytes(v)));
                    }
                    pairs
                }
                Value::Map(map) => map.into_iter().map(|(f, v)| (value_bytes(f), value_bytes(v))).collect(),
                Value::Nil => Vec::new(),
                other => panic!("XRANGE entry {id}: expected field array, got {other:?}"),
            };
            (id, pairs)
        })
        .collect()
}

fn value_bytes(v: redis::Value) -> Vec<u8> {
    match v {
        redis::Value::BulkString(b) => b,
        redis::Value::SimpleString(s) => s.into_bytes(),
        redis::Value::Int(i) => i.to_string().into_bytes(),
        other => panic!("expected a string value, got {other:?}"),
    }
}

/// Looks up a field in an entry's field list.
pub fn field<'a>(fields: &'a [(Vec<u8>, Vec<u8>)], name: &str) -> Option<&'a [u8]> {
    fields.iter().find(|(f, _)| f.as_slice() == name.as_bytes()).map(|(_, v)| v.as_slice())
}
