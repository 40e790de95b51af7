//! The daemon's configuration file (TOML), parsed strictly and validated once.
//!
//! Every table denies unknown keys, so a typo is an error naming the key rather than a silently
//! ignored setting. `config/example.toml` documents every key and is parsed by a unit test.

use anyhow::Context as _;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The whole configuration file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The cache: where plugin operations and dead letters are written.
    pub redis: RedisConfig,
    /// Where plugins live.
    pub plugins: PluginsConfig,
    /// Lanes, batching and flow control.
    #[serde(default)]
    pub pipeline: PipelineConfig,
    /// Where messages that cannot be applied go.
    #[serde(default)]
    pub dead_letter: DeadLetterConfig,
    /// Versioned writes.
    #[serde(default)]
    pub versioning: VersioningConfig,
    /// The admin endpoint.
    #[serde(default)]
    pub admin: AdminConfig,
    /// Where change messages come from.
    #[serde(default, rename = "source")]
    pub sources: Vec<SourceConfig>,
}

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

/// `[plugins]`: the plugin directory.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginsConfig {
    /// Directory holding `<name>.wasm` components and their optional `<name>.toml` manifests.
    /// A relative path is resolved against the configuration file's directory.
    pub dir: PathBuf,
    /// Where compiled components are cached (default: `.cache` inside `dir`).
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
    /// Rescan the directory this often even without file events, in seconds.
    #[serde(default = "default_rescan_seconds")]
    pub rescan_seconds: u64,
}

fn default_rescan_seconds() -> u64 {
    60
}

impl PluginsConfig {
    /// The artifact cache directory.
    pub fn cache_dir(&self) -> PathBuf {
        self.cache_dir
            .clone()
            .unwrap_or_else(|| self.dir.join(".cache"))
    }
}

/// `[pipeline]`: lanes, batching and flow control.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Number of lanes; changes to one row always take the same lane, in order.
    pub lanes: usize,
    /// Most messages one lane takes into one plugin call and one Redis pipeline.
    pub batch_size: usize,
    /// Most messages read but not yet acknowledged, over all sources; sources stop reading when
    /// it is reached.
    pub max_in_flight: usize,
    /// Upper bound of the backoff between retries of a failed Redis apply, in milliseconds.
    pub max_backoff_ms: u64,
    /// Largest accepted message, in bytes; larger ones are dead-lettered.
    pub max_message_bytes: usize,
}

impl Default for PipelineConfig {
    fn default() -> PipelineConfig {
        PipelineConfig {
            lanes: 8,
            batch_size: 256,
            max_in_flight: 20_000,
            max_backoff_ms: 5_000,
            max_message_bytes: 4 << 20,
        }
    }
}

/// `[dead_letter]`: the dead-letter stream.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeadLetterConfig {
    /// Stream (in the cache Redis) that receives dead letters.
    pub stream: String,
}

impl Default for DeadLetterConfig {
    fn default() -> DeadLetterConfig {
        DeadLetterConfig {
            stream: "keepwarm:dead-letters".to_owned(),
        }
    }
}

/// `[admin]`: the admin endpoint (plugin status, health, readiness).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address to listen on; keep it on localhost unless it is protected.
    pub listen: String,
}

impl Default for AdminConfig {
    fn default() -> AdminConfig {
        AdminConfig {
            listen: "127.0.0.1:9464".to_owned(),
        }
    }
}

/// `[versioning]`: how versioned writes keep their versions.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VersioningConfig {
    /// How long a delete's tombstone version is kept, in seconds. It must outlive any
    /// redelivery window: the default of 7 days covers Sequin's 10-minute retry cap, SQS's
    /// longest visibility timeout (12 h) and a pending stream entry reclaimed after a weekend.
    pub tombstone_ttl_seconds: u64,
    /// Prefix of the companion keys that hold versions.
    pub key_prefix: String,
}

impl Default for VersioningConfig {
    fn default() -> VersioningConfig {
        VersioningConfig {
            tombstone_ttl_seconds: 7 * 24 * 3600,
            key_prefix: "kw:v:".to_owned(),
        }
    }
}

/// One `[[source]]` table.
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum SourceConfig {
    /// A Redis Stream written by Sequin's Redis Stream sink.
    RedisStream(RedisStreamSourceConfig),
    /// An SQS queue (FIFO or standard) written by Sequin's SQS sink.
    Sqs(SqsSourceConfig),
    /// An HTTP endpoint that Sequin's webhook sink (HTTP push) posts to.
    Http(HttpSourceConfig),
}

