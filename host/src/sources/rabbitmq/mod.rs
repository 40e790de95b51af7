//! The RabbitMQ source: consumes a durable queue that Sequin's RabbitMQ sink feeds through an
//! exchange.
//!
//! - Declares what it is told to (the queue, durable; a topic exchange and the queue's
//!   bindings), sets `basic.qos` prefetch to the daemon's in-flight budget, and consumes with
//!   manual acknowledgements.
//! - A delivery is acknowledged (`basic.ack`) only after the pipeline settled it as done:
//!   applied, or dead-lettered (a body that is not a change message). An abandoned one
//!   (shutdown while Redis is down) is returned (`basic.nack`, requeue).
//! - At shutdown the consumer is cancelled, deliveries not yet handed to the pipeline are
//!   returned at once, and the channel stays open until what is in flight is settled.
//! - A lost channel or connection is reconnected with the sources' backoff; the broker gives
//!   whatever was unacknowledged on it to a consumer again (`redelivered`, counted in
//!   `keepwarm_messages_redelivered_total`). Acknowledgements for deliveries of a lost channel
//!   are dropped: those messages come again and are re-applied harmlessly.
//! - Order: one queue hands out its messages in order, and the pipeline keeps each row's order,
//!   so with one consumer a row's changes are applied in the order Sequin published them. A
//!   redelivery (after a lost connection) or several consumers on one queue can apply an older
//!   change after a newer one; versioned writes keep the cache right regardless.
//!
//! - [`config`]: the `[[source]]` table. `settle`: the in-flight table and the ack loop.

pub mod config;
mod settle;

use super::{BoxFuture, Sampler, Source, SourceContext, SourceError};
use crate::delivery::Settle;
pub use config::RabbitMqSourceConfig;
use futures_util::StreamExt as _;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, Consumer, ExchangeKind};
use settle::{InFlight, RabbitSettle};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// A configured queue.
pub(crate) struct RabbitMqSource {
    pub(crate) config: RabbitMqSourceConfig,
    /// The URL, resolved at start-up.
    pub(crate) url: String,
    /// `basic.qos` prefetch: the in-flight budget.
    pub(crate) prefetch: u16,
}

impl Source for RabbitMqSource {
    fn run(self: Box<Self>, ctx: SourceContext) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(run(*self, ctx))
    }
}

/// A connection, its channel and the consumer on it.
struct Session {
    connection: Connection,
    channel: Channel,
    consumer: Consumer,
    /// A channel of its own for the backlog sampler: a failed passive declare closes its
    /// channel.
    sampler: Channel,
}

/// How a session ended.
enum Ended {
    /// Shutdown: stop, let what is in flight finish on this channel.
    Stopped,
    /// The channel or connection failed: connect again.
    Lost(String),
}

/// Runs the source until shutdown, then waits until every delivery it handed over is settled
/// and acknowledged, and closes the connection.
async fn run(source: RabbitMqSource, ctx: SourceContext) -> Result<(), SourceError> {
    let inflight = Arc::new(InFlight::default());
    let (tx, rx) = mpsc::unbounded_channel();
    let settle: Arc<dyn Settle> = Arc::new(RabbitSettle {
        inflight: Arc::clone(&inflight),
        tx,
    });
    let acks = tokio::spawn(settle::ack_loop(Arc::clone(&ctx.name), rx));
    let tag = source
        .config
        .consumer_tag
        .as_ref()
        .map_or_else(default_tag, |tag| tag.to_string());
    let mut backoff = ctx.backoff();
    let mut generation = 0u64;
    let mut last = None;
    while !ctx.shutdown.is_cancelled() {
        let session = match open(&source, &tag, &ctx).await {
            Ok(session) => session,
            Err(error) => {
                ctx.set_up(false);
                tracing::warn!(source = %ctx.name, error = %error, "cannot consume from rabbitmq; retrying");
                if !ctx.wait(&mut backoff).await {
                    break;
                }
                continue;
            }
        };
        ctx.set_up(true);
        backoff.reset();
        generation += 1;
        tracing::info!(source = %ctx.name, queue = %source.config.queue, prefetch = source.prefetch, "consuming from rabbitmq");
        let mut session = session;
        let sampler = tokio::spawn(sample_backlog(
            session.sampler.clone(),
            source.config.queue.to_string(),
            ctx.clone(),
        ));
        let ended = consume(&mut session, generation, &inflight, &settle, &ctx).await;
        sampler.abort();
        match ended {
            Ended::Stopped => {
                stop_consuming(&mut session, &ctx).await;
                last = Some(session);
                break;
            }
            Ended::Lost(error) => {
                ctx.set_up(false);
                tracing::warn!(source = %ctx.name, error = %error, in_flight = inflight.len(), "rabbitmq connection lost; reconnecting (unacknowledged deliveries come again)");
                let close = session.connection.close(200, "reconnecting".into());
                let _ = tokio::time::timeout(Duration::from_secs(2), close).await;
                if !ctx.wait(&mut backoff).await {
                    break;
                }
            }
        }
    }
    drop(settle);
    // The ack loop ends once every token is settled (its channel closes); the channel stays
    // open until then, so that the acknowledgements reach the broker.
    let _ = acks.await;
    if let Some(session) = last {
        let close = async {
            let _ = session.channel.close(200, "shutting down".into()).await;
            let _ = session.connection.close(200, "shutting down".into()).await;
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), close).await;
    }
    tracing::info!(source = %ctx.name, "source stopped");
    Ok(())
}

