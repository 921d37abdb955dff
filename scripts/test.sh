#!/usr/bin/env bash
# The whole test suite: unit tests and real-kernel tests (root, private cgroups).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/cleanup-stale.sh
make bpf
# The container image the deployment test runs (a release build, then buildah).
scripts/build-image.sh
swift build --build-tests
# A hung test must not hang CI: the suite normally takes a few minutes.
timeout --kill-after=30 3000 swift test --skip-build --skip Reliability
# Faults and abuse (connect storms, SIGSTOP, a full disk) load the whole machine: alone.
timeout --kill-after=30 1800 swift test --skip-build --filter Reliability
