//! The lease layout: one Kubernetes Lease per member, `static-nodes.json`
//! derived into the shared ConfigMap.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use geth_ipc::{Enode, NodeId};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{DeleteParams, ListParams, ObjectMeta, PostParams, Preconditions};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tracing::{debug, info, warn};

use crate::configmap::{ConfigMapRegistry, RetryPolicy, is_transient, validate};
use crate::error::{Error, Result};
use crate::record::{MemberRecord, Snapshot};
use crate::registry::PeerRegistry;
use crate::schema;

/// The annotation of a member Lease that holds its [`MemberRecord`] (JSON).
pub const MEMBER_ANNOTATION: &str = "geth-peer-sidecar.io/member";
/// The label of a member Lease whose value is the registry's (the shared
/// ConfigMap's) name: the watch's selector.
pub const REGISTRY_LABEL: &str = "geth-peer-sidecar.io/registry";

/// How long the publisher waits for more changes before it writes.
const PUBLISH_DEBOUNCE: Duration = Duration::from_millis(100);
/// How much longer each publisher waits per member whose pod name sorts
/// before its own: the first publishes, the others only if it did not.
const PUBLISH_STEP: Duration = Duration::from_secs(2);
/// Transient errors (429, 5xx, a refused connection) one call retries
/// before it gives up.
const TRANSIENT_RETRIES: u32 = 8;
/// The publisher's backoff between failed writes of `static-nodes.json`
/// (full jitter, doubling from 1 s to 30 s; it retries until the write lands
/// or a newer change replaces it).
const PUBLISH_RETRY: RetryPolicy = RetryPolicy {
    max_attempts: u32::MAX,
    base_delay: Duration::from_secs(1),
    max_delay: Duration::from_secs(30),
};

/// The [`PeerRegistry`] kept as one `coordination.k8s.io/v1` Lease per
/// member (the *lease layout*, opt-in): a registration is one create of the
/// member's own object, so concurrent registrants never conflict (the
/// ConfigMap layout's compare-and-swap on one object costs O(N) writes per
/// member in a burst; see the crate README for both, measured).
///
/// - The Lease `<configmap>.<pod>` holds the record in the annotation
///   [`MEMBER_ANNOTATION`], is labelled [`REGISTRY_LABEL`]`=<configmap>`, and
///   has an ownerReference to its Pod (when the record has the pod UID), so
///   the garbage collector deletes a deleted pod's Lease.
/// - A removal is a delete with the resourceVersion read as precondition,
///   only when the stored record is the same registration.
/// - The shared ConfigMap keeps `static-nodes.json` (derived, see
///   [`schema::encode_lease_members`]) and `external-peers.json`. A
///   registry built [`publishing_as`](Self::publishing_as) a pod derives it
///   while its [`watch`](PeerRegistry::watch) runs: the member whose pod name
///   sorts first writes it 100 ms after the last change, the next one 2 s
///   later if it is still stale, and so on.
/// - `member.*` records in the ConfigMap (a fleet switching from the
///   ConfigMap layout) are members too, a Lease of the same pod winning; a
///   pod's upsert removes its own.
///
/// RBAC: get, list, watch, create, update and delete on `leases`, on top of
/// the ConfigMap layout's rules.
///
/// ```no_run
/// use peer_registry::{LeaseRegistry, PeerRegistry, DEFAULT_NAME};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let client = kube::Client::try_default().await?;
/// let registry = LeaseRegistry::new(client, "chain", DEFAULT_NAME).publishing_as("geth-0");
/// for (pod, member) in &registry.snapshot().await?.members {
///     println!("{pod}: {}", member.enode);
/// }
/// # Ok(()) }
/// ```
pub struct LeaseRegistry {
    api: Api<Lease>,
    configmap: Arc<ConfigMapRegistry>,
    publisher: Option<String>,
    view: Arc<Mutex<View>>,
    /// Which [`PeerRegistry::watch`] stream keeps `view` (the latest).
    generation: Arc<AtomicU64>,
    /// Set after the first upsert: later ones read the Lease before writing.
    registered: AtomicBool,
}

