#!/usr/bin/env python3
"""h3gate vs Caddy over HTTP/3 on loopback. Run through bench/run, which installs and builds.

Origin: nginx serving /1k (1 KiB) and /10m (10 MiB) and reading whole 1 MiB POST bodies at /sink
(proxy_pass with request buffering to a tiny local 200 responder, request body not forwarded, so
nginx answers only after the whole upload arrived). Proxies: h3gate (`workers N`) and Caddy 2
(`reverse_proxy` with a keep-alive pool as large as the load needs, HTTP/3 on, GOMAXPROCS=N), same certificate, same origin. Each proxy is started
fresh for every scenario (so peak RSS is per scenario), scenarios alternate which proxy goes
first, and the proxy's CPU time is read from /proc/PID/stat before and after the load.

Everything listens on free 127.0.0.1 ports chosen at start; every child runs in its own process
group and is killed at the end, on error or on SIGINT/SIGTERM.
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Honour CARGO_TARGET_DIR like cargo does (relative paths are relative to the repository root,
# where bench/run builds).
BIN = os.path.join(os.path.join(ROOT, os.environ.get("CARGO_TARGET_DIR") or "target"), "release")
CLK_TCK = os.sysconf("SC_CLK_TCK")
# H3GATE_BIN=/path/to/h3gate runs that binary instead of the one just built (e.g. an older
# commit, to compare); the tools (h3load, h3get, origin) still come from BIN.
H3GATE = os.environ.get("H3GATE_BIN") or os.path.join(BIN, "h3gate")

# name, description, h3load arguments, path; durations in seconds.
FULL = {
    "small": dict(desc="1 KiB GETs, 100 connections x 10 streams, 20 s",
                  args=["-c", "100", "-m", "10", "-d", "20"], path="/1k"),
    "large": dict(desc="10 MiB GETs, 8 connections x 1 stream, 20 s",
                  args=["-c", "8", "-m", "1", "-d", "20"], path="/10m"),
    "upload": dict(desc="1 MiB POSTs to a sink, 32 connections x 1 stream, 20 s",
                   args=["-c", "32", "-m", "1", "-d", "20", "--data-size", "1048576"],
                   path="/sink"),
    "latency": dict(desc="1 KiB GETs at a fixed 2000 req/s, 10 connections x 10 streams, 20 s",
                    args=["-c", "10", "-m", "10", "-d", "20", "--rps", "2000"], path="/1k"),
    "idle": dict(desc="5000 idle connections held 10 s",
                 args=["-c", "5000", "--idle", "10", "--timeout", "60"], path="/1k"),
}
QUICK = {
    "small": dict(desc="1 KiB GETs, 20 connections x 10 streams, 3 s",
                  args=["-c", "20", "-m", "10", "-d", "3"], path="/1k"),
    "large": dict(desc="10 MiB GETs, 4 connections x 1 stream, 3 s",
                  args=["-c", "4", "-m", "1", "-d", "3"], path="/10m"),
    "upload": dict(desc="1 MiB POSTs to a sink, 8 connections x 1 stream, 3 s",
                   args=["-c", "8", "-m", "1", "-d", "3", "--data-size", "1048576"],
                   path="/sink"),
    "latency": dict(desc="1 KiB GETs at a fixed 2000 req/s, 10 connections x 10 streams, 3 s",
                    args=["-c", "10", "-m", "10", "-d", "3", "--rps", "2000"], path="/1k"),
    "idle": dict(desc="1000 idle connections held 3 s",
                 args=["-c", "1000", "--idle", "3", "--timeout", "30"], path="/1k"),
}
# gso and memory have their own runners (run_gso, run_memory) and result files.
FULL["gso"] = dict(desc="10 MiB GETs, h3gate only, GSO/GRO on/off x workers 1/2, "
                        "8 connections x 1 stream, 10 s each",
                   args=["-c", "8", "-m", "1", "-d", "10"], path="/10m")
QUICK["gso"] = dict(desc="10 MiB GETs, h3gate only, GSO/GRO on/off x workers 1/2, "
                         "8 connections x 1 stream, 3 s each",
                    args=["-c", "8", "-m", "1", "-d", "3"], path="/10m")
FULL["memory"] = QUICK["memory"] = dict(
    desc="RSS under 200 concurrent 4 MiB uploads (h3get --connections 40 -n 5) to an origin "
         "answering 2 s after the body",
    args=["--connections", "40", "-n", "5", "--data-size", "4194304"], path="/slow/2000")
ORDER = ["small", "large", "upload", "latency", "idle", "gso", "memory"]
EXTRA = ("gso", "memory")


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def free_port():
    """A 127.0.0.1 port free for both TCP and UDP right now (Caddy needs both)."""
    for _ in range(100):
        t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            t.bind(("127.0.0.1", 0))
            port = t.getsockname()[1]
            u.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
        finally:
            t.close()
            u.close()
    raise RuntimeError("no free port")


class Child:
    """A process in its own process group, logging to a file; stop() kills the whole group."""

    def __init__(self, name, argv, logfile, env=None):
        self.name = name
        # One log file per start: NAME.log, NAME.2.log, ...
        base, k = logfile, 1
        while os.path.exists(logfile):
            k += 1
            logfile = base[:-4] + f".{k}.log" if base.endswith(".log") else f"{base}.{k}"
        self.logfile = logfile
        self.out = open(logfile, "wb")
        self.p = subprocess.Popen(argv, stdout=self.out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        self.pid = self.p.pid
        CHILDREN.append(self)

    def alive(self):
        return self.p.poll() is None

    def stop(self, sig=signal.SIGTERM, grace=5.0):
        if self.alive():
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.p.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.p.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self.out.close()
        if self in CHILDREN:
            CHILDREN.remove(self)

    def tail(self, n=15):
        try:
            with open(self.logfile, "rb") as f:
                lines = f.read().decode(errors="replace").splitlines()
            return "\n".join(lines[-n:])
        except OSError:
            return ""


CHILDREN = []


def proc_cpu(pid):
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def proc_kib(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


class RssSampler(threading.Thread):
    def __init__(self, pid, every=0.1):
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.samples = []  # (monotonic time, VmRSS KiB)
        self.stopped = threading.Event()

    def run(self):
        while not self.stopped.is_set():
            try:
                self.samples.append((time.monotonic(), proc_kib(self.pid, "VmRSS")))
            except OSError:
                return
            self.stopped.wait(self.every)

    def stop(self):
        self.stopped.set()
        self.join()


def h3load(args, timeout):
    """Runs h3load --json; returns (result dict or None, stderr text)."""
    argv = [os.path.join(BIN, "h3load"), "--json"] + args
    try:
        p = subprocess.run(argv, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        err = (e.stderr or b"").decode(errors="replace")
        return None, f"h3load timed out after {timeout} s\n{err}"
    err = p.stderr.decode(errors="replace")
    lines = [ln for ln in p.stdout.decode(errors="replace").splitlines() if ln.startswith("{")]
    if not lines:
        return None, f"h3load exited {p.returncode} without a result\n{err}"
    return json.loads(lines[-1]), err


class Proxy:
    name = "?"
    ready_path = "/1k"

    def __init__(self, env):
        self.env = env
        self.child = None

    def url(self, path):
        return f"https://localhost:{self.port}{path}"

    def wait_ready(self, deadline=20.0):
        end = time.monotonic() + deadline
        last = ""
        while time.monotonic() < end:
            if not self.child.alive():
                raise RuntimeError(f"{self.name} exited at start:\n{self.child.tail()}")
            res, err = h3load(["-c", "1", "-n", "1", "--timeout", "1", self.url(self.ready_path)], 10)
            if res and res["ok"]:
                return
            last = err
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready after {deadline} s: {last}\n{self.child.tail()}")

    def stop(self):
        if self.child:
            self.child.stop()
            self.child = None


class H3gate(Proxy):
    name = "h3gate"

    def start(self, e, workers=None, glob="", front="", origin_port=None, stats_port=None):
        """glob/front: extra lines (already indented) for the global and frontend sections."""
        self.port = free_port()
        workers = workers or e["workers"]
        origin_port = origin_port or e["origin_port"]
        stats = f"stats\n    bind 127.0.0.1:{stats_port}\n" if stats_port else ""
        conf = os.path.join(e["dir"], "h3gate.conf")
        with open(conf, "w") as f:
            # As root h3gate wants to be told which user to run as; the bench keeps root (the
            # files it reads live in a private temporary directory).
            user = "    user root\n" if os.geteuid() == 0 else ""
            f.write(f"""global
    workers {workers}
{glob}{user}defaults
    timeout connect 5s
    timeout server 30s
    timeout client 30s
    timeout drain 1s
