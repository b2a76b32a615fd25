//! What a [`LeaseRegistry`](super::LeaseRegistry) has seen: the member
//! Leases, each decoded once as it arrives, and the shared ConfigMap; and the
//! [`Snapshot`] made of them (Lease members win over the ConfigMap's).

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use geth_ipc::NodeId;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::ObjectMeta;

use super::{MEMBER_ANNOTATION, lease_name};
use crate::configmap::ConfigMapRegistry;
use crate::record::{MemberRecord, Snapshot};
use crate::schema;

// Names the doc links use.
#[cfg(doc)]
use crate::registry::PeerRegistry;

/// What the latest watch has seen: the Leases, the ConfigMap.
#[derive(Clone, Debug, Default)]
pub(super) struct View {
    /// Both watches have listed.
    pub(super) synced: bool,
    /// Filled by a [`PeerRegistry::snapshot`] read, not (yet) by a watch.
    pub(super) read: bool,
    /// The member Leases by name, each decoded once, as it arrives.
    pub(super) leases: BTreeMap<String, Decoded>,
    pub(super) configmap: Option<ConfigMap>,
    /// The largest resourceVersion seen (etcd's revision: one counter).
    pub(super) revision: u64,
}

/// A Lease's member record, or what is wrong with it.
pub(super) type Decoded = std::result::Result<MemberRecord, String>;

impl View {
    /// Takes in one Lease of registry `registry`.
    pub(super) fn put(&mut self, registry: &str, lease: &Lease) {
        self.revision = self.revision.max(revision(&lease.metadata));
        if let Some(name) = &lease.metadata.name {
            self.leases
                .insert(name.clone(), decode_lease(registry, lease));
        }
    }

    /// The members (by pod), and what was wrong with the other Leases.
    pub(super) fn members(&self) -> (BTreeMap<String, MemberRecord>, Vec<String>) {
        let (mut members, mut problems) = (BTreeMap::new(), Vec::new());
        for decoded in self.leases.values() {
            match decoded {
                Ok(rec) => {
                    members.insert(rec.pod.clone(), rec.clone());
                }
                Err(p) => problems.push(p.clone()),
            }
        }
        (members, problems)
    }
}

pub(super) fn lock(view: &Mutex<View>) -> MutexGuard<'_, View> {
    view.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(super) fn revision(meta: &ObjectMeta) -> u64 {
    meta.resource_version
        .as_deref()
        .and_then(|rv| rv.parse().ok())
        .unwrap_or(0)
}

/// The member record a Lease holds, or what is wrong with it.
pub(super) fn decode_lease(registry: &str, lease: &Lease) -> Decoded {
    let name = lease.metadata.name.as_deref().unwrap_or_default();
    let raw = lease
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(MEMBER_ANNOTATION))
        .ok_or_else(|| format!("lease {name:?}: no {MEMBER_ANNOTATION} annotation; skipped"))?;
    let rec: MemberRecord = serde_json::from_str(raw).map_err(|e| {
        format!(
            "lease {name:?}: annotation {MEMBER_ANNOTATION} is not a member record ({e}); \
             skipped (its pod rewrites it when it registers again; delete the lease if the pod \
             is gone)"
        )
    })?;
    if name != lease_name(registry, &rec.pod) {
        return Err(format!(
            "lease {name:?}: holds the record of pod {:?}, whose lease is {:?}; skipped",
            rec.pod,
            lease_name(registry, &rec.pod)
        ));
    }
    if rec.node_id != rec.enode.node_id() {
        return Err(format!(
            "lease {name:?}: nodeId {} is not the enode's node id {}; skipped",
            rec.node_id,
            rec.enode.node_id()
        ));
    }
    Ok(rec)
}

/// The snapshot of some Leases and the ConfigMap.
pub(super) fn snapshot_of(configmap: &ConfigMapRegistry, view: &View) -> Snapshot {
    let mut snap = configmap.observe(view.configmap.as_ref());
    let (leases, problems) = view.members();
    let data = view
        .configmap
        .as_ref()
        .and_then(|c| c.data.clone())
        .unwrap_or_default();
    let listed = schema::lease_members_listed(&data);
    let ids: Vec<NodeId> = leases
        .values()
        .flat_map(|m| [m.node_id, m.enode.node_id()])
        .collect();
    snap.legacy
        .retain(|e| !listed.contains(&e.node_id()) && !ids.contains(&e.node_id()));
    // Here the derived entries are the Leases' members (or entries of Leases
    // deleted since, which the publisher drops): none is a legacy entry.
    snap.derived.clear();
    snap.members.extend(leases);
    snap.problems.extend(problems);
    snap.resource_version =
        (view.configmap.is_some() || !view.leases.is_empty()).then(|| view.revision.to_string());
    snap
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::schema::tests::member;

    /// The Lease a member writes for `rec`.
    pub(in crate::lease) fn lease_of(registry: &str, rec: &MemberRecord) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some(lease_name(registry, &rec.pod)),
                annotations: Some(BTreeMap::from([(
                    MEMBER_ANNOTATION.to_owned(),
                    serde_json::to_string(rec).unwrap(),
                )])),
                ..ObjectMeta::default()
            },
            spec: None,
        }
    }

    #[test]
    fn a_lease_holds_its_pods_record_and_a_wrong_one_is_named_and_skipped() {
        let rec = member("geth-0", 1);
        assert_eq!(decode_lease("reg", &lease_of("reg", &rec)), Ok(rec.clone()));
        let mut elsewhere = lease_of("reg", &rec);
        elsewhere.metadata.name = Some("reg.geth-9".into());
        let why = decode_lease("reg", &elsewhere).unwrap_err();
        assert!(
            why.contains("reg.geth-9") && why.contains("geth-0"),
            "{why}"
        );
        let mut garbage = lease_of("reg", &rec);
        garbage.metadata.annotations = Some(BTreeMap::from([(
            MEMBER_ANNOTATION.to_owned(),
            "{".to_owned(),
        )]));
        let why = decode_lease("reg", &garbage).unwrap_err();
        assert!(why.contains("not a member record"), "{why}");
        let mut view = View::default();
        view.put("reg", &lease_of("reg", &rec));
        garbage.metadata.name = Some("reg.geth-5".into());
        view.put("reg", &garbage);
        let (members, problems) = view.members();
        assert_eq!(members.len(), 1);
        assert_eq!(problems.len(), 1);
    }
}
