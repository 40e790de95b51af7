//! Calling a lane's plugin on a batch: in a blocking task, after any pause, with the breaker
//! fed by the outcome. A plugin failing as a whole keeps its batch (nothing applied, order
//! kept) and is called again after the pause, possibly as a fixed version.
//!
//! The same version called again after a pause calls every change of the batch on its own
//! ([`Plugin::call_batch_each`]). If the plugin answers any change (here or in another lane
//! since it tripped), what still fails is the changes' fault, not the plugin's: the batch is
//! answered and those changes are dead-lettered. Two bad changes of one row side by side would
//! otherwise trip the breaker on every call and hold the lane (and the sources' in-flight
//! budget) for good. A plugin that answers nothing at all keeps its batch waiting.

use super::Shared;
use super::thread::CallThread;
use crate::pipeline::Job;
use crate::runtime::plugin::ChangeOutcome;
use crate::runtime::{Plugin, PluginError};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// What calling the plugin on a batch came to.
pub(super) enum Called {
    /// The plugin answered: one outcome per decoded message, in order.
    Answered {
        plugin: Arc<Plugin>,
        outcomes: Vec<ChangeOutcome>,
    },
    /// The plugin was removed: its part of the batch is done.
    Gone,
    /// Shutdown came first, or the call's task failed: the batch is left for redelivery.
    Abandoned,
}

/// Calls the plugin serving `name` on the batch, waiting while it is paused.
pub(super) async fn call(
    name: &str,
    shared: &Shared,
    thread: &mut CallThread,
    jobs: &[Arc<Job>],
) -> Called {
    // The version this batch tripped, and how many changes it had answered by then.
    let mut tripped: Option<(Arc<Plugin>, u64)> = None;
    // Waits so far for room in the engine's instance pool.
    let mut pool_waits = 0u32;
    loop {
        let Some(plugin) = shared.plugins.load().get(name).cloned() else {
            return Called::Gone;
        };
        // A new version starts afresh.
        let answers_at_trip = tripped
            .as_ref()
            .filter(|(by, _)| Arc::ptr_eq(by, &plugin))
            .map(|(_, answers)| *answers);
        if let Some(pause) = plugin.breaker.paused_for() {
            // Wake at least every second: a new version (with a fresh breaker) ends the wait.
            tokio::select! {
                biased;
                () = shared.shutdown.cancelled() => return Called::Abandoned,
                () = tokio::time::sleep(pause.min(Duration::from_secs(1))) => continue,
            }
        }
        let each = answers_at_trip.is_some();
        let Some(outcomes) = call_blocking(name, shared, thread, &plugin, jobs, each).await else {
            return Called::Abandoned;
        };
        if paused_meanwhile(&plugin, &outcomes) {
            continue;
        }
        if outcomes
            .iter()
            .any(|o| matches!(o, Err(PluginError::PoolFull(_))))
        {
            if !wait_for_pool(name, shared, &outcomes, &mut pool_waits).await {
                return Called::Abandoned;
            }
            continue;
        }
        let answered = outcomes.iter().filter(|o| answers(o)).count() as u64;
        plugin.breaker.answered(answered);
        if let Some(before) = answers_at_trip
            && plugin.breaker.answers() > before
        {
            tracing::warn!(
                plugin = name,
                version = plugin.version(),
                failed = outcomes.len() as u64 - answered,
                "the plugin works but these changes keep failing it; dead-lettering them"
            );
            return Called::Answered { plugin, outcomes };
        }
        if !trips(name, shared, &plugin, &outcomes) {
            return Called::Answered { plugin, outcomes };
        }
        tripped = Some((Arc::clone(&plugin), plugin.breaker.answers()));
    }
}

/// Whether the plugin answered the change (an error it returned counts: only a failure of the
/// instance, or a change left unattempted, does not).
fn answers(outcome: &ChangeOutcome) -> bool {
    match outcome {
        Ok(_) => true,
        Err(error) => {
            !error.is_instance_failure()
                && !matches!(error, PluginError::Unattempted | PluginError::PoolFull(_))
        }
    }
}

