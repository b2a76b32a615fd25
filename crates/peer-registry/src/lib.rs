//! The shared peer registry: a trait and its Kubernetes ConfigMap implementation.
//!
//! Without the default `kube` feature this crate is only the record types
//! ([`MemberRecord`], [`Snapshot`]) and the [`schema`] codec: no kube, no tokio,
//! no I/O. With it: the `PeerRegistry` trait, its `ConfigMapRegistry`
//! implementation (compare-and-swap writes that never lose an entry under
//! concurrent writers), and `LeaseRegistry`, the opt-in lease layout (one
//! Lease per member, for fleets of hundreds) and the crate `Error`. With `test-utils`: the mockall
//! mock `MockPeerRegistry`, `MemoryRegistry` (the ConfigMap implementation's
//! compare-and-swap code over an in-memory `MemoryStore`, for test harnesses) and
//! the `conformance` suite that any `PeerRegistry` must pass. The schema, the size ceiling, the retry policy and
//! the RBAC the implementation needs are described in the crate's README.md.
#![forbid(unsafe_code)]

mod cause;
mod record;
pub mod schema;

#[cfg(feature = "kube")]
mod configmap;
#[cfg(all(feature = "kube", any(test, feature = "test-utils")))]
pub mod conformance;
#[cfg(feature = "kube")]
mod error;
#[cfg(feature = "kube")]
mod lease;
#[cfg(feature = "kube")]
mod registry;

pub use cause::{Cause, CauseKind, cause_of};
pub use record::{MemberRecord, Snapshot};

#[cfg(all(feature = "kube", any(test, feature = "test-utils")))]
pub use configmap::memory::{MemoryRegistry, MemoryStore};
#[cfg(feature = "kube")]
pub use configmap::{ConfigMapRegistry, DEFAULT_NAME, RetryPolicy, WriteProtocol};
#[cfg(feature = "kube")]
pub use error::{Error, Result, describe_kube_error};
#[cfg(feature = "kube")]
pub use lease::{LeaseRegistry, MEMBER_ANNOTATION, REGISTRY_LABEL, lease_name, lease_selector};
#[cfg(all(feature = "kube", any(test, feature = "test-utils")))]
pub use registry::MockPeerRegistry;
#[cfg(feature = "kube")]
pub use registry::PeerRegistry;

/// The examples of this crate's README.md, run as doc tests.
#[cfg(all(doctest, feature = "test-utils"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
