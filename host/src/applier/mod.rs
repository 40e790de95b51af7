//! The applier: the only module that writes to the cache Redis.
//!
//! A lane's batch becomes one pipeline: every message's operations (plain commands, or one
//! `EVALSHA` of the versioned script per message and hash slot) followed by the batch's dead
//! letters. Every
//! reply is checked. A reply error that retrying can cure (connection lost, `LOADING`, `OOM`,
//! `NOSCRIPT`, …) fails the whole batch with [`ApplyError::Unavailable`], and the lane retries
//! it; the operations are idempotent, so re-applying what did go through is harmless. Any other
//! reply error (`WRONGTYPE`, …) fails only its message, which the lane then dead-letters.
//!
//! - [`plain`]: an operation as its Redis command.
//! - [`versioned`]: the versioned script, companion keys and hash slots.
//! - [`dead_letter`]: the dead-letter entry.

pub mod dead_letter;
pub mod plain;
pub mod versioned;

use crate::config::Config;
use crate::message::Version;
use crate::ops::Op;
use anyhow::Context as _;
use dead_letter::DeadLetter;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The writes of one message.
#[derive(Default, Debug)]
pub struct MessageWrites<'a> {
    /// The change's version; `None` for a backfill read.
    pub version: Option<Version>,
    /// Operations applied last-write-wins.
    pub plain: Vec<&'a Op>,
    /// Operations applied through the versioned script.
    pub versioned: Vec<&'a Op>,
}

/// What happened to one message's writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageOutcome {
    /// Redis confirmed every operation; `stale` writes were skipped as older than the cache.
    Applied {
        /// Writes skipped because Redis held a newer version.
        stale: u64,
    },
    /// Redis refused an operation for good; the message must be dead-lettered.
    Refused(String),
}

/// A failure that retrying the whole batch can cure.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// Redis is unreachable, loading, out of memory, read-only, or lost the script.
    #[error("redis unavailable: {0}")]
    Unavailable(String),
}

/// A connection to the cache: one Redis, or a Redis Cluster.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        match self.clone() {
            Conn::Single(mut conn) => cmd.query_async(&mut conn).await,
            Conn::Cluster(mut conn) => cmd.query_async(&mut conn).await,
        }
    }

    async fn pipe(&self, pipe: &redis::Pipeline) -> redis::RedisResult<Vec<redis::Value>> {
        match self.clone() {
            Conn::Single(mut conn) => pipe.query_async(&mut conn).await,
            Conn::Cluster(mut conn) => pipe.query_async(&mut conn).await,
        }
    }
}

/// The only writer to the cache Redis.
pub struct Applier {
    conn: Conn,
    dead_letter_stream: String,
    version_prefix: String,
    tombstone_ms: u64,
}

enum Slot {
    Message(usize),
    DeadLetter,
}

impl Applier {
    /// Connects to the cache Redis. The connection reconnects on its own after failures.
    ///
    /// # Errors
    ///
    /// The URL is invalid or Redis cannot be reached now.
    pub async fn connect(config: &Config) -> anyhow::Result<Applier> {
        let conn = if config.redis.is_cluster() {
            let client = config.redis.cluster_client(config.response_timeout())?;
            Conn::Cluster(client.get_async_connection().await.with_context(|| {
                format!(
                    "cannot connect to the redis cluster at {}",
                    config.redis.url
                )
            })?)
        } else {
            let client = config.redis.client()?;
            let manager_config = ConnectionManagerConfig::new()
                .set_response_timeout(Some(config.response_timeout()))
                .set_connection_timeout(Some(Duration::from_secs(5)))
                .set_max_delay(Duration::from_secs(2));
            Conn::Single(
                client
                    .get_connection_manager_with_config(manager_config)
                    .await
                    .with_context(|| format!("cannot connect to redis at {}", config.redis.url))?,
            )
        };
        let applier = Applier {
            conn,
            dead_letter_stream: config.dead_letter.stream.clone(),
            version_prefix: config.versioning.key_prefix.clone(),
            tombstone_ms: config.versioning.tombstone_ttl_seconds.saturating_mul(1000),
        };
        applier
            .load_script()
            .await
            .map_err(|error| anyhow::anyhow!("{error}"))?;
        Ok(applier)
    }

    /// The stream that receives dead letters.
    pub fn dead_letter_stream(&self) -> &str {
        &self.dead_letter_stream
    }

