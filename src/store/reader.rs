//! A connection dedicated to blocking `XREADGROUP`s that decodes replies
//! straight into [`StreamEntry`]s.
//!
//! redis-rs parses every reply into a generic `Value` tree with a combinator
//! parser, at about 4 µs per five-field stream entry: at full ingest that was
//! most of the daemon's CPU, on machines where Redis needs the other core.
//! Here a reply is framed by a resumable scanner (each byte looked at once,
//! however the reply is split into reads) and the usual reply shape is
//! decoded in one pass. Anything else — a server error, an unexpected shape —
//! goes through redis-rs's own parser, so errors keep their codes and
//! classification. TLS connections (`rediss://`) use redis-rs throughout.

use std::io;
use std::time::Duration;

use redis::{Client, ConnectionAddr, RedisConnectionInfo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::timeout;

use super::sentinel::Epoch;
use super::{entries, Conn, ConnectOptions, StoreError, StreamEntry};
use crate::core::EntryId;

/// Free buffer space asked of each socket read.
const READ_CHUNK: usize = 64 * 1024;
/// A receive buffer grown beyond this by a huge reply is released after it.
const KEEP_BUFFER: usize = 4 << 20;
/// Deepest nesting of aggregates accepted in a reply (stream replies use 4).
const MAX_DEPTH: usize = 32;

/// A connection for blocking stream reads (see the module documentation).
pub struct StreamReader {
    inner: Inner,
    /// With Sentinel: the master's epoch when this was opened; a read in
    /// progress when a failover is announced ends with `READONLY`.
    epoch: Option<Epoch>,
}

enum Inner {
    /// Plain TCP or a Unix socket, with the fast decoder.
    Raw(RawConn),
    /// TLS: redis-rs's connection and parser.
    Redis(Conn),
}

impl StreamReader {
    /// Connects to the server `client` points at, authenticating and
    /// selecting the database as `client` would. Replies time out after
    /// `response` (a blocking read should add its block time).
    pub async fn connect(client: &Client, opts: &ConnectOptions, response: Duration) -> Result<Self, StoreError> {
        let info = client.get_connection_info();
        let transport = match info.addr() {
            ConnectionAddr::Tcp(host, port) => {
                let stream = with_timeout(opts.connect_timeout, TcpStream::connect((host.as_str(), *port))).await?;
                stream.set_nodelay(true).map_err(redis::RedisError::from)?;
                Transport::Tcp(stream)
            }
            ConnectionAddr::Unix(path) => {
                Transport::Unix(with_timeout(opts.connect_timeout, UnixStream::connect(path)).await?)
            }
            _ => {
                let conn = super::endpoint::single(client, opts, response).await?;
                return Ok(StreamReader { inner: Inner::Redis(Conn::Single(conn)), epoch: None });
            }
        };
        let mut raw = RawConn {
            io: transport,
            buf: Vec::with_capacity(READ_CHUNK),
            response,
            silence: opts.response_timeout.min(response),
            broken: false,
        };
        raw.handshake(info.redis_settings()).await?;
        Ok(StreamReader { inner: Inner::Raw(raw), epoch: None })
    }

    /// The same reader, ending its reads once a failover after `epoch`
    /// is announced.
    pub(super) fn followed(mut self, epoch: Option<Epoch>) -> Self {
        self.epoch = epoch;
        self
    }

    /// `XREADGROUP` of new entries (`>`) of `stream` in `group` as
    /// `consumer`, at most `count`, blocking up to `block`.
    pub async fn read_group(
        &mut self,
        stream: &str,
        group: &str,
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> Result<Vec<StreamEntry>, StoreError> {
        let Some(epoch) = self.epoch.clone() else { return self.read(stream, group, consumer, count, block).await };
        if epoch.stale() {
            return Err(Epoch::error().into());
        }
        tokio::select! {
            read = self.read(stream, group, consumer, count, block) => read,
            // The raw connection is left marked broken by the abandoned
            // request; the caller opens a new reader anyway.
            _ = epoch.changed() => Err(Epoch::error().into()),
        }
    }

    async fn read(
        &mut self,
        stream: &str,
        group: &str,
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> Result<Vec<StreamEntry>, StoreError> {
        let raw = match &mut self.inner {
            Inner::Redis(conn) => return super::read_group(conn, stream, group, consumer, count, block).await,
            Inner::Raw(raw) => raw,
        };
        let count = count.max(1).to_string();
        let block = (block.as_millis().max(1) as u64).to_string();
        let args: [&[u8]; 11] = [
            b"XREADGROUP",
            b"GROUP",
            group.as_bytes(),
            consumer.as_bytes(),
            b"COUNT",
            count.as_bytes(),
            b"BLOCK",
            block.as_bytes(),
            b"STREAMS",
            stream.as_bytes(),
            b">",
        ];
        let len = raw.request(&args).await?;
        let frame = &raw.buf[..len];
        let result = match decode_read_fast(frame) {
            Some(entries) => Ok(entries),
            None => decode_slow(frame).and_then(entries::decode_read),
        };
        raw.consume(len);
        result
    }
}

async fn with_timeout<T>(
    limit: Duration,
    f: impl std::future::Future<Output = io::Result<T>>,
) -> Result<T, StoreError> {
    match timeout(limit, f).await {
        Ok(r) => Ok(r.map_err(redis::RedisError::from)?),
        Err(_) => Err(timed_out().into()),
    }
}

fn timed_out() -> redis::RedisError {
    timed_out_io().into()
}

fn timed_out_io() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "no reply from Redis in time")
}

/// Parses a complete reply with redis-rs, turning an error reply into an
/// error.
fn decode_slow(frame: &[u8]) -> Result<redis::Value, StoreError> {
    Ok(redis::parse_redis_value(frame)?.extract_error()?)
}

enum Transport {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Transport {
    async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Transport::Tcp(s) => s.write_all(bytes).await,
            Transport::Unix(s) => s.write_all(bytes).await,
        }
    }

    async fn read_buf(&mut self, buf: &mut Vec<u8>) -> io::Result<usize> {
        match self {
            Transport::Tcp(s) => s.read_buf(buf).await,
            Transport::Unix(s) => s.read_buf(buf).await,
        }
    }
}

