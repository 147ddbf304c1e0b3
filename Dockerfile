# natter: one image for every deployment (gateway, notifier, migrate, ...).
#   docker build -t natter:$(git describe --always) .
# Base images are pinned by exact tag; pin by digest too (FROM image:tag@sha256:...)
# in a release pipeline that can resolve them.

# --- build ---------------------------------------------------------------------
FROM rust:1.95-bookworm AS builder
WORKDIR /src
# sqlx query macros read committed .sqlx/ data instead of a live database.
ENV SQLX_OFFLINE=true \
    CARGO_TERM_COLOR=never
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin natter \
 && install -D -m 0755 target/release/natter /out/natter

# --- runtime -------------------------------------------------------------------
# libssl3: fcm_v1 0.3 brings reqwest 0.11 with its default (OpenSSL) TLS.
FROM debian:12.12-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 natter \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin natter
COPY --from=builder /out/natter /usr/local/bin/natter
USER 10001:10001
ENV NATTER_LISTEN=0.0.0.0:8080 \
    NATTER_LOG_FORMAT=json
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/natter"]
CMD ["--help"]
