//! Logging setup and the daemon's counters.

use std::sync::atomic::{AtomicU64, Ordering};

/// Installs the `tracing` subscriber: human-readable lines on stderr, filtered by `RUST_LOG`
/// (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Counters of what the pipeline did, shared by every lane.
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

    /// The counters in the Prometheus text format, for `GET /metrics`.
    pub fn prometheus(&self) -> String {
        let counters = [
            (
                "keepwarm_messages_received_total",
                "Messages handed to the pipeline.",
                &self.received,
            ),
            (
                "keepwarm_messages_applied_total",
                "Messages whose operations Redis confirmed.",
                &self.applied,
            ),
            (
                "keepwarm_messages_dead_lettered_total",
                "Messages written to the dead-letter stream.",
                &self.dead_lettered,
            ),
            (
                "keepwarm_stale_writes_skipped_total",
                "Versioned writes skipped because Redis held a newer version.",
                &self.stale_skipped,
            ),
            (
                "keepwarm_messages_unrouted_total",
                "Messages no plugin subscribed to.",
                &self.unrouted,
            ),
            (
                "keepwarm_apply_retries_total",
                "Batches retried because Redis was unavailable.",
                &self.apply_retries,
            ),
        ];
        let mut text = String::new();
        for (name, help, counter) in counters {
            text.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}\n",
                Counters::get(counter)
            ));
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_render_as_prometheus_text() {
        let counters = Counters::default();
        Counters::add(&counters.stale_skipped, 3);
        let text = counters.prometheus();
        assert!(text.contains(
            "# TYPE keepwarm_stale_writes_skipped_total counter\nkeepwarm_stale_writes_skipped_total 3\n"
        ));
        assert_eq!(text.lines().filter(|l| !l.starts_with('#')).count(), 6);
    }
}
