//! The [`WriteProtocol::KeyPatch`] writes: a member's own key set or removed
//! by a JSON Patch guarded by a `test` of the value read, then
//! `static-nodes.json` brought in line by guarded ops
//! ([`static_nodes_ops`]), with one settling leader in a burst
//! ([`Core::settle_own_entry`]). Creating a missing object goes through the
//! CAS path (`cas`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use geth_ipc::NodeId;
use k8s_openapi::api::core::v1::ConfigMap;
use tracing::debug;

use super::cas::{Core, drops_any, is_transient, keeps};
use super::store::{Store, object_size};
use crate::error::{Error, Result};
use crate::record::{MemberRecord, Snapshot};
use crate::schema;

// Names the doc links use.
#[cfg(doc)]
use super::{RetryPolicy, WriteProtocol};

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
pub(super) fn derived_static_nodes(
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

impl<S: Store> Core<S> {
    /// [`WriteProtocol::KeyPatch`] upsert: one JSON Patch of the member's own
    /// key (guarded by a `test` of the value read), then
    /// [`Self::settle_own_entry`]. Only when the record replaced answered
    /// to a node id the new one does not (a new node key) is
    /// `static-nodes.json` set in the same patch (guarded, see
    /// [`static_nodes_ops`]), so the old entry cannot pass for a legacy one.
    pub(super) async fn patch_upsert(&self, record: &MemberRecord) -> Result<Snapshot> {
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
    pub(super) async fn settle_own_entry(
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
    pub(super) async fn settle_static_nodes(&self, mut cm: ConfigMap) -> Result<Snapshot> {
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
    pub(super) async fn patch_remove(&self, expected: &[MemberRecord]) -> Result<Snapshot> {
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
    pub(super) async fn patch_remove_legacy(&self, drop: &BTreeSet<NodeId>) -> Result<Snapshot> {
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
}
