//! A conformance suite every [`PeerRegistry`] implementation must pass.
//!
//! Each check takes a [`Harness`] on a fresh, empty registry object and returns
//! `Err` with a description of the first violation. The crate runs it against
//! [`crate::MemoryRegistry`]; the integration tests run the same checks against
//! [`crate::ConfigMapRegistry`] on a real apiserver, so the in-memory registry
//! cannot drift from the real one. [`run_all`] runs every check, each on a fresh
//! harness.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), String> {
//! use peer_registry::conformance::{self, MemoryHarness};
//!
//! conformance::run_all(|| async { Ok(MemoryHarness::new()) }).await?;
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use geth_ipc::Enode;

use crate::record::{MemberRecord, Snapshot};
use crate::registry::PeerRegistry;
use crate::schema;
use crate::{MemoryRegistry, MemoryStore, WriteProtocol};

/// What a check failed on.
pub type Outcome = Result<(), String>;

/// A third party's edit of the object's `data`.
pub type DataEdit = Box<dyn FnOnce(&mut BTreeMap<String, String>) + Send>;

/// Access to one registry object under test, as the sidecars and a third party
/// (an operator, the original sidecar) see it.
#[async_trait::async_trait]
pub trait Harness: Send + Sync {
    /// A new registry client on the object, as one more sidecar would have.
    fn client(&self) -> Arc<dyn PeerRegistry>;
    /// A third party edits the object's `data` (creating the object if missing).
    async fn edit(&self, f: DataEdit) -> Result<(), String>;
    /// The object's raw `data` (empty when missing).
    async fn data(&self) -> Result<BTreeMap<String, String>, String>;
    /// A third party deletes the object.
    async fn delete(&self) -> Result<(), String>;
}

/// The [`Harness`] over a [`MemoryStore`].
#[derive(Debug, Clone, Default)]
pub struct MemoryHarness {
    /// The store every client shares.
    pub store: MemoryStore,
    /// The write protocol of every client ([`WriteProtocol::WholeObjectCas`]
    /// by default, as for the ConfigMap registry).
    pub protocol: WriteProtocol,
}

impl MemoryHarness {
    /// A harness on a new, empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// A harness on a new, empty store whose clients write with `protocol`.
    pub fn with_protocol(protocol: WriteProtocol) -> Self {
        Self {
            protocol,
            ..Self::default()
        }
    }
}

#[async_trait::async_trait]
impl Harness for MemoryHarness {
    fn client(&self) -> Arc<dyn PeerRegistry> {
        Arc::new(MemoryRegistry::on(&self.store).with_write_protocol(self.protocol))
    }

    async fn edit(&self, f: DataEdit) -> Result<(), String> {
        self.store.edit(move |data| f(data));
        Ok(())
    }

    async fn data(&self) -> Result<BTreeMap<String, String>, String> {
        Ok(self.store.data())
    }

    async fn delete(&self) -> Result<(), String> {
        self.store.delete();
        Ok(())
    }
}

macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

/// A member record for pod `pod` with a distinct valid key per `seed`.
pub fn record(pod: &str, seed: u32) -> Result<MemberRecord, String> {
    let ip = format!("10.77.{}.{}", seed / 250, seed % 250 + 2);
    let host = ip.parse().map_err(|e| format!("{ip}: {e}"))?;
    let enode =
        geth_ipc::fake::test_enode(u64::from(seed), host, 30303).map_err(|e| e.to_string())?;
    let now = jiff::Timestamp::now();
    Ok(MemberRecord {
        pod: pod.to_owned(),
        node_id: enode.node_id(),
        enode,
        pod_uid: Some(format!("00000000-0000-4000-8000-{seed:012}")),
        pod_ip: Some(ip),
        registered_at: now,
        updated_at: now,
        sidecar_version: "conformance".to_owned(),
    })
}

fn pods(s: &Snapshot) -> BTreeSet<String> {
    s.members.keys().cloned().collect()
}

fn static_nodes(data: &BTreeMap<String, String>) -> Result<Vec<String>, String> {
    let raw = data
        .get(schema::STATIC_NODES_KEY)
        .ok_or("no static-nodes.json")?;
    serde_json::from_str(raw).map_err(|e| format!("static-nodes.json: {e}"))
}

/// `n` clients register one member each, all at once: every one is there, in
/// the records and in `static-nodes.json`.
pub async fn concurrent_registrants_none_lost(h: &dyn Harness, n: u32) -> Outcome {
    let tasks = (0..n).map(|i| {
        let client = h.client();
        async move {
            let rec = record(&format!("conf-{i}"), i)?;
            client.upsert(rec).await.map_err(|e| e.to_string())
        }
    });
    for r in futures::future::join_all(tasks).await {
        r?;
    }
    let snap = h.client().snapshot().await.map_err(|e| e.to_string())?;
    ensure!(
        snap.members.len() == n as usize,
        "{} of {n} members registered: {:?}",
        snap.members.len(),
        pods(&snap)
    );
    ensure!(snap.problems.is_empty(), "problems: {:?}", snap.problems);
    let list = static_nodes(&h.data().await?)?;
    ensure!(
        list.len() == n as usize,
        "static-nodes.json has {} of {n} entries",
        list.len()
    );
    Ok(())
}

