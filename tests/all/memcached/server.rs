//! Memcached for the tests: the suite's server (`MEMCACHED_SERVERS`, started by
//! `scripts/test.sh`), a server of a test's own that it can kill and start again on the same
//! port, and a small meta-protocol reader of what the cache holds.

use crate::util::{PATIENCE, free_port, wait_for};
use std::process::{Child, Command, Stdio};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

/// The suite's memcached, as `host:port`.
pub fn memcached_servers() -> String {
    std::env::var("MEMCACHED_SERVERS").unwrap_or_else(|_| {
        panic!(
            "MEMCACHED_SERVERS is not set: run the tests through scripts/test.sh, which starts memcached (scripts/lib/memcached.sh)"
        )
    })
}

/// A memcached of the test's own, stopped when dropped.
pub struct MemcachedServer {
    pub port: u16,
    child: Option<Child>,
}

impl MemcachedServer {
    pub async fn start() -> MemcachedServer {
        let mut server = MemcachedServer {
            port: free_port(),
            child: None,
        };
        server.spawn().await;
        server
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) {
        let child = Command::new("memcached")
            .args(["-u", "nobody", "-l", "127.0.0.1", "-U", "0", "-m", "64"])
            .args(["-p", &self.port.to_string()])
            .stdout(Stdio::null())
            .spawn()
            .expect("memcached (installed by scripts/setup.sh)");
        self.child = Some(child);
        let address = self.address();
        wait_for("memcached to answer", PATIENCE, || {
            let address = address.clone();
            async move { Memcached::connect(&address).await.is_some() }
        })
        .await;
    }

    /// Kills the server (its data is lost).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// Starts it again on the same port, empty.
    pub async fn start_again(&mut self) {
        self.kill();
        self.spawn().await;
    }
}

impl Drop for MemcachedServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A connection that reads what memcached holds.
pub struct Memcached {
    stream: BufReader<TcpStream>,
}

impl Memcached {
    /// `None` while the server does not answer.
    pub async fn connect(address: &str) -> Option<Memcached> {
        let stream = TcpStream::connect(address).await.ok()?;
        let mut mc = Memcached {
            stream: BufReader::new(stream),
        };
        mc.stream.get_mut().write_all(b"mn\r\n").await.ok()?;
        (mc.line().await.as_deref() == Some("MN")).then_some(mc)
    }

    pub async fn open(address: &str) -> Memcached {
        Memcached::connect(address)
            .await
            .unwrap_or_else(|| panic!("memcached at {address} does not answer"))
    }

    async fn line(&mut self) -> Option<String> {
        let mut line = String::new();
        self.stream.read_line(&mut line).await.ok()?;
        Some(line.trim_end().to_owned())
    }

    /// Sends `mg <key> <flags>` and returns the reply's first line; `None` on a miss (`EN`).
    async fn meta_get(&mut self, key: &str, flags: &str) -> Option<String> {
        let command = format!("mg {key} {flags}\r\n");
        self.stream
            .get_mut()
            .write_all(command.as_bytes())
            .await
            .unwrap();
        let line = self.line().await.unwrap();
        (line != "EN").then_some(line)
    }

    /// The item's bytes, as stored.
    pub async fn raw(&mut self, key: &str) -> Option<Vec<u8>> {
        let line = self.meta_get(key, "v").await?;
        let size: usize = line
            .strip_prefix("VA ")
            .and_then(|rest| rest.split(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("mg {key}: {line}"));
        let mut value = vec![0; size + 2];
        self.stream.read_exact(&mut value).await.unwrap();
        value.truncate(size);
        Some(value)
    }

    /// The item as text (a plain write).
    pub async fn text(&mut self, key: &str) -> Option<String> {
        let raw = self.raw(key).await?;
        Some(String::from_utf8(raw).unwrap())
    }

    /// A versioned item as a reader sees it, by the README's rule: a miss or a tombstone (`t`)
    /// is no value; after `v` or `r` the value follows the 17-byte header.
    pub async fn versioned(&mut self, key: &str) -> Versioned {
        match self.raw(key).await {
            None => Versioned::Missing,
            Some(raw) => {
                assert!(raw.len() >= 17, "{key}: {raw:?} is not an envelope");
                let number = |at: usize| u64::from_be_bytes(raw[at..at + 8].try_into().unwrap());
                let version = (number(1), number(9));
                let text = String::from_utf8(raw[17..].to_vec()).unwrap();
                match raw[0] {
                    b'v' => Versioned::Value { version, text },
                    b'r' => Versioned::Read(text),
                    b't' => Versioned::Tombstone(version),
                    tag => panic!("{key}: tag {tag}"),
                }
            }
        }
    }

    /// The item's remaining time to live in seconds (`-1`: none), `None` when missing.
    pub async fn ttl(&mut self, key: &str) -> Option<i64> {
        let line = self.meta_get(key, "t").await?;
        line.split(' ')
            .find_map(|flag| flag.strip_prefix('t')?.parse().ok())
    }
}

/// A versioned key as a reader sees it.
#[derive(Debug, PartialEq, Eq)]
pub enum Versioned {
    Missing,
    /// Written by a change at `(lsn, idx)`.
    Value {
        version: (u64, u64),
        text: String,
    },
    /// Filled by a backfill read.
    Read(String),
    Tombstone((u64, u64)),
}

impl Versioned {
    /// The value a reader uses.
    pub fn value(&self) -> Option<&str> {
        match self {
            Versioned::Value { text, .. } | Versioned::Read(text) => Some(text),
            Versioned::Missing | Versioned::Tombstone(_) => None,
        }
    }
}
