//! A fleet in the middle of switching registry layouts: some sidecars keep
//! the ConfigMap layout, the others register Leases, whose first-ranked
//! member derives `static-nodes.json` into the same ConfigMap. A ConfigMap
//! sidecar sees a Lease member only as such a derived entry, and never
//! removes it: the publisher would put it back at once, and the two would
//! rewrite the ConfigMap for as long as the member is down (issue 21,
//! defect 5).

use std::collections::BTreeSet;
use std::time::Duration;

use integration_tests::{Mesh, eventually};

use super::pods::POD_SELECTOR;
use super::{FAST, MESH, all, assert_linked, configmap_writes, holding_the_mesh};

/// geth-0..2 keep `REGISTRY_LAYOUT=configmap`, geth-3 and geth-4 use
/// `leases` (geth-3 publishes); pod evidence on, as the chart's default. The
/// geth of Lease member geth-4 stops for six times `DEAD_AFTER`: its pod
/// lives, so the Lease sidecars keep its Lease, and the ConfigMap sidecars
/// keep its derived entry. The ConfigMap is written a bounded number of
/// times (none is expected), not once per `DEAD_AFTER` or faster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_layout_fleet_with_a_lease_members_geth_down_writes_the_configmap_a_bounded_number_of_times()
 {
    let (n, down, window) = (5, 4, Duration::from_secs(36));
    let mut env = FAST.to_vec();
    env.extend([("READ_PODS", "true"), ("POD_SELECTOR", POD_SELECTOR)]);
    let mut m = Mesh::without_sidecars("chaos-mixed-layouts", n, &env)
        .await
        .unwrap();
    m.cluster.grant_pods(&m.ns).await.unwrap();
    m.cluster.grant_leases(&m.ns).await.unwrap();
    for i in 0..n {
        m.put_pod(i).await.unwrap();
    }
    for i in 0..n {
        let layout = if i < 3 { "configmap" } else { "leases" };
        m.start_sidecar_with(i, &[("REGISTRY_LAYOUT", layout)])
            .unwrap();
    }
    m.wait_full_mesh(&all(n), MESH).await.unwrap();
    m.wait_registered(&all(n), MESH).await.unwrap();
    let ids: BTreeSet<String> = m.ids(&all(n)).into_values().collect();
    eventually("static-nodes.json to list all five", MESH, || async {
        (m.static_node_ids().await == ids).then_some(())
    })
    .await
    .unwrap();
    let history = m.registry_history().await.unwrap();

    m.net.node_mut(down).stop().await;
    let up: Vec<usize> = (0..n).filter(|&i| i != down).collect();
    let gone = m.ids(&[down]);
    eventually("every other geth to drop geth-4", MESH, || async {
        for &i in &up {
            if m.missing_peers(i, &gone).await?.is_empty() {
                return None;
            }
        }
        Some(())
    })
    .await
    .unwrap();
    let writes_before = m.registry_writes().len();
    let cm_before = configmap_writes(&m);
    // The window is the scenario: six DEAD_AFTERs of one member down.
    let start = tokio::time::Instant::now();
    holding_the_mesh(&m, &up, "the window to pass", window + MESH, || async {
        start.elapsed() >= window
    })
    .await;
    let cm_writes = configmap_writes(&m) - cm_before;
    let writes = m.registry_writes();
    let during = &writes[writes_before..];
    eprintln!(
        "mixed layouts, geth-4 down {window:?}: {cm_writes} ConfigMap writes, registry writes {during:?}"
    );
    assert!(
        cm_writes <= 2,
        "{cm_writes} ConfigMap writes in {window:?} while one Lease member's geth was down \
         (a small constant expected): {during:?}"
    );
    assert!(
        !during.iter().any(|w| w.starts_with("delete")),
        "a Lease deleted while its pod lives: {during:?}"
    );
    assert!(
        history.removed().is_empty(),
        "member records removed: {:?}",
        history.removed()
    );
    assert_eq!(
        m.static_node_ids().await,
        ids,
        "static-nodes.json keeps the stopped member's entry"
    );

    m.net.node_mut(down).start().await.unwrap();
    let back = tokio::time::Instant::now();
    m.wait_full_mesh(&all(n), MESH).await.unwrap();
    eprintln!("full mesh again {:?} after geth-4 started", back.elapsed());
    assert_linked(&m, &all(n), "after geth-4's return").await;
    m.wait_registered(&all(n), MESH).await.unwrap();
    assert!(history.removed().is_empty(), "{:?}", history.removed());
}
