//! `[[source]] kind = "redis-stream"`.

use super::RedisStreamSource;
use crate::sources::{
    Built, Source, SourceConfigError, SourceConfigure, SourceEnv, SourceError, SourceLimits,
};
use crate::valid::NonEmpty;
use serde::Deserialize;
use std::num::NonZeroUsize;

/// A Redis Stream written by Sequin's Redis Stream sink, read through a consumer group.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisStreamSourceConfig {
    /// Stream key.
    pub stream: NonEmpty,
    /// Consumer group; created (from the stream's start) when missing.
    pub group: NonEmpty,
    /// Redis holding the stream (credentials in the URL); defaults to the cache Redis, with its
    /// password from the environment.
    #[serde(default)]
    pub url: Option<String>,
    /// Consumer name; defaults to `keepwarm-<hostname>-<pid>`.
    #[serde(default)]
    pub consumer: Option<String>,
    /// Entries asked for per `XREADGROUP`.
    #[serde(default = "default_read_count")]
    pub read_count: NonZeroUsize,
    /// How long one `XREADGROUP` blocks waiting for entries, in milliseconds.
    #[serde(default = "default_block_ms")]
    pub block_ms: u64,
    /// Entries pending longer than this on any consumer are claimed (`XAUTOCLAIM`), in
    /// milliseconds. Keep it above the longest time a healthy batch takes.
    #[serde(default = "default_claim_idle_ms")]
    pub claim_idle_ms: u64,
}

fn default_read_count() -> NonZeroUsize {
    NonZeroUsize::new(500).unwrap_or(NonZeroUsize::MIN)
}
fn default_block_ms() -> u64 {
    1_000
}
fn default_claim_idle_ms() -> u64 {
    30_000
}

impl SourceConfigure for RedisStreamSourceConfig {
    fn name(&self) -> String {
        format!("redis-stream:{}", self.stream.as_str())
    }

    fn validate(&self, limits: &SourceLimits) -> Result<(), SourceConfigError> {
        match &self.url {
            Some(url) => {
                redis::Client::open(url.as_str())
                    .map_err(|error| SourceConfigError::new("url", error.to_string()))?;
            }
            None if !limits.cache_redis => {
                return Err(SourceConfigError::new(
                    "url",
                    "is required without [redis]: a Redis Stream needs a Redis, and there is no cache Redis to default to",
                ));
            }
            None if limits.cache_cluster => {
                return Err(SourceConfigError::new(
                    "url",
                    "is required when [redis] is a Redis Cluster: the source reads a stream from one Redis (give it that Redis's url)",
                ));
            }
            None => {}
        }
        Ok(())
    }

    fn build(self: Box<Self>, env: SourceEnv) -> Built {
        Box::pin(async move {
            // A stream on the cache Redis shares its credentials; a stream elsewhere has its
            // own URL.
            let client = match &self.url {
                Some(url) => {
                    redis::Client::open(url.as_str()).map_err(|error| SourceError::Redis {
                        what: format!("use url {url}"),
                        error,
                    })?
                }
                None => env
                    .cache_redis
                    .ok_or_else(|| SourceConfigError::new("url", "is required without [redis]"))?,
            };
            Ok(Box::new(RedisStreamSource {
                config: *self,
                client,
            }) as Box<dyn Source>)
        })
    }
}
