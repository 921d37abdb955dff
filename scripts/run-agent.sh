#!/usr/bin/env bash
# Starts flowtagd on its defaults: attached to the cgroup v2 root, pins in /sys/fs/bpf/flowtag.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-debug}
exec ".build/$CONFIG/flowtagd" "$@"