/// What the latest watch has seen: the Leases, the ConfigMap.
#[derive(Clone, Debug, Default)]
struct View {
    /// Both watches have listed.
    synced: bool,
    /// Filled by a [`PeerRegistry::snapshot`] read, not (yet) by a watch.
    read: bool,
    /// The member Leases by name, each decoded once, as it arrives.
    leases: BTreeMap<String, Decoded>,
    configmap: Option<ConfigMap>,
    /// The largest resourceVersion seen (etcd's revision: one counter).
    revision: u64,
}

/// A Lease's member record, or what is wrong with it.
type Decoded = std::result::Result<MemberRecord, String>;

impl View {
    /// Takes in one Lease of registry `registry`.
    fn put(&mut self, registry: &str, lease: &Lease) {
        self.revision = self.revision.max(revision(&lease.metadata));
        if let Some(name) = &lease.metadata.name {
            self.leases
                .insert(name.clone(), decode_lease(registry, lease));
        }
    }

    /// The members (by pod), and what was wrong with the other Leases.
    fn members(&self) -> (BTreeMap<String, MemberRecord>, Vec<String>) {
        let (mut members, mut problems) = (BTreeMap::new(), Vec::new());
        for decoded in self.leases.values() {
            match decoded {
                Ok(rec) => {
                    members.insert(rec.pod.clone(), rec.clone());
                }
                Err(p) => problems.push(p.clone()),
            }
        }
        (members, problems)
    }
}

fn lock(view: &Mutex<View>) -> MutexGuard<'_, View> {
    view.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn revision(meta: &ObjectMeta) -> u64 {
    meta.resource_version
        .as_deref()
        .and_then(|rv| rv.parse().ok())
        .unwrap_or(0)
}

/// The member record a Lease holds, or what is wrong with it.
fn decode_lease(registry: &str, lease: &Lease) -> Decoded {
    let name = lease.metadata.name.as_deref().unwrap_or_default();
    let raw = lease
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(MEMBER_ANNOTATION))
        .ok_or_else(|| format!("lease {name:?}: no {MEMBER_ANNOTATION} annotation; skipped"))?;
    let rec: MemberRecord = serde_json::from_str(raw).map_err(|e| {
        format!(
            "lease {name:?}: annotation {MEMBER_ANNOTATION} is not a member record ({e}); \
             skipped (its pod rewrites it when it registers again; delete the lease if the pod \
             is gone)"
        )
    })?;
    if name != lease_name(registry, &rec.pod) {
        return Err(format!(
            "lease {name:?}: holds the record of pod {:?}, whose lease is {:?}; skipped",
            rec.pod,
            lease_name(registry, &rec.pod)
        ));
    }
    if rec.node_id != rec.enode.node_id() {
        return Err(format!(
            "lease {name:?}: nodeId {} is not the enode's node id {}; skipped",
            rec.node_id,
            rec.enode.node_id()
        ));
    }
    Ok(rec)
}

/// The name of pod `pod`'s Lease in registry `registry`.
pub fn lease_name(registry: &str, pod: &str) -> String {
    format!("{registry}.{pod}")
}

/// The label selector of the member Leases of registry `registry`.
pub fn lease_selector(registry: &str) -> String {
    format!("{REGISTRY_LABEL}={registry}")
}

/// Aborts the task it holds when dropped or replaced.
#[derive(Default)]
struct Pending(Option<tokio::task::JoinHandle<()>>);

