"""DNS kernel fast-path benchmark: node-local-dns with and without its XDP/tc fast path, and unbound.

    python3 -m bench.harness.dns_fastpath [--smoke] [--bin PATH] [--ns-bin PATH] [--out bench/results]

(from the repository root). Two parts, one run:

1. Nanoseconds per query of the kernel programs under BPF_PROG_TEST_RUN (the Rust binary
   `fastpath-ns`, built from bench/src/bin/fastpath-ns.rs): hit, miss and the not-local early
   exit, XDP and tc.
2. End to end from a pod: a "node" and a "pod" network namespace (made here, deleted at the
   end) joined by a veth; dnsperf runs in the pod namespace and asks 169.254.20.10:53 over the
   veth, as a pod asks node-local-dns. In the node namespace: knot (the authoritative upstream,
   as in dns.py) and one server at a time on the same address: node-local-dns userspace only,
   node-local-dns with the XDP fast path, with the tc fast path, and unbound.  Per row:
   cache-hit queries/s over 10,000 warmed names, p50/p99 at a fixed rate, the whole machine's
   CPU per answered query (/proc/stat, so kernel softirq and NAPI work count), the node side's
   share of it, and which side was the limit.

The harness process itself moves into the node namespace (setns), so knot, the servers and
their probes see the node's 127.0.0.1; dnsperf is started through `ip netns exec POD`.
Needs root.  See bench/README.md ("DNS kernel fast path") for the method.

Python 3.11 standard library only, plus Debian tools (iproute2, knot, dnsperf, unbound,
taskset, prlimit).  Uses the package's /proc accounting and process runner (`common`) and
the dns harness's knot, unbound and dnsperf helpers.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

from . import common, dns
from .common import REPO, BenchError, Runner, Server, figure, fmt, free_port, log, wait_quiet

ZONE = dns.ZONE
HIT_NAMES = dns.HIT_NAMES
SMOKE_HIT_NAMES = 1_000
OBJECT = REPO / "ebpf/obj/dns.bpf.o"

# The topology: as a node's pod veth. Namespace names carry our pid (several runs never clash).
HOST_IF, POD_IF = "fpbh0", "fpbp0"
NODE_ADDR, POD_ADDR, PREFIX = "10.201.0.1", "10.201.0.2", 24
LOCAL_IP, DNS_PORT = "169.254.20.10", 53
CLONE_NEWNET = 0x40000000

SERVER_CORE, LOAD_CORE = dns.SERVER_CORE, dns.LOAD_CORE
BUSY_LIMIT = 0.90  # a core (or dnsperf's thread) this busy was the limit
KERNEL_CAPACITY = 20_000  # -fast-path-capacity: room for the hit names and the probes
ATTACH_TIMEOUT_S = 10.0
METRICS_PERIOD_S = 1.2  # node-local-dns publishes the kernel's counters once a second

ROWS = ["userspace", "xdp", "tc", "unbound"]
LABELS = {
    "userspace": "node-local-dns, userspace only",
    "xdp": "node-local-dns + XDP fast path",
    "tc": "node-local-dns + tc fast path",
    "unbound": "unbound",
}
FAST = {"xdp": "xdp", "tc": "tc"}  # row -> -fast-path-mode
PLACEMENTS = ["default", "steered"]
PLACEMENT_TEXT = {
    "default": "kernel default placement: the veth's receive, and the fast path, in softirq on the sending "
               "(dnsperf's) core, as on a pod's core on a node",
    "steered": "steered: the node side's receive on the server's core (RPS; in XDP mode the veth's NAPI "
               "threaded and pinned there), as dns.py keeps the server apart from dnsperf",
}
SMOKE_STEERED = ["xdp"]  # smoke: steered only where it has its own code (RPS and the threaded NAPI)
BASELINE = "unbound"

# Targets (benchmarks, not tests), from issue 4.
T_HIT_NS = 150.0  # kernel hit path under BPF_PROG_TEST_RUN, ns/query at most
T_CPU_FACTOR = 20.0  # node CPU per answered query at least this many times below unbound's


# --------------------------------------------------------------------------------------
# namespaces and the veth


_libc = ctypes.CDLL(None, use_errno=True)


def setns(fd: int, what: str) -> None:
    """Moves this (single-threaded) process into the network namespace `fd` refers to;
    children started afterwards inherit it."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        raise BenchError(f"entering the network namespace {what}: {os.strerror(ctypes.get_errno())}")


def sh(argv: list[str], what: str, timeout: float = 20) -> str:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise BenchError(f"{what}: `{' '.join(argv)}` exited {p.returncode}: {(p.stderr or p.stdout).strip()[-400:]}")
    return p.stdout


class Topology:
    """The node and pod namespaces and the veth between them (HOST_IF in the node, POD_IF in
    the pod). The pod routes LOCAL_IP via the node's end, as a pod reaches node-local-dns.

    - POD_IF carries a pass-everything XDP program (dns_xdp with no local address, loaded by
      iproute2): a veth peer needs NAPI to receive XDP_TX frames, and an XDP program is what
      enables it. It is there in every row, so every row has the same receive path.
    - Placement of the node side's receive work (`set_placement`). "default": the kernel's
      own; on a veth the receive, and so the XDP or tc fast path, runs in softirq on the
      *sending* core (dnsperf's), as it runs on a pod's core on a real node. "steered": as in
      dns.py, the node side's work on the server's core: RPS sends what HOST_IF receives to
      SERVER_CORE, and in XDP mode (where the receive is HOST_IF's NAPI, which runs XDP before
      RPS) the harness makes that NAPI threaded and pins its kernel thread there (`steer_napi`,
      after the agent attached).
    """

    def __init__(self) -> None:
        self.steer = False
        self.node, self.pod = f"fpb-node-{os.getpid()}", f"fpb-pod-{os.getpid()}"
        self.home = os.open("/proc/self/ns/net", os.O_RDONLY)
        self.created: list[str] = []
        self.pod_xdp: int | None = None  # the pod-side XDP program's id

    def create(self) -> None:
        for ns in (self.node, self.pod):
            sh(["ip", "netns", "add", ns], "creating a namespace")
            self.created.append(ns)
            sh(["ip", "-n", ns, "link", "set", "lo", "up"], "loopback up")
        n, p = ["ip", "-n", self.node], ["ip", "-n", self.pod]
        sh(n + ["link", "add", HOST_IF, "type", "veth", "peer", "name", POD_IF, "netns", self.pod], "the veth")
        sh(n + ["addr", "add", f"{NODE_ADDR}/{PREFIX}", "dev", HOST_IF], "node address")
        sh(n + ["addr", "add", f"{LOCAL_IP}/32", "dev", "lo"], "the local DNS address")
        sh(n + ["link", "set", HOST_IF, "up"], "node link up")
        sh(p + ["addr", "add", f"{POD_ADDR}/{PREFIX}", "dev", POD_IF], "pod address")
        sh(p + ["link", "set", POD_IF, "up"], "pod link up")
        sh(p + ["route", "add", f"{LOCAL_IP}/32", "via", NODE_ADDR], "pod route")
        try:
            sh(p + ["link", "set", "dev", POD_IF, "xdp", "obj", str(OBJECT), "sec", "xdp"], "pod-side XDP program")
            m = re.search(r"prog/xdp id (\d+)", sh(p + ["-d", "link", "show", POD_IF], "pod link"))
            self.pod_xdp = int(m.group(1)) if m else -1
        except BenchError as e:
            log(f"no XDP program on the pod's veth end (the XDP row will get no answers): {e}")
        fd = os.open(f"/run/netns/{self.node}", os.O_RDONLY)
        try:
            setns(fd, self.node)
        finally:
            os.close(fd)

    def node_write(self, path: str, value: str) -> None:
        """Writes a sysfs file of the node namespace (its own /sys: `ip netns exec` mounts it)."""
        sh(["ip", "netns", "exec", self.node, "sh", "-c", f"echo {value} > {path}"], f"writing {path}")

    def set_placement(self, placement: str) -> None:
        """"default" or "steered" (see the class); call between rows."""
        self.steer = placement == "steered"
        mask = f"{1 << SERVER_CORE:x}" if self.steer else "0"
        self.node_write(f"/sys/class/net/{HOST_IF}/queues/rx-0/rps_cpus", mask)

    def in_pod(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.pod] + argv

    def steer_napi(self, pin: bool) -> list[int]:
        """If HOST_IF has NAPI (an XDP program is attached), makes it threaded and pins its
        kernel thread to SERVER_CORE; returns the thread's pids (for CPU accounting). In the
        default placement, makes sure it is not threaded (the flag outlives a NAPI instance)."""
        try:
            self.node_write(f"/sys/class/net/{HOST_IF}/threaded", "1" if self.steer else "0")
        except BenchError:
            return []  # no NAPI instance: the receive runs from the RPS backlog
        prefix = f"napi/{HOST_IF}-"[:15]
        pids = []
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    comm = Path(f"/proc/{name}/comm").read_text().strip()
                except OSError:
                    continue
                if comm.startswith(prefix) and self.steer:
                    pids.append(int(name))
        for pid in pids:
            if pin:
                os.sched_setaffinity(pid, {SERVER_CORE})
        return pids

    def destroy(self) -> None:
        try:
            setns(self.home, "of the harness")
        except BenchError as e:
            log(f"returning to the original namespace: {e}")
        for ns in reversed(self.created):
            p = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True, timeout=20)
            if p.returncode != 0:
                log(f"deleting namespace {ns}: {p.stderr.strip()}")
        self.created.clear()


