//! The registry as one Kubernetes ConfigMap, updated by compare-and-swap.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::BoxStream;
use geth_ipc::{Enode, NodeId};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{GetParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tracing::{debug, info, warn};

use crate::error::{Error, Result};
use crate::record::{MemberRecord, Snapshot};
use crate::registry::PeerRegistry;
use crate::schema;

/// The default name of the registry ConfigMap (the original sidecar's).
pub const DEFAULT_NAME: &str = "geth-shared-static-nodes";

/// How conflicting writes are retried: exponential backoff with full jitter.
///
/// Attempt `n` (from 1) that meets a conflict sleeps a uniformly random time in
/// `0 ..= min(max_delay, base_delay * 2^(n-1))` before re-reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts (read, compute, conditional write) before giving up with
    /// [`Error::Conflict`].
    pub max_attempts: u32,
    /// The first backoff's upper bound.
    pub base_delay: Duration,
    /// The largest backoff's upper bound.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    /// 60 attempts, 20 ms base, 2 s cap. Measured (benches/registry.rs): with
    /// 200 registrants racing on one object, a 1 s cap and 20 attempts left no
    /// headroom (one needed 17; on a slower apiserver 6-9 of 200 gave up); a 2 s
    /// cap cut writes by a quarter and p50 from 4.6 s to 1.4 s. Nothing changes
    /// for N <= 50, where nobody needs more than 7 attempts.
    fn default() -> Self {
        Self {
            max_attempts: 60,
            base_delay: Duration::from_millis(20),
            max_delay: Duration::from_secs(2),
        }
    }
}

impl RetryPolicy {
    /// The upper bound of the backoff after failed attempt `attempt` (from 1).
    pub fn delay_cap(&self, attempt: u32) -> Duration {
        let factor = 1u32 << attempt.saturating_sub(1).min(20);
        self.base_delay.saturating_mul(factor).min(self.max_delay)
    }

    /// A random backoff (full jitter) after failed attempt `attempt` (from 1).
    pub fn delay(&self, attempt: u32) -> Duration {
        let cap = u64::try_from(self.delay_cap(attempt).as_micros()).unwrap_or(u64::MAX);
        Duration::from_micros(rand::random_range(0..=cap))
    }
}

/// How `upsert` and `remove` write (the two protocols are described in the
/// crate README, "Concurrency").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WriteProtocol {
    /// Each member's own key written by a JSON Patch guarded by a `test` of its
    /// stored value, applied by the apiserver to the latest object (no
    /// resourceVersion, so writes to other keys never conflict), together with
    /// `static-nodes.json` as derived from the members read; when the result
    /// shows it stale (members changed meanwhile) it is repaired by a second
    /// JSON Patch guarded by a `test` of its stored value. Creating a missing
    /// object, or one without `data`, goes through the CAS path.
    ///
    /// Fewer client writes in a burst (2.5-4.6 per member at N=200 against
    /// 12.8), but slower: the apiserver retries each patch itself, and at N=200
    /// it took 115 s against 22 s for the CAS (crate README). Opt-in.
    KeyPatch,
    /// The whole object replaced with the resourceVersion it was computed from
    /// (a compare-and-swap), retried on 409. Every concurrent write conflicts.
    /// The default: the faster burst registration measured.
    #[default]
    WholeObjectCas,
}

/// The calls the write loops need, on the one named object.
#[async_trait::async_trait]
trait Store: Send + Sync {
    async fn get(&self) -> Result<Option<ConfigMap>, kube::Error>;
    /// A GET answered from the apiserver's watch cache with a version not
    /// older than `resource_version`: cheaper than [`Store::get`] (a quorum
    /// read from etcd), possibly not the latest.
    async fn get_not_older_than(
        &self,
        resource_version: &str,
    ) -> Result<Option<ConfigMap>, kube::Error>;
    async fn create(&self, cm: &ConfigMap) -> Result<ConfigMap, kube::Error>;
    /// A PUT carrying `metadata.resourceVersion`: fails with 409 if it changed.
    async fn replace(&self, cm: &ConfigMap) -> Result<ConfigMap, kube::Error>;
    /// A JSON Patch (RFC 6902, `ops` is its array), applied by the server to
    /// the latest object: fails with 422 when a `test` op does not hold.
    async fn patch(&self, ops: serde_json::Value) -> Result<ConfigMap, kube::Error>;
}

struct KubeStore {
    api: Api<ConfigMap>,
    name: String,
}

