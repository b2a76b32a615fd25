//! One test per rule of the model.

use futures::StreamExt;

use super::*;
use crate::client::{AdminApi, PeerEventStream};
use crate::types::{PeerEvent, PeerEventKind};

fn node(net: &FakeNet, seed: u64) -> FakeGeth {
    net.join(enode(seed))
}

fn enode(seed: u64) -> Enode {
    let host: Host = format!("10.0.0.{}", seed + 1).parse().unwrap();
    test_enode(seed, host, 30303).unwrap()
}

async fn peer_ids(g: &FakeGeth) -> Vec<NodeId> {
    g.peers().await.unwrap().iter().map(|p| p.id).collect()
}

async fn next_event(s: &mut PeerEventStream) -> Result<PeerEvent> {
    tokio::time::timeout(std::time::Duration::from_secs(1), s.next())
        .await
        .expect("an event")
        .expect("the stream goes on")
}

#[test]
fn test_enodes_are_valid_and_distinct_per_seed() {
    let a = enode(1);
    let b = enode(2);
    assert_ne!(a.node_id(), b.node_id());
    assert_eq!(a.to_string().parse::<Enode>().unwrap(), a);
    assert!(test_enode(u64::MAX, "10.0.0.1".parse().unwrap(), 1).is_ok());
    assert!(test_enode(1, "10.0.0.1".parse().unwrap(), 0).is_err());
}

#[tokio::test]
async fn add_peer_connects_outbound_static_and_the_other_side_sees_inbound() {
    let net = FakeNet::new();
    let (a, b) = (node(&net, 1), node(&net, 2));
    assert!(a.add_peer(&b.enode()).await.unwrap());
    let pa = a.peers().await.unwrap();
    let pb = b.peers().await.unwrap();
    assert_eq!(pa.len(), 1);
    assert_eq!(pa[0].id, b.id());
    assert!(!pa[0].network.inbound && pa[0].network.static_);
    assert_eq!(pb[0].id, a.id());
    assert!(pb[0].network.inbound && !pb[0].network.static_);
    assert!(pa[0].eth_ready());
    assert_eq!(pa[0].network.remote_address, "10.0.0.3:30303");
}

#[tokio::test]
async fn add_peer_of_a_known_id_with_a_new_address_is_ignored() {
    let net = FakeNet::new();
    let (a, b) = (node(&net, 1), node(&net, 2));
    let wrong = b.enode().with_tcp_port(30304);
    assert!(a.add_peer(&wrong).await.unwrap());
    assert!(peer_ids(&a).await.is_empty(), "nobody listens there");
    assert!(a.add_peer(&b.enode()).await.unwrap());
    assert!(
        peer_ids(&a).await.is_empty(),
        "the known id kept its address"
    );
    a.remove_peer(&b.enode()).await.unwrap();
    a.add_peer(&b.enode()).await.unwrap();
    assert_eq!(peer_ids(&a).await, vec![b.id()]);
}

#[tokio::test]
async fn a_moved_node_is_not_redialled_until_removed_and_added() {
    let net = FakeNet::new();
    let (a, b) = (node(&net, 1), node(&net, 2));
    a.add_peer(&b.enode()).await.unwrap();
    b.move_to("10.9.9.9".parse().unwrap(), 30303);
    assert!(peer_ids(&a).await.is_empty());
    a.add_peer(&b.enode()).await.unwrap();
    assert!(peer_ids(&a).await.is_empty());
    a.remove_peer(&b.enode()).await.unwrap();
    a.add_peer(&b.enode()).await.unwrap();
    assert_eq!(peer_ids(&a).await, vec![b.id()]);
}

#[tokio::test]
async fn remove_peer_disconnects_by_id_whatever_the_address_and_direction() {
    let net = FakeNet::new();
    let (a, b, c) = (node(&net, 1), node(&net, 2), node(&net, 3));
    a.add_peer(&b.enode()).await.unwrap();
    c.add_peer(&a.enode()).await.unwrap();
    assert_eq!(peer_ids(&a).await.len(), 2);
    // By id: the address in the call does not matter.
    assert!(a.remove_peer(&b.enode().with_tcp_port(1)).await.unwrap());
    assert_eq!(peer_ids(&a).await, vec![c.id()]);
    assert!(a.static_peers().is_empty());
    // An inbound peer is disconnected too; it redials at once in this model,
    // since it still has us as a static peer.
    let mut events = c.peer_events().await.unwrap();
    a.remove_peer(&c.enode()).await.unwrap();
    assert_eq!(
        next_event(&mut events).await.unwrap().kind,
        PeerEventKind::Drop
    );
    assert_eq!(
        next_event(&mut events).await.unwrap().kind,
        PeerEventKind::Add
    );
    assert_eq!(peer_ids(&a).await, vec![c.id()]);
}

