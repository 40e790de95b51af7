//! A small client of Memcached's meta protocol (`mg`, `ms`, `md`, `mn`), one connection at a
//! time, and a pool of connections per server.
//!
//! Only the commands keepwarm needs, each with a response timeout. A connection whose command
//! failed (I/O error, timeout, a reply it could not read) is dropped rather than put back: what
//! it would read next is unknown.

use crate::message::Version;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The connection failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// No reply within the response timeout.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// A reply keepwarm cannot read.
    #[error("unexpected reply {0:?}")]
    Protocol(String),
    /// `CLIENT_ERROR …`: the server refuses the command itself (a bad key, …).
    #[error("CLIENT_ERROR {0}")]
    Client(String),
    /// `SERVER_ERROR …`: out of memory, object too large, …
    #[error("SERVER_ERROR {0}")]
    Server(String),
}

/// How `ms` stores.
#[derive(Clone, Copy, Debug)]
pub(super) enum Mode {
    /// Unconditionally.
    Set,
    /// Only if the key is missing (`ME`).
    Add,
    /// Only if the item still has this CAS value (`C<cas>`).
    Cas(u64),
}

/// What a conditional store or delete did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Written {
    /// `HD`: done.
    Done,
    /// `NS`, `EX` or `NF`: the condition did not hold (the item changed or appeared).
    Conflict,
}

/// One connection to one server.
pub(super) struct Conn {
    stream: BufReader<TcpStream>,
    timeout: Duration,
    broken: bool,
}

impl Conn {
    async fn connect(address: &str, timeout: Duration) -> Result<Conn, ClientError> {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(address))
            .await
            .map_err(|_| ClientError::Timeout(timeout))??;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream: BufReader::new(stream),
            timeout,
            broken: false,
        })
    }

    /// `mg <key> v c`: the value and its CAS, or `None` when the key is missing.
    pub(super) async fn get(&mut self, key: &str) -> Result<Option<(Vec<u8>, u64)>, ClientError> {
        self.value_with(key, 'c').await
    }

    /// `mg <key> v t`: the value and its remaining time to live in seconds (`-1`: none), or
    /// `None` when the key is missing (for `keepwarm version`).
    pub(super) async fn get_ttl(
        &mut self,
        key: &str,
    ) -> Result<Option<(Vec<u8>, i64)>, ClientError> {
        self.value_with(key, 't').await
    }

    /// `mg <key> v <flag>`: the value and the flag's number.
    async fn value_with<T: std::str::FromStr>(
        &mut self,
        key: &str,
        flag: char,
    ) -> Result<Option<(Vec<u8>, T)>, ClientError> {
        let command = format!("mg {key} v {flag}\r\n");
        self.call(async |conn| {
            conn.send(command.as_bytes(), None).await?;
            let line = conn.line().await?;
            let mut words = line.split(' ');
            match words.next() {
                Some("EN") => Ok(None),
                Some("VA") => {
                    let size: usize = words
                        .next()
                        .and_then(|n| n.parse().ok())
                        .ok_or_else(|| ClientError::Protocol(line.clone()))?;
                    let number = words
                        .find_map(|word| word.strip_prefix(flag)?.parse().ok())
                        .ok_or_else(|| ClientError::Protocol(line.clone()))?;
                    let mut value = vec![0; size + 2];
                    conn.stream.read_exact(&mut value).await?;
                    if !value.ends_with(b"\r\n") {
                        return Err(ClientError::Protocol("value without \\r\\n".to_owned()));
                    }
                    value.truncate(size);
                    Ok(Some((value, number)))
                }
                _ => Err(error_reply(line)),
            }
        })
        .await
    }

    /// `ms <key> <size> T<ttl> [ME | C<cas>]`: stores `value`, expiring after `ttl` (0: never).
    pub(super) async fn store(
        &mut self,
        key: &str,
        value: &[u8],
        ttl: u32,
        mode: Mode,
    ) -> Result<Written, ClientError> {
        let condition = match mode {
            Mode::Set => String::new(),
            Mode::Add => " ME".to_owned(),
            Mode::Cas(cas) => format!(" C{cas}"),
        };
        let command = format!("ms {key} {} T{ttl}{condition}\r\n", value.len());
        self.call(async |conn| {
            conn.send(command.as_bytes(), Some(value)).await?;
            written(conn.line().await?)
        })
        .await
    }

    /// `md <key> [C<cas>]`: deletes; a missing key is done too when no CAS is given.
    pub(super) async fn delete(
        &mut self,
        key: &str,
        cas: Option<u64>,
    ) -> Result<Written, ClientError> {
        let command = match cas {
            Some(cas) => format!("md {key} C{cas}\r\n"),
            None => format!("md {key}\r\n"),
        };
        self.call(async |conn| {
            conn.send(command.as_bytes(), None).await?;
            let line = conn.line().await?;
            if cas.is_none() && line == "NF" {
                return Ok(Written::Done);
            }
            written(line)
        })
        .await
    }

    /// `mg <key> T<ttl>`: sets the time to live of the key if it is there.
    pub(super) async fn touch(&mut self, key: &str, ttl: u32) -> Result<(), ClientError> {
        let command = format!("mg {key} T{ttl}\r\n");
        self.call(async |conn| {
            conn.send(command.as_bytes(), None).await?;
            let line = conn.line().await?;
            match line.as_str() {
                "HD" | "EN" => Ok(()),
                _ => Err(error_reply(line)),
            }
        })
        .await
    }

    /// `mn`: whether the server answers.
    pub(super) async fn noop(&mut self) -> Result<(), ClientError> {
        self.call(async |conn| {
            conn.send(b"mn\r\n", None).await?;
            let line = conn.line().await?;
            if line == "MN" {
                Ok(())
            } else {
                Err(error_reply(line))
            }
        })
        .await
    }

    /// Runs one command under the response timeout; a failure other than the server's refusal
    /// breaks the connection.
    async fn call<T>(
        &mut self,
        command: impl AsyncFnOnce(&mut Conn) -> Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        let timeout = self.timeout;
        let result = match tokio::time::timeout(timeout, command(self)).await {
            Ok(result) => result,
            Err(_) => Err(ClientError::Timeout(timeout)),
        };
        if let Err(error) = &result
            && !matches!(error, ClientError::Client(_) | ClientError::Server(_))
        {
            self.broken = true;
        }
        result
    }

    async fn send(&mut self, command: &[u8], value: Option<&[u8]>) -> Result<(), ClientError> {
        let stream = self.stream.get_mut();
        stream.write_all(command).await?;
        if let Some(value) = value {
            stream.write_all(value).await?;
            stream.write_all(b"\r\n").await?;
        }
        Ok(())
    }

    /// One reply line without its `\r\n`.
    async fn line(&mut self) -> Result<String, ClientError> {
        let mut line = String::new();
        let read = self.stream.read_line(&mut line).await?;
        if read == 0 {
            return Err(ClientError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        match line.strip_suffix("\r\n") {
            Some(text) => Ok(text.to_owned()),
            None => Err(ClientError::Protocol(line)),
        }
    }
}

fn written(line: String) -> Result<Written, ClientError> {
    match line.as_str() {
        "HD" => Ok(Written::Done),
        "NS" | "EX" | "NF" => Ok(Written::Conflict),
        _ => Err(error_reply(line)),
    }
}

/// An error reply (or something unexpected) as its [`ClientError`].
fn error_reply(line: String) -> ClientError {
    if let Some(text) = line.strip_prefix("CLIENT_ERROR ") {
        ClientError::Client(text.to_owned())
    } else if let Some(text) = line.strip_prefix("SERVER_ERROR ") {
        ClientError::Server(text.to_owned())
    } else {
        ClientError::Protocol(line)
    }
}

/// Why a new connection is checked before use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Check {
    /// The process's first connection to the server.
    Start,
    /// The first after a connection broke.
    Loss,
}

