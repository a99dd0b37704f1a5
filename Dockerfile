# syntax=docker/dockerfile:1
# outbox-relay: the relay in an image of its binary, the shared libraries it
# loads, CA certificates and a passwd entry for uid 10001; no shell, no
# package manager.
#
#   docker build --build-arg RELAY_GIT_REVISION=$(git rev-parse --short HEAD) -t outbox-relay:0.1.0 .
#   docker run --rm -v $PWD/relay.toml:/etc/relay/relay.toml:ro outbox-relay:0.1.0
#   docker build --target demo -t outbox-relay-demo:0.1.0 .   # plus the example order service
#
# Stages:
#   builder   cargo build --release in the Rust image: the canonical build.
#   prebuilt  binaries built outside, from the build context's ${PREBUILT}
#             (scripts/image: cargo on the host, where the Rust image cannot
#             be pulled; also what tests/it/slow/image.rs builds).
#   binaries  ${BINARIES}: `builder` (default) or `prebuilt`; the other one
#             is never built.
#   rootfs    on ${BASE} (Debian bookworm, as the builder): gathers the files
#             of the image, with the libraries `ldd` names for the binaries.
#   relay     FROM scratch: the runtime layer, written once for both ways of
#             building: user, paths, working directory, entrypoint, port,
#             stop signal, labels. docker-compose.yml and
#             deploy/kubernetes/pod.yaml rely on it (tests/it/slow/image.rs checks).
#   examples  the example order service (examples/order_service.rs), built
#             on the builder's build; only for `demo`.
#   demo      the relay's image plus the example order service, for
#             docker-compose.yml's demo; never the default target, so the
#             product image holds no example.
#   (last)    the relay's image: what `docker build .` makes.
ARG BASE=debian:bookworm-slim
ARG BUILDER=rust:1-bookworm
ARG BINARIES=builder

FROM ${BUILDER} AS builder
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake libssl-dev pkg-config zlib1g-dev libzstd-dev binutils \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY . .
# .git is not in the context: pass the revision for `relay --version`.
ARG RELAY_GIT_REVISION=unknown
RUN RELAY_GIT_REVISION="${RELAY_GIT_REVISION}" cargo build --release --locked --bins \
 && mkdir /out \
 && strip -o /out/relay target/release/relay

FROM scratch AS prebuilt
# A directory under target/image/ holding a stripped `relay` (.containerignore,
# which podman reads, lets target/image/ through).
ARG PREBUILT=target/image/release
COPY ${PREBUILT}/relay /out/

FROM ${BINARIES} AS binaries

FROM ${BASE} AS rootfs
# The relay loads glibc, libgcc_s, zlib, zstd and OpenSSL 3 (librdkafka's TLS;
# Postgres and the registry use rustls). Take them, and the CA bundle, from
# Debian: installed here unless the base already has them.
RUN if ! ldconfig -p | grep -q 'libssl\.so\.3 ' || [ ! -s /etc/ssl/certs/ca-certificates.crt ]; then \
      apt-get update && apt-get install -y --no-install-recommends libssl3 zlib1g libzstd1 ca-certificates \
      && rm -rf /var/lib/apt/lists/*; \
    fi
COPY --from=binaries /out/relay /rootfs/usr/local/bin/
COPY migrations/ /rootfs/usr/share/outbox-relay/migrations/
COPY schemas/ /rootfs/usr/share/outbox-relay/schemas/
RUN set -eu; \
    bins="/rootfs/usr/local/bin/relay"; \
    if ldd $bins | grep 'not found'; then echo "shared libraries missing on ${BASE:-the base}" >&2; exit 1; fi; \
    for lib in $(ldd $bins | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// && NF == 2 { print $1 }' | sort -u); do \
      mkdir -p "/rootfs$(dirname "$lib")"; cp -L "$lib" "/rootfs$lib"; \
    done; \
    mkdir -p /rootfs/etc/ssl/certs /rootfs/usr/lib/ssl /rootfs/tmp; \
    chmod 1777 /rootfs/tmp; \
    cp /etc/ssl/certs/ca-certificates.crt /rootfs/etc/ssl/certs/; \
    ln -s /etc/ssl/certs /rootfs/usr/lib/ssl/certs; \
    ln -s /etc/ssl/certs/ca-certificates.crt /rootfs/usr/lib/ssl/cert.pem; \
    printf 'root:x:0:0:root:/root:/usr/sbin/nologin\nrelay:x:10001:10001:outbox-relay:/nonexistent:/usr/sbin/nologin\n' > /rootfs/etc/passwd; \
    printf 'root:x:0:\nrelay:x:10001:\n' > /rootfs/etc/group; \
    printf 'passwd: files\ngroup: files\nhosts: files dns\n' > /rootfs/etc/nsswitch.conf

# The runtime layer. No shell: the entrypoint is the relay itself, PID 1,
# so SIGTERM from `docker stop`/`podman stop`/the kubelet reaches it (it
# drains, records publish state and exits 0 within shutdown_timeout_ms).
# Nothing is written to the root filesystem: it runs with a read-only one.
FROM scratch AS relay
ARG RELAY_GIT_REVISION=unknown
COPY --from=rootfs /rootfs/ /
ENV PATH=/usr/local/bin
# The config file when no --config is given, so `docker run IMAGE check`
# (or status, held, migrate) works with the file mounted where the sidecar has it.
ENV RELAY_CONFIG=/etc/relay/relay.toml
# codec.schemas_dir defaults to the relative `schemas`: the shipped ones.
WORKDIR /usr/share/outbox-relay
USER 10001:10001
# telemetry.http_listen: set RELAY__TELEMETRY__HTTP_LISTEN=0.0.0.0:9187 (the
# default 127.0.0.1 is unreachable from outside the container).
EXPOSE 9187
STOPSIGNAL SIGTERM
LABEL org.opencontainers.image.title="outbox-relay" \
      org.opencontainers.image.description="Transactional outbox relay from PostgreSQL to Apache Kafka" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.revision="${RELAY_GIT_REVISION}"
ENTRYPOINT ["/usr/local/bin/relay"]
CMD ["--config", "/etc/relay/relay.toml"]

FROM builder AS examples
ARG RELAY_GIT_REVISION=unknown
RUN RELAY_GIT_REVISION="${RELAY_GIT_REVISION}" cargo build --release --locked --example order_service \
 && strip -o /out/order-service target/release/examples/order_service

# It loads only libraries the relay's image holds (glibc, libm, libgcc_s).
FROM relay AS demo
COPY --from=examples /out/order-service /usr/local/bin/order-service
LABEL org.opencontainers.image.title="outbox-relay-demo" \
      org.opencontainers.image.description="outbox-relay with its example order service"
ENTRYPOINT ["/usr/local/bin/order-service"]
CMD []

# The default target: the relay's image, without the example.
FROM relay
