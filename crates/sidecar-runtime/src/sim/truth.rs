//! The truth the invariants are checked against: who was down, partitioned,
//! cut or blind, and when; the simulation's clock and prober read it too.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use geth_ipc::fake::FakeGeth;
use geth_ipc::{Enode, NodeId};
use peer_registry::{MemberRecord, Snapshot};
use tokio::time::Instant;

use super::{PROBE_INTERVAL, RECOVERY_SLACK};
use crate::ports::{Clock, ProbeOutcome, Prober};
use crate::probe::ProbeVia;

/// The simulation's wall clock: `epoch` at `start` of tokio's (paused)
/// clock, shifted by `skew`, so it can be wrong like a node's.
pub(super) struct SimClock {
    pub(super) epoch: jiff::Timestamp,
    pub(super) start: Instant,
    pub(super) skew: jiff::SignedDuration,
}

impl Clock for SimClock {
    fn now(&self) -> jiff::Timestamp {
        let elapsed = jiff::SignedDuration::try_from(self.start.elapsed())
            .unwrap_or(jiff::SignedDuration::MAX);
        self.epoch
            .saturating_add(elapsed)
            .and_then(|t| t.saturating_add(self.skew))
            .unwrap_or(self.epoch)
    }
}

/// The simulation's network answers whether node `from` reaches a member
/// (a blind node's probes all fail, its asks go unanswered).
pub(super) struct SimProber {
    pub(super) from: usize,
    pub(super) truth: Arc<Mutex<Truth>>,
}

#[async_trait::async_trait]
impl Prober for SimProber {
    async fn probe(&self, enode: &Enode, _: &[std::net::SocketAddr], _: u16) -> ProbeOutcome {
        if lock(&self.truth).reachable(self.from, enode) {
            ProbeOutcome::Reachable(ProbeVia::GethPort)
        } else {
            ProbeOutcome::Unreachable(ProbeVia::GethPort)
        }
    }

    async fn ask(
        &self,
        helper: &Enode,
        _: &[std::net::SocketAddr],
        suspect: &Enode,
        _: u16,
    ) -> Option<bool> {
        let truth = lock(&self.truth);
        let j = truth.index_of(&helper.node_id())?;
        // The helper's sidecar answers when its pod is reachable from here;
        // a blind helper answers too, and finds the suspect unreachable.
        truth
            .reachable(self.from, helper)
            .then(|| truth.reachable(j, suspect))
    }
}

/// A span of simulated time, from the run's start; `None` end: still going.
#[derive(Debug, Clone, Copy)]
pub(super) struct Span {
    pub(super) from: Duration,
    pub(super) to: Option<Duration>,
}

/// What the fleet's fakes share with the driver: the truth the invariants are
/// checked against.
pub(super) struct Truth {
    pub(super) start: Instant,
    pub(super) dead_after: Duration,
    pub(super) gethes: Vec<FakeGeth>,
    /// Each node's current pod UID (its live registration's).
    pub(super) uids: Vec<String>,
    /// When each node was unreachable to everyone: geth down or moving.
    pub(super) down: Vec<Vec<Span>>,
    /// Partitions: when, and each node's side.
    pub(super) partitions: Vec<(Span, Vec<bool>)>,
    /// One-pair cuts: when, and the two nodes whose path was cut (both
    /// directions; each still reaches every other node).
    pub(super) cuts: Vec<(Span, usize, usize)>,
    /// When each node was blind: every probe it makes fails and its asks go
    /// unanswered (probe port blocked, DNS down on that node alone), while
    /// its geth links stay up.
    pub(super) blind: Vec<Vec<Span>>,
    pub(super) outage: bool,
    pub(super) violations: Vec<String>,
    pub(super) trace: Vec<String>,
    pub(super) removals: usize,
    /// The sidecars' registry watches (see `SimRegistry::watch`).
    pub(super) watchers:
        Vec<futures::channel::mpsc::UnboundedSender<peer_registry::Result<Snapshot>>>,
}

impl Truth {
    pub(super) fn now(&self) -> Duration {
        self.start.elapsed()
    }

    pub(super) fn index_of(&self, id: &NodeId) -> Option<usize> {
        self.gethes.iter().position(|g| g.id() == *id)
    }

    pub(super) fn active_partition(&self) -> Option<&Vec<bool>> {
        self.partitions
            .last()
            .filter(|(span, _)| span.to.is_none())
            .map(|(_, sides)| sides)
    }

    /// True when `a` and `b` cannot reach each other now: across a
    /// partition, or their path cut.
    pub(super) fn separated(&self, a: usize, b: usize) -> bool {
        self.active_partition().is_some_and(|s| s[a] != s[b])
            || self
                .cuts
                .iter()
                .any(|(span, i, j)| span.to.is_none() && ((*i, *j) == (a, b) || (*j, *i) == (a, b)))
    }

    /// Whether node `from` is blind now.
    pub(super) fn is_blind(&self, from: usize) -> bool {
        self.blind[from].last().is_some_and(|s| s.to.is_none())
    }

    /// Whether a probe from node `from` of `enode` succeeds now.
    pub(super) fn reachable(&self, from: usize, enode: &Enode) -> bool {
        !self.is_blind(from)
            && self.index_of(&enode.node_id()).is_some_and(|j| {
                let g = &self.gethes[j];
                g.is_up() && g.enode().same_address(enode) && !self.separated(from, j)
            })
    }

