//! Locating the provisioned binaries and the pinned versions.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The provisioned test bed: where its binaries are and which versions were pinned.
#[derive(Debug)]
pub struct Testbed {
    /// Directory holding `geth`, `etcd` and `kube-apiserver`.
    pub bin_dir: PathBuf,
    /// Pinned geth version (e.g. `v1.17.5`).
    pub geth_version: String,
    /// Pinned etcd version.
    pub etcd_version: String,
    /// Pinned Kubernetes version (e.g. `v1.37.2`).
    pub kubernetes_version: String,
    /// The geth version matrix, as names of binaries in [`Testbed::bin_dir`]
    /// (`geth-<version>`, `op-geth-<version>`): the last v1.16 patch, the
    /// default [`Testbed::geth_version`], the current release, op-geth.
    pub geth_matrix: Vec<String>,
}

impl Testbed {
    /// Full path of a test-bed binary.
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }

    /// Full path of a geth build of the matrix (`geth-v1.16.9`,
    /// `op-geth-v1.101702.3`; `geth` is the default build).
    ///
    /// # Panics
    /// When it is missing: a test that needs a version fails, it never skips.
    pub fn geth_bin(&self, name: &str) -> PathBuf {
        let p = self.bin(name);
        assert!(
            p.is_file(),
            "geth build {} is missing: run `testbed/provision.sh` (it builds the version \
             matrix of testbed/versions.env). Tests that need it fail without it; they never skip.",
            p.display()
        );
        p
    }
}

/// The repository root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Cargo's target directory: `CARGO_TARGET_DIR`, else the workspace's `target`.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

fn pinned(key: &str) -> String {
    include_str!("../../../testbed/versions.env")
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// The test bed, checked once per process.
///
/// # Panics
/// When a binary is missing. This is deliberate: a test that needs the test bed
/// fails, with the command that provisions it; it never turns into a skip.
pub fn testbed() -> &'static Testbed {
    static TB: OnceLock<Testbed> = OnceLock::new();
    TB.get_or_init(|| {
        let bin_dir = std::env::var_os("GPS_TESTBED_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                let cache = std::env::var_os("XDG_CACHE_HOME")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| {
                        PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache")
                    });
                cache.join("geth-peer-sidecar/testbed/bin")
            });
        for name in ["geth", "etcd", "kube-apiserver"] {
            let p = bin_dir.join(name);
            assert!(
                p.is_file(),
                "test bed binary {} is missing: run `testbed/provision.sh` (or set GPS_TESTBED_BIN). \
                 Tests that need the test bed fail without it; they never skip.",
                p.display()
            );
        }
        Testbed {
            bin_dir,
            geth_version: pinned("GETH_VERSION"),
            etcd_version: pinned("ETCD_VERSION"),
            kubernetes_version: pinned("KUBERNETES_VERSION"),
            geth_matrix: vec![
                format!("geth-{}", pinned("GETH_1_16_VERSION")),
                format!("geth-{}", pinned("GETH_VERSION")),
                format!("geth-{}", pinned("GETH_LATEST_VERSION")),
                format!("op-geth-{}", pinned("OP_GETH_VERSION")),
            ],
        }
    })
}
