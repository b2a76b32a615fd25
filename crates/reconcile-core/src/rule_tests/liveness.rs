//! Liveness: legacy and unreachable members removed only after dead_after
//! and by a majority of reachable members, never self nor a connected or
//! recently updated member (engine/liveness.rs, engine/probe.rs).

use super::*;

#[test]
fn legacy_members_are_peered_with_and_kept_while_reachable() {
    let mut w = World::mesh(2);
    let legacy = node(7);
    w.snap_mut().legacy.push(legacy.clone());
    let p = w.plan();
    assert_eq!(dialled(&p), std::slice::from_ref(&legacy));
    assert_eq!(p.report.legacy, 1);
    assert_eq!(p.report.desired, 3);
    assert!(p.registry.is_empty());
    // Unreachable, but not yet for dead_after: kept.
    w.unreachable_for(7, 60);
    assert!(w.plan().registry.is_empty());
    // Off: never dialled.
    w.config.legacy_members = false;
    assert!(dialled(&w.plan()).is_empty());
}

#[test]
fn a_legacy_member_unreachable_for_dead_after_is_removed_only_by_a_majority() {
    let mut w = World::mesh(2);
    let legacy = node(7);
    w.snap_mut().legacy.push(legacy.clone());
    w.applied.insert(legacy.node_id(), legacy.clone());
    w.unreachable_for(7, 1_000);
    let p = w.plan();
    assert_eq!(
        p.registry,
        vec![RegistryAction::RemoveLegacy(vec![legacy.clone()])]
    );
    assert_eq!(p.geth, vec![RemovePeer(legacy.clone())]);
    // Connected: never removed.
    w.connected.insert(
        legacy.node_id(),
        PeerObservation {
            eth_ready: true,
            inbound: true,
        },
    );
    assert!(w.plan().registry.is_empty());
    w.connected.clear();
    // This observer reaches nobody: a partition, nothing removed.
    w.unreachable_for(1, 1_000);
    w.unreachable_for(2, 1_000);
    let p = w.plan();
    assert!(p.registry.is_empty());
    assert!(p.report.suspected_partition);
}

#[test]
fn a_legacy_entry_at_a_loopback_address_is_refused() {
    let mut w = World::mesh(1);
    w.snap_mut()
        .legacy
        .push(node(7).with_host(Host::Ip("127.0.0.1".parse().expect("ip"))));
    let p = w.plan();
    assert!(dialled(&p).is_empty());
    assert!(matches!(
        &p.report.problems[..],
        [Problem::LegacyEntryRefused { .. }]
    ));
}

#[test]
fn an_unreachable_member_is_removed_after_dead_after_when_a_majority_is_reachable() {
    let mut w = World::mesh(2);
    w.unreachable_for(2, 120);
    let p = w.step();
    assert_eq!(removed_pods(&p), ["geth-2"]);
    assert!(matches!(
        p.report.removals[0].reason,
        RemovalReason::Unreachable { .. }
    ));
    assert_eq!(p.geth, vec![RemovePeer(node(2))]);
    assert!(w.plan().is_empty());
}

#[test]
fn an_unreachable_member_is_kept_before_dead_after() {
    let mut w = World::mesh(2);
    w.unreachable_for(2, 119);
    let p = w.plan();
    assert!(p.is_empty());
    assert!(p.report.unreachable.is_empty());
}

#[test]
fn a_connected_member_is_never_removed_whatever_the_evidence() {
    let mut w = World::mesh(4);
    w.unreachable_for(1, 100_000);
    w.connect(1);
    assert!(w.plan().report.removals.is_empty());
    w.pods_of(&[2, 3, 4]);
    let p = w.plan();
    assert!(p.report.removals.is_empty());
    assert!(p.is_empty());
}

#[test]
fn a_recently_updated_member_is_not_removed() {
    let mut w = World::mesh(4);
    let fresh = w
        .now
        .checked_sub(jiff::SignedDuration::from_secs(30))
        .expect("range");
    w.snap_mut()
        .members
        .insert("geth-4".into(), record("geth-4", &node(4), fresh));
    w.config.dead_after = Duration::from_secs(10);
    w.unreachable_for(4, 100_000);
    assert!(w.plan().report.removals.is_empty());
    w.pods_of(&[1, 2, 3]);
    assert!(w.plan().report.removals.is_empty());
}

#[test]
fn the_unreachability_clock_restarts_when_the_record_is_updated() {
    let mut w = World::mesh(4);
    // Probes failed for a day, but the member re-registered 100 s ago.
    let updated = w
        .now
        .checked_sub(jiff::SignedDuration::from_secs(100))
        .expect("range");
    w.snap_mut()
        .members
        .insert("geth-4".into(), record("geth-4", &node(4), updated));
    w.unreachable_for(4, 86_400);
    assert!(w.plan().report.removals.is_empty());
    w.now = at(3600 + 20);
    assert_eq!(removed_pods(&w.plan()), ["geth-4"]);
}

