"""B1, its floor, and B8: what the programs cost a connect and bulk traffic."""
import json, os, shutil, signal, socket, sqlite3, statistics, subprocess, sys, tempfile, threading, time, urllib.request
from common import *  # noqa: F401,F403 (the shared helpers and constants)
import common


# --------------------------------------------------------------------------- B1
def b1(rounds=5, n=4000):
    """Cost added to connect(): per-program run time from the kernel, and the interleaved
    loop (the listener lives outside the cgroup: only the client side is watched)."""
    cg = Cgroup("b1")
    l, stop = listener()
    port = l.getsockname()[1]
    leave = cg.enter()
    detached, attached, per_connect = [], [], []
    per_prog = {}
    try:
        connect_loop(port, 500)  # warm up
        for r in range(rounds):
            detached.append(connect_loop(port, n))
            leave()
            agent = Agent(cg, f"b1-{r}")
            ids = agent.prog_ids()
            leave = cg.enter()
            elapsed, added = measured(ids, lambda: connect_loop(port, n))
            attached.append(elapsed)
            leave()
            agent.cleanup()
            leave = cg.enter()
            for name, (dt, dc) in added.items():
                per_prog.setdefault(name, []).append((dt / n, dc / n))
            per_connect.append(sum(dt for dt, _ in added.values()) / n)
    finally:
        set_stats(False)
        leave()
        stop.set(); l.close()
        cg.remove()
    med_d, med_a = statistics.median(detached), statistics.median(attached)
    res = {
        "connect_close_ns_detached": med_d, "connect_close_ns_attached": med_a,
        "ratio": med_a / med_d, "bpf_ns_per_connect": statistics.median(per_connect),
        "programs": {k: {"ns_per_connect": statistics.median(x[0] for x in v),
                         "runs_per_connect": statistics.median(x[1] for x in v)} for k, v in per_prog.items()},
        "rounds": rounds, "connects_per_round": n,
    }
    print(f"B1 connect+close, {rounds} rounds x {n} (interleaved, medians)")
    print(f"  detached {med_d/1000:8.2f} us   attached {med_a/1000:8.2f} us   ratio {med_a/med_d:.3f}")
    print(f"  BPF run time per connect (sum of programs, incl. machine-wide tracepoints): {res['bpf_ns_per_connect']:.0f} ns")
    for k, v in sorted(res["programs"].items(), key=lambda kv: -kv[1]["ns_per_connect"]):
        print(f"    {k:16s} {v['ns_per_connect']:8.1f} ns/connect  {v['runs_per_connect']:6.2f} runs/connect")
    save("B1", res)
    return res


# B1's floor: the cheapest per-socket stamps, each program alone (bench/floor.bpf.c).
FLOOR_OBJ = os.path.join(REPO, ".build-bpf", "floor.bpf.o")
FLOOR_PROGS = [("floor_empty", "sock_create"), ("floor_sk_storage_8", "sock_create"),
               ("floor_sk_storage_96", "sock_create"), ("floor_lru_insert", "connect4"),
               ("floor_hash_insert", "connect4"), ("floor_sockops_empty", "sock_ops")]


