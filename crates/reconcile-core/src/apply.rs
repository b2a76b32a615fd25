//! Pure models of what executing a plan changes: geth's static set as this
//! sidecar knows it, and the registry's members.

use std::collections::BTreeMap;

use geth_ipc::{Enode, NodeId};
use peer_registry::Snapshot;

use crate::plan::{GethAction, RegistryAction};

/// Records executed geth calls in `applied` (this sidecar's record of geth's static
/// set), with geth's semantics: `AddPeer` of an id already present is ignored,
/// `RemovePeer` removes by id, trusted-peer calls do not change the static set.
///
/// Call it after each successful call (or with the whole list once all succeeded).
///
/// ```
/// use std::collections::BTreeMap;
/// use geth_ipc::Enode;
/// use reconcile_core::{GethAction, apply};
///
/// let a: Enode = "enode://6f8a80d14311c39f35f516fa664deaaaa13e85b2f7493f37f6144d86991ec012937307647bd3b9a82abe2974e1407241d54947bbb39763a4cac9f77166ad92a0@10.0.0.1:30303".parse()?;
/// let moved = a.with_host("10.0.0.9".parse()?);
/// let mut applied = BTreeMap::new();
/// apply(&mut applied, &[GethAction::AddPeer(a.clone())]);
/// apply(&mut applied, &[GethAction::AddPeer(moved.clone())]); // ignored, as geth does
/// assert!(applied[&a.node_id()].same_address(&a));
/// apply(&mut applied, &[GethAction::RemovePeer(a.clone()), GethAction::AddPeer(moved.clone())]);
/// assert!(applied[&a.node_id()].same_address(&moved));
/// # Ok::<(), geth_ipc::EnodeError>(())
/// ```
pub fn apply(applied: &mut BTreeMap<NodeId, Enode>, actions: &[GethAction]) {
    for action in actions {
        match action {
            GethAction::AddPeer(e) => {
                applied.entry(e.node_id()).or_insert_with(|| e.clone());
            }
            GethAction::RemovePeer(e) => {
                applied.remove(&e.node_id());
            }
            GethAction::AddTrustedPeer(_) | GethAction::RemoveTrustedPeer(_) => {}
        }
    }
}

/// Applies registry writes to a snapshot's members as the store does: `Upsert`
/// replaces the record of its pod; `Remove` removes each record only if the stored
/// one is still exactly equal (conditional removal). The resource version is not
/// touched. Useful for tests and simulations.
pub fn apply_registry(snapshot: &mut Snapshot, actions: &[RegistryAction]) {
    for action in actions {
        match action {
            RegistryAction::Upsert(record) => {
                snapshot.members.insert(record.pod.clone(), record.clone());
            }
            RegistryAction::Remove(records) => {
                for record in records {
                    if snapshot.members.get(&record.pod) == Some(record) {
                        snapshot.members.remove(&record.pod);
                    }
                }
            }
            RegistryAction::RemoveLegacy(enodes) => {
                snapshot
                    .legacy
                    .retain(|l| !enodes.iter().any(|e| e.node_id() == l.node_id()));
            }
        }
    }
}
