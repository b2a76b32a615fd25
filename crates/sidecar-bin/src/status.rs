//! `geth-peer-sidecar status`: the registry's members as a table.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::time::Duration;

use geth_ipc::AdminApi;
use peer_registry::{PeerRegistry, Snapshot};

fn age(since: jiff::Timestamp, now: jiff::Timestamp) -> String {
    let secs = now.as_second().saturating_sub(since.as_second()).max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// What this geth says about the peers: its own node id and its connected
/// peers (admin_nodeInfo, admin_peers).
pub(crate) struct GethView {
    /// This geth's node id: its member row shows `self`.
    pub(crate) own: geth_ipc::NodeId,
    /// The node ids in admin_peers.
    pub(crate) connected: BTreeSet<geth_ipc::NodeId>,
}

/// Renders the table. `geth` is None when geth could not be asked.
pub(crate) fn render(snap: &Snapshot, geth: Option<&GethView>, now: jiff::Timestamp) -> String {
    let mut rows = vec![vec![
        "POD".to_owned(),
        "NODE".to_owned(),
        "ADDRESS".to_owned(),
        "AGE".to_owned(),
        "CONNECTED".to_owned(),
    ]];
    let conn = |id: &geth_ipc::NodeId| match geth {
        None => "?".to_owned(),
        Some(g) if g.own == *id => "self".to_owned(),
        Some(g) if g.connected.contains(id) => "yes".to_owned(),
        Some(_) => "no".to_owned(),
    };
    for m in snap.members.values() {
        rows.push(vec![
            m.pod.clone(),
            m.node_id.short(),
            format!("{}:{}", m.enode.host(), m.enode.tcp_port()),
            age(m.registered_at, now),
            conn(&m.node_id),
        ]);
    }
    for e in &snap.external {
        rows.push(vec![
            "(external)".to_owned(),
            e.node_id().short(),
            format!("{}:{}", e.host(), e.tcp_port()),
            "-".to_owned(),
            conn(&e.node_id()),
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
    for p in &snap.problems {
        let _ = writeln!(out, "problem: {p}");
    }
    out
}

pub(crate) async fn print<R: PeerRegistry, G: AdminApi>(
    registry: &R,
    geth: &G,
    namespace: &str,
    name: &str,
) -> anyhow::Result<()> {
    let snap = registry
        .snapshot()
        .await
        .map_err(|e| anyhow::anyhow!("reading ConfigMap {namespace}/{name}: {e}"))?;
    let view = tokio::time::timeout(Duration::from_secs(3), async {
        let own = geth.node_info().await.ok()?.id;
        let connected = geth.peers().await.ok()?.into_iter().map(|p| p.id).collect();
        Some(GethView { own, connected })
    })
    .await
    .ok()
    .flatten();
    if !snap.exists() {
        eprintln!("ConfigMap {namespace}/{name} does not exist yet (no sidecar has registered)");
    }
    let table = render(&snap, view.as_ref(), jiff::Timestamp::now());
    #[allow(clippy::print_stdout)]
    {
        print!("{table}");
    }
    Ok(())
}
