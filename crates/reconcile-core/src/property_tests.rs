//! Property tests over arbitrary worlds.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use geth_ipc::{Enode, NodeId};
use jiff::{SignedDuration, Timestamp};
use peer_registry::{MemberRecord, Snapshot};
use proptest::prelude::*;

use crate::testkit::{enode_from_secret, t0};
use crate::{
    Config, Confirmation, GethAction, Observation, PeerObservation, Plan, PodObservation, Problem,
    RegistryAction, RemovalReason, SelfIdentity, apply, apply_registry, plan,
};

/// An arbitrary world, owned.
#[derive(Debug, Clone)]
struct Case {
    config: Config,
    now: Timestamp,
    me: SelfIdentity,
    snap: Option<Snapshot>,
    applied: BTreeMap<NodeId, Enode>,
    connected: BTreeMap<NodeId, PeerObservation>,
    unreachable: BTreeMap<NodeId, Timestamp>,
    pods: Option<BTreeMap<String, PodObservation>>,
    unusable: BTreeMap<NodeId, String>,
    pods_gone: BTreeMap<String, String>,
    confirmations: BTreeMap<NodeId, Confirmation>,
}

impl Case {
    fn observation(&self) -> Observation<'_> {
        Observation {
            connected: &self.connected,
            unreachable_since: &self.unreachable,
            pods: self.pods.as_ref(),
            unusable: &self.unusable,
            pods_gone: &self.pods_gone,
            confirmations: &self.confirmations,
            ..Observation::new(self.now, &self.me, self.snap.as_ref(), &self.applied)
        }
    }

    fn plan(&self) -> Plan {
        plan(&self.config, &self.observation())
    }

    fn others(&self) -> impl Iterator<Item = &MemberRecord> {
        self.snap
            .iter()
            .flat_map(|s| s.members.values())
            .filter(|r| r.pod != self.me.pod)
    }
}

const POOL: usize = 6;

fn key_pool() -> impl Strategy<Value = Vec<[u8; 32]>> {
    prop::collection::vec(
        prop::array::uniform32(any::<u8>()).prop_filter("valid secret key", |k| {
            k256::SecretKey::from_slice(k).is_ok()
        }),
        POOL,
    )
}

fn at_ip(keys: &[[u8; 32]], key: usize, ip: u8, port: u16) -> Option<Enode> {
    enode_from_secret(keys[key % keys.len()], Ipv4Addr::new(10, 0, 0, ip), port)
}

fn opt_uid(choice: u8, pod: usize) -> Option<String> {
    match choice % 3 {
        0 => None,
        1 => Some(format!("uid-{pod}")),
        _ => Some(format!("uid-{pod}-other")),
    }
}

fn opt_ip(choice: u8) -> Option<String> {
    match choice % 4 {
        0 => None,
        c => Some(format!("10.0.0.{c}")),
    }
}

