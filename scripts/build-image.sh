#!/usr/bin/env bash
# Builds the container image the DaemonSet runs (deploy/kubernetes/daemonset.yaml), from
# scratch with buildah (no daemon, no base image, no registry): the release agent and CLI,
# exactly the shared libraries they load (found with ldd), the default config, and the
# directories the agent writes. Leaves the image in buildah's store and writes an OCI
# archive that `podman load`, `skopeo` and `ctr image import` take.
#   OUT   archive path      (default .build/flowtagd-image.tar)
#   IMAGE name:tag          (default ghcr.io/flowtag/flowtagd:<version>)
set -euo pipefail
cd "$(dirname "$0")/.."

version=$(sed -n 's/^public let flowtagVersion = "\(.*\)"$/\1/p' Sources/FlowTagWire/Version.swift)
IMAGE=${IMAGE:-ghcr.io/flowtag/flowtagd:$version}
OUT=${OUT:-.build/flowtagd-image.tar}

if ! command -v buildah >/dev/null; then
    echo "installing buildah"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends buildah >/dev/null
fi

# Quiet when it works; the compiler's errors (on stdout) shown when it does not.
build_log=$(mktemp /tmp/flowtag-image-build.XXXXXX)
make build CONFIG=release >"$build_log" 2>&1 || { tail -n 60 "$build_log"; rm -f "$build_log"; exit 1; }
rm -f "$build_log"
bins=(.build/release/flowtagd)  # the CLI is one static executable (Makefile)

rootfs=$(mktemp -d /tmp/flowtag-rootfs.XXXXXX)
ctr=""
cleanup() {
    rm -rf "$rootfs"
    [ -z "$ctr" ] || buildah rm "$ctr" >/dev/null 2>&1 || true
}
trap cleanup EXIT

install -D -m 0755 .build/release/flowtagd "$rootfs/usr/local/bin/flowtagd"
install -D -m 0755 .build/release/flowtag "$rootfs/usr/local/bin/flowtag"
install -D -m 0644 deploy/flowtagd.yaml "$rootfs/etc/flowtag/flowtagd.yaml"
# Every library the binaries load, at the path they load it from (the Swift runtime
# is found through the binaries' RUNPATH).
for lib in $(ldd "${bins[@]}" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | sort -u); do
    cp --parents -L "$lib" "$rootfs"
done
# Users and groups the agent resolves (socket group `flowtag`); glibc reads the files
# itself (nss_files is part of libc).
mkdir -p "$rootfs/etc" "$rootfs/run/flowtag" "$rootfs/var/lib/flowtag" "$rootfs/tmp" "$rootfs/sys" "$rootfs/proc"
chmod 1777 "$rootfs/tmp"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/:/sbin/nologin\n' > "$rootfs/etc/passwd"
printf 'root:x:0:\nflowtag:x:%s:\nnogroup:x:65534:\n' "$(getent group flowtag | cut -d: -f3 || echo 999)" > "$rootfs/etc/group"
printf 'passwd: files\ngroup: files\n' > "$rootfs/etc/nsswitch.conf"

ctr=$(buildah from scratch)
buildah copy "$ctr" "$rootfs" / >/dev/null
buildah config \
    --entrypoint '["/usr/local/bin/flowtagd"]' \
    --cmd '["--config", "/etc/flowtag/flowtagd.yaml"]' \
    --port 9742/tcp \
    --label org.opencontainers.image.title=flowtagd \
    --label org.opencontainers.image.version="$version" \
    --label org.opencontainers.image.description="Which process owns each network flow (BPF + Swift agent)" \
    "$ctr"
buildah commit --quiet "$ctr" "$IMAGE" >/dev/null
mkdir -p "$(dirname "$OUT")"
rm -f "$OUT"
buildah push --quiet "$IMAGE" "oci-archive:$OUT:$IMAGE" >/dev/null
echo "$IMAGE -> $OUT ($(du -h "$OUT" | cut -f1))"
