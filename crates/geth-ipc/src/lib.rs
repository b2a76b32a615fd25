//! geth-ipc (work in progress).
#![forbid(unsafe_code)]
