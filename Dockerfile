# flagsmith-sse: a static binary on an empty base image.
#
#   docker build -t flagsmith-sse .
#   docker run --rm -p 8000:8000 -e SSE_AUTHENTICATION_TOKEN=change-me flagsmith-sse
#
# The final image holds one statically linked (musl) executable and the CA bundle it trusts for
# rediss:// (mount another and set SSL_CERT_FILE for a private CA), nothing else: no shell, no
# package manager, no libc. It runs as an unprivileged user. Expect an image of about 3 MB.

FROM rust:1-slim-bookworm AS build
# musl-tools: a C compiler for the musl target, which ring (TLS) needs.
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY tests ./tests
# Cargo features: tls (rediss://, REDIS_USE_SSL) and cluster (USE_CLUSTER_MODE).
ARG FEATURES=tls,cluster
# The same command as .ci/docker-build (which CI runs, since no Docker engine is available there).
RUN cargo build --release --locked --target x86_64-unknown-linux-musl --features "$FEATURES" \
 && cp target/x86_64-unknown-linux-musl/release/flagsmith-sse /flagsmith-sse

FROM scratch
COPY --from=build /flagsmith-sse /flagsmith-sse
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
USER 65532:65532
ENV PORT=8000
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 CMD ["/flagsmith-sse", "--healthcheck"]
ENTRYPOINT ["/flagsmith-sse"]
