//! Progress of a replay: a bar on a terminal, a log line every few seconds elsewhere.

use std::io::IsTerminal as _;
use std::time::{Duration, Instant};

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

    pub(crate) fn new(total_bytes: Option<u64>) -> Progress {
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
