//! One test per rule, named by the behaviour.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use geth_ipc::{Enode, Host, NodeId};
use jiff::Timestamp;
use peer_registry::Snapshot;

use crate::testkit::{
    World, at, dialled, identity, node, record, removed_pods, snapshot, t0, upserts,
};
use crate::{
    Config, GethAction, Observation, PeerObservation, Plan, Problem, RegistryAction, RemovalReason,
    plan,
};

use GethAction::{AddPeer, AddTrustedPeer, RemovePeer, RemoveTrustedPeer};

// ---- registration ----

#[test]
fn registers_self_when_its_record_is_absent() {
    let mut w = World::mesh(2);
    w.snap_mut().members.remove("geth-0");
    let p = w.plan();
    let ups = upserts(&p);
    assert_eq!(ups.len(), 1);
    assert_eq!(ups[0].pod, "geth-0");
    assert_eq!(ups[0].registered_at, w.now);
    assert_eq!(ups[0].updated_at, w.now);
    assert!(p.report.registering);
}

#[test]
fn re_registers_at_once_when_the_configmap_is_gone() {
    let mut w = World::mesh(0);
    w.snap = Some(Snapshot::default());
    let p = w.plan();
    assert_eq!(upserts(&p).len(), 1);
}

#[test]
fn steady_state_makes_no_registry_writes_and_no_geth_calls() {
    let mut w = World::mesh(3);
    w.connect(1);
    let p = w.plan();
    assert!(p.is_empty(), "{p:?}");
    assert_eq!(p.report.desired, 3);
    assert_eq!(p.report.connected, 1);
    assert_eq!(p.report.missing.len(), 2);
}

#[test]
fn re_registers_when_own_enode_changes_keeping_registered_at() {
    let mut w = World::mesh(1);
    w.me.advertised = node(0).with_host(Host::Ip("10.9.9.9".parse().expect("ip")));
    w.me.pod_ip = Some("10.9.9.9".into());
    let p = w.plan();
    let ups = upserts(&p);
    assert_eq!(ups.len(), 1);
    assert_eq!(ups[0].registered_at, t0());
    assert_eq!(ups[0].updated_at, w.now);
    assert!(ups[0].enode.same_address(&w.me.advertised));
}

#[test]
fn a_new_pod_uid_resets_registered_at() {
    let mut w = World::mesh(1);
    w.me.pod_uid = Some("new-uid".into());
    let p = w.plan();
    assert_eq!(upserts(&p)[0].registered_at, w.now);
}

#[test]
fn a_new_sidecar_version_is_written_once() {
    let mut w = World::mesh(1);
    w.me.sidecar_version = "2.0".into();
    assert_eq!(upserts(&w.step()).len(), 1);
    w.now = at(4000);
    assert!(w.plan().registry.is_empty());
}

#[test]
fn never_publishes_a_loopback_address() {
    let mut w = World::mesh(1);
    w.snap_mut().members.remove("geth-0");
    w.me.advertised = node(0).with_host(Host::Ip("127.0.0.1".parse().expect("ip")));
    let p = w.plan();
    assert!(p.registry.is_empty());
    assert!(matches!(
        p.report.problems[..],
        [Problem::SelfAdvertisesLocalAddress { .. }]
    ));
}

#[test]
fn members_at_loopback_unspecified_multicast_or_link_local_addresses_are_refused() {
    for ip in [
        "127.0.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "169.254.1.1",
        "::1",
        "fe80::1",
        "ff02::1",
    ] {
        let mut w = World::mesh(2);
        w.applied.clear();
        let bad = node(1).with_host(Host::Ip(ip.parse().expect("ip")));
        w.snap_mut()
            .members
            .get_mut("geth-1")
            .expect("geth-1")
            .enode = bad;
        let p = w.plan();
        assert!(
            !p.geth
                .iter()
                .any(|a| a.enode().node_id() == node(1).node_id()),
            "{ip} dialled: {:?}",
            p.geth
        );
        assert!(
            p.geth.contains(&AddPeer(node(2))),
            "{ip}: the others still peered"
        );
        assert_eq!(p.report.desired, 1, "{ip}: not counted as missing");
        assert!(
            p.report
                .problems
                .iter()
                .any(|pr| pr.to_string().contains("member.geth-1")),
            "{ip}: the warning names the key"
        );
    }
}

