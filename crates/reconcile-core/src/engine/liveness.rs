//! Rule 3, liveness: which members leave the registry.
//!
//! A member is removed on pod evidence (its pod gone, replaced, or with
//! another IP), or without pod evidence after `dead_after` of continuous
//! unreachability from here, and only when this observer and the members it
//! reaches are a strict majority of the registry (the partition guard). Never
//! while connected to this geth or within `grace_after_register` of its
//! record's last update.

use std::time::Duration;

use geth_ipc::{Enode, NodeId};
use jiff::Timestamp;
use peer_registry::MemberRecord;

use super::pods::{PodVerdict, pod_verdict, seen_deleted, trusted_pods};
use super::{Pass, elapsed, within};
use crate::plan::{PeerRef, RegistryAction, Removal, RemovalReason};

/// Decides the removals of members and legacy entries, and which members are
/// kept but not peered ([`Pass::unmatched`]).
pub(super) fn rule(pass: &mut Pass<'_>) {
    let (config, obs) = (pass.config, pass.obs);
    let pods = trusted_pods(obs, &mut pass.report.problems);
    let mut removals: Vec<Removal> = Vec::new();
    let mut candidates: Vec<Candidate<'_>> = Vec::new();
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
        // The pod watch saw this very pod go: the grace, which covers a pod
        // cache that has not seen a new pod yet, does not apply.
        if !other.connected
            && let Some(reason) = seen_deleted(obs, record, pods)
        {
            removals.push(Removal {
                record: record.clone(),
                reason,
            });
            continue;
        }
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
                    candidates.push(Candidate {
                        peer: other.peer_ref(),
                        record: Some(record),
                        enode: &record.enode,
                        since,
                        for_,
                    });
                }
            }
        }
    }
    // Legacy members have no pod evidence: only unreachability removes them.
    // Never those the lease layout's publisher derived (a fleet switching
    // layouts): it would put them back at once (issue 21, defect 5).
    for legacy in pass.legacy.iter().filter(|l| !l.connected) {
        let Some(&since) = obs.unreachable_since.get(&legacy.id) else {
            continue;
        };
        let for_ = elapsed(obs.now, since);
        if for_ >= config.dead_after && pass.snapshot.derived.contains(&legacy.id) {
            pass.report.unreachable.push(legacy.peer_ref());
        } else if for_ >= config.dead_after {
            candidates.push(Candidate {
                peer: legacy.peer_ref(),
                record: None,
                enode: legacy.enode,
                since,
                for_,
            });
        }
    }
    let reachable = reachable_others(pass);
    let total = pass.others.len() + pass.legacy.len() + 1;
    let majority = 2 * (reachable + 1) > total;
    let mut legacy_removals = Vec::new();
    for candidate in candidates {
        if !majority {
            pass.report.suspected_partition = true;
            pass.report.unreachable.push(candidate.peer);
            continue;
        }
        let (confirmed, asked) = match agreement(pass, &candidate, reachable) {
            Agreement::Agreed { confirmed, asked } => (confirmed, asked),
            Agreement::Awaiting => {
                pass.report
                    .awaiting_confirmation
                    .push(candidate.peer.clone());
                pass.report.unreachable.push(candidate.peer);
                continue;
            }
            Agreement::Withheld => {
                pass.report.unreachable.push(candidate.peer);
                continue;
            }
        };
        let reason = RemovalReason::Unreachable {
            since: candidate.since,
            for_: candidate.for_,
            confirmed,
            asked,
        };
        match candidate.record {
            Some(record) => removals.push(Removal {
                record: record.clone(),
                reason,
            }),
            None => legacy_removals.push((candidate.enode.clone(), reason)),
        }
    }
    if !legacy_removals.is_empty() {
        pass.registry.push(RegistryAction::RemoveLegacy(
            legacy_removals.iter().map(|(e, _)| e.clone()).collect(),
        ));
        pass.report.legacy_removals = legacy_removals;
    }
    removals.sort_by(|a, b| a.record.pod.cmp(&b.record.pod));
    pass.report.unreachable.sort();
    pass.report.awaiting_confirmation.sort();
    pass.removed = removals.iter().map(|r| r.record.pod.clone()).collect();
    if !removals.is_empty() {
        pass.registry.push(RegistryAction::Remove(
            removals.iter().map(|r| r.record.clone()).collect(),
        ));
    }
    pass.report.removals = removals;
}

