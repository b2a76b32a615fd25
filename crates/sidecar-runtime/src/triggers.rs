//! What wakes the loop: registry watch items, geth peer events, probes. Each
//! is taken in here (into the tracker) and says whether a pass is due.

use std::time::Duration;

use futures::{FutureExt as _, StreamExt as _};
use geth_ipc::{AdminApi, PeerEvent, PeerEventStream};
use peer_registry::{PeerRegistry, Snapshot};
use rand::Rng as _;
use reconcile_core as core;
use tracing::{debug, info, warn};

use crate::metrics::Metrics;
use crate::notice::Notice;
use crate::probe::ProbeVia;
use crate::runner::Runner;

/// The registry's watch, as the event loop holds it.
pub(crate) type WatchStream = futures::stream::BoxStream<'static, peer_registry::Result<Snapshot>>;

/// The registry watch and whether it has delivered its list yet: its first
/// snapshot is that list, the later ones are changes.
pub(crate) struct Watch {
    pub(crate) stream: WatchStream,
    pub(crate) listed: bool,
}

/// What the registry watch yielded since the event loop last took it in.
#[derive(Default)]
pub(crate) struct WatchItems {
    /// The newest snapshot.
    pub(crate) newest: Option<Snapshot>,
    /// Snapshots replaced by a newer one before they were taken in.
    pub(crate) coalesced: usize,
    pub(crate) errors: Vec<peer_registry::Error>,
    /// The stream ended (it is restarted).
    pub(crate) ended: bool,
}

impl WatchItems {
    pub(crate) fn push(&mut self, item: Option<peer_registry::Result<Snapshot>>) {
        match item {
            Some(Ok(snap)) => {
                if self.newest.replace(snap).is_some() {
                    self.coalesced += 1;
                }
            }
            Some(Err(e)) => self.errors.push(e),
            None => self.ended = true,
        }
    }

    /// `first` and everything else the watch has ready.
    pub(crate) fn drain(first: Option<peer_registry::Result<Snapshot>>, watch: &mut Watch) -> Self {
        let mut items = Self::default();
        items.push(first);
        while !items.ended {
            match watch.stream.next().now_or_never() {
                Some(item) => items.push(item),
                None => break,
            }
        }
        items
    }
}

