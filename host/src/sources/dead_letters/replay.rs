//! `keepwarm dead-letters replay`: every entry of the dead-letter stream through the current
//! plugins.
//!
//! A replay writes new failures to a scratch stream instead of the dead-letter stream. An
//! entry leaves the dead-letter stream (`XDEL`) only when its replay was applied and did not
//! fail again; an entry that fails again stays, and the new reason is reported. Shutdown
//! (Ctrl-C, SIGTERM) stops the reading; what was handed over is finished and reported.

use super::read;
use crate::delivery::Settle;
use crate::sources::jsonl::Progress;
use crate::sources::{SourceContext, SourceError, Tally};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

/// What a replay did.
#[derive(Debug, Default)]
pub struct ReplayReport {
    /// Entries replayed.
    pub replayed: usize,
    /// Entries applied and removed from the dead-letter stream.
    pub fixed: usize,
    /// Entries that failed again, with their new reason; they stay.
    pub still_failing: Vec<(String, String)>,
    /// Entries left unapplied (shutdown); they stay.
    pub abandoned: usize,
    /// Whether shutdown stopped the replay before every entry was read.
    pub interrupted: bool,
}

/// Replays every entry of `stream` through the pipeline behind `ctx`, whose dead letters go to
/// `scratch`; then removes the entries that went through from `stream`.
///
/// # Errors
///
/// Redis fails.
pub async fn replay(
    mut conn: impl redis::aio::ConnectionLike + Send,
    stream: &str,
    scratch: &str,
    max_bytes: usize,
    ctx: SourceContext,
) -> Result<ReplayReport, SourceError> {
    let redis_error = |what: String| move |error| SourceError::Redis { what, error };
    let tally = Arc::new(Tally::keeping_done_ids());
    let settle: Arc<dyn Settle> = Arc::clone(&tally) as Arc<dyn Settle>;
    let total: u64 = redis::cmd("XLEN")
        .arg(stream)
        .query_async(&mut conn)
        .await
        .map_err(redis_error(format!("measure {stream}")))?;
    let progress = Progress::messages(total);
    let mut after = "-".to_owned();
    let mut replayed = 0;
    let mut interrupted = false;
    'read: loop {
        let settled = tally.counts().settled();
        progress.update(settled, replayed as u64, settled);
        let entries = read(&mut conn, stream, &after, 500).await?;
        let Some(last) = entries.last() else {
            break;
        };
        after = last.id.clone();
        for entry in entries {
            let Some(permit) = ctx.reserve(1).await.and_then(|mut p| p.take()) else {
                interrupted = true;
                break 'read;
            };
            replayed += 1;
            ctx.deliver(permit, entry.payload(max_bytes), entry.id.clone(), &settle);
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
    let mut still_failing = Vec::new();
    let mut failed_ids = HashSet::new();
    let mut after = "-".to_owned();
    loop {
        let again = read(&mut conn, scratch, &after, 500).await?;
        let Some(last) = again.last() else {
            break;
        };
        after = last.id.clone();
        for entry in again {
            failed_ids.insert(entry.text("source_id"));
            still_failing.push((entry.text("source_id"), entry.text("reason")));
        }
    }
    let done = tally.take_done_ids();
    let fixed: Vec<&String> = done.iter().filter(|id| !failed_ids.contains(*id)).collect();
    for chunk in fixed.chunks(500) {
        let _: i64 = redis::cmd("XDEL")
            .arg(stream)
            .arg(chunk)
            .query_async(&mut conn)
            .await
            .map_err(redis_error(format!(
                "remove replayed entries from {stream}"
            )))?;
    }
    let _: i64 = redis::cmd("DEL")
        .arg(scratch)
        .query_async(&mut conn)
        .await
        .map_err(redis_error(format!("delete the scratch stream {scratch}")))?;
    Ok(ReplayReport {
        replayed,
        fixed: fixed.len(),
        still_failing,
        abandoned: tally.counts().abandoned as usize,
        interrupted,
    })
}
