//! The registry's data: one record per member, and a decoded snapshot.

use std::collections::{BTreeMap, BTreeSet};

use geth_ipc::{Enode, NodeId};
use serde::{Deserialize, Serialize};

/// One member of the mesh: a geth node and its sidecar, keyed by pod name.
///
/// Stored as JSON under the ConfigMap key `member.<pod>` (see the crate README).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberRecord {
    /// Pod name: the member's key. Unique in the namespace.
    pub pod: String,
    /// The node id (keccak256 of the node key), as geth reports it.
    pub node_id: NodeId,
    /// The enode other nodes dial: the advertised host (pod IP or DNS name) and port.
    pub enode: Enode,
    /// The pod's UID, when the Downward API provides it: tells a replaced pod apart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    /// The pod's IP, when known (also with DNS-name advertising).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_ip: Option<String>,
    /// When this pod first registered.
    pub registered_at: jiff::Timestamp,
    /// When the record last changed.
    pub updated_at: jiff::Timestamp,
    /// Version of the sidecar that wrote the record.
    #[serde(default)]
    pub sidecar_version: String,
}

impl MemberRecord {
    /// True when `other` describes the same registration: same pod, node id,
    /// enode (host and ports) and pod UID. Timestamps and version are ignored.
    pub fn same_registration(&self, other: &MemberRecord) -> bool {
        self.pod == other.pod
            && self.node_id == other.node_id
            && self.enode.identical(&other.enode)
            && self.pod_uid == other.pod_uid
            && self.pod_ip == other.pod_ip
    }

    /// True when an upsert of `new` keeps this stored record as it is: the
    /// [same registration](Self::same_registration) written by the same
    /// sidecar version (timestamps alone never cause a write).
    pub fn keeps(&self, new: &MemberRecord) -> bool {
        self.same_registration(new) && self.sidecar_version == new.sidecar_version
    }
}

/// A decoded view of the registry at one resourceVersion.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The resourceVersion this snapshot was read at; `None` when the object is missing.
    pub resource_version: Option<String>,
    /// Members by pod name.
    pub members: BTreeMap<String, MemberRecord>,
    /// Operator-maintained peers outside the cluster: read by every sidecar, never
    /// written by one.
    pub external: Vec<Enode>,
    /// Legacy members: `static-nodes.json` entries with no member record, as the
    /// original (Python) sidecar writes them: peered with, kept in
    /// `static-nodes.json`, removed only on the same evidence as a member.
    pub legacy: Vec<Enode>,
    /// The node ids of the [`legacy`](Self::legacy) entries that the lease
    /// layout's publisher derived from member Leases (listed in
    /// [`LEASE_MEMBERS_KEY`](crate::schema::LEASE_MEMBERS_KEY)), as a
    /// ConfigMap-layout sidecar of a fleet switching layouts sees them: peered
    /// with and probed like legacy entries, but never removed by it (the
    /// publisher owns them and would put them back at once: a write storm).
    /// Always empty in the lease layout's own snapshots.
    pub derived: BTreeSet<NodeId>,
    /// Human-readable problems found while decoding (malformed records skipped,
    /// garbage in the derived key, ...). Each names the key and what to do.
    pub problems: Vec<String>,
}

impl Snapshot {
    /// True when the registry object exists.
    pub fn exists(&self) -> bool {
        self.resource_version.is_some()
    }

    /// The member with this node id, if any.
    pub fn member_by_node_id(&self, id: &NodeId) -> Option<&MemberRecord> {
        self.members.values().find(|m| &m.node_id == id)
    }
}
