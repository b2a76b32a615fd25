//! End-to-end tests on the real test bed. One binary, a module per area; shared
//! fixtures live in the `integration_tests` library.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs,
    unreachable_pub
)]

mod chaos;
mod connections;
mod dns;
mod embedded;
mod geth_ipc;
mod manifests;
mod mesh;
mod monitoring;
mod multiarch;
mod registry;
mod status;
mod testbed;
mod versions;
