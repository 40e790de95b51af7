//! The data each plugin `Store` carries: a WASI context that grants nothing by default, the
//! memory limiter, and the host side of the `log` and `config` imports.

use super::bindings::keepwarm::plugin::{config, log, types};
use super::bindings::v0_1::keepwarm::plugin as v0_1;
use super::guest_output::{GuestOutput, LogBudget};
use super::limiter::MemoryLimiter;
use crate::manifest::Grants;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxView, WasiView};

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
    pub(crate) limiter: MemoryLimiter,
    ident: Arc<PluginIdent>,
    log_budget: Arc<Mutex<LogBudget>>,
}

impl PluginState {
    /// A state with the given memory cap and no WASI capabilities beyond what `grants` allows:
    /// no files, no network, no environment (unless named), and clocks stopped at the Unix
    /// epoch (unless granted). Stdout and stderr go to the log.
    pub fn new(ident: Arc<PluginIdent>, memory_bytes: usize, grants: &Grants) -> PluginState {
        let log_budget = Arc::new(Mutex::new(LogBudget::new()));
        let mut wasi = WasiCtx::builder();
        wasi.stdout(GuestOutput::new(
            Arc::clone(&ident),
            "stdout",
            Arc::clone(&log_budget),
        ))
        .stderr(GuestOutput::new(
            Arc::clone(&ident),
            "stderr",
            Arc::clone(&log_budget),
        ));
        if !grants.clock {
            wasi.wall_clock(StoppedClock).monotonic_clock(StoppedClock);
        }
        for name in &grants.env {
            if let Ok(value) = std::env::var(name) {
                wasi.env(name, value);
            }
        }
        PluginState {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            limiter: MemoryLimiter::new(memory_bytes),
            ident,
            log_budget,
        }
    }
}

/// A clock that always reads zero: plugins are pure and must not decide on time.
struct StoppedClock;

impl HostWallClock for StoppedClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }

    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

impl HostMonotonicClock for StoppedClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }

    fn now(&self) -> u64 {
        0
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
        let mut budget = self.log_budget.lock().unwrap_or_else(|p| p.into_inner());
        if !budget.take(&self.ident) {
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

// Contract 0.1.0 imports the same `log` and `config`, with types of its own.
impl v0_1::types::Host for PluginState {}

impl v0_1::log::Host for PluginState {
    fn log(&mut self, level: v0_1::types::Level, message: String) {
        let level = match level {
            v0_1::types::Level::Debug => types::Level::Debug,
            v0_1::types::Level::Info => types::Level::Info,
            v0_1::types::Level::Warn => types::Level::Warn,
            v0_1::types::Level::Error => types::Level::Error,
        };
        log::Host::log(self, level, message);
    }
}

impl v0_1::config::Host for PluginState {
    fn get(&mut self) -> String {
        config::Host::get(self)
    }
}
