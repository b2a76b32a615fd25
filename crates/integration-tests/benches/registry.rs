//! Registry contention benchmark on the real apiserver (issues 4 and 12);
//! prints a table.
//!
//! For N = 10, 50, 200, 1000 registrants, each with its own kube client (its
//! own connection, warmed up by one GET), all released at the same moment by
//! a tokio `Barrier`, each upserts its own member into the one shared
//! ConfigMap, which does not exist yet (so the first write of every
//! registrant is a create, and all but one lose that race). Registrants are
//! tasks of this process, not processes. Every run uses a fresh namespace.
//!
//! Each N runs once per write protocol (`WriteProtocol`): the whole-object
//! compare-and-swap (PUT with resourceVersion, every concurrent write
//! conflicts) and the per-member-key JSON Patch (the default since issue 12).
//!
//! Figures per run: writes attempted (create + update + patch requests) and
//! conflicts (409 responses, AlreadyExists included, and 422 failed JSON
//! Patch `test`s), both counted from the apiserver's audit log, write
//! responses 429 / 5xx (overload, etcd timeouts), and writes per member; the
//! most write attempts one registrant made (each client sends its own
//! User-Agent, which the audit log records); registrants that gave up
//! (`Error::Conflict`, attempts exhausted); p50 / p99 / max time from the
//! barrier until a registrant's upsert returned; time until all were
//! registered; the apiserver's CPU time during the race (utime + stime of its
//! process, from `/proc/<pid>/stat`, in USER_HZ = 100 ticks per second); and
//! the end check: members present in the ConfigMap, those whose upsert
//! succeeded but which are absent (lost; must be 0), and `static-nodes.json`
//! listing exactly the members. `REGISTRY_BENCH_N=10,50` restricts the sizes,
//! `REGISTRY_BENCH_PROTOCOLS=CAS` or `=patch` the protocols.
//! `REGISTRY_BENCH_CAP_SECS` (default 120) cuts a run off: registrants not
//! done by then are cancelled and counted as unfinished ("all registered"
//! then says "cut at ..."), so a slow protocol at a large N cannot hold up the
//! table.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    missing_docs
)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use integration_tests::{Cluster, TestContext, TestNamespace, test_member};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use peer_registry::{ConfigMapRegistry, DEFAULT_NAME, Error, PeerRegistry, WriteProtocol, schema};

const SIZES: [usize; 4] = [10, 50, 200, 1000];

/// The variants each N runs with: (label, protocol).
/// `REGISTRY_BENCH_PROTOCOLS=CAS` or `=patch` runs only one of them.
fn variants() -> Vec<(&'static str, WriteProtocol)> {
    let only = std::env::var("REGISTRY_BENCH_PROTOCOLS").unwrap_or_default();
    vec![
        ("whole-object CAS", WriteProtocol::WholeObjectCas),
        ("key patch", WriteProtocol::KeyPatch),
    ]
    .into_iter()
    .filter(|(label, _)| only.is_empty() || label.contains(only.as_str()))
    .collect()
}

/// The apiserver's CPU time so far (utime + stime), from `/proc/<pid>/stat`.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which is in parentheses): utime is the
    // 14th field of the line, stime the 15th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

/// A client for the namespace's service account with its own connection pool
/// and a User-Agent naming the registrant, so the audit log tells them apart.
/// The part before the `/` is common: the apiserver names the field manager of
/// a write after it, and 200 distinct managers would make every write carry
/// (and the server recompute) 200 managedFields entries, which the sidecars,
/// sharing one User-Agent, never do.
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

enum Fail {
    /// `Error::Conflict`: the attempts were exhausted.
    GaveUp,
    Other(String),
}

struct Outcome {
    elapsed: Duration,
    result: Result<(), Fail>,
}

