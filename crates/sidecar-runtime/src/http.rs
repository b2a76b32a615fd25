//! The sidecar's HTTP server: /healthz, /readyz, /status, /metrics, and
//! /identity and /v1/probe for other members' probes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use geth_ipc::NodeId;
use reconcile_core::Report;
use serde::Serialize;

use crate::health::{Health, lock};
use crate::metrics::Metrics;
use crate::ports::Prober;
use crate::status::RegistryView;

/// The `/status` document.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct StatusBody<'a> {
    /// This member's pod (absent before the first planned pass).
    pod: Option<&'a str>,
    geth_ipc_ok: bool,
    registry_synced: bool,
    /// The last completed pass of the event loop, whatever its outcome.
    last_pass: Option<LastPass>,
    /// Problems to act on: the engine's and the ConfigMap's.
    problems: Vec<String>,
    /// The last planned pass: when, and the engine's report (desired,
    /// connected, missing, unusable, removals, partition guard, ...).
    last_plan_at: Option<jiff::Timestamp>,
    report: Option<&'a Report>,
    /// The registry as that pass saw it, with this geth's connection to each.
    registry: Option<RegistryView<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct LastPass {
    completed_at: jiff::Timestamp,
    seconds_ago: f64,
}

#[derive(Clone)]
struct AppState {
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    prober: Arc<dyn Prober>,
    sidecar_port: u16,
    /// Indirect probes in flight at once; more are refused (429).
    probes_in_flight: Arc<tokio::sync::Semaphore>,
}

/// How many indirect probes this sidecar answers at once (each is at most two
/// connects of one probe timeout).
const PROBES_IN_FLIGHT: usize = 8;

pub(crate) fn router(
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    prober: Arc<dyn Prober>,
    sidecar_port: u16,
) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/metrics", get(metrics_handler))
        .route("/identity", get(identity))
        .route("/v1/probe/{node_id}", get(probe))
        .with_state(AppState {
            health,
            metrics,
            prober,
            sidecar_port,
            probes_in_flight: Arc::new(tokio::sync::Semaphore::new(PROBES_IN_FLIGHT)),
        })
}

/// Who this sidecar is (its pod and its geth's node id): what other members'
/// probes check, so an IP now used by another pod is not taken for a member.
async fn identity(State(s): State<AppState>) -> impl IntoResponse {
    match lock(&s.health.identity).clone() {
        Some(id) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            serde_json::to_string(&id).unwrap_or_default(),
        ),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "geth has not answered yet\n".to_owned(),
        ),
    }
}

/// An indirect probe: another member's sidecar asks whether this one reaches
/// the member `node_id`. Only a member (or legacy entry) this sidecar's own
/// engine would probe is probed, at the addresses it checked (never an
/// address the asker names), at most [`PROBES_IN_FLIGHT`] at once: no relay
/// to anywhere, and no scanner.
async fn probe(
    State(s): State<AppState>,
    axum::extract::Path(node_id): axum::extract::Path<String>,
) -> impl IntoResponse {
    let Ok(id) = node_id.parse::<NodeId>() else {
        return (StatusCode::BAD_REQUEST, "not a node id\n".to_owned());
    };
    // Only what this sidecar's own engine would probe, at the addresses it
    // checked: a refused record (loopback, outside MEMBER_CIDRS, a DNS name
    // resolving elsewhere, not matching its pod) gets no packet from here.
    let target = lock(&s.health.probe_targets).get(&id).cloned();
    let Some((enode, addresses)) = target else {
        return (
            StatusCode::NOT_FOUND,
            "not a member probed here\n".to_owned(),
        );
    };
    let Ok(_permit) = s.probes_in_flight.try_acquire() else {
        return (StatusCode::TOO_MANY_REQUESTS, "busy probing\n".to_owned());
    };
    let outcome = s.prober.probe(&enode, &addresses, s.sidecar_port).await;
    let answer = crate::probe::IndirectAnswer {
        reachable: outcome.is_reachable(),
    };
    (
        StatusCode::OK,
        serde_json::to_string(&answer).unwrap_or_default(),
    )
}

async fn healthz(State(s): State<AppState>) -> impl IntoResponse {
    match s.health.liveness(Instant::now()) {
        Ok(()) => (StatusCode::OK, "ok\n".to_owned()),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
    }
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

async fn status(State(s): State<AppState>) -> impl IntoResponse {
    let h = &s.health;
    let last_pass = *lock(&h.last_pass);
    let published = lock(&h.published);
    let p = published.as_ref();
    let mut problems: Vec<String> = p
        .map(|p| p.report.problems.iter().map(ToString::to_string).collect())
        .unwrap_or_default();
    if let Some(snap) = p.and_then(|p| p.snapshot.as_ref()) {
        problems.extend(snap.problems.iter().cloned());
    }
    problems.extend(lock(&h.peer_limit).clone());
    problems.extend(lock(&h.pod_evidence_problem).as_ref().map(|p| {
        format!("pod evidence unavailable, removals need agreement between members: {p}")
    }));
    let body = StatusBody {
        pod: p.map(|p| p.pod.as_str()),
        geth_ipc_ok: h.geth_ok.load(Ordering::Relaxed),
        registry_synced: h.registry_synced.load(Ordering::Relaxed),
        last_pass: last_pass.map(|l| LastPass {
            completed_at: l.at,
            seconds_ago: l.instant.elapsed().as_secs_f64(),
        }),
        problems,
        last_plan_at: p.map(|p| p.at),
        report: p.map(|p| &p.report),
        registry: p.and_then(|p| {
            p.snapshot.as_ref().map(|snap| {
                let own = snap.members.get(&p.pod).map(|m| &m.node_id);
                RegistryView::new(snap, Some(&p.connected), own)
            })
        }),
    };
    match serde_json::to_string_pretty(&body) {
        Ok(json) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            json + "\n",
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("cannot encode the status: {e}\n"),
        ),
    }
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
    prober: Arc<dyn Prober>,
    sidecar_port: u16,
) -> crate::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| crate::Error::Listen { addr, source })?;
    let app = router(health, metrics, prober, sidecar_port);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "HTTP server stopped");
        }
    });
    Ok(())
}
