//! The README's main job: a local demo mesh with a live table of members and
//! connections, and commands to break things and watch the mesh heal. Ctrl-C
//! (or `q`) tears everything down.
//!
//! By default it runs on a real Kubernetes node (kubelet + containerd, the
//! Helm chart with the locally assembled images); `--netns` runs the faster
//! network-namespace mesh (the sidecar as a process next to each geth).
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

mod netns;
mod node;

fn usage() -> ! {
    eprintln!(
        "usage: demo [--nodes N] [--once] [--netns]\n  real node: {}\n  --netns:   {}",
        node::HELP,
        netns::HELP
    );
    std::process::exit(2);
}

fn main() {
    let mut nodes = 3usize;
    let mut once = false;
    let mut in_netns = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--nodes" | "-n" => {
                nodes = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|n| (1..=node::MAX_NODES).contains(n))
                    .unwrap_or_else(|| usage())
            }
            "--once" => once = true,
            "--netns" => in_netns = true,
            _ => usage(),
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    if in_netns {
        rt.block_on(netns::run(nodes, once));
    } else if let Err(e) = rt.block_on(node::run(nodes, once)) {
        eprintln!("demo: {e}");
        std::process::exit(1);
    }
}