/// One server, its idle connections, and what keeps versions safe across its restarts.
pub(super) struct Server {
    /// `host:port`, as configured.
    pub(super) address: String,
    idle: Mutex<Vec<Conn>>,
    keep: usize,
    timeout: Duration,
    /// No connection was checked yet, or one broke: the server may have lost its items
    /// (restarted, flushed) since keepwarm last wrote there.
    lost: AtomicBool,
    /// A first connection was checked ([`Check::Start`]); after that, [`Check::Loss`].
    checked: AtomicBool,
    /// New connections are made one at a time, so that the first after a loss raises the floor
    /// before any other writes.
    gate: tokio::sync::Mutex<()>,
    /// The newest version this process has written to the server.
    pub(super) newest: Mutex<Option<Version>>,
}

impl Server {
    pub(super) fn new(address: String, keep: usize, timeout: Duration) -> Server {
        Server {
            address,
            idle: Mutex::new(Vec::new()),
            keep,
            timeout,
            lost: AtomicBool::new(true),
            checked: AtomicBool::new(false),
            gate: tokio::sync::Mutex::new(()),
            newest: Mutex::new(None),
        }
    }

    /// An idle connection, or a new one. The first new connection of the process, and the
    /// first after a connection broke, run `check` on it (under the gate, before it is used
    /// for anything else).
    pub(super) async fn take(
        &self,
        check: impl AsyncFnOnce(&mut Conn, Check) -> Result<(), ClientError>,
    ) -> Result<Conn, ClientError> {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        if let Some(conn) = idle {
            return Ok(conn);
        }
        let _gate = self.gate.lock().await;
        let connected = Conn::connect(&self.address, self.timeout).await;
        let mut conn = connected.inspect_err(|_| self.lost.store(true, Ordering::SeqCst))?;
        if self.lost.swap(false, Ordering::SeqCst) {
            let why = if self.checked.load(Ordering::SeqCst) {
                Check::Loss
            } else {
                Check::Start
            };
            if let Err(error) = check(&mut conn, why).await {
                self.lost.store(true, Ordering::SeqCst);
                return Err(error);
            }
            self.checked.store(true, Ordering::SeqCst);
        }
        Ok(conn)
    }

    /// Records that a versioned write at `version` is stored.
    pub(super) fn wrote(&self, version: Version) {
        let mut newest = self.newest.lock().unwrap_or_else(|e| e.into_inner());
        if newest.is_none_or(|n| n < version) {
            *newest = Some(version);
        }
    }

    /// Returns a connection to the pool, unless it broke (then every idle connection goes too:
    /// the server may have restarted) or the pool is full.
    pub(super) fn put_back(&self, conn: Conn) {
        if conn.broken {
            self.lost.store(true, Ordering::SeqCst);
            self.idle.lock().unwrap_or_else(|e| e.into_inner()).clear();
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < self.keep {
            idle.push(conn);
        }
    }
}
