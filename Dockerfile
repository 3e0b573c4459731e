# syntax=docker/dockerfile:1
#
# tokend's container image: a static-ish Rust binary on distroless (glibc, no shell).
#
#   docker build -t ghcr.io/tokend/tokend:0.1.0 --build-arg VERSION=0.1.0 \
#     --build-arg REVISION="$(git rev-parse HEAD)" .
#
# The binary listens on 127.0.0.1 and uses ./tokend.db unless told otherwise; the Helm chart
# (helm/tokend) passes --config with listen = "0.0.0.0:50051". Standalone:
#
#   docker run --rm -p 50051:50051 -v tokend-data:/data \
#     -e TOKEND_LISTEN=0.0.0.0:50051 -e 'TOKEND_DATABASE_URL=sqlite:///data/tokend.db?mode=rwc' \
#     ghcr.io/tokend/tokend:0.1.0
#
# (the volume must be writable by uid 65532).

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS build
WORKDIR /src
# Everything cargo needs to build the package: the manifest and lock file, build.rs and the
# .proto files it compiles (protox: no protoc), the sources, and the bench and example targets
# the manifest declares or auto-discovers (cargo refuses a manifest whose targets are missing).
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
COPY src ./src
COPY benches ./benches
COPY examples ./examples
# BuildKit cache mounts keep the crate registry and the target directory between builds, so
# a source change rebuilds tokend, not its hundreds of dependencies (nor bundled SQLite's C
# code). The binary is copied out of the cache mount, which ends up in no layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin tokend \
 && install -D -m 0755 target/release/tokend /out/tokend \
 && mkdir -p /out/data

FROM ${RUNTIME_IMAGE}
ARG RUNTIME_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="tokend" \
      org.opencontainers.image.description="Issues, lists, revokes and introspects personal access tokens and organisation API keys over gRPC" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="${RUNTIME_IMAGE}"
COPY --from=build /out/tokend /usr/local/bin/tokend
# A data directory the non-root user owns: a volume mounted here (the `docker run` example
# at the top, or SQLite without the chart) starts out writable.
COPY --from=build --chown=65532:65532 /out/data /data
WORKDIR /home/nonroot
# distroless "nonroot": uid and gid 65532, the ids the Helm chart's securityContext uses.
USER 65532:65532
# gRPC. Metrics (9090) and the plaintext health port (50052) listen only when configured
# (metrics.listen, health_listen), as the Helm chart does.
EXPOSE 50051
ENTRYPOINT ["/usr/local/bin/tokend"]
CMD ["serve"]