def remove_stale_namespaces() -> None:
    """Namespaces of earlier runs that died without cleaning up (their pid is gone)."""
    try:
        names = os.listdir("/run/netns")
    except OSError:
        return
    for name in names:
        m = re.fullmatch(r"fpb-(?:node|pod)-(\d+)", name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20)
            log(f"removed stale namespace {name}")


# --------------------------------------------------------------------------------------
# servers


def ours_conf(tmp: Path, binary: Path, up: int, mode: str | None) -> tuple[list[str], dict[str, str], int]:
    """node-local-dns on LOCAL_IP:53 (and 127.0.0.1:53, for the harness's readiness check),
    forwarding bench.test to knot; with `mode`, the fast path on HOST_IF. Returns the argv,
    the environment and the metrics port."""
    health, metrics = free_port(), free_port()
    conf = tmp / "Corefile"
    conf.write_text(f"""{ZONE}:{DNS_PORT} {{
    errors
    cache {dns.OUR_CACHE_CAP_S} {{
        success {dns.CACHE_ENTRIES}
    }}
    bind {LOCAL_IP} 127.0.0.1
    forward . 127.0.0.1:{up}
    prometheus 127.0.0.1:{metrics}
    health 127.0.0.1:{health}
}}
""")
    argv = [str(binary), "-localip", LOCAL_IP, "-conf", str(conf), "-setupinterface=false",
            "-setupiptables=false", "-health-port", str(health)]
    if mode:
        argv += ["-fast-path-interfaces", HOST_IF, "-fast-path-mode", mode,
                 "-fast-path-capacity", str(KERNEL_CAPACITY)]
    p = subprocess.run(argv + ["-check"], capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        raise BenchError(f"node-local-dns -check rejected the Corefile: {(p.stderr or p.stdout).strip()[-600:]}")
    return argv, {"RUST_LOG": os.environ.get("BENCH_RUST_LOG", "warn"), "TOKIO_WORKER_THREADS": "1"}, metrics


def metrics_text(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            return resp.read().decode()
    except OSError as e:
        raise BenchError(f"reading node-local-dns's metrics on 127.0.0.1:{port}: {e}")


def attached_interfaces(metrics_port: int) -> int:
    m = re.search(r"^node_local_dns_fast_path_attached_interfaces (\S+)$", metrics_text(metrics_port), re.M)
    return int(float(m.group(1))) if m else 0


def fast_path_counters(metrics_port: int) -> dict[str, int]:
    """node_local_dns_fast_path_packets_total by result, from the agent's /metrics."""
    text = metrics_text(metrics_port)
    out: dict[str, int] = {}
    for m in re.finditer(r'^node_local_dns_fast_path_packets_total\{result="(\w+)"\} (\S+)$', text, re.M):
        out[m.group(1)] = int(float(m.group(2)))
    return out


# --------------------------------------------------------------------------------------
# CPU accounting beyond common.Meter: per core, and NAPI kernel threads


def core_times() -> dict[int, dict[str, float]]:
    """core -> seconds by kind, from the per-core lines of /proc/stat: `task` (user + nice +
    system: processes and kernel threads), `soft` (irq + softirq), `steal`, `busy` (all three),
    `total` (busy + idle + iowait)."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            m = re.match(r"cpu(\d+) (.*)", line)
            if m:
                user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in m.group(2).split()[:8])
                t = {"task": user + nice + system, "soft": irq + softirq, "steal": steal}
                t["busy"] = t["task"] + t["soft"] + steal
                t["total"] = t["busy"] + idle + iowait
                out[int(m.group(1))] = {k: v / common.CLK_TCK for k, v in t.items()}
    return out


def thread_cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            rest = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(rest[11]) + int(rest[12])) / common.CLK_TCK
    return total


@contextlib.contextmanager
def measured(napi: list[int]) -> Iterator[dict[str, Any]]:
    """Per-core CPU by kind and NAPI thread CPU over the block (filled in on exit).

    The node/client split: this kernel accounts CPU time by tick sampling (no
    CONFIG_IRQ_TIME_ACCOUNTING on the dev VM), so softirq work done while a task is current is
    also in that task's utime/stime: process times cannot separate dnsperf from the fast path
    running in softirq on its core. The per-core categories of /proc/stat can: every tick goes
    to exactly one. With the server alone on SERVER_CORE, the node's CPU is all of that core
    plus the irq/softirq time of the others; the client's (dnsperf) is the task time of the others.
    """
    c0, n0, t0 = core_times(), thread_cpu(napi), time.monotonic()
    out: dict[str, Any] = {}
    yield out
    c1, n1 = core_times(), thread_cpu(napi)
    out["wall_s"] = time.monotonic() - t0
    out.update(per_core({c: {k: c1[c][k] - c0[c][k] for k in c1[c]} for c in c1 if c in c0}))
    out["napi_cpu_s"] = n1 - n0


def per_core(d: dict[int, dict[str, float]]) -> dict[str, Any]:
    """The split of a run's CPU from its per-core deltas (core_times kinds): each core's busy and
    softirq share; the node's seconds (all of SERVER_CORE, irq + softirq of the others) and the
    client's (task time of the other cores)."""
    return {
        "cores": {str(c): v for c, v in d.items()},
        "core_busy": {str(c): v["busy"] / max(1e-9, v["total"]) for c, v in d.items()},
        "core_softirq": {str(c): v["soft"] / max(1e-9, v["total"]) for c, v in d.items()},
        "node_cpu_s": sum(v["busy"] if c == SERVER_CORE else v["soft"] for c, v in d.items()),
        "client_cpu_s": sum(v["task"] for c, v in d.items() if c != SERVER_CORE),
    }


# --------------------------------------------------------------------------------------
# the kernel's own run-time statistics of attached programs (BPF_ENABLE_STATS)

SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(os.uname().machine)
BPF_ENABLE_STATS, BPF_STATS_RUN_TIME = 32, 0


@contextlib.contextmanager
def bpf_run_time_stats() -> Iterator[bool]:
    """While the block runs, the kernel times every BPF program run (run_time_ns, run_cnt in
    `bpftool prog show`). Enabled through a file descriptor (BPF_ENABLE_STATS), so it ends
    when the descriptor is closed, even if this process dies; yields whether it worked."""
    fd = -1
    if SYS_BPF is not None:
        attr = ctypes.create_string_buffer(BPF_STATS_RUN_TIME.to_bytes(4, sys.byteorder), 8)
        _libc.syscall.restype = ctypes.c_long
        fd = _libc.syscall(ctypes.c_long(SYS_BPF), ctypes.c_long(BPF_ENABLE_STATS), attr, ctypes.c_uint(8))
    try:
        yield fd >= 0
    finally:
        if fd >= 0:
            os.close(fd)


def prog_stats(name: str) -> dict[int, tuple[int, int]]:
    """id -> (run_cnt, run_time_ns) of every loaded program called `name` (bpftool)."""
    if not shutil.which("bpftool"):
        log("bpftool not found: the attached programs' run time is not measured (bench/harness/install-deps.sh installs it)")
        return {}
    p = subprocess.run(["bpftool", "-j", "prog", "show", "name", name], capture_output=True, text=True,
                       timeout=20)
    if p.returncode != 0 or not p.stdout.strip():
        return {}
    try:
        progs = json.loads(p.stdout)
    except json.JSONDecodeError:
        return {}
    if isinstance(progs, dict):
        progs = [progs]
    return {q["id"]: (q.get("run_cnt", 0), q.get("run_time_ns", 0)) for q in progs}


def in_situ(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]],
            exclude: int | None) -> dict[str, Any] | None:
    """The program that ran most between two prog_stats snapshots (ours: the pod's pass
    program is excluded by id): its runs and nanoseconds per run."""
    best = None
    for pid in after:
        runs = program_runs(before, after, pid)
        if pid != exclude and runs and (best is None or runs["runs"] > best["runs"]):
            best = runs
    return best


