//! Mesh benchmark on the real test bed; prints a table.
//!
//! `scripts/bench.sh` runs it with the release sidecar binary. Figures:
//! time to full mesh for N = 3, 5, 10, 20, 30 (`MESH_SIZES`, e.g.
//! `MESH_SIZES="30 50"`), from the moment the last geth's IPC answers and the
//! sidecars are started, split into where the time goes: every member in the
//! registry, every sidecar's desired set full, geth's own view full
//! (`admin_peers` on every node). Then a rolling replacement of every pod
//! (`MESH_ROLLING`, default N = 10 and 30): one at a time, the sidecar gets
//! SIGTERM (it deregisters), geth restarts on a new IP with its key, a new
//! sidecar starts; re-mesh time per pod and for the whole rollout. At N=10 also
//! the time to re-mesh after an IP move (from the moved geth's IPC answering),
//! time to drop a deleted member from the registry and every other sidecar's
//! desired set, and at steady state the sidecars' RSS, CPU and apiserver
//! requests per minute (from the audit log).
//!
//! Each for both registry layouts (`MESH_LAYOUTS`, default "configmap leases").
//! With each full mesh: the CPU each part used, and the reconcile passes each
//! sidecar ran. `MESH_GETH_PROFILE=<dir>` also writes geth's own CPU profile of
//! each node for that span (see [`start_geth_profiles`]).
//!
//! geth dials at most `maxpeers/3` peers; the newest member of a pair dials it,
//! so the last one up dials N-1: every node runs with `--maxpeers` max(50, 3N).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    missing_docs
)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use futures::StreamExt;
use geth_ipc::{AdminApi, ClientOptions, Endpoint, GethClient, NodeId, PeerEventKind};
use integration_tests::{Mesh, MeshOptions, NodeSpec, cpu_time, eventually, ipc_call};
use tokio::task::JoinHandle;

const POLL_LIMIT: Duration = Duration::from_secs(120);
/// A stage slower than this prints the links still missing (once).
const SLOW: Duration = Duration::from_secs(5);

/// The stages' poll interval: `MESH_POLL_MS`, 10 ms unless set.
fn poll_every() -> Duration {
    Duration::from_millis(std::env::var("MESH_POLL_MS").map_or(10, |v| v.parse().unwrap()))
}

/// A process's resident memory (KiB) and the CPU it has used so far.
fn proc_stat(pid: u32) -> (u64, Duration) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kib = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (rss_kib, cpu_time(pid).unwrap_or_default())
}

/// CPU seconds (user + system) used by each part of the test bed.
#[derive(Debug, Default, Clone, Copy)]
struct Cpu {
    geth: f64,
    sidecars: f64,
    apiserver: f64,
    etcd: f64,
    bench: f64,
}

impl Cpu {
    /// What the processes have used so far (a sidecar's whole life so far).
    fn of(m: &Mesh, geth: &[u32], sidecars: &[u32]) -> Self {
        let secs = |pids: &[u32]| {
            pids.iter()
                .filter_map(|&p| cpu_time(p))
                .sum::<Duration>()
                .as_secs_f64()
        };
        Self {
            geth: secs(geth),
            sidecars: secs(sidecars),
            apiserver: secs(&m.cluster.apiserver_pid().into_iter().collect::<Vec<_>>()),
            etcd: secs(&[m.cluster.etcd_pid()]),
            bench: secs(&[std::process::id()]),
        }
    }

    fn since(self, before: &Self) -> Self {
        Self {
            geth: self.geth - before.geth,
            sidecars: self.sidecars - before.sidecars,
            apiserver: self.apiserver - before.apiserver,
            etcd: self.etcd - before.etcd,
            bench: self.bench - before.bench,
        }
    }

    fn total(&self) -> f64 {
        self.geth + self.sidecars + self.apiserver + self.etcd + self.bench
    }
}

struct Row {
    what: String,
    value: String,
}

