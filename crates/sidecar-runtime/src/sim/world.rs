//! The fleet and its driver: the nodes, their sidecars, the fault schedule
//! drawn from the seed, and the run's phases (faults, convergence, quiet,
//! shutdown).

use std::collections::BTreeSet;
use std::hash::{Hash, Hasher};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use geth_ipc::fake::{FakeGeth, FakeNet, test_enode};
use geth_ipc::{AdminApi, Host, NodeId};
use peer_registry::{MemoryStore, Snapshot};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use super::registry::{SimRegistry, view};
use super::schedule::Step;
use super::truth::{SimClock, SimProber, Span, Truth, end_span, lock};
use super::{
    CONVERGENCE_BOUND, Failure, MAX_SKEW_SECS, Outcome, PROBE_INTERVAL, QUIET, RESYNC, SimConfig,
    TICK,
};
use crate::Settings;
use crate::identity::AdvertiseMode;
use crate::metrics::Metrics;

/// A running sidecar.
pub(super) struct Sidecar {
    pub(super) stop: tokio::sync::oneshot::Sender<()>,
    pub(super) task: tokio::task::JoinHandle<()>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) stale: futures::channel::mpsc::UnboundedSender<Snapshot>,
}

pub(super) struct Node {
    pub(super) pod: String,
    pub(super) geth: FakeGeth,
    pub(super) ip: Ipv4Addr,
    pub(super) incarnation: u32,
    pub(super) skew: jiff::SignedDuration,
    pub(super) sidecar: Option<Sidecar>,
    /// Busy with a fault until then (faults on one node do not overlap).
    pub(super) busy_until: Duration,
}

/// One seeded run.
pub(super) struct World {
    pub(super) seed: u64,
    pub(super) rng: StdRng,
    pub(super) net: FakeNet,
    pub(super) store: MemoryStore,
    pub(super) nodes: Vec<Node>,
    pub(super) truth: Arc<Mutex<Truth>>,
    pub(super) config: SimConfig,
    pub(super) epoch: jiff::Timestamp,
    pub(super) start: Instant,
    pub(super) next_ip: u32,
    pub(super) history: Vec<Snapshot>,
    pub(super) faults: Vec<String>,
}

impl World {
    pub(super) fn new(config: &SimConfig, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let n = rng.random_range(config.nodes.clone()).max(1);
        let net = FakeNet::new();
        let start = Instant::now();
        let mut nodes = Vec::with_capacity(n);
        for i in 0..n {
            let ip = Ipv4Addr::new(10, 0, 0, i as u8 + 1);
            let Ok(enode) = test_enode(i as u64, Host::Ip(ip.into()), 30303) else {
                unreachable!("port 30303 is valid");
            };
            nodes.push(Node {
                pod: format!("geth-{i}"),
                geth: net.join(enode),
                ip,
                incarnation: 0,
                skew: skew(&mut rng, config),
                sidecar: None,
                busy_until: Duration::ZERO,
            });
        }
        let truth = Truth {
            start,
            dead_after: config.engine.dead_after,
            gethes: nodes.iter().map(|n| n.geth.clone()).collect(),
            uids: nodes.iter().map(|n| uid(&n.pod, 0)).collect(),
            down: vec![Vec::new(); n],
            partitions: Vec::new(),
            cuts: Vec::new(),
            blind: vec![Vec::new(); n],
            outage: false,
            violations: Vec::new(),
            trace: Vec::new(),
            removals: 0,
            watchers: Vec::new(),
        };
        Self {
            seed,
            rng,
            net,
            store: MemoryStore::new(),
            nodes,
            truth: Arc::new(Mutex::new(truth)),
            config: config.clone(),
            epoch: jiff::Timestamp::from_second(1_795_000_000)
                .unwrap_or(jiff::Timestamp::UNIX_EPOCH),
            start,
            next_ip: 0,
            history: Vec::new(),
            faults: Vec::new(),
        }
    }

    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    fn start_sidecar(&mut self, i: usize) {
        let node = &self.nodes[i];
        let mut settings = Settings::new(node.pod.clone(), AdvertiseMode::PodIp(node.ip.into()));
        settings.pod_ip = Some(node.ip.to_string());
        settings.pod_uid = Some(uid(&node.pod, node.incarnation));
        settings.engine = self.config.engine.clone();
        settings.resync = RESYNC;
        settings.probe_interval = PROBE_INTERVAL;
        settings.prober = Arc::new(SimProber {
            from: i,
            truth: self.truth.clone(),
        });
        settings.clock = Arc::new(SimClock {
            epoch: self.epoch,
            start: self.start,
            skew: node.skew,
        });
        settings.seed = Some(self.rng.random());
        let (stale_tx, stale_rx) = futures::channel::mpsc::unbounded();
        let registry = SimRegistry {
            inner: (self.config.registry)(&self.store),
            store: self.store.clone(),
            node: i,
            truth: self.truth.clone(),
            stale: Mutex::new(Some(stale_rx)),
        };
        let sidecar =
            crate::Sidecar::new(Arc::new(node.geth.clone()), Arc::new(registry), settings);
        let metrics = sidecar.metrics();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(sidecar.run_until(async {
            let _ = stopped.await;
        }));
        self.nodes[i].sidecar = Some(Sidecar {
            stop,
            task,
            metrics,
            stale: stale_tx,
        });
    }

