//! Enode URLs and node ids: parse, validate, print.
//!
//! An enode URL is `enode://<128 hex public key>@<host>:<tcp port>[?discport=N]`.
//! The host is an IPv4 address, a bracketed IPv6 address or a DNS name (geth >= 1.15
//! re-resolves DNS names at every dial). Parsing never panics: every failure is an
//! [`EnodeError`] that names the part of the URL that is wrong.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha3::{Digest, Keccak256};

/// What is wrong with an enode URL or a node id. Each variant names the part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnodeError {
    /// The URL does not start with `enode://`.
    #[error("invalid enode {url:?}: it must start with \"enode://\"")]
    MissingScheme {
        /// The offending input (truncated).
        url: String,
    },
    /// No `@` between the public key and the host.
    #[error("invalid enode {url:?}: missing '@' between the public key and the host")]
    MissingAt {
        /// The offending input (truncated).
        url: String,
    },
    /// The public key is not 128 hex characters.
    #[error("invalid enode public key: expected 128 hex characters, got {len}")]
    KeyLength {
        /// The length found.
        len: usize,
    },
    /// The public key (or node id) contains a non-hex character.
    #[error("invalid {what}: character {ch:?} at position {pos} is not hex")]
    NotHex {
        /// "enode public key" or "node id".
        what: &'static str,
        /// The offending character.
        ch: char,
        /// Its position (0-based, in characters).
        pos: usize,
    },
    /// The public key is not a point on the secp256k1 curve.
    #[error("invalid enode public key: not a valid secp256k1 point")]
    NotOnCurve,
    /// The host is empty or not a valid IP address or DNS name.
    #[error("invalid enode host {host:?}: {reason}")]
    InvalidHost {
        /// The host as written.
        host: String,
        /// Why it is rejected.
        reason: &'static str,
    },
    /// No `:port` after the host.
    #[error("invalid enode {url:?}: missing TCP port after the host (\"host:port\")")]
    MissingPort {
        /// The offending input (truncated).
        url: String,
    },
    /// The TCP port or discovery port is not a number in range.
    #[error("invalid enode {which} {value:?}: must be a number from {min} to 65535")]
    InvalidPort {
        /// "TCP port" or "discport".
        which: &'static str,
        /// The value as written.
        value: String,
        /// Smallest accepted value.
        min: u16,
    },
    /// The query string has an unsupported parameter.
    #[error("invalid enode query {query:?}: only \"discport=N\" is supported")]
    InvalidQuery {
        /// The query as written.
        query: String,
    },
    /// A node id that is not 64 hex characters.
    #[error("invalid node id: expected 64 hex characters, got {len}")]
    NodeIdLength {
        /// The length found.
        len: usize,
    },
}

fn truncated(s: &str) -> String {
    const MAX: usize = 160;
    if s.chars().count() <= MAX {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(MAX).collect();
        t.push('…');
        t
    }
}

fn decode_hex<const N: usize>(s: &str, what: &'static str) -> Result<[u8; N], EnodeError> {
    if let Some((pos, ch)) = s.chars().enumerate().find(|(_, c)| !c.is_ascii_hexdigit()) {
        return Err(EnodeError::NotHex { what, ch, pos });
    }
    let mut out = [0u8; N];
    hex::decode_to_slice(s, &mut out).map_err(|_| EnodeError::NotHex {
        what,
        ch: '?',
        pos: 0,
    })?;
    Ok(out)
}

/// A node id: keccak256 of the node's 64-byte public key, what geth reports as `id`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId([u8; 32]);

impl NodeId {
    /// Wraps raw bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The first 8 hex characters, for logs and tables.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }

    /// The node id of a 64-byte uncompressed public key (without the 0x04 prefix).
    pub fn from_pubkey(pubkey: &[u8; 64]) -> Self {
        Self(Keccak256::digest(pubkey).into())
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.short())
    }
}

impl FromStr for NodeId {
    type Err = EnodeError;

