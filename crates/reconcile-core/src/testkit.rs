//! Test helpers: valid enodes from secret keys, records, snapshots.

use std::net::{IpAddr, Ipv4Addr};

use geth_ipc::{Enode, Host};
use jiff::{SignedDuration, Timestamp};
use k256::elliptic_curve::sec1::ToEncodedPoint;
use peer_registry::{MemberRecord, Snapshot};

use crate::SelfIdentity;

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
        problems: Vec::new(),
    }
}
