//! The pure peering engine of geth-peer-sidecar: observed state in, actions out.
//!
//! One function, [`plan`], takes an [`Observation`] (this node's identity, the
//! registry snapshot, what this sidecar applied to geth, geth's connections, probe
//! failures, optional pod evidence) and returns a [`Plan`]: registry writes
//! ([`RegistryAction`]), geth admin calls in order ([`GethAction`]) and a
//! [`Report`]. No I/O, no clock, no randomness: the caller reads the clock and
//! executes the plan; [`apply`] records executed geth calls.
//!
//! # Rules
//!
//! **Registration.** This node's record is written when it is missing (first start,
//! someone removed it, the ConfigMap was deleted) or differs from the identity in
//! enode, node id, pod UID, pod IP or sidecar version. `registered_at` is kept for
//! the same pod incarnation. A loopback/unspecified advertised address, or one whose
//! key is not this geth's, is never published.
//!
//! **Refused members.** A member record whose enode host is loopback,
//! unspecified, multicast or link-local, or (when [`Config::member_cidrs`] is
//! set) an IP outside every allowed network, is never dialled nor counted; a
//! [`Problem`] names its key. A DNS-name host is held to the same checks by
//! what it resolved to ([`Observation::resolved`]): every address allowed and,
//! with trusted pod evidence, one of them the pod's IP; unresolved, it is not
//! dialled (reported, not removed). A refused record is never probed either:
//! [`probe_targets`] lists what the runtime may probe, and where. External
//! peers are the operator's explicit exception: never filtered.
//!
//! **Removal of other members** (the old sidecar let one observer's failed probe
//! delete a node for everyone). A member is removed only:
//! - on *pod evidence*: its pod no longer exists, exists with another UID, or has
//!   another IP than recorded (only when the caller supplies the pod list, and only
//!   when that list shows this sidecar's own pod as it is); or
//! - on *unreachability*, when there is no pod evidence: its p2p endpoint has
//!   failed this observer's probes continuously for at least `dead_after`, counted
//!   from the record's last update at the earliest, **and** other observers
//!   agree: at least [`Config::confirmations_needed`] other members' sidecars,
//!   asked to probe it ([`Report::awaiting_confirmation`]), answered and all
//!   found it unreachable ([`Observation::confirmations`]). A "reachable"
//!   answer vetoes and restarts its `dead_after`; with fewer other members
//!   reachable from here than needed, nobody is removed for unreachability.
//!   One observer's broken path (a one-way cut, a blocked probe port, its own
//!   DNS failure) so never removes a live member for everyone.
//!
//! and never when it is connected to this geth, when its record was written within
//! `grace_after_register`, when it is this node (by pod name or node id), or when
//! it is an external peer. The grace does not protect a record whose pod this
//! observer's pod watch saw, with the record's UID, deleted or replaced
//! ([`Observation::pods_gone`]): that record is removed at once
//! ([`RemovalReason::PodDeleted`]). When pod evidence shows the member's pod alive, probe
//! failures never remove it (its own sidecar owns the record).
//!
//! **Partition guard.** Removals for unreachability happen only when this observer
//! plus the members it can reach (connected, or not failing probes) form a strict
//! majority of the registry (self included). Legacy entries count like members,
//! and neither counts as reachable before a probe round has checked it. A node cut off from the network sees
//! every other member unreachable, so it never has a majority and removes nobody;
//! it reports [`Report::suspected_partition`]. The healthy side of a split keeps its
//! majority and can remove a truly dead minority. A 2-node mesh never removes by
//! unreachability (neither side can tell who is cut off); pod evidence still works.
//! Removals are conditional on the record being unchanged, so a member that
//! re-registered in the meantime survives.
//!
//! **geth.** The desired static set is every member except self plus the registry's
//! external peers (a member wins over an external peer with the same id). Departed
//! peers (applied by us, no longer desired) get `RemovePeer` (plus
//! `RemoveTrustedPeer` in trusted mode). For an id whose address changed,
//! `RemovePeer` of the old enode precedes `AddPeer` of the new one, because geth
//! ignores `addPeer` for an id already in its static set. A peer not yet applied
//! by us is simply added: a start issues no `RemovePeer` (an earlier version
//! cleared every such id first, which cost a removePeer per peer per start). Such
//! an add is "blind" when geth's static set is unknown (a sidecar restarted next
//! to a running geth, which may hold an older address for the id and then ignores
//! the add): if the peer is still unconnected after `stale_entry_after`, it is
//! cleared and re-added once ([`Observation::blind_adds`]). `removePeer` disconnects, so a connected peer is never
//! removed or moved: the change is deferred until it disconnects
//! ([`Report::deferred`]). In trusted mode every added peer is first marked trusted.
//! Peers that connect and drop for a genesis/network mismatch are only reported.
//!
//! Until the registry has been read, nothing at all is planned.
#![forbid(unsafe_code)]

mod apply;
mod cidr;
mod config;
mod engine;
mod observation;
mod plan;
mod tracker;

pub use apply::{apply, apply_registry};
pub use cidr::{Cidr, CidrError};
pub use config::{Config, ConfigError};
pub use engine::{ProbeTarget, own_record, plan, probe_targets};
pub use observation::{Confirmation, Observation, PeerObservation, PodObservation, SelfIdentity};
pub use plan::{
    GethAction, PeerRef, Plan, Problem, RegistryAction, Removal, RemovalReason, Report,
};
pub use tracker::{
    GenerationChange, PeerEventEffect, ReadVerdict, Tracker, WatchVerdict, is_incompatible,
};

#[cfg(test)]
mod property_tests;
#[cfg(test)]
mod rule_tests;
#[cfg(test)]
mod testkit;

/// The examples of this crate's README.md, run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