/// `World::mesh(2)` with an allowlist, geth-1 moved to `host`, nothing applied.
fn allowlisted_world(cidrs: &str, host: Host) -> World {
    let mut w = World::mesh(2);
    w.applied.clear();
    w.config.member_cidrs = cidrs
        .split(',')
        .map(|c| c.parse().expect("valid CIDR"))
        .collect();
    w.snap_mut()
        .members
        .get_mut("geth-1")
        .expect("geth-1")
        .enode = node(1).with_host(host);
    w
}

fn dials(p: &Plan, i: u8) -> bool {
    p.geth
        .iter()
        .any(|a| a.enode().node_id() == node(i).node_id())
}

#[test]
fn members_outside_the_member_cidrs_are_refused_and_never_dialled() {
    for ip in ["192.168.1.5", "10.1.0.5", "2001:db8::5"] {
        let w = allowlisted_world("10.0.0.0/16,fd00::/8", Host::Ip(ip.parse().expect("ip")));
        let p = w.plan();
        assert!(!dials(&p, 1), "{ip} dialled: {:?}", p.geth);
        assert!(
            p.geth.contains(&AddPeer(node(2))),
            "{ip}: the others still peered"
        );
        assert_eq!(p.report.desired, 1, "{ip}: not counted as missing");
        assert!(
            p.report
                .missing
                .iter()
                .all(|m| m.node_id != node(1).node_id()),
            "{ip}: {:?}",
            p.report.missing
        );
        let warning = p
            .report
            .problems
            .iter()
            .find(|pr| matches!(pr, Problem::MemberOutsideAllowedCidrs { .. }))
            .map(ToString::to_string)
            .unwrap_or_else(|| panic!("{ip}: no problem reported: {:?}", p.report.problems));
        for part in ["member.geth-1", ip, "10.0.0.0/16,fd00::/8", "MEMBER_CIDRS"] {
            assert!(warning.contains(part), "{ip}: {part:?} not in {warning:?}");
        }
    }
}

#[test]
fn members_inside_the_member_cidrs_are_dialled() {
    for ip in ["10.0.200.7", "fd00::7"] {
        let w = allowlisted_world("10.0.0.0/16,fd00::/8", Host::Ip(ip.parse().expect("ip")));
        let p = w.plan();
        assert!(dials(&p, 1), "{ip} not dialled: {:?}", p.geth);
        assert!(p.geth.contains(&AddPeer(node(2))));
        assert_eq!(p.report.desired, 2);
        assert!(p.report.problems.is_empty(), "{:?}", p.report.problems);
    }
}

#[test]
fn an_empty_member_cidrs_allows_any_routable_address() {
    let mut w = allowlisted_world("10.0.0.0/16", Host::Ip("192.168.1.5".parse().expect("ip")));
    w.config.member_cidrs.clear();
    let p = w.plan();
    assert!(dials(&p, 1), "{:?}", p.geth);
    assert!(p.report.problems.is_empty(), "{:?}", p.report.problems);
}

#[test]
fn a_member_with_a_dns_name_is_held_to_the_member_cidrs_by_what_it_resolves_to() {
    let mut w = allowlisted_world(
        "10.0.0.0/16",
        Host::Dns("geth-1.geth.default.svc.cluster.local".into()),
    );
    // Not resolved (yet): not dialled, reported, not removed.
    let p = w.plan();
    assert!(
        !dials(&p, 1),
        "an unresolved DNS host dialled: {:?}",
        p.geth
    );
    assert!(p.report.removals.is_empty());
    assert!(
        matches!(&p.report.problems[..], [Problem::MemberUnresolved { pod, .. }] if pod == "geth-1"),
        "{:?}",
        p.report.problems
    );
    // Resolved inside the allowlist: dialled.
    w.resolved
        .insert(node(1).node_id(), vec!["10.0.3.4".parse().expect("ip")]);
    let p = w.plan();
    assert!(dials(&p, 1), "{:?}", p.geth);
    assert!(p.report.problems.is_empty(), "{:?}", p.report.problems);
    // One address outside: refused, naming the key.
    w.resolved.insert(
        node(1).node_id(),
        vec![
            "10.0.3.4".parse().expect("ip"),
            "192.168.1.1".parse().expect("ip"),
        ],
    );
    let p = w.plan();
    assert!(!dials(&p, 1), "{:?}", p.geth);
    assert!(
        p.report
            .problems
            .iter()
            .any(|pr| pr.to_string().contains("member.geth-1")
                && pr.to_string().contains("192.168.1.1")),
        "{:?}",
        p.report.problems
    );
}

