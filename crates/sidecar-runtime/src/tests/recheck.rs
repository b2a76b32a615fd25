//! The loop's recheck timer ([`Runner::recheck_at`]): a recheck in the past
//! fires once, not at every turn of the loop.

use super::*;

/// Virtual time the loop runs for.
const RUN_FOR: Duration = Duration::from_secs(30);
/// Passes the retry schedule allows in [`RUN_FOR`] while geth is down: the
/// first retries at 200, 400 and 800 ms, then one a second (about 32), plus
/// the recheck's own pass and a resync or two.
const MOST_PASSES: u64 = 40;
/// `node_info` calls after which the loop is taken to spin: the paused clock
/// does not move while it does, so the test would never end.
const SPINNING: u64 = 1_000;
/// Real time after which the loop is taken to spin.
const REAL_TIME_GUARD: std::time::Duration = std::time::Duration::from_secs(20);

#[tokio::test(start_paused = true)]
async fn a_recheck_in_the_past_while_geth_is_down_fires_once_and_passes_follow_the_retry_schedule()
{
    let calls = Arc::new(AtomicU64::new(0));
    let counted = calls.clone();
    let started = std::time::Instant::now();
    let mut g = MockAdminApi::new();
    g.expect_node_info().returning(move || {
        let n = counted.fetch_add(1, Ordering::Relaxed) + 1;
        // Fail the test, rather than hang it, when the loop spins.
        assert!(
            n < SPINNING && started.elapsed() < REAL_TIME_GUARD,
            "the loop spins: {n} passes in {:?} of real time without the paused clock \
             moving (a stale recheck fires again and again)",
            started.elapsed()
        );
        Err(geth_ipc::Error::Connect {
            endpoint: "/geth/geth.ipc".into(),
            reason: "connection refused".into(),
        })
    });
    g.expect_connection_generation().returning(|| 1);
    g.expect_peer_events()
        .returning(|| Err(geth_ipc::Error::ConnectionLost));
    let mut reg = registry(snapshot("10"));
    reg.expect_watch()
        .returning(|| futures::stream::pending().boxed());
    let metrics = Arc::new(Metrics::new());
    let mut r = runner_with(g, reg, settings(pod_ip()), metrics.clone());
    // Set by an engine report of an earlier pass; geth has gone down since.
    let now = r.s.clock.now();
    r.recheck_at = Some(now - jiff::SignedDuration::from_secs(60));
    let began = tokio::time::Instant::now();
    r.event_loop(tokio::time::sleep(RUN_FOR)).await;
    assert_eq!(began.elapsed(), RUN_FOR, "the loop ran until shutdown");
    let passes = calls.load(Ordering::Relaxed);
    assert_eq!(
        passes,
        metrics.reconciles.get() + 1,
        "each pass asks geth once, and the start once more (to register while the \
         registry is read)"
    );
    assert!(
        (20..=MOST_PASSES).contains(&passes),
        "{passes} passes in {RUN_FOR:?} with geth down: the retry schedule allows about one a \
         second (at most {MOST_PASSES})"
    );
    assert_eq!(r.recheck_at, None, "the stale recheck was consumed");
}
