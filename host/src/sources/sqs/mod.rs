//! The SQS source: reads Sequin's SQS sink (FIFO or standard queues).
//!
//! - `receivers` loops long-poll `ReceiveMessage` in parallel, each asking for no more messages
//!   than the in-flight slots allow (at most 10).
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
//! - [`settle`]: the in-flight table, the acker, deletes and visibility changes.

mod settle;

use super::{Acker, Backoff, Payload, RawPayload, SourceContext};
use crate::config::SqsSourceConfig;
use crate::message::ChangeMessage;
use aws_sdk_sqs::error::DisplayErrorContext;
use settle::{InFlight, Queue, SqsAcker};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Runs the source until shutdown, then waits until every message it received is settled and
/// deleted (or made visible again).
///
/// # Errors
///
/// None at present: AWS errors are retried with backoff and logged.
pub async fn run(
    config: SqsSourceConfig,
    max_message_bytes: usize,
    ctx: SourceContext,
) -> anyhow::Result<()> {
    let visibility = Duration::from_secs(config.visibility_timeout_seconds.into());
    let queue = Arc::new(Queue {
        client: client(&config).await,
        url: config.queue_url.clone(),
        source: Arc::clone(&ctx.name),
    });
    let inflight = Arc::new(InFlight::default());
    let (tx, rx) = mpsc::unbounded_channel();
    let acker: Arc<dyn Acker> = Arc::new(SqsAcker {
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
    tracing::info!(source = %ctx.name, queue = %config.queue_url, receivers = config.receivers, "receiving from sqs");
    let receiver = Arc::new(Receiver {
        queue,
        inflight,
        acker,
        max_messages: config.max_messages,
        wait_time_seconds: config.wait_time_seconds,
        visibility,
        max_message_bytes,
    });
    let sampler = tokio::spawn(sample_depth(Arc::clone(&receiver.queue), ctx.clone()));
    let mut receivers = JoinSet::new();
    for _ in 0..config.receivers {
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
        .operation_attempt_timeout(Duration::from_secs(
            u64::from(config.wait_time_seconds) + 15,
        ))
        .build();
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(config.region.clone()))
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
    acker: Arc<dyn Acker>,
    max_messages: usize,
    wait_time_seconds: u32,
    visibility: Duration,
    max_message_bytes: usize,
}

impl Receiver {
    async fn receive_loop(self: Arc<Self>, ctx: SourceContext) {
        let mut backoff = Backoff::new();
        loop {
            let Some(slots) = ctx.reserve(self.max_messages).await else {
                return;
            };
            let asked = Instant::now();
            // A receive cut short by shutdown is dropped: SQS answers a long poll as soon as it
            // has messages, so at worst a message in that reply comes back after its timeout.
            let received = tokio::select! {
                received = self.receive(slots) => received,
                () = ctx.shutdown.cancelled() => {
                    ctx.release(slots);
                    return;
                }
            };
            ctx.dispatcher
                .counters()
                .source_up(&ctx.name, received.is_ok());
            let messages = match received {
                Ok(messages) => messages,
                Err(error) => {
                    ctx.release(slots);
                    tracing::warn!(source = %ctx.name, error = %error, "sqs receive failed; retrying");
                    if !backoff.wait(&ctx).await {
                        return;
                    }
                    continue;
                }
            };
            backoff.reset();
            let mut used = 0;
            for message in messages {
                let Some(receipt) = message.receipt_handle else {
                    tracing::warn!(source = %ctx.name, id = ?message.message_id, "sqs message without a receipt handle; skipped");
                    continue;
                };
                if used == slots {
                    // SQS never returns more than asked for; never deliver without a slot.
                    tracing::warn!(source = %ctx.name, "sqs returned more messages than asked for; returning the rest");
                    self.queue.make_visible(receipt).await;
                    continue;
                }
                used += 1;
                let id = message.message_id.unwrap_or_else(|| receipt.clone());
                // Held before delivery: the pipeline may settle it at once.
                self.inflight.hold(&id, receipt, asked + self.visibility);
                let payload = decode(message.body, self.max_message_bytes);
                ctx.deliver(payload, id, &self.acker);
            }
            ctx.release(slots - used);
        }
    }

    async fn receive(&self, max: usize) -> Result<Vec<aws_sdk_sqs::types::Message>, String> {
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
            .map_err(|error| DisplayErrorContext(&error).to_string())
    }
}

/// How often the queue depth is sampled for `/metrics`.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// Samples the queue's approximate message counts into the `sqs_messages_visible` and
/// `sqs_messages_in_flight` gauges until shutdown.
async fn sample_depth(queue: Arc<Queue>, ctx: SourceContext) {
    use aws_sdk_sqs::types::QueueAttributeName;
    let labels = crate::telemetry::source(&ctx.name);
    let metrics = &ctx.dispatcher.counters().metrics;
    let mut every = tokio::time::interval(SAMPLE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = ctx.shutdown.cancelled() => return,
        }
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
            metrics.sqs_visible.get_or_create(&labels).set(n);
        }
        if let Some(n) = count(&QueueAttributeName::ApproximateNumberOfMessagesNotVisible) {
            metrics.sqs_in_flight.get_or_create(&labels).set(n);
        }
    }
}

/// Decodes one body, or explains why it is not a change message.
fn decode(body: Option<String>, max_bytes: usize) -> Payload {
    let Some(body) = body else {
        return Payload::Malformed {
            raw: RawPayload::Body(Vec::new()),
            reason: "sqs message has no body".to_owned(),
        };
    };
    let decoded = if body.len() > max_bytes {
        Err(format!(
            "message of {} bytes exceeds the limit of {max_bytes} bytes",
            body.len()
        ))
    } else {
        ChangeMessage::from_json(&body).map_err(|error| error.0)
    };
    match decoded {
        Ok(message) => Payload::Decoded(message),
        Err(reason) => Payload::Malformed {
            raw: RawPayload::Body(body.into_bytes()),
            reason,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(body: Option<&str>, max: usize) -> String {
        match decode(body.map(str::to_owned), max) {
            Payload::Malformed { reason, .. } => reason,
            Payload::Decoded(message) => panic!("decoded {}", message.row_id()),
        }
    }

    #[test]
    fn bodies_that_are_not_change_messages_are_malformed_with_a_reason() {
        assert!(reason(Some("not json"), 1000).contains("invalid JSON"));
        assert!(reason(Some(r#"{"id":1}"#), 1000).contains("missing field"));
        assert!(reason(Some(r#""a transform's string""#), 1000).contains("JSON string"));
        assert!(reason(None, 1000).contains("no body"));
        assert!(reason(Some(r#"{"record":{}}"#), 5).contains("exceeds the limit"));
    }

    #[test]
    fn a_sequin_body_decodes() {
        let line = include_str!("../../../../tests/fixtures/sequin-examples.jsonl")
            .lines()
            .next()
            .unwrap();
        match decode(Some(line.to_owned()), 1 << 20) {
            Payload::Decoded(message) => assert_eq!(message.row_id(), "public.orders:1001"),
            Payload::Malformed { reason, .. } => panic!("{reason}"),
        }
    }
}
