#!/usr/bin/env bash
# Installs the few system tools the test bed and demo use, if missing (Debian):
# gcc and libc6-dev build geth with cgo; the real node needs runc, the CNI
# plugins, nftables (kube-proxy) and a static busybox (the shell of the locally
# assembled geth image); graphviz renders `status -o dot` in a node test. The image checks
# cross-compile the arm64 binary (Debian's cross gcc and arm64 libc) and run it
# under qemu-user; file and readelf prove both binaries static.
set -euo pipefail
missing=()
for pair in ip:iproute2 setpriv:util-linux openssl:openssl ps:procps \
  runc:runc nft:nftables dot:graphviz file:file readelf:binutils gcc:gcc \
  aarch64-linux-gnu-gcc:gcc-aarch64-linux-gnu qemu-aarch64-static:qemu-user-static; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
done
# The real node: CNI plugins (bridge, host-local, loopback) for containerd.
[[ -x /usr/lib/cni/bridge ]] || missing+=(containernetworking-plugins)
dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
# geth is built with cgo and linked statically, as its releases are.
dpkg -s libc6-dev >/dev/null 2>&1 || missing+=(libc6-dev)
dpkg -s libc6-dev-arm64-cross >/dev/null 2>&1 || missing+=(libc6-dev-arm64-cross)
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "system-deps: missing ${missing[*]}; install them (needs root)" >&2; exit 1
  fi
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
command -v go >/dev/null || { echo "system-deps: Go >= 1.26 is required (test bed builds)" >&2; exit 1; }
command -v cargo >/dev/null || { echo "system-deps: Rust (cargo) is required" >&2; exit 1; }
# The image's second architecture: the Rust standard library for arm64.
if ! rustup target list --installed 2>/dev/null | grep -qx aarch64-unknown-linux-gnu; then
  rustup target add aarch64-unknown-linux-gnu \
    || { echo "system-deps: cannot add the Rust target aarch64-unknown-linux-gnu (rustup target add)" >&2; exit 1; }
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "system-deps: the end-to-end tests create network namespaces: run as root" >&2; exit 1
fi
