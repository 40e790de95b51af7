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
//! Adding a kind: a folder here with `config.rs` and `mod.rs`, its `mod` line and one line in
//! [`registry!`]'s call below, and its section in `docs/sources.md` and
//! `config/example.toml`.
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
    /// Whether that cache Redis is a Redis Cluster, which a source cannot default to.
    pub cache_cluster: bool,
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

/// A kind of source this keepwarm knows, whether or not this build has it.
#[derive(Clone, Copy, Debug)]
pub struct SourceKind {
    /// Its `kind` key.
    pub kind: &'static str,
    /// The cargo feature that builds it (`None`: always built).
    pub feature: Option<&'static str>,
    /// Whether this build has it.
    pub built: bool,
}

/// Declares each kind's variant of [`SourceConfig`], tagged by `kind`. A kind
/// with `in "feature"` is built only with that cargo feature (its client is a large build);
/// without it, a `[[source]]` of that kind is refused with the feature it needs.
macro_rules! registry {
    (@feature) => { None };
    (@feature $feature:literal) => { Some($feature) };
    (@built) => { true };
    (@built $feature:literal) => { cfg!(feature = $feature) };
    ($($kind:literal => $variant:ident($config:ty) $(in $feature:literal)?),* $(,)?) => {
        /// One `[[source]]` table; its `kind` picks the source.
        #[derive(Clone, Debug)]
        pub enum SourceConfig {
            $(
                #[doc = concat!("`kind = \"", $kind, "\"`")]
                $(#[cfg(feature = $feature)])?
                $variant($config),
            )*
        }

        /// Every kind there is, built or not.
        pub const SOURCE_KINDS: &[SourceKind] = &[$(
            SourceKind {
                kind: $kind,
                feature: registry!(@feature $($feature)?),
                built: registry!(@built $($feature)?),
            },
        )*];

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
                    $(
                        $(#[cfg(feature = $feature)])?
                        $kind => rest.try_into().map(SourceConfig::$variant),
                    )*
                    other => return Err(D::Error::custom(not_built(other))),
                };
                config.map_err(|error| D::Error::custom(format!("{kind} source: {error}")))
            }
        }

        impl SourceConfig {
            /// The table, as its kind's configuration.
            pub fn kind(&self) -> &dyn SourceConfigure {
                match self {
                    $(
                        $(#[cfg(feature = $feature)])?
                        SourceConfig::$variant(config) => config,
                    )*
                }
            }

            /// Builds the running source.
            ///
            /// # Errors
            ///
            /// What must fail at start-up failed (a port in use, an unset variable).
            pub async fn build(self, env: SourceEnv) -> Result<Box<dyn Source>, SourceError> {
                match self {
                    $(
                        $(#[cfg(feature = $feature)])?
                        SourceConfig::$variant(config) => Box::new(config).build(env).await,
                    )*
                }
            }
        }
    };
}

// Declared here, not by the macro, so that rustfmt reaches them.
#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "rabbitmq")]
pub mod rabbitmq;
pub mod redis_stream;
#[cfg(feature = "sqs")]
pub mod sqs;
pub mod webhook;

registry! {
    "redis-stream" => RedisStream(redis_stream::RedisStreamSourceConfig),
    "sqs" => Sqs(sqs::SqsSourceConfig) in "sqs",
    "kafka" => Kafka(kafka::KafkaSourceConfig) in "kafka",
    "http" => Http(webhook::HttpSourceConfig),
    "nats" => Nats(nats::NatsSourceConfig) in "nats",
    "rabbitmq" => RabbitMq(rabbitmq::RabbitMqSourceConfig) in "rabbitmq",
    "postgres" => Postgres(postgres::PostgresSourceConfig) in "postgres",
}

/// Why a `kind` that this build cannot read is refused: a kind left out of the build names the
/// cargo feature that builds it; an unknown one lists the kinds this build has.
fn not_built(kind: &str) -> String {
    refusal(kind, SOURCE_KINDS)
}

fn refusal(kind: &str, kinds: &[SourceKind]) -> String {
    let built: Vec<&str> = kinds.iter().filter(|k| k.built).map(|k| k.kind).collect();
    let built = built.join(", ");
    match kinds
        .iter()
        .find(|k| k.kind == kind)
        .and_then(|k| k.feature)
    {
        Some(feature) => format!(
            "this keepwarm was built without the {kind} source: rebuild it with the cargo \
             feature `{feature}` (on by default), e.g. `cargo build --release -p keepwarm \
             --features {feature}`; the kinds this build has are {built}"
        ),
        None => format!("unknown source kind {kind:?}; the kinds are {built}"),
    }
}

impl SourceConfig {
    /// A short name for logs and dead letters.
    pub fn name(&self) -> String {
        self.kind().name()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kind_left_out_of_the_build_names_its_feature() {
        let kinds = [
            SourceKind {
                kind: "redis-stream",
                feature: None,
                built: true,
            },
            SourceKind {
                kind: "kafka",
                feature: Some("kafka"),
                built: false,
            },
        ];
        let error = refusal("kafka", &kinds);
        assert!(error.contains("without the kafka source"), "{error}");
        assert!(error.contains("--features kafka"), "{error}");
        assert!(
            error.ends_with("this build has are redis-stream"),
            "{error}"
        );
        let error = refusal("kafak", &kinds);
        assert_eq!(
            error,
            "unknown source kind \"kafak\"; the kinds are redis-stream"
        );
    }

    #[test]
    fn every_kind_of_this_build_is_listed_as_built() {
        let built: Vec<&str> = SOURCE_KINDS
            .iter()
            .filter(|k| k.built)
            .map(|k| k.kind)
            .collect();
        assert!(built.starts_with(&["redis-stream"]) && built.contains(&"http"));
        assert_eq!(
            SOURCE_KINDS
                .iter()
                .find(|k| k.kind == "kafka")
                .map(|k| k.built),
            Some(cfg!(feature = "kafka"))
        );
        let error = not_built("nope");
        assert!(error.contains(&built.join(", ")), "{error}");
    }
}
