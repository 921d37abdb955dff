#!/usr/bin/env bash
# Installs what flowtag needs to build, run and test on Debian, and mounts bpffs.
# Idempotent: does nothing (and no apt-get update) when everything is there.
set -euo pipefail

PACKAGES=(libbpf-dev libelf-dev zlib1g-dev bpftool pkg-config make
          curl nginx-light socat netcat-openbsd haproxy iperf3 iproute2 util-linux procps python3 sqlite3 hyperfine systemd
          buildah)

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # nginx and haproxy are test peers only: keep their services from starting.
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    rm -f /usr/sbin/policy-rc.d
fi

# Validates the Kubernetes manifests in the tests (PyPI).
python3 -c 'import kubernetes_validate' 2>/dev/null || python3 -m pip install --quiet --disable-pip-version-check kubernetes-validate
getent group flowtag >/dev/null || groupadd --system flowtag

command -v swift >/dev/null || { echo "error: the Swift toolchain (swift) is not on PATH" >&2; exit 1; }
command -v clang >/dev/null || { echo "error: clang (it ships with the Swift toolchain) is not on PATH" >&2; exit 1; }
[ -r /sys/kernel/btf/vmlinux ] || { echo "error: /sys/kernel/btf/vmlinux missing: the kernel needs CONFIG_DEBUG_INFO_BTF=y" >&2; exit 1; }

if ! mount | grep -q ' /sys/fs/bpf type bpf'; then
    mount -t bpf bpf /sys/fs/bpf
fi
