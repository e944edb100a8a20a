#!/usr/bin/env python3
"""Macro benchmark of sni-proxy against direct, HAProxy, nginx stream and sniproxy.

    python3 bench/harness/run.py [--smoke] [--proxy-bin PATH] [--out bench/results]

Everything runs on loopback (127.0.0.1): an nginx HTTPS backend, one proxy at a
time in front of it, wrk/curl as the load.  The proxy under test is pinned to
core 0, the load generator and the backend to core 1.  See bench/README.md for
what is measured and how to read it.

Python 3.11 standard library only, plus Debian tools (wrk, curl, openssl,
nginx, haproxy, sniproxy, taskset, prlimit).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import errno
import json
import os
import platform
import re
import resource
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[2]
HARNESS = Path(__file__).resolve().parent
NOFILE = 262144  # nofile limit for the harness and every server (lowered to the hard limit by raise_nofile)
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
SNI = "localhost"
WRK_CONNS = 64
MIB = 1024 * 1024
GIB = 1024 * MIB

# Row order is the order of the report, the JSON and the plots.
ROWS = ["direct", "sni-proxy-copy", "sni-proxy-splice", "sni-proxy-sockmap", "haproxy", "nginx", "sniproxy"]
LABELS = {
    "direct": "direct",
    "sni-proxy-copy": "sni-proxy (copy)",
    "sni-proxy-splice": "sni-proxy (splice)",
    "sni-proxy-sockmap": "sni-proxy (sockmap)",
    "haproxy": "HAProxy",
    "nginx": "nginx stream",
    "sniproxy": "sniproxy",
}
OURS = ("sni-proxy-copy", "sni-proxy-splice", "sni-proxy-sockmap")
PEERS = ("haproxy", "nginx", "sniproxy")

# Targets (printed next to the figures).
T_KEEPALIVE = 0.95
T_NEWCONN = 0.95
T_BULK = 0.90
T_CPU_VS_BEST_PEER = 0.5
T_MEM_KIB = 8.0

BG_BUSY_WARN = 0.10  # fraction of the whole machine busy before a run that is flagged
FOREIGN_WARN = 0.10  # fraction of a run's busy time spent outside proxy/backend/load/irq that is flagged


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    """A row could not produce a number."""


# --------------------------------------------------------------------------------------
# /proc helpers


def cpu_times() -> tuple[float, float]:
    """(busy, total) seconds of the whole machine from the aggregate line of /proc/stat.

    busy = user + nice + system + irq + softirq + steal (guest is already in user).
    """
    b, t, _ = cpu_times3()
    return b, t


def cpu_times3() -> tuple[float, float, float]:
    """(busy, total, irq + softirq) seconds of the whole machine (all cores)."""
    b, t, i, _ = cpu_times4()
    return b, t, i


def cpu_times4() -> tuple[float, float, float, float]:
    """(busy, total, irq + softirq, steal) seconds of the whole machine (all cores)."""
    with open("/proc/stat") as f:
        parts = f.readline().split()
    v = [int(x) for x in parts[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = v
    busy = user + nice + system + irq + softirq + steal
    return busy / CLK_TCK, sum(v) / CLK_TCK, (irq + softirq) / CLK_TCK, steal / CLK_TCK


class Meter:
    """CPU accounting over one load run.

    busy_s is the figure the report uses: the whole machine's busy time.  The rest
    splits it: the proxy's process tree, the backend's, the load generator's (wrk/curl,
    children of the harness), interrupts; foreign_s is what is left, i.e. other work on
    the machine (a build, ...), and flags a noisy run.
    """

    def __init__(self, proxy: "Server | None", backend: "Server | None"):
        self.proxy, self.backend = proxy, backend
        self.b0, self.t0, self.i0, self.s0 = cpu_times4()
        self.p0 = proxy.cpu_seconds() if proxy else 0.0
        self.k0 = backend.cpu_seconds() if backend else 0.0
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.c0 = ru.ru_utime + ru.ru_stime
        self.lo0 = listen_overflows()

    def stop(self) -> dict[str, float]:
        b1, t1, i1, s1 = cpu_times4()
        p1 = self.proxy.cpu_seconds() if self.proxy else 0.0
        k1 = self.backend.cpu_seconds() if self.backend else 0.0
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        c1 = ru.ru_utime + ru.ru_stime
        busy = b1 - self.b0
        r = {
            "busy_s": busy,
            "wall_s": (t1 - self.t0) / max(1, os.cpu_count() or 1),
            "irq_s": i1 - self.i0,
            "steal_s": s1 - self.s0,
            "proxy_cpu_s": p1 - self.p0,
            "backend_cpu_s": k1 - self.k0,
            "load_cpu_s": c1 - self.c0,
            "listen_overflows": listen_overflows() - self.lo0,
        }
        r["foreign_s"] = max(0.0, busy - r["irq_s"] - r["steal_s"] - r["proxy_cpu_s"] - r["backend_cpu_s"]
                             - r["load_cpu_s"])
        r["foreign_frac"] = r["foreign_s"] / busy if busy > 0 else 0.0
        return r


def background_busy(seconds: float = 1.0) -> float:
    """Fraction of the whole machine (all cores) busy during `seconds` of doing nothing."""
    b0, t0 = cpu_times()
    time.sleep(seconds)
    b1, t1 = cpu_times()
    return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0


def wait_quiet(max_wait: float) -> float:
    """Wait (bounded) until the machine is quiet; return the last background busy fraction."""
    deadline = time.monotonic() + max_wait
    bg = background_busy(0.5)
    while bg > BG_BUSY_WARN and time.monotonic() < deadline:
        bg = background_busy(1.0)
    return bg


def _all_stats() -> dict[int, tuple[int, float]]:
    """pid -> (ppid, utime+stime seconds) for every process."""
    out: dict[int, tuple[int, float]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                data = f.read()
        except OSError:
            continue
        rest = data.rsplit(")", 1)[1].split()
        # rest[0] = state, rest[1] = ppid, rest[11] = utime, rest[12] = stime
        out[int(name)] = (int(rest[1]), (int(rest[11]) + int(rest[12])) / CLK_TCK)
    return out


def process_tree(root: int) -> list[int]:
    stats = _all_stats()
    if root not in stats:
        return []
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def tree_cpu_seconds(root: int) -> float:
    stats = _all_stats()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            total += stats[pid][1]
        todo.extend(children.get(pid, []))
    return total


def _status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_memory(root: int) -> dict[str, int]:
    pids = process_tree(root)
    return {
        "rss_kib": sum(_status_kib(p, "VmRSS") for p in pids),
        "pss_kib": sum(_pss_kib(p) for p in pids),
        "processes": len(pids),
    }


def listen_overflows() -> int:
    """TcpExt ListenOverflows: SYNs/ACKs dropped because an accept queue was full."""
    try:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
    except OSError:
        return 0
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            d = dict(zip(names.split()[1:], values.split()[1:]))
            return int(d.get("ListenOverflows", 0))
    return 0


def count_established(local_port: int) -> int:
    """Established IPv4 TCP sockets whose local port is `local_port` (server side)."""
    want = f":{local_port:04X}"
    n = 0
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            # "  sl  local_address rem_address   st ..." (columns shift once sl > 9999)
            parts = line.split(None, 4)
            if parts[3] == "01" and parts[1].endswith(want):
                n += 1
    return n


# --------------------------------------------------------------------------------------
# processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"exited with status {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s")


@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    log_path: Path
    port: int
    admin: int = 0  # sni-proxy's admin port (0: not ours)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def memory(self) -> dict[str, int]:
        return tree_memory(self.pid)

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.pid)

    def log_tail(self, n: int = 15) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(timeout=8)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=5)


class Runner:
    """Starts servers (each in its own session/process group) and stops them all."""

    def __init__(self, tmp: Path, pin: bool):
        self.tmp = tmp
        self.pin = pin
        self.servers: list[Server] = []

    def start(self, name: str, argv: list[str], port: int, core: int,
              env: dict[str, str] | None = None, timeout: float = 15.0) -> Server:
        cmd = []
        if self.pin:
            cmd += ["taskset", "-c", str(core)]
        cmd += ["prlimit", f"--nofile={NOFILE}:{NOFILE}", "--"] + argv
        log_path = self.tmp / f"{name}.log"
        logf = open(log_path, "ab")
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                env=full_env, start_new_session=True, cwd=self.tmp)
        logf.close()
        srv = Server(name, proc, log_path, port)
        self.servers.append(srv)
        try:
            wait_port(port, timeout, proc)
        except BenchError as e:
            tail = srv.log_tail()
            srv.stop()
            raise BenchError(f"{name}: {e}" + (f"\n--- {log_path.name} ---\n{tail}" if tail else ""))
        return srv

    def stop(self, srv: Server) -> None:
        srv.stop()
        if srv in self.servers:
            self.servers.remove(srv)

    def stop_all(self) -> None:
        for srv in list(reversed(self.servers)):
            try:
                srv.stop()
            except Exception as e:  # keep stopping the others
                log(f"stopping {srv.name} (pid {srv.pid}): {e}")
        self.servers.clear()


# --------------------------------------------------------------------------------------
# configs


def make_cert(tmp: Path) -> tuple[Path, Path]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "2", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
    return cert, key


VERSION_JSON = '{"major":"1","minor":"31","gitVersion":"v1.31.0-bench"}'


def nginx_main(d: Path, error_log: Path) -> str:
    """The main context every nginx here shares: one worker, many descriptors, foreground."""
    return f"""