impl Pending {
    fn set(&mut self, handle: Option<tokio::task::JoinHandle<()>>) {
        if let Some(old) = std::mem::replace(&mut self.0, handle) {
            old.abort();
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.set(None);
    }
}

/// One watch event, of either object kind.
enum Event {
    Lease(std::result::Result<watcher::Event<Lease>, watcher::Error>),
    ConfigMap(std::result::Result<watcher::Event<ConfigMap>, watcher::Error>),
}

/// The state of one [`PeerRegistry::watch`] stream.
struct WatchState {
    shared: Shared,
    generation: u64,
    view: View,
    leases_listed: Option<BTreeMap<String, Decoded>>,
    configmap_listed: Option<Option<ConfigMap>>,
    leases_synced: bool,
    configmap_synced: bool,
    publish: Pending,
}

/// What a watch stream and the publisher share with the registry.
#[derive(Clone)]
struct Shared {
    configmap: Arc<ConfigMapRegistry>,
    publisher: Option<String>,
    view: Arc<Mutex<View>>,
    generation: Arc<AtomicU64>,
}

/// The snapshot of some Leases and the ConfigMap.
fn snapshot_of(configmap: &ConfigMapRegistry, view: &View) -> Snapshot {
    let mut snap = configmap.observe(view.configmap.as_ref());
    let (leases, problems) = view.members();
    let data = view
        .configmap
        .as_ref()
        .and_then(|c| c.data.clone())
        .unwrap_or_default();
    let listed = schema::lease_members_listed(&data);
    let ids: Vec<NodeId> = leases
        .values()
        .flat_map(|m| [m.node_id, m.enode.node_id()])
        .collect();
    snap.legacy
        .retain(|e| !listed.contains(&e.node_id()) && !ids.contains(&e.node_id()));
    // Here the derived entries are the Leases' members (or entries of Leases
    // deleted since, which the publisher drops): none is a legacy entry.
    snap.derived.clear();
    snap.members.extend(leases);
    snap.problems.extend(problems);
    snap.resource_version =
        (view.configmap.is_some() || !view.leases.is_empty()).then(|| view.revision.to_string());
    snap
}

impl WatchState {
    fn current(&self) -> bool {
        self.shared.generation.load(Ordering::Relaxed) == self.generation
    }

    fn on_event(&mut self, event: Event) -> Option<Result<Snapshot>> {
        let changed = match event {
            Event::Lease(Ok(e)) => self.on_lease(e),
            Event::ConfigMap(Ok(e)) => self.on_configmap(e),
            Event::Lease(Err(e)) => {
                let cm = &self.shared.configmap;
                let what = lease_selector(cm.name());
                let e = Error::from_watcher_on("lease", e, cm.namespace(), &what);
                debug!(error = %e, "lease watch error; the watcher retries with backoff");
                return Some(Err(e));
            }
            Event::ConfigMap(Err(e)) => {
                let cm = &self.shared.configmap;
                let e = Error::from_watcher(e, cm.namespace(), cm.name());
                debug!(error = %e, "registry watch error; the watcher retries with backoff");
                return Some(Err(e));
            }
        };
        if !(changed && self.leases_synced && self.configmap_synced) {
            return None;
        }
        self.view.synced = true;
        if self.current() {
            *lock(&self.shared.view) = self.view.clone();
        }
        self.schedule_publish();
        Some(Ok(snapshot_of(&self.shared.configmap, &self.view)))
    }

    fn seen(&mut self, meta: &ObjectMeta) {
        self.view.revision = self.view.revision.max(revision(meta));
    }

    fn on_lease(&mut self, event: watcher::Event<Lease>) -> bool {
        match event {
            watcher::Event::Init => self.leases_listed = Some(BTreeMap::new()),
            watcher::Event::InitApply(l) => {
                self.seen(&l.metadata);
                let registry = self.shared.configmap.name();
                if let (Some(listed), Some(name)) =
                    (self.leases_listed.as_mut(), l.metadata.name.clone())
                {
                    listed.insert(name, decode_lease(registry, &l));
                }
            }
            watcher::Event::InitDone => {
                self.view.leases = self.leases_listed.take().unwrap_or_default();
                self.leases_synced = true;
                return true;
            }
            watcher::Event::Apply(l) => {
                self.view.put(self.shared.configmap.name(), &l);
                return true;
            }
            watcher::Event::Delete(l) => {
                self.seen(&l.metadata);
                if let Some(name) = &l.metadata.name {
                    self.view.leases.remove(name);
                }
                return true;
            }
        }
        false
    }