/// A member or legacy entry unreachable from here for at least `dead_after`,
/// with no pod evidence either way: removable for unreachability.
struct Candidate<'s> {
    peer: PeerRef,
    /// The member's record; `None` for a legacy entry.
    record: Option<&'s MemberRecord>,
    enode: &'s Enode,
    since: Timestamp,
    for_: Duration,
}

/// What the other observers say about a candidate.
enum Agreement {
    /// Enough of them answered and all found it unreachable (or no agreement
    /// is needed).
    Agreed { confirmed: usize, asked: usize },
    /// Not asked yet, too few answers, or asked again after a veto.
    Awaiting,
    /// Too few other members are reachable from here to ask, or one of them
    /// reached it less than `dead_after` ago.
    Withheld,
}

/// Whether other observers agree that `candidate` is unreachable, given how
/// many other members this observer reaches.
///
/// A "reachable" answer restarts the candidate's `dead_after`, counted from
/// that answer; after that only a later round with no "reachable" answer
/// counts. A round from before the current unreachability never counts.
fn agreement(pass: &Pass<'_>, candidate: &Candidate<'_>, reachable: usize) -> Agreement {
    let (config, obs) = (pass.config, pass.obs);
    let needed = config.confirmations_needed;
    if needed == 0 {
        return Agreement::Agreed {
            confirmed: 0,
            asked: 0,
        };
    }
    if reachable < needed {
        return Agreement::Withheld;
    }
    let Some(round) = obs.confirmations.get(&candidate.peer.node_id) else {
        return Agreement::Awaiting;
    };
    let vetoed_at = round
        .last_reachable
        .into_iter()
        .chain((round.reachable > 0).then_some(round.at))
        .max();
    let start = vetoed_at.map_or(candidate.since, |v| v.max(candidate.since));
    if elapsed(obs.now, start) < config.dead_after {
        return Agreement::Withheld;
    }
    if elapsed(obs.now, round.at) > config.confirmation_max_age {
        // Stale: what the others saw then (a partition since healed, a write
        // delayed by a registry outage) is asked again.
        return Agreement::Awaiting;
    }
    if round.at >= start && round.reachable == 0 && round.unreachable >= needed {
        Agreement::Agreed {
            confirmed: round.unreachable,
            asked: round.asked,
        }
    } else {
        Agreement::Awaiting
    }
}

/// The partition guard's count: how many other members and legacy entries
/// this observer can reach (connected, or not failing probes). Removals for
/// unreachability need this observer plus these to be a strict majority of
/// the registry.
///
/// A member or legacy entry first seen after the last probe round and not
/// connected is unknown, not reachable: a new registration (or a new
/// `static-nodes.json` entry) on the far side of a partition must not make a
/// minority look like a majority.
fn reachable_others(pass: &Pass<'_>) -> usize {
    let obs = pass.obs;
    let unchecked = |id: &NodeId| {
        obs.registrations_seen
            .get(id)
            .is_some_and(|seen| obs.probed_at.is_none_or(|probed| *seen > probed))
    };
    let reachable = |id: &NodeId, connected: bool| {
        connected || !(obs.unreachable_since.contains_key(id) || unchecked(id))
    };
    pass.others
        .iter()
        .filter(|o| reachable(&o.id, o.connected))
        .count()
        + pass
            .legacy
            .iter()
            .filter(|l| reachable(&l.id, l.connected))
            .count()
}

#[cfg(test)]
mod tests {
    use jiff::Timestamp;

    use crate::testkit::{World, node, record, removed_pods};
    use crate::{Config, Confirmation, PeerObservation, RegistryAction, RemovalReason};

    /// `World::mesh(n)` with the default configuration (agreement needed).
    fn agreeing_mesh(n: u8) -> World {
        let mut w = World::mesh(n);
        w.config = Config::default();
        w
    }