user root;
worker_processes 1;
worker_rlimit_nofile {NOFILE};
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log {error_log} warn;
events {{
    worker_connections 131072;
    multi_accept on;
}}"""


def backend_conf(tmp: Path, port: int, cert: Path, key: Path) -> Path:
    d = tmp / "backend"
    d.mkdir(exist_ok=True)
    conf = d / "nginx.conf"
    conf.write_text(nginx_main(d, tmp / "backend.error.log") + f"""
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 600s;
    keepalive_requests 1000000000;
    client_header_timeout 600s;   # also bounds the TLS handshake in nginx 1.22
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port} ssl backlog=4096;
        server_name localhost;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.3;
        location = /big {{
            root {tmp};
        }}
        location / {{
            default_type application/json;
            return 200 '{VERSION_JSON}\\n';
        }}
    }}
}}
""")
    return conf


def ours_conf(tmp: Path, name: str, port: int, admin: int, backend: int, data_path: str) -> Path:
    conf = tmp / f"{name}.yaml"
    # sockmap is measured on kernels it is not trusted on yet (docs/sni-proxy.md says why).
    unsafe = "allow_sockmap_on_untrusted_kernel: true\n" if data_path == "sockmap" else ""
    conf.write_text(unsafe + f"""admin: {{address: 127.0.0.1:{admin}}}
listeners:
  - {{name: bench, address: 127.0.0.1:{port}, mode: tls, data_path: {data_path}}}
routes:
  - {{name: bench, hosts: [localhost], backends: ["127.0.0.1:{backend}"]}}
timeouts: {{idle: 0}}
limits: {{max_connections: 100000}}
access_log: false
""")
    return conf


def haproxy_conf(tmp: Path, port: int, backend: int) -> Path:
    conf = tmp / "haproxy.cfg"
    conf.write_text(f"""global
    nbthread 1
    maxconn {(NOFILE - 200) // 2}
    pidfile {tmp}/haproxy.pid

defaults
    mode tcp
    maxconn {(NOFILE - 200) // 2}
    timeout connect 5s
    timeout client 1h
    timeout server 1h

frontend bench
    bind 127.0.0.1:{port}
    tcp-request inspect-delay 5s
    tcp-request content accept if {{ req_ssl_hello_type 1 }}
    use_backend be_localhost if {{ req.ssl_sni -i localhost }}

backend be_localhost
    server s1 127.0.0.1:{backend}
""")
    return conf


def nginx_stream_conf(tmp: Path, port: int, backend: int) -> Path:
    d = tmp / "nginx-stream"
    d.mkdir(exist_ok=True)
    conf = d / "nginx.conf"
    conf.write_text("load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n"
                    + nginx_main(d, tmp / "nginx.error.log") + f"""
stream {{
    map $ssl_preread_server_name $sni_upstream {{
        localhost be_localhost;
        default   be_unknown;
    }}
    upstream be_localhost {{
        server 127.0.0.1:{backend};
    }}
    upstream be_unknown {{
        server 127.0.0.1:9;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        ssl_preread on;
        proxy_pass $sni_upstream;
        proxy_connect_timeout 5s;
        proxy_timeout 1h;
    }}
}}
""")
    return conf


def sniproxy_conf(tmp: Path, port: int, backend: int) -> Path:
    conf = tmp / "sniproxy.conf"
    conf.write_text(f"""pidfile {tmp}/sniproxy.pid

error_log {{
    filename {tmp}/sniproxy.error.log
    priority notice
}}

listener 127.0.0.1:{port} {{
    protocol tls
    table bench
}}

table bench {{
    ^localhost$ 127.0.0.1:{backend}
}}
""")
    return conf


# --------------------------------------------------------------------------------------
# load


def tls_client_hello() -> bytes:
    """A real ClientHello for SNI localhost, generated once on memory BIOs."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=SNI)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = out.read()
    if not hello or hello[0] != 0x16:
        raise BenchError("could not generate a ClientHello")
    return hello


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(value: str, unit: str) -> float:
    return float(value) * _UNITS[unit]


def parse_wrk(out: str) -> dict[str, Any]:
    r: dict[str, Any] = {}
    m = re.search(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h),", out, re.M)
    if not m:
        raise BenchError("wrk printed no request count:\n" + out[-800:])
    r["requests"] = int(m.group(1))
    r["elapsed_s"] = _ms(m.group(2), m.group(3)) / 1e3
    m = re.search(r"^Requests/sec:\s*([\d.]+)", out, re.M)
    r["per_s"] = float(m.group(1)) if m else r["requests"] / max(r["elapsed_s"], 1e-9)
    for pct in ("50", "75", "90", "99"):
        m = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s|m|h)\s*$", out, re.M)
        r[f"p{pct}_ms"] = _ms(m.group(1), m.group(2)) if m else None
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    r["socket_errors"] = dict(zip(("connect", "read", "write", "timeout"),
                                  (int(x) for x in m.groups()))) if m else {}
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    r["non_2xx"] = int(m.group(1)) if m else 0
    return r


class Load:
    def __init__(self, pin: bool, backend: Server):
        self.pin = pin
        self.backend = backend

    def _pin(self, argv: list[str]) -> list[str]:
        return (["taskset", "-c", "1"] if self.pin else []) + argv

    def wrk(self, port: int, duration: int, close: bool, server: Server | None) -> dict[str, Any]:
        argv = ["wrk", "-t1", f"-c{WRK_CONNS}", f"-d{duration}s", "--latency"]
        if close:
            argv += ["-H", "Connection: close"]
        argv.append(f"https://{SNI}:{port}/version")
        meter = Meter(server, self.backend)
        p = subprocess.run(self._pin(argv), capture_output=True, text=True, timeout=duration + 60)
        cpu = meter.stop()
        if p.returncode != 0:
            raise BenchError(f"wrk exited {p.returncode}: {p.stderr.strip()[-500:]}")
        r = parse_wrk(p.stdout)
        r.update(cpu)
        if not server:
            r["proxy_cpu_s"] = None
        if r["requests"] == 0:
            raise BenchError("wrk completed no request:\n" + p.stdout[-800:])
        if r["non_2xx"] > r["requests"] * 0.01:
            raise BenchError(f"wrk: {r['non_2xx']} of {r['requests']} responses were not 2xx")
        r["cpu_us_per_req"] = r["busy_s"] * 1e6 / r["requests"]
        r["own_cpu_us_per_req"] = (r["busy_s"] - r["foreign_s"]) * 1e6 / r["requests"]
        r["proxy_cpu_us_per_req"] = (r["proxy_cpu_s"] * 1e6 / r["requests"]) if server else None
        r["raw"] = p.stdout
        return r

    def curl_big(self, port: int, size: int, runs: int, server: Server | None) -> dict[str, Any]:
        argv = ["curl", "-sk", "--max-time", "300", "--resolve", f"{SNI}:{port}:127.0.0.1",
                "-o", "/dev/null", "-w", "%{http_code} %{size_download} %{speed_download}",
                f"https://{SNI}:{port}/big"]
        speeds, nbytes = [], 0
        acc: dict[str, float] = {}
        for _ in range(runs):
            meter = Meter(server, self.backend)
            p = subprocess.run(self._pin(argv), capture_output=True, text=True, timeout=320)
            cpu = meter.stop()
            if p.returncode != 0:
                raise BenchError(f"curl exited {p.returncode}: {p.stderr.strip()[-300:]}")
            code, got, speed = p.stdout.split()
            if code != "200" or int(got) != size:
                raise BenchError(f"curl /big: HTTP {code}, {got} of {size} bytes")
            speeds.append(float(speed) / MIB)
            nbytes += int(got)
            for k, v in cpu.items():
                acc[k] = acc.get(k, 0.0) + v
        gib = nbytes / GIB
        acc["foreign_frac"] = acc["foreign_s"] / acc["busy_s"] if acc["busy_s"] > 0 else 0.0
        return {
            "mib_s": max(speeds),
            "runs_mib_s": speeds,
            "bytes": nbytes,
            **acc,
            "cpu_s_per_gib": acc["busy_s"] / gib,
            "own_cpu_s_per_gib": (acc["busy_s"] - acc["foreign_s"]) / gib,
            "proxy_cpu_s_per_gib": (acc["proxy_cpu_s"] / gib) if server else None,
        }

    def probe(self, port: int) -> None:
        argv = ["curl", "-sk", "--max-time", "10", "--resolve", f"{SNI}:{port}:127.0.0.1",
                f"https://{SNI}:{port}/version"]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=20)
        if p.returncode != 0 or "gitVersion" not in p.stdout:
            raise BenchError(f"probe https://{SNI}:{port}/version failed (curl exit {p.returncode}): "
                             f"{(p.stdout + p.stderr).strip()[-300:]}")


