"""Log shipping benchmark: log-shipper against the OpenTelemetry collector's filelog receiver.

    python3 -m bench.harness.logs [--smoke] [--bin PATH] [--out bench/results]

(from the repository root). Everything runs on loopback (127.0.0.1). The harness writes CRI
files (the kubelet's `<namespace>_<pod>_<uid>/<container>/0.log` tree; containers of two
shoot namespaces and of the seed) with kube-apiserver-like lines, then per row starts one
shipper pinned to core 1 reading them from the start, with the store (a fresh VictoriaLogs,
built by scripts/vlogs-bin, or a null sink that answers every push and discards it) and this
harness on core 0. Phases per shipper:

1. throughput: N pre-written lines; wall time from the shipper's start until its own
   acknowledged counter reaches N; its CPU (utime + stime of /proc/PID/stat, process tree) and
   peak RSS (VmHWM); the store's count checked afterwards;
2. latency: lines appended at a fixed rate; the i-th acknowledgement's time (the counter,
   polled every 10 ms) minus the i-th line's write time, p50/p99;
3. loss: lines appended at a fixed rate with a sequence number; the shipper killed with
   SIGKILL mid-stream and restarted, the store stopped and restarted a few seconds later;
   then distinct sequence numbers in the store against those written.

The peer is `otelcol-bench` (scripts/otelcol-bin: filelog + container parser, batch, otlphttp,
file_storage; collector v0.165.0). See bench/README.md ("Log shipping") for the method.

Python 3.11 standard library only, plus taskset and prlimit.
"""

from __future__ import annotations

import argparse
import http.server
import json
import math
import os
import random
import shutil
import signal
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from . import common
from .common import REPO, BenchError, Runner, Server, fmt, free_port, log, wait_quiet

SHIPPER_CORE, STORE_CORE = 1, 0
OURS, PEER = "log-shipper", "otelcol"
SHIPPERS = (OURS, PEER)
SINKS = ("vlogs", "null")
# Targets (benchmarks, not tests).
T_LINES_PER_CORE = 1_000_000
T_VS_PEER = 3.0

# Namespaces of the generated tree: two shoots and the seed's own.
NAMESPACES = ("shoot--dev--alpha", "shoot--prod--beta", "garden")
VERBS = ("GET", "LIST", "WATCH", "PATCH", "UPDATE", "CREATE", "DELETE")
RESOURCES = ("pods", "configmaps", "secrets", "leases", "nodes", "events", "deployments", "endpointslices")
CODES = (200, 200, 200, 200, 201, 404, 409, 500)


# --------------------------------------------------------------------------------------
# the generated CRI files (pure parts are unit-tested)


def rfc3339_nanos(ns: int) -> str:
    """A CRI timestamp (RFC 3339, UTC, nine decimals) of `ns` nanoseconds since the epoch."""
    s, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(s)) + f".{frac:09d}Z"


def apiserver_line(seq: int, rnd: random.Random) -> str:
    """A kube-apiserver-like klog line (~130-180 bytes) carrying `seq=<seq>` for the loss count."""
    verb = rnd.choice(VERBS)
    res = rnd.choice(RESOURCES)
    code = rnd.choice(CODES)
    us = rnd.randint(200, 900_000)
    return (f"I1206 20:{seq // 60_000 % 60:02d}:{seq // 1000 % 60:02d}.{seq % 1000:03d}000 1 httplog.go:132] "
            f"\"HTTP\" verb=\"{verb}\" URI=\"/api/v1/namespaces/kube-system/{res}/obj-{seq % 977}\" "
            f"latency=\"{us / 1000:.3f}ms\" resp={code} seq={seq} ;")


def cri_line(ns: int, stream: str, text: str) -> str:
    """One full CRI line: `<time> <stream> F <text>\\n`."""
    return f"{rfc3339_nanos(ns)} {stream} F {text}\n"


