//! The registry as `geth-peer-sidecar status` and the `/status` endpoint show it:
//! a table for people, JSON for tools.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::time::Duration;

use geth_ipc::{AdminApi, NodeId};
use peer_registry::{MemberRecord, PeerRegistry, Snapshot};
use serde::Serialize;

/// Output format of `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// An aligned table.
    Table,
    /// One JSON object (the `registry` part of the `/status` endpoint).
    Json,
    /// The mesh as a Graphviz DOT graph, from every member's `/status` asked
    /// at this port ([`crate::mesh_graph`]).
    Dot {
        /// The members' sidecar HTTP port.
        sidecar_port: u16,
    },
}

/// One member, with whether this geth is connected to it (`None`: unknown,
/// geth could not be asked, e.g. from outside the pod).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberView<'a> {
    #[serde(flatten)]
    record: &'a MemberRecord,
    connected: Option<bool>,
    /// This geth's own record (shown as `self`).
    #[serde(rename = "self", skip_serializing_if = "std::ops::Not::not")]
    is_self: bool,
}

/// One external peer (ConfigMap key `external-peers.json`).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExternalView<'a> {
    enode: &'a geth_ipc::Enode,
    node_id: NodeId,
    connected: Option<bool>,
}

/// The registry at one resourceVersion, and this geth's connections to it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistryView<'a> {
    /// False when the ConfigMap does not exist yet.
    exists: bool,
    resource_version: Option<&'a str>,
    members: Vec<MemberView<'a>>,
    external: Vec<ExternalView<'a>>,
    /// Problems found while decoding the ConfigMap.
    problems: &'a [String],
}

impl<'a> RegistryView<'a> {
    /// `connected` is `None` when geth could not be asked; `own` is this
    /// geth's node id, when known.
    pub fn new(
        snap: &'a Snapshot,
        connected: Option<&BTreeSet<NodeId>>,
        own: Option<&NodeId>,
    ) -> Self {
        let conn = |id: &NodeId| connected.map(|c| c.contains(id));
        RegistryView {
            exists: snap.exists(),
            resource_version: snap.resource_version.as_deref(),
            members: snap
                .members
                .values()
                .map(|record| MemberView {
                    record,
                    connected: conn(&record.node_id),
                    is_self: own == Some(&record.node_id),
                })
                .collect(),
            external: snap
                .external
                .iter()
                .map(|enode| ExternalView {
                    enode,
                    node_id: enode.node_id(),
                    connected: conn(&enode.node_id()),
                })
                .collect(),
            problems: &snap.problems,
        }
    }
}

fn age(since: jiff::Timestamp, now: jiff::Timestamp) -> String {
    let secs = now.as_second().saturating_sub(since.as_second()).max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

fn yes_no(connected: Option<bool>) -> String {
    match connected {
        None => "?",
        Some(true) => "yes",
        Some(false) => "no",
    }
    .to_owned()
}

/// Renders the table.
pub fn render(view: &RegistryView<'_>, now: jiff::Timestamp) -> String {
    let mut rows = vec![vec![
        "POD".to_owned(),
        "NODE".to_owned(),
        "ADDRESS".to_owned(),
        "AGE".to_owned(),
        "CONNECTED".to_owned(),
    ]];
    for m in &view.members {
        let r = m.record;
        rows.push(vec![
            r.pod.clone(),
            r.node_id.short(),
            format!("{}:{}", r.enode.host(), r.enode.tcp_port()),
            age(r.registered_at, now),
            if m.is_self {
                "self".to_owned()
            } else {
                yes_no(m.connected)
            },
        ]);
    }
    for e in &view.external {
        rows.push(vec![
            "(external)".to_owned(),
            e.node_id.short(),
            format!("{}:{}", e.enode.host(), e.enode.tcp_port()),
            "-".to_owned(),
            yes_no(e.connected),
        ]);
    }
    let widths: Vec<usize> = (0..5)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    for p in view.problems {
        let _ = writeln!(out, "problem: {p}");
    }
    out
}

/// What `status` shows: the registry and, when geth's IPC answers within 3 s,
/// this geth's connection to each member. From outside the pod only the
/// kubeconfig is needed: CONNECTED is then unknown. `None` when the registry
/// does not exist yet (no sidecar has registered).
pub async fn show<R: PeerRegistry, G: AdminApi>(
    registry: &R,
    geth: &G,
    output: Output,
) -> peer_registry::Result<Option<String>> {
    let snap = registry.snapshot().await?;
    if !snap.exists() {
        return Ok(None);
    }
    // geth's own id and its peers, when its IPC answers within 3 s.
    let geth_view = tokio::time::timeout(Duration::from_secs(3), async {
        let own = geth.node_info().await.ok()?.id;
        let connected: BTreeSet<NodeId> =
            geth.peers().await.ok()?.into_iter().map(|p| p.id).collect();
        Some((own, connected))
    })
    .await
    .ok()
    .flatten();
    let view = RegistryView::new(
        &snap,
        geth_view.as_ref().map(|(_, c)| c),
        geth_view.as_ref().map(|(own, _)| own),
    );
    Ok(Some(match output {
        Output::Table => render(&view, jiff::Timestamp::now()),
        Output::Json => {
            let mut s = serde_json::to_string_pretty(&view).unwrap_or_default();
            s.push('\n');
            s
        }
        Output::Dot { sidecar_port } => {
            crate::mesh_graph::render_dot(&crate::mesh_graph::collect(&snap, sidecar_port).await)
        }
    }))
}
