//! Which offsets may be committed: per assigned partition, the messages delivered and not yet
//! settled (and, behind the first of them, those applied since, until it is). The offset
//! committed is the lowest one not applied (or, when everything delivered is applied, the one
//! after the last delivered), so a message applied early never carries the commit past an
//! earlier one still in flight.
//!
//! Shared by the poll loop (deliveries, commits), the pipeline (settlements, through
//! [`KafkaSettle`]) and the rebalance callback (assign, wait for in-flight, revoke).

use crate::delivery::{Settle, Settled};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A topic and partition.
pub(super) type Tp = (String, i32);

/// The state of one message delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mark {
    InFlight,
    /// Not applied (shutdown while the cache was down): the commit stops before it.
    Abandoned,
    /// Applied behind a message not yet applied; dropped once it reaches the front.
    Done,
}

/// Applied marks kept behind the front beyond which, when they are most of the marks, they are
/// dropped in one pass.
const COMPACT_AFTER: usize = 1024;

#[derive(Default)]
struct Partition {
    /// Delivered messages by increasing offset, from the lowest one not applied (the front is
    /// never [`Mark::Done`]). Messages arrive in offset order and are mostly settled in it, so
    /// a delivery is a push at the back and a settlement a pop at the front, or a binary search
    /// (a `BTreeMap` here cost 1.4% of keepwarm-kafka's samples in its removals alone). Those
    /// applied behind one that waits (its plugin paused) are marked done and dropped in one
    /// pass once they are most of the marks: they cost little while it waits.
    marks: VecDeque<(i64, Mark)>,
    /// How many of `marks` are [`Mark::Done`].
    done: usize,
    /// The offset after the last one delivered.
    next: Option<i64>,
    /// The last offset committed with success.
    committed: Option<i64>,
}

impl Partition {
    /// The offset to commit: the lowest one not applied, else the one after the last delivered.
    fn ready(&self) -> Option<i64> {
        self.marks.front().map(|(offset, _)| *offset).or(self.next)
    }

    /// The ready offset, when it is past the last commit.
    fn to_commit(&self) -> Option<i64> {
        let ready = self.ready()?;
        self.committed.is_none_or(|c| ready > c).then_some(ready)
    }

    fn in_flight(&self) -> usize {
        self.marks
            .iter()
            .filter(|(_, mark)| *mark == Mark::InFlight)
            .count()
    }

    /// Where `offset` is in `marks`. A partition's offsets are mostly consecutive (gaps come
    /// from compaction, transaction markers and the marks dropped in one pass), so its distance
    /// from the front is tried first; lanes settle out of order, and the binary search this
    /// saves was about 1% of keepwarm-kafka's samples (docs/bench.md, "Round 23").
    fn find(&self, offset: i64) -> Result<usize, usize> {
        if let Some((front, _)) = self.marks.front()
            && let Ok(guess) = usize::try_from(offset - front)
            && self.marks.get(guess).is_some_and(|(at, _)| *at == offset)
        {
            return Ok(guess);
        }
        self.marks.binary_search_by_key(&offset, |(at, _)| *at)
    }

    /// Marks `offset` in flight: at the back, as deliveries come in order, else in its place
    /// (fetched again after a seek back).
    fn deliver(&mut self, offset: i64) {
        if self.marks.back().is_none_or(|(last, _)| *last < offset) {
            self.marks.push_back((offset, Mark::InFlight));
        } else {
            match self.find(offset) {
                Ok(at) => {
                    if self.marks[at].1 == Mark::Done {
                        self.done -= 1;
                    }
                    self.marks[at].1 = Mark::InFlight;
                }
                Err(at) => self.marks.insert(at, (offset, Mark::InFlight)),
            }
        }
        self.next = Some(self.next.map_or(offset + 1, |next| next.max(offset + 1)));
    }

    /// `offset` was applied.
    fn applied(&mut self, offset: i64) {
        let at = match self.marks.front() {
            Some((front, _)) if *front == offset => 0,
            _ => match self.find(offset) {
                Ok(at) => at,
                Err(_) => return,
            },
        };
        if at == 0 {
            self.marks.pop_front();
            while let Some((_, Mark::Done)) = self.marks.front() {
                self.marks.pop_front();
                self.done -= 1;
            }
        } else if self.marks[at].1 != Mark::Done {
            self.marks[at].1 = Mark::Done;
            self.done += 1;
            if self.done > COMPACT_AFTER && self.done * 2 > self.marks.len() {
                self.marks.retain(|(_, mark)| *mark != Mark::Done);
                self.done = 0;
            }
        }
    }

