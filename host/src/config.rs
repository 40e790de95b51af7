//! The daemon's configuration file (TOML), parsed strictly and validated once.
//!
//! Every table denies unknown keys, so a typo is an error naming the key rather than a silently
//! ignored setting. `config/example.toml` documents every key and is parsed by a unit test.

use anyhow::Context as _;
use serde::Deserialize;
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
}

impl SourceConfig {
    /// A short name for logs and dead letters.
    pub fn name(&self) -> String {
        match self {
            SourceConfig::RedisStream(stream) => format!("redis-stream:{}", stream.stream),
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
    /// Redis holding the stream; defaults to `[redis] url`.
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
            }
        }
        Ok(config)
    }

    /// The Redis response timeout.
    pub fn response_timeout(&self) -> Duration {
        Duration::from_millis(self.redis.response_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses() {
        let text = include_str!("../../config/example.toml");
        let config = Config::parse(text).unwrap();
        assert_eq!(config.sources.len(), 1);
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
