//! The reader's own connection, for the one command it sends in a loop: `XREADGROUP`.
//!
//! redis-rs parses every reply into a tree of values with a parser-combinator, and that parse
//! cost about 15,000 instructions per bench-sized entry, a fifth of keepwarm's CPU per message
//! (docs/bench.md, "CPU per message"). Here the reply (RESP2: this connection never switches
//! protocol) is read straight into entries: one allocation per id, field name and value. The
//! group's creation and `XAUTOCLAIM`, which run seldom, stay on redis-rs.
//!
//! The connection is the client's address (TCP or a Unix socket: the `redis` crate is built
//! without TLS), then `AUTH` with the URL's credentials and `SELECT` of its database. Any error
//! but Redis's own answer (`NOGROUP`, …) leaves the connection unusable: the reader drops it and
//! connects again.

use super::Entry;
use std::time::Duration;
use tokio::io::BufStream;
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt,
};

/// A byte stream to Redis.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Why a read failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum ReadError {
    /// The connection failed.
    #[error("redis connection: {0}")]
    Io(#[from] std::io::Error),
    /// Redis answered with an error (`NOGROUP No such key …`).
    #[error("redis answered: {0}")]
    Redis(String),
    /// A reply that is not what the command answers.
    #[error("unexpected reply from redis: {0}")]
    Protocol(&'static str),
    /// No reply in time.
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    /// An address this connection cannot reach.
    #[error("cannot read a stream at {0}")]
    Address(String),
    /// A command sent through redis-rs (the group's creation, `XAUTOCLAIM`) failed.
    #[error(transparent)]
    Client(#[from] redis::RedisError),
}

impl ReadError {
    /// The code of Redis's error answer (`NOGROUP`), if it is one.
    pub(super) fn code(&self) -> Option<&str> {
        match self {
            ReadError::Redis(message) => message.split(' ').next(),
            ReadError::Client(error) => error.code(),
            _ => None,
        }
    }

    /// Whether this connection can still be used: only after Redis's own answer (redis-rs's
    /// connection manager reconnects on its own).
    pub(super) fn keeps_connection(&self) -> bool {
        matches!(self, ReadError::Redis(_) | ReadError::Client(_))
    }
}

/// A connection that sends `XREADGROUP` and reads its replies.
pub(super) struct ReadConn {
    io: BufStream<Box<dyn Io>>,
    /// The command being written, reused.
    out: Vec<u8>,
    /// The line being read, reused.
    line: Vec<u8>,
}

impl ReadConn {
    /// Connects, authenticates and selects the database, all within `timeout`.
    pub(super) async fn connect(
        info: &redis::ConnectionInfo,
        timeout: Duration,
    ) -> Result<ReadConn, ReadError> {
        tokio::time::timeout(timeout, Self::open(info))
            .await
            .map_err(|_| ReadError::Timeout(timeout))?
    }

    async fn open(info: &redis::ConnectionInfo) -> Result<ReadConn, ReadError> {
        let io: Box<dyn Io> = match info.addr() {
            redis::ConnectionAddr::Tcp(host, port) => {
                let stream = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
                stream.set_nodelay(true)?;
                Box::new(stream)
            }
            redis::ConnectionAddr::Unix(path) => {
                Box::new(tokio::net::UnixStream::connect(path).await?)
            }
            other => return Err(ReadError::Address(other.to_string())),
        };
        let mut conn = ReadConn {
            io: BufStream::with_capacity(64 << 10, 4 << 10, io),
            out: Vec::with_capacity(256),
            line: Vec::with_capacity(64),
        };
        let settings = info.redis_settings();
        if let Some(password) = settings.password() {
            match settings.username() {
                Some(user) => {
                    conn.simple(&[b"AUTH", user.as_bytes(), password.as_bytes()])
                        .await?
                }
                None => conn.simple(&[b"AUTH", password.as_bytes()]).await?,
            }
        }
        if settings.db() != 0 {
            conn.simple(&[b"SELECT", settings.db().to_string().as_bytes()])
                .await?;
        }
        Ok(conn)
    }

    /// `XREADGROUP GROUP group consumer COUNT count BLOCK block_ms STREAMS stream >`: the new
    /// entries, none when the block ran out. Gives up `block_ms` plus `margin` after sending.
    pub(super) async fn xreadgroup(
        &mut self,
        group: &str,
        consumer: &str,
        count: usize,
        block_ms: u64,
        stream: &str,
        margin: Duration,
    ) -> Result<Vec<Entry>, ReadError> {
        let count = count.to_string();
        let block = block_ms.to_string();
        let args: [&[u8]; 10] = [
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
        ];
        let limit = Duration::from_millis(block_ms) + margin;
        tokio::time::timeout(limit, async {
            self.send(&args, &[b">"]).await?;
            read_entries(&mut self.io, &mut self.line).await
        })
        .await
        .map_err(|_| ReadError::Timeout(limit))?
    }

    /// Sends a command that answers `+OK`.
    async fn simple(&mut self, args: &[&[u8]]) -> Result<(), ReadError> {
        self.send(args, &[]).await?;
        match read_header(&mut self.io, &mut self.line).await? {
            Header::Simple => Ok(()),
            _ => Err(ReadError::Protocol("expected +OK")),
        }
    }

    async fn send(&mut self, args: &[&[u8]], more: &[&[u8]]) -> Result<(), ReadError> {
        self.out.clear();
        encode(
            &mut self.out,
            args.iter().chain(more).copied(),
            args.len() + more.len(),
        );
        self.io.write_all(&self.out).await?;
        self.io.flush().await?;
        Ok(())
    }
}

/// Writes a command as a RESP array of bulk strings.
fn encode<'a>(out: &mut Vec<u8>, args: impl Iterator<Item = &'a [u8]>, n: usize) {
    use std::io::Write as _;
    let _ = write!(out, "*{n}\r\n");
    for arg in args {
        let _ = write!(out, "${}\r\n", arg.len());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

/// The first line of a reply.
#[derive(Debug, PartialEq)]
enum Header {
    /// `*n`
    Array(usize),
    /// `$n`
    Bulk(usize),
    /// `*-1`, `$-1` or RESP3's `_`
    Nil,
    /// `+…`
    Simple,
    /// `:n`
    Int,
}

/// The longest bulk string taken (Redis's own limit, `proto-max-bulk-len`, is 512 MiB).
const MAX_BULK: usize = 512 << 20;

/// Reads the first line of a reply: in place when the buffer holds all of it (nearly always),
/// else through `line`.
async fn read_header<R: AsyncBufRead + Unpin>(
    io: &mut R,
    line: &mut Vec<u8>,
) -> Result<Header, ReadError> {
    let buffered = {
        let buf = io.fill_buf().await?;
        buf.iter()
            .position(|&b| b == b'\n')
            .map(|end| (parse_line(&buf[..=end]), end + 1))
    };
    if let Some((header, used)) = buffered {
        // Consumed even for an error answer: the connection stays in step.
        io.consume(used);
        return header;
    }
    line.clear();
    if io.read_until(b'\n', line).await? == 0 {
        return Err(ReadError::Io(std::io::ErrorKind::UnexpectedEof.into()));
    }
    parse_line(line)
}

/// A reply's first line, with its CRLF.
fn parse_line(line: &[u8]) -> Result<Header, ReadError> {
    let Some(body) = line.strip_suffix(b"\r\n") else {
        return Err(ReadError::Io(std::io::ErrorKind::UnexpectedEof.into()));
    };
    let Some((&kind, rest)) = body.split_first() else {
        return Err(ReadError::Protocol("empty line"));
    };
    let length = || match number(rest) {
        Some(-1) => Ok(None),
        Some(n) => usize::try_from(n)
            .map(Some)
            .map_err(|_| ReadError::Protocol("bad length")),
        None => Err(ReadError::Protocol("bad length")),
    };
    Ok(match kind {
        b'-' => return Err(ReadError::Redis(String::from_utf8_lossy(rest).into_owned())),
        b'+' => Header::Simple,
        b':' => Header::Int,
        b'_' => Header::Nil,
        b'*' => length()?.map_or(Header::Nil, Header::Array),
        b'$' => match length()? {
            None => Header::Nil,
            Some(n) if n > MAX_BULK => return Err(ReadError::Protocol("bulk string too long")),
            Some(n) => Header::Bulk(n),
        },
        _ => return Err(ReadError::Protocol("unknown reply type")),
    })
}

/// A decimal integer, as RESP writes lengths.
fn number(text: &[u8]) -> Option<i64> {
    let (negative, digits) = match text.split_first() {
        Some((b'-', digits)) => (true, digits),
        _ => (false, text),
    };
    if digits.is_empty() || digits.len() > 18 {
        return None;
    }
    let mut n = 0i64;
    for &digit in digits {
        if !digit.is_ascii_digit() {
            return None;
        }
        n = n * 10 + i64::from(digit - b'0');
    }
    Some(if negative { -n } else { n })
}

/// An array's length; `None` for nil.
async fn read_array<R: AsyncBufRead + Unpin>(
    io: &mut R,
    line: &mut Vec<u8>,
) -> Result<Option<usize>, ReadError> {
    match read_header(io, line).await? {
        Header::Array(n) => Ok(Some(n)),
        Header::Nil => Ok(None),
        _ => Err(ReadError::Protocol("expected an array")),
    }
}

/// A bulk string's bytes.
/// The most elements reserved ahead from an announced array length.
const RESERVE_AT_MOST: usize = 4096;

async fn read_bulk<R: AsyncBufRead + Unpin>(
    io: &mut R,
    line: &mut Vec<u8>,
) -> Result<Vec<u8>, ReadError> {
    let Header::Bulk(n) = read_header(io, line).await? else {
        return Err(ReadError::Protocol("expected a bulk string"));
    };
    let buffered = {
        let buf = io.fill_buf().await?;
        buf.get(..n + 2).map(|whole| {
            (whole[n..] == *b"\r\n")
                .then(|| whole[..n].to_vec())
                .ok_or(ReadError::Protocol("bulk string without its CRLF"))
        })
    };
    if let Some(bytes) = buffered {
        io.consume(n + 2);
        return bytes;
    }
    let mut bytes = vec![0; n + 2];
    io.read_exact(&mut bytes).await?;
    if bytes[n..] != *b"\r\n" {
        return Err(ReadError::Protocol("bulk string without its CRLF"));
    }
    bytes.truncate(n);
    Ok(bytes)
}

async fn read_text<R: AsyncBufRead + Unpin>(
    io: &mut R,
    line: &mut Vec<u8>,
) -> Result<String, ReadError> {
    String::from_utf8(read_bulk(io, line).await?).map_err(|_| ReadError::Protocol("not UTF-8"))
}

/// Reads `XREADGROUP`'s reply: nil when the block ran out, else `[[stream, [entry, …]], …]`
/// with each entry `[id, [field, value, …]]` (the fields nil for an entry deleted since).
async fn read_entries<R: AsyncBufRead + Unpin>(
    io: &mut R,
    line: &mut Vec<u8>,
) -> Result<Vec<Entry>, ReadError> {
    let mut entries = Vec::new();
    let Some(streams) = read_array(io, line).await? else {
        return Ok(entries);
    };
    for _ in 0..streams {
        if read_array(io, line).await? != Some(2) {
            return Err(ReadError::Protocol("expected [stream, entries]"));
        }
        read_bulk(io, line).await?;
        let n = read_array(io, line).await?.unwrap_or(0);
        // Sizes announced by the server are trusted only so far: a broken reply must not
        // reserve more memory than the machine has.
        entries.reserve(n.min(RESERVE_AT_MOST));
        for _ in 0..n {
            // Most entries are whole in the read buffer: read there, without an await per part.
            if let Some((entry, used)) = buffered_entry(io.fill_buf().await?) {
                io.consume(used);
                entries.extend(entry);
                continue;
            }
            // One that crosses the buffer's end (or is broken: this path words the error).
            if read_array(io, line).await? != Some(2) {
                return Err(ReadError::Protocol("expected [id, fields]"));
            }
            let id = read_text(io, line).await?;
            let Some(flat) = read_array(io, line).await? else {
                continue;
            };
            let mut fields = Vec::with_capacity((flat / 2).min(RESERVE_AT_MOST));
            for _ in 0..flat / 2 {
                let name = super::field_name(read_bulk(io, line).await?);
                fields.push((name, read_bulk(io, line).await?));
            }
            if flat % 2 == 1 {
                return Err(ReadError::Protocol("odd number of field names and values"));
            }
            entries.push((id, fields));
        }
    }
    Ok(entries)
}

/// One entry of `XREADGROUP`'s reply, `[id, [field, value, …]]`, read from `buf` when all of
/// it is there and it is well formed: the entry (`None` for an entry deleted since, whose
/// fields are nil) and the bytes it took. `None` otherwise, for [`read_entries`] to read it part
/// by part, which waits for what is missing and words what is wrong.
///
/// Reading each part through the async reader cost about 300 instructions a part, eleven parts
/// per bench entry; here a part is a search for its line's end and a copy (docs/bench.md, round
/// 15).
fn buffered_entry(buf: &[u8]) -> Option<(Option<Entry>, usize)> {
    let mut parts = Parts { buf, at: 0 };
    if parts.header()? != Header::Array(2) {
        return None;
    }
    let id = String::from_utf8(parts.bulk()?).ok()?;
    let flat = match parts.header()? {
        Header::Array(flat) if flat % 2 == 0 => flat,
        Header::Nil => return Some((None, parts.at)),
        _ => return None,
    };
    let mut fields = Vec::with_capacity((flat / 2).min(RESERVE_AT_MOST));
    for _ in 0..flat / 2 {
        let name = super::field_name(parts.bulk()?);
        fields.push((name, parts.bulk()?));
    }
    Some((Some((id, fields)), parts.at))
}

/// The parts of a reply in a buffer, read from `at` on.
struct Parts<'a> {
    buf: &'a [u8],
    at: usize,
}

impl Parts<'_> {
    /// The next line as a header; `None` when it is not all there or is not a header.
    fn header(&mut self) -> Option<Header> {
        let rest = self.buf.get(self.at..)?;
        let end = rest.iter().position(|&b| b == b'\n')?;
        let header = parse_line(&rest[..=end]).ok()?;
        self.at += end + 1;
        Some(header)
    }

    /// The next bulk string's bytes; `None` as for [`Parts::header`].
    fn bulk(&mut self) -> Option<Vec<u8>> {
        let Header::Bulk(n) = self.header()? else {
            return None;
        };
        let whole = self.buf.get(self.at..self.at.checked_add(n + 2)?)?;
        if whole[n..] != *b"\r\n" {
            return None;
        }
        self.at += n + 2;
        Some(whole[..n].to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parse(reply: &[u8]) -> Result<Vec<Entry>, ReadError> {
        let mut input = reply;
        read_entries(&mut input, &mut Vec::new()).await
    }

    #[tokio::test]
    async fn replies_become_entries() {
        assert!(parse(b"*-1\r\n").await.unwrap().is_empty());
        let reply = b"*1\r\n*2\r\n$1\r\ns\r\n*2\r\n\
            *2\r\n$3\r\n1-0\r\n*4\r\n$6\r\nrecord\r\n$2\r\n{}\r\n$6\r\naction\r\n$6\r\ninsert\r\n\
            *2\r\n$3\r\n2-0\r\n*-1\r\n";
        let entries = parse(reply).await.unwrap();
        assert_eq!(
            entries,
            [(
                "1-0".to_owned(),
                vec![
                    ("record".to_owned(), b"{}".to_vec()),
                    ("action".to_owned(), b"insert".to_vec())
                ]
            )]
        );
    }

    #[tokio::test]
    async fn a_field_name_that_is_not_utf8_fails_only_its_own_entry() {
        // The reply is read whole (the connection stays in step) and the next entry is kept;
        // the odd entry goes on to be dead-lettered by the decoder.
        let reply = b"*1\r\n*2\r\n$1\r\ns\r\n*2\r\n\
            *2\r\n$3\r\n1-0\r\n*2\r\n$2\r\n\xffa\r\n$1\r\nv\r\n\
            *2\r\n$3\r\n2-0\r\n*2\r\n$6\r\naction\r\n$6\r\ninsert\r\n";
        let entries = parse(reply).await.unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].1, [("\u{fffd}a".to_owned(), b"v".to_vec())]);
        assert_eq!(entries[1].1, [("action".to_owned(), b"insert".to_vec())]);
    }

    #[tokio::test]
    async fn errors_keep_redis_code_and_broken_replies_are_refused() {
        let error = parse(b"-NOGROUP No such key 's'\r\n").await.unwrap_err();
        assert_eq!(error.code(), Some("NOGROUP"));
        assert!(error.keeps_connection());
        for broken in [
            &b"*1\r\n*2\r\n$1\r\ns\r\n*1\r\n*2\r\n$3\r\n1-0\r\n*1\r\n$1\r\na\r\n$1\r\nb\r\n"[..],
            b"*1\r\n*2\r\n$1\r\ns\r\n*1\r\n*2\r\n$3\r\n1-0\r\n*2\r\n$1\r\na\r\n$5\r\nb\r\n",
            b"*1\r\n*2\r\n$1\r\ns\r\n*1\r\n*2\r\n$3\r\n1-0\r\n*2\r\n$1\r\na\r\n$1\r\nbXX",
            b"*2\r\n",
            // Lengths no reply has: refused, not reserved.
            b"*1\r\n*2\r\n$1\r\ns\r\n*99999999999\r\n",
            b"*1\r\n*2\r\n$1\r\ns\r\n*1\r\n*2\r\n$3\r\n1-0\r\n*99999999999\r\n",
            b"%1\r\n",
            b"$-2\r\n",
        ] {
            let error = parse(broken).await.unwrap_err();
            assert!(!error.keeps_connection(), "{error}");
        }
    }

    #[tokio::test]
    async fn replies_split_across_reads_parse_alike() {
        let reply = b"*1\r\n*2\r\n$6\r\nstream\r\n*1\r\n\
            *2\r\n$15\r\n1700000000000-0\r\n*2\r\n$6\r\nrecord\r\n$19\r\n{\"id\":1,\"x\":\"abcd\"}\r\n";
        let whole = parse(reply).await.unwrap();
        // A 3-byte buffer: every header and bulk string crosses reads.
        let mut small = tokio::io::BufReader::with_capacity(3, &reply[..]);
        let split = read_entries(&mut small, &mut Vec::new()).await.unwrap();
        assert_eq!(whole, split);
        assert_eq!(whole[0].1[0].1, br#"{"id":1,"x":"abcd"}"#);
    }

    #[tokio::test]
    async fn entries_read_in_the_buffer_or_part_by_part_are_alike() {
        let mut reply = b"*1\r\n*2\r\n$1\r\ns\r\n*40\r\n".to_vec();
        for i in 0..40 {
            let value = format!("{{\"id\":{i},\"pad\":\"{}\"}}", "x".repeat(i));
            let id = format!("{i}-0");
            if i % 7 == 3 {
                reply.extend(format!("*2\r\n${}\r\n{id}\r\n*-1\r\n", id.len()).as_bytes());
                continue;
            }
            reply.extend(
                format!(
                    "*2\r\n${}\r\n{id}\r\n*4\r\n$6\r\nrecord\r\n${}\r\n{value}\r\n$6\r\naction\r\n$6\r\ninsert\r\n",
                    id.len(),
                    value.len()
                )
                .as_bytes(),
            );
        }
        let whole = parse(&reply).await.unwrap();
        assert_eq!(whole.len(), 34);
        // Buffers of every size up to a few entries: entries end inside them or cross them.
        for capacity in [1, 7, 50, 64, 100, 333] {
            let mut small = tokio::io::BufReader::with_capacity(capacity, &reply[..]);
            let split = read_entries(&mut small, &mut Vec::new()).await.unwrap();
            assert_eq!(split, whole, "{capacity}");
        }
    }

    #[test]
    fn only_whole_well_formed_entries_are_read_in_the_buffer() {
        let entry = b"*2\r\n$3\r\n1-0\r\n*2\r\n$1\r\na\r\n$2\r\nbc\r\n";
        let (read, used) = buffered_entry(&[&entry[..], b"*2\r\n"].concat()).unwrap();
        assert_eq!(used, entry.len());
        assert_eq!(
            read,
            Some(("1-0".to_owned(), vec![("a".to_owned(), b"bc".to_vec())]))
        );
        let deleted = b"*2\r\n$3\r\n1-0\r\n*-1\r\n";
        assert_eq!(buffered_entry(deleted), Some((None, deleted.len())));
        for cut in 0..entry.len() {
            assert_eq!(buffered_entry(&entry[..cut]), None, "{cut}");
        }
        // Left to the part-by-part read, which words the error.
        for broken in [
            &b"*2\r\n$3\r\n1-0\r\n*1\r\n$1\r\na\r\n"[..],
            b"*2\r\n$3\r\n1-0\r\n*2\r\n$1\r\na\r\n$2\r\nbcXX",
            b"*3\r\n$3\r\n1-0\r\n*-1\r\n",
            b"*2\r\n$2\r\n\xff\xfe\r\n*-1\r\n",
            b"-ERR no\r\n",
        ] {
            assert_eq!(buffered_entry(broken), None, "{broken:?}");
        }
    }

    #[test]
    fn lengths_are_decimal() {
        assert_eq!(number(b"0"), Some(0));
        assert_eq!(number(b"-1"), Some(-1));
        assert_eq!(number(b"123456"), Some(123_456));
        for bad in [&b""[..], b"-", b"1a", b" 1", b"9999999999999999999"] {
            assert_eq!(number(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        let mut out = Vec::new();
        encode(&mut out, [&b"GET"[..], b"k"].into_iter(), 2);
        assert_eq!(out, b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n");
    }
}