/// A removal conditional on a record that was meanwhile replaced (the pod
/// re-registered with a new address) removes nothing; with the current record
/// it removes the member.
pub async fn conditional_removal_keeps_a_re_registered_member(h: &dyn Harness) -> Outcome {
    let (sidecar, peer) = (h.client(), h.client());
    let old = record("conf-moving", 1)?;
    sidecar
        .upsert(old.clone())
        .await
        .map_err(|e| e.to_string())?;
    let seen_by_peer = peer.snapshot().await.map_err(|e| e.to_string())?;
    let stale = seen_by_peer
        .members
        .get("conf-moving")
        .cloned()
        .ok_or("the member is not in the snapshot after its upsert")?;
    // The pod comes back on another IP before the peer acts on its evidence.
    let mut moved = record("conf-moving", 1)?;
    moved.pod_ip = Some("10.77.99.99".into());
    moved.enode = moved
        .enode
        .with_host("10.77.99.99".parse().map_err(|e| format!("{e}"))?);
    sidecar
        .upsert(moved.clone())
        .await
        .map_err(|e| e.to_string())?;
    let after = peer.remove(vec![stale]).await.map_err(|e| e.to_string())?;
    let kept = after.members.get("conf-moving");
    ensure!(
        kept.is_some_and(|m| m.same_registration(&moved)),
        "the re-registered member was removed or changed: {kept:?}"
    );
    let after = peer.remove(vec![moved]).await.map_err(|e| e.to_string())?;
    ensure!(
        !after.members.contains_key("conf-moving"),
        "removal with the current record did not remove it"
    );
    Ok(())
}

/// A [`PeerRegistry::create`] registers a pod that has no record; one for a
/// pod that has a record (its sidecar restarted, on another address) keeps
/// the stored record as it is, registration time included, and its snapshot,
/// if any, shows the stored one. A registry that does not create (the
/// trait's default) passes by writing nothing.
pub async fn create_keeps_a_stored_record(h: &dyn Harness) -> Outcome {
    let (first, restarted) = (h.client(), h.client());
    let rec = record("conf-created", 1)?;
    let created = first.create(rec.clone()).await.map_err(|e| e.to_string())?;
    let stored = h.client().snapshot().await.map_err(|e| e.to_string())?;
    let Some(created) = created else {
        ensure!(
            stored.members.is_empty(),
            "a create that returned nothing wrote {:?}",
            pods(&stored)
        );
        return Ok(());
    };
    for (what, snap) in [("the create's snapshot", &created), ("a read", &stored)] {
        let held = snap.members.get("conf-created");
        ensure!(
            held.is_some_and(|m| m.same_registration(&rec)),
            "{what} does not hold the created record: {held:?}"
        );
    }
    let mut again = record("conf-created", 1)?;
    again.registered_at = rec.registered_at + jiff::SignedDuration::from_secs(60);
    again.pod_ip = Some("10.77.99.98".into());
    again.enode = again
        .enode
        .with_host("10.77.99.98".parse().map_err(|e| format!("{e}"))?);
    let kept = restarted.create(again).await.map_err(|e| e.to_string())?;
    let stored = h.client().snapshot().await.map_err(|e| e.to_string())?;
    for (what, snap) in [
        ("the second create's snapshot", kept.as_ref()),
        ("a read", Some(&stored)),
    ] {
        let Some(snap) = snap else { continue };
        let held = snap.members.get("conf-created");
        ensure!(
            held.is_some_and(|m| m.same_registration(&rec)
                && m.registered_at.as_second() == rec.registered_at.as_second()),
            "{what}: a create changed the stored record: {held:?}"
        );
    }
    Ok(())
}

/// Keys the registry does not own, written by a third party, survive
/// registrations and removals byte for byte.
pub async fn unknown_keys_are_preserved(h: &dyn Harness) -> Outcome {
    let client = h.client();
    client
        .upsert(record("conf-0", 0)?)
        .await
        .map_err(|e| e.to_string())?;
    h.edit(Box::new(|data| {
        data.insert("operator-note".into(), "keep me\n  as is".into());
        data.insert(schema::EXTERNAL_PEERS_KEY.into(), "[]".into());
    }))
    .await?;
    client
        .upsert(record("conf-1", 1)?)
        .await
        .map_err(|e| e.to_string())?;
    client
        .remove(vec![record("conf-0", 0)?])
        .await
        .map_err(|e| e.to_string())?;
    let data = h.data().await?;
    ensure!(
        data.get("operator-note").map(String::as_str) == Some("keep me\n  as is"),
        "operator-note changed: {:?}",
        data.get("operator-note")
    );
    ensure!(
        data.get(schema::EXTERNAL_PEERS_KEY).map(String::as_str) == Some("[]"),
        "external-peers.json changed"
    );
    let snap = client.snapshot().await.map_err(|e| e.to_string())?;
    ensure!(
        pods(&snap) == BTreeSet::from(["conf-1".to_owned()]),
        "members: {:?}",
        pods(&snap)
    );
    Ok(())
}

