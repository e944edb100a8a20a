"""Macro benchmark of the konnectivity tunnel against direct, upstream ANP v0.36.0 and rathole.

    python3 -m bench.harness.tunnel [--quick] [--out bench/results]

(from the repository root; wrap it in `flock /tmp/gardener-build.lock` on a shared machine so
that no build starts during the measurements). Everything runs on loopback. Rows:

- direct: the load straight to the destination;
- ours: konnectivity-server (--mode=http-connect on a UDS) + konnectivity-agent, mTLS on the
  agent plane, gRPC over TCP (the default transport);
- quic: the same with the QUIC transport (--agent-quic-port, --transport=quic): a QUIC stream
  per tunnel, mTLS;
- anp: upstream proxy-server + proxy-agent v0.36.0 (scripts/anp-bin current), same shape;
- rathole: rathole from crates.io (TLS transport: server certificate only, rathole has no client
  certificates), one service per destination.

The tunnel (server and agent, or rathole's server and client) is pinned to core 0; the load,
the destinations (bench's `tunnel-entry sink`, nginx for wrk) and the CONNECT entry to core 1.
Load tools: `tunnel-entry` (bench/src/bin/tunnel-entry.rs) speaks kube-apiserver's CONNECT on
the UDS for bulk, dial, idle and isolation, and its `listen` mode is wrk's entry; wrk for
requests/s. See bench/README.md ("konnectivity") for what is measured and how to read it.

Python 3.11 standard library only, plus wrk, nginx, openssl, taskset, prlimit.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import common
from .common import (BG_BUSY_WARN, FONT, FOREIGN_WARN, REPO, BenchError, Meter, Runner, Server, collect_meta,
                     fmt, free_port, hbar_panel, install_and_check, log, merge_rounds, output_dir, raise_nofile,
                     rounds_table, sh, sh_any, svg_text, wait_quiet)
from .sni import parse_wrk

GIB = 1024 ** 3
WRK_CONNS = 64

ROWS = ["direct", "ours", "quic", "anp", "rathole"]
LABELS = {"direct": "direct", "ours": "konnectivity (ours, gRPC)", "quic": "konnectivity (ours, QUIC)",
          "anp": "upstream ANP v0.36.0", "rathole": "rathole"}
OURS = ("ours", "quic")
TUNNELS = ("ours", "quic", "anp", "rathole")

# Targets (printed next to the figures).
T_BULK_VS_DIRECT = 0.6
T_BULK_VS_ANP = 3.0
T_RPS_VS_DIRECT = 0.8
T_IDLE_KIB = 8.0
T_ISOLATION = 0.9

BUILD_PROCS = ("rustc", "cc1", "cc1plus", "go", "cargo")


def rathole_bin() -> str:
    """rathole as installed by install-deps.sh's documented step (or on PATH)."""
    root = Path(os.environ.get("GARDENER_AGENTS_CACHE") or Path.home() / ".cache/gardener-agents")
    p = root / "rathole/bin/rathole"
    return str(p) if p.exists() else (shutil.which("rathole") or str(p))


# --------------------------------------------------------------------------------------
# the machine


def builds_running() -> list[str]:
    """Names of the build processes (rustc, cc1, go, cargo) running now."""
    found = []
    for name in BUILD_PROCS:
        if subprocess.run(["pgrep", "-x", name], capture_output=True).returncode == 0:
            found.append(name)
    return found


def wait_no_builds(max_wait: float) -> list[str]:
    """Polls every 10 s (bounded) until no build process runs; returns those still running."""
    deadline = time.monotonic() + max_wait
    running = builds_running()
    while running and time.monotonic() < deadline:
        log(f"waiting for a quiet machine: {', '.join(running)} running")
        time.sleep(10)
        running = builds_running()
    return running


def upstream_port() -> int:
    """A free port in 1024..49151 (upstream ANP refuses others)."""
    for _ in range(200):
        port = random.randint(20000, 45000)
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
    raise BenchError("no free port in 20000..45000")


def http_ok(port: int, path: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1) as r:
            return r.status == 200
    except Exception:
        return False


# --------------------------------------------------------------------------------------
# certificates and configs


