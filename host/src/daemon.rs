//! Wiring: plugins, applier, pipeline and sources, for `keepwarm run` and `keepwarm replay`.

use crate::admin::{self, AdminState};
use crate::applier::Applier;
use crate::config::Config;
use crate::pipeline::{self, Dispatcher, Shared};
use crate::runtime::{self, PluginSet, Runtime, reload};
use crate::sources::dead_letters;
use crate::sources::jsonl::{self, ReplaySummary};
#[cfg(feature = "postgres")]
use crate::sources::postgres::{
    self,
    backfill::{BackfillRequest, BackfillSummary},
};
use crate::sources::{SourceConfig, SourceContext, SourceEnv};
use crate::telemetry::Counters;
use anyhow::Context as _;
use arc_swap::ArcSwap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Everything the pipeline needs, built once.
pub struct Core {
    /// The plugin runtime (engine, linker); plugins keep the engine alive.
    pub runtime: Arc<Runtime>,
    /// The plugins serving traffic.
    pub plugins: Arc<ArcSwap<PluginSet>>,
    /// The cache writer.
    pub applier: Arc<Applier>,
    /// Counters.
    pub counters: Arc<Counters>,
    /// The configuration.
    pub config: Config,
}

impl Core {
    /// Loads the plugins and connects to the cache.
    ///
    /// # Errors
    ///
    /// A plugin fails to load, or Redis cannot be reached.
    pub async fn start(config: Config) -> anyhow::Result<Core> {
        let runtime = Arc::new(
            Runtime::with_instances(Some(config.plugins.cache_dir()), config.plugins.instances)?
                .for_cache(config.cache_kind()),
        );
        let plugins = runtime::load_dir(&runtime, &config.plugins.dir)?;
        if plugins.plugins.is_empty() {
            tracing::warn!(dir = %config.plugins.dir.display(), "no plugins found; every message will be acknowledged without a write");
        }
        let applier = Applier::connect(&config).await?;
        Ok(Core {
            runtime,
            plugins: Arc::new(ArcSwap::from_pointee(plugins)),
            applier: Arc::new(applier),
            counters: Arc::new(Counters::default()),
            config,
        })
    }

    pub(crate) fn pipeline(
        &self,
        tracker: &TaskTracker,
        shutdown: &CancellationToken,
    ) -> Dispatcher {
        pipeline::start(
            Shared {
                plugins: Arc::clone(&self.plugins),
                applier: Arc::clone(&self.applier),
                registry: Arc::clone(self.runtime.registry()),
                counters: Arc::clone(&self.counters),
                config: self.config.pipeline.clone(),
                reserved_prefix: self.config.versioning.key_prefix.clone(),
                dead_letter_stream: self.config.dead_letter.stream.clone(),
                shutdown: shutdown.clone(),
            },
            tracker,
        )
    }

    /// A context for the source `name`, drawing on the in-flight budget `permits`.
    fn context(
        &self,
        name: impl Into<Arc<str>>,
        dispatcher: Dispatcher,
        shutdown: &CancellationToken,
        permits: &Arc<Semaphore>,
    ) -> SourceContext {
        SourceContext::new(
            name,
            Arc::new(dispatcher),
            Arc::clone(&self.counters),
            shutdown.clone(),
            Arc::clone(permits),
            self.config.pipeline.max_message_bytes,
        )
    }

    /// The in-flight budget every source of one run shares.
    fn permits(&self) -> Arc<Semaphore> {
        Arc::new(Semaphore::new(self.config.pipeline.max_in_flight))
    }
}

