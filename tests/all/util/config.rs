//! The daemon's TOML config, built per test ([`ConfigBuilder`]), and the daemon run in this
//! process ([`Daemon`]).

use super::{TempDir, free_port};
use keepwarm::config::Config;
use std::path::Path;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A daemon config under construction: tables of `key = value` lines, then `[[source]]`s. A line
/// whose key a table already has replaces it.
#[derive(Clone)]
pub struct ConfigBuilder {
    tables: Vec<(String, Vec<String>)>,
    sources: Vec<Vec<String>>,
    admin: Option<String>,
}

impl ConfigBuilder {
    /// A config writing to the cache at `cache_url` with the plugins of `plugins`, its admin
    /// endpoint on a port the system picks.
    pub fn new(cache_url: &str, plugins: &Path) -> ConfigBuilder {
        ConfigBuilder {
            tables: Vec::new(),
            sources: Vec::new(),
            admin: None,
        }
        .set("redis", &format!("url = \"{cache_url}\""))
        .set("plugins", &format!("dir = \"{}\"", plugins.display()))
        .set("admin", "listen = \"127.0.0.1:0\"")
    }

    /// Adds `lines` (`key = value`, one a line) to the table `[table]`.
    pub fn set(mut self, table: &str, lines: &str) -> ConfigBuilder {
        if lines.trim().is_empty() {
            return self;
        }
        let at = match self.tables.iter().position(|(name, _)| name == table) {
            Some(at) => at,
            None => {
                self.tables.push((table.to_owned(), Vec::new()));
                self.tables.len() - 1
            }
        };
        merge(&mut self.tables[at].1, lines);
        self
    }

    /// Removes the table `[table]`.
    pub fn unset(mut self, table: &str) -> ConfigBuilder {
        self.tables.retain(|(name, _)| name != table);
        self
    }

    pub fn redis(self, lines: &str) -> ConfigBuilder {
        self.set("redis", lines)
    }

    pub fn pipeline(self, lines: &str) -> ConfigBuilder {
        self.set("pipeline", lines)
    }

    pub fn dead_letter(self, stream: &str) -> ConfigBuilder {
        self.set("dead_letter", &format!("stream = \"{stream}\""))
    }

    /// The admin endpoint on a free port of its own, known in advance ([`Daemon::admin`]).
    pub fn admin(mut self) -> ConfigBuilder {
        let address = format!("127.0.0.1:{}", free_port());
        self.admin = Some(address.clone());
        self.set("admin", &format!("listen = \"{address}\""))
    }

    /// The address [`ConfigBuilder::admin`] picked (for a daemon run as a process).
    pub fn admin_address(&self) -> &str {
        self.admin.as_deref().expect("a config built with .admin()")
    }

    /// Adds a `[[source]]` of `kind` with `lines`.
    pub fn source(mut self, kind: &str, lines: &str) -> ConfigBuilder {
        let mut source = vec![format!("kind = \"{kind}\"")];
        merge(&mut source, lines);
        self.sources.push(source);
        self
    }

    /// Adds `lines` to the last `[[source]]`.
    pub fn source_lines(mut self, lines: &str) -> ConfigBuilder {
        merge(self.sources.last_mut().expect("a source"), lines);
        self
    }

    /// The config file's text.
    pub fn toml(&self) -> String {
        let mut text = String::new();
        for (table, lines) in &self.tables {
            text += &format!("[{table}]\n{}\n", lines.join("\n"));
        }
        for lines in &self.sources {
            text += &format!("[[source]]\n{}\n", lines.join("\n"));
        }
        text
    }

    pub fn parse(&self) -> Config {
        Config::parse(&self.toml()).unwrap_or_else(|e| panic!("{e:#}\n{}", self.toml()))
    }

    /// Writes the config as `name` in `dir`; returns its path, for the command line.
    pub fn write(&self, dir: &TempDir, name: &str) -> String {
        dir.write(name, &self.toml())
    }

    /// Starts the daemon in this process.
    pub fn run(&self) -> Daemon {
        let mut daemon = Daemon::start(self.parse());
        daemon.admin = self.admin.clone();
        daemon
    }
}

/// Merges `key = value` lines into `into`, a later key replacing an earlier one.
fn merge(into: &mut Vec<String>, lines: &str) {
    for line in lines.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let key = |l: &str| l.split('=').next().unwrap_or("").trim().to_owned();
        into.retain(|old| key(old) != key(line));
        into.push(line.to_owned());
    }
}

/// The daemon running in this process.
pub struct Daemon {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    admin: Option<String>,
}

impl Daemon {
    pub fn start(config: Config) -> Daemon {
        keepwarm::telemetry::init_logging(keepwarm::telemetry::LogFormat::Text);
        let shutdown = CancellationToken::new();
        let run = keepwarm::daemon::run(config, shutdown.clone(), Duration::from_secs(10));
        let task = tokio::spawn(async move {
            let result = run.await;
            if let Err(error) = &result {
                eprintln!("the daemon failed: {error:#}");
            }
            result
        });
        Daemon {
            shutdown,
            task,
            admin: None,
        }
    }

    /// The admin endpoint's address; the config must have asked for [`ConfigBuilder::admin`].
    pub fn admin(&self) -> &str {
        self.admin.as_deref().expect("a config built with .admin()")
    }

    /// `http://<admin address><path>`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin())
    }

    /// Shuts the daemon down and checks that it ran without an error.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}
