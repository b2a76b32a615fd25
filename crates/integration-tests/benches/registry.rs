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
//!
//! A third variant (`REGISTRY_BENCH_PROTOCOLS=Lease`) is a **prototype of
//! another layout, not what the sidecar does**: one Lease object per member
//! (`coordination.k8s.io`, created once, never updated; the record in an
//! annotation), so registrants never write the same object, and one leader
//! (a watcher of those Leases, debounced 100 ms) keeping the shared
//! ConfigMap's `static-nodes.json` in step by whole-object CAS. The namespace's
//! service account gets an extra Role for it: create, get, list and watch on
//! leases (no update, no delete: in a real deployment each Lease would carry
//! an ownerReference to its Pod and the garbage collector would delete it with
//! the pod). "all registered" is then the time until `static-nodes.json`
//! lists all N; p50/p99/max are the registrants' own creates.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    missing_docs
)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use integration_tests::{Cluster, TestContext, TestNamespace, eventually, test_member};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Config};
use peer_registry::{
    ConfigMapRegistry, DEFAULT_NAME, Error, LeaseRegistry, PeerRegistry, WriteProtocol, schema,
};

const SIZES: [usize; 4] = [10, 50, 200, 1000];

/// The layouts each N runs with.
#[derive(Clone, Copy)]
enum Variant {
    /// The sidecar's registry with this write protocol.
    Registry(WriteProtocol),
    /// The prototype: one Lease per member, a leader keeps `static-nodes.json`.
    LeasePerMember,
    /// The sidecar's lease layout (`LeaseRegistry`), one of its registries
    /// publishing `static-nodes.json` as the first-ranked member's does.
    Leases,
}

/// The variants each N runs with: (label, variant).
/// `REGISTRY_BENCH_PROTOCOLS=CAS`, `=patch` or `=Lease` runs only one of them.
fn variants() -> Vec<(&'static str, Variant)> {
    let only = std::env::var("REGISTRY_BENCH_PROTOCOLS").unwrap_or_default();
    vec![
        (
            "whole-object CAS",
            Variant::Registry(WriteProtocol::WholeObjectCas),
        ),
        ("key patch", Variant::Registry(WriteProtocol::KeyPatch)),
        ("Lease per member (prototype)", Variant::LeasePerMember),
        ("LeaseRegistry (lease layout)", Variant::Leases),
    ]
    .into_iter()
    .filter(|(label, _)| only.is_empty() || label.contains(only.as_str()))
    .collect()
}