impl SourceConfig {
    /// A short name for logs and dead letters.
    pub fn name(&self) -> String {
        match self {
            SourceConfig::RedisStream(stream) => format!("redis-stream:{}", stream.stream),
            SourceConfig::Sqs(sqs) => {
                let queue = sqs.queue_url.trim_end_matches('/');
                format!("sqs:{}", queue.rsplit('/').next().unwrap_or(queue))
            }
            SourceConfig::Http(http) => format!("http:{}{}", http.listen, http.path),
        }
    }
}

/// `[[source]] kind = "redis-stream"`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisStreamSourceConfig {
    /// Stream key.
    pub stream: String,
    /// Consumer group; created (from the stream's start) when missing.
    pub group: String,
    /// Redis holding the stream (credentials in the URL); defaults to the cache Redis, with its
    /// password from the environment.
    #[serde(default)]
    pub url: Option<String>,
    /// Consumer name; defaults to `keepwarm-<hostname>-<pid>`.
    #[serde(default)]
    pub consumer: Option<String>,
    /// Entries asked for per `XREADGROUP`.
    #[serde(default = "default_read_count")]
    pub read_count: usize,
    /// How long one `XREADGROUP` blocks waiting for entries, in milliseconds.
    #[serde(default = "default_block_ms")]
    pub block_ms: u64,
    /// Entries pending longer than this on any consumer are claimed (`XAUTOCLAIM`), in
    /// milliseconds. Keep it above the longest time a healthy batch takes.
    #[serde(default = "default_claim_idle_ms")]
    pub claim_idle_ms: u64,
}

/// `[[source]] kind = "sqs"`. Credentials come from the standard AWS chain (environment,
/// shared config and credentials files, web identity, ECS and EC2 instance roles).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqsSourceConfig {
    /// Queue URL; a FIFO queue's ends in `.fifo`.
    pub queue_url: String,
    /// AWS region of the queue, e.g. `eu-west-1`.
    pub region: String,
    /// Endpoint to call instead of AWS's regional one (an emulator, a VPC endpoint).
    #[serde(default)]
    pub endpoint_url: Option<String>,
    /// `ReceiveMessage` loops running in parallel.
    #[serde(default = "default_receivers")]
    pub receivers: usize,
    /// Most messages asked for per `ReceiveMessage` (1 to 10).
    #[serde(default = "default_max_messages")]
    pub max_messages: usize,
    /// How long one `ReceiveMessage` waits for messages (long polling), in seconds (0 to 20).
    #[serde(default = "default_wait_time_seconds")]
    pub wait_time_seconds: u32,
    /// Visibility timeout asked for on receive, in seconds (1 to 43200). A message still in
    /// flight when half of it has passed is extended by as much again.
    #[serde(default = "default_visibility_timeout_seconds")]
    pub visibility_timeout_seconds: u32,
}

fn default_receivers() -> usize {
    2
}
fn default_max_messages() -> usize {
    10
}
fn default_wait_time_seconds() -> u32 {
    20
}
fn default_visibility_timeout_seconds() -> u32 {
    30
}

/// `[[source]] kind = "http"`: Sequin's webhook sink posts here.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSourceConfig {
    /// Address to listen on, e.g. `0.0.0.0:8080`.
    pub listen: SocketAddr,
    /// Path that accepts `POST`s, e.g. `/sequin`.
    pub path: String,
    /// Bearer token every request must carry (`Authorization: Bearer <token>`). Exactly one of
    /// `token` and `token_env` is required.
    #[serde(default)]
    pub token: Option<String>,
    /// Name of an environment variable holding the bearer token, to keep it out of this file.
    #[serde(default)]
    pub token_env: Option<String>,
    /// Largest accepted request body, in bytes; larger ones get 413.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// How long a request waits for its messages to be applied before it gets 503, in
    /// milliseconds. Keep it below Sequin's request timeout (`ack_wait_ms`, 30 s by default).
    #[serde(default = "default_ack_timeout_ms")]
    pub ack_timeout_ms: u64,
}

fn default_max_body_bytes() -> usize {
    8 << 20
}
fn default_ack_timeout_ms() -> u64 {
    25_000
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
    pub fn resolve_token(&self) -> anyhow::Result<String> {
        match (&self.token, &self.token_env) {
            (Some(token), _) => Ok(token.clone()),
            (None, Some(name)) => match std::env::var(name) {
                Ok(token) if !token.is_empty() => Ok(token),
                _ => anyhow::bail!("environment variable {name} (token_env) is unset or empty"),
            },
            (None, None) => anyhow::bail!("http source has no token"),
        }
    }
}

fn default_read_count() -> usize {
    500
}
fn default_block_ms() -> u64 {
    1_000
}
fn default_claim_idle_ms() -> u64 {
    30_000
}

