//! The dead-letter stream as a source: `keepwarm dead-letters list` shows it, and
//! `keepwarm dead-letters replay` runs its entries through the current plugins once they are
//! fixed.
//!
//! A replay writes new failures to a scratch stream instead of the dead-letter stream. An
//! entry leaves the dead-letter stream (`XDEL`) only when its replay was applied and did not
//! fail again; an entry that fails again stays, and the new reason is reported.

use super::jsonl::Progress;
use super::{Acker, Payload, RawPayload, SourceContext};
use crate::message::ChangeMessage;
use anyhow::Context as _;
use redis::Value;
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One dead-letter entry.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Stream id.
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

    /// The message the entry holds, decoded again.
    pub fn payload(&self, max_bytes: usize) -> Payload {
        if let Some(body) = self.fields.get("payload") {
            let decoded = if body.len() > max_bytes {
                Err(format!("message of {} bytes exceeds the limit", body.len()))
            } else {
                std::str::from_utf8(body)
                    .map_err(|e| format!("message is not valid UTF-8: {e}"))
                    .and_then(|t| ChangeMessage::from_json(t).map_err(|e| e.0))
            };
            return match decoded {
                Ok(message) => Payload::Decoded(message),
                Err(reason) => Payload::Malformed {
                    raw: RawPayload::Body(body.clone()),
                    reason,
                },
            };
        }
        let fields: Vec<(String, Vec<u8>)> = self
            .fields
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("entry.")?.to_owned(), v.clone())))
            .collect();
        super::redis_streams::decode(fields, max_bytes)
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
) -> anyhow::Result<Vec<Entry>> {
    let start = if after == "-" {
        "-".to_owned()
    } else {
        format!("({after}")
    };
    let reply: Value = redis::cmd("XRANGE")
        .arg(stream)
        .arg(start)
        .arg("+")
        .arg("COUNT")
        .arg(count)
        .query_async(conn)
        .await
        .with_context(|| format!("cannot read the dead-letter stream {stream}"))?;
    let Value::Array(items) = reply else {
        return Ok(Vec::new());
    };
    Ok(items
        .into_iter()
        .filter_map(|item| {
            let Value::Array(mut pair) = item else {
                return None;
            };
            let fields = pair.pop()?;
            let id: String = redis::from_redis_value(pair.pop()?).ok()?;
            let Value::Array(flat) = fields else {
                return None;
            };
            let fields = flat
                .chunks(2)
                .filter_map(|kv| {
                    Some((
                        redis::from_redis_value::<String>(kv.first()?.clone()).ok()?,
                        redis::from_redis_value::<Vec<u8>>(kv.get(1)?.clone()).ok()?,
                    ))
                })
                .collect();
            Some(Entry { id, fields })
        })
        .collect())
}

/// What a replay did.
#[derive(Debug, Default)]
pub struct ReplayReport {
    /// Entries replayed.
    pub replayed: usize,
    /// Entries applied and removed from the dead-letter stream.
    pub fixed: usize,
    /// Entries that failed again, with their new reason; they stay.
    pub still_failing: Vec<(String, String)>,
    /// Entries left unapplied (shutdown); they stay.
    pub abandoned: usize,
}

#[derive(Default)]
struct Settled {
    done: Mutex<Vec<String>>,
    abandoned: Mutex<usize>,
    changed: tokio::sync::Notify,
}

impl Acker for Settled {
    fn settle(&self, id: &str, done: bool) {
        if done {
            self.done
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(id.to_owned());
        } else {
            *self.abandoned.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        }
        self.changed.notify_one();
    }
}

/// Replays every entry of `stream` through the pipeline behind `ctx`, whose dead letters go to
/// `scratch`; then removes the entries that went through from `stream`.
///
/// # Errors
///
/// Redis fails.
pub async fn replay(
    mut conn: impl redis::aio::ConnectionLike + Send,
    stream: &str,
    scratch: &str,
    max_bytes: usize,
    ctx: SourceContext,
) -> anyhow::Result<ReplayReport> {
    let settled = Arc::new(Settled::default());
    let acker: Arc<dyn Acker> = Arc::clone(&settled) as Arc<dyn Acker>;
    let total: u64 = redis::cmd("XLEN")
        .arg(stream)
        .query_async(&mut conn)
        .await?;
    let progress = Progress::messages(total);
    let settled_count = || {
        settled.done.lock().unwrap_or_else(|p| p.into_inner()).len()
            + *settled.abandoned.lock().unwrap_or_else(|p| p.into_inner())
    };
    let mut after = "-".to_owned();
    let mut replayed = 0;
    loop {
        let count = settled_count() as u64;
        progress.update(count, replayed as u64, count);
        let entries = read(&mut conn, stream, &after, 500).await?;
        let Some(last) = entries.last() else {
            break;
        };
        after = last.id.clone();
        for entry in entries {
            if ctx.reserve(1).await.is_none() {
                break;
            }
            replayed += 1;
            ctx.deliver(entry.payload(max_bytes), entry.id.clone(), &acker);
        }
    }
    drop(ctx);
    drop(acker);
    loop {
        let count = settled_count();
        progress.update(count as u64, replayed as u64, count as u64);
        if count >= replayed {
            break;
        }
        tokio::select! {
            () = settled.changed.notified() => {}
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
    progress.finish();
    let mut still_failing = Vec::new();
    let mut failed_ids = HashSet::new();
    let mut after = "-".to_owned();
    loop {
        let again = read(&mut conn, scratch, &after, 500).await?;
        let Some(last) = again.last() else {
            break;
        };
        after = last.id.clone();
        for entry in again {
            failed_ids.insert(entry.text("source_id"));
            still_failing.push((entry.text("source_id"), entry.text("reason")));
        }
    }
    let done = std::mem::take(&mut *settled.done.lock().unwrap_or_else(|p| p.into_inner()));
    let fixed: Vec<&String> = done.iter().filter(|id| !failed_ids.contains(*id)).collect();
    for chunk in fixed.chunks(500) {
        let _: i64 = redis::cmd("XDEL")
            .arg(stream)
            .arg(chunk)
            .query_async(&mut conn)
            .await?;
    }
    let _: i64 = redis::cmd("DEL")
        .arg(scratch)
        .query_async(&mut conn)
        .await?;
    Ok(ReplayReport {
        replayed,
        fixed: fixed.len(),
        still_failing,
        abandoned: *settled.abandoned.lock().unwrap_or_else(|p| p.into_inner()),
    })
}
