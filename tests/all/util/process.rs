//! The real `keepwarm` binary: one-shot commands ([`keepwarm_cli`]) and a running daemon
//! ([`KeepwarmProcess`]) whose log the test reads.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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

/// [`keepwarm_cli`] without stdin, off the async runtime's threads.
pub async fn keepwarm_cli_async(args: &[&str]) -> (bool, String, String) {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        keepwarm_cli(&args, "")
    })
    .await
    .unwrap()
}

/// The cargo target directory the tests were built in (`<target>/debug/keepwarm` is the binary).
pub fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_keepwarm"))
        .ancestors()
        .nth(2)
        .expect("the keepwarm binary is in <target>/<profile>/")
        .to_owned()
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
