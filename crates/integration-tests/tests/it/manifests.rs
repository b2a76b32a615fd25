//! What we ship is accepted by a real apiserver: every YAML under `deploy/`, both
//! kustomize builds and the Helm chart (default values and a dns + podEvidence +
//! trusted variant) pass `kubectl apply --server-side --dry-run=server` with strict
//! field validation, `helm lint` is clean, and the chart grants exactly the same
//! RBAC rules as `deploy/`.
//!
//! kubectl, kustomize and helm come from `testbed/provision.sh` like geth: a
//! missing tool fails the test, it never skips.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use integration_tests::{Cluster, TestContext, testbed, workspace_root};
use k8s_openapi::api::core::v1::Namespace;
use kube::Api;
use kube::api::PostParams;
use serde_json::json;

const CHART: &str = "charts/geth-peer-sidecar";

/// Values exercising the non-default paths of the chart.
const DNS_VALUES: &[&str] = &[
    "advertise=dns",
    "podEvidence=true",
    "trusted=true",
    "logLevel=DEBUG",
    "replicas=5",
    "configmapName=mesh-registry",
    "clusterDomain=corp.internal",
    "terminationGracePeriodSeconds=75",
    "livenessTimeout=5m",
    "networkPolicy.enabled=true",
    "grafanaDashboard.enabled=true",
];

/// The registry name of deploy/ (the chart derives its default from the release).
const DEPLOY_CONFIGMAP: &str = "geth-shared-static-nodes";

pub(crate) fn tool(name: &str) -> PathBuf {
    let p = testbed().bin(name);
    assert!(
        p.is_file(),
        "{} is missing: run `testbed/provision.sh` (or set GPS_TESTBED_BIN). \
         Manifest tests fail without it; they never skip.",
        p.display()
    );
    p
}

/// Runs a tool from the repository root; panics with its stderr on failure.
pub(crate) fn run(ctx: &TestContext, name: &str, args: &[&str], stdin: Option<&str>) -> String {
    let home = ctx.path("tool-home");
    std::fs::create_dir_all(&home).unwrap();
    let mut cmd = Command::new(tool(name));
    cmd.args(args)
        .current_dir(workspace_root())
        // Hermetic: no user kubeconfig, helm repositories or caches.
        .env("HOME", &home)
        .env("KUBECONFIG", home.join("no-kubeconfig"))
        .env("HELM_CACHE_HOME", home.join("helm-cache"))
        .env("HELM_CONFIG_HOME", home.join("helm-config"))
        .env("HELM_DATA_HOME", home.join("helm-data"))
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "`{name} {}` failed ({}):\n{stdout}\n{stderr}",
        args.join(" "),
        out.status
    );
    stdout
}

pub(crate) fn helm_template(ctx: &TestContext, namespace: &str, set: &[&str]) -> String {
    helm_template_release(ctx, "gps", namespace, set)
}

fn helm_template_release(
    ctx: &TestContext,
    release: &str,
    namespace: &str,
    set: &[&str],
) -> String {
    let mut args = vec![
        "template",
        release,
        CHART,
        "--namespace",
        namespace,
        "--kube-version",
    ];
    let kube_version = testbed().kubernetes_version.clone();
    args.push(&kube_version);
    for s in set {
        args.extend(["--set", s]);
    }
    run(ctx, "helm", &args, None)
}

