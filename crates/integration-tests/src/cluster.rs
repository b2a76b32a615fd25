//! etcd + kube-apiserver with RBAC on, and per-test namespaces whose identity is
//! the project's own ServiceAccount/Role/RoleBinding from `deploy/`.

use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

use crate::{Error, Proc, Result, TestContext, eventually, io_err, testbed, workspace_root};

/// The Service CIDR of every test cluster (never routed off the machine).
pub const SERVICE_CIDR: &str = "10.0.0.0/24";

/// The token of a node component, derived from the admin token (both stay in
/// the test's own directory).
pub(crate) fn component_token(admin_token: &str, component: &str) -> String {
    format!("{admin_token}-{component}")
}

/// The name of the ServiceAccount, Role and RoleBinding in `deploy/base/rbac.yaml`.
pub const SERVICE_ACCOUNT: &str = "geth-peer-sidecar";

fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(io_err("bind a free port"))?;
    Ok(l.local_addr().map_err(io_err("local_addr"))?.port())
}

fn random_token() -> String {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded randomly per instance: enough for a test token.
    let h = std::collections::hash_map::RandomState::new().build_hasher();
    format!("{:016x}{:08x}", h.finish(), std::process::id())
}

fn run_cmd(args: &[&str]) -> Result<()> {
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(io_err(format!("run {}", args[0])))?;
    if !out.status.success() {
        return Err(Error::Setup(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

/// The command etcd and the apiserver are started under: their netns, and
/// with `GPS_CONTROL_PLANE_NICE=<n>` (-20 to 19) `nice -n <n>`, which every
/// thread they start inherits. A bench knob: on a 2-core test bed the control
/// plane competes for CPU with every geth, where a cluster gives it CPUs of
/// its own.
fn control_plane_prefix(netns: Option<&str>) -> Result<Vec<String>> {
    let mut prefix: Vec<String> = match netns {
        Some(ns) => ["ip", "netns", "exec", ns].map(str::to_owned).to_vec(),
        None => Vec::new(),
    };
    if let Ok(n) = std::env::var("GPS_CONTROL_PLANE_NICE") {
        let n: i8 = n
            .trim()
            .parse()
            .ok()
            .filter(|n| (-20..=19).contains(n))
            .ok_or_else(|| {
                Error::Setup(format!(
                    "GPS_CONTROL_PLANE_NICE={n}: not a nice value (a whole number from -20 to 19)"
                ))
            })?;
        prefix.extend(["nice".to_owned(), "-n".to_owned(), n.to_string()]);
    }
    Ok(prefix)
}

/// Starts etcd with its data in `dir/etcd`, on `ports` (client, peer).
fn spawn_etcd(
    ctx: &TestContext,
    dir: &std::path::Path,
    netns: Option<&str>,
    (client, peer): (u16, u16),
) -> Result<Proc> {
    let client_url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let data = dir.join("etcd").to_string_lossy().into_owned();
    Proc::spawn_with(
        ctx,
        "etcd",
        &control_plane_prefix(netns)?
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        &testbed().bin("etcd"),
        [
            "--name",
            "gps",
            "--data-dir",
            &data,
            "--listen-client-urls",
            &client_url,
            "--advertise-client-urls",
            &client_url,
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
            "--initial-cluster",
            &format!("gps={peer_url}"),
            "--unsafe-no-fsync",
            "--log-level",
            "warn",
        ],
        &[],
    )
}

/// A throwaway Kubernetes control plane: etcd and kube-apiserver with RBAC,
/// token authentication and service-account tokens. No controller-manager: no
/// default ServiceAccounts, no namespace deletion, no garbage collection.
pub struct Cluster {
    ctx: TestContext,
    dir: PathBuf,
    address: Ipv4Addr,
    node: Option<NodeControlPlane>,
    port: u16,
    /// etcd's client and peer ports.
    etcd_ports: (u16, u16),
    admin_token: String,
    apiserver: Option<Proc>,
    etcd: Proc,
    admin: Option<Client>,
}

/// How the control plane of a real node ([`crate::KubeNode`]) differs from the
/// bare apiserver: it runs in the node's network namespace, admits pods with
/// projected service-account tokens, authorizes kubelets with the Node
/// authorizer, and knows the identities of the node's components.
#[derive(Clone, Debug)]
pub struct NodeControlPlane {
    /// The node's network namespace (etcd and kube-apiserver run in it).
    pub netns: String,
    /// The node's name: the kubelet authenticates as `system:node:<name>`.
    pub node_name: String,
}

/// Bearer tokens of the real node's components, one per identity the built-in
/// RBAC roles expect (written to the apiserver's token file).
pub(crate) const COMPONENT_USERS: [(&str, &str); 3] = [
    ("kube-controller-manager", "system:kube-controller-manager"),
    ("kube-scheduler", "system:kube-scheduler"),
    ("kube-proxy", "system:kube-proxy"),
];

impl Cluster {
    /// Starts etcd and kube-apiserver listening on `address` (127.0.0.1, or a
    /// [`crate::Bridge`]'s host address so node namespaces can reach it) and waits
    /// for `/readyz`.
    pub async fn start(ctx: &TestContext, address: Ipv4Addr) -> Result<Cluster> {
        Self::start_with(ctx, address, None).await
    }

    /// [`Cluster::start`], as the control plane of a real node when `node` is set.
    pub async fn start_with(
        ctx: &TestContext,
        address: Ipv4Addr,
        node: Option<NodeControlPlane>,
    ) -> Result<Cluster> {
        let dir = ctx.path("cluster");
        std::fs::create_dir_all(&dir).map_err(io_err("create cluster dir"))?;
        let d = |f: &str| dir.join(f).to_string_lossy().into_owned();
        run_cmd(&["openssl", "genrsa", "-out", &d("sa.key"), "2048"])?;
        run_cmd(&[
            "openssl",
            "rsa",
            "-in",
            &d("sa.key"),
            "-pubout",
            "-out",
            &d("sa.pub"),
        ])?;
        std::fs::write(
            dir.join("audit-policy.yaml"),
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n- level: Metadata\n",
        )
        .map_err(io_err("write audit policy"))?;
        let admin_token = random_token();
        let mut tokens = format!("{admin_token},admin,admin,system:masters\n");
        if let Some(node) = &node {
            let name = &node.node_name;
            tokens += &format!(
                "{},system:node:{name},node-{name},system:nodes\n",
                component_token(&admin_token, "kubelet")
            );
            for (component, user) in COMPONENT_USERS {
                tokens += &format!(
                    "{},{user},{user}\n",
                    component_token(&admin_token, component)
                );
            }
        }
        std::fs::write(dir.join("tokens.csv"), tokens).map_err(io_err("write tokens.csv"))?;
        let netns = node.as_ref().map(|n| n.netns.clone());

        let etcd_ports = (free_port()?, free_port()?);
        let etcd = spawn_etcd(ctx, &dir, netns.as_deref(), etcd_ports)?;
        let mut cluster = Cluster {
            ctx: ctx.clone(),
            dir,
            address,
            node,
            port: free_port()?,
            etcd_ports,
            admin_token,
            apiserver: None,
            etcd,
            admin: None,
        };
        cluster.start_apiserver().await?;
        Ok(cluster)
    }

    /// Starts (or restarts) kube-apiserver on the same address and port and
    /// waits for `/readyz`.
    pub async fn start_apiserver(&mut self) -> Result<()> {
        let tb = testbed();
        let d = |f: &str| self.dir.join(f).to_string_lossy().into_owned();
        let addr = self.address.to_string();
        let mut args: Vec<String> = vec![
            format!("--etcd-servers=http://127.0.0.1:{}", self.etcd_ports.0),
            format!("--bind-address={addr}"),
            format!("--advertise-address={addr}"),
            format!("--secure-port={}", self.port),
            format!("--cert-dir={}", d("certs")),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            format!("--token-auth-file={}", d("tokens.csv")),
            format!("--service-account-issuer=https://{addr}:{}", self.port),
            format!("--service-account-key-file={}", d("sa.pub")),
            format!("--service-account-signing-key-file={}", d("sa.key")),
            "--allow-privileged=true".into(),
            "--enable-priority-and-fairness=false".into(),
            format!("--audit-policy-file={}", d("audit-policy.yaml")),
            format!("--audit-log-path={}", d("audit.log")),
            "--audit-log-mode=blocking".into(),
            "--v=1".into(),
        ];
        if self.node.is_some() {
            // A real node: kubelets are authorized as nodes, pods get projected
            // service-account tokens (the ServiceAccount admission plugin), the
            // `kubernetes` Service's endpoint is this address, and `kubectl
            // logs/exec` reach the kubelet by its InternalIP.
            args.extend([
                "--authorization-mode=Node,RBAC".into(),
                "--kubelet-preferred-address-types=InternalIP".into(),
            ]);
        } else {
            args.extend([
                "--authorization-mode=RBAC".into(),
                "--disable-admission-plugins=ServiceAccount".into(),
                // 1.37 refuses a loopback advertise address with the default
                // lease reconciler; there are no Endpoints consumers here.
                "--endpoint-reconciler-type=none".into(),
            ]);
        }
        let netns = self.node.as_ref().map(|n| n.netns.clone());
        let proc = Proc::spawn_with(
            &self.ctx,
            "kube-apiserver",
            &control_plane_prefix(netns.as_deref())?
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
            &tb.bin("kube-apiserver"),
            args,
            &[],
        )?;
        self.apiserver = Some(proc);
        let cert = self.dir.join("certs/apiserver.crt");
        for _ in 0..1200 {
            if cert.is_file() {
                break;
            }
            self.check_apiserver_alive()?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The client is built anew on every attempt: the certificate file can
        // be read while the apiserver is still writing it, and a client with a
        // truncated CA would fail every request (seen under load).
        let token = self.admin_token.clone();
        let admin = eventually("apiserver /readyz", Duration::from_secs(90), || {
            let yaml = self.kubeconfig_yaml(&token, "default");
            async move {
                let admin = client_from_kubeconfig(&yaml.ok()?).await.ok()?;
                let req = http::Request::get("/readyz").body(Vec::new()).ok()?;
                let ready = admin.request_text(req).await.ok()?;
                (ready.trim() == "ok").then_some(admin)
            }
        })
        .await
        .map_err(|e| self.check_apiserver_alive().err().unwrap_or(e))?;
        self.admin = Some(admin);
        Ok(())
    }

    fn check_apiserver_alive(&mut self) -> Result<()> {
        let Some(p) = self.apiserver.as_mut() else {
            return Err(Error::Setup("kube-apiserver is stopped".into()));
        };
        if p.is_running() {
            return Ok(());
        }
        Err(Error::Setup(format!(
            "kube-apiserver exited:\n{}",
            TestContext::tail(p.log(), 5)
        )))
    }

    /// Stops kube-apiserver (SIGTERM, then SIGKILL); etcd keeps the data.
    pub async fn stop_apiserver(&mut self) {
        if let Some(mut p) = self.apiserver.take() {
            p.terminate(Duration::from_secs(10)).await;
        }
    }

    /// Wipes etcd's data as a lost etcd member would: stops kube-apiserver and
    /// etcd, deletes etcd's data directory, and starts both again on the same
    /// ports, certificates and keys (so tokens signed before still verify,
    /// while every object, namespaces and ServiceAccounts included, is gone).
    pub async fn wipe_etcd(&mut self) -> Result<()> {
        self.stop_apiserver().await;
        self.etcd.terminate(Duration::from_secs(10)).await;
        std::fs::remove_dir_all(self.dir.join("etcd")).map_err(io_err("delete etcd's data"))?;
        let netns = self.node.as_ref().map(|n| n.netns.clone());
        self.etcd = spawn_etcd(&self.ctx, &self.dir, netns.as_deref(), self.etcd_ports)?;
        self.start_apiserver().await
    }

    /// Requests the apiserver completed for `user` (e.g.
    /// `system:serviceaccount:NS:geth-peer-sidecar`), from the audit log: one
    /// entry per request, a watch counting once. Returns (verb, resource, name).
    pub fn audited_requests(&self, user: &str) -> Vec<(String, String, String)> {
        let text = std::fs::read_to_string(self.dir.join("audit.log")).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["stage"] == "ResponseComplete" && e["user"]["username"] == user)
            .map(|e| {
                let s = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
                (
                    s(&e["verb"]),
                    s(&e["objectRef"]["resource"]),
                    s(&e["objectRef"]["name"]),
                )
            })
            .collect()
    }

    /// Watches the apiserver started for `user` (stage `ResponseStarted`, open
    /// or ended), as (resource, label selector): a long watch is in
    /// [`Cluster::audited_requests`] only once it ends.
    pub fn audited_watches(&self, user: &str) -> Vec<(String, String)> {
        let text = std::fs::read_to_string(self.dir.join("audit.log")).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| {
                e["stage"] == "ResponseStarted"
                    && e["verb"] == "watch"
                    && e["user"]["username"] == user
            })
            .map(|e| {
                let uri = e["requestURI"].as_str().unwrap_or_default();
                let selector = uri
                    .split(['?', '&'])
                    .find_map(|kv| kv.strip_prefix("labelSelector="))
                    .unwrap_or_default();
                (
                    e["objectRef"]["resource"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                    percent_decode(selector),
                )
            })
            .collect()
    }

    /// The complete audit events (stage `ResponseComplete`, level Metadata) of
    /// the requests the apiserver completed for `user`, in log order: besides
    /// what [`Cluster::audited_requests`] extracts, e.g. `responseStatus.code`
    /// and `userAgent`.
    pub fn audit_events(&self, user: &str) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.dir.join("audit.log")).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["stage"] == "ResponseComplete" && e["user"]["username"] == user)
            .collect()
    }

    /// The kube-apiserver's process id, while it runs (for CPU figures read
    /// from `/proc/<pid>/stat` by the benchmarks).
    pub fn apiserver_pid(&self) -> Option<u32> {
        self.apiserver.as_ref().map(Proc::pid)
    }

    /// etcd's process id (for CPU figures, as [`Cluster::apiserver_pid`]).
    pub fn etcd_pid(&self) -> u32 {
        self.etcd.pid()
    }

    /// The control plane's working directory (certificates, keys, tokens, audit log).
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// Writes a kubeconfig for a node component's identity (see
    /// [`NodeControlPlane`]) and returns its path.
    pub fn component_kubeconfig(&self, component: &str) -> Result<PathBuf> {
        let path = self.dir.join(format!("{component}.kubeconfig"));
        let yaml =
            self.kubeconfig_yaml(&component_token(&self.admin_token, component), "default")?;
        std::fs::write(&path, yaml).map_err(io_err("write component kubeconfig"))?;
        Ok(path)
    }

    /// The API server URL.
    pub fn server_url(&self) -> String {
        format!("https://{}:{}", self.address, self.port)
    }

    /// The apiserver's address.
    pub fn address(&self) -> IpAddr {
        IpAddr::V4(self.address)
    }

    /// A client with cluster-admin rights (for fixtures only; code under test
    /// never runs as admin).
    pub fn admin(&self) -> Client {
        self.admin.clone().expect("apiserver is running")
    }

    /// Writes a kubeconfig with cluster-admin rights (for tools such as kubectl
    /// in fixtures and manifest checks) and returns its path.
    ///
    /// # Panics
    /// When the CA certificate cannot be read or the file cannot be written.
    pub fn admin_kubeconfig(&self) -> PathBuf {
        let path = self.dir.join("admin.kubeconfig");
        let yaml = self
            .kubeconfig_yaml(&self.admin_token, "default")
            .expect("admin kubeconfig");
        std::fs::write(&path, yaml).expect("write admin kubeconfig");
        path
    }

    fn kubeconfig_yaml(&self, token: &str, namespace: &str) -> Result<String> {
        self.kubeconfig_yaml_for(&format!("token: {token}"), namespace)
    }

    /// A kubeconfig whose user is `user` (`token: ...` or `tokenFile: ...`).
    fn kubeconfig_yaml_for(&self, user: &str, namespace: &str) -> Result<String> {
        let ca = std::fs::read(self.dir.join("certs/apiserver.crt"))
            .map_err(io_err("read apiserver.crt"))?;
        let ca = base64::engine::general_purpose::STANDARD.encode(ca);
        Ok(format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n    certificate-authority-data: {ca}\nusers:\n- name: user\n  user:\n    {user}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: user\n    namespace: {namespace}\ncurrent-context: test\n",
            self.server_url()
        ))
    }

    /// A client that authenticates with `token` (e.g. a pod's own projected
    /// service-account token), `namespace` as its default.
    ///
    /// # Errors
    /// When the CA certificate cannot be read or the client cannot be built.
    pub async fn client_with_token(&self, token: &str, namespace: &str) -> Result<Client> {
        self.client_for(token, namespace).await
    }

    async fn client_for(&self, token: &str, namespace: &str) -> Result<Client> {
        client_from_kubeconfig(&self.kubeconfig_yaml(token, namespace)?).await
    }

    /// A fresh namespace with the project's ServiceAccount, Role and RoleBinding
    /// applied from `deploy/base/rbac.yaml`, a token minted for that account with
    /// the TokenRequest API, and a kubeconfig for it that reads the token from
    /// a file (as a pod's projected token is read: kube-rs re-reads it within a
    /// minute, so a re-minted token reaches running sidecars).
    pub async fn namespace(&self, hint: &str) -> Result<TestNamespace> {
        let short: String = hint
            .to_ascii_lowercase()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(30)
            .collect();
        let name = format!("{}-{}", short.trim_matches('-'), &random_token()[..6]);
        self.create_namespace(&name).await?;
        let token_file = self.ctx.path(&format!("token-{name}"));
        let (token, client) = self.mint_token(&name, &token_file).await?;
        let kubeconfig = self.ctx.path(&format!("kubeconfig-{name}"));
        let user = format!("tokenFile: {}", token_file.display());
        std::fs::write(&kubeconfig, self.kubeconfig_yaml_for(&user, &name)?)
            .map_err(io_err("write kubeconfig"))?;
        Ok(TestNamespace {
            name,
            kubeconfig,
            token,
            client,
            server_url: self.server_url(),
        })
    }

    /// Puts `ns` back as an operator restoring a cluster would, after the
    /// control plane lost it ([`Cluster::wipe_etcd`]): the namespace, the
    /// ServiceAccount, Role and RoleBinding again, and a new token (the
    /// ServiceAccount is a new object, so the old token no longer validates)
    /// in the kubeconfig's token file.
    pub async fn restore_namespace(&self, ns: &mut TestNamespace) -> Result<()> {
        self.create_namespace(&ns.name).await?;
        let token_file = self.ctx.path(&format!("token-{}", ns.name));
        let (token, client) = self.mint_token(&ns.name, &token_file).await?;
        ns.token = token;
        ns.client = client;
        Ok(())
    }

    async fn create_namespace(&self, name: &str) -> Result<()> {
        let admin = self.admin();
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(admin.clone())
            .create(&PostParams::default(), &ns)
            .await?;
        apply_rbac(&admin, name).await
    }

    /// Mints a token for the ServiceAccount of `name`, writes it to
    /// `token_file`, and waits until the RoleBinding is in force for it.
    async fn mint_token(
        &self,
        name: &str,
        token_file: &std::path::Path,
    ) -> Result<(String, Client)> {
        let sa = Api::<ServiceAccount>::namespaced(self.admin(), name);
        let tr = sa
            .create_token_request(
                SERVICE_ACCOUNT,
                &PostParams::default(),
                &TokenRequest {
                    spec: Some(TokenRequestSpec {
                        expiration_seconds: Some(3600),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            )
            .await?;
        let token = tr
            .status
            .and_then(|s| s.token)
            .ok_or_else(|| Error::Setup("TokenRequest returned no token".into()))?;
        std::fs::write(token_file, &token).map_err(io_err("write token file"))?;
        let client = self.client_for(&token, name).await?;
        // The RBAC authorizer caches: wait until the new binding is in force.
        let cms = Api::<ConfigMap>::namespaced(client.clone(), name);
        eventually("RoleBinding in force", Duration::from_secs(15), || {
            let cms = cms.clone();
            async move {
                cms.get_opt("geth-shared-static-nodes")
                    .await
                    .ok()
                    .map(|_| ())
            }
        })
        .await?;
        Ok((token, client))
    }
}

impl Cluster {
    /// Adds the rule deploy/overlays/leases adds (get, list, watch, create,
    /// update, delete on leases: the lease layout) to the sidecar's Role in
    /// `ns`, and waits until the service account may list leases.
    pub async fn grant_leases(&self, ns: &TestNamespace) -> Result<()> {
        self.add_role_rule(
            ns,
            serde_json::json!({
                "apiGroups": ["coordination.k8s.io"],
                "resources": ["leases"],
                "verbs": ["get", "list", "watch", "create", "update", "delete"],
            }),
        )
        .await?;
        listable::<k8s_openapi::api::coordination::v1::Lease>(ns, "the leases rule in force").await
    }

    /// Adds the rule deploy/overlays/pod-evidence adds (get, list, watch on
    /// pods: pod evidence) to the sidecar's Role in `ns`, and waits until the
    /// service account may list pods.
    pub async fn grant_pods(&self, ns: &TestNamespace) -> Result<()> {
        self.add_role_rule(
            ns,
            serde_json::json!({"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}),
        )
        .await?;
        listable::<k8s_openapi::api::core::v1::Pod>(ns, "the pods rule in force").await
    }

    async fn add_role_rule(&self, ns: &TestNamespace, rule: serde_json::Value) -> Result<()> {
        let roles: Api<Role> = Api::namespaced(self.admin(), &ns.name);
        let mut role = roles.get(SERVICE_ACCOUNT).await?;
        let rule =
            serde_json::from_value(rule).map_err(|e| Error::Setup(format!("a Role rule: {e}")))?;
        role.rules.get_or_insert_with(Vec::new).push(rule);
        roles
            .replace(SERVICE_ACCOUNT, &PostParams::default(), &role)
            .await?;
        Ok(())
    }
}

/// Waits until the service account of `ns` may list `K` (the RBAC
/// authorizer caches: a rule just added is in force a moment later).
async fn listable<K>(ns: &TestNamespace, what: &str) -> Result<()>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(ns.client.clone(), &ns.name);
    eventually(what, Duration::from_secs(15), || {
        let api = api.clone();
        async move { api.list(&Default::default()).await.ok().map(|_| ()) }
    })
    .await
}

/// A client (with its own connection pool) from kubeconfig YAML.
async fn client_from_kubeconfig(yaml: &str) -> Result<Client> {
    let kc = Kubeconfig::from_yaml(yaml).map_err(|e| Error::Setup(format!("kubeconfig: {e}")))?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| Error::Setup(format!("kubeconfig: {e}")))?;
    Ok(Client::try_from(config)?)
}

async fn apply_rbac(admin: &Client, ns: &str) -> Result<()> {
    let path = workspace_root().join("deploy/base/rbac.yaml");
    let text =
        std::fs::read_to_string(&path).map_err(io_err(format!("read {}", path.display())))?;
    let pp = PostParams::default();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value = serde_yaml::Value::deserialize(doc)
            .map_err(|e| Error::Setup(format!("{}: {e}", path.display())))?;
        let kind = value
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or_default()
            .to_owned();
        let bad = |e: serde_yaml::Error| Error::Setup(format!("{}: {kind}: {e}", path.display()));
        match kind.as_str() {
            "ServiceAccount" => {
                let o: ServiceAccount = serde_yaml::from_value(value).map_err(bad)?;
                Api::<ServiceAccount>::namespaced(admin.clone(), ns)
                    .create(&pp, &o)
                    .await?;
            }
            "Role" => {
                let o: Role = serde_yaml::from_value(value).map_err(bad)?;
                Api::<Role>::namespaced(admin.clone(), ns)
                    .create(&pp, &o)
                    .await?;
            }
            "RoleBinding" => {
                let mut o: RoleBinding = serde_yaml::from_value(value).map_err(bad)?;
                for s in o.subjects.iter_mut().flatten() {
                    s.namespace = Some(ns.to_owned());
                }
                Api::<RoleBinding>::namespaced(admin.clone(), ns)
                    .create(&pp, &o)
                    .await?;
            }
            other => {
                return Err(Error::Setup(format!(
                    "{}: unexpected kind {other:?}",
                    path.display()
                )));
            }
        }
    }
    Ok(())
}

use serde::Deserialize as _;

/// A namespace in a [`Cluster`] with the sidecar's service-account identity.
pub struct TestNamespace {
    /// The namespace name.
    pub name: String,
    /// A kubeconfig file for the service account (namespace set as default).
    pub kubeconfig: PathBuf,
    /// The service account's bearer token.
    pub token: String,
    /// A client authenticated as the service account.
    pub client: Client,
    server_url: String,
}

impl TestNamespace {
    /// The service account's username as the apiserver (and its audit log)
    /// names it: `system:serviceaccount:<ns>:geth-peer-sidecar`.
    pub fn service_account_user(&self) -> String {
        format!("system:serviceaccount:{}:{SERVICE_ACCOUNT}", self.name)
    }

    /// A new client for the service account with its own connection pool.
    pub async fn new_client(&self) -> Result<Client> {
        let yaml = std::fs::read_to_string(&self.kubeconfig).map_err(io_err("read kubeconfig"))?;
        client_from_kubeconfig(&yaml).await
    }

    /// The apiserver URL.
    pub fn server_url(&self) -> &str {
        &self.server_url
    }
}

/// Decodes `%XX` escapes (and `+` as a space) of a URL query value.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                if let Some(b) = s
                    .get(i + 1..i + 3)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    out.push(b);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
