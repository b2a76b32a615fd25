//! The publication of `static-nodes.json` in the lease layout: derived from
//! the member Leases into the shared ConfigMap by the publishing member whose
//! pod name sorts first (the others later, only if it is still stale), and
//! retried until it lands.

use std::collections::BTreeMap;
use std::time::Duration;

use tracing::{debug, info, warn};

use super::view::{View, lock};
use super::watch::{Shared, WatchState};
use crate::configmap::RetryPolicy;
use crate::error::Result;
use crate::schema;

// Names the doc links use.
#[cfg(doc)]
use super::LeaseRegistry;

/// How long the publisher waits for more changes before it writes.
const PUBLISH_DEBOUNCE: Duration = Duration::from_millis(100);
/// How much longer each publisher waits per member whose pod name sorts
/// before its own: the first publishes, the others only if it did not.
const PUBLISH_STEP: Duration = Duration::from_secs(2);
/// The publisher's backoff between failed writes of `static-nodes.json`
/// (full jitter, doubling from 1 s to 30 s; it retries until the write lands
/// or a newer change replaces it).
const PUBLISH_RETRY: RetryPolicy = RetryPolicy {
    max_attempts: u32::MAX,
    base_delay: Duration::from_secs(1),
    max_delay: Duration::from_secs(30),
};

/// Aborts the task it holds when dropped or replaced.
#[derive(Default)]
pub(super) struct Pending(Option<tokio::task::JoinHandle<()>>);

impl Pending {
    pub(super) fn set(&mut self, handle: Option<tokio::task::JoinHandle<()>>) {
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

impl WatchState {
    /// When `static-nodes.json` is stale and this registry publishes,
    /// (re)starts the delayed write of it (see [`LeaseRegistry`]).
    pub(super) fn schedule_publish(&mut self) {
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
pub(super) async fn publish(shared: &Shared, rank: usize) {
    let (namespace, configmap) = (shared.configmap.namespace(), shared.configmap.name());
    let attempts = until_published(PUBLISH_RETRY, configmap, || async {
        shared
            .configmap
            .rewrite_data("publish", |data, exists| {
                derive(&lock(&shared.view), data, exists)
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

/// What a publication writes, from the registry's latest `view` and the
/// ConfigMap's `data` as read: `None` when nothing changes, and when the view
/// is no base to derive from. That is a view a newer watch has just reset and
/// that has neither listed nor been filled by a read: it holds no Lease, and
/// deriving from it would drop every member from `static-nodes.json`. The
/// newer watch publishes once it lists.
pub(super) fn derive(
    view: &View,
    data: &BTreeMap<String, String>,
    exists: bool,
) -> Option<BTreeMap<String, String>> {
    if !(view.synced || view.read) {
        debug!("the member leases are not listed yet; static-nodes.json is left as it is");
        return None;
    }
    let (leases, _) = view.members();
    if !exists && leases.is_empty() {
        return None;
    }
    schema::encode_lease_members(data, &leases)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::view::tests::lease_of;
    use crate::schema::tests::member;

    /// A view that knows geth-0 and geth-1, as a listed watch has it.
    fn listed() -> View {
        let mut view = View {
            synced: true,
            ..View::default()
        };
        for (pod, seed) in [("geth-0", 0), ("geth-1", 1)] {
            view.put("reg", &lease_of("reg", &member(pod, seed)));
        }
        view
    }

    #[test]
    fn a_listed_or_read_view_derives_static_nodes_from_every_lease() {
        let data = derive(&listed(), &BTreeMap::new(), true).expect("a change");
        assert_eq!(schema::lease_members_listed(&data).len(), 2);
        let read = View {
            synced: false,
            read: true,
            ..listed()
        };
        assert_eq!(derive(&read, &BTreeMap::new(), true), Some(data.clone()));
        // Current: nothing to write.
        assert_eq!(derive(&listed(), &data, true), None);
    }

    /// A publication still pending when a newer watch reset the view (a
    /// reopen after etcd's revisions went back) must not write
    /// `static-nodes.json` from the reset view: every member would drop out
    /// of it.
    #[test]
    fn a_view_reset_by_a_newer_watch_derives_nothing() {
        let data = derive(&listed(), &BTreeMap::new(), true).expect("a change");
        assert_eq!(derive(&View::default(), &data, true), None);
    }
}
