//! Re-mesh times on a pod range geth throttles (100.64.K.0/24) next to one it
//! does not (10.244.K.0/24); prints a table.
//!
//! geth accepts one inbound connection per IP per 30 s unless the IP is in its
//! LAN list; a sidecar probe of a member's geth port from 100.64/10 would make
//! that geth refuse the next dial for 30 s. For each range, on a 4-node mesh with
//! a probe every second: a geth restart (same IP), an IP move (pod replaced,
//! same key) and a cut-and-restore of one node's link long enough for geth to
//! drop its peers. Each figure is from the moment the node is back (IPC up, or
//! link up) until every geth lists every other in admin_peers.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    missing_docs
)]

use std::time::{Duration, Instant};

use integration_tests::{Mesh, MeshOptions, PodRange, eventually};

const LIMIT: Duration = Duration::from_secs(180);
/// geth's inbound history lasts 30 s: the initial dials must age out first.
const HISTORY: Duration = Duration::from_secs(31);

async fn measure(range: PodRange, rows: &mut Vec<(String, String)>) {
    let label = match range {
        PodRange::Private => "10.244.K.0/24",
        PodRange::SharedAddressSpace => "100.64.K.0/24",
    };
    let options = MeshOptions {
        range,
        ..MeshOptions::default()
    };
    let env = [("PROBE_INTERVAL", "1s")];
    let name = format!("bench-throttle-{range:?}").to_lowercase();
    let mut m = Mesh::start_with(&name, 4, &env, options).await.unwrap();
    let all: Vec<usize> = (0..4).collect();
    m.wait_full_mesh(&all, LIMIT).await.unwrap();
    tokio::time::sleep(HISTORY).await;

    // geth restart, same IP.
    m.net.node_mut(3).stop().await;
    eventually("node 0 to drop node 3", LIMIT, || async {
        (m.metric(0, "geth_peer_sidecar_missing_peers").await == Some(1.0)).then_some(())
    })
    .await
    .unwrap();
    // Let the others probe the stopped node for a few seconds.
    tokio::time::sleep(Duration::from_secs(3)).await;
    m.net.node_mut(3).start().await.unwrap();
    let t0 = Instant::now();
    m.wait_full_mesh(&all, LIMIT).await.unwrap();
    rows.push((
        format!("{label}: re-mesh after a geth restart"),
        format!("{:.2} s", t0.elapsed().as_secs_f64()),
    ));
    tokio::time::sleep(HISTORY).await;

    // IP move: pod replaced with a new IP, same key, new sidecar.
    let new_ip = m.net.fresh_ip();
    m.take_sidecar(3).unwrap().kill().await;
    m.net.node_mut(3).restart_on_new_ip(new_ip).await.unwrap();
    let t0 = Instant::now();
    m.start_sidecar(3).unwrap();
    m.wait_full_mesh(&all, LIMIT).await.unwrap();
    rows.push((
        format!("{label}: re-mesh after an IP move"),
        format!("{:.2} s", t0.elapsed().as_secs_f64()),
    ));
    tokio::time::sleep(HISTORY).await;

    // Cut-and-restore: the link is down until geth drops the peer.
    m.net.node(3).cut().unwrap();
    let t_cut = Instant::now();
    eventually("node 0's geth to drop node 3", LIMIT, || async {
        let id = m.net.node(3).node_id();
        let peers = m.net.node(0).peer_ids().await.ok()?;
        (!peers.contains(&id)).then_some(())
    })
    .await
    .unwrap();
    let dropped = t_cut.elapsed();
    m.net.node(3).restore().unwrap();
    let t0 = Instant::now();
    m.wait_full_mesh(&all, LIMIT).await.unwrap();
    rows.push((
        format!(
            "{label}: re-mesh after a cut-and-restore (geth dropped after {:.0} s)",
            dropped.as_secs_f64()
        ),
        format!("{:.2} s", t0.elapsed().as_secs_f64()),
    ));
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut rows = Vec::new();
    rt.block_on(async {
        measure(PodRange::Private, &mut rows).await;
        measure(PodRange::SharedAddressSpace, &mut rows).await;
    });
    let w = rows.iter().map(|r| r.0.len()).max().unwrap_or(10);
    println!("\n{:<w$}  value", "measure");
    println!("{}", "-".repeat(w + 12));
    for (what, value) in rows {
        println!("{what:<w$}  {value}");
    }
}
