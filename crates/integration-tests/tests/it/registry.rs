//! The ConfigMap registry on a real apiserver, as the service account of
//! deploy/'s Role: concurrent writers never lose an entry, and anything a third
//! party does to the object is survived.

use std::collections::BTreeSet;
use std::time::Duration;

use futures::StreamExt;
use integration_tests::{Cluster, TestContext, TestNamespace, eventually, test_member};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::rbac::v1::Role;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use peer_registry::{
    ConfigMapRegistry, LeaseRegistry, MemberRecord, PeerRegistry, WriteProtocol, conformance,
};
use serde_json::json;

const NAME: &str = "geth-shared-static-nodes";

async fn registry(ns: &TestNamespace) -> ConfigMapRegistry {
    ConfigMapRegistry::new(ns.new_client().await.unwrap(), ns.name.clone(), NAME)
}

async fn start(name: &str) -> (TestContext, Cluster, TestNamespace) {
    let ctx = TestContext::new(name);
    let cluster = Cluster::start(&ctx, "127.0.0.1".parse().unwrap())
        .await
        .unwrap();
    let ns = cluster.namespace(name).await.unwrap();
    (ctx, cluster, ns)
}

/// Reads the watch until a snapshot satisfies `pred`, or fails after `timeout`.
async fn watch_until(
    watch: &mut futures::stream::BoxStream<'static, peer_registry::Result<peer_registry::Snapshot>>,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&peer_registry::Snapshot) -> bool,
) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, watch.next()).await {
            Err(_) => panic!("timed out after {timeout:?} waiting for the watch to show {what}"),
            Ok(None) => panic!("watch ended while waiting for {what}"),
            Ok(Some(Ok(s))) if pred(&s) => return,
            Ok(Some(_)) => {}
        }
    }
}

fn pods(s: &peer_registry::Snapshot) -> BTreeSet<String> {
    s.members.keys().cloned().collect()
}

