//! The Helm chart, unchanged, on the real node with the real images.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use integration_tests::{KubeNode, PodView, Release, eventually, test_member, workspace_root};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::Api;
use kube::api::{Patch, PatchParams};

use crate::Shared;

pub use integration_tests::{
    CHART_RELEASE as RELEASE, CHART_STATEFULSET as STATEFULSET, DEFAULT_CONFIGMAP as CONFIGMAP,
};

/// Time for a whole release to come up and mesh on two cores.
pub const MESH_TIMEOUT: Duration = Duration::from_secs(180);

/// The chart, installed in a fresh namespace (see [`Release::install_chart`]).
pub async fn install<'a>(
    node: &'a KubeNode,
    hint: &str,
    volumes: usize,
    values: &[&str],
) -> Release<'a> {
    Release::install_chart(node, hint, volumes, values)
        .await
        .unwrap()
}

/// The chart with `replicas` pods in a fresh namespace, once every geth's own
/// `admin.peers` shows the full mesh; the pods as they are then.
pub async fn install_meshed<'a>(
    node: &'a KubeNode,
    hint: &str,
    replicas: usize,
) -> (Release<'a>, Vec<PodView>) {
    let set = format!("replicas={replicas}");
    let release = install(node, hint, replicas, &["--set", &set]).await;
    let (pods, _) = release
        .wait_full_mesh(replicas, MESH_TIMEOUT)
        .await
        .unwrap();
    (release, pods)
}

pub async fn helm_install_of_five_replicas_forms_a_full_mesh_with_readable_logs_and_status(
    shared: Arc<Shared>,
) {
    let node = shared.node().await;
    let t0 = Instant::now();
    let release = install(&node, "chart-five", 5, &["--set", "replicas=5"]).await;
    let (pods, _) = release.wait_full_mesh(5, MESH_TIMEOUT).await.unwrap();
    eprintln!(
        "[chart] helm install to a full mesh of 5 (geth's admin.peers): {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    for p in &pods {
        let log = release.sidecar_log(&p.name).unwrap();
        assert!(
            !log.trim().is_empty(),
            "{}: the sidecar logs something",
            p.name
        );
        assert!(
            !log.contains('\u{1b}'),
            "{}: `kubectl logs` shows terminal escape codes:\n{}",
            p.name,
            log.lines().take(3).collect::<Vec<_>>().join("\n")
        );
    }
    let status = release
        .kubectl(&[
            "exec",
            &pods[0].name,
            "-c",
            "geth-peer-sidecar",
            "--",
            "/usr/local/bin/geth-peer-sidecar",
            "status",
        ])
        .unwrap();
    for p in &pods {
        assert!(
            status.contains(&p.name),
            "`status` in the pod lists {}:\n{status}",
            p.name
        );
    }
    // The sidecar's Kubernetes Events show where operators look.
    let described = eventually("the Registered event on the pod", MESH_TIMEOUT, || async {
        let out = release.kubectl(&["describe", "pod", &pods[0].name]).ok()?;
        (out.contains("Registered") && out.contains("geth-peer-sidecar")).then_some(out)
    })
    .await;
    assert!(
        described.is_ok(),
        "`kubectl describe pod` shows no Registered event from geth-peer-sidecar"
    );
}

/// Waits until every pod in `pods` has its Lease (the lease layout), owned by
/// that very pod (its UID as the Downward API gives it, which is what the
/// garbage collector follows) and holding its current IP.
async fn wait_leases_owned_by(release: &Release<'_>, leases: &Api<Lease>, pods: &[PodView]) {
    let what = format!(
        "every pod's Lease owned by it, with its IP, in {}",
        release.ns
    );
    let owned = eventually(&what, MESH_TIMEOUT, || async {
        for p in pods {
            let name = peer_registry::lease_name(&release.configmap, &p.name);
            let lease = leases.get_opt(&name).await.ok()??;
            let owner = lease.metadata.owner_references.as_ref()?.first()?.clone();
            let raw = lease
                .metadata
                .annotations?
                .get(peer_registry::MEMBER_ANNOTATION)?
                .clone();
            let rec: peer_registry::MemberRecord = serde_json::from_str(&raw).ok()?;
            let ip = p.ip?.to_string();
            let ok = owner.kind == "Pod"
                && owner.api_version == "v1"
                && owner.name == p.name
                && owner.uid == p.uid
                && rec.pod_ip.as_deref() == Some(ip.as_str());
            if !ok {
                return None;
            }
        }
        Some(())
    })
    .await;
    assert!(owned.is_ok(), "{what}");
}

