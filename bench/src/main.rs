//! `keepwarm-bench`: keepwarm against a native Rust worker and a Python redis-py worker, on the
//! same workload, in one run; and keepwarm's Kafka source against a native rdkafka consumer when
//! a Kafka broker is given. See `docs/bench.md`.

mod brokers;
mod decode_cost;
mod goals;
mod kafka;
mod native;
mod pace;
mod plugin_cost;
mod plugin_load;
mod postgres;
mod procstat;
mod workload;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use procstat::Sample;
use redis::aio::MultiplexedConnection;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use workload::Workload;

const STREAM: &str = "bench:changes";
const GROUP: &str = "bench";

/// Benchmarks keepwarm against the alternatives.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// Baseline (a): the native Rust worker (started by the benchmark as a child process).
    NativeWorker {
        /// Redis URL.
        url: String,
        /// Stream key.
        stream: String,
        /// Consumer group.
        group: String,
    },
    /// Baseline (c): the native rdkafka consumer (started by the benchmark as a child process).
    NativeKafkaWorker {
        /// Bootstrap brokers.
        brokers: String,
        /// Topic.
        topic: String,
        /// Consumer group.
        group: String,
        /// Redis URL.
        url: String,
    },
}

#[derive(clap::Args)]
#[allow(
    clippy::struct_excessive_bools,
    reason = "independent command-line switches"
)]
struct RunArgs {
    /// Change messages per throughput run.
    #[arg(long, default_value_t = 1_000_000)]
    messages: u64,
    /// Run the throughput scenarios, each round followed by its paced latency pair, this many
    /// times; the goal figures are taken within each round and reported with their median over
    /// the rounds.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Distinct rows.
    #[arg(long, default_value_t = 100_000)]
    rows: u64,
    /// Workload seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Seconds of the paced latency run.
    #[arg(long, default_value_t = 10)]
    latency_seconds: u64,
    /// A tiny run of every scenario (smoke test; the numbers mean nothing).
    #[arg(long)]
    quick: bool,
    /// The keepwarm binary (default: beside this binary).
    #[arg(long)]
    keepwarm: Option<PathBuf>,
    /// Directory holding row-cache.wasm (default: target/plugins beside the binary's directory).
    #[arg(long)]
    plugins: Option<PathBuf>,
    /// Python with redis-py installed (default: target/bench-venv/bin/python, then python3).
    #[arg(long)]
    python: Option<PathBuf>,
    /// Skip the Python baseline.
    #[arg(long)]
    no_python: bool,
    /// Only these scenarios (comma-separated names, see the table); default all.
    #[arg(long)]
    only: Option<String>,
    /// Where to write the JSON results (default: target/bench/results.json).
    #[arg(long)]
    out: Option<PathBuf>,
    /// keepwarm's `[pipeline] lanes` (default: keepwarm's default).
    #[arg(long)]
    lanes: Option<usize>,
    /// keepwarm's `[pipeline] batch_size` (default: keepwarm's default).
    #[arg(long)]
    batch_size: Option<usize>,
    /// keepwarm's `[pipeline] max_in_flight` (default: keepwarm's default).
    #[arg(long)]
    max_in_flight: Option<usize>,
    /// Use this Redis (it is FLUSHALLed!) instead of starting a private redis-server.
    #[arg(long)]
    redis_url: Option<String>,
    /// Kafka brokers for the Kafka scenarios (default: $KAFKA_BROKERS; without either they are
    /// skipped).
    #[arg(long)]
    kafka_brokers: Option<String>,
    /// Pace the latency runs at this many messages per second instead of half of each
    /// consumer's measured throughput (to compare consumers at one rate).
    #[arg(long)]
    latency_rate: Option<f64>,
    /// NATS with JetStream for the NATS scenario (default: `NATS_URL`; none: skipped). Its
    /// stream `KEEPWARM_BENCH` is replaced.
    #[arg(long)]
    nats_url: Option<String>,
    /// RabbitMQ for the RabbitMQ scenario (default: `AMQP_URL`; none: skipped). Its queue
    /// `keepwarm-bench` is replaced.
    #[arg(long)]
    amqp_url: Option<String>,
    /// Stop each consumer with SIGTERM and wait (up to ten minutes) for it to exit, not with
    /// SIGKILL, so that a profiler wrapped around it (`valgrind --tool=callgrind
    /// --trace-children=yes`) writes its output (docs/bench.md, round 13).
    #[arg(long)]
    graceful_stop: bool,
    #[command(flatten)]
    pg: postgres::PgArgs,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Cmd::NativeWorker { url, stream, group }) => {
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(native::run(&url, &stream, &group))
        }
        Some(Cmd::NativeKafkaWorker {
            brokers,
            topic,
            group,
            url,
        }) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(kafka::run(&brokers, &topic, &group, &url)),
        None => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?
            .block_on(bench(cli.run)),
    }
}

/// What a consumer is.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Keepwarm {
        plain: bool,
        threads: usize,
        /// The cache is the benchmark's Memcached rather than Redis.
        memcached: bool,
    },
    Native,
    Python,
    /// keepwarm's Kafka source (plain writes, two threads).
    KeepwarmKafka,
    /// The native rdkafka consumer.
    NativeKafka,
}

