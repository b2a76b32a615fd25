//! The simulation's own runs: every invariant over many seeds, and replay.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

use futures::stream::BoxStream;
use geth_ipc::Enode;
use peer_registry::{MemberRecord, Snapshot};

use super::*;

/// `SIM_TRACE=<filter>` logs the sidecars of the runs (e.g. `debug`).
fn trace() {
    if let Ok(filter) = std::env::var("SIM_TRACE") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
}

fn runs() -> std::ops::Range<u64> {
    trace();
    if let Some(seed) = std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        return seed..seed + 1;
    }
    let n = std::env::var("SIM_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    0..n
}

/// A run that takes longer than this in real time is stuck: a sidecar loops
/// without ever waiting, so the paused clock never moves (in production: a
/// busy loop).
const STUCK_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

/// Runs the seeds on every core; a seed that does not finish within
/// [`STUCK_AFTER`] is reported as stuck.
fn run_all(seeds: std::ops::Range<u64>) -> Vec<(u64, Result<Outcome, String>)> {
    run_all_with(&SimConfig::default(), seeds)
}

/// [`run_all`] with `config`.
fn run_all_with(
    config: &SimConfig,
    seeds: std::ops::Range<u64>,
) -> Vec<(u64, Result<Outcome, String>)> {
    let workers = std::thread::available_parallelism().map_or(1, usize::from);
    let (tx, rx) = std::sync::mpsc::channel();
    let next = Arc::new(std::sync::atomic::AtomicU64::new(seeds.start));
    let in_flight = Arc::new(Mutex::new(BTreeSet::new()));
    for _ in 0..workers {
        let (tx, next, in_flight, end, config) = (
            tx.clone(),
            next.clone(),
            in_flight.clone(),
            seeds.end,
            config.clone(),
        );
        std::thread::spawn(move || {
            loop {
                let seed = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if seed >= end {
                    break;
                }
                in_flight
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(seed);
                let result = run_with(&config, seed).map_err(|f| f.to_string());
                in_flight
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&seed);
                if tx.send((seed, result)).is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);
    let mut results = Vec::new();
    for _ in seeds.clone() {
        match rx.recv_timeout(STUCK_AFTER) {
            Ok(r) => results.push(r),
            Err(_) => {
                let stuck = in_flight
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone();
                for seed in stuck {
                    results.push((
                        seed,
                        Err(format!(
                            "seed {seed} is stuck: no run finished for {STUCK_AFTER:?} of real \
                             time; a sidecar loops without waiting, so the paused clock never \
                             moves (replay: SIM_SEED={seed} SIM_TRACE=debug cargo test -p \
                             sidecar-runtime --lib sim:: -- --nocapture)"
                        )),
                    ));
                }
                break;
            }
        }
    }
    results.sort_by_key(|(seed, _)| *seed);
    results
}

#[test]
fn seeded_fault_runs_keep_every_invariant() {
    let started = std::time::Instant::now();
    let results = run_all(runs());
    let mut failures = Vec::new();
    let mut worst = Duration::ZERO;
    let (mut removals, mut faults, mut writes, mut nodes) = (0, 0, 0, 0);
    for (seed, result) in &results {
        match result {
            Ok(o) => {
                if std::env::var_os("SIM_DIGESTS").is_some() {
                    eprintln!("seed {seed} digest {:016x} writes {}", o.digest, o.writes);
                }
                writes += u64::from(o.writes);
                nodes += o.nodes;
                worst = worst.max(o.converged_after);
                removals += o.removals;
                faults += o.faults.len();
                if std::env::var_os("SIM_SEED").is_some() {
                    eprintln!("{o:#?}");
                }
            }
            Err(f) => {
                eprintln!("{f}");
                failures.push(*seed);
            }
        }
    }
    let count = results.len();
    eprintln!(
        "{count} runs in {:?}: {nodes} nodes, {faults} fault steps, {removals} removals \
         by evidence, {writes} registry writes, slowest convergence after the last fault \
         {worst:?}",
        started.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{} of {count} seeds failed: {failures:?} (details above; replay one with SIM_SEED)",
        failures.len()
    );
    assert_eq!(count as u64, runs().end - runs().start, "runs went missing");
    // The faults did make sidecars remove members: the evidence checks ran.
    assert!(
        count < 50 || removals > 0,
        "no run removed anybody: the faults are too mild"
    );
}

#[test]
fn a_seed_replays_to_the_same_trace() {
    // Two passes over the same seeds, on worker threads in a different
    // interleaving: every run's trace (each registry call and every step's
    // state) must come out the same.
    let digests = || -> Vec<(u64, u64)> {
        run_all(0..40)
            .into_iter()
            .map(|(seed, r)| (seed, r.map_or(0, |o| o.digest)))
            .collect()
    };
    let (a, b) = (digests(), digests());
    assert_eq!(a.len(), 40);
    assert!(a.iter().all(|(_, d)| *d != 0), "a seed failed: {a:?}");
    assert_eq!(a, b, "a seed ran differently the second time");
    let distinct: BTreeSet<u64> = a.iter().map(|(_, d)| *d).collect();
    assert_eq!(distinct.len(), a.len(), "two seeds ran the same");
}

/// A registry under test: the in-memory one with another retry policy,
/// counting its calls.
struct Counting {
    inner: MemoryRegistry,
    calls: Arc<AtomicUsize>,
}

impl Counting {
    fn count(&self) {
        self.calls.fetch_add(1, Ordering::Relaxed);
    }
}

#[async_trait::async_trait]
impl PeerRegistry for Counting {
    async fn snapshot(&self) -> peer_registry::Result<Snapshot> {
        self.count();
        self.inner.snapshot().await
    }
    async fn upsert(&self, record: MemberRecord) -> peer_registry::Result<Snapshot> {
        self.count();
        self.inner.upsert(record).await
    }
    async fn remove(&self, expected: Vec<MemberRecord>) -> peer_registry::Result<Snapshot> {
        self.count();
        self.inner.remove(expected).await
    }
    async fn remove_legacy(&self, enodes: Vec<Enode>) -> peer_registry::Result<Snapshot> {
        self.count();
        self.inner.remove_legacy(enodes).await
    }
    fn watch(&self) -> BoxStream<'static, peer_registry::Result<Snapshot>> {
        self.inner.watch()
    }
}

#[test]
fn a_users_registry_runs_through_the_simulation() {
    let calls = Arc::new(AtomicUsize::new(0));
    let made = Arc::new(AtomicUsize::new(0));
    let (c, m) = (calls.clone(), made.clone());
    let config = SimConfig {
        nodes: 3..=5,
        registry: Arc::new(move |store| -> Arc<dyn PeerRegistry> {
            m.fetch_add(1, Ordering::Relaxed);
            Arc::new(Counting {
                inner: MemoryRegistry::on(store).with_retry_policy(RetryPolicy {
                    max_attempts: 50,
                    base_delay: Duration::ZERO,
                    max_delay: Duration::ZERO,
                }),
                calls: c.clone(),
            })
        }),
        ..SimConfig::default()
    };
    for (seed, result) in run_all_with(&config, 0..6) {
        let o = result.unwrap_or_else(|f| panic!("seed {seed}: {f}"));
        assert!((3..=5).contains(&o.nodes), "seed {seed}: {} nodes", o.nodes);
    }
    assert!(
        made.load(Ordering::Relaxed) >= 3 * 6,
        "a registry per sidecar start"
    );
    assert!(
        calls.load(Ordering::Relaxed) > 0,
        "the sidecars called the user's registry"
    );
}

#[test]
fn without_agreement_a_cut_path_removes_live_members() {
    // One observer's view alone (confirmations_needed 0): the two ends of a
    // cut path remove each other; invariant 1 must catch it.
    let config = SimConfig {
        faults: FaultKinds {
            geth_restarts: false,
            pod_moves: false,
            partitions: false,
            registry_outages: false,
            stale_watch: false,
            clock_skew: false,
            link_cuts: true,
            blind_observers: false,
        },
        engine: core::Config {
            confirmations_needed: 0,
            ..core::Config::default()
        },
        ..SimConfig::default()
    };
    let results = run_all_with(&config, 0..20);
    let caught = results
        .iter()
        .filter(|(_, r)| r.as_ref().is_err_and(|f| f.contains("a live member")))
        .count();
    assert!(
        caught >= 10,
        "only {caught} of 20 runs of cuts alone caught a live member's removal: {results:#?}"
    );
}