def idle_connections(server: Server, backend_port: int, n: int, hello: bytes,
                     settle_timeout: float) -> dict[str, Any]:
    """Open n connections that each send a ClientHello; measure the proxy's RSS growth."""
    addr = ("127.0.0.1", server.port)
    up0 = count_established(backend_port)
    time.sleep(0.5)
    before = server.memory()
    socks: list[socket.socket] = []
    failed = 0
    lo0 = listen_overflows()
    t_start = time.monotonic()
    deadline = t_start + max(30.0, n / 200.0)
    try:
        while len(socks) + failed < n and time.monotonic() < deadline:
            batch = []
            for _ in range(min(256, n - len(socks) - failed)):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setblocking(False)
                rc = s.connect_ex(addr)
                if rc in (0, errno.EINPROGRESS):
                    batch.append(s)
                else:
                    failed += 1
                    s.close()
            poller = select.poll()
            by_fd = {s.fileno(): s for s in batch}
            for fd in by_fd:
                poller.register(fd, select.POLLOUT)
            t_end = time.monotonic() + 5.0
            while by_fd and time.monotonic() < t_end:
                for fd, ev in poller.poll(max(1, int((t_end - time.monotonic()) * 1000))):
                    s = by_fd.pop(fd, None)
                    if s is None:
                        continue
                    poller.unregister(fd)
                    ok = not (ev & (select.POLLERR | select.POLLHUP)) and \
                        s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
                    if ok:
                        try:
                            ok = s.send(hello) == len(hello)
                        except OSError:
                            ok = False
                    if ok:
                        socks.append(s)
                    else:
                        failed += 1
                        s.close()
            for s in by_fd.values():  # connect timed out
                failed += 1
                s.close()
            # pace: let the proxy and the backend accept what is in flight (bounded) so that no
            # accept queue overflows; a proxy that does not keep up just stops the wait.
            t_pace = time.monotonic() + 5.0
            while count_established(backend_port) - up0 < len(socks) - 512 and time.monotonic() < t_pace:
                time.sleep(0.05)
        opened = len(socks)
        open_s = time.monotonic() - t_start
        # Wait until the proxy has connected them upstream (bounded).
        t_up = time.monotonic() + settle_timeout
        upstream = count_established(backend_port) - up0
        while upstream < opened and time.monotonic() < t_up and server.alive():
            time.sleep(0.5)
            upstream = count_established(backend_port) - up0
        # Then let the RSS settle (bounded).
        time.sleep(1.0)
        after = server.memory()
        for _ in range(20):
            time.sleep(0.5)
            m = server.memory()
            stable = abs(m["rss_kib"] - after["rss_kib"]) <= max(64, after["rss_kib"] // 500)
            after = m
            if stable:
                break
        upstream = count_established(backend_port) - up0
        client_legs = count_established(server.port)
        alive = server.alive()
    finally:
        for s in socks:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                s.close()
            except OSError:
                pass
    if not alive:
        raise BenchError(f"{server.name} died during the idle-connection test:\n{server.log_tail()}")
    if opened == 0:
        raise BenchError("no idle connection could be opened")
    delta = after["rss_kib"] - before["rss_kib"]
    return {
        "requested": n,
        "opened": opened,
        "failed": failed,
        "open_s": round(open_s, 2),
        "listen_overflows": listen_overflows() - lo0,
        "upstream_established": upstream,
        "client_legs_established": client_legs,
        "rss_before_kib": before["rss_kib"],
        "rss_after_kib": after["rss_kib"],
        "pss_before_kib": before["pss_kib"],
        "pss_after_kib": after["pss_kib"],
        "processes": after["processes"],
        "kib_per_conn": delta / n,
        "held": min(upstream, client_legs, n),
        "kib_per_held_conn": delta / min(upstream, client_legs, n) if min(upstream, client_legs, n) > 0 else None,
        "pss_kib_per_conn": (after["pss_kib"] - before["pss_kib"]) / n,
    }


# --------------------------------------------------------------------------------------
# rows


@dataclass
class Ctx:
    args: argparse.Namespace
    tmp: Path
    runner: Runner
    load: Load
    backend_port: int
    hello: bytes
    proxy_bin: Path
    duration: int
    warmup: int
    bulk_size: int
    bulk_runs: int
    idle_n: int
    idle_wait: float
    settle_timeout: float


def peer_installed(row: str) -> str | None:
    """None when the row can run, else why not."""
    if row == "sni-proxy-sockmap" and os.geteuid() != 0:
        return "needs root (CAP_BPF, CAP_NET_ADMIN) to load the sockmap program"
    if row in OURS:
        return None
    if row == "haproxy" and not shutil.which("haproxy"):
        return "haproxy not installed"
    if row == "nginx":
        if not shutil.which("nginx"):
            return "nginx not installed"
        if not Path("/usr/lib/nginx/modules/ngx_stream_module.so").exists():
            return "libnginx-mod-stream not installed"
    if row == "sniproxy" and not shutil.which("sniproxy"):
        return "sniproxy not installed"
    return None


def start_row(ctx: Ctx, row: str, tag: str) -> Server:
    port = free_port()
    name = f"{row}-{tag}"
    b = ctx.backend_port
    if row in OURS:
        admin = free_port()
        conf = ours_conf(ctx.tmp, name, port, admin, b, row.removeprefix("sni-proxy-"))
        chk = subprocess.run([str(ctx.proxy_bin), "--config", str(conf), "--check"],
                             capture_output=True, text=True, timeout=30)
        if chk.returncode != 0:
            raise BenchError(f"sni-proxy --check rejected the config (exit {chk.returncode}): "
                             f"{(chk.stdout + chk.stderr).strip()[-500:]}")
        env = {"TOKIO_WORKER_THREADS": "1", "RUST_LOG": os.environ.get("BENCH_RUST_LOG", "warn")}
        srv = ctx.runner.start(name, [str(ctx.proxy_bin), "--config", str(conf)], port, 0, env)
        srv.admin = admin
        # best effort: wait for /readyz
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=1) as r:
                    if r.status == 200:
                        break
            except Exception:
                time.sleep(0.1)
        return srv
    if row == "haproxy":
        conf = haproxy_conf(ctx.tmp, port, b)
        return ctx.runner.start(name, ["haproxy", "-db", "-f", str(conf)], port, 0)
    if row == "nginx":
        conf = nginx_stream_conf(ctx.tmp, port, b)
        return ctx.runner.start(name, ["nginx", "-p", str(conf.parent) + "/", "-c", str(conf),
                                       "-e", str(ctx.tmp / "nginx.error.log")], port, 0)
    if row == "sniproxy":
        conf = sniproxy_conf(ctx.tmp, port, b)
        return ctx.runner.start(name, ["sniproxy", "-f", "-c", str(conf), "-n", str(NOFILE)], port, 0)
    raise ValueError(row)


def data_path_used(srv: Server) -> dict[str, float]:
    """sni-proxy's connections per data path (and sockmap's unspliced ones) from /metrics."""
    used: dict[str, float] = {}
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.admin}/metrics", timeout=5) as r:
            text = r.read().decode()
    except Exception as e:
        return {"error": str(e)}  # type: ignore[dict-item]
    for line in text.splitlines():
        m = re.match(r'sni_proxy_data_path_connections_total\{path="(\w+)"\} (\S+)', line)
        if m:
            used[m.group(1)] = float(m.group(2))
        elif line.startswith("sni_proxy_sockmap_unspliced_connections_total "):
            used["sockmap_unspliced"] = float(line.split()[1])
    return used


