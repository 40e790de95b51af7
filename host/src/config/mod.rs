//! The daemon's configuration file (TOML), parsed strictly and validated once.
//!
//! Every table denies unknown keys, so a typo is an error naming the key rather than a silently
//! ignored setting. `config/example.toml` documents every key and is parsed by a unit test.

mod memcached;
mod redis;

use crate::ops::CacheKind;
use crate::sources::{SourceConfig, SourceConfigError, SourceLimits};
pub use memcached::MemcachedConfig;
pub use redis::{REDIS_PASSWORD_ENV, RedisConfig, ToolConnection};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        error: std::io::Error,
    },
    /// The file's contents are not a valid configuration.
    #[error("invalid config {path}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong in it.
        #[source]
        error: Box<ConfigError>,
    },
    /// Not TOML, an unknown key, a value of the wrong type or out of range.
    #[error(transparent)]
    Syntax(#[from] toml::de::Error),
    /// A key's value breaks a rule between keys.
    #[error("{key} {rule}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// The rule it breaks.
        rule: &'static str,
    },
    /// Something that needs `[redis]` was asked of a configuration without it.
    #[error("{what} needs [redis], which this configuration does not have")]
    NoRedis {
        /// What needed it.
        what: String,
    },
    /// A `[[source]]` table is well-formed but not usable.
    #[error("source {name}")]
    Source {
        /// The source's name.
        name: String,
        /// What is wrong.
        #[source]
        error: SourceConfigError,
    },
}

fn ensure(ok: bool, key: &'static str, rule: &'static str) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid { key, rule })
    }
}

/// The whole configuration file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The cache Redis: where plugin operations are written (unless `[memcached]` is the cache)
    /// and where dead letters go. Optional only with `[memcached]`: dead letters then go to
    /// `dead_letter.file`.
    #[serde(default)]
    pub redis: Option<RedisConfig>,
    /// Memcached as the cache: plugin operations go there instead of Redis (dead letters stay
    /// in Redis when there is one).
    #[serde(default)]
    pub memcached: Option<MemcachedConfig>,
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
    /// Plugin instances the engine's pool holds at once, all plugins together: a warm one per
    /// lane and plugin, twice over while a reload swaps versions.
    #[serde(default = "default_instances")]
    pub instances: u32,
}

fn default_rescan_seconds() -> u64 {
    60
}

/// See [`PluginsConfig::instances`].
pub const DEFAULT_INSTANCES: u32 = 512;

fn default_instances() -> u32 {
    DEFAULT_INSTANCES
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
    /// Number of lanes; changes to one row always take the same lane, in order. Default:
    /// [`default_lanes`].
    pub lanes: usize,
    /// Most messages one lane takes into one plugin call and one Redis pipeline.
    pub batch_size: usize,
    /// Most messages read but not yet acknowledged, over all sources; sources stop reading when
    /// it is reached. The default keeps 16 full batches of 256 in flight and a backlog's
    /// messages in cache between their decode and their plugin call (docs/bench.md, "Round 23").
    pub max_in_flight: usize,
    /// Upper bound of the backoff between retries of a failed Redis apply, in milliseconds.
    pub max_backoff_ms: u64,
    /// Largest accepted message, in bytes; larger ones are dead-lettered.
    pub max_message_bytes: usize,
}

impl Default for PipelineConfig {
    fn default() -> PipelineConfig {
        PipelineConfig {
            lanes: default_lanes(),
            batch_size: 256,
            max_in_flight: 4_096,
            max_backoff_ms: 5_000,
            max_message_bytes: 4 << 20,
        }
    }
}

/// Two lanes per core the process may use, at most eight (and at least two). Each lane makes
/// its plugin calls on a thread of its own; lanes beyond twice the cores only take turns on
/// them, with smaller batches each: on two cores, four lanes spent 4–11% less CPU per message
/// than eight with the same throughput (docs/bench.md, "Round 23").
pub fn default_lanes() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    cores.saturating_mul(2).clamp(2, 8)
}

