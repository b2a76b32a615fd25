//! peer-registry (work in progress).
#![forbid(unsafe_code)]
