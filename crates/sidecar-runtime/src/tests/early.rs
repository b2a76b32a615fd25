//! A start's registration while its watch lists ([`PeerRegistry::create`]).

use std::sync::Mutex;

use super::*;

/// A watch whose list (`list`) arrives only once `made` fires: the
/// registry's answer to a create sent first.
fn list_after(
    made: futures::channel::oneshot::Receiver<()>,
    list: Snapshot,
) -> futures::stream::BoxStream<'static, peer_registry::Result<Snapshot>> {
    futures::stream::once(async move {
        let _ = made.await;
        Ok(list)
    })
    .chain(futures::stream::pending())
    .boxed()
}

/// Fires `tx` once.
fn fire(tx: &Mutex<Option<futures::channel::oneshot::Sender<()>>>) {
    if let Some(tx) = tx.lock().ok().and_then(|mut t| t.take()) {
        let _ = tx.send(());
    }
}

/// `snap` with `record` written into it (a create's snapshot).
fn holding(snap: &Snapshot, record: MemberRecord) -> Snapshot {
    let mut snap = snap.clone();
    snap.members.insert(record.pod.clone(), record);
    snap
}

/// The upserts a registry was asked for.
type Upserts = Arc<Mutex<Vec<MemberRecord>>>;

/// A registry whose watch lists `listed` only once the start's create was
/// made (which `create` answers), that is never read otherwise, and whose
/// upserts are kept in the returned list (each answered with version 11).
fn gated(
    listed: Snapshot,
    create: impl Fn(MemberRecord) -> peer_registry::Result<Option<Snapshot>> + Send + 'static,
) -> (MockPeerRegistry, Upserts) {
    let (made, list_sent) = futures::channel::oneshot::channel();
    let made = Mutex::new(Some(made));
    let mut reg = MockPeerRegistry::new();
    reg.expect_snapshot().times(0);
    reg.expect_create().times(1).returning(move |rec| {
        let answer = create(rec);
        fire(&made);
        answer
    });
    let upserted = Upserts::default();
    let seen = upserted.clone();
    let after = snapshot("11");
    reg.expect_upsert().returning(move |rec| {
        seen.lock().expect("lock").push(rec);
        Ok(after.clone())
    });
    let gate = Mutex::new(Some(list_sent));
    reg.expect_watch().times(1).returning(move || {
        let rx = gate
            .lock()
            .ok()
            .and_then(|mut g| g.take())
            .expect("one watch");
        list_after(rx, listed.clone())
    });
    (reg, upserted)
}

/// geth as node 0, answering at once, every dial counted in `dials`.
fn geth_up(dials: Arc<AtomicU64>) -> MockAdminApi {
    let mut g = geth("10.0.0.1");
    g.expect_add_peer().returning(move |_| {
        dials.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    });
    g.expect_peer_events()
        .returning(|| Err(geth_ipc::Error::ConnectionLost));
    g
}

/// The registry as it stands before geth-0 registers.
fn without_geth_0() -> Snapshot {
    let mut listed = snapshot("10");
    listed.members.remove("geth-0");
    listed
}

/// A new pod registers while its watch lists: the create goes out before
/// the list arrives (the watch here holds its list until then), the first
/// pass takes the record in flight as ours and plans no upsert, and the
/// create's snapshot is held once it lands. No read of its own either.
#[tokio::test]
async fn a_new_pod_registers_while_its_watch_lists() {
    let after = snapshot("11");
    let (reg, _) = gated(without_geth_0(), move |rec| {
        assert_eq!(rec.pod, "geth-0");
        Ok(Some(holding(&after, rec)))
    });
    let metrics = Arc::new(Metrics::new());
    let mut r = runner_with(
        geth_up(Arc::default()),
        reg,
        settings(pod_ip()),
        metrics.clone(),
    );
    let held = metrics.clone();
    r.event_loop(until("the create's pass", move || {
        held.reconciles.get() >= 2
    }))
    .await;
    assert_eq!(count(&metrics.registry_writes, "create"), 1);
    assert_eq!(
        count(&metrics.registry_writes, "upsert"),
        0,
        "one write at start: the create"
    );
    assert_eq!(
        held_version(&r).as_deref(),
        Some("11"),
        "the create's snapshot"
    );
    assert_eq!(
        r.me.as_ref().map(|m| m.pod.as_str()),
        Some("geth-0"),
        "deregistered on SIGTERM"
    );
}

/// A restarted sidecar whose pod has a record: the create keeps it, and the
/// first passes update the record to the pod's new address, keeping its
/// registration time. Both answers a create gives then: none (the lease
/// layout's 409) and the snapshot it read (the ConfigMap layout's
/// compare-and-swap), which is not counted or announced as a registration.
#[tokio::test]
async fn a_restarted_pod_keeps_its_registration_time_and_its_passes_update_the_rest() {
    for read in [false, true] {
        restarted_pod(read).await;
    }
}