    /// Whether `x` is live at `now`: its geth up, not moving and reachable
    /// from a majority of the nodes (itself included; a node counts while its
    /// geth is up) throughout the last
    /// [`RECOVERY_SLACK`]. A cut or a blind observer never makes a member
    /// dead; a partition that leaves it on a side holding at most half the
    /// nodes, or geth down, does.
    pub(super) fn live(&self, x: usize, now: Duration) -> bool {
        let n = self.gethes.len();
        let recent = |s: &Span| s.to.is_none_or(|to| to + RECOVERY_SLACK >= now);
        if self.down[x].iter().any(recent) || !self.gethes[x].is_up() {
            return false;
        }
        let minority =
            |sides: &Vec<bool>| 2 * sides.iter().filter(|s| **s == sides[x]).count() <= n;
        if self
            .partitions
            .iter()
            .any(|(span, sides)| recent(span) && minority(sides))
        {
            return false;
        }
        2 * (1 + self.reached_by(x).len()) > n
    }

    /// The other nodes whose geth is up and that reach `x` now.
    pub(super) fn reached_by(&self, x: usize) -> Vec<usize> {
        (0..self.gethes.len())
            .filter(|&j| j != x && self.gethes[j].is_up() && !self.separated(j, x))
            .collect()
    }

    /// The spans during which `x` was unreachable from `from`, merged.
    pub(super) fn unreachable_spans(&self, from: usize, x: usize) -> Vec<Span> {
        let mut spans: Vec<Span> = self.down[x].clone();
        spans.extend(
            self.partitions
                .iter()
                .filter(|(_, sides)| sides[from] != sides[x])
                .map(|(span, _)| *span),
        );
        spans.extend(
            self.cuts
                .iter()
                .filter(|(_, i, j)| (*i, *j) == (from, x) || (*j, *i) == (from, x))
                .map(|(span, _, _)| *span),
        );
        spans.sort_by_key(|s| s.from);
        let mut merged: Vec<Span> = Vec::new();
        for s in spans {
            match merged.last_mut() {
                // A gap shorter than a probe interval is not seen by probes.
                Some(last) if last.to.is_none_or(|to| s.from <= to + PROBE_INTERVAL) => {
                    last.to = match (last.to, s.to) {
                        (Some(a), Some(b)) => Some(a.max(b)),
                        _ => None,
                    };
                }
                _ => merged.push(s),
            }
        }
        merged
    }

    /// Invariants 1, 2 and 3 for a removal of `record` by node `by`;
    /// `members`: the registry's members just before.
    pub(super) fn check_removal(&mut self, by: usize, record: &MemberRecord, members: &[NodeId]) {
        let now = self.now();
        let Some(x) = self.index_of(&record.node_id) else {
            return;
        };
        if x == by {
            return; // deregistration
        }
        self.removals += 1;
        // The engine can only count the registry's members: a side holding at
        // most half of them is a minority, whatever the fleet's size.
        if let Some(sides) = self.active_partition().cloned() {
            let on_my_side = members
                .iter()
                .filter(|id| self.index_of(id).is_some_and(|j| sides[j] == sides[by]))
                .count();
            if 2 * on_my_side <= members.len() {
                self.violations.push(format!(
                    "at {now:?}: node {by}, on a partition side holding {on_my_side} of the {} \
                     registered members, removed {}",
                    members.len(),
                    record.pod
                ));
            }
        }
        let live = record.pod_uid.as_deref() == Some(self.uids[x].as_str())
            && self.gethes[x].enode().same_address(&record.enode);
        if !live {
            return; // a moved pod's old registration
        }
        if self.live(x, now) {
            let reached_by = self.reached_by(x);
            self.violations.push(format!(
                "at {now:?}: node {by} removed {} (live registration {}), a live member: geth up \
                 and reachable from nodes {reached_by:?} of {}; node {by} blind: {}, cut from it: {}",
                record.pod,
                record.enode,
                self.gethes.len(),
                self.is_blind(by),
                self.separated(by, x)
            ));
        }
        let evidence = self.unreachable_spans(by, x).iter().any(|s| {
            s.from + self.dead_after <= now + Duration::from_secs(1)
                && s.to.is_none_or(|to| to + RECOVERY_SLACK >= now)
        });
        if !evidence {
            self.violations.push(format!(
                "at {now:?}: node {by} removed {} (live registration {}) without {:?} of \
                 unreachability; unreachable spans: {:?}",
                record.pod,
                record.enode,
                self.dead_after,
                self.unreachable_spans(by, x)
            ));
        }
    }
}

/// The truth, even after a panic elsewhere (it stays consistent: every
/// change is made under the lock without a call that can panic midway).
pub(super) fn lock(truth: &Mutex<Truth>) -> MutexGuard<'_, Truth> {
    truth.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Ends the last span of `spans` at `at`, if it is still going.
pub(super) fn end_span(spans: &mut [Span], at: Duration) {
    if let Some(s) = spans.last_mut()
        && s.to.is_none()
    {
        s.to = Some(at);
    }
}
