//! `[[source]] kind = "kafka"`.

use super::KafkaSource;
use crate::sources::{Built, Source, SourceConfigError, SourceConfigure, SourceEnv, SourceLimits};
use crate::valid::{Bounded, NonEmpty};
use rdkafka::ClientConfig;
use serde::Deserialize;
use std::collections::BTreeMap;

/// Topics written by Sequin's Kafka sink, read through a consumer group with automatic commit
/// off: an offset is committed only once every message before it is applied.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSourceConfig {
    /// Bootstrap brokers, `host:port[,host:port…]`.
    pub brokers: NonEmpty,
    /// Topics to read (Sequin's default with routing is `sequin.<schema>.<table>`).
    pub topics: Vec<NonEmpty>,
    /// The consumer group.
    pub group_id: NonEmpty,
    /// The client id the brokers see (default `keepwarm`).
    #[serde(default)]
    pub client_id: Option<NonEmpty>,
    /// Where a partition without a committed offset starts.
    #[serde(default)]
    pub auto_offset_reset: OffsetReset,
    /// The group session timeout: a member silent for this long is dropped and its partitions
    /// are given to the others.
    #[serde(default = "default_session_timeout_ms")]
    pub session_timeout_ms: Bounded<1_000, 3_600_000>,
    /// How long a revoke waits for the revoked partitions' in-flight messages to be applied
    /// before it commits what is applied and lets them go (the rest is redelivered to the new
    /// owner).
    #[serde(default = "default_revoke_timeout_ms")]
    pub revoke_timeout_ms: Bounded<0, 600_000>,
    /// How often applied offsets are committed.
    #[serde(default = "default_commit_interval_ms")]
    pub commit_interval_ms: Bounded<10, 60_000>,
    /// librdkafka properties passed through as they are, e.g. `"security.protocol" = "ssl"`,
    /// `"ssl.ca.location"`, `"sasl.mechanism"`. Those keepwarm sets itself are refused.
    #[serde(default)]
    pub librdkafka: BTreeMap<String, String>,
}

/// `auto_offset_reset`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OffsetReset {
    /// From the oldest message kept (the default: nothing written before the first start is
    /// skipped).
    #[default]
    Earliest,
    /// Only messages written after the group first joined.
    Latest,
}

impl OffsetReset {
    fn as_str(self) -> &'static str {
        match self {
            OffsetReset::Earliest => "earliest",
            OffsetReset::Latest => "latest",
        }
    }
}

fn default_session_timeout_ms() -> Bounded<1_000, 3_600_000> {
    Bounded::of(45_000)
}
/// librdkafka's default `max.poll.interval.ms`.
const DEFAULT_MAX_POLL_INTERVAL_MS: u64 = 300_000;

fn default_revoke_timeout_ms() -> Bounded<0, 600_000> {
    Bounded::of(10_000)
}
fn default_commit_interval_ms() -> Bounded<10, 60_000> {
    Bounded::of(1_000)
}

/// Properties keepwarm sets itself; passing them through would break its guarantees or its
/// configuration keys.
const OWNED: &[&str] = &[
    "bootstrap.servers",
    "metadata.broker.list",
    "group.id",
    "client.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.offset.reset",
    "session.timeout.ms",
    "statistics.interval.ms",
];

/// How often librdkafka reports its statistics (lag, broker states).
pub(super) const STATISTICS_INTERVAL_MS: u64 = 1_000;

/// librdkafka properties keepwarm changes from librdkafka's defaults; `[librdkafka]` overrides
/// them. Public for the bench's native consumer, which reads with the same tuning.
///
/// - `queued.max.messages.kbytes`: the prefetched messages held in memory, 64 MiB by default.
///   16 MiB is a quarter of a second of a busy topic at the bench's 100,000 msg/s, and cut
///   the daemon's peak memory there by a third (docs/bench.md, round 9).
/// - `fetch.queue.backoff.ms`: how long librdkafka waits before fetching again once that much
///   is held, 1 s by default. A consumer that drains the queue faster than that sits idle:
///   with 8 MiB held, the bench's throughput fell to a seventh. 10 ms refills it as it drains.
pub const TUNED: &[(&str, &str)] = &[
    ("queued.max.messages.kbytes", "16384"),
    ("fetch.queue.backoff.ms", "10"),
];

impl KafkaSourceConfig {
    /// The client configuration: keepwarm's tuning, the pass-through properties, then the
    /// properties keepwarm owns.
    pub(super) fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        for (key, value) in TUNED {
            config.set(*key, *value);
        }
        for (key, value) in &self.librdkafka {
            config.set(key, value);
        }
        config
            .set("bootstrap.servers", self.brokers.as_str())
            .set("group.id", self.group_id.as_str())
            .set(
                "client.id",
                self.client_id.as_ref().map_or("keepwarm", |id| id.as_str()),
            )
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", self.auto_offset_reset.as_str())
            .set("session.timeout.ms", self.session_timeout_ms.to_string())
            .set("statistics.interval.ms", STATISTICS_INTERVAL_MS.to_string());
        config
    }
}

