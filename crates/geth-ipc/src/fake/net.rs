//! The state of a [`FakeNet`]: its nodes, their static and
//! trusted sets and connections, the cut pairs; and the settle step that
//! brings the connections to the fixed point of the model's rules (see
//! [`FakeNet`]).

use std::collections::{BTreeMap, BTreeSet};

use tokio::sync::mpsc;

use crate::enode::{Enode, NodeId};
use crate::error::{Error, Result};
use crate::types::{PeerEvent, PeerEventKind};

// Names the doc links use.
#[cfg(doc)]
use super::FakeNet;

/// One connection as one side sees it.
#[derive(Clone, Copy, Debug)]
pub(super) struct Link {
    /// The other side dialled us.
    pub(super) inbound: bool,
    /// We dialled it as a static peer.
    pub(super) static_dialled: bool,
}

pub(super) struct Node {
    /// The node's key and its current address (host and TCP port).
    pub(super) enode: Enode,
    pub(super) up: bool,
    pub(super) max_peers: usize,
    /// The static dial set (`admin_addPeer`), keyed by node id.
    pub(super) statics: BTreeMap<NodeId, Enode>,
    /// Trusted ids (`admin_addTrustedPeer`).
    pub(super) trusted: BTreeSet<NodeId>,
    pub(super) links: BTreeMap<NodeId, Link>,
    pub(super) subscribers: Vec<mpsc::UnboundedSender<Result<PeerEvent>>>,
    pub(super) generation: u64,
}

impl Node {
    pub(super) fn dial_cap(&self) -> usize {
        (self.max_peers / 3).max(1)
    }

    pub(super) fn outbound(&self) -> usize {
        self.links.values().filter(|l| !l.inbound).count()
    }

    /// geth's admission check: non-trusted connections are refused at maxpeers.
    pub(super) fn admits(&self, from: &NodeId) -> bool {
        self.trusted.contains(from) || self.links.len() < self.max_peers
    }

    pub(super) fn emit(&mut self, event: &PeerEvent) {
        self.subscribers
            .retain(|s| s.send(Ok(event.clone())).is_ok());
    }

    /// Ends every subscription with `ConnectionLost`, as a restart does.
    pub(super) fn end_subscriptions(&mut self) {
        for s in self.subscribers.drain(..) {
            // A reader that went away needs no notice.
            let _ = s.send(Err(Error::ConnectionLost));
        }
    }

    pub(super) fn addr(&self) -> String {
        format!("{}:{}", self.enode.host(), self.enode.tcp_port())
    }
}

#[derive(Default)]
pub(super) struct NetState {
    pub(super) nodes: BTreeMap<NodeId, Node>,
    /// Pairs that cannot reach each other (smaller id first): partitions.
    pub(super) blocked: BTreeSet<(NodeId, NodeId)>,
    /// Pairs cut one by one ([`FakeNet::block`]), apart from partitions.
    pub(super) cut: BTreeSet<(NodeId, NodeId)>,
}

pub(super) fn pair(a: NodeId, b: NodeId) -> (NodeId, NodeId) {
    if a <= b { (a, b) } else { (b, a) }
}

impl NetState {
    pub(super) fn reachable(&self, a: NodeId, b: NodeId) -> bool {
        let p = pair(a, b);
        !self.blocked.contains(&p) && !self.cut.contains(&p)
    }

    pub(super) fn connect(&mut self, dialler: NodeId, target: NodeId) {
        let (Some(d_addr), Some(t_addr)) = (
            self.nodes.get(&dialler).map(Node::addr),
            self.nodes.get(&target).map(Node::addr),
        ) else {
            return;
        };
        if let Some(d) = self.nodes.get_mut(&dialler) {
            d.links.insert(
                target,
                Link {
                    inbound: false,
                    static_dialled: true,
                },
            );
            d.emit(&event(PeerEventKind::Add, target, None, &d_addr, &t_addr));
        }
        if let Some(t) = self.nodes.get_mut(&target) {
            t.links.insert(
                dialler,
                Link {
                    inbound: true,
                    static_dialled: false,
                },
            );
            t.emit(&event(PeerEventKind::Add, dialler, None, &t_addr, &d_addr));
        }
    }

    /// Drops the connection between `a` and `b` (if any), with `why` on both sides.
    pub(super) fn disconnect(&mut self, a: NodeId, b: NodeId, why: &str) {
        for (me, other) in [(a, b), (b, a)] {
            let other_addr = self.nodes.get(&other).map(Node::addr).unwrap_or_default();
            if let Some(n) = self.nodes.get_mut(&me)
                && n.links.remove(&other).is_some()
            {
                let local = n.addr();
                n.emit(&event(
                    PeerEventKind::Drop,
                    other,
                    Some(why),
                    &local,
                    &other_addr,
                ));
            }
        }
    }

    /// Brings the connections to the fixed point of the rules (see [`FakeNet`]).
    pub(super) fn settle(&mut self) {
        // Drop what can no longer exist: a side down, or the pair partitioned.
        let mut dead = Vec::new();
        for (id, n) in &self.nodes {
            for other in n.links.keys() {
                let other_up = self.nodes.get(other).is_some_and(|o| o.up);
                if id < other && (!n.up || !other_up || !self.reachable(*id, *other)) {
                    dead.push((*id, *other));
                }
            }
        }
        for (a, b) in dead {
            self.disconnect(a, b, "connection reset by peer");
        }
        // Dial static peers until nothing changes: in id order, each node its
        // static set in id order.
        loop {
            let mut dial = None;
            'search: for (id, n) in &self.nodes {
                if !n.up || n.outbound() >= n.dial_cap() {
                    continue;
                }
                for (target, at) in &n.statics {
                    if target == id || n.links.contains_key(target) {
                        continue;
                    }
                    let Some(t) = self.nodes.get(target) else {
                        continue;
                    };
                    if t.up
                        && t.enode.same_address(at)
                        && self.reachable(*id, *target)
                        && n.admits(target)
                        && t.admits(id)
                    {
                        dial = Some((*id, *target));
                        break 'search;
                    }
                }
            }
            match dial {
                Some((a, b)) => self.connect(a, b),
                None => break,
            }
        }
    }
}

pub(super) fn event(
    kind: PeerEventKind,
    peer: NodeId,
    error: Option<&str>,
    local: &str,
    remote: &str,
) -> PeerEvent {
    PeerEvent {
        kind,
        peer,
        error: error.map(str::to_owned),
        protocol: None,
        local: Some(local.to_owned()),
        remote: Some(remote.to_owned()),
    }
}