async fn restarted_pod(create_returns_the_read: bool) {
    // geth-0 registered long ago at 10.0.0.9; it now runs at 10.0.0.1.
    let mut listed = snapshot("10");
    let old = record(0);
    if let Some(rec) = listed.members.get_mut("geth-0") {
        rec.enode = rec.enode.with_host("10.0.0.9".parse().expect("ip"));
        rec.pod_ip = Some("10.0.0.9".into());
    }
    let read = listed.clone();
    let (reg, upserted) = gated(listed, move |_| {
        Ok(create_returns_the_read.then(|| read.clone()))
    });
    let hooks = Arc::new(Recorded::default());
    let mut s = settings(pod_ip());
    s.hooks = hooks.clone();
    let metrics = Arc::new(Metrics::new());
    let mut r = runner_with(geth_up(Arc::default()), reg, s, metrics.clone());
    let written = upserted.clone();
    r.event_loop(until("the upsert", move || {
        !written.lock().expect("lock").is_empty()
    }))
    .await;
    r.finish_writing(Duration::from_secs(1)).await;
    let upserts = upserted.lock().expect("lock").clone();
    assert_eq!(upserts.len(), 1, "one upsert: {upserts:?}");
    assert_eq!(upserts[0].enode, enode(0), "the new address");
    assert_eq!(
        upserts[0].registered_at, old.registered_at,
        "the registration time kept"
    );
    assert_eq!(
        count(&metrics.registry_writes, "create"),
        0,
        "nothing created"
    );
    let notices = hooks.0.lock().expect("lock").clone();
    assert!(
        !notices
            .iter()
            .any(|n| matches!(n, crate::notice::Notice::Registered { enode }
            if enode.contains("10.0.0.9"))),
        "the kept record is not announced as this start's registration: {notices:?}"
    );
}

/// A create that writes nothing (the registry does not create, or the pod's
/// record was there and is gone by the time the list is read): the first
/// pass took the create as this pod's record, so the pass after it lands
/// registers the pod, at once and not at the next resync.
#[tokio::test]
async fn a_create_that_wrote_nothing_is_followed_by_the_registration_at_once() {
    let (reg, upserted) = gated(without_geth_0(), |_| Ok(None));
    // Nothing but the create's outcome makes a pass here.
    let mut quiet = settings(pod_ip());
    quiet.resync = Duration::from_secs(3600);
    quiet.probe_interval = Duration::from_secs(3600);
    let metrics = Arc::new(Metrics::new());
    let mut r = runner_with(geth_up(Arc::default()), reg, quiet, metrics.clone());
    let written = upserted.clone();
    r.event_loop(until("the registration", move || {
        !written.lock().expect("lock").is_empty()
    }))
    .await;
    let upserts = upserted.lock().expect("lock").clone();
    assert_eq!(upserts.len(), 1, "{upserts:?}");
    assert_eq!(upserts[0].pod, "geth-0");
}

/// The wall clock, `ahead` seconds ahead of the system's.
struct Ahead(std::sync::atomic::AtomicI64);

impl crate::ports::Clock for Ahead {
    fn now(&self) -> jiff::Timestamp {
        jiff::Timestamp::now() + jiff::SignedDuration::from_secs(self.0.load(Ordering::Relaxed))
    }
}

/// The list arrives long after the create landed (5 s here, more than the
/// dial grace): the other members saw this pod's record land then, and
/// dial it at the end of their grace. This pod, the newer of each pair,
/// leaves them the first dial instead of dialling on its first pass (two
/// dials at once make geth drop both links for ~35 s).
#[tokio::test]
async fn a_list_that_comes_long_after_the_create_leaves_the_first_dial_to_the_others() {
    let clock = Arc::new(Ahead(0.into()));
    let later = clock.clone();
    let after = snapshot("11");
    let (reg, _) = gated(without_geth_0(), move |rec| {
        later.0.store(5, Ordering::Relaxed);
        Ok(Some(holding(&after, rec)))
    });
    let dialled = Arc::new(AtomicU64::new(0));
    let mut s = settings(pod_ip());
    s.clock = clock;
    let metrics = Arc::new(Metrics::new());
    let mut r = runner_with(geth_up(dialled.clone()), reg, s, metrics.clone());
    let passes = metrics.clone();
    r.event_loop(until("the create's pass", move || {
        passes.reconciles.get() >= 2
    }))
    .await;
    assert_eq!(
        dialled.load(Ordering::Relaxed),
        0,
        "the others dial first: they saw this pod's record land 5 s ago"
    );
    assert!(r.recheck_at.is_some(), "dials them itself if they do not");
}
