//! Memcached as the cache: `set` (with its time to live), `del` and `expire`, plain or
//! versioned, over the meta protocol.
//!
//! Plain writes are `ms` (set), `md` (delete) and `mg … T` (touch). Versioned writes follow the
//! rules of `versioned.lua` with Memcached's compare-and-set: read the item with its CAS value
//! (`mg key v c`), skip the write when the version stored in its [`envelope`] is newer (a
//! backfill read writes only where no version is stored), otherwise store with `ms … C<cas>` (or
//! `ms … ME`, add-only, when the key is missing) and read again when another writer came in
//! between (`EX`, `NS`, `NF`). A delete leaves a tombstone for the tombstone time to live.
//!
//! A restarted Memcached has lost every item, versions and tombstones included, so a late
//! redelivery could write an old value into the emptied key. Against that, each server holds a
//! **floor** (the item `<versioning.key_prefix>floor`, a tombstone envelope kept for the tombstone
//! time to live): after a connection to a server broke, and at start when the server's sentinel
//! (`<versioning.key_prefix>kept`, no expiry) is gone because it restarted while no keepwarm was
//! connected, the first new connection raises the
//! floor to the newest version written there before anything else is written: the newest this
//! process wrote, or the newest any process recorded ([`newest`]: in Redis, raised in the
//! pipeline of each batch's dead letters, or without Redis in a local file; either way before
//! the batch's messages are acknowledged), which outlives both a Memcached restart and a process
//! killed around it. A
//! missing key counts as holding the floor's version: older changes, and backfill reads, do not
//! fill it (a cache miss instead of a stale value). Delete the floor item to let a backfill fill
//! keys before it expires.
//!
//! A message's operations are checked before any is written (the operation exists in Memcached,
//! the key is a Memcached key, the value fits): a message that breaks one is refused whole and
//! dead-lettered. Its operations are then written one after the other; those on different keys
//! are not one atomic step (Memcached has none), and a retried batch writes them again, which the
//! versions make harmless.
//!
//! - [`client`]: the meta-protocol connection and the per-server pool.
//! - [`ring`]: the ketama consistent hash over several servers.
//! - [`envelope`]: the version header of versioned values.
//! - [`newest`]: where the newest version written is recorded (Redis, or a local file).

mod client;
pub(crate) mod envelope;
pub(crate) mod newest;
pub(crate) mod ring;

use super::{ApplyError, MessageWrites};
use crate::config::MemcachedConfig;
use crate::message::Version;
use crate::ops::{CacheKind, Op};
pub use client::ClientError;
use client::{Check, Conn, Mode, Server, Written};
use envelope::Item;
use newest::Newest;
use ring::Ring;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Memcached's longest relative time to live: larger expiry values are read as Unix times.
const MAX_RELATIVE_TTL_SECS: u64 = 30 * 24 * 3600;
/// Memcached's longest key.
const MAX_KEY_BYTES: usize = 250;
/// Compare-and-set rounds for one operation before the batch is retried as a whole.
const MAX_CAS_ROUNDS: usize = 64;

/// Why Memcached cannot take a message's writes: the message is dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemcachedRefusal {
    /// An operation Memcached has no equivalent for.
    #[error("memcached has no {op} operation (it takes set, del and expire), key {key:?}")]
    Unsupported {
        /// The operation (`hash-set`, …).
        op: &'static str,
        /// Its key.
        key: String,
    },
    /// A key Memcached cannot store.
    #[error(
        "key {key:?} is not a memcached key (1 to 250 bytes without spaces or control characters)"
    )]
    Key {
        /// The key.
        key: String,
    },
    /// A value over the item size limit.
    #[error(
        "value of {bytes} bytes for key {key:?} is over memcached's item size limit of {limit} bytes (memcached.max_value_bytes)"
    )]
    TooLarge {
        /// The key.
        key: String,
        /// The value's size as stored (versioned values with their header).
        bytes: usize,
        /// `memcached.max_value_bytes`.
        limit: usize,
    },
    /// The server refused the command (`CLIENT_ERROR`, `SERVER_ERROR object too large …`).
    #[error("memcached {server} refused {op} on key {key:?}: {reply}")]
    Server {
        /// The server.
        server: String,
        /// The operation.
        op: &'static str,
        /// The key.
        key: String,
        /// The server's reply.
        reply: String,
    },
}

