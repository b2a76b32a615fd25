//! Deterministic simulation of a fleet: many sidecar loops (the real runner,
//! [`Sidecar::run_until`](crate::Sidecar::run_until)) against one [`MemoryStore`] (through
//! the registry under test, by default the ConfigMap implementation's
//! compare-and-swap code in memory) and [`FakeGeth`](geth_ipc::fake::FakeGeth)
//! nodes on a [`FakeNet`](geth_ipc::fake::FakeNet), on tokio's paused clock, with
//! seeded random faults.
//!
//! [`run`] runs one seed with the default [`SimConfig`]; [`run_with`] runs
//! one with yours: the fleet's size, the fault kinds, the engine's
//! configuration, and your own [`PeerRegistry`] (see [`SimConfig::registry`]).
//!
//! A run is a function of its configuration and seed: the runtime is
//! single-threaded with a paused clock, every `select!` of the runner is
//! `biased`, the resync jitter and the registry's backoff are seeded or zero,
//! and nothing iterates a hash map. A failing seed is printed with the command
//! that replays it:
//! `SIM_SEED=<seed> cargo test -p sidecar-runtime --lib sim:: -- --nocapture`
//! (`SIM_TRACE=debug` adds the sidecars' logs).
//!
//! # Faults
//! geth restarts (down up to 3 min), pod moves (the sidecar stops, gracefully or
//! killed; geth comes back at a new IP with the same key under a new pod UID),
//! network partitions (up to 5 min), registry outages (every call fails with 503,
//! up to 2 min), stale watch events (an older snapshot delivered again), clock
//! skew (each sidecar's wall clock is off by up to ±90 s, drawn per pod),
//! **one-pair link cuts** (the path between one observer and one member cut in
//! both directions, geth link included, for 30 s to ~7 min, while every other
//! pair stays connected: a broken path, a NetworkPolicy between two pods) and
//! **blind observers** (one sidecar's probes all fail and its indirect-probe
//! requests go unanswered, for 30 s to ~7 min, while its geth links stay up: a
//! blocked probe port or a DNS outage on that pod alone; asked by others, it
//! answers that the suspect is unreachable). Partitions, outages, cuts and
//! blind observers each come one at a time; faults on one node do not overlap.
//!
//! # Invariants, checked at every step (each fault, and every 5 simulated s)
//! 1. **No live member is ever removed**: a removal of a member's current
//!    registration while its geth is up and reachable from a majority of the
//!    fleet's nodes (itself included; a node whose geth is down does not
//!    count) throughout the last [`RECOVERY_SLACK`] is a
//!    violation, whatever the faults. A cut or a blind observer never makes a
//!    member dead. This needs removal by agreement
//!    ([`confirmations_needed`](reconcile_core::Config::confirmations_needed),
//!    default 2): with 0, one end of a cut path removes the other.
//! 2. **No removal without evidence**: a removal of a member's current
//!    registration needs that member to have been unreachable from the
//!    remover (geth down, moving, across a partition or a cut) from at least
//!    `dead_after` before the removal until at most [`RECOVERY_SLACK`] before it.
//! 3. **A partitioned minority removes nobody**: a sidecar on a side of a
//!    partition that holds at most half the nodes removes no other member.
//! 4. **The mesh is full within [`CONVERGENCE_BOUND`] after the faults stop**:
//!    every geth connected to every other (geth's own view, `admin_peers`), the
//!    registry holding exactly the live registrations.
//! 5. **Nothing is written twice for nothing**: no upsert of a record identical
//!    to the stored one; then, in a quiet 10 minutes, no registry write and no
//!    geth admin call at all; at the end every sidecar deregisters on SIGTERM.
//!
//! # What it leaves out
//! Pod evidence (READ_PODS) and Kubernetes Events are off: removal rests on
//! reachability and agreement alone, the stricter case. Probes are answered
//! from the simulation's truth (no identity check, no reused IPs, no DNS
//! names: members advertise pod IPs). The registry under test's own `watch` is
//! not used: the simulation feeds every sidecar's watch itself after each
//! write, in a fixed order. The fake geth connects at once (no 35 s redial
//! timer, no inbound throttle), see [`geth_ipc::fake`]. One fleet, one
//! registry layout, no legacy (`static-nodes.json`-only) members.