    async fn stop_sidecar(&mut self, i: usize, graceful: bool) {
        if let Some(s) = self.nodes[i].sidecar.take() {
            if graceful {
                let _ = s.stop.send(());
                let _ = s.task.await;
            } else {
                s.task.abort();
                let _ = s.task.await;
            }
        }
    }

    async fn apply(&mut self, step: Step) {
        let now = self.now();
        if std::env::var_os("SIM_TRACE").is_some() {
            eprintln!("{now:?}: {step:?}");
        }
        self.faults.push(format!("{now:?}: {step:?}"));
        match step {
            Step::GethDown(i) => {
                self.nodes[i].geth.stop();
                lock(&self.truth).down[i].push(Span {
                    from: now,
                    to: None,
                });
            }
            Step::GethUp(i) => {
                self.nodes[i].geth.start();
                end_span(&mut lock(&self.truth).down[i], now);
            }
            Step::PodGone(i, graceful) => {
                lock(&self.truth).down[i].push(Span {
                    from: now,
                    to: None,
                });
                self.stop_sidecar(i, graceful).await;
                self.nodes[i].geth.stop();
            }
            Step::PodBack(i) => {
                self.next_ip += 1;
                let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 1, 0, 0)) + self.next_ip);
                let node = &mut self.nodes[i];
                node.ip = ip;
                node.incarnation += 1;
                node.skew = skew(&mut self.rng, &self.config);
                node.geth.move_to(Host::Ip(ip.into()), 30303);
                node.geth.start();
                {
                    let mut t = lock(&self.truth);
                    t.uids[i] = uid(&node.pod, node.incarnation);
                    end_span(&mut t.down[i], now);
                }
                self.start_sidecar(i);
            }
            Step::Partition(sides) => {
                let ids = |want: bool| -> Vec<NodeId> {
                    self.nodes
                        .iter()
                        .zip(&sides)
                        .filter(|(_, s)| **s == want)
                        .map(|(n, _)| n.geth.id())
                        .collect()
                };
                self.net.partition(&ids(true), &ids(false));
                lock(&self.truth).partitions.push((
                    Span {
                        from: now,
                        to: None,
                    },
                    sides,
                ));
            }
            Step::Heal => {
                self.net.heal();
                if let Some((span, _)) = lock(&self.truth).partitions.last_mut() {
                    span.to = Some(now);
                }
            }
            Step::Cut(i, j) => {
                self.net
                    .block(self.nodes[i].geth.id(), self.nodes[j].geth.id());
                lock(&self.truth).cuts.push((
                    Span {
                        from: now,
                        to: None,
                    },
                    i,
                    j,
                ));
            }
            Step::CutEnd(i, j) => {
                self.net
                    .unblock(self.nodes[i].geth.id(), self.nodes[j].geth.id());
                if let Some((span, _, _)) = lock(&self.truth).cuts.last_mut() {
                    span.to = Some(now);
                }
            }
            Step::Blind(i) => lock(&self.truth).blind[i].push(Span {
                from: now,
                to: None,
            }),
            Step::Sees(i) => end_span(&mut lock(&self.truth).blind[i], now),
            Step::OutageStart => lock(&self.truth).outage = true,
            Step::OutageEnd => lock(&self.truth).outage = false,
            Step::StaleWatch(i) => {
                let pick = (!self.history.is_empty())
                    .then(|| self.rng.random_range(0..self.history.len()));
                if let (Some(k), Some(s)) = (pick, &self.nodes[i].sidecar) {
                    let _ = s.stale.unbounded_send(self.history[k].clone());
                }
            }
        }
    }

    /// Records the step's state in the trace and keeps old snapshots for
    /// stale watch events.
    fn observe(&mut self) {
        let snap = self.registry_view();
        let now = self.now();
        let peers: Vec<usize> = self
            .nodes
            .iter()
            .map(|n| n.geth.static_peers().len())
            .collect();
        lock(&self.truth).trace.push(format!(
            "{now:?} step: rv {:?} members {:?} statics {peers:?}",
            snap.resource_version,
            snap.members.keys().collect::<Vec<_>>()
        ));
        if self.history.len() >= 16 {
            self.history.remove(0);
        }
        self.history.push(snap);
    }

    fn registry_view(&self) -> Snapshot {
        view(&self.store)
    }

    /// What keeps the mesh from being full now, if anything.
    async fn mesh_gaps(&self) -> Vec<String> {
        let mut gaps = Vec::new();
        let snap = self.registry_view();
        for (i, n) in self.nodes.iter().enumerate() {
            let uid = uid(&n.pod, n.incarnation);
            match snap.members.get(&n.pod) {
                Some(r)
                    if r.pod_uid.as_deref() == Some(uid.as_str())
                        && r.enode.same_address(&n.geth.enode()) => {}
                other => gaps.push(format!(
                    "registry holds {:?} for {}, not {}",
                    other.map(|r| r.enode.to_string()),
                    n.pod,
                    n.geth.enode()
                )),
            }
            let peers: BTreeSet<NodeId> = match n.geth.peers().await {
                Ok(p) => p.into_iter().map(|p| p.id).collect(),
                Err(e) => {
                    gaps.push(format!("node {i}: admin_peers failed: {e}"));
                    continue;
                }
            };
            // geth's static set too: a restarted geth is reconnected at once
            // by the others' static entries; its sidecar must re-apply its own.
            let statics: BTreeSet<NodeId> = n.geth.static_peers().into_iter().collect();
            for (j, m) in self.nodes.iter().enumerate() {
                if i != j && !peers.contains(&m.geth.id()) {
                    gaps.push(format!("node {i} not connected to node {j}"));
                }
                if i != j && !statics.contains(&m.geth.id()) {
                    gaps.push(format!("node {i} does not have node {j} as a static peer"));
                }
            }
        }
        if snap.members.len() != self.nodes.len() {
            gaps.push(format!("registry has {} members", snap.members.len()));
        }
        gaps
    }

    fn activity(&self) -> (u32, u64) {
        let geth: u64 = self
            .nodes
            .iter()
            .filter_map(|n| n.sidecar.as_ref())
            .map(|s| s.metrics.geth_actions_total())
            .sum();
        (self.store.writes(), geth)
    }

    fn fail(&self, violations: Vec<String>) -> Failure {
        Failure {
            seed: self.seed,
            violations,
            faults: self.faults.clone(),
        }
    }

    fn violations(&self) -> Vec<String> {
        lock(&self.truth).violations.clone()
    }

    pub(super) async fn run(mut self) -> Result<Outcome, Failure> {
        let mut steps = self.schedule();
        // Sidecars start within the first 5 s, in a seeded order.
        let mut order: Vec<usize> = (0..self.nodes.len()).collect();
        for k in (1..order.len()).rev() {
            order.swap(k, self.rng.random_range(0..=k));
        }
        for i in order {
            tokio::time::sleep(Duration::from_millis(self.rng.random_range(0..1000))).await;
            self.start_sidecar(i);
        }
        let mut next_tick = self.now() + TICK;
        while let Some(entry) = steps.first_entry() {
            let at = entry.key().0;
            if next_tick < at {
                tokio::time::sleep_until(self.start + next_tick).await;
                next_tick += TICK;
            } else {
                let step = entry.remove();
                tokio::time::sleep_until(self.start + at).await;
                self.apply(step).await;
            }
            self.observe();
            let v = self.violations();
            if !v.is_empty() {
                return Err(self.fail(v));
            }
        }
        // Every fault has ended: the mesh must be full within the bound.
        let calm = self.now();
        let converged_after = loop {
            let gaps = self.mesh_gaps().await;
            if gaps.is_empty() {
                break self.now() - calm;
            }
            if self.now() - calm > CONVERGENCE_BOUND {
                let mut v = self.violations();
                v.push(format!(
                    "mesh not full {CONVERGENCE_BOUND:?} after the last fault: {}",
                    gaps.join("; ")
                ));
                return Err(self.fail(v));
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            self.observe();
        };
        // Quiet: nothing to do, nothing done.
        let before = self.activity();
        tokio::time::sleep(QUIET).await;
        self.observe();
        let after = self.activity();
        let mut v = self.violations();
        if after != before {
            v.push(format!(
                "in {QUIET:?} without a fault: {} registry write(s) and {} geth admin call(s)",
                after.0 - before.0,
                after.1 - before.1
            ));
        }
        let gaps = self.mesh_gaps().await;
        if !gaps.is_empty() {
            v.push(format!(
                "mesh lost its fullness while quiet: {}",
                gaps.join("; ")
            ));
        }
        // SIGTERM to every sidecar: all deregister.
        for i in 0..self.nodes.len() {
            self.stop_sidecar(i, true).await;
        }
        let left = self.registry_view().members.len();
        if left != 0 {
            v.push(format!(
                "{left} member(s) left after every sidecar got SIGTERM"
            ));
        }
        if !v.is_empty() {
            return Err(self.fail(v));
        }
        let t = lock(&self.truth);
        if let Some(path) = std::env::var_os("SIM_DUMP") {
            let _ = std::fs::write(path, t.trace.join("\n"));
        }
        let mut h = std::hash::DefaultHasher::new();
        t.trace.hash(&mut h);
        Ok(Outcome {
            digest: h.finish(),
            nodes: self.nodes.len(),
            faults: self.faults.clone(),
            converged_after,
            removals: t.removals,
            writes: self.store.writes(),
        })
    }
}

/// A pod's clock skew, drawn from the seed (zero without clock skew).
fn skew(rng: &mut StdRng, config: &SimConfig) -> jiff::SignedDuration {
    let secs = rng.random_range(-MAX_SKEW_SECS..=MAX_SKEW_SECS);
    jiff::SignedDuration::from_secs(if config.faults.clock_skew { secs } else { 0 })
}

/// The pod UID of `pod`'s `incarnation`-th pod.
pub(super) fn uid(pod: &str, incarnation: u32) -> String {
    format!("{pod}-uid-{incarnation}")
}
