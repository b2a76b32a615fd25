//! The tracker's rules, alone and as properties over arbitrary event sequences.

use std::collections::BTreeSet;

use geth_ipc::{PeerEvent, PeerEventKind};
use proptest::prelude::*;

use super::*;
use crate::testkit::{at, enode, record, snapshot};

fn event(kind: PeerEventKind, peer: NodeId, error: Option<&str>) -> PeerEvent {
    serde_json::from_value(serde_json::json!({
        "type": match kind { PeerEventKind::Add => "add", _ => "drop" },
        "peer": peer.to_string(),
        "error": error,
    }))
    .expect("peer event")
}

fn ready() -> PeerObservation {
    PeerObservation {
        eth_ready: true,
        inbound: false,
    }
}

#[test]
fn a_watch_snapshot_older_than_the_one_held_is_stale_and_a_missing_registry_means_reread() {
    let mut t = Tracker::new();
    let mut newer = snapshot([record("geth-1", &enode(1, 1), at(0))]);
    newer.resource_version = Some("20".into());
    let mut older = newer.clone();
    older.resource_version = Some("10".into());
    assert_eq!(t.on_watch_snapshot(at(1), newer, true), WatchVerdict::Taken);
    assert_eq!(
        t.on_watch_snapshot(at(2), older, false),
        WatchVerdict::Stale
    );
    let gone = Snapshot::default();
    assert_eq!(
        t.on_watch_snapshot(at(3), gone, false),
        WatchVerdict::Reread
    );
    assert!(
        t.snapshot().is_none(),
        "the next pass reads the registry afresh"
    );
}

fn at_version(members: &[(&str, u8)], version: Option<&str>) -> Snapshot {
    let mut s = snapshot(
        members
            .iter()
            .map(|(pod, n)| record(pod, &enode(*n, *n), at(0))),
    );
    s.resource_version = version.map(str::to_owned);
    s
}

/// Writes run while watch events are taken in: a write's snapshot that
/// returns after a later state was taken in must not replace it (the members
/// registered in between would drop out for a pass).
#[test]
fn a_write_returning_after_a_later_watch_state_leaves_that_state_held() {
    let mut t = Tracker::new();
    let later = at_version(&[("geth-1", 1), ("geth-2", 2)], Some("12"));
    let mine = at_version(&[("geth-1", 1)], Some("11"));
    assert_eq!(
        t.on_watch_snapshot(at(1), later, false),
        WatchVerdict::Taken
    );
    t.on_snapshot(at(2), mine);
    let held = t.snapshot().expect("held");
    assert_eq!(held.resource_version.as_deref(), Some("12"));
    assert!(held.members.contains_key("geth-2"), "geth-2 dropped");
    // A newer write result is taken.
    t.on_snapshot(at(3), at_version(&[("geth-1", 1)], Some("13")));
    assert_eq!(
        t.snapshot()
            .and_then(|s| s.resource_version.clone())
            .as_deref(),
        Some("13")
    );
}

#[test]
fn a_read_with_a_lower_version_replaces_the_snapshot_and_says_the_versions_went_back() {
    let mut t = Tracker::new();
    let held = at_version(&[("geth-1", 1), ("geth-2", 2)], Some("5000"));
    assert_eq!(t.on_watch_snapshot(at(1), held, true), WatchVerdict::Taken);
    // etcd wiped: the apiserver's state starts over at a low revision.
    let fresh = at_version(&[("geth-2", 2)], Some("120"));
    assert_eq!(
        t.on_read_snapshot(at(2), fresh.clone()),
        ReadVerdict::WentBack {
            from: 5000,
            to: Some("120".into())
        }
    );
    assert_eq!(t.snapshot(), Some(&fresh), "the read is the truth");
    // From there on, versions count from the new numbering.
    let next = at_version(&[("geth-1", 1), ("geth-2", 2)], Some("130"));
    assert_eq!(t.on_read_snapshot(at(3), next), ReadVerdict::Taken);
}

