//! [`FakeGeth`]: an in-memory [`AdminApi`] that models geth's peer handling, on a
//! shared in-memory network ([`FakeNet`]).
//!
//! The network's state and the rules that settle its connections are in
//! `net`; the [`AdminApi`] calls of a node, answered from that state, in
//! `admin`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::enode::{Enode, EnodeError, Host, NodeId};
use crate::error::{Error, Result};

// Names the doc links use.
#[cfg(doc)]
use crate::client::AdminApi;

mod admin;
mod net;

use net::{NetState, Node, pair};

/// geth's default `--maxpeers`.
pub const DEFAULT_MAX_PEERS: usize = 50;

/// A valid enode with a distinct, reproducible key per `seed` (public key
/// `(seed + 1) * G` on secp256k1): handy for fake nodes and registry records.
///
/// Fails only for TCP port 0.
pub fn test_enode(seed: u64, host: Host, tcp_port: u16) -> std::result::Result<Enode, EnodeError> {
    use k256::elliptic_curve::sec1::ToEncodedPoint;
    let scalar = k256::Scalar::from(seed) + k256::Scalar::ONE;
    let point = (k256::ProjectivePoint::GENERATOR * scalar).to_affine();
    let encoded = point.to_encoded_point(false);
    let mut pubkey = [0u8; 64];
    if let Some(xy) = encoded.as_bytes().get(1..65) {
        pubkey.copy_from_slice(xy);
    }
    Enode::new(pubkey, host, tcp_port, None)
}

/// A shared in-memory network that [`FakeGeth`] nodes join.
///
/// # The model
///
/// Every change (an admin call, [`FakeGeth::restart`], [`FakeGeth::move_to`], a
/// partition...) is followed at once by a *settle* step that brings the connections
/// to the fixed point of these rules, deterministically (nodes and static sets in
/// node-id order; no timers, no background tasks):
///
/// - A connection exists only while both nodes are up and can reach each other
///   (not [partitioned](FakeNet::partition), not [blocked](FakeNet::block)).
/// - A node dials each static peer (`admin_addPeer`) that is up, reachable **at the
///   address stored in the static set** (its current host and TCP port) and not
///   already connected, unless it is its own id. The dialling side sees the
///   connection as outbound and `static`, the other side as `inbound`.
/// - Dial cap: a node has at most `max_peers / 3` (at least 1) outbound
///   connections.
/// - Admission: a node refuses a connection (either direction) once it has
///   `max_peers` connections, unless the other id is trusted
///   (`admin_addTrustedPeer`): trusted peers bypass admission, not the dial cap.
/// - `add` and `drop` events go to the subscribers of both sides.
///
/// The static set is keyed by node id: `admin_addPeer` of a known id is ignored
/// even with a new address (remove it first); `admin_removePeer` removes by id and
/// disconnects the peer whatever its direction, and returns `true` for unknown ids.
/// Nothing added over the admin API survives [`FakeGeth::stop`] or
/// [`FakeGeth::restart`].
///
/// # What it leaves out
///
/// - Timing: geth redials a static node about every 35 s (a 30 s dial history plus
///   5 s) with a 15 s dial timeout, so a real reconnection can take up to 35 s;
///   here it is immediate. In particular, after `admin_removePeer` a remote that
///   has us as a static peer reconnects at once here, after up to 35 s on geth.
/// - geth's inbound throttle (one inbound attempt per IP every 30 s, not for
///   loopback and LAN addresses, see [`crate::geth_throttles_inbound_from`]), the
///   inbound-slot limit and pending-handshake limits.
/// - Discovery, DNS resolution (a DNS host is compared as a name), the eth
///   handshake (every connection is reported eth-ready), wrong network or genesis,
///   and message events.
/// - A node that is not on this network is never reachable.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> geth_ipc::Result<()> {
/// use geth_ipc::fake::{FakeNet, test_enode};
/// use geth_ipc::AdminApi;
///
/// let net = FakeNet::new();
/// let a = net.join(test_enode(1, "10.0.0.1".parse()?, 30303)?);
/// let b = net.join(test_enode(2, "10.0.0.2".parse()?, 30303)?);
/// a.add_peer(&b.enode()).await?;
/// assert_eq!(b.peers().await?[0].id, a.id());
/// assert!(b.peers().await?[0].network.inbound);
///
/// // A known id is not updated: the node moved, the static entry did not.
/// b.move_to("10.0.0.9".parse()?, 30303);
/// a.add_peer(&b.enode()).await?;
/// assert!(a.peers().await?.is_empty());
/// a.remove_peer(&b.enode()).await?;
/// a.add_peer(&b.enode()).await?;
/// assert_eq!(a.peers().await?.len(), 1);
///
/// // A restart forgets every added peer.
/// a.restart();
/// assert!(a.peers().await?.is_empty());
/// assert_eq!(a.connection_generation(), 2);
/// # Ok(()) }
/// ```
#[derive(Clone, Default)]
pub struct FakeNet {
    state: Arc<Mutex<NetState>>,
}

