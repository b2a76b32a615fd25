//! [`MemoryRegistry`]: the ConfigMap implementation's write core (both
//! [`WriteProtocol`]s) over an in-memory object store ([`MemoryStore`]) with
//! apiserver semantics, JSON Patch included.

use std::collections::VecDeque;
use std::sync::PoisonError;

use futures::StreamExt;
use kube::core::Status;
use tokio::sync::watch;

use super::store::Store;
use super::*;

/// A third party's action on the stored object before a write; true when it
/// changed it.
pub(crate) type Meddle = Box<dyn FnMut(&mut Option<ConfigMap>) -> bool + Send>;

/// The store's state: the object, counters, injected faults.
pub(crate) struct MemoryState {
    pub(crate) cm: Option<ConfigMap>,
    pub(crate) rv: u64,
    pub(crate) gets: u32,
    pub(crate) writes: u32,
    /// Of those, JSON Patches.
    pub(crate) patches: u32,
    /// Whole-object replaces attempted (the CAS path).
    pub(crate) replaces: u32,
    pub(crate) conflicts: u32,
    /// Errors returned by the next write calls, in order.
    pub(crate) fail_writes: VecDeque<kube::Error>,
    /// Errors returned by the next get calls, in order.
    pub(crate) fail_gets: VecDeque<kube::Error>,
    /// Why each refused JSON Patch was refused (the op that failed).
    pub(crate) patch_failures: Vec<String>,
    /// Run before each write is applied: a third party acting in between.
    pub(crate) meddle: Option<Meddle>,
    /// Run before each read is answered: a third party acting in between.
    pub(crate) meddle_get: Option<Meddle>,
    /// Every change of the object, for watchers.
    changes: watch::Sender<Option<ConfigMap>>,
}

impl Default for MemoryState {
    fn default() -> Self {
        Self {
            cm: None,
            rv: 0,
            gets: 0,
            writes: 0,
            patches: 0,
            replaces: 0,
            conflicts: 0,
            fail_writes: VecDeque::new(),
            fail_gets: VecDeque::new(),
            patch_failures: Vec::new(),
            meddle: None,
            meddle_get: None,
            changes: watch::Sender::new(None),
        }
    }
}

/// An in-memory ConfigMap API for one object, with the apiserver's semantics:
/// the resourceVersion goes up at every write, a replace is conditional on it
/// (409 Conflict), a create of an existing object is 409 AlreadyExists, a replace
/// or patch of a missing one 404. A JSON Patch (the `test`, `add`, `replace` and
/// `remove` ops on `/data/<key>`, the only ones the registry sends) is applied
/// to the latest object, all or nothing; a failed op is 422. Clones share the
/// object.
///
/// Besides the registry's own writes, a test can act as a third party
/// ([`MemoryStore::edit`], [`MemoryStore::delete`]) and inject failures
/// ([`MemoryStore::fail_next_write`], [`MemoryStore::fail_next_get`]).
#[derive(Clone, Default)]
pub struct MemoryStore(Arc<Mutex<MemoryState>>);

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.state();
        f.debug_struct("MemoryStore")
            .field("exists", &s.cm.is_some())
            .field("resource_version", &s.rv)
            .field("writes", &s.writes)
            .field("conflicts", &s.conflicts)
            .finish_non_exhaustive()
    }
}

impl MemoryStore {
    /// An empty store: the registry object does not exist yet.
    pub fn new() -> Self {
        Self::default()
    }

    pub(crate) fn state(&self) -> std::sync::MutexGuard<'_, MemoryState> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An apiserver error with this HTTP code and reason, e.g.
    /// `MemoryStore::api_error(403, "Forbidden")`, to inject.
    pub fn api_error(code: u16, reason: &str) -> kube::Error {
        kube::Error::Api(Status::failure("injected", reason).with_code(code).boxed())
    }

    /// Successful writes (creates, replaces and patches) so far.
    pub fn writes(&self) -> u32 {
        self.state().writes
    }

    /// Writes refused with a conflict so far (409, or 422 for a JSON Patch
    /// whose `test` failed).
    pub fn conflicts(&self) -> u32 {
        self.state().conflicts
    }

    /// Reads so far.
    pub fn gets(&self) -> u32 {
        self.state().gets
    }

