//! `[[source]] kind = "nats"`.

use super::NatsSource;
use crate::sources::{Built, Source, SourceConfigError, SourceConfigure, SourceEnv, SourceLimits};
use crate::valid::{Bounded, Checked, NonEmpty, TextRule};
use serde::Deserialize;

/// A JetStream stream that captures the subjects Sequin's NATS sink publishes to
/// (`sequin.<database>.<schema>.<table>.<action>`), read through a durable pull consumer.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsSourceConfig {
    /// Server URL, e.g. `nats://127.0.0.1:4222` (`tls://` for TLS; `user:password@` in it when
    /// the server wants them).
    pub url: NonEmpty,
    /// The JetStream stream's name.
    pub stream: Name,
    /// The durable pull consumer's name; created (from the stream's start) when missing.
    #[serde(default = "default_consumer")]
    pub consumer: Name,
    /// Subjects the stream captures, e.g. `sequin.shop-prod.>`; used when keepwarm creates
    /// the stream.
    #[serde(default)]
    pub subjects: Vec<NonEmpty>,
    /// Whether keepwarm creates the stream when it is missing (file storage, the subjects
    /// above, a duplicate window so that Sequin's `Nats-Msg-Id` de-duplicates).
    #[serde(default)]
    pub create_stream: bool,
    /// The duplicate window of a stream keepwarm creates, in seconds.
    #[serde(default = "default_duplicate_window_seconds")]
    pub duplicate_window_seconds: Bounded<1, 604_800>,
    /// Only the stream's messages on this subject (wildcards allowed) go to the consumer. One
    /// filter: NATS 2.9 has no more.
    #[serde(default)]
    pub filter_subject: Option<NonEmpty>,
    /// How long the server waits for an acknowledgement before it delivers a message again,
    /// in seconds. Messages still in flight are kept from it by progress acknowledgements.
    #[serde(default = "default_ack_wait_seconds")]
    pub ack_wait_seconds: Bounded<1, 43_200>,
    /// Most messages asked for per pull request.
    #[serde(default = "default_max_messages")]
    pub max_messages: Bounded<1, 10_000>,
    /// How long one pull request waits for messages, in milliseconds.
    #[serde(default = "default_pull_wait_ms")]
    pub pull_wait_ms: Bounded<100, 30_000>,
}

/// A stream or consumer name: no spaces, dots or wildcards.
pub type Name = Checked<JetStreamName>;

/// The rule of a [`Name`].
pub struct JetStreamName;

impl TextRule for JetStreamName {
    fn refuse(name: &str) -> Option<String> {
        (name.is_empty()
            || name
                .chars()
                .any(|c| c.is_whitespace() || matches!(c, '.' | '*' | '>' | '/' | '\\')))
        .then(|| {
            format!(
                "a JetStream name must be non-empty, without spaces, `.`, `*`, `>`, `/` or `\\`; got {name:?}"
            )
        })
    }
}

fn default_consumer() -> Name {
    Name::known("keepwarm")
}
fn default_duplicate_window_seconds() -> Bounded<1, 604_800> {
    Bounded::of(120)
}
fn default_ack_wait_seconds() -> Bounded<1, 43_200> {
    Bounded::of(30)
}
fn default_max_messages() -> Bounded<1, 10_000> {
    Bounded::of(500)
}
fn default_pull_wait_ms() -> Bounded<100, 30_000> {
    Bounded::of(1_000)
}

impl SourceConfigure for NatsSourceConfig {
    fn name(&self) -> String {
        format!("nats:{}", self.stream.as_str())
    }

    fn validate(&self, limits: &SourceLimits) -> Result<(), SourceConfigError> {
        if self.create_stream && self.subjects.is_empty() {
            return Err(SourceConfigError::new(
                "subjects",
                "create_stream = true needs the subjects the stream captures, e.g. [\"sequin.mydb.>\"]",
            ));
        }
        if self.max_messages.get() as usize > limits.max_in_flight {
            return Err(SourceConfigError::new(
                "max_messages",
                "must not exceed pipeline.max_in_flight",
            ));
        }
        Ok(())
    }

    fn build(self: Box<Self>, env: SourceEnv) -> Built {
        Box::pin(async move {
            Ok(Box::new(NatsSource {
                config: *self,
                max_in_flight: env.max_in_flight,
            }) as Box<dyn Source>)
        })
    }
}
