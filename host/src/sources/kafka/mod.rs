//! The Kafka source: reads Sequin's Kafka sink through a consumer group (librdkafka).
//!
//! - One consumer per source, polled on a thread of its own (librdkafka's calls block; the
//!   rebalance callback runs on the polling thread and may wait there).
//! - Automatic commit is off. A message's offset counts as applied once the pipeline settled it
//!   (applied, or dead-lettered); every `commit_interval_ms` each partition's lowest offset not
//!   yet applied is committed (`offsets.rs`), so a message applied early never carries the
//!   commit past an earlier one still in flight.
//! - Order: Sequin keys a message by its row's primary key and puts one row's changes in one
//!   partition; a partition is delivered in offset order and the pipeline's lanes are chosen by
//!   row, so each row's changes are applied in order.
//! - Rebalance: on revoke, messages of the revoked partitions not yet delivered are dropped (the
//!   new owner reads them), those in flight get `revoke_timeout_ms` to be applied, the applied
//!   prefix is committed (synchronously), and the partitions are let go; anything applied later
//!   is redelivered to the new owner, where versioned writes make the replay harmless. On
//!   assign, librdkafka resumes from the committed offset (`auto_offset_reset` when there is
//!   none).
//! - A value that is not a change message (or a null value) is dead-lettered with the origin id
//!   `topic/partition/offset`, and the offset moves on.
//! - Broker outage: librdkafka reconnects by itself with backoff; the source counts as down
//!   (`keepwarm_source_up`, `/readyz`) while no broker is up, from librdkafka's error callback
//!   and its statistics (every second), which also give `keepwarm_kafka_lag` per partition.
//! - Permits: the poll thread reserves in-flight permits before it polls; when none are free it
//!   pauses its partitions and keeps polling (so rebalances and the group's liveness are still
//!   served), holding what was already fetched until permits come back.
//! - Bursts: the poll thread decodes what librdkafka already holds (polls that do not wait), up
//!   to [`BURST`] messages, and hands them to the pipeline together. Handed over one at a time
//!   from this thread, each message woke a lane for a batch of one or two; in bursts, lanes take
//!   batches, and keepwarm-kafka spent about a tenth less CPU per message (docs/bench.md, round
//!   10). A burst is delivered before the thread waits for anything: a poll that may block,
//!   permits, a revoke's wait for what is in flight, shutdown.
//! - Shutdown: stop delivering, wait until what was delivered is settled, commit, leave the
//!   group.
//! - Memory: every part of a message is allocated on the poll thread, so finished messages
//!   are freed there too, when the next burst is handed over ([`Graveyard`]): freed on the
//!   pipeline's threads, they went back through the allocator's cross-thread path and came
//!   back cold (docs/bench.md, "Round 16").
//!
//! - [`config`]: the `[[source]]` table. `offsets`: the committable offsets per partition.

pub mod config;
mod offsets;

use super::{BoxFuture, Permits, Source, SourceContext, SourceError};
use crate::delivery::{Graveyard, Payload, RawPayload, Settle};
use crate::message::DecodeError;
use crate::telemetry::PartitionLabels;
pub use config::KafkaSourceConfig;
use offsets::{KafkaSettle, Offsets, Tp, message_id};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message as _};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, config::RDKafkaLogLevel};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Most permits reserved at once by the poll thread.
const READ_AHEAD: usize = 512;
/// How long one poll waits for a message (shutdown is noticed within this).
const POLL: Duration = Duration::from_millis(100);
/// Most messages decoded before they are handed to the pipeline together.
const BURST: usize = 64;

/// A message decoded and recorded as delivered, waiting in the burst: its permit, what it
/// decoded to, its id.
type Decoded = (tokio::sync::OwnedSemaphorePermit, Payload, String);

/// A configured consumer.
pub(crate) struct KafkaSource {
    pub(crate) config: KafkaSourceConfig,
}

impl Source for KafkaSource {
    fn run(self: Box<Self>, ctx: SourceContext) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(run(self.config, ctx))
    }
}

/// A message taken from the consumer and held until a permit is free, owned.
struct Fetched {
    topic: String,
    partition: i32,
    offset: i64,
    value: Option<Vec<u8>>,
}

