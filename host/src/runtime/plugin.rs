//! One loaded plugin: its compiled, pre-linked component, its manifest, and a pool of warm
//! instances that batch calls reuse.
//!
//! A call that traps, runs past its deadline or exceeds its memory cap discards the instance
//! and retries the batch's changes one by one in fresh instances, so only the guilty change is
//! reported as failed. A change found guilty of a timeout is called once more first: the
//! deadline is wall-clock time, and a load spike must not dead-letter a good change.

use super::breaker::Breaker;
use super::contract::{Instance, Pre};
use super::error::{MemoryCapExceeded, Misbehavior, PluginError};
use super::state::{PluginIdent, PluginState};
use crate::manifest::Manifest;
use crate::message::ChangeMessage;
use crate::ops::Op;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use wasmtime::{Engine, Store};

/// A plugin ready to take calls.
pub struct Plugin {
    /// Name (the file stem) and version (content hash).
    pub ident: Arc<PluginIdent>,
    /// The validated manifest.
    pub manifest: Manifest,
    engine: Engine,
    pre: Pre,
    deadline_ticks: u64,
    warm: Mutex<Vec<Warm>>,
    /// Pauses the plugin when its calls keep failing.
    pub(crate) breaker: Breaker,
    suspect: AtomicBool,
    turns: Mutex<()>,
}

/// A warm instance and its store.
struct Warm {
    store: Store<PluginState>,
    instance: Instance,
    calls: u64,
}

/// The answer for one change.
pub type ChangeOutcome = Result<Vec<Op>, PluginError>;

/// How the changes of a failed batch call are called again, one by one.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Retries {
    /// The rest are left unattempted after [`Plugin::GIVE_UP_AFTER`] instance failures in a row.
    GiveUp,
    /// Every change is called.
    Each,
}

impl Plugin {
    /// Single-change retries stop after this many instance failures in a row.
    const GIVE_UP_AFTER: usize = 2;

    /// Wraps a pre-linked component; `tick` is the epoch tick of the engine.
    pub(super) fn new(
        engine: Engine,
        pre: Pre,
        ident: Arc<PluginIdent>,
        manifest: Manifest,
        tick: Duration,
    ) -> Plugin {
        let deadline_ticks =
            (manifest.limits.deadline_ms as u128).div_ceil(tick.as_millis().max(1)) as u64 + 1;
        Plugin {
            ident,
            engine,
            pre,
            deadline_ticks,
            warm: Mutex::new(Vec::new()),
            suspect: AtomicBool::new(false),
            turns: Mutex::new(()),
            breaker: Breaker::new(
                manifest.limits.max_failures,
                Duration::from_secs(manifest.limits.failure_window_secs),
            ),
            manifest,
        }
    }

    /// The file stem.
    pub fn name(&self) -> &str {
        &self.ident.name
    }

    /// The plugin's version (short content hash).
    pub fn version(&self) -> &str {
        &self.ident.version
    }

    /// Instantiates once and drops the instance, to prove the component can run.
    ///
    /// # Errors
    ///
    /// The instantiation trapped or ran out of memory or time.
    pub(crate) fn check_instantiate(&self) -> Result<(), PluginError> {
        let warm = self.instantiate()?;
        self.put_back(warm);
        Ok(())
    }

    /// Calls the plugin on a batch of changes. Blocking: run it off the async executor.
    ///
    /// Returns one outcome per change, in order. Failures of the instance (trap, timeout,
    /// memory) are contained and reported per change. While the plugin is suspect (its last
    /// call failed as an instance), calls from all lanes take turns, so a looping plugin burns
    /// one deadline at a time rather than one per lane; a call that finds the plugin paused
    /// attempts nothing.
    pub fn call_batch(&self, changes: &[&ChangeMessage]) -> Vec<ChangeOutcome> {
        self.call_batch_with(changes, Retries::GiveUp)
    }

    /// [`Plugin::call_batch`], but when the batch call fails every change is called on its own,
    /// however many fail in a row: after a pause, to tell changes that fail from a plugin that
    /// fails (see `pipeline/lane/call.rs`).
    pub fn call_batch_each(&self, changes: &[&ChangeMessage]) -> Vec<ChangeOutcome> {
        self.call_batch_with(changes, Retries::Each)
    }

    fn call_batch_with(&self, changes: &[&ChangeMessage], retries: Retries) -> Vec<ChangeOutcome> {
        let _turn = self
            .suspect
            .load(Ordering::Acquire)
            .then(|| self.turns.lock().unwrap_or_else(|p| p.into_inner()));
        if self.breaker.paused_for().is_some() {
            return changes
                .iter()
                .map(|_| Err(PluginError::Unattempted))
                .collect();
        }
        let outcomes = self.call_batch_unserialized(changes, retries);
        let failed = outcomes
            .iter()
            .any(|o| o.as_ref().is_err_and(PluginError::is_instance_failure));
        self.suspect.store(failed, Ordering::Release);
        outcomes
    }

