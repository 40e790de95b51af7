//! The connection to the cache: one Redis or a Redis Cluster, and how a batch's commands travel
//! over it (one pipeline, or on a cluster one pipeline per hash slot, all at once).

use super::ApplyError;
use super::cluster::HashSlot;
use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;

/// A connection to the cache: one Redis, or a Redis Cluster. Cheap to clone.
#[derive(Clone)]
pub(super) enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Connection {
    /// Whether this is a Redis Cluster, where commands travel by hash slot.
    pub(super) fn is_cluster(&self) -> bool {
        matches!(self, Connection::Cluster(_))
    }

    pub(super) async fn query<T: redis::FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
    ) -> redis::RedisResult<T> {
        match self.clone() {
            Connection::Single(mut conn) => cmd.query_async(&mut conn).await,
            Connection::Cluster(mut conn) => cmd.query_async(&mut conn).await,
        }
    }

    async fn pipe(&self, pipe: &redis::Pipeline) -> redis::RedisResult<Vec<redis::Value>> {
        match self.clone() {
            Connection::Single(mut conn) => pipe.query_async(&mut conn).await,
            Connection::Cluster(mut conn) => pipe.query_async(&mut conn).await,
        }
    }

    /// Sends the commands and returns their replies in order (reply errors included, as
    /// values): one pipeline on a single Redis; on a cluster, one pipeline per hash slot (a
    /// cluster pipeline may not cross slots), all at once.
    pub(super) async fn run(
        &self,
        commands: Vec<(redis::Cmd, HashSlot)>,
    ) -> Result<Vec<redis::Value>, ApplyError> {
        let expected = commands.len();
        let replies = match self {
            Connection::Single(_) => {
                let mut pipe = redis::pipe();
                pipe.ignore_errors();
                for (cmd, _) in commands {
                    pipe.add_command(cmd);
                }
                self.pipe(&pipe).await?
            }
            Connection::Cluster(_) => self.run_by_slot(commands).await?,
        };
        check_count(expected, replies.len())?;
        Ok(replies)
    }

    async fn run_by_slot(
        &self,
        commands: Vec<(redis::Cmd, HashSlot)>,
    ) -> Result<Vec<redis::Value>, ApplyError> {
        let expected = commands.len();
        // Each slot's pipeline, with the positions of its commands in the batch.
        let mut by_slot: Vec<(HashSlot, redis::Pipeline, Vec<usize>)> = Vec::new();
        for (position, (cmd, slot)) in commands.into_iter().enumerate() {
            let at = match by_slot.iter().position(|(s, _, _)| *s == slot) {
                Some(at) => at,
                None => {
                    let mut pipe = redis::pipe();
                    pipe.ignore_errors();
                    by_slot.push((slot, pipe, Vec::new()));
                    by_slot.len() - 1
                }
            };
            by_slot[at].1.add_command(cmd);
            by_slot[at].2.push(position);
        }
        let mut calls = tokio::task::JoinSet::new();
        for (_, pipe, positions) in by_slot {
            let conn = self.clone();
            calls.spawn(async move { (conn.pipe(&pipe).await, positions) });
        }
        let mut replies = vec![redis::Value::Nil; expected];
        while let Some(done) = calls.join_next().await {
            let (answered, positions) = done?;
            let answered = answered?;
            check_count(positions.len(), answered.len())?;
            for (position, reply) in positions.into_iter().zip(answered) {
                replies[position] = reply;
            }
        }
        Ok(replies)
    }
}

fn check_count(expected: usize, got: usize) -> Result<(), ApplyError> {
    if expected == got {
        Ok(())
    } else {
        Err(ApplyError::ReplyCount { expected, got })
    }
}
