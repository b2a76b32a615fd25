//! Admin-call latency benchmark on the real test bed (issue 3); prints one table.
//!
//! Two geth nodes, each in its own network namespace; node 0 also serves the
//! admin API over HTTP and WS. Node 0 is connected to node 1 first (addPeer,
//! then wait until the peer is eth-ready), so `admin_peers` returns one peer.
//!
//! Then, against node 0:
//! - `geth_ipc::GethClient` over IPC, HTTP and WS: for each transport one client
//!   (connected once), 50 warm-up calls, then 1000 sequential `admin_nodeInfo`
//!   calls and 1000 sequential `admin_peers` calls, each timed from the call to
//!   the typed (deserialized) result;
//! - `geth attach --exec 'admin.nodeInfo' <ipc>` (and `admin.peers`), one process
//!   per call, as a sidecar that shells out to geth's CLI does: 3 warm-up runs,
//!   then 30 timed runs of each, from spawn to exit with the output collected.
//!
//! The runtime is tokio's current-thread runtime, as in the sidecar. Every
//! answer is checked (node id, one peer; the CLI's exit status and output)
//! outside the timed section. Figures are in µs: p50 / p99 (nearest rank),
//! max, mean; the last column is the p50 relative to the IPC client's p50 for
//! the same method.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    missing_docs
)]

use std::future::Future;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use geth_ipc::{AdminApi, ClientOptions, Endpoint, Enode, GethClient};
use integration_tests::{Bridge, GethNet, NodeSpec, TestContext, eventually, testbed};

const CLIENT_WARMUP: usize = 50;
const CLIENT_CALLS: usize = 1000;
const CLI_WARMUP: usize = 3;
const CLI_CALLS: usize = 30;

/// One line of the table.
struct Row {
    how: String,
    method: &'static str,
    samples: Vec<Duration>,
}

impl Row {
    fn micros(&self) -> Vec<f64> {
        let mut v: Vec<f64> = self.samples.iter().map(|d| d.as_secs_f64() * 1e6).collect();
        v.sort_by(f64::total_cmp);
        v
    }

    /// Nearest-rank percentile.
    fn pct(&self, p: f64) -> f64 {
        let v = self.micros();
        let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
        v[rank.clamp(1, v.len()) - 1]
    }

    fn max(&self) -> f64 {
        self.micros().last().copied().unwrap_or(0.0)
    }

