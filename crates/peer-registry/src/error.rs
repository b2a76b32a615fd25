//! The registry's error type: one enum whose messages say what to do.

use kube::runtime::watcher;

/// What went wrong talking to the registry. Each message names the object and
/// what to do; [`Error::kind`] gives a short metric label.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The apiserver refused the request (HTTP 403): an RBAC rule is missing.
    #[error(
        "forbidden: the sidecar's service account may not {verb} {resource}s {name:?} in \
         namespace {namespace:?}: the Role must grant {resource}s/{verb}{scope} (see the Role in \
         deploy/base/rbac.yaml and the RoleBinding to the pod's service account): {message}",
        scope = verb_scope(resource, verb)
    )]
    Forbidden {
        /// The kind of object: `configmap`, or `lease` (the lease layout).
        resource: &'static str,
        /// The verb refused: get, list, watch, create, update or delete.
        verb: &'static str,
        /// The object's name.
        name: String,
        /// The namespace.
        namespace: String,
        /// The apiserver's message.
        message: String,
    },
    /// Every compare-and-swap attempt met a concurrent write (HTTP 409).
    #[error(
        "conflict: configmap {name:?} in namespace {namespace:?} changed under each of {attempts} \
         attempts to update it; too many concurrent writers (or a controller rewriting it): the \
         caller retries later"
    )]
    Conflict {
        /// How many attempts were made.
        attempts: u32,
        /// The ConfigMap's name.
        name: String,
        /// The namespace.
        namespace: String,
    },
    /// The apiserver is down, unreachable, overloaded (429) or failing (5xx).
    #[error(
        "unavailable: cannot {verb} {resource} {name:?} in namespace {namespace:?}: {why}; check \
         the apiserver and the pod's network; the sidecar retries with backoff",
        why = describe_kube_error(source)
    )]
    Unavailable {
        /// The kind of object: `configmap`, or `lease` (the lease layout).
        resource: &'static str,
        /// The verb that failed.
        verb: &'static str,
        /// The object's name.
        name: String,
        /// The namespace.
        namespace: String,
        /// The underlying error.
        #[source]
        source: Box<kube::Error>,
    },
    /// The write would make the ConfigMap larger than this crate accepts.
    #[error(
        "too large: the registry configmap would grow to {bytes} bytes ({kib} KiB), over the \
         {max_kib} KiB size this sidecar writes (Kubernetes refuses more than 1 MiB); remove \
         stale member.* keys or large unknown keys from the configmap",
        kib = bytes / 1024,
        max_kib = crate::schema::MAX_BYTES / 1024
    )]
    TooLarge {
        /// The encoded size the write would have produced.
        bytes: usize,
    },
    /// The record given to `upsert` cannot be stored.
    #[error("invalid member record for pod {pod:?}: {reason}")]
    InvalidRecord {
        /// The record's pod name.
        pod: String,
        /// What is wrong.
        reason: String,
    },
    /// Any other Kubernetes API error.
    #[error("kubernetes API error: {}", describe_kube_error(.0))]
    Kube(#[source] kube::Error),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A kube error as one sentence that names its cause. A transport failure reads
/// `cannot reach the apiserver: connection refused (tcp connect error: Connection
/// refused (os error 111))` (see [`cause_of`](crate::cause_of)) instead of kube's
/// `ServiceError: client error (Connect)`; an apiserver answer reads `the apiserver
/// answered HTTP 503 ServiceUnavailable: <its message>`. Every message about a
/// failed apiserver call, here and in the sidecar, is built with this function.
pub fn describe_kube_error(err: &kube::Error) -> String {
    match err {
        // Made up locally (a watcher with no resourceVersion): no HTTP answer.
        kube::Error::Api(status) if status.code == 0 => {
            format!("{}: {}", status.reason, status.message)
        }
        kube::Error::Api(status) => {
            let reason = if status.reason.is_empty() {
                String::new()
            } else {
                format!(" {}", status.reason)
            };
            format!(
                "the apiserver answered HTTP {}{reason}: {}",
                status.code, status.message
            )
        }
        kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::ReadEvents(_) => {
            format!("cannot reach the apiserver: {}", crate::cause_of(err))
        }
        other => {
            let cause = crate::cause_of(other);
            let outer = other.to_string();
            match cause.kind {
                crate::CauseKind::Other if outer.contains(&cause.detail) => outer,
                _ => format!("{outer}: {cause}"),
            }
        }
    }
}

fn verb_scope(resource: &str, verb: &str) -> &'static str {
    match (resource, verb) {
        (_, "create") => " (create cannot be restricted by resourceNames)",
        ("lease", _) => {
            " in the namespace (the lease layout: get, list, watch, create, update and delete \
             on leases; see the chart's registry.layout)"
        }
        _ => " on the registry's name",
    }
}