frontend bench
    bind 127.0.0.1:{self.port}
    cert {e['cert']}
    key {e['key']}
    default_backend origin
    max-connections 20000
{front}backend origin
    server nginx 127.0.0.1:{origin_port}
{stats}""")
        # warn: no per-request access lines (Caddy logs none by default either).
        self.child = Child("h3gate", [H3GATE, "run", "-c", conf, "-l", "warn"],
                           os.path.join(e["dir"], "h3gate.log"))
        self.wait_ready()


class Caddy(Proxy):
    name = "Caddy"

    def start(self, e, origin_port=None):
        self.port = free_port()
        origin_port = origin_port or e["origin_port"]
        home = os.path.join(e["dir"], "caddy-home")
        os.makedirs(home, exist_ok=True)
        conf = os.path.join(e["dir"], "Caddyfile")
        with open(conf, "w") as f:
            f.write(f"""{{
	admin off
	auto_https off
	skip_install_trust
	storage file_system {home}/storage
	servers {{
		protocols h1 h2 h3
	}}
}}

https://localhost:{self.port}, https://127.0.0.1:{self.port} {{
	tls {e['cert']} {e['key']}
	reverse_proxy 127.0.0.1:{origin_port} {{
		# Caddy keeps 32 idle origin connections per host by default: at these
		# concurrencies it would open a new origin connection for most requests
		# (about 30 % more CPU per request). h3gate keeps its pool, so Caddy gets one too.
		transport http {{
			keepalive_idle_conns 2048
			keepalive_idle_conns_per_host 2048
		}}
	}}
}}
""")
        env = dict(os.environ)
        env.update(HOME=home, XDG_DATA_HOME=os.path.join(home, "data"),
                   XDG_CONFIG_HOME=os.path.join(home, "config"), GOMAXPROCS=str(e["workers"]))
        self.child = Child("caddy", ["caddy", "run", "--config", conf, "--adapter", "caddyfile"],
                           os.path.join(e["dir"], "caddy.log"), env=env)
        self.wait_ready()


def start_origin(e):
    d = e["dir"]
    www = os.path.join(d, "www")
    os.makedirs(www, exist_ok=True)
    with open(os.path.join(www, "1k"), "wb") as f:
        f.write(os.urandom(1024))
    with open(os.path.join(www, "10m"), "wb") as f:
        f.write(os.urandom(10 << 20))
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        os.makedirs(os.path.join(d, "nginx-" + sub), exist_ok=True)
    e["origin_port"] = free_port()
    ok_port = free_port()
    user = "user root;" if os.geteuid() == 0 else ""
    conf = os.path.join(d, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""{user}
daemon off;
master_process on;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    client_body_temp_path {d}/nginx-body;
    proxy_temp_path {d}/nginx-proxy;
    fastcgi_temp_path {d}/nginx-fastcgi;
    uwsgi_temp_path {d}/nginx-uwsgi;
    scgi_temp_path {d}/nginx-scgi;
    default_type application/octet-stream;
    upstream ok {{
        server 127.0.0.1:{ok_port};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{e['origin_port']} backlog=4096;
        root {www};
        location / {{ }}
        # Read the whole request body (request buffering, kept in memory), then answer from
        # the tiny server below without forwarding the body: the upload ends at nginx.
        location = /sink {{
            client_max_body_size 64m;
            client_body_buffer_size 2m;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass http://ok/ok;
        }}
    }}
    server {{
        listen 127.0.0.1:{ok_port};
        location / {{ return 200 "ok\\n"; }}
    }}
}}
""")
    nginx = "nginx" if subprocess.run(["sh", "-c", "command -v nginx"], capture_output=True).returncode == 0 \
        else "/usr/sbin/nginx"
    child = Child("nginx", [nginx, "-p", d, "-c", conf], os.path.join(d, "nginx.log"))
    end = time.monotonic() + 10
    while time.monotonic() < end:
        if not child.alive():
            raise RuntimeError(f"nginx exited:\n{child.tail()}")
        try:
            socket.create_connection(("127.0.0.1", e["origin_port"]), 0.5).close()
            return child
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("nginx did not start listening")


