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
}
