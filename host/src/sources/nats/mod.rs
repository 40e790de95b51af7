//! The NATS JetStream source: reads what Sequin's NATS sink publishes, through a stream that
//! captures its subjects and a durable pull consumer.
//!
//! - Sequin publishes with core NATS (no JetStream acknowledgement): a change published while
//!   no stream captures its subject is gone. The stream must exist before Sequin publishes;
//!   with `create_stream = true` keepwarm creates it, with a duplicate window so that the
//!   `Nats-Msg-Id` header Sequin sets de-duplicates re-sent changes.
//! - The consumer is durable, with explicit acknowledgement; its `max_ack_pending` is the
//!   daemon's in-flight budget. Each pull request asks for no more messages than the in-flight
//!   permits allow.
//! - A message is acknowledged (`+ACK`) only after the pipeline settled it as done: applied, or
//!   dead-lettered (a body that is not a change message). An abandoned one (shutdown while
//!   Redis is down) is given back at once (`-NAK`).
//! - A message in flight longer than a third of `ack_wait` gets a progress acknowledgement
//!   (`+WPI`), so the server does not deliver it again while it waits in a lane.
//! - Messages the server delivers again (a delivery count above 1) are counted in
//!   `keepwarm_messages_redelivered_total`.
//! - The client reconnects by itself; the source is down (`/readyz`) while disconnected, and
//!   binds its stream and consumer again after a pull fails.
//!
//! - [`config`]: the `[[source]]` table. `settle`: the in-flight table, the ack loop and the
//!   progress keeper.

pub mod config;
mod settle;

use super::{BoxFuture, Permits, Sampler, Source, SourceContext, SourceError};
use crate::backoff::Backoff;
use crate::delivery::Settle;
use async_nats::jetstream::{self, AckKind, consumer, stream};
pub use config::NatsSourceConfig;
use futures_util::StreamExt as _;
use settle::{InFlight, NatsSettle};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A configured stream and consumer.
pub(crate) struct NatsSource {
    pub(crate) config: NatsSourceConfig,
    pub(crate) max_in_flight: usize,
}

impl Source for NatsSource {
    fn run(self: Box<Self>, ctx: SourceContext) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(run(self.config, self.max_in_flight, ctx))
    }
}

type PullConsumer = consumer::Consumer<consumer::pull::Config>;

/// Runs the source until shutdown, then waits until every message it delivered is settled
/// and acknowledged.
async fn run(
    config: NatsSourceConfig,
    max_in_flight: usize,
    ctx: SourceContext,
) -> Result<(), SourceError> {
    // Whether the consumer is bound: a reconnected client is up only then.
    let bound = Arc::new(AtomicBool::new(false));
    let client = connect(&config, &ctx, Arc::clone(&bound)).await?;
    let js = jetstream::new(client.clone());
    let ack_wait = Duration::from_secs(config.ack_wait_seconds.get());
    let inflight = Arc::new(InFlight::default());
    let (tx, rx) = mpsc::unbounded_channel();
    let settle: Arc<dyn Settle> = Arc::new(NatsSettle {
        inflight: Arc::clone(&inflight),
        tx,
    });
    let acks = tokio::spawn(settle::ack_loop(Arc::clone(&ctx.name), rx));
    let keeper_stop = CancellationToken::new();
    let keeper = tokio::spawn(settle::keep_in_progress(
        Arc::clone(&ctx.name),
        Arc::clone(&inflight),
        ack_wait,
        keeper_stop.clone(),
    ));
    let puller = Puller {
        config,
        max_in_flight,
        js,
        client: client.clone(),
        inflight,
        settle,
        bound,
    };
    puller.pull_loop(&ctx).await;
    drop(puller);
    // The ack loop ends once every token is settled (its channel closes); until then the
    // keeper goes on reporting progress of what is still in flight.
    let _ = acks.await;
    keeper_stop.cancel();
    let _ = keeper.await;
    // Acknowledgements are buffered by the client: send them before the process goes.
    if let Err(error) = tokio::time::timeout(Duration::from_secs(5), client.flush())
        .await
        .map_err(|_| "timed out".to_owned())
        .and_then(|flushed| flushed.map_err(|error| error.to_string()))
    {
        tracing::warn!(source = %ctx.name, error = %error, "cannot flush the last acknowledgements; those messages come again and are re-applied harmlessly");
    }
    tracing::info!(source = %ctx.name, "source stopped");
    Ok(())
}