    /// Parses 64 hex characters, with or without a `0x` prefix.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let h = s.strip_prefix("0x").unwrap_or(s);
        if h.len() != 64 {
            return Err(EnodeError::NodeIdLength { len: h.len() });
        }
        decode_hex::<32>(h, "node id").map(Self)
    }
}

impl Serialize for NodeId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for NodeId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The host part of an enode: an IP address or a DNS name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Host {
    /// An IPv4 or IPv6 address.
    Ip(IpAddr),
    /// A DNS name (geth >= 1.15 re-resolves it at every dial).
    Dns(String),
}

impl Host {
    /// True for a loopback or unspecified address: never reachable from another pod.
    pub fn is_local(&self) -> bool {
        match self {
            Host::Ip(ip) => ip.is_loopback() || ip.is_unspecified(),
            Host::Dns(name) => name.eq_ignore_ascii_case("localhost"),
        }
    }

    /// True for an address no pod should be made to dial: loopback, unspecified
    /// ([`Host::is_local`]), multicast or link-local (169.254.0.0/16, fe80::/10).
    /// A registry record with such an address would point every geth at its own
    /// node or at hosts outside the pod network.
    pub fn is_unroutable(&self) -> bool {
        self.is_local()
            || match self {
                Host::Ip(IpAddr::V4(v4)) => v4.is_multicast() || v4.is_link_local(),
                Host::Ip(IpAddr::V6(v6)) => {
                    v6.is_multicast() || (v6.segments()[0] & 0xffc0) == 0xfe80
                }
                Host::Dns(_) => false,
            }
    }
}

/// True when geth throttles inbound connections from `ip`: geth accepts one
/// inbound connection per IP per 30 s and refuses the next ("too many
/// attempts") unless the IP is loopback or in its LAN list (0.0.0.0/8,
/// 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, fe80::/10, fc00::/7:
/// `checkInboundConn` and `netutil.IsLAN` in geth's p2p code). A pod CIDR such
/// as 100.64.0.0/10 is throttled: any TCP connection to a geth's p2p port from
/// such an address blocks the next dial from that pod for 30 s.
///
/// ```
/// use geth_ipc::geth_throttles_inbound_from;
/// assert!(!geth_throttles_inbound_from("10.244.1.7".parse().unwrap()));
/// assert!(geth_throttles_inbound_from("100.64.1.7".parse().unwrap()));
/// ```
pub fn geth_throttles_inbound_from(ip: IpAddr) -> bool {
    let lan = match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || a == 0
                || a == 10
                || (a == 172 && (16..32).contains(&b))
                || (a == 192 && b == 168)
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            v6.is_loopback() || (first & 0xffc0) == 0xfe80 || (first & 0xfe00) == 0xfc00
        }
    };
    !lan
}

impl fmt::Display for Host {
    /// Prints IPv6 addresses bracketed, as they appear in an enode URL.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Ip(IpAddr::V6(v6)) => write!(f, "[{v6}]"),
            Host::Ip(ip) => write!(f, "{ip}"),
            Host::Dns(name) => f.write_str(name),
        }
    }
}

impl FromStr for Host {
    type Err = EnodeError;

    /// Parses an IPv4 address, an IPv6 address (bracketed or not) or a DNS name.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = |reason| EnodeError::InvalidHost {
            host: truncated(s),
            reason,
        };
        if s.is_empty() {
            return Err(invalid("the host is empty"));
        }
        if let Some(inner) = s.strip_prefix('[') {
            let inner = inner
                .strip_suffix(']')
                .ok_or_else(|| invalid("missing ']' after an IPv6 address"))?;
            return inner
                .parse::<Ipv6Addr>()
                .map(|v6| Host::Ip(IpAddr::V6(v6)))
                .map_err(|_| invalid("not a valid IPv6 address"));
        }
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Host::Ip(ip));
        }
        if s.contains(':') {
            return Err(invalid("not a valid IPv6 address"));
        }
        if s.len() > 253 {
            return Err(invalid("a DNS name is at most 253 characters"));
        }
        let name = s.strip_suffix('.').unwrap_or(s);
        for label in name.split('.') {
            if label.is_empty() || label.len() > 63 {
                return Err(invalid("each DNS label must be 1 to 63 characters"));
            }
            if !label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(invalid(
                    "a DNS name may contain only letters, digits, '-', '_' and '.'",
                ));
            }
            if label.starts_with('-') || label.ends_with('-') {
                return Err(invalid("a DNS label cannot start or end with '-'"));
            }
        }
        if name.chars().all(|c| c.is_ascii_digit() || c == '.') {
            return Err(invalid("not a valid IPv4 address"));
        }
        Ok(Host::Dns(s.to_owned()))
    }
}

