//! Sources: where change messages come from, and how each one is acknowledged.
//!
//! Each kind of source is a folder behind one trait: its config type (`config.rs`, parsed from
//! a `[[source]]` table) builds a [`Source`], which runs with a [`SourceContext`]. The context
//! owns what every source needs (dispatch into the pipeline, in-flight permits, the one
//! decode, backoff, metrics, shutdown), so a source's folder holds only what talks to its
//! queue. Every delivery carries an [`AckToken`](crate::delivery::AckToken); the pipeline
//! settles it once the cache confirmed the message's writes (or its dead letter), and the
//! source then acknowledges to its queue. A token dropped unsettled means "redeliver".
//!
//! Sources never write to the cache and never name the pipeline: they see it as a
//! [`Dispatch`](crate::delivery::Dispatch) handle. Only sources talk to queues.
//!
//! Adding a kind: a folder here with `config.rs` and `mod.rs`, one line in [`registry!`]'s
//! call below, and its section in `docs/sources.md` and `config/example.toml`.
//!
//! - [`redis_stream`]: Sequin's Redis Stream sink, through a consumer group.
//! - [`sqs`]: Sequin's SQS sink (FIFO or standard queues); deletes after apply.
//! - [`kafka`]: Sequin's Kafka sink, through a consumer group; commits only what is applied.
//! - [`webhook`]: Sequin's webhook sink (HTTP push); replies 200 after apply.
//! - [`nats`]: Sequin's NATS sink, through a JetStream stream and a durable pull consumer;
//!   acknowledges after apply.
//! - [`rabbitmq`]: Sequin's RabbitMQ sink, through a durable queue; acknowledges after apply.
//! - [`postgres`]: logical replication straight from Postgres (`pgoutput`), as Sequin's messages.
//! - [`jsonl`]: a file (or stdin) of change messages, one JSON object per line (`keepwarm replay`).
//! - [`dead_letters`]: the dead-letter stream, listed and replayed.

mod context;
pub mod dead_letters;
pub mod jsonl;
mod tally;

pub use context::{Permits, Sampler, SourceContext};
pub(crate) use context::{decode_json, decode_stream_entry};
pub use tally::{Counts, Tally};

use std::future::Future;
use std::pin::Pin;

/// A boxed future, so that sources can sit behind `dyn`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A source ready to run: whatever had to fail at start-up (a port in use) has been done.
pub trait Source: Send + 'static {
    /// Reads until `ctx.shutdown`, then waits until what it delivered is settled and
    /// acknowledged, and returns.
    fn run(self: Box<Self>, ctx: SourceContext) -> BoxFuture<'static, Result<(), SourceError>>;

    /// Whether the source counts as up before it first reaches its queue (a bound listener).
    fn up_at_start(&self) -> bool {
        false
    }
}

/// What the daemon knows that a source's configuration may need when it is built.
pub struct SourceEnv {
    /// A client for the cache Redis (not connected), for sources that default to it; `None`
    /// without `[redis]` (validation made sure no source then needs it).
    pub cache_redis: Option<redis::Client>,
    /// `pipeline.max_in_flight`, for brokers told how much to hand out unacknowledged
    /// (JetStream's `max_ack_pending`, AMQP's prefetch).
    pub max_in_flight: usize,
}

/// Settings of the daemon that a source's configuration is checked against.
pub struct SourceLimits {
    /// `pipeline.max_in_flight`: no source may need more permits at once.
    pub max_in_flight: usize,
    /// Whether there is a cache Redis (`[redis]`) for sources that default to it.
    pub cache_redis: bool,
}

/// What [`SourceConfigure::build`] returns: the running source, built (for some kinds,
/// asynchronously: SQS reads the AWS configuration).
pub type Built = BoxFuture<'static, Result<Box<dyn Source>, SourceError>>;

/// A `[[source]]` table of one kind.
pub trait SourceConfigure: Send + Sync + std::fmt::Debug {
    /// A short name for logs, metrics and dead letters, e.g. `redis-stream:orders`.
    fn name(&self) -> String;

    /// Checks that need more than the types: rules between keys, the daemon's limits.
    ///
    /// # Errors
    ///
    /// The table is inconsistent.
    fn validate(&self, limits: &SourceLimits) -> Result<(), SourceConfigError>;

    /// Builds the running source.
    fn build(self: Box<Self>, env: SourceEnv) -> Built;
}

