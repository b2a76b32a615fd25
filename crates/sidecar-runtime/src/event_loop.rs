//! The event loop: registry watch events, geth peer events, probes, retries
//! and a jittered resync all lead to one pass.

use std::time::Duration;

use futures::StreamExt as _;
use geth_ipc::{AdminApi, PeerEventStream};
use peer_registry::PeerRegistry;
use tracing::{debug, warn};

use crate::metrics::Metrics;
use crate::runner::{GethState, Runner};
use crate::triggers::{WatchItems, jittered, next_event};

/// The longest wait between retries of a failed pass while geth does not answer.
const GETH_RETRY_CAP: Duration = Duration::from_secs(1);
/// The longest wait between retries of a pass that failed for another reason.
const RETRY_CAP: Duration = Duration::from_secs(5);
/// How long the first pass waits for the registry watch's list before it reads
/// the registry itself (an apiserver that neither answers nor fails).
const FIRST_LIST_WAIT: Duration = Duration::from_secs(5);

/// Sleeps until `at`, or forever when `None`.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// The retry schedule of failed passes: doubling from 200 ms, capped.
struct Retry {
    delay: Duration,
    at: Option<tokio::time::Instant>,
}

impl Retry {
    fn new() -> Self {
        Self {
            delay: Duration::from_millis(200),
            at: None,
        }
    }

    fn succeeded(&mut self) {
        *self = Self::new();
    }

    /// Schedules the next try. Waiting for geth costs one stat/connect of a
    /// local socket: it is polled at least every second, so a sidecar started
    /// first registers within a second of geth. The apiserver gets up to 5 s.
    fn failed(&mut self, geth_down: bool) {
        let cap = if geth_down { GETH_RETRY_CAP } else { RETRY_CAP };
        self.delay = self.delay.min(cap);
        self.at = Some(tokio::time::Instant::now() + self.delay);
        self.delay = (self.delay * 2).min(cap);
    }
}

