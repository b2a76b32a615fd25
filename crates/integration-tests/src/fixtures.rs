//! Data fixtures: valid enodes and member records without a running geth.

use std::net::Ipv4Addr;

use geth_ipc::{Enode, Host};
use peer_registry::MemberRecord;

/// A valid enode whose key is derived from `seed` (deterministic, on the curve).
pub fn test_enode(seed: u32, ip: Ipv4Addr) -> Enode {
    let mut scalar = [0u8; 32];
    scalar[28..].copy_from_slice(&(seed + 1).to_be_bytes());
    scalar[0] = 0x11;
    let sk = k256::SecretKey::from_slice(&scalar).expect("valid scalar");
    let point =
        k256::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(&sk.public_key(), false);
    let mut pubkey = [0u8; 64];
    pubkey.copy_from_slice(&point.as_bytes()[1..]);
    Enode::new(pubkey, Host::Ip(ip.into()), 30303, None).expect("valid enode")
}

/// A member record for pod `pod` with a key derived from `seed`.
pub fn test_member(pod: &str, seed: u32) -> MemberRecord {
    let ip = Ipv4Addr::new(198, 19, (seed / 250) as u8, (seed % 250) as u8 + 2);
    let enode = test_enode(seed, ip);
    let now = jiff::Timestamp::now();
    MemberRecord {
        pod: pod.to_owned(),
        node_id: enode.node_id(),
        enode,
        pod_uid: Some(format!("uid-{seed}")),
        pod_ip: Some(ip.to_string()),
        registered_at: now,
        updated_at: now,
        sidecar_version: "test".into(),
    }
}
