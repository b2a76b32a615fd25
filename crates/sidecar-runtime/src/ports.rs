//! The loop's seams: the clock, the prober, the pod source and the hooks that
//! hear what the loop reports. The binary plugs in the real ones; the
//! simulation and tests plug in their own.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use geth_ipc::Enode;
use reconcile_core::PodObservation;

use crate::notice::Notice;
use crate::probe::ProbeVia;

/// Wall-clock time as this sidecar sees it: record timestamps,
/// unreachability clocks, the dial grace. (Timers use tokio's clock.)
pub trait Clock: Send + Sync {
    /// The current time.
    fn now(&self) -> jiff::Timestamp;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> jiff::Timestamp {
        jiff::Timestamp::now()
    }
}

/// What one probe of a member found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// The member answered (at `via`).
    Reachable(ProbeVia),
    /// Nothing answered at `via`, or something else did (an IP reused by
    /// another pod answers for the member no more).
    Unreachable(ProbeVia),
    /// The member's host does not resolve.
    Unresolved,
}

impl ProbeOutcome {
    /// True when the member answered.
    pub fn is_reachable(&self) -> bool {
        matches!(self, Self::Reachable(_))
    }

    /// Where the member was probed, when it was.
    pub fn via(&self) -> Option<ProbeVia> {
        match self {
            Self::Reachable(v) | Self::Unreachable(v) => Some(*v),
            Self::Unresolved => None,
        }
    }
}

/// How a member is probed.
#[async_trait::async_trait]
pub trait Prober: Send + Sync {
    /// Probes the member `enode` at `addresses` (its IP, or what its DNS host
    /// resolved to when the engine checked it; empty: resolve it);
    /// `sidecar_port` is the port every sidecar listens on.
    async fn probe(
        &self,
        enode: &Enode,
        addresses: &[SocketAddr],
        sidecar_port: u16,
    ) -> ProbeOutcome;

    /// An indirect probe: asks the sidecar of the member `helper` (at
    /// `helper_addresses`, as the engine checked them; empty: resolve it)
    /// whether it reaches the member `suspect` (as the helper's own registry
    /// records it). `Some(reachable)`, or `None` when the helper did not
    /// answer.
    async fn ask(
        &self,
        helper: &Enode,
        helper_addresses: &[SocketAddr],
        suspect: &Enode,
        sidecar_port: u16,
    ) -> Option<bool>;
}

/// What a pod source can say right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodEvidence {
    /// The pods by name, and those seen deleted or replaced (name → the UID
    /// that went).
    Ready {
        /// The member pods by name (complete for the members asked about).
        pods: BTreeMap<String, PodObservation>,
        /// Pods seen and then seen deleted or replaced: name → UID.
        gone: BTreeMap<String, String>,
    },
    /// The first list has not completed yet.
    Syncing,
    /// Pods cannot be read (or the watch is failing or stale); the message
    /// says why and what to do. The loop then falls back to reachability.
    Failed(String),
}

/// Where pod evidence comes from (a pod watch on Kubernetes).
#[async_trait::async_trait]
pub trait PodSource: Send + Sync {
    /// The pods of `members` (pod names, this pod included), for one pass.
    async fn evidence(&self, members: Vec<String>) -> PodEvidence;

    /// Completes when a pod appeared, moved or went since the last call.
    async fn changed(&self);
}

/// What the loop reports beyond logs and metrics: notices an operator acts
/// on (Kubernetes Events on this pod, in the binary).
#[async_trait::async_trait]
pub trait Hooks: Send + Sync {
    /// A notice; must never wait (the loop calls it inline).
    fn notice(&self, notice: Notice);

    /// At shutdown: flush what is queued, waiting at most `within`.
    async fn flush(&self, within: Duration) {
        let _ = within;
    }
}

/// Hooks that drop every notice.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHooks;

impl Hooks for NoHooks {
    fn notice(&self, _: Notice) {}
}
