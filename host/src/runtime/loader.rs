//! Loading plugins from disk: `<name>.wasm` plus the optional `<name>.toml` manifest.
//!
//! A plugin's version is the content hash of both files, so a manifest-only change is a new
//! version too. Loading compiles, pre-links, checks the exported contract version, instantiates
//! once and runs the manifest's self-tests; only a plugin that passes all of that is returned.

use super::cache::Compiled;
use super::contract::Pre;
use super::error::{LoadError, PluginError};
use super::state::PluginIdent;
use super::{Plugin, Runtime};
use crate::manifest::Manifest;
use crate::message::ChangeMessage;
use sha2::{Digest as _, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The plugins serving traffic, sorted by name.
#[derive(Default)]
pub struct PluginSet {
    /// The plugins, in name order.
    pub plugins: Vec<Arc<Plugin>>,
}

impl PluginSet {
    /// The plugins subscribed to a message, in name order.
    pub fn routes<'a>(
        &'a self,
        message: &'a ChangeMessage,
    ) -> impl Iterator<Item = &'a Arc<Plugin>> + 'a {
        self.plugins
            .iter()
            .filter(move |plugin| plugin.manifest.subscribes(message))
    }

    /// The plugin serving under `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<Plugin>> {
        self.plugins.iter().find(|plugin| plugin.name() == name)
    }
}

/// The files of one plugin on disk.
#[derive(Debug, Clone)]
pub struct PluginFiles {
    /// The plugin's name: the file stem.
    pub name: String,
    /// The component's path.
    pub wasm: PathBuf,
    /// The manifest's path, when there is one.
    pub manifest: Option<PathBuf>,
}

/// Lists the plugins in a directory: every `*.wasm` file (hidden files aside, so temporary
/// names of a write-then-rename deploy are never loaded), with `<stem>.toml` when it exists.
///
/// # Errors
///
/// The directory cannot be read.
pub fn list_dir(dir: &Path) -> Result<Vec<PluginFiles>, LoadError> {
    let unreadable = |error| LoadError::ListDir {
        dir: dir.to_owned(),
        error,
    };
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(unreadable)? {
        let path = entry.map_err(unreadable)?.path();
        if path.extension().is_some_and(|ext| ext == "wasm") && path.is_file() {
            let Some(name) = path.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            if name.starts_with('.') {
                continue;
            }
            let manifest = path.with_extension("toml");
            found.push(PluginFiles {
                name: name.to_owned(),
                manifest: manifest.is_file().then_some(manifest),
                wasm: path,
            });
        }
    }
    found.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(found)
}

/// A plugin's files, read: what a version is made of.
pub struct PluginSource {
    /// Where they came from.
    pub files: PluginFiles,
    wasm: Vec<u8>,
    /// The manifest text (empty when there is none).
    manifest_text: Vec<u8>,
    /// The content hash of both: the version.
    pub version: String,
}

/// Reads a plugin's files.
///
/// # Errors
///
/// A file cannot be read.
pub fn read_files(files: &PluginFiles) -> Result<PluginSource, LoadError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|error| LoadError::Read {
            path: path.to_owned(),
            error,
        })
    };
    let wasm = read(&files.wasm)?;
    let manifest_text = match &files.manifest {
        Some(path) => read(path)?,
        None => Vec::new(),
    };
    let version = content_hash(&wasm, &manifest_text);
    Ok(PluginSource {
        files: files.clone(),
        wasm,
        manifest_text,
        version,
    })
}

/// A freshly loaded plugin and how its loading went.
pub struct Loaded {
    /// The plugin, self-tested.
    pub plugin: Plugin,
    /// Whether it was compiled now or taken from the artifact cache.
    pub compiled: Compiled,
    /// Time from bytes to a self-tested plugin.
    pub elapsed: Duration,
    /// Where that time went.
    pub timings: LoadTimings,
}

/// Where a load's time went (`keepwarm check` prints it; the bench's `plugin-load` reads it).
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadTimings {
    /// Compiling the component to native code, or taking it from the artifact cache.
    pub compile: Duration,
    /// Linking it against keepwarm's imports and instantiating it once.
    pub instantiate: Duration,
    /// Running the manifest's self-tests.
    pub self_test: Duration,
}

/// Loads every plugin of a directory and records each in the runtime's registry. Any plugin that
/// fails to load fails the whole load: at start-up there is no last good version to fall back
/// on, and serving without a plugin would leave its tables silently uncached.
///
/// # Errors
///
/// The directory cannot be read, or a plugin fails to load (the error names it).
pub fn load_dir(runtime: &Runtime, dir: &Path) -> Result<PluginSet, LoadError> {
    let mut plugins = Vec::new();
    for files in list_dir(dir)? {
        let loaded = read_files(&files)
            .and_then(|source| load_source(runtime, source, &plugins))
            .map_err(|error| LoadError::Plugin {
                name: files.name.clone(),
                error: Box::new(error),
            })?;
        plugins.push(Arc::new(register(runtime, loaded, None)));
    }
    Ok(PluginSet { plugins })
}

