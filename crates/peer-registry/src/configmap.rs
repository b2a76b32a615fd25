//! The registry as one Kubernetes ConfigMap, updated by compare-and-swap.
//!
//! [`ConfigMapRegistry`] is the public face; its parts live in submodules:
//! - `store`: the calls the write loops make on the one object ([`Store`],
//!   over the apiserver or, for tests, `memory`) and the [`Observer`] that
//!   decodes what they read and logs new problems;
//! - `cas`: the write core ([`Core`]): read, compute, conditional write,
//!   retried on conflicts and transient errors; the default
//!   [`WriteProtocol::WholeObjectCas`] and the legacy-entry removal;
//! - `key_patch`: the opt-in [`WriteProtocol::KeyPatch`] writes (a member's
//!   own key by guarded JSON Patch, then `static-nodes.json` settled);
//! - `watch`: the watch of the one object, turned into snapshots.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::BoxStream;
use geth_ipc::Enode;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{Api, Client};

use crate::error::Result;
use crate::record::{MemberRecord, Snapshot};
use crate::registry::PeerRegistry;

// Names the doc links use.
#[cfg(doc)]
use crate::error::Error;

mod cas;
mod key_patch;
mod store;
mod watch;

use cas::Core;
pub(crate) use cas::{is_transient, validate};
use store::{KubeStore, Observer, Store};

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

#[async_trait::async_trait]
impl PeerRegistry for ConfigMapRegistry {
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
        watch::watch(self.api.clone(), Arc::clone(&self.core.observer))
    }
}

#[cfg(any(test, feature = "test-utils"))]
pub(crate) mod memory;
#[cfg(test)]
mod tests;