/// The Memcached servers plugin operations are written to.
pub(crate) struct Memcached {
    servers: Vec<Server>,
    ring: Ring,
    max_value_bytes: usize,
    tombstone_secs: u64,
    /// The key of each server's floor.
    floor_key: String,
    /// The key of each server's sentinel: an item without expiry, written once the floor is
    /// settled, whose absence at start says the server lost its items (restarted, flushed)
    /// since a keepwarm last checked it.
    sentinel_key: String,
    /// Where the newest version written to the pool is recorded.
    pub(super) newest: Newest,
}

/// What a versioned write does once the stored item is known.
enum Write {
    Store(Vec<u8>, u32),
    Delete,
    Nothing,
}

impl Memcached {
    pub(super) fn new(
        config: &MemcachedConfig,
        tombstone_secs: u64,
        version_prefix: &str,
        newest: Newest,
    ) -> Memcached {
        let timeout = Duration::from_millis(config.response_timeout_ms);
        Memcached {
            servers: config
                .servers
                .iter()
                .map(|address| Server::new(address.clone(), config.connections_per_server, timeout))
                .collect(),
            ring: Ring::new(&config.servers),
            max_value_bytes: config.max_value_bytes,
            tombstone_secs: tombstone_secs.max(1),
            floor_key: format!("{version_prefix}floor"),
            sentinel_key: format!("{version_prefix}kept"),
            newest,
        }
    }

    /// Checks that every server answers, naming the first that does not.
    pub(crate) async fn reach(&self) -> Result<(), (String, ClientError)> {
        for server in &self.servers {
            self.noop(server)
                .await
                .map_err(|error| (server.address.clone(), error))?;
        }
        Ok(())
    }

    /// Whether every server answers.
    pub(crate) async fn ping(&self) -> bool {
        self.reach().await.is_ok()
    }

    /// A connection to `server`, checked first when it is the process's first or the first
    /// after a loss ([`Memcached::check_server`]).
    async fn take(&self, server: &Server) -> Result<Conn, ClientError> {
        server
            .take(async |conn, why| self.check_server(conn, server, why).await)
            .await
    }

    /// Settles the server's floor before anything is written on a new connection: after a
    /// broken connection it is raised (the server may have restarted); at start, only when the
    /// sentinel is gone, i.e. the server lost its items while no keepwarm was connected (a
    /// restart while keepwarm was down too). Then the sentinel is written, if missing.
    async fn check_server(
        &self,
        conn: &mut Conn,
        server: &Server,
        why: Check,
    ) -> Result<(), ClientError> {
        let emptied = conn.get(&self.sentinel_key).await?.is_none();
        if why == Check::Loss || emptied {
            self.raise_floor(conn, server, why).await?;
        }
        if emptied {
            conn.store(&self.sentinel_key, b"", 0, Mode::Add).await?;
        }
        Ok(())
    }

