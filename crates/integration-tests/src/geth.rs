//! Real geth nodes, each in its own network namespace with its own IP.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

use crate::{
    Bridge, Error, Netns, Proc, Result, TestContext, cpu_time, eventually, io_err, ipc_call,
    testbed,
};

/// The p2p port every node listens on (each node has its own IP).
pub const P2P_PORT: u16 = 30303;
/// geth's HTTP JSON-RPC port, when [`NodeSpec::http_ws`] is set.
pub const HTTP_PORT: u16 = 8545;
/// geth's WebSocket JSON-RPC port, when [`NodeSpec::http_ws`] is set.
pub const WS_PORT: u16 = 8546;

/// How to run one node.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    /// Chain id of the genesis (nodes on different chain ids cannot peer).
    pub chain_id: u64,
    /// Also serve the admin API over HTTP and WS on the node's IP.
    pub http_ws: bool,
    /// `--maxpeers`.
    pub maxpeers: u32,
    /// `--verbosity` (4 logs e.g. geth's refusals of inbound connections).
    pub verbosity: u8,
    /// Which geth build runs the node: a name of [`crate::Testbed::geth_matrix`]
    /// (`geth-v1.16.9`, `op-geth-v1.101702.3`), `None` for the default `geth`.
    pub geth: Option<String>,
}

impl NodeSpec {
    /// The default spec, run by the geth build `name` (see [`NodeSpec::geth`]).
    pub fn with_geth(name: &str) -> Self {
        Self {
            geth: Some(name.to_owned()),
            ..Self::default()
        }
    }

    /// The geth binary this node runs (panics when it is not provisioned).
    pub fn geth_bin(&self) -> PathBuf {
        testbed().geth_bin(self.geth.as_deref().unwrap_or("geth"))
    }
}

impl Default for NodeSpec {
    fn default() -> Self {
        Self {
            chain_id: 1337,
            http_ws: false,
            maxpeers: 50,
            verbosity: 3,
            geth: None,
        }
    }
}

/// The genesis of the test chains (post-merge from block 0, no allocations).
pub(crate) fn genesis(chain_id: u64) -> Value {
    json!({
        "config": {
            "chainId": chain_id, "homesteadBlock": 0, "eip150Block": 0, "eip155Block": 0,
            "eip158Block": 0, "byzantiumBlock": 0, "constantinopleBlock": 0,
            "petersburgBlock": 0, "istanbulBlock": 0, "berlinBlock": 0, "londonBlock": 0,
            "mergeNetsplitBlock": 0, "shanghaiTime": 0, "terminalTotalDifficulty": 0
        },
        "difficulty": "0x0",
        "gasLimit": "0x1c9c380",
        "alloc": {}
    })
}

/// A set of geth nodes on one [`Bridge`].
pub struct GethNet {
    ctx: TestContext,
    bridge: Arc<Bridge>,
    nodes: Vec<GethNode>,
    next_ip: AtomicU8,
}

impl GethNet {
    /// An empty network on `bridge`.
    pub fn new(ctx: &TestContext, bridge: Arc<Bridge>) -> Self {
        Self {
            ctx: ctx.clone(),
            bridge,
            nodes: Vec::new(),
            next_ip: AtomicU8::new(10),
        }
    }

    /// Starts `n` default nodes concurrently and waits until each IPC answers.
    pub async fn start(ctx: &TestContext, bridge: Arc<Bridge>, n: usize) -> Result<Self> {
        let mut net = Self::new(ctx, bridge);
        net.add_nodes(vec![NodeSpec::default(); n]).await?;
        Ok(net)
    }

    /// Starts one default node per geth build in `gethes` (names of
    /// [`crate::Testbed::geth_matrix`]), concurrently, and waits until each IPC answers.
    pub async fn start_with(
        ctx: &TestContext,
        bridge: Arc<Bridge>,
        gethes: &[&str],
    ) -> Result<Self> {
        let mut net = Self::new(ctx, bridge);
        net.add_nodes(gethes.iter().map(|g| NodeSpec::with_geth(g)).collect())
            .await?;
        Ok(net)
    }

    /// An unused address on the bridge.
    pub fn fresh_ip(&self) -> Ipv4Addr {
        self.bridge.ip(self.next_ip.fetch_add(1, Ordering::Relaxed))
    }

    /// Adds and starts nodes; returns their indices.
    pub async fn add_nodes(&mut self, specs: Vec<NodeSpec>) -> Result<Vec<usize>> {
        let first = self.nodes.len();
        for spec in specs {
            let index = self.nodes.len();
            let ip = self.fresh_ip();
            let node = GethNode::create(&self.ctx, &self.bridge, index, ip, spec)?;
            self.nodes.push(node);
        }
        let range = first..self.nodes.len();
        for node in &mut self.nodes[range.clone()] {
            node.spawn()?;
        }
        futures::future::try_join_all(self.nodes[range.clone()].iter_mut().map(|n| n.wait_ready()))
            .await?;
        Ok(range.collect())
    }

