//! What the engine decides: registry writes, geth calls and a report.

use std::fmt;
use std::time::Duration;

use geth_ipc::{Enode, NodeId};
use jiff::Timestamp;
use peer_registry::MemberRecord;
use serde::Serialize;

/// A write to the shared registry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
#[allow(
    clippy::large_enum_variant,
    reason = "at most two per plan; an unboxed record keeps matching simple"
)]
pub enum RegistryAction {
    /// Create or replace this sidecar's own record (keyed by its pod name).
    Upsert(MemberRecord),
    /// Remove these records, each only if the stored record is still exactly that
    /// record (a conditional removal: a member that re-registered in the meantime
    /// is kept).
    Remove(Vec<MemberRecord>),
    /// Remove these legacy members (`static-nodes.json` entries without a
    /// record, by node id) from `static-nodes.json`.
    RemoveLegacy(Vec<Enode>),
}

/// A call to geth's admin API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum GethAction {
    /// `admin_addPeer`: add to the static set (ignored by geth if the id is there).
    AddPeer(Enode),
    /// `admin_removePeer`: remove from the static set by id, disconnecting it.
    RemovePeer(Enode),
    /// `admin_addTrustedPeer`: mark the id trusted (no dial).
    AddTrustedPeer(Enode),
    /// `admin_removeTrustedPeer`: unmark the id (no disconnect).
    RemoveTrustedPeer(Enode),
}

impl GethAction {
    /// The enode the call is about.
    pub fn enode(&self) -> &Enode {
        match self {
            Self::AddPeer(e)
            | Self::RemovePeer(e)
            | Self::AddTrustedPeer(e)
            | Self::RemoveTrustedPeer(e) => e,
        }
    }

    /// The admin method name, e.g. `admin_addPeer`.
    pub fn method(&self) -> &'static str {
        match self {
            Self::AddPeer(_) => "admin_addPeer",
            Self::RemovePeer(_) => "admin_removePeer",
            Self::AddTrustedPeer(_) => "admin_addTrustedPeer",
            Self::RemoveTrustedPeer(_) => "admin_removeTrustedPeer",
        }
    }
}

impl fmt::Display for GethAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.method(), self.enode())
    }
}

/// A peer named for humans: its pod when it is a member, and its short node id.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerRef {
    /// The member's pod name; `None` for an external peer or an unknown id.
    pub pod: Option<String>,
    /// The node id.
    pub node_id: NodeId,
}

impl fmt::Display for PeerRef {
    /// `geth-1 (1a2b3c4d)`, or `1a2b3c4d` without a pod.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.pod {
            Some(pod) => write!(f, "{pod} ({})", self.node_id.short()),
            None => f.write_str(&self.node_id.short()),
        }
    }
}

/// Why a member is removed from the registry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(
    rename_all = "camelCase",
    rename_all_fields = "camelCase",
    tag = "kind"
)]
pub enum RemovalReason {
    /// Pod evidence: no pod of that name exists.
    PodGone,
    /// Pod evidence: a pod of that name exists with another UID (a new pod).
    PodReplaced {
        /// The UID in the record.
        record_uid: String,
        /// The UID of the pod that exists now.
        pod_uid: String,
    },
    /// Pod evidence: the pod has another IP than the record says.
    PodIpChanged {
        /// The IP in the record.
        record_ip: String,
        /// The pod's IP now.
        pod_ip: String,
    },
    /// Pod evidence: the enode's IP is not the pod's IP.
    AddressNotPods {
        /// The IP in the record's enode.
        address: String,
        /// The pod's IP.
        pod_ip: String,
    },
    /// Pod evidence from this observer's pod watch: it saw the member's pod
    /// with the record's UID and then saw it deleted or replaced
    /// ([`Observation::pods_gone`](crate::Observation::pods_gone)). Removed at
    /// once, without waiting for `grace_after_register`.
    PodDeleted {
        /// The pod's UID the watch saw go (the record's UID).
        uid: String,
    },
    /// Unreachable from this observer continuously for at least `dead_after`,
    /// not connected to this geth, this observer sees a majority, and (unless
    /// [`Config::confirmations_needed`](crate::Config::confirmations_needed)
    /// is 0) every other member asked found it unreachable too.
    Unreachable {
        /// Since when (counted from the record's last update at the earliest).
        since: Timestamp,
        /// For how long, at the time of the plan.
        #[serde(rename = "for")]
        for_: Duration,
        /// How many other members' sidecars found it unreachable too (0 when
        /// no confirmation is needed).
        confirmed: usize,
        /// How many were asked.
        asked: usize,
    },
}

