//! A [`Settle`] that counts, for sources that wait until everything they handed over is
//! settled (an HTTP request, a JSONL file, a dead-letter replay, a shutdown drain).

use crate::delivery::{Settle, Settled};
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::watch;

/// Counts settled messages; optionally keeps the ids of those done.
pub struct Tally {
    counts: watch::Sender<Counts>,
    done_ids: Option<Mutex<Vec<String>>>,
}

/// How many messages were settled, each way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Applied or dead-lettered.
    pub done: u64,
    /// Left for redelivery.
    pub abandoned: u64,
    /// Taken by no plugin (none subscribes to it): nothing applied.
    pub unrouted: u64,
}

impl Counts {
    /// Settled either way.
    pub fn settled(&self) -> u64 {
        self.done + self.abandoned + self.unrouted
    }

    /// Settled and not left for redelivery: done, or taken by no plugin.
    pub fn finished(&self) -> u64 {
        self.done + self.unrouted
    }
}

impl Default for Tally {
    fn default() -> Tally {
        Tally {
            counts: watch::Sender::new(Counts::default()),
            done_ids: None,
        }
    }
}

impl Tally {
    /// A tally that also keeps the id of every message settled as done.
    pub fn keeping_done_ids() -> Tally {
        Tally {
            done_ids: Some(Mutex::new(Vec::new())),
            ..Tally::default()
        }
    }

    /// The counts now.
    pub fn counts(&self) -> Counts {
        *self.counts.borrow()
    }

    /// Waits until `n` messages are settled, calling `progress` at every settlement and at
    /// least every `tick` meanwhile.
    pub async fn wait_settled(&self, n: u64, tick: Duration, mut progress: impl FnMut(Counts)) {
        let mut counts = self.counts.subscribe();
        loop {
            let now = *counts.borrow_and_update();
            progress(now);
            if now.settled() >= n {
                return;
            }
            // The sender lives in `self`, so `changed` cannot fail while we wait.
            let _ = tokio::time::timeout(tick, counts.changed()).await;
        }
    }

    /// The ids settled as done so far (taken: a second call returns only newer ones).
    pub fn take_done_ids(&self) -> Vec<String> {
        self.done_ids.as_ref().map_or_else(Vec::new, |ids| {
            std::mem::take(&mut *ids.lock().unwrap_or_else(|p| p.into_inner()))
        })
    }
}

impl Settle for Tally {
    fn settle(&self, id: &str, settled: Settled) {
        if settled == Settled::Done
            && let Some(ids) = &self.done_ids
        {
            ids.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(id.to_owned());
        }
        self.counts.send_modify(|counts| match settled {
            Settled::Done => counts.done += 1,
            Settled::Abandoned => counts.abandoned += 1,
        });
    }

    /// Counted apart, and not among the done ids: nothing was applied.
    fn unrouted(&self, _id: &str) {
        self.counts.send_modify(|counts| counts.unrouted += 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn waits_until_every_message_is_settled() {
        let tally = Arc::new(Tally::keeping_done_ids());
        let settler = Arc::clone(&tally);
        let task = tokio::spawn(async move {
            settler.settle("a", Settled::Done);
            settler.settle("b", Settled::Abandoned);
            settler.settle("c", Settled::Done);
            settler.unrouted("d");
        });
        tally.wait_settled(4, Duration::from_secs(60), |_| {}).await;
        task.await.unwrap();
        assert_eq!(
            tally.counts(),
            Counts {
                done: 2,
                abandoned: 1,
                unrouted: 1
            }
        );
        assert_eq!(tally.take_done_ids(), ["a", "c"]);
        assert!(tally.take_done_ids().is_empty());
    }
}
