//! Serde types for geth's `admin_nodeInfo`, `admin_peers` and `admin_peerEvents`.
//!
//! Field names follow geth's JSON. Every type tolerates unknown fields (newer geth
//! versions add some) and missing optional fields (`enr` is often absent, `caps` may
//! be `null`). Only the node ids are required: an answer without one is not usable.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::enode::{Enode, EnodeError, NodeId};

/// Accepts `null` as the type's default (geth prints nil slices and maps as `null`).
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// The answer of `admin_nodeInfo`: who the local geth is.
///
/// The `enode` here carries the IP geth advertises (`--nat extip:X`, else
/// `127.0.0.1`), never the listen address: in Kubernetes, publish the pod IP or a
/// stable DNS name instead (see [`Enode::with_host`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The node id (keccak256 of the public key).
    pub id: NodeId,
    /// The client name, e.g. `Geth/v1.17.5-stable/linux-amd64/go1.24.2`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub name: String,
    /// The enode URL as geth prints it (see [`NodeInfo::parsed_enode`]).
    #[serde(default, deserialize_with = "null_as_default")]
    pub enode: String,
    /// The node's ENR (`enr:-...`), when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enr: Option<String>,
    /// The advertised IP address, when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// The discovery (UDP) and listener (TCP) ports.
    #[serde(default, deserialize_with = "null_as_default")]
    pub ports: Ports,
    /// The bound listen address, e.g. `[::]:30303` (geth's `listenAddr`).
    #[serde(
        rename = "listenAddr",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub listen_addr: Option<String>,
    /// Per sub-protocol information (`eth`, `snap`, ...), kept as raw JSON.
    #[serde(default)]
    pub protocols: serde_json::Value,
}

impl NodeInfo {
    /// Parses [`NodeInfo::enode`] into a validated [`Enode`].
    pub fn parsed_enode(&self) -> Result<Enode, EnodeError> {
        self.enode.parse()
    }
}

/// The ports of `admin_nodeInfo` (`ports{discovery,listener}`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Ports {
    /// The UDP discovery port (0 with `--nodiscover`).
    #[serde(default)]
    pub discovery: u16,
    /// The TCP (RLPx) listener port.
    #[serde(default)]
    pub listener: u16,
}

/// One connected peer from `admin_peers`.
///
/// Inbound peers' `enode` carries the remote's ephemeral source port: compare peers
/// by [`PeerInfo::id`], never by the enode string.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// The peer's node id.
    pub id: NodeId,
    /// The peer's client name.
    #[serde(default, deserialize_with = "null_as_default")]
    pub name: String,
    /// The peer's enode URL (for inbound peers, with the remote's source port).
    #[serde(default, deserialize_with = "null_as_default")]
    pub enode: String,
    /// The peer's ENR, when geth knows it (often absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enr: Option<String>,
    /// The devp2p capabilities the peer advertised, e.g. `eth/68`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub caps: Vec<String>,
    /// The TCP connection: addresses and flags.
    #[serde(default, deserialize_with = "null_as_default")]
    pub network: PeerNetwork,
    /// Per sub-protocol state: `protocols.eth` is the string `"handshake"` until the
    /// eth handshake completes, then an object.
    #[serde(default)]
    pub protocols: serde_json::Value,
}

impl PeerInfo {
    /// True when `protocols.eth` is an object (handshake done), false while it is the
    /// string `"handshake"` or missing.
    pub fn eth_ready(&self) -> bool {
        self.protocols
            .get("eth")
            .is_some_and(serde_json::Value::is_object)
    }

    /// Parses [`PeerInfo::enode`] into a validated [`Enode`].
    pub fn parsed_enode(&self) -> Result<Enode, EnodeError> {
        self.enode.parse()
    }
}

