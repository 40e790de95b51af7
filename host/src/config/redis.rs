//! `[redis]`: the cache Redis or Redis Cluster, and connections to it.

use anyhow::Context as _;
use serde::Deserialize;

/// `[redis]`: the cache.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// Redis URL, e.g. `redis://127.0.0.1:6379/0`.
    pub url: String,
    /// How long one command or pipeline may take before it counts as failed, in milliseconds.
    #[serde(default = "default_response_timeout_ms")]
    pub response_timeout_ms: u64,
    /// The name of an environment variable holding the Redis password (kept out of the file).
    /// `KEEPWARM_REDIS_PASSWORD`, when set, overrides it and any password in `url`.
    #[serde(default)]
    pub password_env: Option<String>,
    /// The cache is a Redis Cluster; `url` (and `cluster_urls`) are seed nodes.
    #[serde(default)]
    pub cluster: bool,
    /// More seed nodes of the cluster; setting them implies `cluster = true`.
    #[serde(default)]
    pub cluster_urls: Vec<String>,
}

/// A connection to the cache Redis or Redis Cluster (see [`RedisConfig::tool_connection`]).
#[derive(Clone)]
pub enum ToolConnection {
    /// One Redis.
    Single(redis::aio::MultiplexedConnection),
    /// A Redis Cluster.
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for ToolConnection {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            ToolConnection::Single(conn) => conn.req_packed_command(cmd),
            ToolConnection::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            ToolConnection::Single(conn) => conn.req_packed_commands(cmd, offset, count),
            ToolConnection::Cluster(conn) => conn.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            ToolConnection::Single(conn) => conn.get_db(),
            ToolConnection::Cluster(conn) => conn.get_db(),
        }
    }
}

/// The environment variable that, when set, is the cache Redis password.
pub const REDIS_PASSWORD_ENV: &str = "KEEPWARM_REDIS_PASSWORD";

impl RedisConfig {
    /// The password from the environment: `KEEPWARM_REDIS_PASSWORD`, else the variable named
    /// by `password_env`; `None` when neither applies (a password in the URL, or none).
    ///
    /// # Errors
    ///
    /// `password_env` names a variable that is unset or empty.
    pub fn password(&self) -> anyhow::Result<Option<String>> {
        if let Ok(password) = std::env::var(REDIS_PASSWORD_ENV)
            && !password.is_empty()
        {
            return Ok(Some(password));
        }
        match &self.password_env {
            None => Ok(None),
            Some(name) => match std::env::var(name) {
                Ok(password) if !password.is_empty() => Ok(Some(password)),
                _ => anyhow::bail!(
                    "environment variable {name} (redis password_env) is unset or empty"
                ),
            },
        }
    }

    /// How long a command or pipeline may take.
    pub fn response_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.response_timeout_ms)
    }

    /// Whether the cache is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.cluster || !self.cluster_urls.is_empty()
    }

    /// A client for the cache Redis Cluster (seed nodes `url` and `cluster_urls`), with the
    /// password from the environment.
    ///
    /// # Errors
    ///
    /// A URL is invalid, or `password_env` is unset.
    pub fn cluster_client(
        &self,
        response_timeout: std::time::Duration,
    ) -> anyhow::Result<redis::cluster::ClusterClient> {
        let seeds: Vec<&str> = std::iter::once(self.url.as_str())
            .chain(self.cluster_urls.iter().map(String::as_str))
            .collect();
        let mut builder = redis::cluster::ClusterClient::builder(seeds)
            .response_timeout(response_timeout)
            .connection_timeout(std::time::Duration::from_secs(5));
        if let Some(password) = self.password()? {
            builder = builder.password(password);
        }
        builder.build().context("invalid redis cluster urls")
    }

    /// A connection to the cache for the tools (`keepwarm dead-letters`): to the cluster when
    /// `cluster` is set, else to `url`.
    ///
    /// # Errors
    ///
    /// As [`RedisConfig::client`], or Redis cannot be reached.
    pub async fn tool_connection(&self) -> anyhow::Result<ToolConnection> {
        Ok(if self.is_cluster() {
            ToolConnection::Cluster(
                self.cluster_client(std::time::Duration::from_secs(10))?
                    .get_async_connection()
                    .await
                    .with_context(|| {
                        format!("cannot connect to the redis cluster at {}", self.url)
                    })?,
            )
        } else {
            ToolConnection::Single(
                self.client()?
                    .get_multiplexed_async_connection()
                    .await
                    .with_context(|| format!("cannot connect to redis at {}", self.url))?,
            )
        })
    }

    /// A client for the cache Redis (`url`), with the password from the environment.
    ///
    /// # Errors
    ///
    /// The URL is invalid, or `password_env` is unset.
    pub fn client(&self) -> anyhow::Result<redis::Client> {
        use redis::IntoConnectionInfo as _;
        let info = self
            .url
            .as_str()
            .into_connection_info()
            .with_context(|| format!("invalid redis url {}", self.url))?;
        let info = match self.password()? {
            Some(password) => {
                let settings = info.redis_settings().clone().set_password(password);
                info.set_redis_settings(settings)
            }
            None => info,
        };
        Ok(redis::Client::open(info)?)
    }
}

fn default_response_timeout_ms() -> u64 {
    10_000
}
