//! The runner's tests (ported from the binary's `runner.rs`): a [`Runner`]
//! on mock geth and a mock registry, driven pass by pass or through its
//! event loop. The tracker's own rules are tested in reconcile-core
//! (`tracker_tests.rs`); these test the runtime around it.
//!
//! - `watch`: the registry watch (stale events, lists, events during a pass).
//! - `geth`: geth's admin calls and what a pass makes of their outcomes.
//! - `peers`: geth's connections, peer events and what the loop reports.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt as _;
use geth_ipc::{
    AdminApi, Enode, MockAdminApi, NodeInfo, PeerEvent, PeerEventKind, PeerEventStream,
};
use peer_registry::{MemberRecord, MockPeerRegistry, Snapshot};
use reconcile_core as core;

use crate::health::Health;
use crate::identity::AdvertiseMode;
use crate::metrics::Metrics;
use crate::runner::{GethState, Runner};
use crate::settings::Settings;
use crate::triggers::{Watch, WatchItems};

mod early;
mod geth;
mod peers;
mod recheck;
mod resync;
mod socket;
mod watch;

const KEYS: [&str; 3] = [
    "79be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798483ada7726a3c4655da4fbfc0e1108a8fd17b448a68554199c47d08ffb10d4b8",
    "c6047f9441ed7d6d3045406e95c07cd85c778e4b8cef3ca7abac09b95c709ee51ae168fea63dc339a3c58419466ceaeef7f632653266d0e1236431a950cfe52a",
    "5cbdf0646e5db4eaa398f365f2ea7a0e3d419b7e0330e39ce92bddedcac4f9bc6aebca40ba255960a3178d6d861a54dba813d0b813fde7b5a5082628087264da",
];

fn enode(i: usize) -> Enode {
    format!("enode://{}@10.0.0.{}:30303", KEYS[i], i + 1)
        .parse()
        .expect("valid enode")
}

fn record(i: usize) -> MemberRecord {
    let e = enode(i);
    let long_ago = jiff::Timestamp::from_second(1_700_000_000).expect("timestamp");
    MemberRecord {
        pod: format!("geth-{i}"),
        node_id: e.node_id(),
        enode: e.clone(),
        pod_uid: None,
        pod_ip: Some(e.host().to_string()),
        registered_at: long_ago,
        updated_at: long_ago,
        sidecar_version: env!("CARGO_PKG_VERSION").to_owned(),
    }
}

/// A registry holding geth-0 (this node), geth-1 and geth-2.
fn snapshot(rv: &str) -> Snapshot {
    Snapshot {
        resource_version: Some(rv.to_owned()),
        members: (0..3).map(|i| (format!("geth-{i}"), record(i))).collect(),
        ..Snapshot::default()
    }
}

/// A registry holding only the members `members`, at version `rv`.
fn only(rv: &str, members: &[usize]) -> Snapshot {
    Snapshot {
        resource_version: Some(rv.to_owned()),
        members: members
            .iter()
            .map(|&i| (format!("geth-{i}"), record(i)))
            .collect(),
        ..Snapshot::default()
    }
}

/// A registry that reads `snap` and returns it from every upsert.
fn registry(snap: Snapshot) -> MockPeerRegistry {
    let mut reg = MockPeerRegistry::new();
    let read = snap.clone();
    reg.expect_snapshot().returning(move || Ok(read.clone()));
    reg.expect_upsert().returning(move |_| Ok(snap.clone()));
    reg.expect_create().returning(|_| Ok(None));
    reg
}

/// geth as node 0, reporting `host` in its enode, connected to nobody.
fn geth(host: &str) -> MockAdminApi {
    let mut g = geth_connected(host, &[], Arc::new(AtomicU64::new(1)));
    g.expect_remove_peer().returning(|_| Ok(true));
    g
}