def b1floor(rounds=5, n=4000):
    """What one stamp per socket costs at the least here: each program of
    bench/floor.bpf.c attached alone to a private cgroup, kernel run time per run."""
    cg = Cgroup("b1floor")
    pins = f"/sys/fs/bpf/{RUN}-floor"
    l, stop = listener()
    port = l.getsockname()[1]
    per_run = {name: [] for name, _ in FLOOR_PROGS}
    try:
        subprocess.run(["bpftool", "prog", "loadall", FLOOR_OBJ, pins], check=True)
        ids = {}
        for name, _ in FLOOR_PROGS:
            info = json.loads(subprocess.check_output(["bpftool", "prog", "show", "pinned", f"{pins}/{name}", "--json"]))
            ids[name] = info["id"]
        leave = cg.enter()
        connect_loop(port, 500)  # warm up
        leave()
        for _ in range(rounds):  # interleaved: every program once per round
            for name, hook in FLOOR_PROGS:
                subprocess.run(["bpftool", "cgroup", "attach", cg.path, hook, "pinned", f"{pins}/{name}"], check=True)
                def loop_inside():
                    leave = cg.enter()
                    try:
                        connect_loop(port, n)
                    finally:
                        leave()
                _, added = measured([ids[name]], loop_inside)
                subprocess.run(["bpftool", "cgroup", "detach", cg.path, hook, "pinned", f"{pins}/{name}"], check=True)
                time_ns, runs = added[name]
                if runs:
                    per_run[name].append((time_ns / runs, runs / n))
    finally:
        set_stats(False)
        for name, hook in FLOOR_PROGS:  # anything a failed round left attached
            subprocess.run(["bpftool", "cgroup", "detach", cg.path, hook, "pinned", f"{pins}/{name}"],
                           stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        subprocess.run(["rm", "-rf", pins])
        stop.set(); l.close()
        cg.remove()
    res = {"ns_per_run": {k: statistics.median(x[0] for x in v) for k, v in per_run.items() if v},
           "runs_per_connect": {k: statistics.median(x[1] for x in v) for k, v in per_run.items() if v},
           "rounds": rounds, "connects_per_round": n}
    print(f"B1 floor: one program alone per connect, {rounds} rounds x {n} (kernel run time, medians)")
    for name, _ in FLOOR_PROGS:
        if name in res["ns_per_run"]:
            runs = res["runs_per_connect"][name]
            print(f"    {name:22s} {res['ns_per_run'][name]:8.1f} ns/run  {runs:5.2f} runs/connect  {res['ns_per_run'][name] * runs:8.1f} ns/connect")
    save("B1floor", res)
    return res



# --------------------------------------------------------------------------- B8
def iperf(cg, port, parallel, seconds):
    out = subprocess.run(cg.wrap(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds),
                                  "-P", str(parallel), "-l", "64K", "-J"]),
                         capture_output=True, text=True, timeout=seconds + 30)
    return json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"]


def busy_cpu_ns():
    """CPU time the whole machine spent not idle, from /proc/stat."""
    fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) * 1e9 / os.sysconf("SC_CLK_TCK")


def b8(rounds=5, seconds=3):
    """Bulk TCP over loopback, programs attached against detached, interleaved."""
    cg = Cgroup("b8")
    port = 15201 + os.getpid() % 1000
    server = subprocess.Popen(["iperf3", "-s", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    res = {}
    try:
        time.sleep(0.5)
        for parallel in (1, 16):
            det, att, shares = [], [], []
            for r in range(rounds):
                det.append(iperf(cg, port, parallel, seconds))
                agent = Agent(cg, f"b8-{parallel}-{r}")
                try:
                    # The programs' own run time against the CPU time the machine was busy:
                    # what they cost, read from the kernel (throughput here swings ±20 %
                    # from run to run whether they are attached or not).
                    def run_iperf():
                        busy0 = busy_cpu_ns()
                        gbps = iperf(cg, port, parallel, seconds)
                        return gbps, busy_cpu_ns() - busy0
                    (gbps, busy), added = measured(agent.prog_ids(), run_iperf)
                    att.append(gbps)
                    shares.append(sum(t for t, _ in added.values()) / max(1, busy))
                finally:
                    agent.cleanup()
            d, a = statistics.median(det), statistics.median(att)
            share = statistics.median(shares)
            res[f"flows_{parallel}"] = {"detached_gbps": d / 1e9, "attached_gbps": a / 1e9, "ratio": a / d,
                                        "bpf_share_of_busy_cpu": share, "ratio_from_kernel_cost": 1 - share,
                                        "detached_runs": det, "attached_runs": att}
    finally:
        server.kill(); server.wait()
        cg.remove()
    print(f"B8 bulk TCP over loopback, {rounds} interleaved rounds x {seconds} s, medians")
    for k, v in res.items():
        print(f"  {k:9s} detached {v['detached_gbps']:7.2f} Gbit/s  attached {v['attached_gbps']:7.2f} Gbit/s  ratio {v['ratio']:.3f}"
              f"   programs' share of busy CPU {100 * v['bpf_share_of_busy_cpu']:.3f} % (ratio from kernel cost {v['ratio_from_kernel_cost']:.4f})")
    save("B8", res)
    return res
