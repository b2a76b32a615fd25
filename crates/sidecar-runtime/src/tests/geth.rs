//! geth's admin calls: how they are made, and what a pass makes of their
//! outcomes.

use crate::execute::call_geth;

use super::*;

/// geth whose peer calls take 50 ms each (on tokio's clock), logging
/// when each starts and ends and how many were in flight at most.
#[derive(Default)]
struct SlowGeth {
    log: std::sync::Mutex<Vec<String>>,
    in_flight: std::sync::atomic::AtomicUsize,
    most: std::sync::atomic::AtomicUsize,
    fail_remove: bool,
}

impl SlowGeth {
    async fn call(&self, what: &str, e: &Enode) -> geth_ipc::Result<bool> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        let host = e.host().to_string();
        self.log
            .lock()
            .expect("log")
            .push(format!("start {what} {host}"));
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.log
            .lock()
            .expect("log")
            .push(format!("end {what} {host}"));
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        if what == "remove" && self.fail_remove {
            return Err(geth_ipc::Error::ConnectionLost);
        }
        Ok(true)
    }
}

#[async_trait::async_trait]
impl AdminApi for SlowGeth {
    async fn node_info(&self) -> geth_ipc::Result<NodeInfo> {
        Err(geth_ipc::Error::ConnectionLost)
    }
    async fn peers(&self) -> geth_ipc::Result<Vec<geth_ipc::PeerInfo>> {
        Err(geth_ipc::Error::ConnectionLost)
    }
    async fn add_peer(&self, e: &Enode) -> geth_ipc::Result<bool> {
        self.call("add", e).await
    }
    async fn remove_peer(&self, e: &Enode) -> geth_ipc::Result<bool> {
        self.call("remove", e).await
    }
    async fn add_trusted_peer(&self, e: &Enode) -> geth_ipc::Result<bool> {
        self.call("trust", e).await
    }
    async fn remove_trusted_peer(&self, e: &Enode) -> geth_ipc::Result<bool> {
        self.call("untrust", e).await
    }
    async fn peer_events(&self) -> geth_ipc::Result<PeerEventStream> {
        Err(geth_ipc::Error::ConnectionLost)
    }
    fn connection_generation(&self) -> u64 {
        1
    }
}

