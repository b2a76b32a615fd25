//! The watch of the registry object: watcher events for the one named
//! ConfigMap turned into snapshots, repeats dropped.

use std::sync::Arc;

use futures::StreamExt;
use futures::stream::BoxStream;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::runtime::{WatchStreamExt, watcher};
use tracing::{debug, info};

use super::store::Observer;
use crate::error::{Error, Result};
use crate::record::Snapshot;

/// Turns watcher events for the one object into snapshots, dropping repeats.
#[derive(Default)]
pub(super) struct WatchState {
    /// The object seen during a (re-)list, until `InitDone`.
    listed: Option<ConfigMap>,
    /// The resourceVersion of the last snapshot emitted (`Some(None)`: absent).
    last: Option<Option<String>>,
}

impl WatchState {
    pub(super) fn on_event(
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

/// The snapshots of the object `observer` names, from a watch of `api`
/// (restarted with backoff after errors, which are passed on).
pub(super) fn watch(
    api: Api<ConfigMap>,
    observer: Arc<Observer>,
) -> BoxStream<'static, Result<Snapshot>> {
    let config = watcher::Config::default().fields(&format!("metadata.name={}", observer.name));
    let mut state = WatchState::default();
    watcher(api, config)
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
