//! The control plane fails under a running fleet: the apiserver restarts,
//! etcd loses its data. geth keeps every link throughout (the registry only
//! feeds geth; it never drives a removal on its own), and the fleet heals
//! once the apiserver answers again.

use std::time::Duration;

use integration_tests::{Mesh, NodeSpec, eventually};

use super::{MESH, all, assert_linked, fast_mesh, holding_the_mesh, remove_peer_calls};

/// Registry errors (failed reads, writes, watches) node `i`'s sidecar counted.
async fn registry_errors(m: &Mesh, i: usize) -> f64 {
    m.metric_sum(i, "geth_peer_sidecar_registry_errors_total")
        .await
        .unwrap_or(0.0)
}

/// `admin_removePeer` calls of sidecars `members`, one figure each.
async fn remove_peers_of(m: &Mesh, members: &[usize]) -> Vec<f64> {
    let mut out = Vec::new();
    for &i in members {
        out.push(remove_peer_calls(m, i).await);
    }
    out
}

/// The apiserver is stopped for 20 s (over three `DEAD_AFTER`s) and started
/// again on the same port, certificates and etcd. Meanwhile every geth keeps
/// every link and every sidecar counts the registry's errors; nothing is
/// removed. After the restart the sidecars' watches resume: a node added then
/// is known to every sidecar (its `members` gauge) and linked to every geth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apiserver_restart_drops_no_link_and_a_change_after_it_reaches_everyone() {
    let n = 4;
    let mut m = fast_mesh("chaos-apiserver-restart", n, "configmap", &[]).await;
    let user = m.ns.service_account_user();
    let writes_before = m.registry_writes().len();
    let removes_before = remove_peers_of(&m, &all(n)).await;
    let mut errors_before = Vec::new();
    for i in 0..n {
        errors_before.push(registry_errors(&m, i).await);
    }
    let registered = m.registered_pods().await;

    m.cluster.stop_apiserver().await;
    // The outage is the scenario: 20 s, the mesh checked all along.
    let outage = Duration::from_secs(20);
    let start = tokio::time::Instant::now();
    holding_the_mesh(&m, &all(n), "the outage to pass", outage + MESH, || async {
        start.elapsed() >= outage
    })
    .await;
    for (i, before) in errors_before.iter().enumerate() {
        let errors = registry_errors(&m, i).await;
        assert!(
            errors > *before,
            "geth-{i}'s sidecar counted no registry error during the outage ({errors})"
        );
    }
    assert_eq!(
        remove_peers_of(&m, &all(n)).await,
        removes_before,
        "admin_removePeer calls during the outage"
    );

    let watches_before = m.cluster.audited_watches(&user).len();
    m.cluster.start_apiserver().await.unwrap();
    let restarted = tokio::time::Instant::now();
    // Every sidecar opens its registry watch again.
    let resumed = eventually("every sidecar's watch to resume", MESH, || async {
        let now = m.cluster.audited_watches(&user).len();
        (now >= watches_before + n).then(|| restarted.elapsed())
    })
    .await
    .unwrap();
    assert_eq!(m.registered_pods().await, registered, "records kept");

    // A change made after the restart: a new node joins.
    m.add_nodes(vec![NodeSpec::default()]).await.unwrap();
    let joined = tokio::time::Instant::now();
    m.wait_full_mesh(&all(n + 1), Duration::from_secs(90))
        .await
        .unwrap();
    m.wait_registered(&all(n + 1), MESH).await.unwrap();
    let known = eventually("every sidecar to know the new member", MESH, || async {
        for i in 0..=n {
            if m.metric(i, "geth_peer_sidecar_members").await != Some((n + 1) as f64) {
                return None;
            }
        }
        Some(joined.elapsed())
    })
    .await
    .unwrap();
    let writes = m.registry_writes();
    let deletes: Vec<&String> = writes[writes_before..]
        .iter()
        .filter(|w| w.starts_with("delete"))
        .collect();
    assert!(deletes.is_empty(), "deletes: {deletes:?}");
    assert_eq!(
        remove_peers_of(&m, &all(n)).await,
        removes_before,
        "admin_removePeer calls after the restart"
    );
    eprintln!(
        "apiserver restart: watches resumed {resumed:?} after it was ready; \
         a node added then was known to every sidecar and linked {known:?} after it started"
    );
}