/// The apiserver's CPU time so far.
fn apiserver_cpu(pid: u32) -> Duration {
    integration_tests::cpu_time(pid).expect("the apiserver runs")
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

/// How long a run may take (`REGISTRY_BENCH_CAP_SECS`, default 120 s).
fn cap() -> Duration {
    Duration::from_secs(
        std::env::var("REGISTRY_BENCH_CAP_SECS").map_or(120, |v| v.parse().unwrap()),
    )
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    // Nearest rank.
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

async fn run(
    cluster: &Cluster,
    n: usize,
    (label, protocol): (&'static str, Option<WriteProtocol>),
    run_no: usize,
) -> Row {
    let ns = cluster
        .namespace(&format!("reg{n}-{run_no}"))
        .await
        .unwrap();
    // protocol None: the lease layout.
    let mut publisher = None;
    if protocol.is_none() {
        cluster.grant_leases(&ns).await.unwrap();
        let client = client_as(&ns, "registry-bench/publisher").await;
        let reg = LeaseRegistry::new(client, ns.name.clone(), DEFAULT_NAME).publishing_as("geth-0");
        publisher = Some(AbortOnDrop(tokio::spawn(async move {
            let mut watch = reg.watch();
            while watch.next().await.is_some() {}
        })));
    }
    let mut registries: Vec<Arc<dyn PeerRegistry>> = Vec::with_capacity(n);
    for i in 0..n {
        let client = client_as(&ns, &format!("registry-bench/registrant-{i}")).await;
        let reg: Arc<dyn PeerRegistry> = match protocol {
            Some(p) => Arc::new(
                ConfigMapRegistry::new(client, ns.name.clone(), DEFAULT_NAME)
                    .with_write_protocol(p),
            ),
            None => Arc::new(LeaseRegistry::new(client, ns.name.clone(), DEFAULT_NAME)),
        };
        // Warm the connection (TLS handshake) so the race measures the CAS loop.
        let snap = reg.snapshot().await.unwrap();
        assert!(!snap.exists(), "the registry starts absent");
        registries.push(reg);
    }

    let pid = cluster.apiserver_pid().unwrap();
    let cpu_before = apiserver_cpu(pid);
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
    let cap = cap();
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
    let apiserver_cpu = apiserver_cpu(pid) - cpu_before;
    let start = starts.iter().min().copied().unwrap();
    let ends = starts.iter().zip(&outcomes).map(|(s, o)| *s + o.elapsed);

    // End state, read as admin (the lease layout: once static-nodes.json is
    // published from the Leases).
    let admin_view = LeaseRegistry::new(cluster.admin(), ns.name.clone(), DEFAULT_NAME);
    let cms = Api::<ConfigMap>::namespaced(cluster.admin(), &ns.name);
    let (snap, static_nodes) = eventually("static-nodes.json listing the members", cap, || async {
        let cm = cms.get_opt(DEFAULT_NAME).await.ok()??;
        let snap = match protocol {
            Some(_) => schema::decode(&cm.data.clone().unwrap_or_default(), None),
            None => admin_view.snapshot().await.ok()?,
        };
        let list: Vec<String> = serde_json::from_str(cm.data?.get("static-nodes.json")?).ok()?;
        (protocol.is_some() || unfinished > 0 || list.len() == snap.members.len())
            .then_some((snap, list))
    })
    .await
    .unwrap();
    drop(publisher);
    let present_pods: BTreeSet<&String> = snap.members.keys().collect();
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

    let c = count_requests(cluster, &ns, &["configmaps", "leases"]);
    let mut times: Vec<Duration> = outcomes.iter().map(|o| o.elapsed).collect();
    times.sort();
    Row {
        n,
        unfinished,
        cap,
        protocol: label,
        writes: c.writes,
        conflicts: c.conflicts,
        overloaded: c.overloaded,
        // The warm-up GETs are not part of the race.
        gets: c.gets - n,
        max_writes_one: c.max_writes_one,
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

/// Aborts the task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Requests of the registrants (User-Agent `registry-bench/registrant-*`) on
/// `resources`, from the audit log (blocking mode: complete once the response is).
struct Counts {
    writes: usize,
    conflicts: usize,
    overloaded: usize,
    gets: usize,
    max_writes_one: usize,
}

fn count_requests(cluster: &Cluster, ns: &TestNamespace, resources: &[&str]) -> Counts {
    let user = ns.service_account_user();
    let events: Vec<serde_json::Value> = cluster
        .audit_events(&user)
        .into_iter()
        .filter(|e| {
            e["objectRef"]["resource"]
                .as_str()
                .is_some_and(|r| resources.contains(&r))
        })
        .filter(|e| {
            e["userAgent"]
                .as_str()
                .is_some_and(|a| a.starts_with("registry-bench/registrant-"))
        })
        .collect();
    let is_write =
        |e: &serde_json::Value| matches!(e["verb"].as_str(), Some("create" | "update" | "patch"));
    let code = |e: &serde_json::Value| e["responseStatus"]["code"].as_u64();
    let mut per_agent: BTreeMap<&str, usize> = BTreeMap::new();
    for e in events.iter().filter(|e| is_write(e)) {
        *per_agent
            .entry(e["userAgent"].as_str().unwrap_or_default())
            .or_default() += 1;
    }
    Counts {
        writes: events.iter().filter(|e| is_write(e)).count(),
        conflicts: events
            .iter()
            .filter(|e| is_write(e) && matches!(code(e), Some(409 | 422)))
            .count(),
        overloaded: events
            .iter()
            .filter(|e| is_write(e) && code(e).is_some_and(|c| c == 429 || c >= 500))
            .count(),
        gets: events.iter().filter(|e| e["verb"] == "get").count(),
        max_writes_one: per_agent.values().copied().max().unwrap_or(0),
    }
}

const LEASE_LABEL: &str = "geth-peer-sidecar/registry";
const MEMBER_ANNOTATION: &str = "geth-peer-sidecar/member";

/// Grants the namespace's service account what the Lease prototype needs.
async fn grant_leases(cluster: &Cluster, ns: &TestNamespace) {
    let name = "geth-peer-sidecar-leases";
    let meta = ObjectMeta {
        name: Some(name.to_owned()),
        ..ObjectMeta::default()
    };
    let role = Role {
        metadata: meta.clone(),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec!["coordination.k8s.io".to_owned()]),
            resources: Some(vec!["leases".to_owned()]),
            verbs: ["create", "get", "list", "watch"]
                .map(String::from)
                .to_vec(),
            ..PolicyRule::default()
        }]),
    };
    let binding = RoleBinding {
        metadata: meta,
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".to_owned()),
            kind: "Role".to_owned(),
            name: name.to_owned(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".to_owned(),
            name: integration_tests::SERVICE_ACCOUNT.to_owned(),
            namespace: Some(ns.name.clone()),
            ..Subject::default()
        }]),
    };
    let pp = PostParams::default();
    Api::<Role>::namespaced(cluster.admin(), &ns.name)
        .create(&pp, &role)
        .await
        .unwrap();
    Api::<RoleBinding>::namespaced(cluster.admin(), &ns.name)
        .create(&pp, &binding)
        .await
        .unwrap();
}