def run_one(proxy, sc, e, name):
    proxy.start(e)
    pid = proxy.child.pid
    rss0 = proc_kib(pid, "VmRSS")
    cpu0 = proc_cpu(pid)
    sampler = RssSampler(pid)
    sampler.start()
    args = sc["args"] + ["-t", str(e["threads"]), proxy.url(sc["path"])]
    t0 = time.monotonic()
    res, err = h3load(args, timeout=e["run_timeout"])
    sampler.stop()
    alive = proxy.child.alive()
    m = {"alive": alive, "err": err.strip()}
    if alive:
        m["cpu_s"] = proc_cpu(pid) - cpu0
        m["hwm_mib"] = proc_kib(pid, "VmHWM") / 1024
    log_tail = proxy.child.tail(20)
    proxy.stop()
    if not alive:
        m["problem"] = f"{proxy.name} died during the run; its log:\n{log_tail}"
    if res is None:
        m["problem"] = m.get("problem", "") + f"\nh3load gave no result: {err}"
        return m
    m["res"] = res
    if not res["ok"]:
        m["problem"] = (f"h3load reported failures: {res['failed']} failed requests, "
                        f"{res['non_2xx']} non-2xx, {res['conn_failed']} failed and "
                        f"{res['conn_errors']} errored connections\n{err.strip()}")
    if name == "idle":
        # Steady state: from 0.3 s after the last handshake to just before the hold ends.
        lo = t0 + res["connect_s"] + 0.3
        hi = t0 + res["connect_s"] + res["elapsed_s"] - 0.1
        held = [kib for (t, kib) in sampler.samples if lo <= t <= hi]
        if held:
            m["rss_base_mib"] = rss0 / 1024
            m["rss_held_mib"] = max(held) / 1024
            if res["connected"]:
                m["kib_per_conn"] = (max(held) - rss0) / res["connected"]
    return m


def fmt_num(v, unit=""):
    if v is None:
        return "n/a"
    if isinstance(v, int) and abs(v) < 1000:
        return f"{v}{unit}"
    if abs(v) >= 1000:
        s = f"{v:,.0f}".replace(",", " ")
    elif abs(v) >= 100:
        s = f"{v:.0f}"
    elif abs(v) >= 10:
        s = f"{v:.1f}"
    else:
        s = f"{v:.2f}" if abs(v) >= 1 else f"{v:.3f}"
    return s + unit


