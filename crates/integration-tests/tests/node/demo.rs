//! Every command the real-node demo offers, driven through the same functions
//! the demo binary calls, with its effect checked on the node: the
//! apiserver's pods and geth's own `admin.peers`. (`q` and the teardown run
//! the binary itself: `teardown.rs`.)

use std::sync::Arc;
use std::time::Duration;

use integration_tests::demo::{self, Command};
use integration_tests::{PodView, Release, eventually};

use crate::Shared;

const MESH: Duration = Duration::from_secs(240);

fn pod<'a>(pods: &'a [PodView], name: &str) -> &'a PodView {
    pods.iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("{name} missing from {pods:?}"))
}

fn run(r: &Release<'_>, line: &str) -> String {
    let cmd = Command::parse(line).unwrap();
    let said = demo::apply(r, cmd).unwrap_or_else(|e| panic!("demo command {line:?}: {e}"));
    eprintln!("[demo] {line}: {said}");
    said
}

pub async fn demo_commands_k_d_s_each_have_their_effect_on_the_real_node(shared: Arc<Shared>) {
    let node = shared.node().await;
    let r = Release::install_chart(&node, "demo-cmds", 4, &["--set", "replicas=3"])
        .await
        .unwrap();
    let (pods, took) = r.wait_full_mesh(3, MESH).await.unwrap();
    eprintln!("[demo] full mesh of 3 after {:.1} s", took.as_secs_f64());
    let name = |i: usize| format!("{}-{i}", r.statefulset);

    // k 0: geth's container restarts (count + 1, same pod) and meshes again.
    let p0 = pod(&pods, &name(0)).clone();
    let restarts = p0.restarts["geth"];
    run(&r, "k 0");
    eventually("geth in pod 0 restarted", MESH, || async {
        let pods = r.pods().await.ok()?;
        let p = pods.into_iter().find(|p| p.name == p0.name)?;
        (p.restarts.get("geth") == Some(&(restarts + 1))).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let (pods, took) = r.wait_full_mesh(3, MESH).await.unwrap();
    let again = pod(&pods, &name(0));
    assert_eq!(
        (again.uid.as_str(), again.ip),
        (p0.uid.as_str(), p0.ip),
        "k restarts the container, not the pod"
    );
    // The kubelet restarted geth's container (a second restart within the
    // wait was seen once; the mesh is full again either way).
    assert!(again.restarts["geth"] > restarts, "{again:?}");
    if again.restarts["geth"] != restarts + 1 {
        eprintln!(
            "[demo] geth restarted {} times: {}",
            again.restarts["geth"] - restarts,
            r.kubectl(&[
                "get",
                "pod",
                &p0.name,
                "-o",
                "jsonpath={.status.containerStatuses}"
            ])
            .unwrap_or_default()
        );
    }
    eprintln!(
        "[demo] k 0: geth restarted and meshed again after {:.1} s",
        took.as_secs_f64()
    );

    // d 1: the pod is replaced (new UID) on a new IP, and meshes again.
    let p1 = pod(&pods, &name(1)).clone();
    run(&r, "d 1");
    eventually("pod 1 replaced", MESH, || async {
        let pods = r.pods().await.ok()?;
        pods.iter()
            .any(|p| p.name == p1.name && p.uid != p1.uid)
            .then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let (pods, took) = r.wait_full_mesh(3, MESH).await.unwrap();
    let replaced = pod(&pods, &name(1));
    assert_ne!(replaced.uid, p1.uid);
    assert_ne!(replaced.ip, p1.ip, "the new pod has a new IP");
    let mesh = r.mesh(&pods).unwrap();
    let old = p1.ip.unwrap();
    assert!(
        mesh.values().all(|peers| !peers.contains(&old)),
        "no geth is connected to the old IP: {mesh:?}"
    );
    eprintln!(
        "[demo] d 1: replaced on {:?} and meshed after {:.1} s",
        replaced.ip,
        took.as_secs_f64()
    );

    // s 4: a fourth pod joins and the mesh is full at 4.
    run(&r, "s 4");
    let (pods, took) = r.wait_full_mesh(4, MESH).await.unwrap();
    assert!(pods.iter().any(|p| p.name == name(3)));
    eprintln!(
        "[demo] s 4: full mesh of 4 after {:.1} s",
        took.as_secs_f64()
    );

    // q ends the demo (its teardown is checked on the binary in teardown.rs);
    // anything else is answered with the help.
    assert_eq!(Command::parse("q").unwrap(), Command::Quit);
    assert!(Command::parse("x 1").is_err());
    assert!(Command::parse("s 10").is_err());
}
