//! The plugin manifest: the optional `<name>.toml` beside `<name>.wasm`.
//!
//! It says which changes the plugin subscribes to, how its writes are applied, what it may
//! write, its limits, and the `[config]` table handed to the plugin through the `config` import.
//! A lone `.wasm` runs with [`Manifest::default`].

use crate::message::{Action, ChangeMessage};
use crate::ops::{CacheKind, OpKind};
use anyhow::Context as _;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;

/// How a plugin's writes reach Redis.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Consistency {
    /// Each write carries the change's version and is skipped when Redis already holds a newer
    /// one for that key (or member). Redelivery and concurrent workers cannot move the cache
    /// back in time.
    #[default]
    Versioned,
    /// Last write wins, in arrival order.
    Plain,
}

/// Resource limits of one plugin.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Linear-memory cap per instance, in MiB; growing past it traps.
    pub memory_mb: u64,
    /// CPU deadline of one batch call, in milliseconds.
    pub deadline_ms: u64,
    /// At most this many operations for one change.
    pub max_ops_per_change: usize,
    /// At most this many bytes in the values and members of one operation.
    pub max_value_bytes: usize,
    /// An instance is recycled after this many calls.
    pub max_calls_per_instance: u64,
    /// More changes than this failing by trap, timeout or memory within `failure_window_secs`
    /// pause the plugin (its messages wait) with growing backoff.
    pub max_failures: u32,
    /// The window of `max_failures`, in seconds.
    pub failure_window_secs: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            memory_mb: 128,
            deadline_ms: 500,
            max_ops_per_change: 256,
            max_value_bytes: 4 << 20,
            max_calls_per_instance: 100_000,
            max_failures: 10,
            failure_window_secs: 60,
        }
    }
}

/// Capabilities a manifest may grant. Filesystem and network access are never granted.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Grants {
    /// Real wall and monotonic clocks; without it both read a fixed time (the Unix epoch).
    pub clock: bool,
    /// Environment variables passed through, by name; none by default.
    pub env: Vec<String>,
}

/// One self-test case: a change message and the operations (or error) it must produce.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelfTest {
    /// A name for reports.
    #[serde(default)]
    pub name: Option<String>,
    /// The change message, as Sequin JSON text.
    pub input: String,
    /// The expected operations in `keepwarm test`'s JSON form.
    #[serde(default)]
    pub expect: Option<serde_json::Value>,
    /// A substring the plugin's rejection reason must contain (instead of `expect`).
    #[serde(default)]
    pub expect_error: Option<String>,
}

/// A parsed and validated manifest.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Tables served, as `schema.table` or bare `table`; `None` serves every table.
    #[serde(default)]
    pub tables: Option<Vec<String>>,
    /// Actions served; `None` serves all four.
    #[serde(default)]
    pub actions: Option<Vec<ActionName>>,
    /// How writes are applied.
    #[serde(default)]
    pub consistency: Consistency,
    /// Key prefixes the plugin may write; `None` allows every key.
    #[serde(default)]
    pub key_prefixes: Option<Vec<String>>,
    /// The operations the plugin returns, by name (`set`, `del`, `hash-set`, …); `None` does not
    /// say. When given, a cache that lacks one of them (Memcached has no hashes, sets, sorted
    /// sets or publish) refuses the plugin at load, and an operation outside the list
    /// dead-letters its change.
    #[serde(default)]
    pub ops: Option<Vec<OpKind>>,
    /// Resource limits.
    #[serde(default)]
    pub limits: Limits,
    /// Configuration handed to the plugin, as JSON through the `config` import.
    #[serde(default)]
    pub config: BTreeMap<String, toml::Value>,
    /// Capabilities beyond pure computation (none by default).
    #[serde(default)]
    pub grants: Grants,
    /// Self-test cases run before a new version takes traffic.
    #[serde(default, rename = "test")]
    pub tests: Vec<SelfTest>,
}

/// An action name in a manifest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActionName {
    /// `insert`.
    Insert,
    /// `update`.
    Update,
    /// `delete`.
    Delete,
    /// `read`.
    Read,
}

impl ActionName {
    fn matches(self, action: Action) -> bool {
        matches!(
            (self, action),
            (ActionName::Insert, Action::Insert)
                | (ActionName::Update, Action::Update)
                | (ActionName::Delete, Action::Delete)
                | (ActionName::Read, Action::Read)
        )
    }
}