impl Fetched {
    fn owned(message: &BorrowedMessage<'_>) -> Fetched {
        Fetched {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
            value: message.payload().map(<[u8]>::to_vec),
        }
    }
}

/// A message to deliver, borrowed: from librdkafka's buffer as polled (nothing is copied
/// before the decode), or from a held [`Fetched`].
struct Incoming<'a> {
    topic: &'a str,
    partition: i32,
    offset: i64,
    value: Option<&'a [u8]>,
}

impl<'a> From<&'a BorrowedMessage<'_>> for Incoming<'a> {
    fn from(message: &'a BorrowedMessage<'_>) -> Incoming<'a> {
        Incoming {
            topic: message.topic(),
            partition: message.partition(),
            offset: message.offset(),
            value: message.payload(),
        }
    }
}

impl<'a> From<&'a Fetched> for Incoming<'a> {
    fn from(message: &'a Fetched) -> Incoming<'a> {
        Incoming {
            topic: &message.topic,
            partition: message.partition,
            offset: message.offset,
            value: message.value.as_deref(),
        }
    }
}

/// What the rebalance, statistics and error callbacks share with the poll loop.
struct KafkaContext {
    ctx: SourceContext,
    offsets: Arc<Offsets>,
    /// How the pipeline tells `offsets` that a delivered message is settled.
    settle: Arc<dyn Settle>,
    /// Fetched, not yet delivered (no permit was free).
    held: Mutex<VecDeque<Fetched>>,
    /// Decoded and counted in flight, handed to the pipeline together (see [`Poller::run`]).
    burst: Mutex<Vec<Decoded>>,
    /// Finished messages, freed by the poll thread that decoded them (see [`Graveyard`]).
    graveyard: Arc<Graveyard>,
    revoke_timeout: Duration,
}

impl KafkaContext {
    fn held(&self) -> std::sync::MutexGuard<'_, VecDeque<Fetched>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn burst(&self) -> std::sync::MutexGuard<'_, Vec<Decoded>> {
        self.burst.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Frees the messages finished since the last flush, then hands the burst to the pipeline,
    /// in order.
    fn flush(&self) {
        self.graveyard.clear();
        let mut burst = self.burst();
        for (permit, payload, id) in burst.drain(..) {
            self.ctx.deliver(permit, payload, id, &self.settle);
        }
    }

    fn labels(&self, (topic, partition): &Tp) -> PartitionLabels {
        [
            ("source", self.ctx.name.to_string()),
            ("topic", topic.clone()),
            ("partition", partition.to_string()),
        ]
    }
}

impl ClientContext for KafkaContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        let source = &*self.ctx.name;
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(source, facility, "librdkafka: {message}");
            }
            RDKafkaLogLevel::Warning => tracing::warn!(source, facility, "librdkafka: {message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(source, facility, "librdkafka: {message}");
            }
            RDKafkaLogLevel::Debug => tracing::debug!(source, facility, "librdkafka: {message}"),
        }
    }

    fn stats(&self, statistics: Statistics) {
        // Real brokers only: librdkafka's internal and logical (coordinator) handles say
        // nothing about the network.
        let up = statistics
            .brokers
            .values()
            .any(|b| matches!(b.source.as_str(), "configured" | "learned") && b.state == "UP");
        self.ctx.set_up(up);
        let gauges = &self.ctx.metrics().kafka_lag;
        for (topic, stats) in &statistics.topics {
            for (partition, p) in &stats.partitions {
                let tp = (topic.clone(), *partition);
                let high = (p.hi_offset >= 0).then_some(p.hi_offset);
                if let Some(lag) = self.offsets.lag(&tp, high) {
                    gauges.get_or_create(&self.labels(&tp)).set(lag);
                }
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal) {
            // The poll reports it too, and the source stops there.
            self.ctx.set_up(false);
            tracing::error!(source = %self.ctx.name, error = %error, reason, "fatal kafka client error");
            return;
        }
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.ctx.set_up(false);
        }
        tracing::warn!(source = %self.ctx.name, error = %error, reason, "kafka client error; librdkafka retries");
    }
}

