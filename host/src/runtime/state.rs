//! The data each plugin `Store` carries: a WASI context that grants nothing, the memory limiter,
//! and the host side of the `log` and `config` imports.

use super::bindings::keepwarm::plugin::{config, log, types};
use super::limiter::MemoryLimiter;
use std::sync::Arc;
use std::time::Instant;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

/// Who a store belongs to, for log lines.
#[derive(Debug)]
pub struct PluginIdent {
    /// Plugin name (the file stem).
    pub name: String,
    /// Short content hash of the component and manifest.
    pub version: String,
    /// The manifest's `[config]` table as JSON text.
    pub config_json: String,
}

/// The store data of one plugin instance.
pub struct PluginState {
    wasi: WasiCtx,
    table: ResourceTable,
    /// Memory cap, enforced through `Store::limiter`.
    pub limiter: MemoryLimiter,
    ident: Arc<PluginIdent>,
    log_budget: LogBudget,
}

impl PluginState {
    /// A state with no WASI capabilities at all and the given memory cap.
    pub fn new(ident: Arc<PluginIdent>, memory_bytes: usize) -> PluginState {
        PluginState {
            wasi: WasiCtx::builder().build(),
            table: ResourceTable::new(),
            limiter: MemoryLimiter::new(memory_bytes),
            ident,
            log_budget: LogBudget::new(),
        }
    }
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl types::Host for PluginState {}

impl log::Host for PluginState {
    fn log(&mut self, level: types::Level, message: String) {
        if !self.log_budget.take() {
            return;
        }
        let plugin = self.ident.name.as_str();
        let version = self.ident.version.as_str();
        match level {
            types::Level::Debug => tracing::debug!(plugin, version, "{message}"),
            types::Level::Info => tracing::info!(plugin, version, "{message}"),
            types::Level::Warn => tracing::warn!(plugin, version, "{message}"),
            types::Level::Error => tracing::error!(plugin, version, "{message}"),
        }
    }
}

impl config::Host for PluginState {
    fn get(&mut self) -> String {
        self.ident.config_json.clone()
    }
}

/// A token bucket for plugin log lines: a flood of logs costs the plugin, not the host.
struct LogBudget {
    tokens: f64,
    last: Instant,
    dropped: u64,
}

impl LogBudget {
    const RATE_PER_SEC: f64 = 100.0;
    const BURST: f64 = 200.0;

    fn new() -> LogBudget {
        LogBudget {
            tokens: Self::BURST,
            last: Instant::now(),
            dropped: 0,
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * Self::RATE_PER_SEC).min(Self::BURST);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            if self.dropped > 0 {
                tracing::warn!(
                    dropped = self.dropped,
                    "plugin log lines dropped by rate limit"
                );
                self.dropped = 0;
            }
            true
        } else {
            self.dropped += 1;
            false
        }
    }
}
