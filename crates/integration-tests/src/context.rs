//! Per-test working directory and log collection.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// A test's working directory (short, under /tmp, so IPC socket paths stay under
/// the 108-byte limit) and the logs of everything it started.
///
/// On drop: when the test is panicking, prints the tail of every registered log and
/// keeps the directory (its path is printed); otherwise removes it, unless
/// `GPS_KEEP_LOGS` is set.
#[derive(Clone)]
pub struct TestContext {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    dir: PathBuf,
    logs: Mutex<Vec<PathBuf>>,
}

impl TestContext {
    /// A fresh directory for the test `name`.
    pub fn new(name: &str) -> Self {
        let base = std::env::temp_dir();
        let short: String = name
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
            .take(24)
            .collect();
        let dir = tempfile::Builder::new()
            .prefix(&format!("gps-{short}-"))
            .tempdir_in(base)
            .expect("create test directory")
            .keep();
        Self {
            inner: Arc::new(Inner {
                name: name.to_owned(),
                dir,
                logs: Mutex::new(Vec::new()),
            }),
        }
    }

    /// The test's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The working directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// A path inside the working directory (parent directories created).
    pub fn path(&self, rel: &str) -> PathBuf {
        let p = self.inner.dir.join(rel);
        if let Some(parent) = p.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        p
    }

    /// Registers a log file to print if the test fails.
    pub fn register_log(&self, path: PathBuf) {
        let mut logs = self.inner.logs.lock().unwrap_or_else(|e| e.into_inner());
        if !logs.contains(&path) {
            logs.push(path);
        }
    }

    /// The tail of a log file, for assertion messages.
    pub fn tail(path: &Path, lines: usize) -> String {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
            for log in logs.iter() {
                eprintln!(
                    "\n----- {} (last 40 lines) -----\n{}",
                    log.display(),
                    TestContext::tail(log, 40)
                );
            }
            eprintln!(
                "\n[{}] failed: logs kept in {}",
                self.name,
                self.dir.display()
            );
        } else if std::env::var_os("GPS_KEEP_LOGS").is_some() {
            eprintln!(
                "[{}] logs kept in {} (GPS_KEEP_LOGS)",
                self.name,
                self.dir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
