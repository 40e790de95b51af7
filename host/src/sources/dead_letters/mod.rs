//! The dead letters as a source: `keepwarm dead-letters list` shows them, and
//! `keepwarm dead-letters replay` ([`replay`]) runs them through the current plugins once they
//! are fixed. They are in the dead-letter stream, or without `[redis]` in the dead-letter file
//! ([`file`]).

mod file;
mod replay;

use crate::delivery::Payload;
use crate::sources::{SourceError, decode_json, decode_stream_entry};
pub use file::{FileLetters, read_file};
pub use replay::{ReplayReport, replay, replay_file};
use std::collections::BTreeMap;
use std::sync::Arc;

/// One dead-letter entry.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Stream id, or in the file `line:<n>`.
    pub id: String,
    /// Fields, by name.
    pub fields: BTreeMap<String, Vec<u8>>,
}

impl Entry {
    /// A field as text.
    pub fn text(&self, name: &str) -> String {
        self.fields
            .get(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default()
    }

    /// The plugin that failed on the message, if a plugin was involved: the replay goes to it
    /// alone (the others applied the message when it came).
    pub fn plugin(&self) -> Option<Arc<str>> {
        let name = self.fields.get("plugin")?;
        (!name.is_empty()).then(|| Arc::from(String::from_utf8_lossy(name).as_ref()))
    }

    /// The message the entry holds, decoded again by the decode every source uses: the
    /// original body, or the original stream entry's fields (`entry.<name>`).
    pub fn payload(&self, max_bytes: usize) -> Payload {
        if let Some(body) = self.fields.get("payload") {
            return decode_json(body, max_bytes);
        }
        let fields: Vec<(String, Vec<u8>)> = self
            .fields
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("entry.")?.to_owned(), v.clone())))
            .collect();
        decode_stream_entry(fields, max_bytes)
    }
}

/// Reads up to `count` entries after `after` (exclusive; `-` for the start).
///
/// # Errors
///
/// Redis fails.
pub async fn read(
    conn: &mut (impl redis::aio::ConnectionLike + Send),
    stream: &str,
    after: &str,
    count: usize,
) -> Result<Vec<Entry>, SourceError> {
    let start = if after == "-" {
        "-".to_owned()
    } else {
        format!("({after}")
    };
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(stream)
        .arg(start)
        .arg("+")
        .arg("COUNT")
        .arg(count)
        .query_async(conn)
        .await
        .map_err(|error| SourceError::Redis {
            what: format!("read the dead-letter stream {stream}"),
            error,
        })?;
    Ok(reply
        .ids
        .into_iter()
        .map(|entry| Entry {
            id: entry.id,
            fields: entry
                .map
                .into_iter()
                .filter_map(|(name, value)| {
                    Some((name, redis::from_redis_value::<Vec<u8>>(value).ok()?))
                })
                .collect(),
        })
        .collect())
}
