//! The integration-test harness: real Redis, real plugins, the real daemon.
//!
//! `scripts/test.sh` starts a private Redis and exports `REDIS_URL`, and builds the plugins into
//! `KEEPWARM_PLUGINS`. Without them the suite fails loudly rather than skipping. Every test uses
//! its own stream, group and key prefix, so tests run in parallel against one Redis.

use keepwarm::config::Config;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

pub const FIXTURES: &str = include_str!("../fixtures/sequin-examples.jsonl");

pub fn fixtures() -> Vec<&'static str> {
    FIXTURES.lines().filter(|l| !l.trim().is_empty()).collect()
}

pub fn redis_url() -> String {
    std::env::var("REDIS_URL")
        .expect("REDIS_URL is not set: run the suite with scripts/test.sh, which starts Redis")
}

pub fn plugin_wasm(name: &str) -> PathBuf {
    let dir = std::env::var("KEEPWARM_PLUGINS").expect(
        "KEEPWARM_PLUGINS is not set: run the suite with scripts/test.sh, which builds the plugins",
    );
    let path = Path::new(&dir).join(format!("{name}.wasm"));
    assert!(path.is_file(), "plugin {} is not built", path.display());
    path
}

#[allow(dead_code, reason = "used by the hostile-plugin tests")]
pub fn test_plugin_wasm(name: &str) -> PathBuf {
    let dir = std::env::var("KEEPWARM_TEST_PLUGINS").expect("KEEPWARM_TEST_PLUGINS is not set");
    let path = Path::new(&dir).join(format!("{name}.wasm"));
    assert!(
        path.is_file(),
        "test plugin {} is not built",
        path.display()
    );
    path
}

/// A name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{prefix}-{}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        nanos % 1_000_000_000
    )
}

