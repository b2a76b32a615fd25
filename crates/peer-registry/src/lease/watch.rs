//! The watch of a [`LeaseRegistry`](super::LeaseRegistry): the member Leases
//! and the shared ConfigMap watched together, kept in a [`View`] (shared
//! with the registry while this is its latest watch), a snapshot emitted
//! once both have listed and on each change after.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::ObjectMeta;
use kube::runtime::watcher;
use tracing::{debug, info};

use super::lease_selector;
use super::publish::Pending;
use super::view::{Decoded, View, decode_lease, lock, revision, snapshot_of};
use crate::configmap::ConfigMapRegistry;
use crate::error::{Error, Result};
use crate::record::Snapshot;

// Names the doc links use.
#[cfg(doc)]
use crate::registry::PeerRegistry;

/// One watch event, of either object kind.
pub(super) enum Event {
    Lease(std::result::Result<watcher::Event<Lease>, watcher::Error>),
    ConfigMap(std::result::Result<watcher::Event<ConfigMap>, watcher::Error>),
}

/// The state of one [`PeerRegistry::watch`] stream.
pub(super) struct WatchState {
    pub(super) shared: Shared,
    pub(super) generation: u64,
    pub(super) view: View,
    pub(super) leases_listed: Option<BTreeMap<String, Decoded>>,
    pub(super) configmap_listed: Option<Option<ConfigMap>>,
    pub(super) leases_synced: bool,
    pub(super) configmap_synced: bool,
    pub(super) publish: Pending,
}

/// What a watch stream and the publisher share with the registry.
#[derive(Clone)]
pub(super) struct Shared {
    pub(super) configmap: Arc<ConfigMapRegistry>,
    pub(super) publisher: Option<String>,
    pub(super) view: Arc<Mutex<View>>,
    pub(super) generation: Arc<AtomicU64>,
    /// Woken when this watch, the latest, has listed or is dropped.
    pub(super) listed: Arc<tokio::sync::Notify>,
    /// Whether the latest watch is open: cleared when it is dropped.
    pub(super) watching: Arc<AtomicBool>,
}

impl Drop for WatchState {
    /// The latest watch dropped: nothing lists any more, so a registration
    /// waiting for its list reads the registry instead.
    fn drop(&mut self) {
        if self.current() {
            self.shared.watching.store(false, Ordering::Relaxed);
            self.shared.listed.notify_waiters();
        }
    }
}

impl WatchState {
    pub(super) fn current(&self) -> bool {
        self.shared.generation.load(Ordering::Relaxed) == self.generation
    }

    pub(super) fn on_event(&mut self, event: Event) -> Option<Result<Snapshot>> {
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
            self.shared.listed.notify_waiters();
        }
        self.schedule_publish();
        Some(Ok(snapshot_of(&self.shared.configmap, &self.view)))
    }

    pub(super) fn seen(&mut self, meta: &ObjectMeta) {
        self.view.revision = self.view.revision.max(revision(meta));
    }

    pub(super) fn on_lease(&mut self, event: watcher::Event<Lease>) -> bool {
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

    pub(super) fn on_configmap(&mut self, event: watcher::Event<ConfigMap>) -> bool {
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
}
