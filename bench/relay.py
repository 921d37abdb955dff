"""B5: the stream relay against direct TCP, socat and haproxy."""
import os, statistics, subprocess, time
from common import *  # noqa: F401,F403 (the shared helpers and constants)


# --------------------------------------------------------------------------- B5
# A sink answers each connection at its EOF with how many bytes it got (the bulk client
# checks it); an echo sends back what it reads (the ping client checks every byte).
B5_SERVER = r"""
import socket, sys, threading
def serve(port_file, mode):
    l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind(("127.0.0.1", 0)); l.listen(256)
    with open(port_file, "w") as f: f.write(str(l.getsockname()[1]))
    def conn(c):
        buf = bytearray(1 << 18); total = 0
        try:
            while True:
                n = c.recv_into(buf)
                if not n: break
                total += n
                if mode == "echo": c.sendall(memoryview(buf)[:n])
            if mode == "sink": c.sendall(str(total).encode())
        except OSError: pass
        c.close()
    while True:
        c, _ = l.accept(); threading.Thread(target=conn, args=(c,), daemon=True).start()
for i, mode in enumerate(sys.argv[2:]):
    threading.Thread(target=serve, args=(f"{sys.argv[1]}.{i}", mode), daemon=True).start()
threading.Event().wait()
"""

# Blocking sockets: the relayed process's socket is an ordinary socket.
B5_BULK = r"""
import socket, sys, time
port, seconds = int(sys.argv[1]), float(sys.argv[2])
s = socket.create_connection(("127.0.0.1", port))
buf = b"x" * 65536; n = 0
t0 = time.perf_counter()
while time.perf_counter() - t0 < seconds:
    s.sendall(buf); n += len(buf)
rate = n / (time.perf_counter() - t0)
s.shutdown(socket.SHUT_WR)
answer = b""
while True:
    d = s.recv(64)
    if not d: break
    answer += d
if int(answer or b"-1") != n:
    sys.exit(f"the sink got {answer!r} of {n} bytes")
print(rate)
"""

B5_PING = r"""
import socket, sys, time
port, count = int(sys.argv[1]), int(sys.argv[2])
s = socket.create_connection(("127.0.0.1", port))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
lat = []
for i in range(count + 200):
    msg = bytes([65 + i % 26]) * 1024
    t0 = time.perf_counter_ns()
    s.sendall(msg); got = b""
    while len(got) < 1024: got += s.recv(4096)
    if got != msg: sys.exit(f"answer {i} differs")
    if i >= 200: lat.append(time.perf_counter_ns() - t0)
lat.sort()
print(lat[len(lat) // 2] / 1000, lat[int(len(lat) * 0.99)] / 1000)
"""


def _servers(tmp, names, procs):
    ports = {}
    for name in names:
        pf = f"{tmp}-{name}"
        procs.append(subprocess.Popen([PY, "-c", B5_SERVER, pf, "sink", "echo"]))
        for i in range(2):
            for _ in range(200):
                if os.path.exists(f"{pf}.{i}"): break
                time.sleep(0.01)
        ports[name] = [int(open(f"{pf}.{i}").read()) for i in range(2)]
    return ports


def _proxies(tmp, sink, echo, procs):
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
    return socat, hap


def _relay_agent(tmp, tag, cg, ports, callout, fast_path="copy"):
    config = f"{tmp}-{tag}.yaml"
    with open(config, "w") as f:
        f.write(f"stream:\n  fast_path: {fast_path}\n  rules:\n" + "".join(f"    - remote_port: {p}\n" for p in ports)
                + f"  callouts:\n    - type: {callout}\n")
    return Agent(cg, tag, extra=["--config", config], output="none")


