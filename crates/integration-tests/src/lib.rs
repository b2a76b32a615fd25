//! The real test bed: etcd + kube-apiserver with RBAC on, and geth nodes each in
//! its own network namespace, plus the fixtures the end-to-end tests share.
//!
//! Binaries come from `testbed/provision.sh` (pinned versions, cached outside the
//! repo). A test that needs them and cannot find them fails: it never skips.
//!
//! Everything a fixture starts is stopped on every exit path, panics included:
//! each child runs in its own process group under `setpriv --pdeathsig KILL`, is
//! killed by a `Drop` guard, and network namespaces and bridges are deleted by
//! theirs. When a test fails, [`TestContext`] prints the tail of every child's log.
#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cluster;
mod context;
pub mod demo;
mod fixtures;
mod geth;
mod kube_node;
mod mesh;
mod net;
pub mod oci;
mod process;
mod release;
mod rpc;
mod sidecar;
mod testbed;

pub use net::list_netns;

pub use cluster::{Cluster, NodeControlPlane, SERVICE_ACCOUNT, SERVICE_CIDR, TestNamespace};
pub use context::TestContext;
pub use fixtures::{test_enode, test_member};
pub use geth::{GethNet, GethNode, HTTP_PORT, NodeSpec, P2P_PORT, WS_PORT};
pub use kube_node::{KubeNode, NODE_NAME, POD_UID};
pub use mesh::{CONFIGMAP, Mesh, MeshOptions, RegistryHistory};
pub use net::{Bridge, Netns, NftTable, PodRange};
pub use process::{Proc, cpu_time, processes_referring_to};
pub use release::{
    CHART_CONFIGMAP, CHART_RELEASE, CHART_STATEFULSET, DEFAULT_CONFIGMAP, Frozen, PodView, Release,
    SMALL_NODE_VALUES,
};
pub use rpc::ipc_call;
pub use sidecar::{SIDECAR_HTTP_PORT, Sidecar, http_get, sidecar_bin};
pub use testbed::{Testbed, target_dir, testbed, workspace_root};

/// The harness's error type.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A command or system call failed.
    #[error("{0}")]
    Setup(String),
    /// An I/O error with what was being done.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A Kubernetes API error.
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
    /// A deadline passed while waiting for a condition.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// The condition.
        what: String,
        /// How long we waited.
        after: std::time::Duration,
    },
}

/// The harness's result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// Polls `check` every 50 ms until it returns `Some`, or fails after `timeout`.
pub async fn eventually<T, F, Fut>(
    what: &str,
    timeout: std::time::Duration,
    mut check: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: what.to_owned(),
                after: timeout,
            });
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