/// etcd loses its data under a running fleet (apiserver and etcd stopped,
/// etcd's data deleted, both started again): the namespace, the sidecars'
/// ServiceAccount and the registry are gone, so the sidecars' tokens no
/// longer validate. The operator restores the namespace and its RBAC, and a
/// new token reaches the sidecars' token file (as the kubelet refreshes a
/// projected token). The sidecars are left running: each one's resync reads
/// the registry, sees its resourceVersion went back, takes the apiserver's
/// state and watches it anew, and registers itself again. No geth link drops
/// meanwhile, and no sidecar deletes anything or calls `admin_removePeer`.
async fn etcd_wiped(layout: &str) {
    let n = 4;
    let mut m = fast_mesh(&format!("chaos-etcd-wiped-{layout}"), n, layout, &[]).await;
    let user = m.ns.service_account_user();
    let writes_before = m.registry_writes().len();
    let events_before = m.cluster.audit_events(&user).len();
    let removes_before = remove_peers_of(&m, &all(n)).await;

    m.cluster.wipe_etcd().await.unwrap();
    assert!(
        m.registered_pods().await.is_empty(),
        "etcd's data is gone, registry included"
    );
    // Some seconds with no namespace and no ServiceAccount: every request
    // of the sidecars is refused.
    let outage = Duration::from_secs(10);
    let start = tokio::time::Instant::now();
    holding_the_mesh(&m, &all(n), "the outage to pass", outage + MESH, || async {
        start.elapsed() >= outage
    })
    .await;
    let restore = tokio::time::Instant::now();
    m.cluster.restore_namespace(&mut m.ns).await.unwrap();
    if layout == "leases" {
        m.cluster.grant_leases(&m.ns).await.unwrap();
    }
    assert_eq!(
        remove_peers_of(&m, &all(n)).await,
        removes_before,
        "admin_removePeer calls while the registry was gone"
    );
    let want: std::collections::BTreeSet<String> =
        (0..n).map(|i| m.net.node(i).name().to_owned()).collect();
    let ids: std::collections::BTreeSet<String> = m.ids(&all(n)).into_values().collect();
    holding_the_mesh(
        &m,
        &all(n),
        "every running sidecar to register again",
        Duration::from_secs(120),
        || async { m.registered_pods().await == want && m.static_node_ids().await == ids },
    )
    .await;
    let whole = restore.elapsed();
    let writes = m.registry_writes();
    let during = &writes[writes_before..];
    // Nothing may be deleted.
    let deleted: Vec<String> = m.cluster.audit_events(&user)[events_before..]
        .iter()
        .filter(|e| e["verb"] == "delete" && e["responseStatus"]["code"].as_i64() < Some(300))
        .map(|e| e["objectRef"].to_string())
        .collect();
    assert!(deleted.is_empty(), "the sidecars deleted: {deleted:?}");
    assert_eq!(
        remove_peers_of(&m, &all(n)).await,
        removes_before,
        "admin_removePeer calls of the sidecars left running"
    );
    assert_linked(&m, &all(n), "after the registry is whole").await;
    eprintln!(
        "{layout}: etcd wiped; registry whole again {whole:?} after the operator began \
         restoring the namespace; registry writes since the wipe: {during:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_wiped_every_sidecar_left_running_registers_again_and_no_link_drops_configmap() {
    etcd_wiped("configmap").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_wiped_every_sidecar_left_running_registers_again_and_no_link_drops_leases() {
    etcd_wiped("leases").await;
}
