//! A whole deployment on the test bed: apiserver, N geth nodes, N sidecars.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;

use crate::{
    Bridge, Cluster, GethNet, NodeSpec, PodRange, Result, Sidecar, TestContext, TestNamespace,
    eventually,
};

/// The registry ConfigMap's name in tests (the default).
pub const CONFIGMAP: &str = "geth-shared-static-nodes";

/// How a [`Mesh`] is set up beyond its size.
#[derive(Debug, Clone, Default)]
pub struct MeshOptions {
    /// The pods' address space.
    pub range: PodRange,
    /// Every geth node's settings.
    pub spec: NodeSpec,
}

/// Apiserver, geth nodes and one sidecar per node, as pods would run them.
pub struct Mesh {
    /// Geth nodes (index = pod ordinal).
    pub net: GethNet,
    /// Sidecars by node index (`None` while stopped).
    pub sidecars: Vec<Option<Sidecar>>,
    /// The namespace and service-account identity.
    pub ns: TestNamespace,
    /// The control plane.
    pub cluster: Cluster,
    /// Environment every sidecar gets (on top of the fixture's defaults).
    pub env: Vec<(String, String)>,
    /// POD_UID per node index, when a test created real Pod objects.
    pub pod_uids: BTreeMap<usize, String>,
    /// Another build of the sidecar to start (a benchmark's baseline); `None`
    /// is [`crate::sidecar_bin`].
    pub sidecar_bin: Option<std::path::PathBuf>,
    starts: usize,
    /// The test context (logs).
    pub ctx: TestContext,
}

impl Mesh {
    /// Starts the control plane and `n` nodes, then their sidecars.
    pub async fn start(name: &str, n: usize, env: &[(&str, &str)]) -> Result<Mesh> {
        let mut mesh = Self::without_sidecars(name, n, env).await?;
        for i in 0..n {
            mesh.start_sidecar(i)?;
        }
        Ok(mesh)
    }

    /// Starts the control plane and `n` nodes; sidecars are started by the caller.
    pub async fn without_sidecars(name: &str, n: usize, env: &[(&str, &str)]) -> Result<Mesh> {
        Self::without_sidecars_with(name, n, env, MeshOptions::default()).await
    }

    /// Like [`Mesh::start`], with other pod addresses or node settings.
    pub async fn start_with(
        name: &str,
        n: usize,
        env: &[(&str, &str)],
        options: MeshOptions,
    ) -> Result<Mesh> {
        let mut mesh = Self::without_sidecars_with(name, n, env, options).await?;
        for i in 0..n {
            mesh.start_sidecar(i)?;
        }
        Ok(mesh)
    }

    /// Like [`Mesh::without_sidecars`], with other pod addresses or node settings.
    pub async fn without_sidecars_with(
        name: &str,
        n: usize,
        env: &[(&str, &str)],
        options: MeshOptions,
    ) -> Result<Mesh> {
        let ctx = TestContext::new(name);
        let bridge = Arc::new(Bridge::create_in(options.range)?);
        let cluster = Cluster::start(&ctx, bridge.host_ip()).await?;
        let ns = cluster.namespace(name).await?;
        let mut net = GethNet::new(&ctx, bridge);
        net.add_nodes(vec![options.spec; n]).await?;
        Ok(Mesh {
            net,
            sidecars: Vec::new(),
            ns,
            cluster,
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            pod_uids: BTreeMap::new(),
            sidecar_bin: None,
            starts: 0,
            ctx,
        })
    }

    /// The StatefulSet-style DNS name of node `i`: `geth-<i>.geth.<ns>.svc.cluster.local`.
    pub fn dns_name(&self, i: usize) -> String {
        format!(
            "{}.geth.{}.svc.cluster.local",
            self.net.node(i).name(),
            self.ns.name
        )
    }