def measure_row(ctx: Ctx, row: str, with_idle: bool = True) -> dict[str, Any]:
    res: dict[str, Any] = {"row": row, "label": LABELS[row], "status": "ok", "errors": [], "background": {}}
    if row in OURS and not ctx.proxy_bin.exists():
        res["status"] = "missing"
        res["errors"].append(f"{ctx.proxy_bin} does not exist (build it with cargo build --release)")
        return res
    why = peer_installed(row)
    if why:
        res["status"] = "missing"
        res["errors"].append(why)
        return res

    def step(key: str, fn: Callable[[], Any]) -> None:
        try:
            res["background"][key] = round(wait_quiet(ctx.idle_wait), 3)
            res[key] = fn()
        except BenchError as e:
            res["errors"].append(f"{key}: {e}")
        except subprocess.TimeoutExpired as e:
            res["errors"].append(f"{key}: timed out: {e}")

    # throughput (one instance)
    srv = None
    try:
        if row == "direct":
            port = ctx.backend_port
        else:
            srv = start_row(ctx, row, "load")
            port = srv.port
        ctx.load.probe(port)
        if ctx.warmup:
            ctx.load.wrk(port, ctx.warmup, False, srv)
        log(f"{row}: keep-alive {ctx.duration}s")
        step("keepalive", lambda: ctx.load.wrk(port, ctx.duration, False, srv))
        log(f"{row}: new connections {ctx.duration}s")
        step("newconn", lambda: ctx.load.wrk(port, ctx.duration, True, srv))
        log(f"{row}: bulk {ctx.bulk_runs} x {ctx.bulk_size // MIB} MiB")
        step("bulk", lambda: ctx.load.curl_big(port, ctx.bulk_size, ctx.bulk_runs, srv))
        if srv is not None and not srv.alive():
            res["errors"].append(f"{row} exited (status {srv.proc.returncode}) during the load:\n{srv.log_tail()}")
        elif srv is not None and srv.admin:
            used = data_path_used(srv)
            res["data_path_connections"] = used
            want = row.removeprefix("sni-proxy-")
            if not used.get(want):
                res["errors"].append(f"{row}: no connection used the {want} data path ({used}); "
                                     f"the proxy fell back:\n{srv.log_tail()}")
    except BenchError as e:
        res["errors"].append(str(e))
    finally:
        if srv is not None:
            if srv.alive():
                res["rss_after_load_kib"] = srv.memory()["rss_kib"]
            ctx.runner.stop(srv)

    # idle-connection memory (a fresh instance)
    if row != "direct" and ctx.idle_n > 0 and with_idle:
        srv = None
        try:
            srv = start_row(ctx, row, "idle")
            ctx.load.probe(srv.port)
            log(f"{row}: {ctx.idle_n} idle connections")
            step("idle", lambda: idle_connections(srv, ctx.backend_port, ctx.idle_n, ctx.hello,
                                                  ctx.settle_timeout))
        except BenchError as e:
            res["errors"].append(f"idle: {e}")
        finally:
            if srv is not None:
                ctx.runner.stop(srv)
        # let the backend see the closes before the next row
        deadline = time.monotonic() + 15
        while count_established(ctx.backend_port) > 0 and time.monotonic() < deadline:
            time.sleep(0.25)

    needed = ["keepalive", "newconn", "bulk"] + (["idle"] if row != "direct" and ctx.idle_n > 0 and with_idle else [])
    missing = [k for k in needed if k not in res]
    if missing:
        res["status"] = "failed" if len(missing) == len(needed) else "partial"
        res["failed_measures"] = missing
    if not ctx.args.keep_raw:
        for k in ("keepalive", "newconn"):
            if isinstance(res.get(k), dict):
                res[k].pop("raw", None)
    return res


# --------------------------------------------------------------------------------------
# derived figures


def derive(results: list[dict[str, Any]]) -> dict[str, Any]:
    by = {r["row"]: r for r in results}
    d = by.get("direct", {})

    def get(r: dict[str, Any], k: str, f: str) -> float | None:
        v = r.get(k)
        return v.get(f) if isinstance(v, dict) else None

    base = {
        "keepalive": get(d, "keepalive", "per_s"),
        "newconn": get(d, "newconn", "per_s"),
        "bulk": get(d, "bulk", "mib_s"),
        "cpu_req": get(d, "keepalive", "cpu_us_per_req"),
        "cpu_conn": get(d, "newconn", "cpu_us_per_req"),
        "cpu_gib": get(d, "bulk", "cpu_s_per_gib"),
    }
    for r in results:
        ratios, over = {}, {}
        for k, f in (("keepalive", "per_s"), ("newconn", "per_s"), ("bulk", "mib_s")):
            v = get(r, k, f)
            ratios[k] = (v / base[k]) if (v is not None and base[k]) else None
        for k, src, f in (("cpu_req", "keepalive", "cpu_us_per_req"),
                          ("cpu_conn", "newconn", "cpu_us_per_req"),
                          ("cpu_gib", "bulk", "cpu_s_per_gib")):
            v = get(r, src, f)
            over[k] = (v - base[k]) if (v is not None and base[k] is not None) else None
        r["ratio"] = ratios
        r["cpu_overhead"] = over

    best_peer: dict[str, Any] = {}
    for k in ("cpu_req", "cpu_conn", "cpu_gib"):
        vals = [(by[p]["cpu_overhead"][k], p) for p in PEERS
                if p in by and by[p].get("cpu_overhead", {}).get(k) is not None]
        best_peer[k] = min(vals) if vals else None

    targets = []
    for row in OURS:
        r = by.get(row)
        label = LABELS[row]
        if r is None:
            continue

        def add(what: str, value: float | None, goal: str, ok: bool | None, shown: str) -> None:
            targets.append({"row": row, "what": what, "value": value, "target": goal,
                            "met": ok, "text": shown})

        for k, name, goal in (("keepalive", "keep-alive req/s", T_KEEPALIVE),
                              ("newconn", "new TLS conns/s", T_NEWCONN),
                              ("bulk", "bulk MiB/s", T_BULK)):
            v = r["ratio"].get(k)
            add(name, v, f">= {goal}x direct", None if v is None else v >= goal,
                "not measured" if v is None else f"{v:.3f}x direct")
        for k, name, unit in (("cpu_req", "CPU overhead per request", "us/request"),
                              ("cpu_gib", "CPU overhead per GiB", "s/GiB")):
            v = r["cpu_overhead"].get(k)
            bp = best_peer.get(k)
            if v is None or bp is None:
                add(name, v, f"<= {T_CPU_VS_BEST_PEER}x best peer", None,
                    "not measured" if v is None else f"{v:.3g} {unit}; no peer was measured")
            elif bp[0] <= 0:
                add(name, v, f"<= {T_CPU_VS_BEST_PEER}x best peer", None,
                    f"{v:.3g} {unit}; best peer ({LABELS[bp[1]]}) {bp[0]:.3g} {unit} is within noise: undetermined")
            else:
                lim = T_CPU_VS_BEST_PEER * bp[0]
                add(name, v, f"<= {lim:.3g} {unit} ({T_CPU_VS_BEST_PEER}x {LABELS[bp[1]]})", v <= lim,
                    f"{v:.3g} {unit} vs limit {lim:.3g} {unit} ({T_CPU_VS_BEST_PEER}x {LABELS[bp[1]]} {bp[0]:.3g})")
        idle = r.get("idle")
        v = idle_kib(idle) if idle else None
        if v is None:
            add("memory per idle connection", v, f"<= {T_MEM_KIB} KiB", None, "not measured")
        elif idle_held(idle) < idle["requested"]:
            add("memory per idle connection", v, f"<= {T_MEM_KIB} KiB", False,
                f"{v:.2f} KiB per held connection, but it held only {idle_held(idle):,} of "
                f"{idle['requested']:,}")
        else:
            add("memory per idle connection", v, f"<= {T_MEM_KIB} KiB", v <= T_MEM_KIB, f"{v:.2f} KiB")
    return {"direct": base, "best_peer_overhead": best_peer, "targets": targets}


# --------------------------------------------------------------------------------------
# output


def idle_held(idle: dict[str, Any]) -> int:
    """Connections the proxy really held: both legs still established."""
    return min(idle["upstream_established"], idle["client_legs_established"], idle["requested"])


def idle_kib(idle: dict[str, Any]) -> float | None:
    """RSS growth per connection held (= per connection asked when all were held)."""
    held = idle_held(idle)
    if held <= 0:
        return None
    return (idle["rss_after_kib"] - idle["rss_before_kib"]) / held