/// The `network` object of a peer in `admin_peers`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerNetwork {
    /// Local endpoint of the TCP connection (`localAddress`).
    #[serde(default, deserialize_with = "null_as_default")]
    pub local_address: String,
    /// Remote endpoint of the TCP connection (`remoteAddress`).
    #[serde(default, deserialize_with = "null_as_default")]
    pub remote_address: String,
    /// True when the peer dialled us.
    #[serde(default)]
    pub inbound: bool,
    /// True when the peer is trusted (`admin_addTrustedPeer`).
    #[serde(default)]
    pub trusted: bool,
    /// True only for a connection we dialled as a static peer (`admin_addPeer`).
    #[serde(rename = "static", default)]
    pub static_: bool,
}

/// The `type` of a peer event.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PeerEventKind {
    /// `add`: the devp2p link is up (before the eth handshake).
    Add,
    /// `drop`: the peer disconnected; the event's `error` says why.
    Drop,
    /// `msgsend`: a message was sent (only with message events enabled).
    MsgSend,
    /// `msgrecv`: a message was received (only with message events enabled).
    MsgRecv,
    /// Any other type, as geth wrote it.
    Other(String),
}

impl PeerEventKind {
    /// The type as geth writes it.
    pub fn as_str(&self) -> &str {
        match self {
            PeerEventKind::Add => "add",
            PeerEventKind::Drop => "drop",
            PeerEventKind::MsgSend => "msgsend",
            PeerEventKind::MsgRecv => "msgrecv",
            PeerEventKind::Other(s) => s,
        }
    }
}

impl From<&str> for PeerEventKind {
    fn from(s: &str) -> Self {
        match s {
            "add" => PeerEventKind::Add,
            "drop" => PeerEventKind::Drop,
            "msgsend" => PeerEventKind::MsgSend,
            "msgrecv" => PeerEventKind::MsgRecv,
            other => PeerEventKind::Other(other.to_owned()),
        }
    }
}

impl fmt::Display for PeerEventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for PeerEventKind {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for PeerEventKind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(PeerEventKind::from(s.as_str()))
    }
}