    /// Writes every node's DNS name and current IP into every node namespace's
    /// hosts file (what cluster DNS does for a headless Service).
    pub fn write_hosts(&self) -> Result<()> {
        let entries: Vec<_> = (0..self.net.nodes().len())
            .map(|i| (self.net.node(i).ip(), self.dns_name(i)))
            .collect();
        for node in self.net.nodes() {
            node.netns().write_hosts(&entries)?;
        }
        Ok(())
    }

    /// Runs `[runner] bin status ARGS` as inside node `i`'s pod: in its network
    /// namespace, with geth's IPC socket and the service account's kubeconfig
    /// (`runner` is e.g. `qemu-aarch64-static` for another architecture).
    pub fn status_in_pod(
        &self,
        i: usize,
        runner: Option<&str>,
        bin: &std::path::Path,
        args: &[&str],
    ) -> std::io::Result<std::process::Output> {
        let node = self.net.node(i);
        std::process::Command::new("ip")
            .args(["netns", "exec", node.netns().name()])
            .args(runner)
            .arg(bin)
            .arg("status")
            .args(args)
            .env("IPC_PATH", node.ipc_path())
            .env("KUBECONFIG", &self.ns.kubeconfig)
            .env("NAMESPACE", &self.ns.name)
            .output()
    }

    /// Starts (or restarts) node `i`'s sidecar.
    pub fn start_sidecar(&mut self, i: usize) -> Result<()> {
        self.start_sidecar_with(i, &[])
    }

    /// Starts (or restarts) node `i`'s sidecar with `extra` env on top of the
    /// mesh's (e.g. another `REGISTRY_LAYOUT` for this one pod).
    pub fn start_sidecar_with(&mut self, i: usize, extra: &[(&str, &str)]) -> Result<()> {
        self.starts += 1;
        let mut env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        env.extend_from_slice(extra);
        if let Some(uid) = self.pod_uids.get(&i) {
            env.push(("POD_UID", uid));
        }
        let sc = Sidecar::start_bin(
            &self.ctx,
            &self.sidecar_bin.clone().unwrap_or_else(crate::sidecar_bin),
            self.net.node(i),
            &self.ns,
            &format!("{}", self.starts),
            &env,
        )?;
        if self.sidecars.len() <= i {
            self.sidecars.resize_with(i + 1, || None);
        }
        self.sidecars[i] = Some(sc);
        Ok(())
    }

