//! CPU time and peak memory of a process, from `/proc`.

use anyhow::Context as _;

/// Clock ticks per second of `/proc/<pid>/stat` (`getconf CLK_TCK`; 100 on Linux).
const TICKS: f64 = 100.0;

/// CPU and peak RSS of a process at one moment.
pub(crate) struct Sample {
    /// User plus system CPU seconds so far.
    pub(crate) cpu_seconds: f64,
    /// The system (kernel) part of `cpu_seconds`: syscalls, wake-ups, page faults.
    pub(crate) system_seconds: f64,
    /// Peak resident set (`VmHWM`), MiB.
    pub(crate) peak_rss_mib: f64,
}

impl Sample {
    /// Reads `/proc/<pid>/stat` and `/proc/<pid>/status`.
    ///
    /// # Errors
    ///
    /// The process is gone.
    pub(crate) fn of(pid: u32) -> anyhow::Result<Sample> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("process {pid} is gone"))?;
        let ticks = stat_fields(&stat);
        let cpu_seconds = (ticks(11) + ticks(12)) / TICKS;
        let system_seconds = ticks(12) / TICKS;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        Ok(Sample {
            cpu_seconds,
            system_seconds,
            peak_rss_mib: kib / 1024.0,
        })
    }
}

/// User plus system CPU seconds of this process's children that it has waited for
/// (`cutime` + `cstime`): the difference across a wait is that child's CPU time.
///
/// # Errors
///
/// `/proc/self/stat` cannot be read.
pub(crate) fn waited_children_cpu_seconds() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    let ticks = stat_fields(&stat);
    Ok((ticks(13) + ticks(14)) / TICKS)
}

/// The numeric fields of a `/proc/<pid>/stat` line after the command name, by index from the
/// state field (0); a missing or unreadable field reads as 0.
fn stat_fields(stat: &str) -> impl Fn(usize) -> f64 + '_ {
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    move |i| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    }
}