impl ConsumerContext for KafkaContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(list) => {
                let tps = partitions(list);
                self.offsets.assign(tps.iter().cloned());
                tracing::info!(source = %self.ctx.name, partitions = %names(&tps), "partitions assigned");
            }
            Rebalance::Revoke(list) => {
                let tps = partitions(list);
                // Counted in flight already: delivered now, so that the wait below is for
                // the pipeline, not for this thread.
                self.flush();
                // Not yet delivered: the new owner reads them from the last commit.
                self.held().retain(|m| {
                    !tps.iter()
                        .any(|(topic, partition)| *topic == m.topic && *partition == m.partition)
                });
                if !self.offsets.wait_idle(&tps, self.revoke_timeout) {
                    tracing::warn!(
                        source = %self.ctx.name,
                        in_flight = self.offsets.in_flight(Some(&tps)),
                        "revoked partitions still have messages in flight after revoke_timeout_ms; they will be redelivered to the new owner"
                    );
                }
                let commit = self.offsets.revoke(&tps);
                if !commit.is_empty()
                    && let Err(error) = consumer.commit(&offset_list(&commit), CommitMode::Sync)
                {
                    tracing::warn!(source = %self.ctx.name, error = %error, "cannot commit revoked partitions; their uncommitted messages will be redelivered");
                }
                for tp in &tps {
                    self.ctx.metrics().kafka_lag.remove(&self.labels(tp));
                }
                tracing::info!(source = %self.ctx.name, partitions = %names(&tps), "partitions revoked");
            }
            Rebalance::Error(error) => {
                tracing::warn!(source = %self.ctx.name, error = %error, "kafka rebalance failed");
            }
        }
    }

    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        offsets: &TopicPartitionList,
    ) {
        match result {
            Ok(()) => {
                for element in offsets.elements() {
                    if let Offset::Offset(offset) = element.offset() {
                        let tp = (element.topic().to_owned(), element.partition());
                        self.offsets.committed(&tp, offset);
                    }
                }
            }
            Err(error) => {
                tracing::warn!(source = %self.ctx.name, error = %error, "kafka commit failed; retrying at the next interval");
            }
        }
    }
}

fn partitions(list: &TopicPartitionList) -> Vec<Tp> {
    list.elements()
        .iter()
        .map(|e| (e.topic().to_owned(), e.partition()))
        .collect()
}

fn names(tps: &[Tp]) -> String {
    let names: Vec<String> = tps.iter().map(|(t, p)| format!("{t}/{p}")).collect();
    names.join(",")
}

fn offset_list(offsets: &[(Tp, i64)]) -> TopicPartitionList {
    let mut list = TopicPartitionList::new();
    for ((topic, partition), offset) in offsets {
        // Adding to a fresh list cannot fail for a valid offset.
        let _ = list.add_partition_offset(topic, *partition, Offset::Offset(*offset));
    }
    list
}

/// Creates the consumer, subscribes, and polls on a thread of its own until shutdown.
async fn run(config: KafkaSourceConfig, mut ctx: SourceContext) -> Result<(), SourceError> {
    let offsets = Arc::new(Offsets::default());
    let graveyard = ctx.free_at_home();
    let context = KafkaContext {
        ctx: ctx.clone(),
        offsets: Arc::clone(&offsets),
        settle: Arc::new(KafkaSettle(offsets)),
        held: Mutex::new(VecDeque::new()),
        burst: Mutex::new(Vec::with_capacity(BURST)),
        graveyard,
        revoke_timeout: Duration::from_millis(config.revoke_timeout_ms.get()),
    };
    let client_error = |what: String| {
        move |error: KafkaError| SourceError::Client {
            what,
            error: Box::new(error),
        }
    };
    let consumer: BaseConsumer<KafkaContext> = config
        .client_config()
        .create_with_context(context)
        .map_err(client_error(format!(
            "cannot create a kafka consumer for {}",
            config.brokers
        )))?;
    let topics: Vec<&str> = config.topics.iter().map(|t| t.as_str()).collect();
    consumer
        .subscribe(&topics)
        .map_err(client_error(format!("cannot subscribe to {topics:?}")))?;
    tracing::info!(source = %ctx.name, brokers = %config.brokers, topics = ?topics, group = %config.group_id, "consuming from kafka");
    let poller = Poller {
        consumer,
        commit_every: Duration::from_millis(config.commit_interval_ms.get()),
        runtime: tokio::runtime::Handle::current(),
        paused: false,
    };
    let name = Arc::clone(&ctx.name);
    tokio::task::spawn_blocking(move || poller.run(&ctx))
        .await
        .map_err(|error| SourceError::Client {
            what: "the kafka poll thread failed".to_owned(),
            error: Box::new(error),
        })?
        .map_err(client_error(
            "the kafka consumer failed for good (fenced by another member with the same \
             group.instance.id?); the source stops"
                .to_owned(),
        ))?;
    tracing::info!(source = %name, "source stopped");
    Ok(())
}