/// `static-nodes.json` for the member records in `leases` (sorted, as the
/// registry writes it).
fn static_nodes_of(leases: &BTreeMap<String, String>) -> String {
    let members: BTreeMap<String, peer_registry::MemberRecord> = leases
        .values()
        .filter_map(|json| serde_json::from_str::<peer_registry::MemberRecord>(json).ok())
        .map(|r| (r.pod.clone(), r))
        .collect();
    schema::static_nodes(&members)
}

/// The leader of the Lease prototype: follows the Leases with a watch and,
/// 100 ms after the last change seen, writes `static-nodes.json` by CAS when it
/// differs (its writes are counted from the audit log with the registrants').
/// Returns once it has written all `n`: the time from `t0`.
async fn lease_leader(
    client: Client,
    ns: String,
    n: usize,
    t0_rx: tokio::sync::oneshot::Receiver<Instant>,
) -> Duration {
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let cms: Api<ConfigMap> = Api::namespaced(client, &ns);
    let config = watcher::Config::default().labels(&format!("{LEASE_LABEL}={DEFAULT_NAME}"));
    let mut stream = std::pin::pin!(watcher(leases, config).default_backoff().applied_objects());
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    let mut written = String::new();
    let t0 = t0_rx.await.unwrap();
    loop {
        // Debounce: wait for a change, then take every change within 100 ms.
        let mut next = stream.next().await;
        loop {
            match next {
                Some(Ok(lease)) => {
                    let name = lease.metadata.name.clone().unwrap_or_default();
                    if let Some(json) = lease
                        .metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(MEMBER_ANNOTATION))
                    {
                        seen.insert(name, json.clone());
                    }
                }
                Some(Err(e)) => println!("lease watch: {e}"),
                None => panic!("the lease watch ended"),
            }
            match tokio::time::timeout(Duration::from_millis(100), stream.next()).await {
                Ok(more) => next = more,
                Err(_) => break,
            }
        }
        let want = static_nodes_of(&seen);
        while want != written {
            let mut cm = cms.get_opt(DEFAULT_NAME).await.unwrap().unwrap_or_default();
            let exists = cm.metadata.resource_version.is_some();
            cm.metadata.name = Some(DEFAULT_NAME.to_owned());
            cm.data
                .get_or_insert_with(BTreeMap::new)
                .insert("static-nodes.json".to_owned(), want.clone());
            let result = if exists {
                cms.replace(DEFAULT_NAME, &PostParams::default(), &cm).await
            } else {
                cms.create(&PostParams::default(), &cm).await
            };
            match result {
                Ok(_) => written.clone_from(&want),
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(e) => panic!("static-nodes.json write: {e}"),
            }
        }
        if seen.len() == n {
            return t0.elapsed();
        }
    }
}

