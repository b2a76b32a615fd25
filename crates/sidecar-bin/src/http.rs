//! /healthz, /readyz, /status and /metrics.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use geth_ipc::NodeId;
use peer_registry::Snapshot;
use reconcile_core::Report;
use serde::Serialize;

use crate::metrics::Metrics;
use crate::status::RegistryView;

/// What the probes and `/status` report. The event loop writes it; the HTTP
/// server reads it.
pub(crate) struct Health {
    /// geth's IPC answered the last call.
    pub(crate) geth_ok: AtomicBool,
    /// The registry has been read (or watched) at least once and the last
    /// registry operation did not fail.
    pub(crate) registry_synced: AtomicBool,
    /// Why this node cannot register itself (its advertised address is unusable),
    /// while it keeps peering with the others.
    pub(crate) advertise_problem: Mutex<Option<String>>,
    /// Reachable members stay unconnected: geth's peer limits (dial-cap diagnosis).
    pub(crate) peer_limit: Mutex<Option<String>>,
    /// /healthz fails when no pass completed for this long (`None`: never).
    liveness_timeout: Option<Duration>,
    started: Instant,
    last_pass: Mutex<Option<CompletedPass>>,
    published: Mutex<Option<Published>>,
}

/// When the last pass of the event loop completed (successfully or not).
#[derive(Clone, Copy)]
struct CompletedPass {
    instant: Instant,
    at: jiff::Timestamp,
}

/// What the last planned pass saw and decided.
struct Published {
    at: jiff::Timestamp,
    pod: String,
    report: Report,
    snapshot: Option<Snapshot>,
    connected: BTreeSet<NodeId>,
}

/// Locks `m`, recovering the data of a poisoned lock.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Health {
    /// `liveness_timeout`: see [`RunArgs::checked_liveness_timeout`](crate::config::RunArgs::checked_liveness_timeout).
    pub(crate) fn new(liveness_timeout: Option<Duration>) -> Self {
        Health {
            geth_ok: AtomicBool::new(false),
            registry_synced: AtomicBool::new(false),
            advertise_problem: Mutex::new(None),
            peer_limit: Mutex::new(None),
            liveness_timeout,
            started: Instant::now(),
            last_pass: Mutex::new(None),
            published: Mutex::new(None),
        }
    }

    /// The event loop completed a pass (whatever its outcome): it is not stuck.
    pub(crate) fn pass_completed(&self) {
        *lock(&self.last_pass) = Some(CompletedPass {
            instant: Instant::now(),
            at: jiff::Timestamp::now(),
        });
    }

    /// A pass planned: its report, the registry it planned from and geth's
    /// connections, for `/status`.
    pub(crate) fn publish(
        &self,
        pod: &str,
        report: &Report,
        snapshot: Option<&Snapshot>,
        connected: &BTreeSet<NodeId>,
    ) {
        *lock(&self.published) = Some(Published {
            at: jiff::Timestamp::now(),
            pod: pod.to_owned(),
            report: report.clone(),
            snapshot: snapshot.cloned(),
            connected: connected.clone(),
        });
    }

    /// `Err(reason)` when the loop has not completed a pass within the
    /// liveness timeout (counted from start until the first pass).
    fn liveness(&self, now: Instant) -> Result<(), String> {
        let Some(timeout) = self.liveness_timeout else {
            return Ok(());
        };
        let since = lock(&self.last_pass).map_or(self.started, |p| p.instant);
        let stalled = now.saturating_duration_since(since);
        if stalled > timeout {
            Err(format!(
                "event loop stuck: no pass completed for {:.0} s (LIVENESS_TIMEOUT {:.0} s)",
                stalled.as_secs_f64(),
                timeout.as_secs_f64()
            ))
        } else {
            Ok(())
        }
    }
}

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
}

pub(crate) fn router(health: Arc<Health>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/metrics", get(metrics_handler))
        .with_state(AppState { health, metrics })
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
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on {addr} for probes, status and metrics: {e} (set LISTEN_ADDR)"
        )
    })?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router(health, metrics)).await {
            tracing::error!(error = %e, "HTTP server stopped");
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_fails_once_no_pass_completed_for_the_timeout() {
        let h = Health::new(Some(Duration::from_secs(10)));
        let t0 = h.started;
        assert!(h.liveness(t0 + Duration::from_secs(9)).is_ok());
        let err = h.liveness(t0 + Duration::from_secs(11)).unwrap_err();
        assert!(err.contains("no pass completed"), "{err}");
        h.pass_completed();
        let done = lock(&h.last_pass).unwrap().instant;
        assert!(h.liveness(done + Duration::from_secs(9)).is_ok());
        assert!(h.liveness(done + Duration::from_secs(11)).is_err());
    }

    #[test]
    fn liveness_never_fails_when_off() {
        let h = Health::new(None);
        assert!(h.liveness(h.started + Duration::from_secs(86_400)).is_ok());
    }
}
