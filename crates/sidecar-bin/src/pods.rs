//! Pod evidence (READ_PODS): the member pods followed by a watch, not listed on
//! every pass.
//!
//! A background task runs a kube-runtime watcher on the namespace's pods,
//! narrowed by POD_SELECTOR, and keeps a small cache of name → (UID, IP). A change
//! of a pod's UID or IP, or a deletion, wakes the event loop; status updates that
//! change neither (conditions, restarts) do not. At steady state this costs the
//! apiserver one open watch per sidecar and no requests.
//!
//! A member whose pod is not in the cache (a selector that misses some member
//! pods, or a pod created a moment ago) is confirmed with one GET before the
//! engine may call it gone: a wrong selector can delay nothing worse than that
//! GET, and never removes a live member.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::runtime::{WatchStreamExt, watcher};
use reconcile_core::PodObservation;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

/// What the pod watch can say right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PodEvidence {
    /// The pods by name (the cache, completed by GETs for members missing from it).
    Ready(BTreeMap<String, PodObservation>),
    /// The first list has not completed yet.
    Syncing,
    /// Pods cannot be read; the message says why and what to do.
    Failed(String),
}

#[derive(Debug, Default)]
struct View {
    /// `None` until the watcher's first full list.
    pods: Option<BTreeMap<String, PodObservation>>,
    error: Option<String>,
}

/// The pod watch: a cache fed by a background task.
pub(crate) struct PodWatch {
    api: Api<Pod>,
    selector: Option<String>,
    view: Arc<Mutex<View>>,
    /// Member pods found outside the selector (warned once each).
    outside_selector: Mutex<BTreeSet<String>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PodWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn observe(pod: &Pod) -> Option<(String, PodObservation)> {
    let name = pod.metadata.name.clone()?;
    Some((
        name,
        PodObservation {
            uid: pod.metadata.uid.clone(),
            ip: pod.status.as_ref().and_then(|s| s.pod_ip.clone()),
        },
    ))
}

/// A kube error as an operator-facing message.
fn explain(verb: &str, selector: Option<&str>, e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) if s.code == 403 => format!(
            "READ_PODS is on but the Role does not grant pods {verb} ({}): apply the Role of \
             deploy/overlays/pod-evidence (or the chart with podEvidence=true), which grants \
             pods get, list and watch, or turn READ_PODS off; falling back to reachability evidence",
            s.message
        ),
        kube::Error::Api(s) if s.code == 400 && selector.is_some() => format!(
            "the apiserver refused POD_SELECTOR={:?} ({}): give a label selector such as \
             app.kubernetes.io/name=geth; falling back to reachability evidence",
            selector.unwrap_or_default(),
            s.message
        ),
        other => format!(
            "cannot {verb} pods: {}; falling back to reachability evidence",
            peer_registry::describe_kube_error(other)
        ),
    }
}

impl PodWatch {
    /// Starts the watch; `changed` is notified whenever a pod's UID or IP changes
    /// or a pod is deleted (and once when the first list completes).
    pub(crate) fn spawn(api: Api<Pod>, selector: Option<String>, changed: Arc<Notify>) -> Self {
        let view = Arc::new(Mutex::new(View::default()));
        let task = tokio::spawn(follow(api.clone(), selector.clone(), view.clone(), changed));
        Self {
            api,
            selector,
            view,
            outside_selector: Mutex::new(BTreeSet::new()),
            task,
        }
    }

