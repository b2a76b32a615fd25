//! A resync's registry read while a snapshot is held: it may not hold the
//! loop on an apiserver that accepts but does not answer.

use futures::stream::BoxStream;
use peer_registry::{MemberRecord, PeerRegistry};

use super::*;

/// A registry whose reads never answer; everything else is the mock's.
struct HungReads(MockPeerRegistry);

#[async_trait::async_trait]
impl PeerRegistry for HungReads {
    async fn snapshot(&self) -> peer_registry::Result<Snapshot> {
        std::future::pending().await
    }
    async fn upsert(&self, record: MemberRecord) -> peer_registry::Result<Snapshot> {
        self.0.upsert(record).await
    }
    async fn remove(&self, expected: Vec<MemberRecord>) -> peer_registry::Result<Snapshot> {
        self.0.remove(expected).await
    }
    async fn remove_legacy(&self, enodes: Vec<Enode>) -> peer_registry::Result<Snapshot> {
        self.0.remove_legacy(enodes).await
    }
    fn watch(&self) -> BoxStream<'static, peer_registry::Result<Snapshot>> {
        self.0.watch()
    }
}

#[tokio::test(start_paused = true)]
async fn a_resync_read_that_never_answers_does_not_hold_the_pass() {
    let metrics = Arc::new(Metrics::new());
    let mut r = Runner::new(
        Arc::new(geth("10.0.0.1")),
        Arc::new(HungReads(registry(only("10", &[0])))),
        settings(pod_ip()),
        metrics.clone(),
        Arc::new(Health::new(None)),
    );
    r.on_snapshot(only("10", &[0]));
    r.reread_due = true;
    let began = tokio::time::Instant::now();
    let pass = tokio::time::timeout(Duration::from_secs(600), r.pass()).await;
    assert!(
        pass.is_ok(),
        "the pass waited 600 s on a registry read that never answers"
    );
    assert!(began.elapsed() < Duration::from_secs(60));
    assert!(r.reread_due, "the read is tried again at the next pass");
    let unavailable = metrics
        .registry_errors
        .get_or_create(&Metrics::kind("unavailable"))
        .get();
    assert_eq!(unavailable, 1, "the unanswered read is counted");
}

/// A read whose version is below one already taken in (etcd restored or
/// wiped): the operator gets a Warning Event naming both versions, and the
/// watch is opened anew. A read that moves forward tells nothing.
#[test]
fn a_read_whose_version_went_back_is_a_notice_and_reopens_the_watch() {
    let hooks = Arc::new(Recorded::default());
    let mut s = settings(pod_ip());
    s.hooks = hooks.clone();
    let mut reg = registry(only("10", &[0]));
    reg.expect_watch()
        .returning(|| futures::stream::pending().boxed());
    let mut r = runner_with(geth("10.0.0.1"), reg, s, Arc::new(Metrics::new()));
    r.on_snapshot(only("900", &[0, 1]));
    r.on_read(only("950", &[0, 1]));
    assert!(hooks.0.lock().expect("lock").is_empty());
    assert!(r.reopened.is_none());
    r.on_read(only("12", &[0]));
    let notices = hooks.0.lock().expect("lock").clone();
    assert!(
        matches!(notices.as_slice(), [crate::notice::Notice::RegistryWentBack { detail }]
            if detail.contains("950") && detail.contains("12")),
        "{notices:?}"
    );
    assert!(r.reopened.is_some(), "the watch is opened anew");
}