impl std::fmt::Debug for FakeNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.lock();
        f.debug_struct("FakeNet")
            .field("nodes", &s.nodes.len())
            .field("blocked", &s.blocked.len())
            .field("cut", &s.cut.len())
            .finish()
    }
}

impl FakeNet {
    /// An empty network.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, NetState> {
        // The state stays consistent: every change is made under the lock without
        // any call that can panic midway.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a running node with `--maxpeers 50` at the enode's address.
    pub fn join(&self, enode: Enode) -> FakeGeth {
        self.join_with_max_peers(enode, DEFAULT_MAX_PEERS)
    }

    /// Adds a running node with this `--maxpeers`. A node with the same id
    /// already on the network is replaced (its connections dropped).
    pub fn join_with_max_peers(&self, enode: Enode, max_peers: usize) -> FakeGeth {
        let id = enode.node_id();
        let joined = enode.clone();
        let mut s = self.lock();
        if let Some(mut old) = s.nodes.remove(&id) {
            old.end_subscriptions();
            let others: Vec<NodeId> = old.links.keys().copied().collect();
            s.nodes.insert(id, old);
            for o in others {
                s.disconnect(id, o, "client quitting");
            }
            s.nodes.remove(&id);
        }
        s.nodes.insert(
            id,
            Node {
                enode,
                up: true,
                max_peers,
                statics: BTreeMap::new(),
                trusted: BTreeSet::new(),
                links: BTreeMap::new(),
                subscribers: Vec::new(),
                generation: 1,
            },
        );
        s.settle();
        FakeGeth {
            net: self.clone(),
            id,
            joined,
        }
    }

    /// Cuts every link between a node of `side_a` and a node of `side_b`
    /// (connections drop, dials fail) until [`FakeNet::heal`].
    pub fn partition(&self, side_a: &[NodeId], side_b: &[NodeId]) {
        let mut s = self.lock();
        for a in side_a {
            for b in side_b {
                if a != b {
                    s.blocked.insert(pair(*a, *b));
                }
            }
        }
        s.settle();
    }

    /// Removes every partition; static peers reconnect. Pairs cut with
    /// [`FakeNet::block`] stay cut.
    pub fn heal(&self) {
        let mut s = self.lock();
        s.blocked.clear();
        s.settle();
    }

    /// Cuts the path between `a` and `b` alone, both directions (their
    /// connection drops, neither can dial the other), while each still reaches
    /// every other node: a one-way broken path, a NetworkPolicy between two
    /// pods. Independent of partitions: [`FakeNet::heal`] leaves it, and
    /// [`FakeNet::unblock`] does not undo a partition.
    pub fn block(&self, a: NodeId, b: NodeId) {
        if a == b {
            return;
        }
        let mut s = self.lock();
        s.cut.insert(pair(a, b));
        s.settle();
    }

    /// Restores the path between `a` and `b` cut by [`FakeNet::block`]; static
    /// peers reconnect (unless a partition still separates them).
    pub fn unblock(&self, a: NodeId, b: NodeId) {
        let mut s = self.lock();
        s.cut.remove(&pair(a, b));
        s.settle();
    }

    /// Applies the rules now. Every call and change already does; this is for
    /// callers that want to be explicit.
    pub fn settle(&self) {
        self.lock().settle();
    }

    /// The ids of the nodes on the network.
    pub fn node_ids(&self) -> Vec<NodeId> {
        self.lock().nodes.keys().copied().collect()
    }
}