    /// A round of indirect probes of member `i` answered at `at`.
    fn round(w: &mut World, i: u8, at: Timestamp, unreachable: usize, reachable: usize) {
        let last_reachable = (reachable > 0).then_some(at);
        w.confirmations.insert(
            node(i).node_id(),
            Confirmation {
                at,
                asked: unreachable + reachable,
                unreachable,
                reachable,
                last_reachable,
            },
        );
    }

    #[test]
    fn agreement_is_needed_by_default() {
        assert_eq!(Config::default().confirmations_needed, 2);
    }

    #[test]
    fn one_observers_view_never_removes_a_member_it_awaits_agreement_for() {
        let mut w = agreeing_mesh(4);
        w.unreachable_for(1, 1_000);
        let p = w.plan();
        assert!(removed_pods(&p).is_empty(), "removed on one view: {p:?}");
        assert_eq!(p.report.awaiting_confirmation.len(), 1);
        assert_eq!(
            p.report.awaiting_confirmation[0].pod.as_deref(),
            Some("geth-1")
        );
        assert_eq!(p.report.unreachable, p.report.awaiting_confirmation);
        assert!(p.report.to_string().contains("awaiting confirmation"));
        // Not yet dead_after here: nobody to ask about.
        let mut w = agreeing_mesh(4);
        w.unreachable_for(1, 60);
        assert!(w.plan().report.awaiting_confirmation.is_empty());
    }

    #[test]
    fn a_member_is_removed_when_enough_other_members_find_it_unreachable_too() {
        let mut w = agreeing_mesh(4);
        w.unreachable_for(1, 1_000);
        let now = w.now;
        round(&mut w, 1, now, 2, 0);
        let p = w.plan();
        assert_eq!(removed_pods(&p), ["geth-1"]);
        assert!(p.report.awaiting_confirmation.is_empty());
        assert!(matches!(
            p.report.removals[0].reason,
            RemovalReason::Unreachable {
                confirmed: 2,
                asked: 2,
                ..
            }
        ));
        let line = p.report.removals[0].to_string();
        assert!(
            line.contains("and from 2 of 2 other members asked"),
            "{line}"
        );
        // One answer is not enough.
        round(&mut w, 1, now, 1, 0);
        let p = w.plan();
        assert!(removed_pods(&p).is_empty());
        assert_eq!(p.report.awaiting_confirmation.len(), 1);
    }

    #[test]
    fn any_reachable_answer_vetoes_and_restarts_dead_after() {
        let mut w = agreeing_mesh(4);
        w.unreachable_for(1, 1_000);
        let veto = w.ago(30);
        round(&mut w, 1, veto, 2, 1);
        let p = w.plan();
        assert!(removed_pods(&p).is_empty(), "{p:?}");
        assert!(
            p.report.awaiting_confirmation.is_empty(),
            "asked again at once"
        );
        assert_eq!(p.report.unreachable.len(), 1);
        // dead_after after the veto: asked again; a round with no
        // "reachable" answer then removes it.
        w.now = veto
            .checked_add(jiff::SignedDuration::from_secs(120))
            .expect("in range");
        assert_eq!(w.plan().report.awaiting_confirmation.len(), 1);
        let now = w.now;
        round(&mut w, 1, now, 3, 0);
        if let Some(c) = w.confirmations.get_mut(&node(1).node_id()) {
            c.last_reachable = Some(veto);
        }
        assert_eq!(removed_pods(&w.plan()), ["geth-1"]);
    }

    #[test]
    fn a_stale_round_is_asked_again_and_removes_nobody() {
        // Agreement reached during a partition since healed (or while the
        // registry could not be written) must not remove the member later.
        let mut w = agreeing_mesh(4);
        w.unreachable_for(1, 1_000);
        let now = w.now;
        let then = now
            .checked_sub(w.config.confirmation_max_age + std::time::Duration::from_secs(1))
            .expect("in range");
        round(&mut w, 1, then, 2, 0);
        let p = w.plan();
        assert!(
            removed_pods(&p).is_empty(),
            "removed on a stale round: {p:?}"
        );
        assert_eq!(p.report.awaiting_confirmation.len(), 1, "asked again");
    }

