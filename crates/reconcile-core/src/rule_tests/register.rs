//! Registration: this sidecar's own record (written when absent or changed,
//! never at a loopback address or under another geth's key), and nothing
//! planned before the registry is read (engine/register.rs).

use super::*;

#[test]
fn registers_self_when_its_record_is_absent() {
    let mut w = World::mesh(2);
    w.snap_mut().members.remove("geth-0");
    let p = w.plan();
    let ups = upserts(&p);
    assert_eq!(ups.len(), 1);
    assert_eq!(ups[0].pod, "geth-0");
    assert_eq!(ups[0].registered_at, w.now);
    assert_eq!(ups[0].updated_at, w.now);
    assert!(p.report.registering);
}

#[test]
fn re_registers_at_once_when_the_configmap_is_gone() {
    let mut w = World::mesh(0);
    w.snap = Some(Snapshot::default());
    let p = w.plan();
    assert_eq!(upserts(&p).len(), 1);
}

#[test]
fn steady_state_makes_no_registry_writes_and_no_geth_calls() {
    let mut w = World::mesh(3);
    w.connect(1);
    let p = w.plan();
    assert!(p.is_empty(), "{p:?}");
    assert_eq!(p.report.desired, 3);
    assert_eq!(p.report.connected, 1);
    assert_eq!(p.report.missing.len(), 2);
}

#[test]
fn re_registers_when_own_enode_changes_keeping_registered_at() {
    let mut w = World::mesh(1);
    w.me.advertised = node(0).with_host(Host::Ip("10.9.9.9".parse().expect("ip")));
    w.me.pod_ip = Some("10.9.9.9".into());
    let p = w.plan();
    let ups = upserts(&p);
    assert_eq!(ups.len(), 1);
    assert_eq!(ups[0].registered_at, t0());
    assert_eq!(ups[0].updated_at, w.now);
    assert!(ups[0].enode.same_address(&w.me.advertised));
}

#[test]
fn a_new_pod_uid_resets_registered_at() {
    let mut w = World::mesh(1);
    w.me.pod_uid = Some("new-uid".into());
    let p = w.plan();
    assert_eq!(upserts(&p)[0].registered_at, w.now);
}

#[test]
fn a_new_sidecar_version_is_written_once() {
    let mut w = World::mesh(1);
    w.me.sidecar_version = "2.0".into();
    assert_eq!(upserts(&w.step()).len(), 1);
    w.now = at(4000);
    assert!(w.plan().registry.is_empty());
}

#[test]
fn never_publishes_a_loopback_address() {
    let mut w = World::mesh(1);
    w.snap_mut().members.remove("geth-0");
    w.me.advertised = node(0).with_host(Host::Ip("127.0.0.1".parse().expect("ip")));
    let p = w.plan();
    assert!(p.registry.is_empty());
    assert!(matches!(
        p.report.problems[..],
        [Problem::SelfAdvertisesLocalAddress { .. }]
    ));
}

#[test]
fn never_publishes_an_enode_whose_key_is_not_this_geths() {
    let mut w = World::mesh(1);
    w.snap_mut().members.remove("geth-0");
    w.me.advertised = node(5);
    let p = w.plan();
    assert!(p.registry.is_empty());
    assert!(matches!(
        p.report.problems[..],
        [Problem::SelfNodeIdMismatch { .. }]
    ));
}

#[test]
fn plans_nothing_until_the_registry_is_read() {
    let mut w = World::mesh(2);
    w.snap = None;
    w.unreachable_for(1, 100_000);
    let p = w.plan();
    assert!(p.is_empty());
    assert!(!p.report.registry_synced);
    assert!(p.report.to_string().contains("not read"));
}
