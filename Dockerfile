# The ploop-csi image for people with Docker: `docker build .`
# `make image` builds the equivalent image without a daemon
# (internal/containerimage); keep the two in step: the same runtime
# packages, binaries, paths, user, labels and entrypoint (a test in
# internal/containerimage compares them). This image also has the rest of
# debian:bookworm-slim (bash, apt, dpkg) and xfsprogs' python3 dependency,
# which the daemonless build leaves out. dash and coreutils, which the
# daemonless build adds for the xfsprogs shell scripts, are in every Debian
# image already.

# The Go of go.mod's go line.
ARG GO_VERSION=1.26

FROM golang:${GO_VERSION}-bookworm AS build
WORKDIR /src
# Dependencies first, so a source change does not download them again.
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=devel
# Static (no cgo): the binaries need nothing from the runtime's libc.
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" \
      -o /out/ ./cmd/ploop-csi ./cmd/ploopctl

FROM debian:bookworm-slim
# What the node plugin runs: mkfs.ext4, e2fsck, resize2fs (e2fsprogs),
# mkfs.xfs, xfs_growfs, xfs_admin (xfsprogs), blkid, losetup (util-linux),
# mount, umount (mount), modprobe (kmod), setquota, repquota (quota).
RUN apt-get update \
 && apt-get install -y --no-install-recommends e2fsprogs xfsprogs util-linux mount kmod quota \
 && rm -rf /var/lib/apt/lists/*
# The controller runs as this user; the node DaemonSet runs as root
# (runAsUser: 0), since mounts and nbd need it.
RUN groupadd --gid 65532 ploop-csi \
 && useradd --uid 65532 --gid 65532 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin ploop-csi
COPY --from=build /out/ploop-csi /out/ploopctl /usr/bin/
ARG VERSION=devel
ARG REVISION=unknown
LABEL org.opencontainers.image.source="https://github.com/ploop-csi/ploop-csi" \
      org.opencontainers.image.title="ploop-csi" \
      org.opencontainers.image.description="Kubernetes CSI driver for thin ploop and simfs volumes on plain Linux nodes" \
      org.opencontainers.image.licenses="NOASSERTION" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
USER 65532
ENTRYPOINT ["/usr/bin/ploop-csi"]
