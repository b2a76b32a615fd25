//! The decision: [`plan`], a short sequence of named rules over one pass's
//! working state ([`Pass`]).
//!
//! Each rule has its own module and reads what the earlier ones left:
//! 1. [`register`]: this node's own record;
//! 2. [`members`]: the other members and legacy entries that may be peered
//!    with (refused addresses are dropped here, with a problem);
//! 3. [`liveness`]: which of them leave the registry (pod evidence,
//!    unreachability, the partition guard);
//! 4. [`geth`]: the desired static set and the admin calls that reach it;
//! 5. [`report`]: the counts and lists of the report.

mod geth;
mod liveness;
mod members;
mod pods;
mod probe;
mod register;
mod report;

pub use probe::{ProbeTarget, probe_targets};
pub use register::own_record;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use geth_ipc::{Enode, NodeId};
use jiff::Timestamp;
use peer_registry::{MemberRecord, Snapshot};

use crate::config::Config;
use crate::observation::Observation;
use crate::plan::{GethAction, PeerRef, Plan, RegistryAction, Report};

/// Decides one reconcile pass. Pure and deterministic: the same observation always
/// gives the same plan, and the plan never depends on map iteration order.
///
/// Rules, in short (see the crate documentation for the reasoning):
/// - nothing is planned until the registry has been read;
/// - this node's record is (re)written when missing or when its enode, node id,
///   pod UID, pod IP or sidecar version differ: never in steady state;
/// - another member is removed from the registry only on pod evidence (pod gone,
///   replaced, or with another IP) or after `dead_after` of continuous
///   unreachability from here that `confirmations_needed` other observers
///   confirm, and never when it is connected to this geth, was written within
///   `grace_after_register` (unless the pod watch saw its pod deleted), or (for
///   unreachability) when this observer and the members it reaches are not a
///   strict majority of the registry;
/// - a member at a loopback, unspecified, multicast or link-local IP, or (when
///   `member_cidrs` is set) at an IP outside every allowed network, or whose DNS
///   host is unresolved or resolves to such an address (or, with pod evidence,
///   not to its pod's IP), is refused: never dialled nor probed, not counted,
///   reported as a problem naming its key;
/// - geth's static set follows the registry (members except self, plus external
///   peers); a moved id gets `RemovePeer` before `AddPeer`; a connected peer is
///   never removed or moved (deferred until it disconnects); a start issues no
///   `RemovePeer`: a peer added blind that stays unconnected for
///   `stale_entry_after` is cleared and re-added once.
///
/// ```
/// use std::collections::BTreeMap;
/// use geth_ipc::{Enode, NodeId};
/// use peer_registry::{MemberRecord, Snapshot};
/// use reconcile_core::{Config, GethAction, Observation, RegistryAction, SelfIdentity, apply, plan};
///
/// let me_enode: Enode = "enode://6f8a80d14311c39f35f516fa664deaaaa13e85b2f7493f37f6144d86991ec012937307647bd3b9a82abe2974e1407241d54947bbb39763a4cac9f77166ad92a0@10.0.0.1:30303".parse()?;
/// let peer: Enode = "enode://5cbdf0646e5db4eaa398f365f2ea7a0e3d419b7e0330e39ce92bddedcac4f9bc6aebca40ba255960a3178d6d861a54dba813d0b813fde7b5a5082628087264da@10.0.0.2:30303".parse()?;
/// let now = jiff::Timestamp::from_second(1_700_000_000)?;
/// let earlier = jiff::Timestamp::from_second(1_699_990_000)?; // geth-1 registered before us
/// let me = SelfIdentity {
///     pod: "geth-0".into(),
///     node_id: me_enode.node_id(),
///     advertised: me_enode.clone(),
///     pod_uid: Some("uid-0".into()),
///     pod_ip: Some("10.0.0.1".into()),
///     sidecar_version: "0.1.0".into(),
/// };
/// let mut snapshot = Snapshot { resource_version: Some("1".into()), ..Snapshot::default() };
/// snapshot.members.insert("geth-1".into(), MemberRecord {
///     pod: "geth-1".into(),
///     node_id: peer.node_id(),
///     enode: peer.clone(),
///     pod_uid: Some("uid-1".into()),
///     pod_ip: Some("10.0.0.2".into()),
///     registered_at: earlier,
///     updated_at: earlier,
///     sidecar_version: "0.1.0".into(),
/// });
/// let mut applied: BTreeMap<NodeId, Enode> = BTreeMap::new();
///
/// let first = plan(&Config::default(), &Observation::new(now, &me, Some(&snapshot), &applied));
/// // Register self, and peer with geth-1 (a start issues no RemovePeer).
/// // We are the newcomer of this pair, so we dial first; geth-1's sidecar adds us
/// // after `dial_grace`, by when the link is usually up.
/// assert!(matches!(&first.registry[..], [RegistryAction::Upsert(r)] if r.pod == "geth-0"));
/// assert_eq!(first.geth, vec![GethAction::AddPeer(peer.clone())]);
///
/// // After executing it, the next pass has nothing to do.
/// apply(&mut applied, &first.geth);
/// reconcile_core::apply_registry(&mut snapshot, &first.registry);
/// let second = plan(&Config::default(), &Observation::new(now, &me, Some(&snapshot), &applied));
/// assert!(second.is_empty());
/// assert_eq!(second.report.desired, 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn plan(config: &Config, obs: &Observation<'_>) -> Plan {
    let Some(snapshot) = obs.registry else {
        return Plan {
            report: Report {
                registry_synced: false,
                ..Report::default()
            },
            ..Plan::default()
        };
    };
    let mut pass = Pass::new(config, obs, snapshot);
    register::rule(&mut pass);
    members::rule(&mut pass);
    liveness::rule(&mut pass);
    geth::rule(&mut pass);
    report::rule(&mut pass);
    Plan {
        registry: pass.registry,
        geth: pass.geth,
        report: pass.report,
    }
}

