//! The event loop: watch events, geth peer events, probes and a jittered resync
//! all lead to one reconcile pass; reconcile-core decides, this module acts.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::StreamExt;
use geth_ipc::{AdminApi, Enode, NodeId, PeerEvent, PeerEventKind, PeerEventStream};
use peer_registry::{MemberRecord, PeerRegistry, Snapshot};
use rand::Rng;
use reconcile_core as core;
use tracing::{debug, info, warn};

use crate::config::RunArgs;
use crate::http::Health;
use crate::identity::AdvertiseMode;
use crate::metrics::Metrics;

/// Everything the loop needs, resolved from flags.
pub(crate) struct Settings {
    pub(crate) pod: String,
    pub(crate) pod_ip: Option<String>,
    pub(crate) pod_uid: Option<String>,
    pub(crate) advertise: AdvertiseMode,
    pub(crate) p2p_port: Option<u16>,
    pub(crate) engine: core::Config,
    pub(crate) resync: Duration,
    pub(crate) probe_interval: Duration,
    pub(crate) listen: SocketAddr,
    pub(crate) liveness_timeout: Option<Duration>,
    /// The namespace's pods, when READ_PODS is on.
    pub(crate) pods: Option<kube::Api<k8s_openapi::api::core::v1::Pod>>,
}

impl Settings {
    pub(crate) fn from_args(run: &RunArgs, namespace: &str) -> anyhow::Result<Self> {
        let pod = run
            .pod_name
            .clone()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .context("POD_NAME is not set (use the Downward API: fieldRef metadata.name)")?;
        let advertise = AdvertiseMode::resolve(
            run.advertise,
            run.pod_ip.as_deref(),
            &run.dns_template,
            &pod,
            &run.service_name,
            namespace,
        )
        .map_err(anyhow::Error::msg)?;
        Ok(Self {
            pod,
            pod_ip: run.pod_ip.clone(),
            pod_uid: run.pod_uid.clone(),
            advertise,
            p2p_port: run.p2p_port,
            engine: core::Config {
                trusted: run.trusted,
                dead_after: run.dead_after,
                grace_after_register: run.registration_grace,
                ..core::Config::default()
            },
            resync: run.resync_interval,
            probe_interval: run.probe_interval,
            listen: run.listen,
            liveness_timeout: run.checked_liveness_timeout().map_err(anyhow::Error::msg)?,
            pods: None,
        })
    }
}

/// Errors of geth's drop events that mean "registered but never usable".
///
/// geth v1.17.5 reports a network id, genesis or fork id mismatch in the drop
/// event only as "subprotocol error" (the detail stays in geth's debug log), so
/// that counts too. It only marks the peer unusable in reports and metrics; the
/// mark is cleared as soon as the peer completes the eth handshake.
fn is_incompatible(error: &str) -> bool {
    let e = error.to_ascii_lowercase();
    [
        "subprotocol error",
        "network id mismatch",
        "genesis mismatch",
        "fork id rejected",
        "incompatible",
    ]
    .iter()
    .any(|p| e.contains(p))
}

fn jittered(base: Duration) -> Duration {
    let f = rand::rng().random_range(0.8..1.2);
    base.mul_f64(f)
}

/// geth's state as the log reports it: one line per change.
#[derive(Debug, Clone, PartialEq, Eq)]
enum GethState {
    Unknown,
    Up,
    Down(String),
}

struct Runner<G, R> {
    geth: Arc<G>,
    registry: Arc<R>,
    s: Settings,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    snapshot: Option<Snapshot>,
    applied: BTreeMap<NodeId, Enode>,
    generation: u64,
    geth_state: GethState,
    me: Option<MemberRecord>,
    unreachable_since: BTreeMap<NodeId, jiff::Timestamp>,
    connected: BTreeSet<NodeId>,
    unusable: BTreeMap<NodeId, String>,
    last_problems: Vec<String>,
    last_report: String,
    pods_error: Option<String>,
    /// When the engine asked to be consulted again (a new pair's dial grace).
    recheck_at: Option<jiff::Timestamp>,
}

