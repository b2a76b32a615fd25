//! geth-peer-sidecar (work in progress).
#![forbid(unsafe_code)]

fn main() {}
