//! The circuit breaker of one plugin version: a plugin whose calls keep failing (traps,
//! timeouts, memory) is paused with growing backoff instead of dead-lettering message after
//! message. While it is paused its messages wait, unacknowledged; a new version starts afresh.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Failure bookkeeping and pause state.
#[derive(Debug)]
pub(crate) struct Breaker {
    threshold: u32,
    window: Duration,
    state: Mutex<State>,
    /// Changes the plugin answered (without failing as an instance), in every lane.
    answered: AtomicU64,
}

#[derive(Debug)]
struct State {
    window_start: Instant,
    failures: u32,
    paused_until: Option<Instant>,
    next_pause: Duration,
}

const FIRST_PAUSE: Duration = Duration::from_secs(5);
const MAX_PAUSE: Duration = Duration::from_secs(300);

impl Breaker {
    /// A breaker that trips after more than `threshold` failed changes within `window`.
    pub(crate) fn new(threshold: u32, window: Duration) -> Breaker {
        Breaker {
            threshold,
            window,
            state: Mutex::new(State {
                window_start: Instant::now(),
                failures: 0,
                paused_until: None,
                next_pause: FIRST_PAUSE,
            }),
            answered: AtomicU64::new(0),
        }
    }

    /// Counts changes the plugin answered.
    pub(crate) fn answered(&self, changes: u64) {
        self.answered.fetch_add(changes, Ordering::Relaxed);
    }

    /// How many changes the plugin has answered so far: when this moves, the plugin works.
    pub(crate) fn answers(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }

    /// How long the plugin is still paused, if it is.
    pub(crate) fn paused_for(&self) -> Option<Duration> {
        let state = self.lock();
        let until = state.paused_until?;
        until.checked_duration_since(Instant::now())
    }

    /// Records the outcome of a call: `failed` changes failed as a whole instance failure.
    /// Returns the pause when this call tripped the breaker.
    pub(crate) fn record(&self, failed: u32) -> Option<Duration> {
        let mut state = self.lock();
        let now = Instant::now();
        if failed == 0 {
            // Healthy calls after a pause bring the backoff back down.
            if state.paused_until.is_none_or(|until| now >= until) {
                state.next_pause = FIRST_PAUSE;
            }
            return None;
        }
        if now.duration_since(state.window_start) > self.window {
            state.window_start = now;
            state.failures = 0;
        }
        state.failures += failed;
        if state.failures <= self.threshold {
            return None;
        }
        if let Some(left) = state
            .paused_until
            .and_then(|u| u.checked_duration_since(now))
        {
            // Already paused by a call that failed at the same time: no extra doubling.
            return Some(left);
        }
        let pause = state.next_pause;
        state.paused_until = Some(now + pause);
        state.next_pause = (pause * 2).min(MAX_PAUSE);
        state.failures = 0;
        state.window_start = now;
        Some(pause)
    }

    /// Pauses now, whatever the count: the plugin failed as a whole.
    pub(crate) fn trip(&self) -> Duration {
        let mut state = self.lock();
        if let Some(left) = state
            .paused_until
            .and_then(|u| u.checked_duration_since(Instant::now()))
        {
            return left;
        }
        let pause = state.next_pause;
        state.paused_until = Some(Instant::now() + pause);
        state.next_pause = (pause * 2).min(MAX_PAUSE);
        state.failures = 0;
        state.window_start = Instant::now();
        pause
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trips_past_the_threshold_once_per_pause() {
        let breaker = Breaker::new(3, Duration::from_secs(60));
        assert_eq!(breaker.record(2), None);
        assert_eq!(breaker.record(1), None);
        assert_eq!(breaker.record(1), Some(Duration::from_secs(5)));
        assert!(breaker.paused_for().is_some());
        // Failures of calls made while it was already paused don't double the pause again.
        assert!(
            breaker
                .record(4)
                .is_some_and(|left| left <= Duration::from_secs(5))
        );
        assert!(breaker.trip() <= Duration::from_secs(5));
        assert_eq!(breaker.record(0), None);
    }
}