/// One notification of the `admin_subscribe ["peerEvents"]` subscription.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerEvent {
    /// The event type (geth's `type`).
    #[serde(rename = "type")]
    pub kind: PeerEventKind,
    /// The peer's node id.
    pub peer: NodeId,
    /// Why the peer dropped (`drop` events), e.g. `genesis mismatch`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The sub-protocol (message events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// Local endpoint of the connection, when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<String>,
    /// Remote endpoint of the connection, when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const KEY: &str = "6f8a80d14311c39f35f516fa664deaaaa13e85b2f7493f37f6144d86991ec012937307647bd3b9a82abe2974e1407241d54947bbb39763a4cac9f77166ad92a0";

    fn id_of_key() -> NodeId {
        let e: Enode = format!("enode://{KEY}@127.0.0.1:30303").parse().unwrap();
        e.node_id()
    }

    #[test]
    fn node_info_from_geth_with_nodiscover() {
        let id = id_of_key();
        let raw = json!({
            "id": id.to_string(),
            "name": "Geth/v1.17.5-stable-de7ba0b9/linux-amd64/go1.24.2",
            "enode": format!("enode://{KEY}@127.0.0.1:30391?discport=0"),
            "enr": "enr:-KO4QGkbX0gHq0m",
            "ip": "127.0.0.1",
            "ports": {"discovery": 0, "listener": 30391},
            "listenAddr": "[::]:30391",
            "protocols": {"eth": {"network": 1337, "genesis": "0xabc", "config": {}, "head": "0xdef"}, "snap": {}},
            "someFutureField": [1, 2, 3]
        });
        let info: NodeInfo = serde_json::from_value(raw).unwrap();
        assert_eq!(info.id, id);
        assert_eq!(
            info.ports,
            Ports {
                discovery: 0,
                listener: 30391
            }
        );
        assert_eq!(info.listen_addr.as_deref(), Some("[::]:30391"));
        let enode = info.parsed_enode().unwrap();
        assert_eq!(enode.node_id(), id);
        assert_eq!(enode.disc_port(), Some(0));
        assert!(info.protocols.get("eth").is_some());
        // Round trip keeps geth's names.
        let back = serde_json::to_value(&info).unwrap();
        assert_eq!(back["listenAddr"], "[::]:30391");
    }

    #[test]
    fn node_info_tolerates_missing_optional_fields() {
        let info: NodeInfo =
            serde_json::from_value(json!({"id": id_of_key().to_string()})).unwrap();
        assert_eq!(info.enr, None);
        assert_eq!(info.ports, Ports::default());
        assert!(info.parsed_enode().is_err());
        assert!(serde_json::from_value::<NodeInfo>(json!({"name": "x"})).is_err());
    }

    #[test]
    fn peers_in_handshake_and_ready_unknown_fields_and_missing_enr() {
        let id = id_of_key();
        let raw = json!([
            {
                "enode": format!("enode://{KEY}@10.0.0.7:54012"),
                "id": id.to_string(),
                "name": "Geth/v1.17.5-stable/linux-amd64/go1.24.2",
                "caps": ["eth/68", "eth/69", "snap/1"],
                "network": {"localAddress": "10.0.0.6:30303", "remoteAddress": "10.0.0.7:54012",
                            "inbound": true, "trusted": false, "static": false},
                "protocols": {"eth": "handshake"}
            },
            {
                "enr": "enr:-abc",
                "enode": format!("enode://{KEY}@10.0.0.8:30303"),
                "id": id.to_string(),
                "name": "Geth/v1.17.5",
                "caps": null,
                "network": {"localAddress": "10.0.0.6:41000", "remoteAddress": "10.0.0.8:30303",
                            "inbound": false, "trusted": true, "static": true, "extra": 1},
                "protocols": {"eth": {"version": 68}, "snap": {"version": 1}},
                "newField": {"x": 1}
            },
            {"id": id.to_string(), "protocols": null}
        ]);
        let peers: Vec<PeerInfo> = serde_json::from_value(raw).unwrap();
        assert_eq!(peers.len(), 3);
        assert!(!peers[0].eth_ready());
        assert!(peers[0].network.inbound);
        assert_eq!(peers[0].enr, None);
        assert_eq!(peers[0].caps.len(), 3);
        assert!(peers[1].eth_ready());
        assert!(peers[1].network.static_ && peers[1].network.trusted);
        assert!(peers[1].caps.is_empty());
        assert_eq!(peers[1].enr.as_deref(), Some("enr:-abc"));
        assert!(!peers[2].eth_ready());
        assert_eq!(peers[2].network, PeerNetwork::default());
        let back = serde_json::to_value(&peers[1]).unwrap();
        assert_eq!(back["network"]["static"], true);
        assert_eq!(back["network"]["remoteAddress"], "10.0.0.8:30303");
    }

    #[test]
    fn peer_events_of_each_type() {
        let id = id_of_key();
        let add: PeerEvent = serde_json::from_value(json!({
            "type": "add", "peer": id.to_string(),
            "local": "127.0.0.1:30391", "remote": "127.0.0.1:51234"
        }))
        .unwrap();
        assert_eq!(add.kind, PeerEventKind::Add);
        assert_eq!(add.peer, id);
        assert_eq!(add.error, None);
        let drop: PeerEvent = serde_json::from_value(json!({
            "type": "drop", "peer": id.to_string(), "error": "genesis mismatch"
        }))
        .unwrap();
        assert_eq!(drop.kind, PeerEventKind::Drop);
        assert_eq!(drop.error.as_deref(), Some("genesis mismatch"));
        let msg: PeerEvent = serde_json::from_value(json!({
            "type": "msgrecv", "peer": id.to_string(), "protocol": "eth",
            "msg_code": 2, "msg_size": 100
        }))
        .unwrap();
        assert_eq!(msg.kind, PeerEventKind::MsgRecv);
        assert_eq!(msg.protocol.as_deref(), Some("eth"));
        let other: PeerEvent =
            serde_json::from_value(json!({"type": "weird", "peer": id.to_string()})).unwrap();
        assert_eq!(other.kind, PeerEventKind::Other("weird".into()));
        assert_eq!(serde_json::to_value(&other).unwrap()["type"], "weird");
        assert_eq!(PeerEventKind::MsgSend.to_string(), "msgsend");
        assert!(serde_json::from_value::<PeerEvent>(json!({"type": "add"})).is_err());
    }
}
