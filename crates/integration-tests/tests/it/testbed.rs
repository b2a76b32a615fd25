//! The test bed itself is real: a pinned apiserver with RBAC, the project's own
//! least-privilege Role, and geth nodes that peer over real sockets.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use integration_tests::{
    Bridge, Cluster, GethNet, Netns, TestContext, eventually, ipc_call, list_netns, testbed,
};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

#[tokio::test]
async fn apiserver_reports_the_pinned_version() {
    let ctx = TestContext::new("apiserver_version");
    let cluster = Cluster::start(&ctx, "127.0.0.1".parse().unwrap())
        .await
        .unwrap();
    let info = cluster.admin().apiserver_version().await.unwrap();
    assert_eq!(info.git_version, testbed().kubernetes_version);
}

fn cm(name: &str) -> ConfigMap {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "data": {"static-nodes.json": "[]"}
    }))
    .unwrap()
}

fn status_code(err: &kube::Error) -> Option<u16> {
    match err {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

#[tokio::test]
async fn service_account_may_manage_only_its_configmap_in_its_namespace() {
    let ctx = TestContext::new("rbac");
    let cluster = Cluster::start(&ctx, "127.0.0.1".parse().unwrap())
        .await
        .unwrap();
    let ns = cluster.namespace("rbac").await.unwrap();
    let other = cluster.namespace("other").await.unwrap();
    let name = "geth-shared-static-nodes";
    let cms: Api<ConfigMap> = Api::namespaced(ns.client.clone(), &ns.name);

    // Allowed: create, get, patch, replace the registry ConfigMap.
    cms.create(&PostParams::default(), &cm(name)).await.unwrap();
    let got = cms.get(name).await.unwrap();
    assert_eq!(got.data.unwrap()["static-nodes.json"], "[]");
    let patch = json!({"data": {"static-nodes.json": "[\"x\"]"}});
    cms.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let mut fresh = cms.get(name).await.unwrap();
    fresh.data.as_mut().unwrap().insert("k".into(), "v".into());
    cms.replace(name, &PostParams::default(), &fresh)
        .await
        .unwrap();

    // Denied: delete, other ConfigMaps' contents, secrets, other namespaces.
    let err = cms
        .delete(name, &DeleteParams::default())
        .await
        .unwrap_err();
    assert_eq!(status_code(&err), Some(403), "delete: {err}");
    cluster_admin_creates(&cluster, &ns.name, "unrelated").await;
    let err = cms.get("unrelated").await.unwrap_err();
    assert_eq!(status_code(&err), Some(403), "get other cm: {err}");
    let err = cms.list(&Default::default()).await.unwrap_err();
    assert_eq!(
        status_code(&err),
        Some(403),
        "list without name selector: {err}"
    );
    let secrets: Api<Secret> = Api::namespaced(ns.client.clone(), &ns.name);
    let err = secrets.list(&Default::default()).await.unwrap_err();
    assert_eq!(status_code(&err), Some(403), "secrets: {err}");
    let elsewhere: Api<ConfigMap> = Api::namespaced(ns.client.clone(), &other.name);
    let err = elsewhere
        .create(&PostParams::default(), &cm(name))
        .await
        .unwrap_err();
    assert_eq!(status_code(&err), Some(403), "other namespace: {err}");
}

async fn cluster_admin_creates(cluster: &Cluster, ns: &str, name: &str) {
    Api::<ConfigMap>::namespaced(cluster.admin(), ns)
        .create(&PostParams::default(), &cm(name))
        .await
        .unwrap();
}

#[tokio::test]
async fn two_geth_nodes_peer_over_real_sockets_after_add_peer() {
    let ctx = TestContext::new("geth_pair");
    let bridge = Arc::new(Bridge::create().unwrap());
    let net = GethNet::start(&ctx, bridge, 2).await.unwrap();
    let (a, b) = (net.node(0), net.node(1));
    assert!(a.enode().contains(&a.ip().to_string()), "{}", a.enode());
    let added = ipc_call(a.ipc_path(), "admin_addPeer", json!([b.enode()]))
        .await
        .unwrap();
    assert_eq!(added, json!(true));
    for (me, them) in [(a, b), (b, a)] {
        eventually(
            &format!("{} to list {} in admin_peers", me.name(), them.name()),
            Duration::from_secs(30),
            || async {
                me.peer_ids()
                    .await
                    .ok()
                    .filter(|p| p.contains(&them.node_id()))
            },
        )
        .await
        .unwrap();
    }
}

/// Run only by `a_failed_test_leaves_no_process_or_namespace_behind`: starts a
/// cluster and two nodes, records what it started, then fails.
#[tokio::test]
#[ignore = "helper: run by a_failed_test_leaves_no_process_or_namespace_behind"]
async fn cleanup_probe_fails_on_purpose() {
    let record = std::env::var("GPS_CLEANUP_PROBE_RECORD").expect("run by the cleanup test");
    let ctx = TestContext::new("cleanup_probe");
    let bridge = Arc::new(Bridge::create().unwrap());
    let _cluster = Cluster::start(&ctx, bridge.host_ip()).await.unwrap();
    let net = GethNet::start(&ctx, bridge.clone(), 2).await.unwrap();
    let names: Vec<String> = net
        .nodes()
        .iter()
        .map(|n| n.netns().name().to_owned())
        .collect();
    let record_text = format!(
        "{}\n{}\n{}",
        ctx.dir().display(),
        bridge.name(),
        names.join("\n")
    );
    std::fs::write(record, record_text).unwrap();
    panic!("failing on purpose to prove cleanup");
}

/// Fails if any running process mentions `dir` in its command line (every child
/// a fixture starts has its datadir, log or socket under the test directory).
fn assert_no_process_refers_to(dir: &str) {
    let leftovers = integration_tests::processes_referring_to(dir);
    assert!(leftovers.is_empty(), "processes left behind: {leftovers:?}");
}

#[test]
fn a_failed_test_leaves_no_process_or_namespace_behind() {
    let record = tempfile::NamedTempFile::new().unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "testbed::cleanup_probe_fails_on_purpose",
            "--nocapture",
        ])
        .env("GPS_CLEANUP_PROBE_RECORD", record.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the probe must fail");
    assert!(
        stderr.contains("failing on purpose"),
        "probe failed for another reason: {stderr}"
    );
    // The failure printed the children's logs.
    assert!(
        stderr.contains("geth-0.1.log"),
        "logs not printed: {stderr}"
    );
    let text = std::fs::read_to_string(record.path()).unwrap();
    let mut lines = text.lines();
    let dir = lines.next().unwrap().to_owned();
    let bridge = lines.next().unwrap().to_owned();
    let namespaces: Vec<String> = lines.map(str::to_owned).collect();
    assert_eq!(namespaces.len(), 2);
    let live = list_netns();
    for ns in &namespaces {
        assert!(!live.contains(ns), "namespace {ns} left behind");
    }
    let links = std::process::Command::new("ip")
        .args(["-o", "link"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&links.stdout).contains(&format!("{bridge}:")),
        "bridge {bridge} left behind"
    );
    // No process still refers to the probe's directory (geth, etcd, apiserver).
    assert_no_process_refers_to(&dir);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_netns_demo_reaches_a_full_mesh_and_tears_everything_down() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_demo"))
        .args(["--netns", "--nodes", "3", "--once"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("full mesh: every node is connected to every other"),
        "{stdout}"
    );
    assert!(stdout.matches("(all)").count() >= 3, "{stdout}");
    // Nothing the demo started still runs (its children all live under its dir).
    let dir = stdout
        .lines()
        .find_map(|l| l.strip_prefix("logs: "))
        .expect("the demo prints its log directory")
        .to_owned();
    assert_no_process_refers_to(&dir);
}

/// The permanent neighbour entries of `ns`: (address, MAC).
fn permanent_neighbours(ns: &Netns) -> BTreeSet<(String, String)> {
    let out = std::process::Command::new("ip")
        .args(["-n", ns.name(), "neigh", "show", "nud", "permanent"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let mac = f.iter().position(|w| *w == "lladdr").map(|i| f[i + 1])?;
            Some((f[0].to_owned(), mac.to_owned()))
        })
        .collect()
}

/// The MAC address of `ns`'s `eth0`.
fn own_mac(ns: &Netns) -> String {
    let out = std::process::Command::new("ip")
        .args(["-n", ns.name(), "-o", "link", "show", "eth0"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let words: Vec<&str> = text.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "link/ether").unwrap();
    words[at + 1].to_owned()
}

/// The namespaces of a bridge resolve each other by permanent entries, kept
/// when one moves (the machine-wide ARP table overflowed at 30 namespaces
/// without them, and a move flushed the mover's own).
#[test]
fn bridge_namespaces_know_each_other_as_permanent_neighbours_across_a_move() {
    let bridge = Bridge::create().unwrap();
    let nodes: Vec<Netns> = (0..3)
        .map(|i| bridge.netns(&format!("nb{i}"), bridge.ip(10 + i)).unwrap())
        .collect();
    nodes[1].set_ip(bridge.ip(20)).unwrap();
    let ips: Vec<String> = nodes.iter().map(|n| n.ip().to_string()).collect();
    assert_eq!(ips[1], bridge.ip(20).to_string());
    let macs: Vec<String> = nodes.iter().map(own_mac).collect();
    for (i, node) in nodes.iter().enumerate() {
        let want: BTreeSet<(String, String)> = (0..3)
            .filter(|&j| j != i)
            .map(|j| (ips[j].clone(), macs[j].clone()))
            .collect();
        assert_eq!(
            permanent_neighbours(node),
            want,
            "{}: every other namespace at its current address, none at an old one",
            node.name()
        );
    }
}
