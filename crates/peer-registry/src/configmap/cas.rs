//! The write core ([`Core`]): read, compute, conditional write, retried per
//! the [`RetryPolicy`] on conflicts and (a bounded number of times) on
//! transient apiserver errors. The default [`WriteProtocol::WholeObjectCas`]
//! upsert and removals are here; the [`WriteProtocol::KeyPatch`] ones are in
//! `key_patch`, over the same loop parts.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use geth_ipc::{Enode, NodeId};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::ObjectMeta;
use tracing::{debug, info};

use super::store::{Observer, Store, object_size};
use super::{RetryPolicy, WriteProtocol};
use crate::error::{Error, Result};
use crate::record::{MemberRecord, Snapshot};
use crate::schema;

fn is_retryable(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_conflict() || s.is_already_exists() || s.is_not_found())
}

/// Transient apiserver trouble: 429, or a 5xx (an etcd timeout, an
/// overloaded apiserver), or a refused connection (an apiserver restarting,
/// its endpoint moving: nothing was sent). The request may or may not have
/// been applied; every write loop re-reads and recomputes, and every write is
/// guarded (a `test`, the resourceVersion, a create), so retrying it is safe.
pub(crate) fn is_transient(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => s.code == 429 || s.code >= 500,
        e => crate::cause_of(e).kind == crate::CauseKind::Refused,
    }
}

/// Transient errors ([`is_transient`]) one call retries, with the backoff of
/// its [`RetryPolicy`], before it returns [`Error::Unavailable`].
pub(super) const TRANSIENT_RETRIES: u32 = 8;

/// The compare-and-swap engine, over any [`Store`].
pub(super) struct Core<S> {
    pub(super) store: S,
    pub(super) retry: RetryPolicy,
    pub(super) protocol: WriteProtocol,
    pub(super) observer: Arc<Observer>,
}

impl<S: Store> Core<S> {
    pub(super) fn err(&self, e: kube::Error, verb: &'static str) -> Error {
        Error::from_kube(e, verb, &self.observer.namespace, &self.observer.name)
    }

    pub(super) async fn snapshot(&self) -> Result<Snapshot> {
        let cm = self.store.get().await.map_err(|e| self.err(e, "get"))?;
        Ok(self.observer.observe(cm.as_ref()))
    }

    /// True when `e` is transient ([`is_transient`]) and this call, which has
    /// met `transient` of them so far, may retry it (it is then counted).
    pub(super) fn may_retry(e: &kube::Error, transient: &mut u32) -> bool {
        let retry = is_transient(e) && *transient < TRANSIENT_RETRIES;
        *transient += u32::from(retry);
        retry
    }

    /// The GET of a write loop; `None` after a transient error that the call
    /// may retry (the backoff has then been slept).
    pub(super) async fn read(
        &self,
        op: &'static str,
        attempt: u32,
        transient: &mut u32,
    ) -> Result<Option<Option<ConfigMap>>> {
        match self.store.get().await {
            Ok(cm) => Ok(Some(cm)),
            Err(e) if Self::may_retry(&e, transient) => {
                self.back_off(op, attempt, &e).await;
                Ok(None)
            }
            Err(e) => Err(self.err(e, "get")),
        }
    }

