//! Versioned writes of whole keys as Redis transactions, without the script.
//!
//! Most versioned messages write rows as values: `SET` without a time to live, or `DEL`, on keys
//! whose companion is a string version or missing (see [`super::versioned`]). For those, on a
//! single Redis, the applier reads the companions under `WATCH` with one `MGET` (and `EXISTS`,
//! to tell a missing companion from a hash, which `MGET` answers alike), decides here which
//! writes are newer than what Redis holds (a backfill read: which keys hold no version), and
//! sends each key's last write in `MULTI` … `EXEC`: the values in one `MSET` beside their new
//! versions, the deleted keys in one `DEL`, each with a tombstone. If another writer touches a
//! watched companion in between, Redis refuses the `EXEC` and those messages go to the script
//! like every other message; so do messages with any other operation, or writing a key whose
//! companion is a hash (member versions, or contract v4's layout).
//!
//! Why: the script interns every argument as a Lua string, and Redis's Lua hashes each byte of
//! it, so a value costs Redis about 11 instructions per byte there (docs/bench.md, round 6);
//! `MSET` copies it once.
//!
//! A transaction needs a connection of its own (`WATCH` and `MULTI` hold for the connection, and
//! the shared connection multiplexes every lane's commands), so this module keeps a pool of
//! them, one per lane applying at the same time. A Redis that refuses `WATCH` (a proxy) turns
//! the transactions off for the life of the process, with a warning.

use super::ApplyError;
use super::MessageOutcome;
use super::MessageWrites;
use super::passes;
use super::versioned::{version_arg, version_key};
use crate::ops::Op;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, ServerError, Value};
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// The most companions one transaction watches. Redis 7.0's `WATCH` looks each key up in the
/// connection's list of watched keys, so its own cost grows with the square of their number,
/// and 32 keys cost Redis the fewest instructions per message (docs/bench.md, round 5). But
/// each transaction is two or three round trips, whose system calls and wake-ups weigh more,
/// on both sides: with 128, Redis and keepwarm both spent less CPU per message in every
/// alternated bench run (round 8), while 256 gained nothing more.
const WATCH_KEYS: usize = 128;

/// The most transactions of one batch at once.
const AT_ONCE: usize = 4;

/// Transactions for the versioned writes of whole keys (see the module documentation).
pub(super) struct Watched {
    client: Client,
    config: AsyncConnectionConfig,
    /// Connections not in use.
    idle: Mutex<Vec<MultiplexedConnection>>,
    /// Cleared when Redis refuses a transaction's command for good.
    enabled: AtomicBool,
    prefix: String,
    tombstone_ms: String,
}

/// A map keyed by companion, with the fast hasher of the pipeline's maps.
type ByCompanion<'a, V> = HashMap<&'a str, V, foldhash::fast::RandomState>;

/// A map sized for `n` companions. Grown from empty, the maps of a batch rehashed each key
/// about twice (hashing its companion's name again each time): about 400 instructions per
/// message (docs/bench.md, round 15).
fn sized<'a, V>(n: usize) -> ByCompanion<'a, V> {
    HashMap::with_capacity_and_hasher(n, foldhash::fast::RandomState::default())
}

/// What a companion holds, as a transaction reads it.
#[derive(Debug, PartialEq)]
enum Held {
    /// The key's version.
    Version(String),
    /// Nothing: no change has written the key.
    Nothing,
    /// Something a transaction leaves to the script: a hash of member versions (or contract
    /// v4's version-only hash), or a string that is not a version (the script refuses it).
    Other,
}

/// How one transaction ended.
enum Ended {
    /// Applied: the messages it carried, each with its writes skipped as stale.
    Applied(Vec<(usize, u64)>),
    /// A watched companion changed before `EXEC`: the script takes these messages.
    Aborted,
    /// Redis answered a command with an error: the script takes these messages, and the
    /// connection is dropped.
    Refused,
}