def _measure(cg, sp, ep, seconds, pings, what):
    out = {}
    for flows in (1, 16):
        cl = [subprocess.Popen(cg.wrap([PY, "-c", B5_BULK, str(sp), str(seconds)]), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(flows)]
        outs = [c.communicate(timeout=seconds + 60) for c in cl]
        if any(c.returncode != 0 for c in cl):
            raise RuntimeError(f"B5 bulk through {what} failed: {[o[1].strip()[-200:] for o in outs]}")
        out[f"bulk_{flows}"] = sum(float(o[0]) for o in outs) * 8 / 1e9
    r = subprocess.run(cg.wrap([PY, "-c", B5_PING, str(ep), str(pings)]), capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"B5 ping through {what} failed: {r.stderr.strip()[-300:]}")
    out["p50_us"], out["p99_us"] = (float(x) for x in r.stdout.split())
    return out


def b5(rounds=3, seconds=3, pings=3000):
    """The relay with a pass-through callout (every byte indicated) and after
    allow-connection (no more indications: copied, or moved by the kernel on the sockmap
    fast path), against direct loopback, socat and haproxy."""
    cgs = {"plain": Cgroup("b5"), "pass": Cgroup("b5p"), "allow": Cgroup("b5a"), "sockmap": Cgroup("b5s")}
    tmp = f"/tmp/{RUN}-b5"
    procs, agents = [], []
    res = {}
    try:
        ports = _servers(tmp, ("pass", "allow", "sockmap", "plain"), procs)
        sink, echo = ports["plain"]
        socat, hap = _proxies(tmp, sink, echo, procs)
        agents.append(_relay_agent(tmp, "b5p", cgs["pass"], ports["pass"], "pass"))
        agents.append(_relay_agent(tmp, "b5a", cgs["allow"], ports["allow"], "allow"))
        agents.append(_relay_agent(tmp, "b5s", cgs["sockmap"], ports["sockmap"], "allow", fast_path="sockmap"))
        time.sleep(1.0)
        modes = {"direct": ("plain", sink, echo), "relay (pass)": ("pass", *ports["pass"]),
                 "relay (allow)": ("allow", *ports["allow"]), "relay (sockmap)": ("sockmap", *ports["sockmap"]),
                 "socat": ("plain", *socat), "haproxy": ("plain", *hap)}
        samples = {m: {"bulk_1": [], "bulk_16": [], "p50_us": [], "p99_us": []} for m in modes}
        for _ in range(rounds):
            for m, (cg, sp, ep) in modes.items():
                for k, v in _measure(cgs[cg], sp, ep, seconds, pings, m).items():
                    samples[m][k].append(v)
        for m, v in samples.items():
            res[m] = {k: statistics.median(x) for k, x in v.items()}
            res[m]["runs"] = v
        for m in modes:
            res[m]["added_p50_us"] = res[m]["p50_us"] - res["direct"]["p50_us"]
        relayed = sum(int(a.metric("flowtag_relay_flows_total") or 0) for a in agents)
        res["relayed_flows"] = relayed
        res["fast_path_flows"] = int(agents[2].metric("flowtag_relay_fast_path_flows_total") or 0)
    finally:
        for a in agents: a.cleanup()
        for p in procs:
            p.kill(); p.wait()
        for cg in cgs.values(): cg.remove()
        subprocess.call(f"rm -f {tmp}*", shell=True)
    _report(res, rounds, seconds, pings)
    save("B5", res)
    return res


def _report(res, rounds, seconds, pings):
    print(f"B5 stream relay, {rounds} interleaved rounds, medians (bulk: 64 KiB writes for {seconds} s; ping: 1 KiB request/response x {pings})")
    print(f"  {'':14s} {'1 flow Gbit/s':>14s} {'16 flows Gbit/s':>16s} {'p50 us':>8s} {'p99 us':>8s} {'added p50':>10s}")
    for m, v in res.items():
        if isinstance(v, dict):
            print(f"  {m:14s} {v['bulk_1']:14.2f} {v['bulk_16']:16.2f} {v['p50_us']:8.1f} {v['p99_us']:8.1f} {v['added_p50_us']:10.1f}")
    # Every relayed run went through the relay: 2 bulk rounds (1 + 16 flows) and one ping per round per agent.
    want = rounds * (1 + 16 + 1) * 3
    print(f"  relayed connections: {res['relayed_flows']} (expected {want}): {'ok' if res['relayed_flows'] == want else 'NOT ALL RELAYED'}")
    print(f"  on the sockmap fast path: {res['fast_path_flows']} (expected {want // 3}): "
          f"{'ok' if res['fast_path_flows'] == want // 3 else 'NOT ALL ON THE FAST PATH'}")
    for m in ("relay (pass)", "relay (allow)", "relay (sockmap)"):
        r = res[m]
        proxy = max(res["socat"]["bulk_1"], res["haproxy"]["bulk_1"]), max(res["socat"]["bulk_16"], res["haproxy"]["bulk_16"])
        p99 = min(res["socat"]["p99_us"], res["haproxy"]["p99_us"])
        print(f"  goal {m}: 1 flow >= 1.2x the better proxy: {r['bulk_1'] / proxy[0]:.2f}x {'met' if r['bulk_1'] >= 1.2 * proxy[0] else 'NOT met'}; "
              f"16 flows: {r['bulk_16'] / proxy[1]:.2f}x {'met' if r['bulk_16'] >= 1.2 * proxy[1] else 'NOT met'}; "
              f"p99 <= the better proxy's ({p99:.0f} us): {'met' if r['p99_us'] <= p99 else 'NOT met'}; "
              f"added p50 <= 30 us: {'met' if r['added_p50_us'] <= 30 else 'NOT met'}")
