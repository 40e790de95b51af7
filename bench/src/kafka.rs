//! The Kafka scenarios: the workload written to a topic as Sequin's Kafka sink writes it (the
//! change message as JSON, the row's key, three partitions), the group's progress, and
//! BASELINE (c): a native rdkafka consumer with row-cache's transform compiled in.
//!
//! The baseline reads with one `BaseConsumer` (automatic commit off, keepwarm's fetch tuning),
//! turns each batch of up to 500 messages into one Redis pipeline of `SET`/`DEL`, and commits
//! the batch's offsets once Redis confirmed the writes; polling the next batch overlaps
//! applying the current one. No plugin sandbox, no lanes, no dead letters: the physical limit
//! of the design.

use crate::native::{Op, transform};
use crate::workload::Workload;
use anyhow::Context as _;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _};
use rdkafka::message::Message as _;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer as _, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::time::Duration;

/// Partitions of every benchmark topic.
pub(crate) const PARTITIONS: i32 = 3;

/// Entry `i` of the workload as Sequin's Kafka sink writes it: `(key, value, partition)`.
fn record(w: &Workload, i: u64) -> (String, String, i32) {
    let entry = w.entry(i);
    let value = entry.to_json();
    #[allow(
        clippy::cast_possible_truncation,
        reason = "the remainder is below PARTITIONS"
    )]
    let partition = (entry.id % PARTITIONS as u64) as i32;
    (entry.id.to_string(), value, partition)
}

/// Creates `topic` and writes entries `0..n` to it.
pub(crate) async fn preload(
    brokers: &str,
    topic: &str,
    w: &Workload,
    n: u64,
) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let new = NewTopic::new(topic, PARTITIONS, TopicReplication::Fixed(1));
    for result in admin.create_topics(&[new], &AdminOptions::new()).await? {
        result.map_err(|(topic, code)| anyhow::anyhow!("cannot create {topic}: {code}"))?;
    }
    let records: Vec<(String, String, i32)> = (0..n).map(|i| record(w, i)).collect();
    let (brokers, topic) = (brokers.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("linger.ms", "5")
            .create()?;
        for (key, value, partition) in &records {
            let mut base = BaseRecord::to(&topic)
                .key(key)
                .payload(value)
                .partition(*partition);
            loop {
                match producer.send(base) {
                    Ok(()) => break,
                    Err((_, back)) => {
                        // Queue full: let it drain.
                        base = back;
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
            }
        }
        producer.flush(Duration::from_secs(120))?;
        Ok(())
    })
    .await??;
    Ok(())
}

/// Reads a group's committed offsets without joining it.
pub(crate) struct Progress {
    consumer: BaseConsumer,
    topic: String,
}

impl Progress {
    pub(crate) fn new(brokers: &str, topic: &str, group: &str) -> anyhow::Result<Progress> {
        let consumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()?;
        Ok(Progress {
            consumer,
            topic: topic.to_owned(),
        })
    }

    /// Messages committed by the group, over all partitions (blocking).
    pub(crate) fn committed(&self) -> anyhow::Result<i64> {
        let mut list = TopicPartitionList::new();
        for partition in 0..PARTITIONS {
            list.add_partition(&self.topic, partition);
        }
        let committed = self
            .consumer
            .committed_offsets(list, Duration::from_secs(10))?;
        Ok(committed
            .elements()
            .iter()
            .map(|e| match e.offset() {
                Offset::Offset(offset) => offset,
                _ => 0,
            })
            .sum())
    }

    /// Leaves the consumer unclosed: closing one after an offset fetch has been seen to hang.
    pub(crate) fn forget(self) {
        std::mem::forget(self);
    }
}

/// The value's parts row-cache's transform reads.
#[derive(Deserialize)]
struct Value<'a> {
    #[serde(borrow)]
    record: &'a RawValue,
    #[serde(borrow)]
    action: &'a str,
    #[serde(borrow)]
    metadata: &'a RawValue,
}

fn transform_value(value: &[u8]) -> Option<Op> {
    let value: Value<'_> = serde_json::from_slice(value).ok()?;
    transform(vec![
        (b"record".to_vec(), value.record.get().as_bytes().to_vec()),
        (b"action".to_vec(), value.action.as_bytes().to_vec()),
        (
            b"metadata".to_vec(),
            value.metadata.get().as_bytes().to_vec(),
        ),
    ])
}

/// One batch: its writes and, per partition, the offset to commit once they are applied.
struct Batch {
    ops: Vec<Op>,
    commit: HashMap<i32, i64>,
}

/// Runs the baseline until killed.
///
/// # Errors
///
/// Kafka or Redis fails.
pub(crate) async fn run(brokers: &str, topic: &str, group: &str, url: &str) -> anyhow::Result<()> {
    let client = redis::Client::open(url)?;
    let mut writer = client.get_multiplexed_async_connection().await?;
    let mut config = ClientConfig::new();
    // The fetch tuning keepwarm's Kafka source sets by default, so that the two read alike.
    for (key, value) in keepwarm::sources::kafka::config::TUNED {
        config.set(*key, *value);
    }
    let consumer: BaseConsumer = config
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .create()?;
    consumer.subscribe(&[topic])?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Batch>(4);
    let (applied_tx, applied_rx) = std::sync::mpsc::channel::<HashMap<i32, i64>>();
    let topic = topic.to_owned();
    let reader = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        loop {
            for applied in applied_rx.try_iter() {
                let mut list = TopicPartitionList::new();
                for (partition, offset) in applied {
                    list.add_partition_offset(&topic, partition, Offset::Offset(offset))?;
                }
                consumer.commit(&list, CommitMode::Async)?;
            }
            let mut batch = Batch {
                ops: Vec::with_capacity(500),
                commit: HashMap::new(),
            };
            let mut wait = Duration::from_millis(100);
            for _ in 0..500 {
                let Some(message) = consumer.poll(wait) else {
                    break;
                };
                let message = message.context("kafka poll")?;
                wait = Duration::ZERO;
                if let Some(op) = message.payload().and_then(transform_value) {
                    batch.ops.push(op);
                }
                batch
                    .commit
                    .insert(message.partition(), message.offset() + 1);
            }
            if !batch.commit.is_empty() && tx.blocking_send(batch).is_err() {
                return Ok(());
            }
        }
    });
    while let Some(batch) = rx.recv().await {
        let mut pipe = redis::pipe();
        for op in batch.ops {
            match op {
                Op::Set(key, value) => {
                    pipe.cmd("SET").arg(key).arg(value).ignore();
                }
                Op::Del(key) => {
                    pipe.cmd("DEL").arg(key).ignore();
                }
            }
        }
        let () = pipe.query_async(&mut writer).await?;
        if applied_tx.send(batch.commit).is_err() {
            break;
        }
    }
    reader.await??;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_sequin_messages_that_the_transform_reads() {
        let w = Workload { seed: 3, rows: 50 };
        for i in 0..50 {
            let (key, value, partition) = record(&w, i);
            let id: u64 = key.parse().unwrap();
            assert_eq!(i64::from(partition), (id % 3) as i64);
            let json: serde_json::Value = serde_json::from_str(&value).unwrap();
            assert_eq!(json["record"]["id"], id);
            let key = match transform_value(value.as_bytes()).unwrap() {
                Op::Set(key, _) | Op::Del(key) => key,
            };
            assert_eq!(key, format!("public.orders:{id}"));
        }
    }
}
