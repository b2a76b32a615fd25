//! The mesh as a Graphviz DOT graph (`geth-peer-sidecar status -o dot`): one
//! node per member, an edge per connected pair, and the links that should
//! exist but do not drawn apart (red, dashed, "missing"), from what each
//! member's sidecar reports on `/status` (geth's own peers, and the members
//! its engine finds unreachable or awaits confirmation on).

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use geth_ipc::NodeId;
use peer_registry::Snapshot;
use serde::Deserialize;

/// How long a member's sidecar has to answer `/status`.
const STATUS_TIMEOUT: Duration = Duration::from_secs(3);
/// The most of a `/status` answer read (it grows with the registry).
const STATUS_LIMIT: u64 = 4 << 20;

/// One member as the graph draws it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GraphMember {
    /// Pod name.
    pub pod: String,
    /// geth's node id.
    pub node_id: NodeId,
    /// Where other geths dial it (`host:port`).
    pub address: String,
    /// What its sidecar reported; `None` when its `/status` did not answer.
    pub report: Option<SidecarReport>,
}

/// What one sidecar's `/status` says about the others.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SidecarReport {
    /// The node ids its geth is connected to (`admin_peers`).
    pub connected: BTreeSet<NodeId>,
    /// Members unreachable from it for at least `dead_after`.
    pub unreachable: BTreeSet<NodeId>,
    /// Members whose removal awaits other members' confirmation.
    pub awaiting_confirmation: BTreeSet<NodeId>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StatusDoc {
    report: Option<ReportDoc>,
    registry: Option<RegistryDoc>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReportDoc {
    #[serde(default)]
    unreachable: Vec<PeerDoc>,
    #[serde(default)]
    awaiting_confirmation: Vec<PeerDoc>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PeerDoc {
    node_id: NodeId,
}

#[derive(Deserialize)]
struct RegistryDoc {
    #[serde(default)]
    members: Vec<MemberDoc>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MemberDoc {
    node_id: NodeId,
    connected: Option<bool>,
}

impl SidecarReport {
    /// Reads a sidecar's `/status` document; `None` when it is not one, or
    /// has not planned yet (no registry view).
    pub fn from_status(body: &str) -> Option<SidecarReport> {
        let doc: StatusDoc = serde_json::from_str(body).ok()?;
        let registry = doc.registry?;
        let ids = |peers: Vec<PeerDoc>| peers.into_iter().map(|p| p.node_id).collect();
        let (unreachable, awaiting_confirmation) = doc
            .report
            .map(|r| (ids(r.unreachable), ids(r.awaiting_confirmation)))
            .unwrap_or_default();
        Some(SidecarReport {
            connected: registry
                .members
                .into_iter()
                .filter(|m| m.connected == Some(true))
                .map(|m| m.node_id)
                .collect(),
            unreachable,
            awaiting_confirmation,
        })
    }
}

/// A link between two members.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Link {
    /// Either geth reports the other among its peers.
    Up,
    /// At least one of them reported, and neither is connected to the other.
    Missing,
    /// Neither reported.
    Unknown,
}

fn link(a: &GraphMember, b: &GraphMember) -> Link {
    let sees = |x: &GraphMember, y: &GraphMember| {
        x.report.as_ref().map(|r| r.connected.contains(&y.node_id))
    };
    match (sees(a, b), sees(b, a)) {
        (Some(true), _) | (_, Some(true)) => Link::Up,
        (None, None) => Link::Unknown,
        _ => Link::Missing,
    }
}

/// A DOT string literal.
fn quoted(s: &str) -> String {
    format!("\"{}\"", escaped(s))
}

fn escaped(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// A DOT label of several lines (`\n` between them).
fn label(lines: &[String]) -> String {
    let lines: Vec<String> = lines.iter().map(|l| escaped(l)).collect();
    format!("\"{}\"", lines.join("\\n"))
}

/// The members that `flagged` names in other members' reports.
fn named_by(
    members: &[GraphMember],
    m: &GraphMember,
    flagged: impl Fn(&SidecarReport) -> &BTreeSet<NodeId>,
) -> Vec<String> {
    members
        .iter()
        .filter(|o| o.pod != m.pod)
        .filter(|o| {
            o.report
                .as_ref()
                .is_some_and(|r| flagged(r).contains(&m.node_id))
        })
        .map(|o| o.pod.clone())
        .collect()
}

/// Renders the graph: members as nodes (pod, address, short node id), one
/// solid edge per connected pair, red dashed "missing" edges for pairs that
/// should be connected and are not, grey dotted "unknown" ones between two
/// members whose sidecars did not answer. A member whose `/status` did not
/// answer, or that others find unreachable or await confirmation on, is
/// drawn red (or orange) with why.
pub fn render_dot(members: &[GraphMember]) -> String {
    let pairs: Vec<(usize, usize, Link)> = (0..members.len())
        .flat_map(|i| ((i + 1)..members.len()).map(move |j| (i, j)))
        .map(|(i, j)| (i, j, link(&members[i], &members[j])))
        .collect();
    let count = |l: Link| pairs.iter().filter(|(_, _, x)| *x == l).count();
    let (up, missing, unknown) = (count(Link::Up), count(Link::Missing), count(Link::Unknown));
    let mut title = format!(
        "geth mesh: {} members, {up} of {} links up",
        members.len(),
        pairs.len()
    );
    if missing > 0 {
        let _ = write!(title, ", {missing} missing");
    }
    if unknown > 0 {
        let _ = write!(title, ", {unknown} unknown");
    }
    let mut out = String::from("graph mesh {\n");
    let _ = writeln!(
        out,
        "  graph [label={}, labelloc=t, fontname=\"Helvetica\"];",
        quoted(&title)
    );
    out += "  node [shape=box, style=\"rounded,filled\", fillcolor=\"#e5f5e0\", fontname=\"Helvetica\"];\n";
    out += "  edge [color=\"#31a354\", penwidth=2];\n";
    for m in members {
        let mut lines = vec![m.pod.clone(), m.address.clone(), m.node_id.short()];
        let mut attrs = String::new();
        let unreachable = named_by(members, m, |r| &r.unreachable);
        let awaiting = named_by(members, m, |r| &r.awaiting_confirmation);
        if m.report.is_none() {
            lines.push("/status did not answer".to_owned());
            attrs += ", style=\"rounded,filled,dashed\", color=red, fillcolor=\"#fee0d2\"";
        } else if !unreachable.is_empty() || !awaiting.is_empty() {
            attrs += ", color=\"#e6550d\", fillcolor=\"#fdd0a2\"";
        }
        if !unreachable.is_empty() {
            lines.push(format!("unreachable from {}", unreachable.join(", ")));
        }
        if !awaiting.is_empty() {
            lines.push(format!(
                "removal awaits confirmation ({})",
                awaiting.join(", ")
            ));
        }
        let _ = writeln!(
            out,
            "  {} [label={}{attrs}];",
            quoted(&m.pod),
            label(&lines)
        );
    }
    for (i, j, l) in pairs {
        let attrs = match l {
            Link::Up => "",
            // Not used to place the nodes: missing links are drawn apart.
            Link::Missing => {
                " [style=dashed, color=red, fontcolor=red, penwidth=1, label=\"missing\", constraint=false]"
            }
            Link::Unknown => {
                " [style=dotted, color=grey, fontcolor=grey, penwidth=1, label=\"unknown\", constraint=false]"
            }
        };
        let _ = writeln!(
            out,
            "  {} -- {}{attrs};",
            quoted(&members[i].pod),
            quoted(&members[j].pod)
        );
    }
    out += "}\n";
    out
}

/// Asks the sidecar of `record` for its `/status` at `sidecar_port`.
async fn ask(record: &peer_registry::MemberRecord, sidecar_port: u16) -> Option<SidecarReport> {
    let ip: IpAddr = match record.pod_ip.as_deref().and_then(|ip| ip.parse().ok()) {
        Some(ip) => ip,
        None => tokio::net::lookup_host((record.enode.host().to_string(), sidecar_port))
            .await
            .ok()?
            .next()?
            .ip(),
    };
    let addr = SocketAddr::new(ip, sidecar_port);
    match crate::probe::request(addr, "/status", STATUS_LIMIT).await? {
        (200, body) => SidecarReport::from_status(&body),
        _ => None,
    }
}

/// Every member of `snap` with what its sidecar (at `sidecar_port`) reports,
/// asked all at once, each within 3 s.
pub async fn collect(snap: &Snapshot, sidecar_port: u16) -> Vec<GraphMember> {
    let asks = snap.members.values().map(|record| async move {
        let report = tokio::time::timeout(STATUS_TIMEOUT, ask(record, sidecar_port))
            .await
            .ok()
            .flatten();
        GraphMember {
            pod: record.pod.clone(),
            node_id: record.node_id,
            address: format!("{}:{}", record.enode.host(), record.enode.tcp_port()),
            report,
        }
    });
    futures::future::join_all(asks).await
}

#[cfg(test)]
#[path = "mesh_graph_tests.rs"]
mod tests;
