//! Starting the node's components: containerd, the control loops
//! (controller-manager, scheduler), the kubelet (and its restart) and kube-proxy.

#[allow(clippy::wildcard_imports)]
use super::*;

impl KubeNode {
    pub(super) async fn start_containerd(&mut self) -> Result<()> {
        let d = self.dir.join("containerd");
        let cni_conf = d.join("net.d");
        let conflist = json!({
            "cniVersion": "1.0.0",
            "name": "gps-pods",
            "plugins": [{
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{ "subnet": self.pod_subnet }]],
                    "routes": [{ "dst": "0.0.0.0/0" }],
                    "dataDir": d.join("ipam").to_string_lossy(),
                }
            }]
        });
        write(&cni_conf.join("10-gps-pods.conflist"), conflist.to_string())?;
        let sock = self.containerd_socket();
        let config = format!(
            r#"version = 3
root = "{root}"
state = "{state}"
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "{pause}"
[plugins.'io.containerd.cri.v1.runtime']
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  disable_apparmor = true
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = "{cni}"
  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
      BinaryName = "/usr/sbin/runc"
      Root = "{runc}"
      SystemdCgroup = false
"#,
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = sock.display(),
            pause = oci::PAUSE_IMAGE,
            cni = cni_conf.display(),
            runc = d.join("runc").display(),
        );
        write(&d.join("config.toml"), config)?;
        let prefix = self.holder_prefix();
        let prefix: Vec<&str> = prefix.iter().map(String::as_str).collect();
        let path = self.path_env();
        let proc = Proc::spawn_with(
            &self.ctx,
            "containerd",
            &prefix,
            &testbed().bin("containerd"),
            [
                "--config".into(),
                d.join("config.toml").into_os_string(),
                "--log-level".into(),
                "warn".into(),
            ],
            &[("PATH", path.as_str())],
        )?;
        self.containerd = Some(proc);
        let sock = self.containerd_socket();
        eventually("containerd's socket", Duration::from_secs(30), || {
            let ok = sock.exists();
            async move { ok.then_some(()) }
        })
        .await
        .map_err(|e| self.exited("containerd", e))?;
        Ok(())
    }

    pub(super) fn start_control_loops(&mut self) -> Result<()> {
        let tb = testbed();
        let c = self.cluster();
        let kcm_kubeconfig = c.component_kubeconfig("kube-controller-manager")?;
        let sched_kubeconfig = c.component_kubeconfig("kube-scheduler")?;
        let cdir = c.dir().to_path_buf();
        let ns = self.netns_name().to_owned();
        let kcm = Proc::spawn(
            &self.ctx,
            "kube-controller-manager",
            Some(&ns),
            &tb.bin("kube-controller-manager"),
            [
                format!("--kubeconfig={}", kcm_kubeconfig.display()),
                "--leader-elect=false".into(),
                "--bind-address=127.0.0.1".into(),
                format!(
                    "--service-account-private-key-file={}",
                    cdir.join("sa.key").display()
                ),
                format!(
                    "--root-ca-file={}",
                    cdir.join("certs/apiserver.crt").display()
                ),
                format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                // Each controller with its own service account, as kubeadm runs it.
                "--use-service-account-credentials=true".into(),
                "--v=1".into(),
            ],
            &[],
        )?;
        self.controller_manager = Some(kcm);
        let sched = Proc::spawn(
            &self.ctx,
            "kube-scheduler",
            Some(&ns),
            &tb.bin("kube-scheduler"),
            [
                format!("--kubeconfig={}", sched_kubeconfig.display()),
                "--leader-elect=false".into(),
                "--bind-address=127.0.0.1".into(),
                "--v=1".into(),
            ],
            &[],
        )?;
        self.scheduler = Some(sched);
        Ok(())
    }

    pub(super) fn start_kubelet(&mut self, node_ip: Ipv4Addr) -> Result<()> {
        let d = self.dir.join("kubelet");
        write(&d.join("resolv.conf"), "nameserver 127.0.0.1\n")?;
        let config = json!({
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "failCgroupV1": false,
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": self.cgroup_root,
            "containerRuntimeEndpoint": format!("unix://{}", self.containerd_socket().display()),
            "address": node_ip.to_string(),
            "port": KUBELET_PORT,
            "readOnlyPort": 0,
            "healthzPort": 0,
            "authentication": { "anonymous": { "enabled": true }, "webhook": { "enabled": false } },
            "authorization": { "mode": "AlwaysAllow" },
            "failSwapOn": false,
            "protectKernelDefaults": true,
            "podLogsDir": d.join("pod-logs").to_string_lossy(),
            "resolvConf": d.join("resolv.conf").to_string_lossy(),
            "evictionHard": {
                "memory.available": "50Mi", "nodefs.available": "1%",
                "nodefs.inodesFree": "1%", "imagefs.available": "1%"
            },
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": false,
            "syncFrequency": "10s",
            "fileCheckFrequency": "10s",
            "nodeStatusUpdateFrequency": "2s",
            "clusterDomain": "cluster.local",
            "staticPodPath": "",
            // The node suite's releases stay up until the node is torn down;
            // 30 pods (the old value) were too few once the demo, graph,
            // monitoring and chaos tests joined: pods stayed Pending. 110 is
            // the kubelet's default.
            "maxPods": 110,
        });
        write(&d.join("config.json"), config.to_string())?;
        let kubeconfig = self.cluster().component_kubeconfig("kubelet")?;
        let prefix = self.holder_prefix();
        let prefix: Vec<&str> = prefix.iter().map(String::as_str).collect();
        let path = self.path_env();
        let kubelet = Proc::spawn_with(
            &self.ctx,
            "kubelet",
            &prefix,
            &testbed().bin("kubelet"),
            [
                format!("--config={}", d.join("config.json").display()),
                format!("--kubeconfig={}", kubeconfig.display()),
                format!("--root-dir={}", d.join("root").display()),
                format!("--cert-dir={}", d.join("pki").display()),
                format!("--hostname-override={NODE_NAME}"),
                format!("--node-ip={node_ip}"),
                "--v=1".into(),
            ],
            &[("PATH", path.as_str())],
        )?;
        self.kubelet = Some(kubelet);
        Ok(())
    }

    /// Restarts the kubelet as a node upgrade or an operator would: SIGTERM,
    /// `down` without a kubelet (containers run on under containerd), then the
    /// same binary with the same configuration and directories. Waits until
    /// the new kubelet has renewed the node's Lease (its heartbeat) and the
    /// Node reports Ready; returns how long that took from the start.
    pub async fn restart_kubelet(&mut self, down: Duration) -> Result<Duration> {
        use k8s_openapi::api::coordination::v1::Lease;
        let node_ip = self
            .bridge
            .as_ref()
            .map(|b| b.ip(2))
            .ok_or_else(|| Error::Setup("the node is torn down".into()))?;
        if let Some(mut kubelet) = self.kubelet.take() {
            kubelet.terminate(Duration::from_secs(30)).await;
        }
        let leases: Api<Lease> = Api::namespaced(self.admin(), "kube-node-lease");
        let renew = |lease: Option<Lease>| lease.and_then(|l| l.spec?.renew_time);
        let last = renew(leases.get_opt(NODE_NAME).await?);
        // The outage is the scenario, not a synchronisation.
        tokio::time::sleep(down).await;
        let started = std::time::Instant::now();
        self.start_kubelet(node_ip)?;
        let nodes: Api<Node> = Api::all(self.admin());
        eventually(
            "the restarted kubelet's heartbeat and Ready",
            Duration::from_secs(120),
            || {
                let (leases, nodes, last) = (leases.clone(), nodes.clone(), last.clone());
                async move {
                    let now = renew(leases.get_opt(NODE_NAME).await.ok()?);
                    if now.is_none() || now == last {
                        return None;
                    }
                    let node = nodes.get_opt(NODE_NAME).await.ok()??;
                    node.status?
                        .conditions?
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
                        .then_some(())
                }
            },
        )
        .await
        .map_err(|e| self.exited("kubelet", e))?;
        Ok(started.elapsed())
    }

    pub(super) fn start_kube_proxy(&mut self, node_ip: Ipv4Addr) -> Result<()> {
        let kubeconfig = self.cluster().component_kubeconfig("kube-proxy")?;
        let ns = self.netns_name().to_owned();
        let proxy = Proc::spawn(
            &self.ctx,
            "kube-proxy",
            Some(&ns),
            &testbed().bin("kube-proxy"),
            [
                format!("--kubeconfig={}", kubeconfig.display()),
                format!("--hostname-override={NODE_NAME}"),
                "--proxy-mode=nftables".into(),
                format!("--cluster-cidr={}", self.pod_subnet),
                format!("--nodeport-addresses={node_ip}/32"),
                "--conntrack-max-per-core=0".into(),
                "--conntrack-tcp-timeout-established=0".into(),
                "--conntrack-tcp-timeout-close-wait=0".into(),
                "--metrics-bind-address=127.0.0.1:10249".into(),
                "--healthz-bind-address=127.0.0.1:10256".into(),
                "--v=1".into(),
            ],
            &[],
        )?;
        self.kube_proxy = Some(proxy);
        Ok(())
    }
}
