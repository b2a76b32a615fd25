//! [`Cidr`]: an IPv4 or IPv6 network, for the member address allowlist.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// An IPv4 or IPv6 network in CIDR notation, e.g. `10.244.0.0/16` or `fd00::/8`.
///
/// Host bits below the prefix are ignored (`10.244.1.7/16` is `10.244.0.0/16`).
/// An IPv4 network never contains an IPv6 address and the reverse, except that an
/// IPv4-mapped IPv6 address (`::ffff:10.244.0.1`) counts as its IPv4 address.
///
/// ```
/// use reconcile_core::Cidr;
/// let pods: Cidr = "10.244.0.0/16".parse()?;
/// assert!(pods.contains("10.244.3.4".parse()?));
/// assert!(!pods.contains("10.245.0.1".parse()?));
/// assert!("10.244.0.0/33".parse::<Cidr>().is_err());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    /// The network address, host bits cleared.
    network: IpAddr,
    /// The prefix length: 0..=32 for IPv4, 0..=128 for IPv6.
    prefix: u8,
}

/// Why a string is not a [`Cidr`]. Its message names the input:
/// `invalid CIDR "x": ...`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid CIDR {input:?}: {reason}")]
pub struct CidrError {
    /// The input, as given.
    input: String,
    /// What is wrong with it.
    reason: String,
}

impl CidrError {
    fn new(input: &str, reason: impl Into<String>) -> Self {
        Self {
            input: input.to_owned(),
            reason: reason.into(),
        }
    }
}

/// The address as a 128-bit number and its width in bits (32 or 128).
fn bits(ip: IpAddr) -> (u128, u8) {
    match ip {
        IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32),
        IpAddr::V6(v6) => (u128::from(v6), 128),
    }
}

/// The mask of the top `prefix` bits of a `width`-bit number.
fn mask(prefix: u8, width: u8) -> u128 {
    let all = u128::MAX.checked_shr(128 - u32::from(width)).unwrap_or(0);
    all & !all.checked_shr(u32::from(prefix)).unwrap_or(0)
}

impl Cidr {
    /// The network `ip/prefix`, host bits cleared; `None` when the prefix is
    /// longer than the address (over 32 for IPv4, over 128 for IPv6).
    pub fn new(ip: IpAddr, prefix: u8) -> Option<Self> {
        let (value, width) = bits(ip);
        if prefix > width {
            return None;
        }
        let network = value & mask(prefix, width);
        let network = match ip {
            IpAddr::V4(_) => IpAddr::V4(u32::try_from(network).ok()?.into()),
            IpAddr::V6(_) => IpAddr::V6(network.into()),
        };
        Some(Self { network, prefix })
    }

    /// The network address (host bits cleared).
    pub fn network(&self) -> IpAddr {
        self.network
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// True when `ip` lies in this network. An IPv4-mapped IPv6 address is
    /// checked as its IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        if ip.is_ipv4() != self.network.is_ipv4() {
            return false;
        }
        let (value, width) = bits(ip);
        let (network, _) = bits(self.network);
        value & mask(self.prefix, width) == network
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    /// Parses `address/prefix` (`10.244.0.0/16`, `fd00::/8`). A bare address
    /// is refused: write `/32` or `/128` for a single host.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let Some((address, prefix)) = t.split_once('/') else {
            return Err(CidrError::new(
                s,
                "expected address/prefix, e.g. 10.244.0.0/16 or fd00::/8",
            ));
        };
        let ip: IpAddr = address
            .parse()
            .map_err(|_| CidrError::new(s, format!("{address:?} is not an IP address")))?;
        let width = bits(ip).1;
        let prefix: u8 = prefix.parse().ok().filter(|p| *p <= width).ok_or_else(|| {
            CidrError::new(
                s,
                format!("prefix {prefix:?} is not a number from 0 to {width}"),
            )
        })?;
        Self::new(ip, prefix).ok_or_else(|| CidrError::new(s, "prefix too long"))
    }
}

impl fmt::Display for Cidr {
    /// `10.244.0.0/16`, `fd00::/8`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Cidr {
        s.parse().expect("valid CIDR")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("valid IP")
    }

    #[test]
    fn ipv4_networks_contain_exactly_their_addresses() {
        let net = cidr("10.244.0.0/16");
        assert!(net.contains(ip("10.244.0.0")));
        assert!(net.contains(ip("10.244.255.255")));
        assert!(!net.contains(ip("10.245.0.0")));
        assert!(!net.contains(ip("10.243.255.255")));
        assert!(!net.contains(ip("fd00::1")), "v4 never contains v6");
        assert!(net.contains(ip("::ffff:10.244.1.2")), "v4-mapped v6 counts");
        // Host bits are cleared.
        assert_eq!(cidr("10.244.7.9/16"), net);
        assert_eq!(net.to_string(), "10.244.0.0/16");
        let odd = cidr("100.64.0.0/10");
        assert!(odd.contains(ip("100.127.255.255")));
        assert!(!odd.contains(ip("100.128.0.0")));
    }

    #[test]
    fn single_hosts_and_everything() {
        let host = cidr("10.0.0.1/32");
        assert!(host.contains(ip("10.0.0.1")));
        assert!(!host.contains(ip("10.0.0.2")));
        let all4 = cidr("0.0.0.0/0");
        assert!(all4.contains(ip("1.2.3.4")));
        assert!(all4.contains(ip("255.255.255.255")));
        assert!(!all4.contains(ip("::1")));
        let all6 = cidr("::/0");
        assert!(all6.contains(ip("2001:db8::1")));
        assert!(!all6.contains(ip("1.2.3.4")));
        let host6 = cidr("2001:db8::1/128");
        assert!(host6.contains(ip("2001:db8::1")));
        assert!(!host6.contains(ip("2001:db8::2")));
    }

    #[test]
    fn ipv6_networks_contain_exactly_their_addresses() {
        let net = cidr(" fd00::/8 ");
        assert!(net.contains(ip("fd12:3456::1")));
        assert!(!net.contains(ip("fc00::1")));
        assert!(!net.contains(ip("10.0.0.1")));
        assert_eq!(net.to_string(), "fd00::/8");
        let narrow = cidr("2001:db8:1::/48");
        assert!(narrow.contains(ip("2001:db8:1:ffff::1")));
        assert!(!narrow.contains(ip("2001:db8:2::1")));
    }

    #[test]
    fn bad_input_is_refused_naming_it() {
        for (input, why) in [
            ("10.244.0.0", "address/prefix"),
            ("10.244.0.0/33", "0 to 32"),
            ("fd00::/129", "0 to 128"),
            ("10.244.0.0/-1", "0 to 32"),
            ("10.244.0.0/x", "0 to 32"),
            ("10.244.0/16", "not an IP address"),
            ("pods/16", "not an IP address"),
            ("", "address/prefix"),
        ] {
            let err = input.parse::<Cidr>().expect_err(input).to_string();
            assert!(
                err.starts_with(&format!("invalid CIDR {input:?}: ")),
                "{input}: {err}"
            );
            assert!(err.contains(why), "{input}: {err}");
        }
    }
}
