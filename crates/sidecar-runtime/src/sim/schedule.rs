//! The fault schedule: every fault's start and end, drawn from the seed
//! before the run starts.

use std::collections::BTreeMap;
use std::time::Duration;

use rand::Rng;
use rand::rngs::StdRng;

use super::FAULT_PHASE;
use super::world::World;

/// A fault's start or end, at a simulated time.
#[derive(Debug, Clone)]
pub(super) enum Step {
    GethDown(usize),
    GethUp(usize),
    /// The pod is deleted: graceful (SIGTERM) or killed.
    PodGone(usize, bool),
    /// The pod is back at a new IP under a new UID.
    PodBack(usize),
    Partition(Vec<bool>),
    Heal,
    OutageStart,
    OutageEnd,
    StaleWatch(usize),
    /// The path between two nodes is cut, both directions.
    Cut(usize, usize),
    /// The cut path is restored.
    CutEnd(usize, usize),
    /// The node's probes all fail and its asks go unanswered.
    Blind(usize),
    /// The node's probes work again.
    Sees(usize),
}

/// The kinds of fault the schedule draws from (stale watch events twice as
/// often as the others).
#[derive(Debug, Clone, Copy)]
pub(super) enum Kind {
    GethRestart,
    PodMove,
    Partition,
    Outage,
    StaleWatch,
    Cut,
    Blind,
}

impl World {
    fn pick_idle(&mut self, now: Duration) -> Option<usize> {
        let idle: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].busy_until <= now)
            .collect();
        (!idle.is_empty()).then(|| idle[self.rng.random_range(0..idle.len())])
    }

    /// The kinds of fault the configuration enables, each once (stale watch
    /// events twice).
    pub(super) fn kinds(&self) -> Vec<Kind> {
        let f = &self.config.faults;
        [
            (f.geth_restarts, Kind::GethRestart),
            (f.pod_moves, Kind::PodMove),
            (f.partitions, Kind::Partition),
            (f.registry_outages, Kind::Outage),
            (f.stale_watch, Kind::StaleWatch),
            (f.stale_watch, Kind::StaleWatch),
            (f.link_cuts, Kind::Cut),
            (f.blind_observers, Kind::Blind),
        ]
        .into_iter()
        .filter_map(|(on, k)| on.then_some(k))
        .collect()
    }

    /// Draws the fault schedule. Partitions, outages, cuts and blind
    /// observers each come one at a time (a cut is ONE observer's path to ONE
    /// member; a second blind helper would be a second fault on the same
    /// question); node faults do not overlap on one node.
    pub(super) fn schedule(&mut self) -> BTreeMap<(Duration, u32), Step> {
        let mut steps = BTreeMap::new();
        let mut seq = 0u32;
        let mut push = |steps: &mut BTreeMap<(Duration, u32), Step>, at: Duration, s: Step| {
            seq += 1;
            steps.insert((at, seq), s);
        };
        let kinds = self.kinds();
        if kinds.is_empty() {
            return steps;
        }
        let count = self.rng.random_range(self.config.faults_per_run.clone());
        let (mut partition_until, mut outage_until) = (Duration::ZERO, Duration::ZERO);
        let (mut cut_until, mut blind_until) = (Duration::ZERO, Duration::ZERO);
        let mut times: Vec<Duration> = (0..count)
            .map(|_| Duration::from_secs(self.rng.random_range(10..FAULT_PHASE.as_secs())))
            .collect();
        times.sort();
        let n = self.nodes.len();
        for at in times {
            let secs =
                |rng: &mut StdRng, lo: u64, hi: u64| Duration::from_secs(rng.random_range(lo..=hi));
            match kinds[self.rng.random_range(0..kinds.len())] {
                Kind::GethRestart => {
                    if let Some(i) = self.pick_idle(at) {
                        let d = secs(&mut self.rng, 1, 180);
                        self.nodes[i].busy_until = at + d;
                        push(&mut steps, at, Step::GethDown(i));
                        push(&mut steps, at + d, Step::GethUp(i));
                    }
                }
                Kind::PodMove => {
                    if let Some(i) = self.pick_idle(at) {
                        let d = secs(&mut self.rng, 1, 90);
                        let graceful = self.rng.random_bool(0.7);
                        self.nodes[i].busy_until = at + d;
                        push(&mut steps, at, Step::PodGone(i, graceful));
                        push(&mut steps, at + d, Step::PodBack(i));
                    }
                }
                Kind::Partition if at >= partition_until && n > 1 => {
                    let mut sides: Vec<bool> = (0..n).map(|_| self.rng.random_bool(0.5)).collect();
                    if sides.iter().all(|s| *s) || sides.iter().all(|s| !*s) {
                        sides[0] = !sides[0];
                    }
                    let d = secs(&mut self.rng, 10, 300);
                    partition_until = at + d;
                    push(&mut steps, at, Step::Partition(sides));
                    push(&mut steps, at + d, Step::Heal);
                }
                Kind::Outage if at >= outage_until => {
                    let d = secs(&mut self.rng, 5, 120);
                    outage_until = at + d;
                    push(&mut steps, at, Step::OutageStart);
                    push(&mut steps, at + d, Step::OutageEnd);
                }
                // Long enough, mostly, to outlast dead_after.
                Kind::Cut if at >= cut_until && n > 1 => {
                    let i = self.rng.random_range(0..n);
                    let j = (i + self.rng.random_range(1..n)) % n;
                    let d = secs(&mut self.rng, 30, 400);
                    cut_until = at + d;
                    push(&mut steps, at, Step::Cut(i, j));
                    push(&mut steps, at + d, Step::CutEnd(i, j));
                }
                Kind::Blind if at >= blind_until => {
                    let i = self.rng.random_range(0..n);
                    let d = secs(&mut self.rng, 30, 400);
                    blind_until = at + d;
                    push(&mut steps, at, Step::Blind(i));
                    push(&mut steps, at + d, Step::Sees(i));
                }
                // One of a kind is already on: a stale watch event instead.
                Kind::StaleWatch | Kind::Partition | Kind::Outage | Kind::Cut | Kind::Blind => {
                    let i = self.rng.random_range(0..n);
                    if self.config.faults.stale_watch {
                        push(&mut steps, at, Step::StaleWatch(i));
                    }
                }
            }
        }
        steps
    }
}
