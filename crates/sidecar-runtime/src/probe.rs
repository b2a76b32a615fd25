//! Probing members: who answers at a member's address, and is it the member?

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use geth_ipc::{Enode, NodeId};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::ports::{ProbeOutcome, Prober};

/// Which port a liveness probe of a member targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProbeVia {
    /// The member's sidecar port, which answered who it is (`/identity`).
    Identity(u16),
    /// geth's p2p port: a TCP connect (the member's sidecar did not answer).
    GethPort,
    /// The member's sidecar port, by TCP connect alone (geth would throttle
    /// a probe of its p2p port from this pod's address).
    SidecarPort(u16),
}

impl ProbeVia {
    /// A short label for metrics (`probes_total{kind}`).
    pub fn kind(self) -> &'static str {
        match self {
            Self::Identity(_) => "identity",
            Self::GethPort => "geth",
            Self::SidecarPort(_) => "sidecar",
        }
    }
}

/// Who a sidecar says it is, at `GET /identity` on its port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Identity {
    /// The pod's name.
    pub pod: String,
    /// Its geth's node id.
    pub node_id: NodeId,
}

/// The answer to an indirect probe (`GET /v1/probe/<node id>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct IndirectAnswer {
    /// Whether the asked sidecar reaches the member.
    pub(crate) reachable: bool,
}

/// Probes a member: first its sidecar's `/identity` (an answer names the node
/// id, so an IP now used by another pod is not taken for the member), else a
/// TCP connect to geth's p2p port, or to the sidecar port where geth would
/// throttle us (see [`probe_addr`]).
#[derive(Debug, Clone, Copy)]
pub struct TcpProber {
    /// How long one connect or request may take.
    pub timeout: Duration,
}

impl Default for TcpProber {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(2),
        }
    }
}

#[async_trait::async_trait]
impl Prober for TcpProber {
    async fn probe(
        &self,
        enode: &Enode,
        addresses: &[SocketAddr],
        sidecar_port: u16,
    ) -> ProbeOutcome {
        let target = match addresses.first() {
            Some(a) => *a,
            None => match resolve(enode).await {
                Some(a) => a,
                None => return ProbeOutcome::Unresolved,
            },
        };
        let sidecar = SocketAddr::new(target.ip(), sidecar_port);
        let (addr, via) = probe_addr(target, source_for(target), sidecar_port);
        // Both at once: an unreachable member costs one timeout, not two.
        let (named, connected) = tokio::join!(
            tokio::time::timeout(self.timeout, identity(sidecar)),
            tokio::time::timeout(self.timeout, tokio::net::TcpStream::connect(addr)),
        );
        match named {
            Ok(Some(id)) if id.node_id == enode.node_id() => {
                ProbeOutcome::Reachable(ProbeVia::Identity(sidecar_port))
            }
            // Another node answers at the member's address: not the member.
            Ok(Some(_)) => ProbeOutcome::Unreachable(ProbeVia::Identity(sidecar_port)),
            // No sidecar answers: geth's port (or the sidecar's) decides.
            _ if matches!(connected, Ok(Ok(_))) => ProbeOutcome::Reachable(via),
            _ => ProbeOutcome::Unreachable(via),
        }
    }

    async fn ask(&self, helper: &Enode, suspect: &Enode, sidecar_port: u16) -> Option<bool> {
        let target = resolve(helper).await?;
        let addr = SocketAddr::new(target.ip(), sidecar_port);
        // The asked sidecar probes within one timeout of its own.
        tokio::time::timeout(self.timeout * 3, ask_sidecar(addr, suspect.node_id()))
            .await
            .ok()
            .flatten()
    }
}

/// Asks the sidecar at `addr` whether it reaches `suspect` (`GET
/// /v1/probe/<node id>`); `None` when it does not answer 200 with an answer.
async fn ask_sidecar(addr: SocketAddr, suspect: NodeId) -> Option<bool> {
    let body = get(addr, &format!("/v1/probe/{suspect}")).await?;
    serde_json::from_str::<IndirectAnswer>(&body)
        .ok()
        .map(|a| a.reachable)
}

/// The member's p2p endpoint, resolved; `None` when its host does not resolve.
async fn resolve(enode: &Enode) -> Option<SocketAddr> {
    tokio::net::lookup_host(format!("{}:{}", enode.host(), enode.tcp_port()))
        .await
        .ok()?
        .next()
}

/// The source address the kernel picks for `target` (a connected UDP socket
/// sends nothing).
fn source_for(target: SocketAddr) -> Option<IpAddr> {
    let unspecified: SocketAddr = if target.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    UdpSocket::bind(unspecified)
        .and_then(|s| s.connect(target).and_then(|()| s.local_addr()))
        .map(|a| a.ip())
        .ok()
}

/// Asks the sidecar at `addr` who it is; `None` when nothing (or no sidecar)
/// answers.
async fn identity(addr: SocketAddr) -> Option<Identity> {
    serde_json::from_str(&get(addr, "/identity").await?).ok()
}

/// A plain HTTP/1.0 GET of `path` at `addr`: the body of a 200 answer. The
/// sidecar's answers are small; at most 4 KiB is read.
async fn get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request =
        format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: application/json\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut body = Vec::with_capacity(512);
    stream.take(4096).read_to_end(&mut body).await.ok()?;
    let text = std::str::from_utf8(&body).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let ok = head.starts_with("HTTP/1.") && head.split_whitespace().nth(1) == Some("200");
    ok.then(|| body.to_owned())
}

/// The TCP probe's target: geth's port at `target`, unless geth throttles
/// inbound connections from `source` (unknown: not throttled), then the
/// sidecar's port. geth refuses a second inbound connection from one IP
/// within 30 s outside its LAN ranges (see
/// [`geth_ipc::geth_throttles_inbound_from`]): a probe there would delay our
/// geth's next dial by 30 s.
pub(crate) fn probe_addr(
    target: SocketAddr,
    source: Option<IpAddr>,
    sidecar_port: u16,
) -> (SocketAddr, ProbeVia) {
    match source {
        Some(ip) if geth_ipc::geth_throttles_inbound_from(ip) => (
            SocketAddr::new(target.ip(), sidecar_port),
            ProbeVia::SidecarPort(sidecar_port),
        ),
        _ => (target, ProbeVia::GethPort),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_avoid_geths_port_only_from_addresses_geth_throttles() {
        let target: SocketAddr = "100.64.0.7:30303".parse().expect("addr");
        let ip = |s: &str| Some(s.parse::<IpAddr>().expect("ip"));
        assert_eq!(
            probe_addr(target, ip("100.64.0.9"), 9090),
            (
                "100.64.0.7:9090".parse().expect("addr"),
                ProbeVia::SidecarPort(9090)
            )
        );
        let lan: SocketAddr = "10.244.0.7:30303".parse().expect("addr");
        assert_eq!(
            probe_addr(lan, ip("10.244.0.9"), 9090),
            (lan, ProbeVia::GethPort)
        );
        assert_eq!(probe_addr(lan, None, 9090), (lan, ProbeVia::GethPort));
    }
}