impl fmt::Display for RemovalReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PodGone => f.write_str("its pod no longer exists"),
            Self::PodReplaced {
                record_uid,
                pod_uid,
            } => write!(
                f,
                "its pod was replaced (record UID {record_uid}, pod UID now {pod_uid})"
            ),
            Self::PodIpChanged { record_ip, pod_ip } => write!(
                f,
                "its pod's IP changed (record {record_ip}, pod now {pod_ip})"
            ),
            Self::AddressNotPods { address, pod_ip } => write!(
                f,
                "its enode's address {address} is not its pod's IP {pod_ip}"
            ),
            Self::PodDeleted { uid } => write!(
                f,
                "its pod (UID {uid}) was seen deleted or replaced by this sidecar's pod watch"
            ),
            Self::Unreachable {
                since,
                for_,
                confirmed,
                asked,
            } => {
                write!(
                    f,
                    "unreachable from here since {since} ({} s)",
                    for_.as_secs()
                )?;
                if *asked > 0 {
                    write!(f, " and from {confirmed} of {asked} other members asked,")?;
                }
                f.write_str(" and not connected")
            }
        }
    }
}

/// One planned registry removal and its reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Removal {
    /// The record removed (conditionally).
    pub record: MemberRecord,
    /// Why.
    pub reason: RemovalReason,
}

impl fmt::Display for Removal {
    /// `removing geth-2 (1a2b3c4d): its pod no longer exists`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "removing {} ({}): {}",
            self.record.pod,
            self.record.node_id.short(),
            self.reason
        )
    }
}