/// A message a transaction may carry: its index in the batch, its version as stored, and its
/// operations (each a `SET` without a time to live or a `DEL`) with their companions.
struct Candidate<'a> {
    index: usize,
    /// `None`: a backfill read, which only fills keys that hold no version.
    version: Option<String>,
    ops: Vec<(&'a Op, String)>,
}

impl Watched {
    pub(super) fn new(
        client: Client,
        config: AsyncConnectionConfig,
        prefix: &str,
        tombstone_ms: u64,
    ) -> Watched {
        Watched {
            client,
            config,
            idle: Mutex::new(Vec::new()),
            enabled: AtomicBool::new(true),
            prefix: prefix.to_owned(),
            tombstone_ms: tombstone_ms.to_string(),
        }
    }

    /// Applies what it can of the batch's versioned writes in transactions. Sets the outcome of
    /// each message it applied and marks it in `done`; the rest are left to the script.
    ///
    /// # Errors
    ///
    /// The connection failed: the batch is retried (what was applied is applied again, at the
    /// same version, which the script and these transactions both take as not stale).
    pub(super) async fn apply(
        &self,
        messages: &[MessageWrites<'_>],
        outcomes: &mut [MessageOutcome],
        done: &mut [bool],
    ) -> Result<(), ApplyError> {
        if !self.enabled.load(Ordering::Relaxed) {
            return Ok(());
        }
        let candidates = self.candidates(messages);
        if candidates.is_empty() {
            return Ok(());
        }
        let chunks = chunks(&candidates);
        // The chunks of a batch go at once, each on its own connection: a transaction waits for
        // two or three round trips.
        let mut failed = None;
        for wave in chunks.chunks(AT_ONCE) {
            let mut runs = Vec::with_capacity(wave.len());
            for chunk in wave {
                runs.push(self.run(chunk));
            }
            for ended in futures_util::future::join_all(runs).await {
                match ended {
                    Ok(Ended::Applied(applied)) => {
                        for (index, stale) in applied {
                            outcomes[index] = MessageOutcome::Applied { stale };
                            done[index] = true;
                        }
                    }
                    Ok(Ended::Aborted | Ended::Refused) => {}
                    Err(error) => failed = Some(error),
                }
            }
            if failed.is_some() {
                break;
            }
        }
        match failed {
            // The idle connections are dropped too: after a Redis restart they are all dead,
            // and each would cost the lane a retry.
            Some(error) => {
                self.idle.lock().unwrap_or_else(|e| e.into_inner()).clear();
                Err(error)
            }
            None => Ok(()),
        }
    }

    /// One chunk's transaction on a connection of its own, given back when it ended cleanly
    /// (a failed or refused one may still watch keys, or be in `MULTI`).
    async fn run(&self, chunk: &[&Candidate<'_>]) -> Result<Ended, ApplyError> {
        let Some(mut conn) = self.take().await? else {
            return Ok(Ended::Refused);
        };
        let ended = self.transaction(&mut conn, chunk).await?;
        if !matches!(ended, Ended::Refused) {
            self.idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(conn);
        }
        Ok(ended)
    }

    /// The messages whose versioned writes are all whole-key `SET`s without a time to live and
    /// `DEL`s, at a version.
    fn candidates<'a>(&self, messages: &[MessageWrites<'a>]) -> Vec<Candidate<'a>> {
        messages
            .iter()
            .enumerate()
            .filter_map(|(index, writes)| {
                if writes.versioned.is_empty() {
                    return None;
                }
                let ops = writes
                    .versioned
                    .iter()
                    .map(|op| match op {
                        Op::Set { ttl_ms: None, .. } | Op::Del { .. } => {
                            Some((op, version_key(&self.prefix, op.key())))
                        }
                        _ => None,
                    })
                    .collect::<Option<Vec<_>>>()?;
                Some(Candidate {
                    index,
                    version: writes.version.map(|version| version_arg(Some(version))),
                    ops,
                })
            })
            .collect()
    }

    /// One transaction: `WATCH` and `MGET` the chunk's companions, then `MULTI`, the writes that
    /// are newer, `EXEC`.
    async fn transaction(
        &self,
        conn: &mut MultiplexedConnection,
        chunk: &[&Candidate<'_>],
    ) -> Result<Ended, ApplyError> {
        // What each companion holds as the transaction goes, and the companions in order. Sized
        // for a companion per message, the usual case (see `sized`).
        let mut held: ByCompanion<'_, Held> = sized(chunk.len());
        let mut companions: Vec<&str> = Vec::with_capacity(chunk.len());
        for candidate in chunk {
            for (_, vkey) in &candidate.ops {
                if let Entry::Vacant(entry) = held.entry(vkey.as_str()) {
                    entry.insert(Held::Nothing);
                    companions.push(vkey.as_str());
                }
            }
        }
        // `MGET` answers nothing for a missing key and for a hash alike; `EXISTS` counts both.
        // When it counts no more keys than `MGET` answered, every unanswered companion is
        // missing (a new key, the usual case), without a round trip of `TYPE`s. `EXISTS` goes
        // first, so that a key that expires in between can only make the count larger (and
        // send the transaction the slow way); one that another writer creates or changes after
        // `WATCH` aborts the `EXEC`.
        let mut read = redis::pipe();
        read.cmd("WATCH").arg(&companions).ignore();
        read.cmd("EXISTS").arg(&companions);
        read.cmd("MGET").arg(&companions);
        let Some((existing, stored)) = self
            .read::<(usize, Vec<Option<Vec<u8>>>)>(conn, &read)
            .await?
        else {
            return Ok(Ended::Refused);
        };
        // Not one value per key (a misbehaving proxy): nothing here can be trusted.
        if stored.len() != companions.len() {
            return Ok(Ended::Refused);
        }
        let mut answered = 0;
        for (&vkey, value) in companions.iter().zip(stored) {
            if let Some(value) = value {
                answered += 1;
                held.insert(
                    vkey,
                    string_version(value).map_or(Held::Other, Held::Version),
                );
            }
        }
        // Some unanswered companion exists: `TYPE` tells which (the companions are watched
        // already).
        let unread: Vec<&str> = if existing > answered {
            companions
                .iter()
                .copied()
                .filter(|vkey| held[vkey] == Held::Nothing)
                .collect()
        } else {
            Vec::new()
        };
        if !unread.is_empty() {
            let mut types = redis::pipe();
            for vkey in &unread {
                types.cmd("TYPE").arg(*vkey);
            }
            let Some(kinds) = self.read::<Vec<String>>(conn, &types).await? else {
                return Ok(Ended::Refused);
            };
            if kinds.len() != unread.len() {
                return Ok(Ended::Refused);
            }
            for (vkey, kind) in unread.into_iter().zip(kinds) {
                if kind != "none" {
                    held.insert(vkey, Held::Other);
                }
            }
        }
        let mut writes = Writes::with_capacity(chunk.len());
        let mut applied = Vec::with_capacity(chunk.len());
        for candidate in chunk {
            if candidate
                .ops
                .iter()
                .any(|(_, vkey)| held[vkey.as_str()] == Held::Other)
            {
                continue;
            }
            let mut stale = 0;
            for (op, vkey) in &candidate.ops {
                let slot = held
                    .get_mut(vkey.as_str())
                    .expect("every companion is read");
                let fresh = match (&*slot, &candidate.version) {
                    (Held::Version(stored), Some(version)) => stored <= version,
                    (Held::Version(_), None) => false,
                    (_, _) => true,
                };
                if !fresh {
                    stale += 1;
                    continue;
                }
                let version = candidate.version.as_deref().map(|version| {
                    *slot = Held::Version(version.to_owned());
                    (vkey.as_str(), version)
                });
                match op {
                    Op::Set { key, value, .. } => writes.set(key, value, version),
                    _ => writes.delete(op.key(), version),
                }
            }
            applied.push((candidate.index, stale));
        }
        if writes.last.is_empty() {
            redis::cmd("UNWATCH").exec_async(conn).await?;
            return Ok(Ended::Applied(applied));
        }
        // MULTI … EXEC as a plain pipeline, every reply read here: redis-rs's atomic pipelines
        // miscount the replies when Redis refuses a command of the transaction.
        let mut transaction = redis::pipe();
        transaction.ignore_errors().cmd("MULTI");
        writes.finish(&mut transaction, &self.tombstone_ms);
        transaction.cmd("EXEC");
        let replies: Vec<Value> = transaction.query_async(conn).await?;
        match replies.last() {
            Some(Value::Array(_)) => Ok(Ended::Applied(applied)),
            Some(Value::Nil) => {
                tracing::debug!(
                    messages = chunk.len(),
                    "a watched version changed; the script applies these messages"
                );
                Ok(Ended::Aborted)
            }
            _ => {
                for reply in &replies {
                    if let Value::ServerError(error) = reply {
                        self.refused(error);
                    }
                }
                Ok(Ended::Refused)
            }
        }
    }

    /// A connection for one batch: an idle one, or a new one, which must take `MULTI` (a Redis
    /// that refuses it would run a transaction's writes one by one, unguarded). `None` when it
    /// does not.
    async fn take(&self) -> Result<Option<MultiplexedConnection>, ApplyError> {
        if let Some(conn) = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Ok(Some(conn));
        }
        let mut conn = self
            .client
            .get_multiplexed_async_connection_with_config(&self.config)
            .await?;
        let mut probe = redis::pipe();
        probe.ignore_errors().cmd("MULTI").cmd("DISCARD");
        let replies: Vec<Value> = probe.query_async(&mut conn).await?;
        for reply in &replies {
            if let Value::ServerError(error) = reply {
                self.refused(error);
                return Ok(None);
            }
        }
        Ok(Some(conn))
    }

    /// Redis refused a command of a transaction. For good (an unknown command behind a proxy,
    /// an ACL without `WATCH` or `MULTI`): no more transactions, the script does everything.
    /// For now (`LOADING`, `OOM`, …): the script meets the same answer, and the lane retries
    /// the batch.
    fn refused(&self, error: &ServerError) {
        if !passes(error) && self.enabled.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                error = %error,
                "redis refuses a transaction's command; versioned writes all go through the script"
            );
        }
    }

    /// Sends a transaction's read. `None` when Redis answered a command with an error, each
    /// error then passed to [`Watched::refused`].
    ///
    /// # Errors
    ///
    /// The connection failed.
    async fn read<T: redis::FromRedisValue>(
        &self,
        conn: &mut MultiplexedConnection,
        pipe: &redis::Pipeline,
    ) -> Result<Option<T>, ApplyError> {
        match pipe.query_async(conn).await {
            Ok(reply) => Ok(Some(reply)),
            Err(error) if is_refusal(&error) => {
                for (_, error) in error
                    .into_server_errors()
                    .iter()
                    .flat_map(|errors| errors.iter())
                {
                    self.refused(error);
                }
                Ok(None)
            }
            Err(error) => Err(error.into()),
        }
    }
}

