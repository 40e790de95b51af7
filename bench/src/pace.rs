//! Paced load and its latency figures, shared by the paced runs (`paced` in `main.rs`, the
//! Postgres step-up in `postgres/stream.rs`).

use std::time::{Duration, Instant};

/// Work due at `rate` per second for a while, checked every millisecond.
pub(crate) struct Pacer {
    start: Instant,
    end: Instant,
    rate: f64,
    tick: tokio::time::Interval,
}

impl Pacer {
    /// From now, for `seconds`.
    pub(crate) fn new(rate: f64, seconds: u64) -> Pacer {
        let start = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        Pacer {
            start,
            end: start + Duration::from_secs(seconds),
            rate,
            tick,
        }
    }

    /// When the pacing started.
    pub(crate) fn start(&self) -> Instant {
        self.start
    }

    /// Waits for the next tick and returns how many items are due since the start; `None`
    /// once the time is up.
    pub(crate) async fn due(&mut self) -> Option<u64> {
        if Instant::now() >= self.end {
            return None;
        }
        self.tick.tick().await;
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "a small positive count"
        )]
        let due = (self.start.elapsed().as_secs_f64() * self.rate) as u64;
        Some(due)
    }
}

/// The `p` quantile of `sorted` (ascending); NaN when empty.
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "an index into the values"
    )]
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn percentiles_are_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert!((percentile(&values, 0.5) - 50.0).abs() < f64::EPSILON);
        assert!((percentile(&values, 0.99) - 99.0).abs() < f64::EPSILON);
        assert!((percentile(&values, 0.999) - 100.0).abs() < f64::EPSILON);
        assert!(percentile(&[], 0.5).is_nan());
    }
}