    fn call_batch_unserialized(
        &self,
        changes: &[&ChangeMessage],
        retries: Retries,
    ) -> Vec<ChangeOutcome> {
        let error = match self.call_once(changes) {
            Ok(outcomes) => return outcomes,
            Err(error) => error,
        };
        if let PluginError::PoolFull(_) = error {
            return vec![Err(error); changes.len()];
        }
        if let [change] = changes {
            return vec![self.after_failure(change, error)];
        }
        tracing::warn!(
            plugin = self.name(),
            version = self.version(),
            changes = changes.len(),
            error = %error,
            "batch call failed; retrying its changes one by one"
        );
        // One by one, so only the guilty changes fail. A plugin that fails on several changes
        // in a row is failing as a whole: the rest are not attempted (and the caller pauses the
        // plugin) rather than burning a deadline on each.
        let mut outcomes = Vec::with_capacity(changes.len());
        let mut in_a_row = 0;
        for change in changes {
            if retries == Retries::GiveUp && in_a_row >= Self::GIVE_UP_AFTER {
                outcomes.push(Err(PluginError::Unattempted));
                continue;
            }
            let outcome = match self.call_single(change) {
                // No instance to call the rest on: the whole batch waits.
                Err(error @ PluginError::PoolFull(_)) => {
                    return vec![Err(error); changes.len()];
                }
                Err(error) => self.after_failure(change, error),
                ok => ok,
            };
            in_a_row = if outcome
                .as_ref()
                .is_err_and(PluginError::is_instance_failure)
            {
                in_a_row + 1
            } else {
                0
            };
            outcomes.push(outcome);
        }
        outcomes
    }

    /// The outcome of `change` alone, whose call just failed with `error`. A deadline is
    /// wall-clock time, so a machine stalled by load can push a good change past it: a timeout
    /// earns one more call before it counts, and a change that really loops runs past the
    /// deadline again.
    fn after_failure(&self, change: &ChangeMessage, error: PluginError) -> ChangeOutcome {
        if !matches!(error, PluginError::Timeout { .. }) {
            return Err(error);
        }
        tracing::warn!(
            plugin = self.name(),
            version = self.version(),
            error = %error,
            "a change ran past its deadline; calling it once more before dead-lettering it"
        );
        self.call_single(change)
    }

    /// One call with `change` alone.
    fn call_single(&self, change: &ChangeMessage) -> ChangeOutcome {
        match self.call_once(std::slice::from_ref(&change)) {
            Ok(mut single) => single
                .pop()
                .unwrap_or(Err(PluginError::Misbehaved(Misbehavior::NoResult))),
            Err(error) => Err(error),
        }
    }

    /// One call on one instance. An `Err` means the instance failed as a whole (and is gone).
    fn call_once(&self, changes: &[&ChangeMessage]) -> Result<Vec<ChangeOutcome>, PluginError> {
        let mut warm = self.take_warm()?;
        warm.store.set_epoch_deadline(self.deadline_ticks);
        let result = warm.instance.handle_batch(&mut warm.store, changes);
        warm.calls += 1;
        let results = result.map_err(|error| self.classify(&error))?;
        if results.len() != changes.len() {
            return Err(PluginError::Misbehaved(Misbehavior::ResultCount {
                expected: changes.len(),
                got: results.len(),
            }));
        }
        let outcomes = results
            .into_iter()
            .map(|result| match result {
                Ok(ops) => Ok(ops),
                Err(reason) => Err(PluginError::Rejected(reason)),
            })
            .collect();
        self.put_back(warm);
        Ok(outcomes)
    }

    /// The version of the plugin contract the component implements.
    pub fn contract(&self) -> &'static str {
        self.pre.version()
    }

    fn classify(&self, error: &wasmtime::Error) -> PluginError {
        let code = error.downcast_ref::<wasmtime::Trap>().copied();
        if code == Some(wasmtime::Trap::Interrupt) {
            return PluginError::Timeout {
                deadline_ms: self.manifest.limits.deadline_ms,
            };
        }
        if let Some(exceeded) = error.downcast_ref::<MemoryCapExceeded>() {
            return PluginError::Memory(exceeded.clone());
        }
        PluginError::Trap {
            code,
            message: format!("{error:#}"),
        }
    }

    fn take_warm(&self) -> Result<Warm, PluginError> {
        let pooled = self.warm.lock().unwrap_or_else(|p| p.into_inner()).pop();
        match pooled {
            Some(warm) => Ok(warm),
            None => self.instantiate(),
        }
    }

    fn instantiate(&self) -> Result<Warm, PluginError> {
        let memory = (self.manifest.limits.memory_mb as usize) << 20;
        let mut store = Store::new(
            &self.engine,
            PluginState::new(Arc::clone(&self.ident), memory, &self.manifest.grants),
        );
        store.limiter(|state| &mut state.limiter);
        store.set_epoch_deadline(self.deadline_ticks);
        let instance = self.pre.instantiate(&mut store).map_err(|error| {
            match self.classify(&error) {
                _ if error
                    .downcast_ref::<wasmtime::PoolConcurrencyLimitError>()
                    .is_some() =>
                {
                    PluginError::PoolFull(format!(
                        "the engine's instance pool is full ({error}); raise [plugins] instances"
                    ))
                }
                // Past the deadline while starting up is a timeout like any other.
                PluginError::Trap { code, message } => PluginError::Trap {
                    code,
                    message: format!("instantiation failed: {message}"),
                },
                other => other,
            }
        })?;
        Ok(Warm {
            store,
            instance,
            calls: 0,
        })
    }

    /// Drops the warm instances no call is using, giving their room in the engine's pool back
    /// (to another plugin that cannot get an instance).
    pub(crate) fn drop_idle(&self) {
        self.warm.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Returns an instance to the pool unless it is due for recycling.
    fn put_back(&self, warm: Warm) {
        let limiter = &warm.store.data().limiter;
        let high_water = limiter.peak() > limiter.cap() / 4 * 3;
        if warm.calls >= self.manifest.limits.max_calls_per_instance || high_water {
            tracing::debug!(
                plugin = self.name(),
                version = self.version(),
                calls = warm.calls,
                peak_bytes = limiter.peak(),
                "recycling instance"
            );
            return;
        }
        self.warm
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(warm);
    }
}