    /// The stored object, if it exists.
    pub fn object(&self) -> Option<ConfigMap> {
        self.state().cm.clone()
    }

    /// The stored `data` (empty when the object is missing).
    pub fn data(&self) -> BTreeMap<String, String> {
        self.state()
            .cm
            .as_ref()
            .and_then(|c| c.data.clone())
            .unwrap_or_default()
    }

    /// A third-party edit of the object (`kubectl edit`), creating it if missing:
    /// bumps the resourceVersion, so a registry write computed before it
    /// conflicts and is retried.
    pub fn edit_object(&self, f: impl FnOnce(&mut ConfigMap)) {
        let mut s = self.state();
        s.rv += 1;
        let rv = s.rv;
        let cm = s.cm.get_or_insert_with(ConfigMap::default);
        f(cm);
        cm.metadata.resource_version = Some(rv.to_string());
        s.notify();
    }

    /// A third-party edit of the object's `data`; see [`MemoryStore::edit_object`].
    pub fn edit(&self, f: impl FnOnce(&mut BTreeMap<String, String>)) {
        self.edit_object(|cm| f(cm.data.get_or_insert_with(BTreeMap::new)));
    }

    /// A third party deletes the object (the next registration recreates it).
    pub fn delete(&self) {
        let mut s = self.state();
        if s.cm.take().is_some() {
            s.notify();
        }
    }

    /// The next write (create or replace) fails with `err`; queued in order.
    pub fn fail_next_write(&self, err: kube::Error) {
        self.state().fail_writes.push_back(err);
    }

    /// The next read fails with `err`; queued in order.
    pub fn fail_next_get(&self, err: kube::Error) {
        self.state().fail_gets.push_back(err);
    }

    /// The write core over this store, with this retry policy and key patches
    /// (what most of the write tests exercise; CAS ones use `core_with`).
    #[cfg(test)]
    pub(super) fn core(&self, retry: RetryPolicy) -> Core<MemoryStore> {
        self.core_with(retry, WriteProtocol::KeyPatch)
    }

    /// The write core over this store, with this retry policy and protocol.
    pub(super) fn core_with(
        &self,
        retry: RetryPolicy,
        protocol: WriteProtocol,
    ) -> Core<MemoryStore> {
        Core {
            store: self.clone(),
            retry,
            protocol,
            observer: Arc::new(Observer {
                namespace: "memory".into(),
                name: DEFAULT_NAME.into(),
                above_warn: AtomicBool::new(false),
                problems: Mutex::new(Vec::new()),
            }),
        }
    }

    fn write(&self, cm: &ConfigMap, create: bool) -> Result<ConfigMap, kube::Error> {
        let mut s = self.state();
        if let Some(e) = s.fail_writes.pop_front() {
            return Err(e);
        }
        s.run_meddle();
        match (&s.cm, create) {
            (Some(_), true) => {
                s.conflicts += 1;
                return Err(Self::api_error(409, "AlreadyExists"));
            }
            (None, false) => return Err(Self::api_error(404, "NotFound")),
            (Some(cur), false) if cur.metadata.resource_version != cm.metadata.resource_version => {
                s.conflicts += 1;
                return Err(Self::api_error(409, "Conflict"));
            }
            _ => {}
        }
        if create && cm.metadata.resource_version.is_some() {
            return Err(Self::api_error(400, "BadRequest"));
        }
        s.rv += 1;
        s.writes += 1;
        let mut stored = cm.clone();
        stored.metadata.resource_version = Some(s.rv.to_string());
        s.cm = Some(stored.clone());
        s.notify();
        Ok(stored)
    }

    fn patch(&self, ops: &serde_json::Value) -> Result<ConfigMap, kube::Error> {
        let mut s = self.state();
        if let Some(e) = s.fail_writes.pop_front() {
            return Err(e);
        }
        s.run_meddle();
        let Some(mut cm) = s.cm.clone() else {
            return Err(Self::api_error(404, "NotFound"));
        };
        if let Err(e) = apply_json_patch(&mut cm, ops) {
            s.conflicts += 1;
            s.patch_failures.push(e);
            return Err(Self::api_error(422, "Invalid"));
        }
        s.rv += 1;
        s.writes += 1;
        s.patches += 1;
        cm.metadata.resource_version = Some(s.rv.to_string());
        s.cm = Some(cm.clone());
        s.notify();
        Ok(cm)
    }
}

