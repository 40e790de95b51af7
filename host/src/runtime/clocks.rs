//! Plugins cannot wait on the monotonic clock. wasmtime-wasi's `subscribe-duration` and
//! `subscribe-instant` are real timers, and `wasi:io/poll` blocks the host thread on them
//! outside wasm code, where the epoch deadline cannot interrupt it: a plugin sleeping
//! (`std::thread::sleep`, Python's `time.sleep`: both wait on these timers) would hold its
//! lane for as long as it asked, and an unrepresentable duration for ever. Here both give a
//! pollable that is ready at once (after one yield, as wasmtime-wasi's zero-length timer does),
//! so a sleep returns immediately and a plugin waiting for time to pass loops until its
//! deadline stops it.

use super::state::PluginState;
use wasmtime::StoreContextMut;
use wasmtime::component::{Linker, Resource};
use wasmtime_wasi::clocks::WasiClocksView;
use wasmtime_wasi::p2::DynPollable;
use wasmtime_wasi::p2::bindings::clocks::monotonic_clock::Host as _;

/// The monotonic clock's interface, as wasmtime-wasi defines it (guests importing any 0.2.x
/// version are linked to it).
const MONOTONIC_CLOCK: &str = "wasi:clocks/monotonic-clock@0.2.12";

/// Replaces the monotonic clock's timers in `linker`, after wasmtime-wasi's definitions.
pub(super) fn add_to_linker(linker: &mut Linker<PluginState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let mut clock = linker.instance(MONOTONIC_CLOCK)?;
    clock.func_wrap("subscribe-duration", |store, (_,): (u64,)| ready(store))?;
    clock.func_wrap("subscribe-instant", |store, (_,): (u64,)| ready(store))?;
    linker.allow_shadowing(false);
    Ok(())
}

/// A timer that has already fired.
fn ready(
    mut store: StoreContextMut<'_, PluginState>,
) -> wasmtime::Result<(Resource<DynPollable>,)> {
    Ok((store.data_mut().clocks().subscribe_duration(0)?,))
}
