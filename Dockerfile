# syntax=docker/dockerfile:1
#
# etcd-backup-agent's image: the agent, plus etcdctl and etcdutl for restores.
#
#   docker build -t REGISTRY/etcd-backup-agent:0.1.0 .
#
# Runtime base: distroless cc (Debian 12). The agent is a glibc binary that
# needs libc, libm and libgcc_s and nothing else (TLS is rustls, SSH is russh,
# both on ring, linked in): distroless cc is exactly that, with no shell, no
# package manager and no curl, so a compromised agent has no tools to work
# with. To ask a running agent for a backup use `etcd-backup-agent trigger`
# (INSTALL.md).
#
# etcd, etcdctl and etcdutl (Apache-2.0, like this project) are copied from
# the official etcd image of the same release line as the clusters' etcd:
# `restore` runs etcdutl (etcdctl on 3.4), and `drill` starts a throwaway etcd
# on the restored data. They are static Go binaries of roughly 15-30 MB each.
# `restore` bumps the revision by default, which needs etcdutl 3.5.10 or
# later (etcdctl 3.4.27 or later on the 3.4 line): keep ETCD_VERSION there.
# Pin both bases by digest (@sha256:...) when you build for production.
#
# tests/tests/deploy.rs lints this file with hadolint and checks its shape
# against the workspace and the DaemonSet (entrypoint, command, user, paths).

# The three base images are build arguments whose defaults are the public
# images. Where they cannot be pulled, pass local equivalents: scripts/image
# --local-bases builds them from Debian packages and this machine's Rust
# toolchain, and the image test builds with those (docs/development.md, "The image").
ARG RUST_VERSION=1.95
ARG ETCD_VERSION=v3.5.21
ARG BUILDER_IMAGE=docker.io/library/rust:${RUST_VERSION}-bookworm
ARG ETCD_IMAGE=gcr.io/etcd-development/etcd:${ETCD_VERSION}
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

# hadolint ignore=DL3006
FROM ${BUILDER_IMAGE} AS build
# protoc and the well-known .proto files it includes (libprotobuf-dev):
# etcd-client generates its gRPC code at build time. Debian stable's packages
# only change for security fixes, so the versions are left to apt.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends protobuf-compiler libprotobuf-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# The whole workspace is needed to resolve it (tests/ is a member), but only
# the agent is built.
COPY Cargo.toml Cargo.lock ./
COPY proto/ proto/
COPY crates/ crates/
COPY agent/ agent/
COPY tests/ tests/
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    cargo build --release --locked -p etcd-backup-agent --bin etcd-backup-agent

# hadolint ignore=DL3006
FROM ${ETCD_IMAGE} AS etcd

# hadolint ignore=DL3006
FROM ${RUNTIME_IMAGE}
LABEL org.opencontainers.image.title="etcd-backup-agent" \
      org.opencontainers.image.description="Verified etcd snapshots and static-pod resources, shipped atomically" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /src/target/release/etcd-backup-agent /usr/local/bin/etcd-backup-agent
# The etcd image's /usr/local/bin holds exactly etcd, etcdctl and etcdutl.
COPY --from=etcd /usr/local/bin/ /usr/local/bin/
# Non-root by default. The DaemonSet runs it as uid 0 with every capability
# dropped, because the certificates it reads on a master are root-owned 0600.
USER 65532:65532
ENTRYPOINT ["etcd-backup-agent"]
CMD ["run", "--config", "/etc/etcd-backup/config.yaml"]