/// The poll thread's state.
struct Poller {
    consumer: BaseConsumer<KafkaContext>,
    commit_every: Duration,
    runtime: tokio::runtime::Handle,
    /// Whether the assigned partitions are paused (no permit was free).
    paused: bool,
}

impl Poller {
    fn context(&self) -> &KafkaContext {
        self.consumer.context()
    }

    fn offsets(&self) -> &Offsets {
        &self.context().offsets
    }

    /// Polls until shutdown; `Err` when the consumer failed for good (a fatal client error,
    /// e.g. fenced by another member with its `group.instance.id`): what was delivered is
    /// finished and committed as far as the broker still takes it, and the source stops.
    fn run(mut self, ctx: &SourceContext) -> Result<(), KafkaError> {
        let mut permits: Option<Permits> = None;
        let mut last_commit = Instant::now();
        let mut fatal = None;
        while !ctx.shutdown.is_cancelled() {
            if last_commit.elapsed() >= self.commit_every {
                self.commit(CommitMode::Async);
                last_commit = Instant::now();
            }
            if permits.as_ref().is_none_or(Permits::is_empty) {
                // What is decoded holds permits: it goes before waiting for more.
                self.context().flush();
                permits = self.reserve(ctx);
            }
            let Some(free) = permits.as_mut().filter(|p| !p.is_empty()) else {
                // Nothing may go in flight: keep serving the group, hold what comes.
                self.pause();
                if let Err(error) = self.poll_into_held(ctx, POLL) {
                    fatal = Some(error);
                    break;
                }
                continue;
            };
            self.resume();
            // What was held first, in order.
            let held = self.context().held().pop_front();
            if let Some(message) = held {
                if let Some(permit) = free.take() {
                    self.deliver(ctx, Incoming::from(&message), permit);
                }
                continue;
            }
            // While a burst is gathered, only what librdkafka already has is taken.
            let gathering = !self.context().burst().is_empty();
            let wait = if gathering { Duration::ZERO } else { POLL };
            match self.poll(ctx, wait) {
                Ok(Some(message)) => {
                    if let Some(permit) = free.take() {
                        self.deliver(ctx, Incoming::from(&message), permit);
                    }
                }
                Ok(None) if gathering => self.context().flush(),
                Err(error) => {
                    fatal = Some(error);
                    break;
                }
                Ok(None) => {
                    // Quiet: the permits go back to the shared budget, which other sources
                    // may be waiting on, and are reserved again when messages come.
                    permits = None;
                }
            }
        }
        self.context().flush();
        self.stop(ctx);
        fatal.map_or(Ok(()), Err)
    }

    /// Reserves permits without blocking the group for long: `None` when none came within a
    /// poll interval (or at shutdown).
    fn reserve(&self, ctx: &SourceContext) -> Option<Permits> {
        self.runtime
            .block_on(async { tokio::time::timeout(POLL, ctx.reserve(READ_AHEAD)).await })
            .ok()
            .flatten()
    }

