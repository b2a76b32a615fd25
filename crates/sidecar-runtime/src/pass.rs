//! One pass: observe → track → plan → execute → publish.

use std::collections::BTreeMap;
use std::time::Instant;

use geth_ipc::{AdminApi, Enode, Host, NodeInfo, PeerInfo};
use peer_registry::{PeerRegistry, Snapshot};
use reconcile_core as core;
use tracing::{debug, info, warn};

use crate::error::{AdvertiseError, PassError};
use crate::metrics::Metrics;
use crate::notice::Notice;
use crate::ports::PodEvidence;
use crate::runner::{GethState, Runner};

/// What one pass read: geth, the registry when none is held, the pods.
pub(crate) struct Observed {
    pub(crate) info: NodeInfo,
    pub(crate) generation: u64,
    pub(crate) peers: Vec<PeerInfo>,
    /// The registry, read because none was held.
    pub(crate) read: Option<Snapshot>,
    /// Why the registry could not be read (geth's part is taken in first).
    pub(crate) read_error: Option<peer_registry::Error>,
}

/// Pod evidence for a pass, when available.
#[derive(Default)]
pub(crate) struct Pods {
    pub(crate) pods: Option<BTreeMap<String, core::PodObservation>>,
    pub(crate) gone: BTreeMap<String, String>,
}

