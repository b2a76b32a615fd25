//! Rule 1, registration: this node's own record is written when it is missing
//! or differs from this node's identity, and never in steady state.

use jiff::Timestamp;
use peer_registry::MemberRecord;

use super::Pass;
use crate::observation::SelfIdentity;
use crate::plan::{Problem, RegistryAction};

/// Registers this node, or fixes a record that differs. Sets
/// [`Pass::my_updated`] to when our record, as it will stand after this pass,
/// last changed.
pub(super) fn rule(pass: &mut Pass<'_>) {
    let (obs, snapshot) = (pass.obs, pass.snapshot);
    pass.my_updated = obs.now;
    let existing = snapshot.members.get(&obs.me.pod);
    match own_record(obs.me, existing, obs.now) {
        Ok(record) => {
            pass.my_updated = record.updated_at;
            let unchanged = existing.is_some_and(|existing| {
                existing.same_registration(&record)
                    && existing.sidecar_version == record.sidecar_version
            });
            if let Some(existing) = existing.filter(|_| unchanged) {
                pass.my_updated = existing.updated_at;
            }
            if !unchanged {
                pass.report.registering = true;
                pass.registry.push(RegistryAction::Upsert(record));
            }
        }
        Err(problem) => pass.report.problems.push(problem),
    }
}

/// The record this node should have at `now`, given the record the registry
/// holds for its pod (`existing`, none for a new registration), or why it
/// cannot register. A record of the same pod incarnation (same UID, or the UID
/// unknown on either side) keeps its registration time.
///
/// A starting sidecar uses it with no `existing` record to register before
/// its first read of the registry arrives, with a write that creates the
/// record only when the pod has none (`PeerRegistry::create`).
///
/// ```
/// use geth_ipc::Enode;
/// use reconcile_core::{SelfIdentity, own_record};
///
/// let enode: Enode = "enode://6f8a80d14311c39f35f516fa664deaaaa13e85b2f7493f37f6144d86991ec012937307647bd3b9a82abe2974e1407241d54947bbb39763a4cac9f77166ad92a0@10.0.0.5:30303".parse()?;
/// let me = SelfIdentity {
///     pod: "geth-0".into(),
///     node_id: enode.node_id(),
///     advertised: enode,
///     pod_uid: Some("uid-1".into()),
///     pod_ip: Some("10.0.0.5".into()),
///     sidecar_version: "0.1.0".into(),
/// };
/// let now = jiff::Timestamp::now();
/// let record = own_record(&me, None, now)?;
/// assert_eq!((record.pod.as_str(), record.registered_at), ("geth-0", now));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn own_record(
    me: &SelfIdentity,
    existing: Option<&MemberRecord>,
    now: Timestamp,
) -> Result<MemberRecord, Problem> {
    if me.advertised.node_id() != me.node_id {
        return Err(Problem::SelfNodeIdMismatch {
            advertised: me.advertised.node_id(),
            node_id: me.node_id,
        });
    }
    if me.advertised.host().is_local() {
        return Err(Problem::SelfAdvertisesLocalAddress {
            enode: me.advertised.to_string(),
        });
    }
    let registered_at = existing
        .filter(|e| match (&e.pod_uid, &me.pod_uid) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        })
        .map_or(now, |e| e.registered_at);
    Ok(MemberRecord {
        pod: me.pod.clone(),
        node_id: me.node_id,
        enode: me.advertised.clone(),
        pod_uid: me.pod_uid.clone(),
        pod_ip: me.pod_ip.clone(),
        registered_at,
        updated_at: now,
        sidecar_version: me.sidecar_version.clone(),
    })
}
