//! The Redis Stream side of a test: writing entries as Sequin does, and watching a consumer
//! group through redis-rs' typed `XINFO` and `XPENDING` replies.

use super::{PATIENCE, connect, stream_fields, wait_for};
use redis::AsyncCommands as _;
use redis::aio::MultiplexedConnection;
use redis::streams::{StreamInfoGroupsReply, StreamInfoStreamReply, StreamPendingCountReply};
use std::time::Duration;

pub use redis::streams::StreamPendingId;

/// XADDs messages as Sequin does, in one pipeline; returns the new entries' ids.
pub async fn xadd_sequin(
    conn: &mut MultiplexedConnection,
    stream: &str,
    lines: &[String],
) -> Vec<String> {
    let mut pipe = redis::pipe();
    for line in lines {
        pipe.xadd(stream, "*", &stream_fields(line));
    }
    pipe.query_async(conn).await.unwrap()
}

/// A consumer group of a stream, as the tests watch it.
#[derive(Clone)]
pub struct Group {
    pub url: String,
    pub stream: String,
    pub name: String,
}

impl Group {
    /// `(entries delivered to the group, entries pending)`, or `None` while the group does not
    /// exist (or Redis does not answer).
    pub async fn progress(&self, conn: &mut MultiplexedConnection) -> Option<(u64, u64)> {
        let reply: StreamInfoGroupsReply = conn.xinfo_groups(&self.stream).await.ok()?;
        let group = reply.groups.into_iter().find(|g| g.name == self.name)?;
        let mut read = group.entries_read.unwrap_or(0) as u64;
        // Redis cannot always tell `entries-read` (it is nil after a restart that replayed the
        // group, for one): a group that has delivered the stream's last entry has read all of it.
        if read == 0 {
            let info: StreamInfoStreamReply = conn.xinfo_stream(&self.stream).await.ok()?;
            if info.last_generated_id == group.last_delivered_id {
                read = info.length as u64;
            }
        }
        Some((read, group.pending as u64))
    }

    /// Waits until `check` holds for the group's `(read, pending)`.
    pub async fn wait(&self, what: &str, limit: Duration, check: impl Fn(u64, u64) -> bool) {
        let conn = connect(&self.url).await;
        wait_for(what, limit, || {
            let mut conn = conn.clone();
            let check = &check;
            async move {
                self.progress(&mut conn)
                    .await
                    .is_some_and(|(read, pending)| check(read, pending))
            }
        })
        .await;
    }

    /// Waits until the group has read `n` entries and none is pending (all acknowledged).
    pub async fn wait_drained_within(&self, n: u64, limit: Duration) {
        let what = format!("{n} entries of {} to be acknowledged", self.stream);
        self.wait(&what, limit, |read, pending| (read, pending) == (n, 0))
            .await;
    }

    /// [`Group::wait_drained_within`] the usual patience.
    pub async fn wait_drained(&self, n: u64) {
        self.wait_drained_within(n, PATIENCE).await;
    }

    /// The group's first 100,000 pending entries (of `consumer` only, if given).
    pub async fn pending(
        &self,
        conn: &mut MultiplexedConnection,
        consumer: Option<&str>,
    ) -> Vec<StreamPendingId> {
        let (stream, group) = (&self.stream, &self.name);
        let reply: StreamPendingCountReply = match consumer {
            Some(c) => conn.xpending_consumer_count(stream, group, "-", "+", 100_000, c),
            None => conn.xpending_count(stream, group, "-", "+", 100_000),
        }
        .await
        .unwrap();
        reply.ids
    }
}