/// A `[[source]]` table that is well-formed but not usable.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct SourceConfigError {
    /// The key at fault (or keys, `a/b`).
    pub key: &'static str,
    /// What is wrong and what would be right.
    pub reason: String,
}

impl SourceConfigError {
    /// `key` is wrong because of `reason`.
    pub fn new(key: &'static str, reason: impl Into<String>) -> SourceConfigError {
        SourceConfigError {
            key,
            reason: reason.into(),
        }
    }
}

/// Why a source could not start or stopped early. Failures of its queue while running are
/// retried with backoff and logged, not returned.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Its configuration cannot be used (an unset environment variable).
    #[error(transparent)]
    Config(#[from] SourceConfigError),
    /// A listener could not be bound.
    #[error("cannot listen on {address}")]
    Listen {
        /// The address.
        address: std::net::SocketAddr,
        /// Why.
        #[source]
        error: std::io::Error,
    },
    /// Input could not be read.
    #[error("cannot read {what}")]
    Read {
        /// The file, stream or socket.
        what: String,
        /// Why.
        #[source]
        error: std::io::Error,
    },
    /// Output could not be written.
    #[error("cannot write {what}")]
    Write {
        /// The file.
        what: String,
        /// Why.
        #[source]
        error: std::io::Error,
    },
    /// A Redis command failed for good.
    #[error("redis: cannot {what}")]
    Redis {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        error: redis::RedisError,
    },
    /// The queue's client failed for good.
    #[error("{what}")]
    Client {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        error: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Declares each kind's module and its variant of [`SourceConfig`], tagged by `kind`.
macro_rules! registry {
    ($($module:ident: $kind:literal => $variant:ident($config:ty)),* $(,)?) => {
        $(pub mod $module;)*

        /// One `[[source]]` table; its `kind` picks the source.
        #[derive(Clone, Debug)]
        pub enum SourceConfig {
            $(
                #[doc = concat!("`kind = \"", $kind, "\"`")]
                $variant($config),
            )*
        }

        /// Every `kind` there is.
        pub const SOURCE_KINDS: &[&str] = &[$($kind),*];

        impl<'de> serde::Deserialize<'de> for SourceConfig {
            /// Reads the table, then its kind's type from the rest of it: unlike serde's
            /// tagged enums, an error then names the key at fault.
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                use serde::de::Error as _;
                let mut table = toml::Table::deserialize(deserializer)?;
                let kind = match table.remove("kind") {
                    Some(toml::Value::String(kind)) => kind,
                    Some(_) => return Err(D::Error::custom("`kind` must be a string")),
                    None => return Err(D::Error::missing_field("kind")),
                };
                let rest = toml::Value::Table(table);
                let config = match kind.as_str() {
                    $($kind => rest.try_into().map(SourceConfig::$variant),)*
                    other => {
                        return Err(D::Error::custom(format!(
                            "unknown source kind {other:?}; the kinds are {}",
                            SOURCE_KINDS.join(", ")
                        )));
                    }
                };
                config.map_err(|error| D::Error::custom(format!("{kind} source: {error}")))
            }
        }

        impl SourceConfig {
            /// The table, as its kind's configuration.
            pub fn kind(&self) -> &dyn SourceConfigure {
                match self {
                    $(SourceConfig::$variant(config) => config,)*
                }
            }

            /// Builds the running source.
            ///
            /// # Errors
            ///
            /// What must fail at start-up failed (a port in use, an unset variable).
            pub async fn build(self, env: SourceEnv) -> Result<Box<dyn Source>, SourceError> {
                match self {
                    $(SourceConfig::$variant(config) => Box::new(config).build(env).await,)*
                }
            }
        }
    };
}

registry! {
    redis_stream: "redis-stream" => RedisStream(redis_stream::RedisStreamSourceConfig),
    sqs: "sqs" => Sqs(sqs::SqsSourceConfig),
    kafka: "kafka" => Kafka(kafka::KafkaSourceConfig),
    webhook: "http" => Http(webhook::HttpSourceConfig),
    nats: "nats" => Nats(nats::NatsSourceConfig),
    rabbitmq: "rabbitmq" => RabbitMq(rabbitmq::RabbitMqSourceConfig),
    postgres: "postgres" => Postgres(postgres::PostgresSourceConfig),
}

impl SourceConfig {
    /// A short name for logs and dead letters.
    pub fn name(&self) -> String {
        self.kind().name()
    }
}