use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::Duration;

use peer_registry::{MemoryRegistry, MemoryStore, PeerRegistry, RetryPolicy};
use reconcile_core as core;

use world::World;

mod registry;
mod schedule;
#[cfg(test)]
mod tests;
mod truth;
mod world;

/// How soon after the last fault ends every node must be fully meshed.
pub const CONVERGENCE_BOUND: Duration = Duration::from_secs(60);
/// How long before a removal the member may have become reachable again (the
/// remover's probe of it had not run yet): two probe intervals.
pub const RECOVERY_SLACK: Duration = Duration::from_secs(10);
/// The fault phase's length.
const FAULT_PHASE: Duration = Duration::from_secs(15 * 60);
/// The quiet phase after convergence.
const QUIET: Duration = Duration::from_secs(10 * 60);
/// Steps between faults.
const TICK: Duration = Duration::from_secs(5);
/// How often each sidecar probes the members it is not connected to.
const PROBE_INTERVAL: Duration = Duration::from_secs(5);
/// Each sidecar's periodic resync.
const RESYNC: Duration = Duration::from_secs(30);
/// The largest clock skew of a pod, either way.
const MAX_SKEW_SECS: i64 = 90;

/// The default registry's backoff in the simulation: zero, so retries
/// interleave deterministically (the delay would come from the thread's RNG).
pub const SIM_RETRY: RetryPolicy = RetryPolicy {
    max_attempts: 200,
    base_delay: Duration::ZERO,
    max_delay: Duration::ZERO,
};

/// Makes the registry under test for one sidecar (called at each sidecar
/// start), on the simulation's shared store.
pub type RegistryFactory = Arc<dyn Fn(&MemoryStore) -> Arc<dyn PeerRegistry> + Send + Sync>;

/// Which kinds of fault the schedule draws from. All on by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(clippy::struct_excessive_bools)] // one toggle per kind, by design
pub struct FaultKinds {
    /// geth stops and starts again (up to 3 min).
    pub geth_restarts: bool,
    /// The pod goes (SIGTERM or killed) and comes back at a new IP under a
    /// new UID (up to 90 s).
    pub pod_moves: bool,
    /// The nodes split in two sides (up to 5 min).
    pub partitions: bool,
    /// Every registry call fails with 503 (up to 2 min).
    pub registry_outages: bool,
    /// An older snapshot is delivered again on a sidecar's watch.
    pub stale_watch: bool,
    /// Each pod's wall clock is off by up to ±90 s.
    pub clock_skew: bool,
    /// The path between one observer and one member is cut, both directions
    /// (30 s to ~7 min); every other pair stays connected.
    pub link_cuts: bool,
    /// One observer's probes all fail and its asks go unanswered (30 s to
    /// ~7 min) while its geth links stay up.
    pub blind_observers: bool,
}

impl Default for FaultKinds {
    fn default() -> Self {
        Self {
            geth_restarts: true,
            pod_moves: true,
            partitions: true,
            registry_outages: true,
            stale_watch: true,
            clock_skew: true,
            link_cuts: true,
            blind_observers: true,
        }
    }
}