def fmt_num(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "–"
    return f"{v:,.{digits}f}"


def fmt_ratio(v: float | None) -> str:
    return "" if v is None else f" ({v:.2f}×)"


def fmt_over(v: float | None, digits: int = 1) -> str:
    return "" if v is None else f" ({v:+.{digits}f})"


def cell(r: dict[str, Any], key: str) -> bool:
    return isinstance(r.get(key), dict)


def render_md(meta: dict[str, Any], results: list[dict[str, Any]], derived: dict[str, Any]) -> str:
    L = []
    L.append("# sni-proxy macro benchmark")
    L.append("")
    L.append(f"- date: {meta['date']}")
    L.append(f"- commit: `{meta['commit']}`")
    L.append(f"- kernel: `{meta['kernel']}`; CPU: {meta['cpu_model']} ({meta['cores']} cores)")
    L.append(f"- mode: {meta['mode']}; wrk: `-t1 -c{WRK_CONNS} -d{meta['duration_s']}s` per test"
             f" (+{meta['warmup_s']} s warm-up); bulk: best of {meta['bulk_runs']} × {meta['bulk_mib']} MiB;"
             f" idle: {meta['idle_conns']:,} connections; total run time {meta['elapsed_s']:.0f} s")
    if meta.get("repeat", 1) > 1:
        L.append(f"- rounds: {meta['repeat']} (each throughput figure is the median round's; the spread is "
                 "in the details table)")
    if meta.get("idle_note"):
        L.append(f"- note: {meta['idle_note']}")
    dr = meta.get("drift")
    if dr and "ratio" in dr:
        flag = "" if abs(dr["ratio"] - 1) <= 0.05 else " — **drifted by more than 5 %: the machine changed during the run**"
        L.append(f"- drift check: direct keep-alive re-measured at the end: {dr['keepalive_last']:,.0f} req/s vs "
                 f"{dr['keepalive_first']:,.0f} at the start ({dr['ratio']:.3f}×){flag}")
    elif dr:
        L.append(f"- drift check failed: {dr.get('error', '?')}")
    L.append(f"- pinning: {meta['pinning']}")
    L.append(f"- tools: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}")
    L.append("")
    L.append("Throughput ratios are vs `direct`. CPU = whole-machine busy time (/proc/stat, all cores) "
             "during the run ÷ work done; (+x) = minus the `direct` row's figure, i.e. the proxy's overhead. "
             "KiB / idle conn = growth of the proxy's RSS ÷ connections it held (client and upstream leg "
             "established; `held only` when it could not hold all).")
    L.append("")
    L.append("| row | keep-alive req/s | p99 ms | new TLS conns/s | bulk MiB/s | KiB / idle conn |"
             " CPU µs/req | CPU µs/conn | CPU s/GiB |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        if r["status"] == "missing":
            L.append(f"| {r['label']} | missing | | | | | | | |")
            continue
        ka, nc, bu, idle = (r.get(k) if cell(r, k) else None for k in ("keepalive", "newconn", "bulk", "idle"))
        ratio, over = r.get("ratio", {}), r.get("cpu_overhead", {})
        row_is_direct = r["row"] == "direct"
        mem = "n/a" if row_is_direct else "failed"
        if idle:
            kib = idle_kib(idle)
            mem = "–" if kib is None else f"{kib:.2f}"
            if idle_held(idle) < idle["requested"]:
                mem += f" (held only {idle_held(idle):,})"
        cols = [
            r["label"] + ("" if r["status"] == "ok" else f" ({r['status']})"),
            (fmt_num(ka["per_s"]) + ("" if row_is_direct else fmt_ratio(ratio.get("keepalive")))) if ka else "failed",
            fmt_num(ka["p99_ms"], 2) if ka and ka.get("p99_ms") is not None else "–",
            (fmt_num(nc["per_s"]) + ("" if row_is_direct else fmt_ratio(ratio.get("newconn")))) if nc else "failed",
            (fmt_num(bu["mib_s"]) + ("" if row_is_direct else fmt_ratio(ratio.get("bulk")))) if bu else "failed",
            mem,
            (fmt_num(ka["cpu_us_per_req"], 1) + ("" if row_is_direct else fmt_over(over.get("cpu_req")))) if ka else "–",
            (fmt_num(nc["cpu_us_per_req"], 1) + ("" if row_is_direct else fmt_over(over.get("cpu_conn")))) if nc else "–",
            (fmt_num(bu["cpu_s_per_gib"], 2) + ("" if row_is_direct else fmt_over(over.get("cpu_gib"), 2))) if bu else "–",
        ]
        L.append("| " + " | ".join(cols) + " |")
    L.append("")
    L.append("## Targets")
    L.append("")
    if not derived["targets"]:
        L.append("- (no sni-proxy row was run)")
    for t in derived["targets"]:
        state = {True: "**met**", False: "**not met**", None: "not determined"}[t["met"]]
        L.append(f"- {LABELS[t['row']]}: {t['what']} {t['target']}: {t['text']} — {state}")
    L.append("")
    L.append("## Details")
    L.append("")
    L.append("| row | p50 / p99 ms (keep-alive) | p99 ms (new conns) | bulk runs MiB/s |"
             " proxy process CPU µs/req · µs/conn · s/GiB | idle: opened / upstream legs / client legs / RSS before→after MiB |"
             " other work on the machine: idle-before → share of busy during |")
    L.append("|---|---|---|---|---|---|---|")
    for r in results:
        if r["status"] == "missing":
            continue
        ka, nc, bu, idle = (r.get(k) if cell(r, k) else None for k in ("keepalive", "newconn", "bulk", "idle"))
        pc = []
        for m, f, dg in ((ka, "proxy_cpu_us_per_req", 1), (nc, "proxy_cpu_us_per_req", 1),
                         (bu, "proxy_cpu_s_per_gib", 2)):
            pc.append(fmt_num(m.get(f), dg) if m and m.get(f) is not None else "–")
        bg = r.get("background", {})
        noise = []
        for k in ("keepalive", "newconn", "bulk", "idle"):
            if k not in bg:
                continue
            m = r.get(k)
            during = f" → {m['foreign_frac'] * 100:.0f}%" if isinstance(m, dict) and "foreign_frac" in m else ""
            noise.append(f"{k} {bg[k] * 100:.0f}%{during}")
        L.append("| " + " | ".join([
            r["label"],
            f"{fmt_num(ka.get('p50_ms'), 2)} / {fmt_num(ka.get('p99_ms'), 2)}" if ka else "–",
            fmt_num(nc.get("p99_ms"), 2) if nc else "–",
            ", ".join(f"{s:,.0f}" for s in bu["runs_mib_s"]) if bu else "–",
            " · ".join(pc) if r["row"] != "direct" else "–",
            (f"{idle['opened']:,} / {idle['upstream_established']:,} / {idle['client_legs_established']:,} / "
             f"{idle['rss_before_kib'] / 1024:.1f}→{idle['rss_after_kib'] / 1024:.1f}") if idle else "–",
            ", ".join(noise) or "–",
        ]) + " |")
    L.append("")
    notes = []
    for r in results:
        for e in r.get("errors", []):
            first = e.strip().splitlines()
            notes.append(f"- {r['label']} ({r['status']}): " + (first[0] if first else e))
        for k in ("keepalive", "newconn"):
            m = r.get(k)
            if isinstance(m, dict):
                se = {a: b for a, b in m.get("socket_errors", {}).items() if b}
                if se or m.get("non_2xx"):
                    notes.append(f"- {r['label']} {k}: wrk socket errors {se or 0}, non-2xx {m.get('non_2xx', 0)}")
        for k, v in r.get("background", {}).items():
            m = r.get(k)
            ff = m.get("foreign_frac") if isinstance(m, dict) else None
            if v > BG_BUSY_WARN or (ff is not None and ff > FOREIGN_WARN):
                notes.append(f"- {r['label']} {k}: other work on the machine ({v * 100:.0f}% of all cores busy "
                             f"just before" + (f"; {ff * 100:.0f}% of the busy time during the run was not "
                                               f"ours" if ff is not None else "") +
                             "): its figures are suspect")
    rounds_table(L, results, [("keep-alive req/s", "keepalive", ",.0f"), ("new TLS conns/s", "newconn", ",.0f"),
                              ("bulk MiB/s", "bulk", ",.0f")])
    if notes:
        L.append("## Notes")
        L.append("")
        L.extend(notes)
        L.append("")
    L.append("Plots: `throughput.svg`, `cpu.svg`; raw numbers: `latest.json`.")
    L.append("")
    return "\n".join(L)


# ---- SVG (hand-written) ----

FONT = "font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\""
C_OURS = "#d6452f"
C_OURS2 = "#f08a5d"
C_PEER = "#7f8c9b"
C_DIRECT = "#3b6ea5"


def _esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _text(x: float, y: float, s: str, size: int = 12, anchor: str = "start", weight: str = "normal",
          fill: str = "#222", rotate: float | None = None, halo: bool = False) -> str:
    tr = f' transform="rotate({rotate} {x:.1f} {y:.1f})"' if rotate is not None else ""
    # halo: a white outline under the glyphs keeps a label readable across grid/target lines
    h = ' stroke="white" stroke-width="3" stroke-linejoin="round" paint-order="stroke"' if halo else ""
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" '
            f'font-weight="{weight}" fill="{fill}"{h}{tr}>{_esc(s)}</text>')


def _nice_step(span: float, n: int = 5) -> float:
    raw = span / n if span > 0 else 1
    mag = 10 ** __import__("math").floor(__import__("math").log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def svg_throughput(results: list[dict[str, Any]], derived: dict[str, Any], meta: dict[str, Any]) -> str:
    W, H = 960, 540
    left, right, top, bottom = 70, 20, 80, 115
    pw, ph = W - left - right, H - top - bottom
    metrics = [("keepalive", "keep-alive req/s", "#4c78a8"),
               ("newconn", "new TLS conns/s", "#f58518"),
               ("bulk", "256 MiB download MiB/s" if meta["bulk_mib"] == 256 else f"{meta['bulk_mib']} MiB download MiB/s",
                "#54a24b")]
    vals = [r.get("ratio", {}).get(k) for r in results for k, _, _ in metrics]
    vmax = max([v for v in vals if v is not None] + [1.0])
    ymax = max(1.2, (int(vmax * 10) + 2) / 10)
    step = _nice_step(ymax, 6)

    def y(v: float) -> float:
        return top + ph - (v / ymax) * ph

    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" {FONT}>',
         f'<rect width="{W}" height="{H}" fill="white"/>',
         _text(W / 2, 28, "Throughput relative to direct (client → backend, no proxy) — higher is better",
               17, "middle", "bold"),
         _text(W / 2, 50, f"proxy pinned to 1 core; {meta['mode']} run {meta['date']} · commit {meta['commit']}",
               12, "middle", fill="#555")]
    # grid
    g = 0.0
    while g <= ymax + 1e-9:
        yy = y(g)
        o.append(f'<line x1="{left}" y1="{yy:.1f}" x2="{W - right}" y2="{yy:.1f}" stroke="#e3e3e3"/>')
        o.append(_text(left - 8, yy + 4, f"{g:g}×", 11, "end", fill="#555"))
        g += step
    o.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="#888"/>')
    o.append(f'<line x1="{left}" y1="{top + ph}" x2="{W - right}" y2="{top + ph}" stroke="#888"/>')
    # direct = 1 and target lines
    o.append(f'<line x1="{left}" y1="{y(1):.1f}" x2="{W - right}" y2="{y(1):.1f}" stroke="#333" '
             f'stroke-dasharray="6 4"/>')
    o.append(_text(W - right - 4, y(1) - 5, "direct = 1.0×", 11, "end", fill="#333"))
    o.append(f'<line x1="{left}" y1="{y(T_KEEPALIVE):.1f}" x2="{W - right}" y2="{y(T_KEEPALIVE):.1f}" '
             f'stroke="{C_OURS}" stroke-width="1.2" stroke-dasharray="2 3"/>')
    o.append(f'<line x1="{left}" y1="{y(T_BULK):.1f}" x2="{W - right}" y2="{y(T_BULK):.1f}" '
             f'stroke="#2e7d32" stroke-width="1.2" stroke-dasharray="2 3"/>')
    n = len(results)
    gw = pw / max(n, 1)
    bw = min(38.0, gw * 0.8 / 3)
    for i, r in enumerate(results):
        cx = left + gw * (i + 0.5)
        o.append(_text(cx, top + ph + 20, r["label"], 12, "middle",
                       "bold" if r["row"] in OURS else "normal"))
        d = r.get("ratio", {})
        if r["status"] == "missing" or all(d.get(k) is None for k, _, _ in metrics):
            o.append(_text(cx, top + ph - 12, r["status"] if r["status"] != "ok" else "no data",
                           12, "middle", fill="#a00"))
            continue
        for j, (k, _, col) in enumerate(metrics):
            v = d.get(k)
            x0 = cx - 1.5 * bw + j * bw
            if v is None:
                o.append(_text(x0 + bw / 2, top + ph - 6, "×", 12, "middle", fill="#a00"))
                continue
            vv = min(v, ymax)
            o.append(f'<rect x="{x0 + 1:.1f}" y="{y(vv):.1f}" width="{bw - 2:.1f}" '
                     f'height="{top + ph - y(vv):.1f}" fill="{col}"/>')
            o.append(_text(x0 + bw / 2, y(vv) - 4, f"{v:.2f}", 10, "middle", fill="#333", halo=True))
    # legend with the absolute direct figures
    base = derived["direct"]
    absd = {"keepalive": f"{base['keepalive']:,.0f}/s" if base["keepalive"] else "–",
            "newconn": f"{base['newconn']:,.0f}/s" if base["newconn"] else "–",
            "bulk": f"{base['bulk']:,.0f} MiB/s" if base["bulk"] else "–"}
    lx = left
    ly = H - 42
    for k, name, col in metrics:
        o.append(f'<rect x="{lx}" y="{ly - 10}" width="12" height="12" fill="{col}"/>')
        label = f"{name} (direct = {absd[k]})"
        o.append(_text(lx + 17, ly, label, 12))
        lx += 20 + len(label) * 6.8
    ly += 22
    o.append(f'<line x1="{left}" y1="{ly - 4}" x2="{left + 24}" y2="{ly - 4}" stroke="{C_OURS}" '
             f'stroke-width="1.2" stroke-dasharray="2 3"/>')
    o.append(_text(left + 30, ly, f"target {T_KEEPALIVE}× (req/s, conns/s)", 12))
    o.append(f'<line x1="{left + 250}" y1="{ly - 4}" x2="{left + 274}" y2="{ly - 4}" stroke="#2e7d32" '
             f'stroke-width="1.2" stroke-dasharray="2 3"/>')
    o.append(_text(left + 280, ly, f"target {T_BULK}× (MiB/s)", 12))
    o.append(_text(W - right, ly, "sni-proxy rows in bold", 12, "end", fill="#555"))
    o.append("</svg>")
    return "\n".join(o)


def _hbar_panel(o: list[str], x: float, y0: float, w: float, h: float, title: str, unit: str,
                items: list[tuple[str, float | None, str, bool]], target: float | None, target_label: str,
                digits: int) -> None:
    """items: (label, value or None, text when None, ours?)."""
    label_w = 130
    px, pw = x + label_w, w - label_w - 50
    vals = [v for _, v, _, _ in items if v is not None] + ([target] if target is not None else [])
    vmin = min([0.0] + vals)
    vmax = max([0.0] + vals)
    if vmax - vmin < 1e-12:
        vmax = vmin + 1
    span = vmax - vmin
    vmin -= span * (0.02 if vmin < 0 else 0)
    vmax += span * 0.12
    step = _nice_step(vmax - vmin, 4)

    def X(v: float) -> float:
        return px + (v - vmin) / (vmax - vmin) * pw

    o.append(_text(x + w / 2, y0, title, 14, "middle", "bold"))
    top = y0 + 14
    rows = len(items)
    rh = (h - 40) / max(rows, 1)
    # grid
    import math
    g = math.ceil(vmin / step) * step
    while g <= vmax + 1e-12:
        gx = X(g)
        o.append(f'<line x1="{gx:.1f}" y1="{top}" x2="{gx:.1f}" y2="{top + rows * rh:.1f}" stroke="#e6e6e6"/>')
        o.append(_text(gx, top + rows * rh + 14, f"{g:g}", 10, "middle", fill="#555"))
        g += step
    o.append(_text(px + pw / 2, top + rows * rh + 30, unit, 11, "middle", fill="#444"))
    o.append(f'<line x1="{X(0):.1f}" y1="{top}" x2="{X(0):.1f}" y2="{top + rows * rh:.1f}" stroke="#666"/>')
    for i, (label, v, none_text, ours) in enumerate(items):
        cy = top + rh * (i + 0.5)
        o.append(_text(px - 8, cy + 4, label, 12, "end", "bold" if ours else "normal"))
        if v is None:
            o.append(_text(px + 6, cy + 4, none_text, 11, "start", fill="#a00"))
            continue
        x1, x2 = sorted((X(0), X(v)))
        bh = min(22.0, rh * 0.6)
        o.append(f'<rect x="{x1:.1f}" y="{cy - bh / 2:.1f}" width="{max(x2 - x1, 1):.1f}" height="{bh:.1f}" '
                 f'fill="{C_OURS if ours else C_PEER}"/>')
        # a positive value is written after its bar, a negative one right of the zero line
        tx = X(v) + 5 if v >= 0 else X(0) + 5
        o.append(_text(tx, cy + 4, f"{v:.{digits}f}", 11, "start", fill="#222", halo=True))
    if target is not None:
        tx = X(target)
        o.append(f'<line x1="{tx:.1f}" y1="{top - 2}" x2="{tx:.1f}" y2="{top + rows * rh:.1f}" '
                 f'stroke="{C_OURS}" stroke-dasharray="4 3"/>')
        o.append(_text(tx, top + rows * rh + 44, target_label, 10, "middle", fill=C_OURS))


def svg_cpu(results: list[dict[str, Any]], derived: dict[str, Any], meta: dict[str, Any]) -> str:
    W, H = 1080, 440
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" {FONT}>',
         f'<rect width="{W}" height="{H}" fill="white"/>',
         _text(W / 2, 28, "CPU overhead of each proxy: whole-machine busy time minus direct's — lower is better",
               17, "middle", "bold"),
         _text(W / 2, 50, "/proc/stat user+nice+system+irq+softirq+steal, all cores, over each wrk/curl run; "
               f"{meta['mode']} run {meta['date']}", 12, "middle", fill="#555")]
    rows = [r for r in results if r["row"] != "direct"]
    base = derived["direct"]
    panels = [
        ("cpu_req", "per keep-alive request",
         f"µs / request (direct: {base['cpu_req']:.1f})" if base["cpu_req"] is not None else "µs / request", 1),
        ("cpu_conn", "per new TLS connection",
         f"µs / connection (direct: {base['cpu_conn']:.1f})" if base["cpu_conn"] is not None else "µs / connection", 1),
        ("cpu_gib", "per GiB downloaded",
         f"s / GiB (direct: {base['cpu_gib']:.2f})" if base["cpu_gib"] is not None else "s / GiB", 2),
    ]
    pw = (W - 40) / 3
    for i, (k, title, unit, digits) in enumerate(panels):
        items = []
        for r in rows:
            v = r.get("cpu_overhead", {}).get(k)
            why = r["status"] if r["status"] != "ok" else ("no direct row" if base[k] is None else "no data")
            items.append((r["label"], v, why, r["row"] in OURS))
        bp = derived["best_peer_overhead"].get(k)
        target, tl = None, ""
        if k in ("cpu_req", "cpu_gib") and bp and bp[0] > 0:
            target = T_CPU_VS_BEST_PEER * bp[0]
            tl = f"target ≤ {T_CPU_VS_BEST_PEER}× best peer = {target:.{digits}f}"
        _hbar_panel(o, 20 + i * pw, 88, pw - 10, H - 110, title, unit, items, target, tl, digits)
    o.append("</svg>")
    return "\n".join(o)