/// `static-nodes.json` entries without a member record (the original sidecar's)
/// survive member writes and go only with `remove_legacy`.
pub async fn legacy_entries_are_preserved(h: &dyn Harness) -> Outcome {
    let client = h.client();
    client
        .upsert(record("conf-0", 0)?)
        .await
        .map_err(|e| e.to_string())?;
    let legacy = format!("{}?discport=0", record("legacy", 40)?.enode);
    let entry = legacy.clone();
    h.edit(Box::new(move |data| {
        let mut list: Vec<String> = data
            .get(schema::STATIC_NODES_KEY)
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or_default();
        list.push(entry);
        if let Ok(json) = serde_json::to_string(&list) {
            data.insert(schema::STATIC_NODES_KEY.into(), json);
        }
    }))
    .await?;
    client
        .upsert(record("conf-1", 1)?)
        .await
        .map_err(|e| e.to_string())?;
    let snap = client.snapshot().await.map_err(|e| e.to_string())?;
    ensure!(snap.legacy.len() == 1, "legacy: {:?}", snap.legacy);
    ensure!(
        static_nodes(&h.data().await?)?.contains(&legacy),
        "the legacy entry was dropped from static-nodes.json"
    );
    let legacy_enodes: Vec<Enode> = snap.legacy.clone();
    let snap = client
        .remove_legacy(legacy_enodes)
        .await
        .map_err(|e| e.to_string())?;
    ensure!(snap.legacy.is_empty(), "still legacy: {:?}", snap.legacy);
    ensure!(snap.members.len() == 2, "members: {:?}", pods(&snap));
    ensure!(
        !static_nodes(&h.data().await?)?.contains(&legacy),
        "remove_legacy left the entry in static-nodes.json"
    );
    Ok(())
}

/// Waits (up to `timeout`) for a watch item that satisfies `want`.
async fn watch_until(
    stream: &mut futures::stream::BoxStream<'static, crate::Result<Snapshot>>,
    timeout: Duration,
    what: &str,
    want: impl Fn(&Snapshot) -> bool,
) -> Outcome {
    let wait = async {
        while let Some(item) = stream.next().await {
            if let Ok(snap) = item
                && want(&snap)
            {
                return Ok(());
            }
        }
        Err(format!("the watch ended before {what}"))
    };
    tokio::time::timeout(timeout, wait)
        .await
        .map_err(|_| format!("the watch did not show {what} within {timeout:?}"))?
}

/// A watch shows registrations by another client, third-party edits and the
/// deletion of the object (an empty snapshot without a resourceVersion).
pub async fn watch_sees_changes(h: &dyn Harness, timeout: Duration) -> Outcome {
    let (watcher, writer) = (h.client(), h.client());
    let mut stream = watcher.watch();
    writer
        .upsert(record("conf-0", 0)?)
        .await
        .map_err(|e| e.to_string())?;
    watch_until(&mut stream, timeout, "the registration", |s| {
        s.members.contains_key("conf-0")
    })
    .await?;
    writer
        .upsert(record("conf-1", 1)?)
        .await
        .map_err(|e| e.to_string())?;
    watch_until(&mut stream, timeout, "the second registration", |s| {
        s.members.len() == 2
    })
    .await?;
    h.edit(Box::new(|data| {
        data.insert("operator-note".into(), "x".into());
    }))
    .await?;
    let rv = writer
        .snapshot()
        .await
        .map_err(|e| e.to_string())?
        .resource_version;
    watch_until(&mut stream, timeout, "the third-party edit", |s| {
        s.resource_version == rv
    })
    .await?;
    h.delete().await?;
    watch_until(&mut stream, timeout, "the deletion", |s| !s.exists()).await
}

/// Runs every check, each on a fresh harness from `fresh`; the first failure
/// is returned, prefixed by the check's name.
pub async fn run_all<H, F, Fut>(fresh: F) -> Outcome
where
    H: Harness,
    F: Fn() -> Fut,
    Fut: Future<Output = Result<H, String>>,
{
    fn name(check: &'static str) -> impl Fn(String) -> String {
        move |e| format!("{check}: {e}")
    }
    concurrent_registrants_none_lost(&fresh().await?, 20)
        .await
        .map_err(name("concurrent_registrants_none_lost"))?;
    conditional_removal_keeps_a_re_registered_member(&fresh().await?)
        .await
        .map_err(name("conditional_removal_keeps_a_re_registered_member"))?;
    create_keeps_a_stored_record(&fresh().await?)
        .await
        .map_err(name("create_keeps_a_stored_record"))?;
    unknown_keys_are_preserved(&fresh().await?)
        .await
        .map_err(name("unknown_keys_are_preserved"))?;
    legacy_entries_are_preserved(&fresh().await?)
        .await
        .map_err(name("legacy_entries_are_preserved"))?;
    watch_sees_changes(&fresh().await?, Duration::from_secs(10))
        .await
        .map_err(name("watch_sees_changes"))
}
