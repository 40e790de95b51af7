//! The dead-letter file (Memcached without Redis): read as entries, and rewritten without the
//! entries a replay fixed. The format and the locking are [`crate::letter_file`]'s.

use super::Entry;
use crate::letter_file::{self, Snapshot};
use crate::sources::SourceError;
use std::collections::HashSet;
use std::path::Path;

/// The dead-letter file as read at one moment.
pub struct FileLetters {
    snapshot: Option<Snapshot>,
    /// Its dead letters, oldest first, with their line numbers as ids (`line:<n>`).
    pub entries: Vec<Entry>,
    /// Lines that are not dead letters (a line cut short by a crash), by id, with why; they
    /// stay in the file.
    pub unreadable: Vec<(String, String)>,
}

/// Reads the dead-letter file (none yet: no entries).
///
/// # Errors
///
/// It cannot be opened, locked or read.
pub async fn read_file(path: &Path) -> Result<FileLetters, SourceError> {
    let owned = path.to_owned();
    let snapshot = tokio::task::spawn_blocking(move || letter_file::snapshot(&owned))
        .await
        .unwrap_or_else(|error| Err(std::io::Error::other(error)))
        .map_err(|error| SourceError::Read {
            what: path.display().to_string(),
            error,
        })?;
    let mut letters = FileLetters {
        snapshot: None,
        entries: Vec::new(),
        unreadable: Vec::new(),
    };
    if let Some(snapshot) = &snapshot {
        for (number, line) in letter_file::lines(&snapshot.bytes) {
            let id = line_id(number);
            match letter_file::decode(line) {
                Ok(fields) => letters.entries.push(Entry { id, fields }),
                Err(reason) => letters
                    .unreadable
                    .push((id, format!("not a dead letter: {reason}"))),
            }
        }
    }
    letters.snapshot = snapshot;
    Ok(letters)
}

fn line_id(number: usize) -> String {
    format!("line:{number}")
}

impl FileLetters {
    /// Rewrites the file without the entries `fixed` names, keeping every other line and what
    /// was appended since it was read.
    ///
    /// # Errors
    ///
    /// The file was replaced since (another replay), or cannot be rewritten.
    pub(super) async fn remove(
        self,
        path: &Path,
        fixed: &HashSet<&String>,
    ) -> Result<(), SourceError> {
        let Some(snapshot) = self.snapshot else {
            return Ok(());
        };
        let mut kept = Vec::new();
        for (number, line) in letter_file::lines(&snapshot.bytes) {
            if !fixed.contains(&line_id(number)) {
                kept.extend_from_slice(line);
                kept.push(b'\n');
            }
        }
        tokio::task::spawn_blocking(move || snapshot.replace(&kept))
            .await
            .unwrap_or_else(|error| Err(std::io::Error::other(error)))
            .map_err(|error| SourceError::Write {
                what: path.display().to_string(),
                error,
            })
    }
}
