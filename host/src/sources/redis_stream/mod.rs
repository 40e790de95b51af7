//! The Redis Stream source: reads Sequin's Redis Stream sink through a consumer group.
//!
//! - Creates the group (from the start of the stream) when it is missing, also after a Redis
//!   restart that lost it.
//! - Reads with `XREADGROUP … COUNT n BLOCK t`, where `n` is what the in-flight permits allow.
//! - Acknowledges with `XACK`, batched, only for messages the pipeline settled as done.
//!   Abandoned messages stay pending.
//! - Reclaims entries pending longer than `claim_idle_ms` on any consumer (a crashed or killed
//!   worker, or this one's abandoned messages) with `XAUTOCLAIM`, so nothing stays pending
//!   forever. Entries this process still holds (stuck behind a cache outage, in a slow plugin
//!   call, or done but not yet acknowledged) look as idle to Redis: they are not delivered again.
//! - Survives Redis restarts: every failed call is retried with capped backoff.
//!
//! - [`config`]: the `[[source]]` table. `read`: the reader and the entry parser; `resp`: the
//!   reader's own connection for `XREADGROUP`; `ack`: the
//!   held ids and the `XACK` loop; `lag`: the pending and lag gauges.

mod ack;
pub mod config;
mod lag;
mod read;
mod resp;

use super::{BoxFuture, Source, SourceContext, SourceError};
use crate::backoff::Backoff;
use crate::delivery::Settle;
pub use config::RedisStreamSourceConfig;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// One stream entry: its id and its fields.
type Entry = (String, Vec<(String, Vec<u8>)>);

/// A field's name as the decoder and dead letters see it. A name that is not UTF-8 can be none
/// of Sequin's four, so the entry is dead-lettered as missing them, with the name kept readable
/// (invalid bytes as U+FFFD); it never fails the read of the entries around it.
fn field_name(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes)
        .unwrap_or_else(|error| String::from_utf8_lossy(error.as_bytes()).into_owned())
}

/// A configured stream and the client of the Redis that holds it.
pub(crate) struct RedisStreamSource {
    pub(crate) config: RedisStreamSourceConfig,
    pub(crate) client: redis::Client,
}

impl Source for RedisStreamSource {
    fn run(self: Box<Self>, ctx: SourceContext) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(self.run_until_shutdown(ctx))
    }
}

impl RedisStreamSource {
    /// Runs until shutdown, then waits until every message it read is settled and
    /// acknowledged.
    async fn run_until_shutdown(self, ctx: SourceContext) -> Result<(), SourceError> {
        let RedisStreamSource { config, client } = self;
        let consumer = config.consumer.clone().unwrap_or_else(default_consumer);
        let Some(reader) = connect(&client, &ctx, config.block_ms).await else {
            return Ok(());
        };
        // Acks get their own connection: on the reader's, each XACK would queue behind a
        // blocking XREADGROUP and wait up to `block_ms`.
        let Some(acks) = connect(&client, &ctx, 0).await else {
            return Ok(());
        };
        let held = ack::HeldIds::default();
        let (tx, rx) = mpsc::unbounded_channel();
        let settle: Arc<dyn Settle> = Arc::new(ack::StreamSettle { tx });
        let ack_task = tokio::spawn(ack::ack_loop(
            acks,
            config.stream.to_string(),
            config.group.to_string(),
            rx,
            held.clone(),
        ));
        let sampler = tokio::spawn(lag::sample(
            client.clone(),
            config.stream.to_string(),
            config.group.to_string(),
            ctx.clone(),
        ));
        // Decoding runs in a task of its own, so the next read is already on its way while a
        // batch is decoded and dispatched. Entries reach it in stream order.
        let (entries, entries_rx) = mpsc::channel(2);
        let decoder = tokio::spawn(decode_loop(entries_rx, ctx.clone(), Arc::clone(&settle)));
        tracing::info!(source = %ctx.name, group = %config.group, consumer = %consumer, "reading stream");
        let reader_state = read::Reader {
            config,
            consumer,
            held,
            info: client.get_connection_info().clone(),
        };
        reader_state.read_loop(reader, &ctx, &entries).await;
        sampler.abort();
        drop(entries);
        if let Err(error) = decoder.await {
            tracing::error!(source = %ctx.name, error = %error, "decode task failed");
        }
        drop(settle);
        // The ack loop ends once every token is settled (its channel closes) and its XACKs are
        // sent.
        let _ = ack_task.await;
        tracing::info!(source = %ctx.name, "source stopped");
        Ok(())
    }
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
    let mut backoff = Backoff::default();
    loop {
        match client
            .get_connection_manager_with_config(config.clone())
            .await
        {
            Ok(conn) => return Some(conn),
            Err(error) => {
                tracing::warn!(source = %ctx.name, error = %error, "cannot connect to redis; retrying");
                if !ctx.wait(&mut backoff).await {
                    return None;
                }
            }
        }
    }
}

/// Decodes and delivers what the reader read, in order, until the reader is done. Each batch
/// comes with the permits reserved for it, one per entry.
async fn decode_loop(
    mut entries: mpsc::Receiver<(Vec<Entry>, super::Permits)>,
    ctx: SourceContext,
    settle: Arc<dyn Settle>,
) {
    while let Some((batch, mut permits)) = entries.recv().await {
        for (id, fields) in batch {
            let Some(permit) = permits.take() else {
                // The reader reserves one permit per entry it reads; never deliver without one.
                tracing::error!(source = %ctx.name, id = %id, "entry read without a permit; left pending");
                continue;
            };
            ctx.deliver(permit, ctx.decode_stream_entry(fields), id, &settle);
        }
    }
}
