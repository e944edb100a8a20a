"""What the bench harnesses share: processes, /proc accounting, rounds, report pieces and set-up.

The harnesses (`sni`, `dns`, `dns_fastpath`, one module each) measure; this module holds what
they all need around the measuring:

- /proc accounting: the whole machine's busy time (`Meter`: per load run, split into the server's,
  the backend's, the load generator's, interrupts and other work on the machine), process-tree CPU
  and memory, waiting for a quiet machine;
- processes: `Runner` starts every server pinned, in its own process group, with the raised
  nofile limit, and stops them all;
- rounds: `merge_rounds` (the median round of each measure, taken whole) and the report's
  "Rounds" table;
- report pieces: number formatting and the hand-written SVG's text and bar panels;
- set-up: the output directory, install-deps.sh and the tool check, the nofile limit, and the
  header every report starts with (commit, kernel, CPU).

Python 3.11 standard library only.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
# Where cargo puts the binaries: $CARGO_TARGET_DIR (CI and .ci/run keep it outside the clone),
# else the clone's target/.
TARGET = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")


def release_bin(name: str) -> str:
    """The release build of binary `name`, from cargo's target directory."""
    return str(TARGET / "release" / name)
HARNESS = Path(__file__).resolve().parent
# The nofile limit of the harness and every server; raise_nofile lowers it to the hard limit
# where it cannot be raised, so read it as common.NOFILE, not as an imported copy.
NOFILE = 262144
CLK_TCK = os.sysconf("SC_CLK_TCK")

BG_BUSY_WARN = 0.10  # fraction of the whole machine busy before a run that is flagged
FOREIGN_WARN = 0.10  # fraction of a run's busy time spent outside proxy/backend/load/irq that is flagged


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    """A row could not produce a number."""


# --------------------------------------------------------------------------------------
# /proc helpers


