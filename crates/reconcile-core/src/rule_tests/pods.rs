//! Pod evidence: members whose pod is gone, replaced or at another address
//! are removed; records without a live pod are not dialled; evidence that
//! does not show this sidecar's own pod is ignored (engine/pods.rs).

use super::*;

#[test]
fn a_member_whose_pod_is_gone_is_removed_from_registry_and_geth() {
    let mut w = World::mesh(3);
    w.pods_of(&[1, 2]);
    let p = w.step();
    assert_eq!(removed_pods(&p), ["geth-3"]);
    assert_eq!(p.report.removals[0].reason, RemovalReason::PodGone);
    assert!(matches!(&p.registry[..], [RegistryAction::Remove(r)] if r.len() == 1));
    assert_eq!(p.geth, vec![RemovePeer(node(3))]);
    assert!(w.plan().is_empty());
}

#[test]
fn a_member_whose_pod_was_replaced_is_removed() {
    let mut w = World::mesh(2);
    w.pods_of(&[1, 2]);
    if let Some(pods) = w.pods.as_mut()
        && let Some(pod) = pods.get_mut("geth-2")
    {
        pod.uid = Some("another".into());
    }
    let p = w.plan();
    assert_eq!(removed_pods(&p), ["geth-2"]);
    assert!(matches!(
        p.report.removals[0].reason,
        RemovalReason::PodReplaced { .. }
    ));
}

#[test]
fn a_member_whose_pod_ip_changed_is_removed() {
    let mut w = World::mesh(2);
    w.pods_of(&[1, 2]);
    if let Some(pods) = w.pods.as_mut()
        && let Some(pod) = pods.get_mut("geth-1")
    {
        pod.ip = Some("10.50.0.1".into());
    }
    let p = w.plan();
    assert_eq!(removed_pods(&p), ["geth-1"]);
    assert!(matches!(
        p.report.removals[0].reason,
        RemovalReason::PodIpChanged { .. }
    ));
}

#[test]
fn with_pod_evidence_a_just_written_record_without_a_pod_is_kept_but_never_dialled() {
    let mut w = World::mesh(2);
    w.applied.clear();
    let fresh = w
        .now
        .checked_sub(jiff::SignedDuration::from_secs(5))
        .expect("range");
    w.snap_mut()
        .members
        .insert("geth-9".into(), record("geth-9", &node(9), fresh));
    w.pods_of(&[1, 2]);
    let p = w.plan();
    assert!(removed_pods(&p).is_empty(), "within its grace");
    assert_eq!(dialled(&p), [node(1), node(2)]);
    assert_eq!(p.report.unmatched.len(), 1, "{}", p.report);
    assert_eq!(p.report.unmatched[0].0.pod.as_deref(), Some("geth-9"));
    assert!(matches!(p.report.unmatched[0].1, RemovalReason::PodGone));
    // Without pod evidence it would be dialled.
    w.pods = None;
    assert!(dialled(&w.plan()).contains(&node(9)));
}

#[test]
fn with_pod_evidence_a_record_borrowing_a_live_pods_name_for_another_address_is_not_dialled() {
    let mut w = World::mesh(2);
    w.applied.clear();
    w.pods_of(&[1, 2]);
    // A ConfigMap writer rewrites member.geth-2: the pod's UID and IP fields are
    // copied, the enode points elsewhere.
    let elsewhere = node(2).with_host(Host::Ip("10.99.0.9".parse().expect("ip")));
    let mut forged = record("geth-2", &elsewhere, w.now);
    forged.pod_ip = Some(node(2).host().to_string());
    w.snap_mut().members.insert("geth-2".into(), forged);
    let p = w.plan();
    assert_eq!(dialled(&p), [node(1)]);
    assert!(
        matches!(&p.report.unmatched[..], [(_, RemovalReason::AddressNotPods { address, .. })] if address == "10.99.0.9"),
        "{}",
        p.report
    );
}

#[test]
fn pod_evidence_without_this_sidecars_own_pod_is_ignored() {
    let mut w = World::mesh(2);
    w.pods = Some(BTreeMap::new());
    let p = w.plan();
    assert!(p.report.removals.is_empty());
    assert!(matches!(
        p.report.problems[..],
        [Problem::PodEvidenceIgnored { .. }]
    ));
}

#[test]
fn pod_evidence_showing_this_pod_with_another_uid_is_ignored() {
    let mut w = World::mesh(2);
    w.pods_of(&[1]);
    w.me.pod_uid = Some("uid-geth-0".into());
    if let Some(pods) = w.pods.as_mut()
        && let Some(pod) = pods.get_mut("geth-0")
    {
        pod.uid = Some("old".into());
    }
    assert!(w.plan().report.removals.is_empty());
}

#[test]
fn a_member_whose_pod_is_alive_is_never_removed_for_unreachability() {
    let mut w = World::mesh(4);
    w.pods_of(&[1, 2, 3, 4]);
    w.unreachable_for(1, 100_000);
    let p = w.plan();
    assert!(p.report.removals.is_empty());
    assert_eq!(p.report.unreachable.len(), 1);
}
