//! The decision: [`plan`].

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use geth_ipc::{Enode, NodeId};
use jiff::Timestamp;
use peer_registry::{MemberRecord, Snapshot};

use crate::config::Config;
use crate::observation::{Observation, PodObservation};
use crate::plan::{
    GethAction, PeerRef, Plan, Problem, RegistryAction, Removal, RemovalReason, Report,
};

/// `now - then`, zero when `then` is in the future, saturating.
fn elapsed(now: Timestamp, then: Timestamp) -> Duration {
    if then >= now {
        return Duration::ZERO;
    }
    Duration::try_from(now.duration_since(then)).unwrap_or(Duration::MAX)
}

/// How far ahead of the other side's earliest dial the newer member must dial
/// (see [`late_learner_yields_until`]).
const DIAL_MARGIN: Duration = Duration::from_millis(500);

/// When the member with the newer record (the one that dials first) learned
/// of the other's record late, from a watch's list (a record seen as a change
/// has just landed, so the other side's grace has not begun long before), it
/// leaves the first dial to the other side until the returned time.
///
/// The other side dials `dial_grace` after it saw our record land, so never
/// before our record landed plus the grace. We dial at once only while that is
/// safely ahead (we learned of the peer within the grace less
/// [`DIAL_MARGIN`] of our own landing: a dial under load connects in about
/// 0.2 s). Later, the other side may be dialling right now, and two dials
/// at once make geth drop both links and redial ~35 s later: measured at 50
/// nodes registering together, where a sidecar's watch delivered the others'
/// records 3 s after its own registration and dialled 80 ms before the other
/// side's grace ran out. We then wait three graces from when we learned of
/// the peer, by when the other side's dial has normally connected, and add
/// it ourselves only if it has not. `None`: dial now.
fn late_learner_yields_until(
    config: &Config,
    obs: &Observation<'_>,
    me: &NodeId,
    peer: &NodeId,
) -> Option<Timestamp> {
    let mine = *obs.registrations_landed.get(me)?;
    if !obs.registrations_listed.contains(peer) {
        return None;
    }
    let learned = *obs.registrations_landed.get(peer)?;
    let late = elapsed(learned, mine) > config.dial_grace.saturating_sub(DIAL_MARGIN);
    let until = learned.checked_add(config.dial_grace * 3).ok()?;
    (late && obs.now < until).then_some(until)
}

/// True when `t` lies within `window` of `now`, on either side (a record written
/// by a node whose clock runs slightly ahead still counts as recent).
fn within(now: Timestamp, t: Timestamp, window: Duration) -> bool {
    let distance = if t >= now {
        elapsed(t, now)
    } else {
        elapsed(now, t)
    };
    distance < window
}

/// Why an address may not be dialled as a member's.
enum AddressRefusal {
    /// Loopback, unspecified, multicast or link-local.
    Local,
    /// Outside every network of `Config::member_cidrs`.
    OutsideCidrs,
}

/// Whether a member's (or legacy member's) address is refused. A DNS name is
/// checked against the allowlist never: geth resolves it at every dial, this
/// engine never does.
fn refused_address(config: &Config, enode: &Enode) -> Option<AddressRefusal> {
    if enode.host().is_unroutable() {
        return Some(AddressRefusal::Local);
    }
    match enode.host() {
        geth_ipc::Host::Ip(ip)
            if !config.member_cidrs.is_empty()
                && !config.member_cidrs.iter().any(|net| net.contains(*ip)) =>
        {
            Some(AddressRefusal::OutsideCidrs)
        }
        _ => None,
    }
}

/// What the pod list says about a member.
enum PodVerdict {
    /// No usable pod evidence.
    Unknown,
    /// The member's pod is there, as recorded.
    Alive,
    /// The record is stale: this is why.
    Stale(RemovalReason),
}