/// `[dead_letter]`: where messages that cannot be applied go: the dead-letter stream in the
/// cache Redis, or without `[redis]` (Memcached only) a JSONL file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeadLetterConfig {
    /// Stream (in the cache Redis) that receives dead letters.
    pub stream: String,
    /// The JSONL file that receives dead letters when there is no `[redis]` (see
    /// `letter_file.rs`); required then, refused otherwise. Relative to the config file.
    pub file: Option<PathBuf>,
}

impl Default for DeadLetterConfig {
    fn default() -> DeadLetterConfig {
        DeadLetterConfig {
            stream: "keepwarm:dead-letters".to_owned(),
            file: None,
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

impl Config {
    /// Reads, parses and validates a configuration file. Relative paths in it are resolved
    /// against the file's directory.
    ///
    /// # Errors
    ///
    /// The file cannot be read, has a syntax error or an unknown key, or fails validation.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        let mut config = Config::parse(&text).map_err(|error| ConfigError::File {
            path: path.to_owned(),
            error: Box::new(error),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        if config.plugins.dir.is_relative() {
            config.plugins.dir = base.join(&config.plugins.dir);
        }
        if let Some(cache) = &config.plugins.cache_dir
            && cache.is_relative()
        {
            config.plugins.cache_dir = Some(base.join(cache));
        }
        let files = [
            config.dead_letter.file.as_mut(),
            config
                .memcached
                .as_mut()
                .and_then(|m| m.newest_file.as_mut()),
        ];
        for file in files.into_iter().flatten() {
            if file.is_relative() {
                *file = base.join(&*file);
            }
        }
        Ok(config)
    }

    /// Parses and validates configuration text.
    ///
    /// # Errors
    ///
    /// Syntax errors, unknown keys, and values out of range.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text)?;
        let pipeline = &config.pipeline;
        ensure(pipeline.lanes >= 1, "pipeline.lanes", "must be at least 1")?;
        ensure(
            config.plugins.rescan_seconds >= 1,
            "plugins.rescan_seconds",
            "must be at least 1",
        )?;
        ensure(
            (1..=100_000).contains(&config.plugins.instances),
            "plugins.instances",
            "must be between 1 and 100000",
        )?;
        ensure(
            pipeline.batch_size >= 1,
            "pipeline.batch_size",
            "must be at least 1",
        )?;
        ensure(
            pipeline.max_in_flight >= pipeline.batch_size,
            "pipeline.max_in_flight",
            "must be at least pipeline.batch_size",
        )?;
        ensure(
            !config.dead_letter.stream.is_empty(),
            "dead_letter.stream",
            "must not be empty",
        )?;
        ensure(
            !config.versioning.key_prefix.contains(['{', '}']),
            "versioning.key_prefix",
            "must not contain braces (they would change the hash slot)",
        )?;
        if let Some((key, rule)) = config.memcached.as_ref().and_then(MemcachedConfig::invalid) {
            return Err(ConfigError::Invalid { key, rule });
        }
        config.check_redis_or_files()?;
        let limits = SourceLimits {
            max_in_flight: pipeline.max_in_flight,
            cache_redis: config.redis.is_some(),
            cache_cluster: config.redis.as_ref().is_some_and(RedisConfig::is_cluster),
        };
        for source in &config.sources {
            source
                .kind()
                .validate(&limits)
                .map_err(|error| ConfigError::Source {
                    name: source.name(),
                    error,
                })?;
        }
        Ok(config)
    }

    /// `[redis]` is there, or Memcached is the cache and dead letters have their file; the
    /// Memcached-only keys are not set beside a Redis that takes their role.
    fn check_redis_or_files(&self) -> Result<(), ConfigError> {
        let file = self.dead_letter.file.is_some();
        let newest_file = self
            .memcached
            .as_ref()
            .is_some_and(|m| m.newest_file.is_some());
        match (&self.redis, &self.memcached) {
            (None, None) => ensure(
                false,
                "redis",
                "is required: it is the cache (or, with [memcached] as the cache, set dead_letter.file instead)",
            ),
            (None, Some(_)) => ensure(
                file,
                "dead_letter.file",
                "is required without [redis]: dead letters go to that JSONL file (with [redis], to the stream dead_letter.stream)",
            ),
            (Some(_), _) => {
                ensure(
                    !file,
                    "dead_letter.file",
                    "is only for a Memcached cache without [redis]: with [redis], dead letters go to the stream dead_letter.stream",
                )?;
                ensure(
                    !newest_file,
                    "memcached.newest_file",
                    "is only for a Memcached cache without [redis]: with [redis], the newest version written is kept in Redis",
                )
            }
        }
    }

    /// Where dead letters go when it is a file: `dead_letter.file`, without `[redis]` (with it,
    /// they go to the stream `dead_letter.stream`).
    pub fn letter_file(&self) -> Option<&Path> {
        match &self.redis {
            None => self.dead_letter.file.as_deref(),
            Some(_) => None,
        }
    }

    /// Without `[redis]`, the file that keeps the newest version written to Memcached:
    /// `memcached.newest_file`, else `dead_letter.file` with `.newest` appended.
    pub fn newest_file(&self) -> Option<PathBuf> {
        if self.redis.is_some() {
            return None;
        }
        let memcached = self.memcached.as_ref()?;
        memcached.newest_file.clone().or_else(|| {
            let mut path = self.dead_letter.file.clone()?.into_os_string();
            path.push(".newest");
            Some(path.into())
        })
    }

    /// The kind of cache plugin operations are written to.
    pub fn cache_kind(&self) -> CacheKind {
        if self.memcached.is_some() {
            CacheKind::Memcached
        } else {
            CacheKind::Redis
        }
    }

    /// The cache Redis, for what needs it by nature (the dead-letter stream, `keepwarm version`
    /// on a Redis cache).
    ///
    /// # Errors
    ///
    /// There is no `[redis]`; `what` says what needed it.
    pub fn require_redis(&self, what: &str) -> Result<&RedisConfig, ConfigError> {
        self.redis.as_ref().ok_or_else(|| ConfigError::NoRedis {
            what: what.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(all(
        feature = "sqs",
        feature = "kafka",
        feature = "nats",
        feature = "rabbitmq",
        feature = "postgres"
    ))]
    fn example_config_parses() {
        let text = include_str!("../../../config/example.toml");
        let config = Config::parse(text).unwrap();
        let names: Vec<String> = config.sources.iter().map(SourceConfig::name).collect();
        assert_eq!(
            names,
            [
                "redis-stream:sequin.changes",
                "sqs:sequin-changes.fifo",
                "kafka:keepwarm",
                "http:0.0.0.0:8080/sequin",
                "nats:SEQUIN",
                "rabbitmq:keepwarm.changes",
                "postgres:keepwarm",
            ]
        );
    }

    #[test]
    fn lanes_default_to_twice_the_cores_from_two_to_eight() {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        let lanes = PipelineConfig::default().lanes;
        assert_eq!(lanes, (2 * cores).clamp(2, 8));
        assert!((2..=8).contains(&lanes));
        let config = Config::parse(&format!(
            "{BASE}kind = \"redis-stream\"\nstream = \"s\"\ngroup = \"g\"\n[pipeline]\nlanes = 3\n"
        ))
        .unwrap();
        assert_eq!(config.pipeline.lanes, 3);
    }

    const BASE: &str = "[redis]\nurl = \"redis://x\"\n[plugins]\ndir = \"p\"\n[[source]]\n";

    /// The whole chain of the error, as the CLI prints it.
    fn chain(error: ConfigError) -> String {
        format!("{:#}", anyhow::Error::from(error))
    }

    fn source_error(source: &str) -> String {
        chain(Config::parse(&format!("{BASE}{source}")).unwrap_err())
    }

    #[test]
    #[cfg(feature = "sqs")]
    fn sqs_sources_take_defaults_and_reject_out_of_range_values() {
        let config = Config::parse(&format!(
            "{BASE}kind = \"sqs\"\nqueue_url = \"http://127.0.0.1:5000/1/q.fifo\"\nregion = \"us-east-1\"\n"
        ))
        .unwrap();
        let SourceConfig::Sqs(sqs) = &config.sources[0] else {
            panic!("not sqs")
        };
        assert_eq!(
            (
                sqs.receivers.get(),
                sqs.max_messages.get(),
                sqs.wait_time_seconds.get()
            ),
            (2, 10, 20)
        );
        assert_eq!(sqs.visibility_timeout_seconds.get(), 30);
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
    #[cfg(feature = "nats")]
    fn nats_sources_take_defaults_and_check_names_and_stream_creation() {
        let nats = "kind = \"nats\"\nurl = \"nats://127.0.0.1:4222\"\nstream = \"S\"\n";
        let config = Config::parse(&format!("{BASE}{nats}")).unwrap();
        let SourceConfig::Nats(source) = &config.sources[0] else {
            panic!("not nats")
        };
        assert_eq!(
            (
                source.consumer.as_str(),
                source.ack_wait_seconds.get(),
                source.max_messages.get(),
                source.create_stream
            ),
            ("keepwarm", 30, 500, false)
        );
        assert!(source_error(&format!("{nats}create_stream = true\n")).contains("subjects"));
        assert!(source_error(&format!("{nats}consumer = \"a.b\"\n")).contains("JetStream name"));
        assert!(source_error(&format!("{nats}ack_wait_seconds = 0\n")).contains("ack_wait"));
        assert!(source_error(&format!("{nats}subject = \"x\"\n")).contains("subject"));
    }

    #[test]
    #[cfg(feature = "rabbitmq")]
    fn rabbitmq_sources_need_one_amqp_url_and_keys_for_an_exchange() {
        let amqp = "kind = \"rabbitmq\"\nqueue = \"q\"\n";
        let url = "url = \"amqp://guest:guest@127.0.0.1:5672/%2f\"\n";
        let config = Config::parse(&format!("{BASE}{amqp}{url}")).unwrap();
        let SourceConfig::RabbitMq(source) = &config.sources[0] else {
            panic!("not rabbitmq")
        };
        assert!(source.declare_queue && source.exchange.is_none());
        assert_eq!(source.binding_keys[0].as_str(), "sequin.#");
        assert!(source_error(amqp).contains("exactly one of url and url_env"));
        assert!(source_error(&format!("{amqp}url = \"http://x\"\n")).contains("amqp://"));
        let no_keys = format!("{amqp}{url}exchange = \"x\"\nbinding_keys = []\n");
        assert!(source_error(&no_keys).contains("binding key"));
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
            (source.max_body_bytes.get(), source.ack_timeout_ms.get()),
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
        let error = chain(Config::parse(text).unwrap_err());
        assert!(error.contains("urll"), "{error}");
        let text = "[redis]\nurl = \"redis://x\"\n[plugins]\ndir = \"p\"\n[[source]]\nkind = \"redis-stream\"\nstream = \"s\"\ngroup = \"g\"\nblock = 5\n";
        let error = chain(Config::parse(text).unwrap_err());
        assert!(error.contains("block"), "{error}");
    }

    #[test]
    fn memcached_is_the_cache_when_its_table_is_there() {
        let redis_only = "[redis]\nurl = \"redis://x\"\n[plugins]\ndir = \"p\"\n";
        assert_eq!(
            Config::parse(redis_only).unwrap().cache_kind(),
            CacheKind::Redis
        );
        let config = Config::parse(&format!(
            "{redis_only}[memcached]\nservers = [\"127.0.0.1:11211\", \"mc2:11211\"]\n"
        ))
        .unwrap();
        assert_eq!(config.cache_kind(), CacheKind::Memcached);
        let memcached = config.memcached.unwrap();
        assert_eq!(memcached.servers.len(), 2);
        assert_eq!(memcached.max_value_bytes, (1 << 20) - 1024);
        for (table, key) in [
            ("servers = []", "memcached.servers"),
            ("servers = [\"nohost\"]", "host:port"),
            (
                "servers = [\"h:1\"]\nconnections_per_server = 0",
                "connections",
            ),
            ("servers = [\"h:1\"]\nserver = \"x\"", "server"),
        ] {
            let text = format!("{redis_only}[memcached]\n{table}\n");
            let error = chain(Config::parse(&text).unwrap_err());
            assert!(error.contains(key), "{table}: {error}");
        }
    }

    #[test]
    fn memcached_without_redis_needs_a_dead_letter_file_and_stream_sources_their_url() {
        let plugins = "[plugins]\ndir = \"p\"\n";
        let mc = "[memcached]\nservers = [\"127.0.0.1:11211\"]\n";
        let file = "[dead_letter]\nfile = \"/var/kw/dead.jsonl\"\n";
        let error = |text: &str| chain(Config::parse(text).unwrap_err());
        assert!(
            error(plugins).contains("redis is required"),
            "{}",
            error(plugins)
        );
        let no_file = error(&format!("{plugins}{mc}"));
        assert!(
            no_file.contains("dead_letter.file is required without [redis]"),
            "{no_file}"
        );
        let config = Config::parse(&format!("{plugins}{mc}{file}")).unwrap();
        assert!(config.redis.is_none());
        assert_eq!(config.cache_kind(), CacheKind::Memcached);
        assert_eq!(
            config.newest_file(),
            Some(PathBuf::from("/var/kw/dead.jsonl.newest"))
        );
        let own = format!("{plugins}{mc}newest_file = \"/var/kw/newest\"\n{file}");
        assert_eq!(
            Config::parse(&own).unwrap().newest_file(),
            Some(PathBuf::from("/var/kw/newest"))
        );
        // Beside a Redis, the files would go unused: refused.
        let redis = "[redis]\nurl = \"redis://x\"\n";
        let beside = error(&format!("{redis}{plugins}{mc}{file}"));
        assert!(beside.contains("dead_letter.file is only for"), "{beside}");
        let beside = error(&format!("{redis}{plugins}{mc}newest_file = \"n\"\n"));
        assert!(
            beside.contains("memcached.newest_file is only for"),
            "{beside}"
        );
        // A Redis Stream source needs a Redis: its own url without [redis].
        let stream = "[[source]]\nkind = \"redis-stream\"\nstream = \"s\"\ngroup = \"g\"\n";
        let no_url = error(&format!("{plugins}{mc}{file}{stream}"));
        assert!(
            no_url.contains("source redis-stream:s")
                && no_url.contains("url: is required without [redis]"),
            "{no_url}"
        );
        Config::parse(&format!("{plugins}{mc}{file}{stream}url = \"redis://h\"\n")).unwrap();
        // Nor can it default to a cache that is a cluster.
        let cluster = "[redis]\nurl = \"redis://x\"\ncluster = true\n";
        let on_cluster = error(&format!("{cluster}{plugins}{stream}"));
        assert!(
            on_cluster.contains("url: is required when [redis] is a Redis Cluster"),
            "{on_cluster}"
        );
        Config::parse(&format!("{cluster}{plugins}{stream}url = \"redis://h\"\n")).unwrap();
    }

    #[test]
    fn unknown_source_kind_is_rejected() {
        let text =
            "[redis]\nurl = \"redis://x\"\n[plugins]\ndir = \"p\"\n[[source]]\nkind = \"kafka\"\n";
        let error = chain(Config::parse(text).unwrap_err());
        assert!(error.contains("kafka"), "{error}");
    }
}
