//! A message shared by the lanes of every plugin subscribed to it. Its acknowledgement is
//! settled once each part is finished: as done when every part is done, as abandoned
//! (redeliver) when any part was abandoned or dropped unfinished.

use crate::delivery::{AckToken, Delivery, Graveyard, Origin, Payload};
use crate::message::ChangeMessage;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// One message in the pipeline.
pub(crate) struct Job {
    /// The decoded message or the malformed payload.
    pub(crate) payload: Payload,
    /// The source and the message's id in it.
    pub(crate) origin: Origin,
    ack: Mutex<Option<AckToken>>,
    remaining: AtomicUsize,
    abandoned: AtomicBool,
    /// Where it is freed once finished (`Delivery::home`).
    home: Option<Arc<Graveyard>>,
}

impl Job {
    /// Wraps a delivery that `parts` lanes will each finish once.
    pub(crate) fn new(delivery: Delivery, parts: usize) -> Arc<Job> {
        Arc::new(Job {
            payload: delivery.payload,
            origin: delivery.origin,
            ack: Mutex::new(Some(delivery.ack)),
            remaining: AtomicUsize::new(parts),
            abandoned: AtomicBool::new(false),
            home: delivery.home,
        })
    }

    /// The message, when it decoded.
    pub(crate) fn message(&self) -> Option<&ChangeMessage> {
        match &self.payload {
            Payload::Decoded(message) => Some(message),
            Payload::Malformed { .. } => None,
        }
    }

    /// Finishes one part: `done` when it was applied or dead-lettered, false when it was
    /// abandoned. The last part returns the acknowledgement to settle, unless a part was
    /// abandoned: that token is dropped unsettled here, and the source redelivers the message.
    #[must_use = "a token dropped unsettled abandons its message"]
    fn finish(&self, done: bool) -> Option<AckToken> {
        if !done {
            self.abandoned.store(true, Ordering::Release);
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) != 1 {
            return None;
        }
        let token = self.ack.lock().unwrap_or_else(|p| p.into_inner()).take();
        token.filter(|_| !self.abandoned.load(Ordering::Acquire))
    }
}

/// Finishes a lane's part of each job (see [`Job::finish`]) and settles, in one call per
/// source, the messages whose every part is now done.
pub(crate) fn finish_all(jobs: &[Arc<Job>], done: bool) {
    let tokens: Vec<AckToken> = jobs.iter().filter_map(|job| job.finish(done)).collect();
    AckToken::ack_all(tokens);
}

/// Lets go of a lane's finished jobs: those whose source frees its own messages are left in its
/// graveyard (one lock per run of jobs with the same home), the others are dropped here.
pub(crate) fn bury(jobs: Vec<Arc<Job>>) {
    let mut run: Vec<Arc<dyn Send + Sync>> = Vec::new();
    let mut home: Option<Arc<Graveyard>> = None;
    for job in jobs {
        let Some(its) = &job.home else { continue };
        if !home.as_ref().is_some_and(|h| Arc::ptr_eq(h, its))
            && let Some(h) = home.replace(Arc::clone(its))
        {
            h.bury(run.drain(..));
        }
        run.push(job);
    }
    if let Some(h) = home {
        h.bury(run);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::{RawPayload, Settle, Settled};
    use crate::message::DecodeError;

    /// Counts the messages settled as done, and the abandoned ones.
    #[derive(Default)]
    struct Tally(AtomicUsize, AtomicUsize);

    impl Settle for Tally {
        fn settle(&self, _id: &str, settled: Settled) {
            match settled {
                Settled::Done => self.0.fetch_add(1, Ordering::SeqCst),
                Settled::Abandoned => self.1.fetch_add(1, Ordering::SeqCst),
            };
        }
    }

    fn job(id: &str, settle: &Arc<Tally>, home: Option<&Arc<Graveyard>>) -> Arc<Job> {
        job_of(id, settle, home, 1)
    }

    fn job_of(
        id: &str,
        settle: &Arc<Tally>,
        home: Option<&Arc<Graveyard>>,
        parts: usize,
    ) -> Arc<Job> {
        let settle: Arc<dyn Settle> = settle.clone();
        let delivery = Delivery {
            payload: Payload::Malformed {
                raw: RawPayload::Body(b"{}".to_vec()),
                reason: DecodeError::MissingField("action"),
            },
            origin: Origin {
                source: Arc::from("test"),
                id: id.to_owned(),
            },
            ack: AckToken::new(settle, id.to_owned(), None),
            only: None,
            home: home.cloned(),
        };
        Job::new(delivery, parts)
    }

    #[test]
    fn a_message_is_settled_once_its_last_part_is_done_and_never_when_one_was_abandoned() {
        let tally = Arc::new(Tally::default());
        // Two plugins each: the first lane's batch settles nothing.
        let (kept, dropped) = (job_of("a", &tally, None, 2), job_of("b", &tally, None, 2));
        let both = [Arc::clone(&kept), Arc::clone(&dropped)];
        finish_all(&both, true);
        assert_eq!(tally.0.load(Ordering::SeqCst), 0);
        // The second lane: a done, b abandoned by it (shutdown while Redis was down).
        finish_all(&[kept], true);
        finish_all(&[dropped], false);
        assert_eq!(tally.0.load(Ordering::SeqCst), 1, "a is done");
        assert_eq!(
            tally.1.load(Ordering::SeqCst),
            1,
            "b is left for redelivery"
        );
    }

    #[test]
    fn finished_jobs_are_settled_then_left_at_their_sources_home() {
        let tally = Arc::new(Tally::default());
        let (kafka, other) = (
            Arc::new(Graveyard::default()),
            Arc::new(Graveyard::default()),
        );
        let jobs = vec![
            job("a", &tally, Some(&kafka)),
            job("b", &tally, None),
            job("c", &tally, Some(&kafka)),
            job("d", &tally, Some(&other)),
            job("e", &tally, Some(&kafka)),
        ];
        let watch: Vec<_> = jobs.iter().map(Arc::downgrade).collect();
        finish_all(&jobs, true);
        assert_eq!(tally.0.load(Ordering::SeqCst), 5, "settled before buried");
        bury(jobs);
        let alive: Vec<bool> = watch.iter().map(|w| w.upgrade().is_some()).collect();
        assert_eq!(
            alive,
            [true, false, true, true, true],
            "only b is freed by the lane"
        );
        assert_eq!(kafka.clear(), 3);
        assert_eq!(other.clear(), 1);
        assert!(watch.iter().all(|w| w.upgrade().is_none()));
    }
}
