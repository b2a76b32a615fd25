//! The runtime as a library, in-process, on the real parts: each geth a real
//! node in its network namespace, the registry the real apiserver's
//! ConfigMap (with the service account's RBAC), no binary spawned. This is
//! the path another Rust tool takes when it embeds `sidecar-runtime`.

use std::sync::Arc;
use std::time::Duration;

use geth_ipc::{ClientOptions, Endpoint, GethClient};
use integration_tests::Mesh;
use peer_registry::ConfigMapRegistry;
use sidecar_runtime::{AdvertiseMode, Settings, Sidecar};

const MESH: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runtime_embedded_in_process_meshes_real_geth_through_the_real_apiserver() {
    let m = Mesh::without_sidecars("embedded", 3, &[]).await.unwrap();
    let mut stops = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..3 {
        let node = m.net.node(i);
        let endpoint: Endpoint = node.ipc_path().to_string_lossy().parse().unwrap();
        let geth = GethClient::new(endpoint, ClientOptions::default());
        let client = m.ns.new_client().await.unwrap();
        let registry = ConfigMapRegistry::new(
            client,
            m.ns.name.clone(),
            integration_tests::CONFIGMAP.to_owned(),
        );
        let ip = std::net::IpAddr::V4(node.ip());
        let mut settings = Settings::new(node.name(), AdvertiseMode::PodIp(ip));
        settings.pod_ip = Some(ip.to_string());
        let sidecar = Sidecar::new(Arc::new(geth), Arc::new(registry), settings);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        stops.push(stop);
        tasks.push(tokio::spawn(sidecar.run_until(async {
            let _ = stopped.await;
        })));
    }
    // geth's own view (admin_peers) and the apiserver's record.
    m.wait_full_mesh(&[0, 1, 2], MESH).await.unwrap();
    m.wait_registered(&[0, 1, 2], MESH).await.unwrap();
    let writes = m
        .cluster
        .audited_requests(&m.ns.service_account_user())
        .into_iter()
        .filter(|(verb, resource, _)| {
            matches!(verb.as_str(), "create" | "update" | "patch") && resource == "configmaps"
        })
        .count();
    assert!(
        writes >= 3,
        "each sidecar registered through the apiserver: {writes} writes"
    );
    for stop in stops {
        let _ = stop.send(());
    }
    for task in tasks {
        task.await.unwrap();
    }
    // Shut down, each deregistered itself.
    m.wait_registered(&[], MESH).await.unwrap();
}
