//! The cost of a plugin call per change, for the example plugins in each guest language.
//!
//! Measured in this process through keepwarm's own runtime (`keepwarm::runtime`): the same
//! engine settings, CPU deadline, memory cap, warm instances and batch call as the daemon's
//! lanes, without Redis, queues or threads around it. Two figures per plugin: a batch of
//! `batch` changes (how lanes call under load) and a batch of one (a lone change).

use crate::workload::Workload;
use anyhow::Context as _;
use keepwarm::message::ChangeMessage;
use keepwarm::runtime::{Runtime, loader};
use std::path::Path;
use std::time::Instant;

/// The example plugins: name, language, and the table each one serves.
const PLUGINS: [(&str, &str, Table); 3] = [
    ("row-cache", "Rust", Table::Orders),
    ("orders-index", "JavaScript", Table::Orders),
    ("product-catalog", "Python", Table::Products),
];

#[derive(Clone, Copy)]
enum Table {
    Orders,
    Products,
}

/// One plugin's figures.
#[derive(serde::Serialize)]
pub(crate) struct PluginCost {
    plugin: &'static str,
    language: &'static str,
    changes: u64,
    batch: usize,
    /// Wall-clock microseconds per change in batches of `batch`.
    us_per_change: f64,
    /// Wall-clock microseconds of a call with one change.
    us_per_single_call: f64,
    /// Operations returned per change.
    ops_per_change: f64,
    /// Changes the plugin rejected (must be 0).
    rejected: u64,
}

/// Measures every example plugin found in `plugins` on `changes` changes; a plugin that is not
/// there is skipped with a note.
///
/// # Errors
///
/// A plugin does not load.
pub(crate) fn measure(
    plugins: &Path,
    cache: &Path,
    workload: &Workload,
    changes: u64,
    batch: usize,
) -> anyhow::Result<Vec<PluginCost>> {
    let runtime = Runtime::new(Some(cache.to_owned()))?;
    let files = loader::list_dir(plugins)?;
    let mut results = Vec::new();
    for (name, language, table) in PLUGINS {
        let Some(files) = files.iter().find(|f| f.name == name) else {
            eprintln!(
                "note: {name}.wasm not found in {} (scripts/build-plugins.sh); its row is skipped",
                plugins.display()
            );
            continue;
        };
        let plugin =
            loader::load_plugin(&runtime, files).with_context(|| format!("loading {name}"))?;
        let messages = (0..changes)
            .map(|i| message(workload, table, i))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let refs: Vec<&ChangeMessage> = messages.iter().collect();
        // Warm up: the first call instantiates.
        plugin.call_batch(&refs[..batch.min(refs.len())]);
        let (mut ops, mut rejected) = (0u64, 0u64);
        let started = Instant::now();
        for chunk in refs.chunks(batch) {
            for outcome in plugin.call_batch(chunk) {
                match outcome {
                    Ok(returned) => ops += returned.len() as u64,
                    Err(_) => rejected += 1,
                }
            }
        }
        let batched = started.elapsed().as_secs_f64();
        let singles = refs.len().min(2_000);
        let started = Instant::now();
        for change in &refs[..singles] {
            plugin.call_batch(std::slice::from_ref(change));
        }
        let single = started.elapsed().as_secs_f64();
        #[allow(clippy::cast_precision_loss, reason = "counts far below 2^52")]
        results.push(PluginCost {
            plugin: name,
            language,
            changes,
            batch,
            us_per_change: batched * 1e6 / changes as f64,
            us_per_single_call: single * 1e6 / singles as f64,
            ops_per_change: ops as f64 / changes as f64,
            rejected,
        });
    }
    Ok(results)
}

/// Change `i` for a plugin serving `table`: the benchmark's order workload, or product changes
/// (90% updates or inserts, 10% deletes) shaped alike.
fn message(workload: &Workload, table: Table, i: u64) -> anyhow::Result<ChangeMessage> {
    let decoded = match table {
        Table::Orders => {
            let entry = workload.entry(i);
            ChangeMessage::from_stream_fields(|name| entry.field(name))
        }
        Table::Products => ChangeMessage::from_json(&product(workload, i)),
    };
    decoded.map_err(|error| anyhow::anyhow!("bench change {i}: {error}"))
}

fn product(workload: &Workload, i: u64) -> String {
    let id = i % workload.rows + 1;
    let action = match i % 10 {
        0 => "delete",
        1 => "insert",
        _ => "update",
    };
    let (units, cents) = (id % 500 + 1, id % 100);
    format!(
        r#"{{"record":{{"id":{id},"name":"Product {id} — café crème","description":"Roasted in small batches; {id} reviews","price":"{units}.{cents:02}","updated_at":"2025-03-14T10:05:44.310552Z"}},"changes":null,"action":"{action}","metadata":{{"table_schema":"public","table_name":"products","commit_timestamp":"2025-03-14T10:05:44.316105Z","commit_lsn":{lsn},"commit_idx":0,"idempotency_key":"bench-{i}","record_pks":["{id}"],"consumer":{{"id":"bench","name":"bench"}}}}}}"#,
        lsn = 1_000_000 + i
    )
}

/// Prints the table.
pub(crate) fn print(costs: &[PluginCost]) {
    if costs.is_empty() {
        return;
    }
    println!();
    println!(
        "| plugin call (in process) | language | changes | µs / change, batch | µs / call, 1 change | ops / change | rejected |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|");
    for c in costs {
        println!(
            "| {} | {} | {} | {:.2} (of {}) | {:.2} | {:.2} | {} |",
            c.plugin,
            c.language,
            c.changes,
            c.us_per_change,
            c.batch,
            c.us_per_single_call,
            c.ops_per_change,
            c.rejected
        );
    }
}
