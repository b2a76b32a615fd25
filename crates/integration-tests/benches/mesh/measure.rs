//! What the mesh benchmark reads: geth's own view of its links, the stages of
//! a mesh forming, and the CPU each part of the test bed used.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::StreamExt;
use geth_ipc::{AdminApi, ClientOptions, Endpoint, Enode, GethClient, NodeId, PeerEventKind};
use integration_tests::{Mesh, cpu_time};
use tokio::task::JoinHandle;

/// How long any one stage may take before the run fails.
pub(crate) const POLL_LIMIT: Duration = Duration::from_secs(120);
/// A stage slower than this prints the links still missing (once).
const SLOW: Duration = Duration::from_secs(5);

/// The stages' poll interval: `MESH_POLL_MS`, 10 ms unless set.
fn poll_every() -> Duration {
    Duration::from_millis(std::env::var("MESH_POLL_MS").map_or(10, |v| v.parse().unwrap()))
}

/// A process's resident memory (KiB) and the CPU it has used so far.
pub(crate) fn proc_stat(pid: u32) -> (u64, Duration) {
    (rss(pid)[0], cpu_time(pid).unwrap_or_default())
}

/// A process's resident memory (KiB) from one read of its status: the total,
/// then as the kernel splits it: anonymous (heap, stacks), file-backed (the
/// binary's pages touched) and shared memory.
pub(crate) fn rss(pid: u32) -> [u64; 4] {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    ["VmRSS:", "RssAnon:", "RssFile:", "RssShmem:"].map(|key| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    })
}

/// A process's proportional set size (KiB): its anonymous memory plus its
/// share of every file page it maps (the binary's pages are shared by every
/// sidecar on a node running the same image), from `smaps_rollup`.
pub(crate) fn pss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Pss:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// CPU seconds used by a set of processes so far.
pub(crate) fn cpu_of(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|&p| cpu_time(p))
        .sum::<Duration>()
        .as_secs_f64()
}

/// The pids of the running sidecars.
pub(crate) fn sidecar_pids(m: &mut Mesh) -> Vec<u32> {
    m.sidecars
        .iter_mut()
        .filter_map(|s| s.as_mut().map(|s| s.proc_mut().pid()))
        .collect()
}

