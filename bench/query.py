"""B4 (flow -> process lookups) and B6 (memory per tracked flow)."""
import json, os, shutil, signal, socket, sqlite3, statistics, subprocess, sys, tempfile, threading, time, urllib.request
from common import *  # noqa: F401,F403 (the shared helpers and constants)
import common


# --------------------------------------------------------------------------- B4 / B6
HOLDER = r"""
import socket, sys, json, os, time
pairs = int(sys.argv[1])
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", 0)); l.listen(4096)
keep = []
for i in range(pairs):
    c = socket.socket(); c.connect(l.getsockname()); a, _ = l.accept(); keep += [c, a]
c0 = keep[0]
print(json.dumps({"pid": os.getpid(), "local": c0.getsockname(), "remote": c0.getpeername()}), flush=True)
sys.stdin.readline()
"""

# Steady state before the baseline: 20k connections opened and closed (80k events) pass
# through the agent, so the 8 MiB event ring buffer has been written all over (its pages
# enter RSS as events pass) and the heap has seen a burst, as in any agent that has run
# for a while. Without it, the ring buffer's pages were counted as per-flow memory.
WARMUP = r"""
import socket, sys
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", 0)); l.listen(4096)
for i in range(int(sys.argv[1])):
    c = socket.socket(); c.connect(l.getsockname()); a, _ = l.accept(); c.close(); a.close()
"""


def rss_bytes(pid, field="VmRSS:"):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    return 0


def api_get(sock_path, path):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock_path)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while True:
        b = s.recv(65536)
        if not b: break
        data += b
    s.close()
    return data


def timed_spawn(argv, out):
    """Runs argv with stdout into `out` (a file, emptied first) and stderr to /dev/null, the
    way hyperfine does: posix_spawn and waitpid, no pipes to drain, so the figure is the
    command's own start-to-exit time. Returns (ns, exit status, stdout text)."""
    out.seek(0)
    out.truncate()
    actions = [(os.POSIX_SPAWN_DUP2, out.fileno(), 1), (os.POSIX_SPAWN_OPEN, 2, "/dev/null", os.O_WRONLY, 0)]
    t0 = time.perf_counter_ns()
    pid = os.posix_spawn(argv[0], argv, os.environ, file_actions=actions)
    _, status = os.waitpid(pid, 0)
    elapsed = time.perf_counter_ns() - t0
    out.seek(0)
    return elapsed, os.waitstatus_to_exitcode(status), out.read().decode()


