"""B5: the stream relay against direct TCP, socat and haproxy."""
import json, os, shutil, signal, socket, sqlite3, statistics, subprocess, sys, tempfile, threading, time, urllib.request
from common import *  # noqa: F401,F403 (the shared helpers and constants)
import common


# --------------------------------------------------------------------------- B5
B5_SERVER = r"""
import socket, sys, threading, os
def serve(port_file, mode):
    l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind(("127.0.0.1", 0)); l.listen(256)
    with open(port_file, "w") as f: f.write(str(l.getsockname()[1]))
    def conn(c):
        buf = bytearray(1 << 18)
        try:
            while True:
                n = c.recv_into(buf)
                if not n: break
                if mode == "echo": c.sendall(memoryview(buf)[:n])
        except OSError: pass
        c.close()
    while True:
        c, _ = l.accept(); threading.Thread(target=conn, args=(c,), daemon=True).start()
for i, mode in enumerate(sys.argv[2:]):
    threading.Thread(target=serve, args=(f"{sys.argv[1]}.{i}", mode), daemon=True).start()
threading.Event().wait()
"""

# Clients use sockets with a timeout (non-blocking I/O under the hood): blocking reads on
# a relayed socket can fail with EAGAIN on this kernel (docs/stream-relay.md).
B5_BULK = r"""
import socket, sys, time
port, seconds = int(sys.argv[1]), float(sys.argv[2])
s = socket.create_connection(("127.0.0.1", port)); s.settimeout(30)
buf = b"x" * 65536; n = 0
t0 = time.perf_counter()
while time.perf_counter() - t0 < seconds:
    s.sendall(buf); n += len(buf)
print(n / (time.perf_counter() - t0))
"""

B5_PING = r"""
import socket, sys, time, statistics
port, count = int(sys.argv[1]), int(sys.argv[2])
s = socket.create_connection(("127.0.0.1", port)); s.settimeout(30)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
msg = b"q" * 1024; lat = []
for i in range(count + 200):
    t0 = time.perf_counter_ns()
    s.sendall(msg); got = 0
    while got < 1024: got += len(s.recv(4096))
    if i >= 200: lat.append(time.perf_counter_ns() - t0)
lat.sort()
print(lat[len(lat) // 2] / 1000, lat[int(len(lat) * 0.99)] / 1000)
"""


def b5(rounds=3, seconds=3, pings=3000):
    """Stream relay with a pass-through callout against direct loopback, socat and haproxy."""
    cg = Cgroup("b5")
    tmp = f"/tmp/{RUN}-b5"
    procs, agent = [], None
    res = {}
    try:
        # Two server sets: one the relay selects, one for direct and the proxies.
        ports = {}
        for name in ("relayed", "plain"):
            pf = f"{tmp}-{name}"
            procs.append(subprocess.Popen([PY, "-c", B5_SERVER, pf, "sink", "echo"]))
            for i in range(2):
                for _ in range(200):
                    if os.path.exists(f"{pf}.{i}"): break
                    time.sleep(0.01)
            ports[name] = [int(open(f"{pf}.{i}").read()) for i in range(2)]
        sink, echo = ports["plain"]
        base = 20000 + os.getpid() % 10000
        socat = [base, base + 1]
        for lp, up in zip(socat, (sink, echo)):
            procs.append(subprocess.Popen(["socat", f"TCP-LISTEN:{lp},fork,reuseaddr,bind=127.0.0.1", f"TCP:127.0.0.1:{up}"]))
        hap = [base + 2, base + 3]
        cfg = f"{tmp}-haproxy.cfg"
        with open(cfg, "w") as f:
            f.write("global\n  maxconn 4096\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n")
            for lp, up in zip(hap, (sink, echo)):
                f.write(f"listen p{lp}\n  bind 127.0.0.1:{lp}\n  server s 127.0.0.1:{up}\n")
        procs.append(subprocess.Popen(["haproxy", "-f", cfg, "-db"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        config = f"{tmp}-flowtagd.yaml"
        with open(config, "w") as f:
            f.write("stream:\n  pool_size: 32\n  rules:\n")
            for p in ports["relayed"]:
                f.write(f"    - remote_port: {p}\n")
            f.write("  callouts:\n    - type: pass\n")
        agent = Agent(cg, "b5", extra=["--config", config], output="none")
        time.sleep(1.0)
        modes = {"direct": (sink, echo), "flowtag relay": tuple(ports["relayed"]), "socat": tuple(socat), "haproxy": tuple(hap)}
        samples = {m: {"bulk_1": [], "bulk_16": [], "p50_us": [], "p99_us": []} for m in modes}
        for r in range(rounds):
            for m, (sp, ep) in modes.items():
                for flows in (1, 16):
                    cl = [subprocess.Popen(cg.wrap([PY, "-c", B5_BULK, str(sp), str(seconds)]), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                          for _ in range(flows)]
                    outs = [c.communicate(timeout=seconds + 60) for c in cl]
                    if any(c.returncode != 0 for c in cl):
                        raise RuntimeError(f"B5 bulk through {m} failed: {[c.returncode for c in cl]}")
                    total = sum(float(o[0]) for o in outs)
                    samples[m][f"bulk_{flows}"].append(total * 8 / 1e9)
                out = subprocess.run(cg.wrap([PY, "-c", B5_PING, str(ep), str(pings)]), capture_output=True, text=True, timeout=120)
                if out.returncode != 0:
                    raise RuntimeError(f"B5 ping through {m} failed: {out.stderr.strip()[-300:]}")
                p50, p99 = (float(x) for x in out.stdout.split())
                samples[m]["p50_us"].append(p50); samples[m]["p99_us"].append(p99)
        for m, v in samples.items():
            res[m] = {k: statistics.median(x) for k, x in v.items()}
            res[m]["runs"] = v
        d = res["direct"]["p50_us"]
        for m in modes:
            res[m]["added_p50_us"] = res[m]["p50_us"] - d
    finally:
        if agent: agent.cleanup()
        for p in procs:
            p.kill(); p.wait()
        cg.remove()
        subprocess.call(f"rm -f {tmp}*", shell=True)
    print(f"B5 stream relay, {rounds} interleaved rounds, medians (bulk: 64 KiB writes for {seconds} s; ping: 1 KiB request/response x {pings})")
    print(f"  {'':14s} {'1 flow Gbit/s':>14s} {'16 flows Gbit/s':>16s} {'p50 us':>8s} {'p99 us':>8s} {'added p50':>10s}")
    for m, v in res.items():
        print(f"  {m:14s} {v['bulk_1']:14.2f} {v['bulk_16']:16.2f} {v['p50_us']:8.1f} {v['p99_us']:8.1f} {v['added_p50_us']:10.1f}")
    save("B5", res)
    return res
