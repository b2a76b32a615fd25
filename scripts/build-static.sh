#!/usr/bin/env bash
# Builds the image's static release binary (glibc static-pie, +crt-static) for
# one architecture from any build host: what the Dockerfile's build stage runs
# for $TARGETARCH, and what scripts/lint-image.sh checks for both.
#
#   scripts/build-static.sh amd64|arm64      # prints the binary's path
#
# Cross linkers are Debian's: gcc-aarch64-linux-gnu + libc6-dev-arm64-cross
# (arm64 from amd64), gcc-x86-64-linux-gnu + libc6-dev-amd64-cross (amd64 from
# arm64). CARGO_TARGET_DIR is honoured.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

case "${1:-}" in
  amd64) triple=x86_64-unknown-linux-gnu; gnu=x86_64-linux-gnu; pkgs="gcc-x86-64-linux-gnu libc6-dev-amd64-cross" ;;
  arm64) triple=aarch64-unknown-linux-gnu; gnu=aarch64-linux-gnu; pkgs="gcc-aarch64-linux-gnu libc6-dev-arm64-cross" ;;
  *) echo "usage: $0 amd64|arm64" >&2; exit 2 ;;
esac
die() { printf '[build-static] %s\n' "$*" >&2; exit 1; }

command -v "$gnu-gcc" >/dev/null \
  || die "$gnu-gcc (the $1 linker) is missing: apt-get install $pkgs (scripts/system-deps.sh does)"
if ! rustup target list --installed 2>/dev/null | grep -qx "$triple"; then
  printf '[build-static] rustup target add %s\n' "$triple" >&2
  rustup target add "$triple" >&2 || die "cannot add the Rust target $triple (rustup target add $triple)"
fi

upper=$(tr 'a-z-' 'A-Z_' <<<"$triple")
export "CARGO_TARGET_${upper}_LINKER=$gnu-gcc"
export "CC_${triple//-/_}=$gnu-gcc" "AR_${triple//-/_}=$gnu-ar"
export RUSTFLAGS="-C target-feature=+crt-static"
cargo build --release --locked -p sidecar-bin --target "$triple" >&2
echo "${CARGO_TARGET_DIR:-target}/$triple/release/geth-peer-sidecar"
