//! The `keepwarm` binary as the second consumer of a seed, and what its admin endpoint says.

use crate::util::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The `keepwarm` binary as the second consumer; killed if dropped running (a failed test).
pub struct Process {
    child: Option<Child>,
    log: PathBuf,
}

impl Process {
    pub fn start(config: &Path, log_path: &Path) -> Process {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_keepwarm"))
            .args(["run", "--shutdown-timeout", "10", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Process {
            child: Some(child),
            log: log_path.to_owned(),
        }
    }

    /// The address of its admin endpoint (it listens on port 0), once it has logged it.
    pub fn admin_address(&self) -> Option<String> {
        let log = std::fs::read_to_string(&self.log).ok()?;
        let line = log
            .lines()
            .find(|line| line.contains("admin endpoint listening"))?;
        let at = line.find("addr=")? + "addr=".len();
        Some(line[at..].split_whitespace().next()?.to_owned())
    }

    /// Panics with the end of its log if the process has exited.
    pub fn assert_running(&mut self) {
        let child = self.child.as_mut().unwrap();
        if let Some(status) = child.try_wait().unwrap() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            panic!(
                "keepwarm exited with {status}; its log ends:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }

    /// SIGKILL (what `Child::kill` sends), as a crash or an OOM kill would.
    pub fn kill9(mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// SIGTERM, and the graceful shutdown must succeed.
    pub fn stop(mut self) {
        let mut child = self.child.take().unwrap();
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let status = child.wait().unwrap();
        assert!(status.success(), "keepwarm exited with {status}");
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// An address for an admin endpoint.
pub fn free_address() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// The stale writes a daemon skipped so far, from its `/metrics` (waiting for a daemon that is
/// still starting).
pub async fn stale_skipped(admin: &str) -> u64 {
    let url = format!("http://{admin}/metrics");
    let text = std::sync::Mutex::new(String::new());
    wait_for(&format!("{url} to answer"), PATIENCE, || async {
        let answer = http_get(&url).await;
        let ok = matches!(answer, Some((200, _)));
        if let Some((200, body)) = answer {
            *text.lock().unwrap() = body;
        }
        ok
    })
    .await;
    // One sample per source and plugin: their sum.
    let text = text.into_inner().unwrap();
    text.lines()
        .filter(|line| line.starts_with("keepwarm_writes_stale_skipped_total"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}
