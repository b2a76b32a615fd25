//! The real-node demo: a kubelet node, the Helm chart installed with the
//! locally assembled images, and a live table of pods and geth's own peers.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use integration_tests::{KubeNode, Release, TestContext};
use tokio::io::AsyncBufReadExt;

pub(crate) const HELP: &str = "commands: d N = delete pod N (it returns on a new IP) | \
k N = stop geth in pod N (the container restarts and forgets its peers) | s N = scale to N pods | q = quit";

/// Pods the demo can scale to (one volume each is prepared).
pub(crate) const MAX_NODES: usize = 9;
use integration_tests::CHART_STATEFULSET as STATEFULSET;

async fn table(r: &Release<'_>) -> String {
    let pods = r.pods().await.unwrap_or_default();
    let members = r.members().await.unwrap_or_default();
    let by_ip: BTreeMap<Ipv4Addr, String> = pods
        .iter()
        .filter_map(|p| Some((p.ip?, p.name.rsplit('-').next()?.to_owned())))
        .collect();
    let mut out = format!(
        "{:<26} {:<14} {:<6} {:<11} {}\n",
        "POD", "IP", "READY", "REGISTERED", "GETH PEERS (admin.peers)"
    );
    for p in &pods {
        let peers: Vec<String> = if p.ready {
            r.geth_peer_ips(&p.name)
                .unwrap_or_default()
                .iter()
                .map(|ip| by_ip.get(ip).cloned().unwrap_or_else(|| ip.to_string()))
                .collect()
        } else {
            Vec::new()
        };
        let full =
            p.ready && peers.len() + 1 == pods.len() && peers.iter().all(|p| !p.contains('.'));
        out.push_str(&format!(
            "{:<26} {:<14} {:<6} {:<11} {}{}\n",
            p.name,
            p.ip.map(|ip| ip.to_string()).unwrap_or_else(|| "-".into()),
            if p.deleting {
                "term"
            } else if p.ready {
                "yes"
            } else {
                "no"
            },
            if members.contains_key(&p.name) {
                "yes"
            } else {
                "no"
            },
            peers.join(","),
            if full { "  (all)" } else { "" }
        ));
    }
    out
}

async fn command(r: &Release<'_>, line: &str) -> Result<bool, String> {
    let mut parts = line.split_whitespace();
    let cmd = parts.next().unwrap_or_default();
    let n: Option<usize> = parts.next().and_then(|v| v.parse().ok());
    let pod = |n: Option<usize>| {
        n.map(|i| format!("{STATEFULSET}-{i}"))
            .ok_or("which pod? (its ordinal)")
    };
    match cmd {
        "" => {}
        "q" | "quit" => return Ok(false),
        "d" => {
            let p = pod(n)?;
            r.kubectl(&["delete", "pod", &p, "--wait=false"])
                .map_err(|e| e.to_string())?;
            println!("{p} deleted: the StatefulSet recreates it on a new IP");
        }
        "k" => {
            let p = pod(n)?;
            r.kubectl(&["exec", &p, "-c", "geth", "--", "kill", "1"])
                .map_err(|e| e.to_string())?;
            println!(
                "geth in {p} stopped: the kubelet restarts it, its sidecar re-applies every peer"
            );
        }
        "s" => {
            let n = n
                .filter(|n| (1..=MAX_NODES).contains(n))
                .ok_or("scale to 1..=9")?;
            r.kubectl(&[
                "scale",
                "statefulset",
                STATEFULSET,
                &format!("--replicas={n}"),
            ])
            .map_err(|e| e.to_string())?;
            println!("scaled to {n}");
        }
        _ => return Err(HELP.to_owned()),
    }
    Ok(true)
}

/// Runs the demo until `q`, Ctrl-C, or (with `once`) a full mesh.
pub(crate) async fn run(nodes: usize, once: bool) -> Result<(), String> {
    let ctx = TestContext::new("demo-node");
    println!("logs: {}", ctx.dir().display());
    println!(
        "starting a real node (etcd, kube-apiserver, controller-manager, scheduler, containerd, kubelet, kube-proxy)..."
    );
    let node = KubeNode::start(&ctx).await.map_err(|e| e.to_string())?;
    println!("node Ready after {:.1} s", node.ready_after().as_secs_f64());
    let release = Release::install_chart(
        &node,
        "demo",
        MAX_NODES,
        &["--set", &format!("replicas={nodes}")],
    )
    .await
    .map_err(|e| e.to_string())?;
    println!(
        "helm chart installed in namespace {}; kubectl --kubeconfig {} -n {} ...\n{HELP}",
        release.ns,
        node.kubeconfig().display(),
        release.ns
    );
    let started = std::time::Instant::now();
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut stdin_open = true;
    let mut last = String::new();
    loop {
        let t = table(&release).await;
        if t != last {
            println!("\n[{:>5.1}s]\n{t}", started.elapsed().as_secs_f64());
            last = t.clone();
        }
        let rows: Vec<&str> = t.lines().skip(1).collect();
        if once && rows.len() == nodes && rows.iter().all(|l| l.ends_with("(all)")) {
            println!("full mesh: every geth is connected to every other (admin.peers)");
            break;
        }
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            line = lines.next_line(), if stdin_open => match line {
                Ok(Some(l)) => match command(&release, l.trim()).await {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => println!("{e}"),
                },
                _ => stdin_open = false,
            },
            _ = tokio::time::sleep(Duration::from_millis(1000)) => {}
        }
    }
    println!("tearing down...");
    drop(release);
    drop(node);
    println!("done: every process stopped, cgroups, network namespace and bridge removed");
    Ok(())
}
