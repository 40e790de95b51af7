//! The JSONL source: change messages from a file or stdin, one JSON object per line, through
//! the same pipeline as the daemon's sources. Used by `keepwarm replay` to re-warm a cache from
//! an export, and by tests.
//!
//! On a terminal it shows a progress bar; otherwise it logs progress every few seconds.

mod progress;

use super::{SourceContext, SourceError, Tally};
use crate::delivery::Settle;
pub(crate) use progress::Progress;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt as _, AsyncRead, BufReader};

/// What a replay did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReplaySummary {
    /// Non-empty lines read.
    pub messages: u64,
    /// Messages applied, dead-lettered, or taken by no plugin.
    pub done: u64,
    /// Messages abandoned (shutdown while Redis was unavailable).
    pub abandoned: u64,
}

/// Where the lines come from.
#[derive(Debug, Clone)]
pub enum Input {
    /// A file.
    File(PathBuf),
    /// Standard input.
    Stdin,
}

/// Feeds every line of `input` into the pipeline and waits until each one is settled.
///
/// # Errors
///
/// The input cannot be opened or read.
pub async fn run(input: Input, ctx: SourceContext) -> Result<ReplaySummary, SourceError> {
    let what = match &input {
        Input::File(path) => path.display().to_string(),
        Input::Stdin => "standard input".to_owned(),
    };
    let read_error = |error| SourceError::Read {
        what: what.clone(),
        error,
    };
    let (reader, total_bytes): (Box<dyn AsyncRead + Unpin + Send>, Option<u64>) = match &input {
        Input::File(path) => {
            let file = tokio::fs::File::open(path).await.map_err(read_error)?;
            let len = file.metadata().await.ok().map(|m| m.len());
            (Box::new(file), len)
        }
        Input::Stdin => (Box::new(tokio::io::stdin()), None),
    };
    let mut reader = BufReader::with_capacity(1 << 16, reader);
    let tally = Arc::new(Tally::default());
    let settle: Arc<dyn Settle> = Arc::clone(&tally) as Arc<dyn Settle>;
    let progress = Progress::new(total_bytes);
    let mut line = Vec::new();
    let mut line_no = 0u64;
    let mut messages = 0u64;
    let mut read_bytes = 0u64;
    loop {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .await
            .map_err(read_error)?;
        if n == 0 {
            break;
        }
        line_no += 1;
        read_bytes += n as u64;
        let text = line.trim_ascii();
        if text.is_empty() {
            continue;
        }
        let Some(mut permits) = ctx.reserve(1).await else {
            break;
        };
        let Some(permit) = permits.take() else {
            break;
        };
        messages += 1;
        let payload = ctx.decode_json(text.to_vec());
        ctx.deliver(permit, payload, format!("line {line_no}"), &settle);
        progress.update(read_bytes, messages, tally.counts().finished());
    }
    drop(settle);
    tally
        .wait_settled(messages, Duration::from_millis(500), |counts| {
            progress.update(read_bytes, messages, counts.finished());
        })
        .await;
    progress.finish();
    let counts = tally.counts();
    Ok(ReplaySummary {
        messages,
        done: counts.finished(),
        abandoned: counts.abandoned,
    })
}