impl Kind {
    fn is_kafka(self) -> bool {
        matches!(self, Kind::KeepwarmKafka | Kind::NativeKafka)
    }
}

struct Scenario {
    name: &'static str,
    kind: Kind,
}

const SCENARIOS: [Scenario; 9] = [
    Scenario {
        name: "keepwarm-plain",
        kind: Kind::Keepwarm {
            plain: true,
            threads: 2,
            memcached: false,
        },
    },
    Scenario {
        name: "keepwarm-versioned",
        kind: Kind::Keepwarm {
            plain: false,
            threads: 2,
            memcached: false,
        },
    },
    Scenario {
        name: "keepwarm-plain-1thread",
        kind: Kind::Keepwarm {
            plain: true,
            threads: 1,
            memcached: false,
        },
    },
    Scenario {
        name: "keepwarm-memcached-plain",
        kind: Kind::Keepwarm {
            plain: true,
            threads: 2,
            memcached: true,
        },
    },
    Scenario {
        name: "keepwarm-memcached-versioned",
        kind: Kind::Keepwarm {
            plain: false,
            threads: 2,
            memcached: true,
        },
    },
    Scenario {
        name: "native-rust",
        kind: Kind::Native,
    },
    Scenario {
        name: "python-redis-py",
        kind: Kind::Python,
    },
    Scenario {
        name: "keepwarm-kafka",
        kind: Kind::KeepwarmKafka,
    },
    Scenario {
        name: "native-kafka",
        kind: Kind::NativeKafka,
    },
];

/// One throughput result.
#[derive(serde::Serialize, Clone)]
struct Throughput {
    name: String,
    /// Which round of `--rounds` measured it, from 1.
    round: u32,
    messages: u64,
    seconds: f64,
    messages_per_second: f64,
    cpu_seconds_per_million: f64,
    /// The kernel's share of the consumer's CPU (system ÷ user + system), in percent.
    system_cpu_percent: f64,
    /// The cache server's CPU: Redis, or memcached in the Memcached scenarios.
    redis_cpu_seconds_per_million: Option<f64>,
    peak_rss_mib: f64,
    dead_letters: u64,
    keys: u64,
}

/// One latency result.
#[derive(serde::Serialize)]
struct Latency {
    name: String,
    /// Which round of `--rounds` measured it, from 1.
    round: u32,
    rate_per_second: f64,
    /// Messages added to the stream at the pace.
    sent: u64,
    /// Latencies sampled: keys whose row id ends in the sampled digit, set or deleted (one in
    /// ten of those sent, less the deletes of absent keys, which raise no event).
    observed: u64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
}

struct Env {
    url: String,
    nats_url: Option<String>,
    amqp_url: Option<String>,
    redis_pid: Option<u32>,
    /// The benchmark's Memcached: its pid and `host:port` (none: memcached is not installed).
    memcached: Option<(u32, String)>,
    keepwarm: PathBuf,
    plugins: PathBuf,
    python: PathBuf,
    myself: PathBuf,
    scratch: PathBuf,
    pipeline: String,
    workload: Workload,
    /// Kafka brokers, for the Kafka scenarios.
    kafka: Option<String>,
    /// `--graceful-stop`.
    graceful_stop: bool,
}

