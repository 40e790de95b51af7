//! `[[source]] kind = "http"`: Sequin's webhook sink posts here.

use super::HttpSource;
use crate::sources::{
    Built, Source, SourceConfigError, SourceConfigure, SourceEnv, SourceError, SourceLimits,
};
use crate::valid::{Checked, TextRule};
use serde::Deserialize;
use std::net::SocketAddr;
use std::num::{NonZeroU64, NonZeroUsize};

/// An HTTP endpoint that Sequin's webhook sink (HTTP push) posts to.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSourceConfig {
    /// Address to listen on, e.g. `0.0.0.0:8080`.
    pub listen: SocketAddr,
    /// Path that accepts `POST`s, e.g. `/sequin`.
    pub path: RoutePath,
    /// Bearer token every request must carry (`Authorization: Bearer <token>`). Exactly one of
    /// `token` and `token_env` is required.
    #[serde(default)]
    pub token: Option<String>,
    /// Name of an environment variable holding the bearer token, to keep it out of this file.
    #[serde(default)]
    pub token_env: Option<String>,
    /// Largest accepted request body, in bytes; larger ones get 413.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: NonZeroUsize,
    /// How long a request waits for its messages to be applied before it gets 503, in
    /// milliseconds. Keep it below Sequin's request timeout (`ack_wait_ms`, 30 s by default).
    #[serde(default = "default_ack_timeout_ms")]
    pub ack_timeout_ms: NonZeroU64,
}

/// A route path: starts with `/`, holds no `{`, `}`, `*`, `?` or `#`.
pub type RoutePath = Checked<Route>;

/// The rule of a [`RoutePath`].
pub struct Route;

impl TextRule for Route {
    fn refuse(path: &str) -> Option<String> {
        (!path.starts_with('/') || path.contains(['{', '}', '*', '?', '#'])).then(|| {
            format!(
                "http path must start with '/' and hold no '{{', '}}', '*', '?' or '#', got {path:?}"
            )
        })
    }
}

fn default_max_body_bytes() -> NonZeroUsize {
    NonZeroUsize::new(8 << 20).unwrap_or(NonZeroUsize::MIN)
}
fn default_ack_timeout_ms() -> NonZeroU64 {
    NonZeroU64::new(25_000).unwrap_or(NonZeroU64::MIN)
}

impl std::fmt::Debug for HttpSourceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpSourceConfig")
            .field("listen", &self.listen)
            .field("path", &self.path)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_env", &self.token_env)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("ack_timeout_ms", &self.ack_timeout_ms)
            .finish()
    }
}

impl HttpSourceConfig {
    /// The bearer token, from the file or from the environment.
    ///
    /// # Errors
    ///
    /// `token_env` names a variable that is unset or empty.
    pub fn resolve_token(&self) -> Result<String, SourceConfigError> {
        match (&self.token, &self.token_env) {
            (Some(token), _) => Ok(token.clone()),
            (None, Some(name)) => match std::env::var(name) {
                Ok(token) if !token.is_empty() => Ok(token),
                _ => Err(SourceConfigError::new(
                    "token_env",
                    format!("environment variable {name} (token_env) is unset or empty"),
                )),
            },
            (None, None) => Err(SourceConfigError::new("token", "http source has no token")),
        }
    }
}

impl SourceConfigure for HttpSourceConfig {
    fn name(&self) -> String {
        format!("http:{}{}", self.listen, self.path)
    }

    fn validate(&self, _limits: &SourceLimits) -> Result<(), SourceConfigError> {
        match (&self.token, &self.token_env) {
            (Some(token), None) if token.is_empty() => Err(SourceConfigError::new(
                "token",
                "http token must not be empty",
            )),
            (None, Some(name)) if name.is_empty() => Err(SourceConfigError::new(
                "token_env",
                "http token_env must not be empty",
            )),
            (Some(_), None) | (None, Some(_)) => Ok(()),
            _ => Err(SourceConfigError::new(
                "token/token_env",
                "http source needs exactly one of token and token_env",
            )),
        }
    }

    fn build(self: Box<Self>, _env: SourceEnv) -> Built {
        Box::pin(async move {
            let token = self.resolve_token()?;
            let listener = tokio::net::TcpListener::bind(self.listen)
                .await
                .map_err(|error| SourceError::Listen {
                    address: self.listen,
                    error,
                })?;
            Ok(Box::new(HttpSource {
                config: *self,
                listener,
                token,
            }) as Box<dyn Source>)
        })
    }
}