#[async_trait::async_trait]
impl Store for KubeStore {
    async fn get(&self) -> Result<Option<ConfigMap>, kube::Error> {
        self.api.get_opt(&self.name).await
    }

    async fn get_not_older_than(
        &self,
        resource_version: &str,
    ) -> Result<Option<ConfigMap>, kube::Error> {
        match self
            .api
            .get_with(&self.name, &GetParams::at(resource_version))
            .await
        {
            Ok(cm) => Ok(Some(cm)),
            Err(kube::Error::Api(s)) if s.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn create(&self, cm: &ConfigMap) -> Result<ConfigMap, kube::Error> {
        self.api.create(&PostParams::default(), cm).await
    }

    async fn replace(&self, cm: &ConfigMap) -> Result<ConfigMap, kube::Error> {
        self.api
            .replace(&self.name, &PostParams::default(), cm)
            .await
    }

    async fn patch(&self, ops: serde_json::Value) -> Result<ConfigMap, kube::Error> {
        let ops = serde_json::from_value(ops).map_err(kube::Error::SerdeError)?;
        self.api
            .patch(&self.name, &PatchParams::default(), &Patch::Json::<()>(ops))
            .await
    }
}

/// Logging state shared by the CAS loop and the watch: warns once per new
/// problem and once per crossing of the size warning threshold.
struct Observer {
    namespace: String,
    name: String,
    above_warn: AtomicBool,
    problems: Mutex<Vec<String>>,
}

impl Observer {
    fn size(&self, bytes: usize) {
        let above = bytes > schema::WARN_BYTES;
        if self.above_warn.swap(above, Ordering::Relaxed) != above {
            if above {
                warn!(
                    namespace = %self.namespace, configmap = %self.name, bytes,
                    "the registry configmap is over {} KiB; writes that grow it past {} KiB are \
                     refused (Kubernetes limit: 1 MiB): remove stale members or unknown keys",
                    schema::WARN_BYTES / 1024,
                    schema::MAX_BYTES / 1024
                );
            } else {
                info!(namespace = %self.namespace, configmap = %self.name, bytes,
                      "the registry configmap is back under the size warning threshold");
            }
        }
    }

    fn problems(&self, snap: &Snapshot) {
        let Ok(mut seen) = self.problems.lock() else {
            return;
        };
        if *seen == snap.problems {
            return;
        }
        for p in snap.problems.iter().filter(|p| !seen.contains(p)) {
            warn!(namespace = %self.namespace, configmap = %self.name, "registry data: {p}");
        }
        seen.clone_from(&snap.problems);
    }

    /// Decodes an object (or its absence), logging what is new.
    fn observe(&self, cm: Option<&ConfigMap>) -> Snapshot {
        let Some(cm) = cm else {
            return Snapshot::default();
        };
        let data = cm.data.clone().unwrap_or_default();
        self.size(object_size(&data, cm));
        let rv = Some(cm.metadata.resource_version.clone().unwrap_or_default());
        let snap = schema::decode(&data, rv);
        self.problems(&snap);
        snap
    }
}

/// The size Kubernetes counts against the 1 MiB limit: data and binaryData.
fn object_size(data: &BTreeMap<String, String>, cm: &ConfigMap) -> usize {
    let binary: usize = cm
        .binary_data
        .iter()
        .flatten()
        .map(|(k, v)| k.len() + v.0.len())
        .sum();
    schema::encoded_size(data) + binary
}

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
const TRANSIENT_RETRIES: u32 = 8;

/// Waits during which `static-nodes.json` did not change after which a
/// registrant that does not lead the settle settles its entry itself (see
/// [`Core::settle_own_entry`]).
const SETTLE_PATIENCE: u32 = 2;

/// The most of a registrant's own write time that a non-leader's wait takes
/// (see [`Core::settle_own_entry`]): under a burst the apiserver retries
/// conflicting patches of the one object internally, a write can take tens of
/// seconds, and waits that long can leave a registrant idle long after the
/// leader listed it (uncapped, N=200 measured p50 75 s).
const SETTLE_WAIT_RTT_CAP: Duration = Duration::from_secs(1);

/// A JSON Patch precondition (`test` op) that did not hold, or the object
/// deleted meanwhile: re-read and recompute. (Our ops are well-formed, so a
/// 422 means a failed `test`, or a limit that the re-read then reports.)
fn is_stale_patch(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 422 || s.is_not_found() || s.is_conflict())
}

/// The JSON Pointer of `data[key]` (RFC 6901 escaping).
fn data_pointer(key: &str) -> String {
    format!("/data/{}", key.replace('~', "~0").replace('/', "~1"))
}

/// The ops that set `data[key]` to `value` only if it still holds `old`
/// (absent: a plain `add`).
fn set_ops(key: &str, old: Option<&String>, value: &str) -> Vec<serde_json::Value> {
    let path = data_pointer(key);
    match old {
        Some(old) => vec![
            serde_json::json!({ "op": "test", "path": path, "value": old }),
            serde_json::json!({ "op": "replace", "path": path, "value": value }),
        ],
        None => vec![serde_json::json!({ "op": "add", "path": path, "value": value })],
    }
}

/// The `static-nodes.json` value `data` should hold with the member set
/// `members` (legacy entries kept, except those in `drop_legacy`): exactly
/// what [`schema::encode_dropping_legacy`] writes, the one home of that rule.
/// `None` when the stored value already holds it.
fn derived_static_nodes(
    data: &BTreeMap<String, String>,
    members: &BTreeMap<String, MemberRecord>,
    drop_legacy: &BTreeSet<NodeId>,
) -> Option<String> {
    let mut encoded = schema::encode_dropping_legacy(data, members, drop_legacy);
    let derived = encoded.remove(schema::STATIC_NODES_KEY)?;
    (data.get(schema::STATIC_NODES_KEY) != Some(&derived)).then_some(derived)
}

/// The guarded ops that set `static-nodes.json` as [`derived_static_nodes`]
/// gives it from `data` (as read) and `members` (none when it is current):
/// a `test` of the value read, and a `test` of the stored record of every
/// member whose entry is added. The second kind keeps a stale writer from
/// adding the entry of a member removed after its read: that entry, with no
/// record, would then pass for a legacy one and stay forever.
///
/// Invariant kept by every [`WriteProtocol::KeyPatch`] write: an entry whose
/// node id belongs to no member record is a legacy entry. Writes that take a
/// node id out of the member set (a removal, a record re-registered under a
/// new key) set `static-nodes.json` in the same patch, through these ops.
fn static_nodes_ops(
    data: &BTreeMap<String, String>,
    members: &BTreeMap<String, MemberRecord>,
    drop_legacy: &BTreeSet<NodeId>,
) -> Option<Vec<serde_json::Value>> {
    let derived = derived_static_nodes(data, members, drop_legacy)?;
    let old = data.get(schema::STATIC_NODES_KEY);
    let listed = listed_entries(data);
    let mut ops = Vec::new();
    for m in members.values() {
        let key = schema::member_key(&m.pod);
        if let (false, Some(stored)) = (listed.contains(&m.enode.to_string()), data.get(&key)) {
            ops.push(
                serde_json::json!({ "op": "test", "path": data_pointer(&key), "value": stored }),
            );
        }
    }
    ops.extend(set_ops(schema::STATIC_NODES_KEY, old, &derived));
    Some(ops)
}

/// The entries of the stored `static-nodes.json` (none when it does not parse).
fn listed_entries(data: &BTreeMap<String, String>) -> BTreeSet<String> {
    data.get(schema::STATIC_NODES_KEY)
        .and_then(|v| serde_json::from_str::<Vec<String>>(v).ok())
        .unwrap_or_default()
        .into_iter()
        .collect()
}

/// The node ids a record answers to (its `nodeId` and its enode's).
fn node_ids(m: &MemberRecord) -> [NodeId; 2] {
    [m.node_id, m.enode.node_id()]
}

/// The compare-and-swap engine, over any [`Store`].
struct Core<S> {
    store: S,
    retry: RetryPolicy,
    protocol: WriteProtocol,
    observer: Arc<Observer>,
}

impl<S: Store> Core<S> {
    fn err(&self, e: kube::Error, verb: &'static str) -> Error {
        Error::from_kube(e, verb, &self.observer.namespace, &self.observer.name)
    }