prop_compose! {
    fn case()(
        keys in key_pool(),
        trusted in any::<bool>(),
        dead_after in 0u64..400,
        grace in 0u64..200,
        synced in prop::bool::weighted(0.9),
        exists in prop::bool::weighted(0.9),
        me_ip in 1u8..4,
        me_uid in any::<u8>(),
        // pod index, key index, ip, port choice, updated (s before now), uid, record ip
        members in prop::collection::vec(
            (0usize..POOL, 0usize..POOL, 1u8..4, any::<bool>(), -100i64..1000, any::<u8>(), any::<u8>()),
            0..8,
        ),
        external in prop::collection::vec((0usize..POOL, 1u8..4), 0..3),
        applied in prop::collection::vec((0usize..POOL, 1u8..4, any::<bool>()), 0..6),
        connected in prop::collection::vec((0usize..POOL, any::<bool>()), 0..4),
        unreachable in prop::collection::vec((0usize..POOL, 0i64..2000), 0..6),
        pods in prop::option::of(prop::collection::vec((0usize..POOL, any::<u8>(), any::<u8>()), 0..6)),
        unusable in prop::collection::vec(0usize..POOL, 0..2),
        confirmations_needed in 0usize..3,
        // key, round (s before now), unreachable answers, reachable answers, last reachable
        confirmations in prop::collection::vec(
            (0usize..POOL, 0i64..2000, 0usize..4, 0usize..3, prop::option::of(0i64..2000)),
            0..4,
        ),
        pods_gone in prop::collection::vec((0usize..POOL, any::<u8>()), 0..3),
    ) -> Option<Case> {
        let now = t0().checked_add(SignedDuration::from_secs(100_000)).ok()?;
        let ago = |s: i64| now.checked_sub(SignedDuration::from_secs(s)).ok();
        let port = |p: bool| if p { 30303 } else { 30304 };
        let me_enode = at_ip(&keys, 0, me_ip, 30303)?;
        let me = SelfIdentity {
            pod: "geth-0".into(),
            node_id: me_enode.node_id(),
            advertised: me_enode,
            pod_uid: opt_uid(me_uid, 0),
            pod_ip: Some(format!("10.0.0.{me_ip}")),
            sidecar_version: "test".into(),
        };
        let mut snap = Snapshot {
            resource_version: exists.then(|| "1".to_owned()),
            ..Snapshot::default()
        };
        for (pod, key, ip, p, updated, uid, rip) in members {
            let enode = at_ip(&keys, key, ip, port(p))?;
            let updated_at = ago(updated)?;
            let name = format!("geth-{pod}");
            snap.members.insert(name.clone(), MemberRecord {
                pod: name,
                node_id: enode.node_id(),
                enode,
                pod_uid: opt_uid(uid, pod),
                pod_ip: opt_ip(rip),
                registered_at: updated_at,
                updated_at,
                sidecar_version: "test".into(),
            });
        }
        for (key, ip) in external {
            snap.external.push(at_ip(&keys, key, ip, 30303)?);
        }
        let mut applied_map = BTreeMap::new();
        for (key, ip, p) in applied {
            let e = at_ip(&keys, key, ip, port(p))?;
            applied_map.insert(e.node_id(), e);
        }
        let id = |key: usize| at_ip(&keys, key, 1, 30303).map(|e| e.node_id());
        let mut connected_map = BTreeMap::new();
        for (key, ready) in connected {
            connected_map.insert(id(key)?, PeerObservation { eth_ready: ready, inbound: false });
        }
        let mut unreachable_map = BTreeMap::new();
        for (key, secs) in unreachable {
            unreachable_map.insert(id(key)?, ago(secs)?);
        }
        let pods = match pods {
            None => None,
            Some(list) => {
                let mut m = BTreeMap::new();
                for (pod, uid, ip) in list {
                    m.insert(format!("geth-{pod}"), PodObservation { uid: opt_uid(uid, pod), ip: opt_ip(ip) });
                }
                Some(m)
            }
        };
        let mut unusable_map = BTreeMap::new();
        for key in unusable {
            unusable_map.insert(id(key)?, "genesis mismatch".to_owned());
        }
        let mut confirmations_map = BTreeMap::new();
        for (key, at, unreachable, reachable, last_reachable) in confirmations {
            let last_reachable = match last_reachable {
                Some(secs) => Some(ago(secs)?),
                None => None,
            };
            confirmations_map.insert(id(key)?, Confirmation {
                at: ago(at)?,
                asked: unreachable + reachable,
                unreachable,
                reachable,
                last_reachable,
            });
        }
        let mut pods_gone_map = BTreeMap::new();
        for (pod, uid) in pods_gone {
            if let Some(uid) = opt_uid(uid, pod) {
                pods_gone_map.insert(format!("geth-{pod}"), uid);
            }
        }
        Some(Case {
            config: Config {
                trusted,
                dead_after: Duration::from_secs(dead_after),
                grace_after_register: Duration::from_secs(grace),
                dial_grace: Duration::from_secs(grace % 3),
                member_cidrs: Vec::new(),
                stale_entry_after: Duration::from_secs(10),
                legacy_members: true,
                confirmations_needed,
                confirmation_max_age: Duration::from_secs(15),
            },
            now,
            me,
            snap: synced.then_some(snap),
            applied: applied_map,
            connected: connected_map,
            unreachable: unreachable_map,
            pods,
            unusable: unusable_map,
            pods_gone: pods_gone_map,
            confirmations: confirmations_map,
        })
    }
}