    fn on_configmap(&mut self, event: watcher::Event<ConfigMap>) -> bool {
        let registry = self.shared.configmap.name().to_owned();
        let ours = |cm: &ConfigMap| cm.metadata.name.as_deref() == Some(registry.as_str());
        match event {
            watcher::Event::Init => self.configmap_listed = Some(None),
            watcher::Event::InitApply(cm) => {
                if ours(&cm) {
                    self.seen(&cm.metadata);
                    self.configmap_listed = Some(Some(cm));
                }
            }
            watcher::Event::InitDone => {
                self.view.configmap = self.configmap_listed.take().flatten();
                self.configmap_synced = true;
                return true;
            }
            watcher::Event::Apply(cm) if ours(&cm) => {
                self.seen(&cm.metadata);
                self.view.configmap = Some(cm);
                return true;
            }
            watcher::Event::Delete(cm) if ours(&cm) => {
                self.seen(&cm.metadata);
                info!(namespace = %self.shared.configmap.namespace(), configmap = %registry,
                      "the registry configmap was deleted; the lease layout recreates it with \
                       static-nodes.json");
                self.view.configmap = None;
                return true;
            }
            watcher::Event::Apply(_) | watcher::Event::Delete(_) => {}
        }
        false
    }

    /// When `static-nodes.json` is stale and this registry publishes,
    /// (re)starts the delayed write of it (see [`LeaseRegistry`]).
    fn schedule_publish(&mut self) {
        let Some(me) = self.shared.publisher.clone() else {
            return;
        };
        let (leases, _) = self.view.members();
        let data = self
            .view
            .configmap
            .as_ref()
            .and_then(|c| c.data.clone())
            .unwrap_or_default();
        let stale = (self.view.configmap.is_some() || !leases.is_empty())
            && schema::encode_lease_members(&data, &leases).is_some();
        if !stale || !self.current() {
            self.publish.set(None);
            return;
        }
        let rank = leases
            .keys()
            .filter(|pod| pod.as_str() < me.as_str())
            .count();
        let delay = PUBLISH_DEBOUNCE + PUBLISH_STEP * u32::try_from(rank.min(60)).unwrap_or(60);
        let shared = self.shared.clone();
        self.publish.set(Some(tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            publish(&shared, rank).await;
        })));
    }
}

/// Writes the derived `static-nodes.json` (and [`schema::LEASE_MEMBERS_KEY`])
/// by compare-and-swap, from the Leases of the latest view, retrying (see
/// [`until_published`]) until it lands: written, or found current.
async fn publish(shared: &Shared, rank: usize) {
    let (namespace, configmap) = (shared.configmap.namespace(), shared.configmap.name());
    let attempts = until_published(PUBLISH_RETRY, configmap, || async {
        shared
            .configmap
            .rewrite_data("publish", |data, exists| {
                let (leases, _) = lock(&shared.view).members();
                if !exists && leases.is_empty() {
                    return None;
                }
                schema::encode_lease_members(data, &leases)
            })
            .await
            .map(drop)
    })
    .await;
    debug!(
        namespace,
        configmap, rank, attempts, "published static-nodes.json from the member leases"
    );
}

