#!/usr/bin/env bash
# Removes kernel state left by test runs that were killed (pins, cgroups, namespaces named
# flowtag-test-PID-*) whose process is gone, and the processes such a run started that
# outlived it (an agent keeps its programs loaded). State of live runs is left alone.
# With --check (after a suite): names what it removes and exits 1 if anything was left.
set -uo pipefail
check=0; [ "${1:-}" = --check ] && check=1
found=0
left() { found=1; [ $check = 1 ] && echo "left behind by a test: $1" >&2; return 0; }
alive() { [ -d "/proc/$1" ]; }
owner() { sed -n 's/.*flowtag-test-\([0-9]*\)-.*/\1/p' <<<"$1"; }

# First the processes: an agent holds its programs and links until it is gone.
killed=0
for p in /proc/[0-9]*; do
    args=$(tr '\0' ' ' 2>/dev/null < "$p/cmdline") || continue
    [[ "$args" == *flowtag-test-* ]] && [ "${p#/proc/}" != $$ ] && [ "${p#/proc/}" != $PPID ] || continue
    pid=$(owner "$args"); [ -n "$pid" ] || continue
    alive "$pid" && continue
    left "process ${p#/proc/}: $args"; kill -9 "${p#/proc/}" 2>/dev/null && killed=1
done
[ $killed = 1 ] && sleep 0.5
for pin in /sys/fs/bpf/flowtag-test-*; do
    [ -e "$pin" ] || continue
    pid=$(owner "$pin"); [ -n "$pid" ] && alive "$pid" && continue
    left "$pin"; rm -rf "$pin"
done
cg=$(awk '$3=="cgroup2"{print $2; exit}' /proc/mounts)
if [ -n "$cg" ]; then
    for d in "$cg"/flowtag-test-*; do
        [ -d "$d" ] || continue
        pid=$(owner "$d"); [ -n "$pid" ] && alive "$pid" && continue
        left "$d"
        echo 1 > "$d/cgroup.kill" 2>/dev/null || true
        for _ in $(seq 50); do
            for child in "$d"/*/; do [ -d "$child" ] && rmdir "$child" 2>/dev/null; done
            rmdir "$d" 2>/dev/null && break
            sleep 0.1
        done
    done
fi
for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep '^flowtag-test-' || true); do
    pid=$(owner "$ns"); [ -n "$pid" ] && alive "$pid" && continue
    left "netns $ns"; ip netns del "$ns"
done
for d in /tmp/flowtag-test-*; do
    [ -e "$d" ] || continue
    pid=$(owner "$d"); [ -n "$pid" ] && alive "$pid" && continue
    left "$d"; mountpoint -q "$d" && umount -l "$d"
    rm -rf "$d"
done
[ $check = 1 ] && [ $found = 1 ] && exit 1
exit 0
