//! The delivery plan: the order in which the messages reach the stream, and the faults around
//! them.
//!
//! - **Interleaving**: messages of different rows trade places (Sequin orders a row's messages,
//!   not the stream), so two rows that share a key (an email one row gave up and another took)
//!   reach keepwarm in any order.
//! - **Duplicates**: a message added twice, close together (a retried batch).
//! - **Redelivery**: an old message added again after many newer ones (an SQS visibility
//!   timeout, a webhook retried late, a stream entry redriven).
//! - **Kills**: the consumer process is killed with SIGKILL while it holds unacknowledged
//!   entries, and restarted later; its entries are reclaimed by `XAUTOCLAIM`.
//! - **A Redis restart** (with AOF) between two deliveries, while entries are in flight.
//!
//! Two consumers read the group throughout (except while one is dead), so one row's messages are
//! processed by both at once.

use super::model::{Message, Rng};

/// One step of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// `XADD` these messages (by index) in one pipeline, then wait until the group has read
    /// them, or, when `settle`, until every entry so far is acknowledged (so what follows
    /// arrives after they were applied).
    Deliver { messages: Vec<usize>, settle: bool },
    /// SIGKILL the consumer process as soon as it holds pending entries (checked after each of
    /// the next deliveries), and start it again (same consumer name) after `down_for` more
    /// deliveries.
    KillConsumer { down_for: usize },
    /// Stop Redis (SIGTERM) and start it again on its AOF.
    RestartRedis,
}

/// The faults a plan holds.
#[derive(Debug, Default, Clone, Copy)]
pub struct Faults {
    pub duplicates: usize,
    pub redeliveries: usize,
    pub kills: usize,
    pub redis_restarts: usize,
}

/// A run's steps.
pub struct Plan {
    pub steps: Vec<Step>,
    /// Stream entries in all (messages plus duplicates and redeliveries).
    pub deliveries: usize,
    pub faults: Faults,
}

/// The plan for `seed`: every message delivered at least once, with faults.
pub fn plan(seed: u64, messages: &[Message]) -> Plan {
    let mut rng = Rng::new(seed ^ 0x5eed_0ffa);
    let n = messages.len();
    // Interleave rows, keeping each row's order.
    let mut order: Vec<usize> = (0..n).collect();
    for _ in 0..2 * n {
        let at = rng.below(n as u64 - 1) as usize;
        if messages[order[at]].user.id != messages[order[at + 1]].user.id {
            order.swap(at, at + 1);
        }
    }
    // Duplicates and late redeliveries: copies due at a later position.
    let mut faults = Faults::default();
    let mut due: Vec<(usize, usize)> = Vec::new();
    let mut deliveries = Vec::with_capacity(n + n / 8);
    for (position, &message) in order.iter().enumerate() {
        deliveries.push(message);
        if rng.percent(4) {
            faults.duplicates += 1;
            due.push((position + rng.below(3) as usize, message));
        }
        if rng.percent(5) {
            faults.redeliveries += 1;
            due.push((position + rng.between(10, 150) as usize, message));
        }
        due.sort_unstable();
        while due.first().is_some_and(|(at, _)| *at <= position) {
            deliveries.push(due.remove(0).1);
        }
    }
    deliveries.extend(due.into_iter().map(|(_, message)| message));
    // Chunks, then the process and Redis faults between chunks.
    let mut chunks = Vec::new();
    let mut rest = &deliveries[..];
    while !rest.is_empty() {
        let size = (rng.between(1, 20) as usize).min(rest.len());
        chunks.push(Step::Deliver {
            messages: rest[..size].to_vec(),
            settle: rng.percent(30),
        });
        rest = &rest[size..];
    }
    let k = chunks.len();
    let kill = k / 5 + rng.below((k / 4).max(1) as u64) as usize;
    let restart = k / 2 + rng.below((k / 4).max(1) as u64) as usize;
    let mut events = vec![
        (
            kill,
            Step::KillConsumer {
                down_for: rng.between(1, 4) as usize,
            },
        ),
        (restart, Step::RestartRedis),
    ];
    faults.kills = 1;
    faults.redis_restarts = 1;
    if rng.percent(50) {
        let kill = restart + rng.below(3) as usize;
        events.push((
            kill,
            Step::KillConsumer {
                down_for: rng.between(0, 2) as usize,
            },
        ));
        faults.kills += 1;
    }
    let mut steps = Vec::new();
    for (index, chunk) in chunks.into_iter().enumerate() {
        steps.push(chunk);
        for (at, step) in &events {
            if *at == index {
                steps.push(step.clone());
            }
        }
    }
    // Whatever falls past the end still happens, in order, before the run is checked.
    for (at, step) in events {
        if at >= k {
            steps.push(step);
        }
    }
    Plan {
        steps,
        deliveries: deliveries.len(),
        faults,
    }
}
