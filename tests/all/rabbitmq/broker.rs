//! A queue and a topic exchange of a test's own on the shared RabbitMQ, fed as Sequin's
//! RabbitMQ sink feeds them: `basic.publish` to the exchange with routing key
//! `sequin.<database>.<schema>.<table>.<action>`, `message_id` the idempotency key, a JSON
//! body, transient (no `delivery_mode`).

use crate::util::*;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

/// The shared broker's URL, from `scripts/test.sh`.
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").expect(
        "AMQP_URL is not set: run the suite with scripts/test.sh, which checks that RabbitMQ answers on 127.0.0.1:5672",
    )
}

/// One test's exchange and queue (the daemon declares the queue and binds it), and the
/// Sequin database name in its routing keys.
pub struct Broker {
    pub exchange: String,
    pub queue: String,
    pub database: String,
    _connection: Connection,
    channel: Channel,
}

impl Broker {
    /// Declares the exchange (topic, durable: the one Sequin's sink is configured with).
    pub async fn new(prefix: &str) -> Broker {
        let name = unique(prefix);
        let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        // Publisher confirms on the test's side only, so that a test knows the broker has
        // every message before it counts; Sequin publishes without them.
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let exchange = format!("{name}-x");
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
            .await
            .unwrap();
        Broker {
            exchange,
            queue: format!("{name}-q"),
            database: format!("db-{name}"),
            _connection: connection,
            channel,
        }
    }

    /// The name the daemon gives this source.
    pub fn source_name(&self) -> String {
        format!("rabbitmq:{}", self.queue)
    }

    /// `env`'s config with one RabbitMQ source at `url` (the broker, or a proxy) that
    /// declares the queue and binds it to the exchange for this test's database.
    pub fn config_at(&self, env: &TestEnv, url: &str, source: &str) -> ConfigBuilder {
        let lines = format!(
            "url = \"{url}\"\nqueue = \"{}\"\nexchange = \"{}\"\nbinding_keys = [\"sequin.{}.#\"]\n{source}",
            self.queue, self.exchange, self.database
        );
        env.config().source("rabbitmq", &lines)
    }

    /// [`Broker::config_at`] on the broker itself.
    pub fn config(&self, env: &TestEnv, source: &str) -> ConfigBuilder {
        self.config_at(env, &amqp_url(), source)
    }

    /// Declares and binds the queue as the daemon would, so that messages published before
    /// it starts are kept.
    pub async fn declare_queue(&self) {
        let options = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        self.channel
            .queue_declare(self.queue.as_str().into(), options, FieldTable::default())
            .await
            .unwrap();
        self.channel
            .queue_bind(
                self.queue.as_str().into(),
                self.exchange.as_str().into(),
                format!("sequin.{}.#", self.database).into(),
                Default::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
    }

    /// Publishes bodies as Sequin's RabbitMQ sink does. A body that is not a change message
    /// goes with routing key `sequin.<database>.public.orders.insert` and an id of its own.
    pub async fn publish_sequin(&self, bodies: &[String]) {
        let mut confirms = Vec::new();
        for body in bodies {
            let (key, id) = match serde_json::from_str::<serde_json::Value>(body) {
                Ok(value) if value["metadata"]["idempotency_key"].is_string() => {
                    let metadata = &value["metadata"];
                    let key = format!(
                        "sequin.{}.{}.{}.{}",
                        self.database,
                        metadata["table_schema"].as_str().unwrap(),
                        metadata["table_name"].as_str().unwrap(),
                        value["action"].as_str().unwrap()
                    );
                    (
                        key,
                        metadata["idempotency_key"].as_str().unwrap().to_owned(),
                    )
                }
                _ => (
                    format!("sequin.{}.public.orders.insert", self.database),
                    unique("id"),
                ),
            };
            let properties = BasicProperties::default()
                .with_message_id(id.into())
                .with_content_type("application/json".into());
            let confirm = self
                .channel
                .basic_publish(
                    self.exchange.as_str().into(),
                    key.into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    properties,
                )
                .await
                .unwrap();
            confirms.push(confirm);
        }
        for confirm in confirms {
            confirm.await.unwrap();
        }
    }

    /// Messages ready in the queue (not counting those delivered and unacknowledged).
    pub async fn ready(&self) -> u32 {
        let options = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        self.channel
            .queue_declare(self.queue.as_str().into(), options, FieldTable::default())
            .await
            .unwrap()
            .message_count()
    }

    /// Deletes the queue and the exchange.
    pub async fn delete(self) {
        self.channel
            .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .unwrap();
        self.channel
            .exchange_delete(
                self.exchange.as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await
            .unwrap();
    }
}