/// The candidates in chunks of about [`WATCH_KEYS`] companions, each message in the chunk that
/// already holds one of its companions (two transactions at once watching one key would refuse
/// each other), otherwise in the chunk being filled.
fn chunks<'c, 'a>(candidates: &'c [Candidate<'a>]) -> Vec<Vec<&'c Candidate<'a>>> {
    let mut chunks: Vec<(Vec<&Candidate<'a>>, usize)> = Vec::new();
    let mut owner: ByCompanion<'c, usize> = sized(candidates.len());
    for candidate in candidates {
        let home = candidate
            .ops
            .iter()
            .find_map(|(_, vkey)| owner.get(vkey.as_str()).copied());
        let at = match home {
            Some(at) => at,
            None => match chunks.last() {
                Some((_, keys)) if *keys < WATCH_KEYS => chunks.len() - 1,
                _ => {
                    chunks.push((Vec::new(), 0));
                    chunks.len() - 1
                }
            },
        };
        chunks[at].0.push(candidate);
        for (_, vkey) in &candidate.ops {
            if let Entry::Vacant(entry) = owner.entry(vkey.as_str()) {
                entry.insert(at);
                chunks[at].1 += 1;
            }
        }
    }
    chunks.into_iter().map(|(chunk, _)| chunk).collect()
}

/// A companion's value as a version this module can compare, or `None`.
fn string_version(value: Vec<u8>) -> Option<String> {
    let text = String::from_utf8(value).ok()?;
    (text.len() == 41 && text.as_bytes()[20] == b':').then_some(text)
}

/// Whether Redis answered with an error (rather than the connection failing).
fn is_refusal(error: &redis::RedisError) -> bool {
    !(error.is_io_error() || error.is_timeout() || error.is_connection_dropped())
}

/// The writes of one transaction: each key's last, since only that one shows once `EXEC` has
/// run. Values go in one `MSET` beside their versions, deleted keys in one `DEL`, each with its
/// tombstone.
#[derive(Default)]
struct Writes<'a> {
    /// Per key, in the order first written, its last write.
    last: Vec<Write<'a>>,
    at: HashMap<&'a str, usize, foldhash::fast::RandomState>,
}

