//! The benchmark's private Postgres cluster with `wal_level = logical`, as the tests start
//! theirs (`tests/all/postgres/cluster.rs`): initdb as the `postgres` user under a temporary
//! directory, on a free loopback port, trust authentication; stopped and removed when dropped,
//! and by a watchdog if the benchmark is killed. The machine's own cluster is left alone.

use anyhow::{Context as _, bail};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use tokio_postgres::{Client, NoTls};

/// The database the benchmark creates in its cluster.
pub(crate) const DATABASE: &str = "bench";

/// A running cluster; stopped when dropped.
pub(crate) struct Cluster {
    pub(crate) port: u16,
    dir: PathBuf,
    pg_ctl: PathBuf,
}

/// The newest `/usr/lib/postgresql/*/bin` holding `initdb` and `pg_ctl`, or why there is none.
pub(crate) fn bin_dir() -> anyhow::Result<PathBuf> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .context(
            "Postgres is not installed (no /usr/lib/postgresql; scripts/setup.sh installs it)",
        )?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").is_file() && p.join("pg_ctl").is_file())
        .collect();
    versions.sort();
    versions
        .pop()
        .context("no initdb and pg_ctl under /usr/lib/postgresql/*/bin")
}

/// Runs `args` as the `postgres` user.
fn as_postgres(args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .args(args)
        .stdout(Stdio::null())
        .status()
        .context("cannot run runuser (the benchmark starts Postgres as the postgres user)")?;
    anyhow::ensure!(status.success(), "{args:?} failed ({status})");
    Ok(())
}

fn text(path: &Path) -> anyhow::Result<&str> {
    path.to_str().context("a non-UTF-8 path")
}

impl Cluster {
    /// initdb, configure and start a cluster; creates [`DATABASE`].
    pub(crate) async fn start() -> anyhow::Result<Cluster> {
        let bin = bin_dir()?;
        let dir = std::env::temp_dir().join(format!(
            "kw-bench-pg-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_millis()
        ));
        let status = Command::new("install")
            .args(["-d", "-o", "postgres", "-g", "postgres"])
            .arg(&dir)
            .status()?;
        anyhow::ensure!(status.success(), "cannot create {}", dir.display());
        let cluster = Cluster {
            port: std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port(),
            pg_ctl: bin.join("pg_ctl"),
            dir,
        };
        let data = cluster.dir.join("data");
        as_postgres(&[
            text(&bin.join("initdb"))?,
            "-D",
            text(&data)?,
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-locale",
        ])?;
        // fsync off: the benchmark measures keepwarm, not this VM's disk. synchronous_commit
        // stays on, so a commit's WAL is flushed (and streamable) when COMMIT returns.
        let conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{dir}'\n\
             wal_level = logical\nmax_replication_slots = 4\nmax_wal_senders = 4\n\
             fsync = off\nfull_page_writes = off\nmax_wal_size = 4GB\n",
            port = cluster.port,
            dir = cluster.dir.display()
        );
        let conf_path = data.join("postgresql.conf");
        let mut text_conf = std::fs::read_to_string(&conf_path)?;
        text_conf.push_str(&conf);
        std::fs::write(&conf_path, text_conf)?;
        as_postgres(&[
            text(&cluster.pg_ctl)?,
            "-D",
            text(&data)?,
            "-l",
            text(&cluster.dir.join("log"))?,
            "-w",
            "start",
        ])?;
        // Stops the cluster if this process dies without dropping it.
        let watchdog = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
             runuser -u postgres -- {pg_ctl} -D {data} -m immediate stop >/dev/null 2>&1; rm -rf {dir}",
            pid = std::process::id(),
            pg_ctl = cluster.pg_ctl.display(),
            data = data.display(),
            dir = cluster.dir.display()
        );
        Command::new("setsid")
            .args(["-f", "sh", "-c", &watchdog])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        cluster
            .connect("postgres")
            .await?
            .batch_execute(&format!("CREATE DATABASE {DATABASE}"))
            .await?;
        Ok(cluster)
    }

    /// A connection string to `database`.
    pub(crate) fn url(&self, database: &str) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Connects to `database`; the connection runs on a task of its own.
    pub(crate) async fn connect(&self, database: &str) -> anyhow::Result<Client> {
        let (client, connection) = tokio_postgres::connect(&self.url(database), NoTls)
            .await
            .with_context(|| format!("cannot connect to the benchmark's Postgres ({database})"))?;
        tokio::spawn(connection);
        Ok(client)
    }

    /// The postmaster's pid.
    fn postmaster(&self) -> anyhow::Result<u32> {
        let pidfile = std::fs::read_to_string(self.dir.join("data/postmaster.pid"))?;
        pidfile
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .context("no pid in postmaster.pid")
    }

    /// CPU seconds the whole cluster has used so far: the postmaster, its live children
    /// (backends, walsenders, background workers) and the children it has reaped.
    pub(crate) fn cpu_seconds(&self) -> anyhow::Result<f64> {
        let postmaster = u64::from(self.postmaster()?);
        let mut ticks = 0;
        for entry in std::fs::read_dir("/proc")? {
            let Ok(entry) = entry else { continue };
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u64>().ok())
            else {
                continue;
            };
            let Some(fields) = stat_fields(pid) else {
                continue;
            };
            // Fields after the command: 0 state, 1 ppid, 11 utime, 12 stime, 13 cutime, 14 cstime.
            let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
            if pid == postmaster {
                ticks += [11, 12, 13, 14].into_iter().filter_map(field).sum::<u64>();
            } else if field(1) == Some(postmaster) {
                ticks += [11, 12].into_iter().filter_map(field).sum::<u64>();
            }
        }
        #[allow(clippy::cast_precision_loss, reason = "CPU ticks far below 2^52")]
        let total = ticks as f64;
        Ok(total / 100.0)
    }
}

/// The fields of `/proc/<pid>/stat` after the command name.
fn stat_fields(pid: u64) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// CPU seconds this process's waited-for children have used (`cutime` + `cstime`).
pub(crate) fn reaped_children_cpu() -> anyhow::Result<f64> {
    let fields = stat_fields(u64::from(std::process::id())).context("no /proc/self/stat")?;
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Ok((field(13) + field(14)) / 100.0)
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let stopped = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(&self.pg_ctl)
            .arg("-D")
            .arg(&data)
            .args(["-m", "fast", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !stopped.is_ok_and(|s| s.success()) {
            eprintln!("note: pg_ctl stop failed for {}", data.display());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Skips with a reason when this machine cannot start a private cluster.
pub(crate) fn available() -> anyhow::Result<()> {
    bin_dir()?;
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root {
        bail!("the benchmark starts Postgres as the postgres user with runuser, which needs root");
    }
    Ok(())
}