impl SourceConfigure for KafkaSourceConfig {
    fn name(&self) -> String {
        format!("kafka:{}", self.group_id)
    }

    fn validate(&self, _limits: &SourceLimits) -> Result<(), SourceConfigError> {
        if self.topics.is_empty() {
            return Err(SourceConfigError::new("topics", "name at least one topic"));
        }
        if let Some(key) = self.librdkafka.keys().find(|k| OWNED.contains(&k.as_str())) {
            return Err(SourceConfigError::new(
                "librdkafka",
                format!("{key:?} is set by keepwarm (use the source's own keys)"),
            ));
        }
        // librdkafka checks every property (name, value, whether this build supports it)
        // without connecting.
        self.client_config()
            .create_native_config()
            .map_err(|error| SourceConfigError::new("librdkafka", error.to_string()))?;
        // The revoke waits inside the poll thread's rebalance callback: past the group's poll
        // interval the member is thrown out, and the applied prefix cannot be committed.
        let poll_interval_ms = self
            .librdkafka
            .get("max.poll.interval.ms")
            .and_then(|ms| ms.parse::<u64>().ok())
            .unwrap_or(DEFAULT_MAX_POLL_INTERVAL_MS);
        if self.revoke_timeout_ms.get() >= poll_interval_ms {
            return Err(SourceConfigError::new(
                "revoke_timeout_ms",
                format!(
                    "must be below max.poll.interval.ms ({poll_interval_ms} ms): a revoke that \
                     waits longer gets this member thrown out of the group"
                ),
            ));
        }
        Ok(())
    }

    fn build(self: Box<Self>, _env: SourceEnv) -> Built {
        Box::pin(async move { Ok(Box::new(KafkaSource { config: *self }) as Box<dyn Source>) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &str) -> Result<KafkaSourceConfig, String> {
        let text = format!("brokers = \"127.0.0.1:9092\"\ngroup_id = \"g\"\n{extra}");
        let config: KafkaSourceConfig = toml::from_str(&text).map_err(|e| e.to_string())?;
        config
            .validate(&SourceLimits {
                max_in_flight: 10,
                cache_redis: true,
                cache_cluster: false,
            })
            .map_err(|e| e.to_string())?;
        Ok(config)
    }

    #[test]
    fn a_minimal_table_has_the_safe_defaults() {
        let config = parse("topics = [\"sequin.public.orders\"]").unwrap();
        assert_eq!(config.auto_offset_reset, OffsetReset::Earliest);
        assert_eq!(config.name(), "kafka:g");
        let client = config.client_config();
        assert_eq!(client.get("enable.auto.commit"), Some("false"));
        assert_eq!(client.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(client.get("auto.offset.reset"), Some("earliest"));
        assert_eq!(client.get("queued.max.messages.kbytes"), Some("16384"));
        assert_eq!(client.get("fetch.queue.backoff.ms"), Some("10"));
    }

    #[test]
    fn the_tuned_properties_give_way_to_the_librdkafka_table() {
        let config =
            parse("topics = [\"t\"]\n[librdkafka]\n\"queued.max.messages.kbytes\" = \"65536\"")
                .unwrap();
        let client = config.client_config();
        assert_eq!(client.get("queued.max.messages.kbytes"), Some("65536"));
        assert_eq!(client.get("fetch.queue.backoff.ms"), Some("10"));
    }

    #[test]
    fn bad_tables_are_refused_with_the_key_at_fault() {
        assert!(parse("topics = []").unwrap_err().contains("topics"));
        let owned = parse("topics = [\"t\"]\n[librdkafka]\n\"enable.auto.commit\" = \"true\"");
        assert!(owned.unwrap_err().contains("set by keepwarm"));
        let unknown = parse("topics = [\"t\"]\n[librdkafka]\n\"no.such.property\" = \"1\"");
        assert!(unknown.unwrap_err().contains("no.such.property"));
        let reset = parse("topics = [\"t\"]\nauto_offset_reset = \"middle\"");
        assert!(reset.unwrap_err().contains("unknown variant"));
        assert!(parse("topics = [\"t\"]\ngroup = \"x\"").is_err());
        let revoke = parse("topics = [\"t\"]\nrevoke_timeout_ms = 300000");
        assert!(
            revoke
                .unwrap_err()
                .contains("max.poll.interval.ms (300000 ms)")
        );
        let longer =
            "revoke_timeout_ms = 400000\n[librdkafka]\n\"max.poll.interval.ms\" = \"500000\"";
        parse(&format!("topics = [\"t\"]\n{longer}")).unwrap();
        // TLS and SASL/SCRAM settings pass through (OpenSSL is built in).
        parse("topics = [\"t\"]\n[librdkafka]\n\"security.protocol\" = \"ssl\"").unwrap();
        let scram = "\"security.protocol\" = \"sasl_ssl\"\n\"sasl.mechanism\" = \"SCRAM-SHA-512\"\n\
                     \"sasl.username\" = \"u\"\n\"sasl.password\" = \"p\"";
        parse(&format!("topics = [\"t\"]\n[librdkafka]\n{scram}")).unwrap();
    }
}
