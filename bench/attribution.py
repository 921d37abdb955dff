"""B2 (short-lived processes, against ss) and B3 (event ingest under a storm)."""
import json, os, shutil, signal, socket, sqlite3, statistics, subprocess, sys, tempfile, threading, time, urllib.request
from common import *  # noqa: F401,F403 (the shared helpers and constants)
import common


# --------------------------------------------------------------------------- B2
def b2(count=2000):
    """Short-lived processes: flowtag against `ss -tnp` polled at 10 Hz during the same storm."""
    cg = Cgroup("b2")
    sink = subprocess.Popen([PY, PEER, "sink", f"/tmp/{RUN}-sink", "close"])
    agent = None
    try:
        for _ in range(500):
            if os.path.exists(f"/tmp/{RUN}-sink"): break
            time.sleep(0.01)
        port = int(open(f"/tmp/{RUN}-sink").read())
        agent = Agent(cg, "b2")
        ss_seen = {}
        done = threading.Event()
        def poll_ss():
            while not done.is_set():
                out = subprocess.run(["ss", "-tnpH", "dst", f"127.0.0.1:{port}"], capture_output=True, text=True).stdout
                for line in out.splitlines():
                    if "pid=" in line:
                        for part in line.split("pid=")[1:]:
                            ss_seen[int(part.split(",")[0])] = True
                time.sleep(0.1)
        poller = threading.Thread(target=poll_ss); poller.start()
        storm = subprocess.run(cg.wrap([PY, PEER, "storm", str(port), str(count), "bash,curl,python", "8"]),
                               capture_output=True, text=True, timeout=600)
        done.set(); poller.join()
        truth = [json.loads(l) for l in storm.stdout.splitlines()]
        time.sleep(1.5)
        agent.stop()
        by_pid = {}
        for e in agent.events():
            if e["event"] == "open" and e["remote"]["port"] == port:
                by_pid[e["process"]["pid"]] = e["process"]["exe"]
        right = sum(1 for t in truth if by_pid.get(t["pid"]) == t["exe"])
        ss_right = sum(1 for t in truth if t["pid"] in ss_seen)
    finally:
        if agent: agent.cleanup()
        sink.kill(); sink.wait()
        try: os.unlink(f"/tmp/{RUN}-sink")
        except OSError: pass
        cg.remove()
    res = {"processes": len(truth), "flowtag_correct": right, "flowtag_fraction": right / len(truth),
           "ss_seen": ss_right, "ss_fraction": ss_right / len(truth),
           "executables": sorted({t["exe"] for t in truth})}
    print(f"B2 {len(truth)} short-lived processes ({', '.join(res['executables'])})")
    print(f"  flowtag: {right}/{len(truth)} with the right tgid and exe ({100*res['flowtag_fraction']:.1f} %)")
    print(f"  ss -tnp at 10 Hz: {ss_right}/{len(truth)} ({100*res['ss_fraction']:.1f} %)")
    save("B2", res)
    return res


# --------------------------------------------------------------------------- B3
def b3(seconds=5, threads=2):
    """Connection storm at the highest rate this machine reaches: every connect must have
    its open and its close; the agent's CPU is measured from /proc. Two agents in turn:
    as deployed (systemd unit, DaemonSet: `--output none`, with journal, API, metrics),
    and with `--json` event lines on stdout (a file here) as well."""
    res = {}
    for output in os.environ.get("FLOWTAG_BENCH_B3_OUTPUTS", "none json").split():
        r = b3_storm(seconds, threads, output)
        res["deployed" if output == "none" else "json_lines"] = r
    save("B3", res)
    return res


def b3_storm(seconds, threads, output):
    cg = Cgroup("b3")
    l, stop = listener()
    port = l.getsockname()[1]
    agent = Agent(cg, f"b3-{output}", output=output)
    try:
        script = f"""
import socket, time, threading, sys
n = [0] * {threads}
def run(i):
    end = time.time() + {seconds}
    while time.time() < end:
        s = socket.socket(); s.connect(("127.0.0.1", {port})); s.close(); n[i] += 1
ts = [threading.Thread(target=run, args=(i,)) for i in range({threads})]
[t.start() for t in ts]; [t.join() for t in ts]
print(sum(n))
"""
        cpu0, t0 = agent.cpu_seconds(), time.time()
        out = subprocess.run(cg.wrap([PY, "-c", script]), capture_output=True, text=True, timeout=seconds + 60)
        connects = int(out.stdout.strip())
        time.sleep(1.0)
        cpu1, t1 = agent.cpu_seconds(), time.time()
        opened_total = agent.metric("flowtag_flows_opened_total")
        agent.stop()
        err = open(agent.err.name).read()
        lost = int(err.split(" kernel events were lost")[0].split()[-1]) if "were lost" in err else 0
        if output == "json":
            opens = closes = 0
            for e in agent.events():
                if e["remote"]["port"] == port and e["direction"] == "outbound":
                    opens += e["event"] == "open"; closes += e["event"] == "close"
        else:
            # No event lines: opens from the agent's counter (only the storm runs in the
            # cgroup), closes from the journal, where every closed flow is a row.
            opens = int(opened_total or 0)
            with sqlite3.connect(agent.journal) as db:
                closes = db.execute("SELECT COUNT(*) FROM flows WHERE remote_port = ? AND direction = 'outbound'"
                                    " AND closed_at >= opened_at", (port,)).fetchone()[0]
    finally:
        agent.cleanup()
        stop.set(); l.close()
        cg.remove()
    rate = connects / seconds
    cpu = (cpu1 - cpu0) / (t1 - t0)
    res = {"output": output, "connects": connects, "rate_per_s": rate, "opens": opens, "closes": closes,
           "lost_events": lost, "agent_cpu_fraction": cpu,
           "agent_cpu_at_10k_per_s": cpu * 10000 / rate if rate else None}
    what = "as deployed (--output none)" if output == "none" else "with --json event lines"
    print(f"B3 storm, agent {what}: {connects} connects in {seconds} s ({rate:.0f}/s)")
    print(f"  opens {opens}, closes {closes}, lost {lost}; missing {connects - min(opens, closes)}")
    print(f"  agent CPU {100*cpu:.1f} % of a core ({100*res['agent_cpu_at_10k_per_s']:.1f} % scaled to 10k connects/s)")
    return res
