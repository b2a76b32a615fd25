//! Property tests of enode parsing: never panics; print/parse round trips.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use geth_ipc::{Enode, Host, NodeId};
use k256::elliptic_curve::sec1::ToEncodedPoint;
use proptest::prelude::*;

/// A valid secp256k1 public key (64 bytes, no 0x04 prefix), from a random scalar.
fn pubkey() -> impl Strategy<Value = [u8; 64]> {
    any::<[u8; 32]>().prop_filter_map("not a valid secret key", |scalar| {
        let secret = k256::SecretKey::from_slice(&scalar).ok()?;
        let point = secret.public_key().to_encoded_point(false);
        let bytes = point.as_bytes();
        let mut out = [0u8; 64];
        out.copy_from_slice(bytes.get(1..65)?);
        Some(out)
    })
}

fn dns_label() -> impl Strategy<Value = String> {
    "[a-z0-9]([a-z0-9_-]{0,20}[a-z0-9])?"
}

fn host() -> impl Strategy<Value = Host> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(|b| Host::Ip(IpAddr::V4(Ipv4Addr::from(b)))),
        any::<[u8; 16]>().prop_map(|b| Host::Ip(IpAddr::V6(Ipv6Addr::from(b)))),
        (
            prop::collection::vec(dns_label(), 1..5),
            "[a-z][a-z0-9-]{0,10}[a-z0-9]"
        )
            .prop_map(|(labels, tld)| Host::Dns(format!("{}.{tld}", labels.join(".")))),
        Just(Host::Dns("localhost".into())),
    ]
}

fn enode() -> impl Strategy<Value = Enode> {
    (pubkey(), host(), 1u16.., proptest::option::of(any::<u16>())).prop_filter_map(
        "Enode::new rejected valid parts",
        |(key, host, tcp, disc)| Enode::new(key, host, tcp, disc).ok(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn parsing_arbitrary_strings_never_panics(s in ".{0,300}") {
        let _ = s.parse::<Enode>();
        let _ = s.parse::<Host>();
        let _ = s.parse::<NodeId>();
    }

    #[test]
    fn parsing_enode_shaped_strings_never_panics(
        key in "[0-9a-fA-Fz]{0,130}",
        host in "[\\[\\]:0-9a-f.\\-é]{0,40}",
        port in "[0-9:x]{0,7}",
        query in "(\\?[a-z=0-9&]{0,14})?",
    ) {
        let _ = format!("enode://{key}@{host}:{port}{query}").parse::<Enode>();
        let _ = format!("enode://{key}@{host}{query}").parse::<Enode>();
    }

    #[test]
    fn print_then_parse_is_identity(e in enode()) {
        let printed = e.to_string();
        let parsed: Enode = printed.parse().unwrap();
        prop_assert!(parsed.identical(&e), "{printed}");
        prop_assert_eq!(parsed.to_string(), printed);
        prop_assert_eq!(parsed.node_id(), NodeId::from_pubkey(e.pubkey()));
    }

    #[test]
    fn parse_then_print_is_identity_on_canonical_strings(e in enode()) {
        // Build the canonical string by hand, independently of Display.
        let host = match e.host() {
            Host::Ip(IpAddr::V6(v6)) => format!("[{v6}]"),
            Host::Ip(ip) => ip.to_string(),
            Host::Dns(name) => name.clone(),
        };
        let mut url = format!("enode://{}@{host}:{}", hex::encode(e.pubkey()), e.tcp_port());
        if let Some(d) = e.disc_port() {
            url.push_str(&format!("?discport={d}"));
        }
        let parsed: Enode = url.parse().unwrap();
        prop_assert_eq!(parsed.to_string(), url);
    }

    #[test]
    fn a_corrupted_key_is_rejected_or_a_different_node(e in enode(), pos in 0usize..128, c in "[0-9a-f]") {
        let printed = e.to_string();
        let key_start = "enode://".len();
        let mut bytes = printed.into_bytes();
        bytes[key_start + pos] = c.as_bytes()[0];
        let s = String::from_utf8(bytes).unwrap();
        if let Ok(other) = s.parse::<Enode>() {
            // Either unchanged, or another valid point with another id.
            prop_assert_eq!(other.pubkey() == e.pubkey(), other.node_id() == e.node_id());
        }
    }
}
