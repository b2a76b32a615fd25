# syntax=docker/dockerfile:1
# Multi-arch image, linux/amd64 and linux/arm64:
#   docker buildx build --platform linux/amd64,linux/arm64 .
# The build stage always runs on the build host's own platform ($BUILDPLATFORM,
# no emulation) and cross-compiles a static (glibc static-pie) binary for
# $TARGETARCH with scripts/build-static.sh; the binary is copied onto
# distroless static of the target architecture: no shell, no package manager,
# non-root, and fine with a read-only root filesystem. The sidecar does no DNS
# lookups of its own for the apiserver (in-cluster it is reached by IP), so no
# NSS modules are needed.
FROM --platform=$BUILDPLATFORM rust:1.95-bookworm AS build
ARG TARGETARCH
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The cross toolchain for the target architecture, when it differs from the
# build host's (Debian bookworm packages, pinned).
RUN if [ "$(dpkg --print-architecture)" != "$TARGETARCH" ]; then \
      apt-get update; \
      case "$TARGETARCH" in \
        arm64) apt-get install -y --no-install-recommends gcc-aarch64-linux-gnu=4:12.2.0-3 libc6-dev-arm64-cross=2.36-8cross1 ;; \
        amd64) apt-get install -y --no-install-recommends gcc-x86-64-linux-gnu=4:12.2.0-3 libc6-dev-amd64-cross=2.36-8cross1 ;; \
        *) echo "TARGETARCH=$TARGETARCH is not supported: amd64 or arm64" >&2; exit 1 ;; \
      esac; \
      rm -rf /var/lib/apt/lists/*; \
    fi
WORKDIR /src
COPY . .
# scripts/build-static.sh: cargo build --release --locked -p sidecar-bin with
# RUSTFLAGS="-C target-feature=+crt-static" and the cross linker.
RUN cp "$(scripts/build-static.sh "$TARGETARCH")" /geth-peer-sidecar

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /geth-peer-sidecar /usr/local/bin/geth-peer-sidecar
USER 10001:10001
EXPOSE 9090
ENTRYPOINT ["/usr/local/bin/geth-peer-sidecar"]
