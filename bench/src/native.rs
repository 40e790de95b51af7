//! BASELINE (a): a native Rust worker with row-cache's transform compiled in.
//!
//! The same Redis access pattern as keepwarm's Redis Stream source and plain applier:
//! `XREADGROUP COUNT 500`, one pipeline of `SET`/`DEL` per batch, then `XACK` once Redis has
//! confirmed the writes; reading the next batch overlaps applying the current one. No plugin
//! sandbox, no lanes, no dead letters: the physical limit of the design.

use redis::Value;
use serde::Deserialize;
use std::time::Duration;

/// One entry: its id and its fields.
type Entry = (Vec<u8>, Vec<(Vec<u8>, Vec<u8>)>);

#[derive(Deserialize)]
struct Metadata<'a> {
    #[serde(borrow)]
    table_schema: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    table_name: std::borrow::Cow<'a, str>,
    record_pks: Vec<serde_json::Value>,
}

pub(crate) enum Op {
    /// `SET key value`.
    Set(String, Vec<u8>),
    /// `DEL key`.
    Del(String),
}

/// row-cache's transform: `SET {schema}.{table}:{pks} <record>` or `DEL`.
pub(crate) fn transform(fields: Vec<(Vec<u8>, Vec<u8>)>) -> Option<Op> {
    let (mut record, mut action, mut metadata) = (None, None, None);
    for (k, v) in fields {
        match k.as_slice() {
            b"record" => record = Some(v),
            b"action" => action = Some(v),
            b"metadata" => metadata = Some(v),
            _ => {}
        }
    }
    let (record, action, metadata) = (record?, action?, metadata?);
    let meta: Metadata<'_> = serde_json::from_slice(&metadata).ok()?;
    let mut key = format!("{}.{}:", meta.table_schema, meta.table_name);
    for (n, pk) in meta.record_pks.iter().enumerate() {
        if n > 0 {
            key.push(':');
        }
        match pk {
            serde_json::Value::String(s) => key.push_str(s),
            other => key.push_str(&other.to_string()),
        }
    }
    let toast = action.as_slice() == b"update"
        && record
            .windows(b"\"unchanged_toast\"".len())
            .any(|w| w == b"\"unchanged_toast\"");
    if action.as_slice() == b"delete" || toast {
        Some(Op::Del(key))
    } else {
        Some(Op::Set(key, record))
    }
}

fn bulk(value: Value) -> Vec<u8> {
    match value {
        Value::BulkString(b) => b,
        Value::SimpleString(s) => s.into_bytes(),
        _ => Vec::new(),
    }
}

fn parse(value: Value) -> Vec<Entry> {
    let streams = match value {
        Value::Array(streams) => streams
            .into_iter()
            .filter_map(|s| match s {
                Value::Array(mut pair) if pair.len() == 2 => pair.pop(),
                _ => None,
            })
            .collect(),
        Value::Map(streams) => streams.into_iter().map(|(_, v)| v).collect(),
        _ => Vec::new(),
    };
    let mut out = Vec::new();
    for entries in streams {
        let Value::Array(entries) = entries else {
            continue;
        };
        for entry in entries {
            let Value::Array(mut pair) = entry else {
                continue;
            };
            if pair.len() != 2 {
                continue;
            }
            let fields = pair.pop().unwrap_or(Value::Nil);
            let id = bulk(pair.pop().unwrap_or(Value::Nil));
            let mut flat = match fields {
                Value::Array(flat) => flat.into_iter().map(bulk).collect::<Vec<_>>(),
                _ => Vec::new(),
            }
            .into_iter();
            let mut pairs = Vec::with_capacity(4);
            while let (Some(k), Some(v)) = (flat.next(), flat.next()) {
                pairs.push((k, v));
            }
            out.push((id, pairs));
        }
    }
    out
}

/// Runs the worker until killed.
///
/// # Errors
///
/// Redis fails.
pub(crate) async fn run(url: &str, stream: &str, group: &str) -> anyhow::Result<()> {
    let client = redis::Client::open(url)?;
    let config =
        redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(60)));
    let mut reader = client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    // Its own connection: a blocking XREADGROUP would hold up the writes queued behind it.
    let mut writer = client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Entry>>(4);
    let (stream_r, group_r) = (stream.to_owned(), group.to_owned());
    let read = tokio::spawn(async move {
        loop {
            let reply: Value = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg(&group_r)
                .arg("native")
                .arg("COUNT")
                .arg(500)
                .arg("BLOCK")
                .arg(1000)
                .arg("STREAMS")
                .arg(&stream_r)
                .arg(">")
                .query_async(&mut reader)
                .await?;
            let entries = parse(reply);
            if !entries.is_empty() && tx.send(entries).await.is_err() {
                return anyhow::Ok(());
            }
        }
    });
    while let Some(batch) = rx.recv().await {
        let mut pipe = redis::pipe();
        let mut ack = redis::cmd("XACK");
        ack.arg(stream).arg(group);
        for (id, fields) in batch {
            match transform(fields) {
                Some(Op::Set(key, value)) => {
                    pipe.cmd("SET").arg(key).arg(value).ignore();
                }
                Some(Op::Del(key)) => {
                    pipe.cmd("DEL").arg(key).ignore();
                }
                None => {}
            }
            ack.arg(id);
        }
        let () = pipe.query_async(&mut writer).await?;
        let _: i64 = ack.query_async(&mut writer).await?;
    }
    read.await??;
    Ok(())
}