    /// Waits until the running geth processes are done with their start-up
    /// work, and returns how long that took.
    ///
    /// geth's IPC answers within a fraction of a second, but every start then
    /// initialises its KZG library in the background: 2 to 3 s of CPU (measured
    /// with geth's pprof: gnark-crypto's BLS12-381 precomputation). N nodes
    /// started together keep this machine's two cores busy for about 1.4·N s,
    /// and a benchmark that starts the sidecars before then measures that load.
    /// Settled means the nodes together use less than 1 % of a core each
    /// (idle geth uses about 0.3 %) over a 0.5 s window.
    pub async fn wait_settled(&self, timeout: Duration) -> Result<Duration> {
        const WINDOW: Duration = Duration::from_millis(500);
        let started = tokio::time::Instant::now();
        let pids: Vec<u32> = self.nodes.iter().filter_map(GethNode::pid).collect();
        // The CPU the nodes have used together.
        let used = || -> Duration { pids.iter().filter_map(|&pid| cpu_time(pid)).sum() };
        let quiet = WINDOW.mul_f64(0.01 * pids.len() as f64);
        let mut before = used();
        loop {
            // The measurement window of a poll with a deadline.
            tokio::time::sleep(WINDOW).await;
            let now = used();
            if now.saturating_sub(before) < quiet {
                return Ok(started.elapsed());
            }
            if started.elapsed() >= timeout {
                return Err(Error::Timeout {
                    what: format!("{} geth nodes to finish starting up", pids.len()),
                    after: timeout,
                });
            }
            before = now;
        }
    }

    /// The nodes.
    pub fn nodes(&self) -> &[GethNode] {
        &self.nodes
    }

    /// One node.
    pub fn node(&self, i: usize) -> &GethNode {
        &self.nodes[i]
    }

    /// One node, mutably (to stop, restart, move it).
    pub fn node_mut(&mut self, i: usize) -> &mut GethNode {
        &mut self.nodes[i]
    }

    /// Removes a node: stops geth and deletes its namespace.
    pub async fn remove_node(&mut self, i: usize) -> GethNode {
        let mut node = self.nodes.remove(i);
        node.stop().await;
        node
    }

    /// The bridge the nodes are on.
    pub fn bridge(&self) -> &Arc<Bridge> {
        &self.bridge
    }
}

/// One geth node: its own network namespace, IP, datadir (hence node key) and IPC socket.
pub struct GethNode {
    ctx: TestContext,
    name: String,
    netns: Netns,
    datadir: PathBuf,
    ipc: PathBuf,
    spec: NodeSpec,
    proc: Option<Proc>,
    starts: u32,
    info: Option<Value>,
}

impl GethNode {
    fn create(
        ctx: &TestContext,
        bridge: &Bridge,
        index: usize,
        ip: Ipv4Addr,
        spec: NodeSpec,
    ) -> Result<Self> {
        let name = format!("geth-{index}");
        let netns = bridge.netns(&format!("n{index}"), ip)?;
        let datadir = ctx.path(&format!("{name}/data"));
        let genesis_path = ctx.path(&format!("genesis-{}.json", spec.chain_id));
        if !genesis_path.exists() {
            std::fs::write(&genesis_path, genesis(spec.chain_id).to_string())
                .map_err(io_err("write genesis"))?;
        }
        let out = std::process::Command::new(spec.geth_bin())
            .arg("--datadir")
            .arg(&datadir)
            .arg("init")
            .arg(&genesis_path)
            .output()
            .map_err(io_err("geth init"))?;
        if !out.status.success() {
            return Err(Error::Setup(format!(
                "geth init failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        let ipc = ctx.path(&format!("{name}/geth.ipc"));
        Ok(Self {
            ctx: ctx.clone(),
            name,
            netns,
            datadir,
            ipc,
            spec,
            proc: None,
            starts: 0,
            info: None,
        })
    }

    /// Starts geth without waiting for its IPC (a benchmark times the socket
    /// itself); [`GethNode::wait_ready`] then reads its node info again.
    pub fn spawn(&mut self) -> Result<()> {
        let ip = self.netns.ip();
        let mut args: Vec<String> = vec![
            "--datadir".into(),
            self.datadir.to_string_lossy().into_owned(),
            "--networkid".into(),
            self.spec.chain_id.to_string(),
            "--syncmode".into(),
            "full".into(),
            "--cache".into(),
            "16".into(),
            "--nodiscover".into(),
            "--nat".into(),
            format!("extip:{ip}"),
            "--port".into(),
            P2P_PORT.to_string(),
            "--authrpc.addr".into(),
            "127.0.0.1".into(),
            "--authrpc.port".into(),
            "8551".into(),
            "--ipcpath".into(),
            self.ipc.to_string_lossy().into_owned(),
            "--maxpeers".into(),
            self.spec.maxpeers.to_string(),
            "--verbosity".into(),
            self.spec.verbosity.to_string(),
        ];
        if self.spec.http_ws {
            args.extend(
                [
                    "--http",
                    "--http.addr",
                    "0.0.0.0",
                    "--http.port",
                    "8545",
                    "--http.api",
                    "admin",
                    "--ws",
                    "--ws.addr",
                    "0.0.0.0",
                    "--ws.port",
                    "8546",
                    "--ws.api",
                    "admin",
                ]
                .map(String::from),
            );
        }
        let _ = std::fs::remove_file(&self.ipc);
        self.starts += 1;
        let label = format!("{}.{}", self.name, self.starts);
        self.proc = Some(Proc::spawn(
            &self.ctx,
            &label,
            Some(self.netns.name()),
            &self.spec.geth_bin(),
            &args,
            &[],
        )?);
        self.info = None;
        Ok(())
    }

    /// Waits until geth's IPC answers `admin_nodeInfo` and keeps that info
    /// (its enode and node id).
    pub async fn wait_ready(&mut self) -> Result<()> {
        let ipc = self.ipc.clone();
        let info = eventually(
            &format!("{} IPC to answer", self.name),
            Duration::from_secs(60),
            || {
                let ipc = ipc.clone();
                async move { ipc_call(&ipc, "admin_nodeInfo", json!([])).await.ok() }
            },
        )
        .await?;
        self.info = Some(info);
        Ok(())
    }

    /// Starts a stopped node (same datadir, same key) and waits for its IPC.
    pub async fn start(&mut self) -> Result<()> {
        self.spawn()?;
        self.wait_ready().await
    }

    /// SIGTERM and wait (SIGKILL after 20 s).
    pub async fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.terminate(Duration::from_secs(20)).await;
        }
    }

    /// `kill -9`.
    pub async fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill().await;
        }
    }

