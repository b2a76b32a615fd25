//! The publication of `static-nodes.json` in the lease layout: derived from
//! the member Leases into the shared ConfigMap by the publishing member whose
//! pod name sorts first (the others later, only if it is still stale), and
//! retried until it lands.

use std::time::Duration;

use tracing::{debug, info, warn};

use super::view::lock;
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
