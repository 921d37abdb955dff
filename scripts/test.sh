#!/usr/bin/env bash
# The test suites: scripts/test.sh [unit|kernel|all] (all by default).
#   unit    pure logic, no root and no kernel: seconds
#   kernel  real programs, the real agent and CLI, real peers (root, private cgroups),
#           then the fault and abuse suite on its own (its storms load the whole machine)
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
unit='^(FlowContextTests|FlowTagWireTests|FlowTagClientTests|FlowTagKernelTests|FlowTagAgentTests|FlowTagRelayTests)\.'
kernel='^(KernelTests|AgentTests|RelayTests|DeployTests)\.'
make bpf
if [ "$what" != unit ]; then
    scripts/cleanup-stale.sh
    # The container image the deployment test runs (a release build, then buildah).
    scripts/build-image.sh
fi
swift build --build-tests
# A hung test must not hang CI: each part normally takes a few minutes.
if [ "$what" != kernel ]; then
    timeout --kill-after=30 600 swift test --skip-build --filter "$unit"
fi
if [ "$what" != unit ]; then
    # Every test removes what it made, also when it fails: the check after each part
    # names (and removes) anything a finished test process left behind.
    timeout --kill-after=30 3000 swift test --skip-build --filter "$kernel" --skip Reliability
    scripts/cleanup-stale.sh --check
    timeout --kill-after=30 1800 swift test --skip-build --filter Reliability
    scripts/cleanup-stale.sh --check
fi
