//! The shared peer registry: a trait and its Kubernetes ConfigMap implementation.
//!
//! Without the default `kube` feature this crate is only the record types
//! ([`MemberRecord`], [`Snapshot`]) and the schema: no kube, no tokio, no I/O.
#![forbid(unsafe_code)]

mod record;

pub use record::{MemberRecord, Snapshot};