fn cases() -> impl Strategy<Value = Case> {
    case().prop_filter_map("valid enodes", |c| c)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn a_plan_executed_then_replanned_is_a_no_op(c in cases()) {
        let first = c.plan();
        let mut next = c.clone();
        apply(&mut next.applied, &first.geth);
        if let Some(s) = next.snap.as_mut() {
            apply_registry(s, &first.registry);
        }
        let second = next.plan();
        prop_assert!(second.geth.is_empty(), "first {:?}\nsecond {:?}", first.geth, second.geth);
        prop_assert!(second.registry.is_empty(), "first {:?}\nsecond {:?}", first.registry, second.registry);
        // And the same observation always gives the same plan.
        prop_assert_eq!(c.plan(), first);
    }

    #[test]
    fn self_is_never_removed(c in cases()) {
        let p = c.plan();
        for r in &p.report.removals {
            prop_assert_ne!(&r.record.pod, &c.me.pod);
            prop_assert_ne!(r.record.node_id, c.me.node_id);
            prop_assert_ne!(r.record.enode.node_id(), c.me.node_id);
        }
    }

    #[test]
    fn a_member_connected_to_this_geth_is_never_removed(c in cases()) {
        let p = c.plan();
        for r in &p.report.removals {
            prop_assert!(!c.connected.contains_key(&r.record.enode.node_id()));
            prop_assert!(!c.connected.contains_key(&r.record.node_id));
        }
        // Nor cut from geth.
        for a in &p.geth {
            if let GethAction::RemovePeer(e) = a {
                prop_assert!(!c.connected.contains_key(&e.node_id()));
            }
        }
    }

    #[test]
    fn geth_never_ignores_an_add_peer_of_the_plan(c in cases()) {
        // Simulating geth's static set (AddPeer ignored for a known id), every
        // AddPeer lands: a moved id always has RemovePeer before AddPeer.
        let p = c.plan();
        let mut geth = c.applied.clone();
        for a in &p.geth {
            if let GethAction::AddPeer(e) = a
                && let Some(current) = geth.get(&e.node_id())
            {
                prop_assert!(current.same_address(e), "AddPeer {e:?} over {current:?}: {:?}", p.geth);
            }
            apply(&mut geth, std::slice::from_ref(a));
        }
    }

    #[test]
    fn a_partitioned_observer_never_removes_anyone(mut c in cases()) {
        c.connected.clear();
        c.pods = None;
        let ids: Vec<NodeId> = c.others().flat_map(|r| [r.node_id, r.enode.node_id()]).collect();
        let long_ago = c.now.checked_sub(SignedDuration::from_secs(1_000_000)).unwrap_or(c.now);
        for id in ids {
            c.unreachable.insert(id, long_ago);
        }
        let p = c.plan();
        prop_assert!(p.report.removals.is_empty(), "{:?}", p.report.removals);
        prop_assert!(!p.registry.iter().any(|a| matches!(a, RegistryAction::Remove(_))));
    }

    #[test]
    fn removals_follow_the_rules(c in cases()) {
        let p = c.plan();
        for r in &p.report.removals {
            let since_update = c.now.duration_since(r.record.updated_at).abs();
            if let RemovalReason::PodDeleted { uid } = &r.reason {
                // Seen deleted by the pod watch: no grace, but trusted evidence.
                prop_assert_eq!(c.pods_gone.get(&r.record.pod), Some(uid));
                let trusted = c.pods.is_some()
                    && !p.report.problems.iter().any(|p| matches!(p, Problem::PodEvidenceIgnored { .. }));
                prop_assert!(trusted);
                continue;
            }
            prop_assert!(since_update >= SignedDuration::try_from(c.config.grace_after_register).unwrap_or(SignedDuration::MAX));
            if let RemovalReason::Unreachable { for_, confirmed, .. } = &r.reason {
                prop_assert!(*for_ >= c.config.dead_after);
                // Agreement: enough other observers, none reaching it.
                prop_assert!(*confirmed >= c.config.confirmations_needed);
                if c.config.confirmations_needed > 0 {
                    let round = c.confirmations.get(&r.record.enode.node_id());
                    prop_assert!(round.is_some_and(|round| round.reachable == 0));
                }
                let no_pod_evidence = c.pods.is_none()
                    || p.report.problems.iter().any(|p| matches!(p, Problem::PodEvidenceIgnored { .. }));
                prop_assert!(no_pod_evidence);
                prop_assert!(!p.report.suspected_partition);
            }
        }
    }

    #[test]
    fn nothing_is_planned_before_the_registry_is_read(mut c in cases()) {
        c.snap = None;
        let p = c.plan();
        prop_assert!(p.is_empty());
        prop_assert!(!p.report.registry_synced);
    }
}
