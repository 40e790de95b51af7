//! `keepwarm dead-letters replay`: every dead letter through the current plugins, from the
//! dead-letter stream ([`replay`]) or the dead-letter file ([`replay_file`]).
//!
//! A replay writes new failures to a scratch stream (or scratch file) instead of the dead
//! letters it reads. An entry leaves the dead letters (`XDEL`, or the file rewritten without
//! it) only when its replay was applied and did not fail again; an entry that fails again
//! stays, and the new reason is reported, as does an entry no loaded plugin subscribes to. A
//! letter a plugin failed on goes back to that plugin alone. Shutdown (Ctrl-C, SIGTERM) stops
//! the reading; what was handed over is finished and reported. Dead letters added while the
//! replay runs stay for the next one.

use super::file::FileLetters;
use super::{Entry, read, read_file};
use crate::delivery::Settle;
use crate::sources::jsonl::Progress;
use crate::sources::{SourceContext, SourceError, Tally};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// What a replay did.
#[derive(Debug, Default)]
pub struct ReplayReport {
    /// Entries replayed.
    pub replayed: usize,
    /// Entries applied and removed from the dead letters.
    pub fixed: usize,
    /// Entries that failed again (or cannot be read), with their new reason; they stay.
    pub still_failing: Vec<(String, String)>,
    /// Entries left unapplied (shutdown); they stay.
    pub abandoned: usize,
    /// Entries no plugin subscribes to (their plugin is not loaded, or no longer takes their
    /// table): nothing was applied, so they stay.
    pub unrouted: usize,
    /// Whether shutdown stopped the replay before every entry was read.
    pub interrupted: bool,
}

/// Where a replay reads dead letters, finds the new failures and removes the fixed entries.
trait Letters {
    /// How many there are (for the progress line).
    async fn total(&mut self) -> Result<u64, SourceError>;
    /// The next entries, oldest first; empty at the end.
    async fn next_page(&mut self) -> Result<Vec<Entry>, SourceError>;
    /// The ids of the entries that failed again, with their new reason, from the scratch.
    async fn failures(&mut self) -> Result<Vec<(String, String)>, SourceError>;
    /// Removes the `fixed` entries and the scratch.
    async fn finish(self, fixed: &HashSet<&String>) -> Result<(), SourceError>;
}

/// Replays every entry of `stream` through the pipeline behind `ctx`, whose dead letters go to
/// `scratch`; then removes the entries that went through from `stream`.
///
/// # Errors
///
/// Redis fails.
pub async fn replay(
    conn: impl redis::aio::ConnectionLike + Send,
    stream: &str,
    scratch: &str,
    max_bytes: usize,
    ctx: SourceContext,
) -> Result<ReplayReport, SourceError> {
    let letters = StreamLetters {
        conn,
        stream,
        scratch,
        after: "-".to_owned(),
    };
    run(letters, max_bytes, ctx).await
}

/// Replays every entry of the dead-letter file `path` through the pipeline behind `ctx`, whose
/// dead letters go to the file `scratch`; then rewrites `path` without the entries that went
/// through (keeping what daemons appended meanwhile) and removes `scratch`.
///
/// # Errors
///
/// A file cannot be read or written, or `path` was replaced meanwhile (another replay).
pub async fn replay_file(
    path: &Path,
    scratch: &Path,
    max_bytes: usize,
    ctx: SourceContext,
) -> Result<ReplayReport, SourceError> {
    let letters = FileReplay {
        letters: read_file(path).await?,
        path: path.to_owned(),
        scratch: scratch.to_owned(),
    };
    run(letters, max_bytes, ctx).await
}

async fn run(
    mut letters: impl Letters,
    max_bytes: usize,
    ctx: SourceContext,
) -> Result<ReplayReport, SourceError> {
    let tally = Arc::new(Tally::keeping_done_ids());
    let settle: Arc<dyn Settle> = Arc::clone(&tally) as Arc<dyn Settle>;
    let progress = Progress::messages(letters.total().await?);
    let mut replayed = 0;
    let mut interrupted = false;
    'read: loop {
        let settled = tally.counts().settled();
        progress.update(settled, replayed as u64, settled);
        let entries = letters.next_page().await?;
        if entries.is_empty() {
            break;
        }
        for entry in entries {
            let Some(permit) = ctx.reserve(1).await.and_then(|mut p| p.take()) else {
                interrupted = true;
                break 'read;
            };
            replayed += 1;
            let only = entry.plugin();
            ctx.deliver_to(
                permit,
                entry.payload(max_bytes),
                entry.id.clone(),
                &settle,
                only,
            );
        }
    }
    drop(ctx);
    drop(settle);
    tally
        .wait_settled(replayed as u64, Duration::from_millis(200), |counts| {
            progress.update(counts.settled(), replayed as u64, counts.settled());
        })
        .await;
    progress.finish();
    let still_failing = letters.failures().await?;
    let failed_ids: HashSet<&String> = still_failing.iter().map(|(id, _)| id).collect();
    let done = tally.take_done_ids();
    let fixed: HashSet<&String> = done.iter().filter(|id| !failed_ids.contains(id)).collect();
    let fixed_count = fixed.len();
    letters.finish(&fixed).await?;
    Ok(ReplayReport {
        replayed,
        fixed: fixed_count,
        still_failing,
        abandoned: tally.counts().abandoned as usize,
        unrouted: tally.counts().unrouted as usize,
        interrupted,
    })
}