    /// Creates (or re-creates) node `i`'s Pod object, labelled
    /// `app.kubernetes.io/name=geth` and Running at the node's IP as the
    /// kubelet would report it (nothing runs it), as admin; its UID becomes
    /// the sidecar's POD_UID from the next start on. Returns the UID.
    pub async fn put_pod(&mut self, i: usize) -> Result<String> {
        use k8s_openapi::api::core::v1::Pod;
        use kube::api::{Patch, PatchParams, PostParams};
        let pods: Api<Pod> = Api::namespaced(self.cluster.admin(), &self.ns.name);
        let name = self.net.node(i).name().to_owned();
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "geth"}},
            "spec": {"containers": [{"name": "geth", "image": "ethereum/client-go:v1.17.5"}]}
        }))
        .map_err(|e| crate::Error::Setup(format!("pod {name}: {e}")))?;
        let created = pods.create(&PostParams::default(), &pod).await?;
        let ip = self.net.node(i).ip().to_string();
        let status = serde_json::json!({"status": {"phase": "Running", "podIP": ip}});
        pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
            .await?;
        let uid = created.metadata.uid.unwrap_or_default();
        self.pod_uids.insert(i, uid.clone());
        Ok(uid)
    }

    /// Starts every node's sidecar, then waits until the mesh is full and
    /// registered, each within `timeout`.
    pub async fn start_sidecars_and_wait(&mut self, timeout: Duration) -> Result<()> {
        let all: Vec<usize> = (0..self.net.nodes().len()).collect();
        for &i in &all {
            self.start_sidecar(i)?;
        }
        self.wait_full_mesh(&all, timeout).await?;
        self.wait_registered(&all, timeout).await
    }

    /// Adds nodes with sidecars; returns their indices.
    pub async fn add_nodes(&mut self, specs: Vec<NodeSpec>) -> Result<Vec<usize>> {
        let idx = self.net.add_nodes(specs).await?;
        for &i in &idx {
            self.start_sidecar(i)?;
        }
        Ok(idx)
    }

    /// Takes node `i`'s sidecar out (to terminate or kill it).
    pub fn take_sidecar(&mut self, i: usize) -> Option<Sidecar> {
        self.sidecars.get_mut(i).and_then(Option::take)
    }

    /// Node ids of nodes `members`, by index.
    pub fn ids(&self, members: &[usize]) -> BTreeMap<usize, String> {
        members
            .iter()
            .map(|&i| (i, self.net.node(i).node_id()))
            .collect()
    }

    /// The nodes of `ids` (index -> node id, see [`Mesh::ids`]) that node `i`'s
    /// geth does not list in `admin_peers`; `None` when geth does not answer.
    pub async fn missing_peers(
        &self,
        i: usize,
        ids: &BTreeMap<usize, String>,
    ) -> Option<Vec<usize>> {
        let peers: BTreeSet<String> = self
            .net
            .node(i)
            .peer_ids()
            .await
            .ok()?
            .into_iter()
            .collect();
        Some(
            ids.iter()
                .filter(|&(&j, id)| j != i && !peers.contains(id))
                .map(|(&j, _)| j)
                .collect(),
        )
    }

    /// Waits until every node in `members` is connected to every other one.
    pub async fn wait_full_mesh(&self, members: &[usize], timeout: Duration) -> Result<()> {
        let ids = self.ids(members);
        eventually(&format!("full mesh of nodes {members:?}"), timeout, || {
            let ids = ids.clone();
            async move {
                for &i in ids.keys() {
                    if !self.missing_peers(i, &ids).await?.is_empty() {
                        return None;
                    }
                }
                Some(())
            }
        })
        .await
    }

    /// The registry's raw data (as admin), empty when the ConfigMap is missing.
    pub async fn registry_data(&self) -> BTreeMap<String, String> {
        Api::<ConfigMap>::namespaced(self.cluster.admin(), &self.ns.name)
            .get_opt(CONFIGMAP)
            .await
            .ok()
            .flatten()
            .and_then(|c| c.data)
            .unwrap_or_default()
    }

    /// The registry writes (create, update, patch, delete of the ConfigMap
    /// or of Leases) the sidecars' service account made, from the audit log,
    /// as `verb resource/name`.
    pub fn registry_writes(&self) -> Vec<String> {
        self.cluster
            .audited_requests(&self.ns.service_account_user())
            .into_iter()
            .filter(|(verb, resource, _)| {
                matches!(resource.as_str(), "configmaps" | "leases")
                    && matches!(verb.as_str(), "create" | "update" | "patch" | "delete")
            })
            .map(|(verb, resource, name)| format!("{verb} {resource}/{name}"))
            .collect()
    }

    /// Asserts nothing was removed since `writes_before` (a count of
    /// [`Mesh::registry_writes`]): no member key gone from the ConfigMap and
    /// no Lease deleted (`history`, the admin watch), no delete by the
    /// sidecars in the audit log.
    ///
    /// # Panics
    /// When something was removed.
    pub fn assert_nothing_removed(&self, history: &RegistryHistory, writes_before: usize) {
        let removed = history.removed();
        let writes = self.registry_writes();
        let during = &writes[writes_before.min(writes.len())..];
        assert!(
            removed.is_empty(),
            "member records removed: {removed:?}; the sidecars' registry writes meanwhile: {during:?}"
        );
        let deletes: Vec<&String> = during.iter().filter(|w| w.starts_with("delete")).collect();
        assert!(
            deletes.is_empty(),
            "registry deletes in the audit log: {deletes:?}"
        );
    }

    /// The node ids (as geth reports them) of the registry's
    /// `static-nodes.json` entries (none when missing), as admin.
    pub async fn static_node_ids(&self) -> BTreeSet<String> {
        self.registry_data()
            .await
            .get("static-nodes.json")
            .and_then(|v| serde_json::from_str::<Vec<String>>(v).ok())
            .unwrap_or_default()
            .iter()
            .filter_map(|e| e.parse::<geth_ipc::Enode>().ok())
            .map(|e| e.node_id().to_string())
            .collect()
    }

    /// Pod names registered: keys `member.<pod>` of the ConfigMap, and the
    /// member Leases of the lease layout (`REGISTRY_LAYOUT=leases`).
    pub async fn registered_pods(&self) -> BTreeSet<String> {
        let mut pods: BTreeSet<String> = self
            .registry_data()
            .await
            .keys()
            .filter_map(|k| k.strip_prefix("member.").map(str::to_owned))
            .collect();
        pods.extend(self.lease_pods().await);
        pods
    }

    /// Pod names of the member Leases (the lease layout), as their holders.
    pub async fn lease_pods(&self) -> BTreeSet<String> {
        let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
            Api::namespaced(self.cluster.admin(), &self.ns.name);
        let lp = kube::api::ListParams::default().labels(&peer_registry::lease_selector(CONFIGMAP));
        leases
            .list(&lp)
            .await
            .map(|l| l.items)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|l| l.spec?.holder_identity)
            .collect()
    }

    /// Waits until the registered pods are exactly those of `members`.
    pub async fn wait_registered(&self, members: &[usize], timeout: Duration) -> Result<()> {
        let want: BTreeSet<String> = members
            .iter()
            .map(|&i| self.net.node(i).name().to_owned())
            .collect();
        eventually(
            &format!("registry to hold exactly {want:?}"),
            timeout,
            || {
                let want = want.clone();
                async move { (self.registered_pods().await == want).then_some(()) }
            },
        )
        .await
    }

    /// A series' value from node `i`'s sidecar: `name` is the whole series key,
    /// e.g. `geth_peer_sidecar_members` or
    /// `geth_peer_sidecar_geth_actions_total{kind="add_peer"}` (`None` if absent
    /// or unreachable).
    pub async fn metric(&self, i: usize, name: &str) -> Option<f64> {
        let sc = self.sidecars.get(i)?.as_ref()?;
        let (_, body) = sc.get("/metrics").await.ok()?;
        // `name` is a whole series key: `metric` or `metric{label="v"}`.
        body.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            (key == name).then(|| value.parse().ok()).flatten()
        })
    }

    /// The sum of every series of metric `name` from node `i`'s sidecar,
    /// whatever their labels (e.g. `geth_peer_sidecar_registry_errors_total`
    /// over every error kind); `None` when the sidecar does not answer.
    pub async fn metric_sum(&self, i: usize, name: &str) -> Option<f64> {
        let sc = self.sidecars.get(i)?.as_ref()?;
        let (_, body) = sc.get("/metrics").await.ok()?;
        let labelled = format!("{name}{{");
        Some(
            body.lines()
                .filter(|l| !l.starts_with('#'))
                .filter_map(|l| l.rsplit_once(' '))
                .filter(|(key, _)| *key == name || key.starts_with(&labelled))
                .filter_map(|(_, value)| value.parse::<f64>().ok())
                .sum(),
        )
    }
}