/// A directory removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        let path = std::env::temp_dir().join(unique(prefix));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub async fn connect(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// A fixture's order change (`base` is a fixture line of `public.orders` row 1001) moved to `row`,
/// and to commit LSN `lsn` when given.
pub fn order_change(base: &str, row: u64, lsn: Option<u64>) -> String {
    let line = base
        .replace(r#""id":1001"#, &format!(r#""id":{row}"#))
        .replace(
            r#""record_pks":["1001"]"#,
            &format!(r#""record_pks":["{row}"]"#),
        );
    match lsn {
        None => line,
        Some(lsn) => {
            let at = line
                .find(r#""commit_lsn":"#)
                .expect("a change with a commit_lsn");
            let end = at + line[at..].find(',').unwrap();
            format!("{}\"commit_lsn\":{lsn}{}", &line[..at], &line[end..])
        }
    }
}

/// The stream fields Sequin's Redis Stream sink writes for a message: one per top-level key,
/// strings raw and everything else as JSON text (SEQUIN-FORMAT.md §2.1).
pub fn stream_fields(line: &str) -> Vec<(String, String)> {
    let value: serde_json::Map<String, serde_json::Value> = serde_json::from_str(line).unwrap();
    let raw: std::collections::HashMap<String, Box<serde_json::value::RawValue>> =
        serde_json::from_str(line).unwrap();
    value
        .iter()
        .map(|(k, v)| {
            let text = match v {
                serde_json::Value::String(s) => s.clone(),
                _ => raw[k].get().to_owned(),
            };
            (k.clone(), text)
        })
        .collect()
}

/// XADDs messages as Sequin does, in one pipeline.
pub async fn xadd_sequin(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
    lines: &[String],
) {
    let mut pipe = redis::pipe();
    for line in lines {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(stream).arg("*");
        for (k, v) in stream_fields(line) {
            cmd.arg(k).arg(v);
        }
        pipe.add_command(cmd).ignore();
    }
    let () = pipe.query_async(conn).await.unwrap();
}

/// XADDs raw field/value pairs.
pub async fn xadd_raw(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
    fields: &[(&str, &[u8])],
) {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream).arg("*");
    for (k, v) in fields {
        cmd.arg(*k).arg(*v);
    }
    let _: String = cmd.query_async(conn).await.unwrap();
}

/// Waits for a condition to hold, checking it every 20 ms; panics with `what` after `limit`.
pub async fn wait_for<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `(entries delivered to the group, entries pending)` of a consumer group.
pub async fn group_progress(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
    group: &str,
) -> (u64, u64) {
    let pending: redis::Value = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .query_async(conn)
        .await
        .unwrap_or(redis::Value::Nil);
    let pending = match pending {
        redis::Value::Array(parts) => match parts.first() {
            Some(redis::Value::Int(n)) => *n as u64,
            _ => 0,
        },
        _ => u64::MAX,
    };
    let info: redis::Value = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(conn)
        .await
        .unwrap_or(redis::Value::Nil);
    let mut read = 0;
    if let redis::Value::Array(groups) = info {
        for g in groups {
            if let redis::Value::Array(kv) = g {
                let pairs: Vec<_> = kv.chunks(2).collect();
                let is_ours = pairs.iter().any(|p| {
                    matches!(&p[0], redis::Value::BulkString(k) if k == b"name")
                        && matches!(&p[1], redis::Value::BulkString(v) if v == group.as_bytes())
                });
                if is_ours {
                    let mut last_delivered = None;
                    for p in pairs {
                        match (&p[0], &p[1]) {
                            (redis::Value::BulkString(k), redis::Value::Int(n))
                                if k == b"entries-read" =>
                            {
                                read = *n as u64;
                            }
                            (redis::Value::BulkString(k), redis::Value::BulkString(id))
                                if k == b"last-delivered-id" =>
                            {
                                last_delivered = Some(id.clone());
                            }
                            _ => {}
                        }
                    }
                    // Redis cannot always tell `entries-read` (it is nil after a restart that
                    // replayed the group, for one): a group that has delivered the stream's last
                    // entry has read all of it.
                    if read == 0
                        && let Some(id) = last_delivered
                    {
                        read = read_to_end(conn, stream, &id).await.unwrap_or(0);
                    }
                }
            }
        }
    }
    (read, pending)
}

/// The stream's length when `last_delivered` is its last entry's id.
async fn read_to_end(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
    last_delivered: &[u8],
) -> Option<u64> {
    let info: redis::Value = redis::cmd("XINFO")
        .arg("STREAM")
        .arg(stream)
        .query_async(conn)
        .await
        .ok()?;
    let redis::Value::Array(kv) = info else {
        return None;
    };
    let field = |name: &[u8]| {
        kv.chunks(2)
            .find(|p| matches!(&p[0], redis::Value::BulkString(k) if k == name))
            .map(|p| p[1].clone())
    };
    match (field(b"last-generated-id")?, field(b"length")?) {
        (redis::Value::BulkString(last), redis::Value::Int(length)) if last == last_delivered => {
            Some(length as u64)
        }
        _ => None,
    }
}

/// Waits until the group has read `n` entries and none is pending (all acknowledged).
pub async fn wait_all_acked(url: &str, stream: &str, group: &str, n: u64, limit: Duration) {
    let mut conn = connect(url).await;
    let what = format!("{n} entries of {stream} to be acknowledged");
    wait_for(&what, limit, || {
        let mut conn = conn.clone();
        async move { group_progress(&mut conn, stream, group).await == (n, 0) }
    })
    .await;
    let _ = &mut conn;
}

/// A plugin directory with chosen plugins and manifests.
pub struct PluginDir {
    pub dir: TempDir,
}

impl PluginDir {
    pub fn new() -> PluginDir {
        PluginDir {
            dir: TempDir::new("kw-plugins"),
        }
    }

    /// Copies `wasm` in as `<name>.wasm` with `manifest` as `<name>.toml`.
    pub fn add(&self, name: &str, wasm: &Path, manifest: &str) -> &PluginDir {
        std::fs::copy(wasm, self.dir.path().join(format!("{name}.wasm"))).unwrap();
        std::fs::write(self.dir.path().join(format!("{name}.toml")), manifest).unwrap();
        self
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// A plugin directory holding row-cache, writing under `prefix`, with `extra` manifest lines.
pub fn row_cache_dir(prefix: &str, extra: &str) -> PluginDir {
    let plugins = PluginDir::new();
    plugins.add(
        "row-cache",
        &plugin_wasm("row-cache"),
        &row_cache_manifest(prefix, extra),
    );
    plugins
}

/// A row-cache manifest that writes under `prefix`.
pub fn row_cache_manifest(prefix: &str, extra: &str) -> String {
    format!("{extra}\n[config]\nkey = \"{prefix}:{{schema}}.{{table}}:{{pks}}\"\n")
}

/// A daemon configuration for one stream.
pub fn stream_config(plugins: &Path, stream: &str, group: &str, extra: &str) -> Config {
    Config::parse(&stream_config_text(plugins, stream, group, extra)).unwrap()
}

/// The text of [`stream_config`], for the real binary.
pub fn stream_config_text(plugins: &Path, stream: &str, group: &str, extra: &str) -> String {
    format!(
        r#"
[redis]
url = "{url}"
[plugins]
dir = "{dir}"
[dead_letter]
stream = "{stream}:dead"
[admin]
listen = "127.0.0.1:0"
{extra}
[[source]]
kind = "redis-stream"
stream = "{stream}"
group = "{group}"
block_ms = 200
claim_idle_ms = 500
"#,
        url = redis_url(),
        dir = plugins.display(),
    )
}

/// The daemon running in this process.
pub struct Daemon {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Daemon {
    pub fn start(mut config: Config) -> Daemon {
        keepwarm::telemetry::init_logging(keepwarm::telemetry::LogFormat::Text);
        // Tests run in parallel: never the fixed default admin port.
        if config.admin.listen == keepwarm::config::AdminConfig::default().listen {
            config.admin.listen = "127.0.0.1:0".to_owned();
        }
        let shutdown = CancellationToken::new();
        let run = keepwarm::daemon::run(config, shutdown.clone(), Duration::from_secs(10));
        let task = tokio::spawn(async move {
            let result = run.await;
            if let Err(error) = &result {
                eprintln!("the daemon failed: {error:#}");
            }
            result
        });
        Daemon { shutdown, task }
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

/// A redis-server of the test's own, for tests that stop and restart Redis.
pub struct RedisServer {
    pub port: u16,
    dir: TempDir,
    child: Option<Child>,
    cluster: bool,
    persist: bool,
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts a server that persists every write (AOF, fsync always), so a restart loses
    /// nothing.
    pub async fn start() -> RedisServer {
        RedisServer::start_mode(false, true, &[]).await
    }

    /// Starts a server that persists nothing, for measurements.
    #[allow(dead_code, reason = "used by some test modules only")]
    pub async fn start_volatile() -> RedisServer {
        RedisServer::start_mode(false, false, &[]).await
    }

    /// Starts a one-node Redis Cluster that serves every slot, persisting like [`start`]. It
    /// enforces what a cluster enforces (`CROSSSLOT` for a command or script naming keys of two
    /// slots), while a plain client reaches every key without redirection.
    ///
    /// [`start`]: RedisServer::start
    #[allow(dead_code, reason = "used by some test modules only")]
    pub async fn start_cluster() -> RedisServer {
        RedisServer::start_mode(true, true, &[]).await
    }

    /// Starts a server with extra arguments, e.g. `["--requirepass", "secret"]`.
    pub async fn start_with(extra: &[&str]) -> RedisServer {
        RedisServer::start_mode(false, true, extra).await
    }

    async fn start_mode(cluster: bool, persist: bool, extra: &[&str]) -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = RedisServer {
            port,
            dir: TempDir::new("kw-redis"),
            child: None,
            cluster,
            persist,
            extra: extra.iter().map(|a| a.to_string()).collect(),
        };
        server.boot().await;
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    async fn boot(&mut self) {
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--appendonly", if self.persist { "yes" } else { "no" }])
            .args(["--appendfsync", "always", "--save", ""])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra)
            .stdout(Stdio::null());
        if self.cluster {
            command.args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ]);
        }
        let child = command
            .spawn()
            .expect("redis-server is not installed (scripts/setup.sh installs it)");
        self.child = Some(child);
        let url = self.url();
        wait_for("redis-server to answer", Duration::from_secs(10), || {
            let url = url.clone();
            async move {
                match redis::Client::open(url.as_str())
                    .unwrap()
                    .get_multiplexed_async_connection()
                    .await
                {
                    // A server that requires a password answers NOAUTH: it is up.
                    Ok(mut c) => match redis::cmd("PING").query_async::<String>(&mut c).await {
                        Ok(_) => true,
                        Err(error) => error.code() == Some("NOAUTH"),
                    },
                    Err(_) => false,
                }
            }
        })
        .await;
        if self.cluster {
            self.serve_every_slot().await;
        }
    }

    /// Assigns every slot to this node (once: `nodes.conf` keeps them across restarts) and
    /// waits for the cluster to report `ok`.
    async fn serve_every_slot(&self) {
        let mut conn = connect(&self.url()).await;
        let info: String = redis::cmd("CLUSTER")
            .arg("INFO")
            .query_async(&mut conn)
            .await
            .unwrap();
        if info.contains("cluster_slots_assigned:0") {
            let () = redis::cmd("CLUSTER")
                .arg("ADDSLOTSRANGE")
                .arg(0)
                .arg(16383)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
        wait_for("the cluster to be ok", Duration::from_secs(20), || {
            let mut conn = conn.clone();
            async move {
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query_async(&mut conn)
                    .await
                    .unwrap_or_default();
                info.contains("cluster_state:ok")
            }
        })
        .await;
    }

    /// Stops the server (SIGTERM: it flushes the AOF) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            let _ = child.wait();
        }
    }

    pub async fn restart(&mut self) {
        self.stop();
        self.boot().await;
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs the `keepwarm` binary with `args`, feeding `stdin`, and returns its stdout.
pub fn keepwarm_cli(args: &[&str], stdin: &str) -> (bool, String, String) {
    keepwarm_cli_env(args, stdin, &[])
}

/// [`keepwarm_cli`] with extra environment variables.
pub fn keepwarm_cli_env(
    args: &[&str],
    stdin: &str,
    env: &[(&str, &str)],
) -> (bool, String, String) {
    use std::io::Write as _;
    let mut child = Command::new(env!("CARGO_BIN_EXE_keepwarm"))
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    (
        output.status.success(),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Serialises the tests that compile or load large guests (builds of new plugin projects, the
/// Python component): run together on a small machine they would starve every other test.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Takes the heavy-test lock from a plain `#[test]`.
pub fn heavy_test() -> tokio::sync::MutexGuard<'static, ()> {
    HEAVY.blocking_lock()
}

/// Takes the heavy-test lock from a `#[tokio::test]`.
pub async fn heavy_test_async() -> tokio::sync::MutexGuard<'static, ()> {
    HEAVY.lock().await
}

/// The cargo target directory the tests were built in (`<target>/debug/keepwarm` is the binary).
pub fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_keepwarm"))
        .ancestors()
        .nth(2)
        .expect("the keepwarm binary is in <target>/<profile>/")
        .to_owned()
}

/// A free TCP port on localhost (for admin endpoints of daemons under test).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GETs `url`: `(status, body)`, or `None` when nothing answers.
pub async fn http_get(url: &str) -> Option<(u16, String)> {
    let url = url.to_owned();
    tokio::task::spawn_blocking(move || {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .new_agent();
        let mut response = agent.get(&url).call().ok()?;
        let status = response.status().as_u16();
        Some((status, response.body_mut().read_to_string().ok()?))
    })
    .await
    .unwrap()
}

/// The value of the sample `name{labels}` in Prometheus text, e.g.
/// `metric(&text, "keepwarm_messages_received_total", &[("source", "x")])`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (metric_name, rest) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if metric_name != name {
            return None;
        }
        let found: Vec<(&str, &str)> = rest
            .split(',')
            .filter(|kv| !kv.is_empty())
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                Some((k, v.trim_matches('"')))
            })
            .collect();
        let all = labels.iter().all(|l| found.contains(l)) && found.len() == labels.len();
        all.then(|| value.parse().ok()).flatten()
    })
}

