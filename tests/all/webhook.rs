//! The HTTP push source over a real socket with a real client: both of Sequin's body shapes,
//! the bearer token, the body limit, malformed messages, a slow and a lost Redis, and retries.

use crate::dead_letters::{entries, field};
use crate::stream_source::{get, record_text};
use crate::util::*;
use keepwarm::config::Config;
use reqwest::StatusCode;
use std::time::{Duration, Instant};

/// A daemon with one HTTP source on a free port, and how to reach it.
pub struct Endpoint {
    pub daemon: Daemon,
    pub url: String,
    pub token: String,
    pub http: reqwest::Client,
}

impl Endpoint {
    /// Starts the daemon and waits until the port accepts connections.
    pub async fn start(
        plugins: &std::path::Path,
        cache_url: &str,
        dead: &str,
        source_extra: &str,
        extra: &str,
    ) -> Endpoint {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let token = unique("t0ken");
        let config = Config::parse(&format!(
            r#"
[redis]
url = "{cache_url}"
[plugins]
dir = "{dir}"
[dead_letter]
stream = "{dead}"
{extra}
[[source]]
kind = "http"
listen = "127.0.0.1:{port}"
path = "/sequin"
token = "{token}"
{source_extra}
"#,
            dir = plugins.display(),
        ))
        .unwrap();
        let daemon = Daemon::start(config);
        wait_for(
            "the http source to listen",
            Duration::from_secs(30),
            || async {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
            },
        )
        .await;
        Endpoint {
            daemon,
            url: format!("http://127.0.0.1:{port}/sequin"),
            token,
            http: reqwest::Client::new(),
        }
    }

    /// POSTs `body` with the right token; returns the status and the reply body.
    pub async fn post(&self, body: String) -> (StatusCode, String) {
        let response = self
            .http
            .post(&self.url)
            .bearer_auth(&self.token)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        (response.status(), response.text().await.unwrap())
    }
}