def make_pki(tmp: Path) -> dict[str, Path]:
    """A CA; `server` (serverAuth, localhost and 127.0.0.1) for the agent plane; `agent`
    (clientAuth) for mTLS; `server.p12` for rathole (native-tls takes PKCS#12)."""
    def run(*argv: str) -> None:
        subprocess.run(list(argv), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60,
                       cwd=tmp)
    p = {k: tmp / f"{k}" for k in ("ca.crt", "ca.key", "server.crt", "server.key", "agent.crt", "agent.key",
                                   "server.p12")}
    run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-days", "2", "-subj", "/CN=bench-ca", "-keyout", str(p["ca.key"]), "-out", str(p["ca.crt"]))
    for name, cn, ext in (("server", "localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                                                  "extendedKeyUsage=serverAuth\n"),
                          ("agent", "bench-agent", "extendedKeyUsage=clientAuth\n")):
        (tmp / f"{name}.ext").write_text(ext)
        run("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-subj", f"/CN={cn}", "-keyout", str(p[f"{name}.key"]), "-out", str(tmp / f"{name}.csr"))
        run("openssl", "x509", "-req", "-in", str(tmp / f"{name}.csr"), "-CA", str(p["ca.crt"]),
            "-CAkey", str(p["ca.key"]), "-CAcreateserial", "-days", "2", "-extfile", str(tmp / f"{name}.ext"),
            "-out", str(p[f"{name}.crt"]))
    run("openssl", "pkcs12", "-export", "-out", str(p["server.p12"]), "-inkey", str(p["server.key"]),
        "-in", str(p["server.crt"]), "-certfile", str(p["ca.crt"]), "-passout", "pass:bench")
    return p


def nginx_conf(tmp: Path, port: int) -> Path:
    """wrk's destination: plain HTTP, one worker, a small fixed answer."""
    d = tmp / "nginx"
    d.mkdir(exist_ok=True)
    conf = d / "nginx.conf"
    conf.write_text(f"""user root;
worker_processes 1;
worker_rlimit_nofile {common.NOFILE};
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log {tmp}/nginx.error.log warn;
events {{
    worker_connections 65536;
    multi_accept on;
}}
http {{
    access_log off;
    keepalive_timeout 600s;
    keepalive_requests 1000000000;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            default_type application/json;
            return 200 '{{"major":"1","minor":"31","gitVersion":"v1.31.0-bench"}}\\n';
        }}
    }}
}}
""")
    return conf


def rathole_confs(tmp: Path, pki: dict[str, Path], control: int, exposed: dict[str, int],
                  local: dict[str, int]) -> tuple[Path, Path]:
    """rathole's server and client configs: TLS transport, one service per destination."""
    server, client = tmp / "rathole-server.toml", tmp / "rathole-client.toml"
    s = [f'[server]\nbind_addr = "127.0.0.1:{control}"\n',
         '[server.transport]\ntype = "tls"\n',
         f'[server.transport.tls]\npkcs12 = "{pki["server.p12"]}"\npkcs12_password = "bench"\n']
    c = [f'[client]\nremote_addr = "localhost:{control}"\n',
         '[client.transport]\ntype = "tls"\n',
         f'[client.transport.tls]\ntrusted_root = "{pki["ca.crt"]}"\nhostname = "localhost"\n']
    for name in exposed:
        s.append(f'[server.services.{name}]\ntoken = "bench"\nbind_addr = "127.0.0.1:{exposed[name]}"\n')
        c.append(f'[client.services.{name}]\ntoken = "bench"\nlocal_addr = "127.0.0.1:{local[name]}"\n')
    server.write_text("\n".join(s))
    client.write_text("\n".join(c))
    return server, client


# --------------------------------------------------------------------------------------
# a tunnel under test


class Pair:
    """The tunnel's processes (server and agent) as one for Meter and memory."""

    def __init__(self, servers: list[Server]):
        self.servers = servers

    def cpu_seconds(self) -> float:
        return sum(s.cpu_seconds() for s in self.servers)

    def memory(self) -> dict[str, int]:
        m = {"rss_kib": 0, "pss_kib": 0, "processes": 0}
        for s in self.servers:
            for k, v in s.memory().items():
                m[k] += v
        return m

    def alive(self) -> bool:
        return all(s.alive() for s in self.servers)

    def log_tail(self) -> str:
        return "\n".join(f"--- {s.name} ---\n{s.log_tail(8)}" for s in self.servers)


@dataclass
class Tunnel:
    """One running row: how the load reaches the sink (`via` arguments of tunnel-entry) and
    nginx (`http_port`), and the processes to account."""
    row: str
    pair: Pair | None
    via: list[str]
    http_port: int
    extra: list[Server] = field(default_factory=list)  # the CONNECT entry: load, not tunnel


@dataclass
class Ctx:
    args: argparse.Namespace
    tmp: Path
    runner: Runner
    pin: bool
    entry: str
    ours_server: str
    ours_agent: str
    anp_dir: Path | None
    rathole: str
    pki: dict[str, Path]
    sink: Server
    nginx: Server
    duration: int
    warmup: int
    bulk_bytes: int
    dials: int
    idle_counts: list[int]
    iso_streams: int
    iso_seconds: float
    quiet_wait: float
    build_wait: float
    seq: int = 0


def load_argv(ctx: Ctx, argv: list[str]) -> list[str]:
    return (["taskset", "-c", "1"] if ctx.pin else []) + argv


def wait_ready(port: int, what: str, pair: list[Server], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if http_ok(port, "/readyz"):
            return
        for s in pair:
            if not s.alive():
                raise BenchError(f"{s.name} exited ({s.proc.returncode}):\n{s.log_tail()}")
        time.sleep(0.1)
    raise BenchError(f"{what}: /readyz on {port} not 200 after {timeout:.0f}s:\n" +
                     "\n".join(s.log_tail(8) for s in pair))


def start_row(ctx: Ctx, row: str, with_entry: bool) -> Tunnel:
    """Starts a fresh instance of `row` (and the wrk entry if asked)."""
    ctx.seq += 1
    tag = f"{row}-{ctx.seq}"
    sink, http = ctx.sink.port, ctx.nginx.port
    if row == "direct":
        return Tunnel(row, None, ["--tcp", f"127.0.0.1:{sink}"], http)
    r = ctx.runner
    p = ctx.pki
    if row == "rathole":
        control = free_port()
        exposed = {"sink": free_port(), "http": free_port()}
        scfg, ccfg = rathole_confs(ctx.tmp, p, control, exposed, {"sink": sink, "http": http})
        env = {"RUST_LOG": "warn", "TOKIO_WORKER_THREADS": "1"}
        srv = r.start(f"{tag}-server", [ctx.rathole, "--server", str(scfg)], control, 0, env)
        cli = r.start(f"{tag}-client", [ctx.rathole, "--client", str(ccfg)], exposed["sink"], 0, env)
        pair = Pair([srv, cli])
        # the exposed port listens before the client's control channel is up: wait for an echo
        deadline = time.monotonic() + 20
        while True:
            pr = subprocess.run([ctx.entry, "dial", "--tcp", f"127.0.0.1:{exposed['sink']}", "--count", "1"],
                                capture_output=True, text=True, timeout=30)
            if pr.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"rathole never carried a tunnel: {pr.stderr.strip()[-300:]}\n{pair.log_tail()}")
            time.sleep(0.2)
        return Tunnel(row, pair, ["--tcp", f"127.0.0.1:{exposed['sink']}"], exposed["http"])
    agent_port, health, admin = upstream_port(), upstream_port(), upstream_port()
    a_health, a_admin = upstream_port(), upstream_port()
    uds = ctx.tmp / f"{tag}.sock"
    server_extra: list[str] = []
    agent_extra: list[str] = []
    if row in OURS:
        server_bin, agent_bin = ctx.ours_server, ctx.ours_agent
        env = {"TOKIO_WORKER_THREADS": "1", "RUST_LOG": os.environ.get("BENCH_RUST_LOG", "warn")}
        if row == "quic":
            # UDP on the agent port's number
            server_extra = [f"--agent-quic-port={agent_port}"]
            agent_extra = ["--transport=quic"]
    else:
        assert ctx.anp_dir is not None
        server_bin, agent_bin = str(ctx.anp_dir / "proxy-server"), str(ctx.anp_dir / "proxy-agent")
        env = {}
    srv = r.start(f"{tag}-server", [
        server_bin, "--mode=http-connect", f"--uds-name={uds}", "--delete-existing-uds-file=true",
        "--server-port=0", f"--agent-port={agent_port}", f"--cluster-cert={p['server.crt']}",
        f"--cluster-key={p['server.key']}", f"--cluster-ca-cert={p['ca.crt']}", f"--health-port={health}",
        f"--admin-port={admin}", "--server-id=s1", "--server-count=1", *server_extra], health, 0, env)
    agent = r.start(f"{tag}-agent", [
        agent_bin, "--proxy-server-host=localhost", f"--proxy-server-port={agent_port}",
        f"--ca-cert={p['ca.crt']}", f"--agent-cert={p['agent.crt']}", f"--agent-key={p['agent.key']}",
        "--agent-id=a1", f"--health-server-port={a_health}", f"--admin-server-port={a_admin}", *agent_extra],
        a_health, 0, env)
    wait_ready(health, f"{tag} server", [srv, agent])
    tun = Tunnel(row, Pair([srv, agent]), ["--uds", str(uds), "--dest", f"127.0.0.1:{sink}"], 0)
    if with_entry:
        ep = free_port()
        e = r.start(f"{tag}-entry", [ctx.entry, "listen", "--listen", f"127.0.0.1:{ep}", "--uds", str(uds),
                                     "--dest", f"127.0.0.1:{http}"], ep, 1)
        tun.extra.append(e)
        tun.http_port = ep
    return tun


def stop_row(ctx: Ctx, t: Tunnel) -> None:
    for s in t.extra + (list(reversed(t.pair.servers)) if t.pair else []):
        if s.name.endswith("-agent") and t.row == "anp" and s.alive():
            # the v0.36.0 agent drains on the first SIGTERM and exits on the second
            try:
                os.killpg(s.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            time.sleep(0.1)
        ctx.runner.stop(s)


# --------------------------------------------------------------------------------------
# measures


def run_json(ctx: Ctx, argv: list[str], timeout: float) -> dict[str, Any]:
    p = subprocess.run(load_argv(ctx, argv), capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise BenchError(f"{' '.join(argv[1:3])} exited {p.returncode}: {p.stderr.strip()[-500:]}")
    try:
        return json.loads(p.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise BenchError(f"{' '.join(argv[1:3])} printed no JSON: {p.stdout[-300:]}")


def cpu_of(cpu: dict[str, float], proxied: bool) -> dict[str, Any]:
    if not proxied:
        cpu["proxy_cpu_s"] = None  # type: ignore[assignment]
    return cpu


def bulk(ctx: Ctx, t: Tunnel) -> dict[str, Any]:
    meter = Meter(t.pair, ctx.sink)  # type: ignore[arg-type]
    r = run_json(ctx, [ctx.entry, "bulk", *t.via, "--bytes", str(ctx.bulk_bytes)], 600)
    cpu = meter.stop()
    gib = r["bytes"] / GIB
    r.update(cpu)
    r["cpu_s_per_gib"] = cpu["busy_s"] / gib
    r["tunnel_cpu_s_per_gib"] = cpu["proxy_cpu_s"] / gib if t.pair else None
    return r


def wrk(ctx: Ctx, t: Tunnel, duration: int) -> dict[str, Any]:
    argv = ["wrk", "-t1", f"-c{WRK_CONNS}", f"-d{duration}s", "--latency", f"http://127.0.0.1:{t.http_port}/"]
    meter = Meter(t.pair, ctx.nginx)  # type: ignore[arg-type]
    p = subprocess.run(load_argv(ctx, argv), capture_output=True, text=True, timeout=duration + 60)
    cpu = meter.stop()
    if p.returncode != 0:
        raise BenchError(f"wrk exited {p.returncode}: {p.stderr.strip()[-500:]}")
    r = parse_wrk(p.stdout)
    if r["requests"] == 0:
        raise BenchError("wrk completed no request:\n" + p.stdout[-800:])
    if r["non_2xx"] > r["requests"] * 0.01:
        raise BenchError(f"wrk: {r['non_2xx']} of {r['requests']} responses were not 2xx")
    r.update(cpu)
    r["cpu_us_per_req"] = cpu["busy_s"] * 1e6 / r["requests"]
    r["tunnel_cpu_us_per_req"] = cpu["proxy_cpu_s"] * 1e6 / r["requests"] if t.pair else None
    return r


def dial(ctx: Ctx, t: Tunnel) -> dict[str, Any]:
    r = run_json(ctx, [ctx.entry, "dial", *t.via, "--count", str(ctx.dials)], 600)
    # the dial figure: CONNECT sent -> 200 received; over plain TCP (direct, rathole) the TCP
    # connect says nothing about the tunnel, so connect + first byte's round trip
    r["dial"] = r["open"] if "--uds" in t.via else r["first_byte"]
    r["dial_kind"] = "CONNECT -> 200" if "--uds" in t.via else "TCP connect + first byte round trip"
    return r


def settle_memory(pair: Pair) -> dict[str, int]:
    """The pair's memory once its RSS stops moving (bounded)."""
    time.sleep(1.0)
    m = pair.memory()
    for _ in range(20):
        time.sleep(0.5)
        n = pair.memory()
        stable = abs(n["rss_kib"] - m["rss_kib"]) <= max(64, m["rss_kib"] // 500)
        m = n
        if stable:
            break
    return m


def per_tunnel(before: dict[str, int], after: dict[str, int], opened: int) -> float | None:
    """RSS growth (server + agent) per tunnel held, KiB."""
    if opened <= 0:
        return None
    return (after["rss_kib"] - before["rss_kib"]) / opened


def idle(ctx: Ctx, t: Tunnel) -> dict[str, Any]:
    assert t.pair is not None
    before = settle_memory(t.pair)
    # rathole's server and client each hold 2 descriptors per tunnel (visitor + data channel,
    # data channel + destination): past nofile / 2 it cannot hold more
    cap = (common.NOFILE - 200) // 2 if t.row == "rathole" else None
    counts = [min(n, cap) if cap else n for n in ctx.idle_counts]
    argv = load_argv(ctx, ["prlimit", f"--nofile={common.NOFILE}:{common.NOFILE}", "--",
                           ctx.entry, "idle", *t.via, "--counts", ",".join(map(str, counts))])
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    levels: list[dict[str, Any]] = []
    note = ""
    try:
        for asked, count in zip(ctx.idle_counts, counts):
            line = p.stdout.readline() if p.stdout else ""
            if not line:
                raise BenchError(f"idle tool exited early: {p.stderr.read()[-400:] if p.stderr else ''}")
            lv = json.loads(line)
            lv["target"] = asked
            if count < asked:
                lv["capped_at"] = count
                note = (f"{t.row}: idle tunnels capped at {count:,}: nofile is {common.NOFILE:,} (the hard limit "
                        "here) and rathole's server and client need 2 descriptors per tunnel each")
            after = settle_memory(t.pair)
            lv.update({"rss_before_kib": before["rss_kib"], "rss_after_kib": after["rss_kib"],
                       "pss_before_kib": before["pss_kib"], "pss_after_kib": after["pss_kib"],
                       "kib_per_tunnel": per_tunnel(before, after, lv["opened"])})
            levels.append(lv)
            log(f"{t.row}: {lv['opened']:,} of {lv['target']:,} idle tunnels: "
                f"{lv['kib_per_tunnel'] or 0:.2f} KiB each")
            if not t.pair.alive():
                raise BenchError(f"the tunnel died with {lv['opened']} idle tunnels:\n{t.pair.log_tail()}")
            if p.stdin:
                p.stdin.write("\n")
                p.stdin.flush()
    except BenchError:
        if not levels:
            raise
        note = (note + "; " if note else "") + "stopped after " + f"{levels[-1]['opened']:,} tunnels: " + \
            "the idle tool failed"
    finally:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return {"levels": levels, "note": note} if note else {"levels": levels}


def isolation(ctx: Ctx, t: Tunnel) -> dict[str, Any]:
    r = run_json(ctx, [ctx.entry, "isolation", *t.via, "--streams", str(ctx.iso_streams), "--stalled", "1",
                       "--seconds", str(ctx.iso_seconds)], 120 + 2 * ctx.iso_seconds)
    return r


# --------------------------------------------------------------------------------------
# rows


def measure_row(ctx: Ctx, row: str, first_round: bool) -> dict[str, Any]:
    res: dict[str, Any] = {"row": row, "label": LABELS[row], "status": "ok", "errors": [], "background": {}}
    missing = {"ours": not Path(ctx.ours_server).exists() and f"{ctx.ours_server} not built",
               "quic": not Path(ctx.ours_server).exists() and f"{ctx.ours_server} not built",
               "anp": ctx.anp_dir is None and "scripts/anp-bin current failed (needs Go)",
               "rathole": not Path(ctx.rathole).exists() and f"{ctx.rathole} not installed "
                                                              "(bench/harness/install-deps.sh --rathole)"}.get(row)
    if missing:
        res["status"] = "missing"
        res["errors"].append(missing)
        return res

    def step(key: str, fn: Callable[[], Any]) -> None:
        try:
            still = wait_no_builds(ctx.build_wait)
            if still:
                res["errors"].append(f"{key}: measured while {', '.join(still)} ran")
            res["background"][key] = round(wait_quiet(ctx.quiet_wait), 3)
            res[key] = fn()
        except BenchError as e:
            res["errors"].append(f"{key}: {e}")
        except subprocess.TimeoutExpired as e:
            res["errors"].append(f"{key}: timed out: {e}")

    def instance(name: str, with_entry: bool, body: Callable[[Tunnel], None]) -> None:
        t = None
        try:
            t = start_row(ctx, row, with_entry)
            body(t)
            if t.pair is not None and not t.pair.alive():
                res["errors"].append(f"{name}: the tunnel exited:\n{t.pair.log_tail()}")
        except BenchError as e:
            res["errors"].append(f"{name}: {e}")
        finally:
            if t is not None:
                stop_row(ctx, t)

    def load(t: Tunnel) -> None:
        log(f"{row}: bulk {ctx.bulk_bytes / GIB:g} GiB")
        step("bulk", lambda: bulk(ctx, t))
        if ctx.warmup:
            try:
                wrk(ctx, t, ctx.warmup)
            except BenchError as e:
                res["errors"].append(f"wrk warm-up: {e}")
        log(f"{row}: wrk -c{WRK_CONNS} {ctx.duration}s")
        step("rps", lambda: wrk(ctx, t, ctx.duration))
        log(f"{row}: {ctx.dials:,} sequential dials")
        step("dial", lambda: dial(ctx, t))

    instance("load", True, load)
    needed = ["bulk", "rps", "dial"]
    if first_round and row != "direct" and ctx.idle_counts:
        log(f"{row}: idle tunnels {ctx.idle_counts}")
        instance("idle", False, lambda t: step("idle", lambda: idle(ctx, t)))
        needed.append("idle")
    if first_round and row != "direct" and ctx.iso_streams:
        log(f"{row}: isolation, {ctx.iso_streams} streams, then + 1 stalled reader")
        instance("isolation", False, lambda t: step("isolation", lambda: isolation(ctx, t)))
        needed.append("isolation")
    missing_m = [k for k in needed if k not in res]
    if missing_m:
        res["status"] = "failed" if len(missing_m) == len(needed) else "partial"
        res["failed_measures"] = missing_m
    if not ctx.args.keep_raw and isinstance(res.get("rps"), dict):
        res["rps"].pop("raw", None)
    return res


# --------------------------------------------------------------------------------------
# derived figures


def fig(r: dict[str, Any] | None, *path: str) -> Any:
    """A nested figure of a result, None when any step is missing."""
    v: Any = r
    for k in path:
        if not isinstance(v, dict) or k not in v:
            return None
        v = v[k]
    return v


def idle_at(r: dict[str, Any] | None, target: int) -> dict[str, Any] | None:
    for lv in fig(r, "idle", "levels") or []:
        if lv["target"] == target:
            return lv
    return None


def idle_largest(r: dict[str, Any] | None) -> dict[str, Any] | None:
    levels = fig(r, "idle", "levels") or []
    return levels[-1] if levels else None


def derive(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Each result's `ratio` (bulk and requests/s ÷ direct's), and the targets of our row."""
    by = {r["row"]: r for r in results}
    base = {"bulk": fig(by.get("direct"), "bulk", "gbit_s"), "rps": fig(by.get("direct"), "rps", "per_s")}
    for r in results:
        r["ratio"] = {}
        for k, f in (("bulk", "gbit_s"), ("rps", "per_s")):
            v = fig(r, k, f)
            r["ratio"][k] = v / base[k] if (v is not None and base[k]) else None
    targets = []

    def add(row: str, what: str, goal: str, value: float | None, ok: bool | None, text: str) -> None:
        targets.append({"row": row, "what": what, "target": goal, "value": value, "met": ok,
                        "text": f"{LABELS[row]}: {text}"})

    anp = by.get("anp")
    for row in OURS:
        ours = by.get(row)
        if ours is None:
            continue
        v = fig(ours, "ratio", "bulk")
        add(row, "bulk Gbit/s", f">= {T_BULK_VS_DIRECT}x direct", v, None if v is None else v >= T_BULK_VS_DIRECT,
            "not measured" if v is None else f"{v:.2f}x direct")
        o, a = fig(ours, "bulk", "gbit_s"), fig(anp, "bulk", "gbit_s")
        v = o / a if (o is not None and a) else None
        add(row, "bulk Gbit/s", f">= {T_BULK_VS_ANP}x upstream ANP", v, None if v is None else v >= T_BULK_VS_ANP,
            "not measured" if v is None else f"{v:.2f}x upstream ({o:.2f} vs {a:.2f} Gbit/s)")
        v = fig(ours, "ratio", "rps")
        add(row, "requests/s", f">= {T_RPS_VS_DIRECT}x direct", v, None if v is None else v >= T_RPS_VS_DIRECT,
            "not measured" if v is None else f"{v:.2f}x direct")
        for lv in fig(ours, "idle", "levels") or []:
            k = lv["kib_per_tunnel"]
            short = lv["opened"] < lv["target"]
            add(row, f"memory per idle tunnel at {lv['target']:,}", f"<= {T_IDLE_KIB:g} KiB", k,
                None if k is None else (k <= T_IDLE_KIB and not short),
                "not measured" if k is None else f"{k:.2f} KiB" +
                (f", but only {lv['opened']:,} of {lv['target']:,} opened" if short else ""))
        if not fig(ours, "idle", "levels"):
            add(row, "memory per idle tunnel", f"<= {T_IDLE_KIB:g} KiB", None, None, "not measured")
        v = fig(ours, "isolation", "ratio")
        iso = fig(ours, "isolation") or {}
        short = iso.get("opened", iso.get("streams")) != iso.get("streams") or iso.get("stalled") == 0
        add(row, "slow-reader isolation", f">= {T_ISOLATION}", v,
            None if v is None else (v >= T_ISOLATION and not short),
            "not measured" if v is None else f"{v:.3f}" + (
                f" (but {iso.get('opened')} of {iso.get('streams')} streams and {iso.get('stalled')} stalled "
                "reader opened)" if short else ""))
    return {"direct": base, "targets": targets}


# --------------------------------------------------------------------------------------
# output


def render_md(meta: dict[str, Any], results: list[dict[str, Any]], derived: dict[str, Any]) -> str:
    L = ["# konnectivity tunnel benchmark", ""]
    L.append(f"- date: {meta['date']}")
    L.append(f"- commit: `{meta['commit']}`")
    L.append(f"- kernel: `{meta['kernel']}`; CPU: {meta['cpu_model']} ({meta['cores']} cores)")
    L.append(f"- mode: {meta['mode']}; bulk: {meta['bulk_gib']:g} GiB on one tunnel; wrk `-t1 -c{WRK_CONNS} "
             f"-d{meta['duration_s']}s` (+{meta['warmup_s']} s warm-up) through the CONNECT entry; "
             f"{meta['dials']:,} sequential dials; idle: {', '.join(f'{n:,}' for n in meta['idle_counts'])} tunnels; "
             f"isolation: {meta['iso_streams']} streams × {meta['iso_seconds']:g} s; "
             f"total run time {meta['elapsed_s']:.0f} s")
    if meta.get("repeat", 1) > 1:
        L.append(f"- rounds: {meta['repeat']} (bulk, requests/s and dial: the median round's; idle and isolation: "
                 "round 1)")
    L.append(f"- pinning: {meta['pinning']}")
    L.append(f"- agent plane: {meta['agent_plane']}")
    L.append(f"- tools: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}")
    L.append("")
    L.append("Ratios are vs `direct`. CPU = whole-machine busy time (/proc/stat, all cores) during the run ÷ work "
             "done. Dial = CONNECT sent → 200 received (ours, ANP); TCP connect + first byte's round trip "
             "(direct, rathole: their TCP connect does not cross the tunnel). KiB / idle tunnel = growth of the "
             "tunnel's RSS (server + agent) ÷ tunnels held. Isolation = aggregate throughput of "
             f"{meta['iso_streams']} streaming tunnels while one more tunnel's reader has stopped ÷ the same "
             "alone.")
    L.append("")
    counts = meta["idle_counts"]
    L.append("| row | bulk Gbit/s | requests/s | dial p50 / p99 ms | "
             + " | ".join(f"KiB / idle tunnel @{n:,}" for n in counts)
             + " | CPU s/GiB | CPU µs/req | isolation |")
    L.append("|---|" + "---:|" * (6 + len(counts)))
    for r in results:
        if r["status"] == "missing":
            L.append(f"| {r['label']} | missing | | | " + "| " * len(counts) + "| | |")
            continue
        direct = r["row"] == "direct"
        b, q, d = (r.get(k) if isinstance(r.get(k), dict) else None for k in ("bulk", "rps", "dial"))
        ratio = r.get("ratio", {})
        cells = [r["label"] + ("" if r["status"] == "ok" else f" ({r['status']})"),
                 (fmt(b["gbit_s"], 2) + ("" if direct or ratio.get("bulk") is None else f" ({ratio['bulk']:.2f}×)"))
                 if b else "failed",
                 (fmt(q["per_s"]) + ("" if direct or ratio.get("rps") is None else f" ({ratio['rps']:.2f}×)"))
                 if q else "failed",
                 f"{d['dial']['p50_ms']:.3f} / {d['dial']['p99_ms']:.3f}" if d else "failed"]
        for n in counts:
            lv = idle_at(r, n)
            if direct:
                cells.append("n/a")
            elif lv is None or lv.get("kib_per_tunnel") is None:
                cells.append("failed" if r.get("failed_measures") and "idle" in r["failed_measures"] else "–")
            else:
                cells.append(f"{lv['kib_per_tunnel']:.2f}" + ("" if lv["opened"] >= lv["target"]
                                                             else f" (held only {lv['opened']:,})"))
        cells.append(fmt(b["cpu_s_per_gib"], 2) if b else "–")
        cells.append(fmt(q["cpu_us_per_req"], 1) if q else "–")
        iso = r.get("isolation") if isinstance(r.get("isolation"), dict) else None
        cells.append("n/a" if direct else (f"{iso['ratio']:.3f}" if iso else "–"))
        L.append("| " + " | ".join(cells) + " |")
    L.append("")
    L.append("## Targets")
    L.append("")
    if not derived["targets"]:
        L.append("- (our row was not run)")
    for t in derived["targets"]:
        state = {True: "**met**", False: "**not met**", None: "not determined"}[t["met"]]
        L.append(f"- {t['what']} {t['target']}: {t['text']} — {state}")
    L.append("")
    L.append("## Details")
    L.append("")
    L.append("| row | tunnel CPU s/GiB · µs/req | wrk p50 / p99 ms | first byte p50 / p99 ms | "
             "isolation Gbit/s alone → with a stalled reader | idle: opened, RSS before → after MiB | "
             "other work: idle-before → share of busy during |")
    L.append("|---|---|---|---|---|---|---|")
    for r in results:
        if r["status"] == "missing":
            continue
        b, q, d, iso = (r.get(k) if isinstance(r.get(k), dict) else None for k in ("bulk", "rps", "dial", "isolation"))
        tc = " · ".join([fmt(b.get("tunnel_cpu_s_per_gib"), 2) if b and b.get("tunnel_cpu_s_per_gib") is not None
                         else "–",
                         fmt(q.get("tunnel_cpu_us_per_req"), 1) if q and q.get("tunnel_cpu_us_per_req") is not None
                         else "–"])
        idles = "; ".join(f"{lv['opened']:,} of {lv['target']:,}, {lv['rss_before_kib'] / 1024:.1f} → "
                          f"{lv['rss_after_kib'] / 1024:.1f}" for lv in fig(r, "idle", "levels") or []) or "–"
        noise = []
        for k, v in r.get("background", {}).items():
            m = r.get(k)
            during = f" → {m['foreign_frac'] * 100:.0f}%" if isinstance(m, dict) and "foreign_frac" in m else ""
            noise.append(f"{k} {v * 100:.0f}%{during}")
        L.append("| " + " | ".join([
            r["label"], tc,
            f"{fmt(q.get('p50_ms'), 2)} / {fmt(q.get('p99_ms'), 2)}" if q else "–",
            f"{d['first_byte']['p50_ms']:.3f} / {d['first_byte']['p99_ms']:.3f}" if d else "–",
            (f"{iso['alone_gbit_s']:.2f} → {iso['with_stalled_gbit_s']:.2f}"
             + (f" ({iso.get('opened')} of {iso['streams']} streams opened)"
                if iso.get("opened", iso["streams"]) != iso["streams"] else "")) if iso else "–",
            idles, ", ".join(noise) or "–"]) + " |")
    L.append("")
    rounds_table(L, results, [("bulk Gbit/s", "bulk", ".2f"), ("requests/s", "rps", ",.0f"),
                              ("dial p50 ms", "dial_p50", ".3f")])
    notes = []
    for r in results:
        for e in r.get("errors", []):
            first = e.strip().splitlines()
            notes.append(f"- {r['label']} ({r['status']}): " + (first[0] if first else e))
        if fig(r, "idle", "note"):
            notes.append(f"- {r['label']} idle: {r['idle']['note']}")
        m = r.get("rps")
        if isinstance(m, dict):
            se = {a: b for a, b in m.get("socket_errors", {}).items() if b}
            if se or m.get("non_2xx"):
                notes.append(f"- {r['label']} wrk: socket errors {se or 0}, non-2xx {m.get('non_2xx', 0)}")
        for k, v in r.get("background", {}).items():
            m = r.get(k)
            ff = m.get("foreign_frac") if isinstance(m, dict) else None
            if v > BG_BUSY_WARN or (ff is not None and ff > FOREIGN_WARN):
                notes.append(f"- {r['label']} {k}: other work on the machine ({v * 100:.0f}% busy just before"
                             + (f"; {ff * 100:.0f}% of the busy time during the run was not ours" if ff is not None
                                else "") + "): its figures are suspect")
    if notes:
        L.append("## Notes")
        L.append("")
        L.extend(notes)
        L.append("")
    L.append("Plot: `tunnel.svg`; raw numbers: `tunnel-latest.json`.")
    L.append("")
    return "\n".join(L)


def svg(results: list[dict[str, Any]], derived: dict[str, Any], meta: dict[str, Any]) -> str:
    W, H = 1080, 640
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" {FONT}>',
         f'<rect width="{W}" height="{H}" fill="white"/>',
         svg_text(W / 2, 28, "konnectivity tunnel vs upstream ANP v0.36.0 and rathole (tunnel pinned to 1 core)",
                  17, "middle", "bold"),
         svg_text(W / 2, 50, f"{meta['mode']} run {meta['date']} · commit {meta['commit']}", 12, "middle",
                  fill="#555")]
    base = derived["direct"]
    largest = max(meta["idle_counts"]) if meta["idle_counts"] else 0

    def items(get: Callable[[dict[str, Any]], float | None], rows: list[dict[str, Any]]) -> list:
        return [(r["label"], get(r), r["status"] if r["status"] != "ok" else "no data", r["row"] in OURS)
                for r in rows]

    tun = [r for r in results if r["row"] in TUNNELS]
    panels = [
        ("bulk, one tunnel — higher is better", "Gbit/s", items(lambda r: fig(r, "bulk", "gbit_s"), results),
         base["bulk"] * T_BULK_VS_DIRECT if base["bulk"] else None, f"target {T_BULK_VS_DIRECT}× direct", 2),
        (f"HTTP requests/s, {WRK_CONNS} connections — higher is better", "requests/s",
         items(lambda r: fig(r, "rps", "per_s"), results),
         base["rps"] * T_RPS_VS_DIRECT if base["rps"] else None, f"target {T_RPS_VS_DIRECT}× direct", 0),
        ("dial p50 — lower is better", "ms", items(lambda r: fig(r, "dial", "dial", "p50_ms"), results), None, "", 3),
        (f"RSS per idle tunnel at {largest:,} — lower is better", "KiB",
         items(lambda r: fig(idle_at(r, largest), "kib_per_tunnel"), tun), T_IDLE_KIB, f"target ≤ {T_IDLE_KIB:g} KiB",
         2),
    ]
    pw, ph = (W - 40) / 2, (H - 80) / 2
    for i, (title, unit, its, target, tl, digits) in enumerate(panels):
        hbar_panel(o, 20 + (i % 2) * pw, 90 + (i // 2) * ph, pw - 20, ph - 20, title, unit, its, target, tl, digits)
    o.append("</svg>")
    return "\n".join(o)


MEDIAN_KEY = {"bulk": "gbit_s", "rps": "per_s", "dial": "p50"}


def rathole_version(rathole: str) -> str:
    """rathole's "Build Version" and whether its TLS transport is compiled in."""
    if not Path(rathole).exists():
        return "missing"
    out = sh([rathole, "--version"])
    version = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Build Version")), "?")
    features = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("cargo Features")), "")
    return version + (" (tls: native-tls)" if "tokio_native_tls" in features.split(",") else " (no tls feature)")


def tool_versions(ctx_anp: Path | None, rathole: str) -> dict[str, str]:
    return {
        "wrk": sh_any(["wrk", "-v"]).splitlines()[0].split(" Copyright")[0].removeprefix("wrk ")
        if shutil.which("wrk") else "missing",
        "nginx": sh(["nginx", "-v"]).split("/")[-1] if shutil.which("nginx") else "missing",
        "ANP": "v0.36.0 (scripts/anp-bin current)" if ctx_anp else "missing",
        "rathole": rathole_version(rathole),
    }


def write_outputs(out: Path, meta: dict[str, Any], results: list[dict[str, Any]]) -> None:
    derived = derive(results)
    doc = {"meta": meta, "rows": results, "derived": derived,
           "targets_spec": {"bulk_vs_direct": T_BULK_VS_DIRECT, "bulk_vs_anp": T_BULK_VS_ANP,
                            "rps_vs_direct": T_RPS_VS_DIRECT, "idle_kib_per_tunnel": T_IDLE_KIB,
                            "isolation": T_ISOLATION}}
    (out / "tunnel-latest.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    (out / "tunnel-latest.md").write_text(render_md(meta, results, derived))
    (out / "tunnel.svg").write_text(svg(results, derived, meta) + "\n")


def add_dial_p50(rounds: list[list[dict[str, Any]]]) -> None:
    """merge_rounds sorts by a top-level figure of a measure: the dial's p50 is nested."""
    for rnd in rounds:
        for r in rnd:
            d = r.get("dial")
            if isinstance(d, dict) and "dial" in d:
                d["p50"] = d["dial"]["p50_ms"]


def main() -> int:
    ap = argparse.ArgumentParser(prog=f"python3 -m {__spec__.name}", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="a short smoke run: 1 round, 2 s wrk, 128 MiB bulk, 200 dials, 200/1,000 idle tunnels, "
                         "2 s isolation; output to a temp dir; non-zero exit if a row fails")
    ap.add_argument("--out", default=None, help="output dir (default bench/results; a temp dir with --quick)")
    ap.add_argument("--no-install", action="store_true", help="do not run install-deps.sh (full mode)")
    ap.add_argument("--install", action="store_true", help="run install-deps.sh with --quick too")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    ap.add_argument("--repeat", type=int, default=None, help="rounds (3; quick 1)")
    ap.add_argument("--duration", type=int, default=None, help="seconds per wrk run (10; quick 2)")
    ap.add_argument("--bulk-mib", type=int, default=None, help="bulk transfer size (1024; quick 128)")
    ap.add_argument("--dials", type=int, default=None, help="sequential dials (2000; quick 200)")
    ap.add_argument("--idle", default=None, help="idle tunnel counts (1000,10000; quick 200,1000)")
    ap.add_argument("--iso-seconds", type=float, default=None, help="seconds per isolation phase (5; quick 2)")
    ap.add_argument("--build-wait", type=float, default=None,
                    help="max seconds to wait before each measure until no rustc/cc1/go/cargo runs (600; quick 60)")
    ap.add_argument("--keep-tmp", action="store_true")
    ap.add_argument("--keep-raw", action="store_true", help="keep wrk's raw output in the JSON")
    ap.add_argument("--from-json", metavar="JSON", help="measure nothing: re-render from a tunnel-latest.json")
    args = ap.parse_args()

    if args.from_json:
        src = Path(args.from_json)
        doc = json.loads(src.read_text())
        out = Path(args.out) if args.out else src.parent
        out.mkdir(parents=True, exist_ok=True)
        write_outputs(out, doc["meta"], doc["rows"])
        return 0

    quick = args.quick
    repeat = args.repeat or (1 if quick else 3)
    duration = args.duration or (2 if quick else 10)
    warmup = 0 if quick else 2
    bulk_mib = args.bulk_mib or (128 if quick else 1024)
    dials = args.dials or (200 if quick else 2000)
    idle_counts = [int(x) for x in (args.idle or ("200,1000" if quick else "1000,10000")).split(",") if x]
    iso_seconds = args.iso_seconds or (2.0 if quick else 5.0)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        ap.error(f"unknown rows: {bad}")
    rows = [r for r in ROWS if r in rows]

    out = output_dir(args, quick, "tunnel-bench-quick-")
    args.smoke = quick
    status = install_and_check(args, quick, ("wrk", "nginx", "openssl", "taskset", "prlimit"))
    if status:
        return status
    entry = common.release_bin("tunnel-entry")
    if not Path(entry).exists():
        log(f"FAIL: {entry} does not exist: cargo build --release -p konnectivity -p bench")
        return 1
    raise_nofile()
    pin = {0, 1} <= os.sched_getaffinity(0)
    if pin:
        os.sched_setaffinity(0, {1})
    else:
        log("cores 0 and 1 are not both usable: no pinning")
    anp_dir = None
    if "anp" in rows:
        p = subprocess.run([str(REPO / "scripts/anp-bin"), "--built", "current"], capture_output=True, text=True)
        if p.returncode == 3:
            log("building upstream ANP (scripts/anp-bin current)")
            p = subprocess.run(["flock", "/tmp/gardener-build.lock", str(REPO / "scripts/anp-bin"), "current"],
                               capture_output=True, text=True, timeout=900)
        if p.returncode == 0:
            anp_dir = Path(p.stdout.strip())
        else:
            log(f"scripts/anp-bin current failed: {p.stderr.strip()[-300:]}")

    t_start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="tunnel-bench-"))
    runner = Runner(tmp, pin)

    def on_term(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    results: list[dict[str, Any]] = []
    try:
        log(f"temp dir {tmp}; output {out}")
        pki = make_pki(tmp)
        sink_port, http_port = free_port(), free_port()
        sink = runner.start("sink", [entry, "sink", "--listen", f"127.0.0.1:{sink_port}"], sink_port, 1)
        nginx = runner.start("nginx", ["nginx", "-p", str(tmp / "nginx") + "/", "-c", str(nginx_conf(tmp, http_port)),
                                       "-e", str(tmp / "nginx.error.log")], http_port, 1)
        ctx = Ctx(args, tmp, runner, pin, entry, common.release_bin("konnectivity-server"),
                  common.release_bin("konnectivity-agent"), anp_dir, rathole_bin(), pki, sink, nginx, duration,
                  warmup, bulk_mib << 20, dials, idle_counts, 100, iso_seconds, 0.0 if quick else 10.0,
                  args.build_wait if args.build_wait is not None else (60.0 if quick else 600.0))
        rounds: list[list[dict[str, Any]]] = []
        for rnd in range(repeat):
            this = []
            for row in rows:
                log(f"== {row}" + (f" (round {rnd + 1} of {repeat})" if repeat > 1 else ""))
                r = measure_row(ctx, row, rnd == 0)
                if r["errors"]:
                    log(f"{row}: {r['status']}: " + " | ".join(e.splitlines()[0] for e in r["errors"]))
                this.append(r)
            rounds.append(this)
        add_dial_p50(rounds)
        results = merge_rounds(rounds, MEDIAN_KEY, once=("idle", "isolation"))
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

    meta = collect_meta("tunnel (server and agent) on core 0 (taskset -c 0); load, CONNECT entry, sink and nginx "
                        "on core 1" if pin else "none", tool_versions(anp_dir, rathole_bin()))
    meta.update({"mode": "quick" if quick else "full", "repeat": repeat, "duration_s": duration, "warmup_s": warmup,
                 "bulk_gib": bulk_mib / 1024, "dials": dials, "idle_counts": idle_counts, "iso_streams": 100,
                 "iso_seconds": iso_seconds, "wrk_connections": WRK_CONNS, "nofile": common.NOFILE,
                 "elapsed_s": time.monotonic() - t_start,
                 "agent_plane": "ours (gRPC) and ANP: gRPC over TLS with client certificates (mTLS); ours (QUIC): "
                                "QUIC with client certificates; rathole: its TLS "
                                "transport (native-tls, server certificate only; rathole authenticates clients "
                                "by a service token)"})
    # the rounds table reads "dial_p50": merge_rounds keeps the sorted figures under the measure's name
    for r in results:
        if "dial" in r.get("rounds", {}):
            r["rounds"]["dial_p50"] = r["rounds"].pop("dial")
    write_outputs(out, meta, results)
    log(f"wrote {out}/tunnel-latest.md, tunnel-latest.json, tunnel.svg ({meta['elapsed_s']:.0f} s)")
    print((out / "tunnel-latest.md").read_text())
    failed = False
    for r in results:
        if r["status"] != "ok" and (r["row"] in OURS or r["status"] != "missing"):
            log(f"FAIL {r['row']}: {r['status']} ({', '.join(r.get('failed_measures', []) or r['errors'][:1])})")
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
