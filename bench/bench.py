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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")
CLK_TCK = os.sysconf("SC_CLK_TCK")

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
ORDER = ["small", "large", "upload", "latency", "idle"]


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
            res, err = h3load(["-c", "1", "-n", "1", "--timeout", "1", self.url("/1k")], 10)
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

    def start(self, e):
        self.port = free_port()
        conf = os.path.join(e["dir"], "h3gate.conf")
        with open(conf, "w") as f:
            # As root h3gate wants to be told which user to run as; the bench keeps root (the
            # files it reads live in a private temporary directory).
            user = "    user root\n" if os.geteuid() == 0 else ""
            f.write(f"""global
    workers {e['workers']}
{user}defaults
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
backend origin
    server nginx 127.0.0.1:{e['origin_port']}
""")
        # warn: no per-request access lines (Caddy logs none by default either).
        self.child = Child("h3gate", [os.path.join(BIN, "h3gate"), "run", "-c", conf, "-l", "warn"],
                           os.path.join(e["dir"], "h3gate.log"))
        self.wait_ready()


class Caddy(Proxy):
    name = "Caddy"

    def start(self, e):
        self.port = free_port()
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
	reverse_proxy 127.0.0.1:{e['origin_port']} {{
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
    ap.add_argument("--only", default="", help="comma-separated scenarios (default: all)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "latest.md"),
                    help="markdown result file (default bench/results/latest.md)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    a = ap.parse_args()
    scen = QUICK if a.quick else FULL
    names = [n for n in ORDER if not a.only or n in a.only.split(",")]
    if not names:
        ap.error(f"--only: pick from {','.join(ORDER)}")
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
        for k, name in enumerate(names):
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
        f"h3gate {version(['git', '-C', ROOT, 'describe', '--always', '--dirty'])} "
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
    body = [table(n, scen[n], results) for n in names]
    md = "\n".join(head) + "\n" + "\n\n".join(body) + "\n\n" + targets(results) + "\n"
    if problems:
        md += "\n### Problems\n\n" + "\n".join(
            "- " + p.strip().replace("\n", "<br>") for p in problems) + "\n"
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        f.write(md)
    print(targets(results))
    log(f"wrote {a.out} ({total:.0f} s)")
    if a.keep:
        log(f"kept {d}")
    else:
        subprocess.run(["rm", "-rf", d])
    if problems:
        log(f"{len(problems)} problem(s): see above")
        sys.exit(1)


if __name__ == "__main__":
    main()
