//! Finding every process and cgroup of the node, and tearing it all down
//! (also on panic, from `Drop`).

#[allow(clippy::wildcard_imports)]
use super::*;

/// The cgroup v1 hierarchies mounted under /sys/fs/cgroup (and the v2 one, if any).
pub(super) fn cgroup_hierarchies() -> Vec<PathBuf> {
    std::fs::read_dir("/sys/fs/cgroup")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.join("cgroup.procs").exists())
                .collect()
        })
        .unwrap_or_default()
}

/// Every directory below (and including) `dir`, deepest first.
fn dirs_depth_first(dir: &Path, out: &mut Vec<PathBuf>) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                dirs_depth_first(&e.path(), out);
            }
        }
    }
    out.push(dir.to_path_buf());
}

/// The process ids whose mount namespace is `mnt_ns` (a `/proc/PID/ns/mnt` link).
fn pids_in_mount_ns(mnt_ns: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .filter(|pid| {
                    std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
                        .map(|l| l.to_string_lossy() == mnt_ns)
                        .unwrap_or(false)
                })
                .collect()
        })
        .unwrap_or_default()
}

impl KubeNode {
    /// Every process of this node still alive: the components, containerd's
    /// shims, and every container process (by the node's cgroups).
    pub fn processes(&self) -> Vec<i32> {
        let mut pids = if self.holder_mnt_ns.is_empty() {
            Vec::new()
        } else {
            pids_in_mount_ns(&self.holder_mnt_ns)
        };
        for h in cgroup_hierarchies() {
            let mut dirs = Vec::new();
            dirs_depth_first(&h.join(self.cgroup_root.trim_start_matches('/')), &mut dirs);
            for d in dirs {
                if let Ok(text) = std::fs::read_to_string(d.join("cgroup.procs")) {
                    pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
                }
            }
        }
        for p in [
            &self.kube_proxy,
            &self.kubelet,
            &self.containerd,
            &self.scheduler,
            &self.controller_manager,
            &self.holder,
        ]
        .into_iter()
        .flatten()
        {
            pids.push(p.pid() as i32);
        }
        pids.sort_unstable();
        pids.dedup();
        pids.retain(|pid| Path::new(&format!("/proc/{pid}")).exists());
        pids
    }

    /// The node's cgroup directories that still exist, in every hierarchy.
    pub fn cgroups(&self) -> Vec<PathBuf> {
        cgroup_hierarchies()
            .into_iter()
            .map(|h| h.join(self.cgroup_root.trim_start_matches('/')))
            .filter(|p| p.exists())
            .collect()
    }

    /// Stops everything; see the module documentation. Idempotent.
    pub fn teardown(&mut self) {
        // The kubelet first, so it restarts no container while we kill them.
        drop(self.kubelet.take());
        for _ in 0..50 {
            let pids = self.processes();
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        drop(self.kube_proxy.take());
        drop(self.containerd.take());
        drop(self.scheduler.take());
        drop(self.controller_manager.take());
        drop(self.cluster.take());
        drop(self.holder.take());
        // Cgroups are empty now: remove them deepest first (a cgroup whose
        // last task is still exiting refuses for a moment).
        for _ in 0..50 {
            let mut left = false;
            for h in cgroup_hierarchies() {
                let mut dirs = Vec::new();
                let root = h.join(self.cgroup_root.trim_start_matches('/'));
                if !root.exists() {
                    continue;
                }
                dirs_depth_first(&root, &mut dirs);
                for d in dirs {
                    if std::fs::remove_dir(&d).is_err() {
                        left = true;
                    }
                }
            }
            if !left {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        drop(self.netns.take());
        drop(self.bridge.take());
    }
}

impl Drop for KubeNode {
    fn drop(&mut self) {
        self.teardown();
    }
}