/// Something wrong in the inputs that the engine worked around. Each names the
/// member and what to check.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize)]
#[serde(
    rename_all = "camelCase",
    rename_all_fields = "camelCase",
    tag = "kind"
)]
pub enum Problem {
    /// The advertised enode is loopback/unspecified: this node is not registered.
    #[error(
        "not registering: this node advertises {enode}, which no other pod can reach \
         (publish the pod IP or a DNS name)"
    )]
    SelfAdvertisesLocalAddress {
        /// The advertised enode.
        enode: String,
    },
    /// The advertised enode's key does not match this geth's node id.
    #[error(
        "not registering: the advertised enode has node id {advertised} but geth reports {node_id}"
    )]
    SelfNodeIdMismatch {
        /// The advertised enode's id.
        advertised: NodeId,
        /// geth's id.
        node_id: NodeId,
    },
    /// A record's `nodeId` field disagrees with its enode's key (the enode wins).
    #[error(
        "member {pod}: record nodeId {record} does not match its enode's key ({enode}); using the enode"
    )]
    RecordNodeIdMismatch {
        /// The member.
        pod: String,
        /// The `nodeId` field.
        record: NodeId,
        /// The enode's id.
        enode: NodeId,
    },
    /// Another pod's record carries this node's id (a copied node key, or an old
    /// pod name): ignored, never removed.
    #[error("member {pod} claims this node's id {node_id}: ignored (two pods sharing a node key?)")]
    RecordClaimsOwnNodeId {
        /// The other pod.
        pod: String,
        /// This node's id.
        node_id: NodeId,
    },
    /// Two members have the same node id: the most recently updated one is dialled.
    #[error(
        "members {kept} and {ignored} have the same node id {node_id}: dialling {kept}'s enode"
    )]
    DuplicateNodeId {
        /// The id.
        node_id: NodeId,
        /// The pod whose enode is used.
        kept: String,
        /// The pod ignored for dialling.
        ignored: String,
    },
    /// A member advertises a loopback, unspecified, multicast or link-local
    /// address: the record is refused (never dialled).
    #[error(
        "registry key member.{pod} advertises {enode}, a loopback, unspecified, multicast or \
         link-local address: refused, no geth dials it; fix or delete that key"
    )]
    MemberAdvertisesLocalAddress {
        /// The member.
        pod: String,
        /// Its enode.
        enode: String,
    },
    /// A member advertises an IP outside every network of the member address
    /// allowlist ([`Config::member_cidrs`](crate::Config::member_cidrs)): the
    /// record is refused (never dialled).
    #[error(
        "registry key member.{pod} advertises {enode}, outside the allowed member networks \
         MEMBER_CIDRS={allowed}: refused, no geth dials it; fix or delete that key (or widen \
         MEMBER_CIDRS)"
    )]
    MemberOutsideAllowedCidrs {
        /// The member.
        pod: String,
        /// Its enode.
        enode: String,
        /// The allowlist, comma-separated (`10.244.0.0/16,fd00::/8`).
        allowed: String,
    },
    /// A legacy member (a `static-nodes.json` entry without a record) at an
    /// address no member may have (loopback, link-local, outside MEMBER_CIDRS...):
    /// never dialled.
    #[error(
        "static-nodes.json entry {enode} (a legacy member: no member record) is at an address \
         no member may have ({why}): refused, no geth dials it; remove the entry"
    )]
    LegacyEntryRefused {
        /// The entry.
        enode: String,
        /// Why.
        why: String,
    },
    /// An external peer has a member's node id: the member's record is used.
    #[error("external peer {node_id} is also member {pod}: using the member's record")]
    ExternalIsMember {
        /// The id.
        node_id: NodeId,
        /// The member.
        pod: String,
    },
    /// A member's enode names a DNS host that has not been resolved (or
    /// resolved to nothing): not dialled, probed nor counted until it resolves.
    #[error(
        "registry key member.{pod} advertises {enode}, a DNS name not resolved: not dialled \
         nor probed until it resolves to allowed addresses; check the name"
    )]
    MemberUnresolved {
        /// The member.
        pod: String,
        /// Its enode.
        enode: String,
    },
    /// A member's DNS host resolves to an address no member may have
    /// (loopback, unspecified, multicast, link-local, or outside
    /// [`Config::member_cidrs`](crate::Config::member_cidrs)): the record is
    /// refused (never dialled nor probed).
    #[error(
        "registry key member.{pod} advertises {enode}, which resolves to {address} ({why}): \
         refused, no geth dials it; fix or delete that key"
    )]
    MemberResolvesToRefusedAddress {
        /// The member.
        pod: String,
        /// Its enode.
        enode: String,
        /// The refused address.
        address: String,
        /// Why it is refused.
        why: String,
    },
    /// With trusted pod evidence, a member's DNS host does not resolve to its
    /// pod's IP: the record is refused (never dialled nor probed).
    #[error(
        "registry key member.{pod} advertises {enode}, which resolves to {resolved}, not to \
         its pod's IP {pod_ip}: refused, no geth dials it; fix or delete that key"
    )]
    MemberResolvesElsewhere {
        /// The member.
        pod: String,
        /// Its enode.
        enode: String,
        /// What the host resolved to, comma-separated.
        resolved: String,
        /// The pod's IP.
        pod_ip: String,
    },
    /// The pod list was not trusted for this pass.
    #[error("pod evidence ignored: {reason}")]
    PodEvidenceIgnored {
        /// Why.
        reason: &'static str,
    },
}