/// Runs the sidecar until SIGTERM/SIGINT, then deregisters and returns.
pub(crate) async fn run<G, R>(geth: Arc<G>, registry: Arc<R>, s: Settings) -> anyhow::Result<()>
where
    G: AdminApi + 'static,
    R: PeerRegistry + 'static,
{
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::new(s.liveness_timeout));
    crate::http::serve(s.listen, health.clone(), metrics.clone()).await?;
    info!(
        pod = %s.pod,
        advertise = ?s.advertise,
        version = env!("CARGO_PKG_VERSION"),
        "geth-peer-sidecar starting"
    );
    let mut r = Runner {
        geth,
        registry,
        s,
        metrics,
        health,
        snapshot: None,
        applied: BTreeMap::new(),
        generation: 0,
        geth_state: GethState::Unknown,
        me: None,
        unreachable_since: BTreeMap::new(),
        connected: BTreeSet::new(),
        unusable: BTreeMap::new(),
        last_problems: Vec::new(),
        last_report: String::new(),
        pods_error: None,
        recheck_at: None,
    };
    r.event_loop().await;
    r.deregister().await;
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => info!("SIGTERM: deregistering and exiting"),
                    _ = tokio::signal::ctrl_c() => info!("SIGINT: deregistering and exiting"),
                }
            }
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the sidecar cleanly");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