pub async fn with_registry_layout_leases_each_pod_registers_a_lease_it_owns_and_a_replaced_pod_takes_over(
    shared: Arc<Shared>,
) {
    let node = shared.node().await;
    let release = install(
        &node,
        "chart-leases",
        3,
        &["--set", "replicas=3", "--set", "registryLayout=leases"],
    )
    .await;
    let (pods, _) = release.wait_full_mesh(3, MESH_TIMEOUT).await.unwrap();
    let leases: Api<Lease> = Api::namespaced(node.admin(), &release.ns);
    wait_leases_owned_by(&release, &leases, &pods).await;
    // No member keys in the ConfigMap: the members are the Leases.
    assert!(release.configmap_members().await.unwrap().is_empty());
    // static-nodes.json, derived from the Leases, lists the three pod IPs.
    let cms: Api<ConfigMap> = Api::namespaced(node.admin(), &release.ns);
    let listed = |pods: Vec<PodView>| {
        let cms = cms.clone();
        let configmap = release.configmap.clone();
        async move {
            let data = cms.get_opt(&configmap).await.ok()??.data?;
            let list: Vec<String> = serde_json::from_str(data.get("static-nodes.json")?).ok()?;
            let ips: BTreeSet<String> = pods
                .iter()
                .filter_map(|p| p.ip.map(|ip| ip.to_string()))
                .collect();
            let hosts: BTreeSet<String> = list
                .iter()
                .filter_map(|e| Some(e.split_once('@')?.1.split(':').next()?.to_owned()))
                .collect();
            (hosts == ips).then_some(())
        }
    };
    eventually(
        "static-nodes.json to list the three pod IPs",
        MESH_TIMEOUT,
        || listed(pods.clone()),
    )
    .await
    .unwrap();

    // A deleted pod comes back (new UID, new IP): its Lease is the new pod's.
    let victim = pods[1].clone();
    release
        .kubectl(&["delete", "pod", &victim.name, "--wait=true"])
        .unwrap();
    let (after, _) = release.wait_full_mesh(3, MESH_TIMEOUT).await.unwrap();
    let back = after.iter().find(|p| p.name == victim.name).unwrap();
    assert_ne!(back.uid, victim.uid, "a new pod replaced {}", victim.name);
    wait_leases_owned_by(&release, &leases, &after).await;
    eventually(
        "static-nodes.json to follow the new IP",
        MESH_TIMEOUT,
        || listed(after.clone()),
    )
    .await
    .unwrap();
}

/// The lease layout's clean-up of a pod killed before its sidecar could
/// deregister: the Lease the registry writes carries an ownerReference the
/// real garbage collector (kube-controller-manager) follows. The pod is bound
/// to a node that does not exist, so nothing runs it and no sidecar deletes
/// the Lease: only the garbage collector can.
pub async fn the_lease_of_a_deleted_pod_is_removed_by_the_garbage_collector(shared: Arc<Shared>) {
    use peer_registry::{LeaseRegistry, PeerRegistry};

    let node = shared.node().await;
    let ns = node.namespace("lease-gc", STATEFULSET, 0).await.unwrap();
    let pods: Api<Pod> = Api::namespaced(node.admin(), &ns);
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "geth-0"},
        "spec": {
            "nodeName": "no-such-node",
            "containers": [{"name": "geth", "image": "ethereum/client-go:v1.17.5"}]
        }
    }))
    .unwrap();
    let pod = pods.create(&Default::default(), &pod).await.unwrap();
    let mut record = test_member("geth-0", 7);
    record.pod_uid = pod.metadata.uid.clone();
    let registry = LeaseRegistry::new(node.admin(), ns.clone(), CONFIGMAP);
    registry.upsert(record).await.unwrap();
    let leases: Api<Lease> = Api::namespaced(node.admin(), &ns);
    let name = peer_registry::lease_name(CONFIGMAP, "geth-0");
    assert!(leases.get_opt(&name).await.unwrap().is_some());
    pods.delete(
        "geth-0",
        &kube::api::DeleteParams::default().grace_period(0),
    )
    .await
    .unwrap();
    let gone = eventually(
        "the garbage collector to delete the Lease",
        MESH_TIMEOUT,
        || async { leases.get_opt(&name).await.ok()?.is_none().then_some(()) },
    )
    .await;
    assert!(gone.is_ok(), "the Lease {name} outlived its pod");
    assert!(registry.snapshot().await.unwrap().members.is_empty());
}

