//! Plugin load time (scenario `plugin-load`): what a user waits for when keepwarm starts with a
//! plugin, or a hot reload brings a version it has not compiled before.
//!
//! Each example plugin is copied alone into a scratch plugin directory and loaded by the
//! `keepwarm` binary under test with `keepwarm check` (engine, compile, link, instantiate,
//! self-tests; nothing connected), timed from spawn to exit. Twice per run: with an empty
//! artifact cache (`cold`: the component is compiled) and again with the cache that run left
//! (`cached`: a restart). `keepwarm check` reports where the time went inside the process
//! (compile, instantiate, self-tests); the CPU seconds are the process's own (all its threads),
//! so CPU above wall-clock time means compilation ran in parallel.

use anyhow::{Context as _, bail};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

/// The example plugins: name and language.
const PLUGINS: [(&str, &str); 3] = [
    ("row-cache", "Rust"),
    ("orders-index", "JavaScript"),
    ("product-catalog", "Python"),
];

/// One `keepwarm check` run.
#[derive(serde::Serialize, Clone, Copy)]
pub(crate) struct Run {
    /// From spawn to exit.
    wall_seconds: f64,
    /// User plus system time of the process.
    cpu_seconds: f64,
    /// Compiling (or taking from the artifact cache), as `keepwarm check` reports it (none:
    /// a keepwarm older than that report).
    compile_seconds: Option<f64>,
    /// Linking and the first instantiation.
    instantiate_seconds: Option<f64>,
    /// The manifest's self-tests.
    self_test_seconds: Option<f64>,
}

/// One plugin's figures: the median run (by wall-clock time) of each kind.
#[derive(serde::Serialize)]
pub(crate) struct PluginLoad {
    plugin: &'static str,
    language: &'static str,
    wasm_mib: f64,
    runs: usize,
    /// Empty artifact cache.
    cold: Run,
    /// The artifact cache the cold run wrote.
    cached: Run,
}

/// Loads every example plugin found in `plugins` with `keepwarm`, `runs` times cold and cached
/// each; `quick` loads only the Rust one once (the others compile for seconds). A plugin that
/// is not there is skipped with a note.
///
/// # Errors
///
/// A plugin does not load, or the scratch directory cannot be written.
pub(crate) fn measure(
    keepwarm: &Path,
    plugins: &Path,
    scratch: &Path,
    runs: usize,
    quick: bool,
) -> anyhow::Result<Vec<PluginLoad>> {
    if quick {
        eprintln!(
            "note: --quick loads only row-cache (the JavaScript and Python plugins compile for seconds)"
        );
    }
    let mut results = Vec::new();
    for (name, language) in PLUGINS {
        if quick && name != "row-cache" {
            continue;
        }
        let wasm = plugins.join(format!("{name}.wasm"));
        if !wasm.exists() {
            eprintln!(
                "note: {} not found (scripts/build-plugins.sh); its load is not measured",
                wasm.display()
            );
            continue;
        }
        let work = scratch.join("plugin-load").join(name);
        let dir = work.join("plugins");
        let cache = work.join("cache");
        std::fs::create_dir_all(&dir)?;
        std::fs::copy(&wasm, dir.join(format!("{name}.wasm")))?;
        let manifest = plugins.join(format!("{name}.toml"));
        if manifest.exists() {
            std::fs::copy(&manifest, dir.join(format!("{name}.toml")))?;
        }
        let config = work.join("keepwarm.toml");
        // A source, so that the configuration passes; `check` connects to nothing.
        std::fs::write(
            &config,
            format!(
                "[redis]\nurl = \"redis://127.0.0.1:1/0\"\n\n[plugins]\ndir = \"{}\"\ncache_dir = \"{}\"\n\n\
                 [[source]]\nkind = \"redis-stream\"\nstream = \"s\"\ngroup = \"g\"\n",
                dir.display(),
                cache.display()
            ),
        )?;
        eprintln!("== plugin-load: {name} ({language}), {runs} cold and cached loads");
        let (mut cold, mut cached) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            match std::fs::remove_dir_all(&cache) {
                Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                    return Err(error).context("emptying the artifact cache");
                }
                _ => {}
            }
            cold.push(check(keepwarm, &config, name, "cold")?);
            cached.push(check(keepwarm, &config, name, "cached")?);
        }
        #[allow(clippy::cast_precision_loss, reason = "file sizes far below 2^52")]
        let wasm_mib = std::fs::metadata(&wasm)?.len() as f64 / (1024.0 * 1024.0);
        let load = PluginLoad {
            plugin: name,
            language,
            wasm_mib,
            runs,
            cold: median(cold),
            cached: median(cached),
        };
        eprintln!(
            "   cold {:.2} s ({:.2} CPU s), cached {:.2} s",
            load.cold.wall_seconds, load.cold.cpu_seconds, load.cached.wall_seconds
        );
        results.push(load);
    }
    Ok(results)
}

