//! The event loop: watch events, geth peer events, probes and a jittered resync
//! all lead to one reconcile pass; reconcile-core decides, this module acts.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::{FutureExt as _, StreamExt};
use geth_ipc::{AdminApi, Enode, Host, NodeId, PeerEvent, PeerEventKind, PeerEventStream};
use peer_registry::{MemberRecord, PeerRegistry, Snapshot};
use rand::{Rng, SeedableRng};
use reconcile_core as core;
use tracing::{debug, info, warn};

use crate::config::RunArgs;
use crate::events::{Events, Notice};
use crate::http::Health;
use crate::identity::AdvertiseMode;
use crate::metrics::Metrics;
use crate::pods::{PodEvidence, PodWatch};

/// How many geth nodes' admin calls one pass has in flight at once.
const GETH_CONCURRENCY: usize = 16;

/// Calls geth for `actions`: one node's actions in plan order (a move is a
/// removePeer of the old address, then an addPeer of the new one, and geth
/// ignores an addPeer of an id it holds), different nodes' at once, up to
/// [`GETH_CONCURRENCY`] in flight. geth's RPC server answers the requests
/// of one connection concurrently; one at a time, a 30-node burst spent
/// 1.2 s in 25 serial addPeer calls (mesh bench, ~45 ms each under load).
/// After a connection failure no further call is started: the rest would
/// fail the same way. The outcomes, grouped by node, in plan order.
async fn call_geth<'a, G: AdminApi>(
    geth: &G,
    actions: &'a [core::GethAction],
) -> Vec<(&'a core::GethAction, geth_ipc::Result<bool>)> {
    let mut by_node: Vec<(NodeId, Vec<&core::GethAction>)> = Vec::new();
    for a in actions {
        let id = a.enode().node_id();
        match by_node.iter_mut().find(|(n, _)| *n == id) {
            Some((_, group)) => group.push(a),
            None => by_node.push((id, vec![a])),
        }
    }
    let down = std::sync::atomic::AtomicBool::new(false);
    let calls: Vec<_> = by_node
        .into_iter()
        .map(|(_, group)| call_in_order(geth, &down, group))
        .collect();
    let done: Vec<Vec<_>> = futures::stream::iter(calls)
        .buffered(GETH_CONCURRENCY)
        .collect()
        .await;
    done.into_iter().flatten().collect()
}

/// Calls geth for one node's `actions`, in order, unless `down` is set (a
/// connection failure, which this sets too).
async fn call_in_order<'a, G: AdminApi>(
    geth: &G,
    down: &std::sync::atomic::AtomicBool,
    actions: Vec<&'a core::GethAction>,
) -> Vec<(&'a core::GethAction, geth_ipc::Result<bool>)> {
    use core::GethAction as A;
    let mut out = Vec::with_capacity(actions.len());
    for action in actions {
        if down.load(Ordering::Relaxed) {
            break;
        }
        let res = match action {
            A::AddPeer(e) => geth.add_peer(e).await,
            A::RemovePeer(e) => geth.remove_peer(e).await,
            A::AddTrustedPeer(e) => geth.add_trusted_peer(e).await,
            A::RemoveTrustedPeer(e) => geth.remove_trusted_peer(e).await,
        };
        if res
            .as_ref()
            .is_err_and(geth_ipc::Error::is_connection_error)
        {
            down.store(true, Ordering::Relaxed);
        }
        out.push((action, res));
    }
    out
}

/// Everything the loop needs, resolved from flags.
pub(crate) struct Settings {
    pub(crate) pod: String,
    pub(crate) pod_ip: Option<String>,
    pub(crate) pod_uid: Option<String>,
    pub(crate) advertise: AdvertiseMode,
    pub(crate) p2p_port: Option<u16>,
    pub(crate) engine: core::Config,
    pub(crate) resync: Duration,
    pub(crate) probe_interval: Duration,
    pub(crate) listen: SocketAddr,
    pub(crate) liveness_timeout: Option<Duration>,
    /// The member pods' watch, when READ_PODS is on.
    pub(crate) pods: Option<PodWatch>,
    /// Notified by the pod watch when a pod appears, moves or goes.
    pub(crate) pod_changes: Arc<tokio::sync::Notify>,
    /// Kubernetes Events on this pod.
    pub(crate) events: Events,
    /// How members are probed (TCP; the simulation's network in tests).
    pub(crate) prober: Prober,
    /// The wall clock (the system's; a simulated one in tests).
    pub(crate) clock: Clock,
    /// Seeds the resync jitter (from the OS when `None`).
    pub(crate) seed: Option<u64>,
}

impl Settings {
    pub(crate) fn from_args(run: &RunArgs, namespace: &str) -> anyhow::Result<Self> {
        let pod = run
            .pod()
            .context("POD_NAME and HOSTNAME are both unset or empty (set POD_NAME with the Downward API: fieldRef metadata.name)")?;
        let advertise = AdvertiseMode::resolve(
            run.advertise,
            run.pod_ip().as_deref(),
            &run.dns_template,
            &pod,
            &run.service_name,
            namespace,
        )
        .map_err(anyhow::Error::msg)?;
        Ok(Self {
            pod,
            pod_ip: run.pod_ip(),
            pod_uid: run.pod_uid(),
            advertise,
            p2p_port: run.p2p_port,
            engine: core::Config {
                trusted: run.trusted,
                dead_after: run.dead_after,
                grace_after_register: run.registration_grace,
                legacy_members: run.legacy_members,
                member_cidrs: run.member_cidrs.0.clone(),
                ..core::Config::default()
            },
            resync: run.resync_interval,
            probe_interval: run.probe_interval,
            listen: run.listen,
            liveness_timeout: run.checked_liveness_timeout().map_err(anyhow::Error::msg)?,
            pods: None,
            pod_changes: Arc::new(tokio::sync::Notify::new()),
            events: Events::disabled(),
            prober: Prober::Tcp,
            clock: Clock::System,
            seed: None,
        })
    }
}

/// Wall-clock time as this sidecar sees it: record timestamps, unreachability
/// clocks, the dial grace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Clock {
    /// The system clock.
    System,
    /// `epoch` at `start` of tokio's (paused) clock, shifted by `skew`: the
    /// simulation's clock, which can be wrong by `skew` like a node's.
    #[cfg(test)]
    Simulated {
        epoch: jiff::Timestamp,
        start: tokio::time::Instant,
        skew: jiff::SignedDuration,
    },
}

impl Clock {
    /// The current time.
    pub(crate) fn now(&self) -> jiff::Timestamp {
        match self {
            Self::System => jiff::Timestamp::now(),
            #[cfg(test)]
            Self::Simulated { epoch, start, skew } => {
                let elapsed = jiff::SignedDuration::try_from(start.elapsed())
                    .unwrap_or(jiff::SignedDuration::MAX);
                epoch
                    .saturating_add(elapsed)
                    .and_then(|t| t.saturating_add(*skew))
                    .unwrap_or(*epoch)
            }
        }
    }
}

/// How a member is probed.
#[derive(Clone)]
pub(crate) enum Prober {
    /// A TCP connect with a 2 s timeout, to [`probe_target`].
    Tcp,
    /// The simulation's network answers whether the member is reachable.
    #[cfg(test)]
    Simulated(Arc<dyn Fn(&Enode) -> bool + Send + Sync>),
}

impl Prober {
    /// Whether the member answers, and where it was probed; `None` when its
    /// host does not resolve.
    async fn probe(&self, enode: &Enode, sidecar_port: u16) -> Option<(bool, ProbeVia)> {
        match self {
            Self::Tcp => {
                let (addr, via) = probe_target(enode, sidecar_port).await?;
                let connect = tokio::net::TcpStream::connect(addr);
                let ok = matches!(
                    tokio::time::timeout(Duration::from_secs(2), connect).await,
                    Ok(Ok(_))
                );
                Some((ok, via))
            }
            #[cfg(test)]
            Self::Simulated(reachable) => Some((reachable(enode), ProbeVia::GethPort)),
        }
    }
}

/// Errors of geth's drop events that mean "registered but never usable".
///
/// geth v1.17.5 reports a network id, genesis or fork id mismatch in the drop
/// event only as "subprotocol error" (the detail stays in geth's debug log), so
/// that counts too. It only marks the peer unusable in reports and metrics; the
/// mark is cleared as soon as the peer completes the eth handshake.
fn is_incompatible(error: &str) -> bool {
    let e = error.to_ascii_lowercase();
    [
        "subprotocol error",
        "network id mismatch",
        "genesis mismatch",
        "fork id rejected",
        "incompatible",
    ]
    .iter()
    .any(|p| e.contains(p))
}

/// The longest wait between retries of a failed pass while geth does not answer.
const GETH_RETRY_CAP: Duration = Duration::from_secs(1);
/// The longest wait between retries of a pass that failed for another reason.
const RETRY_CAP: Duration = Duration::from_secs(5);

/// How long the first pass waits for the registry watch's list before it reads
/// the registry itself (an apiserver that neither answers nor fails).
const FIRST_LIST_WAIT: Duration = Duration::from_secs(5);

/// `base` ± 20 %, in whole milliseconds (tokio's timer resolution; whole
/// milliseconds also keep the simulation's runs identical from run to run).
fn jittered(rng: &mut rand::rngs::StdRng, base: Duration) -> Duration {
    let ms = u64::try_from(base.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rng.random_range(ms - ms / 5..=ms + ms / 5))
}