pub async fn deleted_pod_returns_on_a_new_ip_and_every_geth_repeers_with_it_and_drops_the_old_one(
    shared: Arc<Shared>,
) {
    let node = shared.node().await;
    let (release, before) = install_meshed(&node, "chart-delete", 3).await;
    let victim = before[1].clone();
    let t0 = Instant::now();
    release
        .kubectl(&["delete", "pod", &victim.name, "--wait=true"])
        .unwrap();
    let (after, _) = release.wait_full_mesh(3, MESH_TIMEOUT).await.unwrap();
    eprintln!(
        "[chart] pod deleted to full mesh again: {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let back = after.iter().find(|p| p.name == victim.name).unwrap();
    assert_ne!(back.uid, victim.uid, "a new pod replaced {}", victim.name);
    assert_ne!(back.ip, victim.ip, "the replacement has a new IP");
    // wait_full_mesh: every geth's peers are exactly the current IPs, so no
    // geth is connected to the old address; the registry agrees.
    let members = release.members().await.unwrap();
    let record = &members[&victim.name];
    assert_eq!(record.pod_uid.as_deref(), Some(back.uid.as_str()));
    assert_eq!(
        record.pod_ip.as_deref(),
        back.ip.map(|ip| ip.to_string()).as_deref()
    );
    let old = victim.ip.unwrap().to_string();
    assert!(
        members
            .values()
            .all(|m| !m.enode.to_string().contains(&old)),
        "no member advertises the old address {old}: {members:?}"
    );
}

pub async fn rolling_update_never_loses_more_than_the_pod_being_replaced(shared: Arc<Shared>) {
    let node = shared.node().await;
    let release = install(&node, "chart-rolling", 3, &["--set", "replicas=3"]).await;
    let (before, _) = release.wait_full_mesh(3, MESH_TIMEOUT).await.unwrap();
    let old_uids: BTreeSet<String> = before.iter().map(|p| p.uid.clone()).collect();
    release
        .kubectl(&[
            "patch",
            "statefulset",
            STATEFULSET,
            "-p",
            r#"{"spec":{"template":{"metadata":{"annotations":{"gps-test/rollout":"1"}}}}}"#,
        ])
        .unwrap();
    // A pod that has run this long is expected to be meshed with every other
    // such pod, whatever else is being replaced.
    let settled = jiff::SignedDuration::from_secs(10);
    let deadline = Instant::now() + MESH_TIMEOUT;
    let mut samples = 0;
    let mut violations = Vec::new();
    loop {
        let pods = release.pods().await.unwrap();
        let now = jiff::Timestamp::now();
        let stable = |pods: &[PodView]| -> BTreeMap<String, PodView> {
            pods.iter()
                .filter(|p| p.ready && !p.deleting && p.ip.is_some())
                .filter(|p| {
                    p.started_at
                        .is_some_and(|t| now.duration_since(t) >= settled)
                })
                .map(|p| (p.name.clone(), p.clone()))
                .collect()
        };
        let stable_before = stable(&pods);
        let mesh = release.mesh(&stable_before.values().cloned().collect::<Vec<_>>());
        let stable_after = stable(&release.pods().await.unwrap());
        if let Ok(mesh) = mesh {
            samples += 1;
            // Only pairs that stayed the same pods during the sample count.
            let kept: Vec<&PodView> = stable_before
                .values()
                .filter(|p| stable_after.get(&p.name).is_some_and(|q| q.uid == p.uid))
                .collect();
            for a in &kept {
                for b in &kept {
                    if a.name != b.name && !mesh[&a.name].contains(&b.ip.unwrap()) {
                        violations.push(format!("{} not connected to {}", a.name, b.name));
                    }
                }
            }
        }
        let done = pods.len() == 3
            && pods
                .iter()
                .all(|p| p.ready && !p.deleting && !old_uids.contains(&p.uid));
        if done {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rollout did not finish:\n{}",
            release.diagnostics().await
        );
    }
    assert!(
        samples >= 3,
        "sampled the mesh during the rollout ({samples} samples)"
    );
    assert!(
        violations.is_empty(),
        "settled pods lost each other during the rollout: {violations:?}"
    );
    release.wait_full_mesh(3, MESH_TIMEOUT).await.unwrap();
}

/// Adds a member record by hand for a pod that does not exist, registered an
/// hour ago (past any registration grace).
async fn add_ghost_member(release: &Release<'_>, pod: &str) {
    let mut ghost = test_member(pod, 77);
    let hour_ago = jiff::Timestamp::now() - jiff::SignedDuration::from_hours(1);
    ghost.registered_at = hour_ago;
    ghost.updated_at = hour_ago;
    let cms: Api<ConfigMap> = Api::namespaced(release.node().admin(), &release.ns);
    let patch = serde_json::json!({ "data": {
        format!("member.{pod}"): serde_json::to_string(&ghost).unwrap()
    }});
    cms.patch(
        &release.configmap,
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .unwrap();
}

/// The requests the sidecars (their service account) made on pods.
fn pod_requests(release: &Release<'_>) -> Vec<String> {
    let user = format!("system:serviceaccount:{}:{RELEASE}", release.ns);
    release
        .node()
        .control_plane()
        .audited_requests(&user)
        .into_iter()
        .filter(|(_, resource, _)| resource == "pods")
        .map(|(verb, _, name)| format!("{verb} {name}"))
        .collect()
}

pub async fn scale_5_7_3_with_pod_evidence_joins_new_members_and_removes_departed_ones(
    shared: Arc<Shared>,
) {
    let node = shared.node().await;
    let release = install(
        &node,
        "chart-scale",
        7,
        &["--set", "replicas=5", "--set", "podEvidence=true"],
    )
    .await;
    release.wait_full_mesh(5, MESH_TIMEOUT).await.unwrap();
    // Pod evidence is really on: the sidecars follow pods, and a member whose
    // pod does not exist is removed at once (DEAD_AFTER is 120 s).
    let user = format!("system:serviceaccount:{}:{RELEASE}", release.ns);
    // Each watch follows its watcher's first LIST, so a sidecar may open it
    // after the mesh is full: wait for the five (the audit log is written blocking).
    let pod_watches = || -> Vec<String> {
        release
            .node()
            .control_plane()
            .audited_watches(&user)
            .into_iter()
            .filter(|(resource, _)| resource == "pods")
            .map(|(_, selector)| selector)
            .collect()
    };
    let opened = eventually(
        "every sidecar to open its pod watch",
        Duration::from_secs(30),
        || async {
            let watches = pod_watches();
            (watches.len() >= 5).then_some(watches)
        },
    )
    .await;
    let pod_watches = opened.unwrap_or_else(|_| pod_watches());
    assert!(
        pod_watches.len() >= 5
            && pod_watches
                .iter()
                .all(|s| s.starts_with("app.kubernetes.io/name=geth,app.kubernetes.io/instance=")),
        "each sidecar watches the release's geth pods: {pod_watches:?}"
    );
    // Each watch follows its LIST: the pods were read.
    assert!(
        !pod_requests(&release).is_empty(),
        "with podEvidence=true the sidecars read pods"
    );
    let ghost = format!("{STATEFULSET}-99");
    add_ghost_member(&release, &ghost).await;
    let t0 = Instant::now();
    eventually(
        "the ghost member removed",
        Duration::from_secs(30),
        || async { (!release.members().await.ok()?.contains_key(&ghost)).then_some(()) },
    )
    .await
    .unwrap();
    eprintln!(
        "[chart] a member without a pod removed by pod evidence in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    release
        .kubectl(&["scale", "statefulset", STATEFULSET, "--replicas=7"])
        .unwrap();
    release.wait_full_mesh(7, MESH_TIMEOUT).await.unwrap();
    release
        .kubectl(&["scale", "statefulset", STATEFULSET, "--replicas=3"])
        .unwrap();
    let (pods, _) = release.wait_full_mesh(3, MESH_TIMEOUT).await.unwrap();
    let names: BTreeSet<String> = pods.iter().map(|p| p.name.clone()).collect();
    eventually(
        "only the 3 remaining members registered",
        Duration::from_secs(60),
        || async {
            let members: BTreeSet<String> = release.members().await.ok()?.into_keys().collect();
            (members == names).then_some(())
        },
    )
    .await
    .unwrap();
    // With the admission policy on (the default), the sidecars' own writes,
    // their removal of another member's key included, met no refusal.
    let refused = crate::trust::refused_requests(&node, &user);
    assert!(
        refused.is_empty(),
        "the sidecars' own requests were refused: {refused:?}"
    );
}

pub async fn pod_deletion_deregisters_the_member_within_the_grace_period(shared: Arc<Shared>) {
    let node = shared.node().await;
    let release = install(&node, "chart-sigterm", 3, &["--set", "replicas=3"]).await;
    let (pods, _) = release.wait_full_mesh(3, MESH_TIMEOUT).await.unwrap();
    let victim = pods[2].clone();
    let t0 = Instant::now();
    release
        .kubectl(&["delete", "pod", &victim.name, "--wait=false"])
        .unwrap();
    // The record goes away (the old pod's sidecar deregisters on SIGTERM)
    // before the replacement registers again with a new UID.
    let outcome = eventually(
        "the member record removed or replaced",
        Duration::from_secs(30),
        || async {
            let members = release.members().await.ok()?;
            match members.get(&victim.name) {
                None => Some("removed"),
                Some(m) if m.pod_uid.as_deref() != Some(victim.uid.as_str()) => Some("replaced"),
                Some(_) => None,
            }
        },
    )
    .await
    .unwrap();
    assert_eq!(
        outcome, "removed",
        "the deleted pod's sidecar deregistered before its replacement registered"
    );
    eprintln!(
        "[chart] deregistered {:.2} s after `kubectl delete pod` (grace period 30 s)",
        t0.elapsed().as_secs_f64()
    );
    // The write came from the deleted pod itself (its bound token names it):
    // a ConfigMap update or, with the lease layout, its Lease's deletion.
    let user = format!("system:serviceaccount:{}:{RELEASE}", release.ns);
    let by_victim = release
        .node()
        .control_plane()
        .audit_events(&user)
        .into_iter()
        .filter(|e| {
            e["user"]["extra"]["authentication.kubernetes.io/pod-uid"][0] == victim.uid.as_str()
                && matches!(e["verb"].as_str(), Some("update" | "patch" | "delete"))
        })
        .count();
    assert!(by_victim > 0, "the deleted pod wrote the registry");
    release.wait_full_mesh(3, MESH_TIMEOUT).await.unwrap();
}

/// The container's OCI runtime spec, as containerd generated it.
fn container_spec(node: &KubeNode, pod: &Pod, container: &str) -> serde_json::Value {
    let id = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.name == container))
        .and_then(|c| c.container_id.clone())
        .expect("the container runs");
    let id = id.trim_start_matches("containerd://");
    let info: serde_json::Value =
        serde_json::from_str(&node.ctr(&["containers", "info", id]).unwrap()).unwrap();
    info["Spec"].clone()
}

pub async fn sidecar_runs_non_root_read_only_without_capabilities_and_opens_the_0600_socket(
    shared: Arc<Shared>,
) {
    let node = shared.node().await;
    let release = install(&node, "chart-security", 1, &["--set", "replicas=1"]).await;
    // Ready means /readyz answered 200: geth's IPC socket answered the sidecar.
    let (pods, _) = release.wait_full_mesh(1, MESH_TIMEOUT).await.unwrap();
    let pod: Pod = Api::namespaced(node.admin(), &release.ns)
        .get(&pods[0].name)
        .await
        .unwrap();
    let spec = container_spec(&node, &pod, "geth-peer-sidecar");
    assert_eq!(
        spec["process"]["user"]["uid"], 10001,
        "non-root uid: {spec}"
    );
    assert_eq!(spec["process"]["user"]["gid"], 10001, "gid");
    assert_eq!(spec["root"]["readonly"], true, "read-only root filesystem");
    assert_eq!(
        spec["process"]["noNewPrivileges"], true,
        "no privilege escalation"
    );
    for set in [
        "bounding",
        "effective",
        "permitted",
        "inheritable",
        "ambient",
    ] {
        let caps = &spec["process"]["capabilities"][set];
        assert!(
            caps.is_null() || caps.as_array().is_some_and(Vec::is_empty),
            "no {set} capabilities: {caps}"
        );
    }
    // The live process agrees.
    let tasks = node.ctr(&["tasks", "ls"]).unwrap();
    let id = pod
        .status
        .as_ref()
        .unwrap()
        .container_statuses
        .as_ref()
        .unwrap()
        .iter()
        .find(|c| c.name == "geth-peer-sidecar")
        .unwrap()
        .container_id
        .clone()
        .unwrap();
    let id = id.trim_start_matches("containerd://");
    let pid = tasks
        .lines()
        .find(|l| l.starts_with(id))
        .and_then(|l| l.split_whitespace().nth(1))
        .expect("the sidecar's task");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |k: &str| {
        status
            .lines()
            .find(|l| l.starts_with(k))
            .map(|l| {
                l[k.len()..]
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default()
    };
    assert_eq!(field("Uid:"), "10001 10001 10001 10001", "{status}");
    assert_eq!(field("CapEff:"), "0000000000000000");
    // geth's socket is 0600 and the sidecar (same uid) uses it.
    let ls = release
        .kubectl(&[
            "exec",
            &pods[0].name,
            "-c",
            "geth",
            "--",
            "ls",
            "-ln",
            "/ipc/geth.ipc",
        ])
        .unwrap();
    assert!(ls.starts_with("srw-------"), "geth's socket is 0600: {ls}");
    let members = release.members().await.unwrap();
    assert!(
        members.contains_key(&pods[0].name),
        "the sidecar read geth's node info through the socket and registered: {members:?}"
    );
}

/// One row of the chart-values table: a value set to something other than its
/// default, and where it must show up.
struct ValueRow {
    path: &'static str,
    set: &'static str,
    check: fn(&Rendered) -> bool,
}

/// What reached the cluster from one install.
struct Rendered {
    pod: serde_json::Value,
    pods: usize,
    role: serde_json::Value,
    pvc: serde_json::Value,
    /// The release's other objects in the namespace (PDB, NetworkPolicy,
    /// ConfigMaps), as JSON text.
    objects: String,
    /// `helm template` with the [`TEMPLATE_ONLY`] values: objects of kinds
    /// this cluster has no CRD for (PodMonitor, ServiceMonitor).
    template: String,
    /// The release's ValidatingAdmissionPolicies and bindings (cluster-scoped,
    /// named `<namespace>.<release>.*`).
    policies: Vec<String>,
}

/// Values checked on `helm template` output rather than on an install: their
/// objects' kinds need CRDs (Prometheus operator) this cluster does not have, or
/// they only show while another value keeps its default.
const TEMPLATE_ONLY: [&str; 11] = [
    "metrics.podMonitor.enabled",
    "metrics.podMonitor.interval",
    "metrics.podMonitor.labels",
    "metrics.serviceMonitor.enabled",
    "metrics.serviceMonitor.interval",
    "metrics.serviceMonitor.labels",
    "metrics.prometheusRule.enabled",
    "metrics.prometheusRule.labels",
    "metrics.prometheusRule.for",
    "podDisruptionBudget.maxUnavailable",
    "grafanaDashboard.namespace",
];

impl Rendered {
    fn container(&self, name: &str) -> &serde_json::Value {
        self.pod["spec"]["containers"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["name"] == name))
            .unwrap_or(&serde_json::Value::Null)
    }
    fn env(&self, name: &str) -> Option<String> {
        self.container("geth-peer-sidecar")["env"]
            .as_array()?
            .iter()
            .find(|e| e["name"] == name)?["value"]
            .as_str()
            .map(str::to_owned)
    }
    fn init(&self) -> &serde_json::Value {
        &self.pod["spec"]["initContainers"][0]
    }
}

const VALUE_TABLE: &[ValueRow] = &[
    ValueRow {
        path: "replicas",
        set: "2",
        check: |r| r.pods == 2,
    },
    ValueRow {
        path: "images.geth.repository",
        set: "example.invalid/geth",
        check: |r| {
            r.container("geth")["image"] == "example.invalid/geth:t-geth"
                && r.init()["image"] == "example.invalid/geth:t-geth"
        },
    },
    ValueRow {
        path: "images.geth.tag",
        set: "t-geth",
        check: |r| {
            r.container("geth")["image"]
                .as_str()
                .is_some_and(|i| i.ends_with(":t-geth"))
        },
    },
    ValueRow {
        path: "images.geth.pullPolicy",
        set: "Always",
        check: |r| {
            r.container("geth")["imagePullPolicy"] == "Always"
                && r.init()["imagePullPolicy"] == "Always"
        },
    },
    ValueRow {
        path: "images.sidecar.repository",
        set: "example.invalid/sidecar",
        check: |r| r.container("geth-peer-sidecar")["image"] == "example.invalid/sidecar:t-side",
    },
    ValueRow {
        path: "images.sidecar.tag",
        set: "t-side",
        check: |r| {
            r.container("geth-peer-sidecar")["image"]
                .as_str()
                .is_some_and(|i| i.ends_with(":t-side"))
        },
    },
    ValueRow {
        path: "images.sidecar.pullPolicy",
        set: "Never",
        check: |r| r.container("geth-peer-sidecar")["imagePullPolicy"] == "Never",
    },
    ValueRow {
        path: "configmapName",
        set: "reg-x",
        check: |r| {
            r.env("CONFIGMAP_NAME").as_deref() == Some("reg-x")
                && r.role.to_string().contains("\"reg-x\"")
        },
    },
    ValueRow {
        path: "advertise",
        set: "dns",
        check: |r| r.env("ADVERTISE").as_deref() == Some("dns"),
    },
    ValueRow {
        path: "trusted",
        set: "true",
        check: |r| r.env("TRUSTED_PEERS").as_deref() == Some("true"),
    },
    // On by default: the row turns it off.
    ValueRow {
        path: "podEvidence",
        set: "false",
        check: |r| r.env("READ_PODS").is_none() && !r.role.to_string().contains("\"pods\""),
    },
    // The lease layout by default: the row chooses the ConfigMap layout.
    ValueRow {
        path: "registryLayout",
        set: "configmap",
        check: |r| r.env("REGISTRY_LAYOUT").is_none() && !r.role.to_string().contains("\"leases\""),
    },
    ValueRow {
        path: "memberCidrs",
        // Helm's --set splits on commas unless escaped.
        set: "10.244.0.0/16\\,fd00::/8",
        check: |r| r.env("MEMBER_CIDRS").as_deref() == Some("10.244.0.0/16,fd00::/8"),
    },
    ValueRow {
        path: "admissionPolicy.enabled",
        set: "false",
        check: |r| r.policies.is_empty(),
    },
    ValueRow {
        path: "logLevel",
        set: "DEBUG",
        check: |r| r.env("LOGGING").as_deref() == Some("DEBUG"),
    },
    ValueRow {
        path: "geth.extraArgs",
        set: "[\"--maxpeers=77\"]",
        check: |r| {
            r.container("geth")["args"]
                .to_string()
                .contains("--maxpeers=77")
        },
    },
    ValueRow {
        path: "geth.genesisConfigMap",
        set: "genesis-x",
        check: |r| {
            r.pod["spec"]["volumes"]
                .to_string()
                .contains("\"genesis-x\"")
        },
    },
    ValueRow {
        path: "geth.storage.size",
        set: "3Gi",
        check: |r| r.pvc["spec"]["resources"]["requests"]["storage"] == "3Gi",
    },
    ValueRow {
        path: "geth.storage.storageClassName",
        set: "fast-x",
        check: |r| r.pvc["spec"]["storageClassName"] == "fast-x",
    },
    ValueRow {
        path: "resources.geth.requests.cpu",
        set: "123m",
        check: |r| r.container("geth")["resources"]["requests"]["cpu"] == "123m",
    },
    ValueRow {
        path: "resources.geth.requests.memory",
        set: "65Mi",
        check: |r| r.container("geth")["resources"]["requests"]["memory"] == "65Mi",
    },
    ValueRow {
        path: "resources.geth.limits.memory",
        set: "1500Mi",
        check: |r| r.container("geth")["resources"]["limits"]["memory"] == "1500Mi",
    },
    ValueRow {
        path: "resources.sidecar.requests.cpu",
        set: "7m",
        check: |r| r.container("geth-peer-sidecar")["resources"]["requests"]["cpu"] == "7m",
    },
    ValueRow {
        path: "resources.sidecar.requests.memory",
        set: "17Mi",
        check: |r| r.container("geth-peer-sidecar")["resources"]["requests"]["memory"] == "17Mi",
    },
    ValueRow {
        path: "resources.sidecar.limits.memory",
        set: "65Mi",
        check: |r| r.container("geth-peer-sidecar")["resources"]["limits"]["memory"] == "65Mi",
    },
    ValueRow {
        path: "clusterDomain",
        set: "example.internal",
        check: |r| {
            r.env("DNS_TEMPLATE")
                .is_some_and(|t| t.ends_with(".svc.example.internal"))
        },
    },
    ValueRow {
        path: "terminationGracePeriodSeconds",
        set: "45",
        check: |r| r.pod["spec"]["terminationGracePeriodSeconds"] == 45,
    },
    ValueRow {
        path: "livenessTimeout",
        set: "3m",
        check: |r| r.env("LIVENESS_TIMEOUT").as_deref() == Some("3m"),
    },
    ValueRow {
        path: "podDisruptionBudget.enabled",
        set: "false",
        check: |r| !r.objects.contains("\"PodDisruptionBudget\""),
    },
    ValueRow {
        path: "podDisruptionBudget.maxUnavailable",
        set: "2",
        check: |r| r.template.contains("maxUnavailable: 2"),
    },
    ValueRow {
        path: "metrics.podMonitor.enabled",
        set: "true",
        check: |r| r.template.contains("kind: PodMonitor"),
    },
    ValueRow {
        path: "metrics.podMonitor.interval",
        set: "17s",
        check: |r| r.template.contains("interval: 17s"),
    },
    ValueRow {
        path: "metrics.podMonitor.labels",
        set: "{\"team\":\"pm-x\"}",
        check: |r| r.template.contains("team: pm-x"),
    },
    ValueRow {
        path: "metrics.serviceMonitor.enabled",
        set: "true",
        check: |r| r.template.contains("kind: ServiceMonitor"),
    },
    ValueRow {
        path: "metrics.serviceMonitor.interval",
        set: "19s",
        check: |r| r.template.contains("interval: 19s"),
    },
    ValueRow {
        path: "metrics.serviceMonitor.labels",
        set: "{\"team\":\"sm-x\"}",
        check: |r| r.template.contains("team: sm-x"),
    },
    ValueRow {
        path: "metrics.prometheusRule.enabled",
        set: "true",
        check: |r| r.template.contains("kind: PrometheusRule"),
    },
    ValueRow {
        path: "metrics.prometheusRule.labels",
        set: "{\"team\":\"pr-x\"}",
        check: |r| r.template.contains("team: pr-x"),
    },
    ValueRow {
        path: "metrics.prometheusRule.for",
        set: "{\"GethPeerSidecarNotPassing\":\"17m\"}",
        check: |r| r.template.contains("for: 17m"),
    },
    ValueRow {
        path: "grafanaDashboard.enabled",
        set: "true",
        check: |r| r.objects.contains("geth-peer-sidecar.json"),
    },
    ValueRow {
        path: "grafanaDashboard.namespace",
        set: "dash-x",
        check: |r| r.template.contains("dash-x"),
    },
    ValueRow {
        path: "grafanaDashboard.labels.grafana_dashboard",
        set: "7",
        check: |r| r.objects.contains("\"grafana_dashboard\": \"7\""),
    },
    ValueRow {
        path: "networkPolicy.enabled",
        set: "true",
        check: |r| r.objects.contains("\"NetworkPolicy\""),
    },
    ValueRow {
        path: "networkPolicy.metricsNamespace",
        set: "mon-x",
        check: |r| r.objects.contains("\"mon-x\""),
    },
    ValueRow {
        path: "uid",
        set: "10555",
        check: |r| {
            r.pod["spec"]["securityContext"]["runAsUser"] == 10555
                && r.pod["spec"]["securityContext"]["fsGroup"] == 10555
        },
    },
];

/// Every leaf of values.yaml, as dotted paths (lists are leaves).
fn value_leaves(v: &serde_yaml::Value, prefix: &str, out: &mut Vec<String>) {
    match v {
        serde_yaml::Value::Mapping(m) => {
            for (k, child) in m {
                let key = k.as_str().unwrap_or_default();
                let path = if prefix.is_empty() {
                    key.to_owned()
                } else {
                    format!("{prefix}.{key}")
                };
                value_leaves(child, &path, out);
            }
        }
        _ => out.push(prefix.to_owned()),
    }
}

pub async fn every_chart_value_reaches_the_pod(shared: Arc<Shared>) {
    let values_path = workspace_root().join("charts/geth-peer-sidecar/values.yaml");
    let values: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(values_path).unwrap()).unwrap();
    let mut leaves = Vec::new();
    value_leaves(&values, "", &mut leaves);
    let covered: BTreeSet<&str> = VALUE_TABLE.iter().map(|r| r.path).collect();
    let missing: Vec<&String> = leaves
        .iter()
        .filter(|l| !covered.contains(l.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "chart values without a row in VALUE_TABLE (add where each must reach the pod): {missing:?}"
    );
    let node = shared.node().await;
    let ns = node
        .namespace("chart-values", STATEFULSET, 0)
        .await
        .unwrap();
    let chart = workspace_root().join("charts/geth-peer-sidecar");
    let chart = chart.to_string_lossy();
    let set_args = |rows: &mut dyn Iterator<Item = &ValueRow>| -> Vec<String> {
        let mut args = Vec::new();
        for row in rows {
            let flag = if row.set.starts_with(['[', '{']) {
                "--set-json"
            } else if matches!(
                row.path,
                "replicas"
                    | "uid"
                    | "trusted"
                    | "podEvidence"
                    | "admissionPolicy.enabled"
                    | "terminationGracePeriodSeconds"
                    | "podDisruptionBudget.enabled"
                    | "podDisruptionBudget.maxUnavailable"
                    | "metrics.podMonitor.enabled"
                    | "metrics.serviceMonitor.enabled"
                    | "metrics.prometheusRule.enabled"
                    | "grafanaDashboard.enabled"
                    | "networkPolicy.enabled"
            ) {
                "--set"
            } else {
                "--set-string"
            };
            args.push(flag.into());
            args.push(format!("{}={}", row.path, row.set));
        }
        args
    };
    let mut args: Vec<String> = ["install", RELEASE, &chart, "-n", &ns]
        .map(String::from)
        .to_vec();
    args.extend(set_args(
        &mut VALUE_TABLE
            .iter()
            .filter(|r| !TEMPLATE_ONLY.contains(&r.path)),
    ));
    let mut template_args: Vec<String> = ["template", RELEASE, &chart, "-n", &ns]
        .map(String::from)
        .to_vec();
    template_args.extend(set_args(
        &mut VALUE_TABLE
            .iter()
            .filter(|r| TEMPLATE_ONLY.contains(&r.path)),
    ));
    // grafanaDashboard.namespace shows only on an enabled dashboard.
    template_args.extend(["--set".into(), "grafanaDashboard.enabled=true".into()]);
    let template = node
        .helm(&template_args.iter().map(String::as_str).collect::<Vec<_>>())
        .unwrap();
    node.helm(&args.iter().map(String::as_str).collect::<Vec<_>>())
        .unwrap();
    let release = Release::new(&node, &ns, STATEFULSET, "reg-x");
    let pods_api: Api<Pod> = Api::namespaced(node.admin(), &ns);
    let pod = eventually(
        "the StatefulSet's pods created",
        Duration::from_secs(60),
        || async {
            let pods = release.pods().await.ok()?;
            (pods.len() == 2).then_some(())?;
            pods_api.get(&format!("{STATEFULSET}-0")).await.ok()
        },
    )
    .await
    .unwrap();
    let get = |kind: &str, name: &str| -> serde_json::Value {
        serde_json::from_str(&release.kubectl(&["get", kind, name, "-o", "json"]).unwrap()).unwrap()
    };
    let rendered = Rendered {
        pod: serde_json::to_value(&pod).unwrap(),
        pods: release.pods().await.unwrap().len(),
        role: get("role", RELEASE),
        pvc: get("pvc", &format!("data-{STATEFULSET}-0")),
        objects: release
            .kubectl(&[
                "get",
                "poddisruptionbudgets,networkpolicies,configmaps",
                "-o",
                "json",
            ])
            .unwrap(),
        template,
        policies: node
            .kubectl(&[
                "get",
                "validatingadmissionpolicies,validatingadmissionpolicybindings",
                "-o",
                "name",
            ])
            .unwrap()
            .lines()
            .filter(|l| l.contains(&format!("/{ns}.")))
            .map(str::to_owned)
            .collect(),
    };
    let wrong: Vec<&str> = VALUE_TABLE
        .iter()
        .filter(|row| !(row.check)(&rendered))
        .map(|row| row.path)
        .collect();
    assert!(
        wrong.is_empty(),
        "chart values accepted but not reaching the pod: {wrong:?}\npod: {}",
        rendered.pod["spec"]
    );
    // The pods never start (the images do not exist): remove them now.
    node.helm(&["uninstall", RELEASE, "-n", &ns]).unwrap();
}
