//! An installation of the project on a [`KubeNode`] (the Helm chart or the
//! kustomize manifests) in one namespace, and geth's own view of the mesh in its
//! pods: `admin.peers` through `geth attach` in the geth container.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::Api;
use kube::api::ListParams;
use peer_registry::{MemberRecord, schema};

use crate::{Error, KubeNode, Result, eventually};

/// The release name the fixtures install the chart as: the chart then names
/// its objects `geth-peer-sidecar*`.
pub const CHART_RELEASE: &str = "geth-peer-sidecar";
/// The chart's StatefulSet (and headless Service) for [`CHART_RELEASE`].
pub const CHART_STATEFULSET: &str = "geth-peer-sidecar-geth";
/// `deploy/`'s registry name (the seed's default).
pub const DEFAULT_CONFIGMAP: &str = "geth-shared-static-nodes";
/// The chart's default registry name for [`CHART_RELEASE`]: derived from the
/// release, so two releases in one namespace never mesh into each other.
pub const CHART_CONFIGMAP: &str = "geth-peer-sidecar-static-nodes";

/// Values the fixtures add to every chart install: small requests so that
/// nine pods fit on a two-core node, and a small geth cache. Nothing else of
/// the chart changes.
pub const SMALL_NODE_VALUES: [&str; 4] = [
    "--set-json",
    r#"geth.extraArgs=["--nodiscover","--syncmode=full","--networkid=1337","--maxpeers=50","--cache=16"]"#,
    "--set",
    "resources.geth.requests.cpu=10m,resources.geth.requests.memory=64Mi,resources.sidecar.requests.cpu=5m",
];

/// A container [`Release::freeze`] paused; resumed by [`Frozen::thaw`], or
/// when dropped (a failing test leaves no container paused).
pub struct Frozen<'a> {
    node: &'a KubeNode,
    id: Option<String>,
}

impl Frozen<'_> {
    /// Resumes the container.
    pub fn thaw(mut self) -> Result<()> {
        self.resume()
    }

    fn resume(&mut self) -> Result<()> {
        match self.id.take() {
            Some(id) => self.node.ctr(&["tasks", "resume", &id]).map(|_| ()),
            None => Ok(()),
        }
    }
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.resume() {
            eprintln!("could not resume a frozen container: {e}");
        }
    }
}

/// A pod of the StatefulSet as the apiserver reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodView {
    /// Pod name (e.g. `geth-0`).
    pub name: String,
    /// Pod UID.
    pub uid: String,
    /// Pod IP, once assigned.
    pub ip: Option<Ipv4Addr>,
    /// All containers ready.
    pub ready: bool,
    /// Being deleted (deletionTimestamp set).
    pub deleting: bool,
    /// When the pod's containers last started (the latest start among them).
    pub started_at: Option<jiff::Timestamp>,
    /// Each container's restart count, by container name.
    pub restarts: BTreeMap<String, i32>,
}

/// The project installed in namespace `ns` of a node.
pub struct Release<'a> {
    node: &'a KubeNode,
    /// The namespace.
    pub ns: String,
    /// The StatefulSet (and headless Service) name; pods are `<name>-<i>`.
    pub statefulset: String,
    /// The registry ConfigMap's name.
    pub configmap: String,
}

impl<'a> Release<'a> {
    /// A handle on what is (or will be) installed in `ns`.
    pub fn new(node: &'a KubeNode, ns: &str, statefulset: &str, configmap: &str) -> Self {
        Release {
            node,
            ns: ns.to_owned(),
            statefulset: statefulset.to_owned(),
            configmap: configmap.to_owned(),
        }
    }

