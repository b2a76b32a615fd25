//! The [`AdminApi`] of a [`FakeGeth`]: each call answered from, or applied
//! to, the network's state, then settled; every call fails while the node is
//! stopped.

use futures::StreamExt;
use tokio::sync::mpsc;

use super::FakeGeth;
use crate::client::{AdminApi, PeerEventStream};
use crate::enode::Enode;
use crate::error::Result;
use crate::types::{NodeInfo, PeerInfo, PeerNetwork, Ports};

#[async_trait::async_trait]
impl AdminApi for FakeGeth {
    async fn node_info(&self) -> Result<NodeInfo> {
        self.call(|s| {
            let n = s.nodes.get(&self.id)?;
            Some(NodeInfo {
                id: self.id,
                name: "FakeGeth/v1.17.5".into(),
                enode: format!("{}?discport=0", n.enode),
                enr: None,
                ip: Some(n.enode.host().to_string()),
                ports: Ports {
                    discovery: 0,
                    listener: n.enode.tcp_port(),
                },
                listen_addr: Some(format!("[::]:{}", n.enode.tcp_port())),
                protocols: serde_json::json!({"eth": {"network": 1337}}),
            })
        })?
        .ok_or_else(|| self.down_error())
    }

    async fn peers(&self) -> Result<Vec<PeerInfo>> {
        self.call(|s| {
            let Some(n) = s.nodes.get(&self.id) else {
                return Vec::new();
            };
            let local = n.addr();
            n.links
                .iter()
                .filter_map(|(id, link)| {
                    let other = s.nodes.get(id)?;
                    let remote = other.addr();
                    Some(PeerInfo {
                        id: *id,
                        name: "FakeGeth/v1.17.5".into(),
                        enode: other.enode.to_string(),
                        enr: None,
                        caps: vec!["eth/68".into(), "eth/69".into()],
                        network: PeerNetwork {
                            local_address: local.clone(),
                            remote_address: remote,
                            inbound: link.inbound,
                            trusted: n.trusted.contains(id),
                            static_: link.static_dialled,
                        },
                        protocols: serde_json::json!({"eth": {"version": 68}}),
                    })
                })
                .collect()
        })
    }

    async fn add_peer(&self, enode: &Enode) -> Result<bool> {
        self.call(|s| {
            if let Some(n) = s.nodes.get_mut(&self.id) {
                n.statics
                    .entry(enode.node_id())
                    .or_insert_with(|| enode.clone());
            }
            true
        })
    }

    async fn remove_peer(&self, enode: &Enode) -> Result<bool> {
        self.call(|s| {
            let other = enode.node_id();
            if let Some(n) = s.nodes.get_mut(&self.id) {
                n.statics.remove(&other);
            }
            s.disconnect(self.id, other, "disconnect requested");
            true
        })
    }

    async fn add_trusted_peer(&self, enode: &Enode) -> Result<bool> {
        self.call(|s| {
            if let Some(n) = s.nodes.get_mut(&self.id) {
                n.trusted.insert(enode.node_id());
            }
            true
        })
    }

    async fn remove_trusted_peer(&self, enode: &Enode) -> Result<bool> {
        self.call(|s| {
            if let Some(n) = s.nodes.get_mut(&self.id) {
                n.trusted.remove(&enode.node_id());
            }
            true
        })
    }

    async fn peer_events(&self) -> Result<PeerEventStream> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        self.call(|s| {
            if let Some(n) = s.nodes.get_mut(&self.id) {
                n.subscribers.push(tx);
            }
        })?;
        let stream = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
        Ok(stream.boxed())
    }

    fn connection_generation(&self) -> u64 {
        self.with_node(|n, _| n.generation).unwrap_or(0)
    }
}
