"""Macro benchmark of sni-proxy against direct, HAProxy, nginx stream and sniproxy.

    python3 -m bench.harness.sni [--smoke] [--proxy-bin PATH] [--out bench/results]

(from the repository root). Everything runs on loopback (127.0.0.1): an nginx HTTPS
backend, one proxy at a time in front of it, wrk/curl as the load.  The proxy under test
is pinned to core 0, the load generator and the backend to core 1.  See bench/README.md
for what is measured and how to read it.

Python 3.11 standard library only, plus Debian tools (wrk, curl, openssl,
nginx, haproxy, sniproxy, taskset, prlimit).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import common
from .common import (BG_BUSY_WARN, C_OURS, FONT, FOREIGN_WARN, REPO, BenchError, Meter, Runner, Server,
                     collect_meta, figure, fmt, free_port, hbar_panel, install_and_check, listen_overflows, log,
                     merge_rounds, nice_step, output_dir, raise_nofile, rounds_table, sh, sh_any, svg_text,
                     wait_quiet)

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


# --------------------------------------------------------------------------------------
# /proc


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
worker_rlimit_nofile {common.NOFILE};
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
    maxconn {(common.NOFILE - 200) // 2}
    pidfile {tmp}/haproxy.pid

defaults
    mode tcp
    maxconn {(common.NOFILE - 200) // 2}
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
        per_request(r, server is not None)
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
        return per_gib(speeds, nbytes, acc, server is not None)

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
        **per_idle_connection(n, before, after, upstream, client_legs),
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
        return ctx.runner.start(name, ["sniproxy", "-f", "-c", str(conf), "-n", str(common.NOFILE)], port, 0)
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


def per_request(r: dict[str, Any], proxied: bool) -> None:
    """Sets a wrk run's CPU per request, in µs: the whole machine's busy time (`cpu_us_per_req`),
    the same less other work on the machine (`own_`), the proxy's process tree alone (`proxy_`,
    None without a proxy)."""
    r["cpu_us_per_req"] = r["busy_s"] * 1e6 / r["requests"]
    r["own_cpu_us_per_req"] = (r["busy_s"] - r["foreign_s"]) * 1e6 / r["requests"]
    r["proxy_cpu_us_per_req"] = (r["proxy_cpu_s"] * 1e6 / r["requests"]) if proxied else None


def per_gib(speeds: list[float], nbytes: int, cpu: dict[str, float], proxied: bool) -> dict[str, Any]:
    """The bulk measure from its downloads (MiB/s each, bytes in all, Meter figures summed over
    them): the best speed, and CPU seconds per GiB as per_request divides per request."""
    gib = nbytes / GIB
    cpu["foreign_frac"] = cpu["foreign_s"] / cpu["busy_s"] if cpu["busy_s"] > 0 else 0.0
    return {
        "mib_s": max(speeds),
        "runs_mib_s": speeds,
        "bytes": nbytes,
        **cpu,
        "cpu_s_per_gib": cpu["busy_s"] / gib,
        "own_cpu_s_per_gib": (cpu["busy_s"] - cpu["foreign_s"]) / gib,
        "proxy_cpu_s_per_gib": (cpu["proxy_cpu_s"] / gib) if proxied else None,
    }


def per_idle_connection(n: int, before: dict[str, int], after: dict[str, int], upstream: int,
                        client_legs: int) -> dict[str, Any]:
    """The idle test's memory figures from the proxy's memory before and after opening `n`
    connections and the legs still established: RSS and PSS growth per connection asked, the
    connections held (both legs up) and the RSS growth per connection held."""
    delta = after["rss_kib"] - before["rss_kib"]
    held = min(upstream, client_legs, n)
    return {
        "kib_per_conn": delta / n,
        "held": held,
        "kib_per_held_conn": delta / held if held > 0 else None,
        "pss_kib_per_conn": (after["pss_kib"] - before["pss_kib"]) / n,
    }


def idle_held(idle: dict[str, Any]) -> int:
    """Connections the proxy really held: both legs still established."""
    return min(idle["upstream_established"], idle["client_legs_established"], idle["requested"])


def idle_kib(idle: dict[str, Any]) -> float | None:
    """RSS growth per connection held (= per connection asked when all were held)."""
    held = idle_held(idle)
    if held <= 0:
        return None
    return (idle["rss_after_kib"] - idle["rss_before_kib"]) / held


def derive(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Sets each result's `ratio` (throughput ÷ direct's) and `cpu_overhead` (CPU per unit of
    work − direct's); returns direct's figures, the best (lowest) peer overhead per CPU figure and
    the target verdicts of our rows."""
    by = {r["row"]: r for r in results}
    d = by.get("direct")
    base = {
        "keepalive": figure(d, "keepalive", "per_s"),
        "newconn": figure(d, "newconn", "per_s"),
        "bulk": figure(d, "bulk", "mib_s"),
        "cpu_req": figure(d, "keepalive", "cpu_us_per_req"),
        "cpu_conn": figure(d, "newconn", "cpu_us_per_req"),
        "cpu_gib": figure(d, "bulk", "cpu_s_per_gib"),
    }
    for r in results:
        ratios, over = {}, {}
        for k, f in (("keepalive", "per_s"), ("newconn", "per_s"), ("bulk", "mib_s")):
            v = figure(r, k, f)
            ratios[k] = (v / base[k]) if (v is not None and base[k]) else None
        for k, src, f in (("cpu_req", "keepalive", "cpu_us_per_req"),
                          ("cpu_conn", "newconn", "cpu_us_per_req"),
                          ("cpu_gib", "bulk", "cpu_s_per_gib")):
            v = figure(r, src, f)
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
            (fmt(ka["per_s"]) + ("" if row_is_direct else fmt_ratio(ratio.get("keepalive")))) if ka else "failed",
            fmt(ka["p99_ms"], 2) if ka and ka.get("p99_ms") is not None else "–",
            (fmt(nc["per_s"]) + ("" if row_is_direct else fmt_ratio(ratio.get("newconn")))) if nc else "failed",
            (fmt(bu["mib_s"]) + ("" if row_is_direct else fmt_ratio(ratio.get("bulk")))) if bu else "failed",
            mem,
            (fmt(ka["cpu_us_per_req"], 1) + ("" if row_is_direct else fmt_over(over.get("cpu_req")))) if ka else "–",
            (fmt(nc["cpu_us_per_req"], 1) + ("" if row_is_direct else fmt_over(over.get("cpu_conn")))) if nc else "–",
            (fmt(bu["cpu_s_per_gib"], 2) + ("" if row_is_direct else fmt_over(over.get("cpu_gib"), 2))) if bu else "–",
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
            pc.append(fmt(m.get(f), dg) if m and m.get(f) is not None else "–")
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
            f"{fmt(ka.get('p50_ms'), 2)} / {fmt(ka.get('p99_ms'), 2)}" if ka else "–",
            fmt(nc.get("p99_ms"), 2) if nc else "–",
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
    step = nice_step(ymax, 6)

    def y(v: float) -> float:
        return top + ph - (v / ymax) * ph

    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" {FONT}>',
         f'<rect width="{W}" height="{H}" fill="white"/>',
         svg_text(W / 2, 28, "Throughput relative to direct (client → backend, no proxy) — higher is better",
               17, "middle", "bold"),
         svg_text(W / 2, 50, f"proxy pinned to 1 core; {meta['mode']} run {meta['date']} · commit {meta['commit']}",
               12, "middle", fill="#555")]
    # grid
    g = 0.0
    while g <= ymax + 1e-9:
        yy = y(g)
        o.append(f'<line x1="{left}" y1="{yy:.1f}" x2="{W - right}" y2="{yy:.1f}" stroke="#e3e3e3"/>')
        o.append(svg_text(left - 8, yy + 4, f"{g:g}×", 11, "end", fill="#555"))
        g += step
    o.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="#888"/>')
    o.append(f'<line x1="{left}" y1="{top + ph}" x2="{W - right}" y2="{top + ph}" stroke="#888"/>')
    # direct = 1 and target lines
    o.append(f'<line x1="{left}" y1="{y(1):.1f}" x2="{W - right}" y2="{y(1):.1f}" stroke="#333" '
             f'stroke-dasharray="6 4"/>')
    o.append(svg_text(W - right - 4, y(1) - 5, "direct = 1.0×", 11, "end", fill="#333"))
    o.append(f'<line x1="{left}" y1="{y(T_KEEPALIVE):.1f}" x2="{W - right}" y2="{y(T_KEEPALIVE):.1f}" '
             f'stroke="{C_OURS}" stroke-width="1.2" stroke-dasharray="2 3"/>')
    o.append(f'<line x1="{left}" y1="{y(T_BULK):.1f}" x2="{W - right}" y2="{y(T_BULK):.1f}" '
             f'stroke="#2e7d32" stroke-width="1.2" stroke-dasharray="2 3"/>')
    n = len(results)
    gw = pw / max(n, 1)
    bw = min(38.0, gw * 0.8 / 3)
    for i, r in enumerate(results):
        cx = left + gw * (i + 0.5)
        o.append(svg_text(cx, top + ph + 20, r["label"], 12, "middle",
                       "bold" if r["row"] in OURS else "normal"))
        d = r.get("ratio", {})
        if r["status"] == "missing" or all(d.get(k) is None for k, _, _ in metrics):
            o.append(svg_text(cx, top + ph - 12, r["status"] if r["status"] != "ok" else "no data",
                           12, "middle", fill="#a00"))
            continue
        for j, (k, _, col) in enumerate(metrics):
            v = d.get(k)
            x0 = cx - 1.5 * bw + j * bw
            if v is None:
                o.append(svg_text(x0 + bw / 2, top + ph - 6, "×", 12, "middle", fill="#a00"))
                continue
            vv = min(v, ymax)
            o.append(f'<rect x="{x0 + 1:.1f}" y="{y(vv):.1f}" width="{bw - 2:.1f}" '
                     f'height="{top + ph - y(vv):.1f}" fill="{col}"/>')
            o.append(svg_text(x0 + bw / 2, y(vv) - 4, f"{v:.2f}", 10, "middle", fill="#333", halo=True))
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
        o.append(svg_text(lx + 17, ly, label, 12))
        lx += 20 + len(label) * 6.8
    ly += 22
    o.append(f'<line x1="{left}" y1="{ly - 4}" x2="{left + 24}" y2="{ly - 4}" stroke="{C_OURS}" '
             f'stroke-width="1.2" stroke-dasharray="2 3"/>')
    o.append(svg_text(left + 30, ly, f"target {T_KEEPALIVE}× (req/s, conns/s)", 12))
    o.append(f'<line x1="{left + 250}" y1="{ly - 4}" x2="{left + 274}" y2="{ly - 4}" stroke="#2e7d32" '
             f'stroke-width="1.2" stroke-dasharray="2 3"/>')
    o.append(svg_text(left + 280, ly, f"target {T_BULK}× (MiB/s)", 12))
    o.append(svg_text(W - right, ly, "sni-proxy rows in bold", 12, "end", fill="#555"))
    o.append("</svg>")
    return "\n".join(o)



