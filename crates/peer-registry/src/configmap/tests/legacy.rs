//! Legacy `static-nodes.json` entries (the original sidecar's, and those the
//! lease layout's publisher derived): kept verbatim through member writes
//! of both protocols, removed only when asked.

use super::*;

#[tokio::test]
async fn a_legacy_entry_survives_member_writes_and_goes_only_when_removed() {
    let fake = Fake::default();
    let core = fake.core(fast());
    core.upsert(member("geth-0", 0)).await.unwrap();
    // The original sidecar appends its own entry to static-nodes.json.
    let legacy = format!(
        "{}?discport=0",
        crate::schema::tests::enode(40, "10.9.0.40")
    );
    fake.edit_object(|cm| {
        let data = cm.data.get_or_insert_with(BTreeMap::new);
        let mut list: Vec<String> =
            serde_json::from_str(&data[crate::schema::STATIC_NODES_KEY]).unwrap();
        list.push(legacy.clone());
        data.insert(
            crate::schema::STATIC_NODES_KEY.to_owned(),
            serde_json::to_string(&list).unwrap(),
        );
    });
    let snap = core.upsert(member("geth-1", 1)).await.unwrap();
    assert_eq!(snap.legacy.len(), 1);
    assert!(fake.data()[crate::schema::STATIC_NODES_KEY].contains(&legacy));
    let writes = fake.writes();
    // Removing an id that is not there writes nothing.
    core.remove_legacy(vec![crate::schema::tests::enode(41, "10.9.0.41")])
        .await
        .unwrap();
    assert_eq!(fake.writes(), writes);
    let snap = core.remove_legacy(snap.legacy.clone()).await.unwrap();
    assert!(snap.legacy.is_empty());
    assert_eq!(snap.members.len(), 2);
    assert!(!fake.data()[crate::schema::STATIC_NODES_KEY].contains(&legacy));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn key_patch_bursts_keep_a_legacy_entry_verbatim_and_lose_no_member() {
    let fake = Fake::default();
    let core = Arc::new(fake.core_with(fast(), WriteProtocol::KeyPatch));
    for i in 0..5u32 {
        core.upsert(member(&format!("old-{i}"), 500 + i))
            .await
            .unwrap();
    }
    let legacy = format!("{}?discport=0", schema::tests::enode(40, "10.9.0.40"));
    append_legacy(&fake, &legacy);
    let replaces = fake.state().replaces;
    a_racer_registers_before_the_next_write(&fake);
    let barrier = Arc::new(tokio::sync::Barrier::new(43));
    let mut tasks = Vec::new();
    for i in 0..40u32 {
        let (core, barrier) = (Arc::clone(&core), Arc::clone(&barrier));
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            core.upsert(member(&format!("geth-{i}"), i))
                .await
                .map(|_| ())
        }));
    }
    for i in 0..3u32 {
        let (core, barrier) = (Arc::clone(&core), Arc::clone(&barrier));
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            core.remove(vec![member(&format!("old-{i}"), 500 + i)])
                .await
                .map(|_| ())
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let data = fake.data();
    let snap = schema::decode(&data, None);
    assert_eq!(snap.members.len(), 43, "{:?}", pods(&snap));
    assert_eq!(snap.legacy.len(), 1, "{:?}", snap.legacy);
    let list: Vec<String> = serde_json::from_str(&data[schema::STATIC_NODES_KEY]).unwrap();
    assert!(list.contains(&legacy), "kept verbatim: {list:?}");
    assert_eq!(list.len(), 44);
    assert!(static_nodes_current(&data));
    assert!(
        fake.state()
            .patch_failures
            .iter()
            .any(|f| f.contains("test")),
        "the burst must exercise failed tests"
    );
    // remove_legacy under KeyPatch: a guarded patch, no whole-object replace.
    let snap = core.remove_legacy(snap.legacy.clone()).await.unwrap();
    assert!(snap.legacy.is_empty());
    assert_eq!(snap.members.len(), 43);
    assert_eq!(
        fake.state().replaces,
        replaces,
        "no CAS replace under KeyPatch"
    );
    let list: Vec<String> = serde_json::from_str(&fake.data()[schema::STATIC_NODES_KEY]).unwrap();
    assert_eq!(list.len(), 43);
}

/// Issue 21, defect 5: a fleet switching layouts. A ConfigMap-layout sidecar
/// asked (by an engine that takes them for legacy entries) to remove the
/// entries the lease layout's publisher derived, with the publisher putting
/// them back each time (as it does ~100 ms later): a whole-object write storm.
/// Those entries are reported as [`Snapshot::derived`] and never removed by
/// this layout; the original sidecar's own legacy entry still goes.
#[tokio::test]
async fn a_configmap_layout_writer_never_removes_what_the_lease_publisher_derived() {
    for protocol in [WriteProtocol::WholeObjectCas, WriteProtocol::KeyPatch] {
        let fake = Fake::default();
        let core = fake.core_with(fast(), protocol);
        core.upsert(member("geth-0", 0)).await.unwrap();
        let python = format!("{}?discport=0", schema::tests::enode(40, "10.9.0.40"));
        append_legacy(&fake, &python);
        // The lease members (geth-5's geth is down), as their publisher derives them.
        let leases: BTreeMap<String, MemberRecord> = [member("geth-5", 5), member("geth-6", 6)]
            .into_iter()
            .map(|m| (m.pod.clone(), m))
            .collect();
        let publish = |fake: &Fake| -> bool {
            let Some(new) = schema::encode_lease_members(&fake.data(), &leases) else {
                return false;
            };
            fake.edit(|data| *data = new);
            true
        };
        assert!(publish(&fake));
        let snap = core.snapshot().await.unwrap();
        let down = leases["geth-5"].enode.clone();
        assert_eq!(snap.legacy.len(), 3, "{protocol:?}: {:?}", snap.legacy);
        assert_eq!(
            snap.derived,
            leases.values().map(|m| m.node_id).collect::<BTreeSet<_>>(),
            "{protocol:?}"
        );
        let writes = fake.writes();
        let mut republished = 0;
        for _ in 0..10 {
            let snap = core.remove_legacy(vec![down.clone()]).await.unwrap();
            assert!(
                snap.legacy.iter().any(|e| e.node_id() == down.node_id()),
                "{protocol:?}: removed a lease-derived entry"
            );
            republished += u32::from(publish(&fake));
        }
        assert_eq!(
            (fake.writes() - writes, republished),
            (0, 0),
            "{protocol:?}: (registry writes, re-publications) in 10 rounds"
        );
        // The original sidecar's entry is a legacy one: it still goes.
        let python_enode: Enode = python.parse().unwrap();
        let snap = core
            .remove_legacy(vec![python_enode.clone()])
            .await
            .unwrap();
        assert!(
            !snap
                .legacy
                .iter()
                .any(|e| e.node_id() == python_enode.node_id()),
            "{protocol:?}"
        );
        assert_eq!(snap.legacy.len(), 2, "{protocol:?}");
        assert!(!publish(&fake), "{protocol:?}: the publisher keeps it gone");
    }
}
