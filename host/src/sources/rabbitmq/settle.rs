//! What happens to a RabbitMQ delivery after it is handed to the pipeline: the in-flight table
//! and the ack loop.
//!
//! Deliveries are known by `<generation>.<delivery tag>`: a tag means something only on its
//! channel, and a reconnection opens a new one. The acker of a delivery of a lost channel
//! fails; the broker has given that message back to the queue already.

use crate::delivery::{Settle, Settled};
use futures_util::future::join_all;
use lapin::Acker;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// Deliveries handed to the pipeline and not yet settled.
#[derive(Default)]
pub(super) struct InFlight {
    held: Mutex<HashMap<String, Acker>>,
}

impl InFlight {
    /// Records a delivery.
    pub(super) fn hold(&self, id: &str, acker: Acker) {
        self.lock().insert(id.to_owned(), acker);
    }

    fn settle(&self, id: &str) -> Option<Acker> {
        self.lock().remove(id)
    }

    /// How many deliveries are in flight.
    pub(super) fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Acker>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Turns settled tokens into `basic.ack` (done) and `basic.nack` with requeue (abandoned).
pub(super) struct RabbitSettle {
    /// The in-flight table.
    pub(super) inflight: Arc<InFlight>,
    /// To the ack loop.
    pub(super) tx: mpsc::UnboundedSender<(Acker, Settled)>,
}

impl Settle for RabbitSettle {
    fn settle(&self, id: &str, settled: Settled) {
        if let Some(acker) = self.inflight.settle(id) {
            let _ = self.tx.send((acker, settled));
        }
    }
}

/// How long one round of acknowledgements may take before it is given up (a channel that
/// died under it: the broker redelivers those messages).
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends acknowledgements until every token is settled and the channel closes.
pub(super) async fn ack_loop(source: Arc<str>, mut rx: mpsc::UnboundedReceiver<(Acker, Settled)>) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, 512).await > 0 {
        let round = join_all(batch.drain(..).map(|(acker, settled)| async move {
            let sent = match settled {
                Settled::Done => acker.ack(BasicAckOptions::default()).await,
                Settled::Abandoned => {
                    let options = BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    };
                    acker.nack(options).await
                }
            };
            sent.err()
        }));
        match tokio::time::timeout(ACK_TIMEOUT, round).await {
            Ok(errors) => {
                let failed = errors.iter().flatten().count();
                if let Some(error) = errors.into_iter().flatten().next() {
                    tracing::warn!(source = %source, failed, error = %error, "cannot acknowledge rabbitmq deliveries (their channel is gone); the broker delivers them again and they are re-applied harmlessly");
                }
            }
            Err(_) => {
                tracing::warn!(source = %source, "rabbitmq acknowledgements timed out; those deliveries come again and are re-applied harmlessly");
            }
        }
    }
}