fn pod_verdict(
    record: &MemberRecord,
    pods: Option<&BTreeMap<String, PodObservation>>,
) -> PodVerdict {
    let Some(pods) = pods else {
        return PodVerdict::Unknown;
    };
    let Some(pod) = pods.get(&record.pod) else {
        return PodVerdict::Stale(RemovalReason::PodGone);
    };
    if let (Some(record_uid), Some(pod_uid)) = (&record.pod_uid, &pod.uid)
        && record_uid != pod_uid
    {
        return PodVerdict::Stale(RemovalReason::PodReplaced {
            record_uid: record_uid.clone(),
            pod_uid: pod_uid.clone(),
        });
    }
    if let (Some(record_ip), Some(pod_ip)) = (&record.pod_ip, &pod.ip)
        && record_ip != pod_ip
    {
        return PodVerdict::Stale(RemovalReason::PodIpChanged {
            record_ip: record_ip.clone(),
            pod_ip: pod_ip.clone(),
        });
    }
    // An IP in the enode must be the pod's own: a ConfigMap writer must not be
    // able to borrow a live pod's name for another address.
    if let (geth_ipc::Host::Ip(address), Some(pod_ip)) = (record.enode.host(), &pod.ip)
        && pod_ip
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip != *address)
    {
        return PodVerdict::Stale(RemovalReason::AddressNotPods {
            address: address.to_string(),
            pod_ip: pod_ip.clone(),
        });
    }
    PodVerdict::Alive
}

/// Pod evidence is used only when it shows this sidecar's own pod as it is: an
/// empty, partial or stale pod list must not remove members.
fn trusted_pods<'a>(
    obs: &Observation<'a>,
    problems: &mut Vec<Problem>,
) -> Option<&'a BTreeMap<String, PodObservation>> {
    let pods = obs.pods?;
    let Some(own) = pods.get(&obs.me.pod) else {
        problems.push(Problem::PodEvidenceIgnored {
            reason: "the pod list does not contain this sidecar's own pod (incomplete list?)",
        });
        return None;
    };
    if let (Some(mine), Some(seen)) = (&obs.me.pod_uid, &own.uid)
        && mine != seen
    {
        problems.push(Problem::PodEvidenceIgnored {
            reason: "the pod list shows this sidecar's own pod with another UID (stale list?)",
        });
        return None;
    }
    Some(pods)
}

/// A registry member other than this node.
struct Other<'s> {
    record: &'s MemberRecord,
    id: NodeId,
    connected: bool,
}

impl Other<'_> {
    fn peer_ref(&self) -> PeerRef {
        PeerRef {
            pod: Some(self.record.pod.clone()),
            node_id: self.id,
        }
    }
}

/// The record this node should have, or why it cannot register.
fn own_record(obs: &Observation<'_>, snapshot: &Snapshot) -> Result<MemberRecord, Problem> {
    let me = obs.me;
    if me.advertised.node_id() != me.node_id {
        return Err(Problem::SelfNodeIdMismatch {
            advertised: me.advertised.node_id(),
            node_id: me.node_id,
        });
    }
    if me.advertised.host().is_local() {
        return Err(Problem::SelfAdvertisesLocalAddress {
            enode: me.advertised.to_string(),
        });
    }
    let existing = snapshot.members.get(&me.pod);
    // Same pod incarnation (same UID, or UID unknown on either side): keep the
    // original registration time.
    let registered_at = existing
        .filter(|e| match (&e.pod_uid, &me.pod_uid) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        })
        .map_or(obs.now, |e| e.registered_at);
    Ok(MemberRecord {
        pod: me.pod.clone(),
        node_id: me.node_id,
        enode: me.advertised.clone(),
        pod_uid: me.pod_uid.clone(),
        pod_ip: me.pod_ip.clone(),
        registered_at,
        updated_at: obs.now,
        sidecar_version: me.sidecar_version.clone(),
    })
}

