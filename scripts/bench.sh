#!/usr/bin/env bash
# Benchmarks on the real test bed; each prints a table. Needs root.
#   scripts/bench.sh          all (mesh, registry, steady, ipc, node, throttle)
#   scripts/bench.sh mesh     one of: mesh, registry, steady, ipc, node (the real kubelet node;
#                             it runs the image's static binary: scripts/lint-image.sh builds it)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/system-deps.sh
testbed/provision.sh >/dev/null
cargo build --release -p sidecar-bin
export GPS_SIDECAR_BIN=$PWD/target/release/geth-peer-sidecar
ls -l "$GPS_SIDECAR_BIN"
#                             throttle: re-mesh on 10.244/16 vs 100.64/10 pod ranges
benches=${1:-mesh registry steady ipc node throttle}
# The real node runs the image's static binary, built as the Dockerfile does.
[[ " $benches " == *" node "* ]] && scripts/lint-image.sh >/dev/null
for b in $benches; do
  cargo bench -p integration-tests --bench "$b"
done