impl Config {
    /// Reads, parses and validates a configuration file. Relative paths in it are resolved
    /// against the file's directory.
    ///
    /// # Errors
    ///
    /// The file cannot be read, has a syntax error or an unknown key, or fails validation.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        let mut config =
            Config::parse(&text).with_context(|| format!("invalid config {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        if config.plugins.dir.is_relative() {
            config.plugins.dir = base.join(&config.plugins.dir);
        }
        if let Some(cache) = &config.plugins.cache_dir
            && cache.is_relative()
        {
            config.plugins.cache_dir = Some(base.join(cache));
        }
        Ok(config)
    }

    /// Parses and validates configuration text.
    ///
    /// # Errors
    ///
    /// Syntax errors, unknown keys, and values out of range.
    pub fn parse(text: &str) -> anyhow::Result<Config> {
        let config: Config = toml::from_str(text)?;
        let pipeline = &config.pipeline;
        anyhow::ensure!(pipeline.lanes >= 1, "pipeline.lanes must be at least 1");
        anyhow::ensure!(
            config.plugins.rescan_seconds >= 1,
            "plugins.rescan_seconds must be at least 1"
        );
        anyhow::ensure!(
            pipeline.batch_size >= 1,
            "pipeline.batch_size must be at least 1"
        );
        anyhow::ensure!(
            pipeline.max_in_flight >= pipeline.batch_size,
            "pipeline.max_in_flight must be at least pipeline.batch_size"
        );
        anyhow::ensure!(
            !config.dead_letter.stream.is_empty(),
            "dead_letter.stream must not be empty"
        );
        anyhow::ensure!(
            !config.versioning.key_prefix.contains(['{', '}']),
            "versioning.key_prefix must not contain braces (they would change the hash slot)"
        );
        for source in &config.sources {
            match source {
                SourceConfig::RedisStream(stream) => {
                    anyhow::ensure!(!stream.stream.is_empty(), "source stream must not be empty");
                    anyhow::ensure!(!stream.group.is_empty(), "source group must not be empty");
                    anyhow::ensure!(stream.read_count >= 1, "source read_count must be >= 1");
                }
                SourceConfig::Sqs(sqs) => {
                    validate_sqs(sqs)?;
                    // A receiver reserves max_messages slots at once and would wait forever.
                    anyhow::ensure!(
                        sqs.max_messages <= pipeline.max_in_flight,
                        "sqs max_messages must not exceed pipeline.max_in_flight"
                    );
                }
                SourceConfig::Http(http) => validate_http(http)?,
            }
        }
        Ok(config)
    }

    /// The Redis response timeout.
    pub fn response_timeout(&self) -> Duration {
        Duration::from_millis(self.redis.response_timeout_ms)
    }
}

fn validate_sqs(sqs: &SqsSourceConfig) -> anyhow::Result<()> {
    anyhow::ensure!(
        sqs.queue_url.starts_with("http://") || sqs.queue_url.starts_with("https://"),
        "sqs queue_url must be an http(s) URL, got {:?}",
        sqs.queue_url
    );
    anyhow::ensure!(!sqs.region.is_empty(), "sqs region must not be empty");
    anyhow::ensure!(sqs.receivers >= 1, "sqs receivers must be at least 1");
    anyhow::ensure!(
        (1..=10).contains(&sqs.max_messages),
        "sqs max_messages must be between 1 and 10"
    );
    anyhow::ensure!(
        sqs.wait_time_seconds <= 20,
        "sqs wait_time_seconds must be at most 20"
    );
    anyhow::ensure!(
        (1..=43_200).contains(&sqs.visibility_timeout_seconds),
        "sqs visibility_timeout_seconds must be between 1 and 43200"
    );
    Ok(())
}

