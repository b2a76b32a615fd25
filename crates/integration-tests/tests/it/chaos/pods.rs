//! Pod evidence when the sidecars lose the right to read pods.

use std::time::Duration;

use integration_tests::{Mesh, eventually};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::rbac::v1::Role;
use kube::Api;
use kube::api::{DeleteParams, PostParams};

use super::{FAST, MESH, all};

pub(super) const POD_SELECTOR: &str = "app.kubernetes.io/name=geth";

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
    let without_pods = roles.get("geth-peer-sidecar").await.unwrap();
    m.cluster.grant_pods(&m.ns).await.unwrap();
    let pods: Api<Pod> = Api::namespaced(admin, &m.ns.name);
    for i in 0..n {
        m.put_pod(i).await.unwrap();
    }
    m.start_sidecars_and_wait(MESH).await.unwrap();
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
    let writes_before = m.registry_writes().len();

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
    m.take_sidecar(3).unwrap().kill().await;
    let uid = m.put_pod(3).await.unwrap();
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
    m.assert_nothing_removed(&history, writes_before);
    m.wait_full_mesh(&all(n), MESH).await.unwrap();
    m.wait_registered(&all(n), MESH).await.unwrap();
}
