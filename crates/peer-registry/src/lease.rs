//! The lease layout: one Kubernetes Lease per member, `static-nodes.json`
//! derived into the shared ConfigMap.
//!
//! [`LeaseRegistry`] is the public face; its parts live in submodules:
//! - `view`: what the registry has seen (the Leases, each decoded once, and
//!   the ConfigMap) and the snapshot made of it;
//! - `write`: the writes of one member's own Lease (create, replace, delete),
//!   retried on races and transient errors;
//! - `watch`: the watch of the Leases and the ConfigMap, kept in the view;
//! - `publish`: the derived `static-nodes.json` written into the ConfigMap by
//!   the member that ranks first, retried until it lands.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use futures::stream::BoxStream;
use geth_ipc::Enode;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::ListParams;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};

use crate::configmap::{ConfigMapRegistry, RetryPolicy, validate};
use crate::error::{Error, Result};
use crate::record::{MemberRecord, Snapshot};
use crate::registry::PeerRegistry;

// Names the doc links use.
#[cfg(doc)]
use crate::schema;

mod publish;
mod view;
mod watch;
mod write;

use publish::Pending;
#[cfg(test)]
pub(crate) use publish::until_published;
use view::{View, lock, revision, snapshot_of};
use watch::{Event, Shared, WatchState};

/// The annotation of a member Lease that holds its [`MemberRecord`] (JSON).
pub const MEMBER_ANNOTATION: &str = "geth-peer-sidecar.io/member";
/// The label of a member Lease whose value is the registry's (the shared
/// ConfigMap's) name: the watch's selector.
pub const REGISTRY_LABEL: &str = "geth-peer-sidecar.io/registry";

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
///   sorts first writes it 1 s after the last change, the next one 2 s
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
    /// Woken when the latest watch has listed (a registration's snapshot
    /// waits for it rather than reading the registry a second time), when a
    /// read filled the view, and when the latest watch is dropped.
    listed: Arc<tokio::sync::Notify>,
    /// The latest watch stream is open (being listed and followed).
    watching: Arc<AtomicBool>,
}

/// The name of pod `pod`'s Lease in registry `registry`.
pub fn lease_name(registry: &str, pod: &str) -> String {
    format!("{registry}.{pod}")
}

/// The label selector of the member Leases of registry `registry`.
pub fn lease_selector(registry: &str) -> String {
    format!("{REGISTRY_LABEL}={registry}")
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
            listed: Arc::default(),
            watching: Arc::default(),
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
            listed: Arc::clone(&self.listed),
            watching: Arc::clone(&self.watching),
        }
    }

    fn selector(&self) -> String {
        lease_selector(self.name())
    }
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
        // etcd's revision at the read (the list's version, at least every
        // object's): a quorum read holds every change up to it, and any later
        // change the watch delivers has a higher one. The largest object
        // version would drop when the newest Lease is deleted, which would
        // look like etcd's revisions going back.
        let mut view = View::default();
        for lease in &leases.items {
            view.put(self.name(), lease);
        }
        if let Some(rv) = leases.metadata.resource_version.as_deref() {
            view.revision = view.revision.max(rv.parse().unwrap_or(0));
        }
        if let Some(cm) = &configmap {
            view.revision = view.revision.max(revision(&cm.metadata));
        }
        view.configmap = configmap;
        let snap = snapshot_of(&self.configmap, &view);
        {
            let mut latest = lock(&self.view);
            if !latest.synced {
                view.synced = false;
                view.read = true;
                *latest = view;
            }
        }
        self.listed.notify_waiters();
        Ok(snap)
    }

    async fn upsert(&self, record: MemberRecord) -> Result<Snapshot> {
        validate(&record)?;
        let written = self.write_lease(&record).await?;
        self.registered.store(true, Ordering::Relaxed);
        self.after_registering(&record, written).await
    }

    /// One create of the pod's Lease; `None` when it has one (a 409 tells
    /// no more, and the stored record is left as it is).
    async fn create(&self, record: MemberRecord) -> Result<Option<Snapshot>> {
        validate(&record)?;
        let Some(written) = self.create_lease(&record).await? else {
            return Ok(None);
        };
        self.registered.store(true, Ordering::Relaxed);
        self.after_registering(&record, Some(written))
            .await
            .map(Some)
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
        // A new watch (a start, or a reopen after etcd's revisions went
        // back): what an older one saw is no base for the next write's
        // snapshot; until this one lists, that is a fresh read.
        *lock(&self.view) = View::default();
        self.watching.store(true, Ordering::Relaxed);
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
