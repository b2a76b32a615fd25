//! Kubernetes Events on the sidecar's own pod, for what an operator acts on:
//! this node registered, moved or deregistered, a member it removed (with the
//! evidence), a peer on another network, geth's peer limits, a suspected
//! partition, a registry it cannot write.
//!
//! Events go through kube-runtime's [`Recorder`], which deduplicates like
//! client-go's recorder (a repeat within minutes becomes a `series` count on
//! one Event). They are published by a background task fed by a bounded channel:
//! the event loop never waits on the apiserver for an Event, and when the
//! channel is full an Event is dropped, never the loop's work. The loop emits
//! only on changes (a new problem, a transition), and the same reason and note
//! are sent at most once a minute. Needs `create` and `patch` on
//! `events.k8s.io/events` in the Role; without them the log says so once and
//! Events stop.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tokio::sync::mpsc;

use crate::health::lock;
use crate::notice::Notice;
use crate::ports::Hooks;
use std::sync::Mutex;
use tracing::{debug, warn};

/// The Kubernetes Event of a notice.
fn event(notice: &Notice) -> Event {
    let (type_, reason, action, note) = match notice {
        Notice::Registered { enode } => (
            EventType::Normal,
            "Registered",
            "Register",
            format!("registered this geth in the peer registry as {enode}"),
        ),
        Notice::AddressChanged { from, to } => (
            EventType::Normal,
            "AddressChanged",
            "Register",
            format!("this geth's advertised address changed from {from} to {to}"),
        ),
        Notice::Deregistered => (
            EventType::Normal,
            "Deregistered",
            "Deregister",
            "removed this geth from the peer registry on shutdown".to_owned(),
        ),
        Notice::MemberRemoved { pod, evidence } => (
            EventType::Normal,
            "MemberRemoved",
            "RemoveMember",
            format!("removed member {pod} from the peer registry: {evidence}"),
        ),
        Notice::PeerUnusable { peer, error } => (
            EventType::Warning,
            "PeerUnusable",
            "Peer",
            format!(
                "peer {peer} is on another network or genesis ({error}): registered but unusable"
            ),
        ),
        Notice::PeerLimitReached { detail } => (
            EventType::Warning,
            "PeerLimitReached",
            "Peer",
            detail.clone(),
        ),
        Notice::PartitionSuspected { detail } => (
            EventType::Warning,
            "PartitionSuspected",
            "RemoveMember",
            detail.clone(),
        ),
        Notice::PodEvidenceLost { reason } => (
            EventType::Warning,
            "PodEvidenceLost",
            "Observe",
            format!(
                "pod evidence unavailable, removals fall back to agreement between members: {reason}"
            ),
        ),
        Notice::RegistryUnwritable { error } => (
            EventType::Warning,
            "RegistryUnwritable",
            "WriteRegistry",
            format!("cannot write the peer registry: {error}"),
        ),
        Notice::RegistryWentBack { detail } => (
            EventType::Warning,
            "RegistryWentBack",
            "Observe",
            detail.clone(),
        ),
    };
    Event {
        type_,
        reason: reason.to_owned(),
        note: Some(truncate(note, 1000)),
        action: action.to_owned(),
        secondary: None,
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// The same reason and note are sent at most this often.
const REPEAT_AFTER: Duration = Duration::from_secs(60);
/// Events waiting to be published; beyond that they are dropped.
const QUEUE: usize = 64;

/// Kubernetes Events on this pod: the binary's [`Hooks`]. Notices are queued
/// for a background publisher and never wait.
pub struct Events {
    tx: Mutex<Option<mpsc::Sender<Notice>>>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Events {
    /// Starts the publisher for the pod `pod` (`uid` when known) in `namespace`.
    pub fn spawn(client: kube::Client, namespace: &str, pod: &str, uid: Option<String>) -> Self {
        let reporter = Reporter {
            controller: "geth-peer-sidecar".to_owned(),
            instance: Some(pod.to_owned()),
        };
        let reference = ObjectReference {
            api_version: Some("v1".to_owned()),
            kind: Some("Pod".to_owned()),
            name: Some(pod.to_owned()),
            namespace: Some(namespace.to_owned()),
            uid,
            ..ObjectReference::default()
        };
        let (tx, rx) = mpsc::channel(QUEUE);
        let task = tokio::spawn(publish(Recorder::new(client, reporter), reference, rx));
        Self {
            tx: Mutex::new(Some(tx)),
            task: Mutex::new(Some(task)),
        }
    }
}

#[async_trait::async_trait]
impl Hooks for Events {
    /// Queues a notice; never waits.
    fn notice(&self, notice: Notice) {
        if let Some(tx) = lock(&self.tx).as_ref()
            && tx.try_send(notice).is_err()
        {
            debug!("event queue full or closed; event dropped");
        }
    }

    /// Stops taking notices and waits up to `within` for the queued ones to be
    /// published (at shutdown: the `Deregistered` Event is the last one).
    async fn flush(&self, within: Duration) {
        lock(&self.tx).take();
        let task = lock(&self.task).take();
        if let Some(task) = task
            && tokio::time::timeout(within, task).await.is_err()
        {
            debug!("events not all published before exit");
        }
    }
}

async fn publish(recorder: Recorder, reference: ObjectReference, mut rx: mpsc::Receiver<Notice>) {
    let mut sent: HashMap<(String, Option<String>), Instant> = HashMap::new();
    while let Some(notice) = rx.recv().await {
        let event = event(&notice);
        let key = (event.reason.clone(), event.note.clone());
        if sent.get(&key).is_some_and(|t| t.elapsed() < REPEAT_AFTER) {
            continue;
        }
        sent.retain(|_, t| t.elapsed() < REPEAT_AFTER);
        match recorder.publish(&event, &reference).await {
            Ok(()) => {
                sent.insert(key, Instant::now());
            }
            Err(kube::Error::Api(s)) if s.code == 403 => {
                warn!(
                    "cannot publish Kubernetes Events ({}): grant create and patch on \
                     events.k8s.io/events in the Role (deploy/base/rbac.yaml, or the chart); \
                     Events are off until the sidecar restarts",
                    s.message
                );
                return;
            }
            Err(e) => debug!(error = %e, reason = %event.reason, "could not publish an event"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_notice_has_a_pascal_case_reason_and_a_bounded_note() {
        let long = "x".repeat(5000);
        for n in [
            Notice::Registered {
                enode: long.clone(),
            },
            Notice::AddressChanged {
                from: "a".into(),
                to: "b".into(),
            },
            Notice::Deregistered,
            Notice::MemberRemoved {
                pod: "geth-3".into(),
                evidence: "its pod is gone".into(),
            },
            Notice::PeerUnusable {
                peer: "geth-2".into(),
                error: "genesis mismatch".into(),
            },
            Notice::PeerLimitReached { detail: "d".into() },
            Notice::PartitionSuspected { detail: "d".into() },
            Notice::RegistryUnwritable {
                error: "403".into(),
            },
            Notice::PodEvidenceLost {
                reason: "watch failing".into(),
            },
            Notice::RegistryWentBack {
                detail: long.clone(),
            },
        ] {
            let e = event(&n);
            assert!(e.reason.chars().next().is_some_and(char::is_uppercase));
            assert!(!e.reason.contains(' ') && e.reason.len() <= 128);
            assert!(e.note.as_ref().is_some_and(|n| n.len() <= 1000));
        }
    }
}
