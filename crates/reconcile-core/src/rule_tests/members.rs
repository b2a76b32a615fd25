//! Which members are peered with: addresses refused (loopback, unspecified,
//! multicast, link-local) and the member CIDR allowlist, DNS names held to
//! it by what they resolve to (engine/members.rs).

use super::*;

#[test]
fn members_at_loopback_unspecified_multicast_or_link_local_addresses_are_refused() {
    for ip in [
        "127.0.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "169.254.1.1",
        "::1",
        "fe80::1",
        "ff02::1",
    ] {
        let mut w = World::mesh(2);
        w.applied.clear();
        let bad = node(1).with_host(Host::Ip(ip.parse().expect("ip")));
        w.snap_mut()
            .members
            .get_mut("geth-1")
            .expect("geth-1")
            .enode = bad;
        let p = w.plan();
        assert!(
            !p.geth
                .iter()
                .any(|a| a.enode().node_id() == node(1).node_id()),
            "{ip} dialled: {:?}",
            p.geth
        );
        assert!(
            p.geth.contains(&AddPeer(node(2))),
            "{ip}: the others still peered"
        );
        assert_eq!(p.report.desired, 1, "{ip}: not counted as missing");
        assert!(
            p.report
                .problems
                .iter()
                .any(|pr| pr.to_string().contains("member.geth-1")),
            "{ip}: the warning names the key"
        );
    }
}

/// `World::mesh(2)` with an allowlist, geth-1 moved to `host`, nothing applied.
fn allowlisted_world(cidrs: &str, host: Host) -> World {
    let mut w = World::mesh(2);
    w.applied.clear();
    w.config.member_cidrs = cidrs
        .split(',')
        .map(|c| c.parse().expect("valid CIDR"))
        .collect();
    w.snap_mut()
        .members
        .get_mut("geth-1")
        .expect("geth-1")
        .enode = node(1).with_host(host);
    w
}

fn dials(p: &Plan, i: u8) -> bool {
    p.geth
        .iter()
        .any(|a| a.enode().node_id() == node(i).node_id())
}

#[test]
fn members_outside_the_member_cidrs_are_refused_and_never_dialled() {
    for ip in ["192.168.1.5", "10.1.0.5", "2001:db8::5"] {
        let w = allowlisted_world("10.0.0.0/16,fd00::/8", Host::Ip(ip.parse().expect("ip")));
        let p = w.plan();
        assert!(!dials(&p, 1), "{ip} dialled: {:?}", p.geth);
        assert!(
            p.geth.contains(&AddPeer(node(2))),
            "{ip}: the others still peered"
        );
        assert_eq!(p.report.desired, 1, "{ip}: not counted as missing");
        assert!(
            p.report
                .missing
                .iter()
                .all(|m| m.node_id != node(1).node_id()),
            "{ip}: {:?}",
            p.report.missing
        );
        let warning = p
            .report
            .problems
            .iter()
            .find(|pr| matches!(pr, Problem::MemberOutsideAllowedCidrs { .. }))
            .map(ToString::to_string)
            .unwrap_or_else(|| panic!("{ip}: no problem reported: {:?}", p.report.problems));
        for part in ["member.geth-1", ip, "10.0.0.0/16,fd00::/8", "MEMBER_CIDRS"] {
            assert!(warning.contains(part), "{ip}: {part:?} not in {warning:?}");
        }
    }
}

#[test]
fn members_inside_the_member_cidrs_are_dialled() {
    for ip in ["10.0.200.7", "fd00::7"] {
        let w = allowlisted_world("10.0.0.0/16,fd00::/8", Host::Ip(ip.parse().expect("ip")));
        let p = w.plan();
        assert!(dials(&p, 1), "{ip} not dialled: {:?}", p.geth);
        assert!(p.geth.contains(&AddPeer(node(2))));
        assert_eq!(p.report.desired, 2);
        assert!(p.report.problems.is_empty(), "{:?}", p.report.problems);
    }
}

#[test]
fn an_empty_member_cidrs_allows_any_routable_address() {
    let mut w = allowlisted_world("10.0.0.0/16", Host::Ip("192.168.1.5".parse().expect("ip")));
    w.config.member_cidrs.clear();
    let p = w.plan();
    assert!(dials(&p, 1), "{:?}", p.geth);
    assert!(p.report.problems.is_empty(), "{:?}", p.report.problems);
}

#[test]
fn a_member_with_a_dns_name_is_held_to_the_member_cidrs_by_what_it_resolves_to() {
    let mut w = allowlisted_world(
        "10.0.0.0/16",
        Host::Dns("geth-1.geth.default.svc.cluster.local".into()),
    );
    // Not resolved (yet): not dialled, reported, not removed.
    let p = w.plan();
    assert!(
        !dials(&p, 1),
        "an unresolved DNS host dialled: {:?}",
        p.geth
    );
    assert!(p.report.removals.is_empty());
    assert!(
        matches!(&p.report.problems[..], [Problem::MemberUnresolved { pod, .. }] if pod == "geth-1"),
        "{:?}",
        p.report.problems
    );
    // Resolved inside the allowlist: dialled.
    w.resolved
        .insert(node(1).node_id(), vec!["10.0.3.4".parse().expect("ip")]);
    let p = w.plan();
    assert!(dials(&p, 1), "{:?}", p.geth);
    assert!(p.report.problems.is_empty(), "{:?}", p.report.problems);
    // One address outside: refused, naming the key.
    w.resolved.insert(
        node(1).node_id(),
        vec![
            "10.0.3.4".parse().expect("ip"),
            "192.168.1.1".parse().expect("ip"),
        ],
    );
    let p = w.plan();
    assert!(!dials(&p, 1), "{:?}", p.geth);
    assert!(
        p.report
            .problems
            .iter()
            .any(|pr| pr.to_string().contains("member.geth-1")
                && pr.to_string().contains("192.168.1.1")),
        "{:?}",
        p.report.problems
    );
}

#[test]
fn external_peers_outside_the_member_cidrs_are_still_dialled() {
    let mut w = World::mesh(0);
    w.config.member_cidrs = vec!["10.99.0.0/16".parse().expect("valid CIDR")];
    let outside = node(7).with_host(Host::Ip("192.168.7.7".parse().expect("ip")));
    w.snap_mut().external = vec![outside.clone()];
    let p = w.plan();
    assert_eq!(p.geth, vec![AddPeer(outside)]);
    assert!(p.report.problems.is_empty(), "{:?}", p.report.problems);
}
