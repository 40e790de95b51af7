//! The applier: the only module that writes to the cache (Redis, or Memcached).
//!
//! A lane's batch becomes one pipeline: its messages' plain commands, then its versioned writes
//! (one `EVALSHA` of the versioned script for the whole batch, or per hash slot on a cluster,
//! which answers for each message), then the batch's dead letters. On a single Redis, the
//! versioned messages that only write whole keys go first, in `WATCH`ed transactions
//! ([`watched`]), and the script takes the others. Every reply is checked, and
//! every message's element of a script's reply. A reply error that retrying can cure (connection lost,
//! `LOADING`, `OOM`, `NOSCRIPT`, …) fails the whole batch with an [`ApplyError`], and the lane
//! retries it; the operations are idempotent, so re-applying what did go through is harmless.
//! Any other reply error (`WRONGTYPE`, …) fails only its message ([`MessageOutcome::Refused`]),
//! which the lane then dead-letters.
//!
//! - [`plain`]: an operation as its Redis command.
//! - [`versioned`]: the versioned script and the companion keys that hold versions.
//! - [`watched`]: on a single Redis, versioned writes of whole keys as `WATCH`ed transactions,
//!   before the pipeline; the script takes every message they do not.
//! - [`cluster`]: Redis Cluster hash slots.
//! - [`connection`]: one Redis or a cluster, and a batch's pipelines over it.
//! - [`dead_letter`]: the dead-letter entry.
//! - [`memcached`]: Memcached as the cache (`[memcached]`): plugin operations go there, one
//!   message after the other; dead letters go to the Redis dead-letter stream, or without
//!   `[redis]` to the dead-letter file ([`crate::letter_file`]), appended and synced before the
//!   batch's messages are acknowledged.

pub(crate) mod cluster;
mod connection;
pub mod dead_letter;
pub mod memcached;
pub(crate) mod plain;
pub(crate) mod versioned;
mod watched;

use crate::config::Config;
use crate::config::RedisConfig;
use crate::letter_file;
use crate::message::Version;
use crate::ops::Op;
use cluster::key_slot;
use connection::Connection;
use dead_letter::DeadLetter;
use memcached::newest::{Newest, NewestFile};
use memcached::{Memcached, MemcachedRefusal};
use redis::aio::ConnectionManagerConfig;
use redis::{ServerError, ServerErrorKind};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The writes of one message. A batch's plain writes go before its versioned ones (a plugin's
/// messages are all of one kind).
#[derive(Default, Debug)]
pub struct MessageWrites<'a> {
    /// The change's version; `None` for a backfill read.
    pub version: Option<Version>,
    /// Operations applied last-write-wins, borrowed from the plugin's answer.
    pub plain: &'a [Op],
    /// Operations applied through the versioned script, borrowed from the plugin's answer.
    pub versioned: &'a [Op],
}

/// What happened to one message's writes.
#[derive(Debug, Clone, PartialEq)]
pub enum MessageOutcome {
    /// Redis confirmed every operation.
    Applied {
        /// Writes skipped because Redis held a newer version.
        stale: u64,
    },
    /// Redis refused an operation for good; the message must be dead-lettered.
    Refused(Refusal),
}

/// A write the cache refuses for good (`WRONGTYPE`, an operation Memcached lacks, a value over
/// its size limit, …): the message's own fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refusal {
    /// Redis answered with an error that retrying cannot cure.
    #[error("redis refused a write: {}", reply_text(.0))]
    Redis(redis::ServerError),
    /// Memcached cannot take the message's writes.
    #[error(transparent)]
    Memcached(MemcachedRefusal),
}

