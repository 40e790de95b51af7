//! `[[source]] kind = "rabbitmq"`.

use super::RabbitMqSource;
use crate::sources::{Built, Source, SourceConfigError, SourceConfigure, SourceEnv, SourceLimits};
use crate::valid::NonEmpty;
use serde::Deserialize;

/// A durable RabbitMQ queue fed by Sequin's RabbitMQ sink (through an exchange, routing key
/// `sequin.<database>.<schema>.<table>.<action>`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RabbitMqSourceConfig {
    /// AMQP URL with credentials and virtual host, e.g.
    /// `amqp://user:password@127.0.0.1:5672/%2f`. One of `url` and `url_env`.
    #[serde(default)]
    pub url: Option<String>,
    /// Name of an environment variable holding the URL (keeps the password out of the file).
    #[serde(default)]
    pub url_env: Option<String>,
    /// The queue to consume; declared durable when missing (see `declare_queue`).
    pub queue: NonEmpty,
    /// Whether keepwarm declares the queue (durable) or only checks that it exists (`false`:
    /// for queues declared with arguments of their own, such as quorum queues).
    #[serde(default = "default_declare_queue")]
    pub declare_queue: bool,
    /// A topic exchange to declare (durable) and bind the queue to; the one Sequin's sink
    /// publishes to. None: the queue is bound already.
    #[serde(default)]
    pub exchange: Option<NonEmpty>,
    /// Binding keys of the queue to `exchange`, e.g. `sequin.shop-prod.#`.
    #[serde(default = "default_binding_keys")]
    pub binding_keys: Vec<NonEmpty>,
    /// Consumer tag; defaults to `keepwarm-<hostname>-<pid>`.
    #[serde(default)]
    pub consumer_tag: Option<NonEmpty>,
}

fn default_declare_queue() -> bool {
    true
}

fn default_binding_keys() -> Vec<NonEmpty> {
    NonEmpty::new("sequin.#").into_iter().collect()
}

impl RabbitMqSourceConfig {
    /// The URL, from the file or the environment.
    ///
    /// # Errors
    ///
    /// Neither or both are given, or the variable is not set.
    pub fn resolve_url(&self) -> Result<String, SourceConfigError> {
        match (&self.url, &self.url_env) {
            (Some(url), None) => Ok(url.clone()),
            (None, Some(var)) => std::env::var(var).map_err(|_| {
                SourceConfigError::new("url_env", format!("environment variable {var} is not set"))
            }),
            _ => Err(SourceConfigError::new(
                "url/url_env",
                "give exactly one of url and url_env",
            )),
        }
    }
}

impl SourceConfigure for RabbitMqSourceConfig {
    fn name(&self) -> String {
        format!("rabbitmq:{}", self.queue.as_str())
    }

    fn validate(&self, _limits: &SourceLimits) -> Result<(), SourceConfigError> {
        if self.url.is_some() == self.url_env.is_some() {
            return Err(SourceConfigError::new(
                "url/url_env",
                "give exactly one of url and url_env",
            ));
        }
        if let Some(url) = &self.url
            && !(url.starts_with("amqp://"))
        {
            return Err(SourceConfigError::new(
                "url",
                "must be an amqp:// URL (TLS is not built in: put a TLS tunnel in front)",
            ));
        }
        if self.exchange.is_some() && self.binding_keys.is_empty() {
            return Err(SourceConfigError::new(
                "binding_keys",
                "an exchange needs at least one binding key, e.g. [\"sequin.#\"]",
            ));
        }
        Ok(())
    }

    fn build(self: Box<Self>, env: SourceEnv) -> Built {
        Box::pin(async move {
            let url = self.resolve_url()?;
            Ok(Box::new(RabbitMqSource {
                config: *self,
                url,
                prefetch: u16::try_from(env.max_in_flight).unwrap_or(u16::MAX),
            }) as Box<dyn Source>)
        })
    }
}
