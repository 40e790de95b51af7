//! [`TestEnv`]: one test's stream, consumer group, key prefix, dead-letter stream and plugins,
//! on the suite's Redis (or a server of the test's own).

use super::streams::StreamPendingId;
use super::{
    ConfigBuilder, Daemon, DeadLetter, Group, Keys, PATIENCE, TempDir, connect, plugin_wasm,
    redis_url, stream_fields, unique, xadd_sequin,
};
use redis::AsyncCommands as _;
use redis::streams::StreamReadOptions;
use std::path::Path;
use std::time::Duration;

/// What one test works on. The stream is `<prefix>:stream`, read by the group `kw`; dead
/// letters go to `<prefix>:dead`; the cache is read below `<prefix>:`.
pub struct TestEnv {
    pub prefix: String,
    pub dead: String,
    pub group: Group,
    cache_url: String,
    plugins: TempDir,
}

impl TestEnv {
    /// A test named `name` on the suite's Redis (`REDIS_URL`), with no plugins yet.
    pub fn new(name: &str) -> TestEnv {
        let url = redis_url();
        let prefix = unique(name);
        TestEnv {
            dead: format!("{prefix}:dead"),
            group: Group {
                url: url.clone(),
                stream: format!("{prefix}:stream"),
                name: "kw".to_owned(),
            },
            cache_url: url,
            prefix,
            plugins: TempDir::new("kw-plugins"),
        }
    }

    /// [`TestEnv::new`] with the row-cache plugin writing below the prefix.
    pub fn row_cache(name: &str) -> TestEnv {
        let env = TestEnv::new(name);
        env.add_row_cache("");
        env
    }

    /// The cache is the Redis at `url`; the stream stays where it is.
    pub fn with_cache(mut self, url: &str) -> TestEnv {
        self.cache_url = url.to_owned();
        self
    }

    /// The stream and the cache are both on the Redis at `url`.
    pub fn on(mut self, url: &str) -> TestEnv {
        self.group.url = url.to_owned();
        self.with_cache(url)
    }

    /// Copies `wasm` into the plugins directory as `<name>.wasm`, with `manifest` beside it.
    pub fn add_plugin(&self, name: &str, wasm: &Path, manifest: &str) -> &TestEnv {
        add_plugin(self.plugins.path(), name, wasm, manifest);
        self
    }

    /// Adds row-cache, writing below the prefix, with `extra` manifest lines.
    pub fn add_row_cache(&self, extra: &str) -> &TestEnv {
        let manifest = row_cache_manifest(&self.prefix, extra);
        self.add_plugin("row-cache", &plugin_wasm("row-cache"), &manifest)
    }

    pub fn plugins_dir(&self) -> &Path {
        self.plugins.path()
    }

    pub fn stream(&self) -> &str {
        &self.group.stream
    }

    pub fn cache_url(&self) -> &str {
        &self.cache_url
    }

    /// `<prefix>:<rest>`.
    pub fn key(&self, rest: &str) -> String {
        format!("{}:{rest}", self.prefix)
    }

    /// The daemon's config with the cache, the plugins and the dead-letter stream; no source.
    pub fn config(&self) -> ConfigBuilder {
        ConfigBuilder::new(&self.cache_url, self.plugins.path()).dead_letter(&self.dead)
    }

    /// [`TestEnv::config`] with the Redis Stream source on the test's stream and group.
    pub fn stream_config(&self) -> ConfigBuilder {
        self.config().source("redis-stream", &self.stream_source())
    }

    /// The lines of the Redis Stream source on the test's stream and group.
    pub fn stream_source(&self) -> String {
        let mut lines = format!(
            "stream = \"{}\"\ngroup = \"{}\"\nblock_ms = 200\nclaim_idle_ms = 500",
            self.group.stream, self.group.name
        );
        if self.group.url != self.cache_url {
            lines += &format!("\nurl = \"{}\"", self.group.url);
        }
        lines
    }

    /// Runs the daemon with [`TestEnv::stream_config`].
    pub fn run(&self) -> Daemon {
        self.stream_config().run()
    }

    /// A connection to the Redis holding the stream.
    pub async fn stream_conn(&self) -> redis::aio::MultiplexedConnection {
        connect(&self.group.url).await
    }

