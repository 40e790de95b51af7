//! Which offsets may be committed: per assigned partition, the messages delivered and not yet
//! settled. The offset committed is the lowest one not applied (or, when everything delivered
//! is applied, the one after the last delivered), so a message applied early never carries
//! the commit past an earlier one still in flight.
//!
//! Shared by the poll loop (deliveries, commits), the pipeline (settlements, through
//! [`KafkaSettle`]) and the rebalance callback (assign, wait for in-flight, revoke).

use crate::delivery::{Settle, Settled};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A topic and partition.
pub(super) type Tp = (String, i32);

/// The state of one message delivered and not applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mark {
    InFlight,
    /// Not applied (shutdown while the cache was down): the commit stops before it.
    Abandoned,
}

#[derive(Default)]
struct Partition {
    /// Delivered messages not applied. An applied message leaves at once, wherever it is:
    /// the commit is the lowest offset still here, so messages applied behind one that waits
    /// (its plugin paused) cost nothing while it waits.
    marks: BTreeMap<i64, Mark>,
    /// The offset after the last one delivered.
    next: Option<i64>,
    /// The last offset committed with success.
    committed: Option<i64>,
}

impl Partition {
    /// The offset to commit: the lowest one not applied, else the one after the last delivered.
    fn ready(&self) -> Option<i64> {
        self.marks.keys().next().copied().or(self.next)
    }

    /// The ready offset, when it is past the last commit.
    fn to_commit(&self) -> Option<i64> {
        let ready = self.ready()?;
        self.committed.is_none_or(|c| ready > c).then_some(ready)
    }

    fn in_flight(&self) -> usize {
        self.marks
            .values()
            .filter(|m| **m == Mark::InFlight)
            .count()
    }
}

/// The assigned partitions, by topic, then partition: a message's partition is found from its
/// borrowed topic name, without building a key. Looked up twice per message (delivered,
/// settled); with SipHash those four hashes cost about 760 instructions per message, so the
/// pipeline's fast hasher is used (topic names come from the config and the broker, and a
/// member holds a handful of partitions).
type Assigned = HashMap<String, HashMap<i32, Partition, Hasher>, Hasher>;
type Hasher = foldhash::fast::RandomState;

/// The assigned partitions' offsets.
#[derive(Default)]
pub(super) struct Offsets {
    partitions: Mutex<Assigned>,
    settled: Condvar,
    /// Threads in [`Offsets::wait_idle`]; changed and read only under the `partitions` lock, so
    /// that a settlement wakes (a system call) only when someone waits.
    waiters: AtomicUsize,
}

impl Offsets {
    fn lock(&self) -> MutexGuard<'_, Assigned> {
        self.partitions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Partitions given to this member.
    pub(super) fn assign(&self, tps: impl IntoIterator<Item = Tp>) {
        let mut partitions = self.lock();
        for (topic, partition) in tps {
            partitions
                .entry(topic)
                .or_default()
                .entry(partition)
                .or_default();
        }
    }

    /// Records a message about to be delivered; false (deliver nothing) when its partition is
    /// not assigned (a message fetched before a revoke).
    pub(super) fn delivered(&self, topic: &str, partition: i32, offset: i64) -> bool {
        let mut partitions = self.lock();
        let Some(state) = get_mut(&mut partitions, topic, partition) else {
            return false;
        };
        state.marks.insert(offset, Mark::InFlight);
        state.next = Some(state.next.map_or(offset + 1, |next| next.max(offset + 1)));
        true
    }

    /// Records how a message ended. Settlements of partitions no longer assigned are ignored:
    /// the new owner reads from the last commit.
    pub(super) fn settle(&self, topic: &str, partition: i32, offset: i64, settled: Settled) {
        self.settle_all(std::iter::once(((topic, partition, offset), settled)));
    }

