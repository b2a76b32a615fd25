//! The geth-peer-sidecar runtime as a library: the event loop that keeps one
//! geth peered with every member of a registry, and everything around it.
//!
//! A pass of the loop reads as **observe → track → plan → execute →
//! publish**: it reads geth (and the registry when none is held), takes that
//! into the observer's state ([`reconcile_core::Tracker`]), asks the pure
//! engine ([`reconcile_core::plan`]) what to do, carries the plan out
//! (registry writes, then geth's admin calls) and publishes the report
//! (`/status`, metrics, the log, [`Notice`]s). Registry watch events, geth
//! peer events, probes, retries and a jittered resync trigger passes.
//!
//! The seams are traits ([`ports`]): the [`Clock`], the [`Prober`], the
//! [`PodSource`] and the [`Hooks`] that hear notices. The binary plugs in the
//! real ones; the simulation (feature `sim`) and tests plug in their own.
//!
//! Features: `kube` (pod evidence from a pod watch, Kubernetes Events),
//! `http` (the probes, `/status`, `/metrics` and `/identity` server), `sim`
//! (the deterministic simulation: [`sim::run`], or [`sim::run_with`] and your own
//! registry).
//!
//! A whole embedding (three sidecars on in-memory geth and an in-memory
//! registry) is `examples/embed.rs`; in short:
//!
//! ```
//! use std::sync::Arc;
//! use geth_ipc::Host;
//! use geth_ipc::fake::{FakeNet, test_enode};
//! use peer_registry::{MemoryRegistry, MemoryStore};
//! use sidecar_runtime::{AdvertiseMode, Settings, Sidecar};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let ip: std::net::IpAddr = "10.0.0.1".parse()?;
//! let geth = FakeNet::new().join(test_enode(1, Host::Ip(ip), 30303)?);
//! let store = MemoryStore::new();
//! let settings = Settings::new("geth-0", AdvertiseMode::PodIp(ip));
//! let sidecar = Sidecar::new(Arc::new(geth), Arc::new(MemoryRegistry::on(&store)), settings);
//! // Runs until the future completes, then deregisters this pod.
//! sidecar.run_until(async {}).await;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

mod error;
mod event_loop;
mod execute;
mod health;
mod identity;
mod latch;
pub mod mesh_graph;
mod metrics;
mod notice;
mod pass;
pub mod ports;
mod probe;
mod publish;
mod runner;
mod settings;
pub mod status;
mod triggers;

#[cfg(feature = "kube")]
mod events;
#[cfg(feature = "http")]
mod http;
#[cfg(feature = "kube")]
mod kube_client;
#[cfg(feature = "kube")]
mod pods;
#[cfg(feature = "sim")]
pub mod sim;

use std::future::Future;
use std::sync::Arc;

use geth_ipc::AdminApi;
use peer_registry::PeerRegistry;

pub use error::{AdvertiseError, Error, PassError, Result};
#[cfg(feature = "kube")]
pub use events::Events;
pub use health::{Health, Stalled};
pub use identity::{Advertise, AdvertiseMode};
#[cfg(feature = "kube")]
pub use kube_client::kube_client;
pub use latch::OnChange;
pub use metrics::Metrics;
pub use notice::Notice;
#[cfg(feature = "kube")]
pub use pods::PodWatch;
pub use ports::{Clock, Hooks, NoHooks, PodEvidence, PodSource, ProbeOutcome, Prober, SystemClock};
pub use probe::{Identity, ProbeVia, TcpProber};
pub use settings::Settings;

/// One sidecar: a geth, a registry and the settings, ready to run.
pub struct Sidecar<G, R> {
    geth: Arc<G>,
    registry: Arc<R>,
    settings: Settings,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

impl<G, R> Sidecar<G, R>
where
    G: AdminApi + 'static,
    R: PeerRegistry + 'static,
{
    /// A sidecar for `geth` on `registry`, with fresh metrics and health.
    pub fn new(geth: Arc<G>, registry: Arc<R>, settings: Settings) -> Self {
        Self {
            geth,
            registry,
            settings,
            metrics: Arc::new(Metrics::new()),
            health: Arc::new(Health::new(None)),
        }
    }

    /// Uses `health` (e.g. one with a liveness timeout) for what the probes
    /// and `/status` report.
    pub fn with_health(mut self, health: Arc<Health>) -> Self {
        self.health = health;
        self
    }

    /// The loop's metrics (Prometheus text via [`Metrics::encode`]).
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// What the loop reports for the probes and `/status`.
    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    /// Starts the HTTP server (`/healthz`, `/readyz`, `/status`, `/metrics`,
    /// `/identity`, `/v1/probe/<node id>`) on `addr`, in the background.
    #[cfg(feature = "http")]
    pub async fn serve_http(&self, addr: std::net::SocketAddr) -> Result<()> {
        http::serve(
            addr,
            self.health.clone(),
            self.metrics.clone(),
            self.settings.prober.clone(),
            self.settings.sidecar_port,
        )
        .await
    }

    /// Runs the loop until `shutdown` completes, then deregisters this pod
    /// and flushes the hooks.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) {
        let hooks = self.settings.hooks.clone();
        let mut runner = runner::Runner::new(
            self.geth,
            self.registry,
            self.settings,
            self.metrics,
            self.health,
        );
        runner.event_loop(shutdown).await;
        runner.deregister().await;
        hooks.flush(std::time::Duration::from_secs(2)).await;
    }
}

/// Completes on SIGTERM or SIGINT (logged), for [`Sidecar::run_until`].
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: deregistering and exiting"),
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: deregistering and exiting"),
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the sidecar cleanly");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests;
