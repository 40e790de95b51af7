//! The admin endpoint (localhost by default): plugin status for `keepwarm plugins`, liveness and
//! readiness.
//!
//! - `GET /plugins`: every plugin's name, version, tables, state and load details (JSON).
//! - `GET /metrics`: the counters (messages received, applied, dead-lettered, stale writes
//!   skipped, …) in the Prometheus text format.
//! - `GET /healthz`: 200 while the process runs.
//! - `GET /readyz`: 200 when plugins are loaded, the cache Redis answers and every source is
//!   connected; 503 otherwise.
//! - `GET /metrics`: Prometheus metrics (OpenMetrics text), see [`crate::telemetry::Metrics`].

use crate::applier::Applier;
use crate::runtime::PluginSet;
use crate::runtime::status::Registry;
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

/// What the admin endpoint reads.
#[derive(Clone)]
pub struct AdminState {
    /// Plugin status.
    pub registry: Arc<Registry>,
    /// The serving plugins.
    pub plugins: Arc<ArcSwap<PluginSet>>,
    /// The cache writer, for readiness.
    pub applier: Arc<Applier>,
    /// Counters and metrics, for `/metrics`.
    pub counters: Arc<Counters>,
}

/// The admin routes.
pub fn router(state: AdminState) -> Router {
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
    let redis = state.applier.ping().await;
    let sources = state.counters.sources();
    let connected = sources.values().all(|up| *up);
    let status = if loaded && redis && connected {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(serde_json::json!({"plugins_loaded": loaded, "redis": redis, "sources": sources})),
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
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|error| anyhow::anyhow!("cannot bind the admin endpoint to {listen}: {error}"))?;
    let addr = listener.local_addr()?;
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
pub fn print_plugins(listen: &str, json: bool) -> anyhow::Result<()> {
    let url = format!("http://{listen}/plugins");
    let body = ureq::get(&url)
        .call()
        .map_err(|error| anyhow::anyhow!("no keepwarm answers at {url}: {error}"))?
        .body_mut()
        .read_to_string()?;
    if json {
        println!("{body}");
        return Ok(());
    }
    let plugins: Vec<serde_json::Value> = serde_json::from_str(&body)?;
    println!(
        "{:<20} {:<13} {:<18} {:<8} {:>8}  TABLES / ERROR",
        "NAME", "VERSION", "STATE", "COMPILED", "LOAD_MS"
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
            "{:<20} {:<13} {:<18} {:<8} {:>8}  {}",
            text("name"),
            text("version"),
            text("state"),
            text("compiled"),
            p["load_ms"]
                .as_u64()
                .map_or("-".to_owned(), |ms| ms.to_string()),
            detail
        );
    }
    Ok(())
}
