//! How the sidecar talks to the apiserver: its watches and its writes share
//! one HTTP/2 connection (kube's stock client would hold one per request in
//! flight, and open a new TLS connection for each write while its watches
//! hold the others).

use std::time::Duration;

use integration_tests::{Mesh, eventually};

const MESH: Duration = Duration::from_secs(60);

/// The established TCP connections process `pid` holds to `port` (seen from
/// its own network namespace).
fn connections_to(pid: u32, port: u16) -> Vec<String> {
    let out = std::process::Command::new("nsenter")
        .args([
            "-t",
            &pid.to_string(),
            "-n",
            "ss",
            "-Htnp",
            "state",
            "established",
        ])
        .output()
        .expect("nsenter ss");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&format!("pid={pid},")))
        .filter(|l| {
            l.split_whitespace()
                .any(|field| field.ends_with(&format!(":{port}")))
        })
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_multiplexes_its_three_watches_and_its_writes_over_http2() {
    let env = [
        ("READ_PODS", "true"),
        ("POD_SELECTOR", "app.kubernetes.io/name=geth"),
        ("REGISTRY_LAYOUT", "leases"),
    ];
    let mut m = Mesh::without_sidecars("one-conn", 2, &env).await.unwrap();
    m.cluster.grant_pods(&m.ns).await.unwrap();
    m.cluster.grant_leases(&m.ns).await.unwrap();
    for i in 0..2 {
        m.put_pod(i).await.unwrap();
    }
    m.start_sidecars_and_wait(MESH).await.unwrap();
    let user = m.ns.service_account_user();
    // Three watches each (leases, the ConfigMap, pods), opened after their
    // lists: wait for all six in the apiserver's audit log.
    let watches = eventually("both sidecars' three watches", MESH, || async {
        let w = m.cluster.audited_watches(&user);
        (w.len() >= 6).then_some(w)
    })
    .await
    .unwrap_or_else(|_| m.cluster.audited_watches(&user));
    assert!(watches.len() >= 6, "watches opened: {watches:?}");
    let url = m.cluster.server_url();
    let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
    let writes = m
        .cluster
        .audited_requests(&user)
        .into_iter()
        .filter(|(verb, _, _)| matches!(verb.as_str(), "create" | "update" | "patch"))
        .count();
    assert!(writes >= 2, "each sidecar registered: {writes} writes");
    for i in 0..2 {
        let pid = m.sidecars[i].as_mut().unwrap().proc_mut().pid();
        let held = connections_to(pid, port);
        // Over HTTP/1.1: one per watch, and the writes' (4 seen). Over
        // HTTP/2 one, or two when the first two requests raced before ALPN
        // told the pool the first connection speaks HTTP/2.
        assert!(
            !held.is_empty() && held.len() <= 2,
            "sidecar {i} (pid {pid}) holds {} connections to the apiserver (:{port}) for its \
             three watches and its writes; over HTTP/2 it needs one: {held:#?}",
            held.len()
        );
    }
}
