//! The HTTP push source: Sequin's webhook sink posts change messages here.
//!
//! `POST {path}` with `Authorization: Bearer <token>` and a body that is either a batch,
//! `{"data": [message, …]}`, or one bare message (SEQUIN-FORMAT.md §2.4: Sequin sends both).
//!
//! | reply | when |
//! |---|---|
//! | 200 | every message of the request was applied, or dead-lettered because it is not a change message (a bad message does not fail its batch) |
//! | 401 | the bearer token is missing or wrong; the body is not even read |
//! | 413 | the body is larger than `max_body_bytes` |
//! | 415 | the body is compressed (`content-encoding`); configure Sequin without it |
//! | 503 | some message could not be applied within `ack_timeout_ms` (Redis down or slow), or the daemon is shutting down: Sequin retries the batch |
//!
//! The reply waits for the pipeline to settle every message. Messages still in the lanes when a
//! 503 goes out keep going; the retry that follows (or Sequin's own transient retry of a batch it
//! already sent) applies them again, which versioned writes make harmless.

pub mod config;

use super::{BoxFuture, Source, SourceContext, SourceError, Tally};
use crate::delivery::{Payload, Settle};
use axum::Router;
use axum::body::{Body, HttpBody as _};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse as _, Response};
use axum::routing::post;
pub use config::HttpSourceConfig;
use serde_json::value::RawValue;
use sha2::{Digest as _, Sha256};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::net::TcpListener;

/// A bound listener and the endpoint's settings: binding happens at start-up, so a port in use
/// or a missing token stops the daemon before it runs.
pub(crate) struct HttpSource {
    pub(crate) config: HttpSourceConfig,
    pub(crate) listener: TcpListener,
    pub(crate) token: String,
}

impl Source for HttpSource {
    fn run(self: Box<Self>, ctx: SourceContext) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(self.serve(ctx))
    }

    fn up_at_start(&self) -> bool {
        true
    }
}

impl HttpSource {
    /// Serves until shutdown, then stops accepting and lets requests in progress finish.
    async fn serve(self, ctx: SourceContext) -> Result<(), SourceError> {
        let shutdown = ctx.shutdown.clone();
        let name = Arc::clone(&ctx.name);
        let address = self
            .listener
            .local_addr()
            .map_err(|error| SourceError::Read {
                what: "the listener's address".to_owned(),
                error,
            })?;
        let webhook = Webhook::new(&self.config, &self.token, ctx);
        tracing::info!(source = %name, address = %address, path = %self.config.path, "listening for sequin webhooks");
        axum::serve(self.listener, router(webhook, &self.config.path))
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
            .map_err(|error| SourceError::Read {
                what: format!("http requests on {address}"),
                error,
            })?;
        tracing::info!(source = %name, "source stopped");
        Ok(())
    }
}

/// The endpoint's state.
pub struct Webhook {
    token_digest: [u8; 32],
    max_body_bytes: usize,
    ack_timeout: Duration,
    requests: AtomicU64,
    ctx: SourceContext,
}

impl Webhook {
    /// The endpoint for `config`, accepting `token`.
    pub fn new(config: &HttpSourceConfig, token: &str, ctx: SourceContext) -> Arc<Webhook> {
        Arc::new(Webhook {
            token_digest: Sha256::digest(token.as_bytes()).into(),
            max_body_bytes: config.max_body_bytes.get(),
            ack_timeout: Duration::from_millis(config.ack_timeout_ms.get()),
            requests: AtomicU64::new(0),
            ctx,
        })
    }

    /// Hands every message to the pipeline and waits until all are settled, for at most the
    /// ack timeout.
    async fn deliver(&self, payloads: Vec<Payload>) -> Delivered {
        let total = payloads.len();
        let request = self.requests.fetch_add(1, Ordering::Relaxed);
        let tally = Arc::new(Tally::default());
        let settle: Arc<dyn Settle> = Arc::clone(&tally) as Arc<dyn Settle>;
        let mut payloads = payloads.into_iter().enumerate();
        let finished = tokio::time::timeout(self.ack_timeout, async {
            let mut remaining = total;
            while remaining > 0 {
                // Permits are reserved a few at a time: a request larger than the whole
                // in-flight budget still goes through as the lanes settle its first messages.
                let Some(mut permits) = self.ctx.reserve(remaining.min(64)).await else {
                    return false;
                };
                while let Some(permit) = permits.take() {
                    let Some((index, payload)) = payloads.next() else {
                        break;
                    };
                    let id = format!("request {request} message {index}");
                    self.ctx.deliver(permit, payload, id, &settle);
                    remaining -= 1;
                }
            }
            tally
                .wait_settled(total as u64, Duration::from_secs(3600), |_| {})
                .await;
            true
        })
        .await;
        let counts = tally.counts();
        match finished {
            Ok(true) if counts.abandoned == 0 => Delivered::Done,
            Ok(true) => Delivered::Abandoned(counts.abandoned as usize),
            Ok(false) => Delivered::ShuttingDown,
            Err(_) => Delivered::TimedOut(total - counts.finished() as usize),
        }
    }
}

