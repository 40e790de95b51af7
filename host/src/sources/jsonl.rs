//! The JSONL source: change messages from a file or stdin, one JSON object per line, through
//! the same pipeline as the daemon's sources. Used by `keepwarm replay` to re-warm a cache from
//! an export, and by tests.
//!
//! On a terminal it shows a progress bar; otherwise it logs progress every few seconds.

use super::{Acker, Payload, RawPayload, SourceContext, Tally};
use crate::message::ChangeMessage;
use anyhow::Context as _;
use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt as _, AsyncRead, BufReader};

/// What a replay did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReplaySummary {
    /// Non-empty lines read.
    pub messages: u64,
    /// Messages applied or dead-lettered.
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
pub async fn run(
    input: Input,
    max_bytes: usize,
    ctx: SourceContext,
) -> anyhow::Result<ReplaySummary> {
    let (reader, total_bytes): (Box<dyn AsyncRead + Unpin + Send>, Option<u64>) = match &input {
        Input::File(path) => {
            let file = tokio::fs::File::open(path)
                .await
                .with_context(|| format!("cannot open {}", path.display()))?;
            let len = file.metadata().await.ok().map(|m| m.len());
            (Box::new(file), len)
        }
        Input::Stdin => (Box::new(tokio::io::stdin()), None),
    };
    let mut reader = BufReader::with_capacity(1 << 16, reader);
    let tally = Arc::new(Tally::default());
    let acker: Arc<dyn Acker> = Arc::clone(&tally) as Arc<dyn Acker>;
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
            .context("cannot read input")?;
        if n == 0 {
            break;
        }
        line_no += 1;
        read_bytes += n as u64;
        let text = line.trim_ascii();
        if text.is_empty() {
            continue;
        }
        if ctx.reserve(1).await.is_none() {
            break;
        }
        messages += 1;
        ctx.deliver(decode(text, max_bytes), format!("line {line_no}"), &acker);
        progress.update(read_bytes, messages, tally.done());
    }
    drop(acker);
    while tally.settled() < messages {
        tokio::select! {
            () = tally.changed.notified() => {}
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        progress.update(read_bytes, messages, tally.done());
    }
    progress.finish();
    Ok(ReplaySummary {
        messages,
        done: tally.done(),
        abandoned: tally.abandoned(),
    })
}

fn decode(text: &[u8], max_bytes: usize) -> Payload {
    let raw = || RawPayload::Body(text.to_vec());
    if text.len() > max_bytes {
        return Payload::Malformed {
            raw: raw(),
            reason: format!(
                "message of {} bytes exceeds the limit of {max_bytes} bytes",
                text.len()
            ),
        };
    }
    let decoded = std::str::from_utf8(text)
        .map_err(|error| format!("message is not valid UTF-8: {error}"))
        .and_then(|text| ChangeMessage::from_json(text).map_err(|error| error.0));
    match decoded {
        Ok(message) => Payload::Decoded(message),
        Err(reason) => Payload::Malformed { raw: raw(), reason },
    }
}

/// A progress bar on a terminal, periodic log lines elsewhere (also used by the dead-letter
/// replay).
pub(crate) struct Progress {
    bar: Option<indicatif::ProgressBar>,
    last_log: std::sync::Mutex<Instant>,
}

impl Progress {
    /// Progress counted in messages settled out of `total`.
    pub(crate) fn messages(total: u64) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total).with_style(
                indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {msg} ({eta})")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Progress {
            bar,
            last_log: std::sync::Mutex::new(Instant::now()),
        }
    }

    fn new(total_bytes: Option<u64>) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = match total_bytes {
                Some(len) => indicatif::ProgressBar::new(len).with_style(
                    indicatif::ProgressStyle::with_template(
                        "{bar:40} {bytes}/{total_bytes} {msg} ({eta})",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                ),
                None => indicatif::ProgressBar::new_spinner(),
            };
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Progress {
            bar,
            last_log: std::sync::Mutex::new(Instant::now()),
        }
    }

    /// `position` is bytes read (file replays) or messages settled (`messages`).
    pub(crate) fn update(&self, position: u64, read: u64, done: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(position);
            bar.set_message(format!("{done}/{read} messages done"));
            return;
        }
        let mut last = self.last_log.lock().unwrap_or_else(|p| p.into_inner());
        if last.elapsed() >= Duration::from_secs(5) {
            *last = Instant::now();
            tracing::info!(read, done, "replay progress");
        }
    }

    pub(crate) fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