# --------------------------------------------------------------------------------------
# main


def sh(argv: list[str], default: str = "?") -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=10, cwd=REPO)
        out = (p.stdout + p.stderr).strip()
        return out if p.returncode == 0 and out else default
    except (OSError, subprocess.TimeoutExpired):
        return default


def sh_any(argv: list[str]) -> str:
    """Output of a command whatever its exit status (wrk -v exits 1)."""
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return (p.stdout + p.stderr).strip() or "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def collect_meta(args: argparse.Namespace, pin: bool) -> dict[str, Any]:
    commit = sh(["git", "rev-parse", "--short", "HEAD"], "no commit yet")
    if sh(["git", "status", "--porcelain", "--untracked-files=no"], ""):
        commit += " (dirty)"
    cpu_model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {
        "wrk": sh_any(["wrk", "-v"]).splitlines()[0].split(" Copyright")[0].removeprefix("wrk ") if shutil.which("wrk") else "missing",
        "curl": sh(["curl", "--version"]).split()[1] if shutil.which("curl") else "missing",
        "OpenSSL": sh(["openssl", "version"]).split()[1] if shutil.which("openssl") else "missing",
        "nginx": sh(["nginx", "-v"]).split("/")[-1] if shutil.which("nginx") else "missing",
        "HAProxy": sh(["haproxy", "-v"]).split()[2] if shutil.which("haproxy") else "missing",
        "sniproxy": sh(["sniproxy", "-V"]).split()[-1] if shutil.which("sniproxy") else "missing",
    }
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "commit": commit,
        "kernel": platform.release(),
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "pinning": ("proxy on core 0 (taskset -c 0); wrk/curl and the nginx backend on core 1 (taskset -c 1)"
                    if pin else "none (fewer than 2 cores)"),
        "versions": versions,
    }