    /// Read, compute, conditional write; again on conflicts. `change` gives the
    /// new member set, or `None` when there is nothing to do.
    pub(super) async fn modify<F>(&self, op: &'static str, change: F) -> Result<Snapshot>
    where
        F: FnMut(&Snapshot) -> Option<BTreeMap<String, MemberRecord>> + Send,
    {
        self.modify_dropping_legacy(op, &BTreeSet::new(), change)
            .await
    }

    /// [`Self::modify`], also dropping the legacy entries in `drop_legacy`.
    pub(super) async fn modify_dropping_legacy<F>(
        &self,
        op: &'static str,
        drop_legacy: &BTreeSet<NodeId>,
        change: F,
    ) -> Result<Snapshot>
    where
        F: FnMut(&Snapshot) -> Option<BTreeMap<String, MemberRecord>> + Send,
    {
        let max = self.retry.max_attempts;
        self.modify_attempts(op, drop_legacy, max, None, change)
            .await
    }

    /// [`Self::modify_dropping_legacy`] with at most `max` attempts, the
    /// first on `first_read` when given (the object as the caller just read
    /// it) instead of a GET of its own.
    pub(super) async fn modify_attempts<F>(
        &self,
        op: &'static str,
        drop_legacy: &BTreeSet<NodeId>,
        max: u32,
        mut first_read: Option<Option<ConfigMap>>,
        mut change: F,
    ) -> Result<Snapshot>
    where
        F: FnMut(&Snapshot) -> Option<BTreeMap<String, MemberRecord>> + Send,
    {
        let max = max.max(1);
        let mut transient = 0;
        for attempt in 1..=max {
            let cm = match first_read.take() {
                Some(cm) => cm,
                None => {
                    let Some(cm) = self.read(op, attempt, &mut transient).await? else {
                        continue;
                    };
                    cm
                }
            };
            let snap = self.observer.observe(cm.as_ref());
            let Some(members) = change(&snap) else {
                return Ok(snap);
            };
            let old = cm.as_ref().and_then(|c| c.data.clone()).unwrap_or_default();
            let new = schema::encode_dropping_legacy(&old, &members, drop_legacy);
            if cm.is_some() && new == old {
                return Ok(snap);
            }
            let (result, verb) = self.write_data(cm, &old, new).await?;
            let result = result.map(|w| (w, verb));
            match result {
                Ok((written, verb)) => {
                    if verb == "create" {
                        info!(namespace = %self.observer.namespace, configmap = %self.observer.name,
                              op, "created the registry configmap");
                    } else {
                        debug!(namespace = %self.observer.namespace, configmap = %self.observer.name,
                               op, attempt, "updated the registry configmap");
                    }
                    return Ok(self.observer.observe(Some(&written)));
                }
                Err(e) if is_retryable(&e) => self.back_off(op, attempt, &e).await,
                // On the last attempt the error itself is returned: a caller
                // with its own loop (a KeyPatch creation) retries it there.
                Err(e) if attempt < max && Self::may_retry(&e, &mut transient) => {
                    self.back_off(op, attempt, &e).await;
                }
                Err(e) => {
                    let verb = if snap.exists() { "update" } else { "create" };
                    return Err(self.err(e, verb));
                }
            }
        }
        Err(self.exhausted())
    }

    /// A new registry object holding `data`.
    pub(super) fn new_object(&self, data: BTreeMap<String, String>) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(self.observer.name.clone()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".to_owned(),
                    "geth-peer-sidecar".to_owned(),
                )])),
                ..ObjectMeta::default()
            },
            data: Some(data),
            ..ConfigMap::default()
        }
    }

    /// Writes `new` as the data of `cm` (read holding `old`) by a replace
    /// carrying its resourceVersion (the CAS), or creates the object when
    /// missing. Refuses a write that would grow it past [`schema::MAX_BYTES`].
    /// The apiserver's answer, and the verb used.
    pub(super) async fn write_data(
        &self,
        cm: Option<ConfigMap>,
        old: &BTreeMap<String, String>,
        new: BTreeMap<String, String>,
    ) -> Result<(Result<ConfigMap, kube::Error>, &'static str)> {
        match cm {
            Some(mut cm) => {
                let (old_size, new_size) = (object_size(old, &cm), object_size(&new, &cm));
                if new_size > schema::MAX_BYTES && new_size > old_size {
                    return Err(Error::TooLarge { bytes: new_size });
                }
                cm.data = Some(new);
                // Unset: the server keeps them. resourceVersion stays: the CAS.
                cm.metadata.managed_fields = None;
                Ok((self.store.replace(&cm).await, "update"))
            }
            None => {
                let size = schema::encoded_size(&new);
                if size > schema::MAX_BYTES {
                    return Err(Error::TooLarge { bytes: size });
                }
                Ok((self.store.create(&self.new_object(new)).await, "create"))
            }
        }
    }

    /// Read, compute, conditional write of the object's `data` as a whole
    /// (`change` gets the data read and whether the object exists, and gives
    /// the new data, or `None` when there is nothing to do); again on
    /// conflicts. Creates the object when missing. Returns the object as
    /// written, or as read when nothing was written.
    pub(super) async fn rewrite_data<F>(
        &self,
        op: &'static str,
        mut change: F,
    ) -> Result<Option<ConfigMap>>
    where
        F: FnMut(&BTreeMap<String, String>, bool) -> Option<BTreeMap<String, String>> + Send,
    {
        let max = self.retry.max_attempts.max(1);
        let mut transient = 0;
        for attempt in 1..=max {
            let Some(cm) = self.read(op, attempt, &mut transient).await? else {
                continue;
            };
            let old = cm.as_ref().and_then(|c| c.data.clone()).unwrap_or_default();
            let Some(new) = change(&old, cm.is_some()) else {
                return Ok(cm);
            };
            if cm.is_some() && new == old {
                return Ok(cm);
            }
            let (result, verb) = self.write_data(cm, &old, new).await?;
            match result {
                Ok(written) => {
                    debug!(namespace = %self.observer.namespace, configmap = %self.observer.name,
                           op, attempt, verb, "wrote the registry configmap");
                    return Ok(Some(written));
                }
                Err(e) if is_retryable(&e) || Self::may_retry(&e, &mut transient) => {
                    self.back_off(op, attempt, &e).await;
                }
                Err(e) => return Err(self.err(e, verb)),
            }
        }
        Err(self.exhausted())
    }

    pub(super) async fn upsert(&self, record: MemberRecord) -> Result<Snapshot> {
        validate(&record)?;
        if self.protocol == WriteProtocol::KeyPatch {
            return self.patch_upsert(&record).await;
        }
        self.cas_upsert(&record).await
    }

    /// [`PeerRegistry::create`](crate::PeerRegistry::create): a compare-and-swap that adds `record` when
    /// its pod has none, and otherwise writes nothing. Either way the object
    /// read (or written) is the snapshot.
    pub(super) async fn create(&self, record: MemberRecord) -> Result<Option<Snapshot>> {
        validate(&record)?;
        self.modify("create", |snap| {
            (!snap.members.contains_key(&record.pod)).then(|| {
                let mut members = snap.members.clone();
                members.insert(record.pod.clone(), record.clone());
                members
            })
        })
        .await
        .map(Some)
    }

    pub(super) async fn cas_upsert(&self, record: &MemberRecord) -> Result<Snapshot> {
        self.cas_upsert_attempts(record, self.retry.max_attempts, None)
            .await
    }

    pub(super) async fn cas_upsert_attempts(
        &self,
        record: &MemberRecord,
        max: u32,
        first_read: Option<Option<ConfigMap>>,
    ) -> Result<Snapshot> {
        self.modify_attempts("upsert", &BTreeSet::new(), max, first_read, |snap| {
            let mut members = snap.members.clone();
            if !keeps(snap, record) {
                members.insert(record.pod.clone(), record.clone());
            }
            Some(members)
        })
        .await
    }

    /// Sleeps the backoff after failed attempt `attempt` (none after the last).
    pub(super) async fn back_off(&self, op: &'static str, attempt: u32, e: &kube::Error) {
        if attempt < self.retry.max_attempts.max(1) {
            let delay = self.retry.delay(attempt);
            debug!(namespace = %self.observer.namespace, configmap = %self.observer.name,
                   op, attempt, ?delay, error = %e,
                   "concurrent write to the registry; re-reading and retrying");
            tokio::time::sleep(delay).await;
        }
    }

    pub(super) fn exhausted(&self) -> Error {
        Error::Conflict {
            attempts: self.retry.max_attempts.max(1),
            name: self.observer.name.clone(),
            namespace: self.observer.namespace.clone(),
        }
    }

    pub(super) async fn remove(&self, expected: Vec<MemberRecord>) -> Result<Snapshot> {
        if self.protocol == WriteProtocol::KeyPatch {
            return self.patch_remove(&expected).await;
        }
        self.modify("remove", |snap| {
            let mut members = snap.members.clone();
            let mut removed = false;
            for exp in &expected {
                if members
                    .get(&exp.pod)
                    .is_some_and(|stored| stored.same_registration(exp))
                {
                    members.remove(&exp.pod);
                    removed = true;
                }
            }
            removed.then_some(members)
        })
        .await
    }

    pub(super) async fn remove_legacy(&self, enodes: Vec<Enode>) -> Result<Snapshot> {
        let drop: BTreeSet<NodeId> = enodes.iter().map(Enode::node_id).collect();
        if self.protocol == WriteProtocol::KeyPatch {
            return self.patch_remove_legacy(&drop).await;
        }
        self.modify_dropping_legacy("remove_legacy", &drop, |snap| {
            drops_any(snap, &drop).then(|| snap.members.clone())
        })
        .await
    }
}