impl Error {
    /// Every label [`Error::kind`] gives, so that a metric can export each one
    /// at zero before the first error.
    pub const KINDS: [&'static str; 6] = [
        "forbidden",
        "conflict",
        "unavailable",
        "too_large",
        "invalid_record",
        "kube",
    ];

    /// A short, stable label for metrics: `forbidden`, `conflict`, `unavailable`,
    /// `too_large`, `invalid_record` or `kube`.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Forbidden { .. } => "forbidden",
            Error::Conflict { .. } => "conflict",
            Error::Unavailable { .. } => "unavailable",
            Error::TooLarge { .. } => "too_large",
            Error::InvalidRecord { .. } => "invalid_record",
            Error::Kube(_) => "kube",
        }
    }

    /// Classifies a kube error from `verb` on the ConfigMap `namespace/name`.
    pub(crate) fn from_kube(
        err: kube::Error,
        verb: &'static str,
        namespace: &str,
        name: &str,
    ) -> Self {
        Self::from_kube_on("configmap", err, verb, namespace, name)
    }

    /// Classifies a kube error from `verb` on the `resource` (`configmap`,
    /// `lease`) `namespace/name`.
    pub(crate) fn from_kube_on(
        resource: &'static str,
        err: kube::Error,
        verb: &'static str,
        namespace: &str,
        name: &str,
    ) -> Self {
        let unavailable = match &err {
            kube::Error::Api(status) if status.is_forbidden() => {
                return Error::Forbidden {
                    resource,
                    verb,
                    name: name.to_owned(),
                    namespace: namespace.to_owned(),
                    message: status.message.clone(),
                };
            }
            kube::Error::Api(status) => status.code == 429 || status.code >= 500,
            kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::ReadEvents(_) => {
                true
            }
            _ => false,
        };
        if unavailable {
            Error::Unavailable {
                resource,
                verb,
                name: name.to_owned(),
                namespace: namespace.to_owned(),
                source: Box::new(err),
            }
        } else {
            Error::Kube(err)
        }
    }

    /// Classifies a watcher error on the ConfigMap `namespace/name`.
    pub(crate) fn from_watcher(err: watcher::Error, namespace: &str, name: &str) -> Self {
        Self::from_watcher_on("configmap", err, namespace, name)
    }

    /// Classifies a watcher error on `resource` objects (`name`: the object,
    /// or a description of the set watched) in `namespace`.
    pub(crate) fn from_watcher_on(
        resource: &'static str,
        err: watcher::Error,
        namespace: &str,
        name: &str,
    ) -> Self {
        let kube = |e, verb| Self::from_kube_on(resource, e, verb, namespace, name);
        match err {
            watcher::Error::InitialListFailed(e) => kube(e, "list"),
            watcher::Error::WatchStartFailed(e) | watcher::Error::WatchFailed(e) => {
                kube(e, "watch")
            }
            watcher::Error::WatchError(status) => kube(kube::Error::Api(status), "watch"),
            watcher::Error::NoResourceVersion => Error::Kube(kube::Error::Api(
                kube::core::Status::failure(
                    "no metadata.resourceVersion in a watch result",
                    "NoResourceVersion",
                )
                .boxed(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::Status;

    fn api(code: u16, reason: &str) -> kube::Error {
        kube::Error::Api(Status::failure("msg", reason).with_code(code).boxed())
    }

    #[test]
    fn classification_and_messages() {
        let e = Error::from_kube(api(403, "Forbidden"), "create", "ns", "cm");
        assert_eq!(e.kind(), "forbidden");
        let msg = e.to_string();
        assert!(msg.contains("configmaps/create"), "{msg}");
        assert!(msg.contains("deploy/"), "{msg}");
        assert_eq!(
            Error::from_kube(api(503, ""), "get", "ns", "cm").kind(),
            "unavailable"
        );
        assert_eq!(
            Error::from_kube(api(429, ""), "get", "ns", "cm").kind(),
            "unavailable"
        );
        assert_eq!(
            Error::from_kube(api(422, "Invalid"), "update", "ns", "cm").kind(),
            "kube"
        );
        let e = Error::from_watcher(
            watcher::Error::WatchError(Status::failure("m", "Forbidden").with_code(403).boxed()),
            "ns",
            "cm",
        );
        assert!(e.to_string().contains("configmaps/watch"), "{e}");
        let big = Error::TooLarge { bytes: 1_000_000 };
        assert!(big.to_string().contains("KiB"));
        assert!(big.to_string().contains("size"));
        let c = Error::Conflict {
            attempts: 20,
            name: "cm".into(),
            namespace: "ns".into(),
        };
        assert!(c.to_string().contains("20 attempts"));
        assert_eq!(c.kind(), "conflict");
    }

    #[test]
    fn kinds_lists_the_kind_of_every_variant() {
        let all = [
            Error::from_kube(api(403, "Forbidden"), "get", "ns", "cm"),
            Error::Conflict {
                attempts: 1,
                name: "cm".into(),
                namespace: "ns".into(),
            },
            Error::from_kube(api(503, ""), "get", "ns", "cm"),
            Error::TooLarge { bytes: 1 },
            Error::InvalidRecord {
                pod: "p".into(),
                reason: "r".into(),
            },
            Error::from_kube(api(422, "Invalid"), "update", "ns", "cm"),
        ];
        let kinds: Vec<&str> = all.iter().map(Error::kind).collect();
        assert_eq!(kinds, Error::KINDS);
    }

    #[test]
    fn an_unreachable_apiserver_is_named_with_the_root_cause() {
        // kube's own Display stops at "ServiceError: client error (Connect)".
        #[derive(Debug, thiserror::Error)]
        #[error("client error (Connect)")]
        struct Client(#[source] Connect);
        #[derive(Debug, thiserror::Error)]
        #[error("tcp connect error")]
        struct Connect(#[source] std::io::Error);
        let refused = std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "Connection refused (os error 111)",
        );
        let err = kube::Error::Service(Box::new(Client(Connect(refused))));
        assert_eq!(
            describe_kube_error(&err),
            "cannot reach the apiserver: connection refused (tcp connect error: Connection \
             refused (os error 111))"
        );
        let e = Error::from_kube(err, "get", "ns", "cm");
        assert_eq!(e.kind(), "unavailable");
        let msg = e.to_string();
        assert!(
            msg.contains(
                "cannot get configmap \"cm\" in namespace \"ns\": cannot reach the \
                 apiserver: connection refused (tcp connect error: Connection refused"
            ),
            "{msg}"
        );
        assert!(!msg.contains("client error (Connect)"), "{msg}");
        let busy = Error::from_kube(api(503, "ServiceUnavailable"), "get", "ns", "cm");
        assert!(
            busy.to_string()
                .contains("the apiserver answered HTTP 503 ServiceUnavailable: msg"),
            "{busy}"
        );
    }
}
