//! Dead letters: messages that cannot be applied, kept in a Redis Stream with the reason.
//!
//! Each entry has the fields `reason`, `kind`, `source`, `source_id`, `at` (Unix ms), and, when
//! a plugin was involved, `plugin` and `plugin_version`. The message itself is in `payload`
//! (Sequin JSON, or the body as received) or, for a stream entry that did not decode, in one
//! `entry.<field>` per original field, byte for byte, so a replay sees exactly what arrived.

use crate::delivery::RawPayload;

/// Why a message was dead-lettered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeadLetterKind {
    /// The payload is not a change message.
    Decode,
    /// A plugin rejected the change, trapped, timed out or broke its limits.
    Plugin,
    /// Redis refused an operation (e.g. `WRONGTYPE`).
    Redis,
    /// Memcached cannot take an operation (one it lacks, a value over its size limit, …).
    Memcached,
}

impl DeadLetterKind {
    /// The kind as written in the entry.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterKind::Decode => "decode",
            DeadLetterKind::Plugin => "plugin",
            DeadLetterKind::Redis => "redis",
            DeadLetterKind::Memcached => "memcached",
        }
    }
}

/// One dead-letter entry (the pipeline builds them in `pipeline/lane/letters.rs`).
#[derive(Clone, Debug)]
pub struct DeadLetter {
    /// What failed: decoding, the plugin, or Redis.
    pub kind: DeadLetterKind,
    /// The error, for people.
    pub reason: String,
    /// The plugin involved: its name and version.
    pub plugin: Option<(String, String)>,
    /// The name of the source the message came from.
    pub source: String,
    /// The message's id in its source.
    pub source_id: String,
    /// The message as received (or as Sequin JSON once decoded).
    pub payload: RawPayload,
}

impl DeadLetter {
    /// The `XADD` fields of the entry.
    pub fn fields(&self, at_ms: u128) -> Vec<(String, Vec<u8>)> {
        let mut fields = vec![
            ("reason".to_owned(), self.reason.clone().into_bytes()),
            ("kind".to_owned(), self.kind.as_str().as_bytes().to_vec()),
            ("source".to_owned(), self.source.clone().into_bytes()),
            ("source_id".to_owned(), self.source_id.clone().into_bytes()),
            ("at".to_owned(), at_ms.to_string().into_bytes()),
        ];
        if let Some((name, version)) = &self.plugin {
            fields.push(("plugin".to_owned(), name.clone().into_bytes()));
            fields.push(("plugin_version".to_owned(), version.clone().into_bytes()));
        }
        match &self.payload {
            RawPayload::Body(body) => fields.push(("payload".to_owned(), body.clone())),
            RawPayload::StreamFields(entry) => {
                for (name, value) in entry {
                    fields.push((format!("entry.{name}"), value.clone()));
                }
            }
        }
        fields
    }
}