/// True when `snap` holds a legacy entry in `drop` that this layout may
/// remove: not one the lease layout's publisher derived ([`Snapshot::derived`]),
/// which it would put back at once.
pub(super) fn drops_any(snap: &Snapshot, drop: &BTreeSet<NodeId>) -> bool {
    snap.legacy
        .iter()
        .any(|e| drop.contains(&e.node_id()) && !snap.derived.contains(&e.node_id()))
}

/// True when the stored record of `record.pod` is the same registration with
/// the same sidecar version: an upsert keeps it as stored (no write).
pub(super) fn keeps(snap: &Snapshot, record: &MemberRecord) -> bool {
    snap.members
        .get(&record.pod)
        .is_some_and(|stored| stored.keeps(record))
}

/// Why `record` cannot be stored (its pod name is not a valid key, or its
/// node id is not its enode's), as [`Error::InvalidRecord`].
pub(crate) fn validate(record: &MemberRecord) -> Result<()> {
    if let Some(reason) = schema::invalid_pod_name(&record.pod) {
        return Err(Error::InvalidRecord {
            pod: record.pod.clone(),
            reason: reason.to_owned(),
        });
    }
    if record.node_id != record.enode.node_id() {
        return Err(Error::InvalidRecord {
            reason: format!(
                "nodeId {} is not the enode's node id {}",
                record.node_id,
                record.enode.node_id()
            ),
            pod: record.pod.clone(),
        });
    }
    Ok(())
}
