//! A real Kubernetes node on this machine: etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler, kube-proxy (nftables), containerd
//! (with runc and the CNI bridge plugin) and a kubelet, so that what users
//! install — the image, the Helm chart, the kustomize manifests — runs as real
//! pods with real IPs, the Downward API and projected service-account tokens.
//!
//! Isolation from the host:
//! - Everything runs in the node's own network namespace, joined to the test
//!   by one veth on a per-test [`Bridge`]: the pod bridge, the veths of the
//!   pods and kube-proxy's nftables tables live and die with that namespace.
//!   Pods get addresses from a /24 of 10.213.0.0/16 that exists only there.
//! - containerd and the kubelet share one private mount namespace (held by a
//!   holder process) in which `/var/lib`, `/var/log` and `/run` are the test's
//!   own directories and the six sysctls the kubelet checks read as it expects
//!   (`protectKernelDefaults`), so no host path and no machine-wide sysctl is
//!   written; every mount vanishes with that namespace.
//! - Pod cgroups live under a cgroup root of the node's own name in every
//!   hierarchy, removed at teardown.
//!
//! Teardown (also on panic, from `Drop`): every process of the node is killed
//! (the components, containerd's shims and every container process, found by
//! mount namespace and by cgroup), the cgroups are removed, then the network
//! namespace and the bridge.

use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, PersistentVolume, ServiceAccount};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;

mod components;
mod teardown;

use crate::cluster::{NodeControlPlane, SERVICE_CIDR};
use crate::oci;
use crate::{
    Bridge, Cluster, Error, Netns, Proc, Result, TestContext, eventually, io_err, testbed,
};
use teardown::cgroup_hierarchies;

/// The node's name (the kubelet's identity is `system:node:<name>`).
pub const NODE_NAME: &str = "gps-node";
/// The uid and gid the chart runs both containers as (`uid` value).
pub const POD_UID: u32 = 10001;
/// The kubelet's port (not the default 10250, in case a host kubelet exists).
const KUBELET_PORT: u16 = 10350;

/// The six sysctls `protectKernelDefaults` checks, with the values it expects.
const KERNEL_DEFAULTS: [(&str, &str); 6] = [
    ("vm/overcommit_memory", "1"),
    ("vm/panic_on_oom", "0"),
    ("kernel/panic", "10"),
    ("kernel/panic_on_oops", "1"),
    ("kernel/keys/root_maxkeys", "1000000"),
    ("kernel/keys/root_maxbytes", "25000000"),
];