    /// Writes `lines` to the stream as Sequin does.
    pub async fn xadd(&self, lines: &[String]) {
        xadd_sequin(&mut self.stream_conn().await, &self.group.stream, lines).await;
    }

    /// Writes one entry of raw fields.
    pub async fn xadd_raw<N: redis::ToRedisArgs + Send + Sync>(&self, fields: &[(N, &[u8])]) {
        let mut conn = self.stream_conn().await;
        let _: String = conn.xadd(&self.group.stream, "*", fields).await.unwrap();
    }

    /// Writes `lines` and has `consumer` read them in one transaction (so the daemon cannot take
    /// them first), creating the group if need be: entries a consumer holds and then, as the
    /// test has it, dies with.
    pub async fn xadd_read_by(&self, consumer: &str, lines: &[String]) {
        let (stream, group) = (&self.group.stream, &self.group.name);
        let mut conn = self.stream_conn().await;
        let created: redis::RedisResult<()> = conn.xgroup_create_mkstream(stream, group, "0").await;
        if let Err(error) = created {
            assert_eq!(error.code(), Some("BUSYGROUP"), "{error}");
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        for line in lines {
            pipe.xadd(stream, "*", &stream_fields(line)).ignore();
        }
        let read = StreamReadOptions::default()
            .group(group, consumer)
            .count(lines.len());
        pipe.xread_options(&[stream], &[">"], &read).ignore();
        let () = pipe.query_async(&mut conn).await.unwrap();
    }

    /// The group's `(entries read, entries pending)`; panics when there is no group.
    pub async fn progress(&self) -> (u64, u64) {
        let mut conn = self.stream_conn().await;
        self.group.progress(&mut conn).await.expect("the group")
    }

    /// Waits until `check` holds for the group's `(read, pending)`.
    pub async fn wait(&self, what: &str, check: impl Fn(u64, u64) -> bool) {
        self.group.wait(what, PATIENCE, check).await;
    }

    /// Waits until the daemon has created its group.
    pub async fn wait_group(&self) {
        self.wait("the consumer group", |_, _| true).await;
    }

    /// Writes `lines` one at a time, each after the one before is acknowledged, so that the
    /// order they arrive in is exactly the order given (the stream must start empty).
    pub async fn xadd_each_drained(&self, lines: &[String]) {
        for (n, line) in lines.iter().enumerate() {
            self.xadd(std::slice::from_ref(line)).await;
            self.wait_drained(n as u64 + 1).await;
        }
    }

    /// Waits until the group has read `n` entries and acknowledged them all.
    pub async fn wait_drained(&self, n: u64) {
        self.group.wait_drained(n).await;
    }

    /// [`TestEnv::wait_drained`] for longer than the usual patience.
    pub async fn wait_drained_within(&self, n: u64, limit: Duration) {
        self.group.wait_drained_within(n, limit).await;
    }

    /// The group's pending entries (of `consumer` only, if given).
    pub async fn pending(&self, consumer: Option<&str>) -> Vec<StreamPendingId> {
        let mut conn = self.stream_conn().await;
        self.group.pending(&mut conn, consumer).await
    }

    /// The cache, read below the prefix.
    pub async fn keys(&self) -> Keys {
        Keys::under(&self.cache_url, &self.prefix).await
    }

    /// Every entry of the dead-letter stream.
    pub async fn dead_letters(&self) -> Vec<DeadLetter> {
        Keys::connect(&self.cache_url)
            .await
            .dead_letters(&self.dead)
            .await
    }
}

/// Copies `wasm` into `dir` as `<name>.wasm`, with `manifest` beside it as `<name>.toml`.
pub fn add_plugin(dir: &Path, name: &str, wasm: &Path, manifest: &str) {
    std::fs::copy(wasm, dir.join(format!("{name}.wasm"))).unwrap();
    std::fs::write(dir.join(format!("{name}.toml")), manifest).unwrap();
}

/// A row-cache manifest that writes under `prefix`, with `extra` lines before `[config]`.
pub fn row_cache_manifest(prefix: &str, extra: &str) -> String {
    format!("{extra}\n[config]\nkey = \"{prefix}:{{schema}}.{{table}}:{{pks}}\"\n")
}
