#!/usr/bin/env bash
# Runs benchmarks: scripts/bench.sh [b1 b2 b3 b8 …] (all when none named).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
make bpf
swift build -c release
CONFIG=release exec /usr/bin/python3 bench/bench.py "$@"