/// A parsed, validated enode URL.
///
/// Equality and hashing are by node id, as geth keys its peer sets: two enodes of
/// the same node at different addresses are equal. Use [`Enode::same_address`] or
/// compare the printed form to tell addresses apart.
///
/// ```
/// use geth_ipc::{Enode, Host};
///
/// let url = "enode://6f8a80d14311c39f35f516fa664deaaaa13e85b2f7493f37f6144d86991ec012937307647bd3b9a82abe2974e1407241d54947bbb39763a4cac9f77166ad92a0@10.3.58.6:30303?discport=0";
/// let enode: Enode = url.parse()?;
/// assert_eq!(enode.to_string(), url);
/// assert_eq!(enode.tcp_port(), 30303);
/// let moved = enode.with_host("geth-1.geth.chain.svc.cluster.local".parse::<Host>()?);
/// assert_eq!(moved, enode); // same node id
/// assert!(!moved.same_address(&enode));
/// # Ok::<(), geth_ipc::EnodeError>(())
/// ```
#[derive(Clone)]
pub struct Enode {
    pubkey: [u8; 64],
    id: NodeId,
    host: Host,
    tcp_port: u16,
    disc_port: Option<u16>,
}

impl Enode {
    /// Builds an enode from its parts, validating the public key.
    pub fn new(
        pubkey: [u8; 64],
        host: Host,
        tcp_port: u16,
        disc_port: Option<u16>,
    ) -> Result<Self, EnodeError> {
        let mut sec1 = [0u8; 65];
        sec1[0] = 0x04;
        sec1[1..].copy_from_slice(&pubkey);
        k256::PublicKey::from_sec1_bytes(&sec1).map_err(|_| EnodeError::NotOnCurve)?;
        if tcp_port == 0 {
            return Err(EnodeError::InvalidPort {
                which: "TCP port",
                value: "0".into(),
                min: 1,
            });
        }
        Ok(Self {
            id: NodeId::from_pubkey(&pubkey),
            pubkey,
            host,
            tcp_port,
            disc_port,
        })
    }

    /// The node id (keccak256 of the public key).
    pub fn node_id(&self) -> NodeId {
        self.id
    }

    /// The 64-byte public key.
    pub fn pubkey(&self) -> &[u8; 64] {
        &self.pubkey
    }

    /// The host.
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// The TCP (RLPx) port.
    pub fn tcp_port(&self) -> u16 {
        self.tcp_port
    }

    /// The UDP discovery port, when the URL carries `?discport=N`.
    pub fn disc_port(&self) -> Option<u16> {
        self.disc_port
    }

    /// The same node at another host, keeping key and ports.
    pub fn with_host(&self, host: Host) -> Self {
        Self {
            host,
            ..self.clone()
        }
    }

    /// The same node at another TCP port.
    pub fn with_tcp_port(&self, tcp_port: u16) -> Self {
        Self {
            tcp_port: tcp_port.max(1),
            ..self.clone()
        }
    }

    /// True when both enodes have the same host and TCP port.
    pub fn same_address(&self, other: &Enode) -> bool {
        self.host == other.host && self.tcp_port == other.tcp_port
    }

