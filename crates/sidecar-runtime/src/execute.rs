//! Carrying out a plan: registry writes, then geth's admin calls.

use std::sync::atomic::{AtomicBool, Ordering};

use futures::StreamExt as _;
use geth_ipc::{AdminApi, NodeId};
use peer_registry::PeerRegistry;
use reconcile_core as core;
use tracing::{info, warn};

use crate::error::PassError;
use crate::metrics::Metrics;
use crate::notice::Notice;
use crate::runner::Runner;

/// How many geth nodes' admin calls one pass has in flight at once.
const GETH_CONCURRENCY: usize = 16;

/// Calls geth for `actions`: one node's actions in plan order (a move is a
/// removePeer of the old address, then an addPeer of the new one, and geth
/// ignores an addPeer of an id it holds), different nodes' at once, up to
/// [`GETH_CONCURRENCY`] in flight: geth answers the requests of one
/// connection concurrently, and one at a time a burst of 30 spent over a
/// second in serial addPeer calls. After a connection failure no further call
/// is started: the rest would fail the same way. The outcomes, grouped by
/// node, in plan order.
pub(crate) async fn call_geth<'a, G: AdminApi>(
    geth: &G,
    actions: &'a [core::GethAction],
) -> Vec<(&'a core::GethAction, geth_ipc::Result<bool>)> {
    let mut by_node: Vec<(NodeId, Vec<&core::GethAction>)> = Vec::new();
    for a in actions {
        let id = a.enode().node_id();
        match by_node.iter_mut().find(|(n, _)| *n == id) {
            Some((_, group)) => group.push(a),
            None => by_node.push((id, vec![a])),
        }
    }
    let down = AtomicBool::new(false);
    let calls: Vec<_> = by_node
        .into_iter()
        .map(|(_, group)| call_in_order(geth, &down, group))
        .collect();
    let done: Vec<Vec<_>> = futures::stream::iter(calls)
        .buffered(GETH_CONCURRENCY)
        .collect()
        .await;
    done.into_iter().flatten().collect()
}

/// Calls geth for one node's `actions`, in order, unless `down` is set (a
/// connection failure, which this sets too).
async fn call_in_order<'a, G: AdminApi>(
    geth: &G,
    down: &AtomicBool,
    actions: Vec<&'a core::GethAction>,
) -> Vec<(&'a core::GethAction, geth_ipc::Result<bool>)> {
    use core::GethAction as A;
    let mut out = Vec::with_capacity(actions.len());
    for action in actions {
        if down.load(Ordering::Relaxed) {
            break;
        }
        let res = match action {
            A::AddPeer(e) => geth.add_peer(e).await,
            A::RemovePeer(e) => geth.remove_peer(e).await,
            A::AddTrustedPeer(e) => geth.add_trusted_peer(e).await,
            A::RemoveTrustedPeer(e) => geth.remove_trusted_peer(e).await,
        };
        if res
            .as_ref()
            .is_err_and(geth_ipc::Error::is_connection_error)
        {
            down.store(true, Ordering::Relaxed);
        }
        out.push((action, res));
    }
    out
}

/// The metric label of a geth action.
fn label(action: &core::GethAction) -> &'static str {
    use core::GethAction as A;
    match action {
        A::AddPeer(_) => "add_peer",
        A::RemovePeer(_) => "remove_peer",
        A::AddTrustedPeer(_) => "add_trusted_peer",
        A::RemoveTrustedPeer(_) => "remove_trusted_peer",
    }
}

