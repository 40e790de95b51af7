//! The JSONL source: change messages from a file or stdin, one JSON object per line, through
//! the same pipeline as the daemon's sources. Used by `keepwarm replay` to re-warm a cache from
//! an export, and by tests.
//!
//! On a terminal it shows a progress bar; otherwise it logs progress every few seconds.

mod progress;

use super::{SourceContext, SourceError, Tally};
use crate::delivery::{Payload, RawPayload, Settle};
use crate::message::DecodeError;
pub(crate) use progress::Progress;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufRead, AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, BufReader};

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
    // A line is read up to this; the rest of a longer one is skipped, not held in memory (an
    // export of one huge JSON array, a binary file).
    let limit = ctx.max_message_bytes();
    let bound = limit as u64 + 2;
    loop {
        line.clear();
        let n = (&mut reader)
            .take(bound)
            .read_until(b'\n', &mut line)
            .await
            .map_err(read_error)?;
        if n == 0 {
            break;
        }
        line_no += 1;
        read_bytes += n as u64;
        // The line's length without its newline, when it is over the bound.
        let mut too_long = None;
        if n as u64 == bound && line.last() != Some(&b'\n') {
            let (rest, newline) = skip_line(&mut reader).await.map_err(read_error)?;
            read_bytes += rest + u64::from(newline);
            too_long = Some(n as u64 + rest);
        }
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
        let payload = match too_long {
            Some(size) => Payload::Malformed {
                // Its start, for the dead letter.
                raw: RawPayload::Body(line[..limit].to_vec()),
                reason: DecodeError::TooLarge {
                    size: usize::try_from(size).unwrap_or(usize::MAX),
                    limit,
                },
            },
            None => ctx.decode_json(text),
        };
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

/// Reads past the rest of the line without keeping it: its length, and whether a newline
/// (consumed too) ended it.
async fn skip_line(reader: &mut (impl AsyncBufRead + Unpin)) -> std::io::Result<(u64, bool)> {
    let mut skipped = 0u64;
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Ok((skipped, false));
        }
        match buf.iter().position(|&b| b == b'\n') {
            Some(at) => {
                reader.consume(at + 1);
                return Ok((skipped + at as u64, true));
            }
            None => {
                let len = buf.len();
                reader.consume(len);
                skipped += len as u64;
            }
        }
    }
}
