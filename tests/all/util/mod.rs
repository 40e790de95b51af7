//! The integration-test harness: real Redis, real plugins, the real daemon.
//!
//! `scripts/test.sh` starts a private Redis and exports `REDIS_URL`, and builds the plugins into
//! `KEEPWARM_PLUGINS`. Without them the suite fails loudly rather than skipping. Every test uses
//! its own stream, group and key prefix, so tests run in parallel against one Redis.
//!
//! - [`TestEnv`] (`env.rs`): one test's stream, key prefix and plugins; it builds the daemon's
//!   config ([`ConfigBuilder`], `config.rs`), runs it ([`Daemon`]), feeds the stream and waits
//!   for the group to drain (`streams.rs`, typed `XINFO`/`XPENDING`/`XRANGE` replies).
//! - [`Keys`] (`keys.rs`): what the cache holds; [`DeadLetter`]: what the dead-letter stream holds.
//! - `messages.rs`: Sequin messages made from the fixtures.
//! - `server.rs`: a redis-server of a test's own; `process.rs`: the `keepwarm` binary;
//!   `http.rs`: the admin endpoint and `/metrics`; `proxy.rs`: a TCP proxy whose connections a
//!   test drops (a broker connection lost without stopping a shared broker).

mod config;
mod env;
mod http;
mod keys;
mod messages;
mod process;
mod proxy;
mod server;
mod streams;

pub use config::{ConfigBuilder, Daemon};
pub use env::{TestEnv, add_plugin, row_cache_manifest};
pub use http::{free_port, http_get, metric, plugins_status, wait_gauges_zero};
pub use keys::{
    DeadLetter, Keys, connect, find_letters, malformed_letters, malformed_then_good, version_key,
};
pub use messages::{
    FIXTURES, fixtures, move_row, order_change, order_line, record_text, stream_fields,
};
pub use process::{
    KeepwarmProcess, keepwarm_cli, keepwarm_cli_async, keepwarm_cli_env, target_dir,
};
pub use proxy::TcpProxy;
pub use server::RedisServer;
pub use streams::{Group, xadd_sequin};

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long a wait for the daemon lasts before the test fails: generous, for a loaded CI machine.
pub const PATIENCE: Duration = Duration::from_secs(120);

/// The suite's Redis, from `scripts/test.sh`.
pub fn redis_url() -> String {
    std::env::var("REDIS_URL")
        .expect("REDIS_URL is not set: run the suite with scripts/test.sh, which starts Redis")
}

/// A plugin of `plugins/`, built by `scripts/build-plugins.sh`.
pub fn plugin_wasm(name: &str) -> PathBuf {
    built("KEEPWARM_PLUGINS", name)
}

/// A plugin of `tests/plugins/`, built by `scripts/build-plugins.sh`.
pub fn test_plugin_wasm(name: &str) -> PathBuf {
    built("KEEPWARM_TEST_PLUGINS", name)
}

fn built(var: &str, name: &str) -> PathBuf {
    let dir = std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: run the suite with scripts/test.sh, which builds the plugins")
    });
    let path = Path::new(&dir).join(format!("{name}.wasm"));
    assert!(path.is_file(), "plugin {} is not built", path.display());
    path
}

/// A name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{prefix}-{}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        nanos % 1_000_000_000
    )
}

/// A directory removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        let path = std::env::temp_dir().join(unique(prefix));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `name` in the directory; returns its path as text, for command lines.
    pub fn write(&self, name: &str, text: &str) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Waits for a condition to hold, checking it every 20 ms; panics with `what` after `limit`.
pub async fn wait_for<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Serialises the tests that compile or load large guests (builds of new plugin projects, the
/// Python component): run together on a small machine they would starve every other test.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Takes the heavy-test lock from a plain `#[test]`.
pub fn heavy_test() -> tokio::sync::MutexGuard<'static, ()> {
    HEAVY.blocking_lock()
}

/// Takes the heavy-test lock from a `#[tokio::test]`.
pub async fn heavy_test_async() -> tokio::sync::MutexGuard<'static, ()> {
    HEAVY.lock().await
}
