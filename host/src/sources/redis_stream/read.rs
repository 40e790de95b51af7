//! The reader: `XREADGROUP` for new entries, `XAUTOCLAIM` now and then for entries left
//! pending, each asking for no more than the in-flight permits allow.

use super::ack::HeldIds;
use super::resp::{ReadConn, ReadError};
use super::{Entry, RedisStreamSourceConfig};
use crate::sources::{Permits, SourceContext};
use redis::Value;
use redis::aio::ConnectionManager;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

pub(super) struct Reader {
    pub(super) config: RedisStreamSourceConfig,
    pub(super) consumer: String,
    pub(super) held: HeldIds,
    /// Where `XREADGROUP` goes (its own lean connection, see `resp`).
    pub(super) info: redis::ConnectionInfo,
}

/// How long a read may take beyond its `BLOCK`, and a connection to open.
const READ_MARGIN: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl Reader {
    /// Reads until shutdown, handing each batch and its permits to the decode task.
    pub(super) async fn read_loop(
        &self,
        mut conn: ConnectionManager,
        ctx: &SourceContext,
        decoder: &mpsc::Sender<(Vec<Entry>, Permits)>,
    ) {
        let mut backoff = ctx.backoff();
        let mut group_ready = false;
        let claim_every = Duration::from_millis((self.config.claim_idle_ms / 2).clamp(100, 30_000));
        let mut next_claim = Instant::now();
        // Where the next claim starts in the group's pending entries: each claim goes on from
        // where the last one stopped, so entries this process still holds (idle behind a paused
        // plugin) do not fill every claim and starve those another consumer left behind.
        let mut claim_from = String::from("0-0");
        let mut lean: Option<ReadConn> = None;
        loop {
            let Some(permits) = ctx.reserve(self.config.read_count.get()).await else {
                return;
            };
            if !group_ready {
                match self.create_group(&mut conn).await {
                    Ok(()) => group_ready = true,
                    Err(error) => {
                        drop(permits);
                        ctx.set_up(false);
                        tracing::warn!(source = %ctx.name, error = %error, "cannot create consumer group; retrying");
                        if !ctx.wait(&mut backoff).await {
                            return;
                        }
                        continue;
                    }
                }
            }
            let claiming = Instant::now() >= next_claim;
            let read = if claiming {
                next_claim = Instant::now() + claim_every;
                self.claim(&mut conn, permits.len(), &mut claim_from).await
            } else {
                // Not cut short at shutdown: Redis may already have handed entries to this
                // consumer, and a dropped reply would leave them pending until another consumer
                // reclaims them. The read ends within `block_ms`; what it brings is processed
                // and acknowledged during the shutdown grace, and the next reserve stops.
                self.read(&mut lean, permits.len()).await
            };
            ctx.set_up(read.is_ok());
            match read {
                Ok(mut entries) => {
                    backoff.reset();
                    self.hold(&mut entries, claiming, ctx);
                    if !entries.is_empty() && decoder.send((entries, permits)).await.is_err() {
                        // Only a panic ends the decoder early; what it held stays pending and
                        // is redelivered.
                        tracing::error!(source = %ctx.name, "decode task failed; source stops reading");
                        return;
                    }
                }
                Err(error) => {
                    drop(permits);
                    if !error.keeps_connection() {
                        lean = None;
                    }
                    if error.code() == Some("NOGROUP") {
                        tracing::warn!(source = %ctx.name, "consumer group is gone (redis restarted without persistence?); recreating it");
                        group_ready = false;
                    } else {
                        tracing::warn!(source = %ctx.name, error = %error, "stream read failed; retrying");
                    }
                    if !ctx.wait(&mut backoff).await {
                        return;
                    }
                }
            }
        }
    }

    /// Records `entries` as held; from a claim, first drops those this process holds already.
    fn hold(&self, entries: &mut Vec<Entry>, claimed: bool, ctx: &SourceContext) {
        let mut held = self.held.lock();
        if claimed {
            let claimed = entries.len();
            entries.retain(|(id, _)| !held.contains(id));
            if !entries.is_empty() {
                tracing::info!(source = %ctx.name, entries = entries.len(), "reclaimed entries left pending by another consumer or abandoned here");
            }
            if claimed > entries.len() {
                tracing::debug!(source = %ctx.name, entries = claimed - entries.len(), "claim skipped entries still held here");
            }
        }
        held.extend(entries.iter().map(|(id, _)| id.clone()));
    }

    async fn create_group(&self, conn: &mut ConnectionManager) -> redis::RedisResult<()> {
        let created: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(self.config.stream.as_str())
            .arg(self.config.group.as_str())
            .arg("0")
            .arg("MKSTREAM")
            .query_async(conn)
            .await;
        match created {
            Err(error) if error.code() == Some("BUSYGROUP") => Ok(()),
            other => other,
        }
    }

    /// New entries through the lean connection, opened first when there is none.
    async fn read(
        &self,
        lean: &mut Option<ReadConn>,
        count: usize,
    ) -> Result<Vec<Entry>, ReadError> {
        let conn = match lean {
            Some(conn) => conn,
            None => lean.insert(ReadConn::connect(&self.info, CONNECT_TIMEOUT).await?),
        };
        conn.xreadgroup(
            self.config.group.as_str(),
            &self.consumer,
            count,
            self.config.block_ms,
            self.config.stream.as_str(),
            READ_MARGIN,
        )
        .await
    }

    /// Claims up to `count` entries idle past `claim_idle_ms`, from `from` in the pending
    /// entries; `from` becomes where the next claim starts (`0-0` once the end is reached).
    async fn claim(
        &self,
        conn: &mut ConnectionManager,
        count: usize,
        from: &mut String,
    ) -> Result<Vec<Entry>, ReadError> {
        let reply: Value = redis::cmd("XAUTOCLAIM")
            .arg(self.config.stream.as_str())
            .arg(self.config.group.as_str())
            .arg(&self.consumer)
            .arg(self.config.claim_idle_ms)
            .arg(from.as_str())
            .arg("COUNT")
            .arg(count)
            .query_async(conn)
            .await?;
        // [next-cursor, [entry, …], [deleted-id, …]]
        match reply {
            Value::Array(mut parts) if parts.len() >= 2 => {
                let entries = parse_entries(parts.remove(1));
                *from = text(parts.swap_remove(0)).unwrap_or_else(|| "0-0".to_owned());
                Ok(entries)
            }
            _ => Ok(Vec::new()),
        }
    }
}