/// A plain RESP2 connection: one request at a time.
struct RawConn {
    io: Transport,
    /// Bytes received and not yet consumed; after [`RawConn::request`] the
    /// reply is at its start.
    buf: Vec<u8>,
    /// Time allowed for a reply to begin (a blocking read's includes its
    /// block time).
    response: Duration,
    /// Once a reply has begun, time allowed between its pieces: a huge
    /// reply may take long in all, but a server that stops sending half
    /// way is noticed this fast.
    silence: Duration,
    /// A request failed or timed out half-way: the stream position is
    /// unknown, so the connection must not be used again.
    broken: bool,
}

impl RawConn {
    /// `AUTH` and `SELECT` as the URL asks.
    async fn handshake(&mut self, settings: &RedisConnectionInfo) -> Result<(), StoreError> {
        if let Some(password) = settings.password() {
            match settings.username() {
                Some(user) => self.expect_ok(&[b"AUTH", user.as_bytes(), password.as_bytes()]).await?,
                None => self.expect_ok(&[b"AUTH", password.as_bytes()]).await?,
            }
        }
        if settings.db() != 0 {
            self.expect_ok(&[b"SELECT", settings.db().to_string().as_bytes()]).await?;
        }
        Ok(())
    }

    async fn expect_ok(&mut self, args: &[&[u8]]) -> Result<(), StoreError> {
        let len = self.request(args).await?;
        let result = if &self.buf[..len] == b"+OK\r\n" {
            Ok(())
        } else {
            decode_slow(&self.buf[..len]).and_then(|v| Err(StoreError::Reply(format!("expected OK, got {v:?}"))))
        };
        self.consume(len);
        result
    }

    /// Sends a command and waits for its complete reply; returns the
    /// reply's length at the start of `buf`.
    async fn request(&mut self, args: &[&[u8]]) -> Result<usize, StoreError> {
        if self.broken {
            return Err(redis::RedisError::from(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the connection failed earlier and cannot be reused",
            ))
            .into());
        }
        self.broken = true;
        let command = encode_command(args);
        let (io, buf) = (&mut self.io, &mut self.buf);
        let (response, silence) = (self.response, self.silence);
        let exchange = async {
            timeout(response, io.write_all(&command)).await.map_err(|_| timed_out_io())??;
            let mut scanner = Scanner::default();
            let mut wait = response;
            loop {
                if let Some(len) = scanner.frame_len(buf)? {
                    return Ok::<usize, io::Error>(len);
                }
                buf.reserve(READ_CHUNK);
                match timeout(wait, io.read_buf(buf)).await.map_err(|_| timed_out_io())?? {
                    0 => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "Redis closed the connection")),
                    _ => wait = silence,
                }
            }
        };
        let len = exchange.await.map_err(redis::RedisError::from)?;
        self.broken = false;
        Ok(len)
    }

    /// Drops the first `len` bytes (a reply that has been decoded).
    fn consume(&mut self, len: usize) {
        self.buf.drain(..len);
        if self.buf.is_empty() && self.buf.capacity() > KEEP_BUFFER {
            self.buf = Vec::with_capacity(READ_CHUNK);
        }
    }
}