    /// One poll; a message, or `None` (nothing came, or an error was logged); `Err` only when
    /// the consumer failed for good.
    fn poll(
        &self,
        ctx: &SourceContext,
        timeout: Duration,
    ) -> Result<Option<BorrowedMessage<'_>>, KafkaError> {
        let Some(polled) = self.consumer.poll(timeout) else {
            return Ok(None);
        };
        Ok(match polled {
            Ok(message) => {
                ctx.set_up(true);
                Some(message)
            }
            Err(KafkaError::PartitionEOF(_)) => None,
            Err(error @ KafkaError::MessageConsumptionFatal(_)) => {
                ctx.set_up(false);
                return Err(error);
            }
            // The error callback has logged the outage; librdkafka reconnects by itself.
            Err(error @ KafkaError::MessageConsumption(_)) => {
                tracing::debug!(source = %ctx.name, error = %error, "kafka poll failed; librdkafka retries");
                None
            }
            Err(error) => {
                tracing::warn!(source = %ctx.name, error = %error, "kafka poll failed; librdkafka retries");
                None
            }
        })
    }

    fn poll_into_held(&self, ctx: &SourceContext, timeout: Duration) -> Result<(), KafkaError> {
        if let Some(message) = self.poll(ctx, timeout)? {
            let owned = Fetched::owned(&message);
            let mut held = self.context().held();
            held.push_back(owned);
            tracing::debug!(source = %ctx.name, held = held.len(), "no in-flight permit free: message held");
        }
        Ok(())
    }

    fn deliver(
        &self,
        ctx: &SourceContext,
        message: Incoming<'_>,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) {
        let Incoming {
            topic,
            partition,
            offset,
            value,
        } = message;
        // Recorded before delivery: the pipeline may settle it at once.
        if !self.offsets().delivered(topic, partition, offset) {
            return;
        }
        let payload = match value {
            Some(value) => ctx.decode_json(value),
            None => Payload::Malformed {
                raw: RawPayload::Body(Vec::new()),
                reason: DecodeError::NoBody {
                    source_kind: "kafka",
                },
            },
        };
        let id = message_id(topic, partition, offset);
        let full = {
            let mut burst = self.context().burst();
            burst.push((permit, payload, id));
            burst.len() >= BURST
        };
        if full {
            self.context().flush();
        }
    }

    /// Pauses every assigned partition; again on each call while starved, since a rebalance
    /// may have assigned new ones meanwhile.
    fn pause(&mut self) {
        if let Ok(assignment) = self.consumer.assignment()
            && self.consumer.pause(&assignment).is_ok()
        {
            if !self.paused {
                tracing::debug!(source = %self.context().ctx.name, "no in-flight permit free: partitions paused");
            }
            self.paused = true;
        }
    }

    fn resume(&mut self) {
        if !self.paused || !self.context().held().is_empty() {
            return;
        }
        if let Ok(assignment) = self.consumer.assignment() {
            let _ = self.consumer.resume(&assignment);
        }
        self.paused = false;
    }

    /// Commits what is applied and not yet committed.
    fn commit(&self, mode: CommitMode) {
        let ready = self.offsets().to_commit();
        if ready.is_empty() {
            return;
        }
        let list = offset_list(&ready);
        match self.consumer.commit(&list, mode) {
            Ok(()) if matches!(mode, CommitMode::Sync) => {
                for (tp, offset) in &ready {
                    self.offsets().committed(tp, *offset);
                }
            }
            Ok(()) => {}
            Err(error) => {
                tracing::warn!(source = %self.context().ctx.name, error = %error, "kafka commit failed; retrying at the next interval");
            }
        }
    }

    /// At shutdown: nothing more is delivered; waits until what was delivered is settled
    /// (serving the group meanwhile), commits, and leaves the group.
    fn stop(mut self, ctx: &SourceContext) {
        self.pause();
        self.context().held().clear();
        let mut last_commit = Instant::now();
        while self.offsets().in_flight(None) > 0 {
            // Messages that still come are not delivered: they stay after the commit. A
            // consumer failed for good answers at once: wait as a poll would.
            if self.poll(ctx, POLL).is_err() {
                std::thread::sleep(POLL);
            }
            if last_commit.elapsed() >= self.commit_every {
                self.commit(CommitMode::Async);
                last_commit = Instant::now();
            }
        }
        // Nothing is in flight: no poll will clear the graveyard again.
        self.context().graveyard.close();
        self.commit(CommitMode::Sync);
        tracing::info!(source = %ctx.name, "kafka offsets committed; leaving the group");
        self.consumer.unsubscribe();
        // Dropping the consumer closes it: a last revoke, nothing left to commit.
    }
}
