#!/usr/bin/env bash
# Benchmarks on the real test bed; each prints a table. Needs root.
#   scripts/bench.sh          all (mesh, registry, ipc)
#   scripts/bench.sh mesh     one of: mesh, registry, ipc
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/system-deps.sh
testbed/provision.sh >/dev/null
cargo build --release -p sidecar-bin
export GPS_SIDECAR_BIN=$PWD/target/release/geth-peer-sidecar
ls -l "$GPS_SIDECAR_BIN"
for b in ${1:-mesh registry ipc}; do
  cargo bench -p integration-tests --bench "$b"
done