#[test]
fn external_peers_outside_the_member_cidrs_are_still_dialled() {
    let mut w = World::mesh(0);
    w.config.member_cidrs = vec!["10.99.0.0/16".parse().expect("valid CIDR")];
    let outside = node(7).with_host(Host::Ip("192.168.7.7".parse().expect("ip")));
    w.snap_mut().external = vec![outside.clone()];
    let p = w.plan();
    assert_eq!(p.geth, vec![AddPeer(outside)]);
    assert!(p.report.problems.is_empty(), "{:?}", p.report.problems);
}

#[test]
fn never_publishes_an_enode_whose_key_is_not_this_geths() {
    let mut w = World::mesh(1);
    w.snap_mut().members.remove("geth-0");
    w.me.advertised = node(5);
    let p = w.plan();
    assert!(p.registry.is_empty());
    assert!(matches!(
        p.report.problems[..],
        [Problem::SelfNodeIdMismatch { .. }]
    ));
}

#[test]
fn plans_nothing_until_the_registry_is_read() {
    let mut w = World::mesh(2);
    w.snap = None;
    w.unreachable_for(1, 100_000);
    let p = w.plan();
    assert!(p.is_empty());
    assert!(!p.report.registry_synced);
    assert!(p.report.to_string().contains("not read"));
}

// ---- geth ----

#[test]
fn a_start_adds_every_member_except_self_and_removes_nothing() {
    let mut w = World::mesh(2);
    w.applied.clear();
    let p = w.plan();
    assert_eq!(p.geth, {
        let mut v = vec![(node(1).node_id(), node(1)), (node(2).node_id(), node(2))];
        v.sort_by_key(|(id, _)| *id);
        v.into_iter().map(|(_, e)| AddPeer(e)).collect::<Vec<_>>()
    });
    assert!(!p.geth.iter().any(|a| a.enode().node_id() == w.me.node_id));
}

#[test]
fn a_blind_add_still_unconnected_after_the_stale_entry_time_is_cleared_and_re_added_once() {
    let mut w = World::mesh(2);
    let added = w.now;
    let mut blind = BTreeMap::new();
    blind.insert(node(1).node_id(), added);
    blind.insert(node(2).node_id(), added);
    w.connect(2);
    let plan_with = |w: &World, blind: &BTreeMap<NodeId, Timestamp>| {
        let obs = Observation {
            connected: &w.connected,
            blind_adds: blind,
            ..Observation::new(w.now, &w.me, w.snap.as_ref(), &w.applied)
        };
        plan(&w.config, &obs)
    };
    // Within the stale-entry time: nothing (geth is still dialling).
    w.now = added
        .checked_add(jiff::SignedDuration::from_secs(9))
        .expect("range");
    assert!(plan_with(&w, &blind).geth.is_empty());
    // After it: the unconnected one is cleared and re-added; the connected one
    // is left alone.
    w.now = added
        .checked_add(jiff::SignedDuration::from_secs(11))
        .expect("range");
    assert_eq!(
        plan_with(&w, &blind).geth,
        vec![RemovePeer(node(1)), AddPeer(node(1))]
    );
    // Not blind (the caller forgets it after the removePeer): nothing more.
    blind.remove(&node(1).node_id());
    assert!(plan_with(&w, &blind).geth.is_empty());
}

#[test]
fn a_connected_peer_not_yet_applied_is_added_without_a_remove() {
    let mut w = World::mesh(1);
    w.applied.clear();
    w.connect(1);
    assert_eq!(w.plan().geth, vec![AddPeer(node(1))]);
}

