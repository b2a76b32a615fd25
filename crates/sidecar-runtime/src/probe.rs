//! Probing members: who answers at a member's address, and is it the member?

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use geth_ipc::{Enode, NodeId};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::health::lock;
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
/// throttle us (geth refuses a second inbound connection from one IP within
/// 30 s outside its LAN ranges).
///
/// Once a member's sidecar has named itself, a bare TCP connect no longer
/// counts for that member: whatever listens at its address later (a pod
/// given its IP) must name it too. The TCP fallback stays for members whose
/// sidecar never answered (an older sidecar without `/identity`).
#[derive(Debug, Clone)]
pub struct TcpProber {
    /// How long one connect or request may take.
    pub timeout: Duration,
    /// Members whose sidecar has answered `/identity` with their node id.
    identified: Arc<Mutex<BTreeSet<NodeId>>>,
}

impl Default for TcpProber {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(2),
            identified: Arc::default(),
        }
    }
}

/// What a sidecar port answered to `GET /identity`.
#[derive(Debug)]
enum Answer {
    /// A sidecar named itself.
    Named(Identity),
    /// Something answered 200 that is not a sidecar's identity.
    NotASidecar,
    /// An HTTP server without `/identity` (an older sidecar), or one that
    /// cannot say yet (its geth has not answered).
    NoIdentity,
    /// Nothing answered (refused, closed, or silent until the timeout).
    Silent,
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
            None => match tokio::time::timeout(self.timeout, resolve(enode)).await {
                Ok(Some(a)) => a,
                _ => return ProbeOutcome::Unresolved,
            },
        };
        let sidecar = SocketAddr::new(target.ip(), sidecar_port);
        let (addr, via) = probe_addr(target, source_for(target), sidecar_port);
        // Both at once: an unreachable member costs one timeout, not two.
        let (answer, connected) = tokio::join!(
            tokio::time::timeout(self.timeout, identity(sidecar)),
            tokio::time::timeout(self.timeout, tokio::net::TcpStream::connect(addr)),
        );
        let answer = answer.unwrap_or(Answer::Silent);
        let id = enode.node_id();
        let known = lock(&self.identified).contains(&id);
        let by_identity = ProbeVia::Identity(sidecar_port);
        match answer {
            Answer::Named(named) if named.node_id == id => {
                lock(&self.identified).insert(id);
                ProbeOutcome::Reachable(by_identity)
            }
            // Another node, or no sidecar at all, answers at the address.
            Answer::Named(_) | Answer::NotASidecar => ProbeOutcome::Unreachable(by_identity),
            // Its sidecar named it before: something else holds the address now.
            Answer::Silent if known => ProbeOutcome::Unreachable(by_identity),
            // No identity to be had: geth's port (or the sidecar's) decides.
            _ if matches!(connected, Ok(Ok(_))) => ProbeOutcome::Reachable(via),
            _ => ProbeOutcome::Unreachable(via),
        }
    }

    async fn ask(
        &self,
        helper: &Enode,
        helper_addresses: &[SocketAddr],
        suspect: &Enode,
        sidecar_port: u16,
    ) -> Option<bool> {
        let target = match helper_addresses.first() {
            Some(a) => *a,
            None => tokio::time::timeout(self.timeout, resolve(helper))
                .await
                .ok()??,
        };
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

/// Asks the sidecar at `addr` who it is.
async fn identity(addr: SocketAddr) -> Answer {
    match request(addr, "/identity", ANSWER_LIMIT).await {
        None => Answer::Silent,
        Some((200, body)) => serde_json::from_str(&body).map_or(Answer::NotASidecar, Answer::Named),
        Some(_) => Answer::NoIdentity,
    }
}

/// The body of a 200 answer to `GET path` at `addr`.
async fn get(addr: SocketAddr, path: &str) -> Option<String> {
    match request(addr, path, ANSWER_LIMIT).await? {
        (200, body) => Some(body),
        _ => None,
    }
}

/// The most of a probe's or identity's answer read: they are small.
const ANSWER_LIMIT: u64 = 4096;

/// A plain HTTP/1.0 GET of `path` at `addr`: the status and body, `None`
/// when nothing answered HTTP. At most `limit` bytes are read.
pub(crate) async fn request(addr: SocketAddr, path: &str, limit: u64) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request =
        format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: application/json\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut body = Vec::with_capacity(512);
    stream.take(limit).read_to_end(&mut body).await.ok()?;
    let text = std::str::from_utf8(&body).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.") {
        return None;
    }
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
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
