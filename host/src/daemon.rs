//! Wiring: plugins, applier, pipeline and sources, for `keepwarm run` and `keepwarm replay`.

use crate::admin::{self, AdminState};
use crate::applier::Applier;
use crate::config::{Config, SourceConfig};
use crate::pipeline::{self, Dispatcher, Shared};
use crate::runtime::{self, PluginSet, Runtime, reload};
use crate::sources::jsonl::{self, ReplaySummary};
use crate::sources::{SourceContext, redis_streams};
use crate::telemetry::Counters;
use anyhow::Context as _;
use arc_swap::ArcSwap;
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
        let runtime = Arc::new(Runtime::new(Some(config.plugins.cache_dir()))?);
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

    fn pipeline(&self, tracker: &TaskTracker, shutdown: &CancellationToken) -> Dispatcher {
        pipeline::start(
            Shared {
                plugins: Arc::clone(&self.plugins),
                applier: Arc::clone(&self.applier),
                counters: Arc::clone(&self.counters),
                config: self.config.pipeline.clone(),
                reserved_prefix: self.config.versioning.key_prefix.clone(),
                dead_letter_stream: self.config.dead_letter.stream.clone(),
                shutdown: shutdown.clone(),
            },
            tracker,
        )
    }

    fn slots(&self) -> Arc<Semaphore> {
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
    let slots = core.slots();
    for source in core.config.sources.clone() {
        let ctx = SourceContext::new(
            source.name(),
            dispatcher.clone(),
            shutdown.clone(),
            Arc::clone(&slots),
        );
        let max_bytes = core.config.pipeline.max_message_bytes;
        let url = core.config.redis.url.clone();
        tracker.spawn(async move {
            let name = ctx.name.clone();
            let result = match source {
                SourceConfig::RedisStream(stream) => {
                    redis_streams::run(stream, url, max_bytes, ctx).await
                }
            };
            if let Err(error) = result {
                tracing::error!(source = %name, error = format!("{error:#}"), "source failed");
            }
        });
    }
    drop(dispatcher);
    tracker.spawn({
        let (runtime, plugins, shutdown) = (
            Arc::clone(&core.runtime),
            Arc::clone(&core.plugins),
            shutdown.clone(),
        );
        let dir = core.config.plugins.dir.clone();
        let every = Duration::from_secs(core.config.plugins.rescan_seconds);
        async move {
            if let Err(error) = reload::watch(runtime, dir, plugins, every, shutdown).await {
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
    let ctx = SourceContext::new("jsonl", dispatcher, shutdown, core.slots());
    let summary = jsonl::run(input, core.config.pipeline.max_message_bytes, ctx)
        .await
        .context("replay failed")?;
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
