//! geth's static and trusted sets: adds, removes, moves and departures,
//! external peers, and which side of a new pair dials first
//! (engine/geth.rs).

use super::*;

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