/// Whether the request carries the bearer token whose SHA-256 is `token_digest`. The comparison
/// takes the same time whatever was sent: both sides are hashed, then compared in full.
fn authorized(headers: &HeaderMap, token_digest: &[u8; 32]) -> bool {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return false;
    };
    let value = value.as_bytes();
    let Some(space) = value.iter().position(|&b| b == b' ') else {
        return false;
    };
    let (scheme, rest) = value.split_at(space);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return false;
    }
    let digest: [u8; 32] = Sha256::digest(rest.trim_ascii()).into();
    digest
        .iter()
        .zip(token_digest)
        .fold(0u8, |diff, (a, b)| diff | (a ^ b))
        == 0
}

/// How a request's messages fared.
enum Delivered {
    Done,
    Abandoned(usize),
    TimedOut(usize),
    ShuttingDown,
}

/// The endpoint's router: `POST {path}` only (other methods get 405, other paths 404).
pub fn router(webhook: Arc<Webhook>, path: &str) -> Router {
    Router::new().route(path, post(handle)).with_state(webhook)
}

async fn handle(State(webhook): State<Arc<Webhook>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    if !authorized(&parts.headers, &webhook.token_digest) {
        let mut response = reply(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token".into(),
        );
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return response;
    }
    if let Some(encoding) = parts.headers.get(header::CONTENT_ENCODING)
        && !encoding.as_bytes().eq_ignore_ascii_case(b"identity")
    {
        return reply(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "compressed bodies are not accepted; remove content-encoding from the sink's headers"
                .into(),
        );
    }
    let body = match read_body(body, webhook.max_body_bytes).await {
        Ok(body) => body,
        Err(BodyError::TooLarge(rest)) => {
            // The client may be sending the whole body before it reads: let it finish (up to
            // a bound), so that it sees this reply rather than a broken pipe.
            drain(rest, webhook.max_body_bytes).await;
            let mut response = reply(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("body exceeds {} bytes", webhook.max_body_bytes),
            );
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return response;
        }
        Err(BodyError::Read(error)) => {
            return reply(
                StatusCode::BAD_REQUEST,
                format!("cannot read body: {error}"),
            );
        }
    };
    if body.trim_ascii().is_empty() {
        return reply(StatusCode::BAD_REQUEST, "empty body".into());
    }
    let payloads = split(&body, |body| webhook.ctx.decode_json(body));
    let total = payloads.len();
    let undecodable = payloads
        .iter()
        .filter(|p| matches!(p, Payload::Malformed { .. }))
        .count();
    match webhook.deliver(payloads).await {
        Delivered::Done => {
            let text = serde_json::json!({ "received": total, "undecodable": undecodable });
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                text.to_string(),
            )
                .into_response()
        }
        Delivered::Abandoned(n) => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{n} of {total} messages were not applied; retry"),
        ),
        Delivered::TimedOut(n) => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{n} of {total} messages were not applied in time; retry"),
        ),
        Delivered::ShuttingDown => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting down; retry".into(),
        ),
    }
}

/// An error reply: `{"error": "…"}`.
fn reply(status: StatusCode, error: String) -> Response {
    let text = serde_json::json!({ "error": error }).to_string();
    (status, [(header::CONTENT_TYPE, "application/json")], text).into_response()
}

enum BodyError {
    /// Over the limit; the body's unread rest, to drain.
    TooLarge(Body),
    Read(axum::Error),
}

/// How much of a too-large body is read and thrown away, at most, so that its client sees the
/// 413: this many times the limit, and no more than this long.
const DRAIN_FACTOR: usize = 16;
const DRAIN_FOR: Duration = Duration::from_secs(10);

/// Reads the whole body, stopping as soon as it passes `limit`.
async fn read_body(mut body: Body, limit: usize) -> Result<Vec<u8>, BodyError> {
    if body.size_hint().lower() > limit as u64 {
        return Err(BodyError::TooLarge(body));
    }
    let mut bytes = Vec::new();
    while let Some(data) = next_data(&mut body).await {
        if let Some(data) = data.map_err(BodyError::Read)? {
            if bytes.len() + data.len() > limit {
                return Err(BodyError::TooLarge(body));
            }
            bytes.extend_from_slice(&data);
        }
    }
    Ok(bytes)
}

