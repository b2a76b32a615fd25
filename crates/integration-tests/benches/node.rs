//! Real-node benchmark (kubelet + containerd, the Helm chart with the locally
//! assembled images); prints a table. `scripts/bench.sh node` runs it.
//!
//! Figures: the node's start until Ready; `helm install` until every geth's
//! `admin.peers` lists every other pod (N = 3 and 5); `kubectl delete pod`
//! until the replacement, on a new IP, is meshed again.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    missing_docs
)]

use std::time::{Duration, Instant};

use integration_tests::{KubeNode, Release, TestContext};

const LIMIT: Duration = Duration::from_secs(300);

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        let ctx = TestContext::new("bench-node");
        let node = KubeNode::start(&ctx).await.expect("start the real node");
        let mut rows = vec![(
            "node start until Ready (and the default ServiceAccount)".to_owned(),
            node.ready_after(),
        )];
        for n in [3usize, 5] {
            let t0 = Instant::now();
            let release = Release::install_chart(
                &node,
                &format!("bench-{n}"),
                n,
                &["--set", &format!("replicas={n}")],
            )
            .await
            .unwrap();
            release.wait_full_mesh(n, LIMIT).await.unwrap();
            rows.push((
                format!("helm install until a full mesh, N = {n} (geth's admin.peers)"),
                t0.elapsed(),
            ));
            if n == 5 {
                let t0 = Instant::now();
                release
                    .kubectl(&["delete", "pod", "geth-peer-sidecar-geth-2", "--wait=false"])
                    .unwrap();
                // The old pod first leaves, then its replacement comes back meshed.
                let old = release.pods().await.unwrap();
                let old_uid = old
                    .iter()
                    .find(|p| p.name.ends_with("-2"))
                    .map(|p| p.uid.clone());
                integration_tests::eventually("the replacement", LIMIT, || async {
                    let pods = release.pods().await.ok()?;
                    pods.iter()
                        .any(|p| p.name.ends_with("-2") && Some(&p.uid) != old_uid.as_ref())
                        .then_some(())
                })
                .await
                .unwrap();
                release.wait_full_mesh(n, LIMIT).await.unwrap();
                rows.push((
                    "kubectl delete pod until re-meshed on its new IP, N = 5".to_owned(),
                    t0.elapsed(),
                ));
            }
        }
        println!("\n| real node (2 cores) | seconds |\n|---|---|");
        for (what, d) in rows {
            println!("| {what} | {:.1} |", d.as_secs_f64());
        }
    });
}