/// Applies JSON Patch `ops` (RFC 6902) to `cm` as the apiserver does: all or
/// nothing. Only what the registry sends is modelled: `test`, `add`,
/// `replace` and `remove` of string values at `/data/<key>` (RFC 6901
/// escaping); anything else fails. The error names the failed op.
fn apply_json_patch(cm: &mut ConfigMap, ops: &serde_json::Value) -> Result<(), String> {
    // The parent of `/data/<key>` must exist, as on the server.
    let mut data = cm.data.clone().ok_or("no /data")?;
    for op in ops.as_array().ok_or("not an array")? {
        let path = op["path"].as_str().ok_or("no path")?;
        let key = path.strip_prefix("/data/").ok_or("not under /data")?;
        if key.contains('/') {
            return Err(format!("{op}: not a data key"));
        }
        let key = key.replace("~1", "/").replace("~0", "~");
        let value = op["value"].as_str().map(str::to_owned);
        match op["op"].as_str() {
            Some("test") if value.is_some() && data.get(&key) == value.as_ref() => {}
            // `add` of an existing member replaces it (RFC 6902, 4.1).
            Some("add") => {
                data.insert(key, value.ok_or("no value")?);
            }
            Some("replace") if data.contains_key(&key) => {
                data.insert(key, value.ok_or("no value")?);
            }
            Some("remove") if data.remove(&key).is_some() => {}
            _ => return Err(format!("{op} failed")),
        }
    }
    cm.data = Some(data);
    Ok(())
}

impl MemoryState {
    fn notify(&self) {
        self.changes.send_replace(self.cm.clone());
    }

    /// A third party acting just before a write is applied.
    fn run_meddle(&mut self) {
        let mut meddle = self.meddle.take();
        if let Some(m) = meddle.as_mut() {
            self.meddled(m);
        }
        self.meddle = meddle;
    }

    /// A third party acting just before a read is answered.
    fn run_meddle_get(&mut self) {
        let mut meddle = self.meddle_get.take();
        if let Some(m) = meddle.as_mut() {
            self.meddled(m);
        }
        self.meddle_get = meddle;
    }

    fn meddled(&mut self, m: &mut Meddle) {
        if m(&mut self.cm) {
            self.rv += 1;
            let rv = self.rv.to_string();
            if let Some(c) = self.cm.as_mut() {
                c.metadata.resource_version = Some(rv);
            }
            self.notify();
        }
    }
}

#[async_trait::async_trait]
impl Store for MemoryStore {
    async fn get(&self) -> Result<Option<ConfigMap>, kube::Error> {
        tokio::task::yield_now().await;
        let r = {
            let mut s = self.state();
            s.gets += 1;
            s.run_meddle_get();
            match s.fail_gets.pop_front() {
                Some(e) => Err(e),
                None => Ok(s.cm.clone()),
            }
        };
        // Let others interleave between the read and the write.
        tokio::task::yield_now().await;
        r
    }

    /// The store is its own watch cache: always the latest.
    async fn get_not_older_than(&self, _rv: &str) -> Result<Option<ConfigMap>, kube::Error> {
        Store::get(self).await
    }

    async fn create(&self, cm: &ConfigMap) -> Result<ConfigMap, kube::Error> {
        tokio::task::yield_now().await;
        self.write(cm, true)
    }

    async fn replace(&self, cm: &ConfigMap) -> Result<ConfigMap, kube::Error> {
        tokio::task::yield_now().await;
        self.state().replaces += 1;
        self.write(cm, false)
    }

    async fn patch(&self, ops: serde_json::Value) -> Result<ConfigMap, kube::Error> {
        tokio::task::yield_now().await;
        self.patch(&ops)
    }
}

