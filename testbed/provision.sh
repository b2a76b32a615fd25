#!/usr/bin/env bash
# Builds the test bed (geth, etcd, kube-apiserver, the manifest tools kubectl,
# kustomize, helm, and prometheus with promtool) from the Go module proxy at the
# versions pinned in versions.env, through the consumer modules in go/, and caches
# the binaries outside the repo. Idempotent: a second run with a warm cache only
# checks stamps and takes about a second.
#
#   testbed/provision.sh            build what is missing, print the bin directory
#   GPS_TESTBED_CACHE=/dir ...      use another cache directory
set -euo pipefail
shopt -s nullglob

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
cache=${GPS_TESTBED_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/geth-peer-sidecar/testbed}
mkdir -p "$cache/bin"

export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS="-buildvcs=false -mod=readonly"

need() { command -v "$1" >/dev/null 2>&1 || { echo "provision: '$1' is required: $2" >&2; exit 1; }; }
need go "install Go >= 1.26 (https://go.dev/doc/install)"
need ip "apt-get install iproute2 (network namespaces for per-node IPs)"
need setpriv "apt-get install util-linux (children die with the test process: --pdeathsig)"
need openssl "apt-get install openssl (service-account signing keys)"
need gcc "apt-get install gcc libc6-dev (geth is built with cgo, as its releases are)"

