//! `keepwarm test`: runs one plugin over change messages without Redis.
//!
//! Input: one Sequin change message (JSON) per line. Output: one JSON line per non-empty input
//! line, in order:
//!
//! - `{"line":N,"ops":[…]}`: the operations, each as `{"op":"set","key":…,"value":…,"ttl_ms":…}`,
//!   `{"op":"del","key":…}`, `{"op":"hash-set","key":…,"fields":{…}}`, and so on (values are
//!   text when they are UTF-8, otherwise arrays of bytes);
//! - `{"line":N,"error":"…"}`: the message did not decode, or the plugin rejected it, trapped or
//!   timed out;
//! - `{"line":N,"skipped":"…"}`: the manifest does not subscribe to this table or action.

use crate::message::ChangeMessage;
use crate::runtime::loader::PluginFiles;
use crate::runtime::{EngineError, LoadError, Runtime, load_plugin};
use serde_json::json;
use std::io::{BufRead, Write};
use std::path::Path;

/// Why `keepwarm test` stopped.
#[derive(Debug, thiserror::Error)]
pub enum PluginTestError {
    /// The engine did not start.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The plugin did not load.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// Reading the input or writing the output failed.
    #[error("input or output failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Loads the plugin and answers every line of `input` on `output`.
///
/// # Errors
///
/// The plugin fails to load, or the input or output fails.
pub fn run(
    wasm: &Path,
    manifest: Option<&Path>,
    input: impl BufRead,
    mut output: impl Write,
) -> Result<(), PluginTestError> {
    let runtime = Runtime::new(None)?;
    let name = wasm
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("plugin")
        .to_owned();
    let sibling = wasm.with_extension("toml");
    let files = PluginFiles {
        name,
        wasm: wasm.to_owned(),
        manifest: manifest
            .map(Path::to_owned)
            .or_else(|| sibling.is_file().then_some(sibling)),
    };
    let plugin = load_plugin(&runtime, &files)?;
    for (index, line) in input.split(b'\n').enumerate() {
        let line = line?;
        let text = line.trim_ascii();
        if text.is_empty() {
            continue;
        }
        let number = index + 1;
        let answer = match std::str::from_utf8(text)
            .map_err(|error| format!("message is not valid UTF-8: {error}"))
            .and_then(|t| ChangeMessage::from_json(t).map_err(|e| format!("decode: {e}")))
        {
            Err(error) => json!({"line": number, "error": error}),
            Ok(message) if !plugin.manifest.subscribes(&message) => json!({
                "line": number,
                "skipped": format!("the manifest does not subscribe to {}.{} {}", message.schema(), message.table(), message.action),
            }),
            Ok(message) => match plugin.call_batch(&[&message]).pop() {
                Some(Ok(ops)) => {
                    json!({"line": number, "ops": ops.iter().map(|op| op.to_json()).collect::<Vec<_>>()})
                }
                Some(Err(error)) => json!({"line": number, "error": error.to_string()}),
                None => json!({"line": number, "error": "no result"}),
            },
        };
        writeln!(output, "{answer}")?;
    }
    output.flush()?;
    Ok(())
}