fn default_tag() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "host".to_owned());
    format!("keepwarm-{host}-{}", std::process::id())
}

/// Connects, declares what the configuration asks for, sets the prefetch and starts
/// consuming.
async fn open(
    source: &RabbitMqSource,
    tag: &str,
    ctx: &SourceContext,
) -> Result<Session, lapin::Error> {
    let config = &source.config;
    let properties = ConnectionProperties::default()
        .with_connection_name(format!("keepwarm {}", ctx.name).into());
    let connection = tokio::time::timeout(
        Duration::from_secs(10),
        Connection::connect(&source.url, properties),
    )
    .await
    .map_err(|_| lapin::Error::from(std::io::Error::from(std::io::ErrorKind::TimedOut)))??;
    let channel = connection.create_channel().await?;
    let queue = config.queue.as_str();
    let options = QueueDeclareOptions {
        durable: true,
        passive: !config.declare_queue,
        ..Default::default()
    };
    channel
        .queue_declare(queue.into(), options, FieldTable::default())
        .await?;
    if let Some(exchange) = &config.exchange {
        let options = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Topic,
                options,
                FieldTable::default(),
            )
            .await?;
        for key in &config.binding_keys {
            channel
                .queue_bind(
                    queue.into(),
                    exchange.as_str().into(),
                    key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
    }
    channel
        .basic_qos(source.prefetch, BasicQosOptions::default())
        .await?;
    let consumer = channel
        .basic_consume(
            queue.into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let sampler = connection.create_channel().await?;
    Ok(Session {
        connection,
        channel,
        consumer,
        sampler,
    })
}

/// Hands deliveries to the pipeline until shutdown or until the channel fails.
async fn consume(
    session: &mut Session,
    generation: u64,
    inflight: &Arc<InFlight>,
    settle: &Arc<dyn Settle>,
    ctx: &SourceContext,
) -> Ended {
    let redelivered = ctx
        .metrics()
        .redelivered
        .get_or_create(ctx.labels())
        .clone();
    loop {
        let next = tokio::select! {
            biased;
            () = ctx.shutdown.cancelled() => return Ended::Stopped,
            next = session.consumer.next() => next,
        };
        let delivery = match next {
            Some(Ok(delivery)) => delivery,
            Some(Err(error)) => return Ended::Lost(error.to_string()),
            None => return Ended::Lost("the broker cancelled the consumer".to_owned()),
        };
        // Waits while the in-flight budget is used up: the broker stops sending at the
        // prefetch count meanwhile.
        let Some(mut permits) = ctx.reserve(1).await else {
            give_back(&delivery.acker, ctx).await;
            return Ended::Stopped;
        };
        let Some(permit) = permits.take() else {
            give_back(&delivery.acker, ctx).await;
            continue;
        };
        if delivery.redelivered {
            redelivered.inc();
        }
        let id = format!("{generation}.{}", delivery.delivery_tag);
        // Held before delivery: the pipeline may settle it at once.
        inflight.hold(&id, delivery.acker);
        let payload = ctx.decode_json(&delivery.data);
        ctx.deliver(permit, payload, id, settle);
    }
}

/// Cancels the consumer and returns what the broker had already sent and the pipeline has
/// not taken.
async fn stop_consuming(session: &mut Session, ctx: &SourceContext) {
    let tag = session.consumer.tag();
    if let Err(error) = session
        .channel
        .basic_cancel(tag, BasicCancelOptions::default())
        .await
    {
        tracing::warn!(source = %ctx.name, error = %error, "cannot cancel the rabbitmq consumer");
        return;
    }
    // After the cancel, the consumer ends once the deliveries already sent are drained.
    let drain = async {
        while let Some(Ok(delivery)) = session.consumer.next().await {
            give_back(&delivery.acker, ctx).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
}

/// How often the queue's backlog is sampled for `/metrics`.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// Samples the queue's ready messages (a passive declare) into `keepwarm_source_backlog` until
/// shutdown or until the session's task aborts it.
async fn sample_backlog(channel: Channel, queue: String, ctx: SourceContext) {
    let gauge = ctx.metrics().backlog.get_or_create(ctx.labels()).clone();
    let mut every = Sampler::every(SAMPLE_EVERY);
    let options = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    while every.tick(&ctx).await {
        match channel
            .queue_declare(queue.as_str().into(), options, FieldTable::default())
            .await
        {
            Ok(declared) => {
                gauge.set(i64::from(declared.message_count()));
            }
            Err(error) => {
                tracing::debug!(source = %ctx.name, error = %error, "cannot sample the queue's backlog");
                return;
            }
        }
    }
}

/// Returns a delivery to the queue (`basic.nack` with requeue).
async fn give_back(acker: &lapin::Acker, ctx: &SourceContext) {
    let options = BasicNackOptions {
        requeue: true,
        ..Default::default()
    };
    if let Err(error) = acker.nack(options).await {
        tracing::warn!(source = %ctx.name, error = %error, "cannot return a rabbitmq delivery; the broker redelivers it when the channel closes");
    }
}
