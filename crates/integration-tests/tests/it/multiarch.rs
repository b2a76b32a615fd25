//! The image's second architecture is proven, not assumed: the static arm64
//! binary (built by `scripts/lint-image.sh`, as the Dockerfile builds it for
//! linux/arm64) runs under qemu-user and reads the test bed's registry and a real
//! geth's peers.

use std::path::PathBuf;
use std::time::Duration;

use integration_tests::Mesh;
use serde_json::Value;

/// `GPS_SIDECAR_ARM64_BIN`, else where scripts/lint-image.sh builds it.
fn arm64_bin() -> PathBuf {
    let path = std::env::var_os("GPS_SIDECAR_ARM64_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            integration_tests::target_dir()
                .join("static/aarch64-unknown-linux-gnu/release/geth-peer-sidecar")
        });
    assert!(
        path.is_file(),
        "{} is missing: build it with `scripts/lint-image.sh` (scripts/build-static.sh arm64); \
         scripts/test.sh does. This test fails without it, it never skips.",
        path.display()
    );
    path
}

fn qemu() -> &'static str {
    let ok = std::process::Command::new("qemu-aarch64-static")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "qemu-aarch64-static is missing: apt-get install qemu-user-static (scripts/system-deps.sh does)"
    );
    "qemu-aarch64-static"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arm64_binary_under_qemu_reads_the_registry_and_geths_peers() {
    let bin = arm64_bin();
    let qemu = qemu();
    let m = Mesh::start("arm64", 2, &[]).await.unwrap();
    m.wait_full_mesh(&[0, 1], Duration::from_secs(60))
        .await
        .unwrap();
    m.wait_registered(&[0, 1], Duration::from_secs(60))
        .await
        .unwrap();

    // Inside node 0's "pod": its network namespace and geth's IPC socket.
    let out = m
        .status_in_pod(0, Some(qemu), &bin, &["-o", "json"])
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "arm64 status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let registry: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("arm64 status -o json is not JSON ({e}):\n{stdout}"));
    let members = registry["members"].as_array().unwrap();
    assert_eq!(members.len(), 2, "{registry:#}");
    // geth's own view of node 0's peers, against what the arm64 binary read
    // over the IPC socket.
    let peers = m.net.node(0).peer_ids().await.unwrap();
    for i in 0..2 {
        let id = m.net.node(i).node_id();
        let row = members
            .iter()
            .find(|r| r["nodeId"] == id.as_str())
            .unwrap_or_else(|| panic!("node {i} missing: {registry:#}"));
        assert_eq!(
            row["connected"].as_bool(),
            Some(peers.contains(&id)),
            "{row}"
        );
    }
    assert_eq!(peers, [m.net.node(1).node_id()]);
}