    /// Raises the server's floor to the newest version written there (by this process, or
    /// recorded by any).
    async fn raise_floor(
        &self,
        conn: &mut Conn,
        server: &Server,
        why: Check,
    ) -> Result<(), ClientError> {
        let own = *server.newest.lock().unwrap_or_else(|e| e.into_inner());
        // On an error the batch is retried; the floor is raised on its next connection.
        let recorded = self.newest.read().await?;
        let Some(newest) = own.max(recorded) else {
            return Ok(());
        };
        let because = match why {
            Check::Loss => "memcached connection lost",
            Check::Start => "memcached lost its items while keepwarm was away",
        };
        tracing::warn!(server = %server.address, floor = %newest, "{because}: raising the floor, so that older changes do not fill keys a restart may have emptied");
        let floor = envelope::tombstone(newest);
        for _ in 0..MAX_CAS_ROUNDS {
            let written = match conn.get(&self.floor_key).await? {
                Some((bytes, _)) if envelope::decode(&bytes).version() >= Some(newest) => {
                    return Ok(());
                }
                Some((_, cas)) => {
                    conn.store(&self.floor_key, &floor, self.tombstone(), Mode::Cas(cas))
                        .await?
                }
                None => {
                    conn.store(&self.floor_key, &floor, self.tombstone(), Mode::Add)
                        .await?
                }
            };
            if written == Written::Done {
                return Ok(());
            }
        }
        Err(ClientError::Protocol(format!(
            "{}: still changing after {MAX_CAS_ROUNDS} compare-and-set rounds",
            self.floor_key
        )))
    }

    async fn noop(&self, server: &Server) -> Result<(), ClientError> {
        let mut conn = self.take(server).await?;
        let result = conn.noop().await;
        server.put_back(conn);
        result
    }

    /// Applies one message's writes. `Ok(Err(_))`: the message is refused (nothing of it was
    /// written); `Ok(Ok(stale))`: applied, with `stale` versioned writes skipped.
    ///
    /// # Errors
    ///
    /// A server is unreachable or failed: the batch must be retried.
    pub(crate) async fn apply(
        &self,
        writes: &MessageWrites<'_>,
    ) -> Result<Result<u64, MemcachedRefusal>, ApplyError> {
        for op in writes.plain.iter().chain(writes.versioned) {
            if let Err(refusal) = self.check(op, !writes.versioned.is_empty()) {
                return Ok(Err(refusal));
            }
        }
        let mut stale = 0;
        for op in writes.plain {
            if let Err(refusal) = self.write(op, None).await? {
                return Ok(Err(refusal));
            }
        }
        for op in writes.versioned {
            match self.write(op, Some(writes.version)).await? {
                Ok(skipped) => stale += u64::from(skipped),
                Err(refusal) => return Ok(Err(refusal)),
            }
        }
        Ok(Ok(stale))
    }

    /// What Memcached cannot take, before anything is written.
    fn check(&self, op: &Op, versioned: bool) -> Result<(), MemcachedRefusal> {
        check(op, versioned, self.max_value_bytes)
    }

    /// Writes one operation on the server that holds its key: plain (`version` is `None`) or
    /// versioned at `version` (`Some(None)`: a backfill read). `Ok(Ok(true))`: skipped as stale.
    async fn write(
        &self,
        op: &Op,
        version: Option<Option<Version>>,
    ) -> Result<Result<bool, MemcachedRefusal>, ApplyError> {
        let server = &self.servers[self.ring.server(op.key())];
        let unavailable = |error| ApplyError::Memcached {
            server: server.address.clone(),
            error,
        };
        let mut conn = self.take(server).await.map_err(unavailable)?;
        let result = match version {
            None => self.plain(&mut conn, op).await.map(|()| false),
            Some(version) => self.versioned(&mut conn, op, version).await,
        };
        if let (Ok(false), Some(Some(version))) = (&result, version) {
            server.wrote(version);
        }
        server.put_back(conn);
        match result {
            Ok(stale) => Ok(Ok(stale)),
            Err(ClientError::Client(reply)) => Ok(Err(self.refused(server, op, reply))),
            Err(ClientError::Server(reply)) if reply.contains("too large") => {
                Ok(Err(self.refused(server, op, reply)))
            }
            Err(error) => Err(unavailable(error)),
        }
    }

    fn refused(&self, server: &Server, op: &Op, reply: String) -> MemcachedRefusal {
        MemcachedRefusal::Server {
            server: server.address.clone(),
            op: op.kind().as_str(),
            key: op.key().to_owned(),
            reply,
        }
    }

