"""dns: CPU per query and the limit, latency percentiles, memory per 100,000 names, targets, rounds."""

from __future__ import annotations

import math
import unittest
from typing import Any

from .. import dns


def hit_run(completed: int = 1_000_000, server_cpu_s: float = 6.0, load_cpu_s: float = 5.0,
            wall_s: float = 10.0) -> dict[str, Any]:
    return {"completed": completed, "server_cpu_s": server_cpu_s, "load_cpu_s": load_cpu_s, "wall_s": wall_s}


def result(row: str, qps: float | None, cpu: float | None, p99: float | None, limit: str = "dnsperf") -> dict[str, Any]:
    r: dict[str, Any] = {"row": row, "label": dns.LABELS[row], "status": "ok", "errors": []}
    if qps is not None:
        r["hits"] = {"qps": qps, "cpu_us_per_query": cpu, "limit": limit}
    if p99 is not None:
        r["latency"] = {"p99_ms": p99}
    return r


def targets(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {t["what"]: t for t in dns.derive(results)["targets"]}


class Percentile(unittest.TestCase):
    def test_nearest_rank(self) -> None:
        ten = [float(v) for v in range(1, 11)]
        self.assertEqual(dns.percentile(ten, 50), 5.0)  # rank ceil(5) = 5
        self.assertEqual(dns.percentile(ten, 51), 6.0)  # rank ceil(5.1) = 6
        self.assertEqual(dns.percentile(ten, 90), 9.0)
        self.assertEqual(dns.percentile(ten, 99), 10.0)
        self.assertEqual(dns.percentile(ten, 100), 10.0)
        self.assertEqual(dns.percentile(ten, 0), 1.0)

    def test_p999_of_a_thousand_is_the_999th(self) -> None:
        thousand = [float(v) for v in range(1, 1001)]
        self.assertEqual(dns.percentile(thousand, 99.9), 999.0)
        self.assertEqual(dns.percentile(thousand, 99), 990.0)

    def test_one_and_none(self) -> None:
        self.assertEqual(dns.percentile([3.0], 99.9), 3.0)
        self.assertTrue(math.isnan(dns.percentile([], 50)))


class LatencyFigures(unittest.TestCase):
    def test_sorted_first(self) -> None:
        lat = [float(v) for v in range(100, 0, -1)]  # 100 .. 1, as dnsperf prints them: unsorted
        got = dns.latency_figures(lat, 50_000)
        self.assertEqual(got, {"rate_qps": 50_000, "samples": 100, "p50_ms": 50.0, "p90_ms": 90.0, "p99_ms": 99.0,
                               "p999_ms": 100.0, "max_ms": 100.0})
        self.assertEqual(lat[0], 100.0)  # the caller's list is left as it was

    def test_no_answer(self) -> None:
        got = dns.latency_figures([], 50_000)
        self.assertEqual(got["samples"], 0)
        self.assertIsNone(got["max_ms"])
        self.assertTrue(math.isnan(got["p99_ms"]))


class PerQuery(unittest.TestCase):
    def test_cpu_per_answered_query_and_busy_shares(self) -> None:
        r = hit_run()
        dns.per_query(r)
        self.assertAlmostEqual(r["cpu_us_per_query"], 6.0)
        self.assertAlmostEqual(r["server_busy"], 0.6)
        self.assertAlmostEqual(r["load_busy"], 0.5)
        self.assertEqual(r["limit"], "neither")
        self.assertEqual(r["limit_text"], "neither (server 60% of its core, dnsperf 50%)")

    def test_limit(self) -> None:
        for server, load, limit in ((9.0, 5.0, "server"), (8.99, 9.0, "dnsperf"), (9.5, 9.5, "server"),
                                    (8.0, 8.0, "neither")):
            r = hit_run(server_cpu_s=server, load_cpu_s=load)
            dns.per_query(r)
            self.assertEqual(r["limit"], limit, (server, load))


class Memory(unittest.TestCase):
    def test_per_100k_names(self) -> None:
        self.assertAlmostEqual(dns.per_100k_mib(102_400, 100_000), 100.0)
        self.assertAlmostEqual(dns.per_100k_mib(5_120, 5_000), 100.0)  # smoke: 5,000 names scale up
        self.assertAlmostEqual(dns.per_100k_mib(-1_024, 100_000), -1.0)


class Derive(unittest.TestCase):
    def test_all_met(self) -> None:
        t = targets([result("node-local-dns", 120_000, 6.0, 2.0), result("unbound", 80_000, 10.0, 3.0)])
        cpu = t["server CPU per cache-hit query"]
        self.assertEqual((cpu["met"], cpu["value"]), (True, 0.6))  # 0.6x unbound is enough
        self.assertEqual(cpu["text"], "6.00 µs vs unbound 10.00 µs = 0.60x")
        qps = t["cache-hit queries/s"]
        self.assertEqual((qps["met"], qps["value"]), (True, 1.5))
        self.assertEqual(qps["text"], "120,000 vs unbound 80,000 = 1.500x (limit: ours dnsperf, unbound dnsperf)")
        self.assertEqual(t["p99 latency"]["met"], True)

    def test_not_met(self) -> None:
        t = targets([result("node-local-dns", 79_000, 6.1, 3.0), result("unbound", 80_000, 10.0, 3.0)])
        self.assertEqual(t["server CPU per cache-hit query"]["met"], False)
        self.assertEqual(t["cache-hit queries/s"]["met"], False)
        self.assertEqual(t["p99 latency"]["met"], False)  # equal is not lower

    def test_undetermined_without_unbound_or_our_figures(self) -> None:
        t = targets([result("node-local-dns", 120_000, 6.0, 2.0)])
        self.assertEqual({v["met"] for v in t.values()}, {None})
        self.assertEqual(t["cache-hit queries/s"]["text"], "unbound was not measured")
        t = targets([result("node-local-dns", None, None, None), result("unbound", 80_000, 10.0, 3.0)])
        self.assertEqual({v["text"] for v in t.values()}, {"not measured"})
        self.assertEqual(dns.derive([result("unbound", 80_000, 10.0, 3.0)])["targets"], [])


class MergeRounds(unittest.TestCase):
    def test_hits_by_qps_latency_by_p99_memory_once(self) -> None:
        rounds = []
        for i, (qps, cpu, p99) in enumerate(((100, 7.0, 3.0), (120, 6.0, 1.0), (110, 8.0, 2.0))):
            r = result("node-local-dns", qps, cpu, p99)
            r["warm"] = {"qps": 50 + i}
            r["background"] = {}
            if i == 0:
                r["memory"] = {"mib_per_100k": 50.0}
            rounds.append([r])
        got = dns.merge_rounds(rounds)[0]
        self.assertEqual(got["hits"]["qps"], 110)
        self.assertEqual(got["hits"]["cpu_us_per_query"], 8.0)  # the median round's, whole
        self.assertEqual(got["latency"]["p99_ms"], 2.0)
        self.assertEqual(got["memory"], {"mib_per_100k": 50.0})
        self.assertEqual(got["rounds"]["cpu_us_per_query"], [6.0, 7.0, 8.0])
        self.assertEqual(got["rounds"]["latency"], [1.0, 2.0, 3.0])
        self.assertEqual(got["status"], "ok")


if __name__ == "__main__":
    unittest.main()
