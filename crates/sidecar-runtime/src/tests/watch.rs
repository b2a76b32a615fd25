//! The registry watch: stale events, a watch's list, events during a pass.

use std::collections::{BTreeMap, BTreeSet};

use geth_ipc::NodeId;

use super::*;

#[test]
fn a_watch_that_reports_no_registry_while_one_is_held_makes_the_next_pass_read_it_afresh() {
    let mut r = runner(MockAdminApi::new(), pod_ip());
    let mut watch = quiet_watch(true);
    r.on_snapshot(snapshot("10"));
    assert!(
        r.take_watch_items(items(Snapshot::default()), &mut watch),
        "a pass is due"
    );
    assert!(
        r.tracker.snapshot().is_none(),
        "the next pass reads the registry"
    );
    // An ordinary older event is stale and changes nothing.
    r.on_snapshot(snapshot("10"));
    assert!(!r.take_watch_items(items(snapshot("9")), &mut watch));
    assert_eq!(held_version(&r).as_deref(), Some("10"));
}

/// geth-0 (this node) as the engine sees it, at 10.0.0.1.
fn me() -> core::SelfIdentity {
    core::SelfIdentity {
        pod: "geth-0".into(),
        node_id: enode(0).node_id(),
        advertised: enode(0),
        pod_uid: None,
        pod_ip: Some("10.0.0.1".into()),
        sidecar_version: env!("CARGO_PKG_VERSION").to_owned(),
    }
}

/// The registrations the runner's tracker shows the engine as landed while it
/// followed the registry, and those of them that came in a watch's list.
fn landed_and_listed<G: AdminApi>(
    r: &Runner<G, MockPeerRegistry>,
) -> (BTreeMap<NodeId, jiff::Timestamp>, BTreeSet<NodeId>) {
    let me = me();
    let obs = r.tracker.observation(jiff::Timestamp::now(), &me, None);
    (
        obs.registrations_landed.clone(),
        obs.registrations_listed.clone(),
    )
}

#[test]
fn registrations_in_a_watchs_first_list_are_noted_as_listed_and_later_ones_as_changes() {
    let mut reg = registry(snapshot("10"));
    reg.expect_watch()
        .returning(|| futures::stream::pending().boxed());
    let mut r = runner_with(
        MockAdminApi::new(),
        reg,
        settings(pod_ip()),
        Arc::new(Metrics::new()),
    );
    let mut watch = r.open_watch();
    // Held: geth-0 only. Each step's snapshot holds members 0..n.
    let with = |rv: &str, n: usize| only(rv, &(0..n).collect::<Vec<_>>());
    r.on_snapshot(with("10", 1));
    let id = |i| record(i).node_id;
    // The watch's first snapshot is its list: geth-1 may have landed long ago.
    assert!(r.take_watch_items(items(with("11", 2)), &mut watch));
    let (landed, listed) = landed_and_listed(&r);
    assert!(landed.contains_key(&id(1)));
    assert!(listed.contains(&id(1)));
    // Later snapshots are changes: geth-2 has just landed.
    assert!(r.take_watch_items(items(with("12", 3)), &mut watch));
    let (landed, listed) = landed_and_listed(&r);
    assert!(landed.contains_key(&id(2)));
    assert!(!listed.contains(&id(2)));
    // A restarted watch begins with a list again: geth-0's pod was
    // replaced (a new UID) meanwhile.
    let mut watch = r.open_watch();
    let mut snap = with("13", 3);
    if let Some(rec) = snap.members.get_mut("geth-0") {
        rec.pod_uid = Some("new-uid".into());
    }
    assert!(r.take_watch_items(items(snap), &mut watch));
    let (_, listed) = landed_and_listed(&r);
    assert!(listed.contains(&id(0)));
    assert!(!listed.contains(&id(2)));
}

#[tokio::test]
async fn a_watch_event_older_than_the_snapshot_held_is_stale() {
    let mut r = runner(geth("10.0.0.1"), pod_ip());
    let mut watch = quiet_watch(true);
    r.on_snapshot(snapshot("11"));
    assert!(
        !r.take_watch_items(items(snapshot("10")), &mut watch),
        "stale: no pass"
    );
    assert_eq!(held_version(&r).as_deref(), Some("11"), "stale: not taken");
    for newer in ["11", "12", "not-a-number"] {
        r.on_snapshot(snapshot("11"));
        assert!(
            r.take_watch_items(items(snapshot(newer)), &mut watch),
            "{newer} is not stale"
        );
        assert_eq!(held_version(&r).as_deref(), Some(newer));
    }
}

