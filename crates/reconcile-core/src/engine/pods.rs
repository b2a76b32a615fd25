//! Pod evidence: what the pod list says about a member, and whether the list
//! may be used at all.

use std::collections::BTreeMap;

use peer_registry::MemberRecord;

use crate::observation::{Observation, PodObservation};
use crate::plan::{Problem, RemovalReason};

/// What the pod list says about a member.
pub(super) enum PodVerdict {
    /// No usable pod evidence.
    Unknown,
    /// The member's pod is there, as recorded.
    Alive,
    /// The record is stale: this is why.
    Stale(RemovalReason),
}

pub(super) fn pod_verdict(
    record: &MemberRecord,
    pods: Option<&BTreeMap<String, PodObservation>>,
) -> PodVerdict {
    let Some(pods) = pods else {
        return PodVerdict::Unknown;
    };
    let Some(pod) = pods.get(&record.pod) else {
        return PodVerdict::Stale(RemovalReason::PodGone);
    };
    if let (Some(record_uid), Some(pod_uid)) = (&record.pod_uid, &pod.uid)
        && record_uid != pod_uid
    {
        return PodVerdict::Stale(RemovalReason::PodReplaced {
            record_uid: record_uid.clone(),
            pod_uid: pod_uid.clone(),
        });
    }
    if let (Some(record_ip), Some(pod_ip)) = (&record.pod_ip, &pod.ip)
        && record_ip != pod_ip
    {
        return PodVerdict::Stale(RemovalReason::PodIpChanged {
            record_ip: record_ip.clone(),
            pod_ip: pod_ip.clone(),
        });
    }
    // An IP in the enode must be the pod's own: a ConfigMap writer must not be
    // able to borrow a live pod's name for another address.
    if let (geth_ipc::Host::Ip(address), Some(pod_ip)) = (record.enode.host(), &pod.ip)
        && pod_ip
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip != *address)
    {
        return PodVerdict::Stale(RemovalReason::AddressNotPods {
            address: address.to_string(),
            pod_ip: pod_ip.clone(),
        });
    }
    PodVerdict::Alive
}

/// Pod evidence is used only when it shows this sidecar's own pod as it is: an
/// empty, partial or stale pod list must not remove members.
pub(super) fn trusted_pods<'a>(
    obs: &Observation<'a>,
    problems: &mut Vec<Problem>,
) -> Option<&'a BTreeMap<String, PodObservation>> {
    pod_list(obs).unwrap_or_else(|reason| {
        problems.push(Problem::PodEvidenceIgnored { reason });
        None
    })
}

/// The pod list when there is one and it may be used (see [`trusted_pods`]),
/// or why it may not.
pub(super) fn pod_list<'a>(
    obs: &Observation<'a>,
) -> Result<Option<&'a BTreeMap<String, PodObservation>>, &'static str> {
    let Some(pods) = obs.pods else {
        return Ok(None);
    };
    let Some(own) = pods.get(&obs.me.pod) else {
        return Err("the pod list does not contain this sidecar's own pod (incomplete list?)");
    };
    if let (Some(mine), Some(seen)) = (&obs.me.pod_uid, &own.uid)
        && mine != seen
    {
        return Err("the pod list shows this sidecar's own pod with another UID (stale list?)");
    }
    Ok(Some(pods))
}

/// Whether the pod watch saw this member's pod, with the record's UID, deleted
/// or replaced ([`Observation::pods_gone`]), and the pod list does not show
/// that pod with that UID again. Only with trusted pod evidence.
pub(super) fn seen_deleted(
    obs: &Observation<'_>,
    record: &MemberRecord,
    pods: Option<&BTreeMap<String, PodObservation>>,
) -> Option<RemovalReason> {
    let pods = pods?;
    let uid = record.pod_uid.as_ref()?;
    if obs.pods_gone.get(&record.pod) != Some(uid) {
        return None;
    }
    let still_there = pods
        .get(&record.pod)
        .is_some_and(|pod| pod.uid.as_ref() == Some(uid));
    (!still_there).then(|| RemovalReason::PodDeleted { uid: uid.clone() })
}
