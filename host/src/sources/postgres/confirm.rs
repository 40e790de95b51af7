//! How far Postgres may forget: the confirmed flush LSN moves only over a contiguous prefix of
//! transactions whose every row is settled as done.
//!
//! A transaction is tracked from its `Begin` (keyed by its commit LSN, unique per transaction)
//! to its `Commit` (which gives its end LSN, the position to confirm: confirming the commit LSN
//! itself would make Postgres send the transaction again). Rows settle in any order, lanes
//! being parallel; the confirmed LSN only ever becomes the end LSN of the oldest transactions
//! that are committed and have nothing outstanding. A row left abandoned (shutdown while the
//! cache was down, a lane whose plugin call failed) stops the prefix for good in this
//! connection: Postgres sends it again on the next one. Outside shutdown the session ends at
//! once for that ([`Confirm::abandoned`]), rather than hold the slot (and its WAL) back until
//! a restart.

use crate::delivery::{Settle, Settled};
use crate::sources::Tally;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

/// The transactions of one replication connection, and the confirmed LSN they share with the
/// connections before and after it.
pub(super) struct Confirm {
    txns: Mutex<BTreeMap<u64, Txn>>,
    confirmed: Arc<AtomicU64>,
    /// Counts what was settled, so shutdown can wait for it.
    pub(super) tally: Tally,
    /// Cancelled when a row is abandoned.
    pub(super) abandoned: CancellationToken,
}

#[derive(Default)]
struct Txn {
    /// Set by the commit.
    end_lsn: Option<u64>,
    /// Rows delivered and not yet settled.
    outstanding: usize,
    /// A row was abandoned: this transaction is never confirmed by this connection.
    abandoned: bool,
}

impl Confirm {
    /// Tracks a new connection's transactions; `confirmed` outlives it.
    pub(super) fn new(confirmed: Arc<AtomicU64>) -> Confirm {
        Confirm {
            txns: Mutex::new(BTreeMap::new()),
            confirmed,
            tally: Tally::default(),
            abandoned: CancellationToken::new(),
        }
    }

    fn txns(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Txn>> {
        self.txns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A transaction began.
    pub(super) fn begin(&self, commit_lsn: u64) {
        self.txns().entry(commit_lsn).or_default();
    }

    /// A row of the transaction is about to be delivered.
    pub(super) fn row(&self, commit_lsn: u64) {
        self.txns().entry(commit_lsn).or_default().outstanding += 1;
    }

    /// The transaction committed; its rows may all be settled already.
    pub(super) fn commit(&self, commit_lsn: u64, end_lsn: u64) {
        let mut txns = self.txns();
        txns.entry(commit_lsn).or_default().end_lsn = Some(end_lsn);
        self.advance(&mut txns);
    }

    /// Whether no transaction is open or outstanding.
    pub(super) fn is_idle(&self) -> bool {
        self.txns().is_empty()
    }

    /// The LSN up to which everything is applied.
    pub(super) fn confirmed(&self) -> u64 {
        self.confirmed.load(Ordering::Acquire)
    }

    fn advance(&self, txns: &mut BTreeMap<u64, Txn>) {
        while let Some(entry) = txns.first_entry() {
            let txn = entry.get();
            match txn.end_lsn {
                Some(end) if txn.outstanding == 0 && !txn.abandoned => {
                    self.confirmed.fetch_max(end, Ordering::AcqRel);
                    entry.remove();
                }
                _ => return,
            }
        }
    }
}

/// A row's id: `<commit_lsn>:<commit_idx>`.
pub(super) fn row_id(commit_lsn: u64, commit_idx: u64) -> String {
    format!("{commit_lsn}:{commit_idx}")
}

impl Settle for Confirm {
    fn settle(&self, id: &str, settled: Settled) {
        let lsn = id
            .split_once(':')
            .and_then(|(lsn, _)| lsn.parse::<u64>().ok());
        if let Some(lsn) = lsn {
            let mut txns = self.txns();
            if let Some(txn) = txns.get_mut(&lsn) {
                txn.outstanding = txn.outstanding.saturating_sub(1);
                txn.abandoned |= settled == Settled::Abandoned;
                self.advance(&mut txns);
            }
        }
        if settled == Settled::Abandoned {
            self.abandoned.cancel();
        }
        self.tally.settle(id, settled);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn confirm() -> Confirm {
        Confirm::new(Arc::new(AtomicU64::new(0)))
    }

    /// A transaction at `lsn` with `rows` rows for us, committed with end LSN `end`.
    fn transaction(c: &Confirm, lsn: u64, rows: usize, end: u64) {
        c.begin(lsn);
        for _ in 0..rows {
            c.row(lsn);
        }
        c.commit(lsn, end);
    }

    #[test]
    fn advances_over_the_contiguous_prefix_of_settled_transactions() {
        let c = confirm();
        transaction(&c, 100, 2, 110);
        transaction(&c, 200, 1, 210);
        // The second transaction finishes first: nothing is confirmed yet.
        c.settle(&row_id(200, 0), Settled::Done);
        assert_eq!(c.confirmed(), 0);
        c.settle(&row_id(100, 1), Settled::Done);
        assert_eq!(c.confirmed(), 0);
        c.settle(&row_id(100, 0), Settled::Done);
        assert_eq!(c.confirmed(), 210);
        assert!(c.is_idle());
        assert_eq!(c.tally.counts().done, 3);
    }

    #[test]
    fn an_open_transaction_holds_back_even_when_its_rows_are_done() {
        let c = confirm();
        c.begin(100);
        c.row(100);
        c.settle(&row_id(100, 0), Settled::Done);
        assert_eq!(c.confirmed(), 0);
        c.commit(100, 120);
        assert_eq!(c.confirmed(), 120);
        // A transaction with no rows for us is confirmed at its commit.
        c.begin(300);
        c.commit(300, 310);
        assert_eq!(c.confirmed(), 310);
    }

    #[test]
    fn an_abandoned_row_stops_the_prefix() {
        let c = confirm();
        transaction(&c, 100, 1, 110);
        transaction(&c, 200, 1, 210);
        c.settle(&row_id(200, 0), Settled::Done);
        assert!(!c.abandoned.is_cancelled());
        c.settle(&row_id(100, 0), Settled::Abandoned);
        assert!(c.abandoned.is_cancelled(), "the session is told to end");
        assert_eq!(c.confirmed(), 0);
        assert_eq!(c.tally.counts().abandoned, 1);
    }

    #[test]
    fn connections_share_the_confirmed_lsn_and_it_never_goes_back() {
        let shared = Arc::new(AtomicU64::new(0));
        let old = Confirm::new(Arc::clone(&shared));
        let new = Confirm::new(Arc::clone(&shared));
        new.begin(100);
        new.commit(100, 500);
        old.begin(50);
        old.commit(50, 60);
        assert_eq!(shared.load(Ordering::Acquire), 500);
    }
}
