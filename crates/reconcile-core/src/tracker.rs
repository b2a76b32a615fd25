//! The observer's state between passes, and the rules that keep it: what one
//! sidecar has seen of the registry, of its geth and of the other members.
//!
//! [`plan`](crate::plan) is a function of an [`Observation`]; the [`Tracker`]
//! is where that observation's history lives: which registrations were seen
//! when, which members failed probes since when, what was applied to geth,
//! which peers are unusable. It is pure like the engine (no I/O, no clock, no
//! logging): the runtime feeds it what happened (`on_*`), with the time read
//! from its own clock, and asks it for the [`Observation`] of a pass. What
//! changed is returned as values, for the caller to log or count.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use geth_ipc::{Enode, NodeId, PeerEvent, PeerEventKind};
use jiff::Timestamp;
use peer_registry::Snapshot;

use crate::{Confirmation, GethAction, Observation, PeerObservation, PodObservation, SelfIdentity};

/// What the tracker did with a snapshot from the registry watch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WatchVerdict {
    /// Taken as the registry held (a pass is due).
    Taken,
    /// Older than the snapshot held (typically one our own write returned,
    /// which the watch delivers only later): ignored.
    Stale,
    /// The watch reports no registry while the one held has a version: a
    /// deletion, or a restarted watch's list taken before our own write
    /// created it. The held snapshot is dropped; the next pass reads the
    /// registry afresh.
    Reread,
}

/// What the tracker did with a snapshot read from the registry (a GET or
/// LIST without resourceVersion: a quorum read, authoritative).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadVerdict {
    /// Taken; the registry's versions moved forward (or cannot be compared).
    Taken,
    /// Taken although its resourceVersion is lower than the highest this
    /// tracker took in (or the registry is gone while no deletion was
    /// watched): etcd was restored or wiped. Every watch item carries the old
    /// numbering, so the caller opens its watch anew.
    WentBack {
        /// The highest version taken in before.
        from: u64,
        /// The read's version (`None`: no registry).
        to: Option<String>,
    },
}

/// What a geth connection generation meant (see [`Tracker::on_geth_generation`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GenerationChange {
    /// The same connection as the last pass.
    Same,
    /// The first connection this sidecar made.
    First,
    /// A new connection after an earlier one: geth restarted (or the socket
    /// was re-made). Everything applied is forgotten and re-applied.
    Reconnected {
        /// How many peers had been applied on the old connection.
        applied_before: usize,
    },
}

/// What one geth peer event meant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerEventEffect {
    /// The peer set changed: reports follow only after a pass.
    PassDue,
    /// The peer dropped for a network, genesis or fork mismatch: it is marked
    /// unusable (reported, never removed); geth's redial repeats this, so no
    /// pass is due. `first` is true when it was not marked before.
    Unusable {
        /// The drop error geth gave.
        error: String,
        /// True when the peer was not marked unusable before.
        first: bool,
    },
    /// Nothing to do.
    Ignored,
}