MEDIAN_KEY = {"keepalive": "per_s", "newconn": "per_s", "bulk": "mib_s"}


def rounds_table(L: list[str], results: list[dict[str, Any]], columns: list[tuple[str, str, str]],
                 first: str = "row", placement: bool = False) -> None:
    """The report's "Rounds" section (nothing after a single round): per result, every round's
    figures, sorted, of `columns` (header, name in the result's `rounds`, format spec)."""
    spread = [r for r in results if r.get("rounds")]
    if not spread:
        return
    heads = [first] + (["placement"] if placement else []) + [head for head, _, _ in columns]
    L.append("## Rounds (sorted; the median is reported)")
    L.append("")
    L.append("| " + " | ".join(heads) + " |")
    L.append("|" + "---|" * len(heads))
    for r in spread:
        cells = [r["label"]] + ([r.get("placement", "default")] if placement else [])
        cells += [", ".join(format(v, spec) for v in r["rounds"].get(name, [])) or "–" for _, name, spec in columns]
        L.append("| " + " | ".join(cells) + " |")
    L.append("")


def merge_rounds(rounds: list[list[dict[str, Any]]], median_key: dict[str, str] | None = None,
                 once: tuple[str, ...] = ("idle",),
                 spread: dict[str, tuple[str, str]] | None = None) -> list[dict[str, Any]]:
    """One result per row from several rounds (each round the same rows in the same order): per
    measure of `median_key` (measure -> the figure to sort by), the run with the median figure
    (whole, so its CPU numbers stay consistent; the lower middle one for an even count); the
    measures in `once` come from round 1. `rounds` of each result lists the sorted figures,
    plus those named in `spread` (name -> measure, figure)."""
    if len(rounds) == 1:
        return rounds[0]
    median_key = MEDIAN_KEY if median_key is None else median_key
    merged = []
    for i, first in enumerate(rounds[0]):
        runs = [rnd[i] for rnd in rounds]
        res = dict(first)
        res["errors"] = [e for r in runs for e in r.get("errors", [])]
        res["background"] = {}
        res["rounds"] = {}
        for k, f in median_key.items():
            cands = sorted((r[k] for r in runs if isinstance(r.get(k), dict)), key=lambda m: m[f])
            res.pop(k, None)
            if cands:
                res[k] = cands[(len(cands) - 1) // 2]
                res["rounds"][k] = [m[f] for m in cands]
            bgs = [r["background"][k] for r in runs if k in r.get("background", {})]
            if bgs:
                res["background"][k] = max(bgs)
        for name, (k, f) in (spread or {}).items():
            values = sorted(r[k][f] for r in runs if isinstance(r.get(k), dict) and r[k].get(f) is not None)
            if values:
                res["rounds"][name] = values
        for k in once:
            if k in first.get("background", {}):
                res["background"][k] = first["background"][k]
        if first["status"] != "missing":
            needed = list(median_key) + [k for k in once if k in first or k in first.get("failed_measures", [])]
            missing = [k for k in needed if k not in res]
            res["status"] = "ok" if not missing else ("failed" if len(missing) == len(needed) else "partial")
            res["failed_measures"] = missing
            if any(r["status"] != "ok" for r in runs) and res["status"] == "ok":
                res["status"] = "partial"
        merged.append(res)
    return merged


def write_outputs(out: Path, meta: dict[str, Any], results: list[dict[str, Any]]) -> None:
    derived = derive(results)
    doc = {"meta": meta, "rows": results, "derived": derived,
           "targets_spec": {"keepalive_ratio": T_KEEPALIVE, "newconn_ratio": T_NEWCONN, "bulk_ratio": T_BULK,
                            "cpu_overhead_vs_best_peer": T_CPU_VS_BEST_PEER, "idle_kib_per_conn": T_MEM_KIB}}
    (out / "latest.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    (out / "latest.md").write_text(render_md(meta, results, derived))
    (out / "throughput.svg").write_text(svg_throughput(results, derived, meta) + "\n")
    (out / "cpu.svg").write_text(svg_cpu(results, derived, meta) + "\n")


def output_dir(args: argparse.Namespace, smoke: bool, prefix: str) -> Path:
    """--out, else a temp dir (smoke) or bench/results; created."""
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix=prefix)) if smoke else REPO / "bench/results"
    out.mkdir(parents=True, exist_ok=True)
    return out