/// geth as node 0, connected (outbound) to the nodes `connected`, on the
/// connection generation `generation` holds.
fn geth_connected(host: &str, connected: &[usize], generation: Arc<AtomicU64>) -> MockAdminApi {
    let info: NodeInfo = serde_json::from_value(serde_json::json!({
        "id": enode(0).node_id().to_string(),
        "enode": format!("enode://{}@{host}:30303", KEYS[0]),
        "ports": {"discovery": 0, "listener": 30303},
    }))
    .expect("node info");
    let peers: Vec<geth_ipc::PeerInfo> = connected
        .iter()
        .map(|&i| {
            serde_json::from_value(serde_json::json!({
                "id": enode(i).node_id().to_string(),
                "enode": enode(i).to_string(),
                "network": {"localAddress": "10.0.0.1:40000", "remoteAddress": format!("10.0.0.{}:30303", i + 1),
                            "inbound": false, "trusted": false, "static": true},
                "protocols": {"eth": {}},
            }))
            .expect("peer info")
        })
        .collect();
    let mut g = MockAdminApi::new();
    g.expect_node_info().returning(move || Ok(info.clone()));
    g.expect_connection_generation()
        .returning(move || generation.load(Ordering::Relaxed));
    g.expect_peers().returning(move || Ok(peers.clone()));
    g
}

fn runner(geth: MockAdminApi, advertise: AdvertiseMode) -> Runner<MockAdminApi, MockPeerRegistry> {
    runner_on(geth, advertise, snapshot("10"))
}

fn runner_on(
    geth: MockAdminApi,
    advertise: AdvertiseMode,
    snap: Snapshot,
) -> Runner<MockAdminApi, MockPeerRegistry> {
    runner_with(
        geth,
        registry(snap),
        settings(advertise),
        Arc::new(Metrics::new()),
    )
}

fn runner_with<G: AdminApi>(
    geth: G,
    registry: MockPeerRegistry,
    settings: Settings,
    metrics: Arc<Metrics>,
) -> Runner<G, MockPeerRegistry> {
    Runner::new(
        Arc::new(geth),
        Arc::new(registry),
        settings,
        metrics,
        Arc::new(Health::new(None)),
    )
}

/// This node's settings as `geth-0` at 10.0.0.1 (the system clock, TCP
/// probes, no pod evidence, no hooks), with a fixed seed.
fn settings(advertise: AdvertiseMode) -> Settings {
    let mut s = Settings::new("geth-0", advertise);
    s.pod_ip = Some("10.0.0.1".into());
    s.seed = Some(1);
    s
}

fn pod_ip() -> AdvertiseMode {
    AdvertiseMode::PodIp("10.0.0.1".parse().expect("ip"))
}

/// A watch that has delivered its list (`listed`) or not, and yields nothing.
fn quiet_watch(listed: bool) -> Watch {
    Watch {
        stream: futures::stream::pending().boxed(),
        listed,
    }
}

/// `snap` as the watch's one new item.
fn items(snap: Snapshot) -> WatchItems {
    let mut items = WatchItems::default();
    items.push(Some(Ok(snap)));
    items
}

/// The resourceVersion of the snapshot the runner holds.
fn held_version<G: AdminApi>(r: &Runner<G, MockPeerRegistry>) -> Option<String> {
    r.tracker
        .snapshot()
        .and_then(|s| s.resource_version.clone())
}

fn add_event(i: usize) -> PeerEvent {
    PeerEvent {
        kind: PeerEventKind::Add,
        peer: enode(i).node_id(),
        error: None,
        protocol: None,
        local: None,
        remote: None,
    }
}

fn count(
    family: &prometheus_client::metrics::family::Family<
        crate::metrics::KindLabel,
        prometheus_client::metrics::counter::Counter,
    >,
    kind: &str,
) -> u64 {
    family.get_or_create(&Metrics::kind(kind)).get()
}

/// Hooks that keep every notice.
#[derive(Default)]
struct Recorded(std::sync::Mutex<Vec<crate::notice::Notice>>);

impl crate::ports::Hooks for Recorded {
    fn notice(&self, notice: crate::notice::Notice) {
        self.0.lock().expect("lock").push(notice);
    }
}

/// Polls `what` every 5 ms until it holds, for at most 10 s.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "waited 10 s for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[test]
fn mismatch_drops_are_incompatible_and_ordinary_drops_are_not() {
    assert!(core::is_incompatible("subprotocol error"));
    assert!(core::is_incompatible("network ID mismatch (1 != 2)"));
    assert!(core::is_incompatible("genesis mismatch"));
    assert!(!core::is_incompatible("disconnect requested"));
    assert!(!core::is_incompatible("EOF"));
}
