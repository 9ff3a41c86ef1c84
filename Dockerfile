# Multi-stage build: compile in the Rust image, run from a slim image as a non-root user.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked --bin switchyard \
    && strip target/release/switchyard

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin switchyard
COPY --from=build /src/target/release/switchyard /usr/local/bin/switchyard
COPY config /etc/switchyard
USER 10001:10001
EXPOSE 8080 9901
HEALTHCHECK --interval=10s --timeout=3s CMD curl -fsS http://127.0.0.1:9901/healthz || exit 1
ENTRYPOINT ["/usr/local/bin/switchyard"]
CMD ["run", "--config", "/etc/switchyard/switchyard.toml"]
