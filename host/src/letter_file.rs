//! The dead-letter file: where dead letters go when Memcached is the cache and there is no
//! `[redis]` (`dead_letter.file`). Its format and its locking, in one place: the applier
//! appends to it, the `dead_letters` source lists it and, after a replay, rewrites it.
//!
//! **Format.** One JSON object per line, holding the fields of a dead-letter stream entry (the
//! applier's `DeadLetter::fields`: `reason`, `kind`, `source`, `source_id`, `at`, `plugin`,
//! `plugin_version`, `payload` or `entry.<name>`), each value a JSON string, or
//! `{"base64": "…"}` for bytes that are not UTF-8 (a stream entry's fields are kept byte for
//! byte). Blank lines are skipped.
//!
//! **Locking.** Every writer holds an exclusive advisory lock (`flock`) on the file while it
//! writes. An append opens the file, locks it, and checks that the path still names the file it
//! locked (a replay may have replaced it meanwhile: it then opens the new one), ends a line cut
//! short by a crash, writes its lines and makes them durable (`fdatasync`) before returning, so
//! that the messages they hold may be acknowledged. A replay reads a snapshot under the lock and,
//! once done, takes the lock again, keeps what was appended after the snapshot, and replaces the
//! file by a rename (made durable with the directory), so that a crash leaves the old file or the
//! new one, never half of it; an appender waiting on the old file's lock then finds it replaced
//! and appends to the new one. No letter is lost in the race.

use base64::Engine as _;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read as _, Seek as _, Write as _};
use std::os::unix::fs::{FileExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};

/// One dead letter as a line of the file (with its newline), from its fields.
pub fn encode(fields: Vec<(String, Vec<u8>)>) -> Vec<u8> {
    let object: serde_json::Map<String, serde_json::Value> = fields
        .into_iter()
        .map(|(name, value)| {
            let value = match String::from_utf8(value) {
                Ok(text) => serde_json::Value::String(text),
                Err(bytes) => serde_json::json!({
                    "base64": base64::engine::general_purpose::STANDARD.encode(bytes.into_bytes())
                }),
            };
            (name, value)
        })
        .collect();
    let mut line = serde_json::Value::Object(object).to_string().into_bytes();
    line.push(b'\n');
    line
}

/// The fields of one line, or why it is not a dead letter.
pub fn decode(line: &[u8]) -> Result<BTreeMap<String, Vec<u8>>, String> {
    let object: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(line).map_err(|error| format!("not a JSON object: {error}"))?;
    object
        .into_iter()
        .map(|(name, value)| {
            let bytes = match value {
                serde_json::Value::String(text) => text.into_bytes(),
                serde_json::Value::Object(ref inner) => match inner.get("base64") {
                    Some(serde_json::Value::String(text)) if inner.len() == 1 => {
                        base64::engine::general_purpose::STANDARD
                            .decode(text)
                            .map_err(|error| format!("field {name:?}: bad base64: {error}"))?
                    }
                    _ => return Err(format!("field {name:?} is not a string or {{\"base64\"}}")),
                },
                _ => return Err(format!("field {name:?} is not a string or {{\"base64\"}}")),
            };
            Ok((name, bytes))
        })
        .collect()
}

/// The non-blank lines of `bytes` with their 1-based line numbers (a last line without its
/// newline included).
pub fn lines(bytes: &[u8]) -> impl Iterator<Item = (usize, &[u8])> {
    bytes
        .split(|&b| b == b'\n')
        .enumerate()
        .map(|(index, line)| (index + 1, line))
        .filter(|(_, line)| !line.trim_ascii().is_empty())
}

/// Appends `lines` (whole lines, each with its newline) and makes them durable.
///
/// # Errors
///
/// The file cannot be opened, locked, written or synced.
pub fn append(path: &Path, lines: &[u8]) -> io::Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    let mut file = lock_current(path, true)?.ok_or_else(|| io::Error::other("not created"))?;
    let len = file.metadata()?.len();
    if len > 0 {
        let mut last = [0];
        file.read_exact_at(&mut last, len - 1)?;
        if last[0] != b'\n' {
            // A line cut short by a crash stays one unreadable line of its own.
            file.write_all(b"\n")?;
        }
    }
    file.write_all(lines)?;
    file.sync_data()
}

/// What a replay read: the file (kept open, unlocked) and its bytes then.
pub struct Snapshot {
    file: File,
    path: PathBuf,
    /// The file's contents when read.
    pub bytes: Vec<u8>,
}

/// Reads the file under its lock; `None` when it does not exist (no dead letter yet).
///
/// # Errors
///
/// The file cannot be opened, locked or read.
pub fn snapshot(path: &Path) -> io::Result<Option<Snapshot>> {
    let Some(mut file) = lock_current(path, false)? else {
        return Ok(None);
    };
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    file.unlock()?;
    Ok(Some(Snapshot {
        file,
        path: path.to_owned(),
        bytes,
    }))
}

