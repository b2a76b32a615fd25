//! The crate's error type.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::enode::EnodeError;

/// `Result` with this crate's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong talking to geth. Each message says what is wrong
/// and what to check; [`Error::kind`] gives a short label for metrics.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The IPC socket file does not exist.
    #[error(
        "geth IPC socket {path:?} does not exist: is geth running, is IPC_PATH right \
         (geth's --ipcpath, default <datadir>/geth.ipc), and is the volume holding it \
         shared with this container?"
    )]
    SocketMissing {
        /// The socket path.
        path: PathBuf,
    },
    /// The IPC socket exists but this process may not connect to it.
    #[error(
        "permission denied connecting to geth IPC socket {path:?}: geth creates the \
         socket with mode 0600, so the sidecar must run as geth's user (same uid, e.g. \
         securityContext.runAsUser) or as root"
    )]
    PermissionDenied {
        /// The socket path.
        path: PathBuf,
    },
    /// The connection to geth dropped (geth stopped or restarted). The next call
    /// reconnects; a peer-event stream ends with this error and must be re-created.
    #[error(
        "connection to geth lost (geth stopped or restarted?); the next call reconnects, \
         subscriptions must be re-created"
    )]
    ConnectionLost,
    /// geth did not answer in time.
    #[error("{method}: geth did not answer within {after:?} (is geth overloaded or stuck?)")]
    Timeout {
        /// The JSON-RPC method, or `connect`.
        method: String,
        /// The time limit that was exceeded.
        after: Duration,
    },
    /// geth answered with a JSON-RPC error.
    #[error("geth returned JSON-RPC error {code}: {message}{}", rpc_hint(*code))]
    Rpc {
        /// The JSON-RPC error code, e.g. -32000 (geth's generic error) or -32601.
        code: i32,
        /// geth's message, e.g. `invalid enode: ...`.
        message: String,
    },
    /// geth's answer could not be understood.
    #[error("{method}: unexpected answer from geth: {reason}")]
    InvalidResponse {
        /// The JSON-RPC method.
        method: String,
        /// What is wrong with the answer.
        reason: String,
    },
    /// Any other failure to reach geth (refused connection, HTTP or WebSocket error).
    #[error("cannot reach geth at {endpoint}: {reason}")]
    Connect {
        /// The endpoint as configured.
        endpoint: String,
        /// What failed.
        reason: String,
    },
    /// The endpoint string is not usable.
    #[error("invalid geth endpoint {endpoint:?}: {reason}")]
    InvalidEndpoint {
        /// The endpoint as written.
        endpoint: String,
        /// Why it is rejected.
        reason: String,
    },
    /// The transport cannot do this (e.g. subscriptions over HTTP).
    #[error("{what} is not supported over {endpoint}: {hint}")]
    Unsupported {
        /// What was attempted.
        what: &'static str,
        /// The endpoint as configured.
        endpoint: String,
        /// What to use instead.
        hint: &'static str,
    },
    /// The peer-event subscription fell too far behind and was closed by the client.
    /// Re-create it (and resynchronise from `admin_peers`).
    #[error(
        "peer-event subscription closed: events were not read fast enough (the buffer \
         overflowed); re-subscribe and resynchronise from admin_peers"
    )]
    SubscriptionLagged,
    /// An enode URL or node id is invalid.
    #[error(transparent)]
    Enode(#[from] EnodeError),
}

fn rpc_hint(code: i32) -> &'static str {
    match code {
        -32601 => {
            " (the admin API is not enabled on this endpoint: add `admin` to --http.api / \
             --ws.api, or use the IPC socket, which always serves it)"
        }
        _ => "",
    }
}

impl Error {
    /// Every label [`Error::kind`] gives, so that a metric can export each one
    /// at zero before the first error.
    pub const KINDS: [&'static str; 11] = [
        "socket_missing",
        "permission_denied",
        "connection_lost",
        "timeout",
        "rpc",
        "invalid_response",
        "connect",
        "invalid_endpoint",
        "unsupported",
        "subscription_lagged",
        "enode",
    ];

