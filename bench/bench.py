"""Runs flowtag's benchmarks (see BENCHMARKS.md): bench.py [b1 b1floor b2 b3 b4 b5 b6 b8]."""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import FLOWTAGD
from kernel_cost import b1, b1floor, b8
from attribution import b2, b3
from query import b4_b6
from relay import b5

BENCHES = {"b1": b1, "b1floor": b1floor, "b2": b2, "b3": b3, "b4": b4_b6, "b5": b5, "b6": b4_b6, "b8": b8}

if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("benchmarks need root")
    if not os.path.exists(FLOWTAGD):
        sys.exit(f"{FLOWTAGD} missing: run make build CONFIG=release")
    names = [a.lower() for a in sys.argv[1:]] or list(BENCHES)
    for name in names:
        if name not in BENCHES:
            sys.exit(f"unknown benchmark {name}; known: {', '.join(BENCHES)}")
    for name in names:
        BENCHES[name]()
        print()
