//! A JetStream stream of a test's own on the shared NATS server, fed as Sequin's NATS sink
//! feeds it: core publishes on `sequin.<database>.<schema>.<table>.<action>` with a
//! `Nats-Msg-Id` header.

use crate::util::*;
use async_nats::jetstream::{self, stream};
use std::time::Duration;

/// The shared server's URL, from `scripts/test.sh`.
pub fn nats_url() -> String {
    std::env::var("NATS_URL").expect(
        "NATS_URL is not set: run the suite with scripts/test.sh, which checks that NATS (with JetStream) answers on 127.0.0.1:4222",
    )
}

/// One test's stream (`<name>`), its Sequin database name (the subjects are
/// `sequin.<database>.>`) and a client.
pub struct Stream {
    pub name: String,
    pub database: String,
    pub client: async_nats::Client,
    js: jetstream::Context,
}

/// The durable consumer the tests give the daemon.
pub const CONSUMER: &str = "kw";

impl Stream {
    /// Names for a test called `prefix`; nothing is created yet.
    pub async fn named(prefix: &str) -> Stream {
        let name = unique(prefix);
        let client = async_nats::connect(nats_url()).await.unwrap();
        Stream {
            database: format!("db-{name}"),
            js: jetstream::new(client.clone()),
            client,
            name,
        }
    }

    /// Creates the stream (capturing `sequin.<database>.>`, a two-minute duplicate window).
    pub async fn create(prefix: &str) -> Stream {
        let stream = Stream::named(prefix).await;
        stream.create_stream().await;
        stream
    }

    /// Creates the stream of a [`Stream::named`].
    pub async fn create_stream(&self) {
        self.js
            .create_stream(stream::Config {
                name: self.name.clone(),
                subjects: vec![self.subjects()],
                duplicate_window: Duration::from_secs(120),
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .unwrap();
    }

    /// The subjects Sequin publishes this test's database to.
    pub fn subjects(&self) -> String {
        format!("sequin.{}.>", self.database)
    }

    /// The name the daemon gives this source.
    pub fn source_name(&self) -> String {
        format!("nats:{}", self.name)
    }

    /// `env`'s config with one NATS source on this stream at `url` (the server, or a proxy),
    /// plus `source` lines. The consumer's `ack_wait` is short, so that a killed daemon's
    /// messages come back soon.
    pub fn config_at(&self, env: &TestEnv, url: &str, source: &str) -> ConfigBuilder {
        let lines = format!(
            "url = \"{url}\"\nstream = \"{}\"\nconsumer = \"{CONSUMER}\"\nsubjects = [\"{}\"]\nack_wait_seconds = 3\npull_wait_ms = 500\n{source}",
            self.name,
            self.subjects()
        );
        env.config().source("nats", &lines)
    }

    /// [`Stream::config_at`] on the server itself.
    pub fn config(&self, env: &TestEnv, source: &str) -> ConfigBuilder {
        self.config_at(env, &nats_url(), source)
    }

    /// Waits until the stream exists (created by the daemon).
    pub async fn wait_exists(&self) {
        wait_for("the stream", PATIENCE, || async {
            self.js.get_stream(&self.name).await.is_ok()
        })
        .await;
    }

    /// Publishes bodies as Sequin's NATS sink does. A body that is not a change message goes
    /// to `sequin.<database>.public.orders.insert` with a message id of its own.
    pub async fn publish_sequin(&self, bodies: &[String]) {
        for body in bodies {
            let (subject, id) = match serde_json::from_str::<serde_json::Value>(body) {
                Ok(value) if value["metadata"]["idempotency_key"].is_string() => {
                    let metadata = &value["metadata"];
                    let subject = format!(
                        "sequin.{}.{}.{}.{}",
                        self.database,
                        metadata["table_schema"].as_str().unwrap(),
                        metadata["table_name"].as_str().unwrap(),
                        value["action"].as_str().unwrap()
                    );
                    (
                        subject,
                        metadata["idempotency_key"].as_str().unwrap().to_owned(),
                    )
                }
                _ => (
                    format!("sequin.{}.public.orders.insert", self.database),
                    unique("id"),
                ),
            };
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", id.as_str());
            self.client
                .publish_with_headers(subject, headers, body.clone().into())
                .await
                .unwrap();
        }
        self.client.flush().await.unwrap();
    }

    /// Messages in the stream.
    pub async fn messages(&self) -> u64 {
        let mut stream = self.js.get_stream(&self.name).await.unwrap();
        stream.info().await.unwrap().state.messages
    }

    /// The daemon's consumer: `(acknowledged floor, in flight, redelivered)`; `None` before it
    /// exists.
    pub async fn consumer(&self) -> Option<(u64, usize, usize)> {
        let stream = self.js.get_stream(&self.name).await.ok()?;
        let info = stream.consumer_info(CONSUMER).await.ok()?;
        Some((
            info.ack_floor.stream_sequence,
            info.num_ack_pending,
            info.num_redelivered,
        ))
    }

    /// Waits until the consumer has acknowledged the stream's first `n` messages.
    pub async fn wait_acked(&self, n: u64) {
        let what = format!("{n} messages acknowledged");
        wait_for(&what, PATIENCE, || async {
            matches!(self.consumer().await, Some((floor, 0, _)) if floor >= n)
        })
        .await;
    }

    /// Deletes the stream (and its consumer).
    pub async fn delete(self) {
        self.js.delete_stream(&self.name).await.unwrap();
    }
}