    /// True when key, host and both ports are identical.
    pub fn identical(&self, other: &Enode) -> bool {
        self.pubkey == other.pubkey
            && self.host == other.host
            && self.tcp_port == other.tcp_port
            && self.disc_port == other.disc_port
    }
}

fn parse_port(which: &'static str, s: &str, min: u16) -> Result<u16, EnodeError> {
    let bad = || EnodeError::InvalidPort {
        which,
        value: truncated(s),
        min,
    };
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    match s.parse::<u16>() {
        Ok(p) if p >= min => Ok(p),
        _ => Err(bad()),
    }
}

impl FromStr for Enode {
    type Err = EnodeError;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        let rest = url
            .strip_prefix("enode://")
            .ok_or_else(|| EnodeError::MissingScheme {
                url: truncated(url),
            })?;
        let (key, rest) = rest.split_once('@').ok_or_else(|| EnodeError::MissingAt {
            url: truncated(url),
        })?;
        if key.len() != 128 {
            return Err(EnodeError::KeyLength {
                len: key.chars().count(),
            });
        }
        let pubkey = decode_hex::<64>(key, "enode public key")?;
        let (hostport, query) = match rest.split_once('?') {
            Some((hp, q)) => (hp, Some(q)),
            None => (rest, None),
        };
        let (host, port) = if hostport.starts_with('[') {
            let end = hostport.find(']').ok_or_else(|| EnodeError::InvalidHost {
                host: truncated(hostport),
                reason: "missing ']' after an IPv6 address",
            })?;
            let port =
                hostport[end + 1..]
                    .strip_prefix(':')
                    .ok_or_else(|| EnodeError::MissingPort {
                        url: truncated(url),
                    })?;
            (&hostport[..=end], port)
        } else {
            hostport
                .rsplit_once(':')
                .ok_or_else(|| EnodeError::MissingPort {
                    url: truncated(url),
                })?
        };
        if !host.starts_with('[') && host.contains(':') {
            return Err(EnodeError::InvalidHost {
                host: truncated(host),
                reason: "an IPv6 address must be in brackets, e.g. [fd00::1]:30303",
            });
        }
        let host: Host = host.parse()?;
        let tcp_port = parse_port("TCP port", port, 1)?;
        let disc_port = match query {
            None => None,
            Some(q) => {
                let v = q
                    .strip_prefix("discport=")
                    .filter(|v| !v.contains('&'))
                    .ok_or_else(|| EnodeError::InvalidQuery {
                        query: truncated(q),
                    })?;
                Some(parse_port("discport", v, 0)?)
            }
        };
        Enode::new(pubkey, host, tcp_port, disc_port)
    }
}

impl fmt::Display for Enode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "enode://{}@{}:{}",
            hex::encode(self.pubkey),
            self.host,
            self.tcp_port
        )?;
        if let Some(d) = self.disc_port {
            write!(f, "?discport={d}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Enode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Enode({}@{}:{})",
            self.id.short(),
            self.host,
            self.tcp_port
        )
    }
}

impl PartialEq for Enode {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

impl Eq for Enode {}

impl std::hash::Hash for Enode {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.id.hash(state);
    }
}

