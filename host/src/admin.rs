//! The admin endpoint (localhost by default): plugin status for `keepwarm plugins`, liveness and
//! readiness.
//!
//! - `GET /plugins`: every plugin's name, version, tables, state and load details (JSON).
//! - `GET /metrics`: the counters (messages received, applied, dead-lettered, stale writes
//!   skipped, …) as OpenMetrics text, see [`crate::telemetry::Metrics`].
//! - `GET /healthz`: 200 while the process runs.
//! - `GET /readyz`: 200 when plugins are loaded, the cache Redis answers and every source is
//!   connected; 503 otherwise.

use crate::applier::Applier;
use crate::runtime::PluginSet;
use crate::runtime::status::StatusBoard;
use crate::telemetry::Counters;
use arc_swap::ArcSwap;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Why the admin endpoint or `keepwarm plugins` failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The admin address cannot be bound.
    #[error("cannot bind the admin endpoint to {listen}: {error}")]
    Bind {
        /// The configured address.
        listen: String,
        /// The socket's error.
        error: std::io::Error,
    },
    /// No daemon answers at the admin address.
    #[error("no keepwarm answers at {url}: {error}")]
    Unreachable {
        /// The `/plugins` URL asked.
        url: String,
        /// The HTTP client's error.
        error: ureq::Error,
    },
    /// The daemon's answer is not the expected JSON.
    #[error("unexpected answer from {url}: {error}")]
    Answer {
        /// The `/plugins` URL asked.
        url: String,
        /// The JSON parser's error.
        error: serde_json::Error,
    },
}

/// What the admin endpoint reads.
#[derive(Clone)]
pub struct AdminState {
    /// Every plugin's status, for `/plugins`.
    pub registry: Arc<StatusBoard>,
    /// The serving plugins.
    pub plugins: Arc<ArcSwap<PluginSet>>,
    /// The cache writer, for readiness.
    pub applier: Arc<Applier>,
    /// Counters and metrics, for `/metrics`.
    pub counters: Arc<Counters>,
}

/// The admin routes.
pub(crate) fn router(state: AdminState) -> Router {
    Router::new()
        .route("/plugins", get(plugins))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn plugins(State(state): State<AdminState>) -> impl IntoResponse {
    Json(state.registry.snapshot())
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.counters.metrics.encode(),
    )
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    let loaded = !state.plugins.load().plugins.is_empty();
    let cache = state.applier.ping().await;
    let sources = state.counters.sources();
    let connected = sources.values().all(|up| *up);
    let status = if loaded && cache && connected {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(serde_json::json!({"plugins_loaded": loaded, "cache": cache, "sources": sources})),
    )
}

/// Binds `listen` and serves until shutdown. Returns the bound address.
///
/// # Errors
///
/// The address cannot be bound.
pub async fn serve(
    listen: &str,
    state: AdminState,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), AdminError> {
    let bind = |error| AdminError::Bind {
        listen: listen.to_owned(),
        error,
    };
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(bind)?;
    let addr = listener.local_addr().map_err(bind)?;
    tracing::info!(%addr, "admin endpoint listening");
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, router(state))
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(error) = served {
            tracing::error!(error = %error, "admin endpoint failed");
        }
    });
    Ok((addr, task))
}

/// `keepwarm plugins`: asks a running daemon for its plugins and prints them.
///
/// # Errors
///
/// The daemon does not answer.
pub fn print_plugins(listen: &str, json: bool) -> Result<(), AdminError> {
    let url = format!("http://{listen}/plugins");
    let body = ureq::get(&url)
        .call()
        .and_then(|mut answer| answer.body_mut().read_to_string())
        .map_err(|error| AdminError::Unreachable {
            url: url.clone(),
            error,
        })?;
    if json {
        println!("{body}");
        return Ok(());
    }
    let plugins: Vec<serde_json::Value> =
        serde_json::from_str(&body).map_err(|error| AdminError::Answer { url, error })?;
    println!(
        "{:<20} {:<13} {:<18} {:<8} {:<8} {:>8}  TABLES / ERROR",
        "NAME", "VERSION", "STATE", "CONTRACT", "COMPILED", "LOAD_MS"
    );
    for p in plugins {
        let text = |key: &str| p[key].as_str().unwrap_or("-").to_owned();
        let tables = match p["tables"].as_array() {
            Some(tables) => tables
                .iter()
                .filter_map(|t| t.as_str())
                .collect::<Vec<_>>()
                .join(","),
            None => "*".to_owned(),
        };
        let detail = match p["error"].as_str() {
            Some(error) => format!("{tables}  (failed {}: {error})", text("failed_version")),
            None => tables,
        };
        println!(
            "{:<20} {:<13} {:<18} {:<8} {:<8} {:>8}  {}",
            text("name"),
            text("version"),
            text("state"),
            text("contract"),
            text("compiled"),
            p["load_ms"]
                .as_u64()
                .map_or("-".to_owned(), |ms| ms.to_string()),
            detail
        );
    }
    Ok(())
}