/// The dead-letter stream, and the scratch stream the replay's failures go to.
struct StreamLetters<'a, C> {
    conn: C,
    stream: &'a str,
    scratch: &'a str,
    after: String,
}

impl<C: redis::aio::ConnectionLike + Send> StreamLetters<'_, C> {
    fn redis_error(what: String) -> impl FnOnce(redis::RedisError) -> SourceError {
        move |error| SourceError::Redis { what, error }
    }
}

impl<C: redis::aio::ConnectionLike + Send> Letters for StreamLetters<'_, C> {
    async fn total(&mut self) -> Result<u64, SourceError> {
        redis::cmd("XLEN")
            .arg(self.stream)
            .query_async(&mut self.conn)
            .await
            .map_err(Self::redis_error(format!("measure {}", self.stream)))
    }

    async fn next_page(&mut self) -> Result<Vec<Entry>, SourceError> {
        let entries = read(&mut self.conn, self.stream, &self.after, 500).await?;
        if let Some(last) = entries.last() {
            self.after = last.id.clone();
        }
        Ok(entries)
    }

    async fn failures(&mut self) -> Result<Vec<(String, String)>, SourceError> {
        let mut failures = Vec::new();
        let mut after = "-".to_owned();
        loop {
            let again = read(&mut self.conn, self.scratch, &after, 500).await?;
            let Some(last) = again.last() else {
                return Ok(failures);
            };
            after = last.id.clone();
            failures.extend(
                again
                    .iter()
                    .map(|entry| (entry.text("source_id"), entry.text("reason"))),
            );
        }
    }

    async fn finish(mut self, fixed: &HashSet<&String>) -> Result<(), SourceError> {
        let fixed: Vec<&String> = fixed.iter().copied().collect();
        for chunk in fixed.chunks(500) {
            let _: i64 = redis::cmd("XDEL")
                .arg(self.stream)
                .arg(chunk)
                .query_async(&mut self.conn)
                .await
                .map_err(Self::redis_error(format!(
                    "remove replayed entries from {}",
                    self.stream
                )))?;
        }
        let _: i64 = redis::cmd("DEL")
            .arg(self.scratch)
            .query_async(&mut self.conn)
            .await
            .map_err(Self::redis_error(format!(
                "delete the scratch stream {}",
                self.scratch
            )))?;
        Ok(())
    }
}

/// The dead-letter file as read at the start, and the scratch file the replay's failures go to.
struct FileReplay {
    letters: FileLetters,
    path: PathBuf,
    scratch: PathBuf,
}

impl Letters for FileReplay {
    async fn total(&mut self) -> Result<u64, SourceError> {
        Ok(self.letters.entries.len() as u64)
    }

    async fn next_page(&mut self) -> Result<Vec<Entry>, SourceError> {
        Ok(std::mem::take(&mut self.letters.entries))
    }

    async fn failures(&mut self) -> Result<Vec<(String, String)>, SourceError> {
        let again = read_file(&self.scratch).await?;
        let mut failures: Vec<(String, String)> = again
            .entries
            .iter()
            .map(|entry| (entry.text("source_id"), entry.text("reason")))
            .collect();
        failures.extend(self.letters.unreadable.iter().cloned());
        Ok(failures)
    }

    async fn finish(self, fixed: &HashSet<&String>) -> Result<(), SourceError> {
        // The scratch goes even when the rewrite is refused (another replay replaced the file).
        let rewritten = self.letters.remove(&self.path, fixed).await;
        let removed = match std::fs::remove_file(&self.scratch) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(SourceError::Write {
                what: format!("remove the scratch file {}", self.scratch.display()),
                error,
            }),
            _ => Ok(()),
        };
        rewritten.and(removed)
    }
}
