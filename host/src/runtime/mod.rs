//! The plugin runtime: one wasmtime engine, plugins compiled and pre-linked once, warm
//! instances, CPU deadlines by epoch interruption, memory caps, and no WASI capabilities.
//!
//! - [`bindings`]: the only `bindgen!`.
//! - [`state`]: store data (WASI view, limiter, `log` and `config` imports).
//! - [`limiter`]: memory cap and high-water mark.
//! - [`guest_output`]: guest stdout/stderr to the log, rate limited.
//! - [`breaker`]: pausing a plugin whose calls keep failing.
//! - [`plugin`]: one loaded plugin and its warm instances.
//! - [`convert`]: `ChangeMessage` to the WIT change, the WIT op to [`Op`](crate::ops::Op).
//! - [`loader`]: reading a plugin directory into a [`PluginSet`].
//! - [`selftest`]: the manifest's self-test cases.
//! - [`cache`]: compiled components on disk, by content hash and engine.
//! - [`reload`]: watching the plugin directory and swapping versions atomically.
//! - [`status`]: what `keepwarm plugins` shows.

pub mod bindings;
pub mod breaker;
pub mod cache;
pub mod convert;
pub mod guest_output;
pub mod limiter;
pub mod loader;
pub mod plugin;
pub mod reload;
pub mod selftest;
pub mod state;
pub mod status;

pub use loader::{PluginSet, load_dir, load_plugin};
pub use plugin::Plugin;

use cache::ArtifactCache;
use state::PluginState;
use status::Registry;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use wasmtime::component::Linker;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// How often the epoch advances; deadlines are counted in these ticks.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Why a plugin could not handle a change (or could not load).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PluginError {
    /// The plugin returned an error for the change: its verdict, dead-lettered as is.
    #[error("plugin rejected the change: {0}")]
    Rejected(String),
    /// The instance trapped (a panic, an unreachable, a failed host call).
    #[error("plugin trapped: {0}")]
    Trap(String),
    /// The call ran past its CPU deadline.
    #[error("plugin exceeded its deadline of {deadline_ms} ms")]
    Timeout {
        /// The deadline that was exceeded.
        deadline_ms: u64,
    },
    /// The instance grew past its memory cap.
    #[error("plugin exceeded its memory cap: {0}")]
    Memory(String),
    /// Not attempted: the plugin failed on several changes in a row just before (it is paused).
    #[error("not attempted: the plugin is failing on every change")]
    Unattempted,
    /// The plugin broke the contract (wrong number of results, operation over a limit or outside
    /// its key prefixes).
    #[error("plugin misbehaved: {0}")]
    Misbehaved(String),
}

impl PluginError {
    /// Whether the instance failed (trap, timeout, memory) rather than the plugin answering.
    pub fn is_instance_failure(&self) -> bool {
        matches!(
            self,
            PluginError::Trap(_) | PluginError::Timeout { .. } | PluginError::Memory(_)
        )
    }
}

/// The engine and linker shared by every plugin.
pub struct Runtime {
    engine: Engine,
    linker: Linker<PluginState>,
    cache: ArtifactCache,
    registry: Arc<Registry>,
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
    pub fn new(cache_dir: Option<PathBuf>) -> anyhow::Result<Runtime> {
        let (engine, pooling) = match Engine::new(&engine_config(true)) {
            Ok(engine) => (engine, true),
            Err(error) => {
                tracing::warn!(error = %error, "pooling allocator unavailable, using on-demand allocation");
                (Engine::new(&engine_config(false))?, false)
            }
        };
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
        bindings::Plugin::add_to_linker::<_, wasmtime::component::HasSelf<_>>(
            &mut linker,
            |state| state,
        )?;
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("keepwarm-epoch".to_owned())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })?;
        Ok(Runtime {
            cache: ArtifactCache::new(cache_dir, &engine),
            engine,
            linker,
            registry: Arc::new(Registry::default()),
            pooling,
        })
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The artifact cache.
    pub fn cache(&self) -> &ArtifactCache {
        &self.cache
    }

    /// The status of every plugin, for `keepwarm plugins`.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The linker with WASI (granting nothing) and keepwarm's imports.
    pub fn linker(&self) -> &Linker<PluginState> {
        &self.linker
    }
}

fn engine_config(pooling: bool) -> Config {
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
    config.cranelift_opt_level(wasmtime::OptLevel::Speed);
    if pooling {
        let mut pool = PoolingAllocationConfig::default();
        // Sized for a few dozen plugins with a warm instance per lane each; the default
        // reserves room for a thousand.
        pool.total_component_instances(512);
        pool.total_core_instances(2048);
        pool.total_memories(1024);
        pool.total_tables(2048);
        pool.max_memories_per_component(32);
        pool.max_memory_size(4 << 30);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    }
    config
}