impl Manifest {
    /// Reads and validates a manifest file.
    ///
    /// # Errors
    ///
    /// The file cannot be read, is not TOML, has unknown keys, or fails validation.
    pub fn load(path: &Path) -> anyhow::Result<Manifest> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read manifest {}", path.display()))?;
        Manifest::parse(&text).with_context(|| format!("invalid manifest {}", path.display()))
    }

    /// Parses and validates manifest text.
    ///
    /// # Errors
    ///
    /// Syntax errors, unknown keys, and values out of range.
    pub fn parse(text: &str) -> anyhow::Result<Manifest> {
        let manifest: Manifest = toml::from_str(text)?;
        let limits = &manifest.limits;
        anyhow::ensure!(
            (1..=4096).contains(&limits.memory_mb),
            "limits.memory_mb must be 1..=4096"
        );
        anyhow::ensure!(
            limits.deadline_ms >= 1,
            "limits.deadline_ms must be at least 1"
        );
        anyhow::ensure!(
            limits.max_calls_per_instance >= 1,
            "limits.max_calls_per_instance must be at least 1"
        );
        if let Some(tables) = &manifest.tables {
            anyhow::ensure!(
                tables.iter().all(|t| !t.is_empty()),
                "tables must not hold an empty name"
            );
        }
        for test in &manifest.tests {
            anyhow::ensure!(
                test.expect.is_some() != test.expect_error.is_some(),
                "self-test {:?} needs exactly one of `expect` and `expect_error`",
                test.name.as_deref().unwrap_or("(unnamed)")
            );
        }
        Ok(manifest)
    }

    /// Whether this plugin wants the message.
    pub fn subscribes(&self, message: &ChangeMessage) -> bool {
        let table_ok = self.tables.as_ref().is_none_or(|tables| {
            tables.iter().any(|t| match t.split_once('.') {
                Some((schema, table)) => schema == message.schema() && table == message.table(),
                None => *t == message.table(),
            })
        });
        let action_ok = self
            .actions
            .as_ref()
            .is_none_or(|actions| actions.iter().any(|a| a.matches(message.action)));
        table_ok && action_ok
    }

    /// Whether the plugin may write `key`.
    pub fn allows_key(&self, key: &str) -> bool {
        self.key_prefixes
            .as_ref()
            .is_none_or(|prefixes| prefixes.iter().any(|p| key.starts_with(p.as_str())))
    }

    /// Whether the plugin may return an operation of `kind` (always, without an `ops` list).
    pub fn declares(&self, kind: OpKind) -> bool {
        self.ops.as_ref().is_none_or(|ops| ops.contains(&kind))
    }

    /// The first operation the manifest says the plugin uses (in `ops`, or in a self-test's
    /// expected operations) that `cache` cannot apply.
    pub fn unsupported_op(&self, cache: CacheKind) -> Option<OpKind> {
        let declared = self.ops.iter().flatten().copied();
        let expected = self
            .tests
            .iter()
            .filter_map(|test| test.expect.as_ref()?.as_array())
            .flatten()
            .filter_map(|op| OpKind::parse(op.get("op")?.as_str()?));
        declared.chain(expected).find(|kind| !cache.supports(*kind))
    }

    /// The `[config]` table as JSON object text.
    pub fn config_json(&self) -> String {
        serde_json::to_string(&self.config).unwrap_or_else(|_| "{}".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memcached_refuses_declared_and_expected_ops_it_lacks() {
        let declared = Manifest::parse("ops = [\"set\", \"hash-set\"]").unwrap();
        assert_eq!(
            declared.unsupported_op(CacheKind::Memcached),
            Some(OpKind::HashSet)
        );
        assert_eq!(declared.unsupported_op(CacheKind::Redis), None);
        assert!(declared.declares(OpKind::Set) && !declared.declares(OpKind::Del));
        let expected = Manifest::parse(
            "[[test]]\ninput = \"{}\"\nexpect = [{op = \"del\", key = \"k\"}, {op = \"publish\", channel = \"c\", message = \"m\"}]\n",
        )
        .unwrap();
        assert_eq!(
            expected.unsupported_op(CacheKind::Memcached),
            Some(OpKind::Publish)
        );
        assert!(Manifest::parse("ops = [\"incr\"]").is_err());
        assert_eq!(
            Manifest::default().unsupported_op(CacheKind::Memcached),
            None
        );
    }
}
