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

/// A pass's registry writes, running while the loop goes on.
pub(crate) struct InFlight {
    task: tokio::task::JoinHandle<Written>,
    /// This pod's record as the upsert writes it, shown to the engine as ours
    /// meanwhile (so it plans no second upsert and dials by this record's
    /// time, as the other members will see it).
    pub(crate) own: Option<peer_registry::MemberRecord>,
    /// The write is a [`PeerRegistry::create`]: `own` stands for this pod's
    /// record only where the registry shows none (a stored one is kept).
    pub(crate) create_only: bool,
}

impl InFlight {
    /// Resolves when the writes are done (or the task failed).
    pub(crate) async fn done(&mut self) -> Option<Written> {
        (&mut self.task).await.ok()
    }
}

/// What a pass's registry writes left: the snapshots they returned, this
/// pod's record after them, and the first error.
pub(crate) struct Written {
    snaps: Vec<peer_registry::Snapshot>,
    me: Option<peer_registry::MemberRecord>,
    wrote_own: bool,
    /// A pass is due whatever was taken in: a start's create that wrote
    /// nothing (the pod had a record, or the registry does not create),
    /// whose first pass took the create as this pod's record and so
    /// planned no upsert.
    due: bool,
    result: Result<(), PassError>,
}

impl<G: AdminApi, R: PeerRegistry> Runner<G, R> {
    /// Starts the plan's registry writes (unless earlier ones are still in
    /// flight: then the plan's are left to a pass after they land) and makes
    /// geth's calls. The writes run on while the loop goes on: under a burst
    /// of pod starts a Lease create took up to 4 s at the apiserver, and a
    /// pass that waited for it took in no watch event and dialled no member
    /// meanwhile. Their outcome is taken in by [`Runner::take_written`].
    pub(crate) async fn execute(
        &mut self,
        plan: &core::Plan,
        now: jiff::Timestamp,
    ) -> Result<(), PassError> {
        if !plan.registry.is_empty() && self.writing.is_none() {
            self.start_writing(plan.registry.clone());
        }
        let mut refused = 0;
        for (action, res) in call_geth(&*self.geth, &plan.geth).await {
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
        if refused > 0 {
            return Err(PassError::GethRefused { failed: refused });
        }
        Ok(())
    }

    /// Spawns `actions`, in order, as the writes in flight.
    pub(crate) fn start_writing(&mut self, actions: Vec<core::RegistryAction>) {
        let writer = self.writer();
        let own = actions.iter().find_map(|a| match a {
            core::RegistryAction::Upsert(rec) => Some(rec.clone()),
            _ => None,
        });
        let mut me = self.me.clone();
        let task = tokio::spawn(async move {
            let mut snaps = Vec::new();
            let mut result = Ok(());
            let mut wrote_own = false;
            for action in actions {
                let upsert = matches!(action, core::RegistryAction::Upsert(_));
                match writer.write(action, &mut me).await {
                    Ok(snap) => {
                        wrote_own |= upsert;
                        snaps.push(snap);
                    }
                    Err(e) => result = Err(e),
                }
            }
            Written {
                snaps,
                me,
                wrote_own,
                due: false,
                result,
            }
        });
        self.writing = Some(InFlight {
            task,
            own,
            create_only: false,
        });
    }

    /// Spawns a [`PeerRegistry::create`] of this pod's `record` as the write
    /// in flight: a start registers while its first read of the registry is
    /// on its way, instead of after it.
    pub(crate) fn start_creating(&mut self, record: peer_registry::MemberRecord) {
        let writer = self.writer();
        let mut me = self.me.clone();
        let own = record.clone();
        let task = tokio::spawn(async move {
            let (snaps, created, result) = match writer.create(record, &mut me).await {
                Ok((snap, created)) => (Vec::from_iter(snap), created, Ok(())),
                Err(e) => (Vec::new(), false, Err(e)),
            };
            Written {
                wrote_own: created,
                due: !created && result.is_ok(),
                snaps,
                me,
                result,
            }
        });
        self.writing = Some(InFlight {
            task,
            own: Some(own),
            create_only: true,
        });
    }

    /// What the writes in flight use.
    fn writer(&self) -> Writer<R> {
        Writer {
            registry: self.registry.clone(),
            metrics: self.metrics.clone(),
            health: self.health.clone(),
            hooks: self.s.hooks.clone(),
            pod: self.s.pod.clone(),
        }
    }

    /// Takes in the writes that landed (their snapshots, this pod's record).
    /// Returns whether a pass is due now: a snapshot was taken, or a pass
    /// held writes back meanwhile. Not otherwise: a write whose snapshot is
    /// older than the one held (the Lease layout's delete of a Lease already
    /// gone, before the watch reports it) would be planned again at once, in
    /// a loop at the apiserver's round-trip pace.
    pub(crate) fn take_written(&mut self, written: Written) -> Result<bool, PassError> {
        self.writing = None;
        if written.wrote_own {
            self.me = written.me;
        }
        let mut taken = false;
        for snap in written.snaps {
            taken |= self.on_snapshot(snap);
        }
        let held_back = std::mem::take(&mut self.held_back);
        written.result.map(|()| taken || held_back || written.due)
    }

    /// Waits up to `limit` for the writes in flight and takes them in; gives
    /// them up (aborted) past it.
    pub(crate) async fn finish_writing(&mut self, limit: std::time::Duration) {
        let Some(mut inflight) = self.writing.take() else {
            return;
        };
        match tokio::time::timeout(limit, inflight.done()).await {
            Ok(Some(written)) => {
                let _ = self.take_written(written);
            }
            Ok(None) => {}
            Err(_) => {
                inflight.task.abort();
                warn!(after = ?limit, "a registry write did not finish before shutdown; giving it up");
            }
        }
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
        let snap = res.map_err(|e| self.failed(op, e))?;
        self.metrics
            .registry_writes
            .get_or_create(&Metrics::kind(op))
            .inc();
        if upsert {
            self.took_own_record(&snap, me);
        }
        Ok(snap)
    }

    /// A [`PeerRegistry::create`] of this pod's `record`; returns the
    /// snapshot it produced (if any) and whether it holds `record` (the
    /// create wrote it). A record the pod already had is left to the pass's
    /// upsert, which decides what to change: it is not taken as this pod's
    /// record here, nor counted or announced as a registration.
    async fn create(
        &self,
        record: peer_registry::MemberRecord,
        me: &mut Option<peer_registry::MemberRecord>,
    ) -> Result<(Option<peer_registry::Snapshot>, bool), PassError> {
        info!(pod = %record.pod, node = %record.node_id.short(), enode = %record.enode,
              "registering self while the registry is read");
        let snap = self
            .registry
            .create(record.clone())
            .await
            .map_err(|e| self.failed("create", e))?;
        let created = snap.as_ref().is_some_and(|s| {
            s.members.get(&record.pod).is_some_and(|held| {
                held.same_registration(&record) && held.registered_at == record.registered_at
            })
        });
        if let (Some(snap), true) = (&snap, created) {
            self.metrics
                .registry_writes
                .get_or_create(&Metrics::kind("create"))
                .inc();
            self.took_own_record(snap, me);
        }
        Ok((snap, created))
    }

    /// Counts, logs and notices a failed registry `op`.
    fn failed(&self, op: &'static str, e: peer_registry::Error) -> PassError {
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
        PassError::RegistryWrite { op, source: e }
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