/// Errors of geth's drop events that mean "registered but never usable".
///
/// geth reports a network id, genesis or fork id mismatch in the drop event
/// only as "subprotocol error" (the detail stays in geth's debug log), so that
/// counts too. It only marks the peer unusable in reports and metrics; the mark
/// is cleared as soon as the peer completes the eth handshake.
pub fn is_incompatible(error: &str) -> bool {
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

/// One observer's state between passes. See the module docs.
#[derive(Clone, Debug, Default)]
pub struct Tracker {
    snapshot: Option<Snapshot>,
    /// The highest numeric resourceVersion taken in since the last time the
    /// registry was seen gone or going back (see [`Tracker::on_read_snapshot`]).
    high_water: Option<u64>,
    applied: BTreeMap<NodeId, Enode>,
    generation: u64,
    connected: BTreeMap<NodeId, PeerObservation>,
    unreachable_since: BTreeMap<NodeId, Timestamp>,
    unusable: BTreeMap<NodeId, String>,
    blind_adds: BTreeMap<NodeId, Timestamp>,
    cleared: BTreeSet<NodeId>,
    static_set_known: bool,
    registrations_seen: BTreeMap<NodeId, Timestamp>,
    registrations_landed: BTreeMap<NodeId, Timestamp>,
    registrations_listed: BTreeSet<NodeId>,
    /// This node's registration, sent before the registry's first read
    /// ([`Tracker::on_registration_sent`]), and when.
    sent_before_read: Option<(NodeId, Timestamp)>,
    probed_at: Option<Timestamp>,
    resolved: BTreeMap<NodeId, Vec<IpAddr>>,
    confirmations: BTreeMap<NodeId, Confirmation>,
}

impl Tracker {
    /// A tracker that has seen nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The registry as last taken in; `None` until read (or after
    /// [`WatchVerdict::Reread`]).
    pub fn snapshot(&self) -> Option<&Snapshot> {
        self.snapshot.as_ref()
    }

    /// Drops the snapshot held: the next pass reads the registry afresh.
    pub fn forget_snapshot(&mut self) {
        self.snapshot = None;
    }

    /// This geth's connections as last seen (`admin_peers` and peer events).
    pub fn connected(&self) -> &BTreeMap<NodeId, PeerObservation> {
        &self.connected
    }

    /// What this sidecar has applied to geth as static peers.
    pub fn applied(&self) -> &BTreeMap<NodeId, Enode> {
        &self.applied
    }

    /// Peers marked unusable (network, genesis or fork mismatch), with the error.
    pub fn unusable(&self) -> &BTreeMap<NodeId, String> {
        &self.unusable
    }

    /// Members failing this observer's probes, since when.
    pub fn unreachable_since(&self) -> &BTreeMap<NodeId, Timestamp> {
        &self.unreachable_since
    }

    /// A peer's pod name when it is a member, else its short node id.
    pub fn peer_name(&self, id: &NodeId) -> String {
        self.snapshot
            .as_ref()
            .and_then(|s| s.member_by_node_id(id))
            .map_or_else(|| id.short().to_string(), |m| m.pod.clone())
    }

    /// A snapshot from the registry watch, seen at `now`; `listed` when it is
    /// the list a new or restarted watch begins with.
    pub fn on_watch_snapshot(
        &mut self,
        now: Timestamp,
        snap: Snapshot,
        listed: bool,
    ) -> WatchVerdict {
        let held = self.snapshot.as_ref();
        if snap.resource_version.is_none() && held.is_some_and(|h| h.resource_version.is_some()) {
            self.snapshot = None;
            self.high_water = None;
            return WatchVerdict::Reread;
        }
        if is_stale(held, &snap) {
            return WatchVerdict::Stale;
        }
        self.take(now, snap, listed);
        WatchVerdict::Taken
    }

    /// A snapshot returned by our own write. One older than the snapshot
    /// held is ignored: writes run while the caller goes on taking in watch
    /// events, so a write can return after later states were taken in (they
    /// hold its effect), and taking it would drop the members registered
    /// since (for one pass: their peers removed from geth and added again).
    /// Returns whether it was taken.
    pub fn on_snapshot(&mut self, now: Timestamp, snap: Snapshot) -> bool {
        if is_stale(self.snapshot.as_ref(), &snap) {
            return false;
        }
        self.take(now, snap, false);
        true
    }

    /// This node (`node_id`) sent its registration at `at`, before the
    /// registry's first read arrived (a start's create, made while the watch
    /// lists). The first read then counts as learned late where it is: this
    /// node's record is noted as landed at `at` (the earliest it can have
    /// landed, from which the other members' dial grace runs), and the other
    /// members of that read as landed when it is taken in and listed. So
    /// when the read comes more than a grace after the create, this node,
    /// the newer of each such pair, leaves the first dial to the other side
    /// instead of dialling as it does: two dials at once make geth drop both
    /// links and redial ~35 s later.
    pub fn on_registration_sent(&mut self, node_id: NodeId, at: Timestamp) {
        if self.snapshot.is_none() {
            self.sent_before_read = Some((node_id, at));
        }
    }

    /// A snapshot read from the registry. A read is authoritative: it
    /// replaces the snapshot held whatever their versions (unlike a watch
    /// item, which may lag our own write). A version lower than the highest
    /// taken in before, or no registry where one was held and no deletion
    /// was watched, means etcd's revisions started over
    /// ([`ReadVerdict::WentBack`]).
    pub fn on_read_snapshot(&mut self, now: Timestamp, snap: Snapshot) -> ReadVerdict {
        let to = snap.resource_version.as_deref().map(str::parse::<u64>);
        let verdict = match (self.high_water, to) {
            (Some(from), None) => ReadVerdict::WentBack { from, to: None },
            (Some(from), Some(Ok(to))) if to < from => ReadVerdict::WentBack {
                from,
                to: snap.resource_version.clone(),
            },
            _ => ReadVerdict::Taken,
        };
        if verdict != ReadVerdict::Taken {
            self.high_water = None;
        }
        self.take(now, snap, false);
        verdict
    }

    fn take(&mut self, now: Timestamp, snap: Snapshot, listed: bool) {
        if let Some(Ok(v)) = snap.resource_version.as_deref().map(str::parse::<u64>) {
            self.high_water = Some(self.high_water.map_or(v, |h| h.max(v)));
        }
        self.note_new_registrations(now, &snap, listed);
        self.prune(&snap);
        self.snapshot = Some(snap);
    }

    /// Notes when this observer first saw each member's current registration
    /// (a new member, a pod back at a new address, a member that re-registered
    /// after it was removed), on its own clock: the engine's grace and
    /// unreachability clock count from there. Without it, a member removed
    /// while partitioned away re-registers at once and, trusted by its record's
    /// `updated_at` alone, is removed again as soon as that leaves the grace
    /// (the simulation found this loop).
    ///
    /// Those that land while it follows the registry (not those of its first
    /// read) are also noted as landed, from which a new pair's dial grace
    /// counts, and as listed when `snap` is a watch's list: when those landed
    /// is unknown.
    fn note_new_registrations(&mut self, now: Timestamp, snap: &Snapshot, listed: bool) {
        let held = self.snapshot.as_ref();
        // A registration sent before the first read: ours counts as landed
        // when sent (whether or not this read holds it yet), the others of
        // the first read as learned now, from a list.
        let sent_own = self.sent_before_read.map(|(own, _)| own);
        if let Some((own, sent)) = self.sent_before_read {
            self.registrations_landed.insert(own, sent);
            if held.is_none() {
                for record in snap.members.values().filter(|r| r.node_id != own) {
                    self.registrations_landed.insert(record.node_id, now);
                    self.registrations_listed.insert(record.node_id);
                }
            }
            if snap.members.values().any(|r| r.node_id == own) {
                self.sent_before_read = None;
            }
        }
        for (pod, record) in &snap.members {
            let known = held
                .and_then(|h| h.members.get(pod))
                .is_some_and(|old| old.same_registration(record) && old.pod_uid == record.pod_uid);
            if !known || !self.registrations_seen.contains_key(&record.node_id) {
                self.registrations_seen.insert(record.node_id, now);
            }
            if !known && held.is_some() && sent_own != Some(record.node_id) {
                self.registrations_landed.insert(record.node_id, now);
                if listed {
                    self.registrations_listed.insert(record.node_id);
                } else {
                    self.registrations_listed.remove(&record.node_id);
                }
            }
        }
        // A legacy entry's first sighting: until a probe round after it, the
        // partition guard does not count it as reachable.
        for e in &snap.legacy {
            self.registrations_seen.entry(e.node_id()).or_insert(now);
        }
    }

    /// Forgets what is kept per member for ids the registry no longer has
    /// (members, legacy entries and external peers), so state of departed
    /// members neither piles up nor outlives them: a member that returns
    /// starts with a clean slate. Ids still applied to geth keep their
    /// geth-side state (`cleared`, `blind_adds`) until they are removed.
    fn prune(&mut self, snap: &Snapshot) {
        let known: BTreeSet<NodeId> = snap
            .members
            .values()
            .map(|m| m.node_id)
            .chain(snap.legacy.iter().map(Enode::node_id))
            .chain(snap.external.iter().map(Enode::node_id))
            .collect();
        let member = |id: &NodeId| snap.member_by_node_id(id).is_some();
        let legacy = |id: &NodeId| snap.legacy.iter().any(|e| e.node_id() == *id);
        self.registrations_seen
            .retain(|id, _| member(id) || legacy(id));
        self.resolved.retain(|id, _| known.contains(id));
        self.confirmations.retain(|id, _| known.contains(id));
        // Ours, sent before the first read, is kept until a read shows it.
        let sent = self.sent_before_read.map(|(own, _)| own);
        self.registrations_landed
            .retain(|id, _| member(id) || sent == Some(*id));
        self.registrations_listed.retain(member);
        self.unreachable_since.retain(|id, _| known.contains(id));
        self.unusable.retain(|id, _| known.contains(id));
        let applied = &self.applied;
        self.cleared
            .retain(|id| known.contains(id) || applied.contains_key(id));
        self.blind_adds
            .retain(|id, _| known.contains(id) || applied.contains_key(id));
    }

    /// geth's connection generation at the start of a pass (see
    /// `AdminApi::connection_generation`). A new connection after an earlier
    /// one means geth restarted: it starts with an empty static set, so what
    /// was applied is forgotten and geth's static set is known from then on.
    pub fn on_geth_generation(&mut self, generation: u64) -> GenerationChange {
        if generation == self.generation {
            return GenerationChange::Same;
        }
        let change = if self.generation == 0 {
            GenerationChange::First
        } else {
            self.static_set_known = true;
            GenerationChange::Reconnected {
                applied_before: self.applied.len(),
            }
        };
        self.applied.clear();
        self.connected.clear();
        self.blind_adds.clear();
        self.generation = generation;
        change
    }

    /// geth stopped answering: its connections are unknown, so members are
    /// probed again instead of passing for connected on the last answer (the
    /// simulation found a member never probed while this geth was down that
    /// counted as reachable and made half the registry a "majority").
    pub fn on_geth_down(&mut self) {
        self.connected.clear();
    }

    /// geth's connections from `admin_peers`. A connected member is reachable,
    /// whether or not its peer event was seen: an unreachability clock from an
    /// old partition must not survive the reconnection (else the member is
    /// removed at once the next time its link drops; found by the simulation).
    pub fn on_peers(&mut self, peers: impl IntoIterator<Item = (NodeId, PeerObservation)>) {
        self.connected = peers.into_iter().collect();
        let connected = &self.connected;
        self.blind_adds.retain(|id, _| !connected.contains_key(id));
        self.unreachable_since
            .retain(|id, _| !connected.contains_key(id));
        self.confirmations
            .retain(|id, _| !connected.contains_key(id));
        self.unusable
            .retain(|id, _| !connected.get(id).is_some_and(|p| p.eth_ready));
    }

    /// A round of indirect probes of `id` made at `at`: `asked` other
    /// members' sidecars were asked, `unreachable` found it unreachable too,
    /// `reachable` reach it. A "reachable" answer is remembered across later
    /// rounds (it restarts the member's `dead_after`).
    pub fn on_confirmation(
        &mut self,
        id: NodeId,
        at: Timestamp,
        asked: usize,
        unreachable: usize,
        reachable: usize,
    ) {
        let before = self.confirmations.get(&id).and_then(|c| {
            c.last_reachable
                .into_iter()
                .chain((c.reachable > 0).then_some(c.at))
                .max()
        });
        let last_reachable = if reachable > 0 { Some(at) } else { before };
        self.confirmations.insert(
            id,
            Confirmation {
                at,
                asked,
                unreachable,
                reachable,
                last_reachable,
            },
        );
    }

    /// What the DNS hosts of members and legacy entries resolved to, by node
    /// id (the whole set: ids absent did not resolve).
    pub fn on_resolved(&mut self, resolved: BTreeMap<NodeId, Vec<IpAddr>>) {
        self.resolved = resolved;
    }

    /// One geth peer event.
    pub fn on_peer_event(&mut self, ev: &PeerEvent) -> PeerEventEffect {
        match ev.kind {
            PeerEventKind::Add => {
                self.connected.entry(ev.peer).or_default();
                self.blind_adds.remove(&ev.peer);
                self.unreachable_since.remove(&ev.peer);
                self.confirmations.remove(&ev.peer);
                PeerEventEffect::PassDue
            }
            PeerEventKind::Drop => {
                self.connected.remove(&ev.peer);
                let error = ev.error.clone().unwrap_or_default();
                if is_incompatible(&error) {
                    let first = self.unusable.insert(ev.peer, error.clone()).is_none();
                    PeerEventEffect::Unusable { error, first }
                } else {
                    PeerEventEffect::PassDue
                }
            }
            _ => PeerEventEffect::Ignored,
        }
    }

    /// Whom to probe: the members (and, with `legacy_members`, the legacy
    /// entries) this geth is not connected to, except `me`, and except those
    /// `refused` (a record the engine refuses is never dialled, and never
    /// probed either: a registry writer must not get a connect scanner).
    pub fn probe_targets(
        &self,
        me: Option<NodeId>,
        legacy_members: bool,
        refused: impl Fn(&Enode) -> bool,
    ) -> Vec<(NodeId, Enode)> {
        let Some(snap) = &self.snapshot else {
            return Vec::new();
        };
        let legacy = snap.legacy.iter().filter(|_| legacy_members);
        snap.members
            .values()
            .map(|m| &m.enode)
            .chain(legacy)
            .filter(|e| Some(e.node_id()) != me && !self.connected.contains_key(&e.node_id()))
            .filter(|e| !refused(e))
            .map(|e| (e.node_id(), e.clone()))
            .collect()
    }

    /// The results of a round of probes that started at `started` and ended at
    /// `now`: a new failure starts the member's unreachability clock, an
    /// answer stops it. True when a pass is due (any failure, so the engine can
    /// check whether dead-after has passed, or a clock stopped).
    pub fn on_probes(
        &mut self,
        started: Timestamp,
        now: Timestamp,
        results: impl IntoIterator<Item = (NodeId, bool)>,
    ) -> bool {
        self.probed_at = Some(started);
        let mut due = false;
        for (id, reachable) in results {
            if reachable {
                due |= self.unreachable_since.remove(&id).is_some();
                self.confirmations.remove(&id);
            } else if !self.connected.contains_key(&id) {
                // (A peer that connected while the round ran is reachable.)
                self.unreachable_since.entry(id).or_insert(now);
                due = true;
            }
        }
        due
    }

    /// A geth action that succeeded at `now`: recorded as applied; an add of a
    /// peer this sidecar had not cleared, while geth's static set is unknown,
    /// is blind ([`Observation::blind_adds`]); a removePeer ends that.
    pub fn on_geth_action(&mut self, action: &GethAction, now: Timestamp) {
        crate::apply(&mut self.applied, std::slice::from_ref(action));
        match action {
            GethAction::AddPeer(e)
                if !self.static_set_known
                    && !self.cleared.contains(&e.node_id())
                    && !self.connected.contains_key(&e.node_id()) =>
            {
                self.blind_adds.entry(e.node_id()).or_insert(now);
            }
            GethAction::RemovePeer(e) => {
                self.blind_adds.remove(&e.node_id());
                self.cleared.insert(e.node_id());
            }
            _ => {}
        }
    }

    /// The observation of a pass at `now`, for `me`, with pod evidence when
    /// the caller has it.
    pub fn observation<'a>(
        &'a self,
        now: Timestamp,
        me: &'a SelfIdentity,
        pods: Option<&'a BTreeMap<String, PodObservation>>,
    ) -> Observation<'a> {
        Observation {
            connected: &self.connected,
            pods,
            unreachable_since: &self.unreachable_since,
            unusable: &self.unusable,
            blind_adds: &self.blind_adds,
            registrations_seen: &self.registrations_seen,
            registrations_landed: &self.registrations_landed,
            registrations_listed: &self.registrations_listed,
            probed_at: self.probed_at,
            resolved: &self.resolved,
            confirmations: &self.confirmations,
            ..Observation::new(now, me, self.snapshot.as_ref(), &self.applied)
        }
    }
}

/// True when a watch event is older than the snapshot held.
///
/// resourceVersions are opaque in general, but for one object they come from
/// etcd's revision counter, which only grows: a smaller number is an older
/// state. Versions that do not parse as numbers (another storage backend) are
/// never stale, so the watch always wins there.
fn is_stale(held: Option<&Snapshot>, event: &Snapshot) -> bool {
    match (
        held.and_then(|s| s.resource_version.as_deref()),
        event.resource_version.as_deref(),
    ) {
        (Some(held), Some(event)) => match (held.parse::<u64>(), event.parse::<u64>()) {
            (Ok(held), Ok(event)) => event < held,
            _ => false,
        },
        _ => false,
    }
}

#[cfg(test)]
#[path = "tracker_tests.rs"]
mod tests;