/// The next geth peer event, or never while there is no subscription.
pub(crate) async fn next_event(
    events: &mut Option<PeerEventStream>,
) -> Option<geth_ipc::Result<PeerEvent>> {
    match events {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

/// `base` ± 20 %, in whole milliseconds (tokio's timer resolution; whole
/// milliseconds also keep the simulation's runs identical from run to run).
pub(crate) fn jittered(rng: &mut rand::rngs::StdRng, base: Duration) -> Duration {
    let ms = u64::try_from(base.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rng.random_range(ms - ms / 5..=ms + ms / 5))
}

impl<G: AdminApi, R: PeerRegistry> Runner<G, R> {
    /// A new registry watch: its first snapshot will be its list.
    pub(crate) fn open_watch(&self) -> Watch {
        Watch {
            stream: self.registry.watch(),
            listed: false,
        }
    }

    /// [`Runner::on_watch_items`], then a new watch in place of `watch` if
    /// that one ended. True when a pass is due.
    pub(crate) fn take_watch_items(&mut self, items: WatchItems, watch: &mut Watch) -> bool {
        if let Some(reopened) = self.reopened.take() {
            // The old watch's items carry etcd's old numbering: only its
            // errors count.
            self.count_watch_errors(&items.errors);
            *watch = reopened;
            return false;
        }
        let ended = items.ended;
        let due = self.on_watch_items(items, watch);
        if ended {
            *watch = self.open_watch();
        }
        due
    }

    /// Takes in what the registry watch yielded since the last look: the
    /// newest snapshot (each is the whole registry, so older ones add nothing)
    /// unless it is stale, and every error. True when a pass is due.
    fn on_watch_items(&mut self, items: WatchItems, watch: &mut Watch) -> bool {
        self.count_watch_errors(&items.errors);
        if items.ended {
            warn!("registry watch ended; restarting it");
        }
        if items.coalesced > 0 {
            debug!(
                skipped = items.coalesced,
                "registry watch events taken together; only the newest counts"
            );
        }
        let Some(snap) = items.newest else {
            // Errors alone: the pass reads the registry (`reread_due`) now,
            // not at the next resync. The watcher's own backoff paces them.
            return !items.errors.is_empty();
        };
        let event_version = snap.resource_version.clone();
        let listed = !watch.listed;
        match self
            .tracker
            .on_watch_snapshot(self.s.clock.now(), snap, listed)
        {
            core::WatchVerdict::Taken => {
                watch.listed = true;
                self.took_snapshot();
                true
            }
            core::WatchVerdict::Stale => {
                debug!(
                    event = event_version.as_deref().unwrap_or("-"),
                    "registry watch event older than the snapshot held; ignored"
                );
                false
            }
            core::WatchVerdict::Reread => {
                debug!("registry watch reports no registry; reading it afresh");
                true
            }
        }
    }

    /// Counts and logs the watch's errors; the next pass reads the registry
    /// (the watch may resume from a version etcd no longer has).
    fn count_watch_errors(&mut self, errors: &[peer_registry::Error]) {
        for e in errors {
            self.metrics
                .registry_errors
                .get_or_create(&Metrics::kind(e.kind()))
                .inc();
            warn!(error = %e, "registry watch error; retrying");
        }
        self.reread_due |= !errors.is_empty();
    }

    /// A snapshot returned by a write: into the tracker, unless older than
    /// the one held. Returns whether it was taken.
    pub(crate) fn on_snapshot(&mut self, snap: Snapshot) -> bool {
        let taken = self.tracker.on_snapshot(self.s.clock.now(), snap);
        if taken {
            self.took_snapshot();
        }
        taken
    }

    /// A snapshot the pass read: into the tracker, whatever its version. When
    /// the registry's versions went back (etcd restored or wiped), the watch
    /// is opened anew: the old one waits for a version the new etcd has not
    /// reached and would stay silent.
    pub(crate) fn on_read(&mut self, snap: Snapshot) {
        self.reread_due = false;
        if let core::ReadVerdict::WentBack { from, to } =
            self.tracker.on_read_snapshot(self.s.clock.now(), snap)
        {
            let detail = match &to {
                Some(to) => format!(
                    "the registry's resourceVersion went back from {from} to {to}: etcd restored \
                     or wiped? taking the apiserver's current state (this pod registers again) \
                     and watching it anew"
                ),
                None => format!(
                    "the registry is gone (last resourceVersion {from}) before its watch \
                     reported a deletion: deleted while the watch lagged or was down (by hand?), \
                     or etcd restored or wiped; taking the apiserver's current state (this pod \
                     registers again) and watching it anew"
                ),
            };
            warn!(from, to = to.as_deref().unwrap_or("none"), "{detail}");
            self.s.hooks.notice(Notice::RegistryWentBack { detail });
            self.reopened = Some(self.open_watch());
        }
        self.took_snapshot();
    }

    /// Reports what a snapshot newly taken in says about the registry.
    fn took_snapshot(&mut self) {
        let Some(snap) = self.tracker.snapshot() else {
            return;
        };
        if self
            .reported
            .registry_problems
            .update(snap.problems.clone())
            .is_some()
        {
            for p in &snap.problems {
                warn!(problem = %p, "registry ConfigMap has a problem (it is skipped, and healed on the next write where possible)");
            }
        }
        self.metrics.members.set(snap.members.len() as i64);
        self.health
            .registry_synced
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Takes in `first` and every other peer event geth has ready, as the
    /// watch's items are: one pass for all of them (one each made the 29
    /// links of a node forming cost up to 29 passes, each an `admin_peers`).
    /// Drops the subscription when it ended. True when a pass is due.
    pub(crate) fn on_peer_events(
        &mut self,
        first: Option<geth_ipc::Result<PeerEvent>>,
        events: &mut Option<PeerEventStream>,
    ) -> bool {
        let mut dirty = false;
        let mut next = Some(first);
        while let Some(item) = next {
            match item {
                Some(Ok(ev)) => dirty |= self.on_peer_event(&ev),
                Some(Err(e)) => {
                    info!(error = %e, "geth peer-event subscription ended (geth restarted?); checking geth");
                    *events = None;
                    dirty = true;
                }
                None => {
                    *events = None;
                    dirty = true;
                }
            }
            next = events.as_mut().and_then(|s| s.next().now_or_never());
        }
        dirty
    }

    /// One peer event into the tracker. True when a pass is due (any change
    /// of the peer set but an incompatible peer's drop, which geth's redial
    /// repeats).
    pub(crate) fn on_peer_event(&mut self, ev: &PeerEvent) -> bool {
        match self.tracker.on_peer_event(ev) {
            core::PeerEventEffect::PassDue => true,
            core::PeerEventEffect::Unusable { error, first } => {
                if first {
                    self.s.hooks.notice(Notice::PeerUnusable {
                        peer: self.tracker.peer_name(&ev.peer),
                        error: error.clone(),
                    });
                    warn!(peer = %ev.peer.short(), error = %error, "peer is on another network or genesis: registered but unusable");
                }
                self.metrics
                    .unusable_peers
                    .set(self.tracker.unusable().len() as i64);
                false
            }
            core::PeerEventEffect::Ignored => false,
        }
    }

    /// One round of probes: the members this geth is not connected to. True
    /// when a pass is due.
    pub(crate) async fn probe_round(&mut self) -> bool {
        let probed = self.probe_members().await;
        let confirmed = self.confirm_suspects().await;
        probed || confirmed
    }

    /// Indirect probes (as in SWIM): for each member the engine awaits
    /// agreement on (unreachable from here for DEAD_AFTER, no pod evidence),
    /// asks the sidecars of up to `confirmations_needed + 1` other members
    /// this geth is connected to whether they reach it. The answers go to the
    /// tracker; the engine removes the member only when enough answered and
    /// all found it unreachable. True when a round was recorded.
    async fn confirm_suspects(&mut self) -> bool {
        let Some(snap) = self.tracker.snapshot() else {
            return false;
        };
        if self.awaiting.is_empty() {
            return false;
        }
        let want = self.s.engine.confirmations_needed + 1;
        let connected = self.tracker.connected();
        let me = self.last_me.as_ref().map(|m| m.node_id);
        let checked = crate::health::lock(&self.health.probe_targets).clone();
        let mut helpers: Vec<(geth_ipc::Enode, Vec<std::net::SocketAddr>)> = snap
            .members
            .values()
            .filter(|m| connected.contains_key(&m.node_id) && Some(m.node_id) != me)
            .filter_map(|m| {
                let (_, addresses) = checked.get(&m.node_id)?;
                Some((m.enode.clone(), addresses.clone()))
            })
            .collect();
        // Other helpers each round: a few that never answer (an older sidecar,
        // a blocked port) must not stall agreement for good.
        rand::seq::SliceRandom::shuffle(helpers.as_mut_slice(), &mut self.rng);
        let suspects: Vec<geth_ipc::Enode> = self
            .awaiting
            .iter()
            .filter_map(|p| {
                snap.member_by_node_id(&p.node_id)
                    .map(|m| m.enode.clone())
                    .or_else(|| {
                        snap.legacy
                            .iter()
                            .find(|e| e.node_id() == p.node_id)
                            .cloned()
                    })
            })
            .collect();
        let port = self.s.sidecar_port;
        let prober = self.s.prober.clone();
        let rounds = suspects.into_iter().map(|suspect| {
            let asked: Vec<(geth_ipc::Enode, Vec<std::net::SocketAddr>)> = helpers
                .iter()
                .filter(|(h, _)| h.node_id() != suspect.node_id())
                .take(want)
                .cloned()
                .collect();
            let prober = prober.clone();
            async move {
                let answers = futures::future::join_all(
                    asked
                        .iter()
                        .map(|(h, addresses)| prober.ask(h, addresses, &suspect, port)),
                )
                .await;
                (suspect, asked.len(), answers)
            }
        });
        let rounds = futures::future::join_all(rounds).await;
        let now = self.s.clock.now();
        for (suspect, asked, answers) in &rounds {
            let unreachable = answers.iter().filter(|a| **a == Some(false)).count();
            let reachable = answers.iter().filter(|a| **a == Some(true)).count();
            self.metrics.indirect_probes.inc_by(*asked as u64);
            if reachable > 0 {
                info!(
                    member = %self.tracker.peer_name(&suspect.node_id()),
                    reachable, unreachable, asked,
                    "a member unreachable from here is reachable from other members: not removed \
                     (the path between this pod and it is broken, not the member)"
                );
            } else {
                debug!(member = %suspect.node_id().short(), unreachable, asked, "indirect probes");
            }
            self.tracker
                .on_confirmation(suspect.node_id(), now, *asked, unreachable, reachable);
        }
        !rounds.is_empty()
    }

    /// Probes the members this geth is not connected to, except those the
    /// engine refuses (never dialled, so never probed either). True when a
    /// pass is due.
    pub(crate) async fn probe_members(&mut self) -> bool {
        let Some(me) = self.last_me.clone() else {
            return false;
        };
        let now = self.s.clock.now();
        // The engine says whom it would dial, and at which addresses (a DNS
        // host as resolved and checked): nothing else is probed.
        let allowed: std::collections::BTreeMap<geth_ipc::NodeId, Vec<std::net::SocketAddr>> = {
            let obs = core::Observation {
                pods_gone: &self.last_pods.gone,
                ..self
                    .tracker
                    .observation(now, &me, self.last_pods.pods.as_ref())
            };
            core::probe_targets(&self.s.engine, &obs)
                .into_iter()
                .map(|t| (t.peer.node_id, t.addresses))
                .collect()
        };
        self.publish_probe_targets(&allowed);
        let mut targets: Vec<_> = self
            .tracker
            .probe_targets(Some(me.node_id), self.s.engine.legacy_members, |e| {
                !allowed.contains_key(&e.node_id())
            })
            .into_iter()
            .map(|(id, enode)| {
                let addresses = allowed.get(&id).cloned().unwrap_or_default();
                (id, enode, addresses)
            })
            .collect();
        // Each member is also probed once while connected, so its sidecar
        // names itself while it is surely there: from then on a bare TCP
        // connect at its address no longer counts for it (see TcpProber).
        self.identity_checked.retain(|id| allowed.contains_key(id));
        if let Some(snap) = self.tracker.snapshot() {
            let connected = self.tracker.connected();
            for m in snap.members.values() {
                if connected.contains_key(&m.node_id)
                    && !self.identity_checked.contains(&m.node_id)
                    && let Some(addresses) = allowed.get(&m.node_id)
                {
                    targets.push((m.node_id, m.enode.clone(), addresses.clone()));
                }
            }
        }
        let started = self.s.clock.now();
        let port = self.s.sidecar_port;
        let prober = self.s.prober.clone();
        let probes = targets.into_iter().map(|(id, enode, addresses)| {
            let prober = prober.clone();
            async move { (id, prober.probe(&enode, &addresses, port).await) }
        });
        let results = futures::future::join_all(probes).await;
        for (id, outcome) in &results {
            if outcome.is_reachable() {
                self.identity_checked.insert(*id);
            }
        }
        if let Some(via) = results.iter().find_map(|(_, o)| o.via()) {
            self.note_probe_via(via);
        }
        for via in results.iter().filter_map(|(_, o)| o.via()) {
            self.metrics
                .probes
                .get_or_create(&Metrics::kind(via.kind()))
                .inc();
        }
        for (id, outcome) in &results {
            if !outcome.is_reachable() && !self.tracker.unreachable_since().contains_key(id) {
                debug!(peer = %id.short(), ?outcome, "member unreachable from here");
            }
        }
        let now = self.s.clock.now();
        self.tracker.on_probes(
            started,
            now,
            results.into_iter().map(|(id, o)| (id, o.is_reachable())),
        )
    }

    /// What `/v1/probe` may answer for: the engine's probe targets, with the
    /// addresses it checked.
    fn publish_probe_targets(
        &self,
        allowed: &std::collections::BTreeMap<geth_ipc::NodeId, Vec<std::net::SocketAddr>>,
    ) {
        let Some(snap) = self.tracker.snapshot() else {
            return;
        };
        let enodes = snap.members.values().map(|m| &m.enode).chain(&snap.legacy);
        let targets = enodes
            .filter_map(|e| {
                let addresses = allowed.get(&e.node_id())?;
                Some((e.node_id(), (e.clone(), addresses.clone())))
            })
            .collect();
        *crate::health::lock(&self.health.probe_targets) = targets;
    }

    /// Logs where members are probed, when that changes.
    fn note_probe_via(&mut self, via: ProbeVia) {
        if self.reported.probe_via.update(via).is_none() {
            return;
        }
        match via {
            ProbeVia::Identity(_) => debug!("probing members at their sidecar's /identity"),
            ProbeVia::GethPort => debug!("probing members at their geth p2p port"),
            ProbeVia::SidecarPort(port) => info!(
                port,
                "this pod's address is outside geth's LAN ranges, where geth refuses a second \
                 inbound connection from one IP within 30 s: members are probed at their \
                 sidecar's port {port}, never at geth's p2p port (a probe there would delay \
                 the next dial by 30 s)"
            ),
        }
    }
}