impl Snapshot {
    /// Replaces the part of the file the snapshot read by `kept` (whole lines), keeping what was
    /// appended since, atomically (a rename) and durably.
    ///
    /// # Errors
    ///
    /// The file was replaced or rewritten since the snapshot (another replay): it is left as it
    /// is. Or it cannot be locked, read, written or synced.
    pub fn replace(self, kept: &[u8]) -> io::Result<()> {
        let Snapshot {
            mut file,
            path,
            bytes,
        } = self;
        file.lock()?;
        if !names(&path, &file)? {
            return Err(io::Error::other(format!(
                "{} was replaced while the replay ran (another replay?); it is left as it is",
                path.display()
            )));
        }
        let mut now = Vec::new();
        file.seek(io::SeekFrom::Start(0))?;
        file.read_to_end(&mut now)?;
        let Some(appended) = now.strip_prefix(bytes.as_slice()) else {
            return Err(io::Error::other(format!(
                "{} was rewritten while the replay ran; it is left as it is",
                path.display()
            )));
        };
        let mut temp_name = path.clone().into_os_string();
        temp_name.push(format!(".tmp-{}", std::process::id()));
        let temp = PathBuf::from(temp_name);
        let mut new = File::create(&temp)?;
        new.set_permissions(file.metadata()?.permissions())?;
        new.write_all(kept)?;
        new.write_all(appended)?;
        new.sync_all()?;
        std::fs::rename(&temp, &path)?;
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        File::open(dir)?.sync_all()?;
        // Appenders waiting on the old file's lock find it replaced once this returns.
        drop(file);
        Ok(())
    }
}

/// Opens and locks (exclusively) the file the path names now, retrying when it was replaced
/// between the open and the lock. `None`: it does not exist and `create` is false.
fn lock_current(path: &Path, create: bool) -> io::Result<Option<File>> {
    loop {
        // A reader needs no write access: the lock works on a read-only descriptor.
        let opened = OpenOptions::new()
            .read(true)
            .append(create)
            .create(create)
            .open(path);
        let file = match opened {
            Ok(file) => file,
            Err(error) if !create && error.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(error),
        };
        file.lock()?;
        if names(path, &file)? {
            return Ok(Some(file));
        }
    }
}

/// Whether `path` still names `file`.
fn names(path: &Path, file: &File) -> io::Result<bool> {
    let held = file.metadata()?;
    match std::fs::metadata(path) {
        Ok(now) => Ok(now.dev() == held.dev() && now.ino() == held.ino()),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_path(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kw-letters-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("dead.jsonl");
        let _ = std::fs::remove_file(&path);
        path
    }

    #[test]
    fn lines_keep_every_byte_of_the_fields() {
        let fields = vec![
            ("reason".to_owned(), b"bad \"quote\"\nnewline".to_vec()),
            ("entry.record".to_owned(), vec![0xff, 0xfe]),
        ];
        let line = encode(fields.clone());
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        let back = decode(line.strip_suffix(b"\n").unwrap()).unwrap();
        assert_eq!(back, fields.into_iter().collect::<BTreeMap<_, _>>());
        assert!(decode(b"{\"a\": 1}").unwrap_err().contains("\"a\""));
        assert!(
            decode(b"{\"a\": \"x")
                .unwrap_err()
                .contains("not a JSON object")
        );
    }

    #[test]
    fn a_replay_keeps_what_was_appended_after_its_snapshot() {
        let path = temp_path("race");
        let line = |n: &str| encode(vec![("source_id".to_owned(), n.as_bytes().to_vec())]);
        append(&path, &[line("1"), line("2")].concat()).unwrap();
        let snapshot = snapshot(&path).unwrap().unwrap();
        assert_eq!(lines(&snapshot.bytes).count(), 2);
        // A daemon appends while the replay runs.
        append(&path, &line("3")).unwrap();
        snapshot.replace(&line("2")).unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            [line("2"), line("3")].concat()
        );
        // A second replay from an older snapshot is refused, and nothing changes.
        let stale = Snapshot {
            file: File::open(&path).unwrap(),
            path: path.clone(),
            bytes: line("9"),
        };
        assert!(stale.replace(b"").is_err());
        assert_eq!(lines(&std::fs::read(&path).unwrap()).count(), 2);
    }

    #[test]
    fn no_letter_is_lost_or_doubled_while_replays_rewrite_the_file_under_appenders() {
        let path = temp_path("stress");
        let appenders: Vec<_> = (0..3)
            .map(|writer| {
                let path = path.clone();
                std::thread::spawn(move || {
                    for n in 0..200 {
                        let id = format!("{writer}-{n}").into_bytes();
                        append(&path, &encode(vec![("source_id".to_owned(), id)])).unwrap();
                    }
                })
            })
            .collect();
        // Replays that take every letter they read, one after the other, while the appenders run.
        let mut taken = Vec::new();
        while !appenders.iter().all(std::thread::JoinHandle::is_finished) {
            if let Some(snapshot) = snapshot(&path).unwrap() {
                taken.extend(lines(&snapshot.bytes).map(|(_, line)| line.to_vec()));
                snapshot.replace(b"").unwrap();
            }
        }
        for appender in appenders {
            appender.join().unwrap();
        }
        let left = std::fs::read(&path).unwrap();
        let mut seen: Vec<Vec<u8>> = taken;
        seen.extend(lines(&left).map(|(_, line)| line.to_vec()));
        let total = seen.len();
        seen.sort();
        seen.dedup();
        assert_eq!((total, seen.len()), (600, 600));
    }

    #[test]
    fn a_line_cut_short_by_a_crash_stays_apart() {
        let path = temp_path("torn");
        std::fs::write(&path, b"{\"reason\": \"cut").unwrap();
        let line = encode(vec![("reason".to_owned(), b"ok".to_vec())]);
        append(&path, &line).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let read: Vec<_> = lines(&bytes).map(|(n, l)| (n, decode(l).is_ok())).collect();
        assert_eq!(read, [(1, false), (2, true)]);
    }
}
