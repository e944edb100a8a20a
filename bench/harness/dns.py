"""DNS cache benchmark: node-local-dns against unbound, pdns-recursor, knot-resolver, dnsmasq.

    python3 -m bench.harness.dns [--smoke] [--bin PATH] [--out bench/results]

(from the repository root). Everything runs on loopback (127.0.0.1).  Knot DNS serves the
zone `bench.test.` as the authoritative upstream; one caching server at a time forwards it
there and caches.  The server under test is pinned to core 0; dnsperf, knot and this harness
to core 1.  Measured
per server: cache-hit queries/s over 10,000 names, the server's CPU time per answered query
(/proc/PID/stat of its process tree), p50/p99 latency (dnsperf -v, every query's latency),
and RSS per 100,000 cached names.  See bench/README.md ("DNS") for the method.

Python 3.11 standard library only, plus Debian tools (knot, dnsperf, unbound, pdns-recursor,
knot-resolver, dnsmasq, taskset, prlimit).  The /proc accounting, process runner, rounds
and SVG pieces are the package's (`common`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from . import common
from .common import REPO, BenchError, Meter, Runner, Server, figure, fmt, free_port, log, wait_quiet

ZONE = "bench.test"
ZONE_TTL_S = 3600  # every record's TTL: hits stay hits for the whole run
OUR_CACHE_CAP_S = 3600  # our `cache` TTL cap (>= any run)
CACHE_ENTRIES = 200_000  # cache capacity given to every server (> the memory test's names)
HIT_NAMES = 10_000  # distinct names of the throughput test
MEM_NAMES = 100_000  # distinct names of the memory test (scaled to per 100,000 in the report)
SERVER_CORE, LOAD_CORE = 0, 1
SERVER_BUSY_LIMIT = 0.90  # server process CPU / wall above this: the server was the limit
LOAD_BUSY_LIMIT = 0.90  # dnsperf CPU / wall above this: the load generator was the limit
NOERROR_MIN = 0.999  # share of answers that must be NOERROR for a run to count
FILL_OUTSTANDING = 64  # dnsperf -q while filling: every query is a miss that goes to knot
FILL_PASSES = 3
MIN_ENTRIES = 1000  # the cache capacity of the memory test's baseline instance (dnsmasq: no cache)
MEM_SLACK = 1.25  # the memory instance's capacity = names x this (sharded caches fill unevenly)

ROWS = ["node-local-dns", "unbound", "pdns-recursor", "knot-resolver", "dnsmasq"]
LABELS = {
    "node-local-dns": "node-local-dns",
    "unbound": "unbound",
    "pdns-recursor": "pdns-recursor",
    "knot-resolver": "knot-resolver",
    "dnsmasq": "dnsmasq",
}
OURS = ("node-local-dns",)
PEERS = ("unbound", "pdns-recursor", "knot-resolver", "dnsmasq")
BASELINE = "unbound"
PEER_BIN = {"unbound": "unbound", "pdns-recursor": "pdns_recursor", "knot-resolver": "kresd",
            "dnsmasq": "dnsmasq"}
SMOKE_ROWS = ["node-local-dns", "unbound", "dnsmasq"]

# Targets (benchmarks, not tests): against unbound in the same run.
T_CPU_VS_UNBOUND = 0.6
T_QPS_VS_UNBOUND = 1.0


# --------------------------------------------------------------------------------------
# DNS on the wire (just enough to probe a server)


def dns_query(name: str, qid: int) -> bytes:
    q = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)  # RD
    for label in name.rstrip(".").split("."):
        q += bytes([len(label)]) + label.encode()
    return q + b"\x00" + struct.pack(">HH", 1, 1)  # A IN


def probe(port: int, name: str, timeout: float = 10.0) -> None:
    """One A query over UDP; raises unless the answer is NOERROR with at least one record."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.5)
        while time.monotonic() < deadline:
            qid = random.randrange(65536)
            s.sendto(dns_query(name, qid), ("127.0.0.1", port))
            try:
                data = s.recv(4096)
            except socket.timeout:
                continue
            rid, flags, _, an = struct.unpack(">HHHH", data[:8])
            if rid != qid:
                continue
            rcode = flags & 0xF
            if rcode == 0 and an >= 1:
                return
            last = f"rcode {rcode}, {an} answers"
            time.sleep(0.2)
    raise BenchError(f"probe {name} on 127.0.0.1:{port}: {last}")


# --------------------------------------------------------------------------------------
# knot (authoritative upstream) and its query counter


def write_zone(tmp: Path) -> Path:
    """bench.test.: h0..h9999 (the hit set) as explicit records, everything else by wildcard."""
    zf = tmp / f"{ZONE}.zone"
    lines = [f"$ORIGIN {ZONE}.", f"$TTL {ZONE_TTL_S}",
             f"@ SOA ns hostmaster 1 {ZONE_TTL_S} 600 86400 {ZONE_TTL_S}", "@ NS ns", "ns A 127.0.0.1",
             "* A 192.0.2.2"]
    lines += [f"h{i} A 192.0.2.1" for i in range(HIT_NAMES)]
    zf.write_text("\n".join(lines) + "\n")
    return zf


def knot_conf(tmp: Path, port: int) -> Path:
    d = tmp / "knot"
    d.mkdir(exist_ok=True)
    conf = d / "knot.conf"
    conf.write_text(f"""server:
    listen: 127.0.0.1@{port}
    rundir: {d}
    udp-workers: 1
    tcp-workers: 1
    background-workers: 1
control:
    listen: {d}/knot.sock
log:
  - target: stderr
    any: warning
database:
    storage: {d}/db
mod-stats:
  - id: bench
    request-protocol: on
template:
  - id: default
    storage: {tmp}
    semantic-checks: off
    global-module: mod-stats/bench
zone:
  - domain: {ZONE}
    file: {ZONE}.zone
""")
    (d / "db").mkdir(exist_ok=True)
    return conf