/// Runs `attempt` (one publication: read, derive, compare-and-swap, itself
/// retrying conflicts and transient errors per the registry's
/// [`RetryPolicy`]) until it succeeds, sleeping `backoff`'s delay after each
/// failure, whatever the error: `static-nodes.json` must not stay stale until
/// the next change of the Leases (issue 21, defect 6). Ends only on success
/// (or when its task is aborted: a newer change re-schedules the
/// publication, a dropped watch ends it). Returns the attempts made.
pub(crate) async fn until_published<F, Fut>(
    backoff: RetryPolicy,
    configmap: &str,
    mut attempt: F,
) -> u32
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let mut n: u32 = 0;
    loop {
        n = n.saturating_add(1);
        match attempt().await {
            Ok(()) => {
                if n > 1 {
                    info!(
                        configmap,
                        attempts = n,
                        "static-nodes.json derived from the member leases written after retries"
                    );
                }
                return n;
            }
            Err(e) => {
                let delay = backoff.delay(n);
                if n == 1 || n.is_multiple_of(10) {
                    warn!(
                        configmap,
                        attempt = n,
                        ?delay,
                        "could not write static-nodes.json derived from the member leases; \
                           retrying: {e}"
                    );
                } else {
                    debug!(configmap, attempt = n, ?delay, error = %e,
                           "static-nodes.json publication failed again; retrying");
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}

impl LeaseRegistry {
    /// A registry of Leases labelled [`REGISTRY_LABEL`]`=<name>` in
    /// `namespace`, with ConfigMap `name` for `static-nodes.json`. It does not
    /// publish `static-nodes.json` until [`publishing_as`](Self::publishing_as).
    ///
    /// `name` must be a valid label value (at most 63 characters).
    pub fn new(client: Client, namespace: impl Into<String>, name: impl Into<String>) -> Self {
        let namespace = namespace.into();
        let configmap = ConfigMapRegistry::new(client.clone(), namespace.clone(), name);
        Self {
            api: Api::namespaced(client, &namespace),
            configmap: Arc::new(configmap),
            publisher: None,
            view: Arc::default(),
            generation: Arc::default(),
            registered: AtomicBool::new(false),
        }
    }

    /// Makes the watch of this registry publish `static-nodes.json` as pod
    /// `pod` (ranked by pod name among the members, see [`LeaseRegistry`]).
    #[must_use]
    pub fn publishing_as(mut self, pod: impl Into<String>) -> Self {
        self.publisher = Some(pod.into());
        self
    }

    /// Replaces the retry policy (conflicts on one Lease, transient errors,
    /// and the ConfigMap's writes).
    #[must_use]
    pub fn with_retry_policy(mut self, retry: RetryPolicy) -> Self {
        if let Some(cm) = Arc::get_mut(&mut self.configmap) {
            cm.set_retry_policy(retry);
        }
        self
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        self.configmap.namespace()
    }

    /// The registry's (the shared ConfigMap's) name.
    pub fn name(&self) -> &str {
        self.configmap.name()
    }

    fn err(&self, e: kube::Error, verb: &'static str, name: &str) -> Error {
        Error::from_kube_on("lease", e, verb, self.namespace(), name)
    }

    fn shared(&self) -> Shared {
        Shared {
            configmap: Arc::clone(&self.configmap),
            publisher: self.publisher.clone(),
            view: Arc::clone(&self.view),
            generation: Arc::clone(&self.generation),
        }
    }

    fn selector(&self) -> String {
        lease_selector(self.name())
    }

    /// The Lease that holds `record`.
    fn lease(&self, record: &MemberRecord) -> Lease {
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
    async fn back_off(&self, attempt: u32, e: &kube::Error) -> bool {
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
    async fn retry_after(
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
    async fn get(&self, name: &str) -> Result<Option<Lease>> {
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
    async fn after_write(&self, apply: impl FnOnce(&mut View), read_ok: bool) -> Result<Snapshot> {
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

    /// Writes `record`'s Lease: create, or replace the stored one carrying
    /// its resourceVersion; nothing when the stored one keeps it.
    async fn write_lease(&self, record: &MemberRecord) -> Result<Option<Lease>> {
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
    async fn delete_lease(&self, expected: &MemberRecord) -> Result<bool> {
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

impl std::fmt::Debug for LeaseRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseRegistry")
            .field("namespace", &self.namespace())
            .field("name", &self.name())
            .field("publisher", &self.publisher)
            .field("retry", &self.configmap.retry_policy())
            .finish()
    }
}

#[async_trait::async_trait]
impl PeerRegistry for LeaseRegistry {
    async fn snapshot(&self) -> Result<Snapshot> {
        let lp = ListParams::default().labels(&self.selector());
        let (configmap, leases) = futures::join!(self.configmap.object(), self.api.list(&lp));
        let leases = leases.map_err(|e| self.err(e, "list", &self.selector()))?;
        let configmap = configmap?;
        // The objects' own versions, not the list's (etcd's revision at the
        // read, moved by any write anywhere): the same figure the watch gives.
        let mut view = View::default();
        for lease in &leases.items {
            view.put(self.name(), lease);
        }
        if let Some(cm) = &configmap {
            view.revision = view.revision.max(revision(&cm.metadata));
        }
        view.configmap = configmap;
        let snap = snapshot_of(&self.configmap, &view);
        let mut latest = lock(&self.view);
        if !latest.synced {
            view.synced = false;
            view.read = true;
            *latest = view;
        }
        Ok(snap)
    }

    async fn upsert(&self, record: MemberRecord) -> Result<Snapshot> {
        validate(&record)?;
        let written = self.write_lease(&record).await?;
        self.registered.store(true, Ordering::Relaxed);
        // A fleet switching from the ConfigMap layout: the Lease supersedes
        // this pod's record there.
        // The ConfigMap as this pass read it (the latest view), else a GET:
        // in a burst of N registrations, N extra GETs would double the load.
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

    async fn remove(&self, expected: Vec<MemberRecord>) -> Result<Snapshot> {
        let mut deleted = Vec::new();
        for exp in &expected {
            if self.delete_lease(exp).await? {
                deleted.push(lease_name(self.name(), &exp.pod));
            }
        }
        // Records in the ConfigMap (a fleet switching layouts): the ConfigMap
        // registry removes those still the same registration, writing nothing
        // when there are none.
        PeerRegistry::remove(&*self.configmap, expected).await?;
        self.after_write(
            |view| {
                for name in &deleted {
                    view.leases.remove(name);
                }
            },
            false,
        )
        .await
    }

    async fn remove_legacy(&self, enodes: Vec<Enode>) -> Result<Snapshot> {
        PeerRegistry::remove_legacy(&*self.configmap, enodes).await?;
        self.snapshot().await
    }

    fn watch(&self) -> BoxStream<'static, Result<Snapshot>> {
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        lock(&self.view).synced = false;
        let leases = watcher(
            self.api.clone(),
            watcher::Config::default().labels(&self.selector()),
        )
        .default_backoff()
        .map(Event::Lease);
        let configmap = watcher(
            self.configmap.api().clone(),
            watcher::Config::default().fields(&format!("metadata.name={}", self.name())),
        )
        .default_backoff()
        .map(Event::ConfigMap);
        let mut state = WatchState {
            shared: self.shared(),
            generation,
            view: View::default(),
            leases_listed: None,
            configmap_listed: None,
            leases_synced: false,
            configmap_synced: false,
            publish: Pending::default(),
        };
        futures::stream::select(leases, configmap)
            .filter_map(move |event| futures::future::ready(state.on_event(event)))
            .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::tests::member;

    fn lease_of(registry: &str, rec: &MemberRecord) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some(lease_name(registry, &rec.pod)),
                annotations: Some(BTreeMap::from([(
                    MEMBER_ANNOTATION.to_owned(),
                    serde_json::to_string(rec).unwrap(),
                )])),
                ..ObjectMeta::default()
            },
            spec: None,
        }
    }

    #[test]
    fn a_lease_holds_its_pods_record_and_a_wrong_one_is_named_and_skipped() {
        let rec = member("geth-0", 1);
        assert_eq!(decode_lease("reg", &lease_of("reg", &rec)), Ok(rec.clone()));
        let mut elsewhere = lease_of("reg", &rec);
        elsewhere.metadata.name = Some("reg.geth-9".into());
        let why = decode_lease("reg", &elsewhere).unwrap_err();
        assert!(
            why.contains("reg.geth-9") && why.contains("geth-0"),
            "{why}"
        );
        let mut garbage = lease_of("reg", &rec);
        garbage.metadata.annotations = Some(BTreeMap::from([(
            MEMBER_ANNOTATION.to_owned(),
            "{".to_owned(),
        )]));
        let why = decode_lease("reg", &garbage).unwrap_err();
        assert!(why.contains("not a member record"), "{why}");
        let mut view = View::default();
        view.put("reg", &lease_of("reg", &rec));
        garbage.metadata.name = Some("reg.geth-5".into());
        view.put("reg", &garbage);
        let (members, problems) = view.members();
        assert_eq!(members.len(), 1);
        assert_eq!(problems.len(), 1);
    }
}
