//! Broker scenarios: the workload published as Sequin's NATS sink publishes it (core NATS into
//! a JetStream stream, `Nats-Msg-Id`) or as its RabbitMQ sink does (`message_id`, JSON body),
//! then consumed by keepwarm's `nats` or `rabbitmq` source, beside the Redis Stream runs.
//! The brokers are the machine's own (`--nats-url`, `--amqp-url`, or `NATS_URL` / `AMQP_URL`);
//! a scenario whose broker is not given is skipped.

use crate::workload::Workload;
use anyhow::Context as _;
use futures_util::StreamExt as _;
use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// A broker a scenario reads from.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Broker {
    Nats,
    RabbitMq,
}

/// The JetStream stream of the benchmark (deleted and created again before each run).
const NATS_STREAM: &str = "KEEPWARM_BENCH";
/// The RabbitMQ queue of the benchmark (deleted and declared again before each run).
const AMQP_QUEUE: &str = "keepwarm-bench";

/// The `[[source]]` table of keepwarm for `broker` at `url`.
pub(crate) fn source_table(broker: Broker, url: &str) -> String {
    match broker {
        Broker::Nats => format!(
            "[[source]]\nkind = \"nats\"\nurl = \"{url}\"\nstream = \"{NATS_STREAM}\"\nconsumer = \"keepwarm\"\n"
        ),
        Broker::RabbitMq => {
            format!("[[source]]\nkind = \"rabbitmq\"\nurl = \"{url}\"\nqueue = \"{AMQP_QUEUE}\"\n")
        }
    }
}

/// Publishes `n` messages of `workload` to `broker`, from an empty stream or queue, and waits
/// until the broker holds them all.
pub(crate) async fn preload(
    broker: Broker,
    url: &str,
    workload: &Workload,
    n: u64,
) -> anyhow::Result<()> {
    match broker {
        Broker::Nats => preload_nats(url, workload, n).await,
        Broker::RabbitMq => preload_rabbitmq(url, workload, n).await,
    }
}

async fn preload_nats(url: &str, workload: &Workload, n: u64) -> anyhow::Result<()> {
    use async_nats::jetstream::{self, stream};
    let client = async_nats::connect(url)
        .await
        .with_context(|| format!("cannot connect to nats at {url}"))?;
    let js = jetstream::new(client.clone());
    let _ = js.delete_stream(NATS_STREAM).await;
    js.create_stream(stream::Config {
        name: NATS_STREAM.to_owned(),
        subjects: vec!["sequin.bench.>".to_owned()],
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await?;
    for i in 0..n {
        let entry = workload.entry(i);
        let subject = format!("sequin.bench.public.orders.{}", entry.fields[2].1);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("bench-{i}").as_str());
        client
            .publish_with_headers(subject, headers, entry.to_json().into())
            .await?;
    }
    client.flush().await?;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let mut stream = js.get_stream(NATS_STREAM).await?;
        let stored = stream.info().await?.state.messages;
        if stored >= n {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the stream holds {stored} of {n} messages"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn preload_rabbitmq(url: &str, workload: &Workload, n: u64) -> anyhow::Result<()> {
    use lapin::options::{
        BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
    };
    use lapin::types::FieldTable;
    let connection = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .with_context(|| format!("cannot connect to rabbitmq at {url}"))?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    channel
        .queue_delete(AMQP_QUEUE.into(), QueueDeleteOptions::default())
        .await?;
    let options = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(AMQP_QUEUE.into(), options, FieldTable::default())
        .await?;
    let mut i = 0;
    while i < n {
        let end = (i + 1000).min(n);
        let mut confirms = Vec::new();
        for j in i..end {
            let entry = workload.entry(j);
            let properties = lapin::BasicProperties::default()
                .with_message_id(format!("bench-{j}").into())
                .with_content_type("application/json".into());
            confirms.push(
                channel
                    .basic_publish(
                        "".into(),
                        AMQP_QUEUE.into(),
                        BasicPublishOptions::default(),
                        entry.to_json().as_bytes(),
                        properties,
                    )
                    .await?,
            );
        }
        futures_util::stream::iter(confirms)
            .then(|confirm| confirm)
            .for_each(|_| async {})
            .await;
        i = end;
    }
    connection.close(200, "preloaded".into()).await?;
    Ok(())
}

/// Deletes the stream or queue.
pub(crate) async fn clean_up(broker: Broker, url: &str) {
    match broker {
        Broker::Nats => {
            if let Ok(client) = async_nats::connect(url).await {
                let _ = async_nats::jetstream::new(client)
                    .delete_stream(NATS_STREAM)
                    .await;
            }
        }
        Broker::RabbitMq => {
            if let Ok(connection) =
                lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await
                && let Ok(channel) = connection.create_channel().await
            {
                let _ = channel
                    .queue_delete(AMQP_QUEUE.into(), Default::default())
                    .await;
            }
        }
    }
}

/// `(received, applied)` messages of keepwarm's admin endpoint at `admin`, summed over
/// sources and plugins; zero while it does not answer.
pub(crate) async fn progress(admin: SocketAddr) -> (f64, f64) {
    tokio::task::spawn_blocking(move || {
        let read = || -> std::io::Result<String> {
            let mut stream =
                std::net::TcpStream::connect_timeout(&admin, Duration::from_millis(500))?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
            let mut text = String::new();
            stream.read_to_string(&mut text)?;
            Ok(text)
        };
        let text = read().unwrap_or_default();
        let sum = |name: &str| -> f64 {
            text.lines()
                .filter(|line| line.starts_with(name))
                .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
                .sum()
        };
        (
            sum("keepwarm_messages_received_total{"),
            sum("keepwarm_messages_applied_total{"),
        )
    })
    .await
    .unwrap_or((0.0, 0.0))
}