async fn next_event(events: &mut Option<PeerEventStream>) -> Option<geth_ipc::Result<PeerEvent>> {
    match events {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

impl<G: AdminApi, R: PeerRegistry> Runner<G, R> {
    async fn event_loop(&mut self) {
        let shutdown = shutdown_signal();
        tokio::pin!(shutdown);
        let mut watch = self.registry.watch();
        let mut events: Option<PeerEventStream> = None;
        let mut resync_at = tokio::time::Instant::now() + jittered(self.s.resync);
        let mut probe_at = tokio::time::Instant::now() + self.s.probe_interval;
        let mut retry_delay = Duration::from_millis(200);
        let mut dirty = true;
        let mut retry_at: Option<tokio::time::Instant> = None;
        loop {
            if dirty {
                dirty = false;
                match self.reconcile().await {
                    Ok(()) => {
                        retry_at = None;
                        retry_delay = Duration::from_millis(200);
                    }
                    Err(kind) => {
                        self.metrics
                            .reconcile_errors
                            .get_or_create(&Metrics::kind(kind))
                            .inc();
                        retry_at = Some(tokio::time::Instant::now() + retry_delay);
                        retry_delay = (retry_delay * 2).min(Duration::from_secs(5));
                    }
                }
                self.health.pass_completed();
                if events.is_none() && self.geth_state == GethState::Up {
                    match self.geth.peer_events().await {
                        Ok(stream) => events = Some(stream),
                        Err(e) => debug!(error = %e, "cannot subscribe to geth peer events yet"),
                    }
                }
            }
            let retry = async {
                match retry_at {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            let recheck = async {
                match self.recheck_at {
                    Some(at) => {
                        let wait = jiff::Timestamp::now().duration_until(at);
                        let wait = Duration::try_from(wait).unwrap_or(Duration::ZERO);
                        tokio::time::sleep(wait).await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = &mut shutdown => return,
                item = watch.next() => match item {
                    Some(Ok(snap)) => {
                        self.on_snapshot(snap);
                        dirty = true;
                    }
                    Some(Err(e)) => {
                        self.metrics.registry_errors.get_or_create(&Metrics::kind(e.kind())).inc();
                        warn!(error = %e, "registry watch error; retrying");
                    }
                    None => {
                        warn!("registry watch ended; restarting it");
                        watch = self.registry.watch();
                    }
                },
                ev = next_event(&mut events) => match ev {
                    Some(Ok(ev)) => dirty |= self.on_peer_event(ev),
                    Some(Err(e)) => {
                        info!(error = %e, "geth peer-event subscription ended (geth restarted?); checking geth");
                        events = None;
                        dirty = true;
                    }
                    None => {
                        events = None;
                        dirty = true;
                    }
                },
                _ = tokio::time::sleep_until(resync_at) => {
                    resync_at = tokio::time::Instant::now() + jittered(self.s.resync);
                    debug!("periodic resync");
                    dirty = true;
                }
                _ = tokio::time::sleep_until(probe_at) => {
                    probe_at = tokio::time::Instant::now() + self.s.probe_interval;
                    dirty |= self.probe_members().await;
                }
                _ = retry => dirty = true,
                _ = recheck => dirty = true,
            }
        }
    }

    fn on_snapshot(&mut self, snap: Snapshot) {
        if snap.problems != self.last_problems {
            for p in &snap.problems {
                warn!(problem = %p, "registry ConfigMap has a problem (it is skipped, and healed on the next write where possible)");
            }
            self.last_problems = snap.problems.clone();
        }
        self.metrics.members.set(snap.members.len() as i64);
        self.health.registry_synced.store(true, Ordering::Relaxed);
        self.snapshot = Some(snap);
    }

    /// Returns true when the event calls for a reconcile.
    fn on_peer_event(&mut self, ev: PeerEvent) -> bool {
        match ev.kind {
            PeerEventKind::Add => {
                self.connected.insert(ev.peer);
                self.unreachable_since.remove(&ev.peer);
                false
            }
            PeerEventKind::Drop => {
                self.connected.remove(&ev.peer);
                let err = ev.error.unwrap_or_default();
                if is_incompatible(&err) {
                    if self.unusable.insert(ev.peer, err.clone()).is_none() {
                        warn!(peer = %ev.peer.short(), error = %err, "peer is on another network or genesis: registered but unusable");
                    }
                    self.metrics.unusable_peers.set(self.unusable.len() as i64);
                    false
                } else {
                    debug!(peer = %ev.peer.short(), error = %err, "peer dropped");
                    true
                }
            }
            _ => false,
        }
    }

    /// TCP-probes members this geth is not connected to. True if anything changed.
    async fn probe_members(&mut self) -> bool {
        let Some(snap) = &self.snapshot else {
            return false;
        };
        let me = self.me.as_ref().map(|m| m.node_id);
        let targets: Vec<(NodeId, Enode)> = snap
            .members
            .values()
            .filter(|m| Some(m.node_id) != me && !self.connected.contains(&m.node_id))
            .map(|m| (m.node_id, m.enode.clone()))
            .collect();
        let probes = targets.into_iter().map(|(id, enode)| async move {
            let addr = format!("{}:{}", enode.host(), enode.tcp_port());
            let ok = matches!(
                tokio::time::timeout(
                    Duration::from_secs(2),
                    tokio::net::TcpStream::connect(&addr)
                )
                .await,
                Ok(Ok(_))
            );
            (id, ok)
        });
        let results = futures::future::join_all(probes).await;
        let now = jiff::Timestamp::now();
        let mut changed = false;
        for (id, ok) in results {
            if ok {
                changed |= self.unreachable_since.remove(&id).is_some();
            } else {
                // A new failure starts the clock; an ongoing one lets the engine
                // check whether dead-after has passed.
                if let std::collections::btree_map::Entry::Vacant(e) =
                    self.unreachable_since.entry(id)
                {
                    e.insert(now);
                    debug!(peer = %id.short(), "member unreachable from here");
                }
                changed = true;
            }
        }
        changed
    }

    fn set_geth_state(&mut self, state: GethState) {
        if state != self.geth_state {
            match &state {
                GethState::Up => info!("geth IPC answers"),
                GethState::Down(e) => {
                    warn!(error = %e, "waiting for geth IPC (retrying with backoff)")
                }
                GethState::Unknown => {}
            }
            self.health
                .geth_ok
                .store(state == GethState::Up, Ordering::Relaxed);
            self.geth_state = state;
        }
    }

    fn geth_error(&mut self, e: &geth_ipc::Error) -> &'static str {
        self.metrics
            .geth_rpc_errors
            .get_or_create(&Metrics::kind(e.kind()))
            .inc();
        self.set_geth_state(GethState::Down(e.to_string()));
        "geth"
    }

    /// The namespace's pods as pod evidence (READ_PODS). `None` when off or when
    /// the list fails: the engine then falls back to reachability evidence.
    async fn pod_evidence(&mut self) -> Option<BTreeMap<String, core::PodObservation>> {
        let api = self.s.pods.as_ref()?;
        match api.list(&kube::api::ListParams::default()).await {
            Ok(list) => {
                if self.pods_error.take().is_some() {
                    info!("reading pods works again: pod evidence is back");
                }
                Some(
                    list.items
                        .into_iter()
                        .filter_map(|p| {
                            let name = p.metadata.name?;
                            let obs = core::PodObservation {
                                uid: p.metadata.uid,
                                ip: p.status.and_then(|s| s.pod_ip),
                            };
                            Some((name, obs))
                        })
                        .collect(),
                )
            }
            Err(e) => {
                let msg = match &e {
                    kube::Error::Api(s) if s.code == 403 => format!(
                        "READ_PODS is on but the Role does not grant pods list ({}): apply deploy/overlays/pod-evidence or turn READ_PODS off; falling back to reachability evidence",
                        s.message
                    ),
                    other => {
                        format!("cannot list pods ({other}); falling back to reachability evidence")
                    }
                };
                if self.pods_error.as_deref() != Some(msg.as_str()) {
                    warn!("{msg}");
                    self.pods_error = Some(msg);
                }
                None
            }
        }
    }

    /// One pass: observe, decide, act. Errors return a metric label.
    async fn reconcile(&mut self) -> Result<(), &'static str> {
        let started = Instant::now();
        self.metrics.reconciles.inc();
        let info = match self.geth.node_info().await {
            Ok(i) => i,
            Err(e) => return Err(self.geth_error(&e)),
        };
        let generation = self.geth.connection_generation();
        if generation != self.generation {
            if self.generation != 0 {
                info!(
                    applied = self.applied.len(),
                    "geth connection re-established (geth restarted?): re-applying every peer"
                );
            }
            self.metrics.geth_reconnects.inc();
            self.applied.clear();
            self.connected.clear();
            self.generation = generation;
        }
        self.set_geth_state(GethState::Up);
        let advertised = match self.s.advertise.advertised(&info, self.s.p2p_port) {
            Ok(e) => e,
            Err(msg) => {
                warn!("{msg}");
                return Err("advertise");
            }
        };
        let peers = match self.geth.peers().await {
            Ok(p) => p,
            Err(e) => return Err(self.geth_error(&e)),
        };
        self.connected = peers.iter().map(|p| p.id).collect();
        for p in &peers {
            if p.eth_ready() {
                self.unusable.remove(&p.id);
            }
        }
        if self.snapshot.is_none() {
            match self.registry.snapshot().await {
                Ok(s) => self.on_snapshot(s),
                Err(e) => {
                    self.metrics
                        .registry_errors
                        .get_or_create(&Metrics::kind(e.kind()))
                        .inc();
                    warn!(error = %e, "cannot read the registry; geth's peers stay as they are");
                    return Err("registry");
                }
            }
        }
        let now = jiff::Timestamp::now();
        let me = core::SelfIdentity {
            pod: self.s.pod.clone(),
            node_id: info.id,
            advertised,
            pod_uid: self.s.pod_uid.clone(),
            pod_ip: self.s.pod_ip.clone(),
            sidecar_version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        let connected: BTreeMap<NodeId, core::PeerObservation> = peers
            .iter()
            .map(|p| {
                (
                    p.id,
                    core::PeerObservation {
                        eth_ready: p.eth_ready(),
                        inbound: p.network.inbound,
                    },
                )
            })
            .collect();
        let pods = self.pod_evidence().await;
        let obs = core::Observation {
            connected: &connected,
            pods: pods.as_ref(),
            unreachable_since: &self.unreachable_since,
            unusable: &self.unusable,
            ..core::Observation::new(now, &me, self.snapshot.as_ref(), &self.applied)
        };
        let plan = core::plan(&self.s.engine, &obs);
        for problem in &plan.report.problems {
            if !self.last_problems.contains(&problem.to_string()) {
                warn!(problem = %problem, "configuration or registry problem");
            }
        }
        for removal in &plan.report.removals {
            info!("{removal}");
        }
        let mut result = Ok(());
        for action in plan.registry.clone() {
            if let Err(kind) = self.apply_registry(action).await {
                result = Err(kind);
            }
        }
        for action in &plan.geth {
            if let Err(kind) = self.apply_geth(action).await {
                result = Err(kind);
                break;
            }
        }
        self.me = self
            .snapshot
            .as_ref()
            .and_then(|s| s.members.get(&self.s.pod).cloned());
        let report = &plan.report;
        self.health
            .publish(&self.s.pod, report, self.snapshot.as_ref(), &self.connected);
        self.recheck_at = report.recheck_at;
        self.metrics.desired_peers.set(report.desired as i64);
        self.metrics.connected_peers.set(report.connected as i64);
        self.metrics.missing_peers.set(report.missing.len() as i64);
        self.metrics.unusable_peers.set(self.unusable.len() as i64);
        self.metrics
            .suspected_partition
            .set(i64::from(report.suspected_partition));
        let summary = report.to_string();
        if summary != self.last_report {
            info!("{summary}");
            self.last_report = summary;
        }
        self.metrics
            .reconcile_duration
            .observe(started.elapsed().as_secs_f64());
        if result.is_ok() {
            self.metrics.last_sync.set(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0),
            );
        }
        result
    }

    async fn apply_registry(&mut self, action: core::RegistryAction) -> Result<(), &'static str> {
        let (label, res) = match action {
            core::RegistryAction::Upsert(rec) => {
                info!(pod = %rec.pod, node = %rec.node_id.short(), enode = %rec.enode, "registering self");
                ("upsert", self.registry.upsert(rec).await)
            }
            core::RegistryAction::Remove(recs) => {
                for r in &recs {
                    info!(pod = %r.pod, node = %r.node_id.short(), "removing member from the registry");
                }
                ("remove", self.registry.remove(recs).await)
            }
        };
        match res {
            Ok(snap) => {
                self.metrics
                    .registry_writes
                    .get_or_create(&Metrics::kind(label))
                    .inc();
                self.on_snapshot(snap);
                Ok(())
            }
            Err(e) => {
                self.metrics
                    .registry_errors
                    .get_or_create(&Metrics::kind(e.kind()))
                    .inc();
                self.health.registry_synced.store(false, Ordering::Relaxed);
                warn!(error = %e, "registry {label} failed; will retry");
                Err("registry")
            }
        }
    }

    async fn apply_geth(&mut self, action: &core::GethAction) -> Result<(), &'static str> {
        use core::GethAction as A;
        let (label, enode) = match action {
            A::AddPeer(e) => ("add_peer", e),
            A::RemovePeer(e) => ("remove_peer", e),
            A::AddTrustedPeer(e) => ("add_trusted_peer", e),
            A::RemoveTrustedPeer(e) => ("remove_trusted_peer", e),
        };
        let res = match action {
            A::AddPeer(e) => self.geth.add_peer(e).await,
            A::RemovePeer(e) => self.geth.remove_peer(e).await,
            A::AddTrustedPeer(e) => self.geth.add_trusted_peer(e).await,
            A::RemoveTrustedPeer(e) => self.geth.remove_trusted_peer(e).await,
        };
        match res {
            Ok(_) => {
                info!(action = label, node = %enode.node_id().short(), enode = %enode, "geth");
                self.metrics
                    .geth_actions
                    .get_or_create(&Metrics::kind(label))
                    .inc();
                core::apply(&mut self.applied, std::slice::from_ref(action));
                Ok(())
            }
            Err(e) => {
                warn!(action = label, node = %enode.node_id().short(), error = %e, "geth call failed");
                Err(self.geth_error(&e))
            }
        }
    }

    /// Removes our own record with a conditional write, bounded so the pod's
    /// termination grace period is never exceeded.
    async fn deregister(&mut self) {
        let Some(me) = self.me.clone() else {
            info!("not registered; nothing to deregister");
            return;
        };
        match tokio::time::timeout(Duration::from_secs(10), self.registry.remove(vec![me])).await {
            Ok(Ok(_)) => info!("deregistered"),
            Ok(Err(e)) => {
                warn!(error = %e, "could not deregister; other sidecars will drop this member once it is unreachable")
            }
            Err(_) => warn!("deregistration timed out after 10 s"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mismatch_drops_are_incompatible_and_ordinary_drops_are_not() {
        assert!(is_incompatible("subprotocol error"));
        assert!(is_incompatible("network ID mismatch (1 != 2)"));
        assert!(is_incompatible("genesis mismatch"));
        assert!(!is_incompatible("disconnect requested"));
        assert!(!is_incompatible("EOF"));
    }
}
