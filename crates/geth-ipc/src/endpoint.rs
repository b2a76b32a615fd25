//! Where geth is: an IPC socket path, an HTTP URL or a WebSocket URL.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::error::Error;

/// How to reach geth.
///
/// Parsed from a string: `http://` and `https://` give [`Endpoint::Http`], `ws://`
/// and `wss://` give [`Endpoint::Ws`], anything else is the path of geth's IPC socket.
///
/// ```
/// use geth_ipc::Endpoint;
///
/// let ipc: Endpoint = "/var/run/geth/geth.ipc".parse()?;
/// assert_eq!(ipc, Endpoint::Ipc("/var/run/geth/geth.ipc".into()));
/// assert_eq!("ws://127.0.0.1:8546".parse::<Endpoint>()?, Endpoint::Ws("ws://127.0.0.1:8546".into()));
/// # Ok::<(), geth_ipc::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// geth's IPC Unix socket (`--ipcpath`). Serves every namespace, `admin` included,
    /// and subscriptions.
    Ipc(PathBuf),
    /// An HTTP(S) URL. Needs `admin` in `--http.api`; has no subscriptions.
    Http(String),
    /// A WebSocket URL. Needs `admin` in `--ws.api`; has subscriptions.
    Ws(String),
}

impl Endpoint {
    /// `"ipc"`, `"http"` or `"ws"`, for logs and metrics.
    pub fn transport(&self) -> &'static str {
        match self {
            Endpoint::Ipc(_) => "ipc",
            Endpoint::Http(_) => "http",
            Endpoint::Ws(_) => "ws",
        }
    }

    /// True when the transport supports subscriptions (`peer_events`): IPC and WS.
    pub fn supports_subscriptions(&self) -> bool {
        !matches!(self, Endpoint::Http(_))
    }
}

fn has_scheme(s: &str, scheme: &str) -> bool {
    s.get(..scheme.len())
        .is_some_and(|p| p.eq_ignore_ascii_case(scheme))
}

impl FromStr for Endpoint {
    type Err = Error;

    /// Surrounding whitespace is ignored. An empty string, or a URL with another
    /// scheme (`tcp://`, `unix://`, ...), is rejected.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let invalid = |reason: &str| Error::InvalidEndpoint {
            endpoint: s.to_owned(),
            reason: reason.to_owned(),
        };
        if s.is_empty() {
            return Err(invalid(
                "empty: give the IPC socket path (e.g. /data/geth.ipc), an http(s):// or a ws(s):// URL",
            ));
        }
        if has_scheme(s, "http://") || has_scheme(s, "https://") {
            Ok(Endpoint::Http(s.to_owned()))
        } else if has_scheme(s, "ws://") || has_scheme(s, "wss://") {
            Ok(Endpoint::Ws(s.to_owned()))
        } else if s.contains("://") {
            Err(invalid(
                "unknown URL scheme: use http://, https://, ws://, wss:// or a plain IPC socket path",
            ))
        } else {
            Ok(Endpoint::Ipc(PathBuf::from(s)))
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Ipc(p) => write!(f, "{}", p.display()),
            Endpoint::Http(u) | Endpoint::Ws(u) => f.write_str(u),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_pick_the_transport_and_the_rest_is_a_path() {
        let cases = [
            (
                "http://127.0.0.1:8545",
                Endpoint::Http("http://127.0.0.1:8545".into()),
            ),
            (
                "HTTPS://geth:8545/",
                Endpoint::Http("HTTPS://geth:8545/".into()),
            ),
            (
                "ws://127.0.0.1:8546",
                Endpoint::Ws("ws://127.0.0.1:8546".into()),
            ),
            (
                "wss://geth.example:443/ws",
                Endpoint::Ws("wss://geth.example:443/ws".into()),
            ),
            ("/data/geth.ipc", Endpoint::Ipc("/data/geth.ipc".into())),
            ("geth.ipc", Endpoint::Ipc("geth.ipc".into())),
            (" /data/geth.ipc\n", Endpoint::Ipc("/data/geth.ipc".into())),
            (
                "./http-dir/geth.ipc",
                Endpoint::Ipc("./http-dir/geth.ipc".into()),
            ),
        ];
        for (s, want) in cases {
            assert_eq!(s.parse::<Endpoint>().unwrap(), want, "{s:?}");
        }
        assert_eq!(Endpoint::Ipc("/a".into()).to_string(), "/a");
        assert_eq!(Endpoint::Http("http://x".into()).transport(), "http");
        assert!(!Endpoint::Http("http://x".into()).supports_subscriptions());
        assert!(Endpoint::Ws("ws://x".into()).supports_subscriptions());
    }

    #[test]
    fn empty_and_unknown_schemes_are_rejected() {
        for s in ["", "   ", "tcp://127.0.0.1:8545", "unix:///x"] {
            let e = s.parse::<Endpoint>().unwrap_err();
            assert_eq!(e.kind(), "invalid_endpoint", "{s:?}");
        }
    }
}
