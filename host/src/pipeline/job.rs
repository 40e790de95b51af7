//! A message shared by the lanes of every plugin subscribed to it. Its acknowledgement is
//! settled once each part is finished: as done when every part is done, as abandoned
//! (redeliver) when any part was abandoned or dropped unfinished.

use crate::delivery::{AckToken, Delivery, Origin, Payload};
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
    /// abandoned. The last part settles the acknowledgement.
    pub(crate) fn finish(&self, done: bool) {
        if !done {
            self.abandoned.store(true, Ordering::Release);
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            let token = self.ack.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(token) = token
                && !self.abandoned.load(Ordering::Acquire)
            {
                token.ack();
            }
            // An abandoned token is dropped unsettled: the source redelivers the message.
        }
    }
}