/// Runs the configured sources until `shutdown`, then lets in-flight work finish for at most
/// `grace`.
///
/// # Errors
///
/// No source is configured, or start-up fails.
pub async fn run(
    config: Config,
    shutdown: CancellationToken,
    grace: Duration,
) -> anyhow::Result<()> {
    anyhow::ensure!(!config.sources.is_empty(), "no [[source]] is configured");
    let core = Core::start(config).await?;
    let admin_state = AdminState {
        registry: Arc::clone(core.runtime.registry()),
        plugins: Arc::clone(&core.plugins),
        applier: Arc::clone(&core.applier),
        counters: Arc::clone(&core.counters),
    };
    let (_, admin) = admin::serve(&core.config.admin.listen, admin_state, shutdown.clone()).await?;
    let tracker = TaskTracker::new();
    let dispatcher = core.pipeline(&tracker, &shutdown);
    let permits = core.permits();
    // Every source is built before anything runs, so a port in use or a missing token stops
    // the daemon at start-up rather than leaving it running without that source.
    let mut sources = Vec::new();
    for config in core.config.sources.clone() {
        let name = config.name();
        let cache_redis = match &core.config.redis {
            Some(redis) => Some(redis.client()?),
            None => None,
        };
        let env = SourceEnv {
            cache_redis,
            max_in_flight: core.config.pipeline.max_in_flight,
        };
        let source = config
            .build(env)
            .await
            .with_context(|| format!("cannot start source {name}"))?;
        // Down until it first reaches its queue; a bound listener is up.
        core.counters.source_up(&name, source.up_at_start());
        sources.push((name, source));
    }
    for (name, source) in sources {
        let ctx = core.context(name.as_str(), dispatcher.clone(), &shutdown, &permits);
        tracker.spawn(async move {
            if let Err(error) = source.run(ctx).await {
                let error = anyhow::Error::from(error);
                tracing::error!(source = %name, error = format!("{error:#}"), "source failed");
            }
        });
    }
    drop(dispatcher);
    tracker.spawn({
        let (runtime, plugins, counters, shutdown) = (
            Arc::clone(&core.runtime),
            Arc::clone(&core.plugins),
            Arc::clone(&core.counters),
            shutdown.clone(),
        );
        let dir = core.config.plugins.dir.clone();
        let every = Duration::from_secs(core.config.plugins.rescan_seconds);
        async move {
            if let Err(error) =
                reload::watch(runtime, dir, plugins, every, counters, shutdown).await
            {
                tracing::error!(
                    error = format!("{error:#}"),
                    "cannot watch the plugin directory; hot reload is off"
                );
            }
        }
    });
    tracker.spawn(report_loop(Arc::clone(&core.counters), shutdown.clone()));
    tracker.close();
    shutdown.cancelled().await;
    tracing::info!(
        grace_secs = grace.as_secs(),
        "shutting down: finishing in-flight messages"
    );
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            "shutdown deadline passed; unfinished messages stay unacknowledged and will be redelivered"
        );
    }
    let _ = admin.await;
    log_counters(&core.counters);
    Ok(())
}

/// Backfills a table (`keepwarm backfill`) through the plugins into the cache, with the
/// connection of the configuration's Postgres source (`source` names it when there are several).
///
/// # Errors
///
/// No such source, start-up fails, or the table cannot be read.
#[cfg(feature = "postgres")]
pub async fn backfill(
    config: Config,
    source: Option<String>,
    request: BackfillRequest,
    shutdown: CancellationToken,
) -> anyhow::Result<BackfillSummary> {
    let postgres = config
        .sources
        .iter()
        .find_map(|s| match s {
            SourceConfig::Postgres(c) if source.as_ref().is_none_or(|n| *n == s.name()) => {
                Some(c.clone())
            }
            _ => None,
        })
        .context("the configuration has no such postgres source")?;
    let core = Core::start(config).await?;
    let tracker = TaskTracker::new();
    let dispatcher = core.pipeline(&tracker, &shutdown);
    let name = format!("backfill:{}", request.table);
    let ctx = core.context(name.as_str(), dispatcher, &shutdown, &core.permits());
    let summary = postgres::backfill::run(&postgres, &request, ctx)
        .await
        .context("backfill failed")?;
    tracker.close();
    tracker.wait().await;
    log_counters(&core.counters);
    Ok(summary)
}