def program_runs(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]],
                 pid: int) -> dict[str, Any] | None:
    """Program `pid`'s runs and nanoseconds per run between two prog_stats snapshots, None if
    it did not run."""
    c0, n0 = before.get(pid, (0, 0))
    c1, n1 = after.get(pid, (0, 0))
    if c1 - c0 <= 0:
        return None
    return {"id": pid, "runs": c1 - c0, "ns_per_run": (n1 - n0) / (c1 - c0)}


# --------------------------------------------------------------------------------------
# rows


class Ctx:
    def __init__(self, args: argparse.Namespace, tmp: Path, runner: Runner, load: dns.Load, up: dns.Upstream,
                 topo: Topology, binary: Path, duration: int, lat_duration: int, lat_rate: int,
                 hit_file: Path, names: int, pin: bool):
        self.args, self.tmp, self.runner, self.load, self.up, self.topo = args, tmp, runner, load, up, topo
        self.binary, self.duration, self.lat_duration, self.lat_rate = binary, duration, lat_duration, lat_rate
        self.hit_file, self.names, self.pin = hit_file, names, pin


def start_row(ctx: Ctx, row: str) -> tuple[Server, int | None]:
    tmp = ctx.tmp / f"{row}-{ctx.topo.steer and 'steered' or 'default'}"
    tmp.mkdir(exist_ok=True)  # again in every round
    env, metrics = None, None
    if row == "unbound":
        argv = dns.unbound_conf(tmp, DNS_PORT, ctx.up.port, dns.CACHE_ENTRIES, listen=(LOCAL_IP, "127.0.0.1"),
                                allow=(f"{NODE_ADDR.rsplit('.', 1)[0]}.0/{PREFIX}",))
    else:
        argv, env, metrics = ours_conf(tmp, ctx.binary, ctx.up.port, FAST.get(row))
    srv = ctx.runner.start(f"{row}-{ctx.topo.steer and 'steered' or 'default'}", argv, DNS_PORT, SERVER_CORE, env=env, timeout=20)
    try:
        dns.probe(DNS_PORT, f"probe.{ZONE}")
    except BenchError as e:
        tail = srv.log_tail()
        ctx.runner.stop(srv)
        raise BenchError(f"{e}" + (f"\n--- log ---\n{tail}" if tail else ""))
    if row in FAST and metrics is not None:
        # The agent serves before it has loaded and attached the programs: wait (bounded).
        deadline = time.monotonic() + ATTACH_TIMEOUT_S
        while attached_interfaces(metrics) < 1:
            if time.monotonic() > deadline:
                tail = srv.log_tail()
                ctx.runner.stop(srv)
                raise BenchError(f"the fast path did not attach to {HOST_IF} in {ATTACH_TIMEOUT_S:.0f} s"
                                 + (f"\n--- log ---\n{tail}" if tail else ""))
            time.sleep(0.1)
    return srv, metrics


def limit_of(r: dict[str, Any]) -> None:
    """Which core ran out: the server's (the server process and whatever kernel work is
    placed there) or dnsperf's. dnsperf's core also carries the softirq work placed there (the
    whole fast path in the default placement), so the text says how much of it that was."""
    server = r["core_busy"].get(str(SERVER_CORE), 0.0)
    load = r["core_busy"].get(str(LOAD_CORE), 0.0)
    soft = r["core_softirq"].get(str(LOAD_CORE), 0.0)
    if server >= BUSY_LIMIT and load >= BUSY_LIMIT:
        r["limit"] = "both"
    elif server >= BUSY_LIMIT:
        r["limit"] = "server"
    elif load >= BUSY_LIMIT:
        r["limit"] = "dnsperf"
    else:
        r["limit"] = "neither"
    r["limit_text"] = (f"{r['limit']} (server core {server * 100:.0f}% busy; dnsperf's core {load * 100:.0f}%, "
                       f"of it softirq {soft * 100:.0f}%)")