/// The real `keepwarm` binary running as a child process, its stderr collected line by line.
pub struct KeepwarmProcess {
    child: Option<Child>,
    lines: std::sync::mpsc::Receiver<String>,
    /// Every stderr line seen so far.
    pub log: Vec<String>,
}

impl KeepwarmProcess {
    pub fn spawn(args: &[&str]) -> KeepwarmProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_keepwarm"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        KeepwarmProcess {
            child: Some(child),
            lines,
            log: Vec::new(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends `signal` (e.g. `TERM`, `KILL`) with kill(1).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for a stderr line containing `text`; panics after `limit` or at end of output.
    pub fn wait_log(&mut self, text: &str, limit: Duration) -> String {
        if let Some(line) = self.log.iter().find(|l| l.contains(text)) {
            return line.clone();
        }
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.log.push(line.clone());
                    if line.contains(text) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no log line with {text:?} within {limit:?}; log so far:\n{}",
                    self.log.join("\n")
                ),
            }
        }
    }

    /// Waits for the process to exit (panics after `limit`) and collects the rest of its log.
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        let child = self.child.as_mut().unwrap();
        // The stderr reader ends when the process (and its stderr) is gone.
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.log.push(line),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    panic!("keepwarm did not exit within {limit:?}")
                }
            }
        }
        let status = child.wait().unwrap();
        self.child = None;
        status
    }
}

impl Drop for KeepwarmProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