fn run(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd.output().map_err(io_err(format!("run {what}")))?;
    if !out.status.success() {
        return Err(Error::Setup(format!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn write(path: &Path, contents: impl AsRef<[u8]>) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io_err(format!("mkdir {}", parent.display())))?;
    }
    std::fs::write(path, contents).map_err(io_err(format!("write {}", path.display())))
}

/// A running single-node cluster. See the module documentation.
pub struct KubeNode {
    ctx: TestContext,
    dir: PathBuf,
    cgroup_root: String,
    holder_mnt_ns: String,
    kubeconfig: PathBuf,
    kube_proxy: Option<Proc>,
    kubelet: Option<Proc>,
    containerd: Option<Proc>,
    scheduler: Option<Proc>,
    controller_manager: Option<Proc>,
    cluster: Option<Cluster>,
    holder: Option<Proc>,
    netns: Option<Netns>,
    bridge: Option<Arc<Bridge>>,
    pod_subnet: String,
    netns_label: String,
    links: Vec<String>,
    started: std::time::Instant,
    ready_after: Duration,
}

impl KubeNode {
    /// Starts every component and waits until the Node is Ready.
    pub async fn start(ctx: &TestContext) -> Result<KubeNode> {
        let started = std::time::Instant::now();
        let tb = testbed();
        for bin in [
            "kubelet",
            "kube-controller-manager",
            "kube-scheduler",
            "kube-proxy",
            "containerd",
            "containerd-shim-runc-v2",
            "ctr",
            "pause",
            "kubectl",
            "helm",
        ] {
            if !tb.bin(bin).is_file() {
                return Err(Error::Setup(format!(
                    "test bed binary {bin} is missing: run `testbed/provision.sh` \
                     (tests that need the real node fail without it; they never skip)"
                )));
            }
        }
        for (tool, package) in [
            ("/usr/sbin/runc", "runc"),
            ("/usr/lib/cni/bridge", "containernetworking-plugins"),
            ("/usr/sbin/nft", "nftables"),
        ] {
            if !Path::new(tool).exists() {
                return Err(Error::Setup(format!(
                    "{tool} is missing: apt-get install {package} (scripts/system-deps.sh does)"
                )));
            }
        }
        let bridge = Arc::new(Bridge::create()?);
        let node_ip = bridge.ip(2);
        let netns = bridge.netns("node", node_ip)?;
        let id = netns.name().to_owned();
        let links = vec![bridge.name().to_owned(), netns.veth().to_owned()];
        // The pod /24 takes the bridge's third octet, so parallel nodes never overlap.
        let third = bridge.ip(0).octets()[2];
        let pod_subnet = format!("10.213.{third}.0/24");
        let dir = ctx.path("node");
        let mut node = KubeNode {
            ctx: ctx.clone(),
            dir: dir.clone(),
            cgroup_root: format!("/{id}"),
            holder_mnt_ns: String::new(),
            kubeconfig: PathBuf::new(),
            kube_proxy: None,
            kubelet: None,
            containerd: None,
            scheduler: None,
            controller_manager: None,
            cluster: None,
            holder: None,
            netns: Some(netns),
            bridge: Some(bridge),
            pod_subnet,
            netns_label: id.clone(),
            links,
            started,
            ready_after: Duration::ZERO,
        };
        node.start_holder().await?;
        let cluster = Cluster::start_with(
            ctx,
            node_ip,
            Some(NodeControlPlane {
                netns: id.clone(),
                node_name: NODE_NAME.into(),
            }),
        )
        .await?;
        node.kubeconfig = cluster.admin_kubeconfig();
        node.cluster = Some(cluster);
        node.start_containerd().await?;
        node.import_images()?;
        node.start_control_loops()?;
        node.start_kubelet(node_ip)?;
        node.start_kube_proxy(node_ip)?;
        node.wait_ready().await?;
        node.ready_after = started.elapsed();
        Ok(node)
    }

    fn netns_name(&self) -> &str {
        self.netns.as_ref().map(Netns::name).unwrap_or_default()
    }

    /// The mount and network namespaces in which containerd and the kubelet run.
    fn holder_prefix(&self) -> Vec<String> {
        let pid = self.holder.as_ref().map(Proc::pid).unwrap_or_default();
        vec![
            "nsenter".into(),
            "-t".into(),
            pid.to_string(),
            "-m".into(),
            "-n".into(),
            "--".into(),
        ]
    }

    async fn start_holder(&mut self) -> Result<()> {
        let d = &self.dir;
        let mut script = String::from("set -eu\n");
        for (host, sub) in [
            ("/var/lib", "var-lib"),
            ("/var/log", "var-log"),
            ("/run", "run"),
        ] {
            let own = d.join("host").join(sub);
            std::fs::create_dir_all(&own).map_err(io_err("mkdir host overlay"))?;
            script += &format!("mount --bind '{}' '{host}'\n", own.display());
        }
        for (key, value) in KERNEL_DEFAULTS {
            let file = d.join("sysctl").join(key.replace('/', "."));
            write(&file, format!("{value}\n"))?;
            script += &format!("mount --bind '{}' '/proc/sys/{key}'\n", file.display());
        }
        let ready = d.join("holder.ready");
        script += &format!("touch '{}'\nexec sleep infinity\n", ready.display());
        write(&d.join("holder.sh"), &script)?;
        let netns_path = format!("--net=/run/netns/{}", self.netns_name());
        let holder = Proc::spawn_with(
            &self.ctx,
            "node-holder",
            &[
                "nsenter",
                &netns_path,
                "--",
                "unshare",
                "-m",
                "--propagation",
                "private",
                "--",
            ],
            Path::new("/bin/bash"),
            [d.join("holder.sh")],
            &[],
        )?;
        self.holder = Some(holder);
        eventually(
            "the node's mount namespace",
            Duration::from_secs(10),
            || {
                let ok = ready.exists();
                async move { ok.then_some(()) }
            },
        )
        .await?;
        let pid = self.holder.as_ref().map(Proc::pid).unwrap_or_default();
        self.holder_mnt_ns = std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
            .map_err(io_err("read the holder's mount namespace"))?
            .to_string_lossy()
            .into_owned();
        // The cgroup root of this node, in every hierarchy (cpuset needs its
        // cpus and mems before a task can join).
        for h in cgroup_hierarchies() {
            let root = h.join(self.cgroup_root.trim_start_matches('/'));
            std::fs::create_dir_all(&root).map_err(io_err("create the node's cgroup root"))?;
            for f in ["cpuset.cpus", "cpuset.mems"] {
                if let Ok(v) = std::fs::read_to_string(h.join(f)) {
                    let _ = std::fs::write(root.join(f), v.trim());
                }
            }
        }
        Ok(())
    }

    fn containerd_socket(&self) -> PathBuf {
        self.dir.join("containerd/containerd.sock")
    }

    fn path_env(&self) -> String {
        format!(
            "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            testbed().bin_dir.display()
        )
    }

    /// The error to report when a component may have died: its log's tail.
    fn exited(&self, component: &str, e: Error) -> Error {
        let log = self.ctx.path(&format!("logs/{component}.log"));
        Error::Setup(format!(
            "{e}; {component}'s log ends:\n{}",
            TestContext::tail(&log, 15)
        ))
    }

    /// The projected service-account token the kubelet mounted for the pod
    /// with UID `pod_uid` (`kube-api-access-*`, what its containers read at
    /// /var/run/secrets/kubernetes.io/serviceaccount/token): read from the
    /// kubelet's pod directory, through the node's mount namespace (the
    /// volume is a tmpfs mounted there only).
    ///
    /// # Errors
    /// When the pod has no such volume on this node (yet).
    pub fn pod_service_account_token(&self, pod_uid: &str) -> Result<String> {
        let holder = self.holder.as_ref().map(Proc::pid).unwrap_or_default();
        let volumes = format!(
            "/proc/{holder}/root{}",
            self.dir
                .join("kubelet/root/pods")
                .join(pod_uid)
                .join("volumes/kubernetes.io~projected")
                .display()
        );
        let entries =
            std::fs::read_dir(&volumes).map_err(io_err("read the pod's projected volumes"))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            if name.to_string_lossy().starts_with("kube-api-access-") {
                let token = std::fs::read_to_string(entry.path().join("token"))
                    .map_err(io_err("read the projected token"))?;
                return Ok(token.trim().to_owned());
            }
        }
        Err(Error::Setup(format!(
            "no kube-api-access-* projected volume in {volumes}"
        )))
    }

    /// `ctr` against this node's containerd, in the CRI's `k8s.io` namespace.
    pub fn ctr(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new(testbed().bin("ctr"));
        cmd.arg("--address")
            .arg(self.containerd_socket())
            .args(["-n", "k8s.io"])
            .args(args);
        run(&mut cmd, &format!("ctr {}", args.join(" ")))
    }

    /// Imports an OCI image-layout archive (see [`oci::build_archive`]).
    pub fn import_image(&self, archive: &Path) -> Result<()> {
        self.ctr(&["images", "import", &archive.to_string_lossy()])
            .map(|_| ())
    }

    fn import_images(&self) -> Result<()> {
        for (name, spec) in [
            ("pause", oci::pause_image()),
            ("geth", oci::geth_image()?),
            ("sidecar", oci::sidecar_image()?),
        ] {
            let archive = oci::build_archive(&spec, &self.dir.join("images").join(name))?;
            self.import_image(&archive)?;
        }
        Ok(())
    }

    fn cluster(&self) -> &Cluster {
        self.cluster
            .as_ref()
            .expect("the control plane runs while the node exists")
    }

    async fn wait_ready(&self) -> Result<()> {
        let nodes: Api<Node> = Api::all(self.admin());
        eventually("Node Ready", Duration::from_secs(120), || {
            let nodes = nodes.clone();
            async move {
                let node = nodes.get_opt(NODE_NAME).await.ok()??;
                let ready = node
                    .status?
                    .conditions?
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True");
                ready.then_some(())
            }
        })
        .await
        .map_err(|e| self.exited("kubelet", e))?;
        self.wait_default_service_account("default").await
    }

    /// Pods of a namespace are admitted once the controller-manager has
    /// created its `default` ServiceAccount.
    async fn wait_default_service_account(&self, ns: &str) -> Result<()> {
        let sas: Api<ServiceAccount> = Api::namespaced(self.admin(), ns);
        eventually(
            "the default ServiceAccount",
            Duration::from_secs(60),
            || {
                let sas = sas.clone();
                async move { sas.get_opt("default").await.ok()?.map(|_| ()) }
            },
        )
        .await
        .map_err(|e| self.exited("kube-controller-manager", e))
    }

    /// How long [`KubeNode::start`] took until the Node was Ready.
    pub fn ready_after(&self) -> Duration {
        self.ready_after
    }

    /// Time since [`KubeNode::start`] was called.
    pub fn age(&self) -> Duration {
        self.started.elapsed()
    }

    /// A cluster-admin client (fixtures only; the sidecar runs as its pods' identity).
    pub fn admin(&self) -> Client {
        self.cluster().admin()
    }

    /// The control plane (e.g. its audit log).
    pub fn control_plane(&self) -> &Cluster {
        self.cluster()
    }

    /// The cluster-admin kubeconfig (for kubectl and helm).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The test bed's kubectl with the admin kubeconfig; stdout on success.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new(testbed().bin("kubectl"));
        cmd.arg("--kubeconfig").arg(&self.kubeconfig).args(args);
        run(&mut cmd, &format!("kubectl {}", args.join(" ")))
    }

    /// The test bed's helm with the admin kubeconfig; stdout on success.
    pub fn helm(&self, args: &[&str]) -> Result<String> {
        let home = self.dir.join("helm");
        let mut cmd = Command::new(testbed().bin("helm"));
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"));
        run(&mut cmd, &format!("helm {}", args.join(" ")))
    }

    /// A fresh namespace with the chain's genesis ConfigMap (`geth-genesis`,
    /// as the chart expects) and `volumes` hostPath PersistentVolumes owned by
    /// the pods' uid, pre-bound to the claims `data-<statefulset>-<i>`.
    pub async fn namespace(&self, hint: &str, statefulset: &str, volumes: usize) -> Result<String> {
        let admin = self.admin();
        let name = format!(
            "{}-{:x}",
            hint.to_ascii_lowercase()
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
                .take(40)
                .collect::<String>(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos() & 0xffff)
                .unwrap_or(0)
        );
        Api::<Namespace>::all(admin.clone())
            .create(
                &PostParams::default(),
                &Namespace {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        ..Default::default()
                    },
                    ..Default::default()
                },
            )
            .await?;
        let genesis = crate::geth::genesis(1337).to_string();
        Api::<ConfigMap>::namespaced(admin.clone(), &name)
            .create(
                &PostParams::default(),
                &ConfigMap {
                    metadata: ObjectMeta {
                        name: Some("geth-genesis".into()),
                        ..Default::default()
                    },
                    data: Some([("genesis.json".to_owned(), genesis)].into()),
                    ..Default::default()
                },
            )
            .await?;
        self.volumes(&name, statefulset, 0..volumes).await?;
        self.wait_default_service_account(&name).await?;
        Ok(name)
    }

    /// hostPath PersistentVolumes for the claims `data-<statefulset>-<i>` of
    /// namespace `ns`, owned by the pods' uid.
    pub async fn volumes(
        &self,
        ns: &str,
        statefulset: &str,
        ordinals: std::ops::Range<usize>,
    ) -> Result<()> {
        let pvs: Api<PersistentVolume> = Api::all(self.admin());
        for i in ordinals {
            let claim = format!("data-{statefulset}-{i}");
            let path = self.dir.join("volumes").join(ns).join(&claim);
            std::fs::create_dir_all(&path).map_err(io_err("create a volume directory"))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o770))
                .map_err(io_err("chmod a volume directory"))?;
            std::os::unix::fs::chown(&path, Some(POD_UID), Some(POD_UID))
                .map_err(io_err(format!("chown {}", path.display())))?;
            let pv: PersistentVolume = serde_json::from_value(json!({
                "metadata": { "name": format!("{ns}-{claim}") },
                "spec": {
                    "capacity": { "storage": "1Gi" },
                    "accessModes": ["ReadWriteOnce"],
                    "persistentVolumeReclaimPolicy": "Retain",
                    "hostPath": { "path": path.to_string_lossy(), "type": "Directory" },
                    "claimRef": { "namespace": ns, "name": claim },
                }
            }))
            .map_err(|e| Error::Setup(format!("PersistentVolume: {e}")))?;
            pvs.create(&PostParams::default(), &pv).await?;
        }
        Ok(())
    }

    /// The node's network namespace name.
    pub fn netns(&self) -> &str {
        &self.netns_label
    }

    /// The node's working directory (its configuration, state and volumes).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The host-side links the node created (its bridge and veth).
    pub fn link_names(&self) -> Vec<String> {
        self.links.clone()
    }
}
