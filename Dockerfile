# syntax=docker/dockerfile:1

# ---------------------------------------------------------------------------
# Build stage
# ---------------------------------------------------------------------------
FROM rust:1-bookworm AS build
WORKDIR /build

# Dependency-caching layer: build every dependency against a stub crate so that
# this layer is only invalidated when Cargo.toml / Cargo.lock change.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && mkdir -p config && touch config/default.toml \
 && cargo build --release --locked --bin browserfleet \
 && rm -rf src config \
           target/release/browserfleet \
           target/release/deps/browserfleet-* \
           target/release/deps/libbrowserfleet-* \
           target/release/.fingerprint/browserfleet-*

# Real sources (config/default.toml is compiled into the binary).
COPY src ./src
COPY config ./config
RUN cargo build --release --locked --bin browserfleet

# ---------------------------------------------------------------------------
# Runtime stage
# ---------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime

RUN apt-get update \
 && apt-get install -y --no-install-recommends \
        chromium \
        chromium-driver \
        tini \
        ca-certificates \
        curl \
 && rm -rf /var/lib/apt/lists/*

# Unprivileged user; Chromium needs a writable $HOME for its profile/cache.
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/browserfleet \
        --shell /usr/sbin/nologin browserfleet

COPY --from=build /build/target/release/browserfleet /usr/local/bin/browserfleet
COPY config/default.toml /etc/browserfleet/default.toml

ENV BROWSERFLEET__METRICS__LISTEN=0.0.0.0:9898
EXPOSE 9898

USER browserfleet
WORKDIR /home/browserfleet

HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD curl -fsS http://127.0.0.1:9898/healthz || exit 1

ENTRYPOINT ["/usr/bin/tini", "--", "browserfleet"]
CMD ["run"]
