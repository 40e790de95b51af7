//! The newest version written to the pool, which the floor is raised to after a lost
//! connection: kept in the cache Redis when there is one, else in a local file
//! (`memcached.newest_file`). Either way it is recorded before the batch's messages are
//! acknowledged, so that it outlives a Memcached restart and a process killed around it.
//!
//! **In Redis** (`<versioning.key_prefix>memcached-newest:<servers>`), raised by a script in the
//! pipeline of the batch's dead letters: every keepwarm process of the pool, on any host, shares
//! it.
//!
//! **In a file**, one line `<commit_lsn>:<commit_idx>` (zero-padded, always 42 bytes) rewritten
//! in place under an exclusive advisory lock, then `fdatasync`: it is only ever raised, and the
//! processes of one host that share the file share the record. Its limits: processes on other
//! hosts do not see it (several hosts need `[redis]`, or each its own pool); a lost file
//! forgets the record (until the next write raises it again, a Memcached restart lets older
//! redeliveries fill keys the restart emptied); the rewrite of 42 bytes within one disk
//! sector is taken to be atomic, and a file that does not read back as a version stops keepwarm
//! at start with an error naming it. Concurrent lanes wait on one another: the one that writes
//! records the newest version any of them asked for, so the others usually find theirs
//! recorded and skip the disk.

use super::super::connection::Connection;
use super::super::versioned::{parse_version, version_arg};
use crate::message::Version;
use std::fs::OpenOptions;
use std::io::{self, Read as _};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Raises the string at `KEYS[1]` to `ARGV[1]` (zero-padded versions: string order is version
/// order).
const RAISE_NEWEST: &str = "local c = redis.call('GET', KEYS[1]) if (not c) or c < ARGV[1] then redis.call('SET', KEYS[1], ARGV[1]) end return 0";

/// Where the newest version written is recorded.
pub(in crate::applier) enum Newest {
    /// In the cache Redis, at `key` (one per pool: deployments that share the Redis keep their
    /// own).
    Redis { conn: Connection, key: String },
    /// In a local file.
    File(NewestFile),
}

impl Newest {
    /// The record in the cache Redis for the pool of `servers`.
    pub(in crate::applier) fn in_redis(
        conn: Connection,
        version_prefix: &str,
        servers: &[String],
    ) -> Newest {
        Newest::Redis {
            conn,
            key: format!("{version_prefix}memcached-newest:{}", servers.join(",")),
        }
    }

    /// The newest version recorded (by any process sharing the record).
    pub(super) async fn read(&self) -> io::Result<Option<Version>> {
        match self {
            Newest::Redis { conn, key } => conn
                .query::<Option<String>>(redis::cmd("GET").arg(key))
                .await
                .map(|text| text.as_deref().and_then(parse_version))
                .map_err(io::Error::other),
            Newest::File(file) => {
                let path = Arc::clone(&file.path);
                blocking(move || read(&path)).await
            }
        }
    }

    /// In Redis: the command (and its key) that records `version`, for the batch's pipeline.
    pub(in crate::applier) fn command(&self, version: Version) -> Option<(redis::Cmd, String)> {
        let Newest::Redis { key, .. } = self else {
            return None;
        };
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(RAISE_NEWEST)
            .arg(1)
            .arg(key)
            .arg(version_arg(Some(version)));
        Some((cmd, key.clone()))
    }
}

/// The record in a local file.
pub(in crate::applier) struct NewestFile {
    path: Arc<PathBuf>,
    /// The newest this process made durable.
    durable: Mutex<Option<Version>>,
    /// The newest any lane asked to record.
    wanted: Mutex<Option<Version>>,
    /// One write at a time; the others wait and usually find theirs done.
    writing: tokio::sync::Mutex<()>,
}

impl NewestFile {
    /// Checks that the file at `path` is a record (or missing) and can be written.
    ///
    /// # Errors
    ///
    /// It cannot be opened, or does not read back as a version.
    pub(in crate::applier) fn open(path: &Path) -> io::Result<NewestFile> {
        let recorded = read(path)?;
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        Ok(NewestFile {
            path: Arc::new(path.to_owned()),
            durable: Mutex::new(recorded),
            wanted: Mutex::new(None),
            writing: tokio::sync::Mutex::new(()),
        })
    }

    /// The file.
    pub(in crate::applier) fn path(&self) -> &Path {
        &self.path
    }

    /// Records `version` durably (if it is newer than the record).
    ///
    /// # Errors
    ///
    /// The file cannot be written or synced, or holds something else than a version.
    pub(in crate::applier) async fn record(&self, version: Version) -> io::Result<()> {
        let done = |file: &NewestFile| {
            let durable = file.durable.lock().unwrap_or_else(|e| e.into_inner());
            durable.is_some_and(|d| d >= version)
        };
        if done(self) {
            return Ok(());
        }
        {
            let mut wanted = self.wanted.lock().unwrap_or_else(|e| e.into_inner());
            *wanted = (*wanted).max(Some(version));
        }
        let _writing = self.writing.lock().await;
        if done(self) {
            return Ok(());
        }
        let target = self
            .wanted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .unwrap_or(version)
            .max(version);
        let path = Arc::clone(&self.path);
        blocking(move || raise(&path, target)).await?;
        let mut durable = self.durable.lock().unwrap_or_else(|e| e.into_inner());
        *durable = (*durable).max(Some(target));
        Ok(())
    }
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|error| Err(io::Error::other(error)))
}

/// The version recorded in the file (`None`: missing or empty).
fn read(path: &Path) -> io::Result<Option<Version>> {
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error),
    };
    file.lock_shared()?;
    let mut text = String::new();
    file.read_to_string(&mut text)?;
    parse(path, &text)
}

fn parse(path: &Path, text: &str) -> io::Result<Option<Version>> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    parse_version(text).map(Some).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} does not hold a version (<commit_lsn>:<commit_idx>) but {text:?}; fix or delete it (deleting forgets the newest version written to memcached)",
                path.display()
            ),
        )
    })
}

/// Raises the file's record to `version`, durably.
fn raise(path: &Path, version: Version) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    file.lock()?;
    let mut text = String::new();
    file.read_to_string(&mut text)?;
    if parse(path, &text)? >= Some(version) {
        return Ok(());
    }
    let line = format!("{}\n", version_arg(Some(version)));
    file.write_all_at(line.as_bytes(), 0)?;
    if text.len() != line.len() {
        file.set_len(line.len() as u64)?;
    }
    file.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_record_only_rises_and_survives_a_reopen() {
        let dir = std::env::temp_dir().join(format!("kw-newest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("newest");
        let _ = std::fs::remove_file(&path);
        let v = |lsn| Version { lsn, idx: 1 };
        let file = NewestFile::open(&path).unwrap();
        file.record(v(200)).await.unwrap();
        file.record(v(100)).await.unwrap();
        // Another process sharing the file, behind this one.
        let other = NewestFile::open(&path).unwrap();
        other.record(v(150)).await.unwrap();
        assert_eq!(read(&path).unwrap(), Some(v(200)));
        other.record(v(300)).await.unwrap();
        assert_eq!(read(&path).unwrap(), Some(v(300)));
        std::fs::write(&path, "garbage").unwrap();
        let error = NewestFile::open(&path).err().unwrap().to_string();
        assert!(error.contains("does not hold a version"), "{error}");
    }
}