/// Every removal of a member record seen on the registry from the moment it
/// was started, by watching as admin: a `member.<pod>` key gone from the
/// ConfigMap (in any version the watch delivers, so a removal followed at
/// once by a re-registration still shows), or a member Lease deleted. Stops
/// when dropped.
pub struct RegistryHistory {
    removed: Arc<std::sync::Mutex<Vec<String>>>,
    changes: Arc<std::sync::atomic::AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl RegistryHistory {
    /// The removals so far, one line each (`configmap: member.geth-1 gone
    /// (resourceVersion 123)`, `lease geth-peer-...-geth-1 (geth-1) deleted`).
    pub fn removed(&self) -> Vec<String> {
        self.removed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Removals of `pod`'s record so far.
    pub fn removed_pod(&self, pod: &str) -> Vec<String> {
        let needle = format!("({pod})");
        let key = format!("member.{pod} ");
        self.removed()
            .into_iter()
            .filter(|r| r.contains(&needle) || r.contains(&key))
            .collect()
    }

    /// How many watch events (object versions) were seen so far.
    pub fn changes(&self) -> usize {
        self.changes.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for RegistryHistory {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Mesh {
    /// Starts recording removals of member records ([`RegistryHistory`]) and
    /// waits until both watches have listed the registry.
    pub async fn registry_history(&self) -> Result<RegistryHistory> {
        use futures::StreamExt as _;
        use k8s_openapi::api::coordination::v1::Lease;
        use kube::runtime::watcher;

        let removed = Arc::new(std::sync::Mutex::new(Vec::new()));
        let changes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let listed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let push = |removed: &Arc<std::sync::Mutex<Vec<String>>>, line: String| {
            removed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(line);
        };
        let cms: Api<ConfigMap> = Api::namespaced(self.cluster.admin(), &self.ns.name);
        let cm_task = {
            let (removed, changes, listed) = (removed.clone(), changes.clone(), listed.clone());
            tokio::spawn(async move {
                let config =
                    watcher::Config::default().fields(&format!("metadata.name={CONFIGMAP}"));
                let mut stream = watcher(cms, config).boxed();
                let mut keys: BTreeSet<String> = BTreeSet::new();
                let mut first = true;
                while let Some(ev) = stream.next().await {
                    let (now, rv) = match ev {
                        Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm)) => (
                            cm.data
                                .unwrap_or_default()
                                .into_keys()
                                .filter(|k| k.starts_with("member."))
                                .collect::<BTreeSet<_>>(),
                            cm.metadata.resource_version.unwrap_or_default(),
                        ),
                        Ok(watcher::Event::Delete(cm)) => (
                            BTreeSet::new(),
                            cm.metadata.resource_version.unwrap_or_default(),
                        ),
                        Ok(watcher::Event::InitDone) => {
                            if first {
                                first = false;
                                listed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            continue;
                        }
                        Ok(watcher::Event::Init) | Err(_) => continue,
                    };
                    changes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    for gone in keys.difference(&now) {
                        push(
                            &removed,
                            format!("configmap: {gone} gone (resourceVersion {rv})"),
                        );
                    }
                    keys = now;
                }
            })
        };
        let leases: Api<Lease> = Api::namespaced(self.cluster.admin(), &self.ns.name);
        let lease_task = {
            let (removed, changes, listed) = (removed.clone(), changes.clone(), listed.clone());
            tokio::spawn(async move {
                let config =
                    watcher::Config::default().labels(&peer_registry::lease_selector(CONFIGMAP));
                let mut stream = watcher(leases, config).boxed();
                let mut first = true;
                while let Some(ev) = stream.next().await {
                    match ev {
                        Ok(watcher::Event::Delete(l)) => {
                            changes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let holder = l.spec.and_then(|s| s.holder_identity).unwrap_or_default();
                            push(
                                &removed,
                                format!(
                                    "lease {} ({holder}) deleted",
                                    l.metadata.name.unwrap_or_default()
                                ),
                            );
                        }
                        Ok(watcher::Event::Apply(_)) => {
                            changes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        Ok(watcher::Event::InitDone) if first => {
                            first = false;
                            listed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        _ => {}
                    }
                }
            })
        };
        let history = RegistryHistory {
            removed,
            changes,
            tasks: vec![cm_task, lease_task],
        };
        eventually("the registry watches to list", Duration::from_secs(15), || {
            let listed = listed.clone();
            async move { (listed.load(std::sync::atomic::Ordering::Relaxed) == 2).then_some(()) }
        })
        .await?;
        Ok(history)
    }
}