    /// [`Offsets::settle`] for several messages under one lock.
    fn settle_all<'a>(&self, settlements: impl Iterator<Item = ((&'a str, i32, i64), Settled)>) {
        let mut partitions = self.lock();
        for ((topic, partition, offset), settled) in settlements {
            let Some(state) = get_mut(&mut partitions, topic, partition) else {
                continue;
            };
            match settled {
                Settled::Done => {
                    state.marks.remove(&offset);
                }
                Settled::Abandoned => {
                    // Only a message still marked: one applied already stays applied.
                    if let Some(mark) = state.marks.get_mut(&offset) {
                        *mark = Mark::Abandoned;
                    }
                }
            }
        }
        let waiting = self.waiters.load(Ordering::Relaxed) > 0;
        drop(partitions);
        if waiting {
            self.settled.notify_all();
        }
    }

    /// Messages delivered and not settled, in `tps` (all partitions when `None`).
    pub(super) fn in_flight(&self, tps: Option<&[Tp]>) -> usize {
        let partitions = self.lock();
        match tps {
            None => partitions
                .values()
                .flat_map(HashMap::values)
                .map(Partition::in_flight)
                .sum(),
            Some(tps) => busy(&partitions, tps),
        }
    }

    /// Waits until nothing is in flight in `tps`, for at most `limit`; whether it got there.
    pub(super) fn wait_idle(&self, tps: &[Tp], limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut partitions = self.lock();
        self.waiters.fetch_add(1, Ordering::Relaxed);
        let idle = loop {
            let busy = busy(&partitions, tps);
            let left = deadline.saturating_duration_since(Instant::now());
            if busy == 0 {
                break true;
            }
            if left.is_zero() {
                break false;
            }
            partitions = self
                .settled
                .wait_timeout(partitions, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        };
        self.waiters.fetch_sub(1, Ordering::Relaxed);
        idle
    }

    /// The offsets worth committing now: each partition's ready offset, where it is past the
    /// last commit.
    pub(super) fn to_commit(&self) -> Vec<(Tp, i64)> {
        self.lock()
            .iter()
            .flat_map(|(topic, of_topic)| {
                of_topic.iter().filter_map(|(partition, state)| {
                    let ready = state.to_commit()?;
                    Some(((topic.clone(), *partition), ready))
                })
            })
            .collect()
    }

    /// A commit of `offset` for `tp` succeeded.
    pub(super) fn committed(&self, tp: &Tp, offset: i64) {
        if let Some(state) = get_mut(&mut self.lock(), &tp.0, tp.1) {
            state.committed = Some(state.committed.map_or(offset, |c| c.max(offset)));
        }
    }

    /// `tp`'s lag: from the committable offset to `high` (or to the end of what was fetched,
    /// whichever is further). `None` when `tp` is not assigned or nothing is known yet.
    pub(super) fn lag(&self, tp: &Tp, high: Option<i64>) -> Option<i64> {
        let partitions = self.lock();
        let state = partitions.get(&tp.0)?.get(&tp.1)?;
        let end = match (high, state.next) {
            (Some(high), Some(next)) => high.max(next),
            (Some(high), None) => high,
            (None, Some(next)) => next,
            (None, None) => return None,
        };
        let from = state.ready().or(state.committed)?;
        Some((end - from).max(0))
    }

    /// Lets `tps` go; returns the offsets to commit for them (what is applied).
    pub(super) fn revoke(&self, tps: &[Tp]) -> Vec<(Tp, i64)> {
        let mut partitions = self.lock();
        let revoked = tps
            .iter()
            .filter_map(|tp| {
                let state = partitions.get_mut(&tp.0)?.remove(&tp.1)?;
                Some((tp.clone(), state.to_commit()?))
            })
            .collect();
        partitions.retain(|_, of_topic| !of_topic.is_empty());
        revoked
    }
}

fn get_mut<'a>(
    partitions: &'a mut Assigned,
    topic: &str,
    partition: i32,
) -> Option<&'a mut Partition> {
    partitions.get_mut(topic)?.get_mut(&partition)
}