    async fn plain(&self, conn: &mut Conn, op: &Op) -> Result<(), ClientError> {
        match op {
            Op::Set { key, value, ttl_ms } => {
                conn.store(key, value, ttl_ms.map_or(0, expiry), Mode::Set)
                    .await?;
            }
            Op::Del { key } => {
                conn.delete(key, None).await?;
            }
            Op::Expire { key, ttl_ms } => conn.touch(key, expiry(*ttl_ms)).await?,
            // Refused by `check` before anything is written.
            _ => {}
        }
        Ok(())
    }

    /// The compare-and-set loop of one versioned operation. Returns whether it was stale.
    async fn versioned(
        &self,
        conn: &mut Conn,
        op: &Op,
        version: Option<Version>,
    ) -> Result<bool, ClientError> {
        let key = op.key();
        for _ in 0..MAX_CAS_ROUNDS {
            let current = conn.get(key).await?;
            let item = current.as_ref().map(|(bytes, _)| envelope::decode(bytes));
            let stored = match &item {
                Some(item) => item.version(),
                // A missing key holds the floor: a restart may have emptied it.
                None => conn
                    .get(&self.floor_key)
                    .await?
                    .and_then(|(bytes, _)| envelope::decode(&bytes).version()),
            };
            let may_write = match version {
                // A backfill read fills only what no change has versioned.
                None => stored.is_none(),
                // Its own version is not newer: a message's second operation on the key
                // applies (as in `versioned.lua`).
                Some(version) => stored.is_none_or(|stored| stored <= version),
            };
            if !may_write {
                return Ok(true);
            }
            let write = self.plan(op, version, item.as_ref());
            let cas = current.as_ref().map(|(_, cas)| *cas);
            let written = match (write, cas) {
                (Write::Nothing, _) | (Write::Delete, None) => return Ok(false),
                (Write::Delete, Some(cas)) => conn.delete(key, Some(cas)).await?,
                (Write::Store(bytes, ttl), Some(cas)) => {
                    conn.store(key, &bytes, ttl, Mode::Cas(cas)).await?
                }
                (Write::Store(bytes, ttl), None) => conn.store(key, &bytes, ttl, Mode::Add).await?,
            };
            if written == Written::Done {
                return Ok(false);
            }
            // Another writer came in between: read again.
        }
        Err(ClientError::Protocol(format!(
            "{key}: still changing after {MAX_CAS_ROUNDS} compare-and-set rounds"
        )))
    }

    /// What a versioned operation writes over `item` (mirrors `versioned.lua`).
    fn plan(&self, op: &Op, version: Option<Version>, item: Option<&Item<'_>>) -> Write {
        let tombstone = |version| Write::Store(envelope::tombstone(version), self.tombstone());
        match op {
            Op::Set { value, ttl_ms, .. } => {
                Write::Store(envelope::value(version, value), ttl_ms.map_or(0, expiry))
            }
            Op::Del { .. } => match version {
                // A tombstone: older writes arriving late must not resurrect the key.
                Some(version) => tombstone(version),
                None => Write::Delete,
            },
            Op::Expire { ttl_ms, .. } => match (item, version) {
                (Some(Item::Value { payload, .. } | Item::Foreign(payload)), _) => {
                    Write::Store(envelope::value(version, payload), expiry(*ttl_ms))
                }
                // Nothing to expire: the version is kept, as a tombstone.
                (Some(Item::Tombstone(_)) | None, Some(version)) => tombstone(version),
                (Some(Item::Tombstone(_)) | None, None) => Write::Nothing,
            },
            _ => Write::Nothing,
        }
    }

    fn tombstone(&self) -> u32 {
        expiry(self.tombstone_secs.saturating_mul(1000))
    }
}

/// What Memcached holds for one key, for `keepwarm version`.
pub(crate) struct Peek {
    /// The server the ring puts the key on.
    pub(crate) server: String,
    /// The item's bytes and remaining time to live in seconds (`-1`: none), if any.
    pub(crate) item: Option<(Vec<u8>, i64)>,
    /// The version of the server's floor, if any.
    pub(crate) floor: Option<Version>,
}