#[test]
fn a_moved_member_gets_remove_peer_before_add_peer() {
    let mut w = World::mesh(2);
    let moved = node(1).with_host(Host::Ip("10.1.1.1".parse().expect("ip")));
    w.snap_mut()
        .members
        .insert("geth-1".into(), record("geth-1", &moved, t0()));
    let p = w.step();
    assert_eq!(p.geth, vec![RemovePeer(node(1)), AddPeer(moved.clone())]);
    assert!(w.applied[&moved.node_id()].same_address(&moved));
    assert!(w.plan().is_empty());
}

#[test]
fn a_moved_member_that_is_connected_is_deferred_not_cut() {
    let mut w = World::mesh(1);
    let moved = node(1).with_host(Host::Ip("10.1.1.1".parse().expect("ip")));
    w.snap_mut()
        .members
        .insert("geth-1".into(), record("geth-1", &moved, t0()));
    w.connect(1);
    let p = w.plan();
    assert!(p.geth.is_empty());
    assert_eq!(p.report.deferred.len(), 1);
    w.connected.clear();
    assert_eq!(w.plan().geth, vec![RemovePeer(node(1)), AddPeer(moved)]);
}

#[test]
fn a_discport_only_change_is_not_a_move() {
    let mut w = World::mesh(1);
    let same =
        Enode::new(*node(1).pubkey(), node(1).host().clone(), 30303, Some(0)).expect("valid");
    w.snap_mut()
        .members
        .insert("geth-1".into(), record("geth-1", &same, t0()));
    assert!(w.plan().geth.is_empty());
}

#[test]
fn a_departed_member_gets_remove_peer() {
    let mut w = World::mesh(2);
    w.snap_mut().members.remove("geth-2");
    let p = w.step();
    assert_eq!(p.geth, vec![RemovePeer(node(2))]);
    assert!(!w.applied.contains_key(&node(2).node_id()));
}

#[test]
fn a_departed_member_still_connected_is_deferred_not_cut() {
    let mut w = World::mesh(2);
    w.snap_mut().members.remove("geth-2");
    w.connect(2);
    let p = w.plan();
    assert!(p.geth.is_empty());
    assert_eq!(p.report.deferred[0].node_id, node(2).node_id());
}

#[test]
fn trusted_mode_marks_before_adding_and_unmarks_departed_peers() {
    let mut w = World::mesh(2);
    w.config.trusted = true;
    w.applied.remove(&node(1).node_id());
    w.snap_mut().members.remove("geth-2");
    let p = w.plan();
    assert_eq!(
        p.geth,
        vec![
            RemovePeer(node(2)),
            RemoveTrustedPeer(node(2)),
            AddTrustedPeer(node(1)),
            AddPeer(node(1)),
        ]
    );
}

#[test]
fn external_peers_are_added_and_never_judged_by_liveness() {
    let mut w = World::mesh(0);
    w.snap_mut().external = vec![node(7), node(0)];
    w.unreachable_for(7, 100_000);
    w.pods_of(&[]);
    let p = w.step();
    assert_eq!(p.geth, vec![AddPeer(node(7))]);
    assert!(p.registry.is_empty());
    assert!(w.plan().is_empty());
}

#[test]
fn a_member_wins_over_an_external_peer_with_the_same_id() {
    let mut w = World::mesh(1);
    let other_address = node(1).with_host(Host::Ip("192.168.0.1".parse().expect("ip")));
    w.snap_mut().external = vec![other_address];
    let p = w.plan();
    assert!(p.geth.is_empty());
    assert!(matches!(
        p.report.problems[..],
        [Problem::ExternalIsMember { .. }]
    ));
}

#[test]
fn the_member_updated_last_wins_when_two_share_a_node_id() {
    let mut w = World::mesh(1);
    let newer = node(1).with_host(Host::Ip("10.7.7.7".parse().expect("ip")));
    w.snap_mut()
        .members
        .insert("geth-9".into(), record("geth-9", &newer, at(10)));
    let p = w.plan();
    assert_eq!(p.geth, vec![RemovePeer(node(1)), AddPeer(newer)]);
    assert!(matches!(
        &p.report.problems[..],
        [Problem::DuplicateNodeId { kept, .. }] if kept == "geth-9"
    ));
}

