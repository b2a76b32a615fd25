//! What operators read: `status -o json` from outside the pod, the `/status`
//! endpoint, and a `/healthz` that fails while the event loop is stuck.

use std::collections::BTreeSet;
use std::time::Duration;

use integration_tests::{Mesh, eventually, sidecar_bin};
use serde_json::Value;

const MESH: Duration = Duration::from_secs(60);

async fn status_json(m: &Mesh, i: usize) -> Option<Value> {
    let (code, body) = m.sidecars[i].as_ref()?.get("/status").await.ok()?;
    assert_eq!(code, 200, "/status: {body}");
    Some(
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("/status is not JSON ({e}): {body}")),
    )
}

fn strings(v: &Value, pointer: &str, field: &str) -> BTreeSet<String> {
    v.pointer(pointer)
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("{pointer} is not a list in {v:#}"))
        .iter()
        .map(|m| m[field].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_from_outside_the_pod_and_the_status_endpoint_match_geths_peers() {
    let m = Mesh::start("status-json", 3, &[]).await.unwrap();
    m.wait_full_mesh(&[0, 1, 2], MESH).await.unwrap();
    m.wait_registered(&[0, 1, 2], MESH).await.unwrap();

    // From outside any pod: the root network namespace, no IPC socket, only the
    // service account's kubeconfig (read access to the one ConfigMap).
    let out = std::process::Command::new(sidecar_bin())
        .args(["status", "-o", "json", "--kubeconfig"])
        .arg(&m.ns.kubeconfig)
        .args(["--namespace", &m.ns.name])
        .env("IPC_PATH", m.ctx.path("no-geth-here.ipc"))
        .env_remove("KUBECONFIG")
        .env_remove("NAMESPACE")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let registry: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("status -o json is not JSON ({e}):\n{stdout}"));
    assert_eq!(registry["exists"], true, "{registry:#}");
    let members = registry["members"].as_array().unwrap();
    assert_eq!(members.len(), 3, "{registry:#}");
    for i in 0..3 {
        let node = m.net.node(i);
        let row = members
            .iter()
            .find(|r| r["pod"] == node.name())
            .unwrap_or_else(|| panic!("{} missing: {registry:#}", node.name()));
        assert_eq!(row["nodeId"].as_str(), Some(node.node_id().as_str()));
        assert!(
            row["enode"]
                .as_str()
                .unwrap()
                .contains(&format!("@{}:", node.ip())),
            "{row}"
        );
        // geth could not be asked from out here: unknown, not "no".
        assert!(row["connected"].is_null(), "{row}");
    }

    // The running sidecar's /status says what geth itself says (admin_peers).
    let geth_peers: BTreeSet<String> = m
        .net
        .node(0)
        .peer_ids()
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(geth_peers.len(), 2);
    let status = eventually(
        "sidecar 0's /status to report both peers connected",
        MESH,
        || async {
            let s = status_json(&m, 0).await?;
            (s.pointer("/report/connected") == Some(&Value::from(2))).then_some(s)
        },
    )
    .await
    .unwrap();
    assert_eq!(status["pod"], "geth-0", "{status:#}");
    assert_eq!(status["gethIpcOk"], true);
    assert_eq!(status["registrySynced"], true);
    assert!(status["lastPass"]["completedAt"].is_string(), "{status:#}");
    assert_eq!(status.pointer("/report/desired"), Some(&Value::from(2)));
    assert_eq!(
        strings(&status, "/report/missing", "nodeId"),
        BTreeSet::new()
    );
    assert_eq!(status["problems"], Value::Array(vec![]), "{status:#}");
    let connected: BTreeSet<String> = status["registry"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["connected"] == true)
        .map(|r| r["nodeId"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(connected, geth_peers, "{status:#}");
    assert_eq!(
        strings(&status, "/registry/members", "pod"),
        ["geth-0", "geth-1", "geth-2"].map(String::from).into()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_fails_while_a_pass_hangs_on_a_frozen_geth_and_recovers_after() {
    // geth calls may take 10 minutes, so a frozen geth holds a pass (and the
    // loop) for that long; a pass is due every second.
    let env = [
        ("RPC_TIMEOUT", "600s"),
        ("RESYNC_INTERVAL", "1s"),
        ("LIVENESS_TIMEOUT", "3s"),
    ];
    let m = Mesh::start("liveness", 1, &env).await.unwrap();
    let sc = m.sidecars[0].as_ref().unwrap();
    eventually("a first completed pass", MESH, || async {
        let s = status_json(&m, 0).await?;
        s["lastPass"]["completedAt"].is_string().then_some(())
    })
    .await
    .unwrap();
    assert_eq!(sc.get("/healthz").await.unwrap().0, 200);

    m.net.node(0).freeze();
    let body = eventually("/healthz to fail while geth is frozen", MESH, || async {
        let (code, body) = sc.get("/healthz").await.ok()?;
        (code == 503).then_some(body)
    })
    .await;
    m.net.node(0).resume();
    let body = body.unwrap();
    assert!(body.contains("no pass completed"), "{body}");

    eventually("/healthz to pass again once geth answers", MESH, || async {
        let (code, _) = sc.get("/healthz").await.ok()?;
        (code == 200).then_some(())
    })
    .await
    .unwrap();
}
