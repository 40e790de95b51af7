//! The Redis Stream source: reads Sequin's Redis Stream sink through a consumer group.
//!
//! - Creates the group (from the start of the stream) when it is missing, also after a Redis
//!   restart that lost it.
//! - Reads with `XREADGROUP … COUNT n BLOCK t`, where `n` is what the in-flight slots allow.
//! - Acknowledges with `XACK`, batched, only for messages the pipeline settled as done.
//!   Abandoned messages stay pending.
//! - Reclaims entries pending longer than `claim_idle_ms` on any consumer (a crashed or killed
//!   worker, or this one's abandoned messages) with `XAUTOCLAIM`, so nothing stays pending
//!   forever. Entries this process still holds (stuck behind a cache outage, in a slow plugin
//!   call, or done but not yet acknowledged) look as idle to Redis: they are not delivered again.
//! - Survives Redis restarts: every failed call is retried with capped backoff.

use super::{Acker, Payload, RawPayload, SourceContext};
use crate::config::{RedisConfig, RedisStreamSourceConfig};
use crate::message::ChangeMessage;
use anyhow::Context as _;
use redis::Value;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// One stream entry: its id and its fields.
type Entry = (String, Vec<(String, Vec<u8>)>);

/// The ids of the entries this process holds: read and not yet acknowledged or abandoned.
#[derive(Clone, Default)]
struct Held(Arc<Mutex<HashSet<String>>>);

impl Held {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Runs the source until shutdown, then waits until every message it read is settled and
/// acknowledged.
///
/// # Errors
///
/// The Redis URL is invalid.
pub async fn run(
    config: RedisStreamSourceConfig,
    cache: &RedisConfig,
    max_message_bytes: usize,
    ctx: SourceContext,
) -> anyhow::Result<()> {
    // A stream on the cache Redis shares its credentials; a stream elsewhere has its own URL.
    let client = match &config.url {
        Some(url) => {
            redis::Client::open(url.as_str()).with_context(|| format!("invalid redis url {url}"))?
        }
        None => cache.client()?,
    };
    let consumer = config.consumer.clone().unwrap_or_else(default_consumer);
    let Some(reader) = connect(&client, &ctx, config.block_ms).await else {
        return Ok(());
    };
    let held = Held::default();
    let stream = Stream {
        config,
        consumer,
        held: held.clone(),
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let acker: Arc<dyn Acker> = Arc::new(StreamAcker { tx });
    // Acks get their own connection: on the reader's, each XACK would queue behind a blocking
    // XREADGROUP and wait up to `block_ms`.
    let Some(acks) = connect(&client, &ctx, 0).await else {
        return Ok(());
    };
    let ack_task = tokio::spawn(ack_loop(
        acks,
        stream.config.stream.clone(),
        stream.config.group.clone(),
        rx,
        held,
    ));
    let sampler = tokio::spawn(sample_lag(
        client.clone(),
        stream.config.stream.clone(),
        stream.config.group.clone(),
        ctx.clone(),
    ));
    // Decoding runs in a task of its own, so the next read is already on its way while a batch
    // is decoded and dispatched. Entries reach it in stream order.
    let (entries, entries_rx) = mpsc::channel(2);
    let decoder = tokio::spawn(decode_loop(
        entries_rx,
        ctx.clone(),
        Arc::clone(&acker),
        max_message_bytes,
    ));
    tracing::info!(source = %ctx.name, group = %stream.config.group, consumer = %stream.consumer, "reading stream");
    stream.read_loop(reader, &ctx, &entries).await;
    sampler.abort();
    drop(entries);
    if let Err(error) = decoder.await {
        tracing::error!(source = %ctx.name, error = %error, "decode task failed");
    }
    drop(acker);
    // The ack loop ends once every token is settled (its channel closes) and its XACKs are sent.
    let _ = ack_task.await;
    tracing::info!(source = %ctx.name, "source stopped");
    Ok(())
}

struct Stream {
    config: RedisStreamSourceConfig,
    consumer: String,
    held: Held,
}

fn default_consumer() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "host".to_owned());
    format!("keepwarm-{host}-{}", std::process::id())
}

