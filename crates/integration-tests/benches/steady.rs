//! Steady-state cost per sidecar on the real apiserver (issue 12); prints a
//! table.
//!
//! For N = 10, 100, 1000 members: the registry ConfigMap is created with N
//! member records (one create, as the admin); then N simulated sidecars, each
//! with its own kube client (own connection, own User-Agent) and the sidecar's
//! own registry code (`ConfigMapRegistry::watch`, the default `KeyPatch`
//! protocol), follow it. Only the registry's traffic is simulated: no geth, no
//! probes, no pod watch (`deploy/overlays/pod-evidence` adds one more watch
//! per sidecar).
//!
//! Figures:
//! - requests per minute per sidecar with 0 writes: every request of the
//!   sidecars' User-Agents received by the apiserver during a quiet window
//!   (`STEADY_BENCH_QUIET_SECS`, default 300: kube's watch requests time out
//!   after 290 s and are renewed), from the audit log, and the apiserver's CPU
//!   time during that window;
//! - one membership change (one more member registering by `upsert`): its
//!   writes, the watch events each sidecar received for it (until every
//!   sidecar saw the final resourceVersion), the total fan-out, the object
//!   size each event carries, the time until every sidecar saw it, and the
//!   apiserver's CPU time for it;
//! - CPU per reconcile pass at N members, in this process: decoding the
//!   ConfigMap (`schema::decode`, done per watch event) plus
//!   `reconcile_core::plan` with every member applied and connected (median
//!   of 50).
//!
//! Each N runs for both registry layouts (`STEADY_BENCH_LAYOUTS`, default
//! "configmap leases"): with `leases` the N members are Leases, the followers
//! are `LeaseRegistry`s publishing as their pods (so the first-ranked one
//! rewrites `static-nodes.json` after the change, as in a fleet), and the
//! object size is the ConfigMap's (`static-nodes.json` and
//! `lease-members.json`; each Lease is about 1 KiB).
//!
//! `STEADY_BENCH_N=10,100` restricts the sizes.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    missing_docs
)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use integration_tests::{Cluster, TestContext, TestNamespace, test_member};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::PostParams;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use peer_registry::{
    ConfigMapRegistry, DEFAULT_NAME, LeaseRegistry, MemberRecord, PeerRegistry, schema,
};

const SIZES: [usize; 3] = [10, 100, 1000];
const AGENT: &str = "steady-bench/sidecar-";

/// The apiserver's CPU time so far.
fn apiserver_cpu(pid: u32) -> Duration {
    integration_tests::cpu_time(pid).expect("the apiserver runs")
}

/// A client for the namespace's service account with its own connection and
/// User-Agent (the part before `/` shared, as the sidecars share theirs).
async fn client_as(ns: &TestNamespace, agent: &str) -> Client {
    let yaml = std::fs::read_to_string(&ns.kubeconfig).unwrap();
    let kc = Kubeconfig::from_yaml(&yaml).unwrap();
    let mut config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    config.headers.push((
        http::header::USER_AGENT,
        http::HeaderValue::from_str(agent).unwrap(),
    ));
    Client::try_from(config).unwrap()
}

/// Requests whose User-Agent starts with `agent` received in `[from, to)`,
/// from the audit log: one per audit id (a watch counts once, open or ended).
fn requests_between(
    cluster: &Cluster,
    agent: &str,
    from: jiff::Timestamp,
    to: jiff::Timestamp,
) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(cluster.dir().join("audit.log")).unwrap_or_default();
    let mut seen = BTreeSet::new();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| {
            e["userAgent"]
                .as_str()
                .is_some_and(|a| a.starts_with(agent))
        })
        .filter(|e| {
            e["requestReceivedTimestamp"]
                .as_str()
                .and_then(|t| t.parse::<jiff::Timestamp>().ok())
                .is_some_and(|t| t >= from && t < to)
        })
        .filter(|e| seen.insert(e["auditID"].as_str().unwrap_or_default().to_owned()))
        .collect()
}

/// One simulated sidecar's view: watch events received, last resourceVersion.
#[derive(Default)]
struct Follower {
    events: AtomicU64,
    last_rv: Mutex<Option<String>>,
}