    #[test]
    fn a_round_from_before_the_current_unreachability_does_not_count() {
        let mut w = agreeing_mesh(4);
        w.unreachable_for(1, 200);
        let old = w.ago(500);
        round(&mut w, 1, old, 2, 0);
        let p = w.plan();
        assert!(removed_pods(&p).is_empty());
        assert_eq!(p.report.awaiting_confirmation.len(), 1);
    }

    #[test]
    fn with_fewer_other_live_members_than_needed_nobody_is_removed_for_unreachability() {
        // Self, geth-1 (dead) and geth-2: one other observer to ask, two needed.
        let mut w = agreeing_mesh(2);
        w.unreachable_for(1, 1_000);
        let now = w.now;
        round(&mut w, 1, now, 1, 0);
        let p = w.plan();
        assert!(removed_pods(&p).is_empty(), "{p:?}");
        assert!(p.report.awaiting_confirmation.is_empty());
        assert_eq!(p.report.unreachable.len(), 1);
        // One confirmation suffices when so configured.
        w.config.confirmations_needed = 1;
        assert_eq!(removed_pods(&w.plan()), ["geth-1"]);
    }

    #[test]
    fn a_legacy_entry_also_needs_agreement() {
        let mut w = agreeing_mesh(3);
        let legacy = node(7);
        w.snap_mut().legacy.push(legacy.clone());
        w.unreachable_for(7, 1_000);
        let p = w.plan();
        assert!(p.registry.is_empty(), "{p:?}");
        assert_eq!(p.report.awaiting_confirmation.len(), 1);
        assert_eq!(p.report.awaiting_confirmation[0].pod, None);
        let now = w.now;
        round(&mut w, 7, now, 2, 0);
        assert_eq!(
            w.plan().registry,
            vec![RegistryAction::RemoveLegacy(vec![legacy])]
        );
    }

    #[test]
    fn an_entry_the_lease_publisher_derived_is_never_removed() {
        let mut w = World::mesh(3);
        let derived = node(7);
        w.snap_mut().legacy.push(derived.clone());
        w.snap_mut().derived.insert(derived.node_id());
        w.unreachable_for(7, 3_600);
        let p = w.plan();
        assert!(p.registry.is_empty(), "{p:?}");
        assert!(p.report.legacy_removals.is_empty());
        assert_eq!(p.report.unreachable.len(), 1, "{p:?}");
        assert!(
            !p.geth
                .contains(&crate::GethAction::RemovePeer(derived.clone()))
        );
        // A legacy entry of the original sidecar still goes.
        w.snap_mut().derived.clear();
        assert_eq!(
            w.plan().registry,
            vec![RegistryAction::RemoveLegacy(vec![derived])]
        );
    }

    /// Issue 21, defect 5 (its second half): a legacy entry removed, then put
    /// back ~100 ms later (a Python writer re-adding its own entry), must not
    /// be removed again at once on the old unreachability clock: the tracker
    /// forgets the id when the snapshot the removal returned lacks it, so the
    /// clock restarts at the next failed probe and the entry is removed again
    /// only `dead_after` later (one write per `dead_after`, not per pass).
    #[test]
    fn a_removed_legacy_entry_put_back_starts_a_new_unreachability_clock() {
        use crate::{Tracker, plan};
        let w = World::mesh(3);
        let legacy = node(7);
        let secs = |s: i64| {
            w.now
                .checked_add(jiff::SignedDuration::from_secs(s))
                .unwrap()
        };
        let with = |on: bool| {
            let mut snap = w.snap.clone().unwrap();
            if on {
                snap.legacy.push(legacy.clone());
            }
            snap
        };
        let mut t = Tracker::new();
        let dead_after = i64::try_from(w.config.dead_after.as_secs()).unwrap();
        t.on_snapshot(secs(0), with(true));
        t.on_probes(secs(1), secs(1), [(legacy.node_id(), false)]);
        let removes = |t: &Tracker, at: i64| {
            let p = plan(&w.config, &t.observation(secs(at), &w.me, None));
            p.registry
                .contains(&RegistryAction::RemoveLegacy(vec![legacy.clone()]))
        };
        assert!(!removes(&t, dead_after));
        assert!(removes(&t, dead_after + 1));
        // Removed (the write's snapshot), then put back.
        t.on_snapshot(secs(dead_after + 1), with(false));
        t.on_snapshot(secs(dead_after + 2), with(true));
        assert!(!removes(&t, dead_after + 2), "removed again at once");
        t.on_probes(
            secs(dead_after + 3),
            secs(dead_after + 3),
            [(legacy.node_id(), false)],
        );
        assert!(!removes(&t, 2 * dead_after + 2));
        assert!(removes(&t, 2 * dead_after + 3));
    }

