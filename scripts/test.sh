#!/usr/bin/env bash
# The whole test suite, from a fresh clone: system packages, the pinned test bed
# (geth, etcd, kube-apiserver built from the Go module proxy and cached outside
# the repo), formatting, lints, then every test. Needs root (network namespaces).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
t0=$SECONDS
step() { printf '\n==> %s (t=%ss)\n' "$*" "$((SECONDS - t0))"; }

step "system packages"
scripts/system-deps.sh

step "test bed"
testbed/provision.sh >/dev/null

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "supply chain: cargo deny (licenses, bans, sources; advisories need GitHub, see deny.toml)"
CARGO_DENY_VERSION=0.20.2
if [[ "$(cargo deny --version 2>/dev/null)" != "cargo-deny $CARGO_DENY_VERSION" ]]; then
  cargo install cargo-deny --locked --version "$CARGO_DENY_VERSION"
fi
cargo deny --locked check licenses bans sources

step "build the sidecar binary (end-to-end tests run it as a pod would)"
cargo build --locked -p sidecar-bin
cargo build --locked -p geth-ipc --examples

step "the runtime embedded as a library (examples/embed.rs)"
cargo run --locked -q -p sidecar-runtime --example embed

step "image checks: hadolint on the Dockerfile, static release binary, sizes"
scripts/lint-image.sh

step "cargo test"
# The end-to-end tests start one apiserver and several geth nodes each: cap
# parallelism so two cores are not oversubscribed into timeouts.
cargo test --workspace --locked --no-fail-fast -- --test-threads "${TEST_THREADS:-3}"

step "done in $((SECONDS - t0)) s"
