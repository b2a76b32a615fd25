//! The sidecar end to end: real geth nodes, a real apiserver, each sidecar run as
//! a pod would run it (its node's network namespace, the service account's token).

use std::collections::BTreeSet;
use std::time::Duration;

use integration_tests::{Mesh, NodeSpec, eventually};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams};
use serde_json::json;

const MESH: Duration = Duration::from_secs(60);

fn all(n: usize) -> Vec<usize> {
    (0..n).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_mesh_then_scale_to_seven_then_down_to_four() {
    let mut m = Mesh::start("scale", 5, &[]).await.unwrap();
    m.wait_full_mesh(&all(5), MESH).await.unwrap();
    m.wait_registered(&all(5), MESH).await.unwrap();
    // A start cuts nothing: no sidecar called removePeer.
    for i in 0..5 {
        assert_eq!(
            remove_peers(&m, i).await,
            0.0,
            "sidecar {i} called removePeer"
        );
    }

    m.add_nodes(vec![NodeSpec::default(); 2]).await.unwrap();
    m.wait_full_mesh(&all(7), MESH).await.unwrap();
    m.wait_registered(&all(7), MESH).await.unwrap();

    // Scale down: pods 4..7 get SIGTERM (sidecar deregisters), geth stops.
    for i in (4..7).rev() {
        let sc = m.take_sidecar(i).unwrap();
        assert_eq!(sc.terminate().await, Some(0), "sidecar {i} exit code");
        m.net.node_mut(i).stop().await;
    }
    m.wait_registered(&all(4), MESH).await.unwrap();
    // Every remaining sidecar wants exactly the 3 others (departed ones were
    // removed from its geth's static set).
    for i in 0..4 {
        eventually(&format!("sidecar {i} to desire 3 peers"), MESH, || async {
            (m.metric(i, "geth_peer_sidecar_desired_peers").await == Some(3.0)).then_some(())
        })
        .await
        .unwrap();
    }
    m.wait_full_mesh(&all(4), MESH).await.unwrap();
}

/// A bound well below geth's static redial interval (30 s dial history + 5 s):
/// a reconnect within it was made by the sidecar, not by geth's timer.
const REDIAL_BOUND: Duration = Duration::from_secs(15);

/// How fast the sidecar's reports must follow geth's admin_peers: the behaviour
/// itself ("about a second"), with room for a loaded 2-core test machine, and far
/// below the 24-36 s resync that used to be the only thing updating them.
const REPORT_LAG: Duration = Duration::from_secs(3);

/// Waits until every sidecar of `members` reports `connected` connected and
/// `missing` missing peers.
async fn wait_reports(m: &Mesh, members: &[usize], connected: f64, missing: f64) {
    eventually(
        &format!("sidecars {members:?} to report {connected} connected, {missing} missing"),
        REPORT_LAG,
        || async {
            for &i in members {
                let c = m.metric(i, "geth_peer_sidecar_connected_peers").await;
                let x = m.metric(i, "geth_peer_sidecar_missing_peers").await;
                if c != Some(connected) || x != Some(missing) {
                    return None;
                }
            }
            Some(())
        },
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_follow_admin_peers_within_seconds_and_logs_carry_no_colour() {
    let mut m = Mesh::start("reports", 4, &[]).await.unwrap();
    m.wait_full_mesh(&all(4), MESH).await.unwrap();
    wait_reports(&m, &all(4), 3.0, 0.0).await;

    // A geth goes away: the others count it missing.
    m.net.node_mut(3).kill().await;
    eventually("geth 3 to leave the others' admin_peers", MESH, || async {
        let id = m.ids(&[3]).remove(&3)?;
        for i in 0..3 {
            if m.net.node(i).peer_ids().await.ok()?.contains(&id) {
                return None;
            }
        }
        Some(())
    })
    .await
    .unwrap();
    wait_reports(&m, &[0, 1, 2], 2.0, 1.0).await;

    // It comes back: as soon as admin_peers shows the full mesh, so do the reports.
    m.net.node_mut(3).start().await.unwrap();
    m.wait_full_mesh(&all(4), MESH).await.unwrap();
    wait_reports(&m, &all(4), 3.0, 0.0).await;

    // Its log goes to a file, as under `kubectl logs`: plain text, no colour codes.
    let mut sc = m.take_sidecar(0).unwrap();
    let log = std::fs::read_to_string(sc.proc_mut().log()).unwrap();
    assert!(log.contains("geth-peer-sidecar starting"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "terminal escape codes in a log file"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn geth_killed_and_restarted_is_re_applied_by_its_sidecar_well_before_geths_redial() {
    let mut m = Mesh::start("geth-restart", 3, &[]).await.unwrap();
    m.wait_full_mesh(&all(3), MESH).await.unwrap();
    let adds = "geth_peer_sidecar_geth_actions_total{kind=\"add_peer\"}";
    let before = m.metric(0, adds).await.unwrap_or(0.0);
    m.net.node_mut(0).kill().await;
    m.net.node_mut(0).start().await.unwrap();
    // The restarted node's own sidecar re-adds both peers...
    eventually("sidecar 0 to re-add both peers", MESH, || async {
        (m.metric(0, adds).await? >= before + 2.0).then_some(())
    })
    .await
    .unwrap();
    // ...so the mesh is back well before the others' static redial (~35 s)
    // could have done it alone.
    m.wait_full_mesh(&all(3), REDIAL_BOUND).await.unwrap();
    eventually("the sidecar to notice the restart", MESH, || async {
        let reconnects = m.metric(0, "geth_peer_sidecar_geth_reconnects_total").await;
        (reconnects >= Some(2.0)).then_some(())
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_killed_and_restarted_leaves_one_record_and_the_mesh_untouched() {
    let mut m = Mesh::start("sidecar-restart", 3, &[]).await.unwrap();
    m.wait_full_mesh(&all(3), MESH).await.unwrap();
    m.wait_registered(&all(3), MESH).await.unwrap();
    m.take_sidecar(1).unwrap().kill().await;
    // geth keeps its peers without the sidecar.
    m.wait_full_mesh(&all(3), Duration::from_secs(5))
        .await
        .unwrap();
    m.start_sidecar(1).unwrap();
    eventually("the restarted sidecar to be ready", MESH, || async {
        let sc = m.sidecars[1].as_ref()?;
        (sc.get("/readyz").await.ok()?.0 == 200).then_some(())
    })
    .await
    .unwrap();
    m.wait_registered(&all(3), MESH).await.unwrap();
    let data = m.registry_data().await;
    let members = data.keys().filter(|k| k.starts_with("member.")).count();
    assert_eq!(members, 3, "no duplicate record: {data:?}");
    m.wait_full_mesh(&all(3), MESH).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_on_a_new_ip_with_its_key_is_reconnected_everywhere() {
    let mut m = Mesh::start("ip-move", 3, &[]).await.unwrap();
    m.wait_full_mesh(&all(3), MESH).await.unwrap();
    let old_ip = m.net.node(2).ip().to_string();
    let new_ip = m.net.fresh_ip();
    // The pod is replaced: its sidecar goes, geth comes back elsewhere with the
    // same datadir, and a new sidecar starts with the new POD_IP.
    m.take_sidecar(2).unwrap().kill().await;
    m.net.node_mut(2).restart_on_new_ip(new_ip).await.unwrap();
    m.start_sidecar(2).unwrap();
    m.wait_full_mesh(&all(3), MESH).await.unwrap();
    eventually(
        "the registry to carry the new address only",
        MESH,
        || async {
            let data = m.registry_data().await;
            let rec = data.get("member.geth-2")?;
            let all = data.values().cloned().collect::<Vec<_>>().join("\n");
            (rec.contains(&new_ip.to_string()) && !all.contains(&format!("{old_ip}:")))
                .then_some(())
        },
    )
    .await
    .unwrap();
    // Every other node is connected to the node at its new address.
    for i in 0..2 {
        let peers = integration_tests::ipc_call(m.net.node(i).ipc_path(), "admin_peers", json!([]))
            .await
            .unwrap();
        let text = peers.to_string();
        assert!(
            !text.contains(&format!("{old_ip}:")),
            "node {i} still talks to the old IP: {text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_observer_re_dials_a_moved_node_that_cannot_dial_it() {
    // geth ignores addPeer for an id already in its static set: only the
    // observer's removePeer + addPeer makes its geth dial the new address. The
    // moved node cannot dial node 0 here, so nothing else can connect them.
    let mut m = Mesh::start("ip-move-redial", 3, &[]).await.unwrap();
    m.wait_full_mesh(&all(3), MESH).await.unwrap();
    // The mesh can be full before node 0's own addPeer of node 2 (node 2
    // dialled first; node 0 adds it after the dial grace): the move must find
    // the old address in node 0's static set, or there is nothing to clear.
    eventually(
        "node 0's sidecar to add both others to its geth",
        Duration::from_secs(30),
        || async {
            let adds = m
                .metric(0, "geth_peer_sidecar_geth_actions_total{kind=\"add_peer\"}")
                .await?;
            (adds >= 2.0).then_some(())
        },
    )
    .await
    .unwrap();
    let removes_before = remove_peers(&m, 0).await;
    let new_ip = m.net.fresh_ip();
    m.take_sidecar(2).unwrap().kill().await;
    m.net.node_mut(2).restart_on_new_ip(new_ip).await.unwrap();
    m.net
        .node(2)
        .netns()
        .refuse_outbound_dials_to(m.net.node(0).ip())
        .unwrap();
    m.start_sidecar(2).unwrap();
    let mover = m.net.node(2).node_id().to_owned();
    let link = eventually(
        "node 0 to dial node 2 at its new address",
        Duration::from_secs(90),
        || async {
            let peers =
                integration_tests::ipc_call(m.net.node(0).ipc_path(), "admin_peers", json!([]))
                    .await
                    .ok()?;
            peers
                .as_array()?
                .iter()
                .find(|p| p["id"].as_str() == Some(mover.as_str()))
                .cloned()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        link["network"]["inbound"], false,
        "node 0 dialled it (the mover cannot): {link}"
    );
    assert!(
        link["network"]["remoteAddress"]
            .as_str()
            .is_some_and(|a| a.starts_with(&format!("{new_ip}:"))),
        "{link}"
    );
    assert!(
        remove_peers(&m, 0).await > removes_before,
        "node 0's sidecar cleared the old address with removePeer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_100_64_pod_range_probes_never_touch_geths_p2p_port() {
    // On 100.64.0.0/10 geth accepts one inbound connection per IP per 30 s: a
    // probe of geth's port would make it refuse that pod's next dial. Geth 2
    // is down (its sidecar runs on), so the others probe it twice a second.
    let options = integration_tests::MeshOptions {
        range: integration_tests::PodRange::SharedAddressSpace,
        ..Default::default()
    };
    let env = [("PROBE_INTERVAL", "500ms")];
    let mut m = Mesh::start_with("probe-cgnat", 3, &env, options)
        .await
        .unwrap();
    m.wait_full_mesh(&all(3), MESH).await.unwrap();
    m.net.node_mut(2).stop().await;
    let ns = m.net.node(2).netns();
    ns.count_connection_attempts(integration_tests::P2P_PORT)
        .unwrap();
    let probes = |i: usize| {
        let m = &m;
        async move {
            m.metric(i, "geth_peer_sidecar_probes_total{kind=\"sidecar\"}")
                .await
                .unwrap_or(0.0)
        }
    };
    let from = [probes(0).await, probes(1).await];
    for (i, from) in from.iter().enumerate() {
        eventually(
            &format!("sidecar {i} to probe 5 more times"),
            MESH,
            || async { (probes(i).await >= from + 5.0).then_some(()) },
        )
        .await
        .unwrap();
    }
    // Only geth's own static redials (one per peer per ~30 s) may knock.
    let knocks = ns.connection_attempts().unwrap();
    assert!(
        knocks <= 2,
        "{knocks} connection attempts reached geth 2's p2p port during 10+ probes"
    );
}

/// What the original (Python) sidecar does, every `period`: read the shared
/// ConfigMap, append its own enode (with `?discport=0`) to `static-nodes.json`
/// when missing and patch it back without a precondition, then admin_addPeer
/// every entry on its geth. Returns (rounds done, writes made) counters.
fn spawn_legacy_writer(
    m: &Mesh,
    i: usize,
    period: Duration,
) -> (
    tokio::task::JoinHandle<()>,
    std::sync::Arc<std::sync::atomic::AtomicU32>,
    std::sync::Arc<std::sync::atomic::AtomicU32>,
) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    let own = format!(
        "{}?discport=0",
        m.net.node(i).enode().split('?').next().unwrap_or_default()
    );
    let ipc = m.net.node(i).ipc_path().to_owned();
    let cms: Api<ConfigMap> = Api::namespaced(m.cluster.admin(), &m.ns.name);
    let (rounds, writes) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let (r, w) = (rounds.clone(), writes.clone());
    let task = tokio::spawn(async move {
        loop {
            if let Ok(Some(cm)) = cms.get_opt(integration_tests::CONFIGMAP).await {
                let data = cm.data.unwrap_or_default();
                let mut list: Vec<String> = data
                    .get("static-nodes.json")
                    .and_then(|v| serde_json::from_str(v).ok())
                    .unwrap_or_default();
                if !list.contains(&own) {
                    list.push(own.clone());
                    let patch = json!({"data": {"static-nodes.json": serde_json::to_string(&list).unwrap()}});
                    if cms
                        .patch(
                            integration_tests::CONFIGMAP,
                            &PatchParams::default(),
                            &Patch::Merge(&patch),
                        )
                        .await
                        .is_ok()
                    {
                        w.fetch_add(1, Ordering::SeqCst);
                    }
                }
                for enode in list.iter().filter(|e| **e != own) {
                    let _ =
                        integration_tests::ipc_call(&ipc, "admin_addPeer", json!([enode])).await;
                }
                r.fetch_add(1, Ordering::SeqCst);
            }
            tokio::time::sleep(period).await;
        }
    });
    (task, rounds, writes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_fleet_with_a_legacy_writer_forms_one_mesh_without_flapping_writes() {
    use std::sync::atomic::Ordering;
    // Nodes 0 and 1 run this sidecar; node 2 still runs the original.
    let mut m = Mesh::without_sidecars("legacy", 3, &[]).await.unwrap();
    m.start_sidecar(0).unwrap();
    m.start_sidecar(1).unwrap();
    m.wait_registered(&all(2), MESH).await.unwrap();
    let (writer, rounds, writes) = spawn_legacy_writer(&m, 2, Duration::from_millis(500));
    m.wait_full_mesh(&all(3), MESH).await.unwrap();
    // Our sidecars add the legacy node themselves (the mesh may have formed
    // first through the legacy writer's own addPeer calls).
    for i in 0..2 {
        eventually(&format!("sidecar {i} to add both peers"), MESH, || async {
            let adds = m
                .metric(i, "geth_peer_sidecar_geth_actions_total{kind=\"add_peer\"}")
                .await?;
            (adds >= 2.0).then_some(())
        })
        .await
        .unwrap();
    }
    // Our side writes (geth-1's record is deleted by hand, its sidecar
    // re-registers): the legacy entry must survive it, so the legacy writer
    // never has to re-add it.
    let cms: Api<ConfigMap> = Api::namespaced(m.cluster.admin(), &m.ns.name);
    let (before_rounds, before_writes) =
        (rounds.load(Ordering::SeqCst), writes.load(Ordering::SeqCst));
    cms.patch(
        integration_tests::CONFIGMAP,
        &PatchParams::default(),
        &Patch::Merge(&json!({"data": {"member.geth-1": null}})),
    )
    .await
    .unwrap();
    m.wait_registered(&all(2), MESH).await.unwrap();
    eventually("the legacy writer to run 6 more rounds", MESH, || async {
        (rounds.load(Ordering::SeqCst) >= before_rounds + 6).then_some(())
    })
    .await
    .unwrap();
    writer.abort();
    assert_eq!(
        writes.load(Ordering::SeqCst),
        before_writes,
        "the legacy writer had to re-add its entry"
    );
    let data = m.registry_data().await;
    assert!(
        data["static-nodes.json"].contains(&format!("@{}:", m.net.node(2).ip())),
        "the legacy entry is kept: {}",
        data["static-nodes.json"]
    );
    m.wait_full_mesh(&all(3), MESH).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_or_vandalised_configmap_is_healed() {
    let m = Mesh::start("heal", 3, &[]).await.unwrap();
    m.wait_registered(&all(3), MESH).await.unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(m.cluster.admin(), &m.ns.name);
    cms.delete(integration_tests::CONFIGMAP, &DeleteParams::default())
        .await
        .unwrap();
    m.wait_registered(&all(3), MESH).await.unwrap();
    let patch = json!({"data": {
        "static-nodes.json": "garbage",
        "member.geth-0": null,
        "member.geth-1": "{not json",
    }});
    cms.patch(
        integration_tests::CONFIGMAP,
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .unwrap();
    eventually("records and static-nodes.json healed", MESH, || async {
        let data = m.registry_data().await;
        let list: Vec<String> = serde_json::from_str(data.get("static-nodes.json")?).ok()?;
        let ok = list.len() == 3
            && serde_json::from_str::<serde_json::Value>(data.get("member.geth-1")?).is_ok()
            && data.contains_key("member.geth-0");
        ok.then_some(())
    })
    .await
    .unwrap();
    m.wait_full_mesh(&all(3), MESH).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_removes_the_own_record_and_exits_zero() {
    let mut m = Mesh::start("sigterm", 2, &[]).await.unwrap();
    m.wait_registered(&all(2), MESH).await.unwrap();
    let sc = m.take_sidecar(1).unwrap();
    let started = std::time::Instant::now();
    assert_eq!(sc.terminate().await, Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "inside the grace period"
    );
    m.wait_registered(&[0], Duration::from_secs(5))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_deregisters_at_once_while_a_geth_call_hangs() {
    // Passes every second; a geth call may hang for a minute before timing out.
    let env = [("RESYNC_INTERVAL", "1s"), ("RPC_TIMEOUT", "60s")];
    let mut m = Mesh::start("sigterm-hung", 2, &env).await.unwrap();
    m.wait_registered(&all(2), MESH).await.unwrap();
    m.net.node(1).freeze();
    let passes = "geth_peer_sidecar_reconciles_total";
    let before = m.metric(1, passes).await.unwrap();
    eventually("a pass to start against the frozen geth", MESH, || async {
        (m.metric(1, passes).await? > before).then_some(())
    })
    .await
    .unwrap();
    let sc = m.take_sidecar(1).unwrap();
    let started = std::time::Instant::now();
    assert_eq!(sc.terminate().await, Some(0));
    // The behaviour itself: far inside the 30 s grace, not after the 60 s call.
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "SIGTERM waited for the hung geth call: {:?}",
        started.elapsed()
    );
    m.wait_registered(&[0], Duration::from_secs(5))
        .await
        .unwrap();
    m.net.node_mut(1).kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_on_another_genesis_is_reported_unusable_and_the_rest_is_fine() {
    let mut m = Mesh::start("genesis", 2, &[]).await.unwrap();
    m.add_nodes(vec![NodeSpec {
        chain_id: 4242,
        ..NodeSpec::default()
    }])
    .await
    .unwrap();
    m.wait_full_mesh(&all(2), MESH).await.unwrap();
    m.wait_registered(&all(3), MESH).await.unwrap();
    eventually("node 0 to report the stranger unusable", MESH, || async {
        (m.metric(0, "geth_peer_sidecar_unusable_peers").await >= Some(1.0)).then_some(())
    })
    .await
    .unwrap();
    m.wait_full_mesh(&all(2), Duration::from_secs(5))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn geth_peers_are_untouched_while_the_apiserver_is_down_and_sidecars_recover() {
    let mut m = Mesh::start("api-down", 3, &[]).await.unwrap();
    m.wait_full_mesh(&all(3), MESH).await.unwrap();
    m.cluster.stop_apiserver().await;
    // The outage is the scenario (60 s); the mesh is checked across it.
    let until = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::time::Instant::now() < until {
        m.wait_full_mesh(&all(3), Duration::from_secs(5))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    m.cluster.start_apiserver().await.unwrap();
    // After the outage a new member is still picked up by everyone.
    m.add_nodes(vec![NodeSpec::default()]).await.unwrap();
    m.wait_full_mesh(&all(4), Duration::from_secs(90))
        .await
        .unwrap();
    m.wait_registered(&all(4), MESH).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_node_is_dropped_by_the_majority_and_rejoins_when_back() {
    let env = [("DEAD_AFTER", "6s"), ("PROBE_INTERVAL", "1s")];
    let m = Mesh::start("partition", 4, &env).await.unwrap();
    m.wait_full_mesh(&all(4), MESH).await.unwrap();
    m.wait_registered(&all(4), MESH).await.unwrap();
    m.net.node(3).cut().unwrap();
    // The healthy majority drops the cut-off node once dead-after has passed.
    // (That an isolated node which can still reach the apiserver removes nobody
    // is a_node_that_reaches_the_apiserver_but_no_peer_never_removes_the_majority.)
    m.wait_registered(&all(3), Duration::from_secs(90))
        .await
        .unwrap();
    m.net.node(3).restore().unwrap();
    m.wait_registered(&all(4), Duration::from_secs(90))
        .await
        .unwrap();
    m.wait_full_mesh(&all(4), Duration::from_secs(90))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_sidecar_without_geth_waits_and_reports_not_ready() {
    let mut m = Mesh::start("no-geth", 1, &[]).await.unwrap();
    m.net.node_mut(0).stop().await;
    let sc = m.sidecars[0].as_ref().unwrap();
    eventually("readyz to say geth is not answering", MESH, || async {
        let (code, body) = sc.get("/readyz").await.ok()?;
        (code == 503 && body.contains("geth_ipc: not answering")).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(
        sc.get("/healthz").await.unwrap().0,
        200,
        "alive while waiting"
    );
    m.net.node_mut(0).start().await.unwrap();
    eventually("readyz to recover", MESH, || async {
        (sc.get("/readyz").await.ok()?.0 == 200).then_some(())
    })
    .await
    .unwrap();
}

/// How soon after geth's socket answers a sidecar that has been waiting for it
/// must be ready: "within about a second", with room for a loaded test machine,
/// and below the 5 s the wait used to back off to.
const GETH_WAIT_BOUND: Duration = Duration::from_millis(2500);

/// Passes of sidecar 0 that failed because geth did not answer.
async fn failed(m: &Mesh) -> f64 {
    m.metric(0, "geth_peer_sidecar_reconcile_errors_total{kind=\"geth\"}")
        .await
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_that_waited_long_for_geth_is_ready_within_seconds_of_its_socket() {
    let mut m = Mesh::start("late-geth", 1, &[]).await.unwrap();
    m.net.node_mut(0).stop().await;
    // Long enough for an unbounded doubling backoff to have grown past 5 s.
    let start = failed(&m).await;
    eventually("the sidecar to retry geth 7 times", MESH, || async {
        (failed(&m).await >= start + 7.0).then_some(())
    })
    .await
    .unwrap();
    // Start geth right after a retry, the worst moment for a long backoff.
    let seen = failed(&m).await;
    eventually("the next retry", MESH, || async {
        (failed(&m).await > seen).then_some(())
    })
    .await
    .unwrap();
    m.net.node_mut(0).start().await.unwrap();
    let sc = m.sidecars[0].as_ref().unwrap();
    eventually(
        "readyz after geth's socket answers",
        GETH_WAIT_BOUND,
        || async { (sc.get("/readyz").await.ok()?.0 == 200).then_some(()) },
    )
    .await
    .unwrap();
}

async fn remove_peers(m: &Mesh, i: usize) -> f64 {
    m.metric(
        i,
        "geth_peer_sidecar_geth_actions_total{kind=\"remove_peer\"}",
    )
    .await
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_mode_survives_an_ip_move_without_remove_peer() {
    let env = [
        ("ADVERTISE", "dns"),
        (
            "DNS_TEMPLATE",
            "{pod}.{service}.{namespace}.svc.cluster.local",
        ),
        ("SERVICE_NAME", "geth"),
    ];
    let mut m = Mesh::without_sidecars("dns", 3, &env).await.unwrap();
    m.write_hosts().unwrap();
    for i in 0..3 {
        m.start_sidecar(i).unwrap();
    }
    m.wait_full_mesh(&all(3), MESH).await.unwrap();
    m.wait_registered(&all(3), MESH).await.unwrap();
    let data = m.registry_data().await;
    assert!(
        data["member.geth-2"].contains(&m.dns_name(2)),
        "published the DNS name: {}",
        data["member.geth-2"]
    );
    // geth-0 has the oldest record, so its peers dialled it first; it adds them
    // to its own static set once the dial grace has passed.
    eventually("geth-0 to add both peers as static", MESH, || async {
        let adds = m
            .metric(0, "geth_peer_sidecar_geth_actions_total{kind=\"add_peer\"}")
            .await;
        (adds >= Some(2.0)).then_some(())
    })
    .await
    .unwrap();
    let before = (remove_peers(&m, 0).await, remove_peers(&m, 1).await);

    // The pod moves: same name, new IP; cluster DNS (the hosts files) follows.
    let new_ip = m.net.fresh_ip();
    m.take_sidecar(2).unwrap().kill().await;
    m.net.node_mut(2).restart_on_new_ip(new_ip).await.unwrap();
    m.write_hosts().unwrap();
    m.start_sidecar(2).unwrap();
    m.wait_full_mesh(&all(3), MESH).await.unwrap();
    // The others' static entry (a DNS name) never changed: no removePeer.
    assert_eq!(
        (remove_peers(&m, 0).await, remove_peers(&m, 1).await),
        before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_prints_every_member_marks_its_own_as_self_and_whether_this_geth_is_connected() {
    let m = Mesh::start("status", 3, &[]).await.unwrap();
    m.wait_full_mesh(&all(3), MESH).await.unwrap();
    m.wait_registered(&all(3), MESH).await.unwrap();
    let out = m
        .status_in_pod(0, None, &integration_tests::sidecar_bin(), &[])
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].starts_with("POD"), "{stdout}");
    for i in 0..3 {
        let row = lines
            .iter()
            .find(|l| l.starts_with(&format!("geth-{i} ")))
            .unwrap_or_else(|| panic!("geth-{i} missing:\n{stdout}"));
        assert!(row.contains(&m.net.node(i).ip().to_string()), "{row}");
        assert!(row.contains(&m.net.node(i).node_id()[..8]), "{row}");
        let connected = if i == 0 { "self" } else { "yes" };
        assert!(row.trim_end().ends_with(connected), "{row}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_lease_layout_each_member_is_one_lease_written_once_and_static_nodes_json_follows()
{
    let mut m = Mesh::without_sidecars("leases", 3, &[("REGISTRY_LAYOUT", "leases")])
        .await
        .unwrap();
    m.cluster.grant_leases(&m.ns).await.unwrap();
    for i in 0..3 {
        m.start_sidecar(i).unwrap();
    }
    // geth's own view: every node peered with every other.
    m.wait_full_mesh(&all(3), MESH).await.unwrap();
    m.wait_registered(&all(3), MESH).await.unwrap();
    assert_eq!(m.lease_pods().await.len(), 3, "one Lease per member");
    let data = m.registry_data().await;
    assert!(
        !data.keys().any(|k| k.starts_with("member.")),
        "no member keys in the ConfigMap with the lease layout: {:?}",
        data.keys().collect::<Vec<_>>()
    );
    let ids: Vec<String> = (0..3).map(|i| m.net.node(i).node_id()).collect();
    let want: BTreeSet<String> = ids.iter().cloned().collect();
    integration_tests::eventually("static-nodes.json to list the three", MESH, || async {
        (m.static_node_ids().await == want).then_some(())
    })
    .await
    .unwrap();
    // Registering was one create per member: no conflicts, no rewrites.
    let user = m.ns.service_account_user();
    let lease_writes: Vec<(String, String)> = m
        .cluster
        .audited_requests(&user)
        .into_iter()
        .filter(|(verb, resource, _)| {
            resource == "leases" && matches!(verb.as_str(), "create" | "update" | "delete")
        })
        .map(|(verb, _, name)| (verb, name))
        .collect();
    assert_eq!(
        lease_writes.iter().filter(|(v, _)| v == "create").count(),
        3,
        "{lease_writes:?}"
    );
    assert_eq!(lease_writes.len(), 3, "{lease_writes:?}");

    // A sidecar stopped gracefully (SIGTERM) deletes its Lease;
    // static-nodes.json follows without it.
    let sc = m.take_sidecar(2).unwrap();
    assert_eq!(sc.terminate().await, Some(0));
    m.wait_registered(&[0, 1], MESH).await.unwrap();
    let want: BTreeSet<String> = ids[..2].iter().cloned().collect();
    integration_tests::eventually("static-nodes.json without the departed", MESH, || async {
        (m.static_node_ids().await == want).then_some(())
    })
    .await
    .unwrap();
}

/// A pod spec without the Downward API's POD_NAME still names its member and
/// publishes `static-nodes.json` as `$HOSTNAME` (a pod's hostname is its name).
/// Alone, it is the first-ranked member: nobody else would ever publish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_lease_layout_a_sidecar_without_pod_name_registers_and_publishes_as_its_hostname()
{
    let env = [
        ("REGISTRY_LAYOUT", "leases"),
        ("POD_NAME", ""),
        ("HOSTNAME", "geth-0"),
    ];
    let mut m = Mesh::without_sidecars("leases-hostname", 1, &env)
        .await
        .unwrap();
    m.cluster.grant_leases(&m.ns).await.unwrap();
    m.start_sidecar(0).unwrap();
    m.wait_registered(&[0], MESH).await.unwrap();
    assert_eq!(
        m.lease_pods().await,
        BTreeSet::from(["geth-0".to_owned()]),
        "the Lease is named by the hostname"
    );
    let want = BTreeSet::from([m.net.node(0).node_id()]);
    integration_tests::eventually("static-nodes.json to list the member", MESH, || async {
        (m.static_node_ids().await == want).then_some(())
    })
    .await
    .unwrap();
}

/// A mesh of `n` with pod evidence on, as deploy/overlays/pod-evidence sets it
/// up: the Role grants pods get/list/watch, READ_PODS and POD_SELECTOR are set,
/// and every node has a labelled pod object (nothing runs them here; the status
/// is what the kubelet would report). `extra` env comes after the defaults.
async fn pod_evidence_mesh(
    name: &str,
    n: usize,
    extra: &[(&str, &str)],
) -> (Mesh, Api<k8s_openapi::api::core::v1::Pod>) {
    use k8s_openapi::api::core::v1::Pod;

    let mut env = vec![
        ("READ_PODS", "true"),
        ("POD_SELECTOR", "app.kubernetes.io/name=geth"),
    ];
    env.extend_from_slice(extra);
    let mut m = Mesh::without_sidecars(name, n, &env).await.unwrap();
    m.cluster.grant_pods(&m.ns).await.unwrap();
    if extra.contains(&("REGISTRY_LAYOUT", "leases")) {
        m.cluster.grant_leases(&m.ns).await.unwrap();
    }
    let pods: Api<Pod> = Api::namespaced(m.cluster.admin(), &m.ns.name);
    for i in 0..n {
        m.put_pod(i).await.unwrap();
    }
    m.start_sidecars_and_wait(MESH).await.unwrap();
    (m, pods)
}

/// The requests the sidecars (their service account) made on pods: (verb, name).
fn pod_requests(m: &Mesh) -> Vec<(String, String)> {
    let user = m.ns.service_account_user();
    m.cluster
        .audited_requests(&user)
        .into_iter()
        .filter(|(_, resource, _)| resource == "pods")
        .map(|(verb, _, name)| (verb, name))
        .collect()
}

/// A pod the watch saw deleted leaves the registry at once, even within
/// REGISTRATION_GRACE (default 60 s; DEAD_AFTER is long: only pod evidence
/// can do it): measured from the Pod's deletion to the registry without its
/// record, by the apiserver's own state. The sidecar dies without
/// deregistering.
async fn a_deleted_pod_leaves_within_the_grace(layout: &str) {
    let env = [("DEAD_AFTER", "600s"), ("REGISTRY_LAYOUT", layout)];
    let (mut m, pods) = pod_evidence_mesh(&format!("gone-{layout}"), 3, &env).await;
    m.take_sidecar(2).unwrap().kill().await;
    m.net.node_mut(2).kill().await;
    let deleted = std::time::Instant::now();
    pods.delete("geth-2", &DeleteParams::default())
        .await
        .unwrap();
    // Well inside the 60 s grace: only the watch's sighting can do this.
    m.wait_registered(&all(2), Duration::from_secs(5))
        .await
        .unwrap();
    let took = deleted.elapsed();
    eprintln!("{layout}: record gone {took:?} after the pod's deletion");
    let derived = m.registry_data().await;
    let static_nodes = derived
        .get("static-nodes.json")
        .cloned()
        .unwrap_or_default();
    assert!(
        !static_nodes.contains(&m.net.node(2).node_id()),
        "static-nodes.json still lists the deleted pod's node: {static_nodes}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_pod_evidence_a_deleted_pod_leaves_within_the_grace_configmap_layout() {
    Box::pin(a_deleted_pod_leaves_within_the_grace("configmap")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_pod_evidence_a_deleted_pod_leaves_within_the_grace_lease_layout() {
    Box::pin(a_deleted_pod_leaves_within_the_grace("leases")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_pod_evidence_pods_are_watched_and_passes_at_steady_state_send_no_pod_requests() {
    // A pass every second or so: the old per-pass LIST would show at once.
    let (m, _pods) = pod_evidence_mesh("pods-watch", 3, &[("RESYNC_INTERVAL", "1s")]).await;
    let user = m.ns.service_account_user();
    // The watch follows the watcher's first LIST, so a sidecar may open it after
    // the mesh is full: wait for the three (the audit log is written blocking).
    let pod_watches = || {
        m.cluster
            .audited_watches(&user)
            .into_iter()
            .filter(|(resource, _)| resource == "pods")
            .collect::<Vec<_>>()
    };
    let opened = eventually("every sidecar to open its pod watch", MESH, || async {
        let watches = pod_watches();
        (watches.len() >= 3).then_some(watches)
    })
    .await;
    let watches = opened.unwrap_or_else(|_| pod_watches());
    assert!(
        watches.len() >= 3
            && watches
                .iter()
                .all(|(_, selector)| selector == "app.kubernetes.io/name=geth"),
        "every sidecar watches the pods POD_SELECTOR names: {watches:?}"
    );
    let before = pod_requests(&m).len();
    let passes = |i: usize| {
        let m = &m;
        async move {
            m.metric(i, "geth_peer_sidecar_reconciles_total")
                .await
                .unwrap_or(0.0)
        }
    };
    let mut start = Vec::new();
    for i in 0..3 {
        start.push(passes(i).await);
    }
    for (i, from) in start.iter().enumerate() {
        eventually(
            &format!("sidecar {i} to make 5 more passes"),
            MESH,
            || async { (passes(i).await >= from + 5.0).then_some(()) },
        )
        .await
        .unwrap();
    }
    let during = &pod_requests(&m)[before..];
    assert!(
        during.is_empty(),
        "15 passes at steady state sent pod requests: {during:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_reaches_the_apiserver_but_no_peer_never_removes_the_majority() {
    let env = [
        ("DEAD_AFTER", "4s"),
        ("PROBE_INTERVAL", "1s"),
        ("REGISTRATION_GRACE", "1s"),
    ];
    let m = Mesh::start("p2p-partition", 4, &env).await.unwrap();
    m.wait_full_mesh(&all(4), MESH).await.unwrap();
    m.wait_registered(&all(4), MESH).await.unwrap();
    let others: Vec<_> = (0..3).map(|i| m.net.node(i).ip()).collect();
    let lonely = m.net.node(3).netns();
    lonely.isolate_from(&others).unwrap();
    // Node 3 sees every other member unreachable for far longer than DEAD_AFTER
    // and can still write to the registry: the partition guard must stop it.
    eventually("node 3 to suspect a partition", MESH, || async {
        (m.metric(3, "geth_peer_sidecar_suspected_partition").await == Some(1.0)).then_some(())
    })
    .await
    .unwrap();
    let until = tokio::time::Instant::now() + Duration::from_secs(15);
    while tokio::time::Instant::now() < until {
        let pods = m.registered_pods().await;
        for i in 0..3 {
            assert!(
                pods.contains(&format!("geth-{i}")),
                "healthy member geth-{i} removed: {pods:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    lonely.rejoin(&others).unwrap();
    m.wait_registered(&all(4), MESH).await.unwrap();
    m.wait_full_mesh(&all(4), Duration::from_secs(90))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_on_the_pods_say_who_registered_and_left_and_the_role_allows_them() {
    use k8s_openapi::api::events::v1::Event;
    let mut m = Mesh::start("events", 2, &[]).await.unwrap();
    m.wait_registered(&all(2), MESH).await.unwrap();
    let sc = m.take_sidecar(1).unwrap();
    assert_eq!(sc.terminate().await, Some(0));
    let events: Api<Event> = Api::namespaced(m.cluster.admin(), &m.ns.name);
    let seen = |list: &[Event], reason: &str, pod: &str| {
        list.iter().any(|e| {
            e.reason.as_deref() == Some(reason)
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(pod)
                && e.regarding.as_ref().and_then(|r| r.kind.as_deref()) == Some("Pod")
                && e.reporting_controller.as_deref() == Some("geth-peer-sidecar")
        })
    };
    let list = eventually("the Events to be published", MESH, || async {
        let list = events.list(&Default::default()).await.ok()?.items;
        (seen(&list, "Registered", "geth-0")
            && seen(&list, "Registered", "geth-1")
            && seen(&list, "Deregistered", "geth-1"))
        .then_some(list)
    })
    .await
    .unwrap();
    let note = list
        .iter()
        .find(|e| e.reason.as_deref() == Some("Registered"))
        .and_then(|e| e.note.clone())
        .unwrap_or_default();
    assert!(note.contains("enode://"), "{note}");
    // deploy/base/rbac.yaml grants exactly what this needs: nothing was refused.
    let user = m.ns.service_account_user();
    let audit = m.cluster.audit_events(&user);
    assert!(
        audit
            .iter()
            .any(|e| e["objectRef"]["resource"] == "events" && e["verb"] == "create"),
        "no Event was created by the sidecars' account"
    );
    let refused: Vec<String> = audit
        .iter()
        .filter(|e| e["responseStatus"]["code"] == 403)
        .map(|e| format!("{} {}", e["verb"], e["requestURI"]))
        .collect();
    assert!(refused.is_empty(), "requests refused: {refused:?}");
}
