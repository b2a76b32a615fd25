//! Rule 4, geth: the desired static set (the remaining members, legacy
//! entries and external peers) and the admin calls that bring geth to it.
//!
//! Departures come first (they free dial slots), then additions and moves by
//! node id. A connected peer is never removed or moved: `removePeer`
//! disconnects. The first dial of a new pair is left to the member with the
//! newer record.

use std::collections::BTreeMap;
use std::time::Duration;

use geth_ipc::{Enode, NodeId};
use jiff::Timestamp;
use peer_registry::MemberRecord;

use super::{Pass, Target, elapsed};
use crate::config::Config;
use crate::observation::Observation;
use crate::plan::{GethAction, PeerRef, Problem, Report};

/// Builds the desired static set, then the geth calls.
pub(super) fn rule(pass: &mut Pass<'_>) {
    desired_set(pass);
    actions(pass);
}

/// The desired static set: remaining members (the most recently updated
/// record of a node id wins), legacy entries not removed, then external peers
/// (a member wins over an external peer with the same id).
fn desired_set(pass: &mut Pass<'_>) {
    let me = pass.obs.me;
    let mut desired: BTreeMap<NodeId, (&MemberRecord, PeerRef)> = BTreeMap::new();
    let mut external: BTreeMap<NodeId, &Enode> = BTreeMap::new();
    for other in pass.others.iter().filter(|o| {
        !pass.removed.contains(&o.record.pod) && !pass.unmatched.contains(&o.record.pod)
    }) {
        match desired.get(&other.id) {
            Some((kept, _)) if kept.updated_at >= other.record.updated_at => {
                pass.report.problems.push(Problem::DuplicateNodeId {
                    node_id: other.id,
                    kept: kept.pod.clone(),
                    ignored: other.record.pod.clone(),
                });
            }
            Some((kept, _)) => {
                pass.report.problems.push(Problem::DuplicateNodeId {
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
    for enode in &pass.snapshot.external {
        let id = enode.node_id();
        if id == me.node_id || external.contains_key(&id) {
            continue;
        }
        if let Some((member, _)) = desired.get(&id) {
            pass.report.problems.push(Problem::ExternalIsMember {
                node_id: id,
                pod: member.pod.clone(),
            });
            continue;
        }
        external.insert(id, enode);
    }
    let mut targets: BTreeMap<NodeId, Target<'_>> = desired
        .into_iter()
        .map(|(id, (record, peer))| {
            let target = Target {
                enode: &record.enode,
                peer,
                updated_at: Some(record.updated_at),
            };
            (id, target)
        })
        .collect();
    pass.report.legacy = pass.legacy.len();
    for legacy in &pass.legacy {
        let removed = pass
            .report
            .legacy_removals
            .iter()
            .any(|(e, _)| e.node_id() == legacy.id);
        if !removed {
            targets.entry(legacy.id).or_insert(Target {
                enode: legacy.enode,
                peer: legacy.peer_ref(),
                updated_at: None,
            });
        }
    }
    for (id, enode) in external {
        let peer = PeerRef {
            pod: None,
            node_id: id,
        };
        targets.insert(
            id,
            Target {
                enode,
                peer,
                updated_at: None,
            },
        );
    }
    pass.targets = targets;
}

/// The geth calls: departures first, then additions and moves by id.
fn actions(pass: &mut Pass<'_>) {
    let (config, obs) = (pass.config, pass.obs);
    let me = obs.me;
    for (id, old) in obs.applied {
        if pass.targets.contains_key(id) {
            continue;
        }
        if pass.is_connected(id) {
            let peer = pass.peer_ref_for(*id);
            pass.report.deferred.push(peer);
            continue;
        }
        pass.geth.push(GethAction::RemovePeer(old.clone()));
        if config.trusted {
            pass.geth.push(GethAction::RemoveTrustedPeer(old.clone()));
        }
    }
    for (id, target) in &pass.targets {
        let (enode, peer) = (target.enode, &target.peer);
        let connected = pass.is_connected(id);
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
                    pass.report.deferred.push(peer.clone());
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
        if let Some(peer_updated) = target.updated_at {
            let my_updated = pass.my_updated;
            let pair_new = my_updated.max(peer_updated);
            // The grace runs from when this sidecar saw the peer's record
            // land, too: a record is stamped before it is written, and when
            // many pods register at once its write can land seconds after its
            // stamp (conflict retries). Counted from the stamp alone, the
            // grace can run out before the record is even seen here, and then
            // both sides dial at once: geth drops both links and redials only
            // ~35 s later.
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
                pass.report.awaiting_dial.push(peer.clone());
                let at = since.checked_add(config.dial_grace).unwrap_or(obs.now);
                recheck_at(&mut pass.report, at);
                continue;
            }
            if !connected
                && i_dial
                && !skewed
                && let Some(until) = late_learner_yields_until(config, obs, &me.node_id, id)
            {
                pass.report.awaiting_dial.push(peer.clone());
                recheck_at(&mut pass.report, until);
                continue;
            }
        }
        if let Some(stale) = clear {
            pass.geth.push(GethAction::RemovePeer(stale));
        }
        if config.trusted {
            pass.geth.push(GethAction::AddTrustedPeer(enode.clone()));
        }
        pass.geth.push(GethAction::AddPeer(enode.clone()));
    }
}

/// Asks to be planned again at `at` at the latest.
fn recheck_at(report: &mut Report, at: Timestamp) {
    report.recheck_at = Some(report.recheck_at.map_or(at, |r| r.min(at)));
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
/// at once make geth drop both links and redial ~35 s later: with many pods
/// registering together, a watch can deliver the others' records seconds after
/// its own registration. We then wait three graces from when we learned of
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
