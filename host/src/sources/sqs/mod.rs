//! The SQS source: reads Sequin's SQS sink (FIFO or standard queues).
//!
//! - `receivers` loops long-poll `ReceiveMessage` in parallel, each asking for no more messages
//!   than the in-flight permits allow (at most 10).
//! - Each body is decoded on its own; one that is not a change message (not JSON, JSON of
//!   another shape, a bare JSON string from a Sequin transform) is dead-lettered with the reason
//!   by the pipeline, and then deleted like any other settled message.
//! - A message is deleted (`DeleteMessageBatch`, up to 10 per call) only after the pipeline
//!   settled it as done: applied, or safely dead-lettered. An abandoned message (shutdown while
//!   Redis is down) is made visible again at once (`ChangeMessageVisibility` to 0).
//! - A message still in flight when half of its visibility timeout has passed is extended by
//!   the whole timeout again (`ChangeMessageVisibilityBatch`), so SQS does not hand it to another
//!   consumer while it is being applied.
//! - FIFO order: SQS hands out a message group's messages in order and none while an earlier one
//!   of the group is in flight. Sequin's group is the row's primary key, and the pipeline's lanes
//!   are chosen by row, so a receive batch dispatched in order keeps every row's order.
//!
//! - A receive running at shutdown is not cut short (SQS may already have hidden messages for
//!   it); what it brings is made visible again at once instead of waiting out its timeout.
//!
//! - [`config`]: the `[[source]]` table. `settle`: the in-flight table, deletes and visibility
//!   changes.

pub mod config;
mod settle;

use super::{BoxFuture, Sampler, Source, SourceContext, SourceError};
use crate::delivery::{Payload, RawPayload, Settle};
use crate::message::DecodeError;
use aws_sdk_sqs::error::DisplayErrorContext;
pub use config::SqsSourceConfig;
use settle::{InFlight, Queue, SqsCallError, SqsSettle};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// A configured queue.
pub(crate) struct SqsSource {
    pub(crate) config: SqsSourceConfig,
}

impl Source for SqsSource {
    fn run(self: Box<Self>, ctx: SourceContext) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(run(self.config, ctx))
    }
}

/// Runs the source until shutdown, then waits until every message it received is settled and
/// deleted (or made visible again). AWS errors are retried with backoff and logged.
async fn run(config: SqsSourceConfig, ctx: SourceContext) -> Result<(), SourceError> {
    let visibility = Duration::from_secs(config.visibility_timeout_seconds.get());
    let queue = Arc::new(Queue {
        client: client(&config).await,
        url: config.queue_url.as_str().to_owned(),
        source: Arc::clone(&ctx.name),
    });
    let inflight = Arc::new(InFlight::default());
    let (tx, rx) = mpsc::unbounded_channel();
    let settle: Arc<dyn Settle> = Arc::new(SqsSettle {
        inflight: Arc::clone(&inflight),
        tx,
    });
    let settler = tokio::spawn(settle::settle_loop(Arc::clone(&queue), rx));
    let keeper_stop = CancellationToken::new();
    let keeper = tokio::spawn(settle::keep_visible(
        Arc::clone(&queue),
        Arc::clone(&inflight),
        visibility,
        keeper_stop.clone(),
    ));
    tracing::info!(source = %ctx.name, queue = %queue.url, receivers = config.receivers, "receiving from sqs");
    let receiver = Arc::new(Receiver {
        queue,
        inflight,
        settle,
        max_messages: config.max_messages.get() as usize,
        wait_time_seconds: config.wait_time_seconds.get(),
        visibility,
    });
    let sampler = tokio::spawn(sample_depth(Arc::clone(&receiver.queue), ctx.clone()));
    let mut receivers = JoinSet::new();
    for _ in 0..config.receivers.get() {
        receivers.spawn(Arc::clone(&receiver).receive_loop(ctx.clone()));
    }
    while receivers.join_next().await.is_some() {}
    sampler.abort();
    drop(receiver);
    // The settle loop ends once every token is settled (its channel closes) and the last
    // deletes are sent; until then the keeper goes on extending what is still in flight.
    let _ = settler.await;
    keeper_stop.cancel();
    let _ = keeper.await;
    tracing::info!(source = %ctx.name, "source stopped");
    Ok(())
}

/// An SQS client for the queue: credentials from the standard chain, the configured region,
/// and the endpoint override if any.
async fn client(config: &SqsSourceConfig) -> aws_sdk_sqs::Client {
    let timeouts = aws_config::timeout::TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(5))
        // A long poll takes up to `wait_time_seconds`; beyond that plus a margin the connection
        // is presumed dead and the attempt is retried.
        .operation_attempt_timeout(Duration::from_secs(config.wait_time_seconds.get() + 15))
        .build();
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(config.region.to_string()))
        .timeout_config(timeouts);
    if let Some(endpoint) = &config.endpoint_url {
        loader = loader.endpoint_url(endpoint);
    }
    aws_sdk_sqs::Client::new(&loader.load().await)
}