def metrics(name, m):
    """Rows: (label, value, higher_is_better)."""
    r = m.get("res")
    rows = []
    if r is None:
        return rows
    if name == "idle":
        rows.append(("connections held", r["connected"], True))
        rows.append(("proxy RSS before (MiB)", m.get("rss_base_mib"), False))
        rows.append(("proxy RSS holding them (MiB)", m.get("rss_held_mib"), False))
        rows.append(("KiB per idle connection", m.get("kib_per_conn"), False))
        rows.append(("handshake p50 (ms)", r["handshake_ms"]["p50"], False))
        rows.append(("handshake p99 (ms)", r["handshake_ms"]["p99"], False))
        rows.append(("proxy peak RSS (MiB)", m.get("hwm_mib"), False))
        return rows
    done = r["done"]
    cpu = m.get("cpu_s")
    rows.append(("requests done", done, True))
    rows.append(("failed requests", r["failed"], False))
    rows.append(("req/s", r["rps"], True))
    rows.append(("Gbps (bodies)", r["gbps"], True))
    rows.append(("latency p50 (ms)", r["latency_ms"]["p50"], False))
    rows.append(("latency p99 (ms)", r["latency_ms"]["p99"], False))
    rows.append(("proxy CPU-s per 10 000 requests",
                 cpu / done * 10000 if cpu is not None and done else None, False))
    rows.append(("requests per proxy CPU-second",
                 done / cpu if cpu else None, True))
    rows.append(("proxy peak RSS (MiB)", m.get("hwm_mib"), False))
    return rows


def table(name, sc, results):
    g, c = results.get(("h3gate", name), {}), results.get(("Caddy", name), {})
    gr, cr = dict((a, (b, h)) for a, b, h in metrics(name, g)), dict(
        (a, (b, h)) for a, b, h in metrics(name, c))
    labels = [a for a, _, _ in metrics(name, g)] or [a for a, _, _ in metrics(name, c)]
    out = [f"### {name}: {sc['desc']}", "",
           "| metric | h3gate | Caddy | h3gate/Caddy | |", "|---|---:|---:|---:|---|"]
    for lab in labels:
        gv, hb = gr.get(lab, (None, True))
        cv, _ = cr.get(lab, (None, True))
        ratio, verdict = "", ""
        if gv is not None and cv is not None and lab not in ("requests done",):
            if cv:
                q = gv / cv
                ratio = f"{q:.2f}"
                if lab in ("failed requests", "connections held"):
                    verdict = ""
                elif 0.95 <= q <= 1.05:
                    verdict = "even"
                elif (q > 1) == hb:
                    verdict = "h3gate ahead"
                else:
                    verdict = "**h3gate behind**"
            elif gv == 0:
                ratio = "-"
        out.append(f"| {lab} | {fmt_num(gv)} | {fmt_num(cv)} | {ratio} | {verdict} |")
    for who, m in (("h3gate", g), ("Caddy", c)):
        r = m.get("res")
        if r:
            out.append("")
            out.append(f"h3load against {who}: busiest thread {r['max_thread_cpu_pct']:.0f}% of a core"
                       + (" — **SATURATED: the client may be the limit**" if r["saturated"] else "")
                       + f"; status {json.dumps(r['status'])}")
        if m.get("problem"):
            out.append("")
            out.append(f"**{who}: PROBLEM**: " + m["problem"].strip().replace("\n", "<br>"))
    return "\n".join(out)


def targets(results):
    def get(proxy, name):
        return results.get((proxy, name), {})

    lines = ["### Targets (reported, not asserted)", ""]

    def ratio(name, label):
        g = dict((a, b) for a, b, _ in metrics(name, get("h3gate", name)))
        c = dict((a, b) for a, b, _ in metrics(name, get("Caddy", name)))
        if g.get(label) is None or not c.get(label):
            return None
        return g[label] / c[label]

    q = ratio("small", "requests per proxy CPU-second")
    if q is not None:
        lines.append(f"- small, requests per proxy CPU-second ≥ 2× Caddy: **{q:.2f}×** — "
                     + ("met" if q >= 2 else "**not met**"))
    q = ratio("large", "Gbps (bodies)")
    if q is not None:
        lines.append(f"- large, Gbps ≥ 1.5× Caddy: **{q:.2f}×** — "
                     + ("met" if q >= 1.5 else "**not met**"))
    k = get("h3gate", "idle").get("kib_per_conn")
    if k is not None:
        kc = get("Caddy", "idle").get("kib_per_conn")
        lines.append(f"- idle, ≤ 16 KiB RSS per idle connection: h3gate **{k:.1f} KiB** "
                     f"(Caddy {fmt_num(kc)} KiB) — " + ("met" if k <= 16 else "**not met**"))
    return "\n".join(lines)


# ---------------------------------------------------------------- gso (issue #3)

