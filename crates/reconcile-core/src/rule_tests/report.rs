//! The report: removals named for logs, serialized for the status
//! endpoint (engine/report.rs).

use super::*;

#[test]
fn removal_display_names_the_pod_and_short_node_id() {
    let mut w = World::mesh(3);
    w.pods_of(&[1, 2]);
    let p = w.plan();
    let line = p.report.removals[0].to_string();
    assert!(line.contains("geth-3"), "{line}");
    assert!(line.contains(&node(3).node_id().short()), "{line}");
    assert!(line.contains("no longer exists"), "{line}");
    let summary = p.report.to_string();
    assert!(summary.contains("geth-3"), "{summary}");
}

#[test]
fn the_report_serializes_for_the_status_endpoint() {
    let mut w = World::mesh(3);
    w.pods_of(&[1, 2]);
    let json = serde_json::to_value(w.plan().report).expect("serializes");
    assert_eq!(json["desired"], 2);
    assert_eq!(json["removals"][0]["record"]["pod"], "geth-3");
    assert_eq!(json["removals"][0]["reason"]["kind"], "podGone");
}