/// What every receive loop shares.
struct Receiver {
    queue: Arc<Queue>,
    inflight: Arc<InFlight>,
    settle: Arc<dyn Settle>,
    max_messages: usize,
    wait_time_seconds: u64,
    visibility: Duration,
}

impl Receiver {
    async fn receive_loop(self: Arc<Self>, ctx: SourceContext) {
        let mut backoff = ctx.backoff();
        loop {
            let Some(mut permits) = ctx.reserve(self.max_messages).await else {
                return;
            };
            let asked = Instant::now();
            // A receive is never dropped half-way: SQS may already have taken messages out of
            // sight for this call. One still running at shutdown is awaited (a long poll ends
            // within `wait_time_seconds`), and what it brings is made visible again at once.
            let received = self.receive(permits.len()).await;
            ctx.set_up(received.is_ok());
            let messages = match received {
                Ok(messages) => messages,
                Err(error) => {
                    drop(permits);
                    tracing::warn!(source = %ctx.name, error = %error, "sqs receive failed; retrying");
                    if !ctx.wait(&mut backoff).await {
                        return;
                    }
                    continue;
                }
            };
            backoff.reset();
            let stopping = ctx.shutdown.is_cancelled();
            for message in messages {
                let Some(receipt) = message.receipt_handle else {
                    tracing::warn!(source = %ctx.name, id = ?message.message_id, "sqs message without a receipt handle; skipped");
                    continue;
                };
                let permit = match permits.take() {
                    Some(permit) if !stopping => permit,
                    // SQS never returns more than asked for; never deliver without a permit.
                    // At shutdown, nothing new goes into the pipeline.
                    _ => {
                        tracing::info!(source = %ctx.name, id = ?message.message_id, "returning a received message to the queue");
                        self.queue.make_visible(receipt).await;
                        continue;
                    }
                };
                let id = message.message_id.unwrap_or_else(|| receipt.clone());
                // Held before delivery: the pipeline may settle it at once.
                self.inflight.hold(&id, receipt, asked + self.visibility);
                let payload = match message.body {
                    Some(body) => ctx.decode_json(body.as_bytes()),
                    None => Payload::Malformed {
                        raw: RawPayload::Body(Vec::new()),
                        reason: DecodeError::NoBody { source_kind: "sqs" },
                    },
                };
                ctx.deliver(permit, payload, id, &self.settle);
            }
            if stopping {
                return;
            }
        }
    }

    async fn receive(&self, max: usize) -> Result<Vec<aws_sdk_sqs::types::Message>, SqsCallError> {
        let max = i32::try_from(max.min(10)).unwrap_or(10);
        let visibility = i32::try_from(self.visibility.as_secs()).unwrap_or(i32::MAX);
        self.queue
            .client
            .receive_message()
            .queue_url(&self.queue.url)
            .max_number_of_messages(max)
            .wait_time_seconds(i32::try_from(self.wait_time_seconds).unwrap_or(20))
            .visibility_timeout(visibility)
            .send()
            .await
            .map(|output| output.messages.unwrap_or_default())
            .map_err(SqsCallError::new)
    }
}

/// How often the queue depth is sampled for `/metrics`.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// Samples the queue's approximate message counts into the `sqs_messages_visible` and
/// `sqs_messages_in_flight` gauges until shutdown.
async fn sample_depth(queue: Arc<Queue>, ctx: SourceContext) {
    use aws_sdk_sqs::types::QueueAttributeName;
    let labels = ctx.labels();
    let metrics = ctx.metrics();
    let mut every = Sampler::every(SAMPLE_EVERY);
    while every.tick(&ctx).await {
        let attributes = queue
            .client
            .get_queue_attributes()
            .queue_url(&queue.url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .send()
            .await;
        let attributes = match attributes {
            Ok(output) => output.attributes.unwrap_or_default(),
            Err(error) => {
                tracing::debug!(source = %ctx.name, error = %DisplayErrorContext(&error), "cannot sample queue depth");
                continue;
            }
        };
        let count =
            |name: &QueueAttributeName| attributes.get(name).and_then(|n| n.parse::<i64>().ok());
        if let Some(n) = count(&QueueAttributeName::ApproximateNumberOfMessages) {
            metrics.sqs_visible.get_or_create(labels).set(n);
        }
        if let Some(n) = count(&QueueAttributeName::ApproximateNumberOfMessagesNotVisible) {
            metrics.sqs_in_flight.get_or_create(labels).set(n);
        }
    }
}
