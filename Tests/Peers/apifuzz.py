#!/usr/bin/env python3
"""Seeded fuzzer for the agent's HTTP API on its unix socket.

apifuzz.py SOCKET COUNT SEED
Sends COUNT requests (well-formed ones with hostile parameters, and malformed HTTP:
garbage, an HTTP/2 preface, huge headers, pipelining, split writes, bad bodies) and checks
every answer: a status line with 2xx or 4xx, and a connection closed after an error
answer (never left open until the idle timeout). Prints one JSON summary line and exits
1 on any violation (each one printed, with the request that caused it), 0 otherwise.
The same SEED sends the same requests."""
import json, random, select, socket, sys, time

SOCK, COUNT, SEED = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(SEED)

ENDPOINTS = ["/v1/flows", "/v1/lookup", "/v1/history", "/v1/stats", "/v1/version", "/v1/watch"]
PARAMS = ["pid", "exe", "comm", "uid", "cgroup", "proto", "state", "local", "remote", "port",
          "since", "until", "limit", "netns", "payload"]
HOSTILE = ["", "0", "-1", "1", "65535", "65536", "4294967295", "4294967296", "18446744073709551615",
           "18446744073709551616", "9223372036854775807", "-9223372036854775808", "1e9", "0x10", "NaN",
           "106751d", "106752d", "999999999d", "9223372036854775807s", "-5m", "+5m", "1.5h", "5y", "15m", "2h",
           "2262-04-11T23:47:16Z", "2262-04-12T00:00:00Z", "2300-01-01T00:00:00Z", "1677-09-21T00:12:44Z",
           "0000-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "2026-13-40T25:61:61Z", "2026-11-22T00:00:00+99:99",
           "2026-11-22T00:00:00.0000000000000000001Z", "tcp", "udp", "TCP", "sctp", "open", "closed", "both",
           "127.0.0.1", "127.0.0.1:80", "[::1]:80", "::1", "10.0.0.0/8", "10.0.0.0/33", "10.0.0.0/-1", "::/0",
           "::/129", "1.2.3.4/", "/", "1.2.3", "1.2.3.4.5", "[::1", "::1]:80", "1.2.3.4:65536", "1.2.3.4:-1",
           "%", "%%", "%zz", "%00", "%ff%fe", "a%20b", "+", "=", "&", "==", "/usr/bin/curl", "\u00e9\u00e8",
           "\U0001F600", "true", "false", "yes", "x" * 300, "9" * 300]

def value():
    r = rng.random()
    if r < 0.7:
        return rng.choice(HOSTILE)
    if r < 0.8:
        return "".join(chr(rng.randrange(32, 127)) for _ in range(rng.randrange(1, 40)))
    if r < 0.9:
        return "%" + "%".join("%02x" % rng.randrange(256) for _ in range(rng.randrange(1, 20)))
    return rng.choice(HOSTILE) * rng.randrange(2, 50)

def quote(s):
    out = []
    for b in s.encode("utf-8", "surrogatepass"):
        c = chr(b)
        if c.isalnum() or c in "-._~/:%":
            out.append(c)
        elif rng.random() < 0.1:
            out.append(c if c not in " \r\n" else "+")
        else:
            out.append("%%%02X" % b)
    return "".join(out)

def target():
    r = rng.random()
    path = rng.choice(ENDPOINTS) if r < 0.9 else rng.choice(["/", "/v1", "/v1/", "/v2/flows", "//v1/flows", "/v1/flows/x",
                                                            "/metrics", "*", "/" + "a" * rng.randrange(1, 5000)])
    items = []
    for _ in range(rng.choice([0, 1, 1, 2, 3, 5, 10, 50])):
        key = rng.choice(PARAMS) if rng.random() < 0.85 else value()
        items.append(quote(key) + ("=" + quote(value()) if rng.random() < 0.9 else ""))
    if rng.random() < 0.05:
        items.append(rng.choice(["=", "&", "==", "=&=", "%", "&&&"]))
    return path + ("?" + "&".join(items) if items or rng.random() < 0.1 else "")

