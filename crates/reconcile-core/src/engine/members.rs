//! Rule 2, members: the other members and the legacy entries this node may
//! peer with. A record at an address no member may have is refused here:
//! never dialled, never counted, reported as a problem naming its key.

use std::fmt;
use std::net::IpAddr;

use geth_ipc::{Enode, Host, NodeId};
use peer_registry::MemberRecord;

use super::pods::pod_list;
use super::{Legacy, Other, Pass};
use crate::config::Config;
use crate::plan::Problem;

/// Collects the other members (in pod order) and the legacy entries.
pub(super) fn rule(pass: &mut Pass<'_>) {
    others(pass);
    legacy(pass);
}

/// The other members, in pod order.
fn others(pass: &mut Pass<'_>) {
    let (config, me, snapshot) = (pass.config, pass.obs.me, pass.snapshot);
    for record in snapshot.members.values() {
        if record.pod == me.pod {
            continue;
        }
        let id = record.enode.node_id();
        if record.node_id != id {
            pass.report.problems.push(Problem::RecordNodeIdMismatch {
                pod: record.pod.clone(),
                record: record.node_id,
                enode: id,
            });
        }
        if id == me.node_id || record.node_id == me.node_id {
            pass.report.problems.push(Problem::RecordClaimsOwnNodeId {
                pod: record.pod.clone(),
                node_id: me.node_id,
            });
            continue;
        }
        match refused_address(config, &record.enode) {
            // Never dialled: anyone who may patch the ConfigMap could otherwise
            // point every geth at its own node or outside the pod network.
            Some(AddressRefusal::Local) => {
                pass.report
                    .problems
                    .push(Problem::MemberAdvertisesLocalAddress {
                        pod: record.pod.clone(),
                        enode: record.enode.to_string(),
                    });
                continue;
            }
            Some(AddressRefusal::OutsideCidrs) => {
                pass.report
                    .problems
                    .push(Problem::MemberOutsideAllowedCidrs {
                        pod: record.pod.clone(),
                        enode: record.enode.to_string(),
                        allowed: allowlist(&config.member_cidrs),
                    });
                continue;
            }
            None => {}
        }
        if let Some(problem) = refused_resolution(pass, id, record) {
            pass.report.problems.push(problem);
            continue;
        }
        let connected = pass.is_connected(&id) || pass.is_connected(&record.node_id);
        pass.others.push(Other {
            record,
            id,
            connected,
        });
    }
}

/// Legacy members: `static-nodes.json` entries without a record (the original
/// sidecar's), peered with like members.
fn legacy(pass: &mut Pass<'_>) {
    let (config, me, snapshot) = (pass.config, pass.obs.me, pass.snapshot);
    if !config.legacy_members {
        return;
    }
    for enode in &snapshot.legacy {
        let id = enode.node_id();
        if id == me.node_id || pass.others.iter().any(|o| o.id == id) {
            continue;
        }
        if let Some(refusal) = refused_address(config, enode) {
            pass.report.problems.push(Problem::LegacyEntryRefused {
                enode: enode.to_string(),
                why: refusal.to_string(),
            });
            continue;
        }
        if matches!(enode.host(), Host::Dns(_))
            && let Some(why) = unresolved_or_refused(config, pass.obs.resolved.get(&id))
        {
            pass.report.problems.push(Problem::LegacyEntryRefused {
                enode: enode.to_string(),
                why: why.to_string(),
            });
            continue;
        }
        let connected = pass.is_connected(&id);
        pass.legacy.push(Legacy {
            enode,
            id,
            connected,
        });
    }
}

/// Why a DNS-host member may not be dialled: its host has not been resolved,
/// or resolves to an address no member may have, or (with trusted pod
/// evidence) not to its pod's IP. `None` for an IP host or an allowed name.
fn refused_resolution(pass: &Pass<'_>, id: NodeId, record: &MemberRecord) -> Option<Problem> {
    if !matches!(record.enode.host(), Host::Dns(_)) {
        return None;
    }
    let resolved = pass.obs.resolved.get(&id);
    let (pod, enode) = (record.pod.clone(), record.enode.to_string());
    match unresolved_or_refused(pass.config, resolved) {
        Some(Resolution::Unresolved) => return Some(Problem::MemberUnresolved { pod, enode }),
        Some(Resolution::Refused(address, refusal)) => {
            return Some(Problem::MemberResolvesToRefusedAddress {
                pod,
                enode,
                address: address.to_string(),
                why: refusal.to_string(),
            });
        }
        None => {}
    }
    let addresses = resolved.map_or(&[][..], Vec::as_slice);
    let pods = pod_list(pass.obs).ok().flatten()?;
    let pod_ip = pods.get(&record.pod)?.ip.as_ref()?;
    let ip: IpAddr = pod_ip.parse().ok()?;
    (!addresses.contains(&ip)).then(|| Problem::MemberResolvesElsewhere {
        pod,
        enode,
        resolved: addresses
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
        pod_ip: pod_ip.clone(),
    })
}