#[test]
fn a_read_finding_no_registry_after_one_was_held_went_back_unless_its_deletion_was_watched() {
    let mut t = Tracker::new();
    let held = at_version(&[("geth-1", 1)], Some("40"));
    t.on_watch_snapshot(at(1), held.clone(), true);
    assert_eq!(
        t.on_read_snapshot(at(2), Snapshot::default()),
        ReadVerdict::WentBack { from: 40, to: None }
    );
    assert_eq!(t.snapshot(), Some(&Snapshot::default()));
    let mut t = Tracker::new();
    t.on_watch_snapshot(at(1), held, true);
    assert_eq!(
        t.on_watch_snapshot(at(2), Snapshot::default(), false),
        WatchVerdict::Reread
    );
    assert_eq!(
        t.on_read_snapshot(at(3), Snapshot::default()),
        ReadVerdict::Taken
    );
}

#[test]
fn after_a_read_went_back_an_out_of_order_watch_item_is_still_stale() {
    let mut t = Tracker::new();
    t.on_watch_snapshot(at(1), at_version(&[("geth-1", 1)], Some("5000")), true);
    t.on_read_snapshot(at(2), at_version(&[("geth-2", 2)], Some("120")));
    // An item older than the read, in the new numbering: still refused.
    assert_eq!(
        t.on_watch_snapshot(at(3), at_version(&[], Some("110")), false),
        WatchVerdict::Stale
    );
    // And a read that is newer moves on without a warning.
    assert_eq!(
        t.on_read_snapshot(at(4), at_version(&[("geth-2", 2)], Some("121"))),
        ReadVerdict::Taken
    );
    // Our own write's return never says anything went back, and a later
    // read at the same version is no step back either.
    t.on_snapshot(at(5), at_version(&[("geth-2", 2)], Some("150")));
    assert_eq!(
        t.on_read_snapshot(at(6), at_version(&[("geth-2", 2)], Some("150"))),
        ReadVerdict::Taken
    );
}

#[test]
fn registrations_of_a_watchs_list_are_landed_and_listed_later_ones_landed_only() {
    let (a, b) = (enode(1, 1), enode(2, 2));
    let mut t = Tracker::new();
    t.on_snapshot(at(0), snapshot([]));
    t.on_watch_snapshot(at(1), snapshot([record("a", &a, at(0))]), true);
    t.on_watch_snapshot(
        at(2),
        snapshot([record("a", &a, at(0)), record("b", &b, at(2))]),
        false,
    );
    assert_eq!(t.registrations_landed.get(&a.node_id()), Some(&at(1)));
    assert!(t.registrations_listed.contains(&a.node_id()));
    assert_eq!(t.registrations_landed.get(&b.node_id()), Some(&at(2)));
    assert!(!t.registrations_listed.contains(&b.node_id()));
}

#[test]
fn a_registration_sent_before_the_first_read_makes_that_read_learned_late() {
    let (me, a, b) = (enode(3, 3), enode(1, 1), enode(2, 2));
    let mut t = Tracker::new();
    t.on_registration_sent(me.node_id(), at(1));
    t.on_snapshot(
        at(4),
        snapshot([
            record("me", &me, at(1)),
            record("a", &a, at(0)),
            record("b", &b, at(0)),
        ]),
    );
    assert_eq!(t.registrations_landed.get(&me.node_id()), Some(&at(1)));
    for peer in [&a, &b] {
        assert_eq!(t.registrations_landed.get(&peer.node_id()), Some(&at(4)));
        assert!(t.registrations_listed.contains(&peer.node_id()));
    }
    assert!(!t.registrations_listed.contains(&me.node_id()));
    // A first read without our record yet: ours still counts as landed
    // when sent, also once a later read shows it.
    let mut t = Tracker::new();
    t.on_registration_sent(me.node_id(), at(1));
    t.on_snapshot(at(4), snapshot([record("a", &a, at(0))]));
    assert_eq!(t.registrations_landed.get(&me.node_id()), Some(&at(1)));
    assert!(t.registrations_listed.contains(&a.node_id()));
    t.on_snapshot(
        at(5),
        snapshot([record("a", &a, at(0)), record("me", &me, at(1))]),
    );
    assert_eq!(t.registrations_landed.get(&me.node_id()), Some(&at(1)));
    // Without a registration sent first, a first read notes no landing.
    let mut t = Tracker::new();
    t.on_snapshot(at(4), snapshot([record("a", &a, at(0))]));
    assert!(t.registrations_landed.is_empty());
    // Sent once a snapshot is held: nothing changes.
    t.on_registration_sent(me.node_id(), at(5));
    t.on_snapshot(
        at(6),
        snapshot([record("a", &a, at(0)), record("me", &me, at(5))]),
    );
    assert_eq!(t.registrations_landed.get(&me.node_id()), Some(&at(6)));
    assert!(!t.registrations_listed.contains(&a.node_id()));
}

