//! Broken paths between pods: one observer cut from one member, an observer
//! that cannot reach the probe ports, a dead member's IP reused.

use std::time::Duration;

use integration_tests::{Proc, eventually};
use serde_json::json;

use super::{
    MESH, all, assert_linked_except, fast_mesh, indirect_probes, log_has, wait_asked_twice,
};

/// The path between one observer (geth-0) and one member (geth-1) is cut,
/// both directions; every other pod still reaches both. Neither end removes
/// the other: the others, asked, reach it.
async fn one_observer_cut_from_one_member(layout: &str) {
    let (a, b) = (0, 1);
    let mut m = fast_mesh(&format!("chaos-cut-{layout}"), 5, layout, &[]).await;
    let history = m.registry_history().await.unwrap();
    let writes_before = m.registry_writes().len();
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
    m.assert_nothing_removed(&history, writes_before);
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
    m.assert_nothing_removed(&history, writes_before);
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
    let writes_before = m.registry_writes().len();
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
    m.assert_nothing_removed(&history, writes_before);
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
    m.assert_nothing_removed(&history, writes_before);
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
