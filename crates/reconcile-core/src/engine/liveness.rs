//! Rule 3, liveness: which members leave the registry.
//!
//! A member is removed on pod evidence (its pod gone, replaced, or with
//! another IP), or without pod evidence after `dead_after` of continuous
//! unreachability from here, and only when this observer and the members it
//! reaches are a strict majority of the registry (the partition guard). Never
//! while connected to this geth or within `grace_after_register` of its
//! record's last update.

use geth_ipc::{Enode, NodeId};

use super::pods::{PodVerdict, pod_verdict, trusted_pods};
use super::{Pass, elapsed, within};
use crate::plan::{PeerRef, RegistryAction, Removal, RemovalReason};

/// Decides the removals of members and legacy entries, and which members are
/// kept but not peered ([`Pass::unmatched`]).
pub(super) fn rule(pass: &mut Pass<'_>) {
    let (config, obs) = (pass.config, pass.obs);
    let pods = trusted_pods(obs, &mut pass.report.problems);
    let mut removals: Vec<Removal> = Vec::new();
    let mut unreachable_candidates: Vec<Removal> = Vec::new();
    for other in &pass.others {
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
                pass.unmatched.insert(record.pod.clone());
                pass.report.unmatched.push((other.peer_ref(), reason));
            } else if long_down.is_some() {
                pass.report.unreachable.push(other.peer_ref());
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
                    pass.report.unreachable.push(other.peer_ref());
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
    let legacy_candidates: Vec<(Enode, RemovalReason)> = pass
        .legacy
        .iter()
        .filter(|l| !l.connected)
        .filter_map(|l| {
            let since = *obs.unreachable_since.get(&l.id)?;
            let for_ = elapsed(obs.now, since);
            (for_ >= config.dead_after)
                .then(|| (l.enode.clone(), RemovalReason::Unreachable { since, for_ }))
        })
        .collect();
    let majority = has_majority(pass);
    if !legacy_candidates.is_empty() {
        if majority {
            pass.registry.push(RegistryAction::RemoveLegacy(
                legacy_candidates.iter().map(|(e, _)| e.clone()).collect(),
            ));
            pass.report.legacy_removals = legacy_candidates;
        } else {
            pass.report.suspected_partition = true;
            pass.report
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
            pass.report.suspected_partition = true;
            pass.report
                .unreachable
                .extend(unreachable_candidates.iter().map(|r| PeerRef {
                    pod: Some(r.record.pod.clone()),
                    node_id: r.record.enode.node_id(),
                }));
        }
    }
    removals.sort_by(|a, b| a.record.pod.cmp(&b.record.pod));
    pass.report.unreachable.sort();
    pass.removed = removals.iter().map(|r| r.record.pod.clone()).collect();
    if !removals.is_empty() {
        pass.registry.push(RegistryAction::Remove(
            removals.iter().map(|r| r.record.clone()).collect(),
        ));
    }
    pass.report.removals = removals;
}

/// The partition guard: this node and the members it can reach (connected, or
/// not failing probes) are a strict majority of the registry.
///
/// A member first seen after the last probe round and not connected is
/// unknown, not reachable: a new registration on the far side of a partition
/// must not make a minority look like a majority.
fn has_majority(pass: &Pass<'_>) -> bool {
    let obs = pass.obs;
    let unchecked = |id: &NodeId| {
        obs.registrations_seen
            .get(id)
            .is_some_and(|seen| obs.probed_at.is_none_or(|probed| *seen > probed))
    };
    let total = pass.others.len() + pass.legacy.len() + 1;
    let reachable = 1
        + pass
            .others
            .iter()
            .filter(|o| {
                o.connected || !(obs.unreachable_since.contains_key(&o.id) || unchecked(&o.id))
            })
            .count()
        + pass
            .legacy
            .iter()
            .filter(|l| l.connected || !obs.unreachable_since.contains_key(&l.id))
            .count();
    2 * reachable > total
}