// ---- liveness ----

#[test]
fn a_member_whose_pod_is_gone_is_removed_from_registry_and_geth() {
    let mut w = World::mesh(3);
    w.pods_of(&[1, 2]);
    let p = w.step();
    assert_eq!(removed_pods(&p), ["geth-3"]);
    assert_eq!(p.report.removals[0].reason, RemovalReason::PodGone);
    assert!(matches!(&p.registry[..], [RegistryAction::Remove(r)] if r.len() == 1));
    assert_eq!(p.geth, vec![RemovePeer(node(3))]);
    assert!(w.plan().is_empty());
}

#[test]
fn a_member_whose_pod_was_replaced_is_removed() {
    let mut w = World::mesh(2);
    w.pods_of(&[1, 2]);
    if let Some(pods) = w.pods.as_mut()
        && let Some(pod) = pods.get_mut("geth-2")
    {
        pod.uid = Some("another".into());
    }
    let p = w.plan();
    assert_eq!(removed_pods(&p), ["geth-2"]);
    assert!(matches!(
        p.report.removals[0].reason,
        RemovalReason::PodReplaced { .. }
    ));
}

#[test]
fn a_member_whose_pod_ip_changed_is_removed() {
    let mut w = World::mesh(2);
    w.pods_of(&[1, 2]);
    if let Some(pods) = w.pods.as_mut()
        && let Some(pod) = pods.get_mut("geth-1")
    {
        pod.ip = Some("10.50.0.1".into());
    }
    let p = w.plan();
    assert_eq!(removed_pods(&p), ["geth-1"]);
    assert!(matches!(
        p.report.removals[0].reason,
        RemovalReason::PodIpChanged { .. }
    ));
}

#[test]
fn with_pod_evidence_a_just_written_record_without_a_pod_is_kept_but_never_dialled() {
    let mut w = World::mesh(2);
    w.applied.clear();
    let fresh = w
        .now
        .checked_sub(jiff::SignedDuration::from_secs(5))
        .expect("range");
    w.snap_mut()
        .members
        .insert("geth-9".into(), record("geth-9", &node(9), fresh));
    w.pods_of(&[1, 2]);
    let p = w.plan();
    assert!(removed_pods(&p).is_empty(), "within its grace");
    assert_eq!(dialled(&p), [node(1), node(2)]);
    assert_eq!(p.report.unmatched.len(), 1, "{}", p.report);
    assert_eq!(p.report.unmatched[0].0.pod.as_deref(), Some("geth-9"));
    assert!(matches!(p.report.unmatched[0].1, RemovalReason::PodGone));
    // Without pod evidence it would be dialled.
    w.pods = None;
    assert!(dialled(&w.plan()).contains(&node(9)));
}

#[test]
fn with_pod_evidence_a_record_borrowing_a_live_pods_name_for_another_address_is_not_dialled() {
    let mut w = World::mesh(2);
    w.applied.clear();
    w.pods_of(&[1, 2]);
    // A ConfigMap writer rewrites member.geth-2: the pod's UID and IP fields are
    // copied, the enode points elsewhere.
    let elsewhere = node(2).with_host(Host::Ip("10.99.0.9".parse().expect("ip")));
    let mut forged = record("geth-2", &elsewhere, w.now);
    forged.pod_ip = Some(node(2).host().to_string());
    w.snap_mut().members.insert("geth-2".into(), forged);
    let p = w.plan();
    assert_eq!(dialled(&p), [node(1)]);
    assert!(
        matches!(&p.report.unmatched[..], [(_, RemovalReason::AddressNotPods { address, .. })] if address == "10.99.0.9"),
        "{}",
        p.report
    );
}

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
fn pod_evidence_without_this_sidecars_own_pod_is_ignored() {
    let mut w = World::mesh(2);
    w.pods = Some(BTreeMap::new());
    let p = w.plan();
    assert!(p.report.removals.is_empty());
    assert!(matches!(
        p.report.problems[..],
        [Problem::PodEvidenceIgnored { .. }]
    ));
}

