//! Rule 2, members: the other members and the legacy entries this node may
//! peer with. A record at an address no member may have is refused here:
//! never dialled, never counted, reported as a problem naming its key.

use geth_ipc::Enode;

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
                pass.report.problems.push(Problem::MemberOutsideAllowedCidrs {
                    pod: record.pod.clone(),
                    enode: record.enode.to_string(),
                    allowed: allowlist(&config.member_cidrs),
                });
                continue;
            }
            None => {}
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
                why: match refusal {
                    AddressRefusal::Local => "loopback, unspecified, multicast or link-local",
                    AddressRefusal::OutsideCidrs => "outside MEMBER_CIDRS",
                }
                .to_owned(),
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

/// Why an address may not be dialled as a member's.
enum AddressRefusal {
    /// Loopback, unspecified, multicast or link-local.
    Local,
    /// Outside every network of `Config::member_cidrs`.
    OutsideCidrs,
}

/// Whether a member's (or legacy member's) address is refused. A DNS name is
/// checked against the allowlist never: geth resolves it at every dial, this
/// engine never does.
fn refused_address(config: &Config, enode: &Enode) -> Option<AddressRefusal> {
    if enode.host().is_unroutable() {
        return Some(AddressRefusal::Local);
    }
    match enode.host() {
        geth_ipc::Host::Ip(ip)
            if !config.member_cidrs.is_empty()
                && !config.member_cidrs.iter().any(|net| net.contains(*ip)) =>
        {
            Some(AddressRefusal::OutsideCidrs)
        }
        _ => None,
    }
}

/// The allowlist as the operator writes it: `10.244.0.0/16,fd00::/8`.
fn allowlist(cidrs: &[crate::Cidr]) -> String {
    cidrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}