/// A client that connects (and reconnects, for ever) in the background, and tells `ctx`
/// whether it is connected.
async fn connect(
    config: &NatsSourceConfig,
    ctx: &SourceContext,
    bound: Arc<AtomicBool>,
) -> Result<async_nats::Client, SourceError> {
    let events = ctx.clone();
    async_nats::ConnectOptions::new()
        .name(format!("keepwarm {}", ctx.name))
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(5))
        .ping_interval(Duration::from_secs(10))
        .reconnect_delay_callback(reconnect_delay)
        .event_callback(move |event| {
            let ctx = events.clone();
            let bound = Arc::clone(&bound);
            async move {
                match event {
                    async_nats::Event::Disconnected => {
                        tracing::warn!(source = %ctx.name, "disconnected from nats; reconnecting");
                        ctx.set_up(false);
                    }
                    async_nats::Event::Connected => {
                        tracing::info!(source = %ctx.name, "connected to nats");
                        ctx.set_up(bound.load(Ordering::Relaxed));
                    }
                    other => tracing::info!(source = %ctx.name, event = %other, "nats event"),
                }
            }
        })
        .connect(config.url.as_str())
        .await
        .map_err(|error| SourceError::Client {
            what: format!("cannot use nats url {}", config.url),
            error: Box::new(error),
        })
}

/// The wait before reconnect attempt `attempts`: the sources' backoff.
fn reconnect_delay(attempts: usize) -> Duration {
    let mut backoff = Backoff::default();
    let mut delay = backoff.next_delay();
    for _ in 1..attempts.min(32) {
        delay = backoff.next_delay();
    }
    if attempts == 0 { Duration::ZERO } else { delay }
}

/// What the pull loop works with.
struct Puller {
    config: NatsSourceConfig,
    max_in_flight: usize,
    js: jetstream::Context,
    client: async_nats::Client,
    inflight: Arc<InFlight>,
    settle: Arc<dyn Settle>,
    bound: Arc<AtomicBool>,
}