class Upstream:
    def __init__(self, srv: Server, conf: Path):
        self.srv, self.conf = srv, conf

    @property
    def port(self) -> int:
        return self.srv.port

    def queries(self) -> int | None:
        """Queries knot has answered so far (mod-stats request-protocol), None if unknown."""
        try:
            p = subprocess.run(["knotc", "-c", str(self.conf), "stats", "mod-stats.request-protocol"],
                               capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        n = [int(m) for m in re.findall(r"\]\s*=\s*(\d+)", p.stdout)]
        if p.returncode != 0:
            return None
        return sum(n)


# --------------------------------------------------------------------------------------
# the servers under test


def unbound_conf(tmp: Path, port: int, up: int, entries: int, listen: tuple[str, ...] = ("127.0.0.1",),
                 allow: tuple[str, ...] = ()) -> list[str]:
    """unbound's argv and config; `listen` and `allow` (extra client subnets) for dns_fastpath.py."""
    cache = "256m" if entries > MIN_ENTRIES else "1m"  # limits; unbound allocates as it fills
    conf = tmp / "unbound.conf"
    interfaces = "".join(f"    interface: {a}@{port}\n" for a in listen)
    extra_acl = "".join(f"    access-control: {a} allow\n" for a in allow)
    conf.write_text(f"""server:
{interfaces}    port: {port}
    do-daemonize: no
    chroot: ""
    username: ""
    directory: "{tmp}"
    pidfile: ""
    use-syslog: no
    logfile: ""
    verbosity: 0
    num-threads: 1
    so-reuseport: no
    do-ip6: no
    do-not-query-localhost: no
    module-config: "iterator"
    qname-minimisation: no
    msg-cache-size: {cache}
    rrset-cache-size: {cache}
    msg-cache-slabs: 1
    rrset-cache-slabs: 1
    infra-cache-slabs: 1
    key-cache-slabs: 1
    num-queries-per-thread: 4096
    outgoing-range: 8192
    cache-min-ttl: 0
    access-control: 127.0.0.0/8 allow
{extra_acl}    local-zone: "test." nodefault
    domain-insecure: "{ZONE}"
forward-zone:
    name: "{ZONE}"
    forward-addr: 127.0.0.1@{up}
""")
    return ["unbound", "-d", "-c", str(conf)]


def pdns_conf(tmp: Path, port: int, up: int, entries: int) -> list[str]:
    d = tmp / "pdns"
    d.mkdir(exist_ok=True)
    (d / "recursor.conf").write_text(f"""local-address=127.0.0.1
local-port={port}
forward-zones={ZONE}=127.0.0.1:{up}
threads=1
pdns-distributes-queries=no
reuseport=no
daemon=no
write-pid=no
socket-dir={d}
disable-syslog=yes
quiet=yes
log-common-errors=no
loglevel=3
dnssec=off
dont-query=
allow-from=127.0.0.0/8
max-cache-entries={entries * 5}
max-packetcache-entries={entries * 2}
max-mthreads=4096
""")
    return ["pdns_recursor", f"--config-dir={d}"]


def kresd_conf(tmp: Path, port: int, up: int, entries: int) -> list[str]:
    mib = max(10, entries * 4096 // (1024 * 1024))  # an LMDB file, mapped; pages count once touched
    d = tmp / "kresd"
    d.mkdir(exist_ok=True)
    conf = d / "config.lua"
    conf.write_text(f"""-- knot-resolver: one process, forward {ZONE} to knot, cache in the run dir
log_level('warning')
net.listen('127.0.0.1', {port}, {{ kind = 'dns' }})
cache.open({mib} * MB, 'lmdb://{d}/cache')
trust_anchors.remove('.')
policy.add(policy.suffix(policy.STUB({{'127.0.0.1@{up}'}}), {{todname('{ZONE}.')}}))
""")
    return ["kresd", "-n", "-c", str(conf), str(d)]


def dnsmasq_conf(tmp: Path, port: int, up: int, entries: int) -> list[str]:
    conf = tmp / "dnsmasq.conf"
    conf.write_text(f"""port={port}
listen-address=127.0.0.1
bind-interfaces
no-resolv
no-hosts
no-poll
server=/{ZONE}/127.0.0.1#{up}
cache-size={entries if entries > MIN_ENTRIES else 0}
dns-forward-max=4096
user=root
group=root
pid-file=
""")
    return ["dnsmasq", "-k", "-C", str(conf)]


def ours_conf(tmp: Path, binary: Path, port: int, up: int, entries: int) -> tuple[list[str], dict[str, str]]:
    health, metrics = free_port(), free_port()
    conf = tmp / "Corefile"
    conf.write_text(f"""{ZONE}:{port} {{
    errors
    cache {OUR_CACHE_CAP_S} {{
        success {entries}
    }}
    bind 127.0.0.1
    forward . 127.0.0.1:{up}
    prometheus 127.0.0.1:{metrics}
    health 127.0.0.1:{health}
}}
""")
    argv = [str(binary), "-localip", "127.0.0.1", "-conf", str(conf), "-setupinterface=false",
            "-setupiptables=false", "-health-port", str(health)]
    p = subprocess.run(argv + ["-check"], capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        raise BenchError(f"node-local-dns -check rejected the Corefile: {(p.stderr or p.stdout).strip()[-600:]}")
    # one runtime worker: with the UDP hit thread, everything shares the one pinned core anyway
    return argv, {"RUST_LOG": os.environ.get("BENCH_RUST_LOG", "warn"), "TOKIO_WORKER_THREADS": "1"}


def peer_missing(row: str) -> str | None:
    b = PEER_BIN.get(row)
    if b and not shutil.which(b):
        return f"{b} is not installed (bench/harness/install-deps.sh installs it)"
    return None


# --------------------------------------------------------------------------------------
# dnsperf


def _num(pat: str, out: str, conv: Callable[[str], Any] = float) -> Any:
    m = re.search(pat, out)
    return conv(m.group(1)) if m else None


def parse_dnsperf(out: str) -> dict[str, Any]:
    r: dict[str, Any] = {
        "sent": _num(r"Queries sent:\s+(\d+)", out, int),
        "completed": _num(r"Queries completed:\s+(\d+)", out, int),
        "lost": _num(r"Queries lost:\s+(\d+)", out, int),
        "run_s": _num(r"Run time \(s\):\s+([\d.]+)", out),
        "qps": _num(r"Queries per second:\s+([\d.]+)", out),
        "avg_ms": _num(r"Average Latency \(s\):\s+([\d.]+)", out),
    }
    codes = {}
    m = re.search(r"Response codes:\s+(.*)", out)
    if m:
        for code, n in re.findall(r"([A-Z]+) (\d+) \(", m.group(1)):
            codes[code] = int(n)
    r["rcodes"] = codes
    if r["avg_ms"] is not None:
        r["avg_ms"] *= 1000
    if None in (r["sent"], r["completed"], r["qps"]):
        raise BenchError("cannot parse dnsperf's output:\n" + out[-800:])
    return r


def percentile(sorted_vals: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of an ascending list."""
    if not sorted_vals:
        return float("nan")
    k = max(0, min(len(sorted_vals) - 1, int(-(-p * len(sorted_vals) // 100)) - 1))
    return sorted_vals[k]


def per_query(r: dict[str, Any]) -> None:
    """Sets a cache-hit run's figures: the server's CPU per answered query (µs), the server's and
    dnsperf's busy share of their cores, and the limit: `server` when the server's share reached
    SERVER_BUSY_LIMIT, else `dnsperf` when dnsperf's reached LOAD_BUSY_LIMIT, else `neither`."""
    wall = r["wall_s"]  # dnsperf's whole life, incl. waiting for the last answers (run_s is not)
    r["cpu_us_per_query"] = r["server_cpu_s"] * 1e6 / r["completed"]
    r["server_busy"] = r["server_cpu_s"] / wall
    r["load_busy"] = r["load_cpu_s"] / wall
    if r["server_busy"] >= SERVER_BUSY_LIMIT:
        r["limit"] = "server"
    elif r["load_busy"] >= LOAD_BUSY_LIMIT:
        r["limit"] = "dnsperf"
    else:
        r["limit"] = "neither"
    r["limit_text"] = (f"{r['limit']} (server {r['server_busy'] * 100:.0f}% of its core, "
                       f"dnsperf {r['load_busy'] * 100:.0f}%)")


def latency_figures(lat: list[float], rate: int) -> dict[str, Any]:
    """The latency run's figures from every answered query's latency (ms, any order): nearest-rank
    p50, p90, p99 and p99.9, and the maximum."""
    lat = sorted(lat)
    return {
        "rate_qps": rate,
        "samples": len(lat),
        "p50_ms": percentile(lat, 50),
        "p90_ms": percentile(lat, 90),
        "p99_ms": percentile(lat, 99),
        "p999_ms": percentile(lat, 99.9),
        "max_ms": lat[-1] if lat else None,
    }


def per_100k_mib(grown_kib: int, names: int) -> float:
    """RSS growth (KiB) for `names` cached names, as MiB per 100,000 names."""
    return grown_kib / names * 100_000 / 1024


class Load:
    """dnsperf runs against one server.  `server_ip` and `prefix` (a command dnsperf runs under, e.g.
    `ip netns exec POD`) are for dns_fastpath.py, which asks from a pod namespace."""

    def __init__(self, upstream: Upstream, clients: int, outstanding: int, timeout_s: int,
                 server_ip: str = "127.0.0.1", prefix: list[str] | None = None):
        self.up, self.clients, self.outstanding, self.timeout_s = upstream, clients, outstanding, timeout_s
        self.server_ip, self.prefix = server_ip, prefix or []

    def dnsperf(self, port: int, names: Path, extra: list[str], timeout: float,
                server: Server | None, verbose: bool = False) -> tuple[dict[str, Any], list[float]]:
        argv = self.prefix + ["dnsperf", "-s", self.server_ip, "-p", str(port), "-d", str(names), "-T", "1",
                "-c", str(self.clients), "-t", str(self.timeout_s)] + extra + (["-v"] if verbose else [])
        u0 = self.up.queries()
        meter = Meter(server, self.up.srv)
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        cpu = meter.stop()
        u1 = self.up.queries()
        if p.returncode != 0:
            raise BenchError(f"dnsperf exited {p.returncode}: {(p.stderr or p.stdout).strip()[-500:]}")
        r = parse_dnsperf(p.stdout)
        r.update(cpu)
        r["server_cpu_s"] = r.pop("proxy_cpu_s")
        r["upstream_cpu_s"] = r.pop("backend_cpu_s")
        r["upstream_queries"] = (u1 - u0) if (u0 is not None and u1 is not None) else None
        lat: list[float] = []
        if verbose:
            for line in p.stdout.splitlines():
                if line.startswith("> NOERROR "):
                    lat.append(float(line.rsplit(None, 1)[1]) * 1000)
        if r["completed"] == 0:
            raise BenchError("dnsperf: no query was answered:\n" + p.stdout[-800:])
        noerr = r["rcodes"].get("NOERROR", 0)
        if noerr < NOERROR_MIN * r["completed"]:
            raise BenchError(f"dnsperf: only {noerr} of {r['completed']} answers were NOERROR ({r['rcodes']})")
        return r, lat

    def fill(self, port: int, names: Path, n: int, server: Server | None) -> dict[str, Any]:
        """A pass over `names` (every name once) puts them into the cache; a query lost on the
        way to the upstream (a busy machine) gets a second pass, whose other queries are hits."""
        passes = []
        for _ in range(FILL_PASSES):
            r, _ = self.dnsperf(port, names, ["-n", "1", "-q", str(FILL_OUTSTANDING)], 120 + n / 2000, server)
            passes.append(r)
            if r["completed"] >= n and not r["lost"]:
                r["passes"] = len(passes)
                r["lost_first_pass"] = passes[0]["lost"]
                return r
        raise BenchError(f"cache fill: {r['completed']} of {n} names answered, {r['lost']} lost "
                         f"(after {FILL_PASSES} passes)")

    def throughput(self, port: int, names: Path, duration: int, server: Server) -> dict[str, Any]:
        r, _ = self.dnsperf(port, names, ["-l", str(duration), "-q", str(self.outstanding)],
                            duration + 60, server)
        per_query(r)
        return r

    def latency(self, port: int, names: Path, duration: int, rate: int, server: Server) -> dict[str, Any]:
        """dnsperf -v at a fixed offered rate: every answered query's latency."""
        r, lat = self.dnsperf(port, names, ["-l", str(duration), "-Q", str(rate), "-q", str(self.outstanding)],
                              duration + 60, server, verbose=True)
        r.update(latency_figures(lat, rate))
        if not lat:
            raise BenchError("dnsperf -v printed no latency")
        return r


# --------------------------------------------------------------------------------------
# rows


class Ctx:
    def __init__(self, args: argparse.Namespace, tmp: Path, runner: Runner, load: Load, up: Upstream,
                 binary: Path, duration: int, lat_duration: int, lat_rate: int, mem_names: int,
                 hit_file: Path, mem_file: Path):
        self.args, self.tmp, self.runner, self.load, self.up = args, tmp, runner, load, up
        self.binary, self.duration, self.lat_duration, self.lat_rate = binary, duration, lat_duration, lat_rate
        self.mem_names, self.hit_file, self.mem_file = mem_names, hit_file, mem_file
        self.seq = 0


def start_row(ctx: Ctx, row: str, entries: int = CACHE_ENTRIES) -> Server:
    ctx.seq += 1
    port = free_port()
    tmp = ctx.tmp / f"{row}-{ctx.seq}"
    tmp.mkdir()
    env = None
    if row == "node-local-dns":
        argv, env = ours_conf(tmp, ctx.binary, port, ctx.up.port, entries)
    elif row == "unbound":
        argv = unbound_conf(tmp, port, ctx.up.port, entries)
    elif row == "pdns-recursor":
        argv = pdns_conf(tmp, port, ctx.up.port, entries)
    elif row == "knot-resolver":
        argv = kresd_conf(tmp, port, ctx.up.port, entries)
    elif row == "dnsmasq":
        argv = dnsmasq_conf(tmp, port, ctx.up.port, entries)
    else:
        raise BenchError(f"unknown row {row}")
    srv = ctx.runner.start(f"{row}-{ctx.seq}", argv, port, SERVER_CORE, env=env, timeout=20)
    try:
        probe(port, f"probe.{ZONE}")
    except BenchError as e:
        tail = srv.log_tail()
        ctx.runner.stop(srv)
        raise BenchError(f"{e}" + (f"\n--- log ---\n{tail}" if tail else ""))
    return srv


def stable_rss(srv: Server, timeout: float = 5.0) -> dict[str, int]:
    """The server tree's memory once RSS stopped moving (bounded)."""
    deadline = time.monotonic() + timeout
    last = srv.memory()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        cur = srv.memory()
        if abs(cur["rss_kib"] - last["rss_kib"]) <= 64:
            return cur
        last = cur
    return last


def memory_test(ctx: Ctx, row: str) -> dict[str, Any]:
    """RSS per cached name: a baseline instance with a minimal cache (its RSS after start-up and
    one probe), then an instance sized for the names (capacity = names x MEM_SLACK), filled.
    Growth is counted from the baseline, so a server that allocates its whole cache at
    start-up (dnsmasq) pays for it too; the growth from the sized instance's own start is kept."""
    srv = start_row(ctx, row, MIN_ENTRIES)
    try:
        base = stable_rss(srv)
    finally:
        ctx.runner.stop(srv)
    srv = start_row(ctx, row, int(ctx.mem_names * MEM_SLACK))
    try:
        start = stable_rss(srv)
        log(f"{row}: memory: {ctx.mem_names:,} names")
        fill = ctx.load.fill(srv.port, ctx.mem_file, ctx.mem_names, srv)
        after = stable_rss(srv)
    finally:
        ctx.runner.stop(srv)
    return {"names": ctx.mem_names, "capacity": int(ctx.mem_names * MEM_SLACK),
            "rss_baseline_kib": base["rss_kib"], "rss_start_kib": start["rss_kib"],
            "rss_after_kib": after["rss_kib"], "pss_after_kib": after["pss_kib"],
            "processes": after["processes"], "fill_passes": fill["passes"],
            "mib_per_100k": per_100k_mib(after["rss_kib"] - base["rss_kib"], ctx.mem_names),
            "mib_per_100k_from_start": per_100k_mib(after["rss_kib"] - start["rss_kib"], ctx.mem_names)}


def measure_row(ctx: Ctx, row: str, with_memory: bool) -> dict[str, Any]:
    res: dict[str, Any] = {"row": row, "label": LABELS[row], "status": "ok", "errors": [], "background": {}}
    if row in OURS and not ctx.binary.exists():
        res["status"] = "missing"
        res["errors"].append(f"{ctx.binary} does not exist (cargo build --release -p node-local-dns)")
        return res
    why = peer_missing(row)
    if why:
        res["status"] = "missing"
        res["errors"].append(why)
        return res

    def step(key: str, fn: Callable[[], Any]) -> None:
        try:
            res["background"][key] = round(wait_quiet(ctx.args.idle_wait), 3)
            res[key] = fn()
        except BenchError as e:
            res["errors"].append(f"{key}: {e}")
        except subprocess.TimeoutExpired as e:
            res["errors"].append(f"{key}: timed out: {e}")

    srv = None
    try:
        srv = start_row(ctx, row)
        log(f"{row}: warm the cache ({HIT_NAMES:,} names)")
        step("warm", lambda: ctx.load.fill(srv.port, ctx.hit_file, HIT_NAMES, srv))
        if "warm" in res:
            log(f"{row}: cache hits {ctx.duration}s")
            step("hits", lambda: ctx.load.throughput(srv.port, ctx.hit_file, ctx.duration, srv))
            log(f"{row}: latency {ctx.lat_duration}s at {ctx.lat_rate:,} queries/s")
            step("latency", lambda: ctx.load.latency(srv.port, ctx.hit_file, ctx.lat_duration, ctx.lat_rate, srv))
        if not srv.alive():
            res["errors"].append(f"{row} exited (status {srv.proc.returncode}) during the load:\n{srv.log_tail()}")
    except BenchError as e:
        res["errors"].append(str(e))
    finally:
        if srv is not None:
            ctx.runner.stop(srv)

    if with_memory and ctx.mem_names > 0:
        step("memory", lambda: memory_test(ctx, row))

    needed = ["warm", "hits", "latency"] + (["memory"] if with_memory and ctx.mem_names > 0 else [])
    missing = [k for k in needed if k not in res]
    if missing:
        res["status"] = "failed" if len(missing) == len(needed) else "partial"
        res["failed_measures"] = missing
    return res


# Per row, the median round's run of each measure (common.merge_rounds): hits by queries/s, latency
# by p99, the warm-up by queries/s; memory from round 1.
MEDIAN_KEY = {"hits": "qps", "latency": "p99_ms", "warm": "qps"}
SPREAD = {"cpu_us_per_query": ("hits", "cpu_us_per_query")}


def merge_rounds(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return common.merge_rounds(rounds, MEDIAN_KEY, once=("memory",), spread=SPREAD)


# --------------------------------------------------------------------------------------
# derived figures and targets


def derive(results: list[dict[str, Any]]) -> dict[str, Any]:
    by = {r["row"]: r for r in results}
    ub = by.get(BASELINE)
    targets = []
    for row in OURS:
        r = by.get(row)
        if r is None:
            continue

        def add(what: str, value: Any, goal: str, ok: bool | None, shown: str) -> None:
            targets.append({"row": row, "what": what, "value": value, "target": goal, "met": ok, "text": shown})

        v, b = figure(r, "hits", "cpu_us_per_query"), figure(ub, "hits", "cpu_us_per_query")
        goal = f"<= {T_CPU_VS_UNBOUND}x unbound"
        if v is None or b is None:
            add("server CPU per cache-hit query", v, goal, None,
                "not measured" if v is None else f"{v:.2f} µs; unbound was not measured")
        else:
            add("server CPU per cache-hit query", v / b, goal, v <= T_CPU_VS_UNBOUND * b,
                f"{v:.2f} µs vs unbound {b:.2f} µs = {v / b:.2f}x")
        v, b = figure(r, "hits", "qps"), figure(ub, "hits", "qps")
        goal = f">= {T_QPS_VS_UNBOUND}x unbound"
        if v is None or b is None:
            add("cache-hit queries/s", v, goal, None, "not measured" if v is None else "unbound was not measured")
        else:
            lim, ub_lim = figure(r, "hits", "limit"), figure(ub, "hits", "limit")
            add("cache-hit queries/s", v / b, goal, v >= T_QPS_VS_UNBOUND * b,
                f"{v:,.0f} vs unbound {b:,.0f} = {v / b:.3f}x (limit: ours {lim}, unbound {ub_lim})")
        v, b = figure(r, "latency", "p99_ms"), figure(ub, "latency", "p99_ms")
        goal = "< unbound"
        if v is None or b is None:
            add("p99 latency", v, goal, None, "not measured" if v is None else "unbound was not measured")
        else:
            add("p99 latency", v, goal, v < b, f"{v:.3f} ms vs unbound {b:.3f} ms")
    return {"targets": targets}


# --------------------------------------------------------------------------------------
# output


def render_md(meta: dict[str, Any], results: list[dict[str, Any]], derived: dict[str, Any]) -> str:
    L = ["# node-local-dns DNS cache benchmark", ""]
    L.append(f"- date: {meta['date']}")
    L.append(f"- commit: `{meta['commit']}`")
    L.append(f"- command: `{meta['command']}`")
    L.append(f"- kernel: `{meta['kernel']}`; CPU: {meta['cpu_model']} ({meta['cores']} cores)")
    L.append(f"- mode: {meta['mode']}; cache hits: `dnsperf -T 1 -c {meta['clients']} -q {meta['outstanding']} "
             f"-l {meta['duration_s']}` over {HIT_NAMES:,} names (after one warm-up pass); latency: "
             f"`dnsperf -v -Q {meta['lat_rate']} -l {meta['lat_duration_s']}` (every answer's latency); memory: "
             f"{meta['mem_names']:,} distinct names; total run time {meta['elapsed_s']:.0f} s")
    if meta.get("repeat", 1) > 1:
        L.append(f"- rounds: {meta['repeat']} (each figure from the median round; spread below)")
    L.append(f"- pinning: {meta['pinning']}")
    L.append(f"- upstream: knot {meta['versions'].get('knot', '?')} serving `{ZONE}.` (TTL {ZONE_TTL_S} s) on "
             "core 1; every server forwards to it and caches")
    L.append(f"- tools: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}")
    L.append("")
    L.append("CPU µs/query = the server's process-tree CPU (utime + stime, /proc/PID/stat) over the measured "
             "window ÷ answered queries. The limit column says which side ran out of CPU: `server` (its core "
             f"≥ {SERVER_BUSY_LIMIT:.0%} busy) or `dnsperf` (one dnsperf thread ≥ {LOAD_BUSY_LIMIT:.0%}); when "
             "dnsperf is the limit, queries/s mostly measures dnsperf and CPU µs/query is the fair comparison. "
             "p50/p99 are from the fixed-rate latency run. MiB / 100k = RSS (VmRSS, server tree) after caching the "
             "memory-test names in an instance sized for them, minus the RSS of a baseline instance with a "
             "minimal cache, scaled to 100,000 names.")
    L.append("")
    L.append("| server | queries/s | limit | CPU µs/query | p50 ms | p99 ms | MiB / 100k names | upstream queries during hits |")
    L.append("|---|---:|---|---:|---:|---:|---:|---:|")
    for r in results:
        if r["status"] == "missing":
            L.append(f"| {r['label']} | missing | | | | | | |")
            continue
        h, la, m = (r.get(k) if isinstance(r.get(k), dict) else None for k in ("hits", "latency", "memory"))
        name = r["label"] + ("" if r["status"] == "ok" else f" ({r['status']})")
        if r["row"] in OURS:
            name = f"**{name}**"
        lim = h["limit_text"] if h else "–"
        L.append("| " + " | ".join([
            name,
            fmt(h["qps"]) if h else "failed",
            lim,
            fmt(h["cpu_us_per_query"], 2) if h else "–",
            fmt(la["p50_ms"], 3) if la else "–",
            fmt(la["p99_ms"], 3) if la else "–",
            fmt(m["mib_per_100k"], 1) if m else "–",
            fmt(h.get("upstream_queries")) if h else "–",
        ]) + " |")
    L.append("")
    L.append("## Targets (against unbound, same run)")
    L.append("")
    if not derived["targets"]:
        L.append("- (node-local-dns was not run)")
    for t in derived["targets"]:
        state = {True: "**met**", False: "**not met**", None: "not determined"}[t["met"]]
        L.append(f"- {LABELS[t['row']]}: {t['what']} {t['target']}: {t['text']} — {state}")
    L.append("")
    L.append("## Details")
    L.append("")
    L.append("| server | hits: sent / answered / lost | hits: avg latency ms | latency run: answered, p90 / p99.9 / max ms |"
             " memory: RSS baseline / sized start → filled MiB (processes); MiB/100k from sized start | dnsperf CPU share · other work during hits |")
    L.append("|---|---|---|---|---|---|")
    for r in results:
        if r["status"] == "missing":
            continue
        h, la, m = (r.get(k) if isinstance(r.get(k), dict) else None for k in ("hits", "latency", "memory"))
        L.append("| " + " | ".join([
            r["label"],
            f"{h['sent']:,} / {h['completed']:,} / {h['lost']:,}" if h else "–",
            fmt(h.get("avg_ms"), 3) if h else "–",
            (f"{la['samples']:,}, {fmt(la['p90_ms'], 3)} / {fmt(la['p999_ms'], 3)} / {fmt(la['max_ms'], 3)}"
             if la else "–"),
            (f"{m['rss_baseline_kib'] / 1024:.1f} / {m['rss_start_kib'] / 1024:.1f} → "
             f"{m['rss_after_kib'] / 1024:.1f} ({m['processes']}); {m['mib_per_100k_from_start']:.1f}" if m else "–"),
            (f"{h['load_busy'] * 100:.0f}% · {h['foreign_frac'] * 100:.0f}%" if h else "–"),
        ]) + " |")
    L.append("")
    common.rounds_table(L, results, [("queries/s", "hits", ",.0f"), ("CPU µs/query", "cpu_us_per_query", ".2f"),
                                     ("p99 ms", "latency", ".3f")], first="server")
    notes = []
    for r in results:
        for e in r.get("errors", []):
            first = e.strip().splitlines()
            notes.append(f"- {r['label']} ({r['status']}): " + (first[0] if first else e))
        for k, v in r.get("background", {}).items():
            mm = r.get(k)
            ff = mm.get("foreign_frac") if isinstance(mm, dict) else None
            if v > common.BG_BUSY_WARN or (ff is not None and ff > common.FOREIGN_WARN):
                notes.append(f"- {r['label']} {k}: other work on the machine ({v * 100:.0f}% of all cores busy "
                             "just before" + (f"; {ff * 100:.0f}% of the busy time during the run was not ours"
                                              if ff is not None else "") + "): its figures are suspect")
        h = r.get("hits")
        if isinstance(h, dict) and h.get("upstream_queries"):
            notes.append(f"- {r['label']}: {h['upstream_queries']:,} queries reached knot during the cache-hit "
                         "run: not every query was a hit")
    if notes:
        L.append("## Notes")
        L.append("")
        L.extend(notes)
        L.append("")
    L.append("Plots: `dns-qps.svg`, `dns-cpu.svg`; raw numbers: `dns-latest.json`. Method: bench/README.md (DNS).")
    L.append("")
    return "\n".join(L)


def _svg(title: str, sub: str, panels: list[tuple[str, str, list, float | None, str, int]], W: int = 1080,
         H: int = 380) -> str:
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" {common.FONT}>',
         f'<rect width="{W}" height="{H}" fill="white"/>',
         common.svg_text(W / 2, 28, title, 17, "middle", "bold"),
         common.svg_text(W / 2, 50, sub, 12, "middle", fill="#555")]
    pw = (W - 40) / len(panels)
    for i, (ptitle, unit, items, target, tl, digits) in enumerate(panels):
        common.hbar_panel(o, 20 + i * pw, 88, pw - 10, H - 110, ptitle, unit, items, target, tl, digits)
    o.append("</svg>")
    return "\n".join(o)


def _items(results: list[dict[str, Any]], k: str, f: str) -> list[tuple[str, float | None, str, bool]]:
    out = []
    for r in results:
        v = figure(r, k, f)
        out.append((r["label"], v, r["status"] if r["status"] != "ok" else "no data", r["row"] in OURS))
    return out


def svg_qps(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    by = {r["row"]: r for r in results}
    ub_q, ub_p = figure(by.get(BASELINE), "hits", "qps"), figure(by.get(BASELINE), "latency", "p99_ms")
    return _svg("Cache hits: queries/s (higher is better) and p99 latency (lower is better)",
                f"server pinned to 1 core, one dnsperf thread on the other; {meta['mode']} run {meta['date']} · "
                f"commit {meta['commit']}",
                [("queries/s (10,000 names, all hits)", "queries / s", _items(results, "hits", "qps"),
                  ub_q, "target ≥ unbound" if ub_q else "", 0),
                 (f"p99 latency at {meta['lat_rate']:,} queries/s", "ms", _items(results, "latency", "p99_ms"),
                  ub_p, "target < unbound" if ub_p else "", 3)])


def svg_cpu(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    by = {r["row"]: r for r in results}
    ub = figure(by.get(BASELINE), "hits", "cpu_us_per_query")
    return _svg("Server CPU per cache-hit query and memory per 100,000 cached names — lower is better",
                f"/proc/PID/stat utime+stime of the server's process tree; RSS (VmRSS) filled − baseline instance; "
                f"{meta['mode']} run {meta['date']}",
                [("CPU per answered query", "µs / query", _items(results, "hits", "cpu_us_per_query"),
                  T_CPU_VS_UNBOUND * ub if ub else None,
                  f"target ≤ {T_CPU_VS_UNBOUND}× unbound = {T_CPU_VS_UNBOUND * ub:.2f}" if ub else "", 2),
                 ("RSS per 100,000 cached names", "MiB", _items(results, "memory", "mib_per_100k"), None, "", 1)])


def write_outputs(out: Path, meta: dict[str, Any], results: list[dict[str, Any]]) -> None:
    derived = derive(results)
    doc = {"meta": meta, "rows": results, "derived": derived,
           "targets_spec": {"cpu_per_query_vs_unbound": T_CPU_VS_UNBOUND, "qps_vs_unbound": T_QPS_VS_UNBOUND,
                            "p99": "< unbound"}}
    (out / "dns-latest.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    (out / "dns-latest.md").write_text(render_md(meta, results, derived))
    (out / "dns-qps.svg").write_text(svg_qps(results, meta) + "\n")
    (out / "dns-cpu.svg").write_text(svg_cpu(results, meta) + "\n")


def versions() -> dict[str, str]:
    def first_line(argv: list[str], pat: str) -> str:
        if not shutil.which(argv[0]):
            return "missing"
        out = common.sh_any(argv)
        m = re.search(pat, out)
        return m.group(1) if m else "?"

    return {
        "knot": first_line(["knotd", "--version"], r"version ([\w.\-]+)"),
        "dnsperf": first_line(["dnsperf", "-h"], r"Version ([\w.\-]+)"),
        "unbound": first_line(["unbound", "-V"], r"Version ([\w.\-]+)"),
        "pdns-recursor": first_line(["pdns_recursor", "--version"], r"Recursor ([\w.\-]+)"),
        "knot-resolver": first_line(["kresd", "--version"], r"version ([\w.\-]+)"),
        "dnsmasq": first_line(["dnsmasq", "--version"], r"version ([\w.\-]+)"),
    }


# --------------------------------------------------------------------------------------
# main


def main() -> int:
    ap = argparse.ArgumentParser(prog=f"python3 -m {__spec__.name}", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true",
                    help=f"short runs, {', '.join(SMOKE_ROWS)} only, output to a temp dir; sanity checks")
    ap.add_argument("--bin", default=common.release_bin("node-local-dns"), help="node-local-dns binary")
    ap.add_argument("--out", default=None, help="output dir (default bench/results; a temp dir with --smoke)")
    ap.add_argument("--no-install", action="store_true", help="do not run install-deps.sh (full mode)")
    ap.add_argument("--install", action="store_true", help="run install-deps.sh in smoke mode too")
    ap.add_argument("--rows", default=None, help=f"comma-separated subset of {','.join(ROWS)}")
    ap.add_argument("--duration", type=int, default=None, help="seconds of the cache-hit run (10; smoke 2)")
    ap.add_argument("--lat-duration", type=int, default=None, help="seconds of the latency run (5; smoke 1)")
    ap.add_argument("--lat-rate", type=int, default=None, help="offered queries/s of the latency run (50000; smoke 20000)")
    ap.add_argument("--mem-names", type=int, default=None, help=f"names of the memory test ({MEM_NAMES}; smoke 5000)")
    ap.add_argument("--clients", type=int, default=16, help="dnsperf -c (sockets)")
    ap.add_argument("--outstanding", type=int, default=200, help="dnsperf -q (queries in flight)")
    ap.add_argument("--idle-wait", type=float, default=None,
                    help="max seconds to wait for a quiet machine before each run (20; smoke 0)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of the hit and latency runs (memory: round 1)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, server logs)")
    ap.add_argument("--from-json", metavar="JSON", help="measure nothing: re-render from a dns-latest.json")
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
    lat_duration = args.lat_duration or (1 if smoke else 5)
    lat_rate = args.lat_rate or (20_000 if smoke else 50_000)
    mem_names = args.mem_names if args.mem_names is not None else (5_000 if smoke else MEM_NAMES)
    if args.idle_wait is None:
        args.idle_wait = 0.0 if smoke else 20.0
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    rows = [r.strip() for r in (args.rows or ",".join(SMOKE_ROWS if smoke else ROWS)).split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        ap.error(f"unknown rows: {bad}")
    rows = [r for r in ROWS if r in rows]

    out = common.output_dir(args, smoke, "dns-bench-smoke-")
    status = common.install_and_check(args, smoke, ("knotd", "knotc", "dnsperf", "taskset", "prlimit"))
    if status:
        return status
    common.raise_nofile()
    pin = len(os.sched_getaffinity(0)) >= 2 and {SERVER_CORE, LOAD_CORE} <= os.sched_getaffinity(0)
    if pin:
        os.sched_setaffinity(0, {LOAD_CORE})  # the harness, dnsperf (children inherit) and knot
    else:
        log("fewer than 2 usable cores: no pinning")

    binary = Path(args.bin)
    if not binary.is_absolute():
        binary = (Path.cwd() / binary).resolve()

    t_start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="dns-bench-"))
    runner = Runner(tmp, pin)
    results: list[dict[str, Any]] = []

    def on_term(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    try:
        log(f"temp dir {tmp}; output {out}")
        write_zone(tmp)
        hit_file = tmp / "hits.txt"
        hit_file.write_text("".join(f"h{i}.{ZONE} A\n" for i in range(HIT_NAMES)))
        mem_file = tmp / "mem.txt"
        mem_file.write_text("".join(f"m{i}.{ZONE} A\n" for i in range(mem_names)))
        kport = free_port()
        kconf = knot_conf(tmp, kport)
        ksrv = runner.start("knot", ["knotd", "-c", str(kconf)], kport, LOAD_CORE)
        up = Upstream(ksrv, kconf)
        probe(kport, f"h0.{ZONE}")
        log(f"knot on 127.0.0.1:{kport} (upstream query counter: {up.queries()})")
        ctx = Ctx(args, tmp, runner, Load(up, args.clients, args.outstanding, 1 if smoke else 2), up, binary, duration,
                  lat_duration, lat_rate, mem_names, hit_file, mem_file)
        rounds: list[list[dict[str, Any]]] = []
        for rnd in range(args.repeat):
            this = []
            for row in rows:
                log(f"== {row}" + (f" (round {rnd + 1} of {args.repeat})" if args.repeat > 1 else ""))
                r = measure_row(ctx, row, with_memory=(rnd == 0))
                this.append(r)
                if r["status"] == "missing":
                    log(f"{'MISSING' if row in OURS else 'SKIP'} {row}: {'; '.join(r['errors'])}")
                elif r["errors"]:
                    log(f"{row}: {r['status']}: " + " | ".join(e.splitlines()[0] for e in r["errors"]))
                h = r.get("hits")
                if isinstance(h, dict):
                    la = r.get("latency") or {}
                    log(f"{row}: {h['qps']:,.0f} q/s, {h['cpu_us_per_query']:.2f} µs CPU/query, limit "
                        f"{h['limit_text']}; p50/p99 {la.get('p50_ms', float('nan')):.3f}/"
                        f"{la.get('p99_ms', float('nan')):.3f} ms")
            rounds.append(this)
        results = merge_rounds(rounds)
    except KeyboardInterrupt:
        log("interrupted: stopping servers")
        runner.stop_all()
        return 130
    except BenchError as e:
        log(f"FAIL: {e}")
        runner.stop_all()
        return 1
    finally:
        runner.stop_all()
        if args.keep_tmp:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    pinning = (f"server on core {SERVER_CORE} (taskset); dnsperf, knot and the harness on core {LOAD_CORE}"
               if pin else "none (fewer than 2 cores)")
    meta = common.collect_meta(pinning, versions())
    meta.update({
        "command": " ".join(["python3", "-m", __spec__.name] + sys.argv[1:]),
        "mode": "smoke" if smoke else "full", "duration_s": duration, "lat_duration_s": lat_duration,
        "lat_rate": lat_rate, "mem_names": mem_names, "hit_names": HIT_NAMES, "clients": args.clients,
        "outstanding": args.outstanding, "repeat": args.repeat, "binary": str(binary),
        "elapsed_s": time.monotonic() - t_start,
    })
    write_outputs(out, meta, results)
    log(f"wrote {out}/dns-latest.md, dns-latest.json, dns-qps.svg, dns-cpu.svg ({meta['elapsed_s']:.0f} s)")
    print((out / "dns-latest.md").read_text())

    failed = False
    for r in results:
        if r["status"] == "missing":
            if r["row"] in OURS and smoke:
                log(f"FAIL {r['row']}: {r['errors'][0]}")
                failed = True
            continue
        if r["status"] != "ok":
            log(f"FAIL {r['row']}: {r['status']} ({', '.join(r.get('failed_measures', []))})")
            failed = True
            continue
        if smoke:  # sanity of the numbers themselves
            h, la = r["hits"], r["latency"]
            for ok, what in ((h["qps"] > 0, "queries/s is 0"),
                             (h["rcodes"].get("NOERROR", 0) >= NOERROR_MIN * h["completed"], "answers not NOERROR"),
                             (h["cpu_us_per_query"] > 0, "no server CPU measured"),
                             (0 < la["p50_ms"] <= la["p99_ms"], "latency percentiles out of order"),
                             (r.get("memory", {}).get("rss_after_kib", 0) > 0, "no RSS measured")):
                if not ok:
                    log(f"FAIL {r['row']}: {what}")
                    failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
