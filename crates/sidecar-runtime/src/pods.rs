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
use kube::runtime::watcher;
use reconcile_core::PodObservation;

use crate::ports::{PodEvidence, PodSource};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

#[derive(Debug, Default)]
struct View {
    /// `None` until the watcher's first full list.
    pods: Option<BTreeMap<String, PodObservation>>,
    error: Option<String>,
    /// Pods the watch saw and then saw deleted or replaced: name → (the UID
    /// that went, when). Kept for [`GONE_FOR`].
    gone: BTreeMap<String, (String, std::time::Instant)>,
}

/// How long a pod seen deleted is remembered: long past any record's
/// registration grace, so its record is removed at once however late.
const GONE_FOR: std::time::Duration = std::time::Duration::from_secs(600);

impl View {
    /// Notes that `old` (the pod held under `name`) is gone.
    fn note_gone(&mut self, name: &str, old: Option<&PodObservation>) {
        if let Some(uid) = old.and_then(|o| o.uid.clone()) {
            self.gone
                .insert(name.to_owned(), (uid, std::time::Instant::now()));
        }
        self.gone.retain(|_, (_, at)| at.elapsed() < GONE_FOR);
    }
}

/// The pod watch: a cache fed by a background task.
pub struct PodWatch {
    api: Api<Pod>,
    selector: Option<String>,
    view: Arc<Mutex<View>>,
    /// Member pods found outside the selector (warned once each).
    changed: Arc<Notify>,
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

/// True when `pod` carries every `key=value` of a simple equality selector
/// (set-based selectors are left to the apiserver: taken as matching).
fn matches_selector(pod: &Pod, selector: Option<&str>) -> bool {
    let Some(selector) = selector else {
        return true;
    };
    let labels = pod.metadata.labels.as_ref();
    selector
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .all(
            |term| match term.split_once("==").or_else(|| term.split_once('=')) {
                Some((k, v)) if !k.ends_with('!') => {
                    labels.and_then(|l| l.get(k.trim())).map(String::as_str) == Some(v.trim())
                }
                _ => true,
            },
        )
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
    /// Starts the watch of the pods matching `selector` (every pod of the
    /// namespace when `None`).
    pub fn spawn(api: Api<Pod>, selector: Option<String>) -> Self {
        let changed = Arc::new(Notify::new());
        let view = Arc::new(Mutex::new(View::default()));
        let task = tokio::spawn(follow(
            api.clone(),
            selector.clone(),
            view.clone(),
            changed.clone(),
        ));
        Self {
            api,
            selector,
            view,
            changed,
            outside_selector: Mutex::new(BTreeSet::new()),
            task,
        }
    }
}

#[async_trait::async_trait]
impl PodSource for PodWatch {
    /// The pods of `members`. A watch that fails (RBAC revoked, the apiserver
    /// refusing) is no evidence at all, even after its first list: the cache
    /// would answer for pods it no longer follows.
    async fn evidence(&self, members: Vec<String>) -> PodEvidence {
        let (mut pods, error, gone) = {
            let v = self.view.lock().unwrap_or_else(PoisonError::into_inner);
            let gone = v
                .gone
                .iter()
                .map(|(name, (uid, _))| (name.clone(), uid.clone()))
                .collect();
            (v.pods.clone(), v.error.clone(), gone)
        };
        if let Some(error) = error {
            return PodEvidence::Failed(error);
        }
        let Some(pods) = pods.as_mut() else {
            return PodEvidence::Syncing;
        };
        let missing: Vec<&str> = members
            .iter()
            .map(String::as_str)
            .filter(|m| !pods.contains_key(*m))
            .collect();
        let gets = missing.iter().map(|name| async move {
            debug!(pod = %name, "member pod not in the pod watch; confirming with a GET");
            (*name, self.api.get_opt(name).await)
        });
        for (name, got) in futures::future::join_all(gets).await {
            match got {
                // A pod outside the selector is no member's pod and is not
                // taken as evidence (whoever can create pods could otherwise
                // vouch for any record); nor is its member taken as gone:
                // pod evidence is off for the pass, and removals fall back
                // to agreement between members.
                Ok(Some(pod)) if !matches_selector(&pod, self.selector.as_deref()) => {
                    self.note_outside_selector(name);
                    return PodEvidence::Failed(format!(
                        "member pod {name} does not match POD_SELECTOR={:?}: set POD_SELECTOR \
                         to labels every member pod carries",
                        self.selector.as_deref().unwrap_or_default()
                    ));
                }
                Ok(Some(pod)) => {
                    if let Some((name, obs)) = observe(&pod) {
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
        PodEvidence::Ready {
            pods: std::mem::take(pods),
            gone,
        }
    }

    async fn changed(&self) {
        self.changed.notified().await;
    }
}

impl PodWatch {
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
                    "a member's pod does not match POD_SELECTOR: pod evidence is off while it \
                     does not; set POD_SELECTOR to labels every member pod carries"
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
    // The apiserver checks permissions when a watch opens: a 60 s server-side
    // timeout bounds how long a revoked grant keeps an open watch streaming
    // (the default, ~290 s, kept pod evidence on five minutes after the Role
    // lost pods). Resuming a watch costs no list.
    let mut config = watcher::Config::default().timeout(60);
    if let Some(s) = &selector {
        config = config.labels(s);
    }
    // After an error the watcher is made anew (after a backoff), so that its
    // recovery is a fresh list: a resumed watch may send nothing in a quiet
    // namespace, and the error would then stand for good.
    let mut retry = std::time::Duration::from_secs(1);
    loop {
        let failed = follow_once(&api, config.clone(), selector.as_deref(), &view, &changed).await;
        if failed {
            tokio::time::sleep(retry).await;
            retry = (retry * 2).min(std::time::Duration::from_secs(30));
        } else {
            retry = std::time::Duration::from_secs(1);
        }
    }
}

/// Follows one watcher until its first error (true) or its end (false).
async fn follow_once(
    api: &Api<Pod>,
    config: watcher::Config,
    selector: Option<&str>,
    view: &Arc<Mutex<View>>,
    changed: &Arc<Notify>,
) -> bool {
    let selector = selector.map(str::to_owned);
    let mut stream = watcher(api.clone(), config).boxed();
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
                    Some(pods) => {
                        let old = pods.insert(name.clone(), obs.clone());
                        if old.as_ref().is_some_and(|o| o.uid != obs.uid) {
                            v.note_gone(&name, old.as_ref());
                        }
                        old.as_ref() != Some(&obs)
                    }
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
                if set(&mut |v| {
                    let old = v.pods.as_mut().and_then(|p| p.remove(&name));
                    v.note_gone(&name, old.as_ref());
                    old.is_some()
                }) {
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
                return true;
            }
        }
    }
    false
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