/// Messages in flight in `tps`.
fn busy(partitions: &Assigned, tps: &[Tp]) -> usize {
    tps.iter()
        .filter_map(|(topic, partition)| partitions.get(topic)?.get(partition))
        .map(Partition::in_flight)
        .sum()
}

/// A delivery's id: `topic/partition/offset` (Kafka topic names have no `/`).
///
/// Written piece by piece: `format!` took about 1,100 instructions per message on the poll
/// thread (docs/bench.md, round 14).
pub(super) fn message_id(topic: &str, partition: i32, offset: i64) -> String {
    let (mut p, mut o) = (itoa::Buffer::new(), itoa::Buffer::new());
    let (partition, offset) = (p.format(partition), o.format(offset));
    let mut id = String::with_capacity(topic.len() + partition.len() + offset.len() + 2);
    for part in [topic, "/", partition, "/", offset] {
        id.push_str(part);
    }
    id
}

/// The parts of a [`message_id`]. The slashes are looked for byte by byte from the end: the
/// numbers are a few digits, and a general search costs more to set up than that.
fn parse_id(id: &str) -> Option<(&str, i32, i64)> {
    fn split_last(text: &str) -> Option<(&str, &str)> {
        let at = text.bytes().rposition(|b| b == b'/')?;
        Some((&text[..at], &text[at + 1..]))
    }
    let (rest, offset) = split_last(id)?;
    let (topic, partition) = split_last(rest)?;
    Some((topic, partition.parse().ok()?, offset.parse().ok()?))
}

/// Tells [`Offsets`] how deliveries ended.
pub(super) struct KafkaSettle(pub(super) std::sync::Arc<Offsets>);

impl Settle for KafkaSettle {
    fn settle(&self, id: &str, settled: Settled) {
        if let Some((topic, partition, offset)) = parse_id(id) {
            self.0.settle(topic, partition, offset, settled);
        }
    }

