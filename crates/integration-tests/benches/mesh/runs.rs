//! One measured run per path: the floor (geth told its peers over IPC, no
//! registry, no sidecar) or the sidecars of one layout and build.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use integration_tests::{Mesh, MeshOptions, NodeSpec, eventually};

use crate::measure::{
    POLL_LIMIT, Stages, Window, cpu_of, hand_over, ipc_answers, last_link, others, sidecar_pids,
    stages, track_links,
};

/// What forms the mesh in a run.
#[derive(Debug, Clone)]
pub(crate) enum Variant {
    /// geth told over IPC, by the newer node of each pair, the enode of the
    /// older at the earliest moment (no simultaneous dials): what nothing
    /// that learns membership through Kubernetes can beat.
    Floor,
    /// The sidecar binary `bin` (`None`: this build) with `REGISTRY_LAYOUT=layout`.
    Sidecar {
        layout: String,
        bin: Option<PathBuf>,
        label: String,
    },
}

impl Variant {
    pub(crate) fn name(&self) -> &str {
        match self {
            Variant::Floor => "floor",
            Variant::Sidecar { label, .. } => label,
        }
    }
}

/// The three paths a mesh forms by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Path {
    /// Sidecars started on settled geth (the sidecar's own start included).
    Settled,
    /// Sidecars already running when geth starts (a pod's real start), timed
    /// from the last IPC socket answering.
    Started,
    /// One pod replaced (new IP, same key; sidecar running when its geth
    /// starts), timed from its IPC socket answering.
    Rolling,
}

impl Path {
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Path::Settled => "sidecars started on settled geth",
            Path::Started => "sidecars running, geth starts (from the last IPC socket)",
            Path::Rolling => "a replaced pod re-meshed (from its IPC socket)",
        }
    }

    /// The target, as a ratio to the floor.
    pub(crate) fn target(self) -> f64 {
        match self {
            Path::Settled => 1.5,
            Path::Started | Path::Rolling => 1.25,
        }
    }
}

/// A mesh of `n` geth nodes (apiserver and namespace included for every
/// variant, so the floor runs on the same machine state).
pub(crate) async fn mesh(n: usize, variant: &Variant, tag: &str) -> Mesh {
    let options = MeshOptions {
        spec: NodeSpec {
            // geth dials at most maxpeers/3; the newest of N dials N-1.
            maxpeers: u32::try_from(3 * n).unwrap_or(u32::MAX).max(50),
            verbosity: std::env::var("MESH_GETH_VERBOSITY").map_or(3, |v| v.parse().unwrap()),
            ..NodeSpec::default()
        },
        ..MeshOptions::default()
    };
    let layout = match variant {
        Variant::Floor => "configmap",
        Variant::Sidecar { layout, .. } => layout,
    };
    // INFO as a user runs it (the tests' default is DEBUG).
    let env = [("REGISTRY_LAYOUT", layout), ("LOGGING", "INFO")];
    let mut m = Mesh::without_sidecars_with(tag, n, &env, options)
        .await
        .unwrap();
    if layout == "leases" {
        m.cluster.grant_leases(&m.ns).await.unwrap();
    }
    if let Variant::Sidecar { bin, .. } = variant {
        m.sidecar_bin.clone_from(bin);
    }
    m
}

/// Starts sidecar `i` and waits until its HTTP server answers.
async fn start_sidecar(m: &mut Mesh, i: usize) {
    m.start_sidecar(i).unwrap();
    let sc = m.sidecars[i].as_ref().unwrap();
    eventually("the sidecar's HTTP server", POLL_LIMIT, || async {
        sc.get("/healthz").await.ok().map(|_| ())
    })
    .await
    .unwrap();
}

/// Path A: geth settled and unlinked; the sidecars start (or the floor hands
/// over) at t0. Leaves the mesh full.
pub(crate) async fn settled(m: &mut Mesh, variant: &Variant) -> Stages {
    let n = m.net.nodes().len();
    let all: Vec<usize> = (0..n).collect();
    m.net.wait_settled(POLL_LIMIT).await.unwrap();
    let links: Vec<_> = all
        .iter()
        .map(|&i| track_links(m.net.node(i).ipc_path().to_owned(), others(m, &all, i)))
        .collect();
    let window = Window::open(m);
    let t0 = Instant::now();
    let mut s = match variant {
        Variant::Floor => {
            let enodes: Vec<String> = all.iter().map(|&i| m.net.node(i).enode()).collect();
            let calls = all
                .iter()
                .map(|&i| hand_over(m.net.node(i).ipc_path(), &enodes[..i]));
            futures::future::join_all(calls).await;
            Stages {
                mesh: last_link(links, t0).await - t0,
                ..Stages::default()
            }
        }
        Variant::Sidecar { .. } => {
            for i in 0..n {
                m.start_sidecar(i).unwrap();
            }
            let mut s = stages(m, &all, t0, links).await;
            s.sidecar_cpu = Some(Duration::from_secs_f64(cpu_of(&sidecar_pids(m)) / n as f64));
            s
        }
    };
    window.close(m, &mut s);
    s
}

