use super::*;

fn id(n: u8) -> NodeId {
    format!("{n:02x}{}", "ab".repeat(31))
        .parse()
        .expect("64 hex characters")
}

/// Members geth-0..geth-(n-1); `links` are the connected pairs, each reported
/// by both sides; `silent` members' sidecars do not answer.
fn mesh(n: u8, links: &[(u8, u8)], silent: &[u8]) -> Vec<GraphMember> {
    (0..n)
        .map(|i| GraphMember {
            pod: format!("geth-{i}"),
            node_id: id(i),
            address: format!("10.0.0.{}:30303", 10 + i),
            report: (!silent.contains(&i)).then(|| SidecarReport {
                connected: links
                    .iter()
                    .filter_map(|&(a, b)| match i {
                        _ if i == a => Some(id(b)),
                        _ if i == b => Some(id(a)),
                        _ => None,
                    })
                    .collect(),
                ..SidecarReport::default()
            }),
        })
        .collect()
}

fn edge_lines(dot: &str) -> Vec<&str> {
    dot.lines().filter(|l| l.contains(" -- ")).collect()
}

#[test]
fn a_full_mesh_draws_every_pair_connected_and_nothing_missing() {
    let dot = render_dot(&mesh(3, &[(0, 1), (0, 2), (1, 2)], &[]));
    assert!(
        dot.starts_with("graph mesh {\n") && dot.ends_with("}\n"),
        "{dot}"
    );
    assert_eq!(
        edge_lines(&dot),
        [
            "  \"geth-0\" -- \"geth-1\";",
            "  \"geth-0\" -- \"geth-2\";",
            "  \"geth-1\" -- \"geth-2\";"
        ]
    );
    assert!(!dot.contains("missing"), "{dot}");
    assert!(dot.contains("3 members, 3 of 3 links up\""), "{dot}");
    assert!(
        dot.contains(&format!(
            "\"geth-1\" [label=\"geth-1\\n10.0.0.11:30303\\n{}\"];",
            id(1).short()
        )),
        "{dot}"
    );
}

#[test]
fn a_partial_mesh_draws_the_absent_link_apart_as_missing() {
    // geth-0 and geth-2 both report, and neither is connected to the other.
    let dot = render_dot(&mesh(3, &[(0, 1), (1, 2)], &[]));
    let edges = edge_lines(&dot);
    assert_eq!(edges.len(), 3);
    assert_eq!(
        edges[1],
        "  \"geth-0\" -- \"geth-2\" [style=dashed, color=red, fontcolor=red, penwidth=1, label=\"missing\", constraint=false];"
    );
    assert_eq!(edges.iter().filter(|e| e.contains("missing")).count(), 1);
    assert!(dot.contains("2 of 3 links up, 1 missing\""), "{dot}");
}

#[test]
fn a_link_one_side_reports_is_up() {
    let mut members = mesh(2, &[], &[]);
    if let Some(r) = members[0].report.as_mut() {
        r.connected.insert(id(1));
    }
    assert_eq!(
        edge_lines(&render_dot(&members)),
        ["  \"geth-0\" -- \"geth-1\";"]
    );
}

#[test]
fn a_member_down_is_marked_and_its_links_are_missing_as_the_others_see_them() {
    let mut members = mesh(3, &[(0, 1)], &[2]);
    for r in members.iter_mut().filter_map(|m| m.report.as_mut()) {
        r.unreachable.insert(id(2));
        r.awaiting_confirmation.insert(id(2));
    }
    let dot = render_dot(&members);
    let node = dot
        .lines()
        .find(|l| l.starts_with("  \"geth-2\" ["))
        .expect("geth-2 drawn");
    assert!(node.contains("/status did not answer"), "{node}");
    assert!(node.contains("unreachable from geth-0, geth-1"), "{node}");
    assert!(
        node.contains("removal awaits confirmation (geth-0, geth-1)"),
        "{node}"
    );
    assert!(node.contains("color=red"), "{node}");
    let missing: Vec<&str> = edge_lines(&dot)
        .into_iter()
        .filter(|e| e.contains("missing"))
        .collect();
    assert_eq!(missing.len(), 2, "{dot}");
    assert!(missing.iter().all(|e| e.contains("\"geth-2\"")), "{dot}");
    assert!(dot.contains("1 of 3 links up, 2 missing\""), "{dot}");
}

#[test]
fn two_silent_members_have_an_unknown_link() {
    let dot = render_dot(&mesh(2, &[], &[0, 1]));
    assert!(dot.contains("label=\"unknown\""), "{dot}");
    assert!(!dot.contains("\"missing\""), "{dot}");
}

#[test]
fn names_are_quoted_for_dot() {
    let mut members = mesh(1, &[], &[]);
    members[0].pod = "a\"b\\c".into();
    assert!(render_dot(&members).contains("  \"a\\\"b\\\\c\" [label=\"a\\\"b\\\\c\\n"));
}

#[test]
fn a_status_document_gives_geths_peers_and_the_engines_findings() {
    let body = format!(
        r#"{{"pod":"geth-0","report":{{"unreachable":[{{"pod":"geth-2","nodeId":"{two}"}}],
        "awaitingConfirmation":[{{"pod":"geth-2","nodeId":"{two}"}}]}},
        "registry":{{"exists":true,"members":[
          {{"pod":"geth-0","nodeId":"{zero}","self":true,"connected":false}},
          {{"pod":"geth-1","nodeId":"{one}","connected":true}},
          {{"pod":"geth-2","nodeId":"{two}","connected":false}}]}}}}"#,
        zero = id(0),
        one = id(1),
        two = id(2)
    );
    let report = SidecarReport::from_status(&body).expect("a status document");
    assert_eq!(report.connected, BTreeSet::from([id(1)]));
    assert_eq!(report.unreachable, BTreeSet::from([id(2)]));
    assert_eq!(report.awaiting_confirmation, BTreeSet::from([id(2)]));
    // Before the first planned pass there is no registry view.
    assert_eq!(
        SidecarReport::from_status(r#"{"pod":null,"registry":null}"#),
        None
    );
    assert_eq!(SidecarReport::from_status("not json"), None);
}