def svg_cpu(results: list[dict[str, Any]], derived: dict[str, Any], meta: dict[str, Any]) -> str:
    W, H = 1080, 440
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" {FONT}>',
         f'<rect width="{W}" height="{H}" fill="white"/>',
         svg_text(W / 2, 28, "CPU overhead of each proxy: whole-machine busy time minus direct's — lower is better",
               17, "middle", "bold"),
         svg_text(W / 2, 50, "/proc/stat user+nice+system+irq+softirq+steal, all cores, over each wrk/curl run; "
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
        hbar_panel(o, 20 + i * pw, 88, pw - 10, H - 110, title, unit, items, target, tl, digits)
    o.append("</svg>")
    return "\n".join(o)


# --------------------------------------------------------------------------------------
# main


# Per row, the median round's run of each throughput measure (common.merge_rounds); the idle test
# runs in round 1 only.
MEDIAN_KEY = {"keepalive": "per_s", "newconn": "per_s", "bulk": "mib_s"}


def tool_versions() -> dict[str, str]:
    """The versions of the load tools and the peers, for the report's header."""
    return {
        "wrk": sh_any(["wrk", "-v"]).splitlines()[0].split(" Copyright")[0].removeprefix("wrk ") if shutil.which("wrk") else "missing",
        "curl": sh(["curl", "--version"]).split()[1] if shutil.which("curl") else "missing",
        "OpenSSL": sh(["openssl", "version"]).split()[1] if shutil.which("openssl") else "missing",
        "nginx": sh(["nginx", "-v"]).split("/")[-1] if shutil.which("nginx") else "missing",
        "HAProxy": sh(["haproxy", "-v"]).split()[2] if shutil.which("haproxy") else "missing",
        "sniproxy": sh(["sniproxy", "-V"]).split()[-1] if shutil.which("sniproxy") else "missing",
    }


def write_outputs(out: Path, meta: dict[str, Any], results: list[dict[str, Any]]) -> None:
    derived = derive(results)
    doc = {"meta": meta, "rows": results, "derived": derived,
           "targets_spec": {"keepalive_ratio": T_KEEPALIVE, "newconn_ratio": T_NEWCONN, "bulk_ratio": T_BULK,
                            "cpu_overhead_vs_best_peer": T_CPU_VS_BEST_PEER, "idle_kib_per_conn": T_MEM_KIB}}
    (out / "latest.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    (out / "latest.md").write_text(render_md(meta, results, derived))
    (out / "throughput.svg").write_text(svg_throughput(results, derived, meta) + "\n")
    (out / "cpu.svg").write_text(svg_cpu(results, derived, meta) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(prog=f"python3 -m {__spec__.name}", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true",
                    help="2 s runs, 500 idle conns, 16 MiB download; output to a temp dir; non-zero exit if a row fails")
    ap.add_argument("--proxy-bin", default=common.release_bin("sni-proxy"))
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
    idle_cap = (common.NOFILE - 200) // 2  # a proxy needs 2 fds per proxied connection
    idle_note = ""
    if idle_n > idle_cap:
        idle_note = (f"idle connections capped at {idle_cap:,} (asked {idle_n:,}): the nofile limit is {common.NOFILE:,} "
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
        results = merge_rounds(rounds, MEDIAN_KEY, once=("idle",))
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

    meta = collect_meta("proxy on core 0 (taskset -c 0); wrk/curl and the nginx backend on core 1 (taskset -c 1)"
                        if pin else "none (fewer than 2 cores)", tool_versions())
    meta.update({
        "mode": "smoke" if smoke else "full",
        "duration_s": duration, "warmup_s": warmup, "bulk_mib": bulk_mib, "bulk_runs": bulk_runs,
        "idle_conns": idle_n, "elapsed_s": time.monotonic() - t_start, "proxy_bin": str(proxy_bin),
        "wrk_connections": WRK_CONNS, "nofile": common.NOFILE, "idle_note": idle_note, "repeat": args.repeat,
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