#[test]
fn pod_evidence_showing_this_pod_with_another_uid_is_ignored() {
    let mut w = World::mesh(2);
    w.pods_of(&[1]);
    w.me.pod_uid = Some("uid-geth-0".into());
    if let Some(pods) = w.pods.as_mut()
        && let Some(pod) = pods.get_mut("geth-0")
    {
        pod.uid = Some("old".into());
    }
    assert!(w.plan().report.removals.is_empty());
}

#[test]
fn a_member_whose_pod_is_alive_is_never_removed_for_unreachability() {
    let mut w = World::mesh(4);
    w.pods_of(&[1, 2, 3, 4]);
    w.unreachable_for(1, 100_000);
    let p = w.plan();
    assert!(p.report.removals.is_empty());
    assert_eq!(p.report.unreachable.len(), 1);
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
fn removal_display_names_the_pod_and_short_node_id() {
    let mut w = World::mesh(3);
    w.pods_of(&[1, 2]);
    let p = w.plan();
    let line = p.report.removals[0].to_string();
    assert!(line.contains("geth-3"), "{line}");
    assert!(line.contains(&node(3).node_id().short()), "{line}");
    assert!(line.contains("no longer exists"), "{line}");
    let summary = p.report.to_string();
    assert!(summary.contains("geth-3"), "{summary}");
}

#[test]
fn the_report_serializes_for_the_status_endpoint() {
    let mut w = World::mesh(3);
    w.pods_of(&[1, 2]);
    let json = serde_json::to_value(w.plan().report).expect("serializes");
    assert_eq!(json["desired"], 2);
    assert_eq!(json["removals"][0]["record"]["pod"], "geth-3");
    assert_eq!(json["removals"][0]["reason"]["kind"], "podGone");
}

#[test]
fn a_new_pairs_first_dial_is_left_to_the_member_with_the_newer_record() {
    let (a, b) = (node(0), node(1));
    let me = identity("geth-0", &a);
    // geth-1 registered a second after us: it dials; we wait for dial_grace.
    let snap = snapshot([record("geth-0", &a, at(0)), record("geth-1", &b, at(1))]);
    let applied = BTreeMap::new();
    let config = Config::default();
    let p = plan(
        &config,
        &Observation::new(at(1), &me, Some(&snap), &applied),
    );
    assert!(p.geth.is_empty(), "{:?}", p.geth);
    assert_eq!(p.report.awaiting_dial.len(), 1);
    assert_eq!(p.report.recheck_at, Some(at(3)));
    // Once the grace has passed, we add it too (usually already connected).
    let p = plan(
        &config,
        &Observation::new(at(3), &me, Some(&snap), &applied),
    );
    assert_eq!(p.geth, vec![AddPeer(b)]);
    assert!(p.report.awaiting_dial.is_empty());
}

#[test]
fn the_dial_grace_runs_from_when_the_newer_record_was_seen_landing() {
    let (a, b) = (node(0), node(1));
    let me = identity("geth-0", &a);
    // geth-1 stamped its record at 1 s, but its write landed (after conflict
    // retries) and was first seen here at 7 s: it is dialling us now, so we
    // still wait the grace from 7 s instead of dialling at once (two dials at
    // once make geth drop both links and redial only ~35 s later).
    let snap = snapshot([record("geth-0", &a, at(0)), record("geth-1", &b, at(1))]);
    let applied = BTreeMap::new();
    let landed = BTreeMap::from([(b.node_id(), at(7))]);
    let config = Config::default();
    let obs = |now| Observation {
        registrations_landed: &landed,
        ..Observation::new(now, &me, Some(&snap), &applied)
    };
    let p = plan(&config, &obs(at(7)));
    assert!(p.geth.is_empty(), "{:?}", p.geth);
    assert_eq!(p.report.awaiting_dial.len(), 1);
    assert_eq!(p.report.recheck_at, Some(at(9)));
    let p = plan(&config, &obs(at(9)));
    assert_eq!(p.geth, vec![AddPeer(b)]);
}

#[test]
fn the_newer_member_that_saw_the_pair_late_in_a_watch_list_leaves_the_first_dial_to_the_other() {
    let (a, b) = (node(0), node(1));
    let me = identity("geth-1", &b);
    // Both registered at once (stamps 0 s and 1 s); ours landed at 1 s, but our
    // watch showed geth-0's record only at 5 s. geth-0 saw ours land about 1 s
    // and dials at about 3 s + its grace: dialling now could meet its dial.
    let snap = snapshot([record("geth-0", &a, at(0)), record("geth-1", &b, at(1))]);
    let applied = BTreeMap::new();
    let late = BTreeMap::from([(b.node_id(), at(1)), (a.node_id(), at(5))]);
    let config = Config::default();
    // geth-0's record was first seen in a watch's list.
    let listed = BTreeSet::from([a.node_id()]);
    let obs = |now, landed| Observation {
        registrations_landed: landed,
        registrations_listed: &listed,
        ..Observation::new(now, &me, Some(&snap), &applied)
    };
    let p = plan(&config, &obs(at(5), &late));
    assert!(p.geth.is_empty(), "{:?}", p.geth);
    assert_eq!(p.report.awaiting_dial.len(), 1);
    assert_eq!(p.report.recheck_at, Some(at(11)));
    // Still not connected three graces later: the other side did not dial.
    let p = plan(&config, &obs(at(11), &late));
    assert_eq!(p.geth, vec![AddPeer(a.clone())]);
    // Learned within the grace (less a margin) of our own landing: at once.
    let soon = BTreeMap::from([(b.node_id(), at(1)), (a.node_id(), at(2))]);
    let p = plan(&config, &obs(at(2), &soon));
    assert_eq!(p.geth, vec![AddPeer(a.clone())]);
    assert_eq!(p.report.recheck_at, None);
    // Seen landing as a change, however late: it has just landed, and the
    // other side's grace runs from when it saw ours, after that. At once.
    let p = plan(
        &config,
        &Observation {
            registrations_landed: &late,
            ..Observation::new(at(5), &me, Some(&snap), &applied)
        },
    );
    assert_eq!(p.geth, vec![AddPeer(a)]);
}

#[test]
fn the_member_with_the_newer_record_dials_at_once() {
    let (a, b) = (node(0), node(1));
    let me = identity("geth-1", &b);
    let snap = snapshot([record("geth-0", &a, at(0)), record("geth-1", &b, at(1))]);
    let applied = BTreeMap::new();
    let p = plan(
        &Config::default(),
        &Observation::new(at(1), &me, Some(&snap), &applied),
    );
    assert_eq!(p.geth, vec![AddPeer(a)]);
    assert_eq!(p.report.recheck_at, None);
}

#[test]
fn a_new_peer_already_connected_is_added_at_once_and_old_pairs_never_wait() {
    let (a, b) = (node(0), node(1));
    let me = identity("geth-0", &a);
    let snap = snapshot([record("geth-0", &a, at(0)), record("geth-1", &b, at(1))]);
    let applied = BTreeMap::new();
    let connected: BTreeMap<NodeId, PeerObservation> =
        [(b.node_id(), PeerObservation::default())].into();
    let obs = Observation {
        connected: &connected,
        ..Observation::new(at(1), &me, Some(&snap), &applied)
    };
    assert_eq!(
        plan(&Config::default(), &obs).geth,
        vec![AddPeer(b.clone())]
    );
    // Both records old (e.g. after a geth restart): add at once.
    let p = plan(
        &Config::default(),
        &Observation::new(at(100), &me, Some(&snap), &applied),
    );
    assert_eq!(p.geth, vec![AddPeer(b)]);
}

#[test]
fn a_peer_record_far_in_the_future_is_clock_skew_and_never_delays_the_add() {
    let (a, b) = (node(0), node(1));
    let me = identity("geth-0", &a);
    let snap = snapshot([record("geth-0", &a, at(0)), record("geth-1", &b, at(3600))]);
    let applied = BTreeMap::new();
    let p = plan(
        &Config::default(),
        &Observation::new(at(1), &me, Some(&snap), &applied),
    );
    assert_eq!(p.geth, vec![AddPeer(b)]);
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
