//! Typed JSON-RPC client for geth's admin API over IPC, HTTP and WebSocket.
//!
//! Without the default `client` feature this crate is only the data types
//! ([`Enode`], [`NodeId`], [`Host`]): no tokio, no I/O.
#![forbid(unsafe_code)]

mod enode;

pub use enode::{Enode, EnodeError, Host, NodeId};