fn validate_http(http: &HttpSourceConfig) -> anyhow::Result<()> {
    anyhow::ensure!(
        http.path.starts_with('/') && !http.path.contains(['{', '}', '*', '?', '#']),
        "http path must start with '/' and hold no '{{', '}}', '*', '?' or '#', got {:?}",
        http.path
    );
    match (&http.token, &http.token_env) {
        (Some(token), None) => anyhow::ensure!(!token.is_empty(), "http token must not be empty"),
        (None, Some(name)) => anyhow::ensure!(!name.is_empty(), "http token_env must not be empty"),
        _ => anyhow::bail!("http source needs exactly one of token and token_env"),
    }
    anyhow::ensure!(
        http.max_body_bytes >= 1,
        "http max_body_bytes must be at least 1"
    );
    anyhow::ensure!(
        http.ack_timeout_ms >= 1,
        "http ack_timeout_ms must be at least 1"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses() {
        let text = include_str!("../../config/example.toml");
        let config = Config::parse(text).unwrap();
        let names: Vec<String> = config.sources.iter().map(SourceConfig::name).collect();
        assert_eq!(
            names,
            [
                "redis-stream:sequin.changes",
                "sqs:sequin-changes.fifo",
                "http:0.0.0.0:8080/sequin"
            ]
        );
    }

    const BASE: &str = "[redis]\nurl = \"redis://x\"\n[plugins]\ndir = \"p\"\n[[source]]\n";

    fn source_error(source: &str) -> String {
        format!(
            "{:#}",
            Config::parse(&format!("{BASE}{source}")).unwrap_err()
        )
    }

    #[test]
    fn sqs_sources_take_defaults_and_reject_out_of_range_values() {
        let config = Config::parse(&format!(
            "{BASE}kind = \"sqs\"\nqueue_url = \"http://127.0.0.1:5000/1/q.fifo\"\nregion = \"us-east-1\"\n"
        ))
        .unwrap();
        let SourceConfig::Sqs(sqs) = &config.sources[0] else {
            panic!("not sqs")
        };
        assert_eq!(
            (sqs.receivers, sqs.max_messages, sqs.wait_time_seconds),
            (2, 10, 20)
        );
        assert_eq!(sqs.visibility_timeout_seconds, 30);
        let sqs = "kind = \"sqs\"\nqueue_url = \"https://q/1/q\"\nregion = \"r\"\n";
        assert!(source_error(&format!("{sqs}max_messages = 11\n")).contains("max_messages"));
        assert!(source_error(&format!("{sqs}wait_time_seconds = 21\n")).contains("wait_time"));
        assert!(source_error(&format!("{sqs}receivers = 0\n")).contains("receivers"));
        assert!(source_error(&format!("{sqs}queue = \"x\"\n")).contains("queue"));
        assert!(
            source_error("kind = \"sqs\"\nqueue_url = \"q\"\nregion = \"r\"\n").contains("URL")
        );
    }

    #[test]
    fn http_sources_need_exactly_one_token_and_never_print_it() {
        let http = "kind = \"http\"\nlisten = \"127.0.0.1:0\"\npath = \"/hook\"\n";
        assert!(source_error(http).contains("exactly one of token and token_env"));
        assert!(
            source_error(&format!("{http}token = \"a\"\ntoken_env = \"B\"\n"))
                .contains("exactly one")
        );
        assert!(
            source_error(
                "kind = \"http\"\nlisten = \"127.0.0.1:0\"\npath = \"hook\"\ntoken = \"t\"\n"
            )
            .contains("path")
        );
        let error =
            source_error("kind = \"http\"\nlisten = \"nowhere\"\npath = \"/h\"\ntoken = \"t\"\n");
        assert!(error.contains("address"), "{error}");
        let config = Config::parse(&format!("{BASE}{http}token = \"s3cret\"\n")).unwrap();
        let SourceConfig::Http(source) = &config.sources[0] else {
            panic!("not http")
        };
        assert_eq!(source.resolve_token().unwrap(), "s3cret");
        assert_eq!(
            (source.max_body_bytes, source.ack_timeout_ms),
            (8 << 20, 25_000)
        );
        assert!(!format!("{config:?}").contains("s3cret"));
        let config = Config::parse(&format!(
            "{BASE}{http}token_env = \"KEEPWARM_TEST_SURELY_UNSET_TOKEN\"\n"
        ))
        .unwrap();
        let SourceConfig::Http(source) = &config.sources[0] else {
            panic!("not http")
        };
        assert!(
            format!("{:#}", source.resolve_token().unwrap_err())
                .contains("KEEPWARM_TEST_SURELY_UNSET_TOKEN")
        );
    }

    #[test]
    fn unknown_keys_are_rejected_by_name() {
        let text = "[redis]\nurl = \"redis://x\"\nurll = 1\n[plugins]\ndir = \"p\"\n";
        let error = format!("{:#}", Config::parse(text).unwrap_err());
        assert!(error.contains("urll"), "{error}");
        let text = "[redis]\nurl = \"redis://x\"\n[plugins]\ndir = \"p\"\n[[source]]\nkind = \"redis-stream\"\nstream = \"s\"\ngroup = \"g\"\nblock = 5\n";
        let error = format!("{:#}", Config::parse(text).unwrap_err());
        assert!(error.contains("block"), "{error}");
    }

    #[test]
    fn unknown_source_kind_is_rejected() {
        let text =
            "[redis]\nurl = \"redis://x\"\n[plugins]\ndir = \"p\"\n[[source]]\nkind = \"kafka\"\n";
        let error = format!("{:#}", Config::parse(text).unwrap_err());
        assert!(error.contains("kafka"), "{error}");
    }
}
