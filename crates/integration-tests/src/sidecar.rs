//! The sidecar binary, run as a pod would run it: in its geth node's network
//! namespace, with the Downward API's environment and the service account's
//! kubeconfig.

use std::path::PathBuf;
use std::time::Duration;

use crate::{Error, GethNode, Proc, Result, TestContext, TestNamespace};

/// The port of the sidecar's HTTP server (probes and metrics) in each namespace.
pub const SIDECAR_HTTP_PORT: u16 = 9090;

/// Path of the built `geth-peer-sidecar` binary (`GPS_SIDECAR_BIN`, else the
/// workspace's target/debug).
///
/// # Panics
/// When it has not been built: run `cargo build -p sidecar-bin` (scripts/test.sh does).
pub fn sidecar_bin() -> PathBuf {
    let path = std::env::var_os("GPS_SIDECAR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::target_dir().join("debug/geth-peer-sidecar"));
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build -p sidecar-bin` first (scripts/test.sh does)",
        path.display()
    );
    path
}

/// A running sidecar next to one geth node.
pub struct Sidecar {
    proc: Proc,
    url: String,
}

impl Sidecar {
    /// Starts the sidecar for `node` in `ns`'s identity with the default test
    /// settings plus `extra` environment variables (which override).
    pub fn start(
        ctx: &TestContext,
        node: &GethNode,
        ns: &TestNamespace,
        label: &str,
        extra: &[(&str, &str)],
    ) -> Result<Sidecar> {
        Self::start_bin(ctx, &sidecar_bin(), node, ns, label, extra)
    }

    /// Like [`Sidecar::start`], with another build of the sidecar (a
    /// benchmark's baseline).
    pub fn start_bin(
        ctx: &TestContext,
        bin: &std::path::Path,
        node: &GethNode,
        ns: &TestNamespace,
        label: &str,
        extra: &[(&str, &str)],
    ) -> Result<Sidecar> {
        let ip = node.ip().to_string();
        let ipc = node.ipc_path().to_string_lossy().into_owned();
        let kubeconfig = ns.kubeconfig.to_string_lossy().into_owned();
        let listen = format!("{ip}:{SIDECAR_HTTP_PORT}");
        let uid = format!("uid-{}-{label}", node.name());
        let mut env: Vec<(&str, &str)> = vec![
            ("LOGGING", "DEBUG"),
            ("IPC_PATH", &ipc),
            ("CONFIGMAP_NAME", "geth-shared-static-nodes"),
            ("NAMESPACE", &ns.name),
            ("KUBECONFIG", &kubeconfig),
            ("POD_NAME", node.name()),
            ("POD_IP", &ip),
            ("POD_UID", &uid),
            ("LISTEN_ADDR", &listen),
            ("RUST_BACKTRACE", "1"),
        ];
        for (k, v) in extra {
            env.retain(|(ek, _)| ek != k);
            env.push((k, v));
        }
        let proc = Proc::spawn(
            ctx,
            &format!("sidecar-{}-{label}", node.name()),
            Some(node.netns().name()),
            bin,
            std::iter::empty::<&str>(),
            &env,
        )?;
        Ok(Sidecar {
            proc,
            url: format!("http://{ip}:{SIDECAR_HTTP_PORT}"),
        })
    }

    /// The sidecar's HTTP base URL (reachable from the root namespace).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The process.
    pub fn proc_mut(&mut self) -> &mut Proc {
        &mut self.proc
    }

    /// SIGTERM and wait for the exit code (None if it had to be killed after 30 s).
    pub async fn terminate(mut self) -> Option<i32> {
        self.proc
            .terminate(Duration::from_secs(30))
            .await
            .and_then(|s| s.code())
    }

    /// `kill -9`.
    pub async fn kill(mut self) {
        self.proc.kill().await;
    }

    /// GET a path of the sidecar's HTTP server: (status code, body).
    pub async fn get(&self, path: &str) -> Result<(u16, String)> {
        http_get(&format!("{}{path}", self.url)).await
    }
}

/// A minimal HTTP/1.0 GET over a TCP socket: (status code, body).
pub async fn http_get(url: &str) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| Error::Setup(format!("not an http URL: {url}")))?;
    let (host, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_owned()), |(h, p)| (h, format!("/{p}")));
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(host)
            .await
            .map_err(|e| Error::Setup(format!("connect {host}: {e}")))?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
            .await
            .map_err(|e| Error::Setup(format!("write: {e}")))?;
        let mut buf = String::new();
        s.read_to_string(&mut buf)
            .await
            .map_err(|e| Error::Setup(format!("read: {e}")))?;
        let code = buf
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| Error::Setup(format!("bad HTTP response: {buf:.200}")))?;
        let body = buf
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Ok((code, body))
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .map_err(|_| Error::Timeout {
            what: format!("GET {url}"),
            after: Duration::from_secs(5),
        })?
}
