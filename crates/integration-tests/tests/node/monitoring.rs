//! The chart's monitoring against a real Prometheus: the release's sidecars
//! scraped the way the chart's PodMonitor says (its selector, port and path
//! turned into a `kubernetes_sd_configs` scrape config, as the Prometheus
//! Operator does), every query of the shipped Grafana dashboard answered with
//! series over Prometheus' HTTP API, the alert rules loaded and healthy, and
//! the panels that should move moving when one geth stops answering (its
//! container frozen): missing peers above
//! 0, the stopped pod's geth RPC errors rising and the partial-mesh alert
//! pending, then missing peers back to 0 once geth is back (geth's own
//! `admin.peers` shows the full mesh again).
//!
//! Prometheus runs in the node's network namespace (where the pod IPs are),
//! as a child of the test (process group, pdeathsig, drop guard), its data in
//! the test's directory.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use integration_tests::{KubeNode, Proc, Release, eventually, http_get, testbed, workspace_root};
use serde_json::{Value, json};

use crate::Shared;
use crate::chart::{MESH_TIMEOUT, RELEASE, install_meshed};

/// Prometheus' port in the node's network namespace.
const PROMETHEUS_PORT: u16 = 19090;
/// Scrape and rule evaluation interval: short, to keep the test fast.
const SCRAPE_INTERVAL: &str = "1s";
/// What Grafana makes of the dashboard's interval variables for a 5-minute
/// view with a 1 s scrape interval ($__rate_interval: four scrape intervals).
const GRAFANA_INTERVALS: [(&str, &str); 3] = [
    ("$__rate_interval", "4s"),
    ("$__interval", "1s"),
    ("$__range", "5m"),
];
const DASHBOARD: &str = "charts/geth-peer-sidecar/dashboards/geth-peer-sidecar.json";
const RULES: &str = "charts/geth-peer-sidecar/alerts/geth-peer-sidecar.rules.yaml";

/// The PodMonitor the chart renders for this release (same values as the
/// install, plus `metrics.podMonitor.enabled`).
fn pod_monitor(node: &KubeNode, ns: &str) -> serde_yaml::Value {
    let chart = workspace_root().join("charts/geth-peer-sidecar");
    let out = node
        .helm(&[
            "template",
            RELEASE,
            &chart.to_string_lossy(),
            "-n",
            ns,
            "--set",
            "metrics.podMonitor.enabled=true",
            "--show-only",
            "templates/monitoring.yaml",
        ])
        .unwrap();
    serde_yaml::from_str(&out).unwrap()
}

/// A Prometheus label name made of a Kubernetes label key (as its pod
/// discovery does: every character outside `[a-zA-Z0-9_]` becomes `_`).
fn label_name(key: &str) -> String {
    key.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// The scrape config the Prometheus Operator generates for `monitor`: pods of
/// `ns` whose labels match its selector, on the container port it names, at
/// its path; `namespace`, `pod` and `container` labels set from discovery.
fn scrape_config(monitor: &serde_yaml::Value, ns: &str, api: &str, token: &str, ca: &str) -> Value {
    let endpoint = &monitor["spec"]["podMetricsEndpoints"][0];
    let (port, path) = (
        endpoint["port"].as_str().unwrap(),
        endpoint["path"].as_str().unwrap(),
    );
    let mut relabel = Vec::new();
    for (k, v) in monitor["spec"]["selector"]["matchLabels"]
        .as_mapping()
        .unwrap()
    {
        let (k, v) = (k.as_str().unwrap(), v.as_str().unwrap());
        assert!(
            v.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
            "selector value {v:?} would need regex escaping"
        );
        let l = label_name(k);
        relabel.push(json!({
            "source_labels": [
                format!("__meta_kubernetes_pod_label_{l}"),
                format!("__meta_kubernetes_pod_labelpresent_{l}"),
            ],
            "regex": format!("({v});true"),
            "action": "keep",
        }));
    }
    relabel.extend([
        json!({"source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": port, "action": "keep"}),
        json!({"source_labels": ["__meta_kubernetes_pod_phase"], "regex": "(Failed|Succeeded)", "action": "drop"}),
        json!({"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"}),
        json!({"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"}),
        json!({"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"}),
    ]);
    let name = monitor["metadata"]["name"].as_str().unwrap();
    json!({
        "global": {
            "scrape_interval": SCRAPE_INTERVAL,
            "scrape_timeout": SCRAPE_INTERVAL,
            "evaluation_interval": SCRAPE_INTERVAL,
        },
        "rule_files": [workspace_root().join(RULES)],
        "scrape_configs": [{
            "job_name": format!("podMonitor/{ns}/{name}/0"),
            "metrics_path": path,
            "kubernetes_sd_configs": [{
                "role": "pod",
                "api_server": api,
                "namespaces": {"names": [ns]},
                "authorization": {"credentials_file": token},
                "tls_config": {"ca_file": ca},
            }],
            "relabel_configs": relabel,
        }],
    })
}

/// A read-only identity for Prometheus: a ServiceAccount allowed to get, list
/// and watch pods in the namespace, and a token for it.
fn reader_token(release: &Release<'_>) -> String {
    let ns = release.ns.as_str();
    for args in [
        vec!["create", "serviceaccount", "prometheus"],
        vec![
            "create",
            "role",
            "prometheus",
            "--verb=get,list,watch",
            "--resource=pods",
        ],
        vec!["create", "rolebinding", "prometheus", "--role=prometheus"],
    ] {
        let mut args = args;
        let sa = format!("--serviceaccount={ns}:prometheus");
        if args[1] == "rolebinding" {
            args.push(&sa);
        }
        release.kubectl(&args).unwrap();
    }
    release
        .kubectl(&["create", "token", "prometheus", "--duration=1h"])
        .unwrap()
        .trim()
        .to_owned()
}

/// Prometheus' HTTP API.
struct Api {
    base: String,
}

/// Percent-encodes a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Api {
    /// GET `path`: the `data` of a successful answer, or Prometheus' error.
    async fn get(&self, path: &str) -> Result<Value, String> {
        let (code, body) = http_get(&format!("{}{path}", self.base))
            .await
            .map_err(|e| e.to_string())?;
        let v: Value =
            serde_json::from_str(&body).map_err(|e| format!("HTTP {code}: {e}: {body}"))?;
        if v["status"] != "success" {
            return Err(format!("HTTP {code}: {} {}", v["errorType"], v["error"]));
        }
        Ok(v["data"].clone())
    }

    /// An instant query's series.
    async fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let data = self
            .get(&format!("/api/v1/query?query={}", encode(expr)))
            .await?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }

    /// One value of an instant query that gives one series (None: no series).
    async fn scalar(&self, expr: &str) -> Option<f64> {
        let series = self.query(expr).await.ok()?;
        series.first()?["value"][1].as_str()?.parse().ok()
    }
}

