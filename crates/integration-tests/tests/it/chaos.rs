//! Chaos on the real test bed: broken paths between pods, a blocked probe
//! port, a reused IP, pod RBAC revoked mid-run. Since issue 21 no single pod
//! decides for the fleet: without pod evidence a member is removed only when
//! other members' sidecars agree it is unreachable. Every test asserts on the
//! apiserver (its audit log and a watch of the registry as admin) and on
//! geth's own view (`admin_peers`).

use std::time::Duration;

use integration_tests::{Mesh, Proc, RegistryHistory, eventually};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::rbac::v1::Role;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

const MESH: Duration = Duration::from_secs(60);

fn all(n: usize) -> Vec<usize> {
    (0..n).collect()
}

/// REMOVAL_CONFIRMATIONS as the sidecars get it: the product's default (2)
/// unless the test process's environment sets it (the sidecars inherit it),
/// e.g. `REMOVAL_CONFIRMATIONS=0` to see a test fail with the old behaviour.
fn confirmations() -> f64 {
    std::env::var("REMOVAL_CONFIRMATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2.0)
}

/// Fast liveness: a member unreachable for 6 s is a removal candidate.
const FAST: [(&str, &str); 3] = [
    ("DEAD_AFTER", "6s"),
    ("PROBE_INTERVAL", "1s"),
    ("REGISTRATION_GRACE", "2s"),
];

/// A full, registered mesh of `n` with the [`FAST`] settings, `layout`
/// (`configmap` or `leases`) and `extra` env.
async fn fast_mesh(name: &str, n: usize, layout: &str, extra: &[(&str, &str)]) -> Mesh {
    let mut env = FAST.to_vec();
    env.push(("REGISTRY_LAYOUT", layout));
    env.extend_from_slice(extra);
    let mut m = Mesh::without_sidecars(name, n, &env).await.unwrap();
    if layout == "leases" {
        m.cluster.grant_leases(&m.ns).await.unwrap();
    }
    for i in 0..n {
        m.start_sidecar(i).unwrap();
    }
    m.wait_full_mesh(&all(n), MESH).await.unwrap();
    m.wait_registered(&all(n), MESH).await.unwrap();
    m
}

/// The registry writes (create, update, patch, delete of the ConfigMap or of
/// Leases) the sidecars' service account made, from the audit log, as
/// `verb resource/name`.
fn registry_writes(m: &Mesh) -> Vec<String> {
    m.cluster
        .audited_requests(&m.ns.service_account_user())
        .into_iter()
        .filter(|(verb, resource, _)| {
            matches!(resource.as_str(), "configmaps" | "leases")
                && matches!(verb.as_str(), "create" | "update" | "patch" | "delete")
        })
        .map(|(verb, resource, name)| format!("{verb} {resource}/{name}"))
        .collect()
}

async fn indirect_probes(m: &Mesh, i: usize) -> f64 {
    m.metric(i, "geth_peer_sidecar_indirect_probes_total")
        .await
        .unwrap_or(0.0)
}

/// Waits until sidecars `askers` have each asked other members about a
/// suspect in two rounds since `from` (their counts then) — the product's
/// decision, made twice — or until a removal shows (the old behaviour, which
/// asks nobody).
async fn wait_asked_twice(m: &Mesh, history: &RegistryHistory, askers: &[usize], from: &[f64]) {
    let per_round = confirmations() + 1.0;
    eventually(
        &format!("sidecars {askers:?} to ask other members twice ({per_round} asked a round)"),
        Duration::from_secs(120),
        || async {
            if !history.removed().is_empty() {
                return Some(());
            }
            for (&i, &from) in askers.iter().zip(from) {
                if indirect_probes(m, i).await < from + 2.0 * per_round {
                    return None;
                }
            }
            Some(())
        },
    )
    .await
    .unwrap();
}

/// Every pair of `members` linked in geth's `admin_peers`, except `except`.
async fn assert_linked_except(m: &Mesh, members: &[usize], except: (usize, usize)) {
    let ids = m.ids(members);
    for &i in members {
        let missing = m.missing_peers(i, &ids).await.expect("geth answers");
        let allowed: &[usize] = if i == except.0 {
            &[except.1]
        } else if i == except.1 {
            &[except.0]
        } else {
            &[]
        };
        let wrong: Vec<usize> = missing
            .into_iter()
            .filter(|j| !allowed.contains(j))
            .collect();
        assert!(
            wrong.is_empty(),
            "geth-{i} lost its link to {wrong:?} (only {except:?} is cut)"
        );
    }
}

/// Nothing removed: no member key gone from the ConfigMap and no Lease
/// deleted (the admin watch), no delete by the sidecars in the audit log.
fn assert_nothing_removed(m: &Mesh, history: &RegistryHistory, writes_before: usize) {
    let removed = history.removed();
    let writes = registry_writes(m);
    let during = &writes[writes_before.min(writes.len())..];
    assert!(
        removed.is_empty(),
        "member records removed: {removed:?}; the sidecars' registry writes meanwhile: {during:?}"
    );
    let deletes: Vec<&String> = during.iter().filter(|w| w.starts_with("delete")).collect();
    assert!(
        deletes.is_empty(),
        "registry deletes in the audit log: {deletes:?}"
    );
}

fn log_has(m: &mut Mesh, i: usize, text: &str) -> bool {
    let Some(sc) = m.sidecars[i].as_mut() else {
        return false;
    };
    std::fs::read_to_string(sc.proc_mut().log())
        .unwrap_or_default()
        .contains(text)
}

/// The path between one observer (geth-0) and one member (geth-1) is cut,
/// both directions; every other pod still reaches both. Neither end removes
/// the other: the others, asked, reach it.
async fn one_observer_cut_from_one_member(layout: &str) {
    let (a, b) = (0, 1);
    let mut m = fast_mesh(&format!("chaos-cut-{layout}"), 5, layout, &[]).await;
    let history = m.registry_history().await.unwrap();
    let writes_before = registry_writes(&m).len();
    let from = [indirect_probes(&m, a).await, indirect_probes(&m, b).await];
    let block = m
        .net
        .node(a)
        .netns()
        .block_peer(m.net.node(b).ip())
        .unwrap();
    let start = tokio::time::Instant::now();
    wait_asked_twice(&m, &history, &[a, b], &from).await;
    let decided = start.elapsed();
    // The decision was made (twice on each end): nothing removed, and every
    // other pair still linked in geth.
    assert_nothing_removed(&m, &history, writes_before);
    assert_linked_except(&m, &all(5), (a, b)).await;
    let said = "reachable from other members: not removed";
    assert!(
        log_has(&mut m, a, said) && log_has(&mut m, b, said),
        "both ends log why they keep the other"
    );
    let rules = block.list();
    assert!(rules.contains("packets"), "{rules}");
    block.remove();
    m.wait_full_mesh(&all(5), Duration::from_secs(90))
        .await
        .unwrap();
    assert_nothing_removed(&m, &history, writes_before);
    eprintln!(
        "{layout}: both ends asked twice within {decided:?}; registry versions seen: {}",
        history.changes()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_observer_cut_from_one_member_removes_nobody_configmap() {
    one_observer_cut_from_one_member("configmap").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_observer_cut_from_one_member_removes_nobody_leases() {
    one_observer_cut_from_one_member("leases").await;
}

/// geth-0 is cut from geth-1 and, on top, cannot open a connection to any
/// other pod's sidecar or p2p port (a NetworkPolicy on its egress): it cannot
/// ask anyone, so it must not act on its own view; geth-1 asks the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_observer_that_cannot_reach_the_probe_port_removes_nobody() {
    let (a, b) = (0, 1);
    let m = fast_mesh("chaos-probe-port", 5, "configmap", &[]).await;
    let history = m.registry_history().await.unwrap();
    let writes_before = registry_writes(&m).len();
    let from = [indirect_probes(&m, a).await, indirect_probes(&m, b).await];
    let others: Vec<_> = (0..5)
        .filter(|&i| i != a && i != b)
        .map(|i| m.net.node(i).ip())
        .collect();
    let ns = m.net.node(a).netns();
    let egress = ns
        .block_new_outbound(&others, &[integration_tests::SIDECAR_HTTP_PORT, 30303])
        .unwrap();
    let cut = ns.block_peer(m.net.node(b).ip()).unwrap();
    wait_asked_twice(&m, &history, &[a, b], &from).await;
    assert_nothing_removed(&m, &history, writes_before);
    assert_linked_except(&m, &all(5), (a, b)).await;
    let rules = egress.list();
    assert!(
        rules.contains("ct state new counter packets") && !rules.contains("packets 0 "),
        "geth-0's asks were dropped: {rules}"
    );
    cut.remove();
    egress.remove();
    m.wait_full_mesh(&all(5), Duration::from_secs(90))
        .await
        .unwrap();
    assert_nothing_removed(&m, &history, writes_before);
}

/// What a pod that got a departed member's IP answers.
#[derive(Clone, Copy, Debug)]
enum Squatter {
    /// A TCP listener on geth's port; nothing on the sidecar port.
    GethPort,
    /// Also a listener on the sidecar port that accepts and never answers.
    SilentSidecarPort,
    /// Also an HTTP server on the sidecar port naming another node at /identity.
    OtherIdentity,
}

/// geth-3 is gone for good (sidecar killed, so its record stays; geth
/// stopped) and another pod now answers at its IP. The others must still
/// remove the dead record: the probe checks who answers.
async fn a_reused_ip_does_not_keep_a_dead_member(squatter: Squatter) {
    let dead = 3;
    let mut m = fast_mesh(
        &format!("chaos-reuse-{squatter:?}").to_lowercase(),
        4,
        "configmap",
        &[],
    )
    .await;
    // Every observer's prober has heard each member's sidecar name itself
    // (one identity probe per member while connected, in its next round).
    for i in 0..dead {
        eventually(
            "each member's sidecar to name itself to every observer",
            MESH,
            || async {
                let named = m
                    .metric(i, "geth_peer_sidecar_probes_total{kind=\"identity\"}")
                    .await?;
                (named >= 3.0).then_some(())
            },
        )
        .await
        .unwrap();
    }
    m.take_sidecar(dead).unwrap().kill().await;
    m.net.node_mut(dead).stop().await;
    let netns = m.net.node(dead).netns().name().to_owned();
    let busybox = std::path::Path::new("/usr/bin/busybox");
    let mut procs: Vec<Proc> = vec![
        Proc::spawn(
            &m.ctx,
            "squatter-30303",
            Some(&netns),
            busybox,
            ["nc", "-ll", "-p", "30303", "-e", "true"],
            &[],
        )
        .unwrap(),
    ];
    match squatter {
        Squatter::GethPort => {}
        Squatter::SilentSidecarPort => procs.push(
            Proc::spawn(
                &m.ctx,
                "squatter-9090",
                Some(&netns),
                busybox,
                ["nc", "-ll", "-p", "9090", "-e", "sleep", "30"],
                &[],
            )
            .unwrap(),
        ),
        Squatter::OtherIdentity => {
            let dir = m.ctx.path("squatter-www");
            std::fs::create_dir_all(&dir).unwrap();
            // A well-formed identity of some other node.
            let other = format!("{:064x}", 7);
            std::fs::write(
                dir.join("identity"),
                json!({"pod": "not-a-member", "nodeId": other}).to_string(),
            )
            .unwrap();
            procs.push(
                Proc::spawn(
                    &m.ctx,
                    "squatter-9090",
                    Some(&netns),
                    busybox,
                    ["httpd", "-f", "-p", "9090", "-h", dir.to_str().unwrap()],
                    &[],
                )
                .unwrap(),
            );
        }
    }
    let ip = m.net.node(dead).ip();
    eventually("the squatter to listen on geth's port", MESH, || async {
        tokio::net::TcpStream::connect((ip, 30303))
            .await
            .ok()
            .map(|_| ())
    })
    .await
    .unwrap();
    let removed = m.wait_registered(&all(3), Duration::from_secs(90)).await;
    let mut probes = Vec::new();
    for i in 0..3 {
        let mut seen = Vec::new();
        for kind in ["identity", "geth", "sidecar"] {
            let v = m
                .metric(
                    i,
                    &format!("geth_peer_sidecar_probes_total{{kind=\"{kind}\"}}"),
                )
                .await;
            seen.push(format!("{kind}={v:?}"));
        }
        seen.push(format!("indirect={}", indirect_probes(&m, i).await));
        probes.push(format!("geth-{i}: {}", seen.join(" ")));
    }
    for mut p in procs {
        p.kill().await;
    }
    assert!(
        removed.is_ok(),
        "the dead geth-3's record was kept while a non-member answers at its IP \
         ({squatter:?}): {:?}; probes by the others: {probes:?}",
        m.registered_pods().await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_ip_with_only_geths_port_open_does_not_keep_a_dead_member() {
    a_reused_ip_does_not_keep_a_dead_member(Squatter::GethPort).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_ip_with_a_silent_sidecar_port_does_not_keep_a_dead_member() {
    a_reused_ip_does_not_keep_a_dead_member(Squatter::SilentSidecarPort).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_ip_answering_another_identity_does_not_keep_a_dead_member() {
    a_reused_ip_does_not_keep_a_dead_member(Squatter::OtherIdentity).await;
}

const POD_SELECTOR: &str = "app.kubernetes.io/name=geth";

/// Creates (or re-creates) node `i`'s Pod object, Running at the node's IP,
/// as the kubelet would report it; returns its UID.
async fn put_pod(m: &Mesh, pods: &Api<Pod>, i: usize) -> String {
    let name = m.net.node(i).name().to_owned();
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "geth"}},
        "spec": {"containers": [{"name": "geth", "image": "ethereum/client-go:v1.17.5"}]}
    }))
    .unwrap();
    let created = pods.create(&PostParams::default(), &pod).await.unwrap();
    let status = json!({"status": {"phase": "Running", "podIP": m.net.node(i).ip().to_string()}});
    pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
    created.metadata.uid.unwrap()
}

async fn pod_evidence(m: &Mesh, i: usize) -> Option<f64> {
    m.metric(i, "geth_peer_sidecar_pod_evidence").await
}

async fn passes(m: &Mesh, i: usize) -> f64 {
    m.metric(i, "geth_peer_sidecar_reconciles_total")
        .await
        .unwrap_or(0.0)
}

/// Pod evidence on (as deploy/overlays/pod-evidence sets it up), then the
/// pods rule is taken out of the sidecars' Role. The sidecars must say pod
/// evidence is off (metric 0), fall back to agreement, and remove nobody —
/// not even a member whose pod was replaced meanwhile (new UID), which a pod
/// cache kept as if current would take for gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_rbac_revoked_mid_run_turns_pod_evidence_off_and_removes_nobody() {
    let n = 4;
    let mut env = FAST.to_vec();
    // A pass every second or so, so "three more passes" comes soon.
    env.extend([
        ("READ_PODS", "true"),
        ("POD_SELECTOR", POD_SELECTOR),
        ("RESYNC_INTERVAL", "1s"),
    ]);
    let mut m = Mesh::without_sidecars("chaos-pod-rbac", n, &env)
        .await
        .unwrap();
    let admin = m.cluster.admin();
    let roles: Api<Role> = Api::namespaced(admin.clone(), &m.ns.name);
    let mut role = roles.get("geth-peer-sidecar").await.unwrap();
    let without_pods = role.clone();
    role.rules.get_or_insert_with(Vec::new).push(
        serde_json::from_value(
            json!({"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}),
        )
        .unwrap(),
    );
    roles
        .replace("geth-peer-sidecar", &PostParams::default(), &role)
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(admin, &m.ns.name);
    for i in 0..n {
        let uid = put_pod(&m, &pods, i).await;
        m.pod_uids.insert(i, uid);
    }
    for i in 0..n {
        m.start_sidecar(i).unwrap();
    }
    m.wait_full_mesh(&all(n), MESH).await.unwrap();
    m.wait_registered(&all(n), MESH).await.unwrap();
    eventually("every sidecar to use pod evidence", MESH, || async {
        for i in 0..n {
            if pod_evidence(&m, i).await != Some(1.0) {
                return None;
            }
        }
        Some(())
    })
    .await
    .unwrap();
    let history = m.registry_history().await.unwrap();
    let writes_before = registry_writes(&m).len();

    // Revoke: the Role as it was before the pods rule.
    let mut revoked = roles.get("geth-peer-sidecar").await.unwrap();
    revoked.rules = without_pods.rules;
    roles
        .replace("geth-peer-sidecar", &PostParams::default(), &revoked)
        .await
        .unwrap();
    let user = m.ns.service_account_user();
    let refused_pods = || {
        m.cluster
            .audit_events(&user)
            .iter()
            .filter(|e| e["objectRef"]["resource"] == "pods" && e["responseStatus"]["code"] == 403)
            .count()
    };
    let start = tokio::time::Instant::now();
    let off = eventually(
        "every sidecar to report pod evidence off",
        Duration::from_secs(420),
        || async {
            for i in 0..n {
                if pod_evidence(&m, i).await != Some(0.0) {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    let took = start.elapsed();
    eprintln!(
        "pod evidence off everywhere after {took:?} ({}); pod requests refused so far: {}",
        if off.is_ok() { "yes" } else { "NO" },
        refused_pods()
    );
    off.unwrap();

    // Pod geth-3 is replaced (new UID, same IP); its sidecar restarts as the
    // new pod's. The sidecars can no longer read pods.
    pods.delete("geth-3", &DeleteParams::default())
        .await
        .unwrap();
    let uid = put_pod(&m, &pods, 3).await;
    m.take_sidecar(3).unwrap().kill().await;
    m.pod_uids.insert(3, uid.clone());
    m.start_sidecar(3).unwrap();
    eventually("geth-3 to register as the new pod", MESH, || async {
        m.registry_data()
            .await
            .get("member.geth-3")
            .is_some_and(|r| r.contains(&uid))
            .then_some(())
    })
    .await
    .unwrap();
    // The others decide: REGISTRATION_GRACE (2 s) passes, then three passes each.
    let grace_over = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut from = Vec::new();
    for i in 0..3 {
        from.push(passes(&m, i).await);
    }
    for (i, from) in from.iter().enumerate() {
        eventually(
            &format!("geth-{i}'s sidecar to pass 3 more times"),
            MESH,
            || async {
                (tokio::time::Instant::now() >= grace_over && passes(&m, i).await >= from + 3.0)
                    .then_some(())
            },
        )
        .await
        .unwrap();
    }
    for i in 0..n {
        assert_eq!(
            pod_evidence(&m, i).await,
            Some(0.0),
            "geth-{i}: pod evidence back on?"
        );
    }
    assert_nothing_removed(&m, &history, writes_before);
    m.wait_full_mesh(&all(n), MESH).await.unwrap();
    m.wait_registered(&all(n), MESH).await.unwrap();
}
