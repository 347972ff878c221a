# flagsmith-sse: a static binary on an empty base image.
#
#   docker build -t flagsmith-sse .
#   docker run --rm -p 8000:8000 -e SSE_AUTHENTICATION_TOKEN=change-me flagsmith-sse
#
# The final image holds one statically linked (musl) executable and nothing else: no shell, no
# package manager, no libc. It runs as an unprivileged user. Expect an image of about 3-5 MB.

FROM rust:1-slim-bookworm AS build
RUN rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY tests ./tests
# The same command as .ci/docker-build (which CI runs, since no Docker engine is available there).
RUN cargo build --release --locked --target x86_64-unknown-linux-musl \
 && cp target/x86_64-unknown-linux-musl/release/flagsmith-sse /flagsmith-sse

FROM scratch
COPY --from=build /flagsmith-sse /flagsmith-sse
USER 65532:65532
ENV PORT=8000
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 CMD ["/flagsmith-sse", "--healthcheck"]
ENTRYPOINT ["/flagsmith-sse"]
