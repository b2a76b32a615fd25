#!/usr/bin/env bash
# Installs the few system tools the test bed and demo use, if missing (Debian):
# the real node needs runc, the CNI plugins, nftables (kube-proxy) and a static
# busybox (the shell of the locally assembled geth image).
set -euo pipefail
missing=()
for pair in ip:iproute2 setpriv:util-linux openssl:openssl ps:procps \
  runc:runc nft:nftables; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
done
# The real node: CNI plugins (bridge, host-local, loopback) for containerd.
[[ -x /usr/lib/cni/bridge ]] || missing+=(containernetworking-plugins)
dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "system-deps: missing ${missing[*]}; install them (needs root)" >&2; exit 1
  fi
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
command -v go >/dev/null || { echo "system-deps: Go >= 1.26 is required (test bed builds)" >&2; exit 1; }
command -v cargo >/dev/null || { echo "system-deps: Rust (cargo) is required" >&2; exit 1; }
if [[ $(id -u) -ne 0 ]]; then
  echo "system-deps: the end-to-end tests create network namespaces: run as root" >&2; exit 1
fi