/// RESP encoding of a command: an array of bulk strings.
fn encode_command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + args.iter().map(|a| a.len() + 16).sum::<usize>());
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Finds where the first complete reply in a growing buffer ends, looking
/// at each byte only once across calls.
#[derive(Debug, Default)]
struct Scanner {
    /// Where the next header starts.
    pos: usize,
    /// For each open aggregate, how many of its elements are still to come.
    open: Vec<u64>,
}

impl Scanner {
    /// The length of the first complete reply in `buf`, or `None` if more
    /// bytes are needed. `buf` must only have grown since the last call.
    fn frame_len(&mut self, buf: &[u8]) -> io::Result<Option<usize>> {
        loop {
            let Some((kind, number, body)) = header(buf, self.pos)? else { return Ok(None) };
            let next = match kind {
                b'$' | b'!' | b'=' => match usize::try_from(number) {
                    // Null bulk string.
                    Err(_) => body,
                    Ok(len) => {
                        let end = body.checked_add(len).and_then(|e| e.checked_add(2)).ok_or_else(bad_reply)?;
                        if end > buf.len() {
                            return Ok(None);
                        }
                        end
                    }
                },
                b'*' | b'~' | b'>' | b'%' => {
                    let items = if kind == b'%' { number.saturating_mul(2) } else { number };
                    match u64::try_from(items) {
                        Ok(n) if n > 0 => {
                            if self.open.len() >= MAX_DEPTH {
                                return Err(bad_reply());
                            }
                            self.open.push(n);
                            self.pos = body;
                            continue;
                        }
                        // Empty or null aggregate: a complete value.
                        _ => body,
                    }
                }
                _ => body,
            };
            self.pos = next;
            // A value is complete: close the aggregates it completes.
            loop {
                match self.open.last_mut() {
                    None => return Ok(Some(self.pos)),
                    Some(left) => {
                        *left -= 1;
                        if *left > 0 {
                            break;
                        }
                        self.open.pop();
                    }
                }
            }
        }
    }
}

fn bad_reply() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "malformed reply from Redis")
}

/// The header line at `pos`: its type byte, its number (0 for types
/// without one) and where the line ends. `None` if the line is incomplete.
fn header(buf: &[u8], pos: usize) -> io::Result<Option<(u8, i64, usize)>> {
    let Some(&kind) = buf.get(pos) else { return Ok(None) };
    let Some(cr) = buf[pos + 1..].iter().position(|&b| b == b'\r').map(|i| pos + 1 + i) else { return Ok(None) };
    let Some(&lf) = buf.get(cr + 1) else { return Ok(None) };
    if lf != b'\n' {
        return Err(bad_reply());
    }
    let number = match kind {
        b'$' | b'!' | b'=' | b'*' | b'~' | b'>' | b'%' => parse_int(&buf[pos + 1..cr]).ok_or_else(bad_reply)?,
        b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => 0,
        _ => return Err(bad_reply()),
    };
    Ok(Some((kind, number, cr + 2)))
}

fn parse_int(digits: &[u8]) -> Option<i64> {
    let (negative, digits) = match digits.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, digits),
    };
    if digits.is_empty() || digits.len() > 18 {
        return None;
    }
    let mut n: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        n = n * 10 + i64::from(d - b'0');
    }
    Some(if negative { -n } else { n })
}

/// Reads a complete reply's parts in order.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    /// The element count of an array (`-1` for a null array).
    fn array(&mut self) -> Option<i64> {
        let (kind, n, body) = header(self.buf, self.pos).ok()??;
        (kind == b'*').then(|| {
            self.pos = body;
            n
        })
    }

    /// A non-null bulk string.
    fn bulk(&mut self) -> Option<&'a [u8]> {
        let (kind, n, body) = header(self.buf, self.pos).ok()??;
        if kind != b'$' {
            return None;
        }
        let end = body.checked_add(usize::try_from(n).ok()?)?;
        if self.buf.get(end..end.checked_add(2)?)? != b"\r\n" {
            return None;
        }
        self.pos = end + 2;
        Some(&self.buf[body..end])
    }
}