    /// A short snake_case label for metrics, one per variant.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::SocketMissing { .. } => "socket_missing",
            Error::PermissionDenied { .. } => "permission_denied",
            Error::ConnectionLost => "connection_lost",
            Error::Timeout { .. } => "timeout",
            Error::Rpc { .. } => "rpc",
            Error::InvalidResponse { .. } => "invalid_response",
            Error::Connect { .. } => "connect",
            Error::InvalidEndpoint { .. } => "invalid_endpoint",
            Error::Unsupported { .. } => "unsupported",
            Error::SubscriptionLagged => "subscription_lagged",
            Error::Enode(_) => "enode",
        }
    }

    /// True when geth could not be reached or the connection broke: retrying later
    /// (which reconnects) may succeed. False for answers geth gave (RPC errors,
    /// invalid input).
    pub fn is_connection_error(&self) -> bool {
        matches!(
            self,
            Error::SocketMissing { .. }
                | Error::PermissionDenied { .. }
                | Error::ConnectionLost
                | Error::Timeout { .. }
                | Error::Connect { .. }
        )
    }

    /// Maps an I/O error from connecting to the IPC socket at `path`: a missing file
    /// gives [`Error::SocketMissing`], a refused permission [`Error::PermissionDenied`],
    /// anything else [`Error::Connect`].
    pub fn from_ipc_connect(path: &Path, err: &io::Error) -> Self {
        match err.kind() {
            io::ErrorKind::NotFound => Error::SocketMissing {
                path: path.to_owned(),
            },
            io::ErrorKind::PermissionDenied => Error::PermissionDenied {
                path: path.to_owned(),
            },
            io::ErrorKind::ConnectionRefused => Error::Connect {
                endpoint: path.display().to_string(),
                reason: format!(
                    "{err}: the socket file exists but nothing listens on it (geth stopped \
                     and left a stale socket, or is still starting)"
                ),
            },
            _ => Error::Connect {
                endpoint: path.display().to_string(),
                reason: err.to_string(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_map_to_variants_that_name_the_path() {
        let path = Path::new("/var/run/geth/geth.ipc");
        let missing = Error::from_ipc_connect(path, &io::Error::from(io::ErrorKind::NotFound));
        assert_eq!(missing.kind(), "socket_missing");
        let msg = missing.to_string();
        assert!(
            msg.contains("/var/run/geth/geth.ipc") && msg.contains("IPC_PATH"),
            "{msg}"
        );

        let denied =
            Error::from_ipc_connect(path, &io::Error::from(io::ErrorKind::PermissionDenied));
        assert_eq!(denied.kind(), "permission_denied");
        let msg = denied.to_string();
        assert!(
            msg.contains("/var/run/geth/geth.ipc") && msg.contains("0600"),
            "{msg}"
        );
        assert!(msg.contains("geth's user"), "{msg}");

        let refused =
            Error::from_ipc_connect(path, &io::Error::from(io::ErrorKind::ConnectionRefused));
        assert_eq!(refused.kind(), "connect");
        assert!(refused.to_string().contains("stale socket"));
    }

    #[test]
    fn rpc_errors_carry_geths_message_and_a_hint_for_missing_admin() {
        let e = Error::Rpc {
            code: -32000,
            message: "invalid enode: missing port".into(),
        };
        assert_eq!(
            e.to_string(),
            "geth returned JSON-RPC error -32000: invalid enode: missing port"
        );
        let e = Error::Rpc {
            code: -32601,
            message: "the method admin_peers does not exist/is not available".into(),
        };
        assert!(e.to_string().contains("--http.api"));
        assert!(!e.is_connection_error());
        assert!(Error::ConnectionLost.is_connection_error());
    }

    #[test]
    fn kinds_are_snake_case_labels() {
        let all = [
            Error::SocketMissing { path: "/x".into() },
            Error::PermissionDenied { path: "/x".into() },
            Error::ConnectionLost,
            Error::Timeout {
                method: "admin_peers".into(),
                after: Duration::from_secs(1),
            },
            Error::Rpc {
                code: 1,
                message: String::new(),
            },
            Error::InvalidResponse {
                method: "m".into(),
                reason: "r".into(),
            },
            Error::Connect {
                endpoint: "e".into(),
                reason: "r".into(),
            },
            Error::InvalidEndpoint {
                endpoint: String::new(),
                reason: "r".into(),
            },
            Error::Unsupported {
                what: "w",
                endpoint: "e".into(),
                hint: "h",
            },
            Error::SubscriptionLagged,
            Error::Enode(EnodeError::NotOnCurve),
        ];
        let kinds: std::collections::BTreeSet<_> = all.iter().map(Error::kind).collect();
        assert_eq!(kinds.len(), Error::KINDS.len(), "one kind per variant");
        for e in all {
            let k = e.kind();
            assert!(Error::KINDS.contains(&k), "{k} is not in Error::KINDS");
            assert!(k.chars().all(|c| c.is_ascii_lowercase() || c == '_'), "{k}");
            assert!(!e.to_string().is_empty());
        }
    }
}
