#!/usr/bin/env bash
# The main job: a local demo mesh on this machine (needs root for network
# namespaces). Sets everything up on a fresh machine first.
#   scripts/demo.sh                 3 nodes, live table; type commands (k/m/c/r/a/q)
#   scripts/demo.sh --nodes 5
#   scripts/demo.sh --once          exit once the mesh is full (used by CI)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/system-deps.sh
testbed/provision.sh >/dev/null
cargo build --locked -p sidecar-bin -p integration-tests --bin geth-peer-sidecar --bin demo
exec target/debug/demo "$@"
