#!/usr/bin/env bash
# Runs benchmarks: scripts/bench.sh [b1 b1floor b2 b3 b7 b8 …] (all when none named).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
make bpf .build-bpf/floor.bpf.o
make build CONFIG=release
names=("$@")
[ ${#names[@]} -eq 0 ] && names=(b1 b1floor b2 b3 b4 b5 b7 b8)
kernel=()
for n in "${names[@]}"; do
    case "${n,,}" in
        b7) .build/release/flowtag-bench ;;
        *) kernel+=("$n") ;;
    esac
done
if [ ${#kernel[@]} -gt 0 ]; then
    CONFIG=release /usr/bin/python3 bench/bench.py "${kernel[@]}"
fi
