//! The cost of decoding a change message in keepwarm's host, per message, in this process: the
//! workload's entries as Redis Stream fields (`ChangeMessage::from_stream_fields`, what
//! keepwarm-plain decodes) and as JSON objects (`ChangeMessage::from_json`, what the Kafka,
//! NATS, RabbitMQ, SQS, webhook and JSONL sources decode). Single-threaded, best of three
//! passes, with no queue, plugin or Redis around it, so that a change to the decoder is
//! measured on its own. Under `valgrind --tool=callgrind` (`--only decode`) it gives
//! instruction counts, which a noisy machine does not move.

use crate::workload::{Entry, Workload};
use keepwarm::message::ChangeMessage;
use std::time::Instant;

/// One form's figures.
#[derive(serde::Serialize)]
pub(crate) struct DecodeCost {
    /// `stream fields` or `JSON object`.
    form: &'static str,
    messages: u64,
    /// Mean size of a message in this form.
    bytes_per_message: f64,
    /// Wall-clock nanoseconds per message, the best of three passes.
    ns_per_message: f64,
}

/// Decodes `messages` workload entries in each form, three times over.
///
/// # Errors
///
/// A workload entry does not decode (the workload is broken).
pub(crate) fn measure(workload: &Workload, messages: u64) -> anyhow::Result<Vec<DecodeCost>> {
    let entries: Vec<Entry> = (0..messages).map(|i| workload.entry(i)).collect();
    let objects: Vec<String> = entries.iter().map(Entry::to_json).collect();
    let stream = |entry: &Entry| ChangeMessage::from_stream_fields(|name| entry.field(name));
    let field_bytes = |e: &Entry| e.fields.iter().map(|(k, v)| k.len() + v.len()).sum();
    Ok(vec![
        best_of_three("stream fields", &entries, field_bytes, stream)?,
        best_of_three("JSON object", &objects, String::len, |o| {
            ChangeMessage::from_json(o)
        })?,
    ])
}

fn best_of_three<T, E: std::fmt::Display>(
    form: &'static str,
    inputs: &[T],
    size: impl Fn(&T) -> usize,
    decode: impl Fn(&T) -> Result<ChangeMessage, E>,
) -> anyhow::Result<DecodeCost> {
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let started = Instant::now();
        for input in inputs {
            let message = decode(std::hint::black_box(input))
                .map_err(|error| anyhow::anyhow!("a {form} does not decode: {error}"))?;
            std::hint::black_box(message);
        }
        best = best.min(started.elapsed().as_secs_f64());
    }
    #[allow(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    let (count, bytes) = (
        inputs.len() as f64,
        inputs.iter().map(size).sum::<usize>() as f64,
    );
    Ok(DecodeCost {
        form,
        messages: inputs.len() as u64,
        bytes_per_message: bytes / count.max(1.0),
        ns_per_message: best * 1e9 / count.max(1.0),
    })
}

/// Prints the table (nothing when the scenario did not run).
pub(crate) fn print(costs: &[DecodeCost]) {
    if costs.is_empty() {
        return;
    }
    println!();
    println!("| decode (in process) | messages | bytes / message | ns / message |");
    println!("|---|---:|---:|---:|");
    for c in costs {
        println!(
            "| {} | {} | {:.0} | {:.0} |",
            c.form, c.messages, c.bytes_per_message, c.ns_per_message
        );
    }
}