def scrape(port):
    """Sums h3gate's /metrics counters over workers: {family: value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        key, val = line.rsplit(" ", 1)
        fam = key.split("{", 1)[0]
        try:
            out[fam] = out.get(fam, 0) + float(val)
        except ValueError:
            pass
    return out


GSO_COMBOS = [(1, True), (1, False), (2, True), (2, False)]  # (workers, gso+gro on)


def run_gso(e, sc):
    """h3gate only: the large download with GSO/GRO on and off, workers 1 and 2. Returns rows."""
    rows = []
    for workers, on in GSO_COMBOS:
        sw = "on" if on else "off"
        label = f"workers {workers}, gso/gro {sw}"
        log(f"gso: h3gate {label} ({sc['desc']})")
        p = H3gate(e)
        stats_port = free_port()
        row = {"workers": workers, "gso": sw}
        try:
            p.start(e, workers=workers, glob=f"    gso {sw}\n    gro {sw}\n", stats_port=stats_port)
            pid = p.child.pid
            time.sleep(0.3)  # a metrics publish after the readiness probe
            m0, cpu0 = scrape(stats_port), proc_cpu(pid)
            args = sc["args"] + ["-t", str(e["threads"]), p.url(sc["path"])]
            res, err = h3load(args, timeout=e["run_timeout"])
            cpu1 = proc_cpu(pid) if p.child.alive() else None
            time.sleep(0.6)  # workers publish every 250 ms
            m1 = scrape(stats_port) if p.child.alive() else {}
            alive = p.child.alive()
            tail = p.child.tail(20)
        except (RuntimeError, OSError) as ex:
            row["problem"] = str(ex)
            p.stop()
            rows.append(row)
            continue
        p.stop()
        if not alive:
            row["problem"] = f"h3gate died during the run; its log:\n{tail}"
        if res is None:
            row["problem"] = row.get("problem", "") + f"\nh3load gave no result: {err}"
            rows.append(row)
            continue
        if not res["ok"]:
            row["problem"] = (f"h3load reported failures: {res['failed']} failed, "
                              f"{res['non_2xx']} non-2xx\n{err.strip()}")
        el = res["elapsed_s"] or 1
        row.update(res=res, gbps=res["gbps"], rps=res["rps"],
                   cpu_s=(cpu1 - cpu0) if cpu1 is not None else None)
        if m1:
            dg = m1.get("h3gate_datagrams_sent_total", 0) - m0.get("h3gate_datagrams_sent_total", 0)
            gb = m1.get("h3gate_gso_batches_total", 0) - m0.get("h3gate_gso_batches_total", 0)
            dg, gb = int(dg), int(gb)
            row.update(dgram_s=dg / el, batches=gb, dgrams=dg,
                       gso_disabled=m1.get("h3gate_gso_disabled_total", 0))
        log(f"  {res['done']} done, {res['gbps']:.3f} Gbps, {res['rps']:.1f} req/s, "
            f"{fmt_num(row.get('dgram_s'))} datagrams/s, CPU {fmt_num(row.get('cpu_s'))} s, "
            f"{fmt_num(row.get('batches'))} GSO batches")
        rows.append(row)
    return rows


def gso_table(sc, rows):
    out = [f"### gso: {sc['desc']}", "",
           "| workers | gso/gro | Gbps | req/s | datagrams sent/s | proxy CPU-s | "
           "GB per proxy CPU-s | GSO batches | datagrams per batch |",
           "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cpu, g = r.get("cpu_s"), r.get("gbps")
        per_cpu = r["res"]["bytes_in"] / 1e9 / cpu if cpu and r.get("res") else None
        per_batch = r["dgrams"] / r["batches"] if r.get("batches") else None
        out.append(f"| {r['workers']} | {r['gso']} | {fmt_num(g)} | {fmt_num(r.get('rps'))} | "
                   f"{fmt_num(r.get('dgram_s'))} | {fmt_num(cpu)} | {fmt_num(per_cpu)} | "
                   f"{fmt_num(r.get('batches'))} | {fmt_num(per_batch)} |")
    out += ["", "Datagrams and GSO batches are the proxy's own counters (`h3gate_datagrams_sent_total`, "
            "`h3gate_gso_batches_total` from its `/metrics`, summed over workers) over the load; "
            "datagrams/s divides by h3load's run time. With GSO on, one batch is one sendmsg carrying "
            "several datagrams; with it off there are none. Proxy CPU-s is utime+stime from "
            "/proc/PID/stat around the load (all workers)."]
    for r in rows:
        if r.get("res"):
            res = r["res"]
            out.append("")
            out.append(f"workers {r['workers']}, gso/gro {r['gso']}: h3load busiest thread "
                       f"{res['max_thread_cpu_pct']:.0f}% of a core"
                       + (" — **SATURATED: the client may be the limit**" if res["saturated"] else "")
                       + f"; status {json.dumps(res['status'])}"
                       + (f"; gso_disabled {r['gso_disabled']:.0f}" if r.get("gso_disabled") else ""))
        if r.get("problem"):
            out.append("")
            out.append(f"**workers {r['workers']}, gso/gro {r['gso']}: PROBLEM**: "
                       + r["problem"].strip().replace("\n", "<br>"))
    return "\n".join(out)


# ---------------------------------------------------------------- memory (issue #5)

def start_slow_origin(e):
    """tools/origin (thread per connection): /slow/MS reads the whole body, then answers after MS."""
    port = free_port()
    child = Child("origin", [os.path.join(BIN, "origin"), "--listen", f"127.0.0.1:{port}", "-q"],
                  os.path.join(e["dir"], "origin.log"))
    end = time.monotonic() + 10
    while time.monotonic() < end:
        if not child.alive():
            raise RuntimeError(f"origin exited:\n{child.tail()}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return child, port
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("origin did not start listening")


MEM_REQUESTS = 200  # --connections 40 x -n 5


def run_memory(e, sc, quick):
    """Both proxies: RSS every 100 ms under 200 concurrent 4 MiB uploads. Returns {proxy: result}."""
    origin, port = start_slow_origin(e)
    out = {}
    try:
        proxies = [H3gate(e), Caddy(e)]
        for p in proxies:
            log(f"memory: {p.name} ({sc['desc']})")
            p.ready_path = "/bytes/1024"
            m = {}
            try:
                if isinstance(p, H3gate):
                    p.start(e, workers=2, glob="    max-memory 64m\n",
                            front="    http-request wait-for-body time 5s at-least 1m\n",
                            origin_port=port)
                else:
                    p.start(dict(e, workers=2), origin_port=port)  # GOMAXPROCS=2, as h3gate's 2 workers
            except RuntimeError as ex:
                p.stop()
                out[p.name] = {"problem": str(ex)}
                continue
            pid = p.child.pid
            sampler = RssSampler(pid, 0.1)
            sampler.start()
            time.sleep(1.0)
            t0 = time.monotonic()
            argv = [os.path.join(BIN, "h3get")] + sc["args"] + [
                "--sha256", "--quiet", "--insecure", "--timeout", "120", p.url(sc["path"])]
            try:
                r = subprocess.run(argv, capture_output=True, timeout=180, stdin=subprocess.DEVNULL)
                stdout, stderr, rc = r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace"), r.returncode
            except subprocess.TimeoutExpired as ex:
                stdout = (ex.stdout or b"").decode(errors="replace")
                stderr = "h3get timed out\n" + (ex.stderr or b"").decode(errors="replace")
                rc = None
            t1 = time.monotonic()
            time.sleep(2.0)
            alive = p.child.alive()
            final = proc_kib(pid, "VmRSS") if alive else None
            sampler.stop()
            tail = p.child.tail(20)
            p.stop()
            statuses = {}
            for line in stdout.splitlines():
                if line.startswith("status="):
                    st = line.split()[0].split("=", 1)[1]
                    statuses[st] = statuses.get(st, 0) + 1
            ok = sum(v for k, v in statuses.items() if k.startswith("2"))
            s503 = statuses.get("503", 0)
            other = sum(statuses.values()) - ok - s503
            base = [k for (t, k) in sampler.samples if t < t0]
            m = dict(samples=[(t - t0, k / 1024) for (t, k) in sampler.samples],
                     base_mib=(base[-1] if base else sampler.samples[0][1]) / 1024 if sampler.samples else None,
                     peak_mib=max(k for _, k in sampler.samples) / 1024 if sampler.samples else None,
                     final_mib=final / 1024 if final is not None else None,
                     ok=ok, s503=s503, other=other,
                     failed=MEM_REQUESTS - sum(statuses.values()), load_s=t1 - t0, rc=rc,
                     statuses=statuses)
            if not alive:
                m["problem"] = f"{p.name} died during the run; its log:\n{tail}"
            elif m["failed"] or other or rc != 0:
                # 503 is the budget's admission answer; anything else is a failed request.
                m["problem"] = (f"{m['failed']} request(s) without a response, {other} with a "
                                f"status other than 2xx/503, h3get exit {rc}")
            errs = [ln for ln in stderr.splitlines() if ln.strip()]
            if errs:
                m["h3get_err"] = errs[:3] + ([f"... {len(errs) - 3} more lines"] if len(errs) > 3 else [])
            log(f"  RSS {fmt_num(m['base_mib'])} -> peak {fmt_num(m['peak_mib'])} -> "
                f"{fmt_num(m['final_mib'])} MiB; 2xx {ok}, 503 {s503}, other {other}, "
                f"failed {m['failed']}; load {m['load_s']:.1f} s")
            out[p.name] = m
    finally:
        origin.stop()
    return out


def memory_table(sc, res):
    out = [f"### memory: {sc['desc']}", ""]
    for who in ("h3gate", "Caddy"):
        m = res.get(who, {})
        conf = ("`workers 2`, `max-memory 64m`, frontend `http-request wait-for-body time 5s "
                "at-least 1m`" if who == "h3gate" else
                "plain `reverse_proxy`, GOMAXPROCS=2; Caddy has no wait-for-body "
                "and no memory budget, it streams each body to the origin as it arrives")
        out += [f"#### {who}: {conf}", "",
                "| baseline RSS (MiB) | peak RSS (MiB) | final RSS, 2 s after the load (MiB) | "
                "2xx | 503 | other status | failed | load time (s) |",
                "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        if "samples" in m:
            out.append(f"| {fmt_num(m['base_mib'])} | {fmt_num(m['peak_mib'])} | "
                       f"{fmt_num(m['final_mib'])} | {m['ok']} | {m['s503']} | {m['other']} | "
                       f"{m['failed']} | {m['load_s']:.1f} |")
        else:
            out.append("| n/a | n/a | n/a | n/a | n/a | n/a | n/a | n/a |")
        if m.get("h3get_err"):
            out += ["", "h3get (stderr): " + "<br>".join(x.replace("|", "\\|") for x in m["h3get_err"])]
        if m.get("problem"):
            out += ["", f"**{who}: PROBLEM**: " + m["problem"].strip().replace("\n", "<br>")]
        out.append("")
    out.append("Load: `h3get --connections 40 -n 5 --data-size 4194304 --sha256 --quiet` (200 "
               "concurrent 4 MiB POSTs) to `tools/origin` `/slow/2000`, which reads the whole body "
               "and answers 2 s later. RSS is VmRSS from /proc/PID/status every 100 ms; baseline is "
               "the last sample before the load, final is 2 s after h3get exited. failed = "
               "requests without a response line. Plot: `memory.png`.")
    return "\n".join(out)


def memory_plot(res, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("memory: matplotlib missing (pip install matplotlib): no plot")
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for who, color in (("h3gate", "tab:blue"), ("Caddy", "tab:orange")):
        m = res.get(who, {})
        if m.get("samples"):
            xs, ys = zip(*m["samples"])
            ax.plot(xs, ys, label=f"{who} (peak {m['peak_mib']:.0f} MiB)", color=color)
            ax.axvline(m["load_s"], color=color, linestyle=":", linewidth=1)
    ax.set_xlabel("time since the load started (s); dotted: load ended")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title("Proxy RSS, 200 concurrent 4 MiB uploads (h3gate max-memory 64m)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def h3gate_version():
    """The commit the h3gate binary says it was built from (its startup log line), else git's."""
    if os.environ.get("H3GATE_BIN"):
        return f"{H3GATE} (H3GATE_BIN)"
    return version(['git', '-C', ROOT, 'describe', '--always', '--dirty'])


