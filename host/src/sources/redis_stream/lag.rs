//! The consumer group's pending count and lag, sampled for `/metrics`.

use crate::sources::{Sampler, SourceContext};
use std::time::Duration;

/// How often the group's pending count and lag are sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(2);

/// Samples `XINFO GROUPS` into the `stream_pending` and `stream_lag` gauges until shutdown, on
/// a connection of its own (the reader's connection is busy with blocking reads).
pub(super) async fn sample(
    client: redis::Client,
    stream: String,
    group: String,
    ctx: SourceContext,
) {
    let metrics = ctx.metrics();
    let mut conn = None;
    let mut every = Sampler::every(SAMPLE_EVERY);
    while every.tick(&ctx).await {
        if conn.is_none() {
            conn = client.get_multiplexed_async_connection().await.ok();
        }
        let Some(c) = conn.as_mut() else { continue };
        let info: redis::RedisResult<redis::streams::StreamInfoGroupsReply> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(&stream)
            .query_async(c)
            .await;
        match info {
            Ok(info) => {
                if let Some(g) = info.groups.iter().find(|g| g.name == group) {
                    metrics
                        .stream_pending
                        .get_or_create(ctx.labels())
                        .set(g.pending as i64);
                    // Redis reports no lag when it cannot tell (after deletions); keep the
                    // last value then.
                    if let Some(lag) = g.lag {
                        metrics
                            .stream_lag
                            .get_or_create(ctx.labels())
                            .set(lag as i64);
                    }
                }
            }
            Err(error) if error.is_io_error() || error.is_connection_dropped() => conn = None,
            Err(error) => {
                tracing::debug!(source = %ctx.name, error = %error, "cannot sample stream lag");
            }
        }
    }
}