/// Path B: every geth stopped; the sidecars (if any) running and serving;
/// every geth started together. Timed from the last IPC socket answering.
pub(crate) async fn started(m: &mut Mesh, variant: &Variant) -> Stages {
    let n = m.net.nodes().len();
    let all: Vec<usize> = (0..n).collect();
    let enodes: Vec<String> = all.iter().map(|&i| m.net.node(i).enode()).collect();
    let wants: Vec<_> = all.iter().map(|&i| others(m, &all, i)).collect();
    for i in 0..n {
        m.net.node_mut(i).stop().await;
    }
    let sidecars = matches!(variant, Variant::Sidecar { .. });
    if sidecars {
        for i in 0..n {
            start_sidecar(m, i).await;
        }
    }
    for i in 0..n {
        m.net.node_mut(i).spawn().unwrap();
    }
    // Newer dials older: a node is told the nodes whose IPC answered first.
    let answered = Arc::new(Mutex::new(Vec::new()));
    let runs = all.iter().map(|&i| {
        let ipc = m.net.node(i).ipc_path().to_owned();
        let (answered, enodes, want) = (answered.clone(), enodes.clone(), wants[i].clone());
        tokio::spawn(async move {
            let at = ipc_answers(ipc.clone()).await;
            let link = track_links(ipc.clone(), want);
            let older: Vec<String> = {
                let mut a = answered.lock().unwrap();
                let older = a.iter().map(|&j: &usize| enodes[j].clone()).collect();
                a.push(i);
                older
            };
            if !sidecars {
                hand_over(&ipc, &older).await;
            }
            (at, link)
        })
    });
    let mut last_ipc = None::<Instant>;
    let mut links = Vec::new();
    for r in futures::future::join_all(runs).await {
        let (at, link) = r.unwrap();
        last_ipc = Some(last_ipc.map_or(at, |l| l.max(at)));
        links.push(link);
    }
    let t0 = last_ipc.unwrap();
    // From about t0: every IPC socket has answered.
    let window = Window::open(m);
    let mut s = if sidecars {
        stages(m, &all, t0, links).await
    } else {
        Stages {
            mesh: last_link(links, t0).await - t0,
            ..Stages::default()
        }
    };
    if sidecars {
        // Each sidecar's whole life so far: its start, its wait and the mesh.
        let used = cpu_of(&sidecar_pids(m));
        s.sidecar_cpu = Some(Duration::from_secs_f64(used / n as f64));
    }
    window.close(m, &mut s);
    for i in 0..n {
        m.net.node_mut(i).wait_ready().await.unwrap();
    }
    s
}

/// Path C, on a full mesh: pod `i` replaced (sidecar SIGTERM, geth stopped
/// and moved to a new IP with its key, a new sidecar started and serving,
/// geth started). Timed from its IPC socket answering to every geth's full
/// mesh; the floor hands the new geth every other enode instead.
pub(crate) async fn replace(m: &mut Mesh, variant: &Variant, i: usize) -> Stages {
    let n = m.net.nodes().len();
    let all: Vec<usize> = (0..n).collect();
    let sidecars = matches!(variant, Variant::Sidecar { .. });
    if sidecars {
        m.take_sidecar(i).unwrap().terminate().await;
    }
    m.net.node_mut(i).stop().await;
    // Every other geth has seen it go before the links are tracked again.
    let id: String = m.net.node(i).node_id();
    for j in all.iter().copied().filter(|&j| j != i) {
        let node = m.net.node(j);
        eventually("the replaced node's link to drop", POLL_LIMIT, || async {
            let peers = node.peer_ids().await.ok()?;
            (!peers.contains(&id)).then_some(())
        })
        .await
        .unwrap();
    }
    let ip = m.net.fresh_ip();
    m.net.node(i).netns().set_ip(ip).unwrap();
    if sidecars {
        start_sidecar(m, i).await;
    }
    let enodes: Vec<String> = all
        .iter()
        .filter(|&&j| j != i)
        .map(|&j| m.net.node(j).enode())
        .collect();
    let mut links: Vec<_> = all
        .iter()
        .filter(|&&j| j != i)
        .map(|&j| track_links(m.net.node(j).ipc_path().to_owned(), others(m, &all, j)))
        .collect();
    let cpu_before = cpu_of(&sidecar_pids(m));
    m.net.node_mut(i).spawn().unwrap();
    let ipc = m.net.node(i).ipc_path().to_owned();
    let t0 = ipc_answers(ipc.clone()).await;
    let window = Window::open(m);
    links.push(track_links(ipc.clone(), others(m, &all, i)));
    if !sidecars {
        hand_over(&ipc, &enodes).await;
    }
    let mesh = last_link(links, t0).await - t0;
    let sidecar_cpu =
        sidecars.then(|| Duration::from_secs_f64(cpu_of(&sidecar_pids(m)) - cpu_before));
    let mut s = Stages {
        mesh,
        sidecar_cpu,
        ..Stages::default()
    };
    window.close(m, &mut s);
    m.net.node_mut(i).wait_ready().await.unwrap();
    s
}
