//! Chaos on the real node: the kubelet restarts under a running release.

use std::sync::Arc;
use std::time::{Duration, Instant};

use integration_tests::Release;

use crate::Shared;
use crate::chart::{MESH_TIMEOUT, RELEASE, install};

/// The chart's defaults (lease layout, pod evidence), three replicas. The
/// kubelet is stopped for 20 s and started again with the same configuration: the
/// pods run on (same UIDs, no container restarted), every geth is linked to
/// the same peers, no member is removed (the apiserver's audit log holds no
/// Lease delete by the sidecars, and every member keeps its record), the Node
/// is Ready again, and a pod deleted afterwards still heals into a full mesh.
pub async fn a_kubelet_restart_keeps_pods_links_and_members_and_a_pod_deletion_still_heals(
    shared: Arc<Shared>,
) {
    let mut node = shared.node().await;
    let (ns, statefulset, configmap, before, members, mesh) = {
        let release = install(&node, "chaos-kubelet", 3, &["--set", "replicas=3"]).await;
        let (pods, _) = release.wait_full_mesh(3, MESH_TIMEOUT).await.unwrap();
        let members = release.members().await.unwrap();
        let mesh = release.mesh(&pods).unwrap();
        (
            release.ns.clone(),
            release.statefulset.clone(),
            release.configmap.clone(),
            pods,
            members,
            mesh,
        )
    };
    let user = format!("system:serviceaccount:{ns}:{RELEASE}");
    let events_before = node.control_plane().audit_events(&user).len();

    let took = node.restart_kubelet(Duration::from_secs(20)).await.unwrap();
    let release = Release::new(&node, &ns, &statefulset, &configmap);
    let (after, _) = release.wait_full_mesh(3, MESH_TIMEOUT).await.unwrap();
    eprintln!(
        "[chaos] kubelet down 20 s; started to Ready with a new heartbeat: {:.1} s",
        took.as_secs_f64()
    );
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(
            (&b.name, &b.uid, b.ip, b.started_at),
            (&a.name, &a.uid, a.ip, a.started_at),
            "the pod ran on through the kubelet's restart (no container started anew)"
        );
    }
    assert_eq!(
        release.mesh(&after).unwrap(),
        mesh,
        "every geth linked to the same peers"
    );
    let members_after = release.members().await.unwrap();
    let uids = |m: &std::collections::BTreeMap<String, peer_registry::MemberRecord>| {
        m.iter()
            .map(|(k, r)| (k.clone(), r.pod_uid.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(uids(&members_after), uids(&members), "no member removed");
    let events = node.control_plane().audit_events(&user);
    let deletes: Vec<String> = events[events_before..]
        .iter()
        .filter(|e| e["verb"] == "delete" && e["objectRef"]["resource"] == "leases")
        .map(|e| e["objectRef"]["name"].to_string())
        .collect();
    assert!(deletes.is_empty(), "Leases deleted: {deletes:?}");

    // Kubernetes still heals the release: a deleted pod returns and re-peers.
    let victim = after[1].clone();
    let t0 = Instant::now();
    release
        .kubectl(&["delete", "pod", &victim.name, "--wait=true"])
        .unwrap();
    let (healed, _) = release.wait_full_mesh(3, MESH_TIMEOUT).await.unwrap();
    let back = healed.iter().find(|p| p.name == victim.name).unwrap();
    assert_ne!(back.uid, victim.uid, "a new pod replaced {}", victim.name);
    let record = &release.members().await.unwrap()[&victim.name];
    assert_eq!(record.pod_uid.as_deref(), Some(back.uid.as_str()));
    eprintln!(
        "[chaos] after the kubelet restart, a pod deleted to full mesh again: {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}