async fn bench(mut args: RunArgs) -> anyhow::Result<()> {
    if args.quick {
        args.messages = args.messages.min(2_000);
        args.rows = args.rows.min(500);
        args.latency_seconds = args.latency_seconds.min(1);
    }
    let myself = std::env::current_exe()?;
    let bin_dir = myself.parent().context("binary directory")?.to_owned();
    let target = bin_dir.parent().context("target directory")?.to_owned();
    let keepwarm = args
        .keepwarm
        .clone()
        .unwrap_or_else(|| bin_dir.join("keepwarm"));
    let plugins = args
        .plugins
        .clone()
        .unwrap_or_else(|| target.join("plugins"));
    anyhow::ensure!(
        keepwarm.exists(),
        "{} not found (cargo build -p keepwarm)",
        keepwarm.display()
    );
    anyhow::ensure!(
        plugins.join("row-cache.wasm").exists(),
        "{}/row-cache.wasm not found (scripts/build-plugins.sh)",
        plugins.display()
    );
    let python = args.python.clone().unwrap_or_else(|| {
        let venv = target.join("bench-venv/bin/python");
        if venv.exists() {
            venv
        } else {
            PathBuf::from("python3")
        }
    });
    let python_ok = !args.no_python
        && Command::new(&python)
            .args(["-c", "import redis"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    if !args.no_python && !python_ok {
        eprintln!(
            "note: {} cannot import redis (scripts/bench.sh installs it); the Python baseline is skipped",
            python.display()
        );
        args.no_python = true;
    }
    let scratch = target.join("bench");
    std::fs::create_dir_all(&scratch)?;
    let mut server = None;
    let url = match &args.redis_url {
        Some(url) => url.clone(),
        None => {
            let (child, url) = start_redis(&scratch)?;
            server = Some(child);
            url
        }
    };
    let mut memcached = None;
    if SCENARIOS.iter().any(|s| {
        matches!(
            s.kind,
            Kind::Keepwarm {
                memcached: true,
                ..
            }
        ) && args.wants(s.name)
    }) {
        match start_memcached() {
            Ok(started) => memcached = Some(started),
            Err(error) => eprintln!("note: {error:#}; the Memcached scenarios are skipped"),
        }
    }
    let env = Env {
        redis_pid: server.as_ref().map(Child::id),
        memcached: memcached
            .as_ref()
            .map(|(child, address)| (child.id(), address.clone())),
        url,
        nats_url: args
            .nats_url
            .clone()
            .or_else(|| std::env::var("NATS_URL").ok()),
        amqp_url: args
            .amqp_url
            .clone()
            .or_else(|| std::env::var("AMQP_URL").ok()),
        keepwarm,
        plugins,
        python,
        myself,
        scratch: scratch.clone(),
        pipeline: pipeline_table(&args),
        workload: Workload {
            seed: args.seed,
            rows: args.rows,
        },
        kafka: args
            .kafka_brokers
            .clone()
            .or_else(|| std::env::var("KAFKA_BROKERS").ok()),
        graceful_stop: args.graceful_stop,
    };
    if env.kafka.is_none() {
        eprintln!(
            "note: no Kafka broker (--kafka-brokers or KAFKA_BROKERS); the Kafka scenarios are skipped"
        );
    }
    let result = run_all(&env, &args).await;
    let pg = if result.is_ok() {
        postgres::run(&env, &args).await
    } else {
        Ok(None)
    };
    for mut server in server.into_iter().chain(memcached.map(|(child, _)| child)) {
        let _ = server.kill();
        let _ = server.wait();
    }
    let (throughput, latency) = result?;
    let pg = pg?;
    let plugin_calls = if args.wants("plugin-calls") {
        eprintln!("== plugin calls: the example plugins, in process");
        let (plugins, cache) = (env.plugins.clone(), scratch.join("plugin-cache"));
        let workload = Workload {
            seed: args.seed,
            rows: args.rows,
        };
        let changes = if args.quick { 300 } else { 20_000 };
        tokio::task::spawn_blocking(move || {
            plugin_cost::measure(&plugins, &cache, &workload, changes, 256)
        })
        .await??
    } else {
        Vec::new()
    };
    let decode = if args.wants("decode") {
        eprintln!("== decode: the workload's messages, in process");
        let workload = Workload {
            seed: args.seed,
            rows: args.rows,
        };
        let messages = if args.quick { 2_000 } else { 200_000 };
        tokio::task::spawn_blocking(move || decode_cost::measure(&workload, messages)).await??
    } else {
        Vec::new()
    };
    let plugin_loads = if args.wants("plugin-load") {
        let (keepwarm, plugins, scratch) = (
            env.keepwarm.clone(),
            env.plugins.clone(),
            env.scratch.clone(),
        );
        let (runs, quick) = (if args.quick { 1 } else { 3 }, args.quick);
        tokio::task::spawn_blocking(move || {
            plugin_load::measure(&keepwarm, &plugins, &scratch, runs, quick)
        })
        .await??
    } else {
        Vec::new()
    };
    print_table(&throughput, &latency);
    plugin_cost::print(&plugin_calls);
    decode_cost::print(&decode);
    postgres::print(pg.as_ref());
    plugin_load::print(&plugin_loads);
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| scratch.join("results.json"));
    let (ratios, ratios_by_round) = goals::json(&throughput, &latency);
    let json = serde_json::json!({
        "messages": args.messages,
        "rounds": args.rounds,
        "rows": args.rows,
        "seed": args.seed,
        "quick": args.quick,
        "commit": git_commit(),
        "throughput": throughput,
        "latency": latency,
        "plugin_calls": plugin_calls,
        "decode": decode,
        "postgres": pg,
        "plugin_load": plugin_loads,
        "ratios": ratios,
        "ratios_by_round": ratios_by_round,
    });
    std::fs::write(&out, serde_json::to_string_pretty(&json)?)?;
    println!("results: {}", out.display());
    Ok(())
}

async fn run_all(env: &Env, args: &RunArgs) -> anyhow::Result<(Vec<Throughput>, Vec<Latency>)> {
    let mut conn = connect(&env.url).await?;
    let (mut throughput, mut latency) = (Vec::new(), Vec::new());
    for round in 1..=args.rounds {
        if args.rounds > 1 {
            eprintln!("== round {round} of {}", args.rounds);
        }
        let results = throughput_round(env, args, &mut conn).await?;
        for (name, kind) in [
            ("keepwarm-plain", SCENARIOS[0].kind),
            ("native-rust", Kind::Native),
        ] {
            if !args.wants(&format!("latency:{name}")) {
                continue;
            }
            let Some(max) = results.iter().find(|t| t.name == name) else {
                continue;
            };
            let rate = args
                .latency_rate
                .unwrap_or((max.messages_per_second / 2.0).max(100.0));
            eprintln!(
                "== latency {name}: {rate:.0} msg/s for {} s",
                args.latency_seconds
            );
            flush(&mut conn).await?;
            let paced = paced(env, &mut conn, name, kind, rate, args.latency_seconds).await?;
            latency.push(Latency { round, ..paced });
        }
        throughput.extend(results.into_iter().map(|t| Throughput { round, ..t }));
    }
    Ok((throughput, latency))
}

/// Every wanted throughput scenario, once.
async fn throughput_round(
    env: &Env,
    args: &RunArgs,
    conn: &mut MultiplexedConnection,
) -> anyhow::Result<Vec<Throughput>> {
    let mut throughput = Vec::new();
    for scenario in &SCENARIOS {
        if !args.wants(scenario.name) || (scenario.kind == Kind::Python && args.no_python) {
            continue;
        }
        if scenario.kind.is_kafka() {
            let Some(brokers) = &env.kafka else { continue };
            let result = measure_kafka(env, conn, scenario, brokers, args.messages).await?;
            eprintln!(
                "   {:.0} msg/s, {:.2} CPU s/M, {:.1} MiB",
                result.messages_per_second, result.cpu_seconds_per_million, result.peak_rss_mib
            );
            throughput.push(result);
            continue;
        }
        let on_memcached = matches!(
            scenario.kind,
            Kind::Keepwarm {
                memcached: true,
                ..
            }
        );
        if on_memcached {
            let Some((_, address)) = &env.memcached else {
                continue;
            };
            memcached_command(address, "flush_all")?;
        }
        eprintln!(
            "== {}: preloading {} messages",
            scenario.name, args.messages
        );
        flush(conn).await?;
        preload(conn, &env.workload, args.messages).await?;
        eprintln!("== {}: consuming", scenario.name);
        let result = measure(env, conn, scenario, args.messages).await?;
        eprintln!(
            "   {:.0} msg/s, {:.2} CPU s/M, {:.1} MiB",
            result.messages_per_second, result.cpu_seconds_per_million, result.peak_rss_mib
        );
        throughput.push(result);
    }
    for (name, broker, url) in [
        ("keepwarm-nats", brokers::Broker::Nats, &env.nats_url),
        (
            "keepwarm-rabbitmq",
            brokers::Broker::RabbitMq,
            &env.amqp_url,
        ),
    ] {
        if !args.wants(name) {
            continue;
        }
        let Some(url) = url else {
            eprintln!(
                "note: no broker URL for {name} (--nats-url/--amqp-url, NATS_URL/AMQP_URL); skipped"
            );
            continue;
        };
        eprintln!("== {name}: preloading {} messages", args.messages);
        flush(conn).await?;
        brokers::preload(broker, url, &env.workload, args.messages).await?;
        eprintln!("== {name}: consuming");
        let result = measure_broker(env, conn, name, broker, url, args.messages).await;
        brokers::clean_up(broker, url).await;
        let result = result?;
        eprintln!(
            "   {:.0} msg/s, {:.2} CPU s/M, {:.1} MiB",
            result.messages_per_second, result.cpu_seconds_per_million, result.peak_rss_mib
        );
        throughput.push(result);
    }
    Ok(throughput)
}

impl RunArgs {
    /// Whether `--only` selects the scenario `name` (every scenario without it).
    fn wants(&self, name: &str) -> bool {
        self.only
            .as_deref()
            .is_none_or(|o| o.split(',').any(|n| n == name))
    }
}

/// The `[pipeline]` table for keepwarm's configuration, empty for the defaults.
fn pipeline_table(args: &RunArgs) -> String {
    let mut table = String::new();
    if let Some(lanes) = args.lanes {
        table.push_str(&format!("lanes = {lanes}\n"));
    }
    if let Some(batch) = args.batch_size {
        table.push_str(&format!("batch_size = {batch}\n"));
    }
    if let Some(max) = args.max_in_flight {
        table.push_str(&format!("max_in_flight = {max}\n"));
    }
    if table.is_empty() {
        table
    } else {
        format!("[pipeline]\n{table}\n")
    }
}

/// A private memcached on a free loopback port: the process and its `host:port`.
fn start_memcached() -> anyhow::Result<(Child, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = Command::new("memcached")
        .args(["-u", "nobody", "-l", "127.0.0.1", "-U", "0", "-m", "256"])
        .args(["-p", &port.to_string()])
        .stdout(Stdio::null())
        .spawn()
        .context("cannot start memcached (scripts/setup.sh installs it)")?;
    let address = format!("127.0.0.1:{port}");
    for _ in 0..100 {
        if memcached_command(&address, "mn").is_ok() {
            return Ok((child, address));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("memcached did not start on port {port}")
}

/// Sends one command to memcached and returns its reply, up to `END`, `OK` or `MN`.
fn memcached_command(address: &str, command: &str) -> anyhow::Result<String> {
    use std::io::{BufRead as _, Write as _};
    let mut stream = std::net::TcpStream::connect(address)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(format!("{command}\r\n").as_bytes())?;
    let mut reader = std::io::BufReader::new(stream);
    let mut reply = String::new();
    loop {
        let mut line = String::new();
        anyhow::ensure!(reader.read_line(&mut line)? > 0, "memcached closed");
        reply.push_str(&line);
        if matches!(line.trim_end(), "END" | "OK" | "MN") || line.starts_with("ERROR") {
            return Ok(reply);
        }
    }
}

/// The number of items memcached holds (`stats` `curr_items`).
fn memcached_items(address: &str) -> anyhow::Result<u64> {
    let stats = memcached_command(address, "stats")?;
    stats
        .lines()
        .find_map(|line| line.strip_prefix("STAT curr_items ")?.trim().parse().ok())
        .context("no curr_items in memcached's stats")
}

fn start_redis(scratch: &Path) -> anyhow::Result<(Child, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let dir = scratch.join("redis");
    std::fs::create_dir_all(&dir)?;
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(&dir)
        .stdout(Stdio::null())
        .spawn()
        .context("cannot start redis-server")?;
    let url = format!("redis://127.0.0.1:{port}/0");
    let client = redis::Client::open(url.as_str())?;
    for _ in 0..100 {
        if let Ok(mut c) = client.get_connection()
            && redis::cmd("PING").query::<String>(&mut c).is_ok()
        {
            return Ok((child, url));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("redis-server did not start on port {port}")
}

async fn connect(url: &str) -> anyhow::Result<MultiplexedConnection> {
    let client = redis::Client::open(url)?;
    let config =
        redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(120)));
    Ok(client
        .get_multiplexed_async_connection_with_config(&config)
        .await?)
}

async fn flush(conn: &mut MultiplexedConnection) -> anyhow::Result<()> {
    let () = redis::cmd("FLUSHALL").query_async(conn).await?;
    Ok(())
}

fn xadd(w: &Workload, i: u64) -> (u64, redis::Cmd) {
    let entry = w.entry(i);
    let mut cmd = redis::cmd("XADD");
    cmd.arg(STREAM).arg("*");
    for (k, v) in &entry.fields {
        cmd.arg(*k).arg(v.as_str());
    }
    (entry.id, cmd)
}

async fn preload(conn: &mut MultiplexedConnection, w: &Workload, n: u64) -> anyhow::Result<()> {
    let mut i = 0;
    while i < n {
        let mut pipe = redis::pipe();
        let end = (i + 1000).min(n);
        for j in i..end {
            pipe.add_command(xadd(w, j).1).ignore();
        }
        let () = pipe.query_async(conn).await?;
        i = end;
    }
    let () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(STREAM)
        .arg(GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(conn)
        .await?;
    Ok(())
}

/// Pending entries and whether the group has read the stream's last entry.
async fn progress(conn: &mut MultiplexedConnection) -> anyhow::Result<(u64, String, String)> {
    let groups: Vec<HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(STREAM)
        .query_async(conn)
        .await?;
    let info: HashMap<String, redis::Value> = redis::cmd("XINFO")
        .arg("STREAM")
        .arg(STREAM)
        .query_async(conn)
        .await?;
    let group = groups
        .into_iter()
        .find(|g| text(g.get("name")) == GROUP)
        .context("consumer group missing")?;
    let pending = match group.get("pending") {
        Some(redis::Value::Int(n)) => u64::try_from(*n).unwrap_or(0),
        _ => 0,
    };
    Ok((
        pending,
        text(group.get("last-delivered-id")),
        text(info.get("last-generated-id")),
    ))
}

fn text(value: Option<&redis::Value>) -> String {
    match value {
        Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
        Some(redis::Value::SimpleString(s)) => s.clone(),
        _ => String::new(),
    }
}

/// A consumer process, configured for one scenario; `topic` is the Kafka scenarios' topic.
fn spawn(env: &Env, name: &str, kind: Kind, topic: &str) -> anyhow::Result<Child> {
    let mut cmd = match kind {
        Kind::Keepwarm {
            plain,
            threads,
            memcached,
        } => {
            let source = format!(
                "[[source]]\nkind = \"redis-stream\"\nstream = \"{STREAM}\"\ngroup = \"{GROUP}\"\nconsumer = \"keepwarm\"\n"
            );
            let cache = match (&env.memcached, memcached) {
                (Some((_, address)), true) => format!("[memcached]\nservers = [\"{address}\"]\n\n"),
                _ => String::new(),
            };
            keepwarm_command(env, name, plain, threads, &format!("{cache}{source}"))?
        }
        Kind::KeepwarmKafka => {
            let source = format!(
                "[[source]]\nkind = \"kafka\"\nbrokers = \"{brokers}\"\ntopics = [\"{topic}\"]\ngroup_id = \"{topic}\"\n\
                 session_timeout_ms = 6000\ncommit_interval_ms = 100\n",
                brokers = env.kafka.as_deref().unwrap_or_default(),
            );
            keepwarm_command(env, name, true, 2, &source)?
        }
        Kind::Native => {
            let mut cmd = Command::new(&env.myself);
            cmd.args(["native-worker", &env.url, STREAM, GROUP]);
            cmd
        }
        Kind::NativeKafka => {
            let mut cmd = Command::new(&env.myself);
            cmd.arg("native-kafka-worker")
                .arg(env.kafka.as_deref().unwrap_or_default())
                .args([topic, topic, &env.url]);
            cmd
        }
        Kind::Python => {
            let mut cmd = Command::new(&env.python);
            cmd.arg(python_worker()).args([&env.url, STREAM, GROUP]);
            cmd
        }
    };
    cmd.stdout(Stdio::null());
    Ok(cmd.spawn()?)
}

/// Writes keepwarm's configuration for scenario `name`: row-cache (`plain` or versioned
/// writes) and `source`; returns its path and the admin endpoint's address.
fn keepwarm_config(
    env: &Env,
    name: &str,
    plain: bool,
    source: &str,
) -> anyhow::Result<(PathBuf, std::net::SocketAddr)> {
    let plugins = env.scratch.join(format!("plugins-{name}"));
    std::fs::create_dir_all(&plugins)?;
    std::fs::copy(
        env.plugins.join("row-cache.wasm"),
        plugins.join("row-cache.wasm"),
    )?;
    let consistency = if plain { "plain" } else { "versioned" };
    std::fs::write(
        plugins.join("row-cache.toml"),
        format!(
            "consistency = \"{consistency}\"\n\n[config]\nkey = \"{{schema}}.{{table}}:{{pks}}\"\n"
        ),
    )?;
    let admin = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let config = env.scratch.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "[redis]\nurl = \"{url}\"\n\n[plugins]\ndir = \"{dir}\"\n\n[admin]\nlisten = \"{admin}\"\n\n{pipeline}{source}",
            url = env.url,
            dir = plugins.display(),
            pipeline = env.pipeline,
        ),
    )?;
    Ok((config, admin))
}

/// keepwarm with row-cache (plain or versioned writes) and `source`, on `threads` threads.
fn keepwarm_command(
    env: &Env,
    name: &str,
    plain: bool,
    threads: usize,
    source: &str,
) -> anyhow::Result<Command> {
    let (config, _) = keepwarm_config(env, name, plain, source)?;
    let mut cmd = Command::new(&env.keepwarm);
    cmd.arg("run").arg("--config").arg(&config);
    cmd.env("TOKIO_WORKER_THREADS", threads.to_string());
    cmd.env("RUST_LOG", "warn");
    Ok(cmd)
}

/// keepwarm (versioned writes, two threads) reading `broker` until it has applied `n`
/// messages; timed from the first message received.
async fn measure_broker(
    env: &Env,
    conn: &mut MultiplexedConnection,
    name: &str,
    broker: brokers::Broker,
    url: &str,
    n: u64,
) -> anyhow::Result<Throughput> {
    let (config, admin) = keepwarm_config(env, name, false, &brokers::source_table(broker, url))?;
    let child = Command::new(&env.keepwarm)
        .arg("run")
        .arg("--config")
        .arg(&config)
        .env("TOKIO_WORKER_THREADS", "2")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()?;
    let pid = child.id();
    #[allow(
        clippy::cast_precision_loss,
        reason = "message counts are far below 2^52"
    )]
    let total = n as f64;
    let result = async {
        let deadline = Instant::now() + Duration::from_secs(900);
        let mut first: Option<Mark> = None;
        loop {
            anyhow::ensure!(Instant::now() < deadline, "{name} did not finish");
            let (received, applied) = brokers::progress(admin).await;
            let now = Instant::now();
            if first.is_none() && received > 0.0 {
                first = Some(Mark::new(now, pid, env.redis_pid)?);
            }
            if let Some(mark) = &first
                && applied >= total
            {
                return mark.throughput(name, n, now, conn, None).await;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    .await;
    stop(env, child);
    result
}

/// The start of a timed consumption: when, and the CPU the consumer and the cache server had
/// used by then.
struct Mark {
    pid: u32,
    cache_pid: Option<u32>,
    at: Instant,
    consumer: Sample,
    cache: Option<Sample>,
}

impl Mark {
    fn new(at: Instant, pid: u32, cache_pid: Option<u32>) -> anyhow::Result<Mark> {
        Ok(Mark {
            pid,
            cache_pid,
            at,
            consumer: Sample::of(pid)?,
            cache: cache_pid.map(Sample::of).transpose()?,
        })
    }

    /// The throughput of `n` messages handled from this mark to `now` by the consumer;
    /// the cache's keys are counted in the Memcached at `memcached`, else in Redis.
    async fn throughput(
        &self,
        name: &str,
        n: u64,
        now: Instant,
        conn: &mut MultiplexedConnection,
        memcached: Option<&str>,
    ) -> anyhow::Result<Throughput> {
        let consumer = Sample::of(self.pid)?;
        let cache = self.cache_pid.map(Sample::of).transpose()?;
        let seconds = now.duration_since(self.at).as_secs_f64();
        #[allow(
            clippy::cast_precision_loss,
            reason = "message counts are far below 2^52"
        )]
        let n_f64 = n as f64;
        let millions = n_f64 / 1e6;
        let dead_letters: u64 = redis::cmd("XLEN")
            .arg("keepwarm:dead-letters")
            .query_async(conn)
            .await?;
        let keys: u64 = match memcached {
            Some(address) => memcached_items(address)?,
            None => redis::cmd("DBSIZE").query_async(conn).await?,
        };
        Ok(Throughput {
            name: name.to_owned(),
            round: 1,
            messages: n,
            seconds,
            messages_per_second: n_f64 / seconds,
            cpu_seconds_per_million: (consumer.cpu_seconds - self.consumer.cpu_seconds) / millions,
            system_cpu_percent: 100.0 * (consumer.system_seconds - self.consumer.system_seconds)
                / (consumer.cpu_seconds - self.consumer.cpu_seconds).max(f64::MIN_POSITIVE),
            redis_cpu_seconds_per_million: self
                .cache
                .as_ref()
                .zip(cache)
                .map(|(a, b)| (b.cpu_seconds - a.cpu_seconds) / millions),
            peak_rss_mib: consumer.peak_rss_mib,
            dead_letters,
            keys,
        })
    }
}

/// How long `--graceful-stop` waits for a consumer to exit: long enough for one under callgrind
/// to finish its shutdown and write its counts.
const GRACE: Duration = Duration::from_secs(600);

fn python_worker() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/baselines/python_worker.py"
    ))
}