struct Row {
    n: usize,
    layout: &'static str,
    object_kib: f64,
    quiet: Duration,
    requests_per_min: f64,
    quiet_verbs: String,
    idle_cpu_per_min: Duration,
    change_writes: usize,
    events_per_sidecar: f64,
    events_total: u64,
    visible_to_all: Duration,
    change_cpu: Duration,
    pass_cpu: Duration,
}

/// Waits until every follower's last resourceVersion is `rv`.
async fn all_at(followers: &[Arc<Follower>], rv: &str, limit: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        let behind = followers
            .iter()
            .filter(|f| f.last_rv.lock().unwrap().as_deref() != Some(rv))
            .count();
        if behind == 0 {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < limit,
            "{behind} followers did not see {rv} in {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// CPU of one reconcile pass at `members`: decode + plan, median of 50.
/// With `leases`, the decode is the ConfigMap's plus each member's record
/// from its Lease annotation (JSON), as `LeaseRegistry` builds a snapshot.
fn pass_cpu(
    data: &BTreeMap<String, String>,
    members: &BTreeMap<String, MemberRecord>,
    leases: bool,
) -> Duration {
    let annotations: Vec<String> = if leases {
        members
            .values()
            .map(|m| serde_json::to_string(m).unwrap())
            .collect()
    } else {
        Vec::new()
    };
    let mine = members.values().next().unwrap().clone();
    let me = reconcile_core::SelfIdentity {
        pod: mine.pod.clone(),
        node_id: mine.node_id,
        advertised: mine.enode.clone(),
        pod_uid: mine.pod_uid.clone(),
        pod_ip: mine.pod_ip.clone(),
        sidecar_version: mine.sidecar_version.clone(),
    };
    let others = members.values().filter(|m| m.pod != mine.pod);
    let applied: BTreeMap<_, _> = others
        .clone()
        .map(|m| (m.node_id, m.enode.clone()))
        .collect();
    let connected: BTreeMap<_, _> = others
        .map(|m| {
            let peer = reconcile_core::PeerObservation {
                eth_ready: true,
                inbound: false,
            };
            (m.node_id, peer)
        })
        .collect();
    let config = reconcile_core::Config::default();
    let mut times: Vec<Duration> = (0..50)
        .map(|_| {
            let t0 = Instant::now();
            let mut snap = schema::decode(data, Some("1".into()));
            for a in &annotations {
                let m: MemberRecord = serde_json::from_str(a).unwrap();
                snap.members.insert(m.pod.clone(), m);
            }
            let obs = reconcile_core::Observation {
                connected: &connected,
                ..reconcile_core::Observation::new(
                    jiff::Timestamp::now(),
                    &me,
                    Some(&snap),
                    &applied,
                )
            };
            let plan = reconcile_core::plan(&config, &obs);
            assert!(
                plan.registry.is_empty(),
                "steady state: {:?}",
                plan.registry
            );
            assert!(plan.geth.is_empty(), "steady state: {:?}", plan.geth);
            t0.elapsed()
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}

/// The largest resourceVersion of the member Leases and the ConfigMap: the
/// revision a follower's snapshot reports once it has seen them all.
async fn revision(cluster: &Cluster, ns: &str) -> String {
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(cluster.admin(), ns);
    let cm = Api::<ConfigMap>::namespaced(cluster.admin(), ns)
        .get(DEFAULT_NAME)
        .await
        .unwrap();
    let rv = |m: &kube::api::ObjectMeta| {
        m.resource_version
            .as_deref()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let list = leases.list(&Default::default()).await.unwrap();
    list.items
        .iter()
        .map(|l| rv(&l.metadata))
        .chain([rv(&cm.metadata)])
        .max()
        .unwrap()
        .to_string()
}

async fn run(cluster: &Cluster, n: usize, layout: &'static str, quiet: Duration) -> Row {
    let leases = layout == "leases";
    let ns = cluster
        .namespace(&format!("steady{n}{layout}"))
        .await
        .unwrap();
    if leases {
        cluster.grant_leases(&ns).await.unwrap();
    }
    let members: BTreeMap<String, MemberRecord> = (0..n)
        .map(|i| {
            let m = test_member(&format!("geth-{i}"), i as u32);
            (m.pod.clone(), m)
        })
        .collect();
    let data = if leases {
        let admin = LeaseRegistry::new(cluster.admin(), ns.name.clone(), DEFAULT_NAME);
        futures::stream::iter(members.values().cloned())
            .map(|m| admin.upsert(m))
            .buffer_unordered(16)
            .for_each(|r| {
                r.unwrap();
                futures::future::ready(())
            })
            .await;
        schema::encode_lease_members(&BTreeMap::new(), &members).unwrap()
    } else {
        schema::encode(&BTreeMap::new(), &members)
    };
    let object_kib = schema::encoded_size(&data) as f64 / 1024.0;
    let admin: Api<ConfigMap> = Api::namespaced(cluster.admin(), &ns.name);
    let created = admin
        .create(
            &PostParams::default(),
            &ConfigMap {
                metadata: kube::api::ObjectMeta {
                    name: Some(DEFAULT_NAME.into()),
                    ..Default::default()
                },
                data: Some(data.clone()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let rv0 = if leases {
        revision(cluster, &ns.name).await
    } else {
        created.metadata.resource_version.unwrap()
    };

    let mut followers = Vec::with_capacity(n);
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let client = client_as(&ns, &format!("{AGENT}{i}")).await;
        let reg: Box<dyn PeerRegistry> = if leases {
            Box::new(
                LeaseRegistry::new(client, ns.name.clone(), DEFAULT_NAME)
                    .publishing_as(format!("geth-{i}")),
            )
        } else {
            Box::new(ConfigMapRegistry::new(
                client,
                ns.name.clone(),
                DEFAULT_NAME,
            ))
        };
        let f = Arc::new(Follower::default());
        followers.push(f.clone());
        tasks.push(tokio::spawn(async move {
            let mut watch = reg.watch();
            while let Some(item) = watch.next().await {
                if let Ok(snap) = item {
                    f.events.fetch_add(1, Ordering::Relaxed);
                    *f.last_rv.lock().unwrap() = snap.resource_version;
                }
            }
        }));
    }
    all_at(&followers, &rv0, Duration::from_secs(300)).await;

    // Quiet: no writes at all.
    let pid = cluster.apiserver_pid().unwrap();
    let (from, cpu0) = (jiff::Timestamp::now(), apiserver_cpu(pid));
    tokio::time::sleep(quiet).await;
    let (to, idle_cpu) = (jiff::Timestamp::now(), apiserver_cpu(pid) - cpu0);
    let quiet_reqs = requests_between(cluster, AGENT, from, to);
    let mut verbs: BTreeMap<String, usize> = BTreeMap::new();
    for e in &quiet_reqs {
        *verbs
            .entry(e["verb"].as_str().unwrap_or_default().to_owned())
            .or_default() += 1;
    }
    let minutes = quiet.as_secs_f64() / 60.0;

    // One membership change.
    let before: Vec<u64> = followers
        .iter()
        .map(|f| f.events.load(Ordering::Relaxed))
        .collect();
    let changer_client = client_as(&ns, "steady-bench/changer").await;
    let changer: Box<dyn PeerRegistry> = if leases {
        Box::new(LeaseRegistry::new(
            changer_client,
            ns.name.clone(),
            DEFAULT_NAME,
        ))
    } else {
        Box::new(ConfigMapRegistry::new(
            changer_client,
            ns.name.clone(),
            DEFAULT_NAME,
        ))
    };
    let (from, cpu0) = (jiff::Timestamp::now(), apiserver_cpu(pid));
    let t0 = Instant::now();
    let new_member = test_member("geth-new", n as u32 + 7);
    changer.upsert(new_member.clone()).await.unwrap();
    // With leases, the change is complete once static-nodes.json lists it.
    let entry = new_member.enode.to_string();
    loop {
        let cm = admin.get(DEFAULT_NAME).await.unwrap();
        let listed = cm
            .data
            .unwrap_or_default()
            .get(schema::STATIC_NODES_KEY)
            .is_some_and(|v| v.contains(&entry));
        if listed {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(300), "never listed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rv = if leases {
        revision(cluster, &ns.name).await
    } else {
        admin
            .get(DEFAULT_NAME)
            .await
            .unwrap()
            .metadata
            .resource_version
            .unwrap()
    };
    all_at(&followers, &rv, Duration::from_secs(300)).await;
    let visible_to_all = t0.elapsed();
    let change_cpu = apiserver_cpu(pid) - cpu0;
    let to = jiff::Timestamp::now();
    // The changer's writes, and the followers' (the lease layout's publisher).
    let change_writes = requests_between(cluster, "steady-bench/", from, to)
        .iter()
        .filter(|e| matches!(e["verb"].as_str(), Some("create" | "update" | "patch")))
        .count();
    let events: Vec<u64> = followers
        .iter()
        .zip(&before)
        .map(|(f, b)| f.events.load(Ordering::Relaxed) - b)
        .collect();
    let events_total: u64 = events.iter().sum();
    for t in &tasks {
        t.abort();
    }

    Row {
        n,
        layout,
        object_kib,
        quiet,
        requests_per_min: quiet_reqs.len() as f64 / n as f64 / minutes,
        quiet_verbs: if verbs.is_empty() {
            "none".into()
        } else {
            verbs
                .iter()
                .map(|(v, c)| format!("{c} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        },
        idle_cpu_per_min: idle_cpu.div_f64(minutes),
        change_writes,
        events_per_sidecar: events_total as f64 / n as f64,
        events_total,
        visible_to_all,
        change_cpu,
        pass_cpu: pass_cpu(&data, &members, leases),
    }
}

fn print_table(rows: &[Row]) {
    let header = [
        "N",
        "layout",
        "object",
        "quiet window",
        "requests/min per sidecar (0 writes)",
        "requests in window (all)",
        "apiserver CPU/min idle",
        "writes per change",
        "watch events per change per sidecar",
        "watch events per change (all)",
        "change seen by all",
        "apiserver CPU per change",
        "CPU per reconcile pass",
    ];
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.n.to_string(),
                r.layout.to_owned(),
                format!("{:.0} KiB", r.object_kib),
                format!("{:.0} s", r.quiet.as_secs_f64()),
                format!("{:.3}", r.requests_per_min),
                r.quiet_verbs.clone(),
                format!("{:.2} s", r.idle_cpu_per_min.as_secs_f64()),
                r.change_writes.to_string(),
                format!("{:.2}", r.events_per_sidecar),
                r.events_total.to_string(),
                format!("{:.2} s", r.visible_to_all.as_secs_f64()),
                format!("{:.2} s", r.change_cpu.as_secs_f64()),
                format!("{:.3} ms", r.pass_cpu.as_secs_f64() * 1000.0),
            ]
        })
        .collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|c| {
            cells
                .iter()
                .map(|row| row[c].len())
                .chain([header[c].len()])
                .max()
                .unwrap()
        })
        .collect();
    let line = |row: Vec<&str>| {
        let s: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:>w$}"))
            .collect();
        println!("| {} |", s.join(" | "));
    };
    println!();
    line(header.to_vec());
    println!(
        "|{}|",
        widths
            .iter()
            .map(|w| "-".repeat(w + 2))
            .collect::<Vec<_>>()
            .join("|")
    );
    for row in &cells {
        line(row.iter().map(String::as_str).collect());
    }
}

fn main() {
    let sizes: Vec<usize> = std::env::var("STEADY_BENCH_N").map_or_else(
        |_| SIZES.to_vec(),
        |v| v.split(',').map(|s| s.trim().parse().unwrap()).collect(),
    );
    let quiet = Duration::from_secs(
        std::env::var("STEADY_BENCH_QUIET_SECS").map_or(300, |v| v.parse().unwrap()),
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut rows = Vec::new();
    rt.block_on(async {
        let ctx = TestContext::new("steady-bench");
        let cluster = Cluster::start(&ctx, "127.0.0.1".parse().unwrap())
            .await
            .unwrap();
        let layouts =
            std::env::var("STEADY_BENCH_LAYOUTS").unwrap_or_else(|_| "configmap leases".into());
        for layout in layouts.split_whitespace() {
            let layout: &'static str = if layout == "leases" {
                "leases"
            } else {
                "configmap"
            };
            for &n in &sizes {
                let row = run(&cluster, n, layout, quiet).await;
                println!(
                    "N={n} {layout}: {:.3} requests/min per sidecar, {} events per change",
                    row.requests_per_min, row.events_total
                );
                rows.push(row);
            }
        }
    });
    print_table(&rows);
}