#[test]
fn a_departed_member_leaves_nothing_behind_in_the_per_member_maps() {
    let (a, b) = (enode(1, 1), enode(2, 2));
    let mut t = Tracker::new();
    t.on_snapshot(
        at(0),
        snapshot([record("a", &a, at(0)), record("b", &b, at(0))]),
    );
    t.on_probes(at(1), at(1), [(b.node_id(), false)]);
    t.on_peer_event(&event(
        PeerEventKind::Drop,
        b.node_id(),
        Some("genesis mismatch"),
    ));
    assert!(t.unreachable_since().contains_key(&b.node_id()));
    assert!(t.unusable().contains_key(&b.node_id()));
    t.on_snapshot(at(2), snapshot([record("a", &a, at(0))]));
    assert!(!t.unreachable_since().contains_key(&b.node_id()));
    assert!(!t.unusable().contains_key(&b.node_id()));
    assert!(!t.registrations_seen.contains_key(&b.node_id()));
}

#[test]
fn a_connected_member_loses_its_unreachability_clock() {
    let a = enode(1, 1);
    let mut t = Tracker::new();
    t.on_snapshot(at(0), snapshot([record("a", &a, at(0))]));
    assert!(t.on_probes(at(1), at(1), [(a.node_id(), false)]));
    t.on_peers([(a.node_id(), ready())]);
    assert!(t.unreachable_since().is_empty());
    assert!(
        t.probe_targets(None, false, |_| false).is_empty(),
        "connected: not probed"
    );
}

#[test]
fn a_refused_record_is_never_a_probe_target() {
    let (a, b) = (enode(1, 1), enode(2, 2));
    let mut t = Tracker::new();
    t.on_snapshot(
        at(0),
        snapshot([record("a", &a, at(0)), record("b", &b, at(0))]),
    );
    let targets = t.probe_targets(None, false, |e| e.node_id() == b.node_id());
    assert_eq!(targets, vec![(a.node_id(), a.clone())]);
}

#[test]
fn a_reconnected_geth_forgets_what_was_applied_and_knows_its_static_set() {
    let a = enode(1, 1);
    let mut t = Tracker::new();
    assert_eq!(t.on_geth_generation(1), GenerationChange::First);
    t.on_geth_action(&GethAction::AddPeer(a.clone()), at(0));
    assert!(
        t.blind_adds.contains_key(&a.node_id()),
        "static set unknown: a blind add"
    );
    assert_eq!(t.on_geth_generation(1), GenerationChange::Same);
    assert_eq!(
        t.on_geth_generation(2),
        GenerationChange::Reconnected { applied_before: 1 }
    );
    assert!(t.applied().is_empty() && t.blind_adds.is_empty());
    t.on_geth_action(&GethAction::AddPeer(a.clone()), at(1));
    assert!(
        !t.blind_adds.contains_key(&a.node_id()),
        "static set known after a restart"
    );
}

