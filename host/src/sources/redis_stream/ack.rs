//! What happens to a stream entry after it is read: the ids this process holds, and the
//! `XACK` loop.

use crate::backoff::Backoff;
use crate::delivery::{Settle, Settled};
use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::mpsc;

/// The ids of the entries this process holds: read and not yet acknowledged or abandoned.
///
/// Each id goes in and out once per message; foldhash (seeded per process) costs a fraction of
/// SipHash there. Ids are chosen by whoever writes the stream (Sequin): a writer able to pick
/// colliding ids could only slow this set down, and the random seed keeps that from being
/// planned.
#[derive(Clone, Default)]
pub(super) struct HeldIds(Arc<Mutex<Held>>);

type Held = HashSet<String, foldhash::fast::RandomState>;

impl HeldIds {
    pub(super) fn lock(&self) -> MutexGuard<'_, Held> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Settled ids go to the ack loop: done ones to be acknowledged, abandoned ones to stay
/// pending (and be reclaimed).
pub(super) struct StreamSettle {
    pub(super) tx: mpsc::UnboundedSender<(String, Settled)>,
}

impl Settle for StreamSettle {
    fn settle(&self, id: &str, settled: Settled) {
        let _ = self.tx.send((id.to_owned(), settled));
    }
}

/// Sends `XACK`s in batches until every token is gone, retrying while Redis is unavailable.
/// An id stops being held once it is acknowledged, or at once when it was abandoned.
pub(super) async fn ack_loop(
    mut conn: redis::aio::ConnectionManager,
    stream: String,
    group: String,
    mut rx: mpsc::UnboundedReceiver<(String, Settled)>,
    held: HeldIds,
) {
    let mut settled = Vec::new();
    let mut ids = Vec::new();
    // Done ids wait in `ids` for their XACK; abandoned ones are let go at once.
    let take_settled = |settled: &mut Vec<(String, Settled)>, ids: &mut Vec<String>| {
        let mut held = held.lock();
        for (id, how) in settled.drain(..) {
            match how {
                Settled::Done => ids.push(id),
                Settled::Abandoned => {
                    held.remove(&id);
                }
            }
        }
    };
    while rx.recv_many(&mut settled, 4096).await > 0 {
        take_settled(&mut settled, &mut ids);
        if ids.is_empty() {
            continue;
        }
        // Acknowledging what is applied must not stop at shutdown: retried until it works.
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        loop {
            let acked: redis::RedisResult<i64> = redis::cmd("XACK")
                .arg(&stream)
                .arg(&group)
                .arg(&ids)
                .query_async(&mut conn)
                .await;
            match acked {
                Ok(_) => break,
                Err(error) if error.code() == Some("NOGROUP") => {
                    tracing::warn!(stream = %stream, ids = ids.len(), "consumer group is gone; nothing left to acknowledge");
                    break;
                }
                Err(error) => {
                    tracing::warn!(stream = %stream, ids = ids.len(), error = %error, "XACK failed; retrying");
                    backoff.sleep().await;
                    // Take what arrived meanwhile into the same XACK.
                    while let Ok(one) = rx.try_recv() {
                        settled.push(one);
                    }
                    take_settled(&mut settled, &mut ids);
                }
            }
        }
        let mut held = held.lock();
        for id in ids.drain(..) {
            held.remove(&id);
        }
    }
}
