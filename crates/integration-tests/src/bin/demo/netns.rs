//! The network-namespace demo (`--netns`): the test-bed apiserver, N geth
//! nodes each in its own network namespace and N sidecars run as pods would.

use std::collections::BTreeSet;
use std::time::Duration;

use integration_tests::Mesh;
use tokio::io::AsyncBufReadExt;

pub(crate) const HELP: &str = "commands: k N = kill -9 geth N and restart it | m N = move node N to a new IP \
(pod replaced, same key) | c N / r N = cut / restore node N's network | a = add a node | q = quit";

async fn table(m: &Mesh) -> String {
    let registered = m.registered_pods().await;
    let ids: Vec<String> = m.net.nodes().iter().map(|n| n.node_id()).collect();
    let mut out = format!(
        "{:<8} {:<15} {:<9} {:<11} {:<6} {}\n",
        "POD", "IP", "NODE", "REGISTERED", "READY", "CONNECTED TO"
    );
    for (i, node) in m.net.nodes().iter().enumerate() {
        let peers: BTreeSet<String> = node
            .peer_ids()
            .await
            .unwrap_or_default()
            .into_iter()
            .collect();
        let conn: Vec<String> = ids
            .iter()
            .enumerate()
            .filter(|(j, id)| *j != i && peers.contains(*id))
            .map(|(j, _)| j.to_string())
            .collect();
        let ready = match m.sidecars.get(i).and_then(Option::as_ref) {
            Some(sc) => match sc.get("/readyz").await {
                Ok((200, _)) => "yes",
                Ok(_) => "no",
                Err(_) => "down",
            },
            None => "-",
        };
        let full = conn.len() + 1 == ids.len();
        out.push_str(&format!(
            "{:<8} {:<15} {:<9} {:<11} {:<6} {}{}\n",
            node.name(),
            node.ip().to_string(),
            &node.node_id()[..8.min(node.node_id().len())],
            if registered.contains(node.name()) {
                "yes"
            } else {
                "no"
            },
            ready,
            conn.join(","),
            if full { "  (all)" } else { "" }
        ));
    }
    out
}

async fn command(m: &mut Mesh, line: &str) -> Result<bool, String> {
    let mut parts = line.split_whitespace();
    let cmd = parts.next().unwrap_or_default();
    let n: Option<usize> = parts.next().and_then(|v| v.parse().ok());
    let node = |n: Option<usize>| {
        n.filter(|&i| i < m.net.nodes().len())
            .ok_or("which node? (index from the table)")
    };
    match cmd {
        "" => {}
        "q" | "quit" => return Ok(false),
        "k" => {
            let i = node(n)?;
            m.net.node_mut(i).kill().await;
            m.net.node_mut(i).start().await.map_err(|e| e.to_string())?;
            println!("geth-{i} killed and restarted: its sidecar re-applies every peer");
        }
        "m" => {
            let i = node(n)?;
            let ip = m.net.fresh_ip();
            if let Some(sc) = m.take_sidecar(i) {
                sc.kill().await;
            }
            m.net
                .node_mut(i)
                .restart_on_new_ip(ip)
                .await
                .map_err(|e| e.to_string())?;
            m.start_sidecar(i).map_err(|e| e.to_string())?;
            println!("geth-{i} moved to {ip} with its old key");
        }
        "c" => {
            let i = node(n)?;
            m.net.node(i).cut().map_err(|e| e.to_string())?;
            println!("geth-{i} cut off");
        }
        "r" => {
            let i = node(n)?;
            m.net.node(i).restore().map_err(|e| e.to_string())?;
            println!("geth-{i} network restored");
        }
        "a" => {
            let idx = m
                .add_nodes(vec![integration_tests::NodeSpec::default()])
                .await
                .map_err(|e| e.to_string())?;
            println!("added geth-{}", idx[0]);
        }
        _ => return Err(HELP.to_owned()),
    }
    Ok(true)
}

/// Runs the demo until `q`, Ctrl-C, or (with `once`) a full mesh.
pub(crate) async fn run(nodes: usize, once: bool) {
    println!("starting apiserver, {nodes} geth nodes and {nodes} sidecars...");
    let mut m = Mesh::start("demo", nodes, &[("LOGGING", "INFO")])
        .await
        .expect("start the demo mesh");
    println!("logs: {}\n{HELP}", m.ctx.dir().display());
    let started = std::time::Instant::now();
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut stdin_open = true;
    let mut last = String::new();
    // One listener for the whole run: a Ctrl-C pressed while the table is
    // being read (most of the time) is not lost.
    let mut ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
    loop {
        let t = table(&m).await;
        if t != last {
            println!("\n[{:>5.1}s]\n{t}", started.elapsed().as_secs_f64());
            last = t.clone();
        }
        if once && t.lines().skip(1).all(|l| l.ends_with("(all)")) {
            println!("full mesh: every node is connected to every other");
            break;
        }
        tokio::select! {
            _ = &mut ctrl_c => break,
            line = lines.next_line(), if stdin_open => match line {
                Ok(Some(l)) => match command(&mut m, l.trim()).await {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => println!("{e}"),
                },
                _ => stdin_open = false,
            },
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
    println!("tearing down...");
    drop(m);
    println!("done: every process stopped, namespaces and bridge removed");
}
