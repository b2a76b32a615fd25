//! The CAS loop against an in-memory fake of the ConfigMap API.

use std::collections::BTreeSet;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::ObjectMeta;
use kube::runtime::watcher;

use super::cas::TRANSIENT_RETRIES;
use super::key_patch::derived_static_nodes;
use super::memory::MemoryStore;
use super::watch::WatchState;
use super::*;
use crate::registry::MockPeerRegistry;
use crate::schema;
use crate::schema::tests::member;

/// The in-memory ConfigMap API (apiserver semantics), now public as `MemoryStore`.
type Fake = MemoryStore;

mod key_patch;
mod legacy;
mod retries;
mod watch;

fn api_err(code: u16, reason: &str) -> kube::Error {
    MemoryStore::api_error(code, reason)
}

fn fast() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 200,
        base_delay: Duration::from_micros(200),
        max_delay: Duration::from_millis(5),
    }
}

fn pods(s: &Snapshot) -> BTreeSet<String> {
    s.members.keys().cloned().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_concurrent_registrants_never_lose_an_entry() {
    let fake = Fake::default();
    let core = Arc::new(fake.core(fast()));
    for round in 0..10u32 {
        let barrier = Arc::new(tokio::sync::Barrier::new(20));
        let tasks: Vec<_> = (0..20u32)
            .map(|i| {
                let core = Arc::clone(&core);
                let barrier = Arc::clone(&barrier);
                tokio::spawn(async move {
                    barrier.wait().await;
                    core.upsert(member(&format!("geth-{i}"), round * 100 + i))
                        .await
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let snap = core.snapshot().await.unwrap();
        assert_eq!(snap.members.len(), 20, "round {round}: {:?}", pods(&snap));
        assert!(snap.problems.is_empty(), "{:?}", snap.problems);
        let list: Vec<String> =
            serde_json::from_str(&fake.data()[schema::STATIC_NODES_KEY]).unwrap();
        assert_eq!(list.len(), 20, "round {round}");
        fake.delete();
    }
    assert!(
        fake.state().conflicts > 0,
        "the test must exercise conflicts"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn registrations_racing_removals_end_in_exactly_the_expected_set() {
    for protocol in [WriteProtocol::KeyPatch, WriteProtocol::WholeObjectCas] {
        registrations_racing_removals(protocol).await;
    }
}

async fn registrations_racing_removals(protocol: WriteProtocol) {
    let fake = Fake::default();
    let core = Arc::new(fake.core_with(fast(), protocol));
    let old: Vec<_> = (0..10).map(|i| member(&format!("old-{i}"), i)).collect();
    for m in &old {
        core.upsert(m.clone()).await.unwrap();
    }
    let mut tasks = Vec::new();
    for m in old.iter().take(5).cloned() {
        let core = Arc::clone(&core);
        tasks.push(tokio::spawn(async move {
            core.remove(vec![m]).await.map(|_| ())
        }));
    }
    for i in 0..10u32 {
        let core = Arc::clone(&core);
        let m = member(&format!("new-{i}"), 100 + i);
        tasks.push(tokio::spawn(
            async move { core.upsert(m).await.map(|_| ()) },
        ));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let want: BTreeSet<String> = (5..10)
        .map(|i| format!("old-{i}"))
        .chain((0..10).map(|i| format!("new-{i}")))
        .collect();
    let snap = core.snapshot().await.unwrap();
    assert_eq!(pods(&snap), want, "{protocol:?}");
    // No removed member's entry left behind to pass for a legacy one.
    assert!(snap.legacy.is_empty(), "{protocol:?}: {:?}", snap.legacy);
    assert!(static_nodes_current(&fake.data()), "{protocol:?}");
}

#[tokio::test]
async fn steady_state_makes_no_writes() {
    let fake = Fake::default();
    let core = fake.core(fast());
    let rec = member("geth-0", 0);
    let first = core.upsert(rec.clone()).await.unwrap();
    assert_eq!(fake.writes(), 1);
    let mut later = rec.clone();
    later.updated_at = "2030-01-01T00:00:00Z".parse().unwrap();
    later.registered_at = later.updated_at;
    let again = core.upsert(later).await.unwrap();
    assert_eq!(fake.writes(), 1, "timestamps alone never cause a write");
    assert_eq!(again, first);
    assert_eq!(again.members["geth-0"], rec, "the stored record is kept");
    // A new sidecar version is written.
    let mut upgraded = rec.clone();
    upgraded.sidecar_version = "0.2.0".into();
    core.upsert(upgraded).await.unwrap();
    assert_eq!(fake.writes(), 2);
}

#[tokio::test]
async fn upsert_returns_the_snapshot_as_written() {
    let fake = Fake::default();
    let core = fake.core(fast());
    let snap = core.upsert(member("geth-0", 0)).await.unwrap();
    assert_eq!(snap.resource_version.as_deref(), Some("1"));
    assert_eq!(pods(&snap), BTreeSet::from(["geth-0".to_owned()]));
    let data = fake.data();
    assert_eq!(data[schema::SCHEMA_VERSION_KEY], "1");
    assert!(fake.state().cm.as_ref().unwrap().metadata.labels.is_some());
}

#[tokio::test]
async fn a_removal_does_not_delete_a_member_that_re_registered_meanwhile() {
    let fake = Fake::default();
    let core = fake.core(fast());
    let before = member("geth-0", 0);
    core.upsert(before.clone()).await.unwrap();
    let mut moved = before.clone();
    moved.enode = moved.enode.with_host("198.19.9.9".parse().unwrap());
    moved.pod_ip = Some("198.19.9.9".into());
    core.upsert(moved.clone()).await.unwrap();
    let writes = fake.writes();
    let snap = core.remove(vec![before]).await.unwrap();
    assert!(snap.members["geth-0"].same_registration(&moved));
    assert_eq!(fake.writes(), writes, "nothing to do: no write");
    let snap = core.remove(vec![moved]).await.unwrap();
    assert!(snap.members.is_empty());
    assert_eq!(fake.writes(), writes + 1);
}

#[tokio::test]
async fn removing_from_a_missing_configmap_does_not_create_it() {
    let fake = Fake::default();
    let core = fake.core(fast());
    let snap = core.remove(vec![member("geth-0", 0)]).await.unwrap();
    assert!(!snap.exists());
    assert_eq!(fake.writes(), 0);
    assert!(fake.state().cm.is_none());
}

#[tokio::test]
async fn missing_configmap_snapshot_is_empty() {
    let fake = Fake::default();
    let snap = fake.core(fast()).snapshot().await.unwrap();
    assert_eq!(snap, Snapshot::default());
}

#[tokio::test]
async fn losing_the_creation_race_is_normal() {
    let fake = Fake::default();
    let core = fake.core(fast());
    // Someone else creates the object between our GET and our create.
    let other = member("geth-1", 1);
    let other2 = other.clone();
    fake.state().meddle = Some(Box::new(move |cm| {
        if cm.is_none() {
            let data = schema::encode(
                &BTreeMap::new(),
                &BTreeMap::from([(other2.pod.clone(), other2.clone())]),
            );
            *cm = Some(ConfigMap {
                data: Some(data),
                ..ConfigMap::default()
            });
            true
        } else {
            false
        }
    }));
    let snap = core.upsert(member("geth-0", 0)).await.unwrap();
    assert_eq!(
        pods(&snap),
        BTreeSet::from(["geth-0".to_owned(), "geth-1".to_owned()])
    );
}

#[tokio::test]
async fn a_deleted_configmap_is_recreated_on_the_next_upsert() {
    let fake = Fake::default();
    let core = fake.core(fast());
    core.upsert(member("geth-0", 0)).await.unwrap();
    fake.delete();
    assert!(!core.snapshot().await.unwrap().exists());
    let snap = core.upsert(member("geth-0", 0)).await.unwrap();
    assert!(snap.exists());
    assert!(snap.members.contains_key("geth-0"));
    // Deleted between our GET and our replace: 404, re-read, create.
    fake.state().meddle = Some(Box::new(|cm| {
        let was = cm.is_some();
        *cm = None;
        was
    }));
    let snap = core.upsert(member("geth-1", 1)).await.unwrap();
    assert_eq!(pods(&snap), BTreeSet::from(["geth-1".to_owned()]));
}

#[tokio::test]
async fn conflicts_exhaust_into_a_clear_error() {
    let fake = Fake::default();
    let retry = RetryPolicy {
        max_attempts: 3,
        ..fast()
    };
    let core = fake.core(retry);
    core.upsert(member("geth-0", 0)).await.unwrap();
    // A third party writes before each of our writes, forever.
    fake.state().meddle = Some(Box::new(|_| true));
    let mut cas = fake.core(retry);
    cas.protocol = WriteProtocol::WholeObjectCas;
    let gets = fake.state().gets;
    let err = cas.upsert(member("geth-1", 1)).await.unwrap_err();
    assert_eq!(err.kind(), "conflict");
    assert!(err.to_string().contains("3 attempts"), "{err}");
    assert_eq!(fake.state().gets, gets + 3);
    // A key patch only conflicts with writes to its own key: it went through.
    core.upsert(member("geth-1", 1)).await.unwrap();
    // ... and is exhausted when that key changes before each of its writes.
    fake.edit_object(|cm| {
        let data = cm.data.as_mut().unwrap();
        data.insert("member.geth-2".into(), "garbage".into());
    });
    let mut n = 0;
    fake.state().meddle = Some(Box::new(move |cm| {
        n += 1;
        let data = cm.as_mut().and_then(|c| c.data.as_mut()).unwrap();
        data.insert("member.geth-2".into(), format!("garbage {n}"));
        true
    }));
    let err = core.upsert(member("geth-2", 2)).await.unwrap_err();
    assert_eq!(err.kind(), "conflict");
    assert!(err.to_string().contains("3 attempts"), "{err}");
}

/// However a burst's tasks interleave (on a loaded machine they may run one
/// after another), its first write finds its key's neighbours and
/// `static-nodes.json` changed under it: one more member, `racer`, registered
/// the way a concurrent registrant's write would, legacy entries kept.
fn a_racer_registers_before_the_next_write(fake: &Fake) {
    let mut once = true;
    fake.state().meddle = Some(Box::new(move |cm| {
        std::mem::take(&mut once) && {
            let data = cm.as_mut().and_then(|c| c.data.as_mut()).unwrap();
            let mut members = schema::decode(data, None).members;
            members.insert("racer".into(), member("racer", 998));
            *data = schema::encode(data, &members);
            true
        }
    }));
}

#[tokio::test]
async fn a_concurrent_third_party_edit_is_merged_not_overwritten() {
    let fake = Fake::default();
    let core = fake.core(fast());
    core.upsert(member("geth-0", 0)).await.unwrap();
    let mut once = true;
    fake.state().meddle = Some(Box::new(move |cm| {
        if std::mem::take(&mut once) {
            if let Some(cm) = cm.as_mut() {
                cm.data
                    .get_or_insert_with(BTreeMap::new)
                    .insert("operator-note".into(), "keep me".into());
            }
            true
        } else {
            false
        }
    }));
    core.upsert(member("geth-1", 1)).await.unwrap();
    let data = fake.data();
    assert_eq!(data["operator-note"], "keep me");
    assert!(data.contains_key("member.geth-0") && data.contains_key("member.geth-1"));
}

#[tokio::test]
async fn metadata_unknown_keys_and_garbage_survive_and_heal() {
    let fake = Fake::default();
    let core = fake.core(fast());
    core.upsert(member("geth-0", 0)).await.unwrap();
    fake.edit_object(|cm| {
        cm.metadata.annotations = Some(BTreeMap::from([("a".into(), "b".into())]));
        let d = cm.data.get_or_insert_with(BTreeMap::new);
        d.insert(schema::STATIC_NODES_KEY.into(), "{{{ not json".into());
        d.insert("member.broken".into(), "not a record".into());
        d.insert("member.geth-0".into(), "{\"pod\": 42}".into());
        d.insert("operator-note".into(), "keep me".into());
        d.insert(schema::EXTERNAL_PEERS_KEY.into(), "[1, 2]".into());
    });
    let snap = core.snapshot().await.unwrap();
    assert!(snap.members.is_empty());
    assert!(snap.problems.iter().any(|p| p.contains("member.broken")));
    let snap = core.upsert(member("geth-0", 0)).await.unwrap();
    assert_eq!(pods(&snap), BTreeSet::from(["geth-0".to_owned()]));
    let data = fake.data();
    let list: Vec<String> = serde_json::from_str(&data[schema::STATIC_NODES_KEY]).unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(data["operator-note"], "keep me");
    assert_eq!(data[schema::EXTERNAL_PEERS_KEY], "[1, 2]");
    assert_eq!(data["member.broken"], "not a record");
    let cm = fake.state().cm.clone().unwrap();
    assert_eq!(cm.metadata.annotations.unwrap()["a"], "b");
}

#[tokio::test]
async fn a_write_past_the_size_limit_is_refused_and_nothing_is_lost() {
    let fake = Fake::default();
    let core = fake.core(fast());
    core.upsert(member("geth-0", 0)).await.unwrap();
    fake.edit_object(|cm| {
        cm.data
            .get_or_insert_with(BTreeMap::new)
            .insert("operator-filler".into(), "x".repeat(950 * 1024));
    });
    let writes = fake.writes();
    let err = core.upsert(member("geth-1", 1)).await.unwrap_err();
    assert_eq!(err.kind(), "too_large");
    assert!(err.to_string().contains("KiB"), "{err}");
    assert_eq!(fake.writes(), writes);
    assert!(
        core.snapshot()
            .await
            .unwrap()
            .members
            .contains_key("geth-0")
    );
    // Shrinking writes are still allowed.
    let snap = core.remove(vec![member("geth-0", 0)]).await.unwrap();
    assert!(snap.members.is_empty());
}

#[tokio::test]
async fn errors_are_classified() {
    let fake = Fake::default();
    let core = fake.core(fast());
    fake.state()
        .fail_writes
        .push_back(api_err(403, "Forbidden"));
    let err = core.upsert(member("geth-0", 0)).await.unwrap_err();
    assert_eq!(err.kind(), "forbidden");
    let msg = err.to_string();
    assert!(
        msg.contains("create") && msg.contains("configmaps"),
        "{msg}"
    );
    core.upsert(member("geth-0", 0)).await.unwrap();
    fake.state()
        .fail_writes
        .push_back(api_err(403, "Forbidden"));
    let err = core.upsert(member("geth-1", 1)).await.unwrap_err();
    assert!(err.to_string().contains("configmaps/patch"), "{err}");
    fake.state()
        .fail_gets
        .push_back(api_err(503, "ServiceUnavailable"));
    assert_eq!(core.snapshot().await.unwrap_err().kind(), "unavailable");
    fake.state().fail_gets.push_back(api_err(403, "Forbidden"));
    let err = core.snapshot().await.unwrap_err();
    assert!(err.to_string().contains("configmaps/get"), "{err}");
    fake.state()
        .fail_writes
        .push_back(api_err(400, "BadRequest"));
    assert_eq!(
        core.upsert(member("geth-2", 2)).await.unwrap_err().kind(),
        "kube"
    );
}

#[tokio::test]
async fn invalid_records_are_refused() {
    let fake = Fake::default();
    let core = fake.core(fast());
    let mut rec = member("geth/0", 0);
    assert_eq!(
        core.upsert(rec.clone()).await.unwrap_err().kind(),
        "invalid_record"
    );
    rec.pod = "geth-0".into();
    rec.node_id = member("x", 1).node_id;
    let err = core.upsert(rec).await.unwrap_err();
    assert_eq!(err.kind(), "invalid_record");
    assert_eq!(fake.writes(), 0);
}

#[test]
fn retry_policy_bounds() {
    let p = RetryPolicy::default();
    assert_eq!(p.max_attempts, 60);
    assert_eq!(p.delay_cap(1), Duration::from_millis(20));
    assert_eq!(p.delay_cap(2), Duration::from_millis(40));
    assert_eq!(p.delay_cap(7), Duration::from_millis(1280));
    assert_eq!(p.delay_cap(8), Duration::from_secs(2));
    assert_eq!(p.delay_cap(1000), Duration::from_secs(2));
    for attempt in 1..30 {
        assert!(p.delay(attempt) <= p.delay_cap(attempt));
    }
}

#[tokio::test]
async fn the_mock_is_usable() {
    let mut mock = MockPeerRegistry::new();
    mock.expect_snapshot().returning(|| Ok(Snapshot::default()));
    mock.expect_watch()
        .returning(|| futures::stream::iter(vec![Ok(Snapshot::default())]).boxed());
    let reg: &dyn PeerRegistry = &mock;
    assert!(!reg.snapshot().await.unwrap().exists());
    assert_eq!(reg.watch().count().await, 1);
}

/// True when the stored `static-nodes.json` is the one its own members (and
/// legacy entries) give.
fn static_nodes_current(data: &BTreeMap<String, String>) -> bool {
    let members = schema::decode(data, None).members;
    derived_static_nodes(data, &members, &BTreeSet::new()).is_none()
}

/// Appends `entry` to the stored `static-nodes.json`, as the original
/// sidecar does with its own entry.
fn append_legacy(fake: &Fake, entry: &str) {
    fake.edit_object(|cm| {
        let data = cm.data.get_or_insert_with(BTreeMap::new);
        let mut list: Vec<String> = serde_json::from_str(&data[schema::STATIC_NODES_KEY]).unwrap();
        list.push(entry.to_owned());
        data.insert(
            schema::STATIC_NODES_KEY.to_owned(),
            serde_json::to_string(&list).unwrap(),
        );
    });
}

/// A refused connection to the apiserver, as kube reports it.
fn refused() -> kube::Error {
    #[derive(Debug, thiserror::Error)]
    #[error("client error (Connect)")]
    struct Client(#[source] Connect);
    #[derive(Debug, thiserror::Error)]
    #[error("tcp connect error")]
    struct Connect(#[source] std::io::Error);
    let io = std::io::Error::new(
        std::io::ErrorKind::ConnectionRefused,
        "Connection refused (os error 111)",
    );
    kube::Error::Service(Box::new(Client(Connect(io))))
}