log() { printf '[provision %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# build NAME VERSION MODULE_DIR PACKAGE VERSION_REGEX [LDFLAGS] [VERSION_ARGS] [TAGS] [LINK]
# VERSION_ARGS (default --version) is how the binary is asked for its version.
# LINK (default NAME) is the name of its symlink in bin/.
build() {
  local name=$1 version=$2 mod=$3 pkg=$4 want=$5 ldflags=${6:-} vargs=${7:---version} tags=${8:-} link=${9:-$1}
  local dest="$cache/$name-$version"
  local stamp
  # The stamp covers the module, its own sources (if any), ldflags, tags and cgo.
  local sources=("$here/go/$mod/go.mod")
  [[ -f "$here/go/$mod/go.sum" ]] && sources+=("$here/go/$mod/go.sum")
  sources+=("$here/go/$mod"/*.go)
  local cgo=""
  [[ $CGO_ENABLED == 1 ]] && cgo=" cgo"
  stamp=$(cat "${sources[@]}" <(echo "$ldflags${tags:+ tags=$tags}$cgo") 2>/dev/null | sha256sum | cut -c1-16)
  if [[ -x "$dest/$name" && "$(cat "$dest/.stamp" 2>/dev/null)" == "$stamp" ]]; then
    log "$name $version: cached at $dest"
  else
    log "$name $version: building (cold builds take minutes on 2 cores)"
    local t0=$SECONDS
    mkdir -p "$dest"
    (cd "$here/go/$mod" && go build -trimpath -tags "$tags" -ldflags "-s -w $ldflags" -o "$dest/$name.tmp" "$pkg")
    # Refuse a binary that does not report the pinned version (go get once
    # resolved a newer release behind our back).
    # The output is captured first: piped into `head | grep -q`, a binary
    # still writing when head exits dies of SIGPIPE, which pipefail turned into
    # a failed check (seen once, on containerd-shim-runc-v2's 5-line -v).
    local says
    # shellcheck disable=SC2086 # vargs is a word list
    says=$("$dest/$name.tmp" $vargs 2>&1 || true)
    if ! grep -qE "$want" <<<"$(head -3 <<<"$says")"; then
      echo "provision: $name reports '$(head -1 <<<"$says")', expected $version" >&2
      exit 1
    fi
    mv -f "$dest/$name.tmp" "$dest/$name"
    echo "$stamp" > "$dest/.stamp"
    log "$name $version: built in $((SECONDS - t0)) s"
  fi
  ln -sfn "$dest/$name" "$cache/bin/$link"
}

k8s_minor=$(echo "$KUBERNETES_VERSION" | cut -d. -f2)
k8s_ldflags="-X k8s.io/component-base/version.gitVersion=$KUBERNETES_VERSION \
-X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$k8s_minor"

t_all=$SECONDS
# geth --version prints "geth version X"; the version subcommand prints "Version: X".
# Built as geth's own releases and image are (build/ci.go install -static): with
# cgo, so libsecp256k1 and c-kzg are in, linked statically, with Go's resolver
# and user lookup. Without cgo its RLPx handshakes run on the pure-Go secp256k1:
# at N=30 the mesh bench measured 2.2 s of geth CPU against 1.4 s with cgo.
CGO_ENABLED=1 build geth "$GETH_VERSION" geth github.com/ethereum/go-ethereum/cmd/geth "^Version: ${GETH_VERSION#v}-stable$" \
  "-extldflags=-static" version "urfave_cli_no_docs,ckzg,osusergo,netgo"
ln -sfn "$cache/geth-$GETH_VERSION/geth" "$cache/bin/geth-$GETH_VERSION"
# The geth version matrix (tests/it/versions.rs), built the same way, each from
# its own consumer module, linked as bin/geth-<version> and bin/op-geth-<version>
# (bin/geth stays GETH_VERSION, the default of every other test).
geth_tags="urfave_cli_no_docs,ckzg,osusergo,netgo"
CGO_ENABLED=1 build geth "$GETH_1_16_VERSION" geth-1.16 github.com/ethereum/go-ethereum/cmd/geth \
  "^Version: ${GETH_1_16_VERSION#v}-stable$" "-extldflags=-static" version "$geth_tags" "geth-$GETH_1_16_VERSION"
CGO_ENABLED=1 build geth "$GETH_LATEST_VERSION" geth-latest github.com/ethereum/go-ethereum/cmd/geth \
  "^Version: ${GETH_LATEST_VERSION#v}-stable$" "-extldflags=-static" version "$geth_tags" "geth-$GETH_LATEST_VERSION"
# op-geth reports its own version only when told its tag (its build/ci.go sets
# version.gitTag; without it it says 0.1.0-untagged); the upstream geth it is
# based on is in its `version` output as "Upstream Version".
CGO_ENABLED=1 build op-geth "$OP_GETH_VERSION" op-geth github.com/ethereum/go-ethereum/cmd/geth \
  "^Version: ${OP_GETH_VERSION#v}-stable$" "-extldflags=-static -X github.com/ethereum/go-ethereum/version.gitTag=$OP_GETH_VERSION" \
  version "$geth_tags" "op-geth-$OP_GETH_VERSION"
build etcd "$ETCD_VERSION" etcd go.etcd.io/etcd/server/v3 "Version: ${ETCD_VERSION#v}"
build kube-apiserver "$KUBERNETES_VERSION" kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver "$KUBERNETES_VERSION\$" \
  "$k8s_ldflags -X k8s.io/component-base/version/verflag.programName=kube-apiserver"
# Manifest tools (deploy/ and charts/ are checked against the real apiserver).
build kubectl "$KUBERNETES_VERSION" kube-apiserver k8s.io/kubernetes/cmd/kubectl "^Client Version: $KUBERNETES_VERSION\$" \
  "$k8s_ldflags" "version --client"
# kustomize reads its own version from the module's build info: no ldflags.
build kustomize "$KUSTOMIZE_VERSION" kustomize sigs.k8s.io/kustomize/kustomize/v5 "^$KUSTOMIZE_VERSION\$" "" version
build helm "$HELM_VERSION" helm helm.sh/helm/v4/cmd/helm "^$HELM_VERSION(\\+|\$)" \
  "-X helm.sh/helm/v4/internal/version.version=$HELM_VERSION -X helm.sh/helm/v4/internal/version.gitTreeState=clean" \
  "version --short"
# Prometheus and promtool from one module. Module v0.3XX.Y is release 3.XX.Y; the
# release is stamped in as Prometheus' own builds do (promu). Only the Kubernetes
# service discovery is built in and no web UI assets: the tests use the HTTP API.
prom_minor=${PROMETHEUS_VERSION#v0.}
prom_release="3.$((${prom_minor%%.*} - 300)).${prom_minor#*.}"
prom_ldflags="-X github.com/prometheus/common/version.Version=$prom_release \
-X github.com/prometheus/common/version.Branch=$PROMETHEUS_VERSION"
for tool in prometheus promtool; do
  build "$tool" "$PROMETHEUS_VERSION" prometheus "github.com/prometheus/prometheus/cmd/$tool" \
    "^$tool, version ${prom_release//./\\.} " "$prom_ldflags" --version "remove_all_sd,enable_kubernetes_sd"
done

# The real node (kubelet + containerd): the node components from their own
# consumer module of the same Kubernetes release, containerd v2 (the CRI plugin
# is built in), and the pod sandbox program of the locally assembled pause image.
for component in kubelet kube-controller-manager kube-scheduler kube-proxy; do
  build "$component" "$KUBERNETES_VERSION" kube-node "k8s.io/kubernetes/cmd/$component" "$KUBERNETES_VERSION\$" \
    "$k8s_ldflags -X k8s.io/component-base/version/verflag.programName=$component"
done
containerd_ldflags="-X github.com/containerd/containerd/v2/version.Version=$CONTAINERD_VERSION"
containerd_tags="no_btrfs no_devmapper no_zfs no_aufs"
build containerd "$CONTAINERD_VERSION" containerd github.com/containerd/containerd/v2/cmd/containerd \
  " $CONTAINERD_VERSION( |\$)" "$containerd_ldflags" --version "$containerd_tags"
build containerd-shim-runc-v2 "$CONTAINERD_VERSION" containerd github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2 \
  "Version: +$CONTAINERD_VERSION" "$containerd_ldflags" -v "$containerd_tags"
build ctr "$CONTAINERD_VERSION" containerd github.com/containerd/containerd/v2/cmd/ctr \
  " $CONTAINERD_VERSION(\$| )" "$containerd_ldflags" --version "$containerd_tags"
build pause "$PAUSE_VERSION" pause gps-testbed/pause "^pause gps-testbed ${PAUSE_VERSION#v}\$" "" -v

cat > "$cache/versions.env" <<VERS
GETH_VERSION=$GETH_VERSION
GETH_1_16_VERSION=$GETH_1_16_VERSION
GETH_LATEST_VERSION=$GETH_LATEST_VERSION
OP_GETH_VERSION=$OP_GETH_VERSION
ETCD_VERSION=$ETCD_VERSION
KUBERNETES_VERSION=$KUBERNETES_VERSION
KUSTOMIZE_VERSION=$KUSTOMIZE_VERSION
HELM_VERSION=$HELM_VERSION
CONTAINERD_VERSION=$CONTAINERD_VERSION
PAUSE_VERSION=$PAUSE_VERSION
PROMETHEUS_VERSION=$PROMETHEUS_VERSION
VERS
log "test bed ready in $((SECONDS - t_all)) s: $cache/bin"
echo "$cache/bin"