/// `{"data": [lines…]}`, Sequin's batched body.
pub fn batch(lines: &[String]) -> String {
    format!(r#"{{"data":[{}]}}"#, lines.join(","))
}

/// An order message for `row` at `version`.
fn order_line(row: u64, version: u64) -> String {
    fixtures()[2]
        .replace(r#""id":1001"#, &format!(r#""id":{row}"#))
        .replace(
            r#""record_pks":["1001"]"#,
            &format!(r#""record_pks":["{row}"]"#),
        )
        .replace(
            r#""status":"shipped""#,
            &format!(r#""status":"v{version}""#),
        )
        .replace(
            r#""commit_lsn":1243362320"#,
            &format!(r#""commit_lsn":{}"#, 1_000_000 + version * 1000 + row),
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_body_shapes_are_applied_before_the_reply() {
    let url = redis_url();
    let prefix = unique("http-shapes");
    let plugins = row_cache_dir(&prefix, "");
    let dead = format!("{prefix}:dead");
    let endpoint = Endpoint::start(plugins.path(), &url, &dead, "", "").await;
    let mut conn = connect(&url).await;
    let f = fixtures();

    // A bare message (the sink's batch = false): applied by the time the reply arrives.
    let (status, reply) = endpoint.post(f[0].to_owned()).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert_eq!(
        get(&mut conn, &format!("{prefix}:public.orders:1001")).await,
        Some(record_text(f[0]))
    );
    // A batch of every fixture (batch = true, the default).
    let lines: Vec<String> = f.iter().map(|l| l.to_string()).collect();
    let (status, reply) = endpoint.post(batch(&lines)).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    let reply: serde_json::Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(reply["received"], 12);
    assert_eq!(reply["undecodable"], 0);
    let key = |rest: &str| format!("{prefix}:{rest}");
    assert_eq!(
        get(&mut conn, &key("public.orders:1001")).await,
        Some(record_text(f[2]))
    );
    assert_eq!(get(&mut conn, &key("public.orders:998")).await, None);
    assert_eq!(
        get(
            &mut conn,
            &key("analytics.page_views:2025-03-13:9007199254740993")
        )
        .await,
        Some(record_text(f[11]))
    );
    endpoint.daemon.stop().await;
    assert!(entries(&mut conn, &dead).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_the_right_token_get_401_and_change_nothing() {
    let url = redis_url();
    let prefix = unique("http-auth");
    let plugins = row_cache_dir(&prefix, "");
    let dead = format!("{prefix}:dead");
    let endpoint = Endpoint::start(plugins.path(), &url, &dead, "", "").await;
    let body = fixtures()[0].to_owned();
    let attempts = [
        None,
        Some(format!("Bearer {}x", endpoint.token)),
        Some("Bearer wrong".to_owned()),
        Some(format!("Basic {}", endpoint.token)),
        Some(endpoint.token.clone()),
    ];
    for authorization in attempts {
        let mut request = endpoint.http.post(&endpoint.url).body(body.clone());
        if let Some(value) = &authorization {
            request = request.header("authorization", value);
        }
        let response = request.send().await.unwrap();
        assert_eq!(
            response.status(),
            StatusCode::UNAUTHORIZED,
            "{authorization:?}"
        );
        assert_eq!(response.headers()["www-authenticate"], "Bearer");
    }
    // Only POST on the configured path.
    let response = endpoint
        .http
        .get(&endpoint.url)
        .bearer_auth(&endpoint.token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    let response = endpoint
        .http
        .post(endpoint.url.replace("/sequin", "/other"))
        .bearer_auth(&endpoint.token)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    endpoint.daemon.stop().await;
    let mut conn = connect(&url).await;
    assert_eq!(
        get(&mut conn, &format!("{prefix}:public.orders:1001")).await,
        None
    );
    assert!(entries(&mut conn, &dead).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_limit_gets_413_and_changes_nothing() {
    let url = redis_url();
    let prefix = unique("http-limit");
    let plugins = row_cache_dir(&prefix, "");
    let dead = format!("{prefix}:dead");
    let endpoint = Endpoint::start(plugins.path(), &url, &dead, "max_body_bytes = 4096", "").await;
    let lines: Vec<String> = (0..20).map(|row| order_line(row, 0)).collect();
    let body = batch(&lines);
    assert!(body.len() > 4096);
    let (status, _) = endpoint.post(body).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    // Within the limit it goes through.
    let (status, reply) = endpoint.post(batch(&lines[..2])).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    endpoint.daemon.stop().await;
    let mut conn = connect(&url).await;
    assert!(
        get(&mut conn, &format!("{prefix}:public.orders:1"))
            .await
            .is_some()
    );
    assert_eq!(
        get(&mut conn, &format!("{prefix}:public.orders:5")).await,
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_message_is_dead_lettered_without_failing_its_batch() {
    let url = redis_url();
    let prefix = unique("http-malformed");
    let plugins = row_cache_dir(&prefix, "");
    let dead = format!("{prefix}:dead");
    let endpoint = Endpoint::start(plugins.path(), &url, &dead, "", "").await;
    let bad = [
        r#""a bare string from a Sequin transform""#.to_owned(),
        r#"{"id":7,"name":"not a change message"}"#.to_owned(),
    ];
    let body = batch(&[
        order_line(1, 0),
        bad[0].clone(),
        order_line(2, 0),
        bad[1].clone(),
    ]);
    let (status, reply) = endpoint.post(body).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    let reply: serde_json::Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(
        (reply["received"].clone(), reply["undecodable"].clone()),
        (4.into(), 2.into())
    );
    // A body that is not JSON at all is one malformed message.
    let (status, _) = endpoint.post("{not json".to_owned()).await;
    assert_eq!(status, StatusCode::OK);
    endpoint.daemon.stop().await;

    let mut conn = connect(&url).await;
    for row in [1, 2] {
        assert_eq!(
            get(&mut conn, &format!("{prefix}:public.orders:{row}")).await,
            Some(record_text(&order_line(row, 0)))
        );
    }
    let letters = entries(&mut conn, &dead).await;
    assert_eq!(letters.len(), 3);
    for (payload, reason) in [
        (bad[0].as_str(), "a JSON string, not a change message"),
        (bad[1].as_str(), "missing field `action`"),
        ("{not json", "invalid JSON"),
    ] {
        let letter = letters
            .iter()
            .find(|l| field(l, "payload") == payload)
            .unwrap_or_else(|| panic!("no dead letter for {payload}"));
        assert!(field(letter, "reason").contains(reason), "{letter:?}");
        assert!(field(letter, "source").starts_with("http:"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_batch_twice_is_harmless_even_after_a_newer_one() {
    let url = redis_url();
    let prefix = unique("http-retry");
    let plugins = row_cache_dir(&prefix, "");
    let dead = format!("{prefix}:dead");
    let endpoint = Endpoint::start(plugins.path(), &url, &dead, "", "").await;
    let first = batch(&[order_line(1, 1), order_line(2, 1)]);
    let second = batch(&[order_line(1, 2)]);
    // Sequin's transient retry: the same batch again at once, and again after a newer change.
    for body in [&first, &first, &second, &first] {
        let (status, reply) = endpoint.post(body.clone()).await;
        assert_eq!(status, StatusCode::OK, "{reply}");
    }
    endpoint.daemon.stop().await;
    let mut conn = connect(&url).await;
    assert_eq!(
        get(&mut conn, &format!("{prefix}:public.orders:1")).await,
        Some(record_text(&order_line(1, 2)))
    );
    assert_eq!(
        get(&mut conn, &format!("{prefix}:public.orders:2")).await,
        Some(record_text(&order_line(2, 1)))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_redis_holds_the_reply_until_the_write_is_done() {
    let cache = RedisServer::start().await;
    let prefix = unique("http-slow");
    let plugins = row_cache_dir(&prefix, "");
    let dead = format!("{prefix}:dead");
    let endpoint = Endpoint::start(plugins.path(), &cache.url(), &dead, "", "").await;
    let mut conn = connect(&cache.url()).await;
    // Writes wait 1.5 s.
    let () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(1500)
        .arg("WRITE")
        .query_async(&mut conn)
        .await
        .unwrap();
    let start = Instant::now();
    let (status, reply) = endpoint.post(batch(&[order_line(1, 0)])).await;
    let waited = start.elapsed();
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert!(
        waited >= Duration::from_millis(1000),
        "replied after {waited:?}"
    );
    assert_eq!(
        get(&mut conn, &format!("{prefix}:public.orders:1")).await,
        Some(record_text(&order_line(1, 0)))
    );
    endpoint.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_gets_503_and_the_retry_succeeds_with_nothing_lost() {
    let mut cache = RedisServer::start().await;
    let prefix = unique("http-down");
    let plugins = row_cache_dir(&prefix, "");
    let dead = format!("{prefix}:dead");
    let endpoint = Endpoint::start(
        plugins.path(),
        &cache.url(),
        &dead,
        "ack_timeout_ms = 1500",
        "[pipeline]\nmax_backoff_ms = 200",
    )
    .await;
    let lines: Vec<String> = (0..10).map(|row| order_line(row, 0)).collect();
    let body = batch(&lines);
    cache.stop();
    let (status, reply) = endpoint.post(body.clone()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{reply}");
    cache.restart().await;
    // Sequin retries the batch.
    let (status, reply) = endpoint.post(body).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    let mut conn = connect(&cache.url()).await;
    for (row, line) in lines.iter().enumerate() {
        assert_eq!(
            get(&mut conn, &format!("{prefix}:public.orders:{row}")).await,
            Some(record_text(line))
        );
    }
    endpoint.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throughput_of_batched_webhooks() {
    let url = redis_url();
    let prefix = unique("http-rate");
    let plugins = row_cache_dir(&prefix, "");
    let dead = format!("{prefix}:dead");
    let endpoint = Endpoint::start(plugins.path(), &url, &dead, "", "").await;
    let (total, per_batch) = (2000u64, 100usize);
    let lines: Vec<String> = (0..total).map(|row| order_line(row, 0)).collect();
    let bodies: Vec<String> = lines.chunks(per_batch).map(batch).collect();
    let start = Instant::now();
    for body in bodies {
        let (status, reply) = endpoint.post(body).await;
        assert_eq!(status, StatusCode::OK, "{reply}");
    }
    let elapsed = start.elapsed();
    println!(
        "http source: {total} messages in batches of {per_batch}, one request at a time, applied in {:.2} s ({:.0} messages/s)",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64()
    );
    // The same volume again on new rows, from four clients at once.
    let lines: Vec<String> = (total..2 * total).map(|row| order_line(row, 0)).collect();
    let start = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for part in lines.chunks(lines.len() / 4) {
        let bodies: Vec<String> = part.chunks(per_batch).map(batch).collect();
        let (http, url, token) = (
            endpoint.http.clone(),
            endpoint.url.clone(),
            endpoint.token.clone(),
        );
        clients.spawn(async move {
            for body in bodies {
                let response = http.post(&url).bearer_auth(&token).body(body).send().await;
                assert_eq!(response.unwrap().status(), StatusCode::OK);
            }
        });
    }
    while let Some(done) = clients.join_next().await {
        done.unwrap();
    }
    let elapsed = start.elapsed();
    println!(
        "http source: {total} messages in batches of {per_batch}, four clients at once, applied in {:.2} s ({:.0} messages/s)",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64()
    );
    endpoint.daemon.stop().await;
    let mut conn = connect(&url).await;
    for row in [0, total / 2, total - 1, 2 * total - 1] {
        assert_eq!(
            get(&mut conn, &format!("{prefix}:public.orders:{row}")).await,
            Some(record_text(&order_line(row, 0)))
        );
    }
}