/// Stops a consumer: SIGKILL, or with `--graceful-stop` SIGTERM and up to [`GRACE`] for it to
/// exit (then SIGKILL).
fn stop(env: &Env, mut child: Child) {
    if env.graceful_stop {
        let terminated = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        if terminated.is_ok_and(|status| status.success()) {
            let deadline = Instant::now() + GRACE;
            while Instant::now() < deadline {
                if !matches!(child.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            eprintln!("note: a consumer did not exit within {GRACE:?} of SIGTERM; killed");
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

async fn measure(
    env: &Env,
    conn: &mut MultiplexedConnection,
    scenario: &Scenario,
    n: u64,
) -> anyhow::Result<Throughput> {
    let child = spawn(env, scenario.name, scenario.kind, "")?;
    let pid = child.id();
    // The cache's server: its CPU is the "cache CPU" column.
    let memcached = match scenario.kind {
        Kind::Keepwarm {
            memcached: true, ..
        } => env.memcached.clone(),
        _ => None,
    };
    let cache_pid = match &memcached {
        Some((pid, _)) => Some(*pid),
        None => env.redis_pid,
    };
    let result = async {
        let deadline = Instant::now() + Duration::from_secs(900);
        let mut first: Option<Mark> = None;
        loop {
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} did not finish",
                scenario.name
            );
            let (pending, delivered, last) = progress(conn).await?;
            let now = Instant::now();
            if first.is_none() && (pending > 0 || delivered != "0-0") {
                first = Some(Mark::new(now, pid, cache_pid)?);
            }
            if let Some(mark) = &first
                && pending == 0
                && delivered == last
            {
                return mark
                    .throughput(
                        scenario.name,
                        n,
                        now,
                        conn,
                        memcached.as_ref().map(|(_, address)| address.as_str()),
                    )
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    .await;
    stop(env, child);
    result
}

/// A Kafka scenario: the workload written to a topic of its own, then consumed until the
/// group has committed every message.
async fn measure_kafka(
    env: &Env,
    conn: &mut MultiplexedConnection,
    scenario: &Scenario,
    brokers: &str,
    n: u64,
) -> anyhow::Result<Throughput> {
    let topic = format!(
        "bench-{}-{}-{}",
        scenario.name,
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis()
    );
    eprintln!("== {}: preloading {n} messages into {topic}", scenario.name);
    flush(conn).await?;
    kafka::preload(brokers, &topic, &env.workload, n).await?;
    let progress = kafka::Progress::new(brokers, &topic, &topic)?;
    eprintln!("== {}: consuming", scenario.name);
    let child = spawn(env, scenario.name, scenario.kind, &topic)?;
    let pid = child.id();
    let total = i64::try_from(n)?;
    let result = async {
        let deadline = Instant::now() + Duration::from_secs(900);
        let mut first: Option<Mark> = None;
        loop {
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} did not finish",
                scenario.name
            );
            let committed = progress.committed()?;
            let now = Instant::now();
            // Started at the first write (or commit): the group's join is not the consumer's work.
            let started = committed > 0 || {
                let keys: u64 = redis::cmd("DBSIZE").query_async(conn).await?;
                keys > 0
            };
            if first.is_none() && started {
                first = Some(Mark::new(now, pid, env.redis_pid)?);
            }
            if let Some(mark) = &first
                && committed >= total
            {
                return mark.throughput(scenario.name, n, now, conn, None).await;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    .await;
    stop(env, child);
    progress.forget();
    result
}

/// The paced run measures the keys whose row id ends in this digit.
const SAMPLED_DIGIT: u64 = 7;

/// Paced load at `rate` messages per second; latency from XADD to the key's keyspace event,
/// sampled on one key in ten.
async fn paced(
    env: &Env,
    conn: &mut MultiplexedConnection,
    name: &str,
    kind: Kind,
    rate: f64,
    seconds: u64,
) -> anyhow::Result<Latency> {
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("notify-keyspace-events")
        .arg("K$g")
        .query_async(conn)
        .await?;
    let () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(STREAM)
        .arg(GROUP)
        .arg("$")
        .arg("MKSTREAM")
        .query_async(conn)
        .await?;
    let sent_at: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let samples: Arc<Mutex<Vec<f64>>> = Arc::default();
    let stop_flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let listener = {
        let (sent_at, samples, stop_flag) = (
            Arc::clone(&sent_at),
            Arc::clone(&samples),
            Arc::clone(&stop_flag),
        );
        let client = redis::Client::open(env.url.as_str())?;
        let mut sub_conn = client.get_connection()?;
        let prefix = format!(
            "__keyspace@0__:{}.{}:",
            workload::TABLE.0,
            workload::TABLE.1
        );
        std::thread::spawn(move || -> anyhow::Result<()> {
            let mut pubsub = sub_conn.as_pubsub();
            // One key in ten: the listener and Redis's pub/sub then cost the 2-core machine
            // little, so the figure is the consumer's latency more than the benchmark's.
            pubsub.psubscribe(format!("{prefix}*{SAMPLED_DIGIT}"))?;
            pubsub.set_read_timeout(Some(Duration::from_millis(200)))?;
            while !stop_flag.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok(msg) = pubsub.get_message() else {
                    continue;
                };
                let now = Instant::now();
                let channel = msg.get_channel_name();
                let Some(id) = channel
                    .strip_prefix(&prefix)
                    .and_then(|s| s.parse::<u64>().ok())
                else {
                    continue;
                };
                if let Some(at) = sent_at
                    .lock()
                    .map_err(|_| anyhow::anyhow!("poisoned"))?
                    .remove(&id)
                {
                    samples
                        .lock()
                        .map_err(|_| anyhow::anyhow!("poisoned"))?
                        .push(now.duration_since(at).as_secs_f64() * 1e3);
                }
            }
            Ok(())
        })
    };
    let child = spawn(env, &format!("{name}-latency"), kind, "")?;
    let result = async {
        // Let the consumer start and block on the empty stream.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let mut pacer = pace::Pacer::new(rate, seconds);
        let mut sent: u64 = 0;
        // Paced messages continue the throughput workload's numbering.
        let base = 10_000_000_u64;
        while let Some(due) = pacer.due().await {
            if due <= sent {
                continue;
            }
            let mut pipe = redis::pipe();
            let now = Instant::now();
            {
                let mut map = sent_at.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
                for i in sent..due {
                    let (id, cmd) = xadd(&env.workload, base + i);
                    if id % 10 == SAMPLED_DIGIT {
                        map.insert(id, now);
                    }
                    pipe.add_command(cmd).ignore();
                }
            }
            let () = pipe.query_async(conn).await?;
            sent = due;
        }
        // Wait for the consumer to catch up.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (pending, delivered, last) = progress(conn).await?;
            if pending == 0 && delivered == last {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "{name} did not catch up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        anyhow::Ok(sent)
    }
    .await;
    stop(env, child);
    stop_flag.store(true, std::sync::atomic::Ordering::Relaxed);
    listener
        .join()
        .map_err(|_| anyhow::anyhow!("listener panicked"))??;
    let sent = result?;
    let mut samples =
        std::mem::take(&mut *samples.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    samples.sort_by(f64::total_cmp);
    let pct = |p: f64| pace::percentile(&samples, p);
    Ok(Latency {
        name: name.to_owned(),
        round: 1,
        rate_per_second: rate,
        sent,
        observed: samples.len() as u64,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        p999_ms: pct(0.999),
        max_ms: samples.last().copied().unwrap_or(f64::NAN),
    })
}

fn print_table(t: &[Throughput], l: &[Latency]) {
    if !t.is_empty() {
        println!();
        println!(
            "| scenario | round | messages | seconds | msg/s | CPU s / M msgs | of which system | cache CPU s / M msgs | peak RSS MiB | dead letters |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    }
    for r in t {
        println!(
            "| {} | {} | {} | {:.2} | {:.0} | {:.2} | {:.0}% | {} | {:.1} | {} |",
            r.name,
            r.round,
            r.messages,
            r.seconds,
            r.messages_per_second,
            r.cpu_seconds_per_million,
            r.system_cpu_percent,
            r.redis_cpu_seconds_per_million
                .map_or("-".to_owned(), |v| format!("{v:.2}")),
            r.peak_rss_mib,
            r.dead_letters
        );
    }
    if !l.is_empty() {
        println!();
        println!(
            "| paced latency (XADD to applied) | round | rate msg/s | sent | sampled | p50 ms | p99 ms | p99.9 ms | max ms |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for x in l {
            println!(
                "| {} | {} | {:.0} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} |",
                x.name,
                x.round,
                x.rate_per_second,
                x.sent,
                x.observed,
                x.p50_ms,
                x.p99_ms,
                x.p999_ms,
                x.max_ms
            );
        }
    }
    println!();
    goals::print(t, l);
}

fn git_commit() -> Option<String> {
    let out = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}
