//! What the probes and `/status` report: written by the event loop, read by
//! the HTTP server (or by an embedding program).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use geth_ipc::{Enode, NodeId};
use peer_registry::Snapshot;
use reconcile_core::Report;

/// What the probes and `/status` report. The event loop writes it; the HTTP
/// server reads it.
pub struct Health {
    /// geth's IPC answered the last call.
    pub(crate) geth_ok: AtomicBool,
    /// The registry has been read (or watched) at least once and the last
    /// registry operation did not fail.
    pub(crate) registry_synced: AtomicBool,
    /// Why this node cannot register itself (its advertised address is unusable),
    /// while it keeps peering with the others.
    pub(crate) advertise_problem: Mutex<Option<String>>,
    /// Why pod evidence is not in use although asked for (the watch fails or
    /// is stale): removals fall back to agreement between members.
    pub(crate) pod_evidence_problem: Mutex<Option<String>>,
    /// Reachable members stay unconnected: geth's peer limits (dial-cap diagnosis).
    pub(crate) peer_limit: Mutex<Option<String>>,
    /// /healthz fails when no pass completed for this long (`None`: never).
    liveness_timeout: Option<Duration>,
    pub(crate) started: Instant,
    pub(crate) last_pass: Mutex<Option<CompletedPass>>,
    pub(crate) published: Mutex<Option<Published>>,
    /// What this sidecar may probe, and where (the engine's probe targets as
    /// of the last probe round): the only members `/v1/probe` answers for.
    pub(crate) probe_targets: Mutex<BTreeMap<NodeId, (Enode, Vec<SocketAddr>)>>,
    /// Who this sidecar is, once geth answered (`/identity`).
    pub(crate) identity: Mutex<Option<crate::probe::Identity>>,
}

/// When the last pass of the event loop completed (successfully or not).
#[derive(Clone, Copy)]
#[cfg_attr(not(feature = "http"), allow(dead_code))] // read by the HTTP server
pub(crate) struct CompletedPass {
    pub(crate) instant: Instant,
    pub(crate) at: jiff::Timestamp,
}

/// What the last planned pass saw and decided.
#[cfg_attr(not(feature = "http"), allow(dead_code))] // read by the HTTP server
pub(crate) struct Published {
    pub(crate) at: jiff::Timestamp,
    pub(crate) pod: String,
    pub(crate) report: Report,
    pub(crate) snapshot: Option<Snapshot>,
    pub(crate) connected: BTreeSet<NodeId>,
}

/// Locks `m`, recovering the data of a poisoned lock.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Health {
    /// `/healthz` fails when no pass completed for `liveness_timeout` (`None`: never).
    pub fn new(liveness_timeout: Option<Duration>) -> Self {
        Health {
            geth_ok: AtomicBool::new(false),
            registry_synced: AtomicBool::new(false),
            advertise_problem: Mutex::new(None),
            pod_evidence_problem: Mutex::new(None),
            peer_limit: Mutex::new(None),
            liveness_timeout,
            started: Instant::now(),
            last_pass: Mutex::new(None),
            published: Mutex::new(None),
            identity: Mutex::new(None),
            probe_targets: Mutex::new(BTreeMap::new()),
        }
    }

    /// geth stopped answering: `/identity` says so (503) until it answers
    /// again, so other members' probes fall back to geth's port.
    pub(crate) fn clear_identity(&self) {
        *lock(&self.identity) = None;
    }

    /// Who this sidecar is: its pod and its geth's node id.
    pub(crate) fn set_identity(&self, pod: &str, node_id: NodeId) {
        let mut held = lock(&self.identity);
        if held
            .as_ref()
            .is_none_or(|i| i.node_id != node_id || i.pod != pod)
        {
            *held = Some(crate::probe::Identity {
                pod: pod.to_owned(),
                node_id,
            });
        }
    }

    /// The event loop completed a pass (whatever its outcome): it is not stuck.
    pub fn pass_completed(&self) {
        *lock(&self.last_pass) = Some(CompletedPass {
            instant: Instant::now(),
            at: jiff::Timestamp::now(),
        });
    }

    /// A pass planned: its report, the registry it planned from and geth's
    /// connections, for `/status`.
    pub(crate) fn publish(
        &self,
        pod: &str,
        report: &Report,
        snapshot: Option<&Snapshot>,
        connected: &BTreeSet<NodeId>,
    ) {
        *lock(&self.published) = Some(Published {
            at: jiff::Timestamp::now(),
            pod: pod.to_owned(),
            report: report.clone(),
            snapshot: snapshot.cloned(),
            connected: connected.clone(),
        });
    }

    /// `Err` when the loop has not completed a pass within the liveness
    /// timeout (counted from start until the first pass).
    pub fn liveness(&self, now: Instant) -> Result<(), Stalled> {
        let Some(timeout) = self.liveness_timeout else {
            return Ok(());
        };
        let since = lock(&self.last_pass).map_or(self.started, |p| p.instant);
        let stalled = now.saturating_duration_since(since);
        if stalled > timeout {
            Err(Stalled {
                for_: stalled,
                timeout,
            })
        } else {
            Ok(())
        }
    }
}

/// The event loop completed no pass within the liveness timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "event loop stuck: no pass completed for {:.0} s (LIVENESS_TIMEOUT {:.0} s)",
    for_.as_secs_f64(),
    timeout.as_secs_f64()
)]
pub struct Stalled {
    /// Since the last completed pass (or the start).
    pub for_: Duration,
    /// LIVENESS_TIMEOUT.
    pub timeout: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_fails_once_no_pass_completed_for_the_timeout() {
        let h = Health::new(Some(Duration::from_secs(10)));
        let t0 = h.started;
        assert!(h.liveness(t0 + Duration::from_secs(9)).is_ok());
        let err = h.liveness(t0 + Duration::from_secs(11)).unwrap_err();
        assert!(err.to_string().contains("no pass completed"), "{err}");
        h.pass_completed();
        let done = lock(&h.last_pass).unwrap().instant;
        assert!(h.liveness(done + Duration::from_secs(9)).is_ok());
        assert!(h.liveness(done + Duration::from_secs(11)).is_err());
    }

    #[test]
    fn liveness_never_fails_when_off() {
        let h = Health::new(None);
        assert!(h.liveness(h.started + Duration::from_secs(86_400)).is_ok());
    }
}