    /// `helm install` of the repository's chart, unchanged, as
    /// [`CHART_RELEASE`] in a fresh namespace (see [`KubeNode::namespace`]) with
    /// `volumes` volumes, [`SMALL_NODE_VALUES`] and then `values` (helm flags).
    pub async fn install_chart(
        node: &'a KubeNode,
        hint: &str,
        volumes: usize,
        values: &[&str],
    ) -> Result<Release<'a>> {
        let ns = node.namespace(hint, CHART_STATEFULSET, volumes).await?;
        let chart = crate::workspace_root().join("charts/geth-peer-sidecar");
        let chart = chart.to_string_lossy();
        let mut args = vec!["install", CHART_RELEASE, &chart, "-n", &ns];
        args.extend(SMALL_NODE_VALUES);
        args.extend(values);
        node.helm(&args)?;
        Ok(Release::new(node, &ns, CHART_STATEFULSET, CHART_CONFIGMAP))
    }

    /// The node this release runs on.
    pub fn node(&self) -> &KubeNode {
        self.node
    }

    /// `kubectl -n <ns> args...`.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-n", self.ns.as_str()];
        all.extend_from_slice(args);
        self.node.kubectl(&all)
    }

    /// Freezes `container` of `pod` (containerd pauses its task: the cgroup
    /// freezer). Its sockets stay open and nothing answers, and unlike a killed
    /// process the kubelet does not start it again: the fault lasts until the
    /// returned guard is thawed or dropped, however fast a restart would have
    /// been.
    pub fn freeze(&self, pod: &str, container: &str) -> Result<Frozen<'_>> {
        let id = self.container_id(pod, container)?;
        self.node.ctr(&["tasks", "pause", &id])?;
        Ok(Frozen {
            node: self.node,
            id: Some(id),
        })
    }

    /// containerd's id of `container` in `pod`, from the pod's status.
    fn container_id(&self, pod: &str, container: &str) -> Result<String> {
        let path = format!(
            "jsonpath={{.status.containerStatuses[?(@.name==\"{container}\")].containerID}}"
        );
        let id = self.kubectl(&["get", "pod", pod, "-o", &path])?;
        id.trim()
            .strip_prefix("containerd://")
            .map(str::to_owned)
            .ok_or_else(|| {
                Error::Setup(format!(
                    "pod {pod} reports no containerd id for its {container} container: {id:?}"
                ))
            })
    }

    /// The StatefulSet's pods, by name.
    pub async fn pods(&self) -> Result<Vec<PodView>> {
        let pods: Api<Pod> = Api::namespaced(self.node.admin(), &self.ns);
        let list = pods.list(&ListParams::default()).await?;
        let prefix = format!("{}-", self.statefulset);
        let mut out: Vec<PodView> = list
            .items
            .into_iter()
            .filter(|p| {
                p.metadata
                    .name
                    .as_deref()
                    .and_then(|n| n.strip_prefix(&prefix))
                    .is_some_and(|i| i.parse::<u32>().is_ok())
            })
            .map(|p| {
                let status = p.status.unwrap_or_default();
                let statuses = status.container_statuses.unwrap_or_default();
                PodView {
                    name: p.metadata.name.unwrap_or_default(),
                    uid: p.metadata.uid.unwrap_or_default(),
                    ip: status.pod_ip.and_then(|ip| ip.parse().ok()),
                    ready: !statuses.is_empty() && statuses.iter().all(|c| c.ready),
                    deleting: p.metadata.deletion_timestamp.is_some(),
                    started_at: statuses
                        .iter()
                        .filter_map(|c| c.state.as_ref()?.running.as_ref()?.started_at.as_ref())
                        .map(|t| t.0)
                        .max(),
                    restarts: statuses
                        .iter()
                        .map(|c| (c.name.clone(), c.restart_count))
                        .collect(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// The remote IPs of the peers geth in `pod` is connected to, from geth's
    /// own `admin.peers`.
    pub fn geth_peer_ips(&self, pod: &str) -> Result<BTreeSet<Ipv4Addr>> {
        let js = "admin.peers.map(function(p){return p.network.remoteAddress}).join(' ')";
        let out = self.kubectl(&[
            "exec",
            pod,
            "-c",
            "geth",
            "--",
            "geth",
            // The console keeps its history in the datadir: the root
            // filesystem is read-only, /data (the volume) is not.
            "--datadir",
            "/data",
            "--exec",
            js,
            "attach",
            "/ipc/geth.ipc",
        ])?;
        let text = out.trim().trim_matches('"');
        Ok(text
            .split_whitespace()
            .filter_map(|addr| {
                addr.rsplit_once(':')?
                    .0
                    .trim_matches(['[', ']'])
                    .parse()
                    .ok()
            })
            .collect())
    }

    /// Each pod's peer IPs as geth sees them.
    pub fn mesh(&self, pods: &[PodView]) -> Result<BTreeMap<String, BTreeSet<Ipv4Addr>>> {
        pods.iter()
            .map(|p| Ok((p.name.clone(), self.geth_peer_ips(&p.name)?)))
            .collect()
    }

    /// Waits until exactly `n` pods run, all ready with IPs, and every geth is
    /// connected to exactly the other `n - 1` (by IP, in geth's own view).
    /// Returns the pods and how long it took.
    pub async fn wait_full_mesh(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Result<(Vec<PodView>, Duration)> {
        let t0 = Instant::now();
        let what = format!("a full mesh of {n} pods in {}", self.ns);
        let result = eventually(&what, timeout, || async {
            let pods = self.pods().await.ok()?;
            if pods.len() != n
                || pods
                    .iter()
                    .any(|p| !p.ready || p.deleting || p.ip.is_none())
            {
                return None;
            }
            let mesh = self.mesh(&pods).ok()?;
            let all: BTreeSet<Ipv4Addr> = pods.iter().filter_map(|p| p.ip).collect();
            let full = pods.iter().all(|p| {
                let mut others = all.clone();
                p.ip.map(|ip| others.remove(&ip));
                mesh.get(&p.name) == Some(&others)
            });
            full.then_some(pods)
        })
        .await;
        match result {
            Ok(pods) => Ok((pods, t0.elapsed())),
            Err(e) => Err(Error::Setup(format!("{e}\n{}", self.diagnostics().await))),
        }
    }

    /// The registry's members (decoded as the sidecar decodes them), from
    /// the ConfigMap and, with the lease layout, the Leases.
    pub async fn members(&self) -> Result<BTreeMap<String, MemberRecord>> {
        let mut members = self.configmap_members().await?;
        // The lease layout (the chart's default): one Lease per member.
        let leases = peer_registry::LeaseRegistry::new(
            self.node.admin(),
            self.ns.clone(),
            self.configmap.clone(),
        );
        if let Ok(snap) = peer_registry::PeerRegistry::snapshot(&leases).await {
            members.extend(snap.members);
        }
        Ok(members)
    }

    /// The member records in the registry ConfigMap's `member.*` keys alone.
    pub async fn configmap_members(&self) -> Result<BTreeMap<String, MemberRecord>> {
        let cms: Api<ConfigMap> = Api::namespaced(self.node.admin(), &self.ns);
        let data = cms
            .get_opt(&self.configmap)
            .await?
            .and_then(|cm| cm.data)
            .unwrap_or_default();
        Ok(schema::decode(&data, None).members)
    }

    /// The sidecar container's log in `pod`.
    pub fn sidecar_log(&self, pod: &str) -> Result<String> {
        self.kubectl(&["logs", pod, "-c", "geth-peer-sidecar"])
    }

    /// What to print when something did not happen: pods, events, and the tail
    /// of every sidecar's log.
    pub async fn diagnostics(&self) -> String {
        let mut out = String::new();
        out += &self
            .kubectl(&["get", "pods,pvc", "-o", "wide"])
            .unwrap_or_else(|e| e.to_string());
        out += &self
            .kubectl(&["get", "events", "--sort-by=.lastTimestamp"])
            .map(|t| t.lines().rev().take(25).collect::<Vec<_>>().join("\n"))
            .unwrap_or_else(|e| e.to_string());
        for p in self.pods().await.unwrap_or_default() {
            let log = self.sidecar_log(&p.name).unwrap_or_else(|e| e.to_string());
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            out += &format!(
                "\n--- {} sidecar log (last 15 lines, newest first) ---\n{}",
                p.name,
                tail.join("\n")
            );
        }
        out
    }
}
