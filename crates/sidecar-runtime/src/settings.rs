//! Everything the loop needs, as plain data plus its ports.

use std::sync::Arc;
use std::time::Duration;

use reconcile_core as core;

use crate::error::Result;
use crate::identity::AdvertiseMode;
use crate::ports::{Clock, Hooks, NoHooks, PodSource, Prober, SystemClock};
use crate::probe::TcpProber;

/// The sidecar's settings: who this pod is, the engine's rules, the loop's
/// intervals, and the ports (clock, prober, pod source, hooks).
///
/// Build with [`Settings::new`] and override what you need.
#[derive(Clone)]
pub struct Settings {
    /// This pod's name: the key of its registry record.
    pub pod: String,
    /// This pod's IP (Downward API `status.podIP`), when known.
    pub pod_ip: Option<String>,
    /// This pod's UID (Downward API `metadata.uid`), when known.
    pub pod_uid: Option<String>,
    /// Which address the published enode carries.
    pub advertise: AdvertiseMode,
    /// The TCP port to publish (default: the listener port geth reports).
    pub p2p_port: Option<u16>,
    /// The engine's rules.
    pub engine: core::Config,
    /// The safety-net resync period (jittered by ±20 %).
    pub resync: Duration,
    /// How often members this geth is not connected to are probed.
    pub probe_interval: Duration,
    /// The port every sidecar's HTTP server listens on: members are probed
    /// there where geth would throttle a probe of its p2p port, and it
    /// answers who the member is.
    pub sidecar_port: u16,
    /// Seeds the resync jitter (from the OS when `None`).
    pub seed: Option<u64>,
    /// The wall clock.
    pub clock: Arc<dyn Clock>,
    /// How members are probed.
    pub prober: Arc<dyn Prober>,
    /// Pod evidence, when the sidecar may read pods.
    pub pods: Option<Arc<dyn PodSource>>,
    /// Who hears the loop's notices (Kubernetes Events in the binary).
    pub hooks: Arc<dyn Hooks>,
    /// geth's IPC socket, when geth is reached over IPC: while geth is down the
    /// loop runs a pass as soon as the socket accepts again
    /// ([`geth_ipc::socket_accepts_again`]), not at its next retry (a pod's
    /// sidecar starts before its geth).
    pub geth_socket: Option<std::path::PathBuf>,
}

impl Settings {
    /// Settings for the pod `pod` publishing per `advertise`, with the
    /// defaults of the binary: the engine's default rules, a 30 s resync, a
    /// 5 s probe interval, sidecar port 9090, the system clock, TCP probes,
    /// no pod evidence, no hooks and no geth socket to watch.
    pub fn new(pod: impl Into<String>, advertise: AdvertiseMode) -> Self {
        Self {
            pod: pod.into(),
            pod_ip: None,
            pod_uid: None,
            advertise,
            p2p_port: None,
            engine: core::Config::default(),
            resync: Duration::from_secs(30),
            probe_interval: Duration::from_secs(5),
            sidecar_port: 9090,
            seed: None,
            clock: Arc::new(SystemClock),
            prober: Arc::new(TcpProber::default()),
            pods: None,
            hooks: Arc::new(NoHooks),
            geth_socket: None,
        }
    }

    /// Checks the settings against each other: DEAD_AFTER must be at least
    /// two probe intervals, or one failed probe would count as a dead member.
    pub fn validate(&self) -> Result<()> {
        Ok(self.engine.validate(self.probe_interval)?)
    }
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("pod", &self.pod)
            .field("pod_ip", &self.pod_ip)
            .field("pod_uid", &self.pod_uid)
            .field("advertise", &self.advertise)
            .field("engine", &self.engine)
            .field("resync", &self.resync)
            .field("probe_interval", &self.probe_interval)
            .field("sidecar_port", &self.sidecar_port)
            .field("pod_evidence", &self.pods.is_some())
            .finish_non_exhaustive()
    }
}
