//! The runner: one sidecar's loop state, built by [`Sidecar`](crate::Sidecar).
//! The loop itself is in `event_loop.rs`, one pass in `pass.rs`, the calls a
//! pass makes in `execute.rs`, what it reports in `publish.rs`.

use std::sync::Arc;
use std::time::Duration;

use geth_ipc::AdminApi;
use peer_registry::{MemberRecord, PeerRegistry};
use rand::SeedableRng;
use reconcile_core as core;
use tracing::{info, warn};

use crate::error::AdvertiseError;
use crate::health::Health;
use crate::latch::OnChange;
use crate::metrics::Metrics;
use crate::notice::Notice;
use crate::probe::ProbeVia;
use crate::settings::Settings;

/// geth's state as the log reports it: one line per change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum GethState {
    Up,
    Down(String),
}

/// What the loop has reported, each once when it changes.
#[derive(Debug, Default)]
pub(crate) struct Reported {
    /// The registry's own problems (malformed keys, ...).
    pub(crate) registry_problems: OnChange<Vec<String>>,
    /// The engine's problems of the last pass.
    pub(crate) engine_problems: OnChange<Vec<String>>,
    /// The one-line summary of the last pass.
    pub(crate) summary: OnChange<String>,
    /// Why pod evidence is unavailable (`None`: available or off).
    pub(crate) pods_error: OnChange<Option<String>>,
    /// geth's state.
    pub(crate) geth: OnChange<GethState>,
    /// Why this node cannot register itself (`None`: it can).
    pub(crate) advertise: OnChange<Option<AdvertiseError>>,
    /// Where members were last probed.
    pub(crate) probe_via: OnChange<ProbeVia>,
    /// Whether a partition is suspected.
    pub(crate) partition: OnChange<bool>,
    /// The peer-limit warning: once per process.
    pub(crate) mesh_limit: OnChange<()>,
}

pub(crate) struct Runner<G, R> {
    pub(crate) geth: Arc<G>,
    pub(crate) registry: Arc<R>,
    pub(crate) s: Settings,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) health: Arc<Health>,
    /// The observer's state: what the engine is shown.
    pub(crate) tracker: core::Tracker,
    /// This pod's record as last written or seen.
    pub(crate) me: Option<MemberRecord>,
    /// This sidecar's identity as of the last pass (probe rounds between
    /// passes ask the engine whom to probe with it).
    pub(crate) last_me: Option<core::SelfIdentity>,
    pub(crate) reported: Reported,
    /// Members probed once while reachable (their sidecar had its chance to
    /// name itself to the prober).
    pub(crate) identity_checked: std::collections::BTreeSet<geth_ipc::NodeId>,
    /// The last pass's pod evidence (probe rounds between passes use it).
    pub(crate) last_pods: crate::pass::Pods,
    /// The members the engine awaits agreement on (its last report).
    pub(crate) awaiting: Vec<core::PeerRef>,
    /// When the engine asked to be consulted again (a new pair's dial grace).
    pub(crate) recheck_at: Option<jiff::Timestamp>,
    /// Since when some missing peers have all been reachable.
    pub(crate) stuck_since: Option<jiff::Timestamp>,
    /// The resync jitter's source ([`Settings::seed`]).
    pub(crate) rng: rand::rngs::StdRng,
    /// The next pass reads the registry afresh (a periodic resync, or the
    /// watch failed): the watch alone may be stuck (see `on_read`).
    pub(crate) reread_due: bool,
    /// A watch opened anew because the registry's versions went back; the
    /// event loop takes it in place of its own after the pass.
    pub(crate) reopened: Option<crate::triggers::Watch>,
    /// The registry writes of an earlier pass, still in flight: passes go on
    /// (geth's calls, watch events) while the apiserver answers, and plan no
    /// other write until it lands (see `execute`).
    pub(crate) writing: Option<crate::execute::InFlight>,
    /// A pass held registry writes back while others were in flight: a pass
    /// is due once they land.
    pub(crate) held_back: bool,
}

impl<G: AdminApi, R: PeerRegistry> Runner<G, R> {
    pub(crate) fn new(
        geth: Arc<G>,
        registry: Arc<R>,
        s: Settings,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> Self {
        let seed = s.seed.unwrap_or_else(rand::random);
        Self {
            geth,
            registry,
            s,
            metrics,
            health,
            tracker: core::Tracker::new(),
            me: None,
            last_me: None,
            reported: Reported::default(),
            identity_checked: std::collections::BTreeSet::new(),
            last_pods: crate::pass::Pods::default(),
            awaiting: Vec::new(),
            recheck_at: None,
            stuck_since: None,
            reread_due: false,
            reopened: None,
            writing: None,
            held_back: false,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
        }
    }

    /// Removes our own record with a conditional write, bounded so the pod's
    /// termination grace period is never exceeded.
    pub(crate) async fn deregister(&mut self) {
        // A registration still in flight lands first (or is given up): the
        // record removed must be the one that stands.
        self.finish_writing(Duration::from_secs(5)).await;
        let me = match self.me.clone() {
            Some(me) => Some(me),
            // The pass that registered may have been abandoned after the write
            // landed: look for this pod's record (this incarnation's) once.
            None => {
                match tokio::time::timeout(Duration::from_secs(3), self.registry.snapshot()).await {
                    Ok(Ok(snap)) => snap
                        .members
                        .get(&self.s.pod)
                        .filter(|r| match (&r.pod_uid, &self.s.pod_uid) {
                            (Some(theirs), Some(mine)) => theirs == mine,
                            _ => true,
                        })
                        .cloned(),
                    _ => None,
                }
            }
        };
        let Some(me) = me else {
            info!("not registered; nothing to deregister");
            return;
        };
        match tokio::time::timeout(Duration::from_secs(10), self.registry.remove(vec![me])).await {
            Ok(Ok(_)) => {
                info!("deregistered");
                self.s.hooks.notice(Notice::Deregistered);
            }
            Ok(Err(e)) => {
                warn!(error = %e, "could not deregister; other sidecars will drop this member once it is unreachable")
            }
            Err(_) => warn!("deregistration timed out after 10 s"),
        }
    }
}
