//! The [`WriteProtocol::KeyPatch`] writes: bursts and stale removals lose
//! nothing, one leader settles `static-nodes.json` and the others wait, and a
//! stale settle cannot bring back a removed member.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn key_patches_of_a_burst_never_lose_an_entry_and_leave_static_nodes_derived() {
    let fake = Fake::default();
    let core = Arc::new(fake.core(fast()));
    core.upsert(member("seed", 999)).await.unwrap();
    a_racer_registers_before_the_next_write(&fake);
    let barrier = Arc::new(tokio::sync::Barrier::new(50));
    let tasks: Vec<_> = (0..50u32)
        .map(|i| {
            let (core, barrier) = (Arc::clone(&core), Arc::clone(&barrier));
            tokio::spawn(async move {
                barrier.wait().await;
                core.upsert(member(&format!("geth-{i}"), i)).await
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let data = fake.data();
    let snap = schema::decode(&data, None);
    assert_eq!(snap.members.len(), 52);
    assert!(
        static_nodes_current(&data),
        "static-nodes.json must list every member once the burst is over"
    );
    let s = fake.state();
    assert!(
        s.writes <= 1 + 2 * 50,
        "at most two writes per member: {}",
        s.writes
    );
    assert!(
        s.patch_failures.iter().any(|f| f.contains("static-nodes")),
        "the burst must exercise the static-nodes.json repair: {:?}",
        s.patch_failures
    );
}

#[tokio::test]
async fn a_stale_key_patch_removal_keeps_a_member_re_registered_between_read_and_write() {
    let fake = Fake::default();
    let core = fake.core(fast());
    let before = member("geth-0", 0);
    core.upsert(before.clone()).await.unwrap();
    let mut moved = before.clone();
    moved.enode = moved.enode.with_host("198.19.9.9".parse().unwrap());
    moved.pod_ip = Some("198.19.9.9".into());
    let value = serde_json::to_string(&moved).unwrap();
    let mut once = true;
    // The pod re-registers after our read, before our patch lands.
    fake.state().meddle = Some(Box::new(move |cm| {
        std::mem::take(&mut once) && {
            let data = cm.as_mut().and_then(|c| c.data.as_mut()).unwrap();
            data.insert("member.geth-0".into(), value.clone());
            true
        }
    }));
    let snap = core.remove(vec![before]).await.unwrap();
    assert!(snap.members["geth-0"].same_registration(&moved));
    assert!(fake.state().patch_failures[0].contains("test"));
}

#[tokio::test]
async fn a_stale_settle_cannot_bring_back_a_removed_members_entry_as_legacy() {
    let fake = Fake::default();
    let core = fake.core_with(fast(), WriteProtocol::KeyPatch);
    core.upsert(member("geth-0", 0)).await.unwrap();
    // geth-1's record landed; its static-nodes.json entry is not settled yet.
    let gone = member("geth-1", 1);
    let value = serde_json::to_string(&gone).unwrap();
    fake.edit_object(|cm| {
        cm.data
            .get_or_insert_with(BTreeMap::new)
            .insert("member.geth-1".into(), value);
    });
    let seen = fake.state().cm.clone().unwrap();
    core.remove(vec![gone]).await.unwrap();
    // A writer that read before the removal settles from what it saw.
    let snap = core.settle_static_nodes(seen).await.unwrap();
    assert!(snap.members.contains_key("geth-1"), "its own (stale) view");
    let snap = core.snapshot().await.unwrap();
    assert_eq!(pods(&snap), BTreeSet::from(["geth-0".to_owned()]));
    assert!(snap.legacy.is_empty(), "{:?}", snap.legacy);
    assert!(static_nodes_current(&fake.data()));
}

#[tokio::test]
async fn a_new_node_key_under_key_patch_takes_the_old_entry_with_it() {
    let fake = Fake::default();
    let core = fake.core_with(fast(), WriteProtocol::KeyPatch);
    core.upsert(member("geth-0", 0)).await.unwrap();
    core.upsert(member("geth-1", 1)).await.unwrap();
    let snap = core.upsert(member("geth-1", 7)).await.unwrap();
    assert!(snap.legacy.is_empty(), "{:?}", snap.legacy);
    let list: Vec<String> = serde_json::from_str(&fake.data()[schema::STATIC_NODES_KEY]).unwrap();
    assert_eq!(list.len(), 2, "{list:?}");
    assert_eq!(fake.state().replaces, 0, "KeyPatch after the creation");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn key_patch_registrants_losing_the_creation_race_go_on_by_key_patch_not_cas() {
    let fake = Fake::default();
    let core = Arc::new(fake.core_with(fast(), WriteProtocol::KeyPatch));
    let barrier = Arc::new(tokio::sync::Barrier::new(40));
    let tasks: Vec<_> = (0..40u32)
        .map(|i| {
            let (core, barrier) = (Arc::clone(&core), Arc::clone(&barrier));
            tokio::spawn(async move {
                barrier.wait().await;
                core.upsert(member(&format!("geth-{i}"), i)).await
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let data = fake.data();
    assert_eq!(schema::decode(&data, None).members.len(), 40);
    assert!(static_nodes_current(&data));
    let s = fake.state();
    assert_eq!(s.replaces, 0, "no whole-object replace after the creation");
    assert!(s.writes <= 1 + 2 * 40, "writes: {}", s.writes);
}

/// A store where `geth-0` is listed and `geth-1`'s record landed but its
/// `static-nodes.json` entry is not listed yet (its registrant is between its
/// two writes): `geth-1` leads the settle of anyone who registers now.
async fn with_a_pending_leader() -> (Fake, Core<Fake>) {
    let fake = Fake::default();
    let core = fake.core_with(fast(), WriteProtocol::KeyPatch);
    core.upsert(member("geth-0", 0)).await.unwrap();
    let value = serde_json::to_string(&member("geth-1", 1)).unwrap();
    fake.edit(|data| {
        data.insert("member.geth-1".into(), value);
    });
    (fake, core)
}

#[tokio::test]
async fn a_registrant_that_does_not_lead_leaves_the_settle_to_the_leader() {
    let (fake, core) = with_a_pending_leader().await;
    // The leader settles (listing every member it sees) while geth-5 waits.
    fake.state().meddle_get = Some(Box::new(|cm| {
        let Some(data) = cm.as_mut().and_then(|c| c.data.as_mut()) else {
            return false;
        };
        if !data.contains_key("member.geth-5") {
            return false;
        }
        let members = schema::decode(data, None).members;
        let Some(derived) = derived_static_nodes(data, &members, &BTreeSet::new()) else {
            return false;
        };
        data.insert(schema::STATIC_NODES_KEY.into(), derived);
        true
    }));
    let patches = fake.state().patches;
    let snap = core.upsert(member("geth-5", 5)).await.unwrap();
    assert!(snap.members.contains_key("geth-5"));
    assert_eq!(
        fake.state().patches - patches,
        1,
        "only its own key: the leader listed its entry"
    );
    assert!(static_nodes_current(&fake.data()));
}

#[tokio::test]
async fn a_registrant_settles_its_own_entry_when_the_leader_never_does() {
    let (fake, core) = with_a_pending_leader().await;
    let patches = fake.state().patches;
    let snap = core.upsert(member("geth-5", 5)).await.unwrap();
    assert!(snap.members.contains_key("geth-5"));
    assert_eq!(
        fake.state().patches - patches,
        2,
        "its key, then the settle after waiting for the leader in vain"
    );
    // The leader's entry is listed too: a settle lists every member.
    let list: Vec<String> = serde_json::from_str(&fake.data()[schema::STATIC_NODES_KEY]).unwrap();
    assert_eq!(list.len(), 3, "{list:?}");
    assert!(static_nodes_current(&fake.data()));
}

#[tokio::test]
async fn the_leader_settles_at_once() {
    let fake = Fake::default();
    let core = fake.core_with(fast(), WriteProtocol::KeyPatch);
    core.upsert(member("geth-1", 1)).await.unwrap();
    // geth-5's record landed, its entry not listed: geth-0 sorts first.
    let value = serde_json::to_string(&member("geth-5", 5)).unwrap();
    fake.edit(|data| {
        data.insert("member.geth-5".into(), value);
    });
    let gets = fake.gets();
    core.upsert(member("geth-0", 0)).await.unwrap();
    assert_eq!(fake.gets() - gets, 1, "no wait, no re-read");
    assert!(static_nodes_current(&fake.data()));
}

#[tokio::test]
async fn a_stale_own_entry_settle_cannot_bring_back_a_removed_member() {
    let fake = Fake::default();
    let core = fake.core_with(fast(), WriteProtocol::KeyPatch);
    core.upsert(member("geth-0", 0)).await.unwrap();
    // geth-2 (which leads) and geth-3 landed, neither listed yet.
    let (two, three) = (member("geth-2", 2), member("geth-3", 3));
    let (v2, v3) = (
        serde_json::to_string(&two).unwrap(),
        serde_json::to_string(&three).unwrap(),
    );
    fake.edit(|data| {
        data.insert("member.geth-2".into(), v2);
        data.insert("member.geth-3".into(), v3);
    });
    let seen = fake.state().cm.clone().unwrap();
    core.remove(vec![three.clone()]).await.unwrap();
    // geth-2 settles from its read taken before the removal.
    let snap = core
        .settle_own_entry(&two, seen, Duration::ZERO)
        .await
        .unwrap();
    assert!(snap.members.contains_key("geth-2"));
    let snap = core.snapshot().await.unwrap();
    assert_eq!(
        pods(&snap),
        BTreeSet::from(["geth-0".to_owned(), "geth-2".to_owned()])
    );
    assert!(snap.legacy.is_empty(), "resurrected: {:?}", snap.legacy);
    assert!(static_nodes_current(&fake.data()));
}