def per_query(r: dict[str, Any]) -> None:
    """Sets a cache-hit run's figures once `measured`'s are in: other work on the machine less the
    NAPI thread (Meter counts it as other work; it is the node's kernel work here), the server's
    and dnsperf's busy shares over the measured wall time, the machine's, node's and client's
    CPU per answered query (µs), and the limit (limit_of)."""
    n = r["completed"]
    r["foreign_s"] = max(0.0, r["foreign_s"] - r["napi_cpu_s"])
    r["foreign_frac"] = r["foreign_s"] / r["busy_s"] if r["busy_s"] > 0 else 0.0
    r["load_busy"] = r["load_cpu_s"] / r["wall_s"]  # Meter's wall (jiffies / cores) runs short on this VM
    r["server_busy"] = r["server_cpu_s"] / r["wall_s"]
    r["machine_us_per_query"] = r["busy_s"] * 1e6 / n
    r["node_us_per_query"] = r["node_cpu_s"] * 1e6 / n
    r["client_us_per_query"] = r["client_cpu_s"] * 1e6 / n
    limit_of(r)


def kernel_answers(before: dict[str, int] | None, after: dict[str, int], completed: int) -> dict[str, Any]:
    """The fast path's counters over a run (`kernel`: packets by result, none without a first
    reading) and the share of the answered queries it answered (`kernel_hit_share`)."""
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after} if before is not None else {}
    return {"kernel": delta, "kernel_hit_share": delta.get("hit", 0) / completed if completed else 0.0}


def throughput(ctx: Ctx, row: str, srv: Server, napi: list[int], metrics: int | None) -> dict[str, Any]:
    """The cache-hit run. In the fast-path rows the kernel's run-time statistics are on meanwhile:
    they give the attached program's own nanoseconds per packet under this load (and the pod-side
    pass program's); their two clock reads per program run add well under 1 % to the node's CPU."""
    before = fast_path_counters(metrics) if metrics else None
    name = f"dns_{FAST[row]}" if row in FAST else None
    stats = bpf_run_time_stats() if name else contextlib.nullcontext(False)
    with stats as on:
        p0, pod0 = (prog_stats(name), prog_stats("dns_xdp")) if on and name else ({}, {})
        with measured(napi) as m:
            r = ctx.load.throughput(DNS_PORT, ctx.hit_file, ctx.duration, srv)
        p1, pod1 = (prog_stats(name), prog_stats("dns_xdp")) if on and name else ({}, {})
    r.update(m)
    per_query(r)
    if on:
        r["in_situ"] = in_situ(p0, p1, ctx.topo.pod_xdp)
        pod = program_runs(pod0, pod1, ctx.topo.pod_xdp) if ctx.topo.pod_xdp is not None else None
        if pod:
            r["pod_pass"] = pod
    if metrics:
        time.sleep(METRICS_PERIOD_S)
        r.update(kernel_answers(before, fast_path_counters(metrics), r["completed"]))
    return r


def measure_row(ctx: Ctx, row: str, placement: str) -> dict[str, Any]:
    res: dict[str, Any] = {"row": row, "placement": placement, "label": LABELS[row], "status": "ok", "errors": [],
                           "background": {}}
    if row != "unbound" and not ctx.binary.exists():
        res["status"] = "missing"
        res["errors"].append(f"{ctx.binary} does not exist (cargo build --release -p node-local-dns)")
        return res
    if row == "unbound" and not shutil.which("unbound"):
        res["status"] = "missing"
        res["errors"].append("unbound is not installed (bench/harness/install-deps.sh installs it)")
        return res

    def step(key: str, fn: Callable[[], Any], quiet: bool = True) -> None:
        try:
            res["background"][key] = round(wait_quiet(ctx.args.idle_wait if quiet else 0.0), 3)
            res[key] = fn()
        except BenchError as e:
            res["errors"].append(f"{key}: {e}")
        except (subprocess.TimeoutExpired, OSError) as e:
            res["errors"].append(f"{key}: {e}")

    srv = None
    try:
        srv, metrics = start_row(ctx, row)
        napi = ctx.topo.steer_napi(ctx.pin)
        res["napi_threads"] = len(napi)
        log(f"{row}: warm the cache ({ctx.names:,} names, from the pod)")
        step("warm", lambda: ctx.load.fill(DNS_PORT, ctx.hit_file, ctx.names, srv), quiet=False)
        if "warm" in res:
            if metrics:
                time.sleep(METRICS_PERIOD_S)  # the mirror syncs every 100 ms; counters publish every 1 s
            log(f"{row}: cache hits {ctx.duration}s")
            step("hits", lambda: throughput(ctx, row, srv, napi, metrics))
            log(f"{row}: latency {ctx.lat_duration}s at {ctx.lat_rate:,} queries/s")
            step("latency", lambda: ctx.load.latency(DNS_PORT, ctx.hit_file, ctx.lat_duration, ctx.lat_rate, srv))
        if not srv.alive():
            res["errors"].append(f"{row} exited (status {srv.proc.returncode}) during the load:\n{srv.log_tail()}")
    except BenchError as e:
        res["errors"].append(str(e))
    finally:
        if srv is not None:
            ctx.runner.stop(srv)
    missing = [k for k in ("warm", "hits", "latency") if k not in res]
    if missing:
        res["status"] = "failed" if len(missing) == 3 else "partial"
        res["failed_measures"] = missing
    return res


# --------------------------------------------------------------------------------------
# the BPF_PROG_TEST_RUN part


def run_ns_bench(ns_bin: Path, smoke: bool) -> dict[str, Any]:
    if not ns_bin.exists():
        raise BenchError(f"{ns_bin} does not exist (cargo build --release -p bench --bin fastpath-ns)")
    argv = [str(ns_bin)] + (["--hits", "20000", "--repeat", "100000", "--pass-calls", "20000"] if smoke else [])
    t0 = time.monotonic()
    p = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise BenchError(f"fastpath-ns exited {p.returncode}: {(p.stderr or p.stdout).strip()[-800:]}")
    doc = json.loads(p.stdout)
    doc["elapsed_s"] = time.monotonic() - t0
    doc["command"] = " ".join(["fastpath-ns"] + argv[1:])
    return doc


