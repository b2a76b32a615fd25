//! What the engine is told: the observed state of this node, its geth, the
//! registry and (optionally) the pods.

use std::collections::{BTreeMap, BTreeSet};

use geth_ipc::{Enode, NodeId};
use jiff::Timestamp;
use peer_registry::Snapshot;

/// Who this sidecar is: the identity it registers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SelfIdentity {
    /// This pod's name: the key of its registry record.
    pub pod: String,
    /// This geth's node id (`admin_nodeInfo.id`).
    pub node_id: NodeId,
    /// The enode other nodes should dial (pod IP or DNS name, never loopback).
    pub advertised: Enode,
    /// This pod's UID (Downward API `metadata.uid`), when known.
    pub pod_uid: Option<String>,
    /// This pod's IP (Downward API `status.podIP`), when known.
    pub pod_ip: Option<String>,
    /// The sidecar's version, written into the record.
    pub sidecar_version: String,
}

/// One connection of this geth, from `admin_peers`, keyed by node id.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerObservation {
    /// The eth handshake completed (`protocols.eth` is not `"handshake"`).
    pub eth_ready: bool,
    /// The remote dialled us.
    pub inbound: bool,
}

/// One pod as the Kubernetes API reports it, keyed by pod name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodObservation {
    /// `metadata.uid`.
    pub uid: Option<String>,
    /// `status.podIP` (absent while the pod is pending).
    pub ip: Option<String>,
}

static NO_PEERS: BTreeMap<NodeId, PeerObservation> = BTreeMap::new();
static NO_TIMES: BTreeMap<NodeId, Timestamp> = BTreeMap::new();
static NO_REASONS: BTreeMap<NodeId, String> = BTreeMap::new();
static NO_IDS: BTreeSet<NodeId> = BTreeSet::new();

/// Everything one reconcile pass knows. Borrowed: the caller keeps its state.
///
/// Build it with [`Observation::new`] and override what you have:
/// `Observation { connected: &peers, ..Observation::new(now, &me, Some(&snap), &applied) }`.
#[derive(Clone, Copy, Debug)]
pub struct Observation<'a> {
    /// The time of this pass (the caller reads the clock, the engine never does).
    pub now: Timestamp,
    /// This sidecar's identity.
    pub me: &'a SelfIdentity,
    /// The registry as last read. `None` while it has not been read yet: then the
    /// engine plans nothing at all (it cannot tell a departed peer from an unknown one).
    pub registry: Option<&'a Snapshot>,
    /// What this sidecar has applied to this geth as static peers, by node id: the
    /// caller keeps it with [`apply`](crate::apply) after each successful geth call,
    /// and empties it when geth restarted (nothing added over RPC survives a restart).
    pub applied: &'a BTreeMap<NodeId, Enode>,
    /// This geth's current connections (`admin_peers`), by node id.
    pub connected: &'a BTreeMap<NodeId, PeerObservation>,
    /// For each member this observer cannot reach: since when its TCP probes of the
    /// member's p2p endpoint have failed without interruption. A member absent from
    /// the map is reachable or not probed yet. Keyed by node id; the caller should
    /// restart a member's clock when the member's address changes (the engine also
    /// never counts time before the member's record was last updated).
    pub unreachable_since: &'a BTreeMap<NodeId, Timestamp>,
    /// The pods of the namespace by name, when the sidecar may read pods; `None`
    /// when no pod evidence is available. When `Some`, it must be complete for the
    /// members' pods: a member whose pod is absent is taken as gone. The engine
    /// ignores it (and reports why) unless it contains this sidecar's own pod with
    /// its own UID, which catches an empty or stale list.
    pub pods: Option<&'a BTreeMap<String, PodObservation>>,
    /// Peers that connect and are dropped for a network/genesis/fork mismatch, with
    /// the last error: reported, never removed (they are alive, just incompatible).
    pub unusable: &'a BTreeMap<NodeId, String>,
    /// Peers this sidecar added without knowing geth's static set (the first
    /// adds of a sidecar that started next to a running geth), with when: geth
    /// may still hold an older address for such an id, from before this sidecar,
    /// and then ignores the add. The engine clears and re-adds one that is still
    /// not connected after [`Config::stale_entry_after`](crate::Config); the
    /// caller forgets an entry once the peer connects or is removed.
    pub blind_adds: &'a BTreeMap<NodeId, Timestamp>,
    /// When this observer first saw each member's current registration, on its
    /// own clock. A member's unreachability clock counts from here as well as
    /// from the record's `updated_at`, which the member wrote with *its* clock:
    /// a member whose clock runs behind would otherwise look unreachable for
    /// longer than it was (and a member removed while partitioned away, which
    /// re-registers at once, be removed again at once).
    pub registrations_seen: &'a BTreeMap<NodeId, Timestamp>,
    /// When this observer saw each registration land while it was following
    /// the registry (those already there at its first read are not in it), on
    /// its own clock. The dial grace of a new pair counts from here as well as
    /// from the records' stamps: a record is stamped before it is written,
    /// and when many pods register at once its write can land seconds later.
    pub registrations_landed: &'a BTreeMap<NodeId, Timestamp>,
    /// The registrations of `registrations_landed` that this observer first saw
    /// in the list a new or restarted watch begins with, not as a change: they
    /// may have landed well before it saw them. The member with the newer
    /// record leaves the first dial of such a pair to the other side when it
    /// saw it late (see [`Config::dial_grace`](crate::Config::dial_grace)).
    pub registrations_listed: &'a BTreeSet<NodeId>,
    /// When this observer's last round of probes started. A member it is not
    /// connected to and whose registration it first saw after that (see
    /// `registrations_seen`) has not been checked at all: the partition guard
    /// does not count it as reachable. `None`: no round yet.
    pub probed_at: Option<Timestamp>,
}

impl<'a> Observation<'a> {
    /// An observation with no connections, no probe failures, no pod evidence and
    /// no unusable peers.
    pub fn new(
        now: Timestamp,
        me: &'a SelfIdentity,
        registry: Option<&'a Snapshot>,
        applied: &'a BTreeMap<NodeId, Enode>,
    ) -> Self {
        Self {
            now,
            me,
            registry,
            applied,
            connected: &NO_PEERS,
            unreachable_since: &NO_TIMES,
            pods: None,
            unusable: &NO_REASONS,
            blind_adds: &NO_TIMES,
            registrations_seen: &NO_TIMES,
            registrations_landed: &NO_TIMES,
            registrations_listed: &NO_IDS,
            probed_at: None,
        }
    }
}
