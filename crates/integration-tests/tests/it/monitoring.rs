//! The alert rules the chart ships: the plain rules file passes
//! `promtool check rules`, its unit tests (`promtool test rules`, series that
//! should and should not fire for each alert) pass, every alert has a unit test
//! that fires and one that stays quiet, every alert is in the runbook
//! (docs/alerts.md), and the chart's PrometheusRule carries the file's groups
//! unchanged but for the `for` durations its values override.
//!
//! promtool and helm come from `testbed/provision.sh`: a missing tool fails
//! the test, it never skips.

use std::collections::BTreeSet;

use integration_tests::{TestContext, workspace_root};

use crate::manifests::{documents, helm_template, run};

const RULES: &str = "charts/geth-peer-sidecar/alerts/geth-peer-sidecar.rules.yaml";
const RULE_TESTS: &str = "charts/geth-peer-sidecar/alerts/tests";

fn read_yaml(rel: &str) -> serde_yaml::Value {
    let path = workspace_root().join(rel);
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{rel} is not YAML: {e}"))
}

/// The alert names of a rules document (`groups[].rules[].alert`).
fn alerts(rules: &serde_yaml::Value) -> Vec<String> {
    rules["groups"]
        .as_sequence()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_sequence().into_iter().flatten())
        .filter_map(|r| r["alert"].as_str().map(str::to_owned))
        .collect()
}

/// The unit-test files, as paths relative to the repository root.
fn rule_test_files() -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(workspace_root().join(RULE_TESTS))
        .unwrap()
        .filter_map(|e| {
            let name = e.ok()?.file_name().to_string_lossy().into_owned();
            name.ends_with(".yaml")
                .then(|| format!("{RULE_TESTS}/{name}"))
        })
        .collect();
    files.sort();
    files
}

#[test]
fn alert_rules_pass_promtool_and_each_alert_has_unit_tests_that_fire_and_stay_quiet() {
    let ctx = TestContext::new("alert_rules_promtool");
    let checked = run(&ctx, "promtool", &["check", "rules", RULES], None);
    let names = alerts(&read_yaml(RULES));
    assert!(
        checked.contains(&format!("SUCCESS: {} rules found", names.len())),
        "{checked}"
    );
    let expected: BTreeSet<&str> = [
        "GethPeerSidecarPartialMesh",
        "GethPeerSidecarPartitionSuspected",
        "GethPeerSidecarRegistryUnwritable",
        "GethPeerSidecarPeerLimitReached",
        "GethPeerSidecarNotPassing",
        "GethPeerSidecarGethUnreachable",
    ]
    .into();
    assert_eq!(
        names.iter().map(String::as_str).collect::<BTreeSet<_>>(),
        expected
    );
    let files = rule_test_files();
    assert!(!files.is_empty(), "no unit tests in {RULE_TESTS}");
    let mut args = vec!["test", "rules"];
    args.extend(files.iter().map(String::as_str));
    let tested = run(&ctx, "promtool", &args, None);
    assert!(tested.contains("SUCCESS"), "{tested}");
    // Each alert: one evaluation where it fires and one where it must not.
    let (mut fires, mut quiet) = (BTreeSet::new(), BTreeSet::new());
    for f in &files {
        for t in read_yaml(f)["tests"].as_sequence().into_iter().flatten() {
            for a in t["alert_rule_test"].as_sequence().into_iter().flatten() {
                let name = a["alertname"].as_str().unwrap_or_default().to_owned();
                let expected = a["exp_alerts"].as_sequence().map_or(0, Vec::len);
                if expected > 0 {
                    fires.insert(name);
                } else {
                    quiet.insert(name);
                }
            }
        }
    }
    for name in &names {
        assert!(fires.contains(name), "no unit test where {name} fires");
        assert!(
            quiet.contains(name),
            "no unit test where {name} stays quiet"
        );
    }
    // The runbook has a section per alert (the rules' `runbook` annotations
    // point at these anchors).
    let runbook = std::fs::read_to_string(workspace_root().join("docs/alerts.md")).unwrap();
    for name in &names {
        assert!(
            runbook.contains(&format!("\n### {name}\n")),
            "docs/alerts.md has no section for {name}"
        );
    }
}

/// The PrometheusRule document of a `helm template` output.
fn prometheus_rule(rendered: &str) -> Option<serde_yaml::Value> {
    documents(rendered)
        .into_iter()
        .find(|d| d["kind"] == "PrometheusRule")
}

#[test]
fn the_charts_prometheus_rule_carries_the_rules_file_and_overrides_only_for() {
    let ctx = TestContext::new("alert_rules_chart");
    assert!(
        prometheus_rule(&helm_template(&ctx, "eth", &[])).is_none(),
        "a PrometheusRule is rendered with the default values (it needs the operator's CRDs)"
    );
    let file = read_yaml(RULES);
    let rendered = helm_template(&ctx, "eth", &["metrics.prometheusRule.enabled=true"]);
    let rule = prometheus_rule(&rendered).expect("no PrometheusRule rendered");
    assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(
        rule["spec"], file,
        "the PrometheusRule's spec differs from {RULES}"
    );
    // What the chart renders is a valid rules file for promtool too.
    let spec = ctx.path("rendered.rules.yaml");
    std::fs::write(&spec, serde_yaml::to_string(&rule["spec"]).unwrap()).unwrap();
    run(
        &ctx,
        "promtool",
        &["check", "rules", &spec.to_string_lossy()],
        None,
    );
    // An override changes that alert's `for` and nothing else.
    let rendered = helm_template(
        &ctx,
        "eth",
        &[
            "metrics.prometheusRule.enabled=true",
            "metrics.prometheusRule.for.GethPeerSidecarNotPassing=13m",
            "metrics.prometheusRule.labels.release=kube-prometheus",
        ],
    );
    let rule = prometheus_rule(&rendered).unwrap();
    assert_eq!(rule["metadata"]["labels"]["release"], "kube-prometheus");
    let mut want = file.clone();
    for group in want["groups"].as_sequence_mut().unwrap() {
        for r in group["rules"].as_sequence_mut().unwrap() {
            if r["alert"] == "GethPeerSidecarNotPassing" {
                r["for"] = "13m".into();
            }
        }
    }
    assert_eq!(rule["spec"], want);
    assert_ne!(rule["spec"], file);
    // A misspelt alert name fails the render instead of being ignored.
    let out = std::process::Command::new(crate::manifests::tool("helm"))
        .args([
            "template",
            "gps",
            "charts/geth-peer-sidecar",
            "--set",
            "metrics.prometheusRule.enabled=true",
            "--set",
            "metrics.prometheusRule.for.GethPeerSidecarPartialMes=1m",
        ])
        .current_dir(workspace_root())
        .env("HOME", ctx.path("tool-home"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("GethPeerSidecarPartialMes: no such alert"),
        "an unknown alert name in metrics.prometheusRule.for renders: {stderr}"
    );
}