#[tokio::test(start_paused = true)]
async fn geth_calls_for_different_nodes_are_in_flight_together_and_one_nodes_stay_in_order() {
    let moved = enode(1).with_host("10.0.0.9".parse().expect("host"));
    let actions = [
        core::GethAction::RemovePeer(enode(1)),
        core::GethAction::AddPeer(enode(2)),
        core::GethAction::AddPeer(moved),
    ];
    let geth = SlowGeth::default();
    let done = call_geth(&geth, &actions).await;
    assert_eq!(done.len(), 3);
    assert!(done.iter().all(|(_, r)| r.is_ok()));
    assert_eq!(
        geth.most.load(Ordering::SeqCst),
        2,
        "node 2 alongside node 1"
    );
    let log = geth.log.lock().expect("log").clone();
    let at = |line: &str| log.iter().position(|l| l == line).expect(line);
    assert!(
        at("end remove 10.0.0.2") < at("start add 10.0.0.9"),
        "a move stays removePeer, then addPeer: {log:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn after_a_lost_connection_no_further_geth_call_is_started() {
    let moved = enode(1).with_host("10.0.0.9".parse().expect("host"));
    let actions = [
        core::GethAction::RemovePeer(enode(1)),
        core::GethAction::AddPeer(moved),
    ];
    let geth = SlowGeth {
        fail_remove: true,
        ..SlowGeth::default()
    };
    let done = call_geth(&geth, &actions).await;
    assert_eq!(
        done.len(),
        1,
        "the addPeer after the failure was not called"
    );
    assert!(
        done[0]
            .1
            .as_ref()
            .is_err_and(geth_ipc::Error::is_connection_error)
    );
}

#[tokio::test]
async fn a_refused_add_peer_is_counted_alone_and_the_pass_goes_on_with_geth_up() {
    let mut g = geth("10.0.0.1");
    // geth refuses the first add_peer of the pass, whichever peer it is for.
    let calls = Arc::new(AtomicU64::new(0));
    g.expect_add_peer().times(2).returning(move |_| {
        if calls.fetch_add(1, Ordering::Relaxed) == 0 {
            Err(geth_ipc::Error::Rpc {
                code: -32000,
                message: "invalid enode".into(),
            })
        } else {
            Ok(true)
        }
    });
    let mut r = runner(g, pod_ip());
    assert_eq!(r.pass().await.map_err(|e| e.kind()), Err("geth_action"));
    assert_eq!(r.reported.geth.get(), Some(&GethState::Up));
    assert!(r.health.geth_ok.load(Ordering::Relaxed));
    assert_eq!(count(&r.metrics.geth_action_errors, "add_peer"), 1);
    assert_eq!(r.tracker.applied().len(), 1, "the other peer was added");
}

#[tokio::test]
async fn an_action_that_loses_the_connection_marks_geth_down_and_stops_the_pass() {
    let mut g = geth("10.0.0.1");
    g.expect_add_peer()
        .times(1)
        .returning(|_| Err(geth_ipc::Error::ConnectionLost));
    let mut r = runner(g, pod_ip());
    assert_eq!(r.pass().await.map_err(|e| e.kind()), Err("geth"));
    assert!(matches!(r.reported.geth.get(), Some(GethState::Down(_))));
    assert!(!r.health.geth_ok.load(Ordering::Relaxed));
}

#[tokio::test]
async fn an_unusable_advertised_address_still_peers_with_the_others_and_says_why() {
    let mut g = geth("127.0.0.1");
    g.expect_add_peer().times(2).returning(|_| Ok(true));
    let mut r = runner(g, AdvertiseMode::Geth);
    let _ = r.pass().await;
    assert_eq!(
        r.tracker.applied().len(),
        2,
        "peered with geth-1 and geth-2"
    );
    let problem = crate::health::lock(&r.health.advertise_problem).clone();
    assert!(problem.is_some_and(|p| p.contains("127.0.0.1")));
}

#[tokio::test]
async fn a_new_geth_connection_re_applies_every_peer() {
    let generation = Arc::new(AtomicU64::new(1));
    let mut g = geth_connected("10.0.0.1", &[], generation.clone());
    g.expect_remove_peer().returning(|_| Ok(true));
    g.expect_add_peer().times(4).returning(|_| Ok(true));
    let mut r = runner(g, pod_ip());
    assert_eq!(r.pass().await.map_err(|e| e.kind()), Ok(()));
    assert_eq!(
        r.pass().await.map_err(|e| e.kind()),
        Ok(()),
        "nothing more on the same connection"
    );
    generation.store(2, Ordering::Relaxed);
    assert_eq!(r.pass().await.map_err(|e| e.kind()), Ok(()));
    assert_eq!(r.metrics.geth_reconnects.get(), 2);
    assert_eq!(r.tracker.applied().len(), 2);
}

#[tokio::test]
async fn a_connected_peer_that_moved_is_deferred_never_cut() {
    let mut g = geth_connected("10.0.0.1", &[1], Arc::new(AtomicU64::new(1)));
    let moved = enode(1).node_id();
    g.expect_remove_peer()
        .withf(move |e| e.node_id() == moved)
        .never();
    g.expect_remove_peer().returning(|_| Ok(true));
    g.expect_add_peer().times(1).returning(|_| Ok(true));
    let mut r = runner(g, pod_ip());
    let old = enode(1).with_host(geth_ipc::Host::Ip("10.0.0.99".parse().expect("ip")));
    // Applied on the same geth connection as the pass will see.
    r.tracker.on_geth_generation(1);
    r.tracker.on_geth_action(
        &core::GethAction::AddPeer(old.clone()),
        jiff::Timestamp::now(),
    );
    assert_eq!(r.pass().await.map_err(|e| e.kind()), Ok(()));
    assert_eq!(
        r.tracker.applied().get(&moved),
        Some(&old),
        "still the old address"
    );
}

#[tokio::test]
async fn a_new_pair_waits_for_the_newcomer_to_dial_and_asks_for_a_recheck() {
    let mut snap = snapshot("10");
    let now = jiff::Timestamp::now();
    let newcomer = snap.members.get_mut("geth-1").expect("geth-1");
    newcomer.registered_at = now;
    newcomer.updated_at = now;
    let mut g = geth("10.0.0.1");
    let waiting = enode(1).node_id();
    g.expect_add_peer()
        .withf(move |e| e.node_id() == waiting)
        .never();
    g.expect_add_peer().times(1).returning(|_| Ok(true));
    let mut r = runner_on(g, pod_ip(), snap);
    assert_eq!(r.pass().await.map_err(|e| e.kind()), Ok(()));
    let recheck = r.recheck_at.expect("a recheck after the dial grace");
    let grace = core::Config::default().dial_grace;
    assert!(recheck > now && recheck <= now + grace, "{recheck}");
}