#[tokio::test]
async fn remove_peer_of_an_unknown_id_returns_true() {
    let net = FakeNet::new();
    let a = node(&net, 1);
    assert!(a.remove_peer(&enode(7)).await.unwrap());
    assert!(a.remove_trusted_peer(&enode(7)).await.unwrap());
}

#[tokio::test]
async fn adding_itself_is_accepted_and_never_dialled() {
    let net = FakeNet::new();
    let a = node(&net, 1);
    assert!(a.add_peer(&a.enode()).await.unwrap());
    assert_eq!(a.static_peers(), vec![a.id()]);
    assert!(peer_ids(&a).await.is_empty());
}

#[tokio::test]
async fn add_trusted_peer_only_marks_and_does_not_dial() {
    let net = FakeNet::new();
    let (a, b) = (node(&net, 1), node(&net, 2));
    assert!(a.add_trusted_peer(&b.enode()).await.unwrap());
    assert!(peer_ids(&a).await.is_empty());
    assert_eq!(a.trusted_peers(), vec![b.id()]);
    b.add_peer(&a.enode()).await.unwrap();
    let pa = a.peers().await.unwrap();
    assert!(pa[0].network.trusted && pa[0].network.inbound);
    // Removing the mark does not disconnect.
    a.remove_trusted_peer(&b.enode()).await.unwrap();
    assert_eq!(peer_ids(&a).await, vec![b.id()]);
}

#[tokio::test]
async fn the_dial_cap_is_a_third_of_maxpeers_at_least_one() {
    let net = FakeNet::new();
    let a = net.join_with_max_peers(enode(0), 6);
    let others: Vec<FakeGeth> = (1..=4).map(|i| node(&net, i)).collect();
    for o in &others {
        a.add_peer(&o.enode()).await.unwrap();
    }
    assert_eq!(peer_ids(&a).await.len(), 2, "6 / 3 outbound");
    // A freed slot is used at once by the next static peer.
    a.remove_peer(&others[0].enode()).await.unwrap();
    assert_eq!(peer_ids(&a).await.len(), 2);

    let small = net.join_with_max_peers(enode(10), 2);
    for o in &others {
        small.add_peer(&o.enode()).await.unwrap();
    }
    assert_eq!(peer_ids(&small).await.len(), 1, "at least one");
}

#[tokio::test]
async fn maxpeers_refuses_non_trusted_connections_and_trusted_bypass_admission() {
    let net = FakeNet::new();
    let full = net.join_with_max_peers(enode(0), 2);
    let (a, b, c) = (node(&net, 1), node(&net, 2), node(&net, 3));
    a.add_peer(&full.enode()).await.unwrap();
    b.add_peer(&full.enode()).await.unwrap();
    c.add_peer(&full.enode()).await.unwrap();
    assert_eq!(peer_ids(&full).await, {
        let mut v = vec![a.id(), b.id()];
        v.sort();
        v
    });
    assert!(peer_ids(&c).await.is_empty(), "refused at maxpeers");
    full.add_trusted_peer(&c.enode()).await.unwrap();
    assert_eq!(peer_ids(&full).await.len(), 3, "trusted bypasses admission");
    assert!(peer_ids(&c).await.contains(&full.id()));
}

#[tokio::test]
async fn trusted_peers_do_not_bypass_the_dial_cap() {
    let net = FakeNet::new();
    let a = net.join_with_max_peers(enode(0), 3);
    let (b, c) = (node(&net, 1), node(&net, 2));
    for o in [&b, &c] {
        a.add_trusted_peer(&o.enode()).await.unwrap();
        a.add_peer(&o.enode()).await.unwrap();
    }
    assert_eq!(peer_ids(&a).await.len(), 1);
}

#[tokio::test]
async fn peer_events_report_add_and_drop_on_both_sides() {
    let net = FakeNet::new();
    let (a, b) = (node(&net, 1), node(&net, 2));
    let mut ea = a.peer_events().await.unwrap();
    let mut eb = b.peer_events().await.unwrap();
    a.add_peer(&b.enode()).await.unwrap();
    let ev = next_event(&mut ea).await.unwrap();
    assert_eq!((ev.kind, ev.peer), (PeerEventKind::Add, b.id()));
    assert_eq!(ev.remote.as_deref(), Some("10.0.0.3:30303"));
    let ev = next_event(&mut eb).await.unwrap();
    assert_eq!((ev.kind, ev.peer), (PeerEventKind::Add, a.id()));
    a.remove_peer(&b.enode()).await.unwrap();
    let ev = next_event(&mut ea).await.unwrap();
    assert_eq!(ev.kind, PeerEventKind::Drop);
    assert_eq!(ev.error.as_deref(), Some("disconnect requested"));
    assert_eq!(next_event(&mut eb).await.unwrap().kind, PeerEventKind::Drop);
}