/// Whether a warning about the pool may be logged now: once a second at most, over all lanes.
fn once_a_second() -> bool {
    static START: OnceLock<Instant> = OnceLock::new();
    static LAST: AtomicU64 = AtomicU64::new(0);
    let second = START.get_or_init(Instant::now).elapsed().as_secs() + 1;
    LAST.swap(second, Ordering::Relaxed) != second
}

/// No instance could be had from the engine's pool (`[plugins] instances`): the batch keeps
/// its changes (nothing is dead-lettered, the breaker is not fed) and is called again once the
/// warm instances no call is using are dropped, in every plugin, to make room. False on
/// shutdown.
async fn wait_for_pool(
    name: &str,
    shared: &Shared,
    outcomes: &[ChangeOutcome],
    waits: &mut u32,
) -> bool {
    if once_a_second() {
        let reason = outcomes.iter().find_map(|o| match o {
            Err(PluginError::PoolFull(reason)) => Some(reason.as_str()),
            _ => None,
        });
        tracing::warn!(
            plugin = name,
            reason,
            waits = *waits,
            "no room for another plugin instance; the batch waits"
        );
    }
    for plugin in &shared.plugins.load().plugins {
        plugin.drop_idle();
    }
    let pause = Duration::from_millis(10 << (*waits).min(6));
    *waits += 1;
    tokio::select! {
        biased;
        () = shared.shutdown.cancelled() => false,
        () = tokio::time::sleep(pause) => true,
    }
}

/// One batch call on the lane's thread (`each`: [`Plugin::call_batch_each`]); `None` when
/// its task failed.
async fn call_blocking(
    name: &str,
    shared: &Shared,
    thread: &mut CallThread,
    plugin: &Arc<Plugin>,
    jobs: &[Arc<Job>],
    each: bool,
) -> Option<Vec<ChangeOutcome>> {
    let started = Instant::now();
    let work = {
        let (plugin, jobs) = (Arc::clone(plugin), jobs.to_vec());
        move || {
            let messages: Vec<_> = jobs.iter().filter_map(|job| job.message()).collect();
            if each {
                plugin.call_batch_each(&messages)
            } else {
                plugin.call_batch(&messages)
            }
        }
    };
    let called = thread.run(name, work).await;
    match called {
        Ok(outcomes) => {
            shared.counters.metrics.plugin_call(name, started.elapsed());
            Some(outcomes)
        }
        Err(error) => {
            tracing::error!(plugin = name, error = %error, "plugin call task failed; batch left for redelivery");
            None
        }
    }
}

/// Whether another lane paused the plugin while this call waited its turn: nothing was
/// attempted, so the pause is waited out.
fn paused_meanwhile(plugin: &Plugin, outcomes: &[ChangeOutcome]) -> bool {
    !outcomes.is_empty()
        && outcomes
            .iter()
            .all(|o| matches!(o, Err(PluginError::Unattempted)))
        && plugin.breaker.paused_for().is_some()
}

/// Feeds the breaker with the call's instance failures. Returns whether it tripped: the plugin
/// is failing as a whole and now paused.
fn trips(name: &str, shared: &Shared, plugin: &Plugin, outcomes: &[ChangeOutcome]) -> bool {
    let failed = outcomes
        .iter()
        .filter(|o| o.as_ref().is_err_and(PluginError::is_instance_failure))
        .count() as u32;
    let gave_up = outcomes
        .iter()
        .any(|o| matches!(o, Err(PluginError::Unattempted)));
    let tripped = if gave_up {
        Some(plugin.breaker.trip())
    } else {
        plugin.breaker.record(failed)
    };
    let Some(pause) = tripped else {
        return false;
    };
    shared.registry.paused(name, pause);
    tracing::warn!(
        plugin = name,
        version = plugin.version(),
        pause_ms = pause.as_millis() as u64,
        failed,
        "plugin keeps failing; paused, its messages wait unacknowledged"
    );
    true
}
