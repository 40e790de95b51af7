//! Test plugin for containment: behaves like a tiny row cache (`<prefix><pks>` = record) except
//! on changes whose first primary key is in `victims` (all changes when `victims` is absent),
//! where it does what `mode` says:
//!
//! - `loop`: never returns; `alloc`: allocates until it dies; `leak`: keeps `leak_kib` more
//!   memory on every call and behaves; `panic`: panics; `keep`: keeps a copy of every record it
//!   sees, checks that none was overwritten since, and caches `kept <count>` as
//!   `<prefix>probe:<pks>` (no allocator may reuse memory a plugin still holds);
//! - `outside`: writes `forbidden:<pks>`; `huge`: returns an 8 MiB value; `many-ops`: returns
//!   10,000 operations; `log-flood`: logs 10,000 lines and behaves;
//! - `stall`: busy-waits until the wall-clock time in the record's `stall_until_ms` (needs the
//!   clock grant), then caches `started <ms>`, when its call began: a change that is slow only
//!   once, as on a machine stalled by load;
//! - `fs`, `net`, `env`, `clock`: tries to read `/etc/hostname`, connect to 127.0.0.1:6379,
//!   read `$HOME`, or read the wall clock, and caches what it got as `<prefix>probe:<pks>`;
//! - `sleep`: sleeps an hour, then for ever, then caches `woke` as `<prefix>probe:<pks>`.

use keepwarm_guest::{Change, Config, Op, Plugin, log, ops};
use std::cell::RefCell;

/// The hostile plugin.
pub struct Hostile {
    prefix: String,
    mode: String,
    victims: Option<Vec<String>>,
    leak_kib: usize,
    leaked: RefCell<Vec<Vec<u8>>>,
    /// `keep`: each record seen, and its checksum when it was kept.
    kept: RefCell<Vec<(String, u64)>>,
}

#[derive(serde::Deserialize)]
struct Settings {
    prefix: String,
    mode: String,
    victims: Option<Vec<String>>,
    #[serde(default)]
    leak_kib: usize,
}

impl Plugin for Hostile {
    fn new(config: &Config) -> Result<Self, String> {
        let s: Settings = config.parse()?;
        Ok(Hostile {
            prefix: s.prefix,
            mode: s.mode,
            victims: s.victims,
            leak_kib: s.leak_kib,
            leaked: RefCell::new(Vec::new()),
            kept: RefCell::new(Vec::new()),
        })
    }

    fn handle(&self, change: &Change) -> Result<Vec<Op>, String> {
        let pks = change.pks().join(":");
        let normal = vec![ops::set(
            format!("{}{pks}", self.prefix),
            change.record_json().to_owned(),
        )];
        let victim = self
            .victims
            .as_ref()
            .is_none_or(|v| change.pks().first().is_some_and(|pk| v.contains(pk)));
        if !victim {
            return Ok(normal);
        }
        let probe = |text: String| Ok(vec![ops::set(format!("{}probe:{pks}", self.prefix), text)]);
        match self.mode.as_str() {
            "loop" => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            "alloc" => {
                let mut hoard = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "leak" => {
                self.leaked
                    .borrow_mut()
                    .push(vec![1u8; self.leak_kib << 10]);
                Ok(normal)
            }
            "keep" => {
                let mut kept = self.kept.borrow_mut();
                let text = change.record_json().to_owned();
                let sum = checksum(&text);
                kept.push((text, sum));
                if kept.iter().any(|(text, sum)| checksum(text) != *sum) {
                    return Err("a kept record was overwritten".to_owned());
                }
                probe(format!("kept {}", kept.len()))
            }
            "panic" => panic!("hostile plugin panics on {pks}"),
            "stall" => {
                let until = change
                    .record_value()?
                    .get("stall_until_ms")
                    .and_then(|v| v.as_u64())
                    .ok_or("the record has no stall_until_ms")?;
                let started = now_ms();
                while now_ms() < until {
                    std::hint::spin_loop();
                }
                Ok(vec![ops::set(
                    format!("{}{pks}", self.prefix),
                    format!("started {started}"),
                )])
            }
            "outside" => Ok(vec![ops::set(format!("forbidden:{pks}"), "x")]),
            "huge" => Ok(vec![ops::set(
                format!("{}{pks}", self.prefix),
                vec![b'x'; 8 << 20],
            )]),
            "many-ops" => Ok((0..10_000)
                .map(|i| ops::del(format!("{}{pks}:{i}", self.prefix)))
                .collect()),
            "log-flood" => {
                for i in 0..10_000 {
                    log::info(format!("flood line {i} for {pks}"));
                }
                Ok(normal)
            }
            "fs" => probe(match std::fs::read_to_string("/etc/hostname") {
                Ok(text) => format!("read: {text}"),
                Err(error) => format!("error: {error}"),
            }),
            "net" => probe(match std::net::TcpStream::connect("127.0.0.1:6379") {
                Ok(_) => "connected".to_owned(),
                Err(error) => format!("error: {error}"),
            }),
            "env" => probe(match std::env::var("HOME") {
                Ok(home) => format!("read: {home}"),
                Err(error) => format!("error: {error}"),
            }),
            "clock" => probe(
                match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
                    Ok(since) => format!("secs: {}", since.as_secs()),
                    Err(error) => format!("error: {error}"),
                },
            ),
            "sleep" => {
                // An hour, then a timer that can never fire: neither may hold the lane.
                std::thread::sleep(std::time::Duration::from_secs(3600));
                std::thread::sleep(std::time::Duration::MAX);
                probe("woke".to_owned())
            }
            other => Err(format!("unknown mode {other}")),
        }
    }
}

/// The wall clock in milliseconds since the epoch (0 without the clock grant).
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}

keepwarm_guest::export_plugin!(Hostile);

/// FNV-1a of `text`.
fn checksum(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |sum, byte| {
        (sum ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}