def cpu_times() -> tuple[float, float, float, float]:
    """(busy, total, irq + softirq, steal) seconds of the whole machine (all cores) from the
    aggregate line of /proc/stat; busy = user + nice + system + irq + softirq + steal (guest is
    already in user)."""
    with open("/proc/stat") as f:
        parts = f.readline().split()
    v = [int(x) for x in parts[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = v
    busy = user + nice + system + irq + softirq + steal
    return busy / CLK_TCK, sum(v) / CLK_TCK, (irq + softirq) / CLK_TCK, steal / CLK_TCK


class Meter:
    """CPU accounting over one load run.

    busy_s is the figure the report uses: the whole machine's busy time.  The rest
    splits it: the server's process tree (`proxy_cpu_s`: the proxy, or the DNS server), the
    backend's (or upstream's), the load generator's (wrk/curl/dnsperf, children of the
    harness), interrupts; foreign_s is what is left, i.e. other work on the machine (a
    build, ...), and flags a noisy run.
    """

    def __init__(self, proxy: "Server | None", backend: "Server | None"):
        self.proxy, self.backend = proxy, backend
        self.b0, self.t0, self.i0, self.s0 = cpu_times()
        self.p0 = proxy.cpu_seconds() if proxy else 0.0
        self.k0 = backend.cpu_seconds() if backend else 0.0
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.c0 = ru.ru_utime + ru.ru_stime
        self.lo0 = listen_overflows()

    def stop(self) -> dict[str, float]:
        b1, t1, i1, s1 = cpu_times()
        p1 = self.proxy.cpu_seconds() if self.proxy else 0.0
        k1 = self.backend.cpu_seconds() if self.backend else 0.0
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        c1 = ru.ru_utime + ru.ru_stime
        r = {
            "busy_s": b1 - self.b0,
            "wall_s": (t1 - self.t0) / max(1, os.cpu_count() or 1),
            "irq_s": i1 - self.i0,
            "steal_s": s1 - self.s0,
            "proxy_cpu_s": p1 - self.p0,
            "backend_cpu_s": k1 - self.k0,
            "load_cpu_s": c1 - self.c0,
            "listen_overflows": listen_overflows() - self.lo0,
        }
        other_work(r)
        return r


def other_work(r: dict[str, float]) -> None:
    """Sets a Meter result's foreign_s, the busy time that was neither the server, the backend, the
    load generator, interrupts nor steal (other work on the machine), and foreign_frac, its share
    of the busy time."""
    r["foreign_s"] = max(0.0, r["busy_s"] - r["irq_s"] - r["steal_s"] - r["proxy_cpu_s"] - r["backend_cpu_s"]
                         - r["load_cpu_s"])
    r["foreign_frac"] = r["foreign_s"] / r["busy_s"] if r["busy_s"] > 0 else 0.0


def background_busy(seconds: float = 1.0) -> float:
    """Fraction of the whole machine (all cores) busy during `seconds` of doing nothing."""
    b0, t0, _, _ = cpu_times()
    time.sleep(seconds)
    b1, t1, _, _ = cpu_times()
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
# rounds


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


def merge_rounds(rounds: list[list[dict[str, Any]]], median_key: dict[str, str], once: tuple[str, ...],
                 spread: dict[str, tuple[str, str]] | None = None) -> list[dict[str, Any]]:
    """One result per row from several rounds (each round the same rows in the same order): per
    measure of `median_key` (measure -> the figure to sort by), the run with the median figure
    (whole, so its CPU numbers stay consistent; the lower middle one for an even count); the
    measures in `once` come from round 1. `rounds` of each result lists the sorted figures,
    plus those named in `spread` (name -> measure, figure)."""
    if len(rounds) == 1:
        return rounds[0]
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


# --------------------------------------------------------------------------------------
# report pieces


def fmt(v: float | None, digits: int = 0) -> str:
    """A figure with thousands separators and `digits` decimals; "–" when not measured."""
    return "–" if v is None else f"{v:,.{digits}f}"


def figure(r: dict[str, Any] | None, measure: str, name: str) -> Any:
    """The figure `name` of a result's `measure`, None when the row or the measure failed."""
    v = (r or {}).get(measure)
    return v.get(name) if isinstance(v, dict) else None


# ---- SVG (hand-written) ----

FONT = "font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\""
C_OURS = "#d6452f"
C_PEER = "#7f8c9b"


def _esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def svg_text(x: float, y: float, s: str, size: int = 12, anchor: str = "start", weight: str = "normal",
          fill: str = "#222", rotate: float | None = None, halo: bool = False) -> str:
    tr = f' transform="rotate({rotate} {x:.1f} {y:.1f})"' if rotate is not None else ""
    # halo: a white outline under the glyphs keeps a label readable across grid/target lines
    h = ' stroke="white" stroke-width="3" stroke-linejoin="round" paint-order="stroke"' if halo else ""
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" '
            f'font-weight="{weight}" fill="{fill}"{h}{tr}>{_esc(s)}</text>')


def nice_step(span: float, n: int = 5) -> float:
    """A round grid step (1, 2, 2.5 or 5 times a power of ten) for about `n` steps over `span`."""
    raw = span / n if span > 0 else 1
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def hbar_panel(o: list[str], x: float, y0: float, w: float, h: float, title: str, unit: str,
               items: list[tuple[str, float | None, str, bool]], target: float | None, target_label: str,
               digits: int) -> None:
    """A panel of horizontal bars, one per item (label, value or None, text when None, ours?),
    with a dashed target line when `target` is given; appended to `o`."""
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
    step = nice_step(vmax - vmin, 4)

    def X(v: float) -> float:
        return px + (v - vmin) / (vmax - vmin) * pw

    o.append(svg_text(x + w / 2, y0, title, 14, "middle", "bold"))
    top = y0 + 14
    rows = len(items)
    rh = (h - 40) / max(rows, 1)
    # grid
    g = math.ceil(vmin / step) * step
    while g <= vmax + 1e-12:
        gx = X(g)
        o.append(f'<line x1="{gx:.1f}" y1="{top}" x2="{gx:.1f}" y2="{top + rows * rh:.1f}" stroke="#e6e6e6"/>')
        o.append(svg_text(gx, top + rows * rh + 14, f"{g:g}", 10, "middle", fill="#555"))
        g += step
    o.append(svg_text(px + pw / 2, top + rows * rh + 30, unit, 11, "middle", fill="#444"))
    o.append(f'<line x1="{X(0):.1f}" y1="{top}" x2="{X(0):.1f}" y2="{top + rows * rh:.1f}" stroke="#666"/>')
    for i, (label, v, none_text, ours) in enumerate(items):
        cy = top + rh * (i + 0.5)
        o.append(svg_text(px - 8, cy + 4, label, 12, "end", "bold" if ours else "normal"))
        if v is None:
            o.append(svg_text(px + 6, cy + 4, none_text, 11, "start", fill="#a00"))
            continue
        x1, x2 = sorted((X(0), X(v)))
        bh = min(22.0, rh * 0.6)
        o.append(f'<rect x="{x1:.1f}" y="{cy - bh / 2:.1f}" width="{max(x2 - x1, 1):.1f}" height="{bh:.1f}" '
                 f'fill="{C_OURS if ours else C_PEER}"/>')
        # a positive value is written after its bar, a negative one right of the zero line
        tx = X(v) + 5 if v >= 0 else X(0) + 5
        o.append(svg_text(tx, cy + 4, f"{v:.{digits}f}", 11, "start", fill="#222", halo=True))
    if target is not None:
        tx = X(target)
        o.append(f'<line x1="{tx:.1f}" y1="{top - 2}" x2="{tx:.1f}" y2="{top + rows * rh:.1f}" '
                 f'stroke="{C_OURS}" stroke-dasharray="4 3"/>')
        o.append(svg_text(tx, top + rows * rh + 44, target_label, 10, "middle", fill=C_OURS))


# --------------------------------------------------------------------------------------
# set-up and the report's header


def sh(argv: list[str], default: str = "?") -> str:
    """Output of a command run in the repository, `default` when it fails or prints nothing."""
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


def collect_meta(pinning: str, versions: dict[str, str]) -> dict[str, Any]:
    """The header of every report: date, commit (`(dirty)` with uncommitted changes to tracked
    files), kernel, CPU model and cores, and the harness's pinning and tool versions."""
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
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "commit": commit,
        "kernel": platform.release(),
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "pinning": pinning,
        "versions": versions,
    }


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