    /// `offset` will not be applied here; one applied already stays applied.
    fn abandoned(&mut self, offset: i64) {
        if let Ok(at) = self.find(offset)
            && self.marks[at].1 == Mark::InFlight
        {
            self.marks[at].1 = Mark::Abandoned;
        }
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
        state.deliver(offset);
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
                Settled::Done => state.applied(offset),
                Settled::Abandoned => state.abandoned(offset),
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

/// The parts of a [`message_id`]: read from the end, digits only, without `str::parse` (which
/// took, with the search for the slashes, 1.3% of keepwarm-kafka's samples).
fn parse_id(id: &str) -> Option<(&str, i32, i64)> {
    /// The number that ends `text` after its last `/`, and what comes before that slash.
    fn last_number(text: &str) -> Option<(&str, i64)> {
        let bytes = text.as_bytes();
        let digits = bytes
            .iter()
            .rev()
            .take_while(|b| b.is_ascii_digit())
            .count();
        let at = bytes.len() - digits;
        if digits == 0 || at == 0 || bytes[at - 1] != b'/' {
            return None;
        }
        let number = bytes[at..].iter().try_fold(0i64, |n, b| {
            n.checked_mul(10)?.checked_add(i64::from(b - b'0'))
        })?;
        Some((&text[..at - 1], number))
    }
    let (rest, offset) = last_number(id)?;
    let (topic, partition) = last_number(rest)?;
    Some((topic, i32::try_from(partition).ok()?, offset))
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
        offsets.settle("t", 0, 10, Settled::Done);
        // The applied marks behind 10 went with it.
        assert!(offsets.lock()["t"][&0].marks.is_empty());
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
        assert_eq!(
            offsets.lock()["t"][&0].marks,
            [(15, Mark::Abandoned), (16, Mark::Done)]
        );
        assert!(offsets.to_commit().is_empty());
        assert_eq!(offsets.lag(&tp(0), Some(20)), Some(5));
    }

    #[test]
    fn messages_applied_behind_a_waiting_one_cost_little_memory() {
        let offsets = Offsets::default();
        offsets.assign([tp(0)]);
        let n = 10 * COMPACT_AFTER as i64;
        for offset in 0..n {
            offsets.delivered("t", 0, offset);
            if offset > 0 {
                offsets.settle("t", 0, offset, Settled::Done);
            }
            let partitions = offsets.lock();
            let state = &partitions["t"][&0];
            assert!(
                state.marks.len() <= 2 * COMPACT_AFTER + 2,
                "{}",
                state.marks.len()
            );
            assert_eq!(state.marks.front(), Some(&(0, Mark::InFlight)));
        }
        assert_eq!(offsets.to_commit(), [(tp(0), 0)]);
        assert_eq!(offsets.in_flight(None), 1);
        offsets.settle("t", 0, 0, Settled::Done);
        assert_eq!(offsets.to_commit(), [(tp(0), n)]);
        assert!(offsets.lock()["t"][&0].marks.is_empty());
    }

    #[test]
    fn offsets_fetched_again_after_a_seek_back_keep_their_order() {
        let offsets = Offsets::default();
        offsets.assign([tp(0)]);
        for offset in [5, 6, 7] {
            offsets.delivered("t", 0, offset);
        }
        offsets.settle("t", 0, 6, Settled::Done);
        // Fetched again from 3: below and among the marks.
        for offset in [3, 4, 6] {
            offsets.delivered("t", 0, offset);
        }
        assert_eq!(offsets.to_commit(), [(tp(0), 3)]);
        assert_eq!(offsets.in_flight(None), 5);
        for offset in [3, 4, 5, 6] {
            offsets.settle("t", 0, offset, Settled::Done);
        }
        assert_eq!(offsets.to_commit(), [(tp(0), 7)]);
        offsets.settle("t", 0, 7, Settled::Done);
        assert_eq!(offsets.to_commit(), [(tp(0), 8)]);
        // Settling what was never delivered, or twice, changes nothing.
        offsets.settle("t", 0, 7, Settled::Done);
        offsets.settle("t", 0, 100, Settled::Done);
        assert_eq!(offsets.to_commit(), [(tp(0), 8)]);
    }

    #[test]
    fn offsets_with_gaps_are_found_where_their_distance_from_the_front_does_not_say() {
        let offsets = Offsets::default();
        offsets.assign([tp(0)]);
        // Gaps as transaction markers and compaction leave them.
        for offset in [0, 1, 2, 5, 6, 9] {
            offsets.delivered("t", 0, offset);
        }
        // Out of order, as lanes settle; 3 and 7 were never delivered.
        for offset in [6, 9, 3, 1, 7, 2] {
            offsets.settle("t", 0, offset, Settled::Done);
        }
        assert_eq!(offsets.to_commit(), [(tp(0), 0)]);
        assert_eq!(offsets.in_flight(None), 2);
        offsets.settle("t", 0, 0, Settled::Done);
        assert_eq!(offsets.to_commit(), [(tp(0), 5)]);
        offsets.settle("t", 0, 5, Settled::Done);
        assert_eq!(offsets.to_commit(), [(tp(0), 10)]);
        assert!(offsets.lock()["t"][&0].marks.is_empty());
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
        assert_eq!(parse_id("t/1/-2"), None);
        assert_eq!(parse_id("t/2147483648/1"), None, "past i32");
        assert_eq!(parse_id("t/1/9223372036854775808"), None, "past i64");
        assert_eq!(parse_id("/1/2"), Some(("", 1, 2)));
    }
}