/// Reads `key` and its server's floor (only reads).
///
/// # Errors
///
/// The server cannot be reached or fails: its address and the error.
pub(crate) async fn peek(
    config: &MemcachedConfig,
    version_prefix: &str,
    key: &str,
) -> Result<Peek, (String, ClientError)> {
    let address = config.servers[Ring::new(&config.servers).server(key)].clone();
    let timeout = Duration::from_millis(config.response_timeout_ms);
    let server = Server::new(address.clone(), 1, timeout);
    let read = async {
        let mut conn = server.take(async |_, _| Ok(())).await?;
        let item = conn.get_ttl(key).await?;
        let floor = conn.get(&format!("{version_prefix}floor")).await?;
        Ok::<_, ClientError>(Peek {
            server: address.clone(),
            item,
            floor: floor.and_then(|(bytes, _)| envelope::decode(&bytes).version()),
        })
    };
    read.await.map_err(|error| (address.clone(), error))
}

/// What Memcached cannot take: an operation it lacks, a key it cannot store, a value over
/// `max_value_bytes` (versioned values with their header).
fn check(op: &Op, versioned: bool, max_value_bytes: usize) -> Result<(), MemcachedRefusal> {
    let key = op.key();
    if !CacheKind::Memcached.supports(op.kind()) {
        return Err(MemcachedRefusal::Unsupported {
            op: op.kind().as_str(),
            key: key.to_owned(),
        });
    }
    if key.is_empty() || key.len() > MAX_KEY_BYTES || key.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(MemcachedRefusal::Key {
            key: key.to_owned(),
        });
    }
    if let Op::Set { value, .. } = op {
        let bytes = value.len() + if versioned { envelope::HEADER } else { 0 };
        if bytes > max_value_bytes {
            return Err(MemcachedRefusal::TooLarge {
                key: key.to_owned(),
                bytes,
                limit: max_value_bytes,
            });
        }
    }
    Ok(())
}

/// A time to live in milliseconds as Memcached's expiry: whole seconds, rounded up; past 30 days
/// Memcached reads the number as a Unix time, so it is converted to one.
pub(crate) fn expiry(ttl_ms: u64) -> u32 {
    let secs = ttl_ms.div_ceil(1000).max(1);
    if secs <= MAX_RELATIVE_TTL_SECS {
        return secs as u32;
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    u32::try_from(now.saturating_add(secs)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_become_memcached_expiries() {
        assert_eq!(expiry(1), 1);
        assert_eq!(expiry(1500), 2);
        assert_eq!(
            expiry(MAX_RELATIVE_TTL_SECS * 1000),
            MAX_RELATIVE_TTL_SECS as u32
        );
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let absolute = u64::from(expiry((MAX_RELATIVE_TTL_SECS + 1) * 1000));
        assert!(absolute >= now + MAX_RELATIVE_TTL_SECS, "{absolute}");
    }

    #[test]
    fn messages_memcached_cannot_take_are_refused_before_writing() {
        let check = |op: &Op, versioned| check(op, versioned, 20);
        let set = |key: &str, len: usize| Op::Set {
            key: key.to_owned(),
            value: vec![b'x'; len],
            ttl_ms: None,
        };
        assert_eq!(check(&set("k", 20), false), Ok(()));
        // A versioned value counts its 17-byte header.
        assert_eq!(check(&set("k", 3), true), Ok(()));
        assert!(matches!(
            check(&set("k", 4), true),
            Err(MemcachedRefusal::TooLarge { bytes: 21, .. })
        ));
        for key in ["", "a b", "a\nb", &"k".repeat(251)] {
            assert!(matches!(
                check(&set(key, 1), false),
                Err(MemcachedRefusal::Key { .. })
            ));
        }
        let hash = Op::HashSet {
            key: "h".to_owned(),
            fields: vec![],
        };
        let refusal = check(&hash, false).unwrap_err();
        assert!(
            refusal.to_string().contains("no hash-set operation"),
            "{refusal}"
        );
    }
}