    /// A lane's batch under one lock of the offsets, which the poll thread takes for every
    /// message it delivers.
    fn settle_done(&self, ids: &mut dyn Iterator<Item = &str>) {
        self.0
            .settle_all(ids.filter_map(parse_id).map(|at| (at, Settled::Done)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(p: i32) -> Tp {
        ("t".to_owned(), p)
    }

    #[test]
    fn the_commit_never_passes_a_message_not_yet_applied() {
        let offsets = Offsets::default();
        offsets.assign([tp(0)]);
        for offset in 10..15 {
            assert!(offsets.delivered("t", 0, offset));
        }
        assert_eq!(offsets.to_commit(), [(tp(0), 10)]);
        // 11..14 applied before 10: the commit stays at 10.
        for offset in 11..15 {
            offsets.settle("t", 0, offset, Settled::Done);
        }
        assert_eq!(offsets.to_commit(), [(tp(0), 10)]);
        assert_eq!(offsets.in_flight(None), 1);
        // What was applied behind the waiting message is not kept.
        assert_eq!(offsets.lock()["t"][&0].marks.len(), 1);
        offsets.settle("t", 0, 10, Settled::Done);
        assert_eq!(offsets.to_commit(), [(tp(0), 15)]);
        offsets.committed(&tp(0), 15);
        assert!(offsets.to_commit().is_empty());
        // An abandoned message holds the commit for good.
        offsets.delivered("t", 0, 15);
        offsets.delivered("t", 0, 16);
        offsets.settle("t", 0, 15, Settled::Abandoned);
        offsets.settle("t", 0, 16, Settled::Done);
        // A late abandon of an applied message changes nothing.
        offsets.settle("t", 0, 16, Settled::Abandoned);
        assert_eq!(offsets.lock()["t"][&0].marks.len(), 1);
        assert!(offsets.to_commit().is_empty());
        assert_eq!(offsets.lag(&tp(0), Some(20)), Some(5));
    }

    #[test]
    fn a_batch_settled_at_once_moves_the_commit_as_one_by_one() {
        let offsets = std::sync::Arc::new(Offsets::default());
        offsets.assign([tp(0), ("u".to_owned(), 1)]);
        for offset in 0..6 {
            offsets.delivered("t", 0, offset);
        }
        offsets.delivered("u", 1, 7);
        let settle = KafkaSettle(std::sync::Arc::clone(&offsets));
        // 0 is still in flight; an id that is not Kafka's, or of a partition not assigned,
        // changes nothing.
        let ids = ["t/0/1", "t/0/2", "u/1/7", "not-an-id", "t/2/3", "t/0/4"];
        settle.settle_done(&mut ids.into_iter());
        assert_eq!(offsets.in_flight(None), 3, "0, 3 and 5");
        let mut commit = offsets.to_commit();
        commit.sort();
        assert_eq!(commit, [(tp(0), 0), (("u".to_owned(), 1), 8)]);
        settle.settle_done(&mut ["t/0/0", "t/0/3", "t/0/5"].into_iter());
        assert_eq!(offsets.in_flight(None), 0);
        commit = offsets.to_commit();
        commit.sort();
        assert_eq!(commit, [(tp(0), 6), (("u".to_owned(), 1), 8)]);
    }

    #[test]
    fn a_settlement_wakes_a_revoke_waiting_for_it() {
        let offsets = std::sync::Arc::new(Offsets::default());
        offsets.assign([tp(0)]);
        offsets.delivered("t", 0, 0);
        let limit = Duration::from_secs(300);
        let waiter = std::thread::spawn({
            let offsets = std::sync::Arc::clone(&offsets);
            move || {
                let started = Instant::now();
                (offsets.wait_idle(&[tp(0)], limit), started.elapsed())
            }
        });
        // The waiter counts itself under the lock before it sleeps, and the settlement takes
        // the lock: it comes while the waiter is counted.
        while offsets.waiters.load(Ordering::Relaxed) == 0 {
            std::thread::yield_now();
        }
        offsets.settle("t", 0, 0, Settled::Done);
        let (idle, waited) = waiter.join().unwrap();
        assert!(idle);
        // Woken by the settlement, not by its time limit.
        assert!(waited < limit / 2, "{waited:?}");
        assert_eq!(offsets.waiters.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn revoked_partitions_deliver_nothing_and_return_their_applied_prefix() {
        let offsets = Offsets::default();
        offsets.assign([tp(0), tp(1)]);
        assert!(!offsets.delivered("t", 2, 0));
        offsets.delivered("t", 0, 0);
        offsets.delivered("t", 0, 1);
        offsets.delivered("t", 1, 7);
        offsets.settle("t", 0, 0, Settled::Done);
        assert!(!offsets.wait_idle(&[tp(0)], Duration::from_millis(10)));
        assert_eq!(offsets.revoke(&[tp(0)]), [(tp(0), 1)]);
        assert!(!offsets.delivered("t", 0, 2));
        // A late settlement of a revoked partition changes nothing.
        offsets.settle("t", 0, 1, Settled::Done);
        assert_eq!(offsets.to_commit(), [(tp(1), 7)]);
        assert_eq!(offsets.in_flight(None), 1);
    }

    #[test]
    fn ids_name_topic_partition_and_offset() {
        let id = message_id("sequin.public.orders", 2, 41);
        assert_eq!(id, "sequin.public.orders/2/41");
        assert_eq!(parse_id(&id), Some(("sequin.public.orders", 2, 41)));
        assert_eq!(parse_id("nonsense"), None);
        for (partition, offset) in [(0, 0), (i32::MAX, i64::MAX), (7, 1_000_000_007)] {
            let id = message_id("t", partition, offset);
            assert_eq!(parse_id(&id), Some(("t", partition, offset)), "{id}");
        }
        assert_eq!(parse_id("t/x/1"), None);
        assert_eq!(parse_id("t/1/"), None);
        assert_eq!(parse_id("1/2"), None);
    }
}
