//! Test helpers: valid enodes from secret keys, records, snapshots.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use geth_ipc::{Enode, Host, NodeId};
use jiff::{SignedDuration, Timestamp};
use k256::elliptic_curve::sec1::ToEncodedPoint;
use peer_registry::{MemberRecord, Snapshot};

use crate::{
    Config, Confirmation, GethAction, Observation, PeerObservation, Plan, PodObservation,
    RegistryAction, SelfIdentity, apply, apply_registry, plan,
};

/// A valid enode for secret key `seed` (any value; 0 is mapped to 1) at 10.0.x.y.
pub(crate) fn enode_from_secret(secret: [u8; 32], ip: Ipv4Addr, port: u16) -> Option<Enode> {
    let sk = k256::SecretKey::from_slice(&secret).ok()?;
    let point = sk.public_key().to_encoded_point(false);
    let bytes = point.as_bytes();
    let mut pubkey = [0u8; 64];
    pubkey.copy_from_slice(bytes.get(1..65)?);
    Enode::new(pubkey, Host::Ip(IpAddr::V4(ip)), port, None).ok()
}

pub(crate) fn enode(n: u8, ip_last: u8) -> Enode {
    let mut secret = [0u8; 32];
    secret[31] = n.max(1);
    secret[0] = 0x11;
    enode_from_secret(secret, Ipv4Addr::new(10, 0, 0, ip_last), 30303).expect("valid key")
}

pub(crate) fn t0() -> Timestamp {
    Timestamp::from_second(1_700_000_000).expect("valid timestamp")
}

pub(crate) fn at(secs: i64) -> Timestamp {
    t0().checked_add(SignedDuration::from_secs(secs))
        .expect("in range")
}

pub(crate) fn record(pod: &str, e: &Enode, updated_at: Timestamp) -> MemberRecord {
    MemberRecord {
        pod: pod.into(),
        node_id: e.node_id(),
        enode: e.clone(),
        pod_uid: Some(format!("uid-{pod}")),
        pod_ip: Some(e.host().to_string()),
        registered_at: updated_at,
        updated_at,
        sidecar_version: "test".into(),
    }
}

pub(crate) fn identity(pod: &str, e: &Enode) -> SelfIdentity {
    SelfIdentity {
        pod: pod.into(),
        node_id: e.node_id(),
        advertised: e.clone(),
        pod_uid: Some(format!("uid-{pod}")),
        pod_ip: Some(e.host().to_string()),
        sidecar_version: "test".into(),
    }
}

pub(crate) fn snapshot(records: impl IntoIterator<Item = MemberRecord>) -> Snapshot {
    Snapshot {
        resource_version: Some("1".into()),
        members: records.into_iter().map(|r| (r.pod.clone(), r)).collect(),
        external: Vec::new(),
        legacy: Vec::new(),
        derived: Default::default(),
        problems: Vec::new(),
    }
}

/// A test world: self is `geth-0` (key 1, 10.0.0.1); members `geth-N` have key N+1.
pub(crate) struct World {
    pub(crate) config: Config,
    pub(crate) now: Timestamp,
    pub(crate) me: SelfIdentity,
    pub(crate) snap: Option<Snapshot>,
    pub(crate) applied: BTreeMap<NodeId, Enode>,
    pub(crate) connected: BTreeMap<NodeId, PeerObservation>,
    pub(crate) unreachable: BTreeMap<NodeId, Timestamp>,
    pub(crate) pods: Option<BTreeMap<String, PodObservation>>,
    pub(crate) unusable: BTreeMap<NodeId, String>,
    pub(crate) seen: BTreeMap<NodeId, Timestamp>,
    pub(crate) probed_at: Option<Timestamp>,
    pub(crate) pods_gone: BTreeMap<String, String>,
    pub(crate) resolved: BTreeMap<NodeId, Vec<IpAddr>>,
    pub(crate) confirmations: BTreeMap<NodeId, Confirmation>,
}

pub(crate) fn node(i: u8) -> Enode {
    enode(i + 1, i + 1)
}

