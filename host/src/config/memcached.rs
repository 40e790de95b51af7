//! `[memcached]`: Memcached as the cache target instead of Redis.

use serde::Deserialize;

/// `[memcached]`: the Memcached servers plugin operations are written to. With several, each
/// key goes to one server chosen by a ketama consistent hash (see `applier/memcached/ring.rs`),
/// so that other ketama clients of the same pool find the keys.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemcachedConfig {
    /// The servers, as `host:port`, spelled as the other clients of the pool spell them (the
    /// ring hashes these names).
    pub servers: Vec<String>,
    /// How long one command may take before it counts as failed, in milliseconds.
    #[serde(default = "default_response_timeout_ms")]
    pub response_timeout_ms: u64,
    /// The largest value keepwarm stores, in bytes (versioned values count their 17-byte
    /// header). Memcached's default item size limit is 1 MiB (`-I`), which holds the key and
    /// about 50 bytes of item header too; a larger value is dead-lettered.
    #[serde(default = "default_max_value_bytes")]
    pub max_value_bytes: usize,
    /// Connections kept open to each server.
    #[serde(default = "default_connections")]
    pub connections_per_server: usize,
    /// Without `[redis]`: the file that keeps the newest version written to the pool, which
    /// raises the floor after a restart (`applier/memcached/newest.rs`). Default:
    /// `dead_letter.file` with `.newest` appended. Relative to the config file.
    #[serde(default)]
    pub newest_file: Option<std::path::PathBuf>,
}

fn default_response_timeout_ms() -> u64 {
    2_000
}

fn default_max_value_bytes() -> usize {
    (1 << 20) - 1024
}

fn default_connections() -> usize {
    8
}

impl MemcachedConfig {
    /// Why the table cannot be used, as a key and the rule it breaks.
    pub(super) fn invalid(&self) -> Option<(&'static str, &'static str)> {
        if self.servers.is_empty() {
            return Some(("memcached.servers", "must name at least one server"));
        }
        let valid = |server: &String| {
            server
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
        };
        if !self.servers.iter().all(valid) {
            return Some(("memcached.servers", "must be host:port"));
        }
        if self.response_timeout_ms == 0 {
            return Some(("memcached.response_timeout_ms", "must be at least 1"));
        }
        if self.max_value_bytes == 0 {
            return Some(("memcached.max_value_bytes", "must be at least 1"));
        }
        if self.connections_per_server == 0 {
            return Some(("memcached.connections_per_server", "must be at least 1"));
        }
        None
    }
}
