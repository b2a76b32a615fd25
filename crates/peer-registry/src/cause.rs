//! [`cause_of`]: why a connection failed, read from the root of an error chain.
//!
//! The Kubernetes client's errors print only their outer layer ("ServiceError:
//! client error (Connect)"); the reason (a DNS failure, a refused connection, a
//! timeout, a certificate) sits at the end of the `source()` chain. Every message
//! about a failed apiserver call is built from [`cause_of`], so they all name it.
//! Pure `std`: usable without the `kube` feature, testable without a network.

use std::error::Error as StdError;
use std::fmt;
use std::io;

/// The class of a connection failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CauseKind {
    /// A name lookup failed (`dns error`, `failed to lookup address ...`).
    Dns,
    /// The host answered but nothing listens on the port.
    Refused,
    /// No answer in time.
    Timeout,
    /// The TLS handshake failed (certificate, rustls).
    Tls,
    /// Anything else.
    Other,
}

impl CauseKind {
    /// A short phrase for messages: `cannot resolve the host name`, `connection refused`,
    /// `timed out`, `TLS handshake failed`; empty for [`CauseKind::Other`].
    pub fn label(self) -> &'static str {
        match self {
            Self::Dns => "cannot resolve the host name",
            Self::Refused => "connection refused",
            Self::Timeout => "timed out",
            Self::Tls => "TLS handshake failed",
            Self::Other => "",
        }
    }
}

/// Why an error chain failed: its class and its innermost message.
///
/// Displays as `connection refused (tcp connect error: Connection refused (os
/// error 111))`, or only the detail for [`CauseKind::Other`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cause {
    /// The class.
    pub kind: CauseKind,
    /// The innermost message of the chain, prefixed by its direct wrapper's when
    /// that is a bare label such as `tcp connect error` or `dns error`.
    pub detail: String,
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            CauseKind::Other => f.write_str(&self.detail),
            kind => write!(f, "{} ({})", kind.label(), self.detail),
        }
    }
}

const DNS: &[&str] = &[
    "dns error",
    "failed to lookup address",
    "name or service not known",
    "nodename nor servname",
    "no such host",
    "name resolution",
    "cannot resolve",
    "could not resolve",
];
const TLS: &[&str] = &["certificate", "rustls", "tls", "x509", "ssl"];
const REFUSED: &[&str] = &["connection refused"];
const TIMEOUT: &[&str] = &["timed out", "timeout", "deadline has elapsed"];

