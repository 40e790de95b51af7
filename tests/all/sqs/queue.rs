//! A FIFO queue of the moto emulator for one test, fed as Sequin's SQS sink feeds a queue.

use crate::util::*;
use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::{QueueAttributeName, SendMessageBatchRequestEntry};
use md5::{Digest as _, Md5};
use std::time::{Duration, Instant};

/// The emulator's URL, from `scripts/test.sh`.
pub fn sqs_endpoint() -> String {
    let endpoint = std::env::var("SQS_ENDPOINT").expect(
        "SQS_ENDPOINT is not set: run the suite with scripts/test.sh, which starts the SQS emulator",
    );
    assert!(
        std::env::var_os("AWS_ACCESS_KEY_ID").is_some(),
        "AWS_ACCESS_KEY_ID is not set: scripts/test.sh exports dummy credentials for the emulator"
    );
    endpoint
}

/// A client of the emulator with dummy credentials of its own.
pub fn client() -> Client {
    let credentials = aws_sdk_sqs::config::Credentials::new("test", "test", None, None, "tests");
    let config = aws_sdk_sqs::Config::builder()
        .behavior_version(aws_sdk_sqs::config::BehaviorVersion::latest())
        .region(aws_sdk_sqs::config::Region::new("us-east-1"))
        .endpoint_url(sqs_endpoint())
        .credentials_provider(credentials)
        .build();
    Client::from_conf(config)
}

fn md5_hex(text: &str) -> String {
    hex::encode(Md5::digest(text.as_bytes()))
}

/// A FIFO queue of a test's own.
pub struct Queue {
    client: Client,
    url: String,
}

impl Queue {
    /// Creates a queue named after `prefix`.
    pub async fn fifo(prefix: &str) -> Queue {
        // Queue names: at most 80 characters of [A-Za-z0-9_-], plus `.fifo`.
        let name: String = unique(prefix)
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(70)
            .collect();
        let client = client();
        let url = client
            .create_queue()
            .queue_name(format!("{name}.fifo"))
            .attributes(QueueAttributeName::FifoQueue, "true")
            .send()
            .await
            .unwrap()
            .queue_url
            .unwrap();
        Queue { client, url }
    }

    /// The name the daemon gives the source of this queue.
    pub fn source_name(&self) -> String {
        format!("sqs:{}", self.url.rsplit('/').next().unwrap())
    }

    /// `env`'s config with one SQS source on this queue, plus `source` lines.
    pub fn config(&self, env: &TestEnv, source: &str) -> ConfigBuilder {
        let lines = format!(
            "queue_url = \"{}\"\nregion = \"us-east-1\"\nendpoint_url = \"{}\"\nwait_time_seconds = 1\n{source}",
            self.url,
            sqs_endpoint()
        );
        env.config().source("sqs", &lines)
    }

    /// Sends bodies as Sequin's SQS sink does: `SendMessageBatch` of up to 10, the group id the
    /// MD5 hex of the row's primary keys joined with `:`, the deduplication id the MD5 hex of
    /// the idempotency key. A body that is not a change message gets a group and an id of its
    /// own.
    pub async fn send_sequin(&self, bodies: &[String]) {
        for chunk in bodies.chunks(10) {
            let entries = chunk
                .iter()
                .enumerate()
                .map(|(i, body)| {
                    let (group, dedup) = match serde_json::from_str::<serde_json::Value>(body) {
                        Ok(value) if value["metadata"]["record_pks"].is_array() => {
                            let pks: Vec<&str> = value["metadata"]["record_pks"]
                                .as_array()
                                .unwrap()
                                .iter()
                                .map(|pk| pk.as_str().unwrap())
                                .collect();
                            let key = value["metadata"]["idempotency_key"].as_str().unwrap();
                            (md5_hex(&pks.join(":")), md5_hex(key))
                        }
                        _ => (md5_hex(body), md5_hex(&unique("dedup"))),
                    };
                    SendMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .message_body(body)
                        .message_group_id(group)
                        .message_deduplication_id(dedup)
                        .build()
                        .unwrap()
                })
                .collect();
            let sent = self
                .client
                .send_message_batch()
                .queue_url(&self.url)
                .set_entries(Some(entries))
                .send()
                .await
                .unwrap();
            assert!(sent.failed.is_empty(), "{:?}", sent.failed);
        }
    }

    /// `(visible, in flight)` message counts.
    pub async fn counts(&self) -> (u64, u64) {
        let attributes = self
            .client
            .get_queue_attributes()
            .queue_url(&self.url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .send()
            .await
            .unwrap()
            .attributes
            .unwrap_or_default();
        let count = |name: QueueAttributeName| {
            attributes
                .get(&name)
                .map_or(0, |n| n.parse::<u64>().unwrap())
        };
        (
            count(QueueAttributeName::ApproximateNumberOfMessages),
            count(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
        )
    }

    /// Waits until the counts are `counts`. Checks every 100 ms: the emulator serves one
    /// request at a time, and polling it harder would slow down the daemon under test.
    pub async fn wait_counts(&self, counts: (u64, u64), what: &str, limit: Duration) {
        let start = Instant::now();
        while self.counts().await != counts {
            assert!(start.elapsed() < limit, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the queue holds nothing, visible or in flight: everything was deleted.
    pub async fn wait_empty(&self) {
        self.wait_counts((0, 0), "the queue to be empty", PATIENCE)
            .await;
    }
}