/// A [`PeerRegistry`] in memory with exactly the [`ConfigMapRegistry`]'s
/// semantics: the same write code (JSON Patch per member by default,
/// [`WriteProtocol::WholeObjectCas`] on request) runs over a [`MemoryStore`]
/// instead of the apiserver, so conflicts, retries, creation races, third-party edits and
/// deletion, unknown keys, legacy `static-nodes.json` entries and garbage records
/// behave as they do on Kubernetes.
///
/// Several registries on one store ([`MemoryRegistry::on`]) are several sidecars
/// sharing one ConfigMap. [`PeerRegistry::watch`] yields the current snapshot,
/// then one per change of the object; like a Kubernetes watch that falls behind,
/// a slow reader sees only the latest of several quick changes. It ends only when
/// every handle on the store is dropped.
///
/// The retry policy defaults to [`MemoryRegistry::FAST_RETRY`] (sub-millisecond
/// backoff), not the ConfigMap's default.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use futures::StreamExt;
/// use peer_registry::{MemberRecord, MemoryRegistry, MemoryStore, PeerRegistry};
///
/// let store = MemoryStore::new();
/// let (one, two) = (MemoryRegistry::on(&store), MemoryRegistry::on(&store));
/// let mut changes = two.watch();
/// assert!(!changes.next().await.unwrap()?.exists());
///
/// let enode = geth_ipc::fake::test_enode(1, "10.0.0.1".parse()?, 30303)?;
/// let now = jiff::Timestamp::now();
/// let record = MemberRecord {
///     pod: "geth-0".into(), node_id: enode.node_id(), enode, pod_uid: None,
///     pod_ip: None, registered_at: now, updated_at: now, sidecar_version: "1".into(),
/// };
/// one.upsert(record).await?;
/// assert!(changes.next().await.unwrap()?.members.contains_key("geth-0"));
///
/// // A third party edits the ConfigMap: unknown keys survive registry writes.
/// store.edit(|data| { data.insert("operator-note".into(), "hi".into()); });
/// assert_eq!(two.snapshot().await?.members.len(), 1);
/// assert_eq!(store.data()["operator-note"], "hi");
///
/// // Injected apiserver failures.
/// store.fail_next_get(MemoryStore::api_error(403, "Forbidden"));
/// assert!(two.snapshot().await.is_err());
/// # Ok(()) }
/// ```
pub struct MemoryRegistry {
    store: MemoryStore,
    core: Core<MemoryStore>,
}

impl MemoryRegistry {
    /// The default retry policy here: 200 attempts, 100 µs base, 5 ms cap.
    pub const FAST_RETRY: RetryPolicy = RetryPolicy {
        max_attempts: 200,
        base_delay: Duration::from_micros(100),
        max_delay: Duration::from_millis(5),
    };

    /// A registry on a new, empty store.
    pub fn new() -> Self {
        Self::on(&MemoryStore::new())
    }

    /// A registry on `store`, shared with every other registry on it.
    pub fn on(store: &MemoryStore) -> Self {
        Self {
            store: store.clone(),
            core: store.core_with(Self::FAST_RETRY, WriteProtocol::default()),
        }
    }

    /// Replaces the retry policy.
    #[must_use]
    pub fn with_retry_policy(mut self, retry: RetryPolicy) -> Self {
        self.core.retry = retry;
        self
    }

    /// Replaces the write protocol ([`WriteProtocol::KeyPatch`] by default,
    /// as for [`ConfigMapRegistry`]).
    #[must_use]
    pub fn with_write_protocol(mut self, protocol: WriteProtocol) -> Self {
        self.core.protocol = protocol;
        self
    }

    /// The store: for third-party edits, fault injection and counters.
    pub fn store(&self) -> &MemoryStore {
        &self.store
    }
}

impl Default for MemoryRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for MemoryRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryRegistry")
            .field("store", &self.store)
            .field("retry", &self.core.retry)
            .field("protocol", &self.core.protocol)
            .finish()
    }
}

#[async_trait::async_trait]
impl PeerRegistry for MemoryRegistry {
    async fn snapshot(&self) -> Result<Snapshot> {
        self.core.snapshot().await
    }

    async fn upsert(&self, record: MemberRecord) -> Result<Snapshot> {
        self.core.upsert(record).await
    }

    async fn create(&self, record: MemberRecord) -> Result<Option<Snapshot>> {
        self.core.create(record).await
    }

    async fn remove(&self, expected: Vec<MemberRecord>) -> Result<Snapshot> {
        self.core.remove(expected).await
    }