/// What a simulation runs: the fleet, the faults, the engine's
/// configuration and the registry under test. [`SimConfig::default`] is
/// what [`run`] uses.
///
/// ```
/// use std::sync::Arc;
/// use peer_registry::{MemoryRegistry, PeerRegistry};
/// use sidecar_runtime::sim::{self, SimConfig};
///
/// let config = SimConfig {
///     nodes: 3..=4,
///     registry: Arc::new(|store| -> Arc<dyn PeerRegistry> {
///         Arc::new(MemoryRegistry::on(store).with_retry_policy(sim::SIM_RETRY))
///     }),
///     ..SimConfig::default()
/// };
/// let outcome = sim::run_with(&config, 7).expect("every invariant holds");
/// assert!((3..=4).contains(&outcome.nodes));
/// ```
#[derive(Clone)]
pub struct SimConfig {
    /// The fleet's size, drawn per seed. Default: 3 to 7 nodes.
    pub nodes: RangeInclusive<usize>,
    /// How many faults the schedule draws over the 15-minute fault phase.
    /// Default: 3 to 12.
    pub faults_per_run: RangeInclusive<usize>,
    /// The fault kinds drawn. Default: all.
    pub faults: FaultKinds,
    /// The engine's configuration for every sidecar. Default:
    /// [`reconcile_core::Config::default`] (removal by agreement of 2 other
    /// members). Invariant 1 holds only with agreement: with
    /// `confirmations_needed: 0` a cut path removes live members.
    pub engine: core::Config,
    /// Makes each sidecar's registry on the simulation's shared store. The
    /// simulation wraps it (outages, stale watch events, checks of every
    /// write) and reads the store for the invariants, so the registry must
    /// keep its state in that store (the ConfigMap layout's schema). Runs stay
    /// deterministic only if it draws no randomness and sleeps for no time
    /// (retries without backoff, as [`SIM_RETRY`]). Its own `watch` is not
    /// used. Default: [`MemoryRegistry`] with [`SIM_RETRY`].
    pub registry: RegistryFactory,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            nodes: 3..=7,
            faults_per_run: 3..=12,
            faults: FaultKinds::default(),
            engine: core::Config::default(),
            registry: Arc::new(|store| -> Arc<dyn PeerRegistry> {
                Arc::new(MemoryRegistry::on(store).with_retry_policy(SIM_RETRY))
            }),
        }
    }
}

impl std::fmt::Debug for SimConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimConfig")
            .field("nodes", &self.nodes)
            .field("faults_per_run", &self.faults_per_run)
            .field("faults", &self.faults)
            .field("engine", &self.engine)
            .finish_non_exhaustive()
    }
}

/// What one seeded run did.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// A digest of every registry call and every step's state.
    pub digest: u64,
    /// Nodes in the fleet.
    pub nodes: usize,
    /// Faults injected.
    pub faults: Vec<String>,
    /// From the last fault's end to a full mesh.
    pub converged_after: Duration,
    /// Members removed by sidecars (self-deregistrations excluded).
    pub removals: usize,
    /// Registry writes over the whole run.
    pub writes: u32,
}

/// Why a seeded run failed: the invariants it broke, with the seed that
/// replays it.
#[derive(Debug)]
pub struct Failure {
    /// The seed that replays the run.
    pub seed: u64,
    /// The invariants broken, each with what broke it.
    pub violations: Vec<String>,
    /// The faults injected, in order.
    pub faults: Vec<String>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "seed {} broke an invariant (replay: SIM_SEED={} cargo test -p sidecar-runtime --lib sim:: -- --nocapture)",
            self.seed, self.seed
        )?;
        for v in &self.violations {
            writeln!(f, "  violation: {v}")?;
        }
        writeln!(f, "  faults:")?;
        for x in &self.faults {
            writeln!(f, "    {x}")?;
        }
        Ok(())
    }
}

/// Runs one seeded simulation with the default [`SimConfig`] on its own
/// paused single-threaded runtime.
pub fn run(seed: u64) -> Result<Outcome, Failure> {
    run_with(&SimConfig::default(), seed)
}

/// Runs one seeded simulation with `config` on its own paused
/// single-threaded runtime (call it outside any tokio runtime): the typed
/// outcome, or the invariants broken with the seed that replays the run.
pub fn run_with(config: &SimConfig, seed: u64) -> Result<Outcome, Failure> {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return Err(Failure {
                seed,
                violations: vec![format!("cannot build a runtime: {e}")],
                faults: Vec::new(),
            });
        }
    };
    rt.block_on(async move {
        // tokio's timer counts whole milliseconds from when the runtime was
        // built, and the paused clock starts a few microseconds off that grid;
        // after the first advance it is on it. Starting there makes every
        // deadline (all whole milliseconds from the start) fall in the same tick
        // in every run, so ties break the same way.
        tokio::time::sleep(Duration::from_millis(1)).await;
        World::new(config, seed).run().await
    })
}
