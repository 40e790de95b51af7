//! The `keepwarm` command: the daemon and its tools.

mod allocator;

use clap::{Parser, Subcommand};
use keepwarm::config::Config;
use keepwarm::daemon;
use keepwarm::scaffold::{self, Lang, NewPlugin};
use keepwarm::sources::jsonl::Input;
use keepwarm::telemetry::LogFormat;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Keeps Redis caches in sync with Postgres change streams through WebAssembly plugins.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log line format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the daemon: consumes the configured sources until SIGTERM or Ctrl-C.
    Run {
        /// The configuration file.
        #[arg(long)]
        config: PathBuf,
        /// How long in-flight messages may take to finish at shutdown, in seconds.
        #[arg(long, default_value_t = 30)]
        shutdown_timeout: u64,
    },
    /// Runs a file of change messages (one JSON object per line; `-` for stdin) through the
    /// plugins into the cache, then exits.
    Replay {
        /// The configuration file (its sources are ignored).
        #[arg(long)]
        config: PathBuf,
        /// The JSONL file, or `-` for standard input.
        input: String,
    },
    /// Re-warms the cache from a Postgres table: its rows, in primary-key chunks, go through the
    /// plugins as `read` messages (which never overwrite a newer change in versioned mode).
    /// Resumable: run it again after a crash and it continues after the last settled chunk.
    Backfill {
        /// The configuration file (its Postgres source gives the connection).
        #[arg(long)]
        config: PathBuf,
        /// The table, `schema.table`.
        #[arg(long)]
        table: String,
        /// Only rows matching this SQL condition.
        #[arg(long = "where")]
        filter: Option<String>,
        /// The Postgres source to use when the configuration has several (its name,
        /// `postgres:<slot>`).
        #[arg(long)]
        source: Option<String>,
        /// Where progress is kept for a resume (default: `.keepwarm-backfill-<table>.json`).
        #[arg(long)]
        state: Option<PathBuf>,
    },
    /// Shows the dead letters (the dead-letter stream, or without `[redis]` the dead-letter
    /// file), or replays them through the current plugins.
    DeadLetters {
        #[command(subcommand)]
        action: DeadLetterAction,
    },
    /// Lists the plugins of a running daemon (name, version, tables, state, load time), asking
    /// its admin endpoint.
    Plugins {
        /// The daemon's configuration file (for `[admin] listen`).
        #[arg(long)]
        config: PathBuf,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Shows the versions keepwarm stores for a cache key: the version of the last change
    /// written to it, whether it is a tombstone, and every member's version.
    Version {
        /// The daemon's configuration file (for `[redis] url` or `[memcached] servers`, and
        /// `[versioning] key_prefix`).
        #[arg(long)]
        config: PathBuf,
        /// The cache key.
        key: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Validates the configuration and loads (compiles, links, self-tests) every plugin, without
    /// connecting to Redis or any source. Exits 0 when all is well, 1 otherwise.
    Check {
        /// The configuration file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Runs a plugin over change messages from stdin without Redis and prints, for each line,
    /// the operations or the error as one JSON line.
    Test {
        /// The plugin component.
        plugin: PathBuf,
        /// Its manifest (default: the `.toml` beside the component, if any).
        #[arg(long)]
        manifest: Option<PathBuf>,
    },
    /// Creates a plugin project that builds and passes its own sample test (`./test.sh`).
    New {
        /// The plugin's language.
        #[arg(long, value_enum)]
        lang: Lang,
        /// The plugin's name: lowercase letters, digits and `-`.
        name: String,
        /// The project directory (default: ./NAME); it must not exist or be empty.
        dir: Option<PathBuf>,
        /// The keepwarm source tree whose SDKs and toolchains the project builds with (default:
        /// the tree this keepwarm was built from).
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum DeadLetterAction {
    /// Prints the dead letters, oldest first.
    List {
        /// The configuration file.
        #[arg(long)]
        config: PathBuf,
        /// At most this many entries.
        #[arg(long, default_value_t = 100)]
        count: usize,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Runs every dead letter through the current plugins; entries leave the stream (or file)
    /// only when they went through.
    Replay {
        /// The configuration file.
        #[arg(long)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    allocator::tune();
    let cli = Cli::parse();
    keepwarm::telemetry::init_logging(cli.log_format);
    match run(cli.command) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Test { plugin, manifest } => {
            let stdin = std::io::stdin().lock();
            let stdout = std::io::stdout().lock();
            keepwarm::plugin_test::run(&plugin, manifest.as_deref(), stdin, stdout)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::DeadLetters { action } => match action {
            DeadLetterAction::List {
                config,
                count,
                json,
            } => {
                let config = Config::load(&config)?;
                tokio_runtime()?.block_on(daemon::list_dead_letters(&config, count, json))?;
                Ok(ExitCode::SUCCESS)
            }
            DeadLetterAction::Replay { config } => {
                let config = Config::load(&config)?;
                let report = tokio_runtime()?.block_on(async {
                    let shutdown = on_signals();
                    daemon::replay_dead_letters(config, shutdown).await
                })?;
                for (id, reason) in &report.still_failing {
                    eprintln!("still failing: {id}: {reason}");
                }
                eprintln!(
                    "replayed {} dead letters: {} fixed and removed, {} still failing, {} taken by no plugin (kept), {} left unapplied{}",
                    report.replayed,
                    report.fixed,
                    report.still_failing.len(),
                    report.unrouted,
                    report.abandoned,
                    if report.interrupted {
                        " (interrupted: the rest were not read and stay)"
                    } else {
                        ""
                    }
                );
                Ok(
                    if report.still_failing.is_empty()
                        && report.abandoned == 0
                        && report.unrouted == 0
                        && !report.interrupted
                    {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    },
                )
            }
        },
        Command::New {
            lang,
            name,
            dir,
            sdk,
        } => {
            let sdk = sdk.or_else(scaffold::default_sdk).ok_or_else(|| {
                anyhow::anyhow!(
                    "the keepwarm source tree this binary was built from is gone; pass --sdk"
                )
            })?;
            let new = NewPlugin {
                lang,
                dir: dir.unwrap_or_else(|| PathBuf::from(&name)),
                name,
                sdk,
                keepwarm: std::env::current_exe()?,
            };
            let written = scaffold::create(&new)?;
            println!("created {} ({} files):", new.dir.display(), written.len());
            for file in written {
                println!("  {}", file.display());
            }
            println!("next: cd {} && ./test.sh", new.dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { config } => {
            let config = Config::load(&config)?;
            let ok = daemon::check(&config, &mut std::io::stdout().lock())?;
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Plugins { config, json } => {
            let config = Config::load(&config)?;
            keepwarm::admin::print_plugins(&config.admin.listen, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Version { config, key, json } => {
            let config = Config::load(&config)?;
            let report = tokio_runtime()?.block_on(keepwarm::inspect::read(&config, &key))?;
            if json {
                println!("{}", report.to_json());
            } else {
                print!("{}", report.to_text());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            config,
            shutdown_timeout,
        } => {
            let config = Config::load(&config)?;
            tokio_runtime()?.block_on(async {
                let shutdown = on_signals();
                daemon::run(config, shutdown, Duration::from_secs(shutdown_timeout)).await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Backfill {
            config,
            table,
            filter,
            source,
            state,
        } => backfill(&config, table, filter, source, state),
        Command::Replay { config, input } => {
            let config = Config::load(&config)?;
            let input = match input.as_str() {
                "-" => Input::Stdin,
                path => Input::File(PathBuf::from(path)),
            };
            let summary = tokio_runtime()?.block_on(async {
                let shutdown = on_signals();
                daemon::replay(config, input, shutdown).await
            })?;
            eprintln!(
                "replayed {} messages: {} done, {} left unapplied",
                summary.messages, summary.done, summary.abandoned
            );
            Ok(if summary.abandoned == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

fn tokio_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// The first SIGTERM or Ctrl-C cancels the returned token (graceful shutdown); a second one
/// exits at once with 130.
fn on_signals() -> CancellationToken {
    use tokio::signal::unix::{SignalKind, signal};
    let token = CancellationToken::new();
    let cancel = token.clone();
    // Both listeners are registered now and kept: a signal that arrives while the task is not
    // waiting (between the first and the second) is not lost.
    let listeners = signal(SignalKind::terminate())
        .and_then(|term| Ok((term, signal(SignalKind::interrupt())?)));
    let (mut term, mut interrupt) = match listeners {
        Ok(listeners) => listeners,
        Err(error) => {
            tracing::error!(error = %error, "cannot listen for SIGTERM and SIGINT");
            return token;
        }
    };
    tokio::spawn(async move {
        for round in 0..2 {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = term.recv() => {}
            }
            if round == 0 {
                tracing::info!("signal received; shutting down (send again to exit at once)");
                cancel.cancel();
            } else {
                tracing::warn!("second signal; exiting now");
                std::process::exit(130);
            }
        }
    });
    token
}

/// `keepwarm backfill`.
#[cfg(feature = "postgres")]
fn backfill(
    config: &std::path::Path,
    table: String,
    filter: Option<String>,
    source: Option<String>,
    state: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    use keepwarm::sources::postgres::backfill::BackfillRequest;
    let config = Config::load(config)?;
    let state = state.unwrap_or_else(|| PathBuf::from(format!(".keepwarm-backfill-{table}.json")));
    let request = BackfillRequest {
        table,
        filter,
        state,
    };
    let summary = tokio_runtime()?.block_on(async {
        let shutdown = on_signals();
        daemon::backfill(config, source, request, shutdown).await
    })?;
    eprintln!(
        "backfilled {} rows ({} rows/s): {} done, {} left unapplied",
        summary.rows, summary.rows_per_second, summary.done, summary.abandoned
    );
    Ok(if summary.abandoned == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `keepwarm backfill` in a build without the Postgres source: says how to get one.
#[cfg(not(feature = "postgres"))]
fn backfill(
    _config: &std::path::Path,
    _table: String,
    _filter: Option<String>,
    _source: Option<String>,
    _state: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    anyhow::bail!(
        "this keepwarm was built without the postgres source, which backfill reads through: \
         rebuild it with the cargo feature `postgres` (on by default)"
    )
}