def merge_ns(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """One fastpath-ns document from several rounds: per series, the round with the median mean
    (the lower middle one for an even count), its sorted means in `rounds_ns`."""
    if len(docs) == 1:
        return docs[0]
    merged = dict(docs[0])
    merged["series"] = []
    for i, first in enumerate(docs[0]["series"]):
        runs = sorted((d["series"][i] for d in docs), key=lambda s: s["mean_ns"])
        series = dict(runs[(len(runs) - 1) // 2])
        series["rounds_ns"] = [s["mean_ns"] for s in runs]
        merged["series"].append(series)
    merged["elapsed_s"] = sum(d["elapsed_s"] for d in docs)
    return merged


def ns_series(ns: dict[str, Any] | None, mode: str, path: str, variant: str) -> dict[str, Any] | None:
    for s in (ns or {}).get("series", []):
        if (s["mode"], s["path"], s["variant"]) == (mode, path, variant):
            return s
    return None


def ns_derived(ns: dict[str, Any] | None) -> dict[str, Any]:
    """Per program: the timer's per-call overhead (not-local, one run per call minus the
    repeated figure), and the hit with it taken out (an estimate of the warm per-packet cost)."""
    out: dict[str, Any] = {}
    for mode in ("xdp", "tc"):
        one = ns_series(ns, mode, "not local", "repeat = 1")
        rep = ns_series(ns, mode, "not local", "repeat = N")
        hit = ns_series(ns, mode, "hit", "no EDNS")
        if not (one and rep and hit):
            continue
        overhead = one["mean_ns"] - rep["mean_ns"]
        out[mode] = {"timer_overhead_ns": overhead, "hit_ns": hit["mean_ns"],
                     "hit_minus_overhead_ns": hit["mean_ns"] - overhead}
    return out


# --------------------------------------------------------------------------------------
# derived figures and targets


def index(results: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["row"], r.get("placement", "default")): r for r in results}


def derive(ns: dict[str, Any] | None, results: list[dict[str, Any]]) -> dict[str, Any]:
    """The targets. CPU per query is judged in the default placement (where the kernel puts the
    work on a real node; the steered figure beside it); the limit in the steered placement, the
    only one where the server side has a core of its own to run out of (the default beside it)."""
    by = index(results)
    targets = []

    def add(who: str, what: str, goal: str, ok: bool | None, text: str) -> None:
        targets.append({"who": who, "what": what, "target": goal, "met": ok, "text": text})

    nd = ns_derived(ns)
    for mode in ("xdp", "tc"):
        hits = [s for s in (ns or {}).get("series", []) if s["mode"] == mode and s["path"] == "hit"]
        goal = f"<= {T_HIT_NS:.0f} ns/query under BPF_PROG_TEST_RUN"
        if not hits:
            add(f"dns_{mode}", "kernel hit path", goal, None, "not measured")
            continue
        worst = max(s["mean_ns"] for s in hits)
        est = nd.get(mode, {}).get("hit_minus_overhead_ns")
        add(f"dns_{mode}", "kernel hit path", goal, worst <= T_HIT_NS,
            ", ".join(f"{s['variant']} {s['mean_ns']:.0f} ns (p50 {s['p50_ns']})" for s in hits)
            + (f"; ≈ {est:.0f} ns without the timer's per-call overhead" if est is not None else ""))

    def cpu_text(row: str, placement: str) -> tuple[float | None, str]:
        r, u = by.get((row, placement)), by.get((BASELINE, placement))
        v, ub = figure(r, "hits", "node_us_per_query"), figure(u, "hits", "node_us_per_query")
        if v is None or ub is None or v <= 0:
            return None, f"{placement}: not measured"
        vm, ubm = figure(r, "hits", "machine_us_per_query"), figure(u, "hits", "machine_us_per_query")
        return ub / v, (f"{placement}: node {v:.2f} µs vs unbound {ub:.2f} µs = {ub / v:.1f}x less "
                        f"(whole machine, dnsperf included: {vm:.2f} vs {ubm:.2f} µs = {ubm / vm:.1f}x)")

    for row in ("xdp", "tc"):
        goal = f">= {T_CPU_FACTOR:.0f}x less node CPU per answered query than unbound"
        factor, text = cpu_text(row, "default")
        _, other = cpu_text(row, "steered")
        ins = figure(by.get((row, "default")), "hits", "in_situ")
        ub_p = figure(by.get((BASELINE, "default")), "hits", "cpu_us_per_query")
        alone = (f"; the attached program alone {ins['ns_per_run']:.0f} ns vs unbound's process "
                 f"{ub_p * 1000:.0f} ns = {ub_p * 1000 / ins['ns_per_run']:.1f}x" if ins and ub_p else "")
        add(LABELS[row], "CPU per answered query", goal, None if factor is None else factor >= T_CPU_FACTOR,
            f"{text}; {other}{alone}")
    for row in ("xdp", "tc", "userspace"):
        goal = "limited by the load generator, not the server (steered placement)"
        r, d = by.get((row, "steered")), by.get((row, "default"))
        lim = figure(r, "hits", "limit")
        dtext = (f"; default placement: {figure(d, 'hits', 'qps'):,.0f} queries/s, "
                 f"{figure(d, 'hits', 'limit_text')}" if figure(d, "hits", "qps") else "")
        if lim is None:
            add(LABELS[row], "end-to-end limit", goal, None, "steered placement not measured" + dtext)
            continue
        add(LABELS[row], "end-to-end limit", goal, lim == "dnsperf",
            f"{figure(r, 'hits', 'qps'):,.0f} queries/s; {figure(r, 'hits', 'limit_text')}{dtext}")
    return {"targets": targets, "ns": nd}


# --------------------------------------------------------------------------------------
# output


def main_table(L: list[str], results: list[dict[str, Any]]) -> None:
    L.append("| server | queries/s | limit | machine µs/q | node µs/q | server process µs/q | client µs/q | "
             "kernel % | p50 ms | p99 ms |")
    L.append("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        if r["status"] == "missing":
            L.append(f"| {r['label']} | missing | | | | | | | | |")
            continue
        h, la = (r.get(k) if isinstance(r.get(k), dict) else None for k in ("hits", "latency"))
        name = r["label"] + ("" if r["status"] == "ok" else f" ({r['status']})")
        L.append("| " + " | ".join([
            name if r["row"] == BASELINE else f"**{name}**",
            fmt(h["qps"]) if h else "failed",
            h["limit_text"] if h else "–",
            fmt(h["machine_us_per_query"], 2) if h else "–",
            fmt(h["node_us_per_query"], 2) if h else "–",
            fmt(h["cpu_us_per_query"], 2) if h else "–",
            fmt(h["client_us_per_query"], 2) if h else "–",
            (f"{h['kernel_hit_share'] * 100:.1f}" if h and "kernel_hit_share" in h else "–"),
            fmt(la["p50_ms"], 3) if la else "–",
            fmt(la["p99_ms"], 3) if la else "–",
        ]) + " |")
    L.append("")


def render_md(meta: dict[str, Any], ns: dict[str, Any] | None, results: list[dict[str, Any]],
              derived: dict[str, Any]) -> str:
    by = index(results)
    L = ["# node-local-dns kernel fast path (XDP / tc) benchmark", ""]
    L.append(f"- date: {meta['date']}")
    L.append(f"- commit: `{meta['commit']}`")
    L.append(f"- command: `{meta['command']}`")
    L.append(f"- kernel: `{meta['kernel']}`; CPU: {meta['cpu_model']} ({meta['cores']} cores)")
    L.append(f"- load average (1/5/15 min) at start {meta['loadavg_start']}, at end {meta['loadavg_end']}; "
             f"machine busy before the first measurement: {meta['idle_busy'] * 100:.0f}%")
    L.append(f"- mode: {meta['mode']}; total run time {meta['elapsed_s']:.0f} s")
    if meta.get("repeat", 1) > 1:
        L.append(f"- rounds: {meta['repeat']}, one after the other (every figure is the median round's, whole: "
                 "a row's CPU, limit and kernel counters come from the same run as its queries/s; spread in "
                 "\"Rounds\")")
    L.append(f"- tools: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}")
    L.append("")
    L.append("## 1. Nanoseconds per query under BPF_PROG_TEST_RUN")
    L.append("")
    if ns:
        L.append(f"`{ns['command']}`: query `{ns['query']}`, cached as node-local-dns mirrors it. Hit: "
                 f"{ns['hits']:,} syscalls with repeat = 1 (the kernel does not restore the packet between "
                 "repeats), mean of the kernel's `duration`; miss and not-local: one syscall with repeat = "
                 f"{ns['repeat']:,} (the kernel's average) and {ns['pass_calls']:,} syscalls with repeat = 1. "
                 "\"syscall\" is the wall-clock per BPF_PROG_TEST_RUN call seen from userspace.")
        L.append("")
        rounds = meta.get("repeat", 1) > 1
        if rounds:
            L.append(f"Each series ran in {meta['repeat']} rounds; the row is the median round's, the means of "
                     "all rounds (sorted) beside it.")
            L.append("")
        L.append("| program | path | query / timing | runs | mean ns | p50 ns | p99 ns | syscall ns |"
                 + (" rounds: mean ns |" if rounds else ""))
        L.append("|---|---|---|---:|---:|---:|---:|---:|" + ("---|" if rounds else ""))
        for s in ns["series"]:
            runs = s["calls"] if s["repeat"] == 1 else s["repeat"]
            L.append(f"| dns_{s['mode']} | {s['path']} | {s['variant']} | {runs:,} | {s['mean_ns']:.0f} | "
                     f"{fmt(s['p50_ns'])} | {fmt(s['p99_ns'])} | "
                     f"{s['wall_ns_per_call'] if s['repeat'] == 1 else s['wall_ns_per_call'] / s['repeat']:,.0f} |"
                     + (f" {', '.join(f'{v:.0f}' for v in s.get('rounds_ns', []))} |" if rounds else ""))
        L.append("")
        for mode, d in derived["ns"].items():
            L.append(f"- dns_{mode}: the timer's per-call overhead (not local, repeat = 1 minus repeat = N) is "
                     f"{d['timer_overhead_ns']:.0f} ns; the hit without it ≈ {d['hit_minus_overhead_ns']:.0f} ns.")
    else:
        L.append("not measured")
    for row in FAST:
        for placement in PLACEMENTS:
            r = by.get((row, placement))
            ins, pod = figure(r, "hits", "in_situ"), figure(r, "hits", "pod_pass")
            if ins:
                L.append(f"- dns_{FAST[row]} attached, during the end-to-end cache-hit run below ({placement} "
                         f"placement; the kernel's run-time statistics, BPF_ENABLE_STATS): {ins['ns_per_run']:.0f} ns "
                         f"per packet over {ins['runs']:,} packets"
                         + (f"; the pod-side pass program {pod['ns_per_run']:.0f} ns" if pod else "") + ".")
    us_p = figure(by.get(("userspace", "default")), "hits", "cpu_us_per_query")
    ub_p = figure(by.get((BASELINE, "default")), "hits", "cpu_us_per_query")
    L.append(f"- For comparison, the process CPU per cache hit in the end-to-end run below (default placement): "
             f"node-local-dns userspace {fmt(us_p and us_p * 1000)} ns, unbound {fmt(ub_p and ub_p * 1000)} ns "
             "(their socket work included; the kernel's receive path before the socket is not).")
    L.append("")
    L.append("## 2. End to end from a pod namespace through a veth")
    L.append("")
    L.append(f"`dnsperf -T 1 -c {meta['clients']} -q {meta['outstanding']} -l {meta['duration_s']}` in the pod "
             f"namespace, asking `{LOCAL_IP}:{DNS_PORT}` over the veth, cycling over {meta['names']:,} names warmed "
             f"first (every answer a cache hit); p50/p99 from `dnsperf -v -Q {meta['lat_rate']} -l "
             f"{meta['lat_duration_s']}`. Pinning: {meta['pinning']}. **machine µs/q** = the whole machine's busy "
             "time (/proc/stat, all cores) ÷ answered queries: dnsperf, the server, every softirq. "
             f"**node µs/q** = all of core {SERVER_CORE} (the server alone is pinned there; with its softirq and, "
             "steered, the veth's NAPI thread) + the irq/softirq time of the other core ÷ answered queries; "
             "**client µs/q** = the task (user + system) time of the other core: dnsperf. The two add up to the "
             "machine figure (steal aside); this kernel samples CPU time by tick, so process times would count "
             "softirq work done on dnsperf's core as dnsperf's. The node figure includes delivering each reply "
             "into the pod's socket, alike in every row. **server process µs/q** = the server's utime + stime "
             "(/proc/PID/stat; includes softirq that ran while it was current). "
             "**kernel %** = answers the fast path sent ÷ answered queries. **limit**: `server` when the "
             f"server's core was ≥ {BUSY_LIMIT:.0%} busy, `dnsperf` when dnsperf's core was (its softirq share "
             "shown: in the default placement that is the fast path's own work).")
    L.append("")
    for placement in meta.get("placements", PLACEMENTS):
        rows = [r for r in results if r.get("placement", "default") == placement]
        if not rows:
            continue
        L.append(f"### {PLACEMENT_TEXT[placement][0].upper() + PLACEMENT_TEXT[placement][1:]}")
        L.append("")
        main_table(L, rows)
    L.append("## Targets (issue 4, part E)")
    L.append("")
    for t in derived["targets"]:
        state = {True: "**met**", False: "**not met**", None: "not determined"}[t["met"]]
        L.append(f"- {t['who']}: {t['what']} {t['target']}: {t['text']} — {state}")
    L.append("")
    L.append("## Details")
    L.append("")
    L.append("| server | placement | hits: sent / answered / lost | core 0 / core 1 busy (softirq) | irq+softirq s · "
             "NAPI thread s · server process s · dnsperf process s | kernel counters during hits | latency run: "
             "answered, p90 / p99.9 / max ms | other work during hits |")
    L.append("|---|---|---|---|---|---|---|---|")
    for r in results:
        if r["status"] == "missing":
            continue
        h, la = (r.get(k) if isinstance(r.get(k), dict) else None for k in ("hits", "latency"))
        cb, cs = (h["core_busy"], h["core_softirq"]) if h else ({}, {})
        L.append("| " + " | ".join([
            r["label"], r.get("placement", "default"),
            f"{h['sent']:,} / {h['completed']:,} / {h['lost']:,}" if h else "–",
            (f"{cb.get('0', 0) * 100:.0f}% ({cs.get('0', 0) * 100:.0f}%) / {cb.get('1', 0) * 100:.0f}% "
             f"({cs.get('1', 0) * 100:.0f}%)" if h else "–"),
            (f"{h['irq_s']:.2f} · {h['napi_cpu_s']:.2f} · {h['server_cpu_s']:.2f} · {h['load_cpu_s']:.2f}"
             if h else "–"),
            (", ".join(f"{k} {v:,}" for k, v in sorted(h.get("kernel", {}).items()) if v) or "–") if h else "–",
            (f"{la['samples']:,}, {fmt(la['p90_ms'], 3)} / {fmt(la['p999_ms'], 3)} / {fmt(la['max_ms'], 3)}"
             if la else "–"),
            f"{h['foreign_frac'] * 100:.0f}%" if h else "–",
        ]) + " |")
    L.append("")
    common.rounds_table(L, results, [("queries/s", "hits", ",.0f"), ("node µs/q", "node_us_per_query", ".2f"),
                                     ("p99 ms", "latency", ".3f")], first="server", placement=True)
    notes = []
    for r in results:
        who = f"{r['label']} ({r.get('placement', 'default')})"
        for e in r.get("errors", []):
            first = e.strip().splitlines()
            notes.append(f"- {who}, {r['status']}: " + (first[0] if first else e))
        for k, v in r.get("background", {}).items():
            mm = r.get(k)
            ff = mm.get("foreign_frac") if isinstance(mm, dict) else None
            if k != "warm" and (v > common.BG_BUSY_WARN or (ff is not None and ff > common.FOREIGN_WARN)):
                notes.append(f"- {who} {k}: other work on the machine ({v * 100:.0f}% of all cores busy "
                             "just before" + (f"; {ff * 100:.0f}% of the busy time during the run was not ours"
                                              if ff is not None else "") + "): its figures are suspect")
        h = r.get("hits")
        if isinstance(h, dict) and h.get("upstream_queries"):
            notes.append(f"- {who}: {h['upstream_queries']:,} queries reached knot during the cache-hit "
                         "run: not every query was a hit")
        if r["row"] in FAST and isinstance(h, dict) and h.get("kernel_hit_share", 0) < 0.99:
            notes.append(f"- {who}: only {h.get('kernel_hit_share', 0) * 100:.1f}% of the answers came "
                         "from the kernel")
    if meta.get("ns_error"):
        notes.append(f"- BPF_PROG_TEST_RUN part: {meta['ns_error']}")
    if notes:
        L.append("## Notes")
        L.append("")
        L.extend(notes)
        L.append("")
    L.append("Raw numbers: `dns-fastpath-latest.json`. Method: bench/README.md (DNS kernel fast path).")
    L.append("")
    return "\n".join(L)


def write_outputs(out: Path, meta: dict[str, Any], ns: dict[str, Any] | None, results: list[dict[str, Any]]) -> None:
    derived = derive(ns, results)
    doc = {"meta": meta, "ns_per_query": ns, "rows": results, "derived": derived,
           "targets_spec": {"hit_ns_max": T_HIT_NS, "node_cpu_factor_vs_unbound_min": T_CPU_FACTOR,
                            "limit": "dnsperf"}}
    (out / "dns-fastpath-latest.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    (out / "dns-fastpath-latest.md").write_text(render_md(meta, ns, results, derived))


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def versions() -> dict[str, str]:
    v = dns.versions()
    return {k: v[k] for k in ("knot", "dnsperf", "unbound")} | {
        "iproute2": (re.findall(r"iproute2-([\w.]+)", common.sh(["ip", "-V"])) or ["?"])[0]}


# --------------------------------------------------------------------------------------
# main


def smoke_checks(ns: dict[str, Any] | None, results: list[dict[str, Any]]) -> list[str]:
    """What must hold in any healthy run, however short: numbers present and sane, and the
    fast-path rows really answered from the kernel."""
    bad = []
    if not ns or len(ns.get("series", [])) != 12:
        bad.append("BPF_PROG_TEST_RUN: not every series was measured")
    else:
        bad += [f"BPF_PROG_TEST_RUN {s['mode']} {s['path']} {s['variant']}: no time measured"
                for s in ns["series"] if not s["mean_ns"] > 0]
    for r in results:
        if r["status"] != "ok":
            bad.append(f"{r['row']}: {r['status']} ({', '.join(r.get('failed_measures', []))})")
            continue
        h, la = r["hits"], r["latency"]
        for ok, what in ((h["qps"] > 0, "queries/s is 0"),
                         (h["rcodes"].get("NOERROR", 0) >= dns.NOERROR_MIN * h["completed"], "answers not NOERROR"),
                         (h["machine_us_per_query"] > 0, "no machine CPU measured"),
                         (0 < la["p50_ms"] <= la["p99_ms"], "latency percentiles out of order"),
                         (r["row"] not in FAST or h.get("kernel_hit_share", 0) >= 0.9,
                          f"only {h.get('kernel_hit_share', 0) * 100:.0f}% answered by the kernel"),
                         (r["row"] in FAST or not h.get("kernel"), "kernel answers without a fast path")):
            if not ok:
                bad.append(f"{r['row']}: {what}")
    return bad


def main() -> int:
    ap = argparse.ArgumentParser(prog=f"python3 -m {__spec__.name}", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true",
                    help="tiny runs (1,000 names, 1 s), output to a temp dir; sanity checks; for the test suite")
    ap.add_argument("--bin", default=common.release_bin("node-local-dns"), help="node-local-dns binary")
    ap.add_argument("--ns-bin", default=common.release_bin("fastpath-ns"), help="the fastpath-ns binary")
    ap.add_argument("--out", default=None, help="output dir (default bench/results; a temp dir with --smoke)")
    ap.add_argument("--no-install", action="store_true", help="do not run install-deps.sh (full mode)")
    ap.add_argument("--install", action="store_true", help="run install-deps.sh in smoke mode too")
    ap.add_argument("--rows", default=None, help=f"comma-separated subset of {','.join(ROWS)}")
    ap.add_argument("--no-ns", action="store_true", help="skip the BPF_PROG_TEST_RUN part")
    ap.add_argument("--duration", type=int, default=None, help="seconds of the cache-hit run (10; smoke 1)")
    ap.add_argument("--lat-duration", type=int, default=None, help="seconds of the latency run (5; smoke 1)")
    ap.add_argument("--lat-rate", type=int, default=None, help="offered queries/s of the latency run (50000; smoke 10000)")
    ap.add_argument("--clients", type=int, default=16, help="dnsperf -c (sockets)")
    ap.add_argument("--outstanding", type=int, default=200, help="dnsperf -q (queries in flight)")
    ap.add_argument("--idle-wait", type=float, default=None,
                    help="max seconds to wait for a quiet machine before each measured run (10; smoke 0)")
    ap.add_argument("--placements", default=",".join(PLACEMENTS),
                    help="comma-separated: default (the kernel's: fast path on the sending core), steered")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds of everything measured; each figure is the median round's (default 1)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, server logs)")
    ap.add_argument("--from-json", metavar="JSON", help="measure nothing: re-render from a dns-fastpath-latest.json")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")

    if args.from_json:
        src = Path(args.from_json)
        doc = json.loads(src.read_text())
        out = Path(args.out) if args.out else src.parent
        out.mkdir(parents=True, exist_ok=True)
        write_outputs(out, doc["meta"], doc["ns_per_query"], doc["rows"])
        return 0

    smoke = args.smoke
    duration = args.duration or (1 if smoke else 10)
    lat_duration = args.lat_duration or (1 if smoke else 5)
    lat_rate = args.lat_rate or (10_000 if smoke else 50_000)
    names = SMOKE_HIT_NAMES if smoke else HIT_NAMES
    if args.idle_wait is None:
        args.idle_wait = 0.0 if smoke else 10.0
    rows = [r.strip() for r in (args.rows or ",".join(ROWS)).split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        ap.error(f"unknown rows: {bad}")
    rows = [r for r in ROWS if r in rows]
    placements = [p.strip() for p in args.placements.split(",") if p.strip()]
    if not placements or any(p not in PLACEMENTS for p in placements):
        ap.error(f"--placements: a comma-separated subset of {','.join(PLACEMENTS)}")
    placements = [p for p in PLACEMENTS if p in placements]

    if os.geteuid() != 0:
        if os.environ.get("REQUIRE_PRIVILEGED") == "1":
            log("FAIL: needs root (network namespaces, eBPF) and REQUIRE_PRIVILEGED=1 is set")
            return 1
        log("SKIP: needs root (network namespaces, eBPF); set REQUIRE_PRIVILEGED=1 to make this a failure")
        return 0

    out = common.output_dir(args, smoke, "dns-fastpath-smoke-")
    status = common.install_and_check(args, smoke, ("ip", "knotd", "knotc", "dnsperf", "taskset", "prlimit"))
    if status:
        return status
    common.raise_nofile()
    pin = len(os.sched_getaffinity(0)) >= 2 and {SERVER_CORE, LOAD_CORE} <= os.sched_getaffinity(0)
    if pin:
        os.sched_setaffinity(0, {LOAD_CORE})  # the harness, dnsperf, fastpath-ns (children inherit) and knot
    else:
        log("fewer than 2 usable cores: no pinning")

    binary = Path(args.bin).resolve()
    ns_bin = Path(args.ns_bin).resolve()
    t_start = time.monotonic()
    load_start = loadavg()
    tmp = Path(tempfile.mkdtemp(prefix="dns-fastpath-"))
    runner = Runner(tmp, pin)
    topo = Topology()
    results: list[dict[str, Any]] = []
    ns: dict[str, Any] | None = None
    ns_error = None
    idle = 0.0

    def on_term(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    try:
        log(f"temp dir {tmp}; output {out}")
        if not args.no_ns:
            idle = wait_quiet(args.idle_wait)
            log("BPF_PROG_TEST_RUN: ns per query (fastpath-ns)")
            try:
                docs = []
                for rnd in range(args.repeat):
                    if rnd:
                        wait_quiet(args.idle_wait)
                    docs.append(run_ns_bench(ns_bin, smoke))
                    for s in docs[-1]["series"]:
                        log(f"  dns_{s['mode']} {s['path']} ({s['variant']}): {s['mean_ns']:.0f} ns")
                ns = merge_ns(docs)
            except (BenchError, json.JSONDecodeError, subprocess.TimeoutExpired) as e:
                ns_error = str(e)
                log(f"FAIL fastpath-ns: {e}")
        remove_stale_namespaces()
        topo.create()
        dns.write_zone(tmp)
        hit_file = tmp / "hits.txt"
        hit_file.write_text("".join(f"h{i}.{ZONE} A\n" for i in range(names)))
        kport = free_port()
        kconf = dns.knot_conf(tmp, kport)
        ksrv = runner.start("knot", ["knotd", "-c", str(kconf)], kport, LOAD_CORE)
        up = dns.Upstream(ksrv, kconf)
        dns.probe(kport, f"h0.{ZONE}")
        log(f"namespaces {topo.node} (knot on 127.0.0.1:{kport}, servers on {LOCAL_IP}:{DNS_PORT}) and {topo.pod} "
            f"(dnsperf from {POD_ADDR})")
        load = dns.Load(up, args.clients, args.outstanding, 1 if smoke else 2, server_ip=LOCAL_IP,
                        prefix=topo.in_pod([]))
        ctx = Ctx(args, tmp, runner, load, up, topo, binary, duration, lat_duration, lat_rate, hit_file, names, pin)
        rounds: list[list[dict[str, Any]]] = []
        for rnd in range(args.repeat):
            this: list[dict[str, Any]] = []
            rounds.append(this)
            for placement in placements:
                topo.set_placement(placement)
                for row in rows:
                    if smoke and placement == "steered" and row not in SMOKE_STEERED:
                        continue
                    log(f"== {row} ({placement})" + (f" round {rnd + 1} of {args.repeat}" if args.repeat > 1 else ""))
                    r = measure_row(ctx, row, placement)
                    this.append(r)
                    if r["status"] == "missing":
                        log(f"MISSING {row}: {'; '.join(r['errors'])}")
                    elif r["errors"]:
                        log(f"{row}: {r['status']}: " + " | ".join(e.splitlines()[0] for e in r["errors"]))
                    h = r.get("hits")
                    if isinstance(h, dict):
                        la = r.get("latency") or {}
                        log(f"{row} ({placement}): {h['qps']:,.0f} q/s, machine {h['machine_us_per_query']:.2f} µs/q, "
                            f"node {h['node_us_per_query']:.2f} µs/q, limit {h['limit_text']}"
                            + (f", kernel {h['kernel_hit_share'] * 100:.1f}%" if "kernel_hit_share" in h else "")
                            + f"; p50/p99 {la.get('p50_ms', float('nan')):.3f}/{la.get('p99_ms', float('nan')):.3f} ms")
        results = common.merge_rounds(rounds, dns.MEDIAN_KEY, once=(),
                                      spread={"node_us_per_query": ("hits", "node_us_per_query")})
    except KeyboardInterrupt:
        log("interrupted: stopping servers")
        return 130
    except BenchError as e:
        log(f"FAIL: {e}")
        return 1
    finally:
        runner.stop_all()
        topo.destroy()
        if args.keep_tmp:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    pinning = (f"server on core {SERVER_CORE} (taskset); dnsperf, knot and the harness on core {LOAD_CORE}"
               if pin else "none (fewer than 2 cores)")
    meta = common.collect_meta(pinning, versions())
    meta["placements"] = placements
    meta["repeat"] = args.repeat
    meta.update({
        "command": " ".join(["python3", "-m", __spec__.name] + sys.argv[1:]),
        "mode": "smoke" if smoke else "full", "duration_s": duration, "lat_duration_s": lat_duration,
        "lat_rate": lat_rate, "names": names, "clients": args.clients, "outstanding": args.outstanding,
        "binary": str(binary), "ns_binary": str(ns_bin), "elapsed_s": time.monotonic() - t_start,
        "loadavg_start": load_start, "loadavg_end": loadavg(), "idle_busy": idle, "ns_error": ns_error,
        "pod_xdp": topo.pod_xdp,
    })
    write_outputs(out, meta, ns, results)
    log(f"wrote {out}/dns-fastpath-latest.md, dns-fastpath-latest.json ({meta['elapsed_s']:.0f} s)")
    print((out / "dns-fastpath-latest.md").read_text())

    failed = ns_error is not None and not args.no_ns
    for r in results:
        if r["status"] != "ok":
            log(f"FAIL {r['row']}: {r['status']} ({', '.join(r.get('failed_measures', [])) or r['errors']})")
            failed = True
    if smoke:
        for what in smoke_checks(None if args.no_ns else ns, results):
            if args.no_ns and what.startswith("BPF_PROG_TEST_RUN"):
                continue
            log(f"FAIL {what}")
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
