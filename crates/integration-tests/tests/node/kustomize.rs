//! The kustomize manifests (deploy/), unchanged, on the real node.

use std::sync::Arc;
use std::time::Duration;

use integration_tests::{KubeNode, Release, eventually, workspace_root};

use crate::Shared;
use crate::chart::{CONFIGMAP, MESH_TIMEOUT};

/// `kubectl apply -k` of `dir` (deploy/base or an overlay) into a fresh
/// namespace, through a one-line overlay that only sets the namespace. (A
/// kustomization may not name an absolute path: the manifests are copied,
/// unchanged, next to the overlay.)
async fn apply<'a>(node: &'a KubeNode, hint: &str, dir: &str) -> Release<'a> {
    let ns = node.namespace(hint, "geth", 3).await.unwrap();
    let work = node.dir().join("kustomize").join(&ns);
    let overlay = work.join("overlay");
    std::fs::create_dir_all(&overlay).unwrap();
    let copy = std::process::Command::new("cp")
        .arg("-r")
        .arg(workspace_root().join("deploy"))
        .arg(work.join("deploy"))
        .status()
        .unwrap();
    assert!(copy.success(), "copy deploy/");
    std::fs::write(
        overlay.join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: {ns}\nresources:\n  - ../{dir}\n"
        ),
    )
    .unwrap();
    node.kubectl(&["apply", "-k", &overlay.to_string_lossy()])
        .unwrap();
    Release::new(node, &ns, "geth", CONFIGMAP)
}

fn sidecar_env(release: &Release<'_>, pod: &str, name: &str) -> Option<String> {
    let json = release
        .kubectl(&[
            "get",
            "pod",
            pod,
            "-o",
            &format!(
                "jsonpath={{.spec.containers[?(@.name==\"geth-peer-sidecar\")].env[?(@.name==\"{name}\")].value}}"
            ),
        ])
        .ok()?;
    (!json.is_empty()).then_some(json)
}

fn pod_requests(release: &Release<'_>) -> usize {
    let user = format!("system:serviceaccount:{}:geth-peer-sidecar", release.ns);
    release
        .node()
        .control_plane()
        .audited_requests(&user)
        .iter()
        .filter(|(_, resource, _)| resource == "pods")
        .count()
}

pub async fn base_forms_a_full_mesh_and_the_pod_evidence_overlay_turns_pod_evidence_on(
    shared: Arc<Shared>,
) {
    let node = shared.node().await;
    let base = apply(&node, "kustomize-base", "deploy/base").await;
    let (pods, took) = base.wait_full_mesh(3, MESH_TIMEOUT).await.unwrap();
    eprintln!(
        "[kustomize] base: full mesh of 3 in {:.1} s",
        took.as_secs_f64()
    );
    assert_eq!(sidecar_env(&base, &pods[0].name, "READ_PODS"), None);
    assert_eq!(pod_requests(&base), 0, "the base does not read pods");
    // Done with the base: its pods' CPU requests (the manifests' own, 260m a
    // pod) go before the overlay's are scheduled on the 2-core node, next to
    // every earlier release of the suite.
    base.kubectl(&[
        "delete",
        "statefulset",
        &base.statefulset,
        "--cascade=foreground",
        "--wait=true",
        "--timeout=180s",
    ])
    .unwrap();

    let overlay = apply(&node, "kustomize-evidence", "deploy/overlays/pod-evidence").await;
    let (pods, _) = overlay.wait_full_mesh(3, MESH_TIMEOUT).await.unwrap();
    assert_eq!(
        sidecar_env(&overlay, &pods[0].name, "READ_PODS").as_deref(),
        Some("true"),
        "the overlay turns READ_PODS on"
    );
    // The pod watcher lists pods beside the registration, not before it: the
    // LIST may complete after the mesh is full.
    eventually(
        "with the overlay the sidecars read pods (audit log)",
        Duration::from_secs(30),
        || async { (pod_requests(&overlay) > 0).then_some(()) },
    )
    .await
    .unwrap();
    // The overlay brings the admission policy: the sidecars' own writes (the
    // ConfigMap layout) met no refusal.
    let user = format!("system:serviceaccount:{}:geth-peer-sidecar", overlay.ns);
    let refused = crate::trust::refused_requests(overlay.node(), &user);
    assert!(
        refused.is_empty(),
        "the sidecars' own requests were refused: {refused:?}"
    );
}
