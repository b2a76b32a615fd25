//! Rule 1, registration: this node's own record is written when it is missing
//! or differs from this node's identity, and never in steady state.

use peer_registry::{MemberRecord, Snapshot};

use super::Pass;
use crate::observation::Observation;
use crate::plan::{Problem, RegistryAction};

/// Registers this node, or fixes a record that differs. Sets
/// [`Pass::my_updated`] to when our record, as it will stand after this pass,
/// last changed.
pub(super) fn rule(pass: &mut Pass<'_>) {
    let (obs, snapshot) = (pass.obs, pass.snapshot);
    pass.my_updated = obs.now;
    match own_record(obs, snapshot) {
        Ok(record) => {
            pass.my_updated = record.updated_at;
            let existing = snapshot.members.get(&obs.me.pod);
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

/// The record this node should have, or why it cannot register.
fn own_record(obs: &Observation<'_>, snapshot: &Snapshot) -> Result<MemberRecord, Problem> {
    let me = obs.me;
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
    let existing = snapshot.members.get(&me.pod);
    // Same pod incarnation (same UID, or UID unknown on either side): keep the
    // original registration time.
    let registered_at = existing
        .filter(|e| match (&e.pod_uid, &me.pod_uid) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        })
        .map_or(obs.now, |e| e.registered_at);
    Ok(MemberRecord {
        pod: me.pod.clone(),
        node_id: me.node_id,
        enode: me.advertised.clone(),
        pod_uid: me.pod_uid.clone(),
        pod_ip: me.pod_ip.clone(),
        registered_at,
        updated_at: obs.now,
        sidecar_version: me.sidecar_version.clone(),
    })
}