    #[test]
    fn fresh_legacy_entries_not_probed_yet_do_not_make_a_minority_a_majority() {
        // Self, geth-1..4 (geth-1 and geth-2 dead here), and two legacy
        // entries this observer first saw after its last probe round: whether
        // they are reachable is unknown, so 3 of 7 is not a majority.
        let mut w = World::mesh(4);
        w.unreachable_for(1, 3_600);
        w.unreachable_for(2, 3_600);
        w.probed_at = Some(w.ago(4));
        for i in [7, 8] {
            w.snap_mut().legacy.push(node(i));
            let seen = w.ago(2);
            w.seen.insert(node(i).node_id(), seen);
        }
        let p = w.plan();
        assert!(removed_pods(&p).is_empty(), "a minority removed: {p:?}");
        assert!(p.report.suspected_partition);
        // Once a probe round has passed without failing them, they count.
        w.probed_at = Some(w.ago(1));
        assert_eq!(removed_pods(&w.plan()), ["geth-1", "geth-2"]);
    }

    #[test]
    fn a_pod_the_watch_saw_deleted_leaves_at_once_despite_the_grace() {
        let mut w = World::mesh(3);
        let fresh = w.ago(5);
        w.snap_mut()
            .members
            .insert("geth-3".into(), record("geth-3", &node(3), fresh));
        w.pods_of(&[1, 2]);
        // Not seen going: the grace protects it (the cache may lag).
        let p = w.plan();
        assert!(removed_pods(&p).is_empty(), "{p:?}");
        // Seen with this UID, then deleted: removed at once.
        w.pods_gone.insert("geth-3".into(), "uid-geth-3".into());
        let p = w.step();
        assert_eq!(removed_pods(&p), ["geth-3"]);
        assert_eq!(
            p.report.removals[0].reason,
            RemovalReason::PodDeleted {
                uid: "uid-geth-3".into()
            }
        );
        assert!(
            p.report.removals[0]
                .to_string()
                .contains("seen deleted or replaced"),
            "{}",
            p.report.removals[0]
        );
        assert!(w.plan().is_empty());
    }

    #[test]
    fn a_deleted_pod_needs_trusted_evidence_the_same_uid_and_no_live_link() {
        let setup = || {
            let mut w = World::mesh(3);
            let fresh = w.ago(5);
            w.snap_mut()
                .members
                .insert("geth-3".into(), record("geth-3", &node(3), fresh));
            w.pods_of(&[1, 2]);
            w.pods_gone.insert("geth-3".into(), "uid-geth-3".into());
            w
        };
        // Another UID went (an earlier pod of that name): grace applies.
        let mut w = setup();
        w.pods_gone.insert("geth-3".into(), "uid-older".into());
        assert!(removed_pods(&w.plan()).is_empty());
        // The pod list is not trusted (no own pod): nothing.
        let mut w = setup();
        if let Some(pods) = w.pods.as_mut() {
            pods.remove("geth-0");
        }
        assert!(removed_pods(&w.plan()).is_empty());
        // No pod evidence at all: nothing.
        let mut w = setup();
        w.pods = None;
        assert!(removed_pods(&w.plan()).is_empty());
        // Its pod is listed again with that UID: the list wins.
        let mut w = setup();
        w.pods_of(&[1, 2, 3]);
        assert!(removed_pods(&w.plan()).is_empty());
        // Still connected: never removed.
        let mut w = setup();
        w.connected
            .insert(node(3).node_id(), PeerObservation::default());
        assert!(removed_pods(&w.plan()).is_empty());
    }
}