/// geth whose third `admin_nodeInfo` waits for `gate`: the second pass held
/// open (the start's early registration asks first, then the first pass).
struct GatedGeth {
    inner: MockAdminApi,
    gate: tokio::sync::Semaphore,
    calls: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl AdminApi for GatedGeth {
    async fn node_info(&self) -> geth_ipc::Result<NodeInfo> {
        if self.calls.fetch_add(1, Ordering::SeqCst) == 2 {
            let _permit = self.gate.acquire().await;
        }
        self.inner.node_info().await
    }
    async fn peers(&self) -> geth_ipc::Result<Vec<geth_ipc::PeerInfo>> {
        self.inner.peers().await
    }
    async fn add_peer(&self, e: &Enode) -> geth_ipc::Result<bool> {
        self.inner.add_peer(e).await
    }
    async fn remove_peer(&self, e: &Enode) -> geth_ipc::Result<bool> {
        self.inner.remove_peer(e).await
    }
    async fn add_trusted_peer(&self, e: &Enode) -> geth_ipc::Result<bool> {
        self.inner.add_trusted_peer(e).await
    }
    async fn remove_trusted_peer(&self, e: &Enode) -> geth_ipc::Result<bool> {
        self.inner.remove_trusted_peer(e).await
    }
    async fn peer_events(&self) -> geth_ipc::Result<PeerEventStream> {
        Err(geth_ipc::Error::ConnectionLost)
    }
    fn connection_generation(&self) -> u64 {
        1
    }
}

#[tokio::test]
async fn registry_watch_events_during_a_pass_are_read_at_once_and_cost_one_more_pass() {
    let (tx, rx) = tokio::sync::mpsc::channel::<peer_registry::Result<Snapshot>>(8);
    let mut reg = registry(snapshot("10"));
    let rx = std::sync::Mutex::new(Some(rx));
    reg.expect_watch()
        .returning(move || match rx.lock().expect("rx").take() {
            Some(rx) => futures::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|item| (item, rx))
            })
            .boxed(),
            None => futures::stream::pending().boxed(),
        });
    let mut inner = geth_connected("10.0.0.1", &[], Arc::new(AtomicU64::new(1)));
    inner.expect_add_peer().returning(|_| Ok(true));
    inner.expect_remove_peer().returning(|_| Ok(true));
    let geth = GatedGeth {
        inner,
        gate: tokio::sync::Semaphore::new(0),
        calls: 0.into(),
    };
    let metrics = Arc::new(Metrics::new());
    // Nothing but the watch calls for a pass.
    let mut quiet = settings(pod_ip());
    quiet.resync = Duration::from_secs(3600);
    quiet.probe_interval = Duration::from_secs(3600);
    let mut r = runner_with(geth, reg, quiet, metrics.clone());
    let geth = r.geth.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let driver = async {
        // The watch's list comes first: the first pass waits for it.
        tx.send(Ok(only("10", &[0]))).await.expect("send");
        // An event starts the second pass, held open in admin_nodeInfo;
        // three more land meanwhile and are read at once.
        tx.send(Ok(only("11", &[0, 1, 2]))).await.expect("send");
        until("the second pass", || metrics.reconciles.get() == 2).await;
        for (rv, members) in [("12", &[0, 1][..]), ("13", &[0, 1, 2]), ("14", &[0, 2])] {
            tx.send(Ok(only(rv, members))).await.expect("send");
        }
        until("the watch to be read during the second pass", || {
            tx.capacity() == 8
        })
        .await;
        assert_eq!(metrics.reconciles.get(), 2, "still in the second pass");
        geth.gate.add_permits(1);
        until("the newest snapshot to be taken in", || {
            metrics.members.get() == 2 && metrics.reconciles.get() >= 3
        })
        .await;
        // A marker event after the burst: its pass is the next one.
        tx.send(Ok(only("15", &[0]))).await.expect("send");
        until("the marker to be taken in", || metrics.members.get() == 1).await;
        until("the marker's pass", || metrics.reconciles.get() >= 5).await;
        let _ = stop.send(());
    };
    tokio::join!(
        r.event_loop(async {
            let _ = stopped.await;
        }),
        driver
    );
    assert_eq!(
        metrics.reconciles.get(),
        5,
        "the first two passes, the one after the start's create (which wrote nothing), one for \
         the three events, one for the marker"
    );
}

#[tokio::test]
async fn the_first_pass_registers_from_the_watchs_list_without_a_registry_read_of_its_own() {
    // The registry holds geth-1 and geth-2; this pod (geth-0) is not in it.
    let mut listed = snapshot("10");
    listed.members.remove("geth-0");
    let mut reg = MockPeerRegistry::new();
    reg.expect_snapshot().times(0);
    // The list is there at once: it is taken before the start's create is
    // made (none is, here; one that was would write nothing).
    reg.expect_create().returning(|_| Ok(None));
    let registered = Arc::new(tokio::sync::Notify::new());
    let upserted = registered.clone();
    let after = snapshot("11");
    reg.expect_upsert().times(1).returning(move |_| {
        upserted.notify_one();
        Ok(after.clone())
    });
    let list = listed.clone();
    reg.expect_watch().times(1).returning(move || {
        futures::stream::iter([Ok(list.clone())])
            .chain(futures::stream::pending())
            .boxed()
    });
    let mut g = geth("10.0.0.1");
    g.expect_add_peer().returning(|_| Ok(true));
    g.expect_peer_events()
        .returning(|| Err(geth_ipc::Error::ConnectionLost));
    let metrics = Arc::new(Metrics::new());
    let mut r = runner_with(g, reg, settings(pod_ip()), metrics.clone());
    r.event_loop(registered.notified()).await;
    assert_eq!(metrics.reconciles.get(), 1, "registered in the first pass");
    // The write runs on past the pass; shutting down takes it in.
    r.finish_writing(std::time::Duration::from_secs(1)).await;
    assert_eq!(
        held_version(&r).as_deref(),
        Some("11"),
        "the registration's own snapshot is held"
    );
}

