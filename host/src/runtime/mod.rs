//! The plugin runtime: one wasmtime engine, plugins compiled and pre-linked once, warm
//! instances, CPU deadlines by epoch interruption, memory caps, and no WASI capabilities.
//!
//! - [`error`]: plugin faults, load and engine errors.
//! - [`bindings`]: the `bindgen!`s, of the contract and of the one before it.
//! - [`state`]: store data (WASI view, limiter, `log` and `config` imports).
//! - [`limiter`]: memory cap and high-water mark.
//! - [`guest_output`]: guest stdout/stderr to the log, rate limited.
//! - [`breaker`]: pausing a plugin whose calls keep failing.
//! - [`plugin`]: one loaded plugin and its warm instances.
//! - [`contract`]: the contracts a component may implement (0.2.0, 0.1.0) and calls under each.
//! - [`convert`]: messages to a call's parameters, the WIT op to [`Op`](crate::ops::Op).
//! - [`loader`]: reading a plugin directory into a [`PluginSet`].
//! - [`selftest`]: the manifest's self-test cases.
//! - [`cache`]: compiled components on disk, by content hash and engine.
//! - [`reload`]: watching the plugin directory and swapping versions atomically.
//! - [`status`]: what `keepwarm plugins` shows.

pub mod bindings;
pub(crate) mod breaker;
pub mod cache;
mod clocks;
pub mod contract;
pub mod convert;
pub mod error;
mod guest_output;
mod limiter;
pub mod loader;
pub mod plugin;
pub mod reload;
mod selftest;
pub mod state;
pub mod status;

pub use error::{EngineError, LoadError, PluginError};
pub use loader::{PluginSet, load_dir, load_plugin};
pub use plugin::Plugin;

use crate::ops::CacheKind;
use cache::ArtifactCache;
use state::PluginState;
use status::StatusBoard;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use wasmtime::component::Linker;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// How often the epoch advances; deadlines are counted in these ticks.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// The engine and linker shared by every plugin.
pub struct Runtime {
    engine: Engine,
    linker: Linker<PluginState>,
    cache: ArtifactCache,
    status: Arc<StatusBoard>,
    cache_kind: CacheKind,
    /// Whether the pooling allocator could be used on this machine.
    pub pooling: bool,
}

impl Runtime {
    /// Creates the engine (pooling allocator where the machine allows it, otherwise on-demand
    /// allocation) and starts the epoch ticker thread, which stops when the engine is dropped.
    /// Compiled components are cached in `cache_dir` when given.
    ///
    /// # Errors
    ///
    /// The engine cannot be created at all.
    pub fn new(cache_dir: Option<PathBuf>) -> Result<Runtime, EngineError> {
        Runtime::with_instances(cache_dir, crate::config::DEFAULT_INSTANCES)
    }

    /// [`Runtime::new`] with a pool of `instances` plugin instances (`[plugins] instances`).
    ///
    /// # Errors
    ///
    /// The engine cannot be created at all.
    pub fn with_instances(
        cache_dir: Option<PathBuf>,
        instances: u32,
    ) -> Result<Runtime, EngineError> {
        let (engine, pooling) = match Engine::new(&engine_config(Some(instances))) {
            Ok(engine) => (engine, true),
            Err(error) => {
                tracing::warn!(error = %error, "pooling allocator unavailable, using on-demand allocation");
                let engine = Engine::new(&engine_config(None)).map_err(EngineError::Wasmtime)?;
                (engine, false)
            }
        };
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(EngineError::Wasmtime)?;
        clocks::add_to_linker(&mut linker).map_err(EngineError::Wasmtime)?;
        bindings::Plugin::add_to_linker::<_, wasmtime::component::HasSelf<_>>(
            &mut linker,
            |state| state,
        )
        .map_err(EngineError::Wasmtime)?;
        bindings::v0_1::Plugin::add_to_linker::<_, wasmtime::component::HasSelf<_>>(
            &mut linker,
            |state| state,
        )
        .map_err(EngineError::Wasmtime)?;
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("keepwarm-epoch".to_owned())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })
            .map_err(EngineError::EpochThread)?;
        Ok(Runtime {
            cache: ArtifactCache::new(cache_dir, &engine),
            engine,
            linker,
            status: Arc::new(StatusBoard::default()),
            cache_kind: CacheKind::Redis,
            pooling,
        })
    }

    /// Plugins are loaded for a cache of `kind`: one whose manifest names an operation that
    /// cache cannot apply is refused ([`LoadError::Unsupported`]).
    #[must_use]
    pub fn for_cache(mut self, kind: CacheKind) -> Runtime {
        self.cache_kind = kind;
        self
    }

    /// The kind of cache plugins are loaded for.
    pub fn cache_kind(&self) -> CacheKind {
        self.cache_kind
    }

    /// The engine (host/examples/plugin_cost.rs measures with it).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub(crate) fn cache(&self) -> &ArtifactCache {
        &self.cache
    }

    /// The status of every plugin, for `keepwarm plugins`.
    // Named `status_board` once `daemon.rs` (which calls it) follows.
    pub fn registry(&self) -> &Arc<StatusBoard> {
        &self.status
    }

    /// The linker with WASI (granting nothing) and keepwarm's imports.
    pub fn linker(&self) -> &Linker<PluginState> {
        &self.linker
    }
}

/// The engine's configuration; with the pooling allocator when `pool` gives its size in plugin
/// instances.
fn engine_config(pool: Option<u32>) -> Config {
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
    config.cranelift_opt_level(wasmtime::OptLevel::Speed);
    if let Some(instances) = pool {
        let mut pool = PoolingAllocationConfig::default();
        // By default sized for a few dozen plugins with a warm instance per lane each (512);
        // wasmtime's default reserves room for a thousand. A component has a few core
        // instances, memories and tables.
        pool.total_component_instances(instances);
        pool.total_core_instances(instances.saturating_mul(4));
        pool.total_memories(instances.saturating_mul(2));
        pool.total_tables(instances.saturating_mul(4));
        pool.max_memories_per_component(32);
        pool.max_memory_size(4 << 30);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    }
    config
}