/// Every panel target of the dashboard: (panel title, expression).
fn dashboard_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(workspace_root().join(DASHBOARD)).unwrap();
    let dashboard: Value = serde_json::from_str(&text).unwrap();
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            out.push((
                format!("{} ({})", panel["title"].as_str().unwrap(), t["refId"]),
                t["expr"].as_str().unwrap().to_owned(),
            ));
        }
    }
    out
}

/// `expr` with the dashboard's variables as Grafana sets them for this run.
fn substitute(expr: &str, vars: &BTreeMap<&str, String>) -> String {
    let mut e = expr.to_owned();
    for (k, v) in vars {
        e = e
            .replace(&format!("${{{k}}}"), v)
            .replace(&format!("${k}"), v);
    }
    for (k, v) in GRAFANA_INTERVALS {
        e = e.replace(k, v);
    }
    assert!(
        !e.contains('$'),
        "a dashboard variable this test does not set: {expr}"
    );
    e
}

pub async fn every_dashboard_query_returns_series_from_a_real_prometheus_and_missing_peers_moves_when_a_geth_stops(
    shared: Arc<Shared>,
) {
    let node = shared.node().await;
    let t0 = Instant::now();
    let (release, pods) = install_meshed(&node, "monitoring", 3).await;
    let ns = release.ns.clone();
    let cp = node.control_plane();
    let dir = shared.ctx.path(&format!("prometheus-{ns}"));
    std::fs::create_dir_all(dir.join("data")).unwrap();
    let token = dir.join("token");
    std::fs::write(&token, reader_token(&release)).unwrap();
    let ca = cp.dir().join("certs/apiserver.crt");
    let config = scrape_config(
        &pod_monitor(&node, &ns),
        &ns,
        &cp.server_url(),
        &token.to_string_lossy(),
        &ca.to_string_lossy(),
    );
    let config_file = dir.join("prometheus.yml");
    std::fs::write(&config_file, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    let listen = format!("{}:{PROMETHEUS_PORT}", cp.address());
    let _prometheus = Proc::spawn(
        &shared.ctx,
        &format!("prometheus-{ns}"),
        Some(node.netns()),
        &testbed().bin("prometheus"),
        [
            format!("--config.file={}", config_file.display()),
            format!("--storage.tsdb.path={}", dir.join("data").display()),
            format!("--web.listen-address={listen}"),
        ],
        &[],
    )
    .unwrap_or_else(|e| panic!("Prometheus (testbed/provision.sh builds it): {e}"));
    let api = Api {
        base: format!("http://{listen}"),
    };
    // Every sidecar is a healthy target.
    let targets = eventually(
        "Prometheus scraping the three sidecars",
        MESH_TIMEOUT,
        || async {
            let up = api
                .query(&format!("up{{namespace=\"{ns}\"}} == 1"))
                .await
                .ok()?;
            (up.len() == pods.len()).then_some(up)
        },
    )
    .await;
    let Ok(targets) = targets else {
        panic!(
            "Prometheus does not scrape the three sidecars: {:?}",
            api.get("/api/v1/targets").await
        );
    };
    for t in &targets {
        assert_eq!(t["metric"]["container"], "geth-peer-sidecar", "{t}");
    }
    // The dashboard's variables: its namespace query lists this namespace,
    // its pod query these pods (Grafana's label_values as the series API).
    let values = |label: &'static str| {
        let api = &api;
        async move {
            let data = api
                .get(&format!(
                    "/api/v1/label/{label}/values?match[]={}",
                    encode("geth_peer_sidecar_members")
                ))
                .await
                .ok()?;
            Some(
                data.as_array()?
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect::<Vec<_>>(),
            )
        }
    };
    let names: Vec<String> = pods.iter().map(|p| p.name.clone()).collect();
    assert_eq!(values("namespace").await, Some(vec![ns.clone()]));
    assert_eq!(values("pod").await, Some(names.clone()));
    let vars = BTreeMap::from([
        ("namespace", ns.clone()),
        ("pod", format!("({})", names.join("|"))),
    ]);
    // Every panel query: an error fails at once; no series fails at the deadline.
    let queries = dashboard_queries();
    let deadline = Instant::now() + Duration::from_secs(60);
    let empty = loop {
        let mut empty = Vec::new();
        for (panel, expr) in &queries {
            let e = substitute(expr, &vars);
            match api.query(&e).await {
                Ok(series) if series.is_empty() => empty.push(format!("{panel}: {e}")),
                Ok(_) => {}
                Err(err) => panic!("panel {panel}: Prometheus refused {e}: {err}"),
            }
        }
        if empty.is_empty() || Instant::now() >= deadline {
            break empty;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(empty.is_empty(), "panels without series: {empty:#?}");
    eprintln!(
        "[monitoring] {} dashboard queries answered, {:.1} s after helm install",
        queries.len(),
        t0.elapsed().as_secs_f64()
    );
    // The alert rules loaded and evaluate without error.
    let healthy = eventually(
        "the six alert rules evaluated",
        Duration::from_secs(30),
        || async {
            let data = api.get("/api/v1/rules").await.ok()?;
            let rules: Vec<&Value> = data["groups"]
                .as_array()?
                .iter()
                .flat_map(|g| g["rules"].as_array().into_iter().flatten())
                .collect();
            (rules.len() == 6 && rules.iter().all(|r| r["health"] == "ok")).then_some(())
        },
    )
    .await;
    assert!(
        healthy.is_ok(),
        "rules: {:?}",
        api.get("/api/v1/rules").await
    );
    let (_, missing) = queries
        .iter()
        .find(|(p, _)| p.starts_with("Missing peers (all pods)"))
        .expect("the dashboard's missing-peers panel");
    let missing = substitute(missing, &vars);
    assert_eq!(
        api.scalar(&missing).await,
        Some(0.0),
        "a full mesh misses no peer"
    );
    // Fault: geth in one pod stops answering (its container frozen). A killed
    // geth is restarted and re-peered within a scrape interval often enough
    // that no scrape sees the gap (a fresh-clone run did): frozen, the gap
    // lasts until the thaw. Its peers drop it at geth's read timeout (<= 30 s).
    let victim = pods[1].name.clone();
    let t_fault = Instant::now();
    let frozen = release.freeze(&victim, "geth").unwrap();
    let rpc_errors = format!(
        "sum(increase(geth_peer_sidecar_geth_rpc_errors_total{{namespace=\"{ns}\", pod=\"{victim}\"}}[1m]))"
    );
    // Each may come and go at its own time: each is polled until seen once.
    let (mut missing_moved, mut errors_moved, mut pending) = (false, false, false);
    let deadline = Instant::now() + MESH_TIMEOUT;
    while !(missing_moved && errors_moved && pending) && Instant::now() < deadline {
        missing_moved |= api.scalar(&missing).await.is_some_and(|v| v > 0.0);
        errors_moved |= api.scalar(&rpc_errors).await.is_some_and(|v| v > 0.0);
        if let Ok(alerts) = api.get("/api/v1/alerts").await {
            pending |= alerts["alerts"].as_array().into_iter().flatten().any(|a| {
                a["labels"]["alertname"] == "GethPeerSidecarPartialMesh" && a["state"] == "pending"
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    frozen.thaw().unwrap();
    assert!(
        missing_moved,
        "the missing-peers panel stayed at 0 after geth in {victim} stopped"
    );
    assert!(
        errors_moved,
        "the geth RPC errors panel shows no error for {victim}, whose geth stopped"
    );
    assert!(pending, "GethPeerSidecarPartialMesh never pending");
    eprintln!(
        "[monitoring] missing peers > 0, {victim}'s RPC errors and the alert pending within {:.1} s of geth stopping",
        t_fault.elapsed().as_secs_f64()
    );
    // Heal: geth back, every geth peered with the others again (admin.peers),
    // and the panel back at 0.
    release.wait_full_mesh(3, MESH_TIMEOUT).await.unwrap();
    let healed = eventually("missing peers back to 0", MESH_TIMEOUT, || async {
        (api.scalar(&missing).await? == 0.0).then_some(())
    })
    .await;
    assert!(
        healed.is_ok(),
        "the missing-peers panel did not return to 0 after the heal"
    );
    eprintln!(
        "[monitoring] back to 0 {:.1} s after geth stopped; whole test {:.1} s",
        t_fault.elapsed().as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}