#[test]
fn only_mismatch_drops_mark_a_peer_unusable_and_only_once() {
    let a = enode(1, 1);
    let mut t = Tracker::new();
    let mismatch = event(PeerEventKind::Drop, a.node_id(), Some("subprotocol error"));
    assert!(matches!(
        t.on_peer_event(&mismatch),
        PeerEventEffect::Unusable { first: true, .. }
    ));
    assert!(matches!(
        t.on_peer_event(&mismatch),
        PeerEventEffect::Unusable { first: false, .. }
    ));
    let plain = event(
        PeerEventKind::Drop,
        a.node_id(),
        Some("disconnect requested"),
    );
    assert_eq!(t.on_peer_event(&plain), PeerEventEffect::PassDue);
    t.on_peers([(a.node_id(), ready())]);
    assert!(t.unusable().is_empty(), "an eth handshake clears the mark");
}

/// What can happen to a tracker, for the properties.
#[derive(Debug, Clone)]
enum Step {
    Snapshot(Vec<u8>),
    Probe(u8, bool),
    Peers(Vec<u8>),
    Add(u8),
    Drop(u8, bool),
    Generation(u64),
    GethDown,
    Applied(u8),
}

fn step() -> impl Strategy<Value = Step> {
    let id = 1u8..6;
    prop_oneof![
        proptest::collection::vec(1u8..6, 0..5).prop_map(Step::Snapshot),
        (id.clone(), any::<bool>()).prop_map(|(i, ok)| Step::Probe(i, ok)),
        proptest::collection::vec(1u8..6, 0..5).prop_map(Step::Peers),
        id.clone().prop_map(Step::Add),
        (id.clone(), any::<bool>()).prop_map(|(i, m)| Step::Drop(i, m)),
        (0u64..3).prop_map(Step::Generation),
        Just(Step::GethDown),
        id.prop_map(Step::Applied),
    ]
}

proptest! {
    /// Whatever happened: no connected peer has an unreachability clock, the
    /// per-member maps hold only ids the registry (or geth's applied set)
    /// has, and the observation shows exactly the tracker's state.
    #[test]
    fn the_tracker_keeps_its_invariants_over_any_sequence(steps in proptest::collection::vec(step(), 0..40)) {
        let mut t = Tracker::new();
        for (i, s) in steps.into_iter().enumerate() {
            let now = at(i64::try_from(i).unwrap_or(0));
            match s {
                Step::Snapshot(ids) => {
                    let recs = ids.iter().map(|&n| record(&format!("p{n}"), &enode(n, n), now));
                    t.on_snapshot(now, snapshot(recs));
                }
                Step::Probe(n, ok) => { t.on_probes(now, now, [(enode(n, n).node_id(), ok)]); }
                Step::Peers(ids) => t.on_peers(ids.iter().map(|&n| (enode(n, n).node_id(), ready()))),
                Step::Add(n) => { t.on_peer_event(&event(PeerEventKind::Add, enode(n, n).node_id(), None)); }
                Step::Drop(n, mismatch) => {
                    let err = if mismatch { "genesis mismatch" } else { "timeout" };
                    t.on_peer_event(&event(PeerEventKind::Drop, enode(n, n).node_id(), Some(err)));
                }
                Step::Generation(g) => { t.on_geth_generation(g); }
                Step::GethDown => t.on_geth_down(),
                Step::Applied(n) => t.on_geth_action(&GethAction::AddPeer(enode(n, n)), now),
            }
            for id in t.connected().keys() {
                prop_assert!(!t.unreachable_since().contains_key(id), "connected yet unreachable");
                prop_assert!(!t.blind_adds.contains_key(id), "connected yet a blind add");
            }
            if let Some(snap) = t.snapshot() {
                let members: BTreeSet<NodeId> = snap.members.values().map(|m| m.node_id).collect();
                for id in t.registrations_seen.keys().chain(t.registrations_landed.keys()) {
                    prop_assert!(members.contains(id), "registration kept for a departed member");
                }
            }
            let me = crate::testkit::identity("me", &enode(9, 9));
            let obs = t.observation(now, &me, None);
            prop_assert_eq!(obs.connected, t.connected());
            prop_assert_eq!(obs.unreachable_since, t.unreachable_since());
            prop_assert_eq!(obs.applied, t.applied());
        }
    }
}
