//! Typed JSON-RPC client for geth's admin API over IPC, HTTP and WebSocket.
//!
//! Without the default `client` feature this crate is only the data types
//! ([`Enode`], [`NodeId`], [`Host`], [`NodeInfo`], [`PeerInfo`], [`PeerEvent`]): no
//! tokio, no I/O. With it, [`GethClient`] implements [`AdminApi`] over an
//! [`Endpoint`]: geth's IPC socket (framing implemented here), HTTP or WebSocket.
//! The `fake` feature adds `fake::FakeGeth`, an in-memory `AdminApi` that models
//! geth's peer handling on a shared in-memory network (`fake::FakeNet`); the
//! `test-utils` feature adds it and `MockAdminApi` (mockall).
#![cfg_attr(
    feature = "client",
    doc = r#"
```no_run
use geth_ipc::{AdminApi, ClientOptions, GethClient};

# async fn demo() -> geth_ipc::Result<()> {
let geth = GethClient::connect("/data/geth.ipc".parse()?, ClientOptions::default()).await?;
let me = geth.node_info().await?;
for peer in geth.peers().await? {
    println!("{} {} eth ready: {}", me.id.short(), peer.id.short(), peer.eth_ready());
}
# Ok(())
# }
```
"#
)]
#![forbid(unsafe_code)]

mod enode;
mod types;

#[cfg(feature = "client")]
mod client;
#[cfg(feature = "client")]
mod endpoint;
#[cfg(feature = "client")]
mod error;
#[cfg(all(feature = "client", any(test, feature = "fake")))]
pub mod fake;
#[cfg(feature = "client")]
mod framing;
#[cfg(feature = "client")]
mod ipc;
#[cfg(feature = "client")]
mod socket_watch;

pub use enode::{Enode, EnodeError, Host, NodeId, geth_throttles_inbound_from};
pub use types::{NodeInfo, PeerEvent, PeerEventKind, PeerInfo, PeerNetwork, Ports};

#[cfg(all(feature = "client", any(test, feature = "test-utils")))]
pub use client::MockAdminApi;
#[cfg(feature = "client")]
pub use client::{AdminApi, ClientOptions, GethClient, PeerEventStream};
#[cfg(feature = "client")]
pub use endpoint::Endpoint;
#[cfg(feature = "client")]
pub use error::{Error, Result};
#[cfg(feature = "client")]
pub use socket_watch::{
    REACHABLE_FAST_FOR, REACHABLE_POLL, REACHABLE_POLL_MAX, reachable_poll, socket_accepts_again,
};

/// The examples of this crate's README.md, run as doc tests.
#[cfg(all(doctest, feature = "fake"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