impl World {
    /// Self plus `n` other members, all registered long ago, all applied;
    /// removal by one observer's view (`confirmations_needed` 0).
    pub(crate) fn mesh(n: u8) -> Self {
        let me = identity("geth-0", &node(0));
        let long_ago = t0();
        let mut records = vec![record("geth-0", &node(0), long_ago)];
        let mut applied = BTreeMap::new();
        for i in 1..=n {
            records.push(record(&format!("geth-{i}"), &node(i), long_ago));
            applied.insert(node(i).node_id(), node(i));
        }
        Self {
            // One observer's view: the rules of liveness before agreement.
            // Agreement (`confirmations_needed`, default 2) is tested with
            // the rule, in `engine::liveness`.
            config: Config {
                confirmations_needed: 0,
                ..Config::default()
            },
            now: at(3600),
            me,
            snap: Some(snapshot(records)),
            applied,
            connected: BTreeMap::new(),
            unreachable: BTreeMap::new(),
            pods: None,
            unusable: BTreeMap::new(),
            seen: BTreeMap::new(),
            probed_at: None,
            pods_gone: BTreeMap::new(),
            resolved: BTreeMap::new(),
            confirmations: BTreeMap::new(),
        }
    }

    /// Seconds before now.
    pub(crate) fn ago(&self, secs: i64) -> Timestamp {
        self.now
            .checked_sub(jiff::SignedDuration::from_secs(secs))
            .expect("in range")
    }

    pub(crate) fn snap_mut(&mut self) -> &mut Snapshot {
        self.snap.get_or_insert_with(Snapshot::default)
    }

    pub(crate) fn connect(&mut self, i: u8) {
        self.connected.insert(
            node(i).node_id(),
            PeerObservation {
                eth_ready: true,
                inbound: false,
            },
        );
    }

    /// Member `i` unreachable since `secs_ago` seconds before now.
    pub(crate) fn unreachable_for(&mut self, i: u8, secs_ago: i64) {
        let since = self
            .now
            .checked_sub(jiff::SignedDuration::from_secs(secs_ago))
            .expect("in range");
        self.unreachable.insert(node(i).node_id(), since);
    }

    /// Pod evidence: self plus the listed members' pods as recorded.
    pub(crate) fn pods_of(&mut self, members: &[u8]) {
        let mut pods = BTreeMap::new();
        for &i in std::iter::once(&0).chain(members) {
            pods.insert(
                format!("geth-{i}"),
                PodObservation {
                    uid: Some(format!("uid-geth-{i}")),
                    ip: Some(node(i).host().to_string()),
                },
            );
        }
        self.pods = Some(pods);
    }

    pub(crate) fn plan(&self) -> Plan {
        let obs = Observation {
            connected: &self.connected,
            unreachable_since: &self.unreachable,
            pods: self.pods.as_ref(),
            unusable: &self.unusable,
            registrations_seen: &self.seen,
            probed_at: self.probed_at,
            pods_gone: &self.pods_gone,
            resolved: &self.resolved,
            confirmations: &self.confirmations,
            ..Observation::new(self.now, &self.me, self.snap.as_ref(), &self.applied)
        };
        plan(&self.config, &obs)
    }

    /// Plans, then executes the plan on the world's state.
    pub(crate) fn step(&mut self) -> Plan {
        let p = self.plan();
        apply(&mut self.applied, &p.geth);
        if let Some(s) = self.snap.as_mut() {
            apply_registry(s, &p.registry);
        }
        p
    }
}

pub(crate) fn removed_pods(p: &Plan) -> Vec<String> {
    p.report
        .removals
        .iter()
        .map(|r| r.record.pod.clone())
        .collect()
}

pub(crate) fn upserts(p: &Plan) -> Vec<&peer_registry::MemberRecord> {
    p.registry
        .iter()
        .filter_map(|a| match a {
            RegistryAction::Upsert(r) => Some(r),
            RegistryAction::Remove(_) | RegistryAction::RemoveLegacy(_) => None,
        })
        .collect()
}

/// Targets of the plan's geth actions.
pub(crate) fn dialled(p: &Plan) -> Vec<Enode> {
    p.geth
        .iter()
        .filter_map(|a| match a {
            GethAction::AddPeer(e) | GethAction::AddTrustedPeer(e) => Some(e.clone()),
            GethAction::RemovePeer(_) | GethAction::RemoveTrustedPeer(_) => None,
        })
        .collect()
}