def well_formed(t, method="GET", extra=b""):
    return f"{method} {t} HTTP/1.1\r\nHost: flowtag\r\n".encode("utf-8", "surrogatepass") + extra + b"\r\n"

def malformed():
    kind = rng.randrange(14)
    t = target()
    if kind == 0:
        return "garbage", bytes(rng.randrange(256) for _ in range(rng.randrange(1, 2000))), True
    if kind == 1:
        return "http2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes(rng.randrange(256) for _ in range(30)), True
    if kind == 2:
        return "huge-header", well_formed(t, extra=b"X-Big: " + b"a" * rng.choice([8000, 70000, 200000]) + b"\r\n"), True
    if kind == 3:
        return "many-headers", well_formed(t, extra=b"".join(b"X-H%d: v\r\n" % i for i in range(rng.choice([100, 1000, 5000])))), True
    if kind == 4:
        return "bad-method", well_formed(t, method=rng.choice(["POST", "PUT", "DELETE", "HEAD", "OPTIONS", "get", "FOO", "CONNECT"])), False
    if kind == 5:
        body = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 5000)))
        return "body", well_formed(t, method="POST", extra=b"Content-Length: %d\r\n" % len(body)) + body, False
    if kind == 6:
        return "lying-length", well_formed(t, extra=b"Content-Length: 99999999999999999999\r\n"), True
    if kind == 7:
        return "bad-chunked", well_formed(t, method="POST", extra=b"Transfer-Encoding: chunked\r\n") + b"zz\r\nabc\r\n", True
    if kind == 8:
        return "http10", f"GET {t} HTTP/1.0\r\n\r\n".encode("utf-8", "surrogatepass"), False
    if kind == 9:
        return "no-version", f"GET {t}\r\n\r\n".encode("utf-8", "surrogatepass"), True
    if kind == 10:
        return "bad-version", f"GET {t} HTTP/9.9\r\nHost: x\r\n\r\n".encode("utf-8", "surrogatepass"), True
    if kind == 11:
        return "nul-in-target", b"GET /v1/flows?pid=\x00\x01\xff HTTP/1.1\r\nHost: x\r\n\r\n", True
    if kind == 12:
        return "lf-only", f"GET {t} HTTP/1.1\nHost: x\n\n".encode("utf-8", "surrogatepass"), False
    return "absolute-form", f"GET http://flowtag{t} HTTP/1.1\r\nHost: x\r\n\r\n".encode("utf-8", "surrogatepass"), False

def answers_of(data, head=False):
    """The responses in `data`, parsed in order: [(status, closes)] (closes: it said
    Connection: close). Stops at anything that is not a well-formed response."""
    out, i = [], 0
    while i < len(data):
        end = data.find(b"\r\n\r\n", i)
        if end < 0 or not data.startswith(b"HTTP/1.", i):
            break
        lines = data[i:end].split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) < 2 or not parts[1].isdigit():
            break
        headers = {}
        for l in lines[1:]:
            k, _, v = l.partition(b":")
            headers[k.strip().lower()] = v.strip().lower()
        closes = headers.get(b"connection") == b"close"
        if b"content-length" not in headers:
            out.append((int(parts[1]), closes))
            break  # a stream (watch): nothing follows it here
        nxt = end + 4 + (0 if head else int(headers[b"content-length"]))
        if nxt > len(data):
            break  # its body is not all here yet
        out.append((int(parts[1]), closes))
        i = nxt
    return out

def complete(data, n, head=False):
    """Whether `data` holds `n` whole answers none of which closes (nothing more to wait for)."""
    got = answers_of(data, head)
    if len(got) < n or any(c for _, c in got):
        return False
    # The last answer's body must be all there.
    return True