def b4_b6(total_sockets=100_000, per_process_pairs=9_000):
    """B4: lookup by 5-tuple among ~100k live sockets, API and CLI against `ss -tnp`.
    B6: agent RSS with 0, 10k and 100k tracked flows."""
    cg = Cgroup("b4")
    sock = f"/tmp/{RUN}-api.sock"
    pins = f"/sys/fs/bpf/{RUN}-b4"
    err = open(f"/tmp/{RUN}-b4.err", "w")
    agent = subprocess.Popen([FLOWTAGD, "--cgroup", cg.path, "--pin-dir", pins, "--socket", sock, "--output", "none",
                              "--metrics-address", "", "--journal", ""], stdout=subprocess.DEVNULL, stderr=err)
    holders = []
    res = {}
    try:
        for _ in range(500):
            if os.path.exists(sock): break
            time.sleep(0.02)
        time.sleep(0.5)
        def count():
            return json.loads(api_get(sock, "/v1/stats").split(b"\r\n\r\n", 1)[1])["active_flows"]
        subprocess.run(cg.wrap([PY, "-c", WARMUP, "20000"]), check=True)
        for _ in range(200):
            if count() <= 10: break
            time.sleep(0.05)
        time.sleep(1)
        rss, anon = {}, {}
        def measure(flows):
            rss[flows] = rss_bytes(agent.pid)
            anon[flows] = rss_bytes(agent.pid, "RssAnon:")
        measure(0)
        def add(pairs):
            p = subprocess.Popen(cg.wrap([PY, "-c", HOLDER, str(pairs)]), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            holders.append((p, json.loads(p.stdout.readline())))
        add(5_000)  # 10k sockets
        for _ in range(200):
            if count() >= 10_000: break
            time.sleep(0.05)
        measure(10_000)
        while count() < total_sockets - 2 * per_process_pairs + 1:
            add(per_process_pairs)
        before = count()
        add(max(1, (total_sockets - before) // 2))
        _, probe = holders[-1]
        (lip, lport), (rip, rport) = probe["local"], probe["remote"]
        path = f"/v1/lookup?proto=tcp&local={lip}:{lport}&remote={rip}:{rport}"
        # The last holder may be small, and the agent reads the ring buffer every 20 ms:
        # wait until its flows are in (the count alone could already be near the target).
        for _ in range(400):
            if count() >= total_sockets - 10 and b"\"flows\":[{" in api_get(sock, path): break
            time.sleep(0.05)
        flows = count()
        measure(flows)
        answer = api_get(sock, path)
        if b"\"flows\":[{" not in answer:
            near = api_get(sock, f"/v1/flows?port={lport}").split(b"\r\n\r\n", 1)[1]
            mine = [f for f in json.loads(near)["flows"] if f["remote"]["port"] == rport or f["local"]["port"] == rport]
            stats = api_get(sock, "/v1/stats").split(b"\r\n\r\n", 1)[1]
            raise AssertionError(f"{path}: {answer[-120:]!r}; flows with port {lport} and {rport}: {mine}; "
                                 f"stats {stats!r}; holder {probe}")
        api_ns = []
        for _ in range(1000):
            t0 = time.perf_counter_ns(); api_get(sock, path); api_ns.append(time.perf_counter_ns() - t0)
        cli = os.path.join(os.path.dirname(FLOWTAGD), "flowtag")
        cli_ns, ss_ns = [], []
        ss = shutil.which("ss")
        out = tempfile.TemporaryFile()
        for _ in range(10):  # interleaved: CLI (5 runs), ss; every answer is checked
            for _ in range(5):
                t, status, text = timed_spawn([cli, "lookup", f"{lip}:{lport}", f"{rip}:{rport}", "--socket", sock, "-o", "json"], out)
                assert status == 0 and f"\"pid\":{probe['pid']}," in text, (status, text)
                cli_ns.append(t)
            t, status, text = timed_spawn([ss, "-tnpH", "src", f"{lip}:{lport}", "dst", f"{rip}:{rport}"], out)
            assert f"pid={probe['pid']}" in text, text
            ss_ns.append(t)
        api_ns.sort()
        res = {"live_sockets": flows, "api_p50_ms": api_ns[len(api_ns) // 2] / 1e6, "api_p99_ms": api_ns[int(len(api_ns) * 0.99)] / 1e6,
               "cli_median_ms": statistics.median(cli_ns) / 1e6, "ss_median_ms": statistics.median(ss_ns) / 1e6,
               "speedup_api_vs_ss": statistics.median(ss_ns) / (api_ns[len(api_ns) // 2]),
               "speedup_cli_vs_ss": statistics.median(ss_ns) / statistics.median(cli_ns),
               "rss_bytes": {str(k): v for k, v in rss.items()},
               "bytes_per_flow_10k": (rss[10_000] - rss[0]) / 10_000,
               "bytes_per_flow_all": (rss[flows] - rss[0]) / flows,
               "rss_anon_bytes": {str(k): v for k, v in anon.items()},
               "anon_bytes_per_flow_10k": (anon[10_000] - anon[0]) / 10_000,
               "anon_bytes_per_flow_all": (anon[flows] - anon[0]) / flows}
    finally:
        for p, _ in holders:
            try: p.stdin.write("\n"); p.stdin.flush()
            except OSError: pass
        for p, _ in holders:
            try: p.wait(timeout=30)
            except subprocess.TimeoutExpired: p.kill()
        agent.send_signal(signal.SIGINT)
        try: agent.wait(timeout=60)
        except subprocess.TimeoutExpired: agent.kill(); agent.wait()
        subprocess.call(["rm", "-rf", pins])
        cg.remove()
    print(f"B4 lookup among {res['live_sockets']} live sockets (tracked flows)")
    print(f"  API  p50 {res['api_p50_ms']:.3f} ms  p99 {res['api_p99_ms']:.3f} ms (1000 lookups)")
    print(f"  CLI  median {res['cli_median_ms']:.2f} ms   ss -tnp median {res['ss_median_ms']:.1f} ms (CLI 50 and ss 10 runs, interleaved)")
    print(f"  API {res['speedup_api_vs_ss']:.0f}x faster than ss; CLI {res['speedup_cli_vs_ss']:.1f}x")
    print(f"B6 agent RSS: " + ", ".join(f"{k} flows {v/1e6:.1f} MB" for k, v in res["rss_bytes"].items()))
    print(f"  {res['bytes_per_flow_10k']:.0f} bytes per flow (0 -> 10k), {res['bytes_per_flow_all']:.0f} (0 -> {res['live_sockets']})"
          f"; anonymous memory only: {res['anon_bytes_per_flow_10k']:.0f}, {res['anon_bytes_per_flow_all']:.0f}")
    save("B4", res)
    return res