    async fn snapshot(&self) -> Result<Snapshot> {
        let cm = self.store.get().await.map_err(|e| self.err(e, "get"))?;
        Ok(self.observer.observe(cm.as_ref()))
    }

    /// True when `e` is transient ([`is_transient`]) and this call, which has
    /// met `transient` of them so far, may retry it (it is then counted).
    fn may_retry(e: &kube::Error, transient: &mut u32) -> bool {
        let retry = is_transient(e) && *transient < TRANSIENT_RETRIES;
        *transient += u32::from(retry);
        retry
    }

    /// The GET of a write loop; `None` after a transient error that the call
    /// may retry (the backoff has then been slept).
    async fn read(
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
    async fn modify<F>(&self, op: &'static str, change: F) -> Result<Snapshot>
    where
        F: FnMut(&Snapshot) -> Option<BTreeMap<String, MemberRecord>> + Send,
    {
        self.modify_dropping_legacy(op, &BTreeSet::new(), change)
            .await
    }

    /// [`Self::modify`], also dropping the legacy entries in `drop_legacy`.
    async fn modify_dropping_legacy<F>(
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
    async fn modify_attempts<F>(
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
    fn new_object(&self, data: BTreeMap<String, String>) -> ConfigMap {
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
    async fn write_data(
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
    async fn rewrite_data<F>(&self, op: &'static str, mut change: F) -> Result<Option<ConfigMap>>
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

    async fn upsert(&self, record: MemberRecord) -> Result<Snapshot> {
        validate(&record)?;
        if self.protocol == WriteProtocol::KeyPatch {
            return self.patch_upsert(&record).await;
        }
        self.cas_upsert(&record).await
    }

    async fn cas_upsert(&self, record: &MemberRecord) -> Result<Snapshot> {
        self.cas_upsert_attempts(record, self.retry.max_attempts, None)
            .await
    }

    async fn cas_upsert_attempts(
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
    async fn back_off(&self, op: &'static str, attempt: u32, e: &kube::Error) {
        if attempt < self.retry.max_attempts.max(1) {
            let delay = self.retry.delay(attempt);
            debug!(namespace = %self.observer.namespace, configmap = %self.observer.name,
                   op, attempt, ?delay, error = %e,
                   "concurrent write to the registry; re-reading and retrying");
            tokio::time::sleep(delay).await;
        }
    }

    fn exhausted(&self) -> Error {
        Error::Conflict {
            attempts: self.retry.max_attempts.max(1),
            name: self.observer.name.clone(),
            namespace: self.observer.namespace.clone(),
        }
    }

    /// [`WriteProtocol::KeyPatch`] upsert: one JSON Patch of the member's own
    /// key (guarded by a `test` of the value read), then
    /// [`Self::settle_own_entry`]. Only when the record replaced answered
    /// to a node id the new one does not (a new node key) is
    /// `static-nodes.json` set in the same patch (guarded, see
    /// [`static_nodes_ops`]), so the old entry cannot pass for a legacy one.
    async fn patch_upsert(&self, record: &MemberRecord) -> Result<Snapshot> {
        let mut transient = 0;
        for attempt in 1..=self.retry.max_attempts.max(1) {
            let started = Instant::now();
            let Some(cm) = self.read("upsert", attempt, &mut transient).await? else {
                continue;
            };
            let snap = self.observer.observe(cm.as_ref());
            let cm = match cm {
                Some(cm)
                    if cm
                        .data
                        .as_ref()
                        .is_some_and(|d| d.contains_key(schema::STATIC_NODES_KEY)) =>
                {
                    cm
                }
                // Nothing to patch into: create it (or add `data`, or the
                // derived key, whose absence JSON Patch cannot test) by one
                // CAS attempt on what we just read (never a replace of an
                // object created since: that one is patched). Losing that
                // race (409) is normal: the next round patches the object.
                cm => match self.cas_upsert_attempts(record, 1, Some(cm)).await {
                    Err(Error::Conflict { .. }) => {
                        let lost = kube::Error::Api(
                            kube::core::Status::failure("lost the creation race", "AlreadyExists")
                                .with_code(409)
                                .boxed(),
                        );
                        self.back_off("upsert", attempt, &lost).await;
                        continue;
                    }
                    Err(Error::Unavailable { source, .. })
                        if Self::may_retry(&source, &mut transient) =>
                    {
                        self.back_off("upsert", attempt, &source).await;
                        continue;
                    }
                    done => return done,
                },
            };
            let old = cm.data.clone().unwrap_or_default();
            if keeps(&snap, record) {
                return self.settle_own_entry(record, cm, started.elapsed()).await;
            }
            let mut members = snap.members.clone();
            members.insert(record.pod.clone(), record.clone());
            let new_size = object_size(&schema::encode(&old, &members), &cm);
            if new_size > schema::MAX_BYTES && new_size > object_size(&old, &cm) {
                return Err(Error::TooLarge { bytes: new_size });
            }
            let key = schema::member_key(&record.pod);
            let value = serde_json::to_string(record).unwrap_or_default();
            let new_ids = node_ids(record);
            let drops_an_id = snap
                .members
                .get(&record.pod)
                .is_some_and(|stored| node_ids(stored).iter().any(|id| !new_ids.contains(id)));
            // First, as its tests are of the values read.
            let mut ops = if drops_an_id {
                static_nodes_ops(&old, &members, &BTreeSet::new()).unwrap_or_default()
            } else {
                Vec::new()
            };
            ops.extend(set_ops(&key, old.get(&key), &value));
            if !old.contains_key(schema::SCHEMA_VERSION_KEY) {
                ops.extend(set_ops(
                    schema::SCHEMA_VERSION_KEY,
                    None,
                    schema::SCHEMA_VERSION,
                ));
            }
            let sent = Instant::now();
            match self.store.patch(serde_json::Value::Array(ops)).await {
                Ok(written) => {
                    debug!(namespace = %self.observer.namespace, configmap = %self.observer.name,
                           pod = %record.pod, attempt, "patched the member's key");
                    return self.settle_own_entry(record, written, sent.elapsed()).await;
                }
                Err(e) if is_stale_patch(&e) || Self::may_retry(&e, &mut transient) => {
                    self.back_off("upsert", attempt, &e).await;
                }
                Err(e) => return Err(self.err(e, "patch")),
            }
        }
        Err(self.exhausted())
    }

    /// The end of a [`WriteProtocol::KeyPatch`] upsert: returns once `me`'s
    /// entry is listed in `static-nodes.json` of the latest object seen
    /// (starting with `cm`, the object its own write returned), or once `me`
    /// is no longer the stored registration (removed or replaced meanwhile:
    /// nothing of ours to list). `rtt` is how long that write took.
    ///
    /// In a burst, many registrants find their entry missing at once, and one
    /// guarded settle ([`static_nodes_ops`]: every member of the object read)
    /// lists all of them. So only the *leader* settles at once: of the members
    /// whose entries are missing, the one whose pod name sorts first. The
    /// others wait (`rtt`, at most [`SETTLE_WAIT_RTT_CAP`], plus the jittered
    /// backoff of the [`RetryPolicy`]),
    /// re-read from the watch cache (not older than what they saw) and
    /// usually find their entry listed by someone else: no write. A registrant
    /// settles itself when it leads, or after [`SETTLE_PATIENCE`] waits during
    /// which `static-nodes.json` did not change (the leader may be gone). A
    /// settle whose `test` fails (another writer changed the value after our
    /// read) re-reads from etcd and goes round again.
    ///
    /// Nothing is lost: each registrant sees to its own entry before its
    /// upsert returns, and a settle never drops a current member's entry (its
    /// `test` of the value read fails if anything changed it since). A stale
    /// settler cannot resurrect a removed member: it `test`s the record of
    /// every member whose entry it adds.
    async fn settle_own_entry(
        &self,
        me: &MemberRecord,
        mut cm: ConfigMap,
        rtt: Duration,
    ) -> Result<Snapshot> {
        let entry = me.enode.to_string();
        let (mut transient, mut stalled) = (0, 0);
        let mut seen: Option<Option<String>> = None;
        for attempt in 1..=self.retry.max_attempts.max(1) {
            let data = cm.data.clone().unwrap_or_default();
            let members = schema::decode(&data, None).members;
            let listed = listed_entries(&data);
            let still_me = members
                .get(&me.pod)
                .is_some_and(|m| m.same_registration(me));
            if !still_me || listed.contains(&entry) {
                return Ok(self.observer.observe(Some(&cm)));
            }
            let value = data.get(schema::STATIC_NODES_KEY).cloned();
            stalled = if seen.as_ref() == Some(&value) {
                stalled + 1
            } else {
                0
            };
            seen = Some(value);
            let leader = members
                .values()
                .filter(|m| !listed.contains(&m.enode.to_string()))
                .map(|m| m.pod.as_str())
                .min();
            let fresh = if leader == Some(me.pod.as_str()) || stalled >= SETTLE_PATIENCE {
                let Some(ops) = static_nodes_ops(&data, &members, &BTreeSet::new()) else {
                    return Ok(self.observer.observe(Some(&cm)));
                };
                match self.store.patch(serde_json::Value::Array(ops)).await {
                    Ok(written) => {
                        cm = written;
                        continue;
                    }
                    Err(e) if is_stale_patch(&e) || Self::may_retry(&e, &mut transient) => {
                        debug!(namespace = %self.observer.namespace, configmap = %self.observer.name,
                               pod = %me.pod, attempt, error = %e,
                               "static-nodes.json changed meanwhile; re-reading");
                        self.back_off("upsert", attempt, &e).await;
                        self.store.get().await
                    }
                    Err(e) => return Err(self.err(e, "patch")),
                }
            } else {
                let wait = rtt.min(SETTLE_WAIT_RTT_CAP) + self.retry.delay(attempt);
                tokio::time::sleep(wait).await;
                let rv = cm.metadata.resource_version.clone().unwrap_or_default();
                self.store.get_not_older_than(&rv).await
            };
            match fresh {
                Ok(Some(latest)) => cm = latest,
                // Deleted: our record with it; the next upsert recreates both.
                Ok(None) => return Ok(Snapshot::default()),
                Err(e) if Self::may_retry(&e, &mut transient) => {
                    self.back_off("upsert", attempt, &e).await;
                }
                Err(e) => return Err(self.err(e, "get")),
            }
        }
        Err(self.exhausted())
    }

    /// After a removal: brings `static-nodes.json` in line with the members
    /// (and legacy entries) of `cm`, the latest object this writer saw, by the
    /// guarded ops of [`static_nodes_ops`], and repeats on the object that
    /// write returns. A failed `test` (or a transient error) means another
    /// writer changed it after our read; we stop there: the removal itself
    /// already took its entries out, and every registrant sees to its own
    /// entry ([`Self::settle_own_entry`]). This only repairs what no
    /// registrant is left to repair (one that died between its two writes, a
    /// third party's edit).
    async fn settle_static_nodes(&self, mut cm: ConfigMap) -> Result<Snapshot> {
        loop {
            let data = cm.data.clone().unwrap_or_default();
            let members = schema::decode(&data, None).members;
            let Some(ops) = static_nodes_ops(&data, &members, &BTreeSet::new()) else {
                return Ok(self.observer.observe(Some(&cm)));
            };
            match self.store.patch(serde_json::Value::Array(ops)).await {
                Ok(written) => cm = written,
                Err(e) if is_stale_patch(&e) || is_transient(&e) => {
                    debug!(namespace = %self.observer.namespace, configmap = %self.observer.name,
                           error = %e, "static-nodes.json not settled after the removal; \
                           registrants settle their own entries");
                    return Ok(self.observer.observe(Some(&cm)));
                }
                Err(e) => return Err(self.err(e, "patch")),
            }
        }
    }

    /// [`WriteProtocol::KeyPatch`] remove: one JSON Patch removing each key
    /// whose stored value is still the one read (a `test` op per key) and
    /// setting `static-nodes.json` without their entries (guarded, see
    /// [`static_nodes_ops`]), then [`Self::settle_static_nodes`].
    async fn patch_remove(&self, expected: &[MemberRecord]) -> Result<Snapshot> {
        let mut transient = 0;
        for attempt in 1..=self.retry.max_attempts.max(1) {
            let Some(cm) = self.read("remove", attempt, &mut transient).await? else {
                continue;
            };
            let snap = self.observer.observe(cm.as_ref());
            let Some(data) = cm.and_then(|cm| cm.data) else {
                return Ok(snap);
            };
            let mut members = snap.members.clone();
            let mut ops = Vec::new();
            for exp in expected {
                let key = schema::member_key(&exp.pod);
                let stored = snap.members.get(&exp.pod);
                if let (Some(value), true) = (
                    data.get(&key),
                    stored.is_some_and(|s| s.same_registration(exp)),
                ) {
                    let path = data_pointer(&key);
                    ops.push(serde_json::json!({ "op": "test", "path": path, "value": value }));
                    ops.push(serde_json::json!({ "op": "remove", "path": path }));
                    members.remove(&exp.pod);
                }
            }
            if ops.is_empty() {
                return Ok(snap);
            }
            ops.extend(static_nodes_ops(&data, &members, &BTreeSet::new()).unwrap_or_default());
            match self.store.patch(serde_json::Value::Array(ops)).await {
                Ok(written) => return self.settle_static_nodes(written).await,
                Err(e) if is_stale_patch(&e) || Self::may_retry(&e, &mut transient) => {
                    self.back_off("remove", attempt, &e).await;
                }
                Err(e) => return Err(self.err(e, "patch")),
            }
        }
        Err(self.exhausted())
    }

    /// [`WriteProtocol::KeyPatch`] remove_legacy: `static-nodes.json` set
    /// without those entries by the guarded ops of [`static_nodes_ops`],
    /// retried until they are gone (no other writer would drop them), then
    /// [`Self::settle_static_nodes`].
    async fn patch_remove_legacy(&self, drop: &BTreeSet<NodeId>) -> Result<Snapshot> {
        let mut transient = 0;
        for attempt in 1..=self.retry.max_attempts.max(1) {
            let Some(cm) = self.read("remove_legacy", attempt, &mut transient).await? else {
                continue;
            };
            let snap = self.observer.observe(cm.as_ref());
            if !drops_any(&snap, drop) {
                return Ok(snap);
            }
            let Some(data) = cm.as_ref().and_then(|cm| cm.data.as_ref()) else {
                return Ok(snap);
            };
            let Some(ops) = static_nodes_ops(data, &snap.members, drop) else {
                return Ok(snap);
            };
            match self.store.patch(serde_json::Value::Array(ops)).await {
                Ok(written) => return self.settle_static_nodes(written).await,
                Err(e) if is_stale_patch(&e) || Self::may_retry(&e, &mut transient) => {
                    self.back_off("remove_legacy", attempt, &e).await;
                }
                Err(e) => return Err(self.err(e, "patch")),
            }
        }
        Err(self.exhausted())
    }

    async fn remove(&self, expected: Vec<MemberRecord>) -> Result<Snapshot> {
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

    async fn remove_legacy(&self, enodes: Vec<Enode>) -> Result<Snapshot> {
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
fn drops_any(snap: &Snapshot, drop: &BTreeSet<NodeId>) -> bool {
    snap.legacy
        .iter()
        .any(|e| drop.contains(&e.node_id()) && !snap.derived.contains(&e.node_id()))
}

/// True when the stored record of `record.pod` is the same registration with
/// the same sidecar version: an upsert keeps it as stored (no write).
fn keeps(snap: &Snapshot, record: &MemberRecord) -> bool {
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

/// The [`PeerRegistry`] kept in one ConfigMap (schema: [`crate::schema`]).
///
/// Reads are a GET of the one named object (never a list of the namespace).
/// Writes follow the [`WriteProtocol`]: by default a replace carrying the
/// resourceVersion they were computed from (a true compare-and-swap); with
/// [`WriteProtocol::KeyPatch`] a JSON Patch of the member's own key guarded by
/// a `test` of the value read (no conflicts between members), then the derived
/// `static-nodes.json` only when it differs. Both retry per [`RetryPolicy`]; a missing ConfigMap
/// is created (losing the creation race is normal). When nothing changes
/// nothing is written.
///
/// ```no_run
/// use peer_registry::{ConfigMapRegistry, PeerRegistry, DEFAULT_NAME};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let client = kube::Client::try_default().await?;
/// let registry = ConfigMapRegistry::new(client, "chain", DEFAULT_NAME);
/// let snap = registry.snapshot().await?;
/// for (pod, member) in &snap.members {
///     println!("{pod}: {}", member.enode);
/// }
/// # Ok(()) }
/// ```
pub struct ConfigMapRegistry {
    api: Api<ConfigMap>,
    core: Core<KubeStore>,
}

impl ConfigMapRegistry {
    /// A registry in ConfigMap `name` of `namespace`, with the default
    /// [`RetryPolicy`].
    pub fn new(client: Client, namespace: impl Into<String>, name: impl Into<String>) -> Self {
        let namespace = namespace.into();
        let name = name.into();
        let api: Api<ConfigMap> = Api::namespaced(client, &namespace);
        Self {
            core: Core {
                store: KubeStore {
                    api: api.clone(),
                    name: name.clone(),
                },
                retry: RetryPolicy::default(),
                protocol: WriteProtocol::default(),
                observer: Arc::new(Observer {
                    namespace,
                    name,
                    above_warn: AtomicBool::new(false),
                    problems: Mutex::new(Vec::new()),
                }),
            },
            api,
        }
    }

    /// Replaces the retry policy.
    #[must_use]
    pub fn with_retry_policy(mut self, retry: RetryPolicy) -> Self {
        self.core.retry = retry;
        self
    }

    /// Replaces the write protocol ([`WriteProtocol::WholeObjectCas`] by default).
    #[must_use]
    pub fn with_write_protocol(mut self, protocol: WriteProtocol) -> Self {
        self.core.protocol = protocol;
        self
    }

    /// The retry policy in force.
    pub fn retry_policy(&self) -> RetryPolicy {
        self.core.retry
    }

    /// The ConfigMap's namespace.
    pub fn namespace(&self) -> &str {
        &self.core.observer.namespace
    }

    /// The ConfigMap's name.
    pub fn name(&self) -> &str {
        &self.core.observer.name
    }
}

/// What the lease layout ([`crate::LeaseRegistry`]) uses of the ConfigMap.
impl ConfigMapRegistry {
    /// The object as stored (a GET), `None` when missing.
    pub(crate) async fn object(&self) -> Result<Option<ConfigMap>> {
        self.core
            .store
            .get()
            .await
            .map_err(|e| self.core.err(e, "get"))
    }

    /// Decodes an object (or its absence), logging what is new.
    pub(crate) fn observe(&self, cm: Option<&ConfigMap>) -> Snapshot {
        self.core.observer.observe(cm)
    }

    /// See [`Core::rewrite_data`].
    pub(crate) async fn rewrite_data<F>(
        &self,
        op: &'static str,
        change: F,
    ) -> Result<Option<ConfigMap>>
    where
        F: FnMut(&BTreeMap<String, String>, bool) -> Option<BTreeMap<String, String>> + Send,
    {
        self.core.rewrite_data(op, change).await
    }

    /// Replaces the retry policy in place.
    pub(crate) fn set_retry_policy(&mut self, retry: RetryPolicy) {
        self.core.retry = retry;
    }

    /// The API of the namespace's ConfigMaps.
    pub(crate) fn api(&self) -> &Api<ConfigMap> {
        &self.api
    }
}

impl std::fmt::Debug for ConfigMapRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigMapRegistry")
            .field("namespace", &self.namespace())
            .field("name", &self.name())
            .field("retry", &self.core.retry)
            .field("protocol", &self.core.protocol)
            .finish()
    }
}

/// Turns watcher events for the one object into snapshots, dropping repeats.
#[derive(Default)]
struct WatchState {
    /// The object seen during a (re-)list, until `InitDone`.
    listed: Option<ConfigMap>,
    /// The resourceVersion of the last snapshot emitted (`Some(None)`: absent).
    last: Option<Option<String>>,
}

impl WatchState {
    fn on_event(
        &mut self,
        event: watcher::Event<ConfigMap>,
        observer: &Observer,
    ) -> Option<Snapshot> {
        let snap = match event {
            watcher::Event::Init => {
                self.listed = None;
                return None;
            }
            watcher::Event::InitApply(cm) => {
                if cm.metadata.name.as_deref() == Some(observer.name.as_str()) {
                    self.listed = Some(cm);
                }
                return None;
            }
            watcher::Event::InitDone => observer.observe(self.listed.take().as_ref()),
            watcher::Event::Apply(cm) => {
                if cm.metadata.name.as_deref() != Some(observer.name.as_str()) {
                    return None;
                }
                observer.observe(Some(&cm))
            }
            watcher::Event::Delete(cm) => {
                if cm.metadata.name.as_deref() != Some(observer.name.as_str()) {
                    return None;
                }
                info!(namespace = %observer.namespace, configmap = %observer.name,
                      "the registry configmap was deleted; it is recreated on the next registration");
                Snapshot::default()
            }
        };
        if self.last.as_ref() == Some(&snap.resource_version) {
            return None;
        }
        self.last = Some(snap.resource_version.clone());
        Some(snap)
    }
}

#[async_trait::async_trait]
impl PeerRegistry for ConfigMapRegistry {
    async fn snapshot(&self) -> Result<Snapshot> {
        self.core.snapshot().await
    }

    async fn upsert(&self, record: MemberRecord) -> Result<Snapshot> {
        self.core.upsert(record).await
    }

    async fn remove(&self, expected: Vec<MemberRecord>) -> Result<Snapshot> {
        self.core.remove(expected).await
    }

    async fn remove_legacy(&self, enodes: Vec<Enode>) -> Result<Snapshot> {
        self.core.remove_legacy(enodes).await
    }

    fn watch(&self) -> BoxStream<'static, Result<Snapshot>> {
        let observer = Arc::clone(&self.core.observer);
        let config = watcher::Config::default().fields(&format!("metadata.name={}", observer.name));
        let mut state = WatchState::default();
        watcher(self.api.clone(), config)
            .default_backoff()
            .filter_map(move |event| {
                let item = match event {
                    Ok(event) => state.on_event(event, &observer).map(Ok),
                    Err(e) => {
                        let e = Error::from_watcher(e, &observer.namespace, &observer.name);
                        debug!(error = %e, "registry watch error; the watcher retries with backoff");
                        Some(Err(e))
                    }
                };
                futures::future::ready(item)
            })
            .boxed()
    }
}

#[cfg(any(test, feature = "test-utils"))]
pub(crate) mod memory;
#[cfg(test)]
mod tests;