def exchange(payload, n=1, split=False, watch=False, timeout=60.0):
    """Sends payload while reading what comes back (a pipelining client that only reads
    after sending everything deadlocks against any server that stops reading while its
    answers queue up); reads until the server closes, the answers are complete, or
    `timeout`. Returns (data, closed, seconds)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    start = time.monotonic()
    s.connect(SOCK)
    s.setblocking(False)
    step = 7 if split else 65536
    sent, data, closed = 0, b"", False
    deadline = start + timeout
    try:
        while time.monotonic() < deadline:
            want_write = sent < len(payload)
            r, w, _ = select.select([s], [s] if want_write else [], [], max(0.0, deadline - time.monotonic()))
            if w:
                try:
                    sent += s.send(payload[sent:sent + step])
                except (BrokenPipeError, ConnectionResetError):
                    sent = len(payload)
                except BlockingIOError:
                    pass
            if r:
                try:
                    chunk = s.recv(65536)
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    closed = True
                    break
                if not chunk:
                    closed = True
                    break
                data += chunk
                if watch and b"\r\n\r\n" in data and data.startswith(b"HTTP/1.1 200"):
                    break  # a watch stream: the head is enough
                if not watch and sent >= len(payload) and complete(data, n, payload.startswith(b"HEAD")):
                    break
            if not r and not w:
                break  # timed out
    finally:
        s.close()
    return data, closed, time.monotonic() - start

def main():
    violations, kinds, answers = [], {}, {}
    sent = 0
    while sent < COUNT:
        r = rng.random()
        watch = False
        if r < 0.55:
            t = target()
            watch = t.startswith("/v1/watch")
            kind, payload, expect_close = "request", well_formed(t, extra=b"Connection: close\r\n"), True
            n = 1
        elif r < 0.7:
            reqs = [target() for _ in range(rng.randrange(2, 30))]
            reqs = [t for t in reqs if not t.startswith("/v1/watch")] or ["/v1/version"]
            kind = "pipelined"
            payload = b"".join(well_formed(t) for t in reqs[:-1]) + well_formed(reqs[-1], extra=b"Connection: close\r\n")
            expect_close, n = True, len(reqs)
        else:
            kind, payload, expect_close = malformed()
            n = 1
        split = rng.random() < 0.05
        try:
            data, closed, secs = exchange(payload, n=n, split=split, watch=watch)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            violations.append({"request": sent, "kind": kind, "problem": f"agent gone: {e}"})
            break
        sent += n
        kinds[kind] = kinds.get(kind, 0) + 1
        got = answers_of(data, payload.startswith(b"HEAD"))
        st = [c for c, _ in got]
        for code in st:
            answers[str(code)] = answers.get(str(code), 0) + 1
        bad = [c for c in st if not (200 <= c < 500)]
        said_close = any(c for _, c in got)
        problem = None
        if bad:
            problem = f"status {bad}"
        elif not st:
            problem = "no answer"
        elif kind == "pipelined" and len(st) != n and not said_close:
            problem = f"{len(st)} answers to {n} pipelined requests, none said Connection: close"
        elif said_close and not closed:
            problem = f"connection still open {secs:.1f} s after an answer with Connection: close"
        elif not watch and expect_close and not closed and any(c >= 400 for c in st):
            problem = f"connection still open {secs:.1f} s after an error"
        if problem:
            violations.append({"request": sent, "kind": kind, "problem": problem, "closed": closed,
                               "seconds": round(secs, 2), "received": len(data),
                               "payload": payload[:300].decode("latin-1"), "answer": data[:300].decode("latin-1"),
                               "full": payload.hex() if len(payload) < 100000 else ""})
            if len(violations) >= 20:
                break
    print(json.dumps({"seed": SEED, "requests": sent, "kinds": kinds, "answers": answers,
                      "violations": len(violations)}), flush=True)
    for v in violations:
        print(json.dumps(v), flush=True)
    sys.exit(1 if violations else 0)

main()
