//! Chaos on the real test bed: broken paths between pods, a blocked probe
//! port, a reused IP, pod RBAC revoked mid-run. Since issue 21 no single pod
//! decides for the fleet: without pod evidence a member is removed only when
//! other members' sidecars agree it is unreachable. Every test asserts on the
//! apiserver (its audit log and a watch of the registry as admin) and on
//! geth's own view (`admin_peers`).

use std::time::Duration;

use integration_tests::{Mesh, Proc, RegistryHistory, eventually};
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
            let other = format!("{:0128x}", 7);
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