/// Parses `XAUTOCLAIM`'s `[[id, [field, value, …]], …]` by value (the field values, the whole
/// message, are moved, not copied), skipping entries deleted from the stream.
fn parse_entries(value: Value) -> Vec<Entry> {
    let Value::Array(entries) = value else {
        return Vec::new();
    };
    entries
        .into_iter()
        .filter_map(|entry| {
            let Value::Array(mut pair) = entry else {
                return None;
            };
            if pair.len() != 2 {
                return None;
            }
            let fields = pair.pop()?;
            let id = text(pair.pop()?)?;
            let fields = match fields {
                Value::Array(flat) => {
                    let mut flat = flat.into_iter();
                    let mut pairs = Vec::with_capacity(flat.len() / 2);
                    while let (Some(k), Some(v)) = (flat.next(), flat.next()) {
                        if let (Some(k), Some(v)) = (bytes(k), bytes(v)) {
                            pairs.push((super::field_name(k), v));
                        }
                    }
                    pairs
                }
                Value::Map(map) => map
                    .into_iter()
                    .filter_map(|(k, v)| Some((super::field_name(bytes(k)?), bytes(v)?)))
                    .collect(),
                _ => Vec::new(),
            };
            Some((id, fields))
        })
        .collect()
}

fn bytes(value: Value) -> Option<Vec<u8>> {
    match value {
        Value::BulkString(bytes) => Some(bytes),
        Value::SimpleString(text) => Some(text.into_bytes()),
        Value::VerbatimString { text, .. } => Some(text.into_bytes()),
        Value::Int(n) => Some(n.to_string().into_bytes()),
        _ => None,
    }
}

fn text(value: Value) -> Option<String> {
    String::from_utf8(bytes(value)?).ok()
}
