//! `[[source]] kind = "sqs"`.

use super::SqsSource;
use crate::sources::{Built, Source, SourceConfigError, SourceConfigure, SourceEnv, SourceLimits};
use crate::valid::{Bounded, Checked, NonEmpty, TextRule};
use serde::Deserialize;
use std::num::NonZeroUsize;

/// An SQS queue (FIFO or standard) written by Sequin's SQS sink. Credentials come from the
/// standard AWS chain (environment, shared config and credentials files, web identity, ECS and
/// EC2 instance roles).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqsSourceConfig {
    /// Queue URL; a FIFO queue's ends in `.fifo`.
    pub queue_url: QueueUrl,
    /// AWS region of the queue, e.g. `eu-west-1`.
    pub region: NonEmpty,
    /// Endpoint to call instead of AWS's regional one (an emulator, a VPC endpoint).
    #[serde(default)]
    pub endpoint_url: Option<String>,
    /// `ReceiveMessage` loops running in parallel.
    #[serde(default = "default_receivers")]
    pub receivers: NonZeroUsize,
    /// Most messages asked for per `ReceiveMessage`.
    #[serde(default = "default_max_messages")]
    pub max_messages: Bounded<1, 10>,
    /// How long one `ReceiveMessage` waits for messages (long polling), in seconds.
    #[serde(default = "default_wait_time_seconds")]
    pub wait_time_seconds: Bounded<0, 20>,
    /// Visibility timeout asked for on receive, in seconds. A message still in flight when
    /// half of it has passed is extended by as much again.
    #[serde(default = "default_visibility_timeout_seconds")]
    pub visibility_timeout_seconds: Bounded<1, 43_200>,
}

/// An `http://` or `https://` URL.
pub type QueueUrl = Checked<HttpUrl>;

/// The rule of a [`QueueUrl`].
pub struct HttpUrl;

impl TextRule for HttpUrl {
    fn refuse(url: &str) -> Option<String> {
        (!(url.starts_with("http://") || url.starts_with("https://")))
            .then(|| format!("sqs queue_url must be an http(s) URL, got {url:?}"))
    }
}

fn default_receivers() -> NonZeroUsize {
    NonZeroUsize::new(2).unwrap_or(NonZeroUsize::MIN)
}
fn default_max_messages() -> Bounded<1, 10> {
    Bounded::of(10)
}
fn default_wait_time_seconds() -> Bounded<0, 20> {
    Bounded::of(20)
}
fn default_visibility_timeout_seconds() -> Bounded<1, 43_200> {
    Bounded::of(30)
}

impl SourceConfigure for SqsSourceConfig {
    fn name(&self) -> String {
        let queue = self.queue_url.as_str().trim_end_matches('/');
        format!("sqs:{}", queue.rsplit('/').next().unwrap_or(queue))
    }

    fn validate(&self, limits: &SourceLimits) -> Result<(), SourceConfigError> {
        // A receive asks for up to max_messages at once; more than the whole budget cannot be
        // in flight, so such a setting is a mistake worth naming.
        if self.max_messages.get() as usize > limits.max_in_flight {
            return Err(SourceConfigError::new(
                "max_messages",
                "must not exceed pipeline.max_in_flight",
            ));
        }
        Ok(())
    }

    fn build(self: Box<Self>, _env: SourceEnv) -> Built {
        Box::pin(async move { Ok(Box::new(SqsSource { config: *self }) as Box<dyn Source>) })
    }
}
