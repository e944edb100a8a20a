"""dns_fastpath: the node/client CPU split, per-query figures, the limit, the kernel's share and
in-situ ns, the BPF_PROG_TEST_RUN rounds and figures, the targets and the smoke checks."""

from __future__ import annotations

import unittest
from typing import Any

from .. import dns_fastpath as fp


def series(mode: str, path: str, variant: str, mean: float, p50: int | None = None) -> dict[str, Any]:
    return {"mode": mode, "path": path, "variant": variant, "mean_ns": mean, "p50_ns": p50}


def ns_doc(xdp_hits: tuple[float, float] = (140.0, 150.0), tc_hits: tuple[float, float] = (120.0, 160.0),
           elapsed: float = 1.0) -> dict[str, Any]:
    out = []
    for mode, (plain, edns) in (("xdp", xdp_hits), ("tc", tc_hits)):
        out += [series(mode, "hit", "no EDNS", plain, int(plain) - 10), series(mode, "hit", "EDNS 1232", edns, 1),
                series(mode, "miss", "repeat = 1", 300.0), series(mode, "miss", "repeat = N", 200.0),
                series(mode, "not local", "repeat = 1", 180.0), series(mode, "not local", "repeat = N", 80.0)]
    return {"series": out, "elapsed_s": elapsed}


def hits(qps: float, node: float, machine: float, limit: str, cpu: float = 10.0,
         in_situ: dict[str, Any] | None = None) -> dict[str, Any]:
    h = {"qps": qps, "node_us_per_query": node, "machine_us_per_query": machine, "cpu_us_per_query": cpu,
         "limit": limit, "limit_text": f"{limit} (...)"}
    if in_situ:
        h["in_situ"] = in_situ
    return h


def result(row: str, placement: str, h: dict[str, Any] | None) -> dict[str, Any]:
    r: dict[str, Any] = {"row": row, "placement": placement, "label": fp.LABELS[row], "status": "ok", "errors": []}
    if h:
        r["hits"] = h
    return r


def targets(ns: dict[str, Any] | None, results: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(t["who"], t["what"]): t for t in fp.derive(ns, results)["targets"]}


class PerCore(unittest.TestCase):
    def test_node_is_the_server_core_and_the_others_softirq(self) -> None:
        d = {0: {"task": 0.5, "soft": 0.3, "steal": 0.0, "busy": 0.8, "total": 1.0},
             1: {"task": 0.6, "soft": 0.2, "steal": 0.1, "busy": 0.9, "total": 1.0}}
        got = fp.per_core(d)
        self.assertAlmostEqual(got["node_cpu_s"], 1.0)  # all of core 0 + core 1's irq/softirq
        self.assertAlmostEqual(got["client_cpu_s"], 0.6)  # core 1's tasks: dnsperf
        self.assertEqual(got["core_busy"], {"0": 0.8, "1": 0.9})
        self.assertEqual(got["core_softirq"], {"0": 0.3, "1": 0.2})
        self.assertEqual(got["cores"], {"0": d[0], "1": d[1]})

    def test_a_core_without_ticks_has_no_share(self) -> None:
        got = fp.per_core({0: {"task": 0.0, "soft": 0.0, "steal": 0.0, "busy": 0.0, "total": 0.0}})
        self.assertEqual((got["core_busy"], got["client_cpu_s"]), ({"0": 0.0}, 0))


class Limit(unittest.TestCase):
    def limit(self, server: float, load: float, soft: float = 0.25) -> dict[str, Any]:
        r = {"core_busy": {"0": server, "1": load}, "core_softirq": {"0": 0.0, "1": soft}}
        fp.limit_of(r)
        return r

    def test_which_core_ran_out(self) -> None:
        self.assertEqual(self.limit(0.95, 0.97)["limit"], "both")
        self.assertEqual(self.limit(0.90, 0.50)["limit"], "server")
        self.assertEqual(self.limit(0.89, 0.90)["limit"], "dnsperf")
        self.assertEqual(self.limit(0.50, 0.50)["limit"], "neither")

    def test_text_names_the_softirq_share_of_dnsperfs_core(self) -> None:
        self.assertEqual(self.limit(0.06, 1.0, 0.4)["limit_text"],
                         "dnsperf (server core 6% busy; dnsperf's core 100%, of it softirq 40%)")