/// Decides one reconcile pass. Pure and deterministic: the same observation always
/// gives the same plan, and the plan never depends on map iteration order.
///
/// Rules, in short (see the crate documentation for the reasoning):
/// - nothing is planned until the registry has been read;
/// - this node's record is (re)written when missing or when its enode, node id,
///   pod UID, pod IP or sidecar version differ: never in steady state;
/// - another member is removed from the registry only on pod evidence (pod gone,
///   replaced, or with another IP) or after `dead_after` of continuous
///   unreachability from here, and never when it is connected to this geth, was
///   written within `grace_after_register`, or (for unreachability) when this
///   observer and the members it reaches are not a strict majority of the registry;
/// - a member at a loopback, unspecified, multicast or link-local IP, or (when
///   `member_cidrs` is set) at an IP outside every allowed network, is refused:
///   never dialled, not counted, reported as a problem naming its key;
/// - geth's static set follows the registry (members except self, plus external
///   peers); a moved id gets `RemovePeer` before `AddPeer`; a connected peer is
///   never removed or moved (deferred until it disconnects); a start issues no
///   `RemovePeer`: a peer added blind that stays unconnected for
///   `stale_entry_after` is cleared and re-added once.
///
/// ```
/// use std::collections::BTreeMap;
/// use geth_ipc::{Enode, NodeId};
/// use peer_registry::{MemberRecord, Snapshot};
/// use reconcile_core::{Config, GethAction, Observation, RegistryAction, SelfIdentity, apply, plan};
///
/// let me_enode: Enode = "enode://6f8a80d14311c39f35f516fa664deaaaa13e85b2f7493f37f6144d86991ec012937307647bd3b9a82abe2974e1407241d54947bbb39763a4cac9f77166ad92a0@10.0.0.1:30303".parse()?;
/// let peer: Enode = "enode://5cbdf0646e5db4eaa398f365f2ea7a0e3d419b7e0330e39ce92bddedcac4f9bc6aebca40ba255960a3178d6d861a54dba813d0b813fde7b5a5082628087264da@10.0.0.2:30303".parse()?;
/// let now = jiff::Timestamp::from_second(1_700_000_000)?;
/// let earlier = jiff::Timestamp::from_second(1_699_990_000)?; // geth-1 registered before us
/// let me = SelfIdentity {
///     pod: "geth-0".into(),
///     node_id: me_enode.node_id(),
///     advertised: me_enode.clone(),
///     pod_uid: Some("uid-0".into()),
///     pod_ip: Some("10.0.0.1".into()),
///     sidecar_version: "0.1.0".into(),
/// };
/// let mut snapshot = Snapshot { resource_version: Some("1".into()), ..Snapshot::default() };
/// snapshot.members.insert("geth-1".into(), MemberRecord {
///     pod: "geth-1".into(),
///     node_id: peer.node_id(),
///     enode: peer.clone(),
///     pod_uid: Some("uid-1".into()),
///     pod_ip: Some("10.0.0.2".into()),
///     registered_at: earlier,
///     updated_at: earlier,
///     sidecar_version: "0.1.0".into(),
/// });
/// let mut applied: BTreeMap<NodeId, Enode> = BTreeMap::new();
///
/// let first = plan(&Config::default(), &Observation::new(now, &me, Some(&snapshot), &applied));
/// // Register self, and peer with geth-1 (a start issues no RemovePeer).
/// // We are the newcomer of this pair, so we dial first; geth-1's sidecar adds us
/// // after `dial_grace`, by when the link is usually up.
/// assert!(matches!(&first.registry[..], [RegistryAction::Upsert(r)] if r.pod == "geth-0"));
/// assert_eq!(first.geth, vec![GethAction::AddPeer(peer.clone())]);
///
/// // After executing it, the next pass has nothing to do.
/// apply(&mut applied, &first.geth);
/// reconcile_core::apply_registry(&mut snapshot, &first.registry);
/// let second = plan(&Config::default(), &Observation::new(now, &me, Some(&snapshot), &applied));
/// assert!(second.is_empty());
/// assert_eq!(second.report.desired, 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn plan(config: &Config, obs: &Observation<'_>) -> Plan {
    let Some(snapshot) = obs.registry else {
        return Plan {
            report: Report {
                registry_synced: false,
                ..Report::default()
            },
            ..Plan::default()
        };
    };
    let me = obs.me;
    let mut report = Report {
        registry_synced: true,
        ..Report::default()
    };
    let mut registry = Vec::new();

    // 1. Self: register, or fix a record that differs. Never write in steady state.
    // `my_updated` is when our record (as it will stand after this pass) changed.
    let mut my_updated = obs.now;
    match own_record(obs, snapshot) {
        Ok(record) => {
            my_updated = record.updated_at;
            let unchanged = snapshot.members.get(&me.pod).is_some_and(|existing| {
                existing.same_registration(&record)
                    && existing.sidecar_version == record.sidecar_version
            });
            if let Some(existing) = snapshot.members.get(&me.pod).filter(|_| unchanged) {
                my_updated = existing.updated_at;
            }
            if !unchanged {
                report.registering = true;
                registry.push(RegistryAction::Upsert(record));
            }
        }
        Err(problem) => report.problems.push(problem),
    }

    // 2. The other members, in pod order.
    let is_connected = |id: &NodeId| obs.connected.contains_key(id);
    let mut others: Vec<Other<'_>> = Vec::new();
    for record in snapshot.members.values() {
        if record.pod == me.pod {
            continue;
        }
        let id = record.enode.node_id();
        if record.node_id != id {
            report.problems.push(Problem::RecordNodeIdMismatch {
                pod: record.pod.clone(),
                record: record.node_id,
                enode: id,
            });
        }
        if id == me.node_id || record.node_id == me.node_id {
            report.problems.push(Problem::RecordClaimsOwnNodeId {
                pod: record.pod.clone(),
                node_id: me.node_id,
            });
            continue;
        }
        match refused_address(config, &record.enode) {
            // Never dialled: anyone who may patch the ConfigMap could otherwise
            // point every geth at its own node or outside the pod network.
            Some(AddressRefusal::Local) => {
                report.problems.push(Problem::MemberAdvertisesLocalAddress {
                    pod: record.pod.clone(),
                    enode: record.enode.to_string(),
                });
                continue;
            }
            Some(AddressRefusal::OutsideCidrs) => {
                report.problems.push(Problem::MemberOutsideAllowedCidrs {
                    pod: record.pod.clone(),
                    enode: record.enode.to_string(),
                    allowed: allowlist(&config.member_cidrs),
                });
                continue;
            }
            None => {}
        }
        others.push(Other {
            record,
            id,
            connected: is_connected(&id) || is_connected(&record.node_id),
        });
    }

    // 2b. Legacy members: static-nodes.json entries without a record (the
    // original sidecar's), peered with like members.
    let mut legacy: Vec<(&Enode, NodeId, bool)> = Vec::new();
    if config.legacy_members {
        for enode in &snapshot.legacy {
            let id = enode.node_id();
            if id == me.node_id || others.iter().any(|o| o.id == id) {
                continue;
            }
            if let Some(refusal) = refused_address(config, enode) {
                report.problems.push(Problem::LegacyEntryRefused {
                    enode: enode.to_string(),
                    why: match refusal {
                        AddressRefusal::Local => "loopback, unspecified, multicast or link-local",
                        AddressRefusal::OutsideCidrs => "outside MEMBER_CIDRS",
                    }
                    .to_owned(),
                });
                continue;
            }
            legacy.push((enode, id, is_connected(&id)));
        }
    }

    // 3. Liveness: which members are gone.
    let pods = trusted_pods(obs, &mut report.problems);
    let mut removals: Vec<Removal> = Vec::new();
    let mut unreachable_candidates: Vec<Removal> = Vec::new();
    let mut unmatched: BTreeSet<String> = BTreeSet::new();
    for other in &others {
        let record = other.record;
        let seen = obs.registrations_seen.get(&other.id).copied();
        let recent = within(obs.now, record.updated_at, config.grace_after_register);
        // Continuous unreachability, never counted from before the record's last
        // update nor from before this observer saw that registration (a
        // re-registered member starts a new clock, whatever its own clock says).
        let down_for = obs.unreachable_since.get(&other.id).map(|&since| {
            let since = if record.updated_at <= obs.now {
                since.max(record.updated_at)
            } else {
                since
            };
            let since = seen
                .filter(|seen| *seen <= obs.now)
                .map_or(since, |seen| since.max(seen));
            (since, elapsed(obs.now, since))
        });
        let long_down = down_for.filter(|(_, d)| *d >= config.dead_after);
        let verdict = pod_verdict(record, pods);
        if other.connected || recent {
            if let PodVerdict::Stale(reason) = verdict {
                // Kept in the registry for now (just written, or its link is
                // up), but never peered while it does not match its pod.
                unmatched.insert(record.pod.clone());
                report.unmatched.push((other.peer_ref(), reason));
            } else if long_down.is_some() {
                report.unreachable.push(other.peer_ref());
            }
            continue;
        }
        match verdict {
            PodVerdict::Stale(reason) => removals.push(Removal {
                record: record.clone(),
                reason,
            }),
            PodVerdict::Alive => {
                if long_down.is_some() {
                    report.unreachable.push(other.peer_ref());
                }
            }
            PodVerdict::Unknown => {
                if let Some((since, for_)) = long_down {
                    unreachable_candidates.push(Removal {
                        record: record.clone(),
                        reason: RemovalReason::Unreachable { since, for_ },
                    });
                }
            }
        }
    }
    // Legacy members have no pod evidence: only unreachability removes them.
    let legacy_candidates: Vec<(Enode, RemovalReason)> = legacy
        .iter()
        .filter(|(_, _, connected)| !connected)
        .filter_map(|(enode, id, _)| {
            let since = *obs.unreachable_since.get(id)?;
            let for_ = elapsed(obs.now, since);
            (for_ >= config.dead_after)
                .then(|| ((*enode).clone(), RemovalReason::Unreachable { since, for_ }))
        })
        .collect();
    // Partition guard: act only when this node and the members it can reach
    // (connected, or not failing probes) are a strict majority of the registry.
    // A member first seen after the last probe round and not connected is
    // unknown, not reachable: a new registration on the far side of a partition
    // must not make a minority look like a majority.
    let unchecked = |id: &NodeId| {
        obs.registrations_seen
            .get(id)
            .is_some_and(|seen| obs.probed_at.is_none_or(|probed| *seen > probed))
    };
    let total = others.len() + legacy.len() + 1;
    let reachable = 1
        + others
            .iter()
            .filter(|o| {
                o.connected || !(obs.unreachable_since.contains_key(&o.id) || unchecked(&o.id))
            })
            .count()
        + legacy
            .iter()
            .filter(|(_, id, connected)| *connected || !obs.unreachable_since.contains_key(id))
            .count();
    let majority = 2 * reachable > total;
    if !legacy_candidates.is_empty() {
        if majority {
            registry.push(RegistryAction::RemoveLegacy(
                legacy_candidates.iter().map(|(e, _)| e.clone()).collect(),
            ));
            report.legacy_removals = legacy_candidates;
        } else {
            report.suspected_partition = true;
            report
                .unreachable
                .extend(legacy_candidates.iter().map(|(e, _)| PeerRef {
                    pod: None,
                    node_id: e.node_id(),
                }));
        }
    }
    if !unreachable_candidates.is_empty() {
        if majority {
            removals.extend(unreachable_candidates);
        } else {
            report.suspected_partition = true;
            report
                .unreachable
                .extend(unreachable_candidates.iter().map(|r| PeerRef {
                    pod: Some(r.record.pod.clone()),
                    node_id: r.record.enode.node_id(),
                }));
        }
    }
    removals.sort_by(|a, b| a.record.pod.cmp(&b.record.pod));
    report.unreachable.sort();
    let removed: BTreeSet<String> = removals.iter().map(|r| r.record.pod.clone()).collect();
    if !removals.is_empty() {
        registry.push(RegistryAction::Remove(
            removals.iter().map(|r| r.record.clone()).collect(),
        ));
    }
    report.removals = removals;

    // 4. The desired static set: remaining members, then external peers.
    let mut desired: BTreeMap<NodeId, (&MemberRecord, PeerRef)> = BTreeMap::new();
    let mut external: BTreeMap<NodeId, &Enode> = BTreeMap::new();
    for other in others
        .iter()
        .filter(|o| !removed.contains(&o.record.pod) && !unmatched.contains(&o.record.pod))
    {
        match desired.get(&other.id) {
            Some((kept, _)) if kept.updated_at >= other.record.updated_at => {
                report.problems.push(Problem::DuplicateNodeId {
                    node_id: other.id,
                    kept: kept.pod.clone(),
                    ignored: other.record.pod.clone(),
                });
            }
            Some((kept, _)) => {
                report.problems.push(Problem::DuplicateNodeId {
                    node_id: other.id,
                    kept: other.record.pod.clone(),
                    ignored: kept.pod.clone(),
                });
                desired.insert(other.id, (other.record, other.peer_ref()));
            }
            None => {
                desired.insert(other.id, (other.record, other.peer_ref()));
            }
        }
    }
    for enode in &snapshot.external {
        let id = enode.node_id();
        if id == me.node_id || external.contains_key(&id) {
            continue;
        }
        if let Some((member, _)) = desired.get(&id) {
            report.problems.push(Problem::ExternalIsMember {
                node_id: id,
                pod: member.pod.clone(),
            });
            continue;
        }
        external.insert(id, enode);
    }
    let updated_at: BTreeMap<NodeId, Timestamp> = desired
        .iter()
        .map(|(id, (record, _))| (*id, record.updated_at))
        .collect();
    let mut targets: BTreeMap<NodeId, (&Enode, PeerRef)> = desired
        .into_iter()
        .map(|(id, (record, peer))| (id, (&record.enode, peer)))
        .collect();
    report.legacy = legacy.len();
    let legacy_removed: BTreeSet<NodeId> = report
        .legacy_removals
        .iter()
        .map(|(e, _)| e.node_id())
        .collect();
    for (enode, id, _) in &legacy {
        if !legacy_removed.contains(id) {
            targets.entry(*id).or_insert((
                enode,
                PeerRef {
                    pod: None,
                    node_id: *id,
                },
            ));
        }
    }
    for (id, enode) in external {
        targets.insert(
            id,
            (
                enode,
                PeerRef {
                    pod: None,
                    node_id: id,
                },
            ),
        );
    }

    // 5. geth: departures first (frees dial slots), then additions and moves by id.
    let mut geth = Vec::new();
    for (id, old) in obs.applied {
        if targets.contains_key(id) {
            continue;
        }
        if is_connected(id) {
            report.deferred.push(peer_ref_for(*id, snapshot));
            continue;
        }
        geth.push(GethAction::RemovePeer(old.clone()));
        if config.trusted {
            geth.push(GethAction::RemoveTrustedPeer(old.clone()));
        }
    }
    for (id, (enode, peer)) in &targets {
        let connected = is_connected(id);
        let clear = match obs.applied.get(id) {
            Some(current) if current.same_address(enode) => {
                // Added blind and still not connected: geth may have ignored
                // the add for an older address it held. Clear and re-add once.
                let suspect = !connected
                    && obs
                        .blind_adds
                        .get(id)
                        .is_some_and(|&at| elapsed(obs.now, at) >= config.stale_entry_after);
                if !suspect {
                    continue;
                }
                Some(current.clone())
            }
            Some(current) => {
                if connected {
                    // Moved, but a live link exists: RemovePeer would cut it.
                    report.deferred.push(peer.clone());
                    continue;
                }
                Some(current.clone())
            }
            // Not applied by us: added without a removePeer (a start issues
            // none). If geth held an older address for this id, the caller marks
            // the add blind and the branch above clears it later.
            None => None,
        };
        // A new pair: only the member with the later record dials first.
        if let Some(&peer_updated) = updated_at.get(id) {
            let pair_new = my_updated.max(peer_updated);
            // The grace runs from when this sidecar saw the peer's record
            // land, too: a record is stamped before it is written, and when
            // many pods register at once its write can land seconds after its
            // stamp (conflict retries). Counted from the stamp alone, the
            // grace had run out by the time the record was seen, both sides
            // dialled at once, geth dropped both links and redialled ~35 s
            // later (measured: a full mesh of 30 in 39.6 s).
            let since = obs
                .registrations_landed
                .get(id)
                .map_or(pair_new, |&seen| seen.max(pair_new));
            let waited = elapsed(obs.now, since);
            let i_dial = (my_updated, me.node_id) > (peer_updated, *id);
            // A record stamped further in the future than the grace is clock
            // skew, not a new pair: never wait on it.
            let skewed = obs
                .now
                .checked_add(config.dial_grace)
                .is_ok_and(|limit| pair_new > limit);
            if !connected && !i_dial && !skewed && waited < config.dial_grace {
                report.awaiting_dial.push(peer.clone());
                let at = since.checked_add(config.dial_grace).unwrap_or(obs.now);
                report.recheck_at = Some(report.recheck_at.map_or(at, |r| r.min(at)));
                continue;
            }
            if !connected
                && i_dial
                && !skewed
                && let Some(until) = late_learner_yields_until(config, obs, &me.node_id, id)
            {
                report.awaiting_dial.push(peer.clone());
                report.recheck_at = Some(report.recheck_at.map_or(until, |r| r.min(until)));
                continue;
            }
        }
        if let Some(stale) = clear {
            geth.push(GethAction::RemovePeer(stale));
        }
        if config.trusted {
            geth.push(GethAction::AddTrustedPeer((*enode).clone()));
        }
        geth.push(GethAction::AddPeer((*enode).clone()));
    }

    // 6. Report.
    report.desired = targets.len();
    for (id, (_, peer)) in &targets {
        match obs.connected.get(id) {
            Some(p) => {
                report.connected += 1;
                if p.eth_ready {
                    report.ready += 1;
                }
            }
            None => report.missing.push(peer.clone()),
        }
    }
    report.unusable = obs
        .unusable
        .iter()
        .map(|(id, err)| {
            let peer = targets
                .get(id)
                .map_or_else(|| peer_ref_for(*id, snapshot), |(_, p)| p.clone());
            (peer, err.clone())
        })
        .collect();
    report.missing.sort();
    report.deferred.sort();

    Plan {
        registry,
        geth,
        report,
    }
}

/// The allowlist as the operator writes it: `10.244.0.0/16,fd00::/8`.
fn allowlist(cidrs: &[crate::Cidr]) -> String {
    cidrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn peer_ref_for(id: NodeId, snapshot: &Snapshot) -> PeerRef {
    PeerRef {
        pod: snapshot
            .members
            .values()
            .find(|m| m.enode.node_id() == id || m.node_id == id)
            .map(|m| m.pod.clone()),
        node_id: id,
    }
}