/// The non-empty documents of a multi-document YAML stream.
pub(crate) fn documents(yaml: &str) -> Vec<serde_yaml::Value> {
    yaml.split("\n---")
        .map(|d| {
            serde_yaml::from_str::<serde_yaml::Value>(d)
                .unwrap_or_else(|e| panic!("invalid YAML document ({e}):\n{d}"))
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn kinds(yaml: &str) -> Vec<String> {
    let mut k: Vec<String> = documents(yaml)
        .iter()
        .map(|d| d["kind"].as_str().unwrap_or("?").to_owned())
        .collect();
    k.sort();
    k
}

/// A dry-run target: a real apiserver and one fresh namespace per manifest set,
/// so applies never see each other's objects.
struct DryRun {
    ctx: TestContext,
    cluster: Cluster,
    kubeconfig: PathBuf,
    seq: usize,
}

impl DryRun {
    async fn start(name: &str) -> DryRun {
        let ctx = TestContext::new(name);
        let cluster = Cluster::start(&ctx, "127.0.0.1".parse().unwrap())
            .await
            .unwrap();
        let kubeconfig = cluster.admin_kubeconfig();
        DryRun {
            ctx,
            cluster,
            kubeconfig,
            seq: 0,
        }
    }

    async fn fresh_namespace(&mut self) -> String {
        self.seq += 1;
        let name = format!("manifests-{}", self.seq);
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
        Api::<Namespace>::all(self.cluster.admin())
            .create(&PostParams::default(), &ns)
            .await
            .unwrap();
        name
    }

    /// Server-side dry-run apply of `yaml` into `namespace`; asserts that every
    /// object in it was accepted.
    fn apply(&self, what: &str, namespace: &str, yaml: &str) {
        let objects = documents(yaml).len();
        assert!(objects > 0, "{what}: no objects to apply");
        let kubeconfig = self.kubeconfig.to_string_lossy();
        let cache = self.ctx.path("kubectl-cache");
        let out = run(
            &self.ctx,
            "kubectl",
            &[
                "apply",
                "--server-side",
                "--dry-run=server",
                "--validate=strict",
                "--field-manager=manifest-check",
                "--kubeconfig",
                &kubeconfig,
                "--cache-dir",
                &cache.to_string_lossy(),
                "-n",
                namespace,
                "-f",
                "-",
            ],
            Some(yaml),
        );
        let accepted = out
            .lines()
            .filter(|l| l.ends_with("serverside-applied (server dry run)"))
            .count();
        assert_eq!(
            accepted, objects,
            "{what}: {objects} objects, {accepted} accepted:\n{out}"
        );
    }
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            yaml_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(p);
        }
    }
}

#[tokio::test]
async fn every_deploy_yaml_passes_server_side_dry_run() {
    let mut dr = DryRun::start("manifests_deploy_files").await;
    let mut files = Vec::new();
    yaml_files(&workspace_root().join("deploy"), &mut files);
    files.sort();
    let mut applied = Vec::new();
    for f in &files {
        let name = f.file_name().unwrap().to_string_lossy();
        if name == "kustomization.yaml" || name == "kustomization.yml" {
            continue; // kustomize input, not an object: checked through `kustomize build`
        }
        let yaml = std::fs::read_to_string(f).unwrap();
        let ns = dr.fresh_namespace().await;
        dr.apply(&f.display().to_string(), &ns, &yaml);
        applied.push(name.into_owned());
    }
    for must in ["rbac.yaml", "service.yaml", "statefulset.yaml"] {
        assert!(
            applied.iter().any(|a| a == must),
            "{must} not found under deploy/ (applied: {applied:?})"
        );
    }
}

/// The objects the kustomize base and the chart both produce, sorted by kind.
const EXPECTED_KINDS: [&str; 5] = [
    "Role",
    "RoleBinding",
    "Service",
    "ServiceAccount",
    "StatefulSet",
];

/// The overlays add the admission-policy component: its parameters
/// ConfigMap and two policies with their bindings.
const POLICY_KINDS: [&str; 5] = [
    "ConfigMap",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
    "ValidatingAdmissionPolicyBinding",
];

#[tokio::test]
async fn kustomize_builds_pass_server_side_dry_run() {
    let mut dr = DryRun::start("manifests_kustomize").await;
    for (dir, policy) in [
        ("deploy/base", false),
        ("deploy/overlays/pod-evidence", true),
        ("deploy/overlays/leases", true),
    ] {
        let yaml = run(&dr.ctx, "kustomize", &["build", dir], None);
        let mut expected: Vec<&str> = EXPECTED_KINDS.to_vec();
        if policy {
            expected.extend(POLICY_KINDS);
        }
        expected.sort_unstable();
        assert_eq!(kinds(&yaml), expected, "{dir}");
        let ns = dr.fresh_namespace().await;
        dr.apply(dir, &ns, &yaml);
    }
}

/// `EXPECTED_KINDS` plus `extra`, sorted.
fn kinds_with(extra: &[&str]) -> Vec<String> {
    let mut k: Vec<String> = EXPECTED_KINDS
        .iter()
        .chain(extra)
        .map(|s| (*s).to_owned())
        .collect();
    k.sort();
    k
}

#[tokio::test]
async fn helm_chart_passes_server_side_dry_run() {
    let mut dr = DryRun::start("manifests_helm").await;
    for (what, set, extra) in [
        ("default values", &[][..], &["PodDisruptionBudget"][..]),
        (
            "dns values",
            DNS_VALUES,
            &["PodDisruptionBudget", "NetworkPolicy", "ConfigMap"][..],
        ),
    ] {
        let ns = dr.fresh_namespace().await;
        let yaml = helm_template(&dr.ctx, &ns, set);
        assert_eq!(kinds(&yaml), kinds_with(extra), "{what}");
        dr.apply(what, &ns, &yaml);
    }
}

#[test]
fn helm_lint_passes() {
    let ctx = TestContext::new("helm_lint");
    let out = run(&ctx, "helm", &["lint", "--strict", CHART], None);
    assert!(out.contains("0 chart(s) failed"), "{out}");
    let mut args = vec!["lint", "--strict", CHART];
    for s in DNS_VALUES {
        args.extend(["--set", s]);
    }
    let out = run(&ctx, "helm", &args, None);
    assert!(out.contains("0 chart(s) failed"), "{out}");
    // The schema refuses an unknown advertise mode instead of rendering it.
    let bad = Command::new(tool("helm"))
        .args(["template", "gps", CHART, "--set", "advertise=ipv6"])
        .current_dir(workspace_root())
        .env("HOME", ctx.path("tool-home"))
        .output()
        .unwrap();
    assert!(!bad.status.success(), "advertise=ipv6 was accepted");
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("advertise"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

/// The rules of the single Role in a rendered stream, normalized (each rule's
/// lists sorted, rules sorted) so the comparison is about what is granted.
fn role_rules(yaml: &str) -> Vec<serde_json::Value> {
    let roles: Vec<_> = documents(yaml)
        .into_iter()
        .filter(|d| d["kind"] == "Role")
        .collect();
    assert_eq!(roles.len(), 1, "expected one Role in:\n{yaml}");
    let rules: serde_json::Value = serde_json::to_value(&roles[0]["rules"]).unwrap();
    let mut rules: Vec<serde_json::Value> = rules
        .as_array()
        .expect("Role.rules is a list")
        .iter()
        .map(|r| {
            let mut r = r.as_object().unwrap().clone();
            for list in r.values_mut() {
                if let Some(items) = list.as_array_mut() {
                    items.sort_by_key(|v| v.to_string());
                }
            }
            serde_json::Value::Object(r)
        })
        .collect();
    rules.sort_by_key(|v| v.to_string());
    rules
}

fn env_of(yaml: &str, container: &str, var: &str) -> Option<String> {
    let sts = documents(yaml)
        .into_iter()
        .find(|d| d["kind"] == "StatefulSet")
        .expect("a StatefulSet");
    let containers = sts["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .unwrap();
    let c = containers
        .iter()
        .find(|c| c["name"] == container)
        .unwrap_or_else(|| panic!("no container {container}"));
    c["env"]
        .as_sequence()?
        .iter()
        .find(|e| e["name"] == var)
        .and_then(|e| e["value"].as_str().map(str::to_owned))
}

#[test]
fn chart_grants_the_same_rbac_as_deploy() {
    let ctx = TestContext::new("chart_rbac");
    let base_file =
        std::fs::read_to_string(workspace_root().join("deploy/base/rbac.yaml")).unwrap();
    let base = run(&ctx, "kustomize", &["build", "deploy/base"], None);
    let overlay = run(
        &ctx,
        "kustomize",
        &["build", "deploy/overlays/pod-evidence"],
        None,
    );
    let deploy_name = format!("configmapName={DEPLOY_CONFIGMAP}");
    // The chart's defaults are the lease layout with pod evidence; turned
    // off, it grants what deploy/base does.
    let plain = ["podEvidence=false", "registryLayout=configmap"];
    let chart = helm_template(&ctx, "default", &[&deploy_name, plain[0], plain[1]]);
    let chart_pods = helm_template(
        &ctx,
        "default",
        &[&deploy_name, "podEvidence=true", "registryLayout=configmap"],
    );
    let chart_defaults = helm_template(&ctx, "default", &[&deploy_name]);

    assert_eq!(role_rules(&base_file), role_rules(&base));
    assert_eq!(
        role_rules(&chart),
        role_rules(&base_file),
        "chart (podEvidence=false, registryLayout=configmap) vs deploy/base/rbac.yaml"
    );
    // Its defaults: the base plus the pods rule plus the leases rule.
    assert_eq!(
        role_rules(&chart_defaults).len(),
        role_rules(&base).len() + 2,
        "chart (defaults) vs deploy/base plus pods and leases"
    );
    assert_eq!(
        role_rules(&chart_pods),
        role_rules(&overlay),
        "chart (podEvidence=true) vs deploy/overlays/pod-evidence"
    );
    // The pods rule is the only difference, and it is read-only.
    assert_eq!(role_rules(&overlay).len(), role_rules(&base).len() + 1);
    // The lease layout: the overlay and the chart value grant the same, one
    // more rule, on leases only, and set REGISTRY_LAYOUT alike.
    let leases = run(
        &ctx,
        "kustomize",
        &["build", "deploy/overlays/leases"],
        None,
    );
    let chart_leases = helm_template(
        &ctx,
        "default",
        &[&deploy_name, "registryLayout=leases", "podEvidence=false"],
    );
    assert_eq!(
        role_rules(&chart_leases),
        role_rules(&leases),
        "chart (registryLayout=leases) vs deploy/overlays/leases"
    );
    let added: Vec<_> = role_rules(&leases)
        .into_iter()
        .filter(|r| !role_rules(&base).contains(r))
        .collect();
    assert_eq!(added.len(), 1, "{added:?}");
    assert_eq!(added[0]["resources"], json!(["leases"]));
    assert_eq!(added[0]["apiGroups"], json!(["coordination.k8s.io"]));
    for (yaml, what) in [(&leases, "overlay"), (&chart_leases, "chart")] {
        assert_eq!(
            env_of(yaml, "geth-peer-sidecar", "REGISTRY_LAYOUT").as_deref(),
            Some("leases"),
            "{what}"
        );
    }

    // configmapName drives both the Role's resourceNames and the sidecar's env.
    let renamed = helm_template(&ctx, "default", &["configmapName=other-registry"]);
    let names: Vec<_> = role_rules(&renamed)
        .iter()
        .filter_map(|r| r.get("resourceNames").cloned())
        .collect();
    assert_eq!(names, [json!(["other-registry"])]);
    assert_eq!(
        env_of(&renamed, "geth-peer-sidecar", "CONFIGMAP_NAME").as_deref(),
        Some("other-registry")
    );
    assert_eq!(
        env_of(&chart, "geth-peer-sidecar", "CONFIGMAP_NAME").as_deref(),
        env_of(&base, "geth-peer-sidecar", "CONFIGMAP_NAME").as_deref()
    );
}

#[test]
fn two_releases_in_one_namespace_get_different_registries_by_default() {
    let ctx = TestContext::new("chart_registry_names");
    let registry = |release: &str| {
        let yaml = helm_template_release(&ctx, release, "chain", &[]);
        let env = env_of(&yaml, "geth-peer-sidecar", "CONFIGMAP_NAME").unwrap();
        // The Role grants exactly the registry the sidecar uses.
        let names: Vec<_> = role_rules(&yaml)
            .iter()
            .filter_map(|r| r.get("resourceNames").cloned())
            .collect();
        assert_eq!(names, [json!([env.clone()])], "{release}");
        env
    };
    let (a, b) = (registry("mainnet-a"), registry("mainnet-b"));
    assert_ne!(a, b);
    assert!(a.starts_with("mainnet-a-"), "{a}");
    assert_eq!(
        registry("geth-peer-sidecar"),
        "geth-peer-sidecar-static-nodes"
    );
}

/// The one document of `kind` in a rendered stream.
fn one_of(yaml: &str, kind: &str) -> serde_yaml::Value {
    let mut docs: Vec<_> = documents(yaml)
        .into_iter()
        .filter(|d| d["kind"] == kind)
        .collect();
    assert_eq!(docs.len(), 1, "expected one {kind}");
    docs.remove(0)
}

#[test]
fn chart_monitors_are_off_by_default_and_scrape_the_sidecars_http_port() {
    let ctx = TestContext::new("chart_monitors");
    let default = helm_template(&ctx, "default", &[]);
    for kind in ["PodMonitor", "ServiceMonitor", "NetworkPolicy", "ConfigMap"] {
        assert!(
            !kinds(&default).iter().any(|k| k == kind),
            "{kind} rendered by default"
        );
    }
    let on = helm_template(
        &ctx,
        "default",
        &[
            "metrics.podMonitor.enabled=true",
            "metrics.serviceMonitor.enabled=true",
            "metrics.podMonitor.labels.release=kps",
        ],
    );
    let sts = one_of(&on, "StatefulSet");
    let pod_labels = &sts["spec"]["template"]["metadata"]["labels"];
    let sidecar = sts["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "geth-peer-sidecar")
        .unwrap()
        .clone();
    assert_eq!(sidecar["ports"][0]["name"], "http");
    let selects_pods = |selector: &serde_yaml::Value| {
        selector
            .as_mapping()
            .unwrap()
            .iter()
            .all(|(k, v)| &pod_labels[k] == v)
    };
    let pm = one_of(&on, "PodMonitor");
    assert_eq!(pm["metadata"]["labels"]["release"], "kps");
    assert!(
        selects_pods(&pm["spec"]["selector"]["matchLabels"]),
        "{pm:?}"
    );
    assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["port"], "http");
    assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["path"], "/metrics");

    let sm = one_of(&on, "ServiceMonitor");
    let svc = documents(&on)
        .into_iter()
        .find(|d| {
            d["kind"] == "Service"
                && selects_pods(&d["spec"]["selector"])
                && d["spec"]["ports"][0]["name"] == "http"
        })
        .expect("a Service exposing the sidecar's http port");
    let svc_labels = &svc["metadata"]["labels"];
    assert!(
        sm["spec"]["selector"]["matchLabels"]
            .as_mapping()
            .unwrap()
            .iter()
            .all(|(k, v)| &svc_labels[k] == v),
        "{sm:?}"
    );
    assert_eq!(sm["spec"]["endpoints"][0]["port"], "http");
}

#[test]
fn chart_provisions_the_dashboard_file_for_grafana() {
    let ctx = TestContext::new("chart_dashboard");
    let yaml = helm_template(&ctx, "default", &["grafanaDashboard.enabled=true"]);
    let cm = one_of(&yaml, "ConfigMap");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    let file = std::fs::read_to_string(
        workspace_root()
            .join(CHART)
            .join("dashboards/geth-peer-sidecar.json"),
    )
    .unwrap();
    let shipped: serde_json::Value =
        serde_json::from_str(cm["data"]["geth-peer-sidecar.json"].as_str().unwrap()).unwrap();
    assert_eq!(
        shipped,
        serde_json::from_str::<serde_json::Value>(&file).unwrap()
    );
}

#[test]
fn chart_values_reach_the_sidecar() {
    let ctx = TestContext::new("chart_values");
    let default = helm_template(&ctx, "default", &[]);
    let env = |yaml: &str, var: &str| env_of(yaml, "geth-peer-sidecar", var);
    assert_eq!(env(&default, "ADVERTISE").as_deref(), Some("pod-ip"));
    assert_eq!(env(&default, "TRUSTED_PEERS").as_deref(), Some("false"));
    assert_eq!(env(&default, "LOGGING").as_deref(), Some("INFO"));

    let dns = helm_template(&ctx, "default", DNS_VALUES);
    assert_eq!(env(&dns, "ADVERTISE").as_deref(), Some("dns"));
    assert_eq!(env(&dns, "TRUSTED_PEERS").as_deref(), Some("true"));
    assert_eq!(env(&dns, "LOGGING").as_deref(), Some("DEBUG"));
    assert_eq!(
        env(&default, "DNS_TEMPLATE").as_deref(),
        Some("{pod}.{service}.{namespace}.svc.cluster.local")
    );
    assert_eq!(
        env(&dns, "DNS_TEMPLATE").as_deref(),
        Some("{pod}.{service}.{namespace}.svc.corp.internal")
    );
    assert_eq!(env(&default, "LIVENESS_TIMEOUT").as_deref(), Some("2m"));
    assert_eq!(env(&dns, "LIVENESS_TIMEOUT").as_deref(), Some("5m"));
    // dns mode names pods through the headless Service the chart creates.
    let service = documents(&dns)
        .into_iter()
        .find(|d| d["kind"] == "Service")
        .unwrap();
    assert_eq!(
        env(&dns, "SERVICE_NAME").as_deref(),
        service["metadata"]["name"].as_str()
    );
    let sts = documents(&dns)
        .into_iter()
        .find(|d| d["kind"] == "StatefulSet")
        .unwrap();
    assert_eq!(sts["spec"]["replicas"].as_u64(), Some(5));
    assert_eq!(
        sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"].as_u64(),
        Some(75)
    );
    let pdb = one_of(&dns, "PodDisruptionBudget");
    assert_eq!(pdb["spec"]["maxUnavailable"].as_u64(), Some(1));
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        sts["spec"]["selector"]["matchLabels"]
    );
    // The example NetworkPolicy: p2p from the release's own geth pods, the
    // sidecar's port from the monitoring namespace.
    let np = one_of(&dns, "NetworkPolicy");
    assert_eq!(np["spec"]["podSelector"], sts["spec"]["selector"]);
    assert_eq!(
        np["spec"]["ingress"][0]["from"][0]["podSelector"],
        sts["spec"]["selector"]
    );
    assert_eq!(np["spec"]["ingress"][0]["ports"][0]["port"], "p2p");
    assert_eq!(
        np["spec"]["ingress"][1]["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        "monitoring"
    );
    assert_eq!(np["spec"]["ingress"][1]["ports"][0]["port"], "http");
    assert_eq!(sts["spec"]["serviceName"], service["metadata"]["name"]);
    // Both containers share the uid (geth's IPC socket is 0600) and are locked down.
    let pod = &sts["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    for c in pod["containers"].as_sequence().unwrap() {
        assert!(c["securityContext"]["runAsUser"].is_null(), "{c:?}");
        let sc = &c["securityContext"];
        assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
        assert_eq!(sc["capabilities"]["drop"][0].as_str(), Some("ALL"));
        assert!(c["resources"]["limits"]["memory"].is_string(), "{c:?}");
    }
}