class PerQuery(unittest.TestCase):
    def run_(self, napi: float = 0.2) -> dict[str, Any]:
        return {"completed": 100_000, "busy_s": 2.0, "foreign_s": 0.5, "napi_cpu_s": napi, "load_cpu_s": 0.9,
                "server_cpu_s": 0.5, "wall_s": 1.0, "node_cpu_s": 0.8, "client_cpu_s": 1.1,
                "core_busy": {"0": 0.5, "1": 0.95}, "core_softirq": {"0": 0.1, "1": 0.3}}

    def test_figures(self) -> None:
        r = self.run_()
        fp.per_query(r)
        self.assertAlmostEqual(r["foreign_s"], 0.3)  # the NAPI thread is the node's work, not other work
        self.assertAlmostEqual(r["foreign_frac"], 0.15)
        self.assertAlmostEqual(r["load_busy"], 0.9)
        self.assertAlmostEqual(r["server_busy"], 0.5)
        self.assertAlmostEqual(r["machine_us_per_query"], 20.0)
        self.assertAlmostEqual(r["node_us_per_query"], 8.0)
        self.assertAlmostEqual(r["client_us_per_query"], 11.0)
        self.assertEqual(r["limit"], "dnsperf")

    def test_other_work_never_negative(self) -> None:
        r = self.run_(napi=0.8)
        fp.per_query(r)
        self.assertEqual((r["foreign_s"], r["foreign_frac"]), (0.0, 0.0))


class KernelAnswers(unittest.TestCase):
    def test_counters_over_the_run(self) -> None:
        got = fp.kernel_answers({"hit": 10, "pass": 5}, {"hit": 90_010, "pass": 5, "error": 0}, 100_000)
        self.assertEqual(got, {"kernel": {"hit": 90_000, "pass": 0, "error": 0}, "kernel_hit_share": 0.9})

    def test_nothing_to_compare(self) -> None:
        self.assertEqual(fp.kernel_answers(None, {"hit": 5}, 100), {"kernel": {}, "kernel_hit_share": 0.0})
        self.assertEqual(fp.kernel_answers({}, {"hit": 5}, 0)["kernel_hit_share"], 0.0)


class InSitu(unittest.TestCase):
    BEFORE = {1: (10, 1_000), 2: (0, 0), 3: (0, 0)}
    AFTER = {1: (110, 101_000), 2: (50, 25_000), 3: (500, 100_000), 4: (0, 0)}

    def test_the_program_that_ran_most_but_the_excluded_one(self) -> None:
        self.assertEqual(fp.in_situ(self.BEFORE, self.AFTER, exclude=3), {"id": 1, "runs": 100, "ns_per_run": 1000.0})
        self.assertEqual(fp.in_situ(self.BEFORE, self.AFTER, exclude=None), {"id": 3, "runs": 500, "ns_per_run": 200.0})
        self.assertIsNone(fp.in_situ(self.BEFORE, self.BEFORE, exclude=None))

    def test_program_runs(self) -> None:
        self.assertEqual(fp.program_runs(self.BEFORE, self.AFTER, 2), {"id": 2, "runs": 50, "ns_per_run": 500.0})
        self.assertIsNone(fp.program_runs(self.BEFORE, self.AFTER, 4))
        self.assertIsNone(fp.program_runs(self.BEFORE, self.AFTER, 9))


class Ns(unittest.TestCase):
    def test_merge_takes_the_median_round_of_each_series_whole(self) -> None:
        docs = [ns_doc(xdp_hits=(h, 150.0), elapsed=10.0) for h in (160.0, 140.0, 150.0)]
        got = fp.merge_ns(docs)
        hit = fp.ns_series(got, "xdp", "hit", "no EDNS")
        self.assertEqual((hit["mean_ns"], hit["p50_ns"]), (150.0, 140))  # p50 of the same round
        self.assertEqual(hit["rounds_ns"], [140.0, 150.0, 160.0])
        self.assertEqual(got["elapsed_s"], 30.0)
        self.assertEqual(len(got["series"]), 12)
        two = fp.merge_ns(docs[:2])
        self.assertEqual(fp.ns_series(two, "xdp", "hit", "no EDNS")["mean_ns"], 140.0)  # the lower middle
        self.assertIs(fp.merge_ns(docs[:1]), docs[0])

    def test_timer_overhead_and_the_hit_without_it(self) -> None:
        got = fp.ns_derived(ns_doc())
        self.assertEqual(got["xdp"], {"timer_overhead_ns": 100.0, "hit_ns": 140.0, "hit_minus_overhead_ns": 40.0})
        self.assertEqual(got["tc"]["hit_minus_overhead_ns"], 20.0)
        self.assertEqual(fp.ns_derived(None), {})