/// The body's next frame: its data, or `None` for a frame without (trailers).
async fn next_data(body: &mut Body) -> Option<Result<Option<bytes::Bytes>, axum::Error>> {
    let frame = std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await?;
    Some(frame.map(|frame| frame.into_data().ok()))
}

/// Reads and discards the rest of a body, up to [`DRAIN_FACTOR`] times `limit` and
/// [`DRAIN_FOR`].
async fn drain(mut body: Body, limit: usize) {
    let most = limit.saturating_mul(DRAIN_FACTOR).max(1 << 20);
    let _ = tokio::time::timeout(DRAIN_FOR, async {
        let mut drained = 0usize;
        while let Some(Ok(data)) = next_data(&mut body).await {
            drained += data.map_or(0, |data| data.len());
            if drained > most {
                return;
            }
        }
    })
    .await;
}

/// `{"data": [message, …]}`: each element is kept as its exact JSON text.
#[derive(serde::Deserialize)]
struct Batch<'a> {
    #[serde(borrow)]
    data: Vec<&'a RawValue>,
}

/// Splits a body into its messages, each decoded on its own: a batch, or one bare message.
/// What is neither (invalid JSON, a JSON string, not UTF-8) is one malformed message.
fn split(body: &[u8], decode: impl Fn(&[u8]) -> Payload) -> Vec<Payload> {
    let batch = std::str::from_utf8(body)
        .ok()
        .and_then(|text| serde_json::from_str::<Batch<'_>>(text).ok());
    match batch {
        Some(batch) => batch
            .data
            .iter()
            .map(|raw| decode(raw.get().as_bytes()))
            .collect(),
        None => vec![decode(body)],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::RawPayload;

    fn decode(body: &[u8]) -> Payload {
        crate::sources::decode_json(body, 1 << 20)
    }

    const LINE: &str = include_str!("../../../../tests/fixtures/sequin-examples.jsonl");

    fn first() -> &'static str {
        LINE.lines().next().unwrap()
    }

    fn shapes(body: &str) -> Vec<Result<String, String>> {
        split(body.as_bytes(), decode)
            .into_iter()
            .map(|p| match p {
                Payload::Decoded(m) => Ok(m.row_id()),
                Payload::Malformed { reason, .. } => Err(reason.to_string()),
            })
            .collect()
    }

    #[test]
    fn both_body_shapes_split_into_messages() {
        let bare = shapes(first());
        assert_eq!(bare, [Ok("public.orders:1001".to_owned())]);
        let batch = shapes(&format!(r#"{{"data":[{},"a string",{{"x":1}}]}}"#, first()));
        assert_eq!(batch.len(), 3);
        assert_eq!(batch[0], Ok("public.orders:1001".to_owned()));
        assert!(batch[1].as_ref().unwrap_err().contains("JSON string"));
        assert!(batch[2].as_ref().unwrap_err().contains("missing field"));
        assert!(shapes(r#"{"data":[]}"#).is_empty());
        assert!(
            shapes("not json")[0]
                .as_ref()
                .unwrap_err()
                .contains("invalid JSON")
        );
    }

    #[test]
    fn only_the_right_bearer_token_is_authorized() {
        let digest: [u8; 32] = Sha256::digest(b"s3cret").into();
        let check = |value: Option<&str>| {
            let mut headers = HeaderMap::new();
            if let Some(value) = value {
                headers.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
            }
            authorized(&headers, &digest)
        };
        assert!(check(Some("Bearer s3cret")));
        assert!(check(Some("bearer s3cret")));
        assert!(!check(None));
        assert!(!check(Some("Bearer s3cre")));
        assert!(!check(Some("Bearer s3cretx")));
        assert!(!check(Some("Basic s3cret")));
        assert!(!check(Some("s3cret")));
        assert!(!check(Some("Bearer ")));
    }

    #[test]
    fn a_batch_element_keeps_its_exact_bytes() {
        let element = r#"{"weird" : "spacing","n":1.50}"#;
        let body = format!(r#"{{"data":[ {element} ]}}"#);
        match &split(body.as_bytes(), decode)[0] {
            Payload::Malformed {
                raw: RawPayload::Body(raw),
                ..
            } => assert_eq!(raw, element.as_bytes()),
            _ => panic!("expected a malformed message"),
        }
    }
}
