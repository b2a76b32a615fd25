//! The runtime's errors: one enum for setting the sidecar up and running it,
//! one for a failed pass. Each message names what is wrong and what to do;
//! `kind()` is the metric label.

use std::net::SocketAddr;

/// Errors of this crate outside a pass: settings, start-up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// POD_IP is set but not an IP address.
    #[error(
        "POD_IP={0:?} is not an IP address: set it from the Downward API (fieldRef status.podIP)"
    )]
    InvalidPodIp(String),
    /// ADVERTISE=pod-ip without POD_IP.
    #[error("ADVERTISE=pod-ip needs POD_IP: set it from the Downward API (fieldRef status.podIP)")]
    PodIpMissing,
    /// DNS_TEMPLATE does not give a DNS name.
    #[error("DNS_TEMPLATE gives {name:?}, which is not a DNS name ({why}): fix DNS_TEMPLATE")]
    InvalidDnsName {
        /// The name the template gave.
        name: String,
        /// Why it is not a usable name.
        why: String,
    },
    /// The HTTP endpoints cannot listen.
    #[error("cannot listen on {addr} for probes, status and metrics: {source} (set LISTEN_ADDR)")]
    Listen {
        /// The address asked for.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The engine refuses the configuration (e.g. DEAD_AFTER shorter than
    /// two probe intervals).
    #[error("{0}: raise DEAD_AFTER or lower PROBE_INTERVAL")]
    Engine(#[from] reconcile_core::ConfigError),
}

impl Error {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::InvalidPodIp(_) | Self::PodIpMissing | Self::InvalidDnsName { .. } => "settings",
            Self::Engine(_) => "settings",
            Self::Listen { .. } => "listen",
        }
    }
}

/// Why the advertised enode cannot be published (this node still peers with
/// the others).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdvertiseError {
    /// geth's own enode does not parse.
    #[error("geth's admin_nodeInfo enode is invalid: {0}")]
    InvalidEnode(String),
    /// The address is one no other pod can reach.
    #[error(
        "geth advertises {host} ({enode}), which no other pod can reach: set POD_IP from the \
         Downward API (status.podIP), use ADVERTISE=dns, or start geth with --nat extip:<pod ip>"
    )]
    Unreachable {
        /// The local host.
        host: String,
        /// The whole enode.
        enode: String,
    },
}

/// Why one pass of the loop failed. The loop retries with backoff.
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    /// geth did not answer (connection lost, timeout): the pass stopped.
    #[error("geth does not answer: {0}")]
    Geth(#[source] geth_ipc::Error),
    /// geth answered with an error for some action; the others went on.
    #[error("geth refused {failed} admin call(s); see the log lines before this one")]
    GethRefused {
        /// How many calls were refused.
        failed: usize,
    },
    /// The registry could not be read.
    #[error("cannot read the registry: {0}")]
    RegistryRead(#[source] peer_registry::Error),
    /// A registry write failed.
    #[error("registry {op} failed: {source}")]
    RegistryWrite {
        /// Which write.
        op: &'static str,
        /// What the registry said.
        source: peer_registry::Error,
    },
    /// geth's own enode is unusable, and no placeholder could be made of it.
    #[error(transparent)]
    Advertise(#[from] AdvertiseError),
}

impl PassError {
    /// Every label [`PassError::kind`] gives, so that the metric exports each
    /// one at zero before the first failed pass.
    pub const KINDS: [&'static str; 4] = ["geth", "geth_action", "registry", "advertise"];

    /// A short label for metrics (`reconcile_errors_total{kind}`).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Geth(_) => "geth",
            Self::GethRefused { .. } => "geth_action",
            Self::RegistryRead(_) | Self::RegistryWrite { .. } => "registry",
            Self::Advertise(_) => "advertise",
        }
    }

    /// True when geth is down: the loop polls it again within a second.
    pub fn is_geth_down(&self) -> bool {
        matches!(self, Self::Geth(_))
    }
}

/// This crate's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_lists_the_kind_of_every_pass_error() {
        let registry = || peer_registry::Error::TooLarge { bytes: 1 };
        let all = [
            PassError::Geth(geth_ipc::Error::ConnectionLost),
            PassError::GethRefused { failed: 1 },
            PassError::RegistryRead(registry()),
            PassError::RegistryWrite {
                op: "upsert",
                source: registry(),
            },
            PassError::Advertise(AdvertiseError::InvalidEnode("x".into())),
        ];
        let kinds: std::collections::BTreeSet<&str> = all.iter().map(PassError::kind).collect();
        let listed: std::collections::BTreeSet<&str> = PassError::KINDS.into_iter().collect();
        assert_eq!(kinds, listed);
    }
}