class Derive(unittest.TestCase):
    def results(self) -> list[dict[str, Any]]:
        return [
            result("userspace", "default", hits(80_000, 13.0, 23.0, "dnsperf")),
            result("xdp", "default", hits(50_000, 0.5, 20.0, "dnsperf", in_situ={"ns_per_run": 1000.0})),
            result("tc", "default", hits(50_000, 1.0, 20.0, "dnsperf")),
            result("unbound", "default", hits(60_000, 12.0, 26.0, "dnsperf", cpu=12.0)),
            result("xdp", "steered", hits(110_000, 5.0, 14.0, "dnsperf")),
            result("tc", "steered", hits(80_000, 5.0, 14.0, "both")),
            result("unbound", "steered", hits(40_000, 24.0, 43.0, "server")),
        ]

    def test_kernel_hit_path_is_the_worse_query(self) -> None:
        t = targets(ns_doc(), [])
        xdp, tc = t[("dns_xdp", "kernel hit path")], t[("dns_tc", "kernel hit path")]
        self.assertEqual((xdp["met"], tc["met"]), (True, False))  # 150 <= 150; 160 > 150
        self.assertEqual(xdp["text"], "no EDNS 140 ns (p50 130), EDNS 1232 150 ns (p50 1); "
                                      "≈ 40 ns without the timer's per-call overhead")
        self.assertEqual(targets(None, [])[("dns_xdp", "kernel hit path")]["text"], "not measured")

    def test_node_cpu_against_unbound_in_the_default_placement(self) -> None:
        t = targets(None, self.results())
        xdp = t[(fp.LABELS["xdp"], "CPU per answered query")]
        self.assertEqual(xdp["met"], True)  # 12 / 0.5 = 24x less
        self.assertIn("default: node 0.50 µs vs unbound 12.00 µs = 24.0x less", xdp["text"])
        self.assertIn("steered: node 5.00 µs vs unbound 24.00 µs = 4.8x less", xdp["text"])
        self.assertIn("the attached program alone 1000 ns vs unbound's process 12000 ns = 12.0x", xdp["text"])
        self.assertEqual(t[(fp.LABELS["tc"], "CPU per answered query")]["met"], False)  # 12x

    def test_limit_in_the_steered_placement(self) -> None:
        t = targets(None, self.results())
        self.assertEqual(t[(fp.LABELS["xdp"], "end-to-end limit")]["met"], True)
        self.assertEqual(t[(fp.LABELS["tc"], "end-to-end limit")]["met"], False)
        userspace = t[(fp.LABELS["userspace"], "end-to-end limit")]
        self.assertIsNone(userspace["met"])
        self.assertEqual(userspace["text"],
                         "steered placement not measured; default placement: 80,000 queries/s, dnsperf (...)")

    def test_without_unbound(self) -> None:
        results = [r for r in self.results() if r["row"] != "unbound"]
        t = targets(None, results)
        self.assertIsNone(t[(fp.LABELS["xdp"], "CPU per answered query")]["met"])
        self.assertEqual(t[(fp.LABELS["xdp"], "CPU per answered query")]["text"],
                         "default: not measured; steered: not measured")


class SmokeChecks(unittest.TestCase):
    def row(self, row: str, share: float | None = None, kernel: dict[str, int] | None = None,
            p50: float = 0.1, p99: float = 0.5) -> dict[str, Any]:
        h = {"qps": 1000.0, "rcodes": {"NOERROR": 1000}, "completed": 1000, "machine_us_per_query": 20.0}
        if share is not None:
            h["kernel_hit_share"] = share
        if kernel is not None:
            h["kernel"] = kernel
        return {"row": row, "status": "ok", "hits": h, "latency": {"p50_ms": p50, "p99_ms": p99}}

    def test_healthy(self) -> None:
        ok = [self.row("userspace", kernel={}), self.row("xdp", 0.95, {"hit": 950})]  # no counters without it
        self.assertEqual(fp.smoke_checks(ns_doc(), ok), [])

    def test_failures(self) -> None:
        bad = [self.row("xdp", 0.5, {"hit": 500}), self.row("userspace", kernel={"hit": 5}),
               self.row("unbound", p50=0.6, p99=0.5),
               {"row": "tc", "status": "partial", "failed_measures": ["latency"]}]
        self.assertEqual(fp.smoke_checks(None, bad), [
            "BPF_PROG_TEST_RUN: not every series was measured",
            "xdp: only 50% answered by the kernel",
            "userspace: kernel answers without a fast path",
            "unbound: latency percentiles out of order",
            "tc: partial (latency)",
        ])
        untimed = ns_doc()
        untimed["series"][0]["mean_ns"] = 0.0
        self.assertEqual(fp.smoke_checks(untimed, []), ["BPF_PROG_TEST_RUN xdp hit no EDNS: no time measured"])


if __name__ == "__main__":
    unittest.main()