impl<G: AdminApi, R: PeerRegistry> Runner<G, R> {
    /// Runs passes on every trigger until `shutdown` completes. Every `select!`
    /// is `biased` (first ready branch wins, in the order written: shutdown,
    /// the registry, geth, timers), so a run on a paused clock with seeded
    /// jitter is deterministic.
    pub(crate) async fn event_loop(&mut self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut watch = self.open_watch();
        // The first pass reads the registry from the watch's list: one list
        // per start, and the watch follows the registry from before this pod
        // registers. A watch with nothing to say within FIRST_LIST_WAIT leaves
        // the first pass to read the registry itself. Meanwhile this pod
        // registers (a create, which keeps a record the pod has): the list
        // and the write overlap instead of following each other.
        let first = {
            let early = self.register_early();
            tokio::pin!(early);
            let list_wait = tokio::time::sleep(FIRST_LIST_WAIT);
            tokio::pin!(list_wait);
            let mut early_done = false;
            loop {
                tokio::select! {
                    biased;
                    _ = &mut shutdown => return,
                    item = watch.stream.next() => break Some(item),
                    () = &mut early, if !early_done => early_done = true,
                    () = &mut list_wait => break None,
                }
            }
        };
        if let Some(item) = first {
            let mut items = WatchItems::default();
            items.push(item);
            // The first pass is due whatever the list held.
            self.take_watch_items(items, &mut watch);
        }
        let mut events: Option<PeerEventStream> = None;
        let mut resync_at = tokio::time::Instant::now() + jittered(&mut self.rng, self.s.resync);
        let mut probe_at = tokio::time::Instant::now() + self.s.probe_interval;
        let mut retry = Retry::new();
        // Failed registry writes back off on their own schedule: the passes
        // around them succeed (geth's part) and would reset the pass retry.
        let mut write_retry = Retry::new();
        let mut dirty = true;
        let mut arrived = WatchItems::default();
        // Since when geth has been down (its socket is polled less often the
        // longer it stays down).
        let mut geth_down_since: Option<tokio::time::Instant> = None;
        loop {
            if dirty {
                dirty = false;
                // A pass may wait on a hung geth or a slow apiserver: SIGTERM
                // abandons it so deregistration fits the pod's grace period.
                // The registry watch is read while a pass runs (its items wait
                // in `arrived`): a burst of events that lands during a pass
                // costs one more pass, not one per event.
                let outcome = {
                    let pass = self.pass();
                    tokio::pin!(pass);
                    loop {
                        tokio::select! {
                            biased;
                            _ = &mut shutdown => return,
                            outcome = &mut pass => break outcome,
                            item = watch.stream.next(), if !arrived.ended => arrived.push(item),
                        }
                    }
                };
                match outcome {
                    Ok(()) => retry.succeeded(),
                    Err(e) => {
                        debug!(error = %e, "pass failed; retrying");
                        self.metrics
                            .reconcile_errors
                            .get_or_create(&Metrics::kind(e.kind()))
                            .inc();
                        retry.failed(e.is_geth_down());
                    }
                }
                self.health.pass_completed();
                dirty |= self.take_watch_items(std::mem::take(&mut arrived), &mut watch);
                if events.is_none() && self.reported.geth.get() == Some(&GethState::Up) {
                    let subscribed = tokio::select! {
                        biased;
                        _ = &mut shutdown => return,
                        subscribed = self.geth.peer_events() => subscribed,
                    };
                    match subscribed {
                        Ok(stream) => events = Some(stream),
                        Err(e) => debug!(error = %e, "cannot subscribe to geth peer events yet"),
                    }
                }
                if dirty {
                    // The watch moved on during the pass: take the next one now.
                    continue;
                }
            }
            let clock = self.s.clock.clone();
            let recheck_at = self.recheck_at;
            let recheck = async move {
                match recheck_at {
                    Some(at) => {
                        let wait = clock.now().duration_until(at);
                        tokio::time::sleep(Duration::try_from(wait).unwrap_or(Duration::ZERO))
                            .await;
                    }
                    None => std::future::pending().await,
                }
            };
            // While geth is down, its IPC socket accepting is a trigger of its
            // own: a pod's sidecar starts before geth, and the retry timer
            // alone would see geth up to GETH_RETRY_CAP late.
            let geth_down = matches!(self.reported.geth.get(), Some(GethState::Down(_)));
            geth_down_since = down_since(geth_down, geth_down_since, tokio::time::Instant::now());
            let socket = self.s.geth_socket.clone().zip(geth_down_since);
            let geth_back = async move {
                match socket {
                    Some((path, since)) => geth_ipc::socket_accepts_again(&path, since).await,
                    None => std::future::pending().await,
                }
            };
            let pods = self.s.pods.clone();
            let pod_change = async move {
                match pods {
                    Some(p) => p.changed().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = &mut shutdown => return,
                item = watch.stream.next() => {
                    // Everything else the watch has ready joins it: one pass for all.
                    let items = WatchItems::drain(item, &mut watch);
                    dirty |= self.take_watch_items(items, &mut watch);
                },
                ev = next_event(&mut events) => dirty |= self.on_peer_events(ev, &mut events),
                () = tokio::time::sleep_until(resync_at) => {
                    resync_at = tokio::time::Instant::now() + jittered(&mut self.rng, self.s.resync);
                    debug!("periodic resync");
                    // The resync reads the registry: a watch resumed from a
                    // version etcd no longer has (restored or wiped) stays
                    // silent, and only a read shows that.
                    self.reread_due = true;
                    dirty = true;
                }
                () = tokio::time::sleep_until(probe_at) => {
                    probe_at = tokio::time::Instant::now() + self.s.probe_interval;
                    tokio::select! {
                        biased;
                        _ = &mut shutdown => return,
                        changed = self.probe_round() => dirty |= changed,
                    }
                }
                () = sleep_until(retry.at) => dirty = true,
                () = sleep_until(write_retry.at) => {
                    write_retry.at = None;
                    dirty = true;
                }
                () = recheck => {
                    // Consumed: a pass that fails before planning sets no new
                    // one, and a stale one must not fire again (busy loop).
                    self.recheck_at = None;
                    dirty = true;
                }
                () = pod_change => dirty = true,
                written = writes_done(&mut self.writing) => {
                    let Some(written) = written else {
                        // The write task ended without an outcome (a bug):
                        // tried again on the back-off, never in a loop.
                        self.writing = None;
                        warn!("a registry write task ended without an outcome; retrying");
                        write_retry.failed(false);
                        continue;
                    };
                    match self.take_written(written) {
                        Ok(due) => {
                            write_retry.succeeded();
                            // The next pass sees the record landed (and plans
                            // what waited for it).
                            dirty |= due;
                        }
                        Err(e) => {
                            // Tried again by the pass its back-off schedules
                            // (or any earlier one): not at once, which an
                            // apiserver that refuses every write would turn
                            // into a busy loop.
                            debug!(error = %e, "registry write failed; retrying");
                            self.metrics
                                .reconcile_errors
                                .get_or_create(&Metrics::kind(e.kind()))
                                .inc();
                            write_retry.failed(false);
                        }
                    }
                }
                () = geth_back => {
                    debug!("geth's socket accepts again");
                    dirty = true;
                }
            }
        }
    }
}

/// The registry writes in flight finishing, or forever when there are none.
async fn writes_done(
    writing: &mut Option<crate::execute::InFlight>,
) -> Option<crate::execute::Written> {
    match writing {
        Some(w) => w.done().await,
        None => std::future::pending().await,
    }
}

/// Since when geth has been down, as of `now`: kept while it stays down,
/// `now` when it just went down, none once it is up (so the next outage's
/// socket watch starts at its shortest pause again).
fn down_since(
    geth_down: bool,
    held: Option<tokio::time::Instant>,
    now: tokio::time::Instant,
) -> Option<tokio::time::Instant> {
    geth_down.then(|| held.unwrap_or(now))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::down_since;

    #[test]
    fn an_outage_is_timed_from_its_own_start_not_from_an_earlier_one() {
        let t0 = tokio::time::Instant::now();
        let later = |s| t0 + Duration::from_secs(s);
        let first = down_since(true, None, t0);
        assert_eq!(first, Some(t0));
        assert_eq!(down_since(true, first, later(100)), Some(t0), "still down");
        let up = down_since(false, first, later(101));
        assert_eq!(up, None, "geth up again");
        assert_eq!(
            down_since(true, up, later(300)),
            Some(later(300)),
            "a second outage starts its own clock"
        );
    }
}
