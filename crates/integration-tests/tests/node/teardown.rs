//! The real node leaves nothing behind.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use integration_tests::{
    KubeNode, Release, TestContext, demo, eventually, list_netns, oci, processes_referring_to,
};

use crate::Shared;

/// Paths kubelet, containerd and libcni create whatever their configuration says.
const HOST_PATHS: [&str; 7] = [
    "/var/lib/kubelet",
    "/var/log/pods",
    "/var/log/containers",
    "/var/lib/cni",
    "/run/containerd",
    "/var/lib/containerd",
    "/etc/cni/net.d",
];

/// What of the host a node could leave behind, in a form to compare.
#[derive(Debug, PartialEq, Eq)]
struct HostState {
    paths: BTreeSet<String>,
    nft_tables: String,
}

impl HostState {
    fn capture() -> Self {
        let nft = std::process::Command::new("nft")
            .args(["list", "tables"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        HostState {
            paths: HOST_PATHS
                .iter()
                .filter(|p| std::path::Path::new(p).exists())
                .map(|p| (*p).to_owned())
                .collect(),
            nft_tables: nft,
        }
    }
}

/// What a torn-down node left: processes, cgroups, its network namespace,
/// links, mounts of its directory, processes naming its directory.
pub fn leftovers_of(node: &KubeNode) -> Vec<String> {
    let mut left: Vec<String> = node
        .processes()
        .into_iter()
        .map(|p| format!("process {p}"))
        .collect();
    left.extend(
        node.cgroups()
            .into_iter()
            .map(|c| format!("cgroup {}", c.display())),
    );
    if list_netns().iter().any(|n| n == node.netns()) {
        left.push(format!("netns {}", node.netns()));
    }
    let dir = node.dir().to_string_lossy().into_owned();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    left.extend(
        mountinfo
            .lines()
            .filter(|l| l.contains(&dir))
            .map(|l| format!("mount {l}")),
    );
    let links = std::process::Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    left.extend(
        links
            .lines()
            .filter(|l| node.link_names().iter().any(|n| l.contains(n.as_str())))
            .map(|l| format!("link {l}")),
    );
    left.extend(
        processes_referring_to(&dir)
            .into_iter()
            .map(|p| format!("process naming {dir}: {p}")),
    );
    left
}

pub async fn teardown_leaves_no_process_cgroup_netns_bridge_mount_or_host_path(_: Arc<Shared>) {
    let before = HostState::capture();
    let ctx = TestContext::new("node_teardown");
    let mut node = KubeNode::start(&ctx).await.unwrap();
    eprintln!(
        "[teardown] node ready after {:.1} s",
        node.ready_after().as_secs_f64()
    );
    // A running pod: a CNI veth and address, overlay and tmpfs mounts, a shim,
    // container cgroups.
    node.kubectl(&[
        "run",
        "probe",
        "--image",
        oci::GETH_IMAGE,
        "--restart=Never",
        "--command",
        "--",
        "sleep",
        "3600",
    ])
    .unwrap();
    let release = Release::new(&node, "default", "none", "none");
    eventually("the probe pod running", Duration::from_secs(60), || async {
        let out = release
            .kubectl(&["get", "pod", "probe", "-o", "jsonpath={.status.phase}"])
            .ok()?;
        (out == "Running").then_some(())
    })
    .await
    .unwrap();
    let running = node.processes();
    assert!(
        running.len() > 8,
        "expected the components, a shim and the pod's processes, found {running:?}"
    );
    assert!(
        !node.cgroups().is_empty(),
        "the pod runs in the node's cgroups"
    );
    node.teardown();
    let left = leftovers_of(&node);
    assert!(left.is_empty(), "the teardown left: {left:#?}");
    assert_eq!(
        HostState::capture(),
        before,
        "host paths or nftables tables changed"
    );
}

/// The demo binary as a user runs it: once its table shows the full mesh,
/// `q` ends it and it leaves nothing behind.
pub async fn the_real_node_demo_reaches_a_full_mesh_and_q_tears_everything_down(_: Arc<Shared>) {
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_demo"))
        .args(["--nodes", "3"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut printed = String::new();
    let mut table = String::new();
    let mut quit_sent = false;
    let read_all = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            printed += &line;
            printed.push('\n');
            if line.starts_with("POD ") {
                table.clear();
            } else if line.trim().is_empty() || line.starts_with('[') {
                continue;
            }
            table += &line;
            table.push('\n');
            if !quit_sent && demo::table_shows_full_mesh(&table, 3) {
                stdin.write_all(b"q\n").await.unwrap();
                quit_sent = true;
            }
        }
    };
    let finished = tokio::time::timeout(Duration::from_secs(600), read_all).await;
    assert!(finished.is_ok(), "the demo did not end: {printed}");
    let status = child.wait().await.unwrap();
    assert!(status.success(), "{printed}");
    assert!(
        quit_sent,
        "the demo never showed a full mesh of 3: {printed}"
    );
    assert!(
        printed.contains("done: every process stopped"),
        "q did not tear down: {printed}"
    );
    let dir = printed
        .lines()
        .find_map(|l| l.strip_prefix("logs: "))
        .expect("the demo prints its log directory")
        .to_owned();
    let left = processes_referring_to(&dir);
    assert!(left.is_empty(), "the demo left processes: {left:?}");
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mountinfo.contains(&dir), "the demo left mounts of {dir}");
}