def container_dirs(root: Path, containers: int) -> list[Path]:
    """`containers` container directories under `root`, spread round-robin over NAMESPACES, in
    the kubelet's layout `<ns>_<pod>_<uid>/<container>/` (created)."""
    dirs = []
    for i in range(containers):
        ns = NAMESPACES[i % len(NAMESPACES)]
        d = root / f"{ns}_kube-apiserver-{i}_{i:08x}-0000-4000-8000-{i:012x}" / "kube-apiserver"
        d.mkdir(parents=True, exist_ok=True)
        dirs.append(d)
    return dirs


def write_files(root: Path, containers: int, lines: int, seed: int = 1) -> int:
    """Writes `lines` CRI lines spread round-robin over `containers` files (`0.log`), with
    sequence numbers 0..lines-1 and increasing timestamps; returns the bytes written."""
    rnd = random.Random(seed)
    files = [open(d / "0.log", "a", buffering=1 << 20) for d in container_dirs(root, containers)]
    base = time.time_ns() - 3_600_000_000_000  # an hour ago: within any store's window
    total = 0
    try:
        for seq in range(lines):
            line = cri_line(base + seq * 1000, "stderr" if seq % 7 == 0 else "stdout", apiserver_line(seq, rnd))
            files[seq % containers].write(line)
            total += len(line)
    finally:
        for f in files:
            f.close()
    return total


def percentile(sorted_vals: list[float], p: float) -> float:
    """The nearest-rank percentile `p` (0-100) of sorted values."""
    if not sorted_vals:
        raise ValueError("no values")
    k = max(0, min(len(sorted_vals) - 1, math.ceil(p / 100 * len(sorted_vals)) - 1))
    return sorted_vals[k]


def ack_latencies(writes: list[float], acks: list[tuple[float, int]]) -> list[float]:
    """Per line, seconds from its write (`writes[i]`, in write order) to the first poll of the
    acknowledged counter (`acks`: (time, count), in poll order) that counted it, reading the
    counter as FIFO: the i-th line is taken as acknowledged once the counter exceeds i. Lines
    never counted are left out."""
    out = []
    j = 0
    for i, w in enumerate(writes):
        while j < len(acks) and acks[j][1] <= i:
            j += 1
        if j == len(acks):
            break
        out.append(max(0.0, acks[j][0] - w))
    return out


def parse_prom(text: str, prefix: str) -> float:
    """The sum of every sample of the metric family `prefix` (with or without labels, and with a
    `_total` suffix) in a Prometheus text exposition."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(prefix) or line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name not in (prefix, prefix + "_total"):
            continue
        try:
            total += float(line.rsplit(" ", 1)[1] if "}" not in line else line.rsplit("}", 1)[1].split()[0])
        except (ValueError, IndexError):
            continue
    return total


def proc_stat_cpu(stat: str) -> float:
    """utime + stime seconds from the text of /proc/PID/stat."""
    rest = stat.rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / common.CLK_TCK


def verdict(value: float | None, target: float) -> str:
    """`met` / `not met` / `–` of a figure against a minimum."""
    return "–" if value is None else ("met" if value >= target else "not met")


# --------------------------------------------------------------------------------------
# configs


def ours_config(tmp: Path, logs: Path, ckpt: Path, admin: int, store_url: str) -> Path:
    p = tmp / "log-shipper.yaml"
    p.write_text(f"""admin: {{address: "127.0.0.1:{admin}"}}
input:
  path: {logs}
  checkpoint_dir: {ckpt}
stores:
  seed:  {{url: "{store_url}?extra_fields=store=seed", protocol: loki}}
  shoot: {{url: "{store_url}?extra_fields=store={{namespace}}", protocol: loki}}
delivery:
  batch_wait: 200ms
  min_backoff: 100ms
  max_backoff: 1s
""")
    return p


def peer_config(tmp: Path, logs: Path, ckpt: Path, metrics: int, endpoint: str, persistent: bool) -> Path:
    p = tmp / "otelcol.yaml"
    queue = "    sending_queue: {storage: file_storage}\n" if persistent else ""
    p.write_text(f"""extensions:
  file_storage:
    directory: {ckpt}
receivers:
  file_log:
    include: [{logs}/*/*/*.log]
    start_at: beginning
    include_file_path: true
    storage: file_storage
    operators:
      - type: container
processors:
  batch: {{}}