/// Decodes the usual `XREADGROUP` reply of one stream (RESP2):
/// `[[stream, [[id, [f, v, …]], …]]]`, or a null array on timeout. `None`
/// for any other shape, which the caller hands to redis-rs.
fn decode_read_fast(frame: &[u8]) -> Option<Vec<StreamEntry>> {
    let mut c = Cursor { buf: frame, pos: 0 };
    match c.array()? {
        -1 => return (c.pos == frame.len()).then(Vec::new),
        1 => {}
        _ => return None,
    }
    if c.array()? != 2 {
        return None;
    }
    c.bulk()?;
    let n = usize::try_from(c.array()?).ok()?;
    let mut out = Vec::with_capacity(n.min(frame.len() / 8));
    for _ in 0..n {
        if c.array()? != 2 {
            return None;
        }
        let id: EntryId = std::str::from_utf8(c.bulk()?).ok()?.parse().ok()?;
        let fields = match c.array()? {
            -1 => None,
            len if len >= 0 && len % 2 == 0 => {
                let pairs = (len / 2) as usize;
                let mut fields = Vec::with_capacity(pairs.min(frame.len() / 8));
                for _ in 0..pairs {
                    let name = c.bulk()?.to_vec();
                    let value = c.bulk()?.to_vec();
                    fields.push((name, value));
                }
                Some(fields)
            }
            _ => return None,
        };
        out.push(StreamEntry { id, fields });
    }
    (c.pos == frame.len()).then_some(out)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::core::op::Field;

    fn bulk(out: &mut Vec<u8>, b: &[u8]) {
        out.extend_from_slice(format!("${}\r\n", b.len()).as_bytes());
        out.extend_from_slice(b);
        out.extend_from_slice(b"\r\n");
    }

    /// An `XREADGROUP` reply as Redis writes it.
    /// An entry id and its fields (`None`: deleted from the stream).
    type Raw = (EntryId, Option<Vec<Field>>);

    fn reply(entries: &[Raw]) -> Vec<u8> {
        let mut out = b"*1\r\n*2\r\n".to_vec();
        bulk(&mut out, b"tidemark:{default}:in");
        out.extend_from_slice(format!("*{}\r\n", entries.len()).as_bytes());
        for (id, fields) in entries {
            out.extend_from_slice(b"*2\r\n");
            bulk(&mut out, id.to_string().as_bytes());
            match fields {
                None => out.extend_from_slice(b"*-1\r\n"),
                Some(fields) => {
                    out.extend_from_slice(format!("*{}\r\n", fields.len() * 2).as_bytes());
                    for (k, v) in fields {
                        bulk(&mut out, k);
                        bulk(&mut out, v);
                    }
                }
            }
        }
        out
    }

    /// What redis-rs makes of the same bytes.
    fn slow(frame: &[u8]) -> Result<Vec<StreamEntry>, String> {
        decode_slow(frame).and_then(entries::decode_read).map_err(|e| e.to_string())
    }

    /// Feeds `bytes` to a scanner in pieces of the given sizes.
    fn scan_in_pieces(bytes: &[u8], pieces: &[usize]) -> Option<usize> {
        let mut scanner = Scanner::default();
        let mut end = 0;
        for size in pieces.iter().copied().chain(std::iter::repeat(1)) {
            end = (end + size.max(1)).min(bytes.len());
            if let Some(len) = scanner.frame_len(&bytes[..end]).expect("valid RESP") {
                return Some(len);
            }
            if end == bytes.len() {
                return None;
            }
        }
        None
    }

    #[test]
    fn decodes_like_redis_rs() {
        let e = |ms, seq| EntryId { ms, seq };
        let entries = vec![
            (e(1, 0), Some(vec![(b"op".to_vec(), b"add".to_vec()), (b"k".to_vec(), vec![0, 255, b'\r', b'\n'])])),
            (e(2, 5), None),
            (e(3, 1), Some(vec![])),
        ];
        let bytes = reply(&entries);
        let fast = decode_read_fast(&bytes).expect("usual shape");
        assert_eq!(fast.len(), 3);
        assert_eq!(fast[0].fields.as_ref().unwrap()[1].1, vec![0, 255, b'\r', b'\n']);
        assert_eq!(fast[1].fields, None);
        assert_eq!(Ok(fast), slow(&bytes));
        assert_eq!(decode_read_fast(b"*-1\r\n"), Some(vec![]));
    }

    #[test]
    fn other_shapes_are_left_to_redis_rs() {
        // An error reply keeps its code, so it is classified as usual.
        let err = decode_slow(b"-NOGROUP No such key 'x' or consumer group 'g'\r\n").unwrap_err();
        assert!(matches!(&err, StoreError::Redis(e) if e.code() == Some("NOGROUP")), "{err:?}");
        let wrongpass = decode_slow(b"-WRONGPASS invalid username-password pair or user is disabled.\r\n").unwrap_err();
        assert!(wrongpass.is_fatal());
        assert_eq!(decode_read_fast(b"-ERR x\r\n"), None);
        assert_eq!(decode_read_fast(b"*0\r\n"), None);
        // A trailing byte, a wrong length, a bad id: not the usual shape.
        let mut bytes = reply(&[(EntryId { ms: 1, seq: 1 }, Some(vec![(b"a".to_vec(), b"b".to_vec())]))]);
        assert!(decode_read_fast(&bytes).is_some());
        bytes.push(b'x');
        assert_eq!(decode_read_fast(&bytes), None);
        let bad_len = b"*1\r\n*2\r\n$1\r\ns\r\n*1\r\n*2\r\n$3\r\n1-1\r\n*2\r\n$5\r\nab\r\n$0\r\n\r\n";
        assert_eq!(decode_read_fast(bad_len), None);
        let bad_id = b"*1\r\n*2\r\n$1\r\ns\r\n*1\r\n*2\r\n$3\r\nx-1\r\n*0\r\n";
        assert_eq!(decode_read_fast(bad_id), None);
    }

    #[test]
    fn scanner_frames_every_reply_type() {
        for frame in [
            &b"+OK\r\n"[..],
            b"-ERR no\r\n",
            b":42\r\n",
            b"$-1\r\n",
            b"$0\r\n\r\n",
            b"*-1\r\n",
            b"*0\r\n",
            b"*2\r\n*1\r\n:1\r\n$3\r\na\r\n\r\n",
            b"%1\r\n+k\r\n*2\r\n_\r\n,1.5\r\n",
        ] {
            let mut with_next = frame.to_vec();
            with_next.extend_from_slice(b"+NEXT\r\n");
            assert_eq!(scan_in_pieces(&with_next, &[]), Some(frame.len()), "{:?}", String::from_utf8_lossy(frame));
            assert_eq!(scan_in_pieces(&frame[..frame.len() - 1], &[]), None);
        }
        assert!(Scanner::default().frame_len(b"?what\r\n").is_err());
        assert!(Scanner::default().frame_len(b"$abc\r\n").is_err());
        let deep = "*1\r\n".repeat(MAX_DEPTH + 1);
        assert!(Scanner::default().frame_len(deep.as_bytes()).is_err());
    }

    #[test]
    fn encodes_commands_as_resp_arrays() {
        assert_eq!(encode_command(&[b"GET", b"a\r\nb"]), b"*2\r\n$3\r\nGET\r\n$4\r\na\r\nb\r\n");
    }

    fn arb_entries() -> impl Strategy<Value = Vec<Raw>> {
        let field = (proptest::collection::vec(any::<u8>(), 0..12), proptest::collection::vec(any::<u8>(), 0..40));
        let entry =
            (any::<u64>(), any::<u64>(), proptest::option::weighted(0.9, proptest::collection::vec(field, 0..6)))
                .prop_map(|(ms, seq, fields)| (EntryId { ms, seq }, fields));
        proptest::collection::vec(entry, 0..20)
    }

    proptest! {
        /// However a reply is split into reads, it is framed exactly, and the
        /// fast decoder agrees with redis-rs.
        #[test]
        fn framing_and_decoding_match_redis_rs(
            entries in arb_entries(),
            pieces in proptest::collection::vec(1usize..64, 0..40),
        ) {
            let bytes = reply(&entries);
            let mut stream = bytes.clone();
            stream.extend_from_slice(b"*-1\r\n");
            prop_assert_eq!(scan_in_pieces(&stream, &pieces), Some(bytes.len()));
            let fast = decode_read_fast(&bytes);
            prop_assert!(fast.is_some());
            prop_assert_eq!(Ok(fast.unwrap()), slow(&bytes));
        }
    }
}