/// Walks `err`'s [`source`](std::error::Error::source) chain to the root and
/// classifies the failure: DNS, connection refused, timeout, TLS or other (in
/// that order of precedence: a DNS lookup that timed out is a DNS failure). An
/// [`io::Error`] of kind `ConnectionRefused` or `TimedOut` anywhere in the chain
/// counts as such; otherwise the messages decide.
///
/// ```
/// use peer_registry::{CauseKind, cause_of};
/// let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused (os error 111)");
/// let cause = cause_of(&refused);
/// assert_eq!(cause.kind, CauseKind::Refused);
/// assert_eq!(cause.to_string(), "connection refused (Connection refused (os error 111))");
/// ```
pub fn cause_of(err: &(dyn StdError + 'static)) -> Cause {
    let mut chain: Vec<&(dyn StdError + 'static)> = Vec::new();
    let mut next = Some(err);
    // Bounded: a (buggy) cyclic chain must not hang the caller.
    while let Some(e) = next.filter(|_| chain.len() < 32) {
        chain.push(e);
        next = e.source();
    }
    let messages: Vec<String> = chain.iter().map(|e| e.to_string()).collect();
    let lower: Vec<String> = messages.iter().map(|m| m.to_ascii_lowercase()).collect();
    let io_kind = |kind: io::ErrorKind| {
        chain.iter().any(|e| {
            e.downcast_ref::<io::Error>()
                .is_some_and(|io| io.kind() == kind)
        })
    };
    let mentions = |words: &[&str]| lower.iter().any(|m| words.iter().any(|w| m.contains(w)));
    let kind = if mentions(DNS) {
        CauseKind::Dns
    } else if mentions(TLS) {
        CauseKind::Tls
    } else if io_kind(io::ErrorKind::ConnectionRefused) || mentions(REFUSED) {
        CauseKind::Refused
    } else if io_kind(io::ErrorKind::TimedOut) || mentions(TIMEOUT) {
        CauseKind::Timeout
    } else {
        CauseKind::Other
    };
    Cause {
        kind,
        detail: detail(&messages),
    }
}

/// The innermost message, prefixed by its wrapper's when the wrapper is a bare
/// label that adds context (`tcp connect error`, `dns error`) rather than a
/// summary of what follows (`client error (Connect)`, `HyperError: ...`).
fn detail(messages: &[String]) -> String {
    let Some((root, outer)) = messages.split_last() else {
        return String::new();
    };
    match outer.last() {
        Some(parent)
            if outer.len() >= 2
                && !parent.contains(root.as_str())
                && !parent.contains([':', '(']) =>
        {
            format!("{parent}: {root}")
        }
        _ => root.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error with a message and an optional source, like the layers of
    /// kube/hyper-util errors.
    #[derive(Debug)]
    struct Layer {
        msg: &'static str,
        source: Option<Box<dyn StdError + Send + Sync + 'static>>,
    }

    impl fmt::Display for Layer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.msg)
        }
    }

    impl StdError for Layer {
        fn source(&self) -> Option<&(dyn StdError + 'static)> {
            self.source.as_deref().map(|e| e as _)
        }
    }

    /// `ServiceError: client error (Connect)` / `client error (Connect)` /
    /// `inner_label` / `root`, as kube reports a failed connection.
    fn kube_like(inner_label: &'static str, root: Box<dyn StdError + Send + Sync>) -> Layer {
        let connect = Layer {
            msg: inner_label,
            source: Some(root),
        };
        let client = Layer {
            msg: "client error (Connect)",
            source: Some(Box::new(connect)),
        };
        Layer {
            msg: "ServiceError: client error (Connect)",
            source: Some(Box::new(client)),
        }
    }

    #[test]
    fn a_refused_connection_is_named_with_its_os_message() {
        let root = io::Error::new(
            io::ErrorKind::ConnectionRefused,
            "Connection refused (os error 111)",
        );
        let cause = cause_of(&kube_like("tcp connect error", Box::new(root)));
        assert_eq!(cause.kind, CauseKind::Refused);
        assert_eq!(
            cause.to_string(),
            "connection refused (tcp connect error: Connection refused (os error 111))"
        );
    }

    #[test]
    fn a_timeout_is_named_by_its_io_kind() {
        let root = io::Error::new(io::ErrorKind::TimedOut, "operation did not complete");
        let cause = cause_of(&kube_like("tcp connect error", Box::new(root)));
        assert_eq!(cause.kind, CauseKind::Timeout);
        assert!(cause.to_string().starts_with("timed out ("), "{cause}");
        assert!(
            cause.detail.contains("operation did not complete"),
            "{cause}"
        );
    }

    #[test]
    fn a_dns_failure_is_named_whatever_the_io_kind() {
        let root =
            io::Error::other("failed to lookup address information: Name or service not known");
        let cause = cause_of(&kube_like("dns error", Box::new(root)));
        assert_eq!(cause.kind, CauseKind::Dns);
        assert_eq!(
            cause.detail,
            "dns error: failed to lookup address information: Name or service not known"
        );
        assert!(cause.to_string().contains("cannot resolve"), "{cause}");
        // A lookup that timed out is still a DNS failure.
        let slow = Layer {
            msg: "dns error",
            source: Some(Box::new(io::Error::new(
                io::ErrorKind::TimedOut,
                "timed out",
            ))),
        };
        assert_eq!(cause_of(&slow).kind, CauseKind::Dns);
    }

    #[test]
    fn a_certificate_failure_is_tls() {
        // hyper-rustls wraps rustls errors in an io::Error of kind InvalidData.
        let root = io::Error::new(
            io::ErrorKind::InvalidData,
            "invalid peer certificate: UnknownIssuer",
        );
        let outer = Layer {
            msg: "client error (Connect)",
            source: Some(Box::new(root)),
        };
        let cause = cause_of(&outer);
        assert_eq!(cause.kind, CauseKind::Tls);
        assert_eq!(
            cause.to_string(),
            "TLS handshake failed (invalid peer certificate: UnknownIssuer)",
            "a summary wrapper adds nothing"
        );
    }

    #[test]
    fn anything_else_shows_its_innermost_message() {
        let cause = cause_of(&Layer {
            msg: "HyperError: connection closed before message completed",
            source: None,
        });
        assert_eq!(cause.kind, CauseKind::Other);
        assert_eq!(
            cause.to_string(),
            "HyperError: connection closed before message completed"
        );
        let nested = kube_like("tcp connect error", Box::new(io::Error::other("boom")));
        assert_eq!(cause_of(&nested).to_string(), "tcp connect error: boom");
    }
}