/// Replays a JSONL input through the plugins into the cache.
///
/// # Errors
///
/// Start-up fails or the input cannot be read.
pub async fn replay(
    config: Config,
    input: jsonl::Input,
    shutdown: CancellationToken,
) -> anyhow::Result<ReplaySummary> {
    let core = Core::start(config).await?;
    let tracker = TaskTracker::new();
    let dispatcher = core.pipeline(&tracker, &shutdown);
    let ctx = core.context("jsonl", dispatcher, &shutdown, &core.permits());
    let summary = jsonl::run(input, ctx).await.context("replay failed")?;
    tracker.close();
    tracker.wait().await;
    log_counters(&core.counters);
    Ok(summary)
}

async fn report_loop(counters: Arc<Counters>, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(Duration::from_secs(30));
    every.tick().await;
    loop {
        tokio::select! {
            _ = every.tick() => log_counters(&counters),
            () = shutdown.cancelled() => return,
        }
    }
}

fn log_counters(counters: &Counters) {
    tracing::info!(
        received = Counters::get(&counters.received),
        applied = Counters::get(&counters.applied),
        dead_lettered = Counters::get(&counters.dead_lettered),
        stale_skipped = Counters::get(&counters.stale_skipped),
        unrouted = Counters::get(&counters.unrouted),
        apply_retries = Counters::get(&counters.apply_retries),
        "counters"
    );
}

/// Where a replay reads dead letters and where its own failures go.
enum Letters {
    Stream { stream: String, scratch: String },
    File { file: PathBuf, scratch: PathBuf },
}

/// Replays the dead letters through the current plugins (`keepwarm dead-letters replay`): the
/// dead-letter stream, or without `[redis]` the dead-letter file.
///
/// # Errors
///
/// Start-up fails, or Redis or the file fails.
pub async fn replay_dead_letters(
    mut config: Config,
    shutdown: CancellationToken,
) -> anyhow::Result<dead_letters::ReplayReport> {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    // The replay's own failures go to a scratch stream (or file), read back at the end.
    let letters = match config.letter_file().map(Path::to_owned) {
        Some(file) => {
            let mut scratch = file.clone().into_os_string();
            scratch.push(format!(".replay-{millis}"));
            let scratch = PathBuf::from(scratch);
            // The daemons' record of the newest version, not one beside the scratch file.
            let newest = config.newest_file();
            if let Some(memcached) = config.memcached.as_mut() {
                memcached.newest_file = newest;
            }
            config.dead_letter.file = Some(scratch.clone());
            Letters::File { file, scratch }
        }
        None => {
            let stream = config.dead_letter.stream.clone();
            let scratch = format!("{stream}:replay-{millis}");
            config.dead_letter.stream = scratch.clone();
            Letters::Stream { stream, scratch }
        }
    };
    let core = Core::start(config).await?;
    let tracker = TaskTracker::new();
    let dispatcher = core.pipeline(&tracker, &shutdown);
    let ctx = core.context("dead-letters", dispatcher, &shutdown, &core.permits());
    let max_bytes = core.config.pipeline.max_message_bytes;
    let report = match letters {
        Letters::Stream { stream, scratch } => {
            let redis = core.config.require_redis("the dead-letter stream")?;
            let conn = redis.tool_connection().await?;
            dead_letters::replay(conn, &stream, &scratch, max_bytes, ctx).await?
        }
        Letters::File { file, scratch } => {
            dead_letters::replay_file(&file, &scratch, max_bytes, ctx).await?
        }
    };
    tracker.close();
    tracker.wait().await;
    Ok(report)
}