/// An in-memory geth: implements [`AdminApi`] on a [`FakeNet`] (see there for the
/// model and what it leaves out). Cheap to clone; clones are the same node.
///
/// While the node is [stopped](FakeGeth::stop), every call fails with
/// [`Error::Connect`] and peer-event streams have ended with
/// [`Error::ConnectionLost`], as with a real geth that went away.
#[derive(Clone)]
pub struct FakeGeth {
    net: FakeNet,
    id: NodeId,
    /// The enode it joined with (its key never changes).
    joined: Enode,
}

impl std::fmt::Debug for FakeGeth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeGeth")
            .field("id", &self.id.short())
            .finish_non_exhaustive()
    }
}

impl FakeGeth {
    /// The node id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The network this node is on.
    pub fn net(&self) -> &FakeNet {
        &self.net
    }

    /// The node's enode at its current address.
    pub fn enode(&self) -> Enode {
        self.with_node(|n, _| n.enode.clone())
            .unwrap_or_else(|| self.joined.clone())
    }

    /// True while the node runs.
    pub fn is_up(&self) -> bool {
        self.with_node(|n, _| n.up).unwrap_or(false)
    }

    /// The ids in the static set (what `admin_addPeer` added and nothing removed).
    pub fn static_peers(&self) -> Vec<NodeId> {
        self.with_node(|n, _| n.statics.keys().copied().collect())
            .unwrap_or_default()
    }

    /// The trusted ids.
    pub fn trusted_peers(&self) -> Vec<NodeId> {
        self.with_node(|n, _| n.trusted.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Stops the node: connections drop, subscriptions end with
    /// [`Error::ConnectionLost`], and every added peer (static and trusted) is
    /// forgotten. Calls fail until [`FakeGeth::start`].
    pub fn stop(&self) {
        self.change(|n| {
            if n.up {
                n.up = false;
                n.statics.clear();
                n.trusted.clear();
                n.end_subscriptions();
            }
        });
    }

    /// Starts a stopped node (empty static and trusted sets) and increments
    /// [`AdminApi::connection_generation`], as a client reconnecting would.
    pub fn start(&self) {
        self.change(|n| {
            if !n.up {
                n.up = true;
                n.generation += 1;
            }
        });
    }

    /// [`FakeGeth::stop`] then [`FakeGeth::start`].
    pub fn restart(&self) {
        self.stop();
        self.start();
    }

    /// The node's address changes (same key): its connections drop, since they
    /// were bound to the old address, and the nodes that have it in their static
    /// set at the old address can no longer reach it. Its own peers are kept;
    /// combine with [`FakeGeth::restart`] to model a replaced pod.
    pub fn move_to(&self, host: Host, tcp_port: u16) {
        let mut s = self.net.lock();
        let Some(n) = s.nodes.get_mut(&self.id) else {
            return;
        };
        n.enode = n.enode.with_host(host).with_tcp_port(tcp_port);
        let others: Vec<NodeId> = n.links.keys().copied().collect();
        for o in others {
            s.disconnect(self.id, o, "connection reset by peer");
        }
        s.settle();
    }

    fn with_node<R>(&self, f: impl FnOnce(&Node, &NetState) -> R) -> Option<R> {
        let s = self.net.lock();
        s.nodes.get(&self.id).map(|n| f(n, &s))
    }

    fn change(&self, f: impl FnOnce(&mut Node)) {
        let mut s = self.net.lock();
        if let Some(n) = s.nodes.get_mut(&self.id) {
            f(n);
        }
        s.settle();
    }

    fn down_error(&self) -> Error {
        Error::Connect {
            endpoint: format!("fake geth {}", self.id.short()),
            reason: "geth is stopped".into(),
        }
    }

    /// Runs `f` on the running node, then settles.
    fn call<R>(&self, f: impl FnOnce(&mut NetState) -> R) -> Result<R> {
        let mut s = self.net.lock();
        if !s.nodes.get(&self.id).is_some_and(|n| n.up) {
            return Err(self.down_error());
        }
        let r = f(&mut s);
        s.settle();
        Ok(r)
    }
}

#[cfg(test)]
mod tests;