struct Row {
    n: usize,
    /// Registrants cancelled at the cap, unfinished.
    unfinished: usize,
    cap: Duration,
    protocol: &'static str,
    writes: usize,
    conflicts: usize,
    /// Write responses 429 or 5xx (apiserver overload, etcd timeouts).
    overloaded: usize,
    gets: usize,
    max_writes_one: usize,
    gave_up: usize,
    other_errors: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
    all_registered: Option<Duration>,
    apiserver_cpu: Duration,
    present: usize,
    lost: usize,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    // Nearest rank.
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

async fn run(
    cluster: &Cluster,
    n: usize,
    (label, protocol): (&'static str, WriteProtocol),
    run_no: usize,
) -> Row {
    let ns = cluster
        .namespace(&format!("reg{n}-{run_no}"))
        .await
        .unwrap();
    let mut registries = Vec::with_capacity(n);
    for i in 0..n {
        let client = client_as(&ns, &format!("registry-bench/registrant-{i}")).await;
        let reg = ConfigMapRegistry::new(client, ns.name.clone(), DEFAULT_NAME)
            .with_write_protocol(protocol);
        // Warm the connection (TLS handshake) so the race measures the CAS loop.
        let snap = reg.snapshot().await.unwrap();
        assert!(!snap.exists(), "the registry starts absent");
        registries.push(Arc::new(reg));
    }

    let pid = cluster.apiserver_pid().unwrap();
    let cpu_before = cpu_time(pid);
    let barrier = Arc::new(tokio::sync::Barrier::new(n));
    let mut tasks = Vec::with_capacity(n);
    for (i, reg) in registries.iter().enumerate() {
        let (reg, barrier) = (reg.clone(), barrier.clone());
        let rec = test_member(&format!("geth-{i}"), i as u32);
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let t0 = Instant::now();
            let result = reg.upsert(rec).await.map(|_| ()).map_err(|e| match e {
                Error::Conflict { .. } => Fail::GaveUp,
                e => Fail::Other(e.to_string()),
            });
            (t0, t0.elapsed(), result)
        }));
    }
    let cap = Duration::from_secs(
        std::env::var("REGISTRY_BENCH_CAP_SECS").map_or(120, |v| v.parse().unwrap()),
    );
    let deadline = tokio::time::Instant::now() + cap;
    let mut starts = Vec::with_capacity(n);
    let mut outcomes = Vec::with_capacity(n);
    let mut unfinished = 0;
    for mut t in tasks {
        match tokio::time::timeout_at(deadline, &mut t).await {
            Ok(done) => {
                let (t0, elapsed, result) = done.unwrap();
                starts.push(t0);
                outcomes.push(Outcome { elapsed, result });
            }
            Err(_) => {
                t.abort();
                unfinished += 1;
                outcomes.push(Outcome {
                    elapsed: cap,
                    result: Err(Fail::Other("cut off at the cap".into())),
                });
            }
        }
    }
    let apiserver_cpu = cpu_time(pid) - cpu_before;
    let start = starts.iter().min().copied().unwrap();
    let ends = starts.iter().zip(&outcomes).map(|(s, o)| *s + o.elapsed);

    // End state, read as admin.
    let cm = Api::<ConfigMap>::namespaced(cluster.admin(), &ns.name)
        .get(DEFAULT_NAME)
        .await
        .unwrap();
    let snap = schema::decode(&cm.data.clone().unwrap_or_default(), None);
    let present_pods: BTreeSet<&String> = snap.members.keys().collect();
    let static_nodes: Vec<String> =
        serde_json::from_str(&cm.data.unwrap_or_default()["static-nodes.json"]).unwrap();
    if unfinished == 0 {
        assert_eq!(
            static_nodes.len(),
            present_pods.len(),
            "static-nodes.json out of step with the members"
        );
    }
    let lost = outcomes
        .iter()
        .enumerate()
        .filter(|(i, o)| o.result.is_ok() && !present_pods.contains(&format!("geth-{i}")))
        .count();
    let gave_up = outcomes
        .iter()
        .filter(|o| matches!(o.result, Err(Fail::GaveUp)))
        .count();
    let other_errors: Vec<String> = outcomes
        .iter()
        .filter_map(|o| match &o.result {
            Err(Fail::GaveUp) | Ok(()) => None,
            Err(Fail::Other(e)) if e == "cut off at the cap" => None,
            Err(Fail::Other(e)) => Some(e.clone()),
        })
        .collect();
    if !other_errors.is_empty() {
        println!(
            "N={n} {label}: {} other errors, first: {}",
            other_errors.len(),
            other_errors[0]
        );
    }
    let all_registered = (unfinished == 0 && gave_up == 0 && other_errors.is_empty() && lost == 0)
        .then(|| ends.max().unwrap() - start);

    // Requests, from the audit log (blocking mode: complete once the response is).
    let user = ns.service_account_user();
    let events: Vec<serde_json::Value> = cluster
        .audit_events(&user)
        .into_iter()
        .filter(|e| e["objectRef"]["resource"] == "configmaps")
        .filter(|e| {
            e["userAgent"]
                .as_str()
                .is_some_and(|a| a.starts_with("registry-bench/registrant-"))
        })
        .collect();
    let is_write =
        |e: &serde_json::Value| matches!(e["verb"].as_str(), Some("create" | "update" | "patch"));
    let writes = events.iter().filter(|e| is_write(e)).count();
    let conflicts = events
        .iter()
        .filter(|e| is_write(e) && matches!(e["responseStatus"]["code"].as_u64(), Some(409 | 422)))
        .count();
    let overloaded = events
        .iter()
        .filter(|e| is_write(e))
        .filter(|e| {
            e["responseStatus"]["code"]
                .as_u64()
                .is_some_and(|c| c == 429 || c >= 500)
        })
        .count();
    // The warm-up GETs are not part of the race.
    let gets = events.iter().filter(|e| e["verb"] == "get").count() - n;
    let mut per_agent: BTreeMap<&str, usize> = BTreeMap::new();
    for e in events.iter().filter(|e| is_write(e)) {
        *per_agent
            .entry(e["userAgent"].as_str().unwrap_or_default())
            .or_default() += 1;
    }

    let mut times: Vec<Duration> = outcomes.iter().map(|o| o.elapsed).collect();
    times.sort();
    Row {
        n,
        unfinished,
        cap,
        protocol: label,
        writes,
        conflicts,
        overloaded,
        gets,
        max_writes_one: per_agent.values().copied().max().unwrap_or(0),
        gave_up,
        other_errors: other_errors.len(),
        p50: percentile(&times, 50.0),
        p99: percentile(&times, 99.0),
        max: *times.last().unwrap(),
        all_registered,
        apiserver_cpu,
        present: present_pods.len(),
        lost,
    }
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn print_table(rows: &[Row]) {
    let header = [
        "N",
        "protocol",
        "writes",
        "writes/member",
        "409/422s",
        "429/5xx",
        "GETs",
        "max writes/reg",
        "gave up",
        "p50",
        "p99",
        "max",
        "all registered",
        "apiserver CPU",
        "present",
        "lost",
    ];
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.n.to_string(),
                r.protocol.to_owned(),
                r.writes.to_string(),
                format!("{:.2}", r.writes as f64 / r.n as f64),
                r.conflicts.to_string(),
                r.overloaded.to_string(),
                r.gets.to_string(),
                r.max_writes_one.to_string(),
                if r.other_errors > 0 {
                    format!("{} (+{} other)", r.gave_up, r.other_errors)
                } else {
                    r.gave_up.to_string()
                },
                secs(r.p50),
                secs(r.p99),
                secs(r.max),
                match (r.all_registered, r.unfinished) {
                    (Some(d), _) => secs(d),
                    (None, 0) => "never".to_owned(),
                    (None, k) => format!(
                        "cut at {:.0} s ({}/{} done)",
                        r.cap.as_secs_f64(),
                        r.n - k,
                        r.n
                    ),
                },
                secs(r.apiserver_cpu),
                format!("{}/{}", r.present, r.n),
                r.lost.to_string(),
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
            .enumerate()
            .map(|(c, (v, w))| {
                if c == 1 {
                    format!("{v:<w$}")
                } else {
                    format!("{v:>w$}")
                }
            })
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
    let sizes: Vec<usize> = std::env::var("REGISTRY_BENCH_N").map_or_else(
        |_| SIZES.to_vec(),
        |v| v.split(',').map(|s| s.trim().parse().unwrap()).collect(),
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut rows = Vec::new();
    rt.block_on(async {
        let ctx = TestContext::new("registry-bench");
        let cluster = Cluster::start(&ctx, "127.0.0.1".parse().unwrap())
            .await
            .unwrap();
        let mut run_no = 0;
        for &n in &sizes {
            for variant in variants() {
                let label = variant.0;
                run_no += 1;
                let row = run(&cluster, n, variant, run_no).await;
                println!(
                    "N={n} {label}: {} writes, {} conflicts, max {}",
                    row.writes,
                    row.conflicts,
                    secs(row.max)
                );
                rows.push(row);
            }
        }
    });
    print_table(&rows);
}