/// Records a successful load in the registry and the log.
pub(super) fn register(runtime: &Runtime, loaded: Loaded, previous: Option<&str>) -> Plugin {
    let plugin = loaded.plugin;
    let load_ms = loaded.elapsed.as_millis() as u64;
    runtime.registry().loaded(
        plugin.name(),
        plugin.version(),
        plugin.manifest.tables.clone(),
        load_ms,
        loaded.compiled.as_str(),
        plugin.contract(),
    );
    tracing::info!(
        plugin = plugin.name(),
        version = plugin.version(),
        previous,
        tables = ?plugin.manifest.tables,
        contract = plugin.contract(),
        compiled = loaded.compiled.as_str(),
        load_ms,
        compile_ms = loaded.timings.compile.as_millis() as u64,
        "plugin loaded"
    );
    plugin
}

/// Loads one plugin from its files.
///
/// # Errors
///
/// As [`load_source`], and files that cannot be read.
pub fn load_plugin(runtime: &Runtime, files: &PluginFiles) -> Result<Plugin, LoadError> {
    Ok(load_source(runtime, read_files(files)?, &[])?.plugin)
}

/// Parses the manifest, compiles (or takes from the cache), links, instantiates and self-tests.
/// When the engine's instance pool is full, the idle instances of `others` (the plugins loaded
/// or serving beside it) are dropped to make room (see [`instantiate_making_room`]).
///
/// # Errors
///
/// The manifest is invalid, the component does not compile or does not export this contract's
/// `transform`, it fails to instantiate, or a self-test fails.
pub fn load_source(
    runtime: &Runtime,
    source: PluginSource,
    others: &[Arc<Plugin>],
) -> Result<Loaded, LoadError> {
    let start = Instant::now();
    let manifest = match &source.files.manifest {
        Some(path) => {
            let invalid = |reason| LoadError::Manifest {
                path: path.clone(),
                reason,
            };
            let text = std::str::from_utf8(&source.manifest_text)
                .map_err(|error| invalid(format!("not UTF-8: {error}")))?;
            // The manifest reports its errors as `anyhow`: kept as their text.
            Manifest::parse(text).map_err(|error| invalid(format!("{error:#}")))?
        }
        None => Manifest::default(),
    };
    if let Some(op) = manifest.unsupported_op(runtime.cache_kind()) {
        return Err(LoadError::Unsupported {
            op: op.as_str(),
            cache: runtime.cache_kind().as_str(),
        });
    }
    let ident = Arc::new(PluginIdent {
        name: source.files.name.clone(),
        version: source.version.clone(),
        config_json: manifest.config_json(),
    });
    let (plugin, compiled, timings) = load_bytes(runtime, &source.wasm, ident, manifest, others)?;
    Ok(Loaded {
        plugin,
        compiled,
        elapsed: start.elapsed(),
        timings,
    })
}

/// Compiles, links, instantiates and self-tests a component.
fn load_bytes(
    runtime: &Runtime,
    wasm: &[u8],
    ident: Arc<PluginIdent>,
    manifest: Manifest,
    others: &[Arc<Plugin>],
) -> Result<(Plugin, Compiled, LoadTimings), LoadError> {
    if !wasm.starts_with(b"\0asm") {
        return Err(LoadError::NotWasm);
    }
    let start = Instant::now();
    let (component, compiled) = runtime
        .cache()
        .component(runtime.engine(), wasm)
        .map_err(LoadError::Compile)?;
    let compile = start.elapsed();
    let instance_pre = runtime
        .linker()
        .instantiate_pre(&component)
        .map_err(LoadError::Imports)?;
    let pre = Pre::new(instance_pre).map_err(LoadError::Contract)?;
    let plugin = Plugin::new(
        runtime.engine().clone(),
        pre,
        ident,
        manifest,
        super::EPOCH_TICK,
    );
    instantiate_making_room(&plugin, others).map_err(LoadError::Instantiate)?;
    let instantiated = start.elapsed();
    super::selftest::run(&plugin)?;
    let timings = LoadTimings {
        compile,
        instantiate: instantiated - compile,
        self_test: start.elapsed() - instantiated,
    };
    Ok((plugin, compiled, timings))
}

/// How many times a load drops the other plugins' idle instances and tries again when the
/// engine's instance pool is full: waits of 10 ms doubling, 1.27 s in all.
const ROOM_TRIES: u32 = 8;

/// Instantiates `plugin` once, as [`Plugin::check_instantiate`]. The pool's room is shared by
/// every plugin, and each keeps the instances its lanes left warm: when there is none left, the
/// idle instances of `others` are dropped and the instantiation is tried again, waiting for
/// lanes to give theirs back. A pool still full after that is [`PluginError::PoolFull`], which
/// a reload takes as a reason to try again later, not as a broken plugin.
fn instantiate_making_room(plugin: &Plugin, others: &[Arc<Plugin>]) -> Result<(), PluginError> {
    let mut tries = 0;
    loop {
        match plugin.check_instantiate() {
            Err(PluginError::PoolFull(_)) if tries < ROOM_TRIES => {
                for other in others {
                    other.drop_idle();
                }
                if tries > 0 {
                    std::thread::sleep(Duration::from_millis(10 << (tries - 1)));
                }
                tries += 1;
            }
            result => return result,
        }
    }
}

/// The version of a plugin: a short SHA-256 of its component and manifest.
pub fn content_hash(wasm: &[u8], manifest: &[u8]) -> String {
    let mut hasher = Sha256::new();
    hasher.update((wasm.len() as u64).to_le_bytes());
    hasher.update(wasm);
    hasher.update(manifest);
    hex::encode(&hasher.finalize()[..6])
}