async fn raw_data(cluster: &Cluster, ns: &str) -> std::collections::BTreeMap<String, String> {
    Api::<ConfigMap>::namespaced(cluster.admin(), ns)
        .get(NAME)
        .await
        .unwrap()
        .data
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_simultaneous_registrants_are_all_present_in_twenty_rounds() {
    let (_ctx, cluster, ns) = start("twenty").await;
    let admin: Api<ConfigMap> = Api::namespaced(cluster.admin(), &ns.name);
    let mut registries = Vec::new();
    for _ in 0..20 {
        registries.push(registry(&ns).await);
    }
    for round in 0..20u32 {
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(20));
        let tasks = registries.iter().enumerate().map(|(i, reg)| {
            let barrier = barrier.clone();
            let rec = test_member(&format!("geth-{i}"), round * 100 + i as u32);
            async move {
                barrier.wait().await;
                reg.upsert(rec).await
            }
        });
        for r in futures::future::join_all(tasks).await {
            r.unwrap();
        }
        let snap = registries[0].snapshot().await.unwrap();
        assert_eq!(
            snap.members.len(),
            20,
            "round {round}: lost entries: {:?}",
            pods(&snap)
        );
        let static_nodes: Vec<String> =
            serde_json::from_str(&raw_data(&cluster, &ns.name).await["static-nodes.json"]).unwrap();
        assert_eq!(
            static_nodes.len(),
            20,
            "round {round}: static-nodes.json out of step"
        );
        admin.delete(NAME, &DeleteParams::default()).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_racing_removals_end_in_exactly_the_expected_set() {
    let (_ctx, _cluster, ns) = start("racing").await;
    let reg = registry(&ns).await;
    let old: Vec<_> = (0..10)
        .map(|i| test_member(&format!("old-{i}"), i))
        .collect();
    for m in &old {
        reg.upsert(m.clone()).await.unwrap();
    }
    let mut tasks = Vec::new();
    for m in old.iter().take(5).cloned() {
        let r = registry(&ns).await;
        tasks.push(tokio::spawn(
            async move { r.remove(vec![m]).await.map(|_| ()) },
        ));
    }
    for i in 0..10u32 {
        let r = registry(&ns).await;
        let m = test_member(&format!("new-{i}"), 100 + i);
        tasks.push(tokio::spawn(async move { r.upsert(m).await.map(|_| ()) }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let got = pods(&reg.snapshot().await.unwrap());
    let want: BTreeSet<String> = (5..10)
        .map(|i| format!("old-{i}"))
        .chain((0..10).map(|i| format!("new-{i}")))
        .collect();
    assert_eq!(got, want);
}

#[tokio::test]
async fn a_removal_does_not_delete_a_member_that_re_registered_meanwhile() {
    let (_ctx, _cluster, ns) = start("stale-remove").await;
    let reg = registry(&ns).await;
    let before = test_member("geth-0", 1);
    reg.upsert(before.clone()).await.unwrap();
    let mut moved = test_member("geth-0", 1);
    moved.enode = moved.enode.with_host("198.19.9.9".parse().unwrap());
    moved.pod_ip = Some("198.19.9.9".into());
    reg.upsert(moved.clone()).await.unwrap();
    let snap = reg.remove(vec![before]).await.unwrap();
    let kept = snap
        .members
        .get("geth-0")
        .expect("the re-registered member is kept");
    assert!(kept.same_registration(&moved), "{kept:?}");
}

#[tokio::test]
async fn a_deleted_configmap_is_recreated_and_the_watch_follows() {
    let (_ctx, cluster, ns) = start("deleted").await;
    let reg = registry(&ns).await;
    let mut watch = reg.watch();
    reg.upsert(test_member("geth-0", 0)).await.unwrap();
    watch_until(
        &mut watch,
        "watch to show geth-0",
        Duration::from_secs(20),
        |s| s.members.contains_key("geth-0"),
    )
    .await;
    Api::<ConfigMap>::namespaced(cluster.admin(), &ns.name)
        .delete(NAME, &DeleteParams::default())
        .await
        .unwrap();
    watch_until(
        &mut watch,
        "watch to report the deletion",
        Duration::from_secs(20),
        |s| !s.exists(),
    )
    .await;
    reg.upsert(test_member("geth-1", 1)).await.unwrap();
    watch_until(
        &mut watch,
        "watch to show the recreated object",
        Duration::from_secs(20),
        |s| s.members.contains_key("geth-1"),
    )
    .await;
}

#[tokio::test]
async fn garbage_written_by_a_third_party_is_survived_and_unknown_keys_kept() {
    let (_ctx, cluster, ns) = start("garbage").await;
    let reg = registry(&ns).await;
    reg.upsert(test_member("geth-0", 0)).await.unwrap();
    let patch = json!({"data": {
        "static-nodes.json": "{{{ not json",
        "member.broken": "not a record",
        "member.geth-0": "{\"pod\": 42}",
        "operator-note": "keep me",
    }});
    Api::<ConfigMap>::namespaced(cluster.admin(), &ns.name)
        .patch(NAME, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let snap = reg.snapshot().await.unwrap();
    assert!(snap.members.is_empty(), "malformed records must be skipped");
    assert!(
        snap.problems.iter().any(|p| p.contains("member.broken")),
        "problems must name the key: {:?}",
        snap.problems
    );
    // The next write heals the member and the derived key, and keeps the rest.
    reg.upsert(test_member("geth-0", 0)).await.unwrap();
    let data = raw_data(&cluster, &ns.name).await;
    let list: Vec<String> = serde_json::from_str(&data["static-nodes.json"]).unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(data["operator-note"], "keep me");
    assert!(
        data.contains_key("member.broken"),
        "unknown malformed records are not deleted"
    );
}

#[tokio::test]
async fn a_configmap_near_the_size_limit_gives_a_clear_error_not_a_panic() {
    let (_ctx, cluster, ns) = start("size").await;
    let reg = registry(&ns).await;
    reg.upsert(test_member("geth-0", 0)).await.unwrap();
    let filler = "x".repeat(950 * 1024);
    let patch = json!({"data": {"operator-filler": filler}});
    Api::<ConfigMap>::namespaced(cluster.admin(), &ns.name)
        .patch(NAME, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let err = reg.upsert(test_member("geth-1", 1)).await.unwrap_err();
    assert!(
        err.to_string().to_lowercase().contains("size") || err.to_string().contains("KiB"),
        "{err}"
    );
    // Nothing that was there is lost.
    let snap = reg.snapshot().await.unwrap();
    assert!(snap.members.contains_key("geth-0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_resumes_and_writes_succeed_after_the_apiserver_was_down_30s() {
    let (_ctx, mut cluster, ns) = start("outage").await;
    let reg = registry(&ns).await;
    let mut watch = reg.watch();
    reg.upsert(test_member("geth-0", 0)).await.unwrap();
    cluster.stop_apiserver().await;
    assert!(
        reg.upsert(test_member("geth-1", 1)).await.is_err(),
        "apiserver is down"
    );
    // The outage itself is the scenario, not a synchronisation.
    tokio::time::sleep(Duration::from_secs(30)).await;
    cluster.start_apiserver().await.unwrap();
    eventually(
        "a write after the outage",
        Duration::from_secs(30),
        || async { reg.upsert(test_member("geth-1", 1)).await.ok() },
    )
    .await
    .unwrap();
    watch_until(
        &mut watch,
        "the watch to resume",
        Duration::from_secs(60),
        |s| s.members.contains_key("geth-1"),
    )
    .await;
}

#[tokio::test]
async fn without_create_permission_a_missing_configmap_is_a_clear_error() {
    let (_ctx, cluster, ns) = start("no-create").await;
    let roles: Api<Role> = Api::namespaced(cluster.admin(), &ns.name);
    let patch = json!({"rules": [{
        "apiGroups": [""], "resources": ["configmaps"],
        "resourceNames": [NAME], "verbs": ["get", "list", "watch", "update", "patch"]
    }]});
    roles
        .patch(
            "geth-peer-sidecar",
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .unwrap();
    let reg = registry(&ns).await;
    let err = eventually(
        "the narrowed Role to be in force",
        Duration::from_secs(15),
        || async { reg.upsert(test_member("geth-0", 0)).await.err() },
    )
    .await
    .unwrap();
    let msg = err.to_string();
    assert!(msg.contains("create"), "{msg}");
    assert!(msg.contains("configmaps"), "{msg}");
    assert_eq!(err.kind(), "forbidden");
    // The Role in deploy/ is sufficient: an admin-created object can then be used.
    Api::<ConfigMap>::namespaced(cluster.admin(), &ns.name)
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": NAME}})).unwrap(),
        )
        .await
        .unwrap();
    reg.upsert(test_member("geth-0", 0)).await.unwrap();
}

/// A third party's edit of the registry ConfigMap's data, as the admin
/// (creating the object if missing).
async fn edit_as_admin(admin: &Api<ConfigMap>, f: conformance::DataEdit) -> Result<(), String> {
    let current = admin.get_opt(NAME).await.map_err(|e| e.to_string())?;
    let mut cm = current.clone().unwrap_or_else(|| ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some(NAME.into()),
            ..Default::default()
        },
        ..Default::default()
    });
    f(cm.data.get_or_insert_with(Default::default));
    let pp = PostParams::default();
    let done = match current {
        Some(_) => admin.replace(NAME, &pp, &cm).await,
        None => admin.create(&pp, &cm).await,
    };
    done.map(|_| ()).map_err(|e| e.to_string())
}

/// A third party's deletion of the registry ConfigMap, as the admin.
async fn delete_as_admin(admin: &Api<ConfigMap>) -> Result<(), String> {
    admin
        .delete(NAME, &DeleteParams::default())
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// peer-registry's conformance suite on the real apiserver: a fresh namespace
/// (and ConfigMap) per check, sidecar clients with deploy/'s Role, third-party
/// edits as the admin; sidecar clients write with `protocol`.
struct ApiserverHarness {
    client: kube::Client,
    admin: Api<ConfigMap>,
    namespace: String,
    protocol: WriteProtocol,
}

impl ApiserverHarness {
    async fn new(cluster: &Cluster, hint: &str, protocol: WriteProtocol) -> Result<Self, String> {
        let ns = cluster.namespace(hint).await.map_err(|e| e.to_string())?;
        Ok(Self {
            client: ns.new_client().await.map_err(|e| e.to_string())?,
            admin: Api::namespaced(cluster.admin(), &ns.name),
            namespace: ns.name.clone(),
            protocol,
        })
    }
}

#[async_trait::async_trait]
impl conformance::Harness for ApiserverHarness {
    fn client(&self) -> std::sync::Arc<dyn PeerRegistry> {
        std::sync::Arc::new(
            ConfigMapRegistry::new(self.client.clone(), self.namespace.clone(), NAME)
                .with_write_protocol(self.protocol),
        )
    }

    async fn edit(&self, f: conformance::DataEdit) -> Result<(), String> {
        edit_as_admin(&self.admin, f).await
    }

    async fn data(&self) -> Result<std::collections::BTreeMap<String, String>, String> {
        let cm = self.admin.get_opt(NAME).await.map_err(|e| e.to_string())?;
        Ok(cm.and_then(|c| c.data).unwrap_or_default())
    }

    async fn delete(&self) -> Result<(), String> {
        delete_as_admin(&self.admin).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite_passes_on_the_real_apiserver() {
    let (_ctx, cluster, _ns) = start("conformance").await;
    let n = std::sync::atomic::AtomicU32::new(0);
    for protocol in [WriteProtocol::KeyPatch, WriteProtocol::WholeObjectCas] {
        conformance::run_all(|| {
            let i = n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let cluster = &cluster;
            async move {
                ApiserverHarness::new(cluster, &format!("conformance-{i}"), protocol).await
            }
        })
        .await
        .unwrap_or_else(|e| panic!("{protocol:?}: {e}"));
    }
}

/// The conformance suite on the lease layout: sidecar clients are
/// `LeaseRegistry`s (deploy/overlays/leases' Role); one more, publishing as a
/// sidecar would, keeps `static-nodes.json` derived while the harness lives.
/// `data()` is the ConfigMap's once that derivation has settled (a poll with a
/// deadline); `delete()` deletes the ConfigMap and every member Lease.
struct LeaseHarness {
    client: kube::Client,
    admin: Api<ConfigMap>,
    leases: Api<Lease>,
    namespace: String,
    publisher: tokio::task::JoinHandle<()>,
}

impl LeaseHarness {
    async fn new(cluster: &Cluster, hint: &str) -> Result<Self, String> {
        let ns = cluster.namespace(hint).await.map_err(|e| e.to_string())?;
        cluster.grant_leases(&ns).await.map_err(|e| e.to_string())?;
        let client = ns.new_client().await.map_err(|e| e.to_string())?;
        let publisher =
            LeaseRegistry::new(client.clone(), ns.name.clone(), NAME).publishing_as("a-publisher"); // sorts first: publishes at once
        let publisher = tokio::spawn(async move {
            let mut watch = publisher.watch();
            while watch.next().await.is_some() {}
        });
        Ok(Self {
            client,
            admin: Api::namespaced(cluster.admin(), &ns.name),
            leases: Api::namespaced(cluster.admin(), &ns.name),
            namespace: ns.name.clone(),
            publisher,
        })
    }

    /// The member records the Leases hold, by pod.
    async fn lease_members(
        &self,
    ) -> Result<std::collections::BTreeMap<String, MemberRecord>, String> {
        let lp = kube::api::ListParams::default().labels(&peer_registry::lease_selector(NAME));
        let list = self.leases.list(&lp).await.map_err(|e| e.to_string())?;
        let mut members = std::collections::BTreeMap::new();
        for lease in list.items {
            let raw = lease
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(peer_registry::MEMBER_ANNOTATION))
                .ok_or("a member lease without its record")?;
            let rec: MemberRecord = serde_json::from_str(raw).map_err(|e| e.to_string())?;
            members.insert(rec.pod.clone(), rec);
        }
        Ok(members)
    }
}

impl Drop for LeaseHarness {
    fn drop(&mut self) {
        self.publisher.abort();
    }
}

#[async_trait::async_trait]
impl conformance::Harness for LeaseHarness {
    fn client(&self) -> std::sync::Arc<dyn PeerRegistry> {
        std::sync::Arc::new(LeaseRegistry::new(
            self.client.clone(),
            self.namespace.clone(),
            NAME,
        ))
    }

    async fn edit(&self, f: conformance::DataEdit) -> Result<(), String> {
        edit_as_admin(&self.admin, f).await
    }

    async fn data(&self) -> Result<std::collections::BTreeMap<String, String>, String> {
        let settled = eventually(
            "static-nodes.json derived from the member leases",
            Duration::from_secs(15),
            || async {
                let members = self.lease_members().await.ok()?;
                let cm = self.admin.get_opt(NAME).await.ok()?;
                let data = cm.and_then(|c| c.data).unwrap_or_default();
                peer_registry::schema::encode_lease_members(&data, &members)
                    .is_none()
                    .then_some(data)
            },
        )
        .await;
        settled.map_err(|e| e.to_string())
    }

    async fn delete(&self) -> Result<(), String> {
        let lp = kube::api::ListParams::default().labels(&peer_registry::lease_selector(NAME));
        self.leases
            .delete_collection(&DeleteParams::default(), &lp)
            .await
            .map_err(|e| e.to_string())?;
        delete_as_admin(&self.admin).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite_passes_on_the_lease_layout_on_the_real_apiserver() {
    let (_ctx, cluster, _ns) = start("conformance-leases").await;
    let n = std::sync::atomic::AtomicU32::new(0);
    conformance::run_all(|| {
        let i = n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let cluster = &cluster;
        async move { LeaseHarness::new(cluster, &format!("conf-leases-{i}")).await }
    })
    .await
    .unwrap_or_else(|e| panic!("lease layout: {e}"));
}

/// The default write protocol (per-member JSON Patch, `WriteProtocol::KeyPatch`)
/// against the real apiserver: many registrants at once while others are
/// removed and a third party keeps editing an unrelated key; a legacy entry
/// (the original Python sidecar's, no member record) sits in
/// `static-nodes.json` throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_patch_registrants_at_once_lose_nothing_and_keep_a_legacy_entry_and_third_party_keys() {
    const N: u32 = 60;
    let (_ctx, cluster, ns) = start("keypatch").await;
    let admin: Api<ConfigMap> = Api::namespaced(cluster.admin(), &ns.name);
    let reg = registry(&ns)
        .await
        .with_write_protocol(WriteProtocol::KeyPatch);
    let old: Vec<_> = (0..5)
        .map(|i| test_member(&format!("old-{i}"), 5000 + i))
        .collect();
    for m in &old {
        reg.upsert(m.clone()).await.unwrap();
    }
    // The original sidecar appends its own entry, with `?discport=0`.
    let legacy = format!("{}?discport=0", test_member("python", 9999).enode);
    let mut list: Vec<String> =
        serde_json::from_str(&raw_data(&cluster, &ns.name).await["static-nodes.json"]).unwrap();
    list.push(legacy.clone());
    let patch = json!({"data": {
        "static-nodes.json": serde_json::to_string(&list).unwrap(),
        "operator-note": "edit-0",
    }});
    admin
        .patch(NAME, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    assert_eq!(reg.snapshot().await.unwrap().legacy.len(), 1);

    let mut registries = Vec::new();
    for _ in 0..N + 3 {
        registries.push(
            registry(&ns)
                .await
                .with_write_protocol(WriteProtocol::KeyPatch),
        );
    }
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(registries.len() + 1));
    let mut tasks = Vec::new();
    for (i, r) in registries.into_iter().enumerate() {
        let barrier = barrier.clone();
        let i = i as u32;
        let removed = old
            .get(i.checked_sub(N).unwrap_or(u32::MAX) as usize)
            .cloned();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            match removed {
                Some(m) => r.remove(vec![m]).await.map(|_| ()),
                None => r
                    .upsert(test_member(&format!("geth-{i}"), i))
                    .await
                    .map(|_| ()),
            }
        }));
    }
    // A third party edits an unrelated key during the race.
    let editor = {
        let admin = admin.clone();
        let barrier = barrier.clone();
        tokio::spawn(async move {
            barrier.wait().await;
            for k in 1..=10 {
                let patch = json!({"data": {"operator-note": format!("edit-{k}")}});
                admin
                    .patch(NAME, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    editor.await.unwrap();

    let data = raw_data(&cluster, &ns.name).await;
    let snap = reg.snapshot().await.unwrap();
    let want: BTreeSet<String> = (0..N)
        .map(|i| format!("geth-{i}"))
        .chain((3..5).map(|i| format!("old-{i}")))
        .collect();
    assert_eq!(pods(&snap), want, "no registrant lost, removals done");
    assert_eq!(
        data["operator-note"], "edit-10",
        "third-party key preserved"
    );
    let stored: BTreeSet<String> = serde_json::from_str::<Vec<String>>(&data["static-nodes.json"])
        .unwrap()
        .into_iter()
        .collect();
    let mut expected: BTreeSet<String> =
        snap.members.values().map(|m| m.enode.to_string()).collect();
    expected.insert(legacy.clone());
    assert_eq!(
        stored, expected,
        "static-nodes.json: exactly the members plus the legacy entry, verbatim"
    );
    assert_eq!(snap.legacy.len(), 1, "{:?}", snap.legacy);

    // Under KeyPatch too, the legacy entry goes only when asked.
    let snap = reg.remove_legacy(snap.legacy.clone()).await.unwrap();
    assert!(snap.legacy.is_empty());
    assert_eq!(pods(&snap), want);
    let data = raw_data(&cluster, &ns.name).await;
    assert!(!data["static-nodes.json"].contains(&legacy));
    assert_eq!(data["operator-note"], "edit-10");
}