/// A failure that retrying the whole batch can cure.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The connection failed, timed out or was dropped.
    #[error("redis unavailable: {0}")]
    Connection(#[from] redis::RedisError),
    /// Redis answered with an error that passes (`LOADING`, `OOM`, `READONLY`, `TRYAGAIN`, …).
    #[error("redis unavailable: {}", reply_text(.0))]
    Busy(redis::ServerError),
    /// Redis lost the versioned-write script (it restarted); it has been loaded again.
    #[error("the versioned-write script was not loaded (redis restarted?)")]
    ScriptMissing,
    /// Loading the versioned-write script failed.
    #[error("SCRIPT LOAD failed: {0}")]
    ScriptLoad(redis::RedisError),
    /// The dead-letter stream refused an entry: the batch's dead letters must not be lost.
    #[error("dead-letter stream {stream} refused an entry: {}", reply_text(.error))]
    DeadLetterRefused {
        /// The dead-letter stream.
        stream: String,
        /// Redis's answer.
        error: redis::ServerError,
    },
    /// The versioned script answered something it never answers (a reply that is not one element
    /// per message, or an element that is neither a count nor an error).
    #[error("unexpected reply from the versioned-write script: {0}")]
    ScriptReply(String),
    /// A pipeline came back with another number of replies than commands.
    #[error("expected {expected} replies, got {got}")]
    ReplyCount {
        /// Commands sent.
        expected: usize,
        /// Replies received.
        got: usize,
    },
    /// A Memcached server cannot be reached, timed out or failed.
    #[error("memcached {server} unavailable: {error}")]
    Memcached {
        /// The server (`host:port`).
        server: String,
        /// What failed.
        error: memcached::ClientError,
    },
    /// The dead-letter file or the newest-version file cannot be written (Memcached without
    /// Redis): the batch's dead letters must not be lost, nor its messages acknowledged before
    /// the version is recorded.
    #[error("cannot write {}: {error}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// A cluster pipeline's task failed.
    #[error("a cluster pipeline task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Why [`Applier::connect`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The `[redis]` settings do not make a client (invalid URL, password variable unset), as
    /// `config` words it.
    #[error("{0}")]
    Config(String),
    /// Redis (or the cluster) cannot be reached now.
    #[error("cannot connect to {what} at {url}: {error}")]
    Unreachable {
        /// `redis` or `the redis cluster`.
        what: &'static str,
        /// The configured URL.
        url: String,
        /// The client's error.
        error: redis::RedisError,
    },
    /// The versioned-write script cannot be loaded.
    #[error(transparent)]
    Script(ApplyError),
    /// A file of a Memcached cache without Redis cannot be used.
    #[error("cannot use {}: {error}", path.display())]
    File {
        /// The dead-letter file or the newest-version file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
}

/// The only writer to the cache.
pub struct Applier {
    target: Target,
    dead_letter_stream: String,
    version_prefix: String,
    tombstone_ms: u64,
    /// Whether the server enforces hash slots (a Redis Cluster, even one node reached by one
    /// URL), so that a versioned script call may only name keys of one slot.
    slotted: bool,
    /// Transactions for versioned writes of whole keys (a single Redis as the cache).
    watched: Option<watched::Watched>,
}

/// Where plugin operations and dead letters go.
enum Target {
    /// The cache Redis takes both.
    Redis(Connection),
    /// Memcached takes the operations; the dead letters (and the newest version written, see
    /// `memcached::newest`) go to `letters`.
    Memcached {
        memcached: Box<Memcached>,
        letters: Letters,
    },
}

/// Where the dead letters of a Memcached cache go.
enum Letters {
    /// The dead-letter stream in the cache Redis.
    Stream(Connection),
    /// The dead-letter file (no `[redis]`).
    File(PathBuf),
}

/// What a command's reply settles.
enum ReplyFor {
    /// A write of the message at this index.
    Message(usize),
    /// A call of the versioned script: one element of its reply per message, at these indexes.
    Messages(Vec<usize>),
    DeadLetter,
    /// keepwarm's own bookkeeping (the Memcached high-water mark): an error retries the batch.
    Bookkeeping,
}

impl Applier {
    /// Connects to the cache: Redis, or Memcached (with the Redis beside it, if any). The
    /// connection reconnects on its own after failures.
    ///
    /// # Errors
    ///
    /// The URL is invalid, Redis cannot be reached now, or a file of a Memcached cache without
    /// Redis cannot be used.
    pub async fn connect(config: &Config) -> Result<Applier, ConnectError> {
        let redis = match &config.redis {
            Some(redis) => Some(connect_redis(redis).await?),
            None => None,
        };
        let target = match (&config.memcached, redis.clone()) {
            (None, Some(conn)) => Target::Redis(conn),
            (None, None) => {
                return Err(ConnectError::Config(
                    "[redis] is required unless [memcached] is the cache".to_owned(),
                ));
            }
            (Some(memcached), redis) => {
                let prefix = &config.versioning.key_prefix;
                let (newest, letters) = match redis {
                    Some(conn) => (
                        Newest::in_redis(conn.clone(), prefix, &memcached.servers),
                        Letters::Stream(conn),
                    ),
                    None => memcached_files(config)?,
                };
                let memcached = Memcached::new(
                    memcached,
                    config.versioning.tombstone_ttl_seconds,
                    prefix,
                    newest,
                );
                // A server down at start is not fatal (a pool outlives its servers' restarts):
                // writes to it are retried until it answers, and /readyz says not ready.
                if let Err((server, error)) = memcached.reach().await {
                    tracing::warn!(server, error = %error, "memcached does not answer at start; writes to it will be retried");
                }
                Target::Memcached {
                    memcached: Box::new(memcached),
                    letters,
                }
            }
        };
        // Whether a versioned script call may only name keys of one slot.
        let slotted = match &redis {
            Some(conn) => conn.is_cluster() || cluster_enabled(conn).await,
            None => false,
        };
        let tombstone_ms = config.versioning.tombstone_ttl_seconds.saturating_mul(1000);
        let watched = match (&target, &config.redis) {
            (Target::Redis(Connection::Single(_)), Some(redis)) if !slotted => {
                let client = redis
                    .client()
                    .map_err(|error| ConnectError::Config(format!("{error:#}")))?;
                let connection = redis::AsyncConnectionConfig::new()
                    .set_response_timeout(Some(redis.response_timeout()))
                    .set_connection_timeout(Some(CONNECT_TIMEOUT));
                Some(watched::Watched::new(
                    client,
                    connection,
                    &config.versioning.key_prefix,
                    tombstone_ms,
                ))
            }
            _ => None,
        };
        let applier = Applier {
            target,
            dead_letter_stream: config.dead_letter.stream.clone(),
            version_prefix: config.versioning.key_prefix.clone(),
            tombstone_ms,
            slotted,
            watched,
        };
        if let Some(conn) = &redis {
            load_script(conn).await.map_err(ConnectError::Script)?;
        }
        Ok(applier)
    }

    /// The stream that receives dead letters.
    pub fn dead_letter_stream(&self) -> &str {
        &self.dead_letter_stream
    }

    /// Applies the writes of a batch of messages and writes its dead letters, in one pipeline.
    /// Returns one outcome per message, in order.
    ///
    /// # Errors
    ///
    /// An [`ApplyError`] when the batch must be retried as a whole.
    pub async fn apply(
        &self,
        messages: &[MessageWrites<'_>],
        dead_letters: &[DeadLetter],
    ) -> Result<Vec<MessageOutcome>, ApplyError> {
        let (memcached, letters) = match &self.target {
            Target::Redis(conn) => return self.run_redis(conn, messages, dead_letters, None).await,
            Target::Memcached { memcached, letters } => (memcached, letters),
        };
        let mut outcomes = Vec::with_capacity(messages.len());
        let mut newest = None;
        for writes in messages {
            outcomes.push(match memcached.apply(writes).await? {
                Ok(stale) => {
                    if !writes.versioned.is_empty() {
                        newest = newest.max(writes.version);
                    }
                    MessageOutcome::Applied { stale }
                }
                Err(refusal) => MessageOutcome::Refused(Refusal::Memcached(refusal)),
            });
        }
        // Recorded before anything is acknowledged, so that it outlives this process and a
        // Memcached restart: the floor is raised to it (memcached/mod.rs).
        match letters {
            Letters::Stream(conn) => {
                let newest = newest.and_then(|version| memcached.newest.command(version));
                self.run_redis(conn, &[], dead_letters, newest).await?;
            }
            Letters::File(path) => {
                if let (Some(version), Newest::File(file)) = (newest, &memcached.newest) {
                    file.record(version)
                        .await
                        .map_err(|error| ApplyError::File {
                            path: file.path().to_owned(),
                            error,
                        })?;
                }
                append_letters(path, dead_letters).await?;
            }
        }
        Ok(outcomes)
    }

    /// One pipeline of the messages' writes, the dead letters and a bookkeeping command.
    async fn run_redis(
        &self,
        conn: &Connection,
        messages: &[MessageWrites<'_>],
        dead_letters: &[DeadLetter],
        bookkeeping: Option<(redis::Cmd, String)>,
    ) -> Result<Vec<MessageOutcome>, ApplyError> {
        let mut outcomes = vec![MessageOutcome::Applied { stale: 0 }; messages.len()];
        // The messages whose versioned writes a transaction applied.
        let mut done = vec![false; messages.len()];
        if let Some(watched) = &self.watched {
            watched.apply(messages, &mut outcomes, &mut done).await?;
        }
        let (mut commands, mut settles) = self.commands(conn, messages, dead_letters, &done);
        if let Some((cmd, key)) = bookkeeping {
            commands.push((cmd, key_slot(&key)));
            settles.push(ReplyFor::Bookkeeping);
        }
        if commands.is_empty() {
            return Ok(outcomes);
        }
        let replies = conn.run(commands).await?;
        for (settles, reply) in settles.into_iter().zip(replies) {
            match settles {
                ReplyFor::Message(index) => Self::settle(conn, &mut outcomes[index], reply).await?,
                ReplyFor::Messages(indexes) => match reply {
                    redis::Value::Array(elements) if elements.len() == indexes.len() => {
                        for (index, element) in indexes.into_iter().zip(elements) {
                            if !matches!(
                                element,
                                redis::Value::Int(_) | redis::Value::ServerError(_)
                            ) {
                                return Err(ApplyError::ScriptReply(format!("{element:?}")));
                            }
                            Self::settle(conn, &mut outcomes[index], element).await?;
                        }
                    }
                    // The call failed as a whole: it fails each of its messages.
                    redis::Value::ServerError(error) => {
                        for index in indexes {
                            let reply = redis::Value::ServerError(error.clone());
                            Self::settle(conn, &mut outcomes[index], reply).await?;
                        }
                    }
                    other => return Err(ApplyError::ScriptReply(format!("{other:?}"))),
                },
                ReplyFor::DeadLetter | ReplyFor::Bookkeeping => {
                    if let redis::Value::ServerError(error) = reply {
                        retry_on(conn, &error).await?;
                        return Err(match settles {
                            ReplyFor::DeadLetter => ApplyError::DeadLetterRefused {
                                stream: self.dead_letter_stream.clone(),
                                error,
                            },
                            _ => ApplyError::Busy(error),
                        });
                    }
                }
            }
        }
        Ok(outcomes)
    }

    /// Settles a message by one reply to its writes: an error refuses it (or fails the batch when
    /// retrying cures it), a count adds writes skipped as stale.
    async fn settle(
        conn: &Connection,
        outcome: &mut MessageOutcome,
        reply: redis::Value,
    ) -> Result<(), ApplyError> {
        match reply {
            redis::Value::ServerError(error) => {
                retry_on(conn, &error).await?;
                if matches!(outcome, MessageOutcome::Applied { .. }) {
                    *outcome = MessageOutcome::Refused(Refusal::Redis(error));
                }
            }
            redis::Value::Int(stale) => {
                if let MessageOutcome::Applied { stale: total } = outcome {
                    *total += stale.max(0) as u64;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Every command of the batch with the hash slot of its keys, and what each reply settles;
    /// without the versioned writes of the messages `done` marks.
    fn commands(
        &self,
        conn: &Connection,
        messages: &[MessageWrites<'_>],
        dead_letters: &[DeadLetter],
        done: &[bool],
    ) -> (Vec<(redis::Cmd, cluster::HashSlot)>, Vec<ReplyFor>) {
        let cluster = conn.is_cluster();
        // The hash slot of a key, which only a cluster needs.
        let slot = |key: &str| if cluster { key_slot(key) } else { 0 };
        let mut commands = Vec::new();
        let mut settles = Vec::new();
        let mut calls =
            versioned::Calls::new(&self.version_prefix, self.tombstone_ms, self.slotted);
        for (index, writes) in messages.iter().enumerate() {
            for op in writes.plain {
                commands.push((plain::command(op), slot(op.key())));
                settles.push(ReplyFor::Message(index));
            }
            if !done[index] {
                calls.add(index, writes.versioned, writes.version);
            }
        }
        for call in calls.finish() {
            commands.push((call.cmd, call.slot));
            settles.push(ReplyFor::Messages(call.messages));
        }
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        for letter in dead_letters {
            let mut cmd = redis::cmd("XADD");
            cmd.arg(&self.dead_letter_stream).arg("*");
            for (field, value) in letter.fields(now_ms) {
                cmd.arg(field).arg(value);
            }
            commands.push((cmd, slot(&self.dead_letter_stream)));
            settles.push(ReplyFor::DeadLetter);
        }
        (commands, settles)
    }

    /// Whether the cache answers: Redis, and every Memcached server when Memcached is the cache.
    pub async fn ping(&self) -> bool {
        let redis_answers =
            async |conn: &Connection| conn.query::<String>(&redis::cmd("PING")).await.is_ok();
        match &self.target {
            Target::Redis(conn) => redis_answers(conn).await,
            Target::Memcached {
                memcached,
                letters: Letters::Stream(conn),
            } => redis_answers(conn).await && memcached.ping().await,
            Target::Memcached { memcached, .. } => memcached.ping().await,
        }
    }
}

/// How long connecting to the cache Redis may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection to the cache Redis (or cluster) of `[redis]`.
async fn connect_redis(config: &RedisConfig) -> Result<Connection, ConnectError> {
    let url = &config.url;
    let unreachable = |what| {
        move |error| ConnectError::Unreachable {
            what,
            url: url.clone(),
            error,
        }
    };
    Ok(if config.is_cluster() {
        let client = config
            .cluster_client(config.response_timeout())
            .map_err(|error| ConnectError::Config(format!("{error:#}")))?;
        Connection::Cluster(
            client
                .get_async_connection()
                .await
                .map_err(unreachable("the redis cluster"))?,
        )
    } else {
        let client = config
            .client()
            .map_err(|error| ConnectError::Config(format!("{error:#}")))?;
        let manager_config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(config.response_timeout()))
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_max_delay(Duration::from_secs(2));
        Connection::Single(
            client
                .get_connection_manager_with_config(manager_config)
                .await
                .map_err(unreachable("redis"))?,
        )
    })
}

/// Without Redis: the newest-version record and the dead-letter file, both checked now so that
/// a path that cannot be written stops keepwarm at start rather than retrying every batch.
fn memcached_files(config: &Config) -> Result<(Newest, Letters), ConnectError> {
    let missing = || ConnectError::Config("dead_letter.file is required without [redis]".into());
    let letters = config.letter_file().ok_or_else(missing)?.to_owned();
    let newest = config.newest_file().ok_or_else(missing)?;
    let file_error = |path: &PathBuf| {
        let path = path.clone();
        move |error| ConnectError::File { path, error }
    };
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&letters)
        .map_err(file_error(&letters))?;
    let newest = NewestFile::open(&newest).map_err(file_error(&newest))?;
    Ok((Newest::File(newest), Letters::File(letters)))
}

/// Appends the dead letters to the dead-letter file, durably (see [`letter_file`]).
async fn append_letters(path: &Path, dead_letters: &[DeadLetter]) -> Result<(), ApplyError> {
    if dead_letters.is_empty() {
        return Ok(());
    }
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let lines: Vec<u8> = dead_letters
        .iter()
        .flat_map(|letter| letter_file::encode(letter.fields(now_ms)))
        .collect();
    let file = path.to_owned();
    tokio::task::spawn_blocking(move || letter_file::append(&file, &lines))
        .await?
        .map_err(|error| ApplyError::File {
            path: path.to_owned(),
            error,
        })
}

/// Fails the batch when retrying cures the reply `error`; a lost script is loaded again first.
async fn retry_on(conn: &Connection, error: &ServerError) -> Result<(), ApplyError> {
    if error.kind() == Some(ServerErrorKind::NoScript) {
        load_script(conn).await?;
        return Err(ApplyError::ScriptMissing);
    }
    if passes(error) {
        return Err(ApplyError::Busy(error.clone()));
    }
    Ok(())
}

/// Whether the single server keepwarm reaches is a cluster node (`cluster_enabled:1`), which
/// refuses a script naming keys of two slots (`CROSSSLOT`). When `INFO` is refused, it is taken
/// to be one: one call per slot works on any server, only slower.
async fn cluster_enabled(conn: &Connection) -> bool {
    match conn
        .query::<String>(redis::cmd("INFO").arg("cluster"))
        .await
    {
        Ok(info) => !info.lines().any(|line| line.trim() == "cluster_enabled:0"),
        Err(error) => {
            tracing::warn!(error = %error, "INFO cluster failed; versioned writes go one script call per hash slot");
            true
        }
    }
}

async fn load_script(conn: &Connection) -> Result<(), ApplyError> {
    // On a cluster, SCRIPT LOAD goes to every master.
    let sha: String = conn
        .query(redis::cmd("SCRIPT").arg("LOAD").arg(versioned::SCRIPT))
        .await
        .map_err(ApplyError::ScriptLoad)?;
    debug_assert_eq!(sha, versioned::script_sha());
    Ok(())
}

/// Whether a reply error passes, so that retrying cures it.
pub(super) fn passes(error: &ServerError) -> bool {
    use ServerErrorKind as Kind;
    match error.kind() {
        Some(
            Kind::BusyLoading
            | Kind::ReadOnly
            | Kind::MasterDown
            | Kind::TryAgain
            | Kind::ClusterDown
            | Kind::Moved
            | Kind::Ask,
        ) => true,
        Some(_) => false,
        // Codes redis-rs has no kind for.
        None => matches!(error.code(), "BUSY" | "OOM" | "NOREPLICAS" | "MISCONF"),
    }
}

/// A reply error as Redis wrote it: `CODE details`.
fn reply_text(error: &ServerError) -> String {
    format!("{} {}", error.code(), error.details().unwrap_or_default())
}