/// Why one geth action failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ActionError {
    /// geth did not answer (connection lost, timeout): the pass stops.
    GethDown,
    /// geth answered with an error for this action only: the pass goes on.
    Refused,
}

/// geth's state as the log reports it: one line per change.
#[derive(Debug, Clone, PartialEq, Eq)]
enum GethState {
    Unknown,
    Up,
    Down(String),
}

/// Which port a liveness probe of a member targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProbeVia {
    /// geth's p2p port: geth does not throttle our source address.
    GethPort,
    /// The member's sidecar port (ours: every sidecar listens on the same port).
    SidecarPort(u16),
}

/// Where to probe a member, and how: its geth's p2p port, unless geth throttles
/// inbound connections from the address this pod would connect from (see
/// [`geth_ipc::geth_throttles_inbound_from`]): a probe there would make the
/// member's geth refuse our geth's next dial for 30 s, so the member's sidecar
/// port is probed instead. `None` when the member's host does not resolve.
async fn probe_target(enode: &Enode, sidecar_port: u16) -> Option<(SocketAddr, ProbeVia)> {
    let target = tokio::net::lookup_host(format!("{}:{}", enode.host(), enode.tcp_port()))
        .await
        .ok()?
        .next()?;
    // The source address the kernel picks for this destination: a connected
    // UDP socket sends nothing.
    let unspecified: SocketAddr = if target.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let source = std::net::UdpSocket::bind(unspecified)
        .and_then(|s| s.connect(target).and_then(|()| s.local_addr()))
        .map(|a| a.ip())
        .ok();
    Some(probe_addr(target, source, sidecar_port))
}

/// The probe decision: geth's port at `target`, unless geth throttles inbound
/// connections from `source` (unknown: not throttled), then `sidecar_port`.
fn probe_addr(
    target: SocketAddr,
    source: Option<std::net::IpAddr>,
    sidecar_port: u16,
) -> (SocketAddr, ProbeVia) {
    match source {
        Some(ip) if geth_ipc::geth_throttles_inbound_from(ip) => (
            SocketAddr::new(target.ip(), sidecar_port),
            ProbeVia::SidecarPort(sidecar_port),
        ),
        _ => (target, ProbeVia::GethPort),
    }
}

struct Runner<G, R> {
    geth: Arc<G>,
    registry: Arc<R>,
    s: Settings,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    snapshot: Option<Snapshot>,
    applied: BTreeMap<NodeId, Enode>,
    generation: u64,
    geth_state: GethState,
    me: Option<MemberRecord>,
    unreachable_since: BTreeMap<NodeId, jiff::Timestamp>,
    connected: BTreeSet<NodeId>,
    unusable: BTreeMap<NodeId, String>,
    last_problems: Vec<String>,
    /// The engine's problems of the last pass: each is warned once, when it appears.
    last_engine_problems: Vec<String>,
    last_report: String,
    pods_error: Option<String>,
    /// When the engine asked to be consulted again (a new pair's dial grace).
    recheck_at: Option<jiff::Timestamp>,
    /// Since when some missing peers have all been reachable (see [`MESH_LIMIT_AFTER`]).
    stuck_since: Option<jiff::Timestamp>,
    /// The mesh-limit warning is given once per process.
    mesh_limit_warned: bool,
    /// Peers added while geth's static set was unknown (see
    /// [`core::Observation::blind_adds`]), until they connect or are removed.
    blind_adds: BTreeMap<NodeId, jiff::Timestamp>,
    /// Ids this sidecar cleared with removePeer: their static entry is ours.
    cleared: BTreeSet<NodeId>,
    /// Where members were last probed (logged on change).
    probe_via: Option<ProbeVia>,
    /// True once geth restarted under this sidecar: its static set is then
    /// known (empty at the restart, then exactly what we applied).
    static_set_known: bool,
    /// The resync jitter's source ([`Settings::seed`]).
    rng: rand::rngs::StdRng,
    /// When each member's current registration was first seen here.
    registrations_seen: BTreeMap<NodeId, jiff::Timestamp>,
    /// When each registration was seen landing while this sidecar followed the
    /// registry (see `note_new_registrations`).
    registrations_landed: BTreeMap<NodeId, jiff::Timestamp>,
    /// Those of `registrations_landed` first seen in a watch's list.
    registrations_listed: BTreeSet<NodeId>,
    /// Whether the current registry watch has delivered its list: its first
    /// snapshot is that list, the later ones are changes.
    watch_listed: bool,
    /// When the last round of probes started.
    probed_at: Option<jiff::Timestamp>,
}

/// How long reachable members may stay unconnected before the log names geth's
/// peer limits as the likely cause.
const MESH_LIMIT_AFTER: jiff::SignedDuration = jiff::SignedDuration::from_secs(60);

/// Runs the sidecar until SIGTERM/SIGINT, then deregisters and returns.
pub(crate) async fn run<G, R>(geth: Arc<G>, registry: Arc<R>, s: Settings) -> anyhow::Result<()>
where
    G: AdminApi + 'static,
    R: PeerRegistry + 'static,
{
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::new(s.liveness_timeout));
    crate::http::serve(s.listen, health.clone(), metrics.clone()).await?;
    info!(
        pod = %s.pod,
        advertise = ?s.advertise,
        version = env!("CARGO_PKG_VERSION"),
        "geth-peer-sidecar starting"
    );
    run_until(geth, registry, s, metrics, health, shutdown_signal()).await;
    Ok(())
}

/// The loop until `shutdown` completes, then deregistration: what [`run`] does
/// after starting the HTTP endpoints (the simulation runs many of these).
pub(crate) async fn run_until<G, R>(
    geth: Arc<G>,
    registry: Arc<R>,
    s: Settings,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: impl std::future::Future<Output = ()>,
) where
    G: AdminApi + 'static,
    R: PeerRegistry + 'static,
{
    let mut r = Runner::new(geth, registry, s, metrics, health);
    r.event_loop(shutdown).await;
    r.deregister().await;
    r.s.events.close(Duration::from_secs(2)).await;
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => info!("SIGTERM: deregistering and exiting"),
                    _ = tokio::signal::ctrl_c() => info!("SIGINT: deregistering and exiting"),
                }
            }
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the sidecar cleanly");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

/// The registry's watch, as the event loop holds it.
type WatchStream = futures::stream::BoxStream<'static, peer_registry::Result<Snapshot>>;

/// What the registry watch yielded since the event loop last took it in.
#[derive(Default)]
struct WatchItems {
    /// The newest snapshot.
    newest: Option<Snapshot>,
    /// Snapshots replaced by a newer one before they were taken in.
    coalesced: usize,
    errors: Vec<peer_registry::Error>,
    /// The stream ended (it is restarted).
    ended: bool,
}

impl WatchItems {
    fn push(&mut self, item: Option<peer_registry::Result<Snapshot>>) {
        match item {
            Some(Ok(snap)) => {
                if self.newest.replace(snap).is_some() {
                    self.coalesced += 1;
                }
            }
            Some(Err(e)) => self.errors.push(e),
            None => self.ended = true,
        }
    }
}

