//! Logging setup, the daemon's counters and its Prometheus metrics.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the `tracing` subscriber on stderr, filtered by `RUST_LOG` (default `info`, with
/// the replication client's per-second feedback lines left out): human-readable lines, or one
/// JSON object per line.
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,pg_walstream=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        LogFormat::Json => builder.json().with_ansi(false).try_init(),
    };
}

/// Counters of what the pipeline did, shared by every lane, with the labelled metrics behind
/// `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    /// Messages handed to the pipeline.
    pub received: AtomicU64,
    /// Messages whose operations Redis confirmed.
    pub applied: AtomicU64,
    /// Messages written to the dead-letter stream (one per failing plugin or reason).
    pub dead_lettered: AtomicU64,
    /// Writes skipped because Redis held a newer version.
    pub stale_skipped: AtomicU64,
    /// Messages no plugin subscribed to (acknowledged with nothing to do).
    pub unrouted: AtomicU64,
    /// Batches retried because Redis was unavailable.
    pub apply_retries: AtomicU64,
    /// The same, labelled, and more: what `/metrics` serves.
    pub metrics: Metrics,
    /// Whether each source is connected, for `/readyz`.
    sources: std::sync::Mutex<std::collections::BTreeMap<String, bool>>,
}

impl Counters {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Records whether the source `name` is connected (`/readyz`, `keepwarm_source_up`).
    pub fn source_up(&self, name: &str, up: bool) {
        self.sources
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_owned(), up);
        self.metrics
            .source_up
            .get_or_create(&source(name))
            .set(i64::from(up));
    }

    /// Every source and whether it is connected.
    pub fn sources(&self) -> std::collections::BTreeMap<String, bool> {
        self.sources
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Labels `source`.
pub type SourceLabel = [(&'static str, String); 1];
/// Labels `source` and `plugin`.
pub type SourcePluginLabels = [(&'static str, String); 2];
/// Labels `source`, `plugin` and `kind`.
pub type DeadLetterLabels = [(&'static str, String); 3];
/// Labels `plugin`.
pub type PluginLabel = [(&'static str, String); 1];
/// Labels `plugin` and `outcome`.
pub type ReloadLabels = [(&'static str, String); 2];
/// Labels of a Kafka partition's gauges: `source`, `topic`, `partition`.
pub type PartitionLabels = [(&'static str, String); 3];

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 0.1 ms to about 3.3 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

/// The Prometheus metrics (served as OpenMetrics text at `/metrics`).
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Messages read, by source.
    pub received: Family<SourceLabel, Counter>,
    /// Messages no plugin subscribed to, by source.
    pub unrouted: Family<SourceLabel, Counter>,
    /// Messages applied, by source and plugin.
    pub applied: Family<SourcePluginLabels, Counter>,
    /// Dead letters written, by source, plugin (empty for decode failures) and kind.
    pub dead_lettered: Family<DeadLetterLabels, Counter>,
    /// Writes skipped because Redis held a newer version, by source and plugin.
    pub stale_skipped: Family<SourcePluginLabels, Counter>,
    /// Apply attempts that failed and were retried.
    pub apply_retries: Counter,
    /// Plugin batch call latency, by plugin.
    pub plugin_call_seconds: HistogramFamily<PluginLabel>,
    /// Redis apply latency (one pipeline per batch).
    pub redis_apply_seconds: Histogram,
    /// Plugin loads at reload, by plugin and outcome (`loaded`, `failed`, `removed`).
    pub reloads: Family<ReloadLabels, Counter>,
    /// Redis Stream entries pending in the consumer group (delivered, not acknowledged).
    pub stream_pending: Family<SourceLabel, Gauge>,
    /// Redis Stream entries not yet delivered to the consumer group.
    pub stream_lag: Family<SourceLabel, Gauge>,
    /// SQS `ApproximateNumberOfMessages` (visible messages waiting).
    pub sqs_visible: Family<SourceLabel, Gauge>,
    /// SQS `ApproximateNumberOfMessagesNotVisible` (received, not deleted).
    pub sqs_in_flight: Family<SourceLabel, Gauge>,
    /// Kafka messages of an assigned partition not yet committed by the group (from the
    /// committable offset to the partition's end), by source, topic and partition.
    pub kafka_lag: Family<PartitionLabels, Gauge>,
    /// WAL a Postgres source's replication slot holds back, in bytes (the server's current
    /// LSN minus the slot's confirmed flush LSN).
    pub pg_slot_lag_bytes: Family<SourceLabel, Gauge>,
    /// 1 while a source is connected (its last read or receive worked), 0 otherwise.
    pub source_up: Family<SourceLabel, Gauge>,
    /// Messages a broker delivered again (a JetStream delivery count above 1, AMQP's
    /// `redelivered` flag), by source.
    pub redelivered: Family<SourceLabel, Counter>,
    /// Messages waiting in a broker for this source, not yet delivered to it (a JetStream
    /// consumer's `num_pending`, a RabbitMQ queue's ready messages).
    pub backlog: Family<SourceLabel, Gauge>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        let mut registry = Registry::with_prefix("keepwarm");
        let metrics = Metrics {
            received: Family::default(),
            unrouted: Family::default(),
            applied: Family::default(),
            dead_lettered: Family::default(),
            stale_skipped: Family::default(),
            apply_retries: Counter::default(),
            plugin_call_seconds: Family::new_with_constructor(latency_histogram),
            redis_apply_seconds: latency_histogram(),
            reloads: Family::default(),
            stream_pending: Family::default(),
            stream_lag: Family::default(),
            sqs_visible: Family::default(),
            sqs_in_flight: Family::default(),
            kafka_lag: Family::default(),
            pg_slot_lag_bytes: Family::default(),
            source_up: Family::default(),
            redelivered: Family::default(),
            backlog: Family::default(),
            registry: Registry::default(),
        };
        let m = &metrics;
        registry.register(
            "messages_received",
            "Messages read from a source",
            m.received.clone(),
        );
        registry.register(
            "messages_unrouted",
            "Messages no plugin subscribed to (acknowledged without a write)",
            m.unrouted.clone(),
        );
        registry.register(
            "messages_applied",
            "Messages whose operations Redis confirmed, per plugin",
            m.applied.clone(),
        );
        registry.register(
            "messages_dead_lettered",
            "Messages written to the dead-letter stream",
            m.dead_lettered.clone(),
        );
        registry.register(
            "writes_stale_skipped",
            "Versioned writes skipped because Redis held a newer version",
            m.stale_skipped.clone(),
        );
        registry.register(
            "apply_retries",
            "Redis apply attempts that failed and were retried",
            m.apply_retries.clone(),
        );
        registry.register(
            "plugin_call_seconds",
            "Latency of one plugin batch call",
            m.plugin_call_seconds.clone(),
        );
        registry.register(
            "redis_apply_seconds",
            "Latency of one Redis apply (one pipeline per batch)",
            m.redis_apply_seconds.clone(),
        );
        registry.register(
            "plugin_reloads",
            "Plugin reloads by outcome (loaded, failed, removed)",
            m.reloads.clone(),
        );
        registry.register(
            "stream_pending",
            "Redis Stream entries delivered to the group and not acknowledged",
            m.stream_pending.clone(),
        );
        registry.register(
            "stream_lag",
            "Redis Stream entries not yet delivered to the group",
            m.stream_lag.clone(),
        );
        registry.register(
            "sqs_messages_visible",
            "SQS ApproximateNumberOfMessages",
            m.sqs_visible.clone(),
        );
        registry.register(
            "sqs_messages_in_flight",
            "SQS ApproximateNumberOfMessagesNotVisible",
            m.sqs_in_flight.clone(),
        );
        registry.register(
            "kafka_lag",
            "Kafka messages of an assigned partition not yet committed by the group",
            m.kafka_lag.clone(),
        );
        registry.register(
            "postgres_slot_lag_bytes",
            "WAL the Postgres replication slot holds back (current LSN minus confirmed flush LSN)",
            m.pg_slot_lag_bytes.clone(),
        );
        registry.register(
            "source_up",
            "1 while the source is connected (its last read worked), else 0",
            m.source_up.clone(),
        );
        registry.register(
            "messages_redelivered",
            "Messages a broker delivered again (JetStream delivery count above 1, AMQP redelivered)",
            m.redelivered.clone(),
        );
        registry.register(
            "source_backlog",
            "Messages waiting in a broker, not yet delivered (JetStream num_pending, RabbitMQ ready)",
            m.backlog.clone(),
        );
        Metrics {
            registry,
            ..metrics
        }
    }
}

impl Metrics {
    /// The metrics as OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Counts a reload outcome for `plugin`.
    pub fn reload(&self, plugin: &str, outcome: &str) {
        self.reloads
            .get_or_create(&[
                ("plugin", plugin.to_owned()),
                ("outcome", outcome.to_owned()),
            ])
            .inc();
    }

    /// Records a plugin call's latency.
    pub fn plugin_call(&self, plugin: &str, took: Duration) {
        self.plugin_call_seconds
            .get_or_create(&[("plugin", plugin.to_owned())])
            .observe(took.as_secs_f64());
    }
}

/// Labels for a source.
pub fn source(source: &str) -> SourceLabel {
    [("source", source.to_owned())]
}

/// Labels for a source and a plugin.
pub fn source_plugin(source: &str, plugin: &str) -> SourcePluginLabels {
    [("source", source.to_owned()), ("plugin", plugin.to_owned())]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_encode_with_labels() {
        let m = Metrics::default();
        m.applied
            .get_or_create(&source_plugin("redis-stream:s", "row-cache"))
            .inc_by(3);
        m.plugin_call("row-cache", Duration::from_millis(2));
        let text = m.encode();
        assert!(
            text.contains(
                "keepwarm_messages_applied_total{source=\"redis-stream:s\",plugin=\"row-cache\"} 3"
            ),
            "{text}"
        );
        assert!(text.contains("keepwarm_plugin_call_seconds_count{plugin=\"row-cache\"} 1"));
    }
}
