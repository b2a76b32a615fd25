//! End-to-end tests on a real Kubernetes node (kubelet + containerd + runc +
//! CNI, with the test bed's etcd and kube-apiserver): what users install — the
//! image, the Helm chart, the kustomize manifests — running as real pods.
//!
//! One node serves every test (it takes seconds to start and to stop), each
//! test in its own namespace. A custom harness (libtest-mimic: the usual
//! `cargo test` output and filters) starts the node on first use, tears it
//! down after the last test, and fails the run if the teardown left a process,
//! cgroup, network namespace or bridge behind. The `teardown` test proves the
//! same on a node of its own, with pods running, before the shared one starts.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs,
    unreachable_pub
)]

mod chaos;
mod chart;
mod demo;
mod graph;
mod image;
mod kustomize;
mod monitoring;
mod teardown;
mod trust;

use std::future::Future;
use std::sync::Arc;

use integration_tests::{KubeNode, TestContext};
use libtest_mimic::{Arguments, Failed, Trial};
use tokio::sync::Mutex;

/// The node shared by the tests (started on first use).
pub struct Shared {
    ctx: TestContext,
    node: Mutex<Option<KubeNode>>,
}

impl Shared {
    /// The shared node, started on first use.
    pub async fn node(&self) -> tokio::sync::MappedMutexGuard<'_, KubeNode> {
        let mut guard = self.node.lock().await;
        if guard.is_none() {
            let node = KubeNode::start(&self.ctx)
                .await
                .unwrap_or_else(|e| panic!("the real node did not start: {e}"));
            eprintln!(
                "[node] ready {:.1} s after start",
                node.ready_after().as_secs_f64()
            );
            *guard = Some(node);
        }
        tokio::sync::MutexGuard::map(guard, |n| n.as_mut().expect("started above"))
    }
}

type TestFn = fn(Arc<Shared>) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// Wraps an async test for the harness.
macro_rules! trial {
    ($module:ident :: $name:ident) => {
        (
            concat!(stringify!($module), "::", stringify!($name)),
            (|shared| Box::pin($module::$name(shared))) as TestFn,
        )
    };
}

fn main() -> std::process::ExitCode {
    let mut args = Arguments::from_args();
    // One node, one test at a time: two cores.
    args.test_threads = Some(1);
    let runtime = Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime"),
    );
    let shared = Arc::new(Shared {
        ctx: TestContext::new("node-shared"),
        node: Mutex::new(None),
    });
    let tests: Vec<(&str, TestFn)> = vec![
        trial!(image::assembled_sidecar_image_runs_as_the_dockerfile_final_stage_says),
        trial!(teardown::teardown_leaves_no_process_cgroup_netns_bridge_mount_or_host_path),
        trial!(teardown::the_real_node_demo_reaches_a_full_mesh_and_q_tears_everything_down),
        trial!(demo::demo_commands_k_d_s_each_have_their_effect_on_the_real_node),
        trial!(graph::status_dot_of_a_full_mesh_renders_with_graphviz_every_pod_and_no_missing_link),
        trial!(chart::helm_install_of_five_replicas_forms_a_full_mesh_with_readable_logs_and_status),
        trial!(chart::deleted_pod_returns_on_a_new_ip_and_every_geth_repeers_with_it_and_drops_the_old_one),
        trial!(chart::rolling_update_never_loses_more_than_the_pod_being_replaced),
        trial!(chart::with_registry_layout_leases_each_pod_registers_a_lease_it_owns_and_a_replaced_pod_takes_over),
        trial!(chart::the_lease_of_a_deleted_pod_is_removed_by_the_garbage_collector),
        trial!(chart::scale_5_7_3_with_pod_evidence_joins_new_members_and_removes_departed_ones),
        trial!(chart::pod_deletion_deregisters_the_member_within_the_grace_period),
        trial!(chart::sidecar_runs_non_root_read_only_without_capabilities_and_opens_the_0600_socket),
        trial!(chart::every_chart_value_reaches_the_pod),
        trial!(monitoring::every_dashboard_query_returns_series_from_a_real_prometheus_and_missing_peers_moves_when_a_geth_stops),
        trial!(chaos::a_kubelet_restart_keeps_pods_links_and_members_and_a_pod_deletion_still_heals),
        trial!(trust::the_chart_and_the_kustomize_component_carry_the_same_policy_rules),
        trial!(trust::one_pods_own_token_writes_only_its_own_record_and_the_admission_policy_refuses_the_rest),
        trial!(kustomize::base_forms_a_full_mesh_and_the_pod_evidence_overlay_turns_pod_evidence_on),
    ];
    let trials = tests
        .into_iter()
        .map(|(name, f)| {
            let runtime = runtime.clone();
            let shared = shared.clone();
            Trial::test(name, move || {
                runtime.block_on(f(shared));
                Ok::<(), Failed>(())
            })
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    // Tear the shared node down and check that nothing is left.
    let leftovers = runtime.block_on(async {
        let mut guard = shared.node.lock().await;
        let Some(mut node) = guard.take() else {
            return Vec::new();
        };
        node.teardown();
        teardown::leftovers_of(&node)
    });
    if !leftovers.is_empty() {
        eprintln!("the shared node's teardown left: {leftovers:?}");
        return std::process::ExitCode::FAILURE;
    }
    conclusion.exit_code()
}
