//! Logging through the host's `log` import.
//!
//! The host tags each line with the plugin's name and version and rate-limits it, so log
//! sparingly in [`Plugin::handle`](crate::Plugin::handle): a line per change is a line per row.
//! Off wasm32 (native unit tests) lines go to stderr instead.
//!
//! ```
//! keepwarm_guest::log::info("cache warmed");
//! keepwarm_guest::log::warn(format!("skipping table {}", "audit_log"));
//! ```

use crate::Level;

/// Logs `message` at `debug` level: detail for plugin authors.
pub fn debug(message: impl AsRef<str>) {
    log(Level::Debug, message.as_ref());
}

/// Logs `message` at `info` level: normal events.
pub fn info(message: impl AsRef<str>) {
    log(Level::Info, message.as_ref());
}

/// Logs `message` at `warn` level: something looks wrong but the change was handled.
pub fn warn(message: impl AsRef<str>) {
    log(Level::Warn, message.as_ref());
}

/// Logs `message` at `error` level: something went wrong.
pub fn error(message: impl AsRef<str>) {
    log(Level::Error, message.as_ref());
}

/// Logs `message` at `level`.
pub fn log(level: Level, message: &str) {
    #[cfg(target_arch = "wasm32")]
    crate::bindings::keepwarm::plugin::log::log(level, message);
    #[cfg(not(target_arch = "wasm32"))]
    eprintln!("[{}] {message}", level_name(level));
}

#[cfg(not(target_arch = "wasm32"))]
fn level_name(level: Level) -> &'static str {
    match level {
        Level::Debug => "debug",
        Level::Info => "info",
        Level::Warn => "warn",
        Level::Error => "error",
    }
}
