//! The registry trait.

use futures::stream::BoxStream;

use crate::error::Result;
use crate::record::{MemberRecord, Snapshot};

/// The shared registry of mesh members.
///
/// Every write is a compare-and-swap on the stored version, retried on
/// conflicts: concurrent writers never lose each other's entries.
#[cfg_attr(any(test, feature = "test-utils"), mockall::automock)]
#[async_trait::async_trait]
pub trait PeerRegistry: Send + Sync + 'static {
    /// Fresh read (GET of the one named object). Missing object => `Ok` with a
    /// snapshot whose `resource_version` is `None`.
    async fn snapshot(&self) -> Result<Snapshot>;

    /// Registers or updates one member (keyed by `record.pod`). Compare-and-swap
    /// loop; creates the registry if missing. Returns a snapshot that holds
    /// this write: the ConfigMap registry's is the object as written; the
    /// lease layout's is its latest view (its watch's, or its last
    /// [`snapshot`](Self::snapshot)) with the write applied.
    ///
    /// A stored record that is the [same registration](MemberRecord::same_registration)
    /// with the same `sidecar_version` is kept as stored (timestamps alone never
    /// cause a write), so at steady state an upsert makes no write at all.
    async fn upsert(&self, record: MemberRecord) -> Result<Snapshot>;

    /// Registers `record` only when its pod has no record, without a read of
    /// the registry before it: a starting member's registration overlaps its
    /// first read instead of following it. A stored record is never changed
    /// (a restarted member keeps its registration time; its next
    /// [`upsert`](Self::upsert) decides what to update).
    ///
    /// Returns a snapshot that holds the pod's record (the new one, or the
    /// stored one when the registry read it anyway: the ConfigMap layout's
    /// compare-and-swap reads the object), or `None` when nothing was
    /// written and no snapshot read: the pod has a record (the lease
    /// layout's create says no more), or the registry cannot create without
    /// a read (the default, which does nothing). The ConfigMap layout's
    /// create is a compare-and-swap whatever its [`WriteProtocol`](crate::WriteProtocol)
    /// (one write per start).
    ///
    /// A wrapper of another registry should forward it; a mock used by a
    /// runner expects it (a start makes one).
    async fn create(&self, record: MemberRecord) -> Result<Option<Snapshot>> {
        let _ = record;
        Ok(None)
    }

    /// Removes each given record, only if the stored record for that pod is still
    /// the [same registration](MemberRecord::same_registration). Compare-and-swap
    /// loop. Returns the snapshot as written, or as read when there was nothing
    /// to remove (then nothing is written).
    async fn remove(&self, expected: Vec<MemberRecord>) -> Result<Snapshot>;

    /// Removes legacy members ([`Snapshot::legacy`]: `static-nodes.json`
    /// entries without a record) with these node ids from `static-nodes.json`.
    /// Compare-and-swap loop; nothing is written when none is there.
    async fn remove_legacy(&self, enodes: Vec<geth_ipc::Enode>) -> Result<Snapshot>;

    /// Follows changes: a fresh snapshot after every change (a deleted registry
    /// gives an empty snapshot with `resource_version` `None`), surviving watch
    /// timeouts, `410 Gone` and apiserver restarts. Errors are yielded as items and
    /// the stream goes on (with backoff); it does not end.
    fn watch(&self) -> BoxStream<'static, Result<Snapshot>>;
}