/// `keepwarm check`: validates a parsed configuration and loads (compiles, links, self-tests)
/// every plugin of its directory, printing one line per item to stdout. Connects to nothing.
/// Returns whether everything passed.
///
/// # Errors
///
/// The plugin runtime cannot be created or the plugin directory cannot be read.
pub fn check(config: &Config, out: &mut impl std::io::Write) -> anyhow::Result<bool> {
    let sources: Vec<String> = config.sources.iter().map(SourceConfig::name).collect();
    writeln!(
        out,
        "config: ok ({} sources: {})",
        sources.len(),
        sources.join(", ")
    )?;
    writeln!(out, "{}", cache_line(config))?;
    let mut ok = true;
    if sources.is_empty() {
        writeln!(
            out,
            "config: no [[source]]: `keepwarm run` would refuse to start"
        )?;
        ok = false;
    }
    let runtime =
        Runtime::with_instances(Some(config.plugins.cache_dir()), config.plugins.instances)?
            .for_cache(config.cache_kind());
    let files = runtime::loader::list_dir(&config.plugins.dir)?;
    if files.is_empty() {
        writeln!(
            out,
            "plugins: none in {} (every message would be acknowledged without a write)",
            config.plugins.dir.display()
        )?;
    }
    for files in &files {
        let loaded = runtime::loader::read_files(files)
            .and_then(|source| runtime::loader::load_source(&runtime, source, &[]));
        match loaded {
            Ok(loaded) => writeln!(
                out,
                "plugin {}: ok (version {}, tables {}, {} ms: compile {} ms {}, instantiate {} ms, self-tests {} ms)",
                files.name,
                loaded.plugin.version(),
                loaded
                    .plugin
                    .manifest
                    .tables
                    .as_ref()
                    .map_or("*".to_owned(), |t| t.join(",")),
                loaded.elapsed.as_millis(),
                loaded.timings.compile.as_millis(),
                loaded.compiled.as_str(),
                loaded.timings.instantiate.as_millis(),
                loaded.timings.self_test.as_millis()
            )?,
            Err(error) => {
                ok = false;
                writeln!(out, "plugin {}: FAILED: {error:#}", files.name)?;
            }
        }
    }
    Ok(ok)
}

/// Where `keepwarm check` says plugin writes and dead letters go.
fn cache_line(config: &Config) -> String {
    let letters = match config.letter_file() {
        Some(file) => format!("file {}", file.display()),
        None => format!("stream {} in redis", config.dead_letter.stream),
    };
    match (&config.memcached, config.newest_file()) {
        (Some(memcached), newest) => format!(
            "cache: memcached {}; dead letters: {letters}{}",
            memcached.servers.join(","),
            newest.map_or(String::new(), |file| format!(
                "; newest version written: file {}",
                file.display()
            ))
        ),
        (None, _) => format!("cache: redis; dead letters: {letters}"),
    }
}

/// Prints the dead letters (`keepwarm dead-letters list`): the dead-letter stream, or without
/// `[redis]` the dead-letter file.
///
/// # Errors
///
/// Redis or the file fails.
pub async fn list_dead_letters(config: &Config, count: usize, json: bool) -> anyhow::Result<()> {
    let (entries, unreadable, from) = match config.letter_file() {
        Some(file) => {
            let letters = dead_letters::read_file(file).await?;
            let mut entries = letters.entries;
            entries.truncate(count);
            (entries, letters.unreadable, file.display().to_string())
        }
        None => {
            let redis = config.require_redis("the dead-letter stream")?;
            let mut conn = redis.tool_connection().await?;
            let stream = &config.dead_letter.stream;
            let entries = dead_letters::read(&mut conn, stream, "-", count).await?;
            (entries, Vec::new(), stream.clone())
        }
    };
    for entry in &entries {
        if json {
            let fields: serde_json::Map<String, serde_json::Value> = entry
                .fields
                .keys()
                .map(|k| (k.clone(), serde_json::Value::String(entry.text(k))))
                .collect();
            println!("{}", serde_json::json!({"id": entry.id, "fields": fields}));
        } else {
            let plugin = match entry.text("plugin").as_str() {
                "" => "-".to_owned(),
                name => format!("{name}@{}", entry.text("plugin_version")),
            };
            println!(
                "{}  {:<6}  {:<24}  {} {}\n    {}",
                entry.id,
                entry.text("kind"),
                plugin,
                entry.text("source"),
                entry.text("source_id"),
                entry.text("reason")
            );
        }
    }
    for (id, reason) in &unreadable {
        eprintln!("{from} {id}: {reason} (left in the file)");
    }
    if !json {
        eprintln!("{} dead letters shown from {from}", entries.len());
    }
    Ok(())
}
