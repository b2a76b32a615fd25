//! What the engine is told: the observed state of this node, its geth, the
//! registry and (optionally) the pods.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

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

/// The latest round of indirect probes of one member: other members' sidecars
/// asked whether they reach it, because this observer has found it unreachable
/// for at least [`Config::dead_after`](crate::Config::dead_after) (the members
/// to ask about are in [`Report::awaiting_confirmation`](crate::Report::awaiting_confirmation)).
///
/// Without trusted pod evidence, a member is removed for unreachability only
/// when at least [`Config::confirmations_needed`](crate::Config::confirmations_needed)
/// other observers answered in a round made during the current unreachability
/// and every answer said "unreachable": a one-way broken path, a blocked probe
/// port or a DNS failure on this observer alone then removes nobody. Any
/// "reachable" answer vetoes, and restarts the member's `dead_after` from then.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Confirmation {
    /// When the latest round's answers were in, on this observer's clock. A
    /// round older than the member's current unreachability is not counted.
    pub at: Timestamp,
    /// How many other members' sidecars were asked in that round.
    pub asked: usize,
    /// How many answered that they cannot reach the member either.
    pub unreachable: usize,
    /// How many answered that they reach it (a veto).
    pub reachable: usize,
    /// When an asked sidecar last answered "reachable", in this round or an
    /// earlier one (keep it when a later round replaces the counts): the
    /// member's `dead_after` runs again from then. `None`: never.
    pub last_reachable: Option<Timestamp>,
}

static NO_PEERS: BTreeMap<NodeId, PeerObservation> = BTreeMap::new();
static NO_TIMES: BTreeMap<NodeId, Timestamp> = BTreeMap::new();
static NO_REASONS: BTreeMap<NodeId, String> = BTreeMap::new();
static NO_IDS: BTreeSet<NodeId> = BTreeSet::new();
static NO_PODS_GONE: BTreeMap<String, String> = BTreeMap::new();
static NO_ADDRESSES: BTreeMap<NodeId, Vec<IpAddr>> = BTreeMap::new();
static NO_CONFIRMATIONS: BTreeMap<NodeId, Confirmation> = BTreeMap::new();

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
    /// does not count it as reachable. The same holds for a legacy entry
    /// (a `static-nodes.json` entry without a record): put the time this
    /// observer first saw it into `registrations_seen` under its node id.
    /// `None`: no round yet.
    pub probed_at: Option<Timestamp>,
    /// Pods this observer's pod watch saw and then saw deleted, or replaced by
    /// a pod of another UID: pod name → the UID it saw go. A member whose
    /// record carries exactly that UID for that pod is removed at once, even
    /// within [`Config::grace_after_register`](crate::Config::grace_after_register)
    /// (which stays for a pod the watch has never seen), when the pod evidence
    /// is trusted (see `pods`) and does not show that pod with that UID. Fill
    /// it only from a watch that is current; forget an entry once no record
    /// carries its UID.
    pub pods_gone: &'a BTreeMap<String, String>,
    /// What the host of each member (and legacy entry) whose enode names a DNS
    /// host resolved to, by node id. Such a member is held to the same checks
    /// as an IP by these addresses: all of them routable and inside
    /// [`Config::member_cidrs`](crate::Config::member_cidrs), and, with
    /// trusted pod evidence, one of them its pod's IP. A DNS-host member
    /// absent here (or resolving to nothing) is not dialled, not probed and
    /// not counted, and is reported; it is not removed. Probe the addresses
    /// given by [`probe_targets`](crate::probe_targets), not a new lookup.
    pub resolved: &'a BTreeMap<NodeId, Vec<IpAddr>>,
    /// For members (and legacy entries) listed in
    /// [`Report::awaiting_confirmation`](crate::Report::awaiting_confirmation):
    /// the latest round of indirect probes by other members' sidecars, by node
    /// id. See [`Confirmation`].
    pub confirmations: &'a BTreeMap<NodeId, Confirmation>,
}

impl<'a> Observation<'a> {
    /// An observation with no connections, no probe failures, no pod evidence,
    /// no unusable peers, no resolved DNS hosts and no confirmations.
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
            pods_gone: &NO_PODS_GONE,
            resolved: &NO_ADDRESSES,
            confirmations: &NO_CONFIRMATIONS,
        }
    }
}