    /// Applies the writes of a batch of messages and writes its dead letters, in one pipeline.
    ///
    /// # Errors
    ///
    /// [`ApplyError::Unavailable`] when the batch must be retried as a whole.
    pub async fn apply(
        &self,
        messages: &[MessageWrites<'_>],
        dead_letters: &[DeadLetter],
    ) -> Result<Vec<MessageOutcome>, ApplyError> {
        let mut outcomes = vec![MessageOutcome::Applied { stale: 0 }; messages.len()];
        // Every command with what its reply settles and the cluster slot of its keys.
        let mut commands: Vec<(redis::Cmd, u16)> = Vec::new();
        let mut slots = Vec::new();
        for (index, writes) in messages.iter().enumerate() {
            for op in &writes.plain {
                commands.push((plain::command(op), versioned::key_slot(op.key())));
                slots.push(Slot::Message(index));
            }
            if !writes.versioned.is_empty() {
                for (slot, cmd) in versioned::commands_by_slot(
                    &writes.versioned,
                    writes.version,
                    &self.version_prefix,
                    self.tombstone_ms,
                ) {
                    commands.push((cmd, slot));
                    slots.push(Slot::Message(index));
                }
            }
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
            commands.push((cmd, versioned::key_slot(&self.dead_letter_stream)));
            slots.push(Slot::DeadLetter);
        }
        if slots.is_empty() {
            return Ok(outcomes);
        }
        let replies = self.run(commands).await?;
        for (slot, reply) in slots.iter().zip(replies) {
            match (slot, reply) {
                (_, redis::Value::ServerError(error)) => {
                    let code = error.code().to_owned();
                    let text = format!("{code} {}", error.details().unwrap_or_default());
                    if code == "NOSCRIPT" {
                        self.load_script().await?;
                        return Err(ApplyError::Unavailable(
                            "the versioned-write script was not loaded (redis restarted?)".into(),
                        ));
                    }
                    if is_transient(&code) {
                        return Err(ApplyError::Unavailable(text));
                    }
                    match slot {
                        Slot::Message(index) => {
                            if matches!(outcomes[*index], MessageOutcome::Applied { .. }) {
                                outcomes[*index] = MessageOutcome::Refused(format!(
                                    "redis refused a write: {text}"
                                ));
                            }
                        }
                        Slot::DeadLetter => {
                            return Err(ApplyError::Unavailable(format!(
                                "dead-letter stream {} refused an entry: {text}",
                                self.dead_letter_stream
                            )));
                        }
                    }
                }
                (Slot::Message(index), redis::Value::Int(stale)) => {
                    if let MessageOutcome::Applied { stale: total } = &mut outcomes[*index] {
                        *total += stale.max(0) as u64;
                    }
                }
                _ => {}
            }
        }
        Ok(outcomes)
    }

    /// Sends the commands and returns their replies in order: one pipeline on a single Redis;
    /// on a cluster, one pipeline per slot (a cluster pipeline may not cross slots), all at once.
    async fn run(&self, commands: Vec<(redis::Cmd, u16)>) -> Result<Vec<redis::Value>, ApplyError> {
        let expected = commands.len();
        let unavailable = |error: redis::RedisError| ApplyError::Unavailable(error.to_string());
        let replies = match &self.conn {
            Conn::Single(_) => {
                let mut pipe = redis::pipe();
                pipe.ignore_errors();
                for (cmd, _) in commands {
                    pipe.add_command(cmd);
                }
                self.conn.pipe(&pipe).await.map_err(unavailable)?
            }
            Conn::Cluster(_) => {
                let mut by_slot: Vec<(u16, redis::Pipeline, Vec<usize>)> = Vec::new();
                for (position, (cmd, slot)) in commands.into_iter().enumerate() {
                    let at = match by_slot.iter().position(|(s, _, _)| *s == slot) {
                        Some(at) => at,
                        None => {
                            let mut pipe = redis::pipe();
                            pipe.ignore_errors();
                            by_slot.push((slot, pipe, Vec::new()));
                            by_slot.len() - 1
                        }
                    };
                    by_slot[at].1.add_command(cmd);
                    by_slot[at].2.push(position);
                }
                let mut calls = tokio::task::JoinSet::new();
                for (_, pipe, positions) in by_slot {
                    let conn = self.conn.clone();
                    calls.spawn(async move { (conn.pipe(&pipe).await, positions) });
                }
                let mut replies = vec![redis::Value::Nil; expected];
                while let Some(done) = calls.join_next().await {
                    let (answered, positions) =
                        done.map_err(|error| ApplyError::Unavailable(error.to_string()))?;
                    let answered = answered.map_err(unavailable)?;
                    if answered.len() != positions.len() {
                        return Err(ApplyError::Unavailable(format!(
                            "expected {} replies, got {}",
                            positions.len(),
                            answered.len()
                        )));
                    }
                    for (position, reply) in positions.into_iter().zip(answered) {
                        replies[position] = reply;
                    }
                }
                replies
            }
        };
        if replies.len() != expected {
            return Err(ApplyError::Unavailable(format!(
                "expected {expected} replies, got {}",
                replies.len()
            )));
        }
        Ok(replies)
    }

    async fn load_script(&self) -> Result<(), ApplyError> {
        // On a cluster, SCRIPT LOAD goes to every master.
        let sha: String = self
            .conn
            .query(redis::cmd("SCRIPT").arg("LOAD").arg(versioned::SCRIPT))
            .await
            .map_err(|error| ApplyError::Unavailable(format!("SCRIPT LOAD failed: {error}")))?;
        debug_assert_eq!(sha, versioned::script_sha());
        Ok(())
    }

    /// Whether Redis answers.
    pub async fn ping(&self) -> bool {
        self.conn.query::<String>(&redis::cmd("PING")).await.is_ok()
    }
}

/// Reply errors that retrying cures.
fn is_transient(code: &str) -> bool {
    matches!(
        code,
        "LOADING"
            | "BUSY"
            | "OOM"
            | "READONLY"
            | "MASTERDOWN"
            | "TRYAGAIN"
            | "CLUSTERDOWN"
            | "MOVED"
            | "ASK"
            | "NOREPLICAS"
            | "MISCONF"
    )
}