    fn mean(&self) -> f64 {
        let v = self.micros();
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// Times `calls` sequential calls of `f` after `warmup` untimed ones; `check`
/// validates every answer outside the timed section.
async fn time_calls<T, F, Fut>(
    warmup: usize,
    calls: usize,
    mut f: F,
    check: impl Fn(&T),
) -> Vec<Duration>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = T>,
{
    for _ in 0..warmup {
        check(&f().await);
    }
    let mut samples = Vec::with_capacity(calls);
    for _ in 0..calls {
        let t0 = Instant::now();
        let out = f().await;
        samples.push(t0.elapsed());
        check(&out);
    }
    samples
}

/// Times the typed client's two calls over one endpoint.
async fn bench_client(
    how: &str,
    endpoint: Endpoint,
    own_id: &str,
    peer_id: &str,
    rows: &mut Vec<Row>,
) {
    let client = GethClient::connect(endpoint, ClientOptions::default())
        .await
        .unwrap();
    let samples = time_calls(
        CLIENT_WARMUP,
        CLIENT_CALLS,
        || client.node_info(),
        |r| assert_eq!(r.as_ref().unwrap().id.to_string(), own_id),
    )
    .await;
    rows.push(Row {
        how: how.to_owned(),
        method: "admin_nodeInfo",
        samples,
    });
    let samples = time_calls(
        CLIENT_WARMUP,
        CLIENT_CALLS,
        || client.peers(),
        |r| {
            let peers = r.as_ref().unwrap();
            assert_eq!(peers.len(), 1);
            assert_eq!(peers[0].id.to_string(), peer_id);
        },
    )
    .await;
    rows.push(Row {
        how: how.to_owned(),
        method: "admin_peers",
        samples,
    });
    assert_eq!(
        client.connection_generation(),
        1,
        "one connection for all calls"
    );
}

/// Times `geth attach --exec <expr> <ipc>`, one process per call.
async fn bench_cli(
    ipc: &Path,
    expr: &str,
    method: &'static str,
    expect: &str,
    rows: &mut Vec<Row>,
) {
    let geth = testbed().bin("geth");
    let samples = time_calls(
        CLI_WARMUP,
        CLI_CALLS,
        || async {
            Command::new(&geth)
                .arg("attach")
                .arg("--exec")
                .arg(expr)
                .arg(ipc)
                .output()
                .unwrap()
        },
        |out| {
            assert!(
                out.status.success(),
                "geth attach failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(stdout.contains(expect), "{expr}: {stdout}");
        },
    )
    .await;
    rows.push(Row {
        how: "geth attach --exec (process per call)".into(),
        method,
        samples,
    });
}

fn print_table(rows: &[Row]) {
    let base = |method: &str| {
        rows.iter()
            .find(|r| r.method == method && r.how == "GethClient IPC")
            .map_or(f64::NAN, |r| r.pct(50.0))
    };
    println!();
    println!(
        "| {:<38} | {:<14} | {:>5} | {:>9} | {:>9} | {:>9} | {:>9} | {:>9} |",
        "how", "method", "calls", "p50 µs", "p99 µs", "max µs", "mean µs", "p50 / IPC"
    );
    println!(
        "|{:-<40}|{:-<16}|{:-<7}|{:-<11}|{:-<11}|{:-<11}|{:-<11}|{:-<11}|",
        "", "", "", "", "", "", "", ""
    );
    for r in rows {
        println!(
            "| {:<38} | {:<14} | {:>5} | {:>9.0} | {:>9.0} | {:>9.0} | {:>9.0} | {:>8.1}x |",
            r.how,
            r.method,
            r.samples.len(),
            r.pct(50.0),
            r.pct(99.0),
            r.max(),
            r.mean(),
            r.pct(50.0) / base(r.method)
        );
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let rows = rt.block_on(async {
        let ctx = TestContext::new("ipc-bench");
        let bridge = Arc::new(Bridge::create().unwrap());
        let mut net = GethNet::new(&ctx, bridge);
        net.add_nodes(vec![
            NodeSpec {
                http_ws: true,
                ..NodeSpec::default()
            },
            NodeSpec::default(),
        ])
        .await
        .unwrap();
        let (a, b) = (net.node(0), net.node(1));
        let own_id = a.node_id();
        let other: Enode = b.enode().parse().unwrap();
        let peer_id = other.node_id().to_string();
        let ipc = a.ipc_path().to_path_buf();

        // Connect node 0 to node 1 and wait until the peer is eth-ready, so the
        // peers answer is stable (one peer, handshake done) during the runs.
        let setup = GethClient::connect(Endpoint::Ipc(ipc.clone()), ClientOptions::default())
            .await
            .unwrap();
        assert!(setup.add_peer(&other).await.unwrap());
        eventually(
            "node 0 peered with node 1",
            Duration::from_secs(60),
            || async {
                let peers = setup.peers().await.ok()?;
                (peers.len() == 1 && peers[0].id == other.node_id() && peers[0].eth_ready())
                    .then_some(())
            },
        )
        .await
        .unwrap();
        drop(setup);

        println!(
            "geth {}; load average before: {}",
            testbed().geth_version,
            std::fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .trim()
        );

        let mut rows = Vec::new();
        bench_client(
            "GethClient IPC",
            Endpoint::Ipc(ipc.clone()),
            &own_id,
            &peer_id,
            &mut rows,
        )
        .await;
        bench_client(
            "GethClient HTTP",
            Endpoint::Http(a.http_url()),
            &own_id,
            &peer_id,
            &mut rows,
        )
        .await;
        bench_client(
            "GethClient WS",
            Endpoint::Ws(a.ws_url()),
            &own_id,
            &peer_id,
            &mut rows,
        )
        .await;
        bench_cli(&ipc, "admin.nodeInfo", "admin_nodeInfo", &own_id, &mut rows).await;
        bench_cli(&ipc, "admin.peers", "admin_peers", &peer_id, &mut rows).await;

        println!(
            "load average after: {}",
            std::fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .trim()
        );
        // Keep the nodes alive until every run is done.
        assert!(net.node_mut(0).is_running() && net.node_mut(1).is_running());
        rows
    });
    print_table(&rows);
}
