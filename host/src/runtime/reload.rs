//! Hot reload: watch the plugin directory, and when it settles, load what changed off the hot
//! path and swap the plugin set atomically.
//!
//! - Events are debounced: a rescan starts once the directory has been quiet for
//!   [`DEBOUNCE`], and a periodic rescan catches anything the watcher missed.
//! - A rescan compares each plugin's content hash (component and manifest) with the version
//!   serving. Only a changed plugin is loaded: compiled (or taken from the artifact cache),
//!   linked, instantiated and self-tested in a blocking task.
//! - A new version that fails any of that never serves: the previous version keeps serving and
//!   the failure is logged and shown in `keepwarm plugins`. A half-written file is simply a
//!   version that fails to load until its write completes and the next event rescans it.
//! - A load that finds the engine's instance pool full first drops the other plugins' idle
//!   instances to make room; if there is still none, the version is not counted as broken and
//!   the next rescan tries it again.
//! - The swap replaces the whole `PluginSet` in one `ArcSwap` store: a lane batch holds the set
//!   it started with until it is done, so batches in flight finish on the old version and the
//!   next batch uses the new one. A removed `.wasm` drops out of the set the same way.

use super::loader::{PluginSet, list_dir, load_source, read_files, register};
use super::{Plugin, Runtime};
use crate::telemetry::{Counters, Metrics};
use arc_swap::ArcSwap;
use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How long the directory must be quiet before a rescan.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// Watches `dir` and reloads plugins into `set` until shutdown.
///
/// # Errors
///
/// The directory cannot be watched.
pub async fn watch(
    runtime: Arc<Runtime>,
    dir: PathBuf,
    set: Arc<ArcSwap<PluginSet>>,
    rescan_every: Duration,
    counters: Arc<Counters>,
    shutdown: CancellationToken,
) -> Result<(), notify::Error> {
    let (tx, mut events) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        match event {
            // Reads (ours included, when we hash and load files) are not changes.
            Ok(event) if is_change(&event.kind) => {
                let _ = tx.send(());
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(error = %error, "plugin directory watch error"),
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    tracing::info!(dir = %dir.display(), "watching the plugin directory");
    let mut periodic = tokio::time::interval(rescan_every);
    periodic.tick().await;
    loop {
        tokio::select! {
            Some(()) = events.recv() => {
                // Debounce: wait until the directory has been quiet for a while.
                while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, events.recv()).await {}
            }
            _ = periodic.tick() => {}
            () = shutdown.cancelled() => return Ok(()),
        }
        let (runtime, dir, set) = (Arc::clone(&runtime), dir.clone(), Arc::clone(&set));
        let counters = Arc::clone(&counters);
        if let Err(error) =
            tokio::task::spawn_blocking(move || rescan(&runtime, &dir, &set, &counters.metrics))
                .await
        {
            tracing::error!(error = %error, "plugin rescan failed");
        }
    }
}

fn is_change(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// Compares the directory with the serving set and swaps in what changed. Returns whether the
/// set changed. Each load, failed load and removal is counted in `metrics`.
fn rescan(runtime: &Runtime, dir: &Path, set: &ArcSwap<PluginSet>, metrics: &Metrics) -> bool {
    let current = set.load_full();
    let files = match list_dir(dir) {
        Ok(files) => files,
        Err(error) => {
            tracing::warn!(
                error = %error,
                "cannot list the plugin directory; keeping the plugins loaded"
            );
            return false;
        }
    };
    let registry = runtime.registry();
    let failed_versions: Vec<(String, Option<String>)> = registry
        .snapshot()
        .into_iter()
        .map(|status| (status.name, status.failed_version))
        .collect();
    let mut next = Vec::with_capacity(files.len());
    let mut changed = false;
    for files in &files {
        let serving = current.plugins.iter().find(|p| p.name() == files.name);
        let source = match read_files(files) {
            Ok(source) => source,
            Err(error) => {
                // Gone between listing and reading (a rename in progress): keep what serves.
                tracing::debug!(plugin = %files.name, error = %error, "cannot read plugin files");
                next.extend(serving.cloned());
                continue;
            }
        };
        if serving.is_some_and(|p| p.version() == source.version) {
            // Unchanged, or a failed deploy rolled back to the serving files.
            registry.recovered(&files.name);
            next.extend(serving.cloned());
            continue;
        }
        let already_failed = failed_versions.iter().any(|(name, failed)| {
            *name == files.name && failed.as_deref() == Some(&source.version)
        });
        if already_failed {
            next.extend(serving.cloned());
            continue;
        }
        let version = source.version.clone();
        // Room in the engine's pool may be made from the idle instances of what serves and of
        // what this rescan loaded already.
        let others: Vec<Arc<Plugin>> = current.plugins.iter().chain(&next).cloned().collect();
        match load_source(runtime, source, &others) {
            Ok(loaded) => {
                let previous = serving.map(|p| p.version().to_owned());
                next.push(Arc::new(register(runtime, loaded, previous.as_deref())));
                metrics.reload(&files.name, "loaded");
                changed = true;
            }
            Err(error) => {
                let reason = error.to_string();
                let serving_version = serving.map(|p| p.version());
                // A full instance pool is not the plugin's fault: that version is not remembered
                // as failed, and the next rescan tries it again.
                let broken = !error.is_pool_full();
                if broken {
                    tracing::error!(
                        plugin = %files.name,
                        version = %version,
                        serving = serving_version,
                        error = %reason,
                        "plugin failed to load; the previous version keeps serving"
                    );
                } else {
                    tracing::warn!(
                        plugin = %files.name,
                        version = %version,
                        serving = serving_version,
                        error = %reason,
                        "no room in the instance pool to load the plugin; trying again at the next rescan"
                    );
                }
                registry.failed(&files.name, broken.then_some(version.as_str()), &reason);
                metrics.reload(&files.name, "failed");
                next.extend(serving.cloned());
            }
        }
    }
    for plugin in &current.plugins {
        if !files.iter().any(|f| f.name == plugin.name()) {
            tracing::info!(
                plugin = plugin.name(),
                version = plugin.version(),
                "plugin removed; unloading after its in-flight work"
            );
            registry.removed(plugin.name());
            metrics.reload(plugin.name(), "removed");
            changed = true;
        }
    }
    for status in registry.snapshot() {
        if !files.iter().any(|f| f.name == status.name) {
            registry.removed(&status.name);
        }
    }
    if changed {
        set.store(Arc::new(PluginSet { plugins: next }));
    }
    changed
}