/// A key, its value (`None`: deleted), and its companion and the version to record there
/// (`None`: a backfill read records none).
type Write<'a> = (&'a str, Option<&'a [u8]>, Stamp<'a>);

/// A companion and the version to record in it.
type Stamp<'a> = Option<(&'a str, &'a str)>;

impl<'a> Writes<'a> {
    /// Room for `n` keys' writes.
    fn with_capacity(n: usize) -> Writes<'a> {
        Writes {
            last: Vec::with_capacity(n),
            at: sized(n),
        }
    }

    fn set(&mut self, key: &'a str, value: &'a [u8], version: Stamp<'a>) {
        self.put(key, Some(value), version);
    }

    fn delete(&mut self, key: &'a str, version: Stamp<'a>) {
        self.put(key, None, version);
    }

    fn put(&mut self, key: &'a str, value: Option<&'a [u8]>, version: Stamp<'a>) {
        let write = (key, value, version);
        match self.at.get(key) {
            // A backfill read after a versioned write of the key is stale before it gets here;
            // a versioned write after a read replaces it, version and all.
            Some(&at) => self.last[at] = write,
            None => {
                self.at.insert(key, self.last.len());
                self.last.push(write);
            }
        }
    }

    /// Adds the writes to `pipe`.
    fn finish(self, pipe: &mut redis::Pipeline, tombstone_ms: &str) {
        // Sized once: the values are most of it, and growing the buffer copied them again.
        let (mut args, mut bytes) = (1, 4);
        for (key, value, version) in &self.last {
            if let Some(value) = value {
                args += 2;
                bytes += key.len() + value.len();
                if let Some((vkey, version)) = version {
                    args += 2;
                    bytes += vkey.len() + version.len();
                }
            }
        }
        let mut mset = redis::Cmd::with_capacity(args, bytes);
        mset.arg("MSET");
        let mut del = redis::cmd("DEL");
        let (mut sets, mut deletes) = (0, 0);
        for (key, value, version) in &self.last {
            match value {
                Some(value) => {
                    mset.arg(*key).arg(*value);
                    if let Some((vkey, version)) = version {
                        mset.arg(*vkey).arg(*version);
                    }
                    sets += 1;
                }
                None => {
                    del.arg(*key);
                    deletes += 1;
                }
            }
        }
        if sets > 0 {
            pipe.add_command(mset);
        }
        if deletes > 0 {
            pipe.add_command(del);
        }
        for (_, value, version) in &self.last {
            if let (None, Some((vkey, version))) = (value, version) {
                // A tombstone: older writes arriving late must not resurrect the key.
                pipe.cmd("SET")
                    .arg(*vkey)
                    .arg(*version)
                    .arg("PX")
                    .arg(tombstone_ms);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keyed(index: usize, keys: &[&str]) -> Candidate<'static> {
        static OP: std::sync::LazyLock<Op> = std::sync::LazyLock::new(|| Op::Del {
            key: "k".to_owned(),
        });
        Candidate {
            index,
            version: None,
            ops: keys.iter().map(|key| (&*OP, (*key).to_owned())).collect(),
        }
    }

    fn indexes(chunks: &[Vec<&Candidate<'_>>]) -> Vec<Vec<usize>> {
        chunks
            .iter()
            .map(|chunk| chunk.iter().map(|c| c.index).collect())
            .collect()
    }

    #[test]
    fn chunks_watch_their_share_of_keys_and_keep_a_key_in_one_chunk() {
        let total = 2 * WATCH_KEYS + 6;
        let names: Vec<String> = (0..total).map(|n| format!("k{n}")).collect();
        let candidates: Vec<_> = names
            .iter()
            .enumerate()
            .map(|(i, name)| keyed(i, &[name.as_str()]))
            .collect();
        let sizes: Vec<usize> = chunks(&candidates).iter().map(Vec::len).collect();
        assert_eq!(sizes, [WATCH_KEYS, WATCH_KEYS, 6]);
        // A key seen again goes back to its chunk, even a full one; a new key fills the last.
        let again = [
            keyed(0, &["a"]),
            keyed(1, &["b"]),
            keyed(2, &["a"]),
            keyed(3, &["c", "b"]),
        ];
        assert_eq!(indexes(&chunks(&again)), [vec![0, 1, 2, 3]]);
        let full: Vec<_> = (0..WATCH_KEYS + 1)
            .map(|i| keyed(i, &[names[i].as_str()]))
            .chain([keyed(99, &[names[0].as_str()])])
            .collect();
        let chunked = indexes(&chunks(&full));
        assert_eq!(chunked[0].len(), WATCH_KEYS + 1);
        assert_eq!(chunked[0].last(), Some(&99));
        assert_eq!(chunked[1], [WATCH_KEYS]);
    }

    #[test]
    fn only_a_stored_version_is_read_as_one() {
        let version = version_arg(Some(crate::message::Version { lsn: 7, idx: 1 }));
        assert_eq!(
            string_version(version.clone().into_bytes()),
            Some(version.clone())
        );
        assert_eq!(string_version(b"not a version".to_vec()), None);
        assert_eq!(string_version(version.replace(':', "-").into_bytes()), None);
        assert_eq!(string_version(vec![0xff; 41]), None);
    }

    #[test]
    fn a_transaction_writes_each_keys_last_write_only() {
        let mut writes = Writes::default();
        writes.set("a", b"1", Some(("va", "v1")));
        writes.set("b", b"2", Some(("vb", "v1")));
        writes.delete("a", Some(("va", "v2")));
        writes.set("c", b"read", None);
        writes.delete("d", Some(("vd", "v2")));
        writes.set("d", b"4", Some(("vd", "v3")));
        writes.delete("e", None);
        let mut pipe = redis::pipe();
        writes.finish(&mut pipe, "60000");
        let commands: Vec<String> = pipe
            .cmd_iter()
            .map(|cmd| {
                cmd.args_iter()
                    .map(|arg| match arg {
                        redis::Arg::Simple(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                        _ => "<other>".to_owned(),
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect();
        assert_eq!(
            commands,
            [
                "MSET b 2 vb v1 c read d 4 vd v3",
                "DEL a e",
                "SET va v2 PX 60000",
            ]
        );
    }
}