    /// The pods of `members` (pod names), for one pass.
    pub(crate) async fn evidence<'a>(
        &self,
        members: impl IntoIterator<Item = &'a str>,
    ) -> PodEvidence {
        let (mut pods, error) = {
            let v = self.view.lock().unwrap_or_else(PoisonError::into_inner);
            (v.pods.clone(), v.error.clone())
        };
        let Some(pods) = pods.as_mut() else {
            return error.map_or(PodEvidence::Syncing, PodEvidence::Failed);
        };
        let missing: Vec<&str> = members
            .into_iter()
            .filter(|m| !pods.contains_key(*m))
            .collect();
        let gets = missing.iter().map(|name| async move {
            debug!(pod = %name, "member pod not in the pod watch; confirming with a GET");
            (*name, self.api.get_opt(name).await)
        });
        for (name, got) in futures::future::join_all(gets).await {
            match got {
                Ok(Some(pod)) => {
                    if let Some((name, obs)) = observe(&pod) {
                        self.note_outside_selector(&name);
                        pods.insert(name, obs);
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    return PodEvidence::Failed(format!(
                        "pod {name}: {}",
                        explain("get", self.selector.as_deref(), &e)
                    ));
                }
            }
        }
        PodEvidence::Ready(std::mem::take(pods))
    }

    fn note_outside_selector(&self, name: &str) {
        if let Some(selector) = &self.selector {
            // Once per pod: the pod lands in no cache, so this repeats each pass.
            let mut warned = self
                .outside_selector
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if warned.insert(name.to_owned()) {
                warn!(
                    pod = %name,
                    selector = %selector,
                    "a member's pod does not match POD_SELECTOR: each pass reads it with a GET; \
                     set POD_SELECTOR to labels every member pod carries"
                );
            }
        }
    }
}

/// The background task: applies watcher events to the view.
async fn follow(
    api: Api<Pod>,
    selector: Option<String>,
    view: Arc<Mutex<View>>,
    changed: Arc<Notify>,
) {
    let mut config = watcher::Config::default();
    if let Some(s) = &selector {
        config = config.labels(s);
    }
    let mut stream = watcher(api, config).default_backoff().boxed();
    let mut building: BTreeMap<String, PodObservation> = BTreeMap::new();
    while let Some(event) = stream.next().await {
        let set = |f: &mut dyn FnMut(&mut View) -> bool| {
            let mut v = view.lock().unwrap_or_else(PoisonError::into_inner);
            f(&mut v)
        };
        // Any event after an error means the watch works again.
        if event.is_ok() && set(&mut |v| v.error.take().is_some()) {
            info!("reading pods works again: pod evidence is back");
        }
        match event {
            Ok(watcher::Event::Init) => building.clear(),
            Ok(watcher::Event::InitApply(pod)) => building.extend(observe(&pod)),
            Ok(watcher::Event::InitDone) => {
                let pods = std::mem::take(&mut building);
                let n = pods.len();
                set(&mut |v| {
                    v.pods = Some(pods.clone());
                    true
                });
                debug!(pods = n, "pod watch listed the member pods");
                changed.notify_one();
            }
            Ok(watcher::Event::Apply(pod)) => {
                let Some((name, obs)) = observe(&pod) else {
                    continue;
                };
                let moved = set(&mut |v| match v.pods.as_mut() {
                    Some(pods) => pods.insert(name.clone(), obs.clone()).as_ref() != Some(&obs),
                    None => false,
                });
                if moved {
                    debug!(pod = %name, "pod appeared or changed UID/IP");
                    changed.notify_one();
                }
            }
            Ok(watcher::Event::Delete(pod)) => {
                let Some((name, _)) = observe(&pod) else {
                    continue;
                };
                if set(&mut |v| v.pods.as_mut().is_some_and(|p| p.remove(&name).is_some())) {
                    debug!(pod = %name, "pod deleted");
                    changed.notify_one();
                }
            }
            Err(e) => {
                let msg = match &e {
                    watcher::Error::InitialListFailed(e) => explain("list", selector.as_deref(), e),
                    watcher::Error::WatchStartFailed(e) | watcher::Error::WatchFailed(e) => {
                        explain("watch", selector.as_deref(), e)
                    }
                    watcher::Error::WatchError(status) => format!(
                        "pod watch error: {}; retrying",
                        peer_registry::describe_kube_error(&kube::Error::Api(status.clone()))
                    ),
                    other => format!("pod watch error ({other}); retrying"),
                };
                let new = set(&mut |v| {
                    let new = v.error.as_deref() != Some(msg.as_str());
                    v.error = Some(msg.clone());
                    new
                });
                if new {
                    warn!("{msg}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_pod_read_names_the_connection_cause() {
        let refused = std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "Connection refused (os error 111)",
        );
        let msg = explain("list", None, &kube::Error::ReadEvents(refused));
        assert!(
            msg.contains("cannot list pods: cannot reach the apiserver: connection refused"),
            "{msg}"
        );
        assert!(msg.contains("os error 111"), "{msg}");
        assert!(msg.contains("reachability evidence"), "{msg}");
    }
}