/// What the pass saw and decided, for logs, metrics and the status endpoint.
/// Its [`Display`](fmt::Display) is one deterministic line that changes only when
/// the situation does (log it when it differs from the previous one).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// False when the registry has not been read yet (then nothing was planned).
    pub registry_synced: bool,
    /// New pairs whose first dial is left to the other side for now
    /// ([`Config::dial_grace`](crate::Config::dial_grace)).
    pub awaiting_dial: Vec<PeerRef>,
    /// When the engine wants to be asked again (the earliest grace expiry), if
    /// anything waits on the clock.
    pub recheck_at: Option<jiff::Timestamp>,
    /// Whether this node's own record is planned to be written.
    pub registering: bool,
    /// Number of peers this geth should have (members except self, plus external).
    pub desired: usize,
    /// How many desired peers are connected now.
    pub connected: usize,
    /// How many desired peers are connected with the eth handshake done.
    pub ready: usize,
    /// Desired peers not connected now (sorted).
    pub missing: Vec<PeerRef>,
    /// Peers that connect then drop for a network/genesis mismatch, with the error.
    pub unusable: Vec<(PeerRef, String)>,
    /// Registry removals planned, with reasons (sorted by pod).
    pub removals: Vec<Removal>,
    /// Members unreachable from here for at least `dead_after` that are kept
    /// (pod alive, recently registered, or withheld by the partition guard).
    pub unreachable: Vec<PeerRef>,
    /// Members (and legacy entries, without a pod) unreachable from here for
    /// at least `dead_after` and removable but for the agreement of other
    /// observers: ask other members' sidecars to probe them and pass their
    /// answers in [`Observation::confirmations`](crate::Observation::confirmations)
    /// (sorted). Also listed in `unreachable`.
    pub awaiting_confirmation: Vec<PeerRef>,
    /// True when removals for unreachability were withheld because this observer
    /// does not see a strict majority of the registry (it may be the one cut off).
    pub suspected_partition: bool,
    /// Peers whose geth change (departure or address move) waits until they are
    /// disconnected: `admin_removePeer` would cut a live link.
    pub deferred: Vec<PeerRef>,
    /// Members not peered because their record does not match their pod (pod
    /// evidence), kept in the registry while just written or still connected.
    pub unmatched: Vec<(PeerRef, RemovalReason)>,
    /// Legacy members (the original sidecar's `static-nodes.json` entries) peered with.
    pub legacy: usize,
    /// Legacy members removed from `static-nodes.json` (unreachable for
    /// `dead_after`, not connected, this observer in a majority), with why.
    pub legacy_removals: Vec<(Enode, RemovalReason)>,
    /// Input problems worked around.
    pub problems: Vec<Problem>,
}

fn list<T: fmt::Display>(f: &mut fmt::Formatter<'_>, label: &str, items: &[T]) -> fmt::Result {
    if items.is_empty() {
        return Ok(());
    }
    write!(f, "; {label}: ")?;
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        write!(f, "{item}")?;
    }
    Ok(())
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.registry_synced {
            return f.write_str("registry not read yet: no changes planned");
        }
        write!(
            f,
            "{} desired peers, {} connected ({} ready)",
            self.desired, self.connected, self.ready
        )?;
        if self.registering {
            f.write_str("; registering self")?;
        }
        list(f, "missing", &self.missing)?;
        let unusable: Vec<String> = self
            .unusable
            .iter()
            .map(|(p, e)| format!("{p} [{e}]"))
            .collect();
        list(f, "unusable", &unusable)?;
        let removals: Vec<String> = self
            .removals
            .iter()
            .map(|r| {
                format!(
                    "{} ({}): {}",
                    r.record.pod,
                    r.record.node_id.short(),
                    match r.reason {
                        RemovalReason::PodGone => "pod gone",
                        RemovalReason::PodReplaced { .. } => "pod replaced",
                        RemovalReason::PodIpChanged { .. } => "pod IP changed",
                        RemovalReason::AddressNotPods { .. } => "address not the pod's",
                        RemovalReason::PodDeleted { .. } => "pod deleted",
                        RemovalReason::Unreachable { .. } => "unreachable",
                    }
                )
            })
            .collect();
        list(f, "removing", &removals)?;
        list(f, "unreachable (kept)", &self.unreachable)?;
        list(f, "awaiting confirmation", &self.awaiting_confirmation)?;
        if self.suspected_partition {
            f.write_str(
                "; SUSPECTED PARTITION: this node does not see a majority, removals withheld",
            )?;
        }
        list(f, "deferred while connected", &self.deferred)?;
        let unmatched: Vec<String> = self
            .unmatched
            .iter()
            .map(|(p, why)| format!("{p} ({why})"))
            .collect();
        list(f, "not matching their pods", &unmatched)?;
        let legacy_removals: Vec<String> = self
            .legacy_removals
            .iter()
            .map(|(e, why)| format!("legacy {e} ({why})"))
            .collect();
        list(f, "removing", &legacy_removals)?;
        list(f, "problems", &self.problems)
    }
}

/// The outcome of one pass: registry writes first, then geth calls in order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    /// Registry writes. At most one `Upsert` (self) and one `Remove`; empty in
    /// steady state.
    pub registry: Vec<RegistryAction>,
    /// geth calls, to run in this order (for a moved id `RemovePeer` precedes
    /// `AddPeer`). Empty in steady state.
    pub geth: Vec<GethAction>,
    /// What was seen and why.
    pub report: Report,
}

impl Plan {
    /// True when there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.registry.is_empty() && self.geth.is_empty()
    }
}