    /// Freezes geth (SIGSTOP): its sockets stay open but nothing answers, like a
    /// geth that hangs (`kill` still ends it).
    pub fn freeze(&self) {
        if let Some(p) = &self.proc {
            p.signal(nix::sys::signal::Signal::SIGSTOP);
        }
    }

    /// Thaws a frozen geth (SIGCONT).
    pub fn resume(&self) {
        if let Some(p) = &self.proc {
            p.signal(nix::sys::signal::Signal::SIGCONT);
        }
    }

    /// Stop (SIGTERM) then start again.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await;
        self.start().await
    }

    /// Stops geth, moves the namespace to `new_ip`, starts geth again with the
    /// same datadir (same node key) advertising the new address.
    pub async fn restart_on_new_ip(&mut self, new_ip: Ipv4Addr) -> Result<()> {
        self.stop().await;
        self.netns.set_ip(new_ip)?;
        self.start().await
    }

    /// Cuts the node's network link.
    pub fn cut(&self) -> Result<()> {
        self.netns.cut()
    }

    /// Restores the node's network link.
    pub fn restore(&self) -> Result<()> {
        self.netns.restore()
    }

    /// The node's name (`geth-<index>`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The IPC socket path.
    pub fn ipc_path(&self) -> &Path {
        &self.ipc
    }

    /// The node's current IP.
    pub fn ip(&self) -> Ipv4Addr {
        self.netns.ip()
    }

    /// The node's network namespace (run its sidecar there).
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// The datadir.
    pub fn datadir(&self) -> &Path {
        &self.datadir
    }

    /// The spec it runs with.
    pub fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    /// The node's enode as geth reported it at the last start.
    pub fn enode(&self) -> String {
        self.info_field("enode")
    }

    /// The node id (64 hex) as geth reported it.
    pub fn node_id(&self) -> String {
        self.info_field("id")
    }

    fn info_field(&self, key: &str) -> String {
        self.info
            .as_ref()
            .and_then(|i| i.get(key))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    }

    /// The HTTP endpoint (`http://ip:8545`), when enabled.
    pub fn http_url(&self) -> String {
        format!("http://{}:{HTTP_PORT}", self.ip())
    }

    /// The WebSocket endpoint (`ws://ip:8546`), when enabled.
    pub fn ws_url(&self) -> String {
        format!("ws://{}:{WS_PORT}", self.ip())
    }

    /// True while geth runs.
    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(Proc::is_running)
    }

    /// Node ids of the peers geth reports (`admin_peers`), over raw IPC.
    pub async fn peer_ids(&self) -> Result<Vec<String>> {
        let peers = ipc_call(&self.ipc, "admin_peers", json!([])).await?;
        Ok(peers
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|p| p.get("id").and_then(Value::as_str).map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// The geth process id, while it runs (for CPU figures).
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// The log file of the current (or last) geth process.
    pub fn log(&self) -> Option<&Path> {
        self.proc.as_ref().map(Proc::log)
    }
}