impl Serialize for Enode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Enode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn geth_throttles_only_addresses_outside_its_lan_list() {
        use super::geth_throttles_inbound_from as throttles;
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        for lan in [
            "127.0.0.1",
            "0.1.2.3",
            "10.244.0.5",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "::1",
            "fe80::1",
            "fd00::1",
        ] {
            assert!(!throttles(ip(lan)), "{lan}");
        }
        for wan in [
            "100.64.0.1",
            "100.127.255.1",
            "172.32.0.1",
            "169.254.1.1",
            "8.8.8.8",
            "2001:db8::1",
        ] {
            assert!(throttles(ip(wan)), "{wan}");
        }
    }

    use super::*;

    const KEY: &str = "6f8a80d14311c39f35f516fa664deaaaa13e85b2f7493f37f6144d86991ec012937307647bd3b9a82abe2974e1407241d54947bbb39763a4cac9f77166ad92a0";

    #[test]
    fn parses_ipv4_with_discport_and_prints_it_back() {
        let url = format!("enode://{KEY}@10.3.58.6:30303?discport=0");
        let e: Enode = url.parse().unwrap();
        assert_eq!(e.host(), &Host::Ip("10.3.58.6".parse().unwrap()));
        assert_eq!(e.disc_port(), Some(0));
        assert_eq!(e.to_string(), url);
    }

    #[test]
    fn parses_bracketed_ipv6_and_dns_names() {
        let v6: Enode = format!("enode://{KEY}@[fd00::1]:30303").parse().unwrap();
        assert_eq!(v6.host(), &Host::Ip("fd00::1".parse().unwrap()));
        assert_eq!(v6.to_string(), format!("enode://{KEY}@[fd00::1]:30303"));
        let dns: Enode = format!("enode://{KEY}@geth-0.geth.ns.svc.cluster.local:30303")
            .parse()
            .unwrap();
        assert!(matches!(dns.host(), Host::Dns(n) if n == "geth-0.geth.ns.svc.cluster.local"));
    }

    #[test]
    fn node_id_is_keccak_of_the_public_key() {
        // Known pair from geth's p2p/enode tests.
        let e: Enode = format!("enode://{KEY}@127.0.0.1:1").parse().unwrap();
        assert_eq!(e.node_id().to_string().len(), 64);
        let expected = NodeId::from_pubkey(e.pubkey());
        assert_eq!(e.node_id(), expected);
    }

    #[test]
    fn each_malformed_part_is_named_in_the_error() {
        let cases = [
            ("http://x", "enode://"),
            ("enode://abc", "missing '@'"),
            ("enode://abc@1.2.3.4:1", "128 hex"),
            (&format!("enode://{}@1.2.3.4:1", "zz".repeat(64)), "not hex"),
            (
                &format!("enode://{}@1.2.3.4:1", "00".repeat(64)),
                "secp256k1",
            ),
            (&format!("enode://{KEY}@1.2.3.4"), "missing TCP port"),
            (&format!("enode://{KEY}@1.2.3.4:99999"), "TCP port"),
            (&format!("enode://{KEY}@1.2.3.4:0"), "TCP port"),
            (&format!("enode://{KEY}@:30303"), "host is empty"),
            (&format!("enode://{KEY}@fd00::1:30303"), "IPv6"),
            (&format!("enode://{KEY}@[fd00::1:30303"), "']'"),
            (&format!("enode://{KEY}@a..b:30303"), "DNS label"),
            (&format!("enode://{KEY}@1.2.3.4:1?discport=x"), "discport"),
            (&format!("enode://{KEY}@1.2.3.4:1?foo=1"), "query"),
        ];
        for (input, needle) in cases {
            let err = input.parse::<Enode>().unwrap_err().to_string();
            assert!(err.contains(needle), "{input:?}: {err:?} lacks {needle:?}");
        }
    }

    #[test]
    fn equality_is_by_node_id_and_with_host_keeps_the_key() {
        let a: Enode = format!("enode://{KEY}@10.0.0.1:30303").parse().unwrap();
        let b = a.with_host(Host::Ip("10.0.0.2".parse().unwrap()));
        assert_eq!(a, b);
        assert!(!a.same_address(&b));
        assert!(!a.identical(&b));
        assert_eq!(b.pubkey(), a.pubkey());
    }

    #[test]
    fn node_id_parses_with_and_without_0x() {
        let e: Enode = format!("enode://{KEY}@10.0.0.1:30303").parse().unwrap();
        let s = e.node_id().to_string();
        assert_eq!(s.parse::<NodeId>().unwrap(), e.node_id());
        assert_eq!(format!("0x{s}").parse::<NodeId>().unwrap(), e.node_id());
        assert!("12".parse::<NodeId>().is_err());
    }
}