def version(argv):
    try:
        return subprocess.run(argv, capture_output=True, timeout=10).stdout.decode().strip().splitlines()[0]
    except Exception:  # noqa: BLE001 - informational only
        return "?"


def main():
    ap = argparse.ArgumentParser(description="h3gate vs Caddy over HTTP/3 (run via bench/run)")
    ap.add_argument("--quick", action="store_true", help="short runs, fewer connections (< 2 min)")
    ap.add_argument("--workers", type=int, default=1,
                    help="h3gate workers = Caddy GOMAXPROCS (default 1)")
    ap.add_argument("--threads", type=int, default=1, help="h3load threads (default 1)")
    ap.add_argument("--only", default="",
                    help="comma-separated scenarios (default: all): " + ",".join(ORDER))
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "latest.md"),
                    help="markdown result file (default bench/results/latest.md)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    a = ap.parse_args()
    scen = QUICK if a.quick else FULL
    names = [n for n in ORDER if not a.only or n in a.only.split(",")]
    if not names:
        ap.error(f"--only: pick from {','.join(ORDER)}")
    std = [n for n in names if n not in EXTRA]
    extra = {}
    command = "bench/run" + "".join(" " + shlex.quote(x) for x in sys.argv[1:])

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    d = tempfile.mkdtemp(prefix="h3gate-bench-")
    e = {"dir": d, "workers": a.workers, "threads": a.threads}
    subprocess.run([os.path.join(ROOT, "tools", "mkcert"), d], check=True)
    e["cert"], e["key"] = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
    started = time.monotonic()
    results = {}
    problems = []
    origin = None
    try:
        origin = start_origin(e)
        proxies = [H3gate(e), Caddy(e)]
        for k, name in enumerate(std):
            sc = scen[name]
            # Longest a run may take: its own length, handshakes, drain, margin.
            length = 0
            for flag in ("-d", "--idle"):
                if flag in sc["args"]:
                    length = float(sc["args"][sc["args"].index(flag) + 1])
            e["run_timeout"] = length + 90
            order = proxies if k % 2 == 0 else proxies[::-1]
            for p in order:
                log(f"{name}: {p.name} ({sc['desc']})")
                if not origin.alive():
                    raise RuntimeError(f"nginx died:\n{origin.tail()}")
                try:
                    m = run_one(p, sc, e, name)
                except RuntimeError as ex:
                    p.stop()
                    m = {"problem": str(ex)}
                results[(p.name, name)] = m
                if m.get("problem"):
                    problems.append(f"{name}/{p.name}: {m['problem']}")
                    log(f"PROBLEM {name}/{p.name}: {m['problem']}")
                r = m.get("res")
                if r and name == "idle":
                    log(f"  {r['connected']} connections held, proxy RSS "
                        f"{fmt_num(m.get('rss_base_mib'))} -> {fmt_num(m.get('rss_held_mib'))} MiB, "
                        f"{fmt_num(m.get('kib_per_conn'))} KiB per connection")
                elif r:
                    log(f"  {r['done']} done, {r['failed']} failed, {r['rps']:.0f} req/s, "
                        f"{r['gbps']:.3f} Gbps, p50 {r['latency_ms']['p50']} ms, p99 "
                        f"{r['latency_ms']['p99']} ms, proxy CPU {m.get('cpu_s', 0):.2f} s, "
                        f"h3load busiest thread {r['max_thread_cpu_pct']:.0f}%")
            print(table(name, sc, results) + "\n", flush=True)
        if "gso" in names:
            sc = scen["gso"]
            e["run_timeout"] = float(sc["args"][sc["args"].index("-d") + 1]) + 90
            rows = run_gso(e, sc)
            extra["gso"] = gso_table(sc, rows)
            print(extra["gso"] + "\n", flush=True)
            for r in rows:
                if r.get("problem"):
                    problems.append(f"gso/workers {r['workers']} gso {r['gso']}: {r['problem']}")
        if "memory" in names:
            sc = scen["memory"]
            mres = run_memory(e, sc, a.quick)
            extra["memory"] = memory_table(sc, mres)
            plot = os.path.join(os.path.dirname(a.out), "memory.png")
            os.makedirs(os.path.dirname(plot), exist_ok=True)
            if memory_plot(mres, plot):
                log(f"wrote {plot}")
            else:
                extra["memory"] += "\n\n(no plot: matplotlib is not installed)"
            print(extra["memory"] + "\n", flush=True)
            for who, m in mres.items():
                if m.get("problem"):
                    problems.append(f"memory/{who}: {m['problem']}")
    except KeyboardInterrupt as ex:
        problems.append(f"interrupted ({ex})")
        log(f"interrupted ({ex})")
    finally:
        for ch in list(CHILDREN):
            ch.stop()

    total = time.monotonic() - started
    head = [
        "## Performance",
        "",
        f"Made by `{command}` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC "
        f"in {total:.0f} s: {os.cpu_count()} cores, Linux {platform.release()}, "
        f"h3gate {h3gate_version()} "
        f"(`workers {a.workers}`), Caddy {version(['caddy', 'version']).split()[0]} "
        f"(GOMAXPROCS={a.workers}), origin nginx, h3load -t {a.threads}. Everything shares "
        "the same cores over loopback, so read ratios, not absolute numbers; a run on a busy "
        "machine is noisy. Each proxy is restarted for every scenario; the proxy's CPU comes "
        "from /proc/PID/stat (utime+stime) around the load, RSS from VmHWM (idle: VmRSS while "
        "the connections are held, minus VmRSS before). Caddy runs a stock `reverse_proxy` "
        "except for a keep-alive pool of 2048 idle origin connections (with its default of 32 "
        "it reconnects to the origin for most requests here and spends about 30 % more CPU). "
        "Ratios are h3gate/Caddy.",
        "",
    ]
    body = [table(n, scen[n], results) for n in std]
    probs = ""
    if problems:
        probs = "\n### Problems\n\n" + "\n".join(
            "- " + p.strip().replace("\n", "<br>") for p in problems) + "\n"
    outdir = os.path.dirname(a.out) or "."
    os.makedirs(outdir, exist_ok=True)
    refs = ("gso and memory scenarios (`bench/run --only gso,memory`): see [gso.md](gso.md) and "
            "[memory.md](memory.md).")
    if std:
        md = "\n".join(head) + "\n" + "\n\n".join(body) + "\n\n" + targets(results) + "\n"
        md += "\n" + refs + "\n" + probs
        with open(a.out, "w") as f:
            f.write(md)
        print(targets(results))
        log(f"wrote {a.out} ({total:.0f} s)")
    elif os.path.exists(a.out):
        # Only gso/memory ran: keep the other tables, make sure they are referenced.
        with open(a.out) as f:
            cur = f.read()
        if "gso.md" not in cur:
            with open(a.out, "a") as f:
                f.write("\n" + refs + "\n")
    for n, text in extra.items():
        what = ("h3gate only, `gso on|off` + `gro on|off` in `global`" if n == "gso" else
                f"h3gate (`workers 2`) and Caddy {version(['caddy', 'version']).split()[0]}")
        md = "\n".join([
            f"## {n}", "",
            f"Made by `{command}` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC: "
            f"{os.cpu_count()} cores, Linux {platform.release()}, h3gate "
            f"{h3gate_version()}, {what}, origin "
            + ("nginx `/10m`" if n == "gso" else "`tools/origin`")
            + ". Everything shares the same cores over loopback: read ratios, not absolute numbers.",
            "", text, ""]) + probs
        path = os.path.join(outdir, f"{n}.md")
        with open(path, "w") as f:
            f.write(md)
        log(f"wrote {path}")
    if a.keep:
        log(f"kept {d}")
    else:
        subprocess.run(["rm", "-rf", d])
    if problems:
        log(f"{len(problems)} problem(s): see above")
        sys.exit(1)


if __name__ == "__main__":
    main()
