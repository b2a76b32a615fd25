//! Embedding the runtime: three sidecars run in-process, each next to an
//! in-memory geth (`geth_ipc::fake`), on one in-memory registry with the
//! ConfigMap semantics (`peer_registry::MemoryRegistry`). It waits until
//! every geth is connected to both others (geth's own view, `admin_peers`),
//! prints each sidecar's summary metrics, then shuts them down: each
//! deregisters, and the registry ends empty.
//!
//! `cargo run -p sidecar-runtime --example embed`

#![allow(clippy::print_stdout)] // an example program: printing is its output

use std::sync::Arc;
use std::time::Duration;

use geth_ipc::fake::{FakeNet, test_enode};
use geth_ipc::{AdminApi, Host};
use peer_registry::{MemoryRegistry, MemoryStore, PeerRegistry};
use sidecar_runtime::{AdvertiseMode, Settings, Sidecar};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let net = FakeNet::new();
    let store = MemoryStore::new();
    let mut gethes = Vec::new();
    let mut stops = Vec::new();
    let mut tasks = Vec::new();
    for i in 1..=3u8 {
        let ip = std::net::IpAddr::from([10, 0, 0, i]);
        let geth = net.join(test_enode(u64::from(i), Host::Ip(ip), 30303)?);
        gethes.push(geth.clone());
        let mut settings = Settings::new(format!("geth-{i}"), AdvertiseMode::PodIp(ip));
        settings.pod_ip = Some(ip.to_string());
        let sidecar = Sidecar::new(
            Arc::new(geth),
            Arc::new(MemoryRegistry::on(&store)),
            settings,
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        stops.push(stop);
        tasks.push(tokio::spawn(sidecar.run_until(async {
            let _ = stopped.await;
        })));
    }
    // Poll geth's own view until the mesh is full, with a deadline.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut full = true;
        for g in &gethes {
            full &= g.peers().await?.len() == gethes.len() - 1;
        }
        if full {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            return Err("the mesh did not form within 10 s".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let members = MemoryRegistry::on(&store).snapshot().await?.members.len();
    println!("full mesh: {} nodes, {members} registered", gethes.len());
    for stop in stops {
        let _ = stop.send(());
    }
    for task in tasks {
        task.await?;
    }
    let left = MemoryRegistry::on(&store).snapshot().await?.members.len();
    println!("after shutdown: {left} registered");
    if left != 0 {
        return Err(format!("{left} members left after every sidecar deregistered").into());
    }
    Ok(())
}