/// What is wrong with a DNS host's resolution.
enum Resolution {
    /// Not resolved, or resolved to nothing.
    Unresolved,
    /// An address no member may have.
    Refused(IpAddr, AddressRefusal),
}

impl fmt::Display for Resolution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unresolved => f.write_str("a DNS name not resolved"),
            Self::Refused(address, refusal) => write!(f, "resolves to {address}, {refusal}"),
        }
    }
}

/// Checks a DNS host's resolved addresses: all of them must be allowed.
fn unresolved_or_refused(config: &Config, resolved: Option<&Vec<IpAddr>>) -> Option<Resolution> {
    let Some(addresses) = resolved.filter(|a| !a.is_empty()) else {
        return Some(Resolution::Unresolved);
    };
    addresses
        .iter()
        .find_map(|&ip| refused_ip(config, ip).map(|refusal| Resolution::Refused(ip, refusal)))
}

/// Why an address may not be dialled as a member's.
enum AddressRefusal {
    /// Loopback, unspecified, multicast or link-local.
    Local,
    /// Outside every network of `Config::member_cidrs`.
    OutsideCidrs,
}

impl fmt::Display for AddressRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Local => "loopback, unspecified, multicast or link-local",
            Self::OutsideCidrs => "outside MEMBER_CIDRS",
        })
    }
}

/// Whether a member's (or legacy member's) address is refused. A DNS host is
/// checked by what it resolves to ([`refused_resolution`]).
fn refused_address(config: &Config, enode: &Enode) -> Option<AddressRefusal> {
    if enode.host().is_unroutable() {
        return Some(AddressRefusal::Local);
    }
    match enode.host() {
        Host::Ip(ip) => refused_ip(config, *ip),
        Host::Dns(_) => None,
    }
}

/// Whether an IP may not be a member's: unroutable, or outside the allowlist.
fn refused_ip(config: &Config, ip: IpAddr) -> Option<AddressRefusal> {
    if Host::Ip(ip).is_unroutable() {
        return Some(AddressRefusal::Local);
    }
    (!config.member_cidrs.is_empty() && !config.member_cidrs.iter().any(|net| net.contains(ip)))
        .then_some(AddressRefusal::OutsideCidrs)
}

/// The allowlist as the operator writes it: `10.244.0.0/16,fd00::/8`.
fn allowlist(cidrs: &[crate::Cidr]) -> String {
    cidrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use geth_ipc::Host;

    use crate::Problem;
    use crate::testkit::{World, dialled, node};

    /// `World::mesh(2)`, nothing applied, geth-1 at a DNS name resolving to `ips`.
    fn dns_world(ips: &[&str]) -> World {
        let mut w = World::mesh(2);
        w.applied.clear();
        w.snap_mut()
            .members
            .get_mut("geth-1")
            .expect("geth-1")
            .enode = node(1).with_host(Host::Dns("geth-1.geth.svc".into()));
        let ips = ips.iter().map(|ip| ip.parse().expect("ip")).collect();
        w.resolved.insert(node(1).node_id(), ips);
        w
    }

    #[test]
    fn a_dns_host_resolving_to_a_loopback_address_is_refused() {
        let w = dns_world(&["127.0.0.1"]);
        let p = w.plan();
        assert!(!dialled(&p).iter().any(|e| e.node_id() == node(1).node_id()));
        assert!(
            matches!(&p.report.problems[..], [Problem::MemberResolvesToRefusedAddress { pod, .. }] if pod == "geth-1"),
            "{:?}",
            p.report.problems
        );
    }

    #[test]
    fn with_pod_evidence_a_dns_host_must_resolve_to_its_pods_ip() {
        // geth-1's pod is at 10.0.0.2 (as recorded); its name resolves elsewhere.
        let mut w = dns_world(&["10.0.0.99"]);
        w.pods_of(&[1, 2]);
        let p = w.plan();
        assert_eq!(dialled(&p), [node(2)], "{p:?}");
        assert!(p.report.removals.is_empty(), "refused, not removed");
        assert!(
            p.report.problems.iter().any(|pr| matches!(
                pr, Problem::MemberResolvesElsewhere { pod, pod_ip, .. }
                    if pod == "geth-1" && pod_ip == "10.0.0.2"
            ) && pr.to_string().contains("member.geth-1")),
            "{:?}",
            p.report.problems
        );
        // Resolving to the pod's IP (among others): dialled.
        let mut w = dns_world(&["10.0.0.99", "10.0.0.2"]);
        w.pods_of(&[1, 2]);
        let p = w.plan();
        assert_eq!(dialled(&p).len(), 2, "{p:?}");
        assert!(p.report.problems.is_empty(), "{:?}", p.report.problems);
    }
}
