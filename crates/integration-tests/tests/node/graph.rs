//! `geth-peer-sidecar status -o dot` in a sidecar container of the chart's
//! release: the mesh as the sidecars' `/status` report it, rendered by
//! Debian's graphviz. `GPS_WRITE_DOCS=1` writes the SVG to docs/ (the one
//! docs/operations.md shows).

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use integration_tests::{Release, eventually, workspace_root};

use crate::Shared;

/// Where the rendered graph goes with `GPS_WRITE_DOCS=1`.
const SVG_DOC: &str = "docs/mesh-graph.svg";

/// `dot -Tsvg` of `dot`.
fn render_svg(dot: &str) -> String {
    let mut child = Command::new("dot")
        .arg("-Tsvg")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("dot (graphviz; scripts/system-deps.sh installs it): {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(dot.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "dot -Tsvg refused the graph: {}\n{dot}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub async fn status_dot_of_a_full_mesh_renders_with_graphviz_every_pod_and_no_missing_link(
    shared: Arc<Shared>,
) {
    let node = shared.node().await;
    let r = Release::install_chart(&node, "graph", 3, &["--set", "replicas=3"])
        .await
        .unwrap();
    let (pods, took) = r.wait_full_mesh(3, Duration::from_secs(240)).await.unwrap();
    eprintln!("[graph] full mesh of 3 after {:.1} s", took.as_secs_f64());
    let status = |pod: &str| {
        r.kubectl(&[
            "exec",
            pod,
            "-c",
            "geth-peer-sidecar",
            "--",
            "geth-peer-sidecar",
            "status",
            "-o",
            "dot",
        ])
    };
    // geth's view is in place; each sidecar reports it after its next pass.
    let dot = eventually(
        "status -o dot showing 3 of 3 links up",
        Duration::from_secs(60),
        || async {
            let dot = status(&pods[0].name).ok()?;
            dot.contains("3 members, 3 of 3 links up\"").then_some(dot)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}; last: {:?}", status(&pods[0].name)));
    let svg = render_svg(&dot);
    assert!(svg.starts_with("<?xml"), "{svg}");
    // graphviz writes '-' as an entity.
    let text = |s: &str| format!(">{}</text>", s.replace('-', "&#45;"));
    for p in &pods {
        let ip = p.ip.unwrap().to_string();
        assert!(
            svg.contains(&text(&p.name)) && svg.contains(&text(&format!("{ip}:30303"))),
            "{} ({ip}) not drawn:\n{svg}",
            p.name
        );
    }
    assert_eq!(svg.matches("class=\"node\"").count(), 3, "{svg}");
    assert_eq!(svg.matches("class=\"edge\"").count(), 3, "{svg}");
    assert!(
        !svg.contains("missing") && !svg.contains("did not answer"),
        "{svg}"
    );
    if std::env::var_os("GPS_WRITE_DOCS").is_some_and(|v| v == "1") {
        std::fs::write(workspace_root().join(SVG_DOC), &svg).unwrap();
        eprintln!("[graph] wrote {SVG_DOC}");
    }
}