/// How long a start waits for geth's node info to register while the
/// registry is read (geth answers in well under a millisecond; a geth still
/// starting is left to the first pass).
const EARLY_GETH_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// How long a pass waits for a registry read while it holds a snapshot
/// (the resync's read): past that it goes on with the snapshot held.
const HELD_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl<G: AdminApi, R: PeerRegistry> Runner<G, R> {
    /// One pass. Errors are counted and retried by the loop.
    pub(crate) async fn pass(&mut self) -> Result<(), PassError> {
        let started = Instant::now();
        self.metrics.reconciles.inc();
        let observed = self.observe().await?;
        let (advertised, node_id) = self.track(observed)?;
        let pods = self.pod_evidence().await;
        self.resolve_members().await;
        let now = self.s.clock.now();
        let me = self.self_identity(node_id, advertised);
        let plan = self.plan(now, &me, &pods);
        self.last_me = Some(me);
        self.last_pods = pods;
        let result = self.execute(&plan, now).await;
        self.publish(&plan.report, now, started, result.is_ok());
        result
    }

    /// This node as the engine sees it, with geth's `node_id` and the enode
    /// it advertises.
    fn self_identity(&self, node_id: geth_ipc::NodeId, advertised: Enode) -> core::SelfIdentity {
        core::SelfIdentity {
            pod: self.s.pod.clone(),
            node_id,
            advertised,
            pod_uid: self.s.pod_uid.clone(),
            pod_ip: self.s.pod_ip.clone(),
            sidecar_version: env!("CARGO_PKG_VERSION").to_owned(),
        }
    }

    /// At start, before the registry's first read arrives: when geth
    /// answers at once, starts a [`PeerRegistry::create`] of this pod's
    /// record, so the registration overlaps the read instead of following
    /// it (the lease layout creates the Lease; a pod that has a record
    /// keeps it, and the first pass decides what to update). Anything
    /// wrong (geth not up yet, no usable address) is left to the first
    /// pass, which reports it.
    pub(crate) async fn register_early(&mut self) {
        let Ok(Ok(info)) = tokio::time::timeout(EARLY_GETH_WAIT, self.geth.node_info()).await
        else {
            return;
        };
        let Ok(advertised) = self.s.advertise.advertised(&info, self.s.p2p_port) else {
            return;
        };
        let me = self.self_identity(info.id, advertised);
        let now = self.s.clock.now();
        if let Ok(record) = core::own_record(&me, None, now) {
            // The list may come later than the create lands: who dials
            // first is then decided as for a list learned late.
            self.tracker.on_registration_sent(record.node_id, now);
            self.start_creating(record);
        }
    }

    /// Reads geth (node info, connection generation, peers) and, when no
    /// snapshot is held, the registry.
    async fn observe(&mut self) -> Result<Observed, PassError> {
        let info = match self.geth.node_info().await {
            Ok(i) => i,
            Err(e) => return Err(self.geth_down(e)),
        };
        let generation = self.geth.connection_generation();
        let peers = match self.geth.peers().await {
            Ok(p) => p,
            Err(e) => return Err(self.geth_down(e)),
        };
        let held = self.tracker.snapshot().is_some();
        let (read, read_error) = if held && !self.reread_due {
            (None, None)
        } else {
            let read = self.registry.snapshot();
            let read = if held {
                // A resync's read must not hold the loop on an apiserver that
                // accepts but does not answer: the pass goes on with the
                // snapshot held and reads again at the next pass.
                tokio::time::timeout(HELD_READ_TIMEOUT, read).await.ok()
            } else {
                Some(read.await)
            };
            match read {
                None => {
                    self.metrics
                        .registry_errors
                        .get_or_create(&Metrics::kind("unavailable"))
                        .inc();
                    warn!(
                        after = ?HELD_READ_TIMEOUT,
                        "the registry did not answer a read; going on with the registry as last \
                         seen and reading again at the next pass (check the apiserver)"
                    );
                    (None, None)
                }
                Some(Ok(s)) => (Some(s), None),
                Some(Err(e)) => {
                    self.metrics
                        .registry_errors
                        .get_or_create(&Metrics::kind(e.kind()))
                        .inc();
                    warn!(error = %e, "cannot read the registry; geth's peers stay as they are");
                    // With a snapshot held, the pass goes on with it; the
                    // read is tried again at the next pass.
                    (None, (!held).then_some(e))
                }
            }
        };
        Ok(Observed {
            info,
            generation,
            peers,
            read,
            read_error,
        })
    }

    /// Takes what was observed into the tracker; returns the enode to
    /// publish (an unspecified host when this node cannot register: the
    /// engine then skips our own record and peers with the others).
    fn track(&mut self, observed: Observed) -> Result<(Enode, geth_ipc::NodeId), PassError> {
        match self.tracker.on_geth_generation(observed.generation) {
            core::GenerationChange::Reconnected { applied_before } => {
                info!(
                    applied = applied_before,
                    "geth connection re-established (geth restarted?): re-applying every peer"
                );
                self.metrics.geth_reconnects.inc();
            }
            core::GenerationChange::First => {
                self.metrics.geth_reconnects.inc();
            }
            core::GenerationChange::Same => {}
        }
        self.set_geth_state(GethState::Up);
        self.health.set_identity(&self.s.pod, observed.info.id);
        self.tracker.on_peers(observed.peers.iter().map(|p| {
            (
                p.id,
                core::PeerObservation {
                    eth_ready: p.eth_ready(),
                    inbound: p.network.inbound,
                },
            )
        }));
        if let Some(e) = observed.read_error {
            return Err(PassError::RegistryRead(e));
        }
        if let Some(snap) = observed.read {
            self.on_read(snap);
        }
        match self.s.advertise.advertised(&observed.info, self.s.p2p_port) {
            Ok(e) => {
                self.set_advertise_problem(None);
                Ok((e, observed.info.id))
            }
            Err(problem) => {
                self.set_advertise_problem(Some(problem.clone()));
                match observed.info.parsed_enode() {
                    Ok(e) => Ok((
                        e.with_host(Host::Ip(std::net::Ipv4Addr::UNSPECIFIED.into())),
                        observed.info.id,
                    )),
                    Err(_) => Err(PassError::Advertise(problem)),
                }
            }
        }
    }

    /// The engine's plan for this pass, its problems and removals logged.
    pub(crate) fn plan(
        &mut self,
        now: jiff::Timestamp,
        me: &core::SelfIdentity,
        pods: &Pods,
    ) -> core::Plan {
        // While this pod's upsert is in flight, the engine is shown its record
        // as ours: it plans no second upsert and decides who dials first by
        // the time the other members will see on it.
        // A create stands in only where the registry shows no record (a
        // stored one is kept by it).
        let with_own = self.writing.as_ref().and_then(|w| {
            let own = w.own.as_ref()?;
            let held = self.tracker.snapshot()?;
            if w.create_only && held.members.contains_key(&own.pod) {
                return None;
            }
            let mut snap = held.clone();
            snap.members.insert(own.pod.clone(), own.clone());
            Some(snap)
        });
        let obs = core::Observation {
            pods_gone: &pods.gone,
            registry: with_own.as_ref().or(self.tracker.snapshot()),
            ..self.tracker.observation(now, me, pods.pods.as_ref())
        };
        let mut plan = core::plan(&self.s.engine, &obs);
        let held_back = self.writing.is_some() && !plan.registry.is_empty();
        if held_back {
            // Planned again by the pass after the writes in flight land.
            debug!(
                writes = plan.registry.len(),
                "registry writes wait for the ones in flight"
            );
            plan.registry.clear();
            self.held_back = true;
        }
        let problems: Vec<String> = plan
            .report
            .problems
            .iter()
            .map(ToString::to_string)
            .collect();
        if let Some(before) = self.reported.engine_problems.update(problems.clone()) {
            let before = before.unwrap_or_default();
            for p in problems.iter().filter(|p| !before.contains(p)) {
                warn!(problem = %p, "configuration or registry problem");
            }
            for gone in before.iter().filter(|p| !problems.contains(p)) {
                info!(problem = %gone, "problem resolved");
            }
        }
        self.report_removals(&plan.report, held_back);
        plan
    }

    /// Logs (WARN, with the evidence) and notices the removals a plan makes;
    /// those `held_back` behind a write in flight only at DEBUG: the pass
    /// after it lands plans them again, and reports them then.
    fn report_removals(&self, report: &core::Report, held_back: bool) {
        if held_back {
            for removal in &report.removals {
                debug!(pod = %removal.record.pod, evidence = %removal.reason,
                       "removal waits for the registry write in flight");
            }
            for (enode, why) in &report.legacy_removals {
                debug!(enode = %enode, evidence = %why,
                       "legacy removal waits for the registry write in flight");
            }
            return;
        }
        for removal in &report.removals {
            warn!(
                pod = %removal.record.pod,
                node = %removal.record.node_id.short(),
                evidence = %removal.reason,
                "{removal}"
            );
            self.s.hooks.notice(Notice::MemberRemoved {
                pod: removal.record.pod.clone(),
                evidence: removal.reason.to_string(),
            });
        }
        for (enode, why) in &report.legacy_removals {
            warn!(enode = %enode, evidence = %why, "legacy member {why}: removing it");
        }
    }

    /// Pod evidence from the pod source, when there is one and it is current.
    async fn pod_evidence(&mut self) -> Pods {
        let Some(source) = self.s.pods.clone() else {
            return Pods::default();
        };
        let members: Vec<String> = self
            .tracker
            .snapshot()
            .iter()
            .flat_map(|s| s.members.keys().cloned())
            .chain([self.s.pod.clone()])
            .collect();
        let (pods, error) = match source.evidence(members).await {
            PodEvidence::Ready { pods, gone } => (
                Pods {
                    pods: Some(pods),
                    gone,
                },
                None,
            ),
            PodEvidence::Syncing => (Pods::default(), None),
            PodEvidence::Failed(msg) => (Pods::default(), Some(msg)),
        };
        self.metrics
            .pod_evidence
            .set(i64::from(pods.pods.is_some()));
        if let Some(before) = self.reported.pods_error.update(error.clone()) {
            *crate::health::lock(&self.health.pod_evidence_problem) = error.clone();
            match &error {
                Some(msg) => {
                    warn!(
                        "pod evidence unavailable, removals fall back to agreement between members: {msg}"
                    );
                    self.s.hooks.notice(Notice::PodEvidenceLost {
                        reason: msg.clone(),
                    });
                }
                None if before.flatten().is_some() => info!("pod evidence is back"),
                None => {}
            }
        }
        pods
    }

    /// Resolves the DNS hosts of the registry's members (and legacy
    /// entries), so the engine holds them to the same address rules as IPs.
    async fn resolve_members(&mut self) {
        let Some(snap) = self.tracker.snapshot() else {
            return;
        };
        let names: Vec<(geth_ipc::NodeId, String, u16)> = snap
            .members
            .values()
            .map(|m| &m.enode)
            .chain(&snap.legacy)
            .filter_map(|e| match e.host() {
                Host::Dns(name) => Some((e.node_id(), name.clone(), e.tcp_port())),
                Host::Ip(_) => None,
            })
            .collect();
        if names.is_empty() {
            self.tracker.on_resolved(BTreeMap::new());
            return;
        }
        let lookups = names.into_iter().map(|(id, name, port)| async move {
            let found = tokio::time::timeout(
                std::time::Duration::from_secs(2),
                tokio::net::lookup_host((name.as_str(), port)),
            )
            .await;
            let ips = match found {
                Ok(Ok(addrs)) => addrs.map(|a| a.ip()).collect(),
                _ => Vec::new(),
            };
            (id, ips)
        });
        let resolved = futures::future::join_all(lookups)
            .await
            .into_iter()
            .collect();
        self.tracker.on_resolved(resolved);
    }

    /// geth did not answer: its connections are unknown from now on.
    pub(crate) fn geth_down(&mut self, e: geth_ipc::Error) -> PassError {
        self.tracker.on_geth_down();
        self.health.clear_identity();
        self.metrics
            .geth_rpc_errors
            .get_or_create(&Metrics::kind(e.kind()))
            .inc();
        self.set_geth_state(GethState::Down(e.to_string()));
        PassError::Geth(e)
    }

    /// Logs a change of geth's state and shows it on /readyz.
    pub(crate) fn set_geth_state(&mut self, state: GethState) {
        if self.reported.geth.update(state.clone()).is_none() {
            return;
        }
        match &state {
            GethState::Up => info!("geth IPC answers"),
            GethState::Down(e) => warn!(error = %e, "waiting for geth IPC (retrying with backoff)"),
        }
        self.health
            .geth_ok
            .store(state == GethState::Up, std::sync::atomic::Ordering::Relaxed);
    }

    /// Logs a change of the advertise problem and shows it on /readyz.
    fn set_advertise_problem(&mut self, problem: Option<AdvertiseError>) {
        let Some(before) = self.reported.advertise.update(problem.clone()) else {
            return;
        };
        match &problem {
            Some(p) => warn!("not registering this node, peering with the others: {p}"),
            None if before.flatten().is_some() => info!("the advertised address is usable again"),
            None => {}
        }
        *crate::health::lock(&self.health.advertise_problem) = problem.map(|p| p.to_string());
    }
}
