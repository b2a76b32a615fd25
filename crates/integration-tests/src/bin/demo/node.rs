//! The real-node demo: a kubelet node, the Helm chart installed with the
//! locally assembled images, and a live table of pods and geth's own peers.

use std::time::Duration;

use integration_tests::demo::{self, Command};
use integration_tests::{KubeNode, Release, TestContext};
use tokio::io::AsyncBufReadExt;

pub(crate) use integration_tests::demo::{HELP, MAX_NODES};

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
    // One listener for the whole run: a Ctrl-C pressed while the table is
    // being read (most of the time) is not lost.
    let mut ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
    loop {
        let t = demo::table(&release).await;
        if t != last {
            println!("\n[{:>5.1}s]\n{t}", started.elapsed().as_secs_f64());
            last = t.clone();
        }
        if once && demo::table_shows_full_mesh(&t, nodes) {
            println!("full mesh: every geth is connected to every other (admin.peers)");
            break;
        }
        tokio::select! {
            _ = &mut ctrl_c => break,
            line = lines.next_line(), if stdin_open => match line {
                Ok(Some(l)) => match Command::parse(&l) {
                    Ok(Command::Quit) => break,
                    Ok(cmd) => match demo::apply(&release, cmd) {
                        Ok(said) if said.is_empty() => {}
                        Ok(said) => println!("{said}"),
                        Err(e) => println!("{e}"),
                    },
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