impl Puller {
    /// Binds the consumer and pulls until shutdown; binds again after a pull fails.
    async fn pull_loop(&self, ctx: &SourceContext) {
        let mut backoff = ctx.backoff();
        'bind: loop {
            let Some(consumer) = self.bind(ctx, &mut backoff).await else {
                return;
            };
            tracing::info!(source = %ctx.name, stream = %self.config.stream.as_str(), consumer = %self.config.consumer.as_str(), "pulling from nats");
            let sampler = tokio::spawn(sample_backlog(consumer.clone(), ctx.clone()));
            let _stop_sampling = AbortOnDrop(sampler);
            loop {
                let Some(permits) = ctx.reserve(self.config.max_messages.get() as usize).await
                else {
                    return;
                };
                match self.pull(ctx, &consumer, permits).await {
                    Pulled::More => backoff.reset(),
                    Pulled::Stopped => return,
                    Pulled::Failed => {
                        self.bound.store(false, Ordering::Relaxed);
                        ctx.set_up(false);
                        if !ctx.wait(&mut backoff).await {
                            return;
                        }
                        continue 'bind;
                    }
                }
            }
        }
    }

    /// Finds (or creates) the stream and creates or updates the durable consumer, retrying
    /// until it works; `None` on shutdown.
    async fn bind(&self, ctx: &SourceContext, backoff: &mut Backoff) -> Option<PullConsumer> {
        loop {
            match self.try_bind().await {
                Ok(consumer) => {
                    self.bound.store(true, Ordering::Relaxed);
                    ctx.set_up(
                        self.client.connection_state() == async_nats::connection::State::Connected,
                    );
                    return Some(consumer);
                }
                Err(error) => {
                    ctx.set_up(false);
                    tracing::warn!(source = %ctx.name, stream = %self.config.stream.as_str(), error = %error, "cannot bind the nats stream and consumer; retrying");
                    if !ctx.wait(backoff).await {
                        return None;
                    }
                }
            }
        }
    }

    async fn try_bind(&self) -> Result<PullConsumer, BindError> {
        let config = &self.config;
        let name = config.stream.as_str();
        let stream = if config.create_stream {
            self.js
                .get_or_create_stream(stream::Config {
                    name: name.to_owned(),
                    subjects: config.subjects.iter().map(|s| s.to_string()).collect(),
                    duplicate_window: Duration::from_secs(config.duplicate_window_seconds.get()),
                    storage: stream::StorageType::File,
                    ..Default::default()
                })
                .await
                .map_err(|error| BindError::new(format!("create stream {name}"), error))?
        } else {
            self.js.get_stream(name).await.map_err(|error| {
                BindError::new(
                    format!("find stream {name} (create it, or set create_stream = true)"),
                    error,
                )
            })?
        };
        let max_ack_pending = i64::try_from(self.max_in_flight).unwrap_or(i64::MAX);
        stream
            .create_consumer(consumer::pull::Config {
                durable_name: Some(config.consumer.as_str().to_owned()),
                description: Some("keepwarm".to_owned()),
                deliver_policy: consumer::DeliverPolicy::All,
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(config.ack_wait_seconds.get()),
                filter_subject: config
                    .filter_subject
                    .as_ref()
                    .map(|s| s.to_string())
                    .unwrap_or_default(),
                max_ack_pending,
                ..Default::default()
            })
            .await
            .map_err(|error| {
                BindError::new(
                    format!("create consumer {} on {name}", config.consumer.as_str()),
                    error,
                )
            })
    }

    /// One pull request for as many messages as `permits` allow, each delivered as it comes.
    async fn pull(
        &self,
        ctx: &SourceContext,
        consumer: &PullConsumer,
        mut permits: Permits,
    ) -> Pulled {
        let wait = Duration::from_millis(self.config.pull_wait_ms.get());
        let batch = consumer
            .batch()
            .max_messages(permits.len())
            .expires(wait)
            .messages()
            .await;
        let mut batch = match batch {
            Ok(batch) => batch,
            Err(error) => {
                tracing::warn!(source = %ctx.name, error = %error, "nats pull request failed; retrying");
                return Pulled::Failed;
            }
        };
        let redelivered = ctx
            .metrics()
            .redelivered
            .get_or_create(ctx.labels())
            .clone();
        let mut stopping = false;
        loop {
            // A pull request is never dropped half-way: the server may already be sending
            // messages for it. At shutdown the rest of it is given back at once.
            let next = if stopping {
                batch.next().await
            } else {
                tokio::select! {
                    biased;
                    () = ctx.shutdown.cancelled() => {
                        stopping = true;
                        continue;
                    }
                    next = batch.next() => next,
                }
            };
            let message = match next {
                None => break,
                Some(Ok(message)) => message,
                Some(Err(error)) => {
                    tracing::warn!(source = %ctx.name, error = %error, "nats pull failed; binding again");
                    return Pulled::Failed;
                }
            };
            let permit = match permits.take() {
                Some(permit) if !stopping => permit,
                // The server never sends more than asked for; never deliver without a permit.
                _ => {
                    if let Err(error) = message.ack_with(AckKind::Nak(None)).await {
                        tracing::warn!(source = %ctx.name, error = %error, "cannot give a nats message back");
                    }
                    continue;
                }
            };
            let (id, delivered) = match message.info() {
                Ok(info) => (info.stream_sequence.to_string(), info.delivered),
                Err(_) => (message.subject.to_string(), 1),
            };
            if delivered > 1 {
                redelivered.inc();
            }
            let (message, acker) = message.split();
            // Held before delivery: the pipeline may settle it at once.
            self.inflight.hold(&id, acker);
            let payload = ctx.decode_json(&message.payload);
            ctx.deliver(permit, payload, id, &self.settle);
        }
        if stopping {
            tracing::info!(source = %ctx.name, in_flight = self.inflight.len(), "stopped pulling");
            return Pulled::Stopped;
        }
        Pulled::More
    }
}

/// How often the consumer's backlog is sampled for `/metrics`.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// Samples the consumer's `num_pending` into `keepwarm_source_backlog` until shutdown.
async fn sample_backlog(mut consumer: PullConsumer, ctx: SourceContext) {
    let gauge = ctx.metrics().backlog.get_or_create(ctx.labels()).clone();
    let mut every = Sampler::every(SAMPLE_EVERY);
    while every.tick(&ctx).await {
        match consumer.info().await {
            Ok(info) => {
                gauge.set(i64::try_from(info.num_pending).unwrap_or(i64::MAX));
            }
            Err(error) => {
                tracing::debug!(source = %ctx.name, error = %error, "cannot sample the consumer's backlog");
            }
        }
    }
}

/// Aborts a task when dropped (the sampler of a consumer no longer bound).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How a pull request ended.
enum Pulled {
    /// It ended (all asked for came, or it expired): pull again.
    More,
    /// Shutdown.
    Stopped,
    /// The request or a message of it failed: bind again after a backoff.
    Failed,
}

/// Why the stream or consumer could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot {what}: {error}")]
struct BindError {
    what: String,
    #[source]
    error: Box<dyn std::error::Error + Send + Sync>,
}

impl BindError {
    fn new(what: String, error: impl std::error::Error + Send + Sync + 'static) -> BindError {
        BindError {
            what,
            error: Box::new(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnects_back_off_like_every_source() {
        let delays: Vec<u128> = [0, 1, 2, 3, 10]
            .into_iter()
            .map(|n| reconnect_delay(n).as_millis())
            .collect();
        assert_eq!(delays, [0, 100, 200, 400, 5000]);
    }
}
