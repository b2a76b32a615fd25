//! Which members this sidecar may probe, and at which addresses. A record the
//! engine refuses (loopback, outside `member_cidrs`, a DNS host unresolved or
//! resolving to a refused address or not to its pod, a record that does not
//! match its pod) is never probed: whoever can write the registry must not
//! turn every sidecar into a connect scanner.

use std::net::SocketAddr;

use geth_ipc::{Enode, Host, NodeId};
use serde::Serialize;

use super::pods::{PodVerdict, pod_list, pod_verdict};
use super::{Pass, members};
use crate::config::Config;
use crate::observation::Observation;
use crate::plan::PeerRef;

/// A member (or legacy entry) this sidecar may probe, and where.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProbeTarget {
    /// The member (no pod for a legacy entry). Report its failures in
    /// [`Observation::unreachable_since`] under `peer.node_id`.
    pub peer: PeerRef,
    /// Where to probe: the enode's IP, or the addresses its DNS host resolved
    /// to ([`Observation::resolved`]), each at the enode's TCP port. Probe
    /// these, not a new lookup: the addresses probed are the ones checked.
    pub addresses: Vec<SocketAddr>,
}

/// The members and legacy entries this sidecar may probe, in the order the
/// engine sees them (members by pod, then legacy entries). Pure: the same
/// refusals as [`plan`](crate::plan) (see the crate documentation), and empty
/// before the registry has been read. This node and external peers are never
/// listed.
///
/// ```
/// use std::collections::BTreeMap;
/// use geth_ipc::Enode;
/// use peer_registry::{MemberRecord, Snapshot};
/// use reconcile_core::{Config, Observation, SelfIdentity, probe_targets};
///
/// let me_enode: Enode = "enode://6f8a80d14311c39f35f516fa664deaaaa13e85b2f7493f37f6144d86991ec012937307647bd3b9a82abe2974e1407241d54947bbb39763a4cac9f77166ad92a0@10.0.0.1:30303".parse()?;
/// let peer: Enode = "enode://5cbdf0646e5db4eaa398f365f2ea7a0e3d419b7e0330e39ce92bddedcac4f9bc6aebca40ba255960a3178d6d861a54dba813d0b813fde7b5a5082628087264da@127.0.0.1:30303".parse()?;
/// let now = jiff::Timestamp::from_second(1_700_000_000)?;
/// let me = SelfIdentity {
///     pod: "geth-0".into(), node_id: me_enode.node_id(), advertised: me_enode,
///     pod_uid: None, pod_ip: None, sidecar_version: "0.1.0".into(),
/// };
/// let mut snapshot = Snapshot { resource_version: Some("1".into()), ..Snapshot::default() };
/// snapshot.members.insert("geth-1".into(), MemberRecord {
///     pod: "geth-1".into(), node_id: peer.node_id(), enode: peer, pod_uid: None,
///     pod_ip: None, registered_at: now, updated_at: now, sidecar_version: "0.1.0".into(),
/// });
/// let applied = BTreeMap::new();
/// let obs = Observation::new(now, &me, Some(&snapshot), &applied);
/// // A record at a loopback address is refused: never dialled, never probed.
/// assert!(probe_targets(&Config::default(), &obs).is_empty());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn probe_targets(config: &Config, obs: &Observation<'_>) -> Vec<ProbeTarget> {
    let Some(snapshot) = obs.registry else {
        return Vec::new();
    };
    let mut pass = Pass::new(config, obs, snapshot);
    members::rule(&mut pass);
    let pods = pod_list(obs).ok().flatten();
    let members = pass
        .others
        .iter()
        .filter(|o| !matches!(pod_verdict(o.record, pods), PodVerdict::Stale(_)))
        .map(|o| ProbeTarget {
            peer: o.peer_ref(),
            addresses: addresses(obs, o.id, &o.record.enode),
        });
    let legacy = pass.legacy.iter().map(|l| ProbeTarget {
        peer: l.peer_ref(),
        addresses: addresses(obs, l.id, l.enode),
    });
    members.chain(legacy).collect()
}

/// The addresses to probe for an enode the members rule accepted.
fn addresses(obs: &Observation<'_>, id: NodeId, enode: &Enode) -> Vec<SocketAddr> {
    let port = enode.tcp_port();
    match enode.host() {
        Host::Ip(ip) => vec![SocketAddr::new(*ip, port)],
        Host::Dns(_) => obs
            .resolved
            .get(&id)
            .into_iter()
            .flatten()
            .map(|ip| SocketAddr::new(*ip, port))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use geth_ipc::Host;

    use super::probe_targets;
    use crate::Observation;
    use crate::testkit::{World, node};

    fn probed(w: &World) -> Vec<(Option<String>, Vec<SocketAddr>)> {
        let obs = Observation {
            pods: w.pods.as_ref(),
            resolved: &w.resolved,
            ..Observation::new(w.now, &w.me, w.snap.as_ref(), &w.applied)
        };
        probe_targets(&w.config, &obs)
            .into_iter()
            .map(|t| (t.peer.pod, t.addresses))
            .collect()
    }

    fn at(ip: &str) -> SocketAddr {
        SocketAddr::new(ip.parse().expect("ip"), 30303)
    }

    fn set_host(w: &mut World, pod: &str, host: Host) {
        let record = w.snap_mut().members.get_mut(pod).expect("member");
        record.enode = record.enode.with_host(host);
    }

    #[test]
    fn members_are_probed_at_their_address_and_self_never() {
        let mut w = World::mesh(2);
        w.snap_mut().legacy.push(node(7));
        assert_eq!(
            probed(&w),
            [
                (Some("geth-1".to_owned()), vec![at("10.0.0.2")]),
                (Some("geth-2".to_owned()), vec![at("10.0.0.3")]),
                (None, vec![at("10.0.0.8")]),
            ]
        );
    }

    #[test]
    fn a_refused_record_is_never_probed() {
        let mut w = World::mesh(5);
        w.config.member_cidrs = vec!["10.0.0.0/16".parse().expect("CIDR")];
        set_host(&mut w, "geth-1", Host::Ip("127.0.0.1".parse().expect("ip")));
        set_host(
            &mut w,
            "geth-2",
            Host::Ip("192.168.0.9".parse().expect("ip")),
        );
        set_host(&mut w, "geth-3", Host::Dns("unresolved.example".into()));
        set_host(&mut w, "geth-4", Host::Dns("outside.example".into()));
        w.resolved
            .insert(node(4).node_id(), vec!["192.168.0.4".parse().expect("ip")]);
        set_host(&mut w, "geth-5", Host::Dns("inside.example".into()));
        w.resolved
            .insert(node(5).node_id(), vec!["10.0.9.5".parse().expect("ip")]);
        assert_eq!(
            probed(&w),
            [(Some("geth-5".to_owned()), vec![at("10.0.9.5")])]
        );
    }

    #[test]
    fn a_record_not_matching_its_pod_is_never_probed() {
        let mut w = World::mesh(2);
        w.pods_of(&[1, 2]);
        // member.geth-2 rewritten to point elsewhere, keeping the pod's name.
        set_host(&mut w, "geth-2", Host::Ip("10.0.9.9".parse().expect("ip")));
        assert_eq!(
            probed(&w),
            [(Some("geth-1".to_owned()), vec![at("10.0.0.2")])]
        );
        // Nothing before the registry is read.
        w.snap = None;
        assert!(probed(&w).is_empty());
    }
}
