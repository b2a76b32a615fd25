//! geth's connections and peer events, and what the loop reports of them.

use super::*;

#[tokio::test]
async fn reachable_members_unconnected_for_a_minute_name_geths_peer_limits_once() {
    let report = core::Report {
        missing: vec![core::PeerRef {
            pod: Some("geth-1".into()),
            node_id: enode(1).node_id(),
        }],
        ..core::Report::default()
    };
    let t0 = jiff::Timestamp::from_second(1_700_000_000).expect("timestamp");
    let after = |s| t0 + jiff::SignedDuration::from_secs(s);
    let started = std::time::Instant::now();
    let mut r = runner(geth("10.0.0.1"), pod_ip());
    r.publish(&report, t0, started, true);
    assert!(r.reported.mesh_limit.get().is_none(), "not before a minute");
    r.publish(&report, after(61), started, true);
    assert!(r.reported.mesh_limit.get().is_some());
    // ... and /status and the metric say so while it lasts.
    assert_eq!(r.metrics.peer_limit_suspected.get(), 1);
    let said = crate::health::lock(&r.health.peer_limit)
        .clone()
        .unwrap_or_default();
    assert!(said.contains("--maxpeers"), "{said}");
    r.publish(&core::Report::default(), after(62), started, true);
    assert_eq!(r.metrics.peer_limit_suspected.get(), 0);
    assert!(crate::health::lock(&r.health.peer_limit).is_none());

    // An unreachable member is a network matter, not geth's limits.
    let mut r = runner(geth("10.0.0.1"), pod_ip());
    r.tracker.on_probes(t0, t0, [(enode(1).node_id(), false)]);
    r.publish(&report, t0, started, true);
    r.publish(&report, after(61), started, true);
    assert!(r.reported.mesh_limit.get().is_none());
}

#[tokio::test]
async fn a_member_seen_connected_loses_its_old_unreachability_clock() {
    let mut g = geth_connected("10.0.0.1", &[1], Arc::new(AtomicU64::new(1)));
    g.expect_add_peer().returning(|_| Ok(true));
    let mut r = runner(g, pod_ip());
    // Failing since an old partition; connected again without an `add`
    // event reaching us.
    let long_ago = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(3600);
    r.tracker.on_probes(
        long_ago,
        long_ago,
        [(enode(1).node_id(), false), (enode(2).node_id(), false)],
    );
    assert_eq!(r.pass().await.map_err(|e| e.kind()), Ok(()));
    let unreachable = r.tracker.unreachable_since();
    assert!(!unreachable.contains_key(&enode(1).node_id()));
    assert!(
        unreachable.contains_key(&enode(2).node_id()),
        "an unconnected member keeps its clock"
    );
}

#[tokio::test]
async fn a_peer_connecting_calls_for_a_pass_so_reports_follow_geth() {
    let mut r = runner(geth("10.0.0.1"), pod_ip());
    assert!(r.on_peer_event(&add_event(1)));
    assert!(r.tracker.connected().contains_key(&enode(1).node_id()));
}

#[tokio::test]
async fn peer_events_ready_together_are_taken_in_together_for_one_pass() {
    let mut r = runner(geth("10.0.0.1"), pod_ip());
    let add = |i: usize| Ok(add_event(i));
    let ready: PeerEventStream = futures::stream::iter([add(2)])
        .chain(futures::stream::pending())
        .boxed();
    let mut events = Some(ready);
    assert!(r.on_peer_events(Some(add(1)), &mut events));
    for i in [1, 2] {
        assert!(
            r.tracker.connected().contains_key(&enode(i).node_id()),
            "node {i}'s link is taken in with the first"
        );
    }
    assert!(events.is_some(), "the subscription stays");
    // An ended subscription is dropped (and re-made after the next pass).
    let ended: PeerEventStream =
        futures::stream::iter([Err(geth_ipc::Error::ConnectionLost)]).boxed();
    let mut events = Some(ended);
    assert!(r.on_peer_events(Some(add(2)), &mut events));
    assert!(events.is_none());
}