    async fn remove_legacy(&self, enodes: Vec<Enode>) -> Result<Snapshot> {
        self.core.remove_legacy(enodes).await
    }

    fn watch(&self) -> BoxStream<'static, Result<Snapshot>> {
        let mut rx = self.store.state().changes.subscribe();
        rx.mark_changed();
        let observer = Arc::clone(&self.core.observer);
        let mut last: Option<Option<String>> = None;
        futures::stream::unfold(rx, |mut rx| async move {
            rx.changed().await.ok()?;
            let cm = rx.borrow_and_update().clone();
            Some((cm, rx))
        })
        .filter_map(move |cm| {
            let snap = observer.observe(cm.as_ref());
            let item = if last.as_ref() == Some(&snap.resource_version) {
                None
            } else {
                last = Some(snap.resource_version.clone());
                Some(Ok(snap))
            };
            futures::future::ready(item)
        })
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::WriteProtocol;
    use crate::conformance::{self, MemoryHarness};

    const PROTOCOLS: [WriteProtocol; 2] = [WriteProtocol::KeyPatch, WriteProtocol::WholeObjectCas];

    #[tokio::test]
    async fn conformance_concurrent_registrants_none_lost() {
        for protocol in PROTOCOLS {
            let h = MemoryHarness::with_protocol(protocol);
            conformance::concurrent_registrants_none_lost(&h, 30)
                .await
                .unwrap_or_else(|e| panic!("{protocol:?}: {e}"));
            assert!(
                h.store.conflicts() > 0,
                "{protocol:?}: the check must exercise conflicts"
            );
        }
    }

    #[tokio::test]
    async fn conformance_conditional_removal_keeps_a_re_registered_member() {
        for protocol in PROTOCOLS {
            conformance::conditional_removal_keeps_a_re_registered_member(
                &MemoryHarness::with_protocol(protocol),
            )
            .await
            .unwrap_or_else(|e| panic!("{protocol:?}: {e}"));
        }
    }

    #[tokio::test]
    async fn conformance_unknown_keys_are_preserved() {
        for protocol in PROTOCOLS {
            conformance::unknown_keys_are_preserved(&MemoryHarness::with_protocol(protocol))
                .await
                .unwrap_or_else(|e| panic!("{protocol:?}: {e}"));
        }
    }

    #[tokio::test]
    async fn conformance_legacy_entries_are_preserved() {
        for protocol in PROTOCOLS {
            conformance::legacy_entries_are_preserved(&MemoryHarness::with_protocol(protocol))
                .await
                .unwrap_or_else(|e| panic!("{protocol:?}: {e}"));
        }
    }

    #[tokio::test]
    async fn conformance_watch_sees_changes() {
        for protocol in PROTOCOLS {
            conformance::watch_sees_changes(
                &MemoryHarness::with_protocol(protocol),
                Duration::from_secs(5),
            )
            .await
            .unwrap_or_else(|e| panic!("{protocol:?}: {e}"));
        }
    }

    #[tokio::test]
    async fn conformance_run_all() {
        for protocol in PROTOCOLS {
            conformance::run_all(|| async { Ok(MemoryHarness::with_protocol(protocol)) })
                .await
                .unwrap_or_else(|e| panic!("{protocol:?}: {e}"));
        }
    }

    /// The default is the ConfigMap registry's: whole-object CAS, no JSON Patch.
    #[tokio::test]
    async fn default_protocol_is_the_whole_object_cas() {
        let h = MemoryHarness::new();
        assert_eq!(h.protocol, WriteProtocol::WholeObjectCas);
        conformance::concurrent_registrants_none_lost(&h, 10)
            .await
            .unwrap();
        assert_eq!(h.store.state().patches, 0, "no JSON Patch under CAS");
    }

    /// Key patches: the store applies them as JSON Patch.
    #[tokio::test]
    async fn key_patch_clients_write_json_patches() {
        let h = MemoryHarness::with_protocol(WriteProtocol::KeyPatch);
        conformance::concurrent_registrants_none_lost(&h, 10)
            .await
            .unwrap();
        assert!(
            h.store.state().patches >= 10,
            "one JSON Patch per member at least"
        );
    }
}
