//! Measures what a plugin costs keepwarm: loading it and calling it.
//!
//! ```sh
//! cargo run -p keepwarm --example plugin_cost -- target/plugins/orders-index.wasm \
//!     [--changes tests/fixtures/sequin-examples.jsonl] [--loads 5] [--batches 200]
//! ```
//!
//! The manifest beside the component is used, as keepwarm does. It prints medians of:
//!
//! - **load**: what keepwarm does before a plugin takes traffic (read, compile, pre-link, one
//!   instantiation, the manifest's self-tests), `--loads` times in a fresh runtime each; and the
//!   same with the compiled component taken from keepwarm's artifact cache (a restart);
//! - **compile** (`Component::new`) and **instantiate + first call** (a fresh store and instance,
//!   one batch of one change), the two parts of a load and of an instance recycled mid-run;
//! - **per change**: warm batch calls of 100 changes (the lines of `--changes` the manifest
//!   subscribes to, cycled), `--batches` times, divided by 100; and single-change calls.
//!
//! Numbers depend on the build: a debug build compiles components with a Cranelift that is
//! itself built at `opt-level = 1`, so compile and load times are several times a release
//! build's, while the guest code Cranelift produces is the same.

use keepwarm::message::ChangeMessage;
use keepwarm::runtime::contract::Pre;
use keepwarm::runtime::loader::{PluginFiles, load_plugin};
use keepwarm::runtime::state::PluginState;
use keepwarm::runtime::{EPOCH_TICK, Runtime};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasmtime::Store;
use wasmtime::component::Component;

struct Args {
    wasm: PathBuf,
    changes: PathBuf,
    loads: usize,
    batches: usize,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = std::env::args().skip(1);
    let mut parsed = Args {
        wasm: PathBuf::new(),
        changes: PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/sequin-examples.jsonl"
        )),
        loads: 5,
        batches: 200,
    };
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| anyhow::anyhow!("{arg} needs a value"))
        };
        match arg.as_str() {
            "--changes" => parsed.changes = PathBuf::from(value()?),
            "--loads" => parsed.loads = value()?.parse()?,
            "--batches" => parsed.batches = value()?.parse()?,
            _ if parsed.wasm.as_os_str().is_empty() => parsed.wasm = PathBuf::from(&arg),
            _ => anyhow::bail!("unexpected argument {arg}"),
        }
    }
    anyhow::ensure!(
        !parsed.wasm.as_os_str().is_empty(),
        "usage: plugin_cost PLUGIN.wasm [--changes FILE] [--loads N] [--batches N]"
    );
    Ok(parsed)
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn show(duration: Duration) -> String {
    match duration.as_nanos() {
        n if n >= 1_000_000_000 => format!("{:.2} s", duration.as_secs_f64()),
        n if n >= 1_000_000 => format!("{:.1} ms", duration.as_secs_f64() * 1e3),
        _ => format!("{:.1} µs", duration.as_secs_f64() * 1e6),
    }
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let name = args
        .wasm
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("plugin")
        .to_owned();
    let manifest = args.wasm.with_extension("toml");
    let files = PluginFiles {
        name: name.clone(),
        wasm: args.wasm.clone(),
        manifest: manifest.is_file().then_some(manifest),
    };
    let bytes = std::fs::read(&args.wasm)?;
    println!("{name}: {:.1} KiB", bytes.len() as f64 / 1024.0);

    let mut loads = Vec::new();
    for _ in 0..args.loads {
        let runtime = Runtime::new(None)?;
        let start = Instant::now();
        load_plugin(&runtime, &files)?;
        loads.push(start.elapsed());
    }
    println!(
        "  load (compile, link, instantiate, self-tests): {}",
        show(median(loads))
    );
    // keepwarm keeps compiled components in an artifact cache: a restart loads them from there.
    let cache = std::env::temp_dir().join(format!("kw-plugin-cost-{}", std::process::id()));
    let mut cached = Vec::new();
    for _ in 0..=args.loads {
        let runtime = Runtime::new(Some(cache.clone()))?;
        let start = Instant::now();
        load_plugin(&runtime, &files)?;
        cached.push(start.elapsed());
    }
    cached.remove(0); // The first load filled the cache.
    let _ = std::fs::remove_dir_all(&cache);
    println!("  load from the artifact cache: {}", show(median(cached)));

    let runtime = Runtime::new(None)?;
    let plugin = load_plugin(&runtime, &files)?;
    let text = std::fs::read_to_string(&args.changes)?;
    let messages: Vec<ChangeMessage> = text
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| ChangeMessage::from_json(line).map_err(|e| anyhow::anyhow!("{e}")))
        .collect::<anyhow::Result<_>>()?;
    let subscribed: Vec<&ChangeMessage> = messages
        .iter()
        .filter(|message| plugin.manifest.subscribes(message))
        .collect();
    anyhow::ensure!(!subscribed.is_empty(), "no change the plugin subscribes to");

    let start = Instant::now();
    let component = Component::new(runtime.engine(), &bytes)?;
    let compile = start.elapsed();
    let pre = Pre::new(runtime.linker().instantiate_pre(&component)?)?;
    let mut instantiations = Vec::new();
    for _ in 0..20 {
        let mut store = Store::new(
            runtime.engine(),
            PluginState::new(
                Arc::clone(&plugin.ident),
                256 << 20,
                &plugin.manifest.grants,
            ),
        );
        store.set_epoch_deadline(u64::MAX / 2);
        let start = Instant::now();
        let instance = pre.instantiate(&mut store)?;
        instance.handle_batch(&mut store, &subscribed[..1])?;
        instantiations.push(start.elapsed());
    }
    println!("  compile: {}", show(compile));
    println!(
        "  instantiate + first call: {}",
        show(median(instantiations))
    );

    let batch: Vec<&ChangeMessage> = subscribed.iter().copied().cycle().take(100).collect();
    let mut singles = Vec::new();
    for message in subscribed.iter().cycle().take(args.batches) {
        let start = Instant::now();
        plugin.call_batch(&[message]);
        singles.push(start.elapsed());
    }
    let mut per_change = Vec::new();
    for _ in 0..args.batches {
        let start = Instant::now();
        let outcomes = plugin.call_batch(&batch);
        per_change.push(start.elapsed() / 100);
        anyhow::ensure!(outcomes.len() == 100, "wrong number of outcomes");
    }
    println!(
        "  per change: {} in batches of 100, {} called one by one ({} distinct changes, epoch tick {:?})",
        show(median(per_change)),
        show(median(singles)),
        subscribed.len(),
        EPOCH_TICK
    );
    Ok(())
}
