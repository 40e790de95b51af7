//! What `keepwarm plugins` shows: each plugin's version, tables, state and load details.

use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Where a plugin stands: serving, failing to load, or paused (the `state` of its row).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum PluginPhase {
    /// The loaded version serves traffic.
    Serving,
    /// A newer file failed to load; the previous version keeps serving.
    FailedToReload,
    /// The plugin failed to load and has no version serving.
    Failed,
    /// Its calls kept failing: it is paused with backoff and its messages wait.
    Paused,
}

/// One row of `keepwarm plugins`.
#[derive(Debug, Clone, Serialize)]
pub struct PluginStatus {
    /// The file stem.
    pub name: String,
    /// The version serving traffic, if any.
    pub version: Option<String>,
    /// Tables it serves (`None`: every table).
    pub tables: Option<Vec<String>>,
    /// Serving, failed to reload, failed, or paused.
    pub state: PluginPhase,
    /// Why the last load failed.
    pub error: Option<String>,
    /// The version that failed to load.
    pub failed_version: Option<String>,
    /// When the serving version was loaded (Unix seconds).
    pub loaded_at: Option<u64>,
    /// How long loading the serving version took, in milliseconds.
    pub load_ms: Option<u64>,
    /// Whether the serving version was compiled or taken from the artifact cache.
    pub compiled: Option<&'static str>,
    /// The plugin contract the serving version implements (`0.2.0`, or `0.1.0` before it).
    pub contract: Option<&'static str>,
    /// Until when the plugin is paused (Unix milliseconds), when it was paused.
    pub paused_until_ms: Option<u64>,
}

/// The status of every plugin, kept by the loader and read by the admin endpoint.
#[derive(Debug, Default)]
pub struct StatusBoard {
    plugins: Mutex<BTreeMap<String, PluginStatus>>,
}

impl StatusBoard {
    /// Records a successful load of `name`.
    pub(crate) fn loaded(
        &self,
        name: &str,
        version: &str,
        tables: Option<Vec<String>>,
        load_ms: u64,
        compiled: &'static str,
        contract: &'static str,
    ) {
        self.lock().insert(
            name.to_owned(),
            PluginStatus {
                name: name.to_owned(),
                version: Some(version.to_owned()),
                tables,
                state: PluginPhase::Serving,
                error: None,
                failed_version: None,
                loaded_at: Some(now_secs()),
                load_ms: Some(load_ms),
                compiled: Some(compiled),
                contract: Some(contract),
                paused_until_ms: None,
            },
        );
    }

    /// Records a failed load of `name`; a version already serving keeps serving.
    pub(crate) fn failed(&self, name: &str, version: Option<&str>, error: &str) {
        let mut plugins = self.lock();
        let entry = plugins
            .entry(name.to_owned())
            .or_insert_with(|| PluginStatus {
                name: name.to_owned(),
                version: None,
                tables: None,
                state: PluginPhase::Failed,
                error: None,
                failed_version: None,
                loaded_at: None,
                load_ms: None,
                compiled: None,
                contract: None,
                paused_until_ms: None,
            });
        entry.state = if entry.version.is_some() {
            PluginPhase::FailedToReload
        } else {
            PluginPhase::Failed
        };
        entry.error = Some(error.to_owned());
        entry.failed_version = version.map(str::to_owned);
    }

    /// Clears a failure once the directory holds the serving version again.
    pub(crate) fn recovered(&self, name: &str) {
        if let Some(entry) = self.lock().get_mut(name)
            && entry.version.is_some()
        {
            entry.state = PluginPhase::Serving;
            entry.error = None;
            entry.failed_version = None;
        }
    }

    /// Forgets a plugin whose files were removed.
    pub(crate) fn removed(&self, name: &str) {
        self.lock().remove(name);
    }

    /// Records that `name` is paused for `pause`.
    pub(crate) fn paused(&self, name: &str, pause: std::time::Duration) {
        if let Some(entry) = self.lock().get_mut(name) {
            entry.paused_until_ms = Some(now_ms() + pause.as_millis() as u64);
        }
    }

    /// Every plugin's status, by name.
    pub fn snapshot(&self) -> Vec<PluginStatus> {
        let now = now_ms();
        self.lock()
            .values()
            .cloned()
            .map(|mut status| {
                if status.paused_until_ms.is_some_and(|until| until > now) {
                    status.state = PluginPhase::Paused;
                }
                status
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, PluginStatus>> {
        self.plugins.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
