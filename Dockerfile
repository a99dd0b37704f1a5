# syntax=docker/dockerfile:1
# outbox-relay: the relay and the example order-service.
#   docker build -t outbox-relay .
#   docker run --rm outbox-relay --config /etc/relay/relay.toml

FROM rust:1-bookworm AS builder
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake libssl-dev pkg-config libsasl2-dev zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY . .
RUN cargo build --release --locked --bins

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 relay \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin relay
COPY --from=builder /app/target/release/relay /usr/local/bin/relay
COPY --from=builder /app/target/release/order-service /usr/local/bin/order-service
COPY migrations/ /usr/share/outbox-relay/migrations/
COPY schemas/ /usr/share/outbox-relay/schemas/
USER 10001:10001
EXPOSE 9187
ENTRYPOINT ["/usr/local/bin/relay"]
