//! What the loop tells an operator: the notices behind Kubernetes Events.

/// Something an operator should see in `kubectl describe pod`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive] // more notices may come: a match needs a `_` arm
#[allow(missing_docs)] // the variants' fields are named for what they hold
pub enum Notice {
    /// This node's record was written for the first time by this sidecar.
    Registered { enode: String },
    /// This node's advertised address changed (pod moved, new IP).
    AddressChanged { from: String, to: String },
    /// This node's record was removed on SIGTERM.
    Deregistered,
    /// This sidecar removed another member from the registry.
    MemberRemoved { pod: String, evidence: String },
    /// A peer connects but is on another network, genesis or fork.
    PeerUnusable { peer: String, error: String },
    /// Reachable members stay unconnected: geth's peer limits.
    PeerLimitReached { detail: String },
    /// Most members look unreachable from here: removals withheld.
    PartitionSuspected { detail: String },
    /// Pod evidence became unavailable (the pod watch fails or is stale):
    /// removals fall back to agreement between members.
    PodEvidenceLost { reason: String },
    /// A registry write failed for a reason other than a conflict.
    RegistryUnwritable { error: String },
    /// The registry's versions went back (etcd restored or wiped, or the
    /// registry deleted while its watch lagged): the sidecar took the
    /// apiserver's state, registers again and watches anew.
    RegistryWentBack { detail: String },
}