exporters:
  otlp_http:
    logs_endpoint: {endpoint}
    compression: none
{queue}service:
  extensions: [file_storage]
  telemetry:
    logs: {{level: warn}}
    metrics:
      level: detailed
      readers:
        - pull:
            exporter:
              prometheus: {{host: 127.0.0.1, port: {metrics}}}
  pipelines:
    logs:
      receivers: [file_log]
      processors: [batch]
      exporters: [otlp_http]
""")
    return p


# --------------------------------------------------------------------------------------
# the null sink: answers every push with success and discards it


class _Sink(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        n = int(self.headers.get("Content-Length") or 0)
        while n > 0:
            n -= len(self.rfile.read(min(n, 1 << 20)))
        if self.path.startswith("/insert/loki"):
            self.send_response(204)
            self.send_header("Content-Length", "0")
        else:  # OTLP: an empty ExportLogsServiceResponse
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *a: Any) -> None:
        pass


class _ThreadingServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


def null_sink_cmd(port: int) -> list[str]:
    return [sys.executable, "-m", "bench.harness.logs", "--null-sink", str(port)]


def serve_null_sink(port: int) -> None:
    _ThreadingServer(("127.0.0.1", port), _Sink).serve_forever()


# --------------------------------------------------------------------------------------
# the run


def http_get(url: str, timeout: float = 2.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode(errors="replace")


class Ctx:
    def __init__(self, args: argparse.Namespace, tmp: Path, runner: Runner):
        self.args, self.tmp, self.runner = args, tmp, runner
        self.vlogs = Path(args.vlogs_dir) / "victoria-logs"
        self.otelcol = Path(args.otelcol_dir) / "otelcol-bench" if args.otelcol_dir else None

    def start_store(self, kind: str, data: Path, port: int | None = None) -> Server:
        port = port or free_port()
        if kind == "null":
            return self.runner.start("null-sink", null_sink_cmd(port), port, STORE_CORE,
                                     env={"PYTHONPATH": str(REPO)})
        return self.runner.start("victoria-logs", [str(self.vlogs), f"-httpListenAddr=127.0.0.1:{port}",
                                                   f"-storageDataPath={data}", "-loggerLevel=ERROR",
                                                   "-retentionPeriod=100y"], port, STORE_CORE)

    def start_shipper(self, who: str, logs: Path, ckpt: Path, store_port: int, persistent: bool = False
                      ) -> tuple[Server, str, str]:
        """(server, metrics URL, counter prefix)."""
        ckpt.mkdir(parents=True, exist_ok=True)
        port = free_port()
        if who == OURS:
            cfg = ours_config(self.tmp, logs, ckpt, port, f"http://127.0.0.1:{store_port}/insert/loki/api/v1/push")
            srv = self.runner.start(OURS, [self.args.bin, "--config", str(cfg)], port, SHIPPER_CORE,
                                    env={"RUST_LOG": os.environ.get("BENCH_RUST_LOG", "warn"),
                                         "TOKIO_WORKER_THREADS": "1"})
            return srv, f"http://127.0.0.1:{port}/metrics", "log_shipper_entries_accepted"
        assert self.otelcol is not None
        cfg = peer_config(self.tmp, logs, ckpt, port, f"http://127.0.0.1:{store_port}/insert/opentelemetry/v1/logs",
                          persistent)
        srv = self.runner.start(PEER, [str(self.otelcol), "--config", str(cfg)], port, SHIPPER_CORE,
                                env={"GOMAXPROCS": "1"}, timeout=30)
        return srv, f"http://127.0.0.1:{port}/metrics", "otelcol_exporter_sent_log_records"


def acked(url: str, prefix: str) -> float:
    try:
        return parse_prom(http_get(url), prefix)
    except OSError:
        return -1.0


def store_query(port: int, q: str) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}/select/logsql/query?" + urllib.parse.urlencode({"query": q})
    text = http_get(url, timeout=30).strip()
    return json.loads(text.splitlines()[0]) if text else {}


def store_distinct(port: int) -> tuple[int, int]:
    """(distinct sequence numbers, records) in the store, made searchable first."""
    http_get(f"http://127.0.0.1:{port}/internal/force_flush", timeout=30)
    r = store_query(port, '* | extract "seq=<seq> ;" | stats count_uniq(seq) as u, count() as c')
    return int(r.get("u", 0)), int(r.get("c", 0))


def wait_store(port: int, want: int, timeout: float, stall: float = 20) -> tuple[int, int]:
    """Polls until the store holds `want` distinct sequence numbers or nothing moved for `stall`
    seconds (the collector's retries back off to 30 s)."""
    deadline = time.monotonic() + timeout
    last, since = (-1, -1), time.monotonic()
    while time.monotonic() < deadline:
        got = store_distinct(port)
        if got[0] >= want:
            return got
        if got != last:
            last, since = got, time.monotonic()
        elif time.monotonic() - since > stall:
            return got
        time.sleep(1)
    return last


def pid_hwm_kib(pid: int) -> int:
    return common._status_kib(pid, "VmHWM")


def throughput(ctx: Ctx, who: str, sink: str, logs: Path, lines: int) -> dict[str, Any]:
    data = ctx.tmp / f"tp-{who}-{sink}"
    store = ctx.start_store(sink, data / "store")
    t0 = time.monotonic()  # before the start: the wall time includes the shipper's start-up
    srv, murl, prefix = ctx.start_shipper(who, logs, data / "ckpt", store.port)
    deadline = t0 + ctx.args.timeout
    n = 0.0
    hwm = 0
    while time.monotonic() < deadline:
        n = acked(murl, prefix)
        hwm = max(hwm, pid_hwm_kib(srv.pid))
        if n >= lines:
            break
        time.sleep(0.02)
    wall = time.monotonic() - t0
    cpu = srv.cpu_seconds()  # a fresh process: all of its CPU
    hwm = max(hwm, pid_hwm_kib(srv.pid))
    res: dict[str, Any] = {"lines": lines, "acked": int(n), "wall_s": wall, "cpu_s": cpu, "vmhwm_kib": hwm}
    ctx.runner.stop(srv)
    if n < lines:
        res["error"] = f"{int(n)} of {lines} acknowledged after {ctx.args.timeout} s"
    else:
        res["lines_per_s"] = lines / wall
        res["lines_per_cpu_s"] = lines / cpu if cpu > 0 else None
        res["cpu_us_per_line"] = cpu / lines * 1e6
        if sink == "vlogs":
            res["stored_distinct"], res["stored_records"] = wait_store(store.port, lines, 60)
    ctx.runner.stop(store)
    shutil.rmtree(data, ignore_errors=True)
    return res


class Writer(threading.Thread):
    """Appends lines at `rate` lines/s over the container files, with the write time as the CRI
    timestamp and sequence numbers from 0; `writes` keeps each line's write time."""

    def __init__(self, root: Path, containers: int, rate: int, seconds: float):
        super().__init__(daemon=True)
        self.dirs = container_dirs(root, containers)
        self.rate, self.total = rate, int(rate * seconds)
        self.writes: list[float] = []

    def run(self) -> None:
        rnd = random.Random(7)
        files = [open(d / "0.log", "a") for d in self.dirs]
        t0 = time.monotonic()
        seq = 0
        tick = 0.005
        try:
            while seq < self.total:
                due = min(self.total, int((time.monotonic() - t0) * self.rate) + 1)
                touched = set()
                now = time.monotonic()
                wall = time.time_ns()
                while seq < due:
                    i = seq % len(files)
                    files[i].write(cri_line(wall, "stdout", apiserver_line(seq, rnd)))
                    touched.add(i)
                    self.writes.append(now)
                    seq += 1
                for i in touched:
                    files[i].flush()
                time.sleep(tick)
        finally:
            for f in files:
                f.close()


def latency(ctx: Ctx, who: str, sink: str) -> dict[str, Any]:
    data = ctx.tmp / f"lat-{who}-{sink}"
    logs = data / "pods"
    logs.mkdir(parents=True)
    for d in container_dirs(logs, ctx.args.containers):
        (d / "0.log").touch()  # found before the first line: no rescan interval in the latency
    store = ctx.start_store(sink, data / "store")
    srv, murl, prefix = ctx.start_shipper(who, logs, data / "ckpt", store.port)
    time.sleep(2)  # the shipper has found the (empty) files
    w = Writer(logs, ctx.args.containers, ctx.args.lat_rate, ctx.args.lat_seconds)
    acks: list[tuple[float, int]] = []
    c0 = srv.cpu_seconds()
    w.start()
    deadline = time.monotonic() + ctx.args.lat_seconds + 20
    while time.monotonic() < deadline:
        n = acked(murl, prefix)
        acks.append((time.monotonic(), int(n)))
        if not w.is_alive() and n >= w.total:
            break
        time.sleep(0.01)
    w.join()
    cpu = srv.cpu_seconds() - c0
    ctx.runner.stop(srv)
    ctx.runner.stop(store)
    lat = sorted(ack_latencies(w.writes, acks))
    shutil.rmtree(data, ignore_errors=True)
    res: dict[str, Any] = {"rate": ctx.args.lat_rate, "lines": w.total, "acked": acks[-1][1] if acks else 0,
                           "cpu_s": cpu}
    if len(lat) < w.total:
        res["error"] = f"{len(lat)} of {w.total} acknowledged"
    if lat:
        res["p50_ms"] = percentile(lat, 50) * 1000
        res["p99_ms"] = percentile(lat, 99) * 1000
        res["max_ms"] = lat[-1] * 1000
    return res


def loss(ctx: Ctx, who: str) -> dict[str, Any]:
    a = ctx.args
    data = ctx.tmp / f"loss-{who}"
    logs = data / "pods"
    logs.mkdir(parents=True)
    for d in container_dirs(logs, a.containers):
        (d / "0.log").touch()
    store_port = free_port()
    store = ctx.start_store("vlogs", data / "store", store_port)
    srv, _, _ = ctx.start_shipper(who, logs, data / "ckpt", store.port, persistent=True)
    time.sleep(2)
    w = Writer(logs, a.containers, a.loss_rate, a.loss_seconds)
    w.start()
    events = []
    span = a.loss_seconds
    time.sleep(span * 0.25)
    os.killpg(srv.pid, signal.SIGKILL)
    srv.proc.wait()
    ctx.runner.servers.remove(srv)
    events.append(f"SIGKILL {who} at {span * 0.25:.1f} s")
    time.sleep(1)
    srv, _, _ = ctx.start_shipper(who, logs, data / "ckpt", store.port, persistent=True)
    events.append("restarted 1 s later")
    time.sleep(span * 0.25)
    ctx.runner.stop(store)
    events.append(f"store stopped at {span * 0.5 + 1:.1f} s for {a.outage:.0f} s")
    time.sleep(a.outage)
    store = ctx.start_store("vlogs", data / "store", store_port)
    w.join()
    got, records = wait_store(store_port, w.total, 60, 8 if a.smoke else 20)
    ctx.runner.stop(srv)
    ctx.runner.stop(store)
    shutil.rmtree(data, ignore_errors=True)
    return {"written": w.total, "distinct": got, "records": records, "lost": w.total - got,
            "duplicates": records - got, "events": events}


# --------------------------------------------------------------------------------------
# report


def derive(results: dict[str, Any]) -> dict[str, Any]:
    """The headline figures: per-core rates (lines per CPU-second of the shipper's core, null
    sink), the ratio to the collector, and the verdicts."""
    tp = results.get("throughput", {})

    def rate(who: str, sink: str, f: str) -> float | None:
        return (tp.get(f"{who}/{sink}") or {}).get(f)

    ours = rate(OURS, "null", "lines_per_s")
    peer = rate(PEER, "null", "lines_per_s")
    ours_cpu = rate(OURS, "null", "lines_per_cpu_s")
    peer_cpu = rate(PEER, "null", "lines_per_cpu_s")
    ratio = ours_cpu / peer_cpu if ours_cpu and peer_cpu else None
    lost = (results.get("loss", {}).get(OURS) or {}).get("lost")
    return {
        "ours_lines_per_s": ours, "peer_lines_per_s": peer,
        "ours_lines_per_cpu_s": ours_cpu, "peer_lines_per_cpu_s": peer_cpu,
        "ratio_per_core": ratio,
        "target_lines_per_core": verdict(ours_cpu and min(ours_cpu, ours or 0), T_LINES_PER_CORE),
        "target_vs_peer": verdict(ratio, T_VS_PEER),
        "target_zero_loss": "–" if lost is None else ("met" if lost == 0 else "not met"),
    }


def render_md(meta: dict[str, Any], results: dict[str, Any], d: dict[str, Any]) -> str:
    L = ["# Log shipping: log-shipper vs the OpenTelemetry collector (filelog)", ""]
    L.append(f"{meta['date']}, commit {meta['commit']}, kernel {meta['kernel']}, {meta['cpu_model']} "
             f"({meta['cores']} cores); {meta['pinning']}.")
    L.append("")
    L.append("Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".")
    L.append("")
    L.append(f"Files: {meta['files']}.")
    L.append("")
    L.append("## Throughput (pre-written files read from the start)")
    L.append("")
    L.append("| shipper | store | lines/s (wall) | lines per CPU-second | CPU µs/line | peak RSS MiB | stored |")
    L.append("|---|---|---|---|---|---|---|")
    for key, r in results.get("throughput", {}).items():
        who, sink = key.split("/")
        store = "null sink" if sink == "null" else "VictoriaLogs"
        if r.get("error"):
            L.append(f"| {who} | {store} | {r['error']} | | | {fmt(r['vmhwm_kib'] / 1024, 1)} | |")
            continue
        stored = "–" if "stored_distinct" not in r else f"{r['stored_distinct']:,} of {r['lines']:,}"
        L.append(f"| {who} | {store} | {fmt(r['lines_per_s'])} | {fmt(r['lines_per_cpu_s'])} | "
                 f"{fmt(r['cpu_us_per_line'], 2)} | {fmt(r['vmhwm_kib'] / 1024, 1)} | {stored} |")
    L.append("")
    if results.get("latency"):
        L.append("## End-to-end latency (lines appended at a fixed rate, to the store's acknowledgement)")
        L.append("")
        L.append("| shipper | store | rate lines/s | p50 ms | p99 ms | max ms | acknowledged |")
        L.append("|---|---|---|---|---|---|---|")
        for key, r in results["latency"].items():
            who, sink = key.split("/")
            L.append(f"| {who} | {'null sink' if sink == 'null' else 'VictoriaLogs'} | {fmt(r['rate'])} | "
                     f"{fmt(r.get('p50_ms'), 1)} | {fmt(r.get('p99_ms'), 1)} | {fmt(r.get('max_ms'), 1)} | "
                     f"{r['acked']:,} of {r['lines']:,} |")
        L.append("")
    if results.get("loss"):
        L.append("## Loss across a SIGKILL of the shipper and a store outage")
        L.append("")
        L.append("| shipper | written | distinct in store | lost | duplicates | events |")
        L.append("|---|---|---|---|---|---|")
        for who, r in results["loss"].items():
            if r.get("error"):
                L.append(f"| {who} | {r['error']} | | | | |")
                continue
            L.append(f"| {who} | {r['written']:,} | {r['distinct']:,} | {r['lost']:,} | {r['duplicates']:,} | "
                     f"{'; '.join(r['events'])} |")
        L.append("")
    L.append("## Targets")
    L.append("")
    L.append("| target | figure | verdict |")
    L.append("|---|---|---|")
    L.append(f"| >= {T_LINES_PER_CORE:,} lines/s per core (CRI to Loki protobuf+snappy, null sink) | "
             f"{fmt(d['ours_lines_per_s'])} lines/s wall, {fmt(d['ours_lines_per_cpu_s'])} per CPU-second | "
             f"{d['target_lines_per_core']} |")
    L.append(f"| >= {T_VS_PEER:g}x the collector per core (lines per CPU-second, null sink) | "
             f"{fmt(d['ratio_per_core'], 2)}x | {d['target_vs_peer']} |")
    L.append(f"| zero lines lost (SIGKILL + outage) | "
             f"{(results.get('loss', {}).get(OURS) or {}).get('lost', '–')} | {d['target_zero_loss']} |")
    L.append("")
    for note in results.get("notes", []):
        L.append(f"- {note}")
    return "\n".join(L) + "\n"


def svg(meta: dict[str, Any], results: dict[str, Any]) -> str:
    """logs.svg: lines per CPU-second and peak RSS per shipper and store (hand-written SVG)."""
    tp = results.get("throughput", {})
    rows = [(k, r) for k, r in tp.items()]

    def items(f: str, scale: float = 1.0) -> list[tuple[str, float | None, str, bool]]:
        out = []
        for k, r in rows:
            who, sink = k.split("/")
            v = r.get(f)
            out.append((f"{who} → {'null' if sink == 'null' else 'VLogs'}", None if v is None else v * scale,
                        "failed", who == OURS))
        return out

    W, H = 1080, 360
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" {common.FONT}>',
         f'<rect width="{W}" height="{H}" fill="white"/>',
         common.svg_text(W / 2, 28, "CRI files to a store: lines per CPU-second (higher is better) and peak RSS",
                         17, "middle", "bold"),
         common.svg_text(W / 2, 50, f"shipper pinned to 1 core; {meta['files']}; {meta['date']} · commit "
                         f"{meta['commit']}", 11, "middle", fill="#555")]
    pw = (W - 40) / 2
    common.hbar_panel(o, 20, 88, pw - 10, H - 110, "lines per CPU-second of the shipper", "thousand lines / s",
                      items("lines_per_cpu_s", 1e-3), T_LINES_PER_CORE / 1000, "target 1,000,000 / core", 0)
    common.hbar_panel(o, 20 + pw, 88, pw - 10, H - 110, "peak RSS (VmHWM)", "MiB", items("vmhwm_kib", 1 / 1024),
                      None, "", 1)
    o.append("</svg>")
    return "\n".join(o)


def versions(args: argparse.Namespace) -> dict[str, str]:
    v = {"log-shipper": common.sh([args.bin, "--version"], "?").splitlines()[0]}
    v["victoria-logs"] = common.sh([str(Path(args.vlogs_dir) / "victoria-logs"), "-version"], "?").splitlines()[0]
    if args.otelcol_dir:
        v["otelcol-bench"] = common.sh([str(Path(args.otelcol_dir) / "otelcol-bench"), "--version"], "?")
    return v


def main() -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bench.harness.logs", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--null-sink", type=int, metavar="PORT", help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (< 60 s)")
    ap.add_argument("--bin", default=common.release_bin("log-shipper"), help="log-shipper binary")
    ap.add_argument("--out", default=None, help="output dir (default bench/results; a temp dir with --smoke)")
    ap.add_argument("--shippers", default=",".join(SHIPPERS), help="comma-separated subset of log-shipper,otelcol")
    ap.add_argument("--lines", type=int, default=None, help="lines of the throughput phase (2,000,000; smoke 20,000)")
    ap.add_argument("--containers", type=int, default=30, help="container log files (over 2 shoots and the seed)")
    ap.add_argument("--lat-rate", type=int, default=None, help="lines/s of the latency phase (20,000; smoke 2,000)")
    ap.add_argument("--lat-seconds", type=float, default=None, help="seconds of the latency phase (10; smoke 2)")
    ap.add_argument("--loss-rate", type=int, default=None, help="lines/s of the loss phase (20,000; smoke 2,000)")
    ap.add_argument("--loss-seconds", type=float, default=None, help="seconds of the loss phase (16; smoke 4)")
    ap.add_argument("--outage", type=float, default=None, help="seconds the store is down (4; smoke 1)")
    ap.add_argument("--timeout", type=float, default=None, help="bound of one throughput run (150 s; smoke 30)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    ap.add_argument("--no-install", action="store_true", help="accepted for symmetry (nothing to install)")
    args = ap.parse_args()
    if args.null_sink:
        serve_null_sink(args.null_sink)
        return 0
    s = args.smoke
    args.lines = args.lines or (20_000 if s else 2_000_000)
    args.lat_rate = args.lat_rate or (2_000 if s else 20_000)
    args.lat_seconds = args.lat_seconds or (2 if s else 10)
    args.loss_rate = args.loss_rate or (2_000 if s else 20_000)
    args.loss_seconds = args.loss_seconds or (4 if s else 16)
    args.outage = args.outage if args.outage is not None else (1 if s else 4)
    args.timeout = args.timeout or (30 if s else 150)
    shippers = [x for x in args.shippers.split(",") if x]
    notes = []
    if not Path(args.bin).exists():
        log(f"FAIL: {args.bin} does not exist (cargo build --release -p log-shipper)")
        return 1
    vd = subprocess.run([str(REPO / "scripts/vlogs-bin"), "--built"], capture_output=True, text=True)
    if vd.returncode != 0:
        log("FAIL: victoria-logs is not built (scripts/vlogs-bin)")
        return 1
    args.vlogs_dir = vd.stdout.strip()
    args.otelcol_dir = None
    if PEER in shippers:
        od = subprocess.run([str(REPO / "scripts/otelcol-bin"), "--built"], capture_output=True, text=True)
        if od.returncode == 0:
            args.otelcol_dir = od.stdout.strip()
        else:
            shippers.remove(PEER)
            notes.append("otelcol-bench is not built (scripts/otelcol-bin): the collector's rows are missing")
            log("SKIP otelcol: not built (scripts/otelcol-bin)")
    common.raise_nofile()
    if (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {STORE_CORE})  # the harness (the generator) beside the store
    out = common.output_dir(args, s, "bench-logs-")
    tmp = Path(tempfile.mkdtemp(prefix="bench-logs-tmp-"))
    runner = Runner(tmp, pin=(os.cpu_count() or 1) >= 2)
    ctx = Ctx(args, tmp, runner)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    results: dict[str, Any] = {"throughput": {}, "latency": {}, "loss": {}, "notes": notes}
    try:
        bg = wait_quiet(5 if s else 30)
        logs = tmp / "pods"
        t0 = time.monotonic()
        size = write_files(logs, args.containers, args.lines)
        log(f"wrote {args.lines:,} lines ({size / 2**20:.0f} MiB) in {args.containers} files in "
            f"{time.monotonic() - t0:.1f} s")
        files = (f"{args.lines:,} lines, {size / 2**20:.0f} MiB ({size / args.lines:.0f} bytes a line) in "
                 f"{args.containers} CRI files over {', '.join(NAMESPACES)}")
        for who in shippers:
            for sink in SINKS:
                log(f"throughput {who} -> {sink}")
                try:
                    r = throughput(ctx, who, sink, logs, args.lines)
                except BenchError as e:
                    r = {"error": str(e).splitlines()[0], "vmhwm_kib": 0}
                results["throughput"][f"{who}/{sink}"] = r
                log(f"  {json.dumps(r)}")
        for who in shippers:
            log(f"latency {who} -> vlogs")
            try:
                r = latency(ctx, who, "vlogs")
            except BenchError as e:
                r = {"error": str(e).splitlines()[0], "rate": args.lat_rate, "lines": 0, "acked": 0}
            results["latency"][f"{who}/vlogs"] = r
            log(f"  {json.dumps(r)}")
        for who in shippers:
            log(f"loss {who}")
            try:
                r = loss(ctx, who)
            except BenchError as e:
                r = {"error": str(e).splitlines()[0]}
            results["loss"][who] = r
            log(f"  {json.dumps(r)}")
    finally:
        runner.stop_all()
        if not args.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    meta = common.collect_meta(f"shipper on core {SHIPPER_CORE}, store and harness on core {STORE_CORE}",
                               versions(args))
    meta["files"] = files
    meta["background_busy"] = bg
    d = derive(results)
    (out / "logs-latest.json").write_text(json.dumps({"meta": meta, "results": results, "derived": d}, indent=2) + "\n")
    (out / "logs-latest.md").write_text(render_md(meta, results, d))
    (out / "logs.svg").write_text(svg(meta, results))
    log(f"wrote {out}/logs-latest.md")
    print(render_md(meta, results, d))
    failed = [k for k, r in results["throughput"].items() if r.get("error")]
    return 1 if s and failed else 0


if __name__ == "__main__":
    sys.exit(main())
