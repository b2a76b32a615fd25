# syntax=docker/dockerfile:1
# Static (glibc static-pie) release build on a pinned Rust image, copied onto a
# distroless static base: no shell, no package manager, non-root, and fine with
# a read-only root filesystem. The sidecar does no DNS lookups of its own for
# the apiserver (in-cluster it is reached by IP), so no NSS modules are needed.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
ENV RUSTFLAGS="-C target-feature=+crt-static"
RUN cargo build --release --locked -p sidecar-bin --target x86_64-unknown-linux-gnu \
 && cp target/x86_64-unknown-linux-gnu/release/geth-peer-sidecar /geth-peer-sidecar

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /geth-peer-sidecar /usr/local/bin/geth-peer-sidecar
USER 10001:10001
EXPOSE 9090
ENTRYPOINT ["/usr/local/bin/geth-peer-sidecar"]
