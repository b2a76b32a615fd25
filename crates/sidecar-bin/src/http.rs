//! /healthz, /readyz and /metrics.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::metrics::Metrics;

/// What the probes report.
#[derive(Default)]
pub(crate) struct Health {
    /// geth's IPC answered the last call.
    pub(crate) geth_ok: AtomicBool,
    /// The registry has been read (or watched) at least once and the last
    /// registry operation did not fail.
    pub(crate) registry_synced: AtomicBool,
    /// Why this node cannot register itself (its advertised address is unusable),
    /// while it keeps peering with the others.
    pub(crate) advertise_problem: std::sync::Mutex<Option<String>>,
}

#[derive(Clone)]
struct AppState {
    health: Arc<Health>,
    metrics: Arc<Metrics>,
}

pub(crate) fn router(health: Arc<Health>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_handler))
        .with_state(AppState { health, metrics })
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    let geth = s.health.geth_ok.load(Ordering::Relaxed);
    let reg = s.health.registry_synced.load(Ordering::Relaxed);
    let advertise = s
        .health
        .advertise_problem
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let body = format!(
        "geth_ipc: {}\nregistry: {}\nadvertise: {}\n",
        if geth { "ok" } else { "not answering" },
        if reg { "synced" } else { "not synced" },
        advertise.as_deref().unwrap_or("ok")
    );
    let code = if geth && reg && advertise.is_none() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, body)
}

async fn metrics_handler(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

/// Binds and serves until the process ends. Binding errors are returned so the
/// caller can say which address is taken.
pub(crate) async fn serve(
    addr: SocketAddr,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!("cannot listen on {addr} for probes and metrics: {e} (set LISTEN_ADDR)")
    })?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router(health, metrics)).await {
            tracing::error!(error = %e, "HTTP server stopped");
        }
    });
    Ok(())
}