/// The working state of one pass: the inputs, what the rules decided so far,
/// and the plan being built.
struct Pass<'a> {
    config: &'a Config,
    obs: &'a Observation<'a>,
    snapshot: &'a Snapshot,
    /// Registry writes planned so far.
    registry: Vec<RegistryAction>,
    /// geth calls planned so far, in order.
    geth: Vec<GethAction>,
    report: Report,
    /// When this node's record (as it will stand after this pass) last changed.
    my_updated: Timestamp,
    /// The other members that may be peered with, in pod order ([`members`]).
    others: Vec<Other<'a>>,
    /// The legacy entries that may be peered with ([`members`]).
    legacy: Vec<Legacy<'a>>,
    /// Pods whose records are removed this pass ([`liveness`]).
    removed: BTreeSet<String>,
    /// Pods kept in the registry but not peered: their record does not match
    /// their pod ([`liveness`]).
    unmatched: BTreeSet<String>,
    /// The desired static set by node id ([`geth`]).
    targets: BTreeMap<NodeId, Target<'a>>,
}

impl<'a> Pass<'a> {
    fn new(config: &'a Config, obs: &'a Observation<'a>, snapshot: &'a Snapshot) -> Self {
        Self {
            config,
            obs,
            snapshot,
            registry: Vec::new(),
            geth: Vec::new(),
            report: Report {
                registry_synced: true,
                ..Report::default()
            },
            my_updated: obs.now,
            others: Vec::new(),
            legacy: Vec::new(),
            removed: BTreeSet::new(),
            unmatched: BTreeSet::new(),
            targets: BTreeMap::new(),
        }
    }

    /// Whether `id` is connected to this geth now.
    fn is_connected(&self, id: &NodeId) -> bool {
        self.obs.connected.contains_key(id)
    }

    /// A peer named as the registry knows it (its pod when a member has that id).
    fn peer_ref_for(&self, id: NodeId) -> PeerRef {
        PeerRef {
            pod: self
                .snapshot
                .members
                .values()
                .find(|m| m.enode.node_id() == id || m.node_id == id)
                .map(|m| m.pod.clone()),
            node_id: id,
        }
    }
}

/// A registry member other than this node.
struct Other<'s> {
    record: &'s MemberRecord,
    /// The enode's node id (which wins over the record's `nodeId` field).
    id: NodeId,
    connected: bool,
}

impl Other<'_> {
    fn peer_ref(&self) -> PeerRef {
        PeerRef {
            pod: Some(self.record.pod.clone()),
            node_id: self.id,
        }
    }
}

/// A legacy member: a `static-nodes.json` entry without a member record.
struct Legacy<'s> {
    enode: &'s Enode,
    id: NodeId,
    connected: bool,
}

impl Legacy<'_> {
    fn peer_ref(&self) -> PeerRef {
        PeerRef {
            pod: None,
            node_id: self.id,
        }
    }
}

/// One peer of the desired static set.
struct Target<'s> {
    enode: &'s Enode,
    peer: PeerRef,
    /// The member record's `updated_at`; `None` for a legacy or external peer.
    updated_at: Option<Timestamp>,
}

/// `now - then`, zero when `then` is in the future, saturating.
fn elapsed(now: Timestamp, then: Timestamp) -> Duration {
    if then >= now {
        return Duration::ZERO;
    }
    Duration::try_from(now.duration_since(then)).unwrap_or(Duration::MAX)
}

/// True when `t` lies within `window` of `now`, on either side (a record written
/// by a node whose clock runs slightly ahead still counts as recent).
fn within(now: Timestamp, t: Timestamp, window: Duration) -> bool {
    let distance = if t >= now {
        elapsed(t, now)
    } else {
        elapsed(now, t)
    };
    distance < window
}