async fn next_event(events: &mut Option<PeerEventStream>) -> Option<geth_ipc::Result<PeerEvent>> {
    match events {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

impl<G: AdminApi, R: PeerRegistry> Runner<G, R> {
    fn new(
        geth: Arc<G>,
        registry: Arc<R>,
        s: Settings,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> Self {
        let s_seed = s.seed.unwrap_or_else(rand::random);
        Self {
            geth,
            registry,
            s,
            metrics,
            health,
            snapshot: None,
            applied: BTreeMap::new(),
            generation: 0,
            geth_state: GethState::Unknown,
            me: None,
            unreachable_since: BTreeMap::new(),
            connected: BTreeSet::new(),
            unusable: BTreeMap::new(),
            last_problems: Vec::new(),
            last_engine_problems: Vec::new(),
            last_report: String::new(),
            pods_error: None,
            recheck_at: None,
            stuck_since: None,
            mesh_limit_warned: false,
            blind_adds: BTreeMap::new(),
            cleared: BTreeSet::new(),
            probe_via: None,
            static_set_known: false,
            rng: rand::rngs::StdRng::seed_from_u64(s_seed),
            registrations_seen: BTreeMap::new(),
            registrations_landed: BTreeMap::new(),
            registrations_listed: BTreeSet::new(),
            watch_listed: false,
            probed_at: None,
        }
    }

    /// Runs passes on every trigger until `shutdown` completes. Every `select!`
    /// is `biased` (first ready branch wins, in the order written: shutdown,
    /// the registry, geth, timers), so a run on a paused clock with seeded
    /// jitter is deterministic.
    async fn event_loop(&mut self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut watch = self.open_watch();
        // The first pass reads the registry from the watch's list: one list
        // per start instead of a read for the first pass and the watch's list
        // after it, and the watch follows the registry from before this pod
        // registers. (It opened after the first pass before: at N=30 on 2
        // cores those second lists took up to 0.45 s each under load and the
        // last sidecar's watch opened 1.1 s after its start, so it learned of
        // the others that late.) A watch with nothing to say within
        // FIRST_LIST_WAIT leaves the first pass to read the registry itself.
        let first = tokio::select! {
            biased;
            _ = &mut shutdown => return,
            item = watch.next() => Some(item),
            () = tokio::time::sleep(FIRST_LIST_WAIT) => None,
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
        let mut retry_delay = Duration::from_millis(200);
        let mut dirty = true;
        let mut retry_at: Option<tokio::time::Instant> = None;
        let pod_changes = self.s.pod_changes.clone();
        let mut arrived = WatchItems::default();
        loop {
            if dirty {
                dirty = false;
                // A pass may wait on a hung geth or a slow apiserver: SIGTERM
                // abandons it so deregistration fits the pod's grace period.
                //
                // The registry watch is read while a pass runs (its items wait
                // in `arrived`): a burst of events that lands during a pass
                // costs one more pass, not one per event.
                let outcome = {
                    let pass = self.reconcile();
                    tokio::pin!(pass);
                    loop {
                        tokio::select! {
                            biased;
                            _ = &mut shutdown => return,
                            outcome = &mut pass => break outcome,
                            item = watch.next(), if !arrived.ended => arrived.push(item),
                        }
                    }
                };
                match outcome {
                    Ok(()) => {
                        retry_at = None;
                        retry_delay = Duration::from_millis(200);
                    }
                    Err(kind) => {
                        self.metrics
                            .reconcile_errors
                            .get_or_create(&Metrics::kind(kind))
                            .inc();
                        // Waiting for geth costs one stat/connect of a local socket:
                        // poll it at least every second so a sidecar started first
                        // registers within a second of geth. The apiserver gets up
                        // to 5 s between retries.
                        let cap = if kind == "geth" {
                            GETH_RETRY_CAP
                        } else {
                            RETRY_CAP
                        };
                        retry_delay = retry_delay.min(cap);
                        retry_at = Some(tokio::time::Instant::now() + retry_delay);
                        retry_delay = (retry_delay * 2).min(cap);
                    }
                }
                self.health.pass_completed();
                dirty |= self.take_watch_items(std::mem::take(&mut arrived), &mut watch);
                if events.is_none() && self.geth_state == GethState::Up {
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
            let retry = async {
                match retry_at {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            let clock = self.s.clock;
            let recheck = async {
                match self.recheck_at {
                    Some(at) => {
                        let wait = clock.now().duration_until(at);
                        let wait = Duration::try_from(wait).unwrap_or(Duration::ZERO);
                        tokio::time::sleep(wait).await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = &mut shutdown => return,
                item = watch.next() => {
                    // Everything else the watch has ready joins it: one pass for all.
                    let mut items = WatchItems::default();
                    items.push(item);
                    while !items.ended {
                        match watch.next().now_or_never() {
                            Some(item) => items.push(item),
                            None => break,
                        }
                    }
                    dirty |= self.take_watch_items(items, &mut watch);
                },
                ev = next_event(&mut events) => dirty |= self.on_peer_events(ev, &mut events),
                _ = tokio::time::sleep_until(resync_at) => {
                    resync_at = tokio::time::Instant::now() + jittered(&mut self.rng, self.s.resync);
                    debug!("periodic resync");
                    dirty = true;
                }
                _ = tokio::time::sleep_until(probe_at) => {
                    probe_at = tokio::time::Instant::now() + self.s.probe_interval;
                    tokio::select! {
                        biased;
                        _ = &mut shutdown => return,
                        changed = self.probe_members() => dirty |= changed,
                    }
                }
                _ = retry => dirty = true,
                _ = recheck => dirty = true,
                () = pod_changes.notified() => dirty = true,
            }
        }
    }

    /// A new registry watch: its first snapshot will be its list
    /// (`watch_listed`).
    fn open_watch(&mut self) -> WatchStream {
        self.watch_listed = false;
        self.registry.watch()
    }

    /// [`Runner::on_watch_items`], then a new watch in place of `watch` if
    /// that one ended. True when a pass is due.
    fn take_watch_items(&mut self, items: WatchItems, watch: &mut WatchStream) -> bool {
        let ended = items.ended;
        let due = self.on_watch_items(items);
        if ended {
            *watch = self.open_watch();
        }
        due
    }

    /// Takes in what the registry watch yielded since the last look: the
    /// newest snapshot (each is the whole registry, so older ones add nothing)
    /// unless it is stale, and every error. True when a pass is due.
    fn on_watch_items(&mut self, items: WatchItems) -> bool {
        for e in &items.errors {
            self.metrics
                .registry_errors
                .get_or_create(&Metrics::kind(e.kind()))
                .inc();
            warn!(error = %e, "registry watch error; retrying");
        }
        if items.ended {
            warn!("registry watch ended; restarting it");
        }
        if items.coalesced > 0 {
            debug!(
                skipped = items.coalesced,
                "registry watch events taken together; only the newest counts"
            );
        }
        let Some(snap) = items.newest else {
            return false;
        };
        if snap.resource_version.is_none()
            && self
                .snapshot
                .as_ref()
                .is_some_and(|held| held.resource_version.is_some())
        {
            // No registry at all, while the one held has a version: a deletion,
            // or the list of a restarted watch, read while a pass ran, taken
            // before that pass's own write created it. Nothing orders the
            // two, so the next pass reads the registry afresh.
            debug!("registry watch reports no registry; reading it afresh");
            self.snapshot = None;
            return true;
        }
        if self.is_stale(&snap) {
            debug!(
                event = snap.resource_version.as_deref().unwrap_or("-"),
                held = self
                    .snapshot
                    .as_ref()
                    .and_then(|s| s.resource_version.as_deref())
                    .unwrap_or("-"),
                "registry watch event older than the snapshot held; ignored"
            );
            return false;
        }
        let listed = !std::mem::replace(&mut self.watch_listed, true);
        self.take_snapshot(snap, listed);
        true
    }

    /// True when a watch event is older than the snapshot held (typically the
    /// one our own write returned, which the watch delivers only later).
    ///
    /// resourceVersions are opaque in general, but for one object they come from
    /// etcd's revision counter, which only grows: a smaller number is an older
    /// state of the same ConfigMap. Versions that do not parse as numbers (another
    /// storage backend) are never treated as stale, so the watch always wins there.
    fn is_stale(&self, event: &Snapshot) -> bool {
        let held = self
            .snapshot
            .as_ref()
            .and_then(|s| s.resource_version.as_deref());
        match (held, event.resource_version.as_deref()) {
            (Some(held), Some(event)) => match (held.parse::<u64>(), event.parse::<u64>()) {
                (Ok(held), Ok(event)) => event < held,
                _ => false,
            },
            _ => false,
        }
    }

    fn on_snapshot(&mut self, snap: Snapshot) {
        self.take_snapshot(snap, false);
    }

    /// [`Runner::on_snapshot`] for a snapshot that is a watch's list when
    /// `listed` (see `note_new_registrations`).
    fn take_snapshot(&mut self, snap: Snapshot, listed: bool) {
        if snap.problems != self.last_problems {
            for p in &snap.problems {
                warn!(problem = %p, "registry ConfigMap has a problem (it is skipped, and healed on the next write where possible)");
            }
            self.last_problems = snap.problems.clone();
        }
        self.note_new_registrations(&snap, listed);
        self.metrics.members.set(snap.members.len() as i64);
        self.health.registry_synced.store(true, Ordering::Relaxed);
        self.snapshot = Some(snap);
    }

    /// Notes when this sidecar first saw each member's current registration
    /// (a new member, a pod back at a new address, a member that re-registered
    /// after it was removed), on its own clock: the engine's grace and
    /// unreachability clock count from there ([`core::Observation::registrations_seen`]).
    ///
    /// Without it, a member removed while partitioned away re-registers at once
    /// (it is alive) and, trusted by its record's `updated_at` alone, is removed
    /// again as soon as that leaves the grace: at once when the member's clock
    /// runs behind by more than the grace. The simulation (`sim.rs`) found this
    /// remove / re-register loop, which wrote without pause while the partition
    /// lasted.
    ///
    /// Those that land while it follows the registry (not those of its first
    /// read) are also noted in `registrations_landed`, from which a new pair's
    /// dial grace counts ([`core::Observation::registrations_landed`]), and
    /// when `snap` is a watch's list, in `registrations_listed`: when those
    /// landed is unknown ([`core::Observation::registrations_listed`]).
    fn note_new_registrations(&mut self, snap: &Snapshot, listed: bool) {
        let now = self.s.clock.now();
        let held = self.snapshot.as_ref();
        for (pod, record) in &snap.members {
            let known = held
                .and_then(|h| h.members.get(pod))
                .is_some_and(|old| old.same_registration(record) && old.pod_uid == record.pod_uid);
            if !known || !self.registrations_seen.contains_key(&record.node_id) {
                self.registrations_seen.insert(record.node_id, now);
            }
            if !known && held.is_some() {
                self.registrations_landed.insert(record.node_id, now);
                if listed {
                    self.registrations_listed.insert(record.node_id);
                } else {
                    self.registrations_listed.remove(&record.node_id);
                }
            }
        }
        self.registrations_seen
            .retain(|id, _| snap.member_by_node_id(id).is_some());
        self.registrations_landed
            .retain(|id, _| snap.member_by_node_id(id).is_some());
        self.registrations_listed
            .retain(|id| snap.member_by_node_id(id).is_some());
    }

    /// Takes in `first` and every other peer event geth has ready, as the
    /// watch's items are: one pass for all of them. (One pass each before: at
    /// N=30, the 29 links of a node forming meant up to 29 passes, each with
    /// an `admin_peers`, which geth answers by decoding every peer's key.)
    /// Drops the subscription when it ended. True when a pass is due.
    fn on_peer_events(
        &mut self,
        first: Option<geth_ipc::Result<PeerEvent>>,
        events: &mut Option<PeerEventStream>,
    ) -> bool {
        let mut dirty = false;
        let mut next = Some(first);
        while let Some(item) = next {
            match item {
                Some(Ok(ev)) => dirty |= self.on_peer_event(ev),
                Some(Err(e)) => {
                    info!(error = %e, "geth peer-event subscription ended (geth restarted?); checking geth");
                    *events = None;
                    dirty = true;
                }
                None => {
                    *events = None;
                    dirty = true;
                }
            }
            next = events.as_mut().and_then(|s| s.next().now_or_never());
        }
        dirty
    }

    /// Returns true when the event calls for a reconcile (any change of the peer
    /// set but an incompatible peer's drop, which geth's redial repeats).
    fn on_peer_event(&mut self, ev: PeerEvent) -> bool {
        match ev.kind {
            PeerEventKind::Add => {
                self.connected.insert(ev.peer);
                self.blind_adds.remove(&ev.peer);
                self.unreachable_since.remove(&ev.peer);
                // The reports (connected_peers, missing_peers, the summary) are
                // computed by a pass: without one they would lag until the next
                // resync.
                true
            }
            PeerEventKind::Drop => {
                self.connected.remove(&ev.peer);
                let err = ev.error.unwrap_or_default();
                if is_incompatible(&err) {
                    if self.unusable.insert(ev.peer, err.clone()).is_none() {
                        self.s.events.emit(Notice::PeerUnusable {
                            peer: self.peer_name(&ev.peer),
                            error: err.clone(),
                        });
                        warn!(peer = %ev.peer.short(), error = %err, "peer is on another network or genesis: registered but unusable");
                    }
                    self.metrics.unusable_peers.set(self.unusable.len() as i64);
                    false
                } else {
                    debug!(peer = %ev.peer.short(), error = %err, "peer dropped");
                    true
                }
            }
            _ => false,
        }
    }

    /// TCP-probes members this geth is not connected to (at geth's port, or at
    /// their sidecar's where geth would throttle us: [`probe_target`]). True if
    /// anything changed.
    async fn probe_members(&mut self) -> bool {
        let Some(snap) = &self.snapshot else {
            return false;
        };
        let me = self.me.as_ref().map(|m| m.node_id);
        let legacy = snap.legacy.iter().filter(|_| self.s.engine.legacy_members);
        let targets: Vec<(NodeId, Enode)> = snap
            .members
            .values()
            .map(|m| &m.enode)
            .chain(legacy)
            .filter(|e| Some(e.node_id()) != me && !self.connected.contains(&e.node_id()))
            .map(|e| (e.node_id(), e.clone()))
            .collect();
        let started = self.s.clock.now();
        let sidecar_port = self.s.listen.port();
        let prober = &self.s.prober;
        let probes = targets.into_iter().map(|(id, enode)| async move {
            match prober.probe(&enode, sidecar_port).await {
                Some((ok, via)) => (id, ok, Some(via)),
                None => (id, false, None),
            }
        });
        let results = futures::future::join_all(probes).await;
        self.probed_at = Some(started);
        let now = self.s.clock.now();
        let mut changed = false;
        if let Some(via) = results.iter().find_map(|r| r.2)
            && self.probe_via != Some(via)
        {
            self.probe_via = Some(via);
            match via {
                ProbeVia::GethPort => debug!("probing members at their geth p2p port"),
                ProbeVia::SidecarPort(port) => info!(
                    port,
                    "this pod's address is outside geth's LAN ranges, where geth refuses a second \
                     inbound connection from one IP within 30 s: members are probed at their \
                     sidecar's port {port}, never at geth's p2p port (a probe there would delay \
                     the next dial by 30 s)"
                ),
            }
        }
        for via in results.iter().filter_map(|r| r.2) {
            let kind = match via {
                ProbeVia::GethPort => "geth",
                ProbeVia::SidecarPort(_) => "sidecar",
            };
            self.metrics
                .probes
                .get_or_create(&Metrics::kind(kind))
                .inc();
        }
        for (id, ok, _) in results {
            if ok {
                changed |= self.unreachable_since.remove(&id).is_some();
            } else {
                // A new failure starts the clock; an ongoing one lets the engine
                // check whether dead-after has passed.
                if let std::collections::btree_map::Entry::Vacant(e) =
                    self.unreachable_since.entry(id)
                {
                    e.insert(now);
                    debug!(peer = %id.short(), "member unreachable from here");
                }
                changed = true;
            }
        }
        changed
    }

    /// A peer's pod name when it is a member, else its short node id.
    fn peer_name(&self, id: &NodeId) -> String {
        self.snapshot
            .as_ref()
            .and_then(|s| s.member_by_node_id(id))
            .map_or_else(|| id.short().to_string(), |m| m.pod.clone())
    }

    fn set_geth_state(&mut self, state: GethState) {
        if state != self.geth_state {
            match &state {
                GethState::Up => info!("geth IPC answers"),
                GethState::Down(e) => {
                    warn!(error = %e, "waiting for geth IPC (retrying with backoff)")
                }
                GethState::Unknown => {}
            }
            self.health
                .geth_ok
                .store(state == GethState::Up, Ordering::Relaxed);
            self.geth_state = state;
        }
    }

    /// Warns once when reachable members stay unconnected: geth's peer limits
    /// (maxpeers, and its outbound dial cap of maxpeers/3 that --trusted does not
    /// lift) are then the usual cause, which no admin call can change.
    fn note_mesh_limit(&mut self, report: &core::Report, now: jiff::Timestamp) {
        let stuck = !report.missing.is_empty()
            && report
                .missing
                .iter()
                .all(|p| !self.unreachable_since.contains_key(&p.node_id));
        if !stuck {
            self.stuck_since = None;
            self.metrics.peer_limit_suspected.set(0);
            *crate::http::lock(&self.health.peer_limit) = None;
            return;
        }
        let since = *self.stuck_since.get_or_insert(now);
        if now.duration_since(since) >= MESH_LIMIT_AFTER {
            self.metrics.peer_limit_suspected.set(1);
            *crate::http::lock(&self.health.peer_limit) = Some(format!(
                "{} of {} desired peers are reachable but unconnected since {since}: geth's peer \
                 limits (--maxpeers, at most maxpeers/3 outbound dials, which TRUSTED_PEERS does \
                 not lift); start geth with --maxpeers of at least 3 x (members - 1)",
                report.missing.len(),
                report.desired
            ));
        }
        if !self.mesh_limit_warned && now.duration_since(since) >= MESH_LIMIT_AFTER {
            self.mesh_limit_warned = true;
            self.s.events.emit(Notice::PeerLimitReached {
                detail: format!(
                    "{} of {} desired peers are reachable but stayed unconnected for {} s: \
                     geth's peer limits (--maxpeers, at most maxpeers/3 outbound dials, which \
                     TRUSTED_PEERS does not lift); start geth with --maxpeers of at least \
                     3 x (members - 1)",
                    report.missing.len(),
                    report.desired,
                    MESH_LIMIT_AFTER.as_secs()
                ),
            });
            warn!(
                connected = report.connected,
                desired = report.desired,
                "{} reachable member(s) stayed unconnected for {}s: geth's peer limits are the \
                 likely cause (--maxpeers, and at most maxpeers/3 outbound dials, which \
                 TRUSTED_PEERS does not lift); for a full mesh of N nodes start geth with \
                 --maxpeers of at least 3 x (N - 1)",
                report.missing.len(),
                MESH_LIMIT_AFTER.as_secs()
            );
        }
    }

    /// Logs a change of the advertise problem and shows it on /readyz.
    fn set_advertise_problem(&mut self, problem: Option<String>) {
        let mut held = self
            .health
            .advertise_problem
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *held != problem {
            match &problem {
                Some(msg) => warn!("not registering this node, peering with the others: {msg}"),
                None if held.is_some() => info!("the advertised address is usable again"),
                None => {}
            }
            *held = problem;
        }
    }

    fn geth_error(&mut self, e: &geth_ipc::Error) -> &'static str {
        // While geth does not answer its connections are unknown: members are
        // probed again, instead of passing for connected on the last answer
        // (found by the simulation: a member never probed while this geth was
        // down counted as reachable and made half the registry a "majority").
        self.connected.clear();
        self.metrics
            .geth_rpc_errors
            .get_or_create(&Metrics::kind(e.kind()))
            .inc();
        self.set_geth_state(GethState::Down(e.to_string()));
        "geth"
    }

    /// The member pods as pod evidence (READ_PODS), from the pod watch. `None`
    /// when off, still syncing or failing: the engine then falls back to
    /// reachability evidence.
    async fn pod_evidence(&mut self) -> Option<BTreeMap<String, core::PodObservation>> {
        let watch = self.s.pods.as_ref()?;
        let members = self
            .snapshot
            .iter()
            .flat_map(|s| s.members.keys())
            .map(String::as_str)
            .chain([self.s.pod.as_str()]);
        match watch.evidence(members).await {
            PodEvidence::Ready(pods) => {
                if self.pods_error.take().is_some() {
                    info!("pod evidence is back");
                }
                Some(pods)
            }
            PodEvidence::Syncing => None,
            PodEvidence::Failed(msg) => {
                if self.pods_error.as_deref() != Some(msg.as_str()) {
                    warn!("{msg}");
                    self.pods_error = Some(msg);
                }
                None
            }
        }
    }

    /// One pass: observe, decide, act. Errors return a metric label.
    async fn reconcile(&mut self) -> Result<(), &'static str> {
        let started = Instant::now();
        self.metrics.reconciles.inc();
        let info = match self.geth.node_info().await {
            Ok(i) => i,
            Err(e) => return Err(self.geth_error(&e)),
        };
        let generation = self.geth.connection_generation();
        if generation != self.generation {
            if self.generation != 0 {
                info!(
                    applied = self.applied.len(),
                    "geth connection re-established (geth restarted?): re-applying every peer"
                );
            }
            if self.generation != 0 {
                // A restarted geth starts with an empty static set.
                self.static_set_known = true;
            }
            self.metrics.geth_reconnects.inc();
            self.applied.clear();
            self.connected.clear();
            self.blind_adds.clear();
            self.generation = generation;
        }
        self.set_geth_state(GethState::Up);
        let advertised = match self.s.advertise.advertised(&info, self.s.p2p_port) {
            Ok(e) => {
                self.set_advertise_problem(None);
                e
            }
            Err(msg) => {
                self.set_advertise_problem(Some(msg));
                // Peer with the others all the same: an unspecified address makes
                // the engine skip our own registration and nothing else.
                match info.parsed_enode() {
                    Ok(e) => e.with_host(Host::Ip(std::net::Ipv4Addr::UNSPECIFIED.into())),
                    Err(_) => return Err("advertise"),
                }
            }
        };
        let peers = match self.geth.peers().await {
            Ok(p) => p,
            Err(e) => return Err(self.geth_error(&e)),
        };
        self.connected = peers.iter().map(|p| p.id).collect();
        let connected_now = &self.connected;
        self.blind_adds.retain(|id, _| !connected_now.contains(id));
        // A connected member is reachable, whether or not its peer event was
        // seen (the subscription is re-made after a geth restart, and connected
        // members are never probed): without this, an unreachability clock from
        // an old partition survived the reconnection, and the member was removed
        // at once the next time its link dropped (found by the simulation).
        self.unreachable_since
            .retain(|id, _| !connected_now.contains(id));
        for p in &peers {
            if p.eth_ready() {
                self.unusable.remove(&p.id);
            }
        }
        if self.snapshot.is_none() {
            match self.registry.snapshot().await {
                Ok(s) => self.on_snapshot(s),
                Err(e) => {
                    self.metrics
                        .registry_errors
                        .get_or_create(&Metrics::kind(e.kind()))
                        .inc();
                    warn!(error = %e, "cannot read the registry; geth's peers stay as they are");
                    return Err("registry");
                }
            }
        }
        let now = self.s.clock.now();
        let me = core::SelfIdentity {
            pod: self.s.pod.clone(),
            node_id: info.id,
            advertised,
            pod_uid: self.s.pod_uid.clone(),
            pod_ip: self.s.pod_ip.clone(),
            sidecar_version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        let connected: BTreeMap<NodeId, core::PeerObservation> = peers
            .iter()
            .map(|p| {
                (
                    p.id,
                    core::PeerObservation {
                        eth_ready: p.eth_ready(),
                        inbound: p.network.inbound,
                    },
                )
            })
            .collect();
        let pods = self.pod_evidence().await;
        let obs = core::Observation {
            connected: &connected,
            pods: pods.as_ref(),
            unreachable_since: &self.unreachable_since,
            unusable: &self.unusable,
            blind_adds: &self.blind_adds,
            registrations_seen: &self.registrations_seen,
            registrations_landed: &self.registrations_landed,
            registrations_listed: &self.registrations_listed,
            probed_at: self.probed_at,
            ..core::Observation::new(now, &me, self.snapshot.as_ref(), &self.applied)
        };
        let plan = core::plan(&self.s.engine, &obs);
        let problems: Vec<String> = plan
            .report
            .problems
            .iter()
            .map(ToString::to_string)
            .collect();
        for problem in &problems {
            if !self.last_engine_problems.contains(problem) {
                warn!(problem = %problem, "configuration or registry problem");
            }
        }
        for gone in self
            .last_engine_problems
            .iter()
            .filter(|p| !problems.contains(p))
        {
            info!(problem = %gone, "problem resolved");
        }
        self.last_engine_problems = problems;
        for removal in &plan.report.removals {
            info!("{removal}");
            self.s.events.emit(Notice::MemberRemoved {
                pod: removal.record.pod.clone(),
                evidence: removal.reason.to_string(),
            });
        }
        for (enode, why) in &plan.report.legacy_removals {
            info!(enode = %enode, "legacy member {why}: removing it");
        }
        // The registry before geth. Tried the other way round (geth first, so
        // known peers need not wait for our own contended write): a replaced
        // pod's re-mesh got slower, median 0.37 s -> 1.2 and 1.5 s in a rolling
        // replacement of 30 (mesh bench), with no gain in a burst of 30.
        let mut result = Ok(());
        for action in plan.registry.clone() {
            if let Err(kind) = self.apply_registry(action).await {
                result = Err(kind);
            }
        }
        for (action, res) in call_geth(&*self.geth, &plan.geth).await {
            match self.record_geth(action, res) {
                Ok(()) => self.note_blind_add(action, now),
                Err(ActionError::GethDown) => {
                    // geth stopped answering: no further call was started.
                    result = Err("geth");
                    break;
                }
                Err(ActionError::Refused) => result = Err("geth_action"),
            }
        }
        self.me = self
            .snapshot
            .as_ref()
            .and_then(|s| s.members.get(&self.s.pod).cloned());
        let report = &plan.report;
        self.health
            .publish(&self.s.pod, report, self.snapshot.as_ref(), &self.connected);
        self.recheck_at = report.recheck_at;
        self.metrics.desired_peers.set(report.desired as i64);
        self.metrics.connected_peers.set(report.connected as i64);
        self.metrics.missing_peers.set(report.missing.len() as i64);
        self.metrics.unusable_peers.set(self.unusable.len() as i64);
        if report.suspected_partition && self.metrics.suspected_partition.get() == 0 {
            self.s.events.emit(Notice::PartitionSuspected {
                detail: format!(
                    "{} member(s) unreachable from here and this node does not reach a \
                     majority: no member is removed until it does",
                    report.unreachable.len()
                ),
            });
        }
        self.metrics
            .suspected_partition
            .set(i64::from(report.suspected_partition));
        self.note_mesh_limit(report, now);
        let summary = report.to_string();
        if summary != self.last_report {
            info!("{summary}");
            self.last_report = summary;
        }
        self.metrics
            .reconcile_duration
            .observe(started.elapsed().as_secs_f64());
        if result.is_ok() {
            self.metrics.last_sync.set(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0),
            );
        }
        result
    }

    async fn apply_registry(&mut self, action: core::RegistryAction) -> Result<(), &'static str> {
        let (label, res) = match action {
            core::RegistryAction::Upsert(rec) => {
                info!(pod = %rec.pod, node = %rec.node_id.short(), enode = %rec.enode, "registering self");
                ("upsert", self.registry.upsert(rec).await)
            }
            core::RegistryAction::RemoveLegacy(enodes) => {
                for e in &enodes {
                    info!(node = %e.node_id().short(), enode = %e, "removing legacy member from static-nodes.json");
                }
                ("remove_legacy", self.registry.remove_legacy(enodes).await)
            }
            core::RegistryAction::Remove(recs) => {
                for r in &recs {
                    info!(pod = %r.pod, node = %r.node_id.short(), "removing member from the registry");
                }
                ("remove", self.registry.remove(recs).await)
            }
        };
        match res {
            Ok(snap) => {
                self.metrics
                    .registry_writes
                    .get_or_create(&Metrics::kind(label))
                    .inc();
                if label == "upsert" {
                    // Known at once, not at the end of the pass: a SIGTERM that
                    // abandons the rest of the pass must still deregister it.
                    let new = snap.members.get(&self.s.pod).cloned();
                    if let Some(new) = &new {
                        match &self.me {
                            None => self.s.events.emit(Notice::Registered {
                                enode: new.enode.to_string(),
                            }),
                            Some(old) if !old.enode.same_address(&new.enode) => {
                                self.s.events.emit(Notice::AddressChanged {
                                    from: old.enode.to_string(),
                                    to: new.enode.to_string(),
                                });
                            }
                            Some(_) => {}
                        }
                    }
                    self.me = new;
                }
                self.on_snapshot(snap);
                Ok(())
            }
            Err(e) => {
                self.metrics
                    .registry_errors
                    .get_or_create(&Metrics::kind(e.kind()))
                    .inc();
                self.health.registry_synced.store(false, Ordering::Relaxed);
                warn!(error = %e, "registry {label} failed; will retry");
                if !matches!(e, peer_registry::Error::Conflict { .. }) {
                    self.s.events.emit(Notice::RegistryUnwritable {
                        error: e.to_string(),
                    });
                }
                Err("registry")
            }
        }
    }

    /// Keeps [`Runner::blind_adds`] after a successful geth action: an add of a
    /// peer this sidecar had not applied, while geth's static set is unknown,
    /// is blind; a removePeer ends it.
    fn note_blind_add(&mut self, action: &core::GethAction, now: jiff::Timestamp) {
        match action {
            core::GethAction::AddPeer(e)
                if !self.static_set_known && !self.cleared.contains(&e.node_id()) =>
            {
                self.blind_adds.entry(e.node_id()).or_insert(now);
            }
            core::GethAction::RemovePeer(e) => {
                self.blind_adds.remove(&e.node_id());
                self.cleared.insert(e.node_id());
            }
            _ => {}
        }
    }

    /// Records the outcome of one geth action. A refusal (geth answered with an
    /// error) is counted and logged for this action alone; only a connection
    /// failure marks geth down.
    fn record_geth(
        &mut self,
        action: &core::GethAction,
        res: geth_ipc::Result<bool>,
    ) -> Result<(), ActionError> {
        use core::GethAction as A;
        let (label, enode) = match action {
            A::AddPeer(e) => ("add_peer", e),
            A::RemovePeer(e) => ("remove_peer", e),
            A::AddTrustedPeer(e) => ("add_trusted_peer", e),
            A::RemoveTrustedPeer(e) => ("remove_trusted_peer", e),
        };
        match res {
            Ok(_) => {
                info!(action = label, node = %enode.node_id().short(), enode = %enode, "geth");
                self.metrics
                    .geth_actions
                    .get_or_create(&Metrics::kind(label))
                    .inc();
                core::apply(&mut self.applied, std::slice::from_ref(action));
                Ok(())
            }
            Err(e) => {
                warn!(action = label, node = %enode.node_id().short(), error = %e, "geth call failed");
                self.metrics
                    .geth_action_errors
                    .get_or_create(&Metrics::kind(label))
                    .inc();
                if e.is_connection_error() {
                    self.geth_error(&e);
                    Err(ActionError::GethDown)
                } else {
                    self.metrics
                        .geth_rpc_errors
                        .get_or_create(&Metrics::kind(e.kind()))
                        .inc();
                    Err(ActionError::Refused)
                }
            }
        }
    }

    /// Removes our own record with a conditional write, bounded so the pod's
    /// termination grace period is never exceeded.
    async fn deregister(&mut self) {
        let me = match self.me.clone() {
            Some(me) => Some(me),
            // The pass that registered may have been abandoned after the write
            // landed: look for this pod's record (this incarnation's) once.
            None => {
                match tokio::time::timeout(Duration::from_secs(3), self.registry.snapshot()).await {
                    Ok(Ok(snap)) => snap
                        .members
                        .get(&self.s.pod)
                        .filter(|r| match (&r.pod_uid, &self.s.pod_uid) {
                            (Some(theirs), Some(mine)) => theirs == mine,
                            _ => true,
                        })
                        .cloned(),
                    _ => None,
                }
            }
        };
        let Some(me) = me else {
            info!("not registered; nothing to deregister");
            return;
        };
        match tokio::time::timeout(Duration::from_secs(10), self.registry.remove(vec![me])).await {
            Ok(Ok(_)) => {
                info!("deregistered");
                self.s.events.emit(Notice::Deregistered);
            }
            Ok(Err(e)) => {
                warn!(error = %e, "could not deregister; other sidecars will drop this member once it is unreachable")
            }
            Err(_) => warn!("deregistration timed out after 10 s"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use geth_ipc::{MockAdminApi, NodeInfo};
    use peer_registry::MockPeerRegistry;
    use std::sync::atomic::AtomicU64;

    const KEYS: [&str; 3] = [
        "79be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798483ada7726a3c4655da4fbfc0e1108a8fd17b448a68554199c47d08ffb10d4b8",
        "c6047f9441ed7d6d3045406e95c07cd85c778e4b8cef3ca7abac09b95c709ee51ae168fea63dc339a3c58419466ceaeef7f632653266d0e1236431a950cfe52a",
        "5cbdf0646e5db4eaa398f365f2ea7a0e3d419b7e0330e39ce92bddedcac4f9bc6aebca40ba255960a3178d6d861a54dba813d0b813fde7b5a5082628087264da",
    ];

    fn enode(i: usize) -> Enode {
        format!("enode://{}@10.0.0.{}:30303", KEYS[i], i + 1)
            .parse()
            .expect("valid enode")
    }

    fn record(i: usize) -> MemberRecord {
        let e = enode(i);
        let long_ago = jiff::Timestamp::from_second(1_700_000_000).expect("timestamp");
        MemberRecord {
            pod: format!("geth-{i}"),
            node_id: e.node_id(),
            enode: e.clone(),
            pod_uid: None,
            pod_ip: Some(e.host().to_string()),
            registered_at: long_ago,
            updated_at: long_ago,
            sidecar_version: env!("CARGO_PKG_VERSION").to_owned(),
        }
    }

    /// A registry holding geth-0 (this node), geth-1 and geth-2.
    fn snapshot(rv: &str) -> Snapshot {
        Snapshot {
            resource_version: Some(rv.to_owned()),
            members: (0..3).map(|i| (format!("geth-{i}"), record(i))).collect(),
            ..Snapshot::default()
        }
    }

    fn registry(snap: Snapshot) -> MockPeerRegistry {
        let mut reg = MockPeerRegistry::new();
        let read = snap.clone();
        reg.expect_snapshot().returning(move || Ok(read.clone()));
        reg.expect_upsert().returning(move |_| Ok(snap.clone()));
        reg
    }

    /// geth as node 0, reporting `host` in its enode, connected to nobody.
    fn geth(host: &str) -> MockAdminApi {
        let mut g = geth_connected(host, &[], Arc::new(AtomicU64::new(1)));
        g.expect_remove_peer().returning(|_| Ok(true));
        g
    }

    /// geth as node 0, connected (outbound) to the nodes `connected`, on the
    /// connection generation `generation` holds.
    fn geth_connected(host: &str, connected: &[usize], generation: Arc<AtomicU64>) -> MockAdminApi {
        let info: NodeInfo = serde_json::from_value(serde_json::json!({
            "id": enode(0).node_id().to_string(),
            "enode": format!("enode://{}@{host}:30303", KEYS[0]),
            "ports": {"discovery": 0, "listener": 30303},
        }))
        .expect("node info");
        let peers: Vec<geth_ipc::PeerInfo> = connected
            .iter()
            .map(|&i| {
                serde_json::from_value(serde_json::json!({
                    "id": enode(i).node_id().to_string(),
                    "enode": enode(i).to_string(),
                    "network": {"localAddress": "10.0.0.1:40000", "remoteAddress": format!("10.0.0.{}:30303", i + 1),
                                "inbound": false, "trusted": false, "static": true},
                    "protocols": {"eth": {}},
                }))
                .expect("peer info")
            })
            .collect();
        let mut g = MockAdminApi::new();
        g.expect_node_info().returning(move || Ok(info.clone()));
        g.expect_connection_generation()
            .returning(move || generation.load(Ordering::Relaxed));
        g.expect_peers().returning(move || Ok(peers.clone()));
        g
    }

    fn runner(
        geth: MockAdminApi,
        advertise: AdvertiseMode,
    ) -> Runner<MockAdminApi, MockPeerRegistry> {
        runner_on(geth, advertise, snapshot("10"))
    }

    fn runner_on(
        geth: MockAdminApi,
        advertise: AdvertiseMode,
        snap: Snapshot,
    ) -> Runner<MockAdminApi, MockPeerRegistry> {
        Runner::new(
            Arc::new(geth),
            Arc::new(registry(snap)),
            settings(advertise),
            Arc::new(Metrics::new()),
            Arc::new(Health::new(None)),
        )
    }

    /// This node's settings as `geth-0` at 10.0.0.1.
    fn settings(advertise: AdvertiseMode) -> Settings {
        Settings {
            pod: "geth-0".into(),
            pod_ip: Some("10.0.0.1".into()),
            pod_uid: None,
            advertise,
            p2p_port: None,
            engine: core::Config::default(),
            resync: Duration::from_secs(30),
            probe_interval: Duration::from_secs(5),
            listen: "127.0.0.1:0".parse().expect("addr"),
            pods: None,
            pod_changes: Arc::new(tokio::sync::Notify::new()),
            events: Events::disabled(),
            liveness_timeout: None,
            prober: Prober::Tcp,
            clock: Clock::System,
            seed: Some(1),
        }
    }

    #[test]
    fn probes_avoid_geths_port_only_from_addresses_geth_throttles() {
        let target: SocketAddr = "100.64.0.7:30303".parse().expect("addr");
        let ip = |s: &str| Some(s.parse::<std::net::IpAddr>().expect("ip"));
        assert_eq!(
            probe_addr(target, ip("100.64.0.9"), 9090),
            (
                "100.64.0.7:9090".parse().expect("addr"),
                ProbeVia::SidecarPort(9090)
            )
        );
        let lan: SocketAddr = "10.244.0.7:30303".parse().expect("addr");
        assert_eq!(
            probe_addr(lan, ip("10.244.0.9"), 9090),
            (lan, ProbeVia::GethPort)
        );
        assert_eq!(probe_addr(lan, None, 9090), (lan, ProbeVia::GethPort));
    }

    fn pod_ip() -> AdvertiseMode {
        AdvertiseMode::PodIp("10.0.0.1".parse().expect("ip"))
    }

    fn count(
        family: &prometheus_client::metrics::family::Family<
            crate::metrics::KindLabel,
            prometheus_client::metrics::counter::Counter,
        >,
        kind: &str,
    ) -> u64 {
        family.get_or_create(&Metrics::kind(kind)).get()
    }

    /// geth whose peer calls take 50 ms each (on tokio's clock), logging
    /// when each starts and ends and how many were in flight at most.
    #[derive(Default)]
    struct SlowGeth {
        log: std::sync::Mutex<Vec<String>>,
        in_flight: std::sync::atomic::AtomicUsize,
        most: std::sync::atomic::AtomicUsize,
        fail_remove: bool,
    }

    impl SlowGeth {
        async fn call(&self, what: &str, e: &Enode) -> geth_ipc::Result<bool> {
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(now, Ordering::SeqCst);
            let host = e.host().to_string();
            self.log
                .lock()
                .expect("log")
                .push(format!("start {what} {host}"));
            tokio::time::sleep(Duration::from_millis(50)).await;
            self.log
                .lock()
                .expect("log")
                .push(format!("end {what} {host}"));
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            if what == "remove" && self.fail_remove {
                return Err(geth_ipc::Error::ConnectionLost);
            }
            Ok(true)
        }
    }

    #[async_trait::async_trait]
    impl AdminApi for SlowGeth {
        async fn node_info(&self) -> geth_ipc::Result<NodeInfo> {
            Err(geth_ipc::Error::ConnectionLost)
        }
        async fn peers(&self) -> geth_ipc::Result<Vec<geth_ipc::PeerInfo>> {
            Err(geth_ipc::Error::ConnectionLost)
        }
        async fn add_peer(&self, e: &Enode) -> geth_ipc::Result<bool> {
            self.call("add", e).await
        }
        async fn remove_peer(&self, e: &Enode) -> geth_ipc::Result<bool> {
            self.call("remove", e).await
        }
        async fn add_trusted_peer(&self, e: &Enode) -> geth_ipc::Result<bool> {
            self.call("trust", e).await
        }
        async fn remove_trusted_peer(&self, e: &Enode) -> geth_ipc::Result<bool> {
            self.call("untrust", e).await
        }
        async fn peer_events(&self) -> geth_ipc::Result<PeerEventStream> {
            Err(geth_ipc::Error::ConnectionLost)
        }
        fn connection_generation(&self) -> u64 {
            1
        }
    }

    /// geth whose second `admin_nodeInfo` waits for `gate`: the second pass
    /// held open.
    struct GatedGeth {
        inner: MockAdminApi,
        gate: tokio::sync::Semaphore,
        calls: std::sync::atomic::AtomicUsize,
    }

    #[async_trait::async_trait]
    impl AdminApi for GatedGeth {
        async fn node_info(&self) -> geth_ipc::Result<NodeInfo> {
            if self.calls.fetch_add(1, Ordering::SeqCst) == 1 {
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

    /// Polls `what` every 5 ms until it holds, for at most 10 s.
    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "waited 10 s for {what}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[test]
    fn a_watch_that_reports_no_registry_while_one_is_held_makes_the_next_pass_read_it_afresh() {
        let mut r = runner(MockAdminApi::new(), pod_ip());
        r.on_snapshot(snapshot("10"));
        let mut items = WatchItems::default();
        items.push(Some(Ok(Snapshot::default())));
        assert!(r.on_watch_items(items), "a pass is due");
        assert!(r.snapshot.is_none(), "the next pass reads the registry");
        // An ordinary older event is stale and changes nothing.
        r.on_snapshot(snapshot("10"));
        let mut items = WatchItems::default();
        items.push(Some(Ok(snapshot("9"))));
        assert!(!r.on_watch_items(items));
        assert_eq!(
            r.snapshot
                .as_ref()
                .and_then(|s| s.resource_version.as_deref()),
            Some("10")
        );
    }

    #[test]
    fn registrations_in_a_watchs_first_list_are_noted_as_listed_and_later_ones_as_changes() {
        let mut reg = registry(snapshot("10"));
        reg.expect_watch()
            .returning(|| futures::stream::pending().boxed());
        let mut r = Runner::new(
            Arc::new(MockAdminApi::new()),
            Arc::new(reg),
            settings(pod_ip()),
            Arc::new(Metrics::new()),
            Arc::new(Health::new(None)),
        );
        drop(r.open_watch());
        // Held: geth-0 only. Each step's snapshot holds members 0..n.
        let with = |rv: &str, n: usize| {
            let mut snap = snapshot(rv);
            snap.members
                .retain(|pod, _| pod.as_str() < format!("geth-{n}").as_str());
            snap
        };
        r.on_snapshot(with("10", 1));
        let items = |snap| {
            let mut items = WatchItems::default();
            items.push(Some(Ok(snap)));
            items
        };
        let id = |i| record(i).node_id;
        // The watch's first snapshot is its list: geth-1 may have landed long ago.
        assert!(r.on_watch_items(items(with("11", 2))));
        assert!(r.registrations_landed.contains_key(&id(1)));
        assert!(r.registrations_listed.contains(&id(1)));
        // Later snapshots are changes: geth-2 has just landed.
        assert!(r.on_watch_items(items(with("12", 3))));
        assert!(r.registrations_landed.contains_key(&id(2)));
        assert!(!r.registrations_listed.contains(&id(2)));
        // A restarted watch begins with a list again: geth-0's pod was
        // replaced (a new UID) meanwhile.
        drop(r.open_watch());
        let mut snap = with("13", 3);
        if let Some(rec) = snap.members.get_mut("geth-0") {
            rec.pod_uid = Some("new-uid".into());
        }
        assert!(r.on_watch_items(items(snap)));
        assert!(r.registrations_listed.contains(&id(0)));
        assert!(!r.registrations_listed.contains(&id(2)));
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
        let geth = Arc::new(GatedGeth {
            inner,
            gate: tokio::sync::Semaphore::new(0),
            calls: 0.into(),
        });
        let metrics = Arc::new(Metrics::new());
        // Nothing but the watch calls for a pass.
        let quiet = Settings {
            resync: Duration::from_secs(3600),
            probe_interval: Duration::from_secs(3600),
            ..settings(pod_ip())
        };
        let mut r = Runner::new(
            geth.clone(),
            Arc::new(reg),
            quiet,
            metrics.clone(),
            Arc::new(Health::new(None)),
        );
        let only = |rv: &str, members: &[usize]| {
            Ok(Snapshot {
                resource_version: Some(rv.to_owned()),
                members: members
                    .iter()
                    .map(|&i| (format!("geth-{i}"), record(i)))
                    .collect(),
                ..Snapshot::default()
            })
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let driver = async {
            // The watch's list comes first: the first pass waits for it.
            tx.send(only("10", &[0])).await.expect("send");
            // An event starts the second pass, held open in admin_nodeInfo;
            // three more land meanwhile and are read at once.
            tx.send(only("11", &[0, 1, 2])).await.expect("send");
            until("the second pass", || metrics.reconciles.get() == 2).await;
            for (rv, members) in [("12", &[0, 1][..]), ("13", &[0, 1, 2]), ("14", &[0, 2])] {
                tx.send(only(rv, members)).await.expect("send");
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
            tx.send(only("15", &[0])).await.expect("send");
            until("the marker to be taken in", || metrics.members.get() == 1).await;
            until("the marker's pass", || metrics.reconciles.get() >= 4).await;
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
            4,
            "the first two passes, one for the three events, one for the marker"
        );
    }

    #[tokio::test]
    async fn the_first_pass_registers_from_the_watchs_list_without_a_registry_read_of_its_own() {
        // The registry holds geth-1 and geth-2; this pod (geth-0) is not in it.
        let mut listed = snapshot("10");
        listed.members.remove("geth-0");
        let mut reg = MockPeerRegistry::new();
        reg.expect_snapshot().times(0);
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
        let mut r = Runner::new(
            Arc::new(g),
            Arc::new(reg),
            settings(pod_ip()),
            metrics.clone(),
            Arc::new(Health::new(None)),
        );
        r.event_loop(registered.notified()).await;
        assert_eq!(metrics.reconciles.get(), 1, "registered in the first pass");
        assert_eq!(
            r.snapshot
                .as_ref()
                .and_then(|s| s.resource_version.as_deref()),
            Some("11"),
            "the registration's own snapshot is held"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn geth_calls_for_different_nodes_are_in_flight_together_and_one_nodes_stay_in_order() {
        let moved = enode(1).with_host("10.0.0.9".parse().expect("host"));
        let actions = [
            core::GethAction::RemovePeer(enode(1)),
            core::GethAction::AddPeer(enode(2)),
            core::GethAction::AddPeer(moved),
        ];
        let geth = SlowGeth::default();
        let done = call_geth(&geth, &actions).await;
        assert_eq!(done.len(), 3);
        assert!(done.iter().all(|(_, r)| r.is_ok()));
        assert_eq!(
            geth.most.load(Ordering::SeqCst),
            2,
            "node 2 alongside node 1"
        );
        let log = geth.log.lock().expect("log").clone();
        let at = |line: &str| log.iter().position(|l| l == line).expect(line);
        assert!(
            at("end remove 10.0.0.2") < at("start add 10.0.0.9"),
            "a move stays removePeer, then addPeer: {log:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_lost_connection_no_further_geth_call_is_started() {
        let moved = enode(1).with_host("10.0.0.9".parse().expect("host"));
        let actions = [
            core::GethAction::RemovePeer(enode(1)),
            core::GethAction::AddPeer(moved),
        ];
        let geth = SlowGeth {
            fail_remove: true,
            ..SlowGeth::default()
        };
        let done = call_geth(&geth, &actions).await;
        assert_eq!(
            done.len(),
            1,
            "the addPeer after the failure was not called"
        );
        assert!(
            done[0]
                .1
                .as_ref()
                .is_err_and(geth_ipc::Error::is_connection_error)
        );
    }

    #[tokio::test]
    async fn a_refused_add_peer_is_counted_alone_and_the_pass_goes_on_with_geth_up() {
        let mut g = geth("10.0.0.1");
        // geth refuses the first add_peer of the pass, whichever peer it is for.
        let calls = Arc::new(AtomicU64::new(0));
        g.expect_add_peer().times(2).returning(move |_| {
            if calls.fetch_add(1, Ordering::Relaxed) == 0 {
                Err(geth_ipc::Error::Rpc {
                    code: -32000,
                    message: "invalid enode".into(),
                })
            } else {
                Ok(true)
            }
        });
        let mut r = runner(g, pod_ip());
        assert_eq!(r.reconcile().await, Err("geth_action"));
        assert_eq!(r.geth_state, GethState::Up);
        assert!(r.health.geth_ok.load(Ordering::Relaxed));
        assert_eq!(count(&r.metrics.geth_action_errors, "add_peer"), 1);
        assert_eq!(r.applied.len(), 1, "the other peer was added");
    }

    #[tokio::test]
    async fn an_action_that_loses_the_connection_marks_geth_down_and_stops_the_pass() {
        let mut g = geth("10.0.0.1");
        g.expect_add_peer()
            .times(1)
            .returning(|_| Err(geth_ipc::Error::ConnectionLost));
        let mut r = runner(g, pod_ip());
        assert_eq!(r.reconcile().await, Err("geth"));
        assert!(matches!(r.geth_state, GethState::Down(_)));
        assert!(!r.health.geth_ok.load(Ordering::Relaxed));
    }

    #[tokio::test]
    async fn an_unusable_advertised_address_still_peers_with_the_others_and_says_why() {
        let mut g = geth("127.0.0.1");
        g.expect_add_peer().times(2).returning(|_| Ok(true));
        let mut r = runner(g, AdvertiseMode::Geth);
        let _ = r.reconcile().await;
        assert_eq!(r.applied.len(), 2, "peered with geth-1 and geth-2");
        let problem = r.health.advertise_problem.lock().expect("lock").clone();
        assert!(problem.is_some_and(|p| p.contains("127.0.0.1")));
    }

    #[tokio::test]
    async fn a_watch_event_older_than_the_snapshot_held_is_stale() {
        let mut r = runner(geth("10.0.0.1"), pod_ip());
        r.on_snapshot(snapshot("11"));
        assert!(r.is_stale(&snapshot("10")));
        assert!(!r.is_stale(&snapshot("11")));
        assert!(!r.is_stale(&snapshot("12")));
        assert!(!r.is_stale(&snapshot("not-a-number")));
    }

    #[tokio::test]
    async fn reachable_members_unconnected_for_a_minute_name_geths_peer_limits_once() {
        let mut r = runner(geth("10.0.0.1"), pod_ip());
        let report = core::Report {
            missing: vec![core::PeerRef {
                pod: Some("geth-1".into()),
                node_id: enode(1).node_id(),
            }],
            ..core::Report::default()
        };
        let t0 = jiff::Timestamp::from_second(1_700_000_000).expect("timestamp");
        r.note_mesh_limit(&report, t0);
        assert!(!r.mesh_limit_warned, "not before a minute");
        r.note_mesh_limit(&report, t0 + jiff::SignedDuration::from_secs(61));
        assert!(r.mesh_limit_warned);
        // ... and /status and the metric say so while it lasts.
        assert_eq!(r.metrics.peer_limit_suspected.get(), 1);
        let said = crate::http::lock(&r.health.peer_limit)
            .clone()
            .unwrap_or_default();
        assert!(said.contains("--maxpeers"), "{said}");
        r.note_mesh_limit(
            &core::Report::default(),
            t0 + jiff::SignedDuration::from_secs(62),
        );
        assert_eq!(r.metrics.peer_limit_suspected.get(), 0);
        assert!(crate::http::lock(&r.health.peer_limit).is_none());

        // An unreachable member is a network matter, not geth's limits.
        let mut r = runner(geth("10.0.0.1"), pod_ip());
        r.unreachable_since.insert(enode(1).node_id(), t0);
        r.note_mesh_limit(&report, t0);
        r.note_mesh_limit(&report, t0 + jiff::SignedDuration::from_secs(61));
        assert!(!r.mesh_limit_warned);
    }

    #[tokio::test]
    async fn a_new_geth_connection_re_applies_every_peer() {
        let generation = Arc::new(AtomicU64::new(1));
        let mut g = geth_connected("10.0.0.1", &[], generation.clone());
        g.expect_remove_peer().returning(|_| Ok(true));
        g.expect_add_peer().times(4).returning(|_| Ok(true));
        let mut r = runner(g, pod_ip());
        assert_eq!(r.reconcile().await, Ok(()));
        assert_eq!(
            r.reconcile().await,
            Ok(()),
            "nothing more on the same connection"
        );
        generation.store(2, Ordering::Relaxed);
        assert_eq!(r.reconcile().await, Ok(()));
        assert_eq!(r.metrics.geth_reconnects.get(), 2);
        assert_eq!(r.applied.len(), 2);
    }

    #[tokio::test]
    async fn a_member_seen_connected_loses_its_old_unreachability_clock() {
        let mut g = geth_connected("10.0.0.1", &[1], Arc::new(AtomicU64::new(1)));
        g.expect_add_peer().returning(|_| Ok(true));
        let mut r = runner(g, pod_ip());
        // Failing since an old partition; connected again without an `add`
        // event reaching us.
        let long_ago = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(3600);
        r.unreachable_since.insert(enode(1).node_id(), long_ago);
        r.unreachable_since.insert(enode(2).node_id(), long_ago);
        assert_eq!(r.reconcile().await, Ok(()));
        assert!(!r.unreachable_since.contains_key(&enode(1).node_id()));
        assert!(
            r.unreachable_since.contains_key(&enode(2).node_id()),
            "an unconnected member keeps its clock"
        );
    }

    #[tokio::test]
    async fn a_connected_peer_that_moved_is_deferred_never_cut() {
        let mut g = geth_connected("10.0.0.1", &[1], Arc::new(AtomicU64::new(1)));
        let moved = enode(1).node_id();
        g.expect_remove_peer()
            .withf(move |e| e.node_id() == moved)
            .never();
        g.expect_remove_peer().returning(|_| Ok(true));
        g.expect_add_peer().times(1).returning(|_| Ok(true));
        let mut r = runner(g, pod_ip());
        let old = enode(1).with_host(Host::Ip("10.0.0.99".parse().expect("ip")));
        r.generation = 1; // the same geth connection as when `old` was applied
        r.applied.insert(moved, old.clone());
        assert_eq!(r.reconcile().await, Ok(()));
        assert_eq!(r.applied.get(&moved), Some(&old), "still the old address");
    }

    #[tokio::test]
    async fn a_new_pair_waits_for_the_newcomer_to_dial_and_asks_for_a_recheck() {
        let mut snap = snapshot("10");
        let now = jiff::Timestamp::now();
        let newcomer = snap.members.get_mut("geth-1").expect("geth-1");
        newcomer.registered_at = now;
        newcomer.updated_at = now;
        let mut g = geth("10.0.0.1");
        let waiting = enode(1).node_id();
        g.expect_add_peer()
            .withf(move |e| e.node_id() == waiting)
            .never();
        g.expect_add_peer().times(1).returning(|_| Ok(true));
        let mut r = runner_on(g, pod_ip(), snap);
        assert_eq!(r.reconcile().await, Ok(()));
        let recheck = r.recheck_at.expect("a recheck after the dial grace");
        let grace = core::Config::default().dial_grace;
        assert!(recheck > now && recheck <= now + grace, "{recheck}");
    }

    #[tokio::test]
    async fn a_peer_connecting_calls_for_a_pass_so_reports_follow_geth() {
        let mut r = runner(geth("10.0.0.1"), pod_ip());
        let ev = PeerEvent {
            kind: PeerEventKind::Add,
            peer: enode(1).node_id(),
            error: None,
            protocol: None,
            local: None,
            remote: None,
        };
        assert!(r.on_peer_event(ev));
        assert!(r.connected.contains(&enode(1).node_id()));
    }

    #[tokio::test]
    async fn peer_events_ready_together_are_taken_in_together_for_one_pass() {
        let mut r = runner(geth("10.0.0.1"), pod_ip());
        let add = |i: usize| {
            Ok(PeerEvent {
                kind: PeerEventKind::Add,
                peer: enode(i).node_id(),
                error: None,
                protocol: None,
                local: None,
                remote: None,
            })
        };
        let ready: PeerEventStream = futures::stream::iter([add(2)])
            .chain(futures::stream::pending())
            .boxed();
        let mut events = Some(ready);
        assert!(r.on_peer_events(Some(add(1)), &mut events));
        for i in [1, 2] {
            assert!(
                r.connected.contains(&enode(i).node_id()),
                "node {i}'s link is taken in with the first"
            );
        }
        assert!(events.is_some(), "the subscription stays");
        // An ended subscription is dropped (and re-made after the next pass).
        let ended: PeerEventStream =
            futures::stream::iter([Err(geth_ipc::Error::ConnectionLost)]).boxed();
        let mut events = Some(ended);
        assert!(r.on_peer_events(Some(add(2)), &mut events));
        assert!(events.is_none());
    }

    #[test]
    fn mismatch_drops_are_incompatible_and_ordinary_drops_are_not() {
        assert!(is_incompatible("subprotocol error"));
        assert!(is_incompatible("network ID mismatch (1 != 2)"));
        assert!(is_incompatible("genesis mismatch"));
        assert!(!is_incompatible("disconnect requested"));
        assert!(!is_incompatible("EOF"));
    }
}