#[tokio::test]
async fn restart_forgets_added_peers_bumps_the_generation_and_ends_subscriptions() {
    let net = FakeNet::new();
    let (a, b) = (node(&net, 1), node(&net, 2));
    a.add_peer(&b.enode()).await.unwrap();
    a.add_trusted_peer(&b.enode()).await.unwrap();
    let mut ea = a.peer_events().await.unwrap();
    let mut eb = b.peer_events().await.unwrap();
    assert_eq!(a.connection_generation(), 1);
    a.restart();
    assert_eq!(a.connection_generation(), 2);
    assert!(matches!(
        next_event(&mut ea).await,
        Err(Error::ConnectionLost)
    ));
    assert!(ea.next().await.is_none(), "the stream ends after the error");
    assert_eq!(next_event(&mut eb).await.unwrap().kind, PeerEventKind::Drop);
    assert!(peer_ids(&a).await.is_empty());
    assert!(peer_ids(&b).await.is_empty());
    assert!(a.static_peers().is_empty() && a.trusted_peers().is_empty());
}

#[tokio::test]
async fn a_stopped_node_fails_calls_and_its_static_peers_reconnect_when_it_starts() {
    let net = FakeNet::new();
    let (a, b) = (node(&net, 1), node(&net, 2));
    a.add_peer(&b.enode()).await.unwrap();
    b.stop();
    assert!(!b.is_up());
    assert!(matches!(b.peers().await, Err(Error::Connect { .. })));
    assert!(peer_ids(&a).await.is_empty());
    b.start();
    assert_eq!(peer_ids(&a).await, vec![b.id()], "a still dials b");
    assert_eq!(b.connection_generation(), 2);
}

#[tokio::test]
async fn a_partition_drops_connections_and_healing_restores_them() {
    let net = FakeNet::new();
    let (a, b, c) = (node(&net, 1), node(&net, 2), node(&net, 3));
    a.add_peer(&b.enode()).await.unwrap();
    a.add_peer(&c.enode()).await.unwrap();
    net.partition(&[a.id()], &[b.id()]);
    assert_eq!(peer_ids(&a).await, vec![c.id()]);
    net.heal();
    assert_eq!(peer_ids(&a).await.len(), 2);
}

#[tokio::test]
async fn a_blocked_pair_drops_only_its_own_link_and_outlives_a_heal() {
    let net = FakeNet::new();
    let (a, b, c) = (node(&net, 1), node(&net, 2), node(&net, 3));
    for (x, y) in [(&a, &b), (&a, &c), (&b, &c)] {
        x.add_peer(&y.enode()).await.unwrap();
    }
    net.block(b.id(), a.id());
    assert_eq!(peer_ids(&a).await, vec![c.id()], "a keeps c");
    assert_eq!(peer_ids(&b).await, vec![c.id()], "b keeps c");
    assert_eq!(peer_ids(&c).await.len(), 2, "c keeps both");
    // A partition's heal leaves the cut pair cut...
    net.partition(&[a.id()], &[c.id()]);
    net.heal();
    assert_eq!(peer_ids(&a).await, vec![c.id()]);
    // ...and unblocking it does not undo a partition.
    net.partition(&[a.id()], &[b.id(), c.id()]);
    net.unblock(a.id(), b.id());
    assert!(peer_ids(&a).await.is_empty());
    net.heal();
    assert_eq!(peer_ids(&a).await.len(), 2, "a redials both");
    assert_eq!(peer_ids(&b).await.len(), 2);
}

#[tokio::test]
async fn mutual_static_peers_make_one_connection() {
    let net = FakeNet::new();
    let (a, b) = (node(&net, 1), node(&net, 2));
    a.add_peer(&b.enode()).await.unwrap();
    b.add_peer(&a.enode()).await.unwrap();
    assert_eq!(peer_ids(&a).await, vec![b.id()]);
    assert_eq!(peer_ids(&b).await, vec![a.id()]);
}

#[tokio::test]
async fn node_info_reports_the_current_address() {
    let net = FakeNet::new();
    let a = node(&net, 1);
    a.move_to("10.1.1.1".parse().unwrap(), 30400);
    let info = a.node_info().await.unwrap();
    assert_eq!(info.id, a.id());
    let e = info.parsed_enode().unwrap();
    assert_eq!(e.host().to_string(), "10.1.1.1");
    assert_eq!(e.tcp_port(), 30400);
    assert_eq!(info.ports.listener, 30400);
}

#[tokio::test]
async fn usable_as_a_dyn_admin_api() {
    let net = FakeNet::new();
    let (a, b) = (node(&net, 1), node(&net, 2));
    let api: Arc<dyn AdminApi> = Arc::new(a.clone());
    api.add_peer(&b.enode()).await.unwrap();
    assert_eq!(api.peers().await.unwrap().len(), 1);
    assert_eq!(net.node_ids().len(), 2);
}