/// The Lease prototype (see the module docs).
async fn run_leases(cluster: &Cluster, n: usize, label: &'static str, run_no: usize) -> Row {
    let ns = cluster
        .namespace(&format!("reg{n}-{run_no}"))
        .await
        .unwrap();
    grant_leases(cluster, &ns).await;
    let selector = ListParams::default()
        .labels(&format!("{LEASE_LABEL}={DEFAULT_NAME}"))
        .limit(1);
    let mut apis = Vec::with_capacity(n);
    for i in 0..n {
        let client = client_as(&ns, &format!("registry-bench/registrant-{i}")).await;
        let api: Api<Lease> = Api::namespaced(client, &ns.name);
        // Warm the connection (TLS handshake) so the race measures the writes.
        assert!(api.list(&selector).await.unwrap().items.is_empty());
        apis.push(api);
    }
    let leader_client = client_as(&ns, "registry-bench/registrant-leader").await;
    let (t0_tx, t0_rx) = tokio::sync::oneshot::channel();
    let leader = tokio::spawn(lease_leader(leader_client, ns.name.clone(), n, t0_rx));

    let pid = cluster.apiserver_pid().unwrap();
    let cpu_before = apiserver_cpu(pid);
    let barrier = Arc::new(tokio::sync::Barrier::new(n + 1));
    let mut tasks = Vec::with_capacity(n);
    for (i, api) in apis.into_iter().enumerate() {
        let barrier = barrier.clone();
        let rec = test_member(&format!("geth-{i}"), i as u32);
        tasks.push(tokio::spawn(async move {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(format!("{DEFAULT_NAME}.{}", rec.pod)),
                    labels: Some(BTreeMap::from([(
                        LEASE_LABEL.to_owned(),
                        DEFAULT_NAME.to_owned(),
                    )])),
                    annotations: Some(BTreeMap::from([(
                        MEMBER_ANNOTATION.to_owned(),
                        serde_json::to_string(&rec).unwrap(),
                    )])),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(rec.pod.clone()),
                    ..LeaseSpec::default()
                }),
            };
            barrier.wait().await;
            let t0 = Instant::now();
            let result = api
                .create(&PostParams::default(), &lease)
                .await
                .map(|_| ())
                .map_err(|e| Fail::Other(e.to_string()));
            (t0.elapsed(), result)
        }));
    }
    barrier.wait().await;
    let start = Instant::now();
    t0_tx.send(start).unwrap();
    let mut outcomes = Vec::with_capacity(n);
    for t in tasks {
        let (elapsed, result) = t.await.unwrap();
        outcomes.push(Outcome { elapsed, result });
    }
    let cap = cap();
    let led = tokio::time::timeout(cap, leader).await;
    let apiserver_cpu = apiserver_cpu(pid) - cpu_before;
    let all_registered = led.ok().map(|done| done.unwrap());

    // End state, read as admin.
    let present: BTreeMap<String, String> = Api::<Lease>::namespaced(cluster.admin(), &ns.name)
        .list(&ListParams::default().labels(&format!("{LEASE_LABEL}={DEFAULT_NAME}")))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|l| {
            let json = l.metadata.annotations?.get(MEMBER_ANNOTATION)?.clone();
            Some((l.metadata.name?, json))
        })
        .collect();
    let cm = Api::<ConfigMap>::namespaced(cluster.admin(), &ns.name)
        .get(DEFAULT_NAME)
        .await
        .unwrap();
    let listed = cm
        .data
        .unwrap_or_default()
        .remove("static-nodes.json")
        .unwrap_or_default();
    if all_registered.is_some() {
        assert_eq!(
            listed,
            static_nodes_of(&present),
            "static-nodes.json out of step"
        );
    }
    let lost = outcomes
        .iter()
        .enumerate()
        .filter(|(i, o)| {
            o.result.is_ok() && !present.contains_key(&format!("{DEFAULT_NAME}.geth-{i}"))
        })
        .count();
    let errors: Vec<&String> = outcomes
        .iter()
        .filter_map(|o| match &o.result {
            Err(Fail::Other(e)) => Some(e),
            _ => None,
        })
        .collect();
    if let Some(first) = errors.first() {
        println!("N={n} {label}: {} errors, first: {first}", errors.len());
    }
    let c = count_requests(cluster, &ns, &["configmaps", "leases"]);
    let mut times: Vec<Duration> = outcomes.iter().map(|o| o.elapsed).collect();
    times.sort();
    Row {
        n,
        unfinished: usize::from(all_registered.is_none()),
        cap,
        protocol: label,
        writes: c.writes,
        conflicts: c.conflicts,
        overloaded: c.overloaded,
        gets: c.gets,
        max_writes_one: c.max_writes_one,
        gave_up: 0,
        other_errors: errors.len(),
        p50: percentile(&times, 50.0),
        p99: percentile(&times, 99.0),
        max: *times.last().unwrap(),
        all_registered,
        apiserver_cpu,
        present: present.len(),
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
                let row = match variant.1 {
                    Variant::Registry(p) => run(&cluster, n, (label, Some(p)), run_no).await,
                    Variant::Leases => run(&cluster, n, (label, None), run_no).await,
                    Variant::LeasePerMember => run_leases(&cluster, n, label, run_no).await,
                };
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