/// The moment geth's IPC socket first accepts a connection, polled every
/// 2 ms (the earliest moment anything could hand geth its peers).
pub(crate) async fn ipc_answers(ipc: PathBuf) -> Instant {
    let deadline = Instant::now() + POLL_LIMIT;
    loop {
        if tokio::net::UnixStream::connect(&ipc).await.is_ok() {
            return Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "{} never answered",
            ipc.display()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The floor's one step: geth is told every enode in `enodes` over its IPC,
/// all at once on one connection (what nothing could do faster).
pub(crate) async fn hand_over(ipc: &Path, enodes: &[String]) {
    let geth = GethClient::connect(Endpoint::Ipc(ipc.to_owned()), ClientOptions::default())
        .await
        .unwrap();
    let enodes: Vec<Enode> = enodes.iter().map(|e| e.parse().unwrap()).collect();
    let calls = enodes.iter().map(|e| geth.add_peer(e));
    for added in futures::future::join_all(calls).await {
        assert!(added.unwrap(), "geth refused an enode");
    }
}

/// geth's own view of one node's links, from its peer events: resolves to
/// when the node first had every peer of `want`, confirmed by `admin_peers`.
/// Opened before the mesh forms, it costs geth nothing while it does
/// (polling `admin_peers` of 30 nodes every 10 ms did: geth decodes each
/// peer's public key for each answer).
pub(crate) fn track_links(ipc: PathBuf, want: BTreeSet<NodeId>) -> JoinHandle<Instant> {
    tokio::spawn(async move {
        let geth = GethClient::connect(Endpoint::Ipc(ipc), ClientOptions::default())
            .await
            .unwrap();
        let mut events = geth.peer_events().await.unwrap();
        let ids = |peers: Vec<geth_ipc::PeerInfo>| -> BTreeSet<NodeId> {
            peers.into_iter().map(|p| p.id).collect()
        };
        let mut linked = ids(geth.peers().await.unwrap());
        loop {
            if linked.is_superset(&want) {
                let at = Instant::now();
                let confirmed = ids(geth.peers().await.unwrap());
                if confirmed.is_superset(&want) {
                    return at;
                }
                linked = confirmed;
            }
            let ev = events.next().await.unwrap().unwrap();
            match ev.kind {
                PeerEventKind::Add => linked.insert(ev.peer),
                PeerEventKind::Drop => linked.remove(&ev.peer),
                _ => false,
            };
        }
    })
}

/// Node `i`'s peers in a full mesh of `all`.
pub(crate) fn others(m: &Mesh, all: &[usize], i: usize) -> BTreeSet<NodeId> {
    all.iter()
        .filter(|&&j| j != i)
        .map(|&j| m.net.node(j).node_id().parse().unwrap())
        .collect()
}

/// When the last of `links` resolved.
pub(crate) async fn last_link(links: Vec<JoinHandle<Instant>>, t0: Instant) -> Instant {
    let mut last = t0;
    for h in links {
        last = last.max(
            tokio::time::timeout(POLL_LIMIT, h)
                .await
                .expect("full mesh")
                .unwrap(),
        );
    }
    last
}

/// When each stage of a mesh forming was first seen, from the run's start.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Stages {
    /// Every member in the registry (sidecars only).
    pub(crate) registered: Option<Duration>,
    /// Every sidecar's desired set full (sidecars only).
    pub(crate) desired: Option<Duration>,
    /// geth's own view full on every node.
    pub(crate) mesh: Duration,
    /// Sidecar CPU per pod from its start to the full mesh.
    pub(crate) sidecar_cpu: Option<Duration>,
    /// The control plane's CPU (apiserver and etcd) over the run's window.
    pub(crate) control_plane_cpu: Option<Duration>,
    /// The share of both cores busy (anything) over the run's window.
    pub(crate) busy: Option<f64>,
}

/// The CPU the test bed uses over one run's window (from about its t0 to
/// the full mesh): the control plane's, and how busy the machine is.
pub(crate) struct Window {
    control_plane: f64,
    busy: u64,
    total: u64,
}

impl Window {
    /// Opens the window now.
    pub(crate) fn open(m: &Mesh) -> Self {
        let (busy, total) = machine_ticks();
        Self {
            control_plane: cpu_of(&control_plane_pids(m)),
            busy,
            total,
        }
    }

    /// Closes the window now, noting what it saw in `s`.
    pub(crate) fn close(self, m: &Mesh, s: &mut Stages) {
        let (busy, total) = machine_ticks();
        let cp = (cpu_of(&control_plane_pids(m)) - self.control_plane).max(0.0);
        s.control_plane_cpu = Some(Duration::from_secs_f64(cp));
        s.busy = Some((busy - self.busy) as f64 / (total - self.total).max(1) as f64);
    }
}

fn control_plane_pids(m: &Mesh) -> Vec<u32> {
    m.cluster
        .apiserver_pid()
        .into_iter()
        .chain([m.cluster.etcd_pid()])
        .collect()
}

/// The machine's busy and total CPU ticks so far, all cores (`/proc/stat`;
/// idle and iowait are not busy).
fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// Whether the stages before geth's full mesh are polled (`MESH_STAGES`, on
/// unless "off"): at N=30 a poll is 31 requests every 10 ms, on the same two
/// cores as the mesh it measures; with "off" only geth's own peer events are
/// followed, as for the floor.
fn stages_polled() -> bool {
    std::env::var("MESH_STAGES").map_or(true, |v| v != "off")
}

/// Polls (every 10 ms, only what is not done yet) until every member of `all`
/// is registered and every sidecar's desired set holds the N-1 others, while
/// `links` (one [`track_links`] per member) resolve. `t0` is the run's start.
pub(crate) async fn stages(
    m: &Mesh,
    all: &[usize],
    t0: Instant,
    links: Vec<JoinHandle<Instant>>,
) -> Stages {
    if !stages_polled() {
        return Stages {
            mesh: last_link(links, t0).await - t0,
            ..Stages::default()
        };
    }
    let n = all.len();
    let want_pods: BTreeSet<String> = all
        .iter()
        .map(|&i| m.net.node(i).name().to_owned())
        .collect();
    let want = (n - 1) as f64;
    let (mut registered, mut desired) = (None, None);
    let mut desired_left: BTreeSet<usize> = all.iter().copied().collect();
    let deadline = t0 + POLL_LIMIT;
    let mut slow_reported = false;
    while registered.is_none() || desired.is_none() {
        assert!(
            Instant::now() < deadline,
            "no full mesh of {n} within {POLL_LIMIT:?}"
        );
        if registered.is_none() && m.registered_pods().await.is_superset(&want_pods) {
            registered = Some(t0.elapsed());
        }
        if desired.is_none() {
            // All at once: polled one after the other, the 30 reads under load
            // took about a second, which the figure then included.
            let reads = desired_left.iter().map(|&i| async move {
                (m.metric(i, "geth_peer_sidecar_desired_peers").await == Some(want)).then_some(i)
            });
            for i in futures::future::join_all(reads).await.into_iter().flatten() {
                desired_left.remove(&i);
            }
            if desired_left.is_empty() {
                desired = Some(t0.elapsed());
            }
        }
        if !slow_reported && t0.elapsed() > SLOW {
            slow_reported = true;
            println!("  (after {SLOW:?}, N={n}: desired sets not full yet: {desired_left:?})");
        }
        tokio::time::sleep(poll_every()).await;
    }
    let mesh = last_link(links, t0).await - t0;
    Stages {
        registered,
        desired,
        mesh,
        ..Stages::default()
    }
}
