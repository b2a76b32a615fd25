//! The writes of one member's own Lease: create, replace carrying the
//! resourceVersion read, or delete with it as precondition; retried on races
//! with another writer of the Lease and (a bounded number of times) on
//! transient apiserver errors. The snapshot a write returns comes from the
//! latest view when there is one.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{DeleteParams, ObjectMeta, PostParams, Preconditions};
use tracing::{debug, info};

use super::view::{View, decode_lease, lock, revision, snapshot_of};
use super::{LeaseRegistry, MEMBER_ANNOTATION, REGISTRY_LABEL, lease_name};
use crate::configmap::is_transient;
use crate::error::{Error, Result};
use crate::record::{MemberRecord, Snapshot};
use crate::registry::PeerRegistry;

/// Transient errors (429, 5xx, a refused connection) one call retries
/// before it gives up.
const TRANSIENT_RETRIES: u32 = 8;
/// How long a write's snapshot waits for the watch's list before it reads
/// the registry itself.
const LIST_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl LeaseRegistry {
    /// The Lease that holds `record`.
    pub(super) fn lease(&self, record: &MemberRecord) -> Lease {
        let owner = record.pod_uid.as_ref().map(|uid| {
            vec![OwnerReference {
                api_version: "v1".to_owned(),
                kind: "Pod".to_owned(),
                name: record.pod.clone(),
                uid: uid.clone(),
                ..OwnerReference::default()
            }]
        });
        Lease {
            metadata: ObjectMeta {
                name: Some(lease_name(self.name(), &record.pod)),
                labels: Some(BTreeMap::from([
                    (
                        "app.kubernetes.io/managed-by".to_owned(),
                        "geth-peer-sidecar".to_owned(),
                    ),
                    (REGISTRY_LABEL.to_owned(), self.name().to_owned()),
                ])),
                annotations: Some(BTreeMap::from([(
                    MEMBER_ANNOTATION.to_owned(),
                    serde_json::to_string(record).unwrap_or_default(),
                )])),
                owner_references: owner,
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(record.pod.clone()),
                ..LeaseSpec::default()
            }),
        }
    }

    /// Sleeps the backoff after failed attempt `attempt`; false when the
    /// attempts are used up.
    pub(super) async fn back_off(&self, attempt: u32, e: &kube::Error) -> bool {
        let retry = self.configmap.retry_policy();
        if attempt >= retry.max_attempts.max(1) {
            return false;
        }
        let delay = retry.delay(attempt);
        debug!(namespace = %self.namespace(), error = %e, attempt, ?delay,
               "lease write raced another; re-reading and retrying");
        tokio::time::sleep(delay).await;
        true
    }

    /// After failed attempt `attempt` of a write of Lease `name`: sleeps the
    /// backoff and returns `Ok` when the write may be retried (a race with
    /// another writer of the Lease, or a transient error within the
    /// call's budget, `transient` counting them); else the error to return.
    pub(super) async fn retry_after(
        &self,
        e: kube::Error,
        verb: &'static str,
        name: &str,
        attempt: u32,
        transient: &mut u32,
    ) -> Result<()> {
        if !(is_race(&e) || (is_transient(&e) && *transient < TRANSIENT_RETRIES)) {
            return Err(self.err(e, verb, name));
        }
        *transient += u32::from(is_transient(&e));
        if self.back_off(attempt, &e).await {
            Ok(())
        } else {
            Err(Error::Conflict {
                attempts: attempt,
                name: name.to_owned(),
                namespace: self.namespace().to_owned(),
            })
        }
    }

    /// Reads Lease `name`, retrying transient errors.
    pub(super) async fn get(&self, name: &str) -> Result<Option<Lease>> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.api.get_opt(name).await {
                Ok(l) => return Ok(l),
                Err(e) if is_transient(&e) && attempt <= TRANSIENT_RETRIES => {
                    self.back_off(attempt, &e).await;
                }
                Err(e) => return Err(self.err(e, "get", name)),
            }
        }
    }

    /// The snapshot to return after a write: the latest view (the watch's
    /// once it has listed, else, when `read_ok`, the last
    /// [`PeerRegistry::snapshot`]'s) with `apply` done to it, else a fresh
    /// read. A sidecar's pass reads a snapshot, then registers: re-listing
    /// every Lease after each registration would make a burst of N cost N
    /// lists of N Leases. A removal, which acts on others' records, reads
    /// afresh unless the watch follows.
    pub(super) async fn after_write(
        &self,
        apply: impl FnOnce(&mut View),
        read_ok: bool,
    ) -> Result<Snapshot> {
        let view = {
            let mut view = lock(&self.view);
            if view.synced || (read_ok && view.read) {
                apply(&mut view);
                Some(view.clone())
            } else {
                None
            }
        };
        match view {
            Some(view) => Ok(snapshot_of(&self.configmap, &view)),
            None => self.snapshot().await,
        }
    }

    /// Until the latest watch has listed (or a read filled the view), for
    /// at most [`LIST_WAIT`]; at once when no watch stream is open (none
    /// was, or it was dropped: nothing would list). A member
    /// registers while its watch lists (see [`PeerRegistry::create`]): its
    /// write's snapshot is then the watch's list with the write applied,
    /// not a second read of every Lease.
    pub(super) async fn wait_listed(&self) {
        let deadline = tokio::time::Instant::now() + LIST_WAIT;
        loop {
            let listed = self.listed.notified();
            tokio::pin!(listed);
            // Registered before the view is looked at: a list that lands
            // (or a watch dropped) in between still wakes it.
            listed.as_mut().enable();
            if !self.watching.load(Ordering::Relaxed) {
                return;
            }
            {
                let view = lock(&self.view);
                if view.synced || view.read {
                    return;
                }
            }
            if tokio::time::timeout_at(deadline, listed).await.is_err() {
                return;
            }
        }
    }

    /// After this pod's Lease was written (`written`, none when it was
    /// kept): a record of the pod in the ConfigMap (a fleet switching from
    /// the ConfigMap layout) is removed, superseded by the Lease; returns
    /// the snapshot that holds the write.
    pub(super) async fn after_registering(
        &self,
        record: &MemberRecord,
        written: Option<Lease>,
    ) -> Result<Snapshot> {
        // The ConfigMap as the watch listed it (the latest view), else a
        // GET: in a burst of N registrations, N extra GETs would double the
        // load.
        self.wait_listed().await;
        let cached = {
            let view = lock(&self.view);
            (view.synced || view.read).then(|| view.configmap.clone())
        };
        let mut configmap = match cached {
            Some(cm) => cm,
            None => self.configmap.object().await?,
        };
        let in_configmap = self.configmap.observe(configmap.as_ref());
        if let Some(old) = in_configmap.members.get(&record.pod) {
            info!(pod = %record.pod, "the pod's record moves from the registry configmap to its lease");
            PeerRegistry::remove(&*self.configmap, vec![old.clone()]).await?;
            configmap = self.configmap.object().await?;
        }
        self.after_write(
            |view| {
                // The ConfigMap as read: external peers, legacy entries.
                if let Some(cm) = &configmap {
                    view.revision = view.revision.max(revision(&cm.metadata));
                }
                view.configmap = configmap;
                if let Some(lease) = &written {
                    view.put(self.name(), lease);
                }
            },
            true,
        )
        .await
    }

    /// Creates `record`'s Lease; `None` when the pod has one (left as
    /// stored).
    pub(super) async fn create_lease(&self, record: &MemberRecord) -> Result<Option<Lease>> {
        let name = lease_name(self.name(), &record.pod);
        let (mut attempt, mut transient) = (0, 0);
        loop {
            attempt += 1;
            match self
                .api
                .create(&PostParams::default(), &self.lease(record))
                .await
            {
                Ok(written) => return Ok(Some(written)),
                Err(kube::Error::Api(s)) if s.is_already_exists() => return Ok(None),
                Err(e) => {
                    self.retry_after(e, "create", &name, attempt, &mut transient)
                        .await?;
                }
            }
        }
    }

    /// Writes `record`'s Lease: create, or replace the stored one carrying
    /// its resourceVersion; nothing when the stored one keeps it.
    pub(super) async fn write_lease(&self, record: &MemberRecord) -> Result<Option<Lease>> {
        let name = lease_name(self.name(), &record.pod);
        let pp = PostParams::default();
        let mut read = self.registered.load(Ordering::Relaxed);
        let mut stored = None;
        let (mut attempt, mut transient) = (0, 0);
        loop {
            attempt += 1;
            if read {
                stored = self.get(&name).await?;
            }
            read = true;
            let (result, verb) = match &stored {
                Some(l) if decode_lease(self.name(), l).is_ok_and(|s| s.keeps(record)) => {
                    return Ok(None);
                }
                Some(l) => {
                    let mut new = self.lease(record);
                    new.metadata.resource_version = l.metadata.resource_version.clone();
                    (self.api.replace(&name, &pp, &new).await, "update")
                }
                None => (self.api.create(&pp, &self.lease(record)).await, "create"),
            };
            match result {
                Ok(written) => return Ok(Some(written)),
                // The first create of a process that finds its Lease: read it at once.
                Err(kube::Error::Api(s)) if s.is_already_exists() && attempt == 1 => {}
                Err(e) => {
                    self.retry_after(e, verb, &name, attempt, &mut transient)
                        .await?
                }
            }
        }
    }

    /// Deletes `expected`'s Lease if it still holds the same registration.
    /// Returns whether it did.
    pub(super) async fn delete_lease(&self, expected: &MemberRecord) -> Result<bool> {
        let name = lease_name(self.name(), &expected.pod);
        let (mut attempt, mut transient) = (0, 0);
        loop {
            attempt += 1;
            let Some(stored) = self.get(&name).await? else {
                return Ok(false);
            };
            if !decode_lease(self.name(), &stored).is_ok_and(|s| s.same_registration(expected)) {
                return Ok(false);
            }
            let dp = DeleteParams {
                preconditions: Some(Preconditions {
                    resource_version: stored.metadata.resource_version.clone(),
                    uid: stored.metadata.uid.clone(),
                }),
                ..DeleteParams::default()
            };
            match self.api.delete(&name, &dp).await {
                Ok(_) => return Ok(true),
                Err(kube::Error::Api(s)) if s.is_not_found() => return Ok(false),
                Err(e) => {
                    self.retry_after(e, "delete", &name, attempt, &mut transient)
                        .await?
                }
            }
        }
    }
}

/// A concurrent write to the same Lease (409), or one deleted meanwhile.
fn is_race(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_conflict() || s.is_already_exists() || s.is_not_found())
}
