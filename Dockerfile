# flagsmith-sse: a static binary on an empty base image.
#
#   docker build -t flagsmith-sse .
#   podman build --format docker -t flagsmith-sse .   # podman's default OCI format drops HEALTHCHECK
#   docker run --rm -p 8000:8000 -e SSE_AUTHENTICATION_TOKEN=change-me flagsmith-sse
#
# The final image holds one statically linked (musl) executable and the CA bundle it trusts for
# rediss:// (mount another and set SSL_CERT_FILE for a private CA), nothing else: no shell, no
# package manager, no libc. It runs as an unprivileged user (65532). Expect about 3 MB.
#
# Stages: `build` compiles for the machine's own architecture (the dependencies in a layer of
# their own, so that a change to src/ does not rebuild them); the last stage is the default
# image. `release` instead takes binaries built beforehand from dist/<arch>/ (the release
# workflow builds them natively per architecture and makes a multi-arch image of them).

FROM docker.io/library/rust:1-slim-bookworm AS build
# musl-tools: a C compiler for the musl target, which ring (TLS) needs.
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add "$(uname -m)-unknown-linux-musl"
WORKDIR /src
# Cargo features: tls (rediss://, REDIS_USE_SSL) and cluster (USE_CLUSTER_MODE).
ARG FEATURES=tls,cluster
# The dependencies alone, against placeholder sources: this layer is reused until Cargo.toml,
# Cargo.lock or FEATURES change.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches/load \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && echo 'fn main() {}' > benches/load/main.rs \
 && echo 'fn main() {}' > benches/micro.rs \
 && cargo build --release --locked --target "$(uname -m)-unknown-linux-musl" --features "$FEATURES" \
 && rm -rf src benches
COPY src ./src
COPY benches ./benches
# The same command as .ci/docker-build (which CI runs, since no container engine is available
# there). `touch`: the copied sources may look older than the placeholders just built.
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --target "$(uname -m)-unknown-linux-musl" --features "$FEATURES" \
 && cp "target/$(uname -m)-unknown-linux-musl/release/flagsmith-sse" /flagsmith-sse

# The CA bundle (the same file on every architecture, so taken from the build machine's own).
FROM --platform=$BUILDPLATFORM docker.io/library/rust:1-slim-bookworm AS certs

FROM scratch AS base
COPY --from=certs /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
USER 65532:65532
ENV PORT=8000
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 CMD ["/flagsmith-sse", "--healthcheck"]
ENTRYPOINT ["/flagsmith-sse"]

# docker buildx build --target release --platform linux/amd64,linux/arm64 . (with
# dist/amd64/flagsmith-sse and dist/arm64/flagsmith-sse in place).
FROM base AS release
ARG TARGETARCH
COPY dist/${TARGETARCH}/flagsmith-sse /flagsmith-sse

FROM base
COPY --from=build /flagsmith-sse /flagsmith-sse
