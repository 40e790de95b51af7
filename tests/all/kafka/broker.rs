//! The suite's Kafka-protocol broker (Tansu, started by `scripts/test.sh`): a topic of a test's
//! own, fed as Sequin's Kafka sink feeds one, and the group's committed offsets.

use crate::util::*;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer as _, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use std::sync::Arc;
use std::time::Duration;

/// The broker's address, from `scripts/test.sh`.
pub fn brokers() -> String {
    std::env::var("KAFKA_BROKERS").expect(
        "KAFKA_BROKERS is not set: run the suite with scripts/test.sh, which starts a Kafka broker",
    )
}

/// A value as Sequin's Kafka sink writes it: the row's primary key as the key, the change
/// message as the value, in the partition the key maps to.
pub struct Record {
    pub key: String,
    pub value: Option<Vec<u8>>,
    pub partition: i32,
}

impl Record {
    /// The change `line` of row `row`, in partition `row % partitions`.
    pub fn change(row: u64, line: &str, partitions: i32) -> Record {
        Record {
            key: row.to_string(),
            value: Some(line.as_bytes().to_vec()),
            partition: (row % partitions as u64) as i32,
        }
    }

    /// A value that is not a change message, in `partition`.
    pub fn raw(value: Option<&[u8]>, partition: i32) -> Record {
        Record {
            key: String::new(),
            value: value.map(<[u8]>::to_vec),
            partition,
        }
    }
}

/// A topic of a test's own.
pub struct Topic {
    pub name: String,
    pub partitions: i32,
    /// The consumer group the test's daemons use.
    pub group: String,
    /// The broker holding it.
    pub brokers: String,
    /// Reads the group's committed offsets without joining it. Never closed: closing a consumer
    /// after an offset fetch has been seen to hang (TOOLCHAIN-NOTES.md); it holds nothing.
    probe: std::mem::ManuallyDrop<Arc<BaseConsumer>>,
}

impl Topic {
    /// Creates a topic named after `prefix` with `partitions` partitions on the suite's broker.
    pub async fn create(prefix: &str, partitions: i32) -> Topic {
        Topic::create_on(&brokers(), prefix, partitions).await
    }

    /// [`Topic::create`] on the broker at `brokers`.
    pub async fn create_on(brokers: &str, prefix: &str, partitions: i32) -> Topic {
        let name: String = unique(prefix)
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        create_topic(brokers, &name, partitions).await;
        let group = format!("{name}-group");
        let probe: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        Topic {
            group,
            name,
            partitions,
            probe: std::mem::ManuallyDrop::new(Arc::new(probe)),
            brokers: brokers.to_owned(),
        }
    }

    /// `env`'s config with one Kafka source on this topic and group, short timeouts, plus
    /// `source` lines.
    pub fn config(&self, env: &TestEnv, source: &str) -> ConfigBuilder {
        let lines = format!(
            "brokers = \"{}\"\ntopics = [\"{}\"]\ngroup_id = \"{}\"\nsession_timeout_ms = 6000\n\
             commit_interval_ms = 100\nrevoke_timeout_ms = 5000\n{source}",
            self.brokers, self.name, self.group
        );
        env.config().source("kafka", &lines)
    }

    /// Produces `records` in order (acks from every replica), and waits until all are written.
    pub async fn produce(&self, records: Vec<Record>) {
        let (topic, brokers) = (self.name.clone(), self.brokers.clone());
        tokio::task::spawn_blocking(move || {
            let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
                .set("bootstrap.servers", brokers)
                .set("acks", "all")
                .set("enable.idempotence", "false")
                .set("max.in.flight.requests.per.connection", "1")
                .create()
                .unwrap();
            for record in &records {
                let mut base = BaseRecord::to(&topic)
                    .key(&record.key)
                    .partition(record.partition);
                if let Some(value) = &record.value {
                    base = base.payload(value);
                }
                let mut base = base;
                loop {
                    match producer.send(base) {
                        Ok(()) => break,
                        Err((error, back)) => {
                            assert!(
                                matches!(
                                    error.rdkafka_error_code(),
                                    Some(rdkafka::types::RDKafkaErrorCode::QueueFull)
                                ),
                                "{error}"
                            );
                            base = back;
                            std::thread::sleep(Duration::from_millis(5));
                        }
                    }
                }
            }
            producer.flush(PATIENCE).unwrap();
        })
        .await
        .unwrap();
    }

    /// The group's committed offset per partition (-1 where none), read by a client that does
    /// not join the group.
    pub async fn committed(&self) -> Vec<i64> {
        let (topic, partitions) = (self.name.clone(), self.partitions);
        let consumer = Arc::clone(&self.probe);
        tokio::task::spawn_blocking(move || {
            let mut list = TopicPartitionList::new();
            for partition in 0..partitions {
                list.add_partition(&topic, partition);
            }
            let committed = consumer
                .committed_offsets(list, Duration::from_secs(10))
                .unwrap();
            let offsets = (0..partitions)
                .map(
                    |p| match committed.find_partition(&topic, p).map(|e| e.offset()) {
                        Some(Offset::Offset(offset)) => offset,
                        _ => -1,
                    },
                )
                .collect::<Vec<i64>>();
            drop(consumer);
            offsets
        })
        .await
        .unwrap()
    }

    /// Waits until the group has committed `expected` (per partition).
    pub async fn wait_committed(&self, expected: &[i64]) {
        let start = std::time::Instant::now();
        loop {
            let last = self.committed().await;
            if last == expected {
                return;
            }
            assert!(
                start.elapsed() < PATIENCE,
                "the group committed {last:?}, not {expected:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Creates the topic `name` with `partitions` partitions on `brokers`.
async fn create_topic(brokers: &str, name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    let results = admin
        .create_topics(&[topic], &AdminOptions::new())
        .await
        .unwrap();
    for result in results {
        result.unwrap();
    }
}

/// A broker of a test's own (for outages), on a port that stays the same across restarts. Its
/// storage is memory: a restart loses topics and offsets.
pub struct PrivateBroker {
    child: Option<std::process::Child>,
    /// What clients are sent to: the proxy in front of the broker.
    proxy: TcpProxy,
}

impl PrivateBroker {
    /// A broker of the test's own behind a [`TcpProxy`]: it advertises the proxy's address, so
    /// every client connection (bootstrap and partition leaders) goes through the proxy and
    /// [`PrivateBroker::cut`] makes an outage without losing the broker's topics (its storage is
    /// memory: a restarted broker would come back empty).
    pub async fn start() -> PrivateBroker {
        let port = free_port();
        let proxy = TcpProxy::start(&format!("127.0.0.1:{port}")).await;
        let tansu = std::env::var("KEEPWARM_TANSU").expect(
            "KEEPWARM_TANSU is not set: run the suite with scripts/test.sh, which installs the broker",
        );
        let child = std::process::Command::new(tansu)
            .args([
                "broker",
                "--listener-url",
                &format!("tcp://127.0.0.1:{port}"),
                "--advertised-listener-url",
                &format!("tcp://{}", proxy.address()),
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let start = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(start.elapsed() < PATIENCE, "tansu did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        PrivateBroker {
            child: Some(child),
            proxy,
        }
    }

    /// Where clients connect: the proxy.
    pub fn address(&self) -> String {
        self.proxy.address().to_string()
    }

    /// Drops every client connection and refuses new ones: the broker is unreachable.
    pub fn cut(&self) {
        self.proxy.cut();
    }

    /// Clients reach the broker again.
    pub fn resume(&self) {
        self.proxy.resume();
    }

    /// Kills the broker.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        self.stop();
    }
}
