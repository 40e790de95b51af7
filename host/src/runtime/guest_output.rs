//! Guest stdout and stderr: each line goes to keepwarm's log, tagged with the plugin and its
//! version, under the same rate limit as the `log` import. Writes never fail, so a plugin that
//! prints too much loses lines, not its instance.

use super::state::PluginIdent;
use bytes::Bytes;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// Longest line kept; the rest of a longer line is cut.
const MAX_LINE: usize = 4096;

/// A token bucket for plugin log lines: a flood of logs costs the plugin, not the host.
#[derive(Debug)]
pub(crate) struct LogBudget {
    tokens: f64,
    last: Instant,
    dropped: u64,
}

impl LogBudget {
    const RATE_PER_SEC: f64 = 100.0;
    const BURST: f64 = 200.0;

    /// A full bucket.
    pub(crate) fn new() -> LogBudget {
        LogBudget {
            tokens: Self::BURST,
            last: Instant::now(),
            dropped: 0,
        }
    }

    /// Takes a token; false when the line must be dropped.
    pub(crate) fn take(&mut self, ident: &PluginIdent) -> bool {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * Self::RATE_PER_SEC).min(Self::BURST);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            if self.dropped > 0 {
                tracing::warn!(
                    plugin = %ident.name,
                    version = %ident.version,
                    dropped = self.dropped,
                    "plugin log lines dropped by the rate limit"
                );
                self.dropped = 0;
            }
            true
        } else {
            self.dropped += 1;
            false
        }
    }
}

impl Default for LogBudget {
    fn default() -> LogBudget {
        LogBudget::new()
    }
}

/// One of a plugin's output streams.
#[derive(Clone)]
pub(crate) struct GuestOutput {
    ident: Arc<PluginIdent>,
    stream: &'static str,
    budget: Arc<Mutex<LogBudget>>,
    line: Arc<Mutex<Vec<u8>>>,
}

impl GuestOutput {
    /// The `stream` ("stdout" or "stderr") of a plugin.
    pub(crate) fn new(
        ident: Arc<PluginIdent>,
        stream: &'static str,
        budget: Arc<Mutex<LogBudget>>,
    ) -> GuestOutput {
        GuestOutput {
            ident,
            stream,
            budget,
            line: Arc::new(Mutex::new(Vec::new())),
        }
    }

    fn emit(&self, line: &[u8]) {
        let mut budget = self.budget.lock().unwrap_or_else(|p| p.into_inner());
        if budget.take(&self.ident) {
            tracing::info!(
                plugin = %self.ident.name,
                version = %self.ident.version,
                stream = self.stream,
                "{}",
                String::from_utf8_lossy(line).trim_end()
            );
        }
    }
}

impl OutputStream for GuestOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        let mut line = self.line.lock().unwrap_or_else(|p| p.into_inner());
        for &byte in bytes.as_ref() {
            if byte == b'\n' {
                self.emit(&line);
                line.clear();
            } else if line.len() < MAX_LINE {
                line.push(byte);
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 << 10)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for GuestOutput {
    async fn ready(&mut self) {}
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        // Only WASIp3 guests use this; keepwarm's contract is WASIp2, whose writes go through
        // `p2_stream`. Discard rather than bypass the log.
        Box::new(tokio::io::sink())
    }
}
