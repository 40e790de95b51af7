//! [`PgCluster`]: one private Postgres cluster with `wal_level = logical` for the whole test
//! binary (the machine's own cluster is not logical and must be left alone), a database per
//! test. The first test that needs it starts it (initdb as the `postgres` user on a free port
//! under a temporary directory, about 5 s), and a watchdog stops it and removes the directory
//! once the test process is gone. `KEEPWARM_PG_PORT` points the tests at a running logical
//! cluster on 127.0.0.1 instead (superuser `postgres`, trust authentication).

use crate::util::{free_port, unique};
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use tokio_postgres::{Client, NoTls};

/// The cluster: superuser `postgres`, trust authentication, on 127.0.0.1.
pub struct PgCluster {
    pub port: u16,
}

static CLUSTER: OnceLock<PgCluster> = OnceLock::new();

/// The suite's cluster, started on first use.
pub fn cluster() -> &'static PgCluster {
    CLUSTER.get_or_init(|| match std::env::var("KEEPWARM_PG_PORT") {
        Ok(port) => PgCluster {
            port: port.parse().expect("KEEPWARM_PG_PORT is a port"),
        },
        Err(_) => PgCluster::start(),
    })
}

fn bin_dir() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("Postgres is not installed (/usr/lib/postgresql): run scripts/setup.sh")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").is_file())
        .collect();
    versions.sort();
    versions
        .pop()
        .expect("no initdb under /usr/lib/postgresql/*/bin")
}

fn as_postgres(args: &[&str]) {
    let status = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("runuser");
    assert!(status.success(), "{args:?} failed");
}

impl PgCluster {
    fn start() -> PgCluster {
        let bin = bin_dir();
        let dir = std::env::temp_dir().join(unique("kw-pg"));
        let status = Command::new("install")
            .args(["-d", "-o", "postgres", "-g", "postgres"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(status.success());
        let data = dir.join("data");
        let (initdb, pg_ctl) = (bin.join("initdb"), bin.join("pg_ctl"));
        let (initdb, pg_ctl, data_s) = (
            initdb.to_str().unwrap(),
            pg_ctl.to_str().unwrap(),
            data.to_str().unwrap(),
        );
        as_postgres(&[
            initdb,
            "-D",
            data_s,
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-locale",
        ]);
        let port = free_port();
        let conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\n\
             wal_level = logical\nmax_replication_slots = 40\nmax_wal_senders = 40\n\
             max_connections = 200\nfsync = off\nsynchronous_commit = off\n",
            dir.display()
        );
        let mut text = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        text += &conf;
        std::fs::write(data.join("postgresql.conf"), text).unwrap();
        let log = dir.join("log");
        as_postgres(&[
            pg_ctl,
            "-D",
            data_s,
            "-l",
            log.to_str().unwrap(),
            "-w",
            "start",
        ]);
        // Stops the cluster once this test process is gone.
        let watchdog = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
             runuser -u postgres -- {pg_ctl} -D {data_s} -m immediate stop >/dev/null 2>&1; rm -rf {dir}",
            pid = std::process::id(),
            dir = dir.display()
        );
        // `setsid -f` forks the watchdog off and returns at once.
        let status = Command::new("setsid")
            .args(["-f", "sh", "-c", &watchdog])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        PgCluster { port }
    }

    /// A connection string to `database`.
    pub fn url(&self, database: &str) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Connects to `database`.
    pub async fn connect(&self, database: &str) -> Client {
        let (client, connection) = tokio_postgres::connect(&self.url(database), NoTls)
            .await
            .unwrap_or_else(|e| panic!("connect to {database}: {e}"));
        tokio::spawn(connection);
        client
    }

    /// A new database of its own for one test; returns its name.
    pub async fn database(&self, name: &str) -> String {
        let database = unique(name).replace('-', "_");
        let admin = self.connect("postgres").await;
        admin
            .batch_execute(&format!("CREATE DATABASE {database}"))
            .await
            .unwrap();
        database
    }
}