def install_and_check(args: argparse.Namespace, smoke: bool, tools: tuple[str, ...], missing_note: str = "") -> int:
    """Runs install-deps.sh (full runs unless --no-install; smoke only with --install) and checks
    that `tools` are on PATH: 0, or the exit status for main (2 install failed, 1 a tool missing)."""
    if (not smoke and not args.no_install) or args.install:
        p = subprocess.run(["sh", str(HARNESS / "install-deps.sh")], timeout=900)
        if p.returncode != 0:
            log("install-deps.sh failed")
            return 2
    for tool in tools:
        if not shutil.which(tool):
            log(f"FAIL: {tool} is not installed (bench/harness/install-deps.sh installs it){missing_note}")
            return 1
    return 0


def raise_nofile() -> None:
    """Raises the nofile limit of the harness (and so of every server, through prlimit) to
    NOFILE; without CAP_SYS_RESOURCE the hard limit is the ceiling for everyone."""
    global NOFILE
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, max(hard, NOFILE)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        log(f"RLIMIT_NOFILE hard limit is {hard} and cannot be raised: servers get {hard}")
        NOFILE = hard


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true",
                    help="2 s runs, 500 idle conns, 16 MiB download; output to a temp dir; non-zero exit if a row fails")
    ap.add_argument("--proxy-bin", default=str(REPO / "target/release/sni-proxy"))
    ap.add_argument("--out", default=None, help="output dir (default bench/results; a temp dir with --smoke)")
    ap.add_argument("--no-install", action="store_true", help="do not run install-deps.sh (full mode)")
    ap.add_argument("--install", action="store_true", help="run install-deps.sh in smoke mode too")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    ap.add_argument("--duration", type=int, default=None, help="seconds per wrk test (10; smoke 2)")
    ap.add_argument("--warmup", type=int, default=None, help="seconds of wrk warm-up per row (2; smoke 0)")
    ap.add_argument("--bulk-mib", type=int, default=None, help="download size in MiB (256; smoke 16)")
    ap.add_argument("--bulk-runs", type=int, default=None, help="downloads per row, best counts (3; smoke 2)")
    ap.add_argument("--idle-conns", type=int, default=None, help="idle connections (10000; smoke 500)")
    ap.add_argument("--idle-wait", type=float, default=None,
                    help="max seconds to wait for a quiet machine before each run (20; smoke 0)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds of the throughput tests; each figure is the median round's (idle test: round 1)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, server logs)")
    ap.add_argument("--keep-raw", action="store_true", help="keep wrk's raw output in the JSON")
    ap.add_argument("--from-json", metavar="JSON",
                    help="measure nothing: re-render latest.md and the SVGs from a latest.json (into --out or its dir)")
    args = ap.parse_args()

    if args.from_json:
        src = Path(args.from_json)
        doc = json.loads(src.read_text())
        out = Path(args.out) if args.out else src.parent
        out.mkdir(parents=True, exist_ok=True)
        write_outputs(out, doc["meta"], doc["rows"])
        return 0

    smoke = args.smoke
    duration = args.duration or (2 if smoke else 10)
    warmup = args.warmup if args.warmup is not None else (0 if smoke else 2)
    bulk_mib = args.bulk_mib or (16 if smoke else 256)
    bulk_runs = args.bulk_runs or (2 if smoke else 3)
    idle_n = args.idle_conns if args.idle_conns is not None else (500 if smoke else 10000)
    idle_wait = args.idle_wait if args.idle_wait is not None else (0.0 if smoke else 20.0)
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        ap.error(f"unknown rows: {bad}")
    rows = [r for r in ROWS if r in rows]

    out = output_dir(args, smoke, "sni-proxy-bench-smoke-")
    status = install_and_check(args, smoke, ("wrk", "curl", "openssl", "nginx", "taskset", "prlimit"),
                               "; the direct row cannot run")
    if status:
        return status

    # harness limits and pinning
    raise_nofile()
    idle_cap = (NOFILE - 200) // 2  # a proxy needs 2 fds per proxied connection
    idle_note = ""
    if idle_n > idle_cap:
        idle_note = (f"idle connections capped at {idle_cap:,} (asked {idle_n:,}): the nofile limit is {NOFILE:,} "
                     f"and cannot be raised here; a proxy needs 2 descriptors per connection")
        log(idle_note)
        idle_n = idle_cap
    pin = len(os.sched_getaffinity(0)) >= 2 and {0, 1} <= os.sched_getaffinity(0)
    if pin:
        os.sched_setaffinity(0, {1})  # the harness is load: core 1
    else:
        log("fewer than 2 usable cores: no pinning")

    proxy_bin = Path(args.proxy_bin)
    if not proxy_bin.is_absolute():
        proxy_bin = (Path.cwd() / proxy_bin).resolve()

    t_start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="sni-proxy-bench-"))
    runner = Runner(tmp, pin)
    results: list[dict[str, Any]] = []
    drift: dict[str, Any] | None = None

    def on_term(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    try:
        log(f"temp dir {tmp}; output {out}")
        cert, key = make_cert(tmp)
        bulk_size = bulk_mib * MIB
        with open(tmp / "big", "wb") as f:
            f.truncate(bulk_size)  # sparse zeros
        backend_port = free_port()
        backend = runner.start("backend", ["nginx", "-p", str(tmp / "backend") + "/",
                                           "-c", str(backend_conf(tmp, backend_port, cert, key)),
                                           "-e", str(tmp / "backend.error.log")], backend_port, 1)
        ctx = Ctx(args, tmp, runner, Load(pin, backend), backend_port, tls_client_hello(), proxy_bin,
                  duration, warmup, bulk_size, bulk_runs, idle_n, idle_wait,
                  15.0 if smoke else 60.0)
        log(f"backend nginx on 127.0.0.1:{backend_port}; ClientHello {len(ctx.hello)} bytes")
        # one unmeasured download: puts /big into the page cache before the first (direct) row,
        # or that row's first download (and its CPU per GiB) would pay for filling it
        try:
            ctx.load.curl_big(backend_port, bulk_size, 1, None)
        except (BenchError, subprocess.TimeoutExpired) as e:
            log(f"warm-up download failed: {e}")
        rounds: list[list[dict[str, Any]]] = []
        for rnd in range(args.repeat):
            this: list[dict[str, Any]] = []
            for row in rows:
                log(f"== {row}" + (f" (round {rnd + 1} of {args.repeat})" if args.repeat > 1 else ""))
                r = measure_row(ctx, row, with_idle=(rnd == 0))
                this.append(r)
                if r["status"] == "missing":
                    log(f"SKIP {row}: {'; '.join(r['errors'])}" if row not in OURS else
                        f"MISSING {row}: {'; '.join(r['errors'])}")
                elif r["errors"]:
                    log(f"{row}: {r['status']}: " + " | ".join(e.splitlines()[0] for e in r["errors"]))
            rounds.append(this)
        results = merge_rounds(rounds)
        drift = None
        by = {r["row"]: r for r in results}
        if "direct" in by and isinstance(by["direct"].get("keepalive"), dict) and len(results) > 1:
            log("direct again (drift check): keep-alive")
            try:
                wait_quiet(ctx.idle_wait)
                again = ctx.load.wrk(backend_port, duration, False, None)
                first = by["direct"]["keepalive"]["per_s"]
                drift = {"keepalive_first": first, "keepalive_last": again["per_s"],
                         "ratio": again["per_s"] / first, "foreign_frac": again["foreign_frac"]}
            except (BenchError, subprocess.TimeoutExpired) as e:
                drift = {"error": str(e)}
    except KeyboardInterrupt:
        log("interrupted: stopping servers")
        runner.stop_all()
        return 130
    finally:
        runner.stop_all()
        if args.keep_tmp:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    meta = collect_meta(args, pin)
    meta.update({
        "mode": "smoke" if smoke else "full",
        "duration_s": duration, "warmup_s": warmup, "bulk_mib": bulk_mib, "bulk_runs": bulk_runs,
        "idle_conns": idle_n, "elapsed_s": time.monotonic() - t_start, "proxy_bin": str(proxy_bin),
        "wrk_connections": WRK_CONNS, "nofile": NOFILE, "idle_note": idle_note, "repeat": args.repeat,
    })
    meta["drift"] = drift
    write_outputs(out, meta, results)
    log(f"wrote {out}/latest.md, latest.json, throughput.svg, cpu.svg ({meta['elapsed_s']:.0f} s)")
    print((out / "latest.md").read_text())

    failed = False
    for r in results:
        if r["status"] == "missing":
            if r["row"] in OURS:
                log(f"FAIL {r['row']}: {r['errors'][0]}" if smoke else f"MISSING {r['row']}: {r['errors'][0]}")
                failed = failed or smoke
            else:
                log(f"SKIP {r['row']}: {r['errors'][0]}")
        elif r["status"] != "ok":
            log(f"FAIL {r['row']}: {r['status']} ({', '.join(r.get('failed_measures', []))})")
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