impl<G: AdminApi, R: PeerRegistry> Runner<G, R> {
    /// The registry's writes and geth's calls, at once: neither needs the
    /// other's outcome, and a newcomer's dials must not wait on the apiserver
    /// (under a burst of pod starts its own record's write took 30–90 ms, all
    /// of it on the path to its links). Outcomes are taken into the tracker
    /// afterwards: the writes' snapshots first, then geth's calls.
    pub(crate) async fn execute(
        &mut self,
        plan: &core::Plan,
        now: jiff::Timestamp,
    ) -> Result<(), PassError> {
        let writer = Writer {
            registry: self.registry.clone(),
            metrics: self.metrics.clone(),
            health: self.health.clone(),
            hooks: self.s.hooks.clone(),
            pod: self.s.pod.clone(),
        };
        let geth = self.geth.clone();
        let me = &mut self.me;
        let writes = async {
            let mut snaps = Vec::new();
            let mut result = Ok(());
            for action in plan.registry.clone() {
                match writer.write(action, me).await {
                    Ok(snap) => snaps.push(snap),
                    Err(e) => result = Err(e),
                }
            }
            (snaps, result)
        };
        let ((snaps, mut result), called) = tokio::join!(writes, call_geth(&*geth, &plan.geth));
        for snap in snaps {
            self.on_snapshot(snap);
        }
        let mut refused = 0;
        for (action, res) in called {
            match res {
                Ok(_) => {
                    info!(action = label(action), node = %action.enode().node_id().short(), enode = %action.enode(), "geth");
                    self.metrics
                        .geth_actions
                        .get_or_create(&Metrics::kind(label(action)))
                        .inc();
                    self.tracker.on_geth_action(action, now);
                }
                Err(e) => {
                    warn!(action = label(action), node = %action.enode().node_id().short(), error = %e, "geth call failed");
                    self.metrics
                        .geth_action_errors
                        .get_or_create(&Metrics::kind(label(action)))
                        .inc();
                    if e.is_connection_error() {
                        // geth stopped answering: no further call was started.
                        return Err(self.geth_down(e));
                    }
                    self.metrics
                        .geth_rpc_errors
                        .get_or_create(&Metrics::kind(e.kind()))
                        .inc();
                    refused += 1;
                }
            }
        }
        if refused > 0 && result.is_ok() {
            result = Err(PassError::GethRefused { failed: refused });
        }
        result
    }
}

/// What a pass's registry writes use, apart from the runner (whose geth
/// calls run at the same time).
struct Writer<R> {
    registry: std::sync::Arc<R>,
    metrics: std::sync::Arc<Metrics>,
    health: std::sync::Arc<crate::health::Health>,
    hooks: std::sync::Arc<dyn crate::Hooks>,
    /// This pod's name (its record's key).
    pod: String,
}

impl<R: PeerRegistry> Writer<R> {
    /// One registry write; returns the snapshot it produced. After an upsert,
    /// `me` is this pod's new record at once, not at the end of the pass: a
    /// SIGTERM that abandons the rest of the pass must still deregister it.
    async fn write(
        &self,
        action: core::RegistryAction,
        me: &mut Option<peer_registry::MemberRecord>,
    ) -> Result<peer_registry::Snapshot, PassError> {
        let upsert = matches!(action, core::RegistryAction::Upsert(_));
        let (op, res) = match action {
            core::RegistryAction::Upsert(rec) => {
                info!(pod = %rec.pod, node = %rec.node_id.short(), enode = %rec.enode, "registering self");
                ("upsert", self.registry.upsert(rec).await)
            }
            core::RegistryAction::RemoveLegacy(enodes) => {
                for e in &enodes {
                    warn!(node = %e.node_id().short(), enode = %e, "removing legacy member from static-nodes.json");
                }
                ("remove_legacy", self.registry.remove_legacy(enodes).await)
            }
            core::RegistryAction::Remove(recs) => {
                for r in &recs {
                    warn!(pod = %r.pod, node = %r.node_id.short(), "removing member from the registry");
                }
                ("remove", self.registry.remove(recs).await)
            }
        };
        match res {
            Ok(snap) => {
                self.metrics
                    .registry_writes
                    .get_or_create(&Metrics::kind(op))
                    .inc();
                if upsert {
                    self.took_own_record(&snap, me);
                }
                Ok(snap)
            }
            Err(e) => {
                self.metrics
                    .registry_errors
                    .get_or_create(&Metrics::kind(e.kind()))
                    .inc();
                self.health.registry_synced.store(false, Ordering::Relaxed);
                warn!(error = %e, "registry {op} failed; will retry");
                if !matches!(e, peer_registry::Error::Conflict { .. }) {
                    self.hooks.notice(Notice::RegistryUnwritable {
                        error: e.to_string(),
                    });
                }
                Err(PassError::RegistryWrite { op, source: e })
            }
        }
    }

    /// Notes this pod's record as an upsert left it, with a notice when it is
    /// the first or a new address.
    fn took_own_record(
        &self,
        snap: &peer_registry::Snapshot,
        me: &mut Option<peer_registry::MemberRecord>,
    ) {
        let new = snap.members.get(&self.pod).cloned();
        if let Some(new) = &new {
            match me {
                None => self.hooks.notice(Notice::Registered {
                    enode: new.enode.to_string(),
                }),
                Some(old) if !old.enode.same_address(&new.enode) => {
                    self.hooks.notice(Notice::AddressChanged {
                        from: old.enode.to_string(),
                        to: new.enode.to_string(),
                    });
                }
                Some(_) => {}
            }
        }
        *me = new;
    }
}
