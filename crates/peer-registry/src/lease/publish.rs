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

/// How long the publisher waits for more changes before it writes: a burst
/// of pods starting together (their Leases landing over a second or two)
/// costs one write, after it, not one per Lease while their creates still
/// queue at the apiserver.
const PUBLISH_DEBOUNCE: Duration = Duration::from_secs(1);
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

/// Where the publication task is.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No task, or one that has finished.
    #[default]
    Idle,
    /// Waiting out its delay: a newer change replaces it.
    Waiting,
    /// Writing; `again` when a newer change came meanwhile.
    Writing { again: bool },
}

/// The delayed publication: a newer change replaces a task still waiting
/// out its delay, but never aborts one that is writing (an aborted request
/// is work the apiserver does for nothing; under a burst of pod starts the
/// aborted reads and writes showed as 500s and 504s and slowed the Lease
/// creates queued behind them). That task derives from the latest view at
/// each attempt, and runs once more after the newer change. Aborts its task
/// when dropped.
#[derive(Default)]
pub(super) struct Pending {
    task: Option<tokio::task::JoinHandle<()>>,
    phase: std::sync::Arc<std::sync::Mutex<Phase>>,
}

impl Pending {
    /// Nothing to publish: a task still waiting is dropped, one writing is
    /// left to finish (it finds the ConfigMap current or writes what is).
    pub(super) fn cancel(&mut self) {
        let mut phase = lock_phase(&self.phase);
        if *phase == Phase::Waiting
            && let Some(old) = self.task.take()
        {
            old.abort();
            *phase = Phase::Idle;
        }
    }

    /// Publishes after `delay` (then `PUBLISH_DEBOUNCE` for each further
    /// round a change asked for while it wrote), unless a task is writing:
    /// that one is asked to run once more.
    fn schedule<F, Fut>(&mut self, delay: Duration, work: F)
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let mut phase = lock_phase(&self.phase);
        if let Phase::Writing { again } = &mut *phase {
            *again = true;
            return;
        }
        if let Some(old) = self.task.take() {
            old.abort();
        }
        *phase = Phase::Waiting;
        drop(phase);
        let phase = self.phase.clone();
        self.task = Some(tokio::spawn(async move {
            let mut delay = delay;
            loop {
                tokio::time::sleep(delay).await;
                *lock_phase(&phase) = Phase::Writing { again: false };
                work().await;
                let mut p = lock_phase(&phase);
                if *p == (Phase::Writing { again: true }) {
                    *p = Phase::Writing { again: false };
                    delay = PUBLISH_DEBOUNCE;
                    continue;
                }
                *p = Phase::Idle;
                break;
            }
        }));
    }
}

fn lock_phase(phase: &std::sync::Mutex<Phase>) -> std::sync::MutexGuard<'_, Phase> {
    phase
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
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
            self.publish.cancel();
            return;
        }
        let rank = leases
            .keys()
            .filter(|pod| pod.as_str() < me.as_str())
            .count();
        let delay = PUBLISH_DEBOUNCE + PUBLISH_STEP * u32::try_from(rank.min(60)).unwrap_or(60);
        let shared = self.shared.clone();
        self.publish.schedule(delay, move || {
            let shared = shared.clone();
            async move { publish(&shared, rank).await }
        });
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

    /// A change that comes while a publication writes must not abort it (the
    /// apiserver would do the aborted request's work for nothing): the write
    /// finishes, and the publication runs once more after it. A change while
    /// it still waits replaces it.
    #[tokio::test(start_paused = true)]
    async fn a_newer_change_never_aborts_a_publication_that_is_writing() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};

        let started = Arc::new(AtomicUsize::new(0));
        let finished = Arc::new(AtomicUsize::new(0));
        let work = {
            let (started, finished) = (started.clone(), finished.clone());
            move || {
                let (started, finished) = (started.clone(), finished.clone());
                async move {
                    started.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    finished.fetch_add(1, Ordering::SeqCst);
                }
            }
        };
        let mut pending = Pending::default();
        pending.schedule(Duration::from_millis(100), work.clone());
        // Replaced while waiting: only one publication starts.
        tokio::time::sleep(Duration::from_millis(50)).await;
        pending.schedule(Duration::from_millis(100), work.clone());
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(started.load(Ordering::SeqCst), 1, "one write started");
        // A change while it writes: the write goes on to its end.
        pending.schedule(Duration::from_millis(100), work.clone());
        pending.cancel();
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(finished.load(Ordering::SeqCst), 1, "the write was aborted");
        // ...and the change is published by one more round.
        tokio::time::sleep(PUBLISH_DEBOUNCE + Duration::from_secs(1)).await;
        assert_eq!(started.load(Ordering::SeqCst), 2, "one more round after it");
        assert_eq!(finished.load(Ordering::SeqCst), 2);
    }
}
