//! Integration tests against the real test bed.