#[test]
fn a_watch_error_alone_makes_a_pass_due_that_reads_the_registry() {
    let mut r = runner(MockAdminApi::new(), pod_ip());
    let mut watch = quiet_watch(true);
    r.on_snapshot(snapshot("10"));
    let mut errors = WatchItems::default();
    errors.push(Some(Err(peer_registry::Error::TooLarge { bytes: 1 })));
    assert!(
        r.take_watch_items(errors, &mut watch),
        "a pass is due at once, not at the next resync"
    );
    assert!(r.reread_due, "that pass reads the registry");
}

/// The outcome of the writes in flight, once they land.
async fn landed<G: AdminApi>(r: &mut Runner<G, MockPeerRegistry>) -> crate::execute::Written {
    let inflight = r.writing.as_mut().expect("in flight");
    inflight.done().await.expect("outcome")
}

/// A write whose snapshot is older than the one held (the lease layout's
/// delete of a Lease already gone, before the watch reports it) makes no pass
/// due: that pass would plan the same write again at once, in a loop at the
/// apiserver's pace. A newer one does, and so does a pass that held writes
/// back while it was in flight.
#[tokio::test]
async fn a_write_older_than_the_snapshot_held_makes_no_pass_due() {
    let mut reg = MockPeerRegistry::new();
    let mut results = vec![only("13", &[0]), only("10", &[0])];
    reg.expect_remove()
        .times(2)
        .returning(move |_| Ok(results.pop().expect("two writes")));
    let mut r = runner_with(
        MockAdminApi::new(),
        reg,
        settings(pod_ip()),
        Arc::new(Metrics::new()),
    );
    r.on_snapshot(only("12", &[0, 2]));
    let remove = || vec![reconcile_core::RegistryAction::Remove(vec![record(2)])];

    r.start_writing(remove());
    let stale = landed(&mut r).await;
    assert_eq!(r.take_written(stale).map_err(|e| e.kind()), Ok(false));
    assert_eq!(held_version(&r).as_deref(), Some("12"));

    r.start_writing(remove());
    r.held_back = true;
    let newer = landed(&mut r).await;
    assert_eq!(r.take_written(newer).map_err(|e| e.kind()), Ok(true));
    assert_eq!(held_version(&r).as_deref(), Some("13"));
}

/// A removal the engine plans while a registry write is in flight waits for
/// it, and is not reported meanwhile: no MemberRemoved notice (a Kubernetes
/// Event) and no WARN for a removal not made. The pass after the write lands
/// plans it again, makes it and reports it once.
#[tokio::test]
async fn a_removal_held_back_behind_a_write_in_flight_is_reported_only_when_made() {
    let hooks = Arc::new(Recorded::default());
    let mut s = settings(pod_ip());
    s.hooks = hooks.clone();
    // geth-2's pod was seen deleted (pod evidence): removed at once.
    let mut snap = snapshot("11");
    if let Some(rec) = snap.members.get_mut("geth-2") {
        rec.pod_uid = Some("uid-2".into());
    }
    let mut landed = snap.clone();
    landed.resource_version = Some("12".into());
    let mut reg = MockPeerRegistry::new();
    reg.expect_upsert().returning(move |_| Ok(landed.clone()));
    let mut r = runner_with(MockAdminApi::new(), reg, s, Arc::new(Metrics::new()));
    r.on_snapshot(snap);
    let pod = |ip: &str| core::PodObservation {
        uid: None,
        ip: Some(ip.into()),
    };
    let pods = crate::pass::Pods {
        pods: Some(BTreeMap::from([
            ("geth-0".to_owned(), pod("10.0.0.1")),
            ("geth-1".to_owned(), pod("10.0.0.2")),
        ])),
        gone: BTreeMap::from([("geth-2".to_owned(), "uid-2".to_owned())]),
    };
    let me = me();
    let removed = |h: &Recorded| {
        h.0.lock()
            .expect("lock")
            .iter()
            .filter(|n| matches!(n, crate::notice::Notice::MemberRemoved { pod, .. } if pod == "geth-2"))
            .count()
    };

    r.start_writing(vec![core::RegistryAction::Upsert(record(0))]);
    let held = r.plan(jiff::Timestamp::now(), &me, &pods);
    assert!(held.registry.is_empty(), "held back: {held:?}");
    assert_eq!(removed(&hooks), 0, "no notice for a removal not made");

    r.finish_writing(Duration::from_secs(1)).await;
    let made = r.plan(jiff::Timestamp::now(), &me, &pods);
    assert!(
        matches!(&made.registry[..], [core::RegistryAction::Remove(recs)] if recs[0].pod == "geth-2"),
        "planned again once the write landed: {made:?}"
    );
    assert_eq!(removed(&hooks), 1, "reported once, when made");
}
