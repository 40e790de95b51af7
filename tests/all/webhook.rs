//! The HTTP push source over a real socket with a real client: both of Sequin's body shapes,
//! the bearer token, the body limit, malformed messages, a slow and a lost Redis, and retries.

use crate::stream_source::{assert_fixtures_cached, fixture_lines};
use crate::util::*;
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
    /// Starts the daemon of `env` with `source` lines on the HTTP source and `pipeline` lines,
    /// and waits until the port accepts connections.
    pub async fn start(env: &TestEnv, source: &str, pipeline: &str) -> Endpoint {
        Endpoint::start_with(env.config().pipeline(pipeline), source).await
    }

    /// Starts the daemon of `config` with an HTTP source (and `source` lines on it), and waits
    /// until the port accepts connections.
    pub async fn start_with(config: ConfigBuilder, source: &str) -> Endpoint {
        let port = free_port();
        let token = unique("t0ken");
        let lines = format!(
            "listen = \"127.0.0.1:{port}\"\npath = \"/sequin\"\ntoken = \"{token}\"\n{source}"
        );
        let daemon = config.source("http", &lines).run();
        wait_for("the http source to listen", PATIENCE, || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
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

    /// POSTs `body` and checks that the reply is 200; returns the reply's JSON.
    pub async fn post_ok(&self, body: String) -> serde_json::Value {
        let (status, reply) = self.post(body).await;
        assert_eq!(status, StatusCode::OK, "{reply}");
        serde_json::from_str(&reply).unwrap_or(serde_json::Value::Null)
    }
}

/// `{"data": [lines…]}`, Sequin's batched body.
pub fn batch(lines: &[String]) -> String {
    format!(r#"{{"data":[{}]}}"#, lines.join(","))
}

/// Rows `rows` of the cache hold `order_line(row, 0)`.
async fn assert_orders_cached(keys: &Keys, rows: impl IntoIterator<Item = u64>) {
    for row in rows {
        assert_eq!(
            keys.get(&format!("public.orders:{row}")).await,
            Some(record_text(&order_line(row, 0))),
            "row {row}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_body_shapes_are_applied_before_the_reply() {
    let env = TestEnv::row_cache("http-shapes");
    let endpoint = Endpoint::start(&env, "", "").await;
    let keys = env.keys().await;
    let f = fixtures();

    // A bare message (the sink's batch = false): applied by the time the reply arrives.
    endpoint.post_ok(f[0].to_owned()).await;
    assert_eq!(
        keys.get("public.orders:1001").await,
        Some(record_text(f[0]))
    );
    // A batch of every fixture (batch = true, the default).
    let reply = endpoint.post_ok(batch(&fixture_lines())).await;
    assert_eq!(reply["received"], 12);
    assert_eq!(reply["undecodable"], 0);
    assert_fixtures_cached(&keys, false).await;
    endpoint.daemon.stop().await;
    assert!(env.dead_letters().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_the_right_token_get_401_and_change_nothing() {
    let env = TestEnv::row_cache("http-auth");
    let endpoint = Endpoint::start(&env, "", "").await;
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
    let (http, token) = (&endpoint.http, &endpoint.token);
    let response = http.get(&endpoint.url).bearer_auth(token).send().await;
    assert_eq!(response.unwrap().status(), StatusCode::METHOD_NOT_ALLOWED);
    let other = endpoint.url.replace("/sequin", "/other");
    let response = http.post(other).bearer_auth(token).body(body).send().await;
    assert_eq!(response.unwrap().status(), StatusCode::NOT_FOUND);
    endpoint.daemon.stop().await;
    assert_eq!(env.keys().await.get("public.orders:1001").await, None);
    assert!(env.dead_letters().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_limit_gets_413_and_changes_nothing() {
    let env = TestEnv::row_cache("http-limit");
    let endpoint = Endpoint::start(&env, "max_body_bytes = 4096", "").await;
    let lines: Vec<String> = (0..20).map(|row| order_line(row, 0)).collect();
    let body = batch(&lines);
    assert!(body.len() > 4096);
    let (status, _) = endpoint.post(body).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    // Within the limit it goes through.
    endpoint.post_ok(batch(&lines[..2])).await;
    endpoint.daemon.stop().await;
    let keys = env.keys().await;
    assert!(keys.get("public.orders:1").await.is_some());
    assert_eq!(keys.get("public.orders:5").await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_message_is_dead_lettered_without_failing_its_batch() {
    let env = TestEnv::row_cache("http-malformed");
    let endpoint = Endpoint::start(&env, "", "").await;
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
    let reply = endpoint.post_ok(body).await;
    assert_eq!(
        (reply["received"].clone(), reply["undecodable"].clone()),
        (4.into(), 2.into())
    );
    // A body that is not JSON at all is one malformed message.
    let (status, _) = endpoint.post("{not json".to_owned()).await;
    assert_eq!(status, StatusCode::OK);
    endpoint.daemon.stop().await;

    assert_orders_cached(&env.keys().await, [1, 2]).await;
    let letters = env.dead_letters().await;
    assert_eq!(letters.len(), 3);
    let expected = [
        (bad[0].as_str(), "a JSON string, not a change message"),
        (bad[1].as_str(), "missing field `action`"),
        ("{not json", "invalid JSON"),
    ];
    for letter in find_letters(&letters, expected) {
        assert!(letter.field("source").starts_with("http:"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_batch_twice_is_harmless_even_after_a_newer_one() {
    let env = TestEnv::row_cache("http-retry");
    let endpoint = Endpoint::start(&env, "", "").await;
    let first = batch(&[order_line(1, 1), order_line(2, 1)]);
    let second = batch(&[order_line(1, 2)]);
    // Sequin's transient retry: the same batch again at once, and again after a newer change.
    for body in [&first, &first, &second, &first] {
        endpoint.post_ok(body.clone()).await;
    }
    endpoint.daemon.stop().await;
    let keys = env.keys().await;
    assert_eq!(
        keys.get("public.orders:1").await,
        Some(record_text(&order_line(1, 2)))
    );
    assert_eq!(
        keys.get("public.orders:2").await,
        Some(record_text(&order_line(2, 1)))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_redis_holds_the_reply_until_the_write_is_done() {
    let cache = RedisServer::start().await;
    let env = TestEnv::row_cache("http-slow").with_cache(&cache.url());
    let endpoint = Endpoint::start(&env, "", "").await;
    let keys = env.keys().await;
    // Writes wait 1.5 s.
    let () = keys
        .query(redis::cmd("CLIENT").arg("PAUSE").arg(1500).arg("WRITE"))
        .await;
    let start = Instant::now();
    endpoint.post_ok(batch(&[order_line(1, 0)])).await;
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(1000),
        "replied after {waited:?}"
    );
    assert_orders_cached(&keys, [1]).await;
    endpoint.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_gets_503_and_the_retry_succeeds_with_nothing_lost() {
    let mut cache = RedisServer::start().await;
    let env = TestEnv::row_cache("http-down").with_cache(&cache.url());
    let endpoint = Endpoint::start(&env, "ack_timeout_ms = 1500", "max_backoff_ms = 200").await;
    let lines: Vec<String> = (0..10).map(|row| order_line(row, 0)).collect();
    let body = batch(&lines);
    cache.stop();
    let (status, reply) = endpoint.post(body.clone()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{reply}");
    cache.restart().await;
    // Sequin retries the batch.
    endpoint.post_ok(body).await;
    assert_orders_cached(&env.keys().await, 0..10).await;
    endpoint.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throughput_of_batched_webhooks() {
    let env = TestEnv::row_cache("http-rate");
    let endpoint = Endpoint::start(&env, "", "").await;
    let (total, per_batch) = (2000u64, 100usize);
    let report = |how: &str, elapsed: Duration| {
        println!(
            "http source: {total} messages in batches of {per_batch}, {how}, applied in {:.2} s ({:.0} messages/s)",
            elapsed.as_secs_f64(),
            total as f64 / elapsed.as_secs_f64()
        );
    };
    let lines: Vec<String> = (0..total).map(|row| order_line(row, 0)).collect();
    let start = Instant::now();
    for body in lines.chunks(per_batch).map(batch) {
        endpoint.post_ok(body).await;
    }
    report("one request at a time", start.elapsed());
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
    report("four clients at once", start.elapsed());
    endpoint.daemon.stop().await;
    assert_orders_cached(&env.keys().await, [0, total / 2, total - 1, 2 * total - 1]).await;
}