/// The run of median wall-clock time.
fn median(mut runs: Vec<Run>) -> Run {
    runs.sort_by(|a, b| a.wall_seconds.total_cmp(&b.wall_seconds));
    runs[runs.len() / 2]
}

/// Runs `keepwarm check` once and reads its figures for `name`; `expect` is how the component
/// must have been obtained (`cold` or `cached`).
fn check(keepwarm: &Path, config: &Path, name: &str, expect: &str) -> anyhow::Result<Run> {
    let children_before = crate::procstat::waited_children_cpu_seconds()?;
    let started = Instant::now();
    let out = Command::new(keepwarm)
        .arg("check")
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", keepwarm.display()))?;
    let wall_seconds = started.elapsed().as_secs_f64();
    let cpu_seconds = crate::procstat::waited_children_cpu_seconds()? - children_before;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "keepwarm check failed for {name}:\n{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let line = stdout
        .lines()
        .find(|l| l.starts_with(&format!("plugin {name}: ok")))
        .with_context(|| format!("no line for {name} in keepwarm check's output:\n{stdout}"))?;
    // `…, 812 ms: compile 790 ms cold, instantiate 1 ms, self-tests 20 ms)`; a keepwarm from
    // before that report (`--keepwarm` of an older build) gives the total only.
    let ms = |label: &str| -> anyhow::Result<Option<f64>> {
        let Some((_, rest)) = line.split_once(&format!(" {label} ")) else {
            return Ok(None);
        };
        let number = rest.split_once(" ms").map_or(rest, |(n, _)| n);
        Ok(Some(
            number.parse::<f64>().context(line.to_owned())? / 1000.0,
        ))
    };
    anyhow::ensure!(
        !line.contains(" compile ") || line.contains(&format!(" ms {expect},")),
        "expected a {expect} load: {line}"
    );
    Ok(Run {
        wall_seconds,
        cpu_seconds,
        compile_seconds: ms("compile")?,
        instantiate_seconds: ms("instantiate")?,
        self_test_seconds: ms("self-tests")?,
    })
}

/// Prints the table.
pub(crate) fn print(loads: &[PluginLoad]) {
    if loads.is_empty() {
        return;
    }
    println!();
    println!(
        "| plugin load (keepwarm check) | language | MiB | cold s | compile s | CPU s | instantiate s | self-tests s | cached s | runs |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let seconds = |s: Option<f64>| s.map_or("-".to_owned(), |s| format!("{s:.3}"));
    for l in loads {
        println!(
            "| {} | {} | {:.1} | {:.2} | {} | {:.2} | {} | {} | {:.2} | {} |",
            l.plugin,
            l.language,
            l.wasm_mib,
            l.cold.wall_seconds,
            seconds(l.cold.compile_seconds),
            l.cold.cpu_seconds,
            seconds(l.cold.instantiate_seconds),
            seconds(l.cold.self_test_seconds),
            l.cached.wall_seconds,
            l.runs
        );
    }
}
