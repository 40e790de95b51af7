//! A redis-server of the test's own, for tests that stop and restart Redis, need a password or
//! a one-node cluster.

use super::{TempDir, connect, free_port, wait_for};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A redis-server on a free port, its data in a directory of its own.
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
    pub async fn start_volatile() -> RedisServer {
        RedisServer::start_mode(false, false, &[]).await
    }

    /// Starts a one-node Redis Cluster that serves every slot, persisting like [`start`]. It
    /// enforces what a cluster enforces (`CROSSSLOT` for a command or script naming keys of two
    /// slots), while a plain client reaches every key without redirection.
    ///
    /// [`start`]: RedisServer::start
    pub async fn start_cluster() -> RedisServer {
        RedisServer::start_mode(true, true, &[]).await
    }

    /// Starts a server with extra arguments, e.g. `["--requirepass", "secret"]`.
    pub async fn start_with(extra: &[&str]) -> RedisServer {
        RedisServer::start_mode(false, true, extra).await
    }

    async fn start_mode(cluster: bool, persist: bool, extra: &[&str]) -> RedisServer {
        let mut server = RedisServer {
            port: free_port(),
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