#[test]
fn a_partitioned_observer_removes_nobody_and_reports_it() {
    let mut w = World::mesh(5);
    for i in 1..=5 {
        w.unreachable_for(i, 100_000);
    }
    let p = w.plan();
    assert!(p.is_empty(), "{p:?}");
    assert!(p.report.suspected_partition);
    assert_eq!(p.report.unreachable.len(), 5);
    assert!(p.report.to_string().contains("PARTITION"));
}

#[test]
fn a_two_node_mesh_never_removes_by_unreachability() {
    let mut w = World::mesh(1);
    w.unreachable_for(1, 100_000);
    let p = w.plan();
    assert!(p.report.removals.is_empty());
    assert!(p.report.suspected_partition);
}

#[test]
fn a_three_node_mesh_removes_its_one_dead_member() {
    let mut w = World::mesh(2);
    w.unreachable_for(1, 100_000);
    assert_eq!(removed_pods(&w.plan()), ["geth-1"]);
}

#[test]
fn an_even_split_removes_nobody() {
    let mut w = World::mesh(3);
    w.unreachable_for(2, 100_000);
    w.unreachable_for(3, 100_000);
    let p = w.plan();
    assert!(p.report.removals.is_empty());
    assert!(p.report.suspected_partition);
}

#[test]
fn members_still_failing_probes_briefly_count_against_the_majority() {
    let mut w = World::mesh(4);
    w.unreachable_for(1, 100_000);
    w.unreachable_for(2, 100_000);
    w.unreachable_for(3, 5);
    let p = w.plan();
    assert!(p.report.removals.is_empty());
    assert!(p.report.suspected_partition);
}

#[test]
fn self_is_never_removed() {
    let mut w = World::mesh(2);
    w.unreachable_for(0, 100_000);
    w.pods = Some(BTreeMap::new());
    let p = w.plan();
    assert!(p.report.removals.iter().all(|r| r.record.pod != "geth-0"));
}

#[test]
fn another_record_claiming_this_nodes_id_is_ignored_not_removed() {
    let mut w = World::mesh(1);
    w.snap_mut()
        .members
        .insert("old-name".into(), record("old-name", &node(0), t0()));
    w.pods_of(&[1]);
    let p = w.plan();
    assert!(p.is_empty(), "{p:?}");
    assert!(matches!(
        p.report.problems[..],
        [Problem::RecordClaimsOwnNodeId { .. }]
    ));
}

#[test]
fn unusable_peers_are_reported_not_removed() {
    let mut w = World::mesh(2);
    w.unusable
        .insert(node(1).node_id(), "genesis mismatch".into());
    let p = w.plan();
    assert!(p.is_empty());
    assert_eq!(p.report.unusable.len(), 1);
    assert_eq!(p.report.unusable[0].0.pod.as_deref(), Some("geth-1"));
}

#[test]
fn a_re_registered_member_gets_dead_after_from_when_this_observer_saw_it_whatever_its_clock() {
    // geth-1 was removed while partitioned away and wrote itself back at once,
    // but its clock runs 10 minutes behind: its record says it was updated long
    // ago. Unreachable from here for an hour; this observer saw the new
    // registration 30 s ago.
    let mut w = World::mesh(4);
    w.unreachable_for(1, 3600);
    let seen = w.ago(30);
    w.seen.insert(node(1).node_id(), seen);
    let p = w.plan();
    assert!(removed_pods(&p).is_empty(), "removed again at once: {p:?}");
    // dead_after (120 s) after it was seen, it goes.
    w.now = seen
        .checked_add(jiff::SignedDuration::from_secs(121))
        .expect("in range");
    assert_eq!(removed_pods(&w.plan()), vec!["geth-1".to_owned()]);
}

#[test]
fn a_registration_seen_after_the_last_probe_round_does_not_count_toward_a_majority() {
    // Self, geth-1 (unreachable for an hour) and geth-2, a registration seen
    // after the last probe round and not connected: whether it is reachable is
    // unknown, so self alone is not a majority of three.
    let mut w = World::mesh(2);
    w.unreachable_for(1, 3600);
    w.probed_at = Some(w.ago(4));
    w.seen.insert(node(2).node_id(), w.ago(2));
    let p = w.plan();
    assert!(removed_pods(&p).is_empty(), "a minority removed: {p:?}");
    assert!(p.report.suspected_partition);
    // Once a probe round has passed without failing it, it counts.
    w.probed_at = Some(w.ago(1));
    assert_eq!(removed_pods(&w.plan()), vec!["geth-1".to_owned()]);
}
