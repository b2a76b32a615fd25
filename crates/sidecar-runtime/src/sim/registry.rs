//! One sidecar's registry as the simulation gives it: the user's registry
//! (see [`SimConfig::registry`](super::SimConfig::registry)) wrapped in the
//! simulation's faults and the invariant checks of its writes.

use std::sync::{Arc, Mutex, PoisonError};

use futures::StreamExt;
use futures::stream::BoxStream;
use geth_ipc::{Enode, NodeId};
use peer_registry::{MemberRecord, MemoryStore, PeerRegistry, Snapshot};

use super::truth::{Truth, lock};

/// One sidecar's registry: the registry under test on the shared in-memory
/// store, plus the simulation's faults (outages, stale watch events) and the
/// invariant checks of its writes.
pub(super) struct SimRegistry {
    /// The registry under test, on [`SimRegistry::store`].
    pub(super) inner: Arc<dyn PeerRegistry>,
    /// The store the registry under test writes to (read here for the checks).
    pub(super) store: MemoryStore,
    pub(super) node: usize,
    pub(super) truth: Arc<Mutex<Truth>>,
    pub(super) stale: Mutex<Option<futures::channel::mpsc::UnboundedReceiver<Snapshot>>>,
}

impl SimRegistry {
    fn outage(&self, verb: &'static str) -> peer_registry::Result<()> {
        if lock(&self.truth).outage {
            return Err(peer_registry::Error::Unavailable {
                resource: "configmap",
                verb,
                name: peer_registry::DEFAULT_NAME.into(),
                namespace: "sim".into(),
                source: Box::new(MemoryStore::api_error(503, "ServiceUnavailable")),
            });
        }
        Ok(())
    }

    /// Sends the store's state to every watch, in the order they were opened.
    fn publish(&self) {
        let snap = view(&self.store);
        lock(&self.truth)
            .watchers
            .retain(|w| w.unbounded_send(Ok(snap.clone())).is_ok());
    }

    fn note(&self, what: String) {
        let mut t = lock(&self.truth);
        let at = t.now();
        t.trace.push(format!("{at:?} node {}: {what}", self.node));
    }
}

#[async_trait::async_trait]
impl PeerRegistry for SimRegistry {
    async fn snapshot(&self) -> peer_registry::Result<Snapshot> {
        self.outage("get")?;
        self.inner.snapshot().await
    }

    async fn upsert(&self, record: MemberRecord) -> peer_registry::Result<Snapshot> {
        self.outage("update")?;
        let stored = self.store.data();
        let held = peer_registry::schema::decode(&stored, None)
            .members
            .get(&record.pod)
            .cloned();
        if let Some(held) = held
            && held.same_registration(&record)
            && held.pod_uid == record.pod_uid
            && held.pod_ip == record.pod_ip
            && held.sidecar_version == record.sidecar_version
        {
            let mut t = lock(&self.truth);
            let at = t.now();
            t.violations.push(format!(
                "at {at:?}: node {} upserted {} identical to the stored record (written for nothing)",
                self.node, record.pod
            ));
        }
        let res = self.inner.upsert(record.clone()).await;
        if res.is_ok() {
            self.publish();
        }
        self.note(format!(
            "upsert {} {} -> {}",
            record.pod,
            record.enode,
            res.as_ref().map_or("error", |_| "ok")
        ));
        res
    }

    async fn create(&self, record: MemberRecord) -> peer_registry::Result<Option<Snapshot>> {
        self.outage("create")?;
        let held = peer_registry::schema::decode(&self.store.data(), None)
            .members
            .contains_key(&record.pod);
        let res = self.inner.create(record.clone()).await;
        if res.is_ok() && !held {
            self.publish();
        }
        self.note(format!(
            "create {} {} -> {}",
            record.pod,
            record.enode,
            match &res {
                Ok(_) if held => "kept the stored record",
                Ok(_) => "ok",
                Err(_) => "error",
            }
        ));
        res
    }

    async fn remove(&self, expected: Vec<MemberRecord>) -> peer_registry::Result<Snapshot> {
        self.outage("update")?;
        let members: Vec<NodeId> = peer_registry::schema::decode(&self.store.data(), None)
            .members
            .values()
            .map(|m| m.node_id)
            .collect();
        let res = self.inner.remove(expected.clone()).await;
        if res.is_ok() {
            self.publish();
        }
        if let Ok(snap) = &res {
            let mut t = lock(&self.truth);
            for r in &expected {
                let gone = !snap
                    .members
                    .get(&r.pod)
                    .is_some_and(|held| held.same_registration(r));
                if gone {
                    t.check_removal(self.node, r, &members);
                    let at = t.now();
                    t.trace
                        .push(format!("{at:?} node {}: removed {}", self.node, r.pod));
                }
            }
        }
        res
    }

    async fn remove_legacy(&self, enodes: Vec<Enode>) -> peer_registry::Result<Snapshot> {
        self.outage("update")?;
        let res = self.inner.remove_legacy(enodes).await;
        if res.is_ok() {
            self.publish();
        }
        res
    }

    /// The store's state, then its state after every write of any sidecar.
    /// Not the in-memory store's own watch: that is a `tokio::sync::watch`,
    /// which wakes its waiters in an order drawn from the runtime's RNG, and
    /// would make runs differ. Every write goes through a `SimRegistry`, so
    /// this sees every change.
    fn watch(&self) -> BoxStream<'static, peer_registry::Result<Snapshot>> {
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let _ = tx.unbounded_send(Ok(view(&self.store)));
        lock(&self.truth).watchers.push(tx);
        // Like a Kubernetes watch (and the store's own), a reader that falls
        // behind sees only the latest of the states sent meanwhile.
        let rx = rx
            .ready_chunks(64)
            .filter_map(|states| futures::future::ready(states.into_iter().last()));
        let stale = self
            .stale
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match stale {
            Some(old) => futures::stream::select(rx, old.map(Ok)).boxed(),
            None => rx.boxed(),
        }
    }
}

/// The store's state as a registry reads it.
pub(super) fn view(store: &MemoryStore) -> Snapshot {
    let rv = store.object().and_then(|o| o.metadata.resource_version);
    peer_registry::schema::decode(&store.data(), rv)
}