/// geth's own view of one node's links, from its peer events: resolves to
/// when the node first had every peer of `want`, confirmed by `admin_peers`.
/// Opened before the sidecars start, it costs geth nothing while the mesh
/// forms (polling `admin_peers` of 30 nodes every 10 ms did: geth decodes
/// each peer's public key for each answer).
fn track_links(ipc: std::path::PathBuf, want: BTreeSet<NodeId>) -> JoinHandle<Instant> {
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

/// When each stage of a mesh forming was first seen, from `t0`.
struct Stages {
    registered: Duration,
    desired: Duration,
    mesh: Duration,
}

/// Polls (every 10 ms, only what is not done yet) until every member of `all`
/// is registered, every sidecar's desired set holds the N-1 others, and every
/// geth lists the N-1 others in `admin_peers`; or, given `links` (one
/// [`track_links`] per member), until each of those has resolved.
async fn stages(
    m: &Mesh,
    all: &[usize],
    t0: Instant,
    mut links: Option<Vec<JoinHandle<Instant>>>,
) -> Stages {
    let n = all.len();
    let want_pods: BTreeSet<String> = all
        .iter()
        .map(|&i| m.net.node(i).name().to_owned())
        .collect();
    let ids = m.ids(all);
    let want = (n - 1) as f64;
    let (mut registered, mut desired, mut mesh) = (None, None, None);
    let mut desired_left: BTreeSet<usize> = all.iter().copied().collect();
    let mut mesh_left: BTreeSet<usize> = all.iter().copied().collect();
    let mut slow_reported = false;
    let deadline = t0 + POLL_LIMIT;
    while registered.is_none() || desired.is_none() || mesh.is_none() {
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
        if let Some(handles) = links.as_mut().filter(|_| mesh.is_none()) {
            if handles.iter().all(JoinHandle::is_finished) {
                let mut last = t0;
                for h in handles.drain(..) {
                    last = last.max(h.await.unwrap());
                }
                mesh = Some(last - t0);
            }
        } else if mesh.is_none() {
            let mut done = Vec::new();
            let ids = &ids;
            let reads = mesh_left
                .iter()
                .map(|&i| async move { (i, m.missing_peers(i, ids).await) });
            for (i, missing) in futures::future::join_all(reads).await {
                let Some(missing) = missing else {
                    continue;
                };
                if missing.is_empty() {
                    done.push(i);
                } else if !slow_reported && t0.elapsed() > SLOW {
                    // Where the time goes when it is long: which links are missing.
                    println!("  (after {SLOW:?}, N={n}: node {i} lacks peers {missing:?})");
                }
            }
            for i in done {
                mesh_left.remove(&i);
            }
            slow_reported |= t0.elapsed() > SLOW;
            if mesh_left.is_empty() {
                mesh = Some(t0.elapsed());
            }
        }
        tokio::time::sleep(poll_every()).await;
    }
    Stages {
        registered: registered.unwrap_or_default(),
        desired: desired.unwrap_or_default(),
        mesh: mesh.unwrap_or_default(),
    }
}

/// `MESH_GETH_PROFILE=<dir>`: geth's own CPU profile (`debug_startCPUProfile`
/// over IPC) of every node from the sidecars' start to full mesh, written to
/// `<dir>/geth-N<n>-<layout>-<i>.pprof` (all together:
/// `go tool pprof -top <dir>/geth-N30-leases-*.pprof`). True when started.
async fn start_geth_profiles(m: &Mesh, layout: &str) -> bool {
    let Ok(dir) = std::env::var("MESH_GETH_PROFILE") else {
        return false;
    };
    std::fs::create_dir_all(&dir).unwrap();
    let n = m.net.nodes().len();
    for (i, g) in m.net.nodes().iter().enumerate() {
        let file = format!("{dir}/geth-N{n}-{layout}-{i}.pprof");
        ipc_call(
            g.ipc_path(),
            "debug_startCPUProfile",
            serde_json::json!([file]),
        )
        .await
        .unwrap();
    }
    true
}

async fn stop_geth_profiles(m: &Mesh) {
    for g in m.net.nodes() {
        ipc_call(g.ipc_path(), "debug_stopCPUProfile", serde_json::json!([]))
            .await
            .unwrap();
    }
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// Replaces every pod in turn, as `kubectl rollout restart` of a StatefulSet
/// would: SIGTERM to the sidecar (it deregisters), geth stopped and started on
/// a new IP with its key, a new sidecar; waits for the full mesh before the
/// next pod. Re-mesh is timed from the new sidecar's start.
async fn rolling(m: &mut Mesh, layout: &str, rows: &mut Vec<Row>) {
    let n = m.net.nodes().len();
    let all: Vec<usize> = (0..n).collect();
    let started = Instant::now();
    let mut each = Vec::new();
    let mut registered = Vec::new();
    for i in (0..n).rev() {
        m.take_sidecar(i).unwrap().terminate().await;
        let ip = m.net.fresh_ip();
        m.net.node_mut(i).restart_on_new_ip(ip).await.unwrap();
        let t0 = Instant::now();
        m.start_sidecar(i).unwrap();
        let s = stages(m, &all, t0, None).await;
        eprintln!(
            "rolling {layout} N={n}: pod {i} registered {} / geth full mesh {}",
            secs(s.registered),
            secs(s.mesh)
        );
        registered.push(s.registered);
        each.push(s.mesh);
    }
    let total = started.elapsed();
    each.sort();
    registered.sort();
    let median = each[each.len() / 2];
    let max = each[each.len() - 1];
    rows.push(Row {
        what: format!(
            "rolling replacement of all N={n} pods ({layout}, new IPs): re-mesh per pod, median / max"
        ),
        value: format!("{} / {}", secs(median), secs(max)),
    });
    rows.push(Row {
        what: format!("  ... the replaced pod registered, median / max (N={n})"),
        value: format!(
            "{} / {}",
            secs(registered[registered.len() / 2]),
            secs(registered[registered.len() - 1])
        ),
    });
    rows.push(Row {
        what: format!("  ... whole rollout, N={n} (includes geth stop/start)"),
        value: secs(total),
    });
}

async fn bench_n(n: usize, layout: &str, rows: &mut Vec<Row>, steady: bool, roll: bool) {
    let options = MeshOptions {
        spec: NodeSpec {
            maxpeers: u32::try_from(3 * n).unwrap_or(u32::MAX).max(50),
            // MESH_GETH_VERBOSITY=5 logs geth's dial errors (traces).
            verbosity: std::env::var("MESH_GETH_VERBOSITY").map_or(3, |v| v.parse().unwrap()),
            ..NodeSpec::default()
        },
        ..MeshOptions::default()
    };
    let env = [("REGISTRY_LAYOUT", layout)];
    let mut m = Mesh::without_sidecars_with(&format!("bench{n}{layout}"), n, &env, options)
        .await
        .unwrap();
    if layout == "leases" {
        m.cluster.grant_leases(&m.ns).await.unwrap();
    }
    // "geth already up": its IPC answers, and its start-up work (the KZG
    // library, 2 to 3 s of CPU per node) is done. Started together, N nodes
    // keep both cores busy for ~1.4·N s after their IPC answers; sidecars
    // started into that measure geth's start-up, not the mesh.
    let settled = m.net.wait_settled(POLL_LIMIT).await.unwrap();
    eprintln!(
        "full mesh {layout} N={n}: geth start-up settled {} after the IPC answered",
        secs(settled)
    );
    // Measure from the sidecars' start.
    let geth_pids: Vec<u32> = m.net.nodes().iter().filter_map(|g| g.pid()).collect();
    let cpu_before = Cpu::of(&m, &geth_pids, &[]);
    let profiled = start_geth_profiles(&m, layout).await;
    let all: Vec<usize> = (0..n).collect();
    let id = |i: usize| -> NodeId { m.net.node(i).node_id().parse().unwrap() };
    let links: Vec<_> = all
        .iter()
        .map(|&i| {
            let want = all.iter().filter(|&&j| j != i).map(|&j| id(j)).collect();
            track_links(m.net.node(i).ipc_path().to_owned(), want)
        })
        .collect();
    let t0 = Instant::now();
    for i in 0..n {
        m.start_sidecar(i).unwrap();
    }
    let s = stages(&m, &all, t0, Some(links)).await;
    if profiled {
        stop_geth_profiles(&m).await;
    }
    let sidecar_pids: Vec<u32> = m
        .sidecars
        .iter_mut()
        .filter_map(|s| s.as_mut().map(|s| s.proc_mut().pid()))
        .collect();
    let cpu = Cpu::of(&m, &geth_pids, &sidecar_pids).since(&cpu_before);
    rows.push(Row {
        what: format!(
            "full mesh, N={n} ({layout}): all registered / all desired sets full / geth full mesh"
        ),
        value: format!(
            "{} / {} / {}",
            secs(s.registered),
            secs(s.desired),
            secs(s.mesh)
        ),
    });
    rows.push(Row {
        what: format!(
            "  ... CPU from the sidecars' start to full mesh, N={n}: geth / sidecars / apiserver / etcd / this bench"
        ),
        value: format!(
            "{:.2} / {:.2} / {:.2} / {:.2} / {:.2} s ({:.2} cores on average)",
            cpu.geth,
            cpu.sidecars,
            cpu.apiserver,
            cpu.etcd,
            cpu.bench,
            cpu.total() / s.mesh.as_secs_f64()
        ),
    });
    let mut passes = Vec::new();
    for i in 0..n {
        passes.push(
            m.metric(i, "geth_peer_sidecar_reconciles_total")
                .await
                .unwrap_or_default(),
        );
    }
    rows.push(Row {
        what: format!("  ... reconcile passes per sidecar to full mesh, N={n}: mean / max"),
        value: format!(
            "{:.1} / {}",
            passes.iter().sum::<f64>() / n as f64,
            passes.iter().copied().fold(0.0, f64::max)
        ),
    });
    if roll {
        rolling(&mut m, layout, rows).await;
    }
    if !steady {
        return;
    }

    // Steady state: RSS, CPU, apiserver requests over a window.
    m.wait_registered(&all, POLL_LIMIT).await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await; // let start-up traffic settle
    let user = m.ns.service_account_user();
    let before_reqs = m.cluster.audited_requests(&user);
    let pids: Vec<u32> = m
        .sidecars
        .iter_mut()
        .map(|s| s.as_mut().unwrap().proc_mut().pid())
        .collect();
    let before: Vec<(u64, Duration)> = pids.iter().map(|&p| proc_stat(p)).collect();
    let window = Duration::from_secs(60);
    tokio::time::sleep(window).await;
    let after: Vec<(u64, Duration)> = pids.iter().map(|&p| proc_stat(p)).collect();
    let reqs = m.cluster.audited_requests(&user);
    let new_reqs = &reqs[before_reqs.len().min(reqs.len())..];
    let writes = new_reqs
        .iter()
        .filter(|(v, _, _)| matches!(v.as_str(), "create" | "update" | "patch" | "delete"))
        .count();
    let max_rss = after.iter().map(|a| a.0).max().unwrap_or(0);
    let cpu: Duration = after
        .iter()
        .zip(&before)
        .map(|(a, b)| a.1.saturating_sub(b.1))
        .sum();
    let cpu_pct = cpu.as_secs_f64() / window.as_secs_f64() / n as f64 * 100.0;
    rows.push(Row {
        what: format!("sidecar RSS at idle (max of {n})"),
        value: format!("{:.1} MiB", max_rss as f64 / 1024.0),
    });
    rows.push(Row {
        what: "sidecar CPU at idle (mean)".into(),
        value: format!("{cpu_pct:.2} % of a core"),
    });
    rows.push(Row {
        what: "apiserver requests / min / sidecar at steady state".into(),
        value: format!(
            "{:.2} ({} writes in total)",
            new_reqs.len() as f64 / n as f64 / (window.as_secs_f64() / 60.0),
            writes
        ),
    });

    // IP move of the last node: pod replaced, same key, new IP.
    let last = n - 1;
    let new_ip = m.net.fresh_ip();
    m.take_sidecar(last).unwrap().kill().await;
    m.net
        .node_mut(last)
        .restart_on_new_ip(new_ip)
        .await
        .unwrap();
    let t0 = Instant::now();
    m.start_sidecar(last).unwrap();
    m.wait_full_mesh(&all, POLL_LIMIT).await.unwrap();
    rows.push(Row {
        what: format!("re-mesh after an IP move, N={n}"),
        value: format!("{:.2} s", t0.elapsed().as_secs_f64()),
    });

    // Deleted member: SIGTERM its sidecar (deregisters), stop geth.
    let t0 = Instant::now();
    let sc = m.take_sidecar(last).unwrap();
    let exit = sc.terminate().await;
    m.net.node_mut(last).stop().await;
    let rest: Vec<usize> = (0..last).collect();
    m.wait_registered(&rest, POLL_LIMIT).await.unwrap();
    let want = (last - 1) as f64;
    for i in 0..last {
        eventually("desired peers to drop", POLL_LIMIT, || async {
            (m.metric(i, "geth_peer_sidecar_desired_peers").await == Some(want)).then_some(())
        })
        .await
        .unwrap();
    }
    rows.push(Row {
        what: format!("drop a deleted member everywhere, N={n} (sidecar exit {exit:?})"),
        value: format!("{:.2} s", t0.elapsed().as_secs_f64()),
    });
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut rows = Vec::new();
    let list = |var: &str, default: &str| -> Vec<usize> {
        std::env::var(var)
            .unwrap_or_else(|_| default.to_owned())
            .split_whitespace()
            .map(|v| v.parse().expect("a list of node counts"))
            .collect()
    };
    let sizes = list("MESH_SIZES", "3 5 10 20 30");
    let roll = list("MESH_ROLLING", "10 30");
    let layouts = std::env::var("MESH_LAYOUTS").unwrap_or_else(|_| "configmap leases".into());
    rt.block_on(async {
        for layout in layouts.split_whitespace() {
            for &n in &sizes {
                let steady = n == 10 && layout == "configmap";
                bench_n(n, layout, &mut rows, steady, roll.contains(&n)).await;
            }
        }
    });
    let w = rows.iter().map(|r| r.what.len()).max().unwrap_or(10);
    println!("\n{:<w$}  value", "measure");
    println!("{}", "-".repeat(w + 20));
    for r in rows {
        println!("{:<w$}  {}", r.what, r.value);
    }
}