/// Connects, retrying until it works or shutdown.
async fn connect(
    client: &redis::Client,
    ctx: &SourceContext,
    block_ms: u64,
) -> Option<ConnectionManager> {
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(
            Duration::from_millis(block_ms) + Duration::from_secs(10),
        ))
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_max_delay(Duration::from_secs(2));
    let mut backoff = Backoff::new();
    loop {
        match client
            .get_connection_manager_with_config(config.clone())
            .await
        {
            Ok(conn) => return Some(conn),
            Err(error) => {
                tracing::warn!(source = %ctx.name, error = %error, "cannot connect to redis; retrying");
                if !backoff.wait(ctx).await {
                    return None;
                }
            }
        }
    }
}

impl Stream {
    async fn read_loop(
        &self,
        mut conn: ConnectionManager,
        ctx: &SourceContext,
        decoder: &mpsc::Sender<Vec<Entry>>,
    ) {
        let mut backoff = Backoff::new();
        let mut group_ready = false;
        let claim_every = Duration::from_millis((self.config.claim_idle_ms / 2).clamp(100, 30_000));
        let mut next_claim = Instant::now();
        loop {
            let Some(slots) = ctx.reserve(self.config.read_count).await else {
                return;
            };
            if !group_ready {
                match self.create_group(&mut conn).await {
                    Ok(()) => group_ready = true,
                    Err(error) => {
                        ctx.release(slots);
                        tracing::warn!(source = %ctx.name, error = %error, "cannot create consumer group; retrying");
                        if !backoff.wait(ctx).await {
                            return;
                        }
                        continue;
                    }
                }
            }
            let claiming = Instant::now() >= next_claim;
            let read = if claiming {
                next_claim = Instant::now() + claim_every;
                self.claim(&mut conn, slots).await
            } else {
                // Not cut short at shutdown: Redis may already have handed entries to this
                // consumer, and a dropped reply would leave them pending until another consumer
                // reclaims them. The read ends within `block_ms`; what it brings is processed
                // and acknowledged during the shutdown grace, and the next reserve stops.
                self.read(&mut conn, slots).await
            };
            ctx.dispatcher.counters().source_up(&ctx.name, read.is_ok());
            match read {
                Ok(mut entries) => {
                    backoff.reset();
                    self.hold(&mut entries, claiming, ctx);
                    ctx.release(slots - entries.len().min(slots));
                    if !entries.is_empty() && decoder.send(entries).await.is_err() {
                        // Only a panic ends the decoder early; what it held stays pending and
                        // is redelivered.
                        tracing::error!(source = %ctx.name, "decode task failed; source stops reading");
                        return;
                    }
                }
                Err(error) => {
                    ctx.release(slots);
                    if error.code() == Some("NOGROUP") {
                        tracing::warn!(source = %ctx.name, "consumer group is gone (redis restarted without persistence?); recreating it");
                        group_ready = false;
                    } else {
                        tracing::warn!(source = %ctx.name, error = %error, "stream read failed; retrying");
                    }
                    if !backoff.wait(ctx).await {
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
            .arg(&self.config.stream)
            .arg(&self.config.group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(conn)
            .await;
        match created {
            Err(error) if error.code() == Some("BUSYGROUP") => Ok(()),
            other => other,
        }
    }

    async fn read(
        &self,
        conn: &mut ConnectionManager,
        count: usize,
    ) -> redis::RedisResult<Vec<Entry>> {
        let reply: Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&self.config.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(self.config.block_ms)
            .arg("STREAMS")
            .arg(&self.config.stream)
            .arg(">")
            .query_async(conn)
            .await?;
        // Nil on timeout; otherwise [[stream, [entry, …]]] (or a map under RESP3).
        let entries = match reply {
            Value::Nil => return Ok(Vec::new()),
            Value::Array(streams) => streams
                .into_iter()
                .filter_map(|s| match s {
                    Value::Array(mut pair) if pair.len() == 2 => pair.pop(),
                    _ => None,
                })
                .collect::<Vec<_>>(),
            Value::Map(streams) => streams.into_iter().map(|(_, v)| v).collect(),
            _ => Vec::new(),
        };
        Ok(entries.into_iter().flat_map(parse_entries).collect())
    }

    async fn claim(
        &self,
        conn: &mut ConnectionManager,
        count: usize,
    ) -> redis::RedisResult<Vec<Entry>> {
        let reply: Value = redis::cmd("XAUTOCLAIM")
            .arg(&self.config.stream)
            .arg(&self.config.group)
            .arg(&self.consumer)
            .arg(self.config.claim_idle_ms)
            .arg("0-0")
            .arg("COUNT")
            .arg(count)
            .query_async(conn)
            .await?;
        // [next-cursor, [entry, …], [deleted-id, …]]
        match reply {
            Value::Array(mut parts) if parts.len() >= 2 => Ok(parse_entries(parts.remove(1))),
            _ => Ok(Vec::new()),
        }
    }
}

/// Parses `[[id, [field, value, …]], …]`, skipping entries deleted from the stream.
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
                    // By value: the field values (the whole message) are moved, not copied.
                    let mut flat = flat.into_iter();
                    let mut pairs = Vec::with_capacity(flat.len() / 2);
                    while let (Some(k), Some(v)) = (flat.next(), flat.next()) {
                        if let (Some(k), Some(v)) = (text(k), bytes(v)) {
                            pairs.push((k, v));
                        }
                    }
                    pairs
                }
                Value::Map(map) => map
                    .into_iter()
                    .filter_map(|(k, v)| Some((text(k)?, bytes(v)?)))
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

/// Decodes and delivers what the reader read, in order, until the reader is done.
async fn decode_loop(
    mut entries: mpsc::Receiver<Vec<Entry>>,
    ctx: SourceContext,
    acker: Arc<dyn Acker>,
    max_bytes: usize,
) {
    while let Some(batch) = entries.recv().await {
        for (id, fields) in batch {
            ctx.deliver(decode(fields, max_bytes), id, &acker);
        }
    }
}

/// Decodes one entry, or explains why it is not a change message (its fields kept whole for
/// the dead letter).
pub(super) fn decode(fields: Vec<(String, Vec<u8>)>, max_bytes: usize) -> Payload {
    let size: usize = fields.iter().map(|(k, v)| k.len() + v.len()).sum();
    if size > max_bytes {
        return Payload::Malformed {
            raw: RawPayload::StreamFields(fields),
            reason: format!("message of {size} bytes exceeds the limit of {max_bytes} bytes"),
        };
    }
    match ChangeMessage::from_stream_entry(fields) {
        Ok(message) => Payload::Decoded(message),
        Err((error, fields)) => Payload::Malformed {
            raw: RawPayload::StreamFields(fields),
            reason: error.0,
        },
    }
}

/// Settled ids go to the ack loop: done ones to be acknowledged, abandoned ones to stay pending
/// (and be reclaimed).
struct StreamAcker {
    tx: mpsc::UnboundedSender<(String, bool)>,
}

impl Acker for StreamAcker {
    fn settle(&self, id: &str, done: bool) {
        let _ = self.tx.send((id.to_owned(), done));
    }
}

/// Sends `XACK`s in batches until every token is gone, retrying while Redis is unavailable.
/// An id stops being held once it is acknowledged, or at once when it was abandoned.
async fn ack_loop(
    mut conn: ConnectionManager,
    stream: String,
    group: String,
    mut rx: mpsc::UnboundedReceiver<(String, bool)>,
    held: Held,
) {
    let mut settled = Vec::new();
    let mut ids = Vec::new();
    // Done ids wait in `ids` for their XACK; abandoned ones are let go at once.
    let take_settled = |settled: &mut Vec<(String, bool)>, ids: &mut Vec<String>| {
        let mut held = held.lock();
        for (id, done) in settled.drain(..) {
            if done {
                ids.push(id);
            } else {
                held.remove(&id);
            }
        }
    };
    while rx.recv_many(&mut settled, 4096).await > 0 {
        take_settled(&mut settled, &mut ids);
        if ids.is_empty() {
            continue;
        }
        let mut delay = Duration::from_millis(50);
        loop {
            let acked: redis::RedisResult<i64> = redis::cmd("XACK")
                .arg(&stream)
                .arg(&group)
                .arg(&ids)
                .query_async(&mut conn)
                .await;
            match acked {
                Ok(_) => break,
                Err(error) if error.code() == Some("NOGROUP") => {
                    tracing::warn!(stream = %stream, ids = ids.len(), "consumer group is gone; nothing left to acknowledge");
                    break;
                }
                Err(error) => {
                    tracing::warn!(stream = %stream, ids = ids.len(), error = %error, "XACK failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                    // Take what arrived meanwhile into the same XACK.
                    while let Ok(one) = rx.try_recv() {
                        settled.push(one);
                    }
                    take_settled(&mut settled, &mut ids);
                }
            }
        }
        let mut held = held.lock();
        for id in ids.drain(..) {
            held.remove(&id);
        }
    }
}

/// How often the group's pending count and lag are sampled for `/metrics`.
const SAMPLE_EVERY: Duration = Duration::from_secs(2);

/// Samples `XINFO GROUPS` into the `stream_pending` and `stream_lag` gauges until shutdown, on
/// a connection of its own (the reader's connection is busy with blocking reads).
async fn sample_lag(client: redis::Client, stream: String, group: String, ctx: SourceContext) {
    let labels = crate::telemetry::source(&ctx.name);
    let metrics = &ctx.dispatcher.counters().metrics;
    let mut conn = None;
    let mut every = tokio::time::interval(SAMPLE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = ctx.shutdown.cancelled() => return,
        }
        if conn.is_none() {
            conn = client.get_multiplexed_async_connection().await.ok();
        }
        let Some(c) = conn.as_mut() else { continue };
        let info: redis::RedisResult<redis::streams::StreamInfoGroupsReply> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(&stream)
            .query_async(c)
            .await;
        match info {
            Ok(info) => {
                if let Some(g) = info.groups.iter().find(|g| g.name == group) {
                    metrics
                        .stream_pending
                        .get_or_create(&labels)
                        .set(g.pending as i64);
                    // Redis reports no lag when it cannot tell (after deletions); keep the
                    // last value then.
                    if let Some(lag) = g.lag {
                        metrics.stream_lag.get_or_create(&labels).set(lag as i64);
                    }
                }
            }
            Err(error) if error.is_io_error() || error.is_connection_dropped() => conn = None,
            Err(error) => {
                tracing::debug!(source = %ctx.name, error = %error, "cannot sample stream lag");
            }
        }
    }
}

/// Capped exponential backoff that gives up on shutdown.
struct Backoff {
    delay: Duration,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff {
            delay: Duration::from_millis(100),
        }
    }

    fn reset(&mut self) {
        self.delay = Duration::from_millis(100);
    }

    /// Sleeps; returns false if shutdown came first.
    async fn wait(&mut self, ctx: &SourceContext) -> bool {
        let delay = self.delay;
        self.delay = (self.delay * 2).min(Duration::from_secs(5));
        tokio::select! {
            () = tokio::time::sleep(delay) => true,
            () = ctx.shutdown.cancelled() => false,
        }
    }
}
