"""sni: CPU per request and per GiB, memory per idle connection, ratios, overheads and targets."""

from __future__ import annotations

import unittest
from typing import Any

from .. import sni


def result(row: str, ka: float, ka_cpu: float, nc: float, nc_cpu: float, bulk: float, gib_cpu: float,
           idle: dict[str, Any] | None = None) -> dict[str, Any]:
    r: dict[str, Any] = {"row": row, "label": sni.LABELS[row], "status": "ok", "errors": [],
                         "keepalive": {"per_s": ka, "cpu_us_per_req": ka_cpu},
                         "newconn": {"per_s": nc, "cpu_us_per_req": nc_cpu},
                         "bulk": {"mib_s": bulk, "cpu_s_per_gib": gib_cpu}}
    if idle is not None:
        r["idle"] = idle
    return r


def idle(requested: int, upstream: int, client_legs: int, grown_kib: int) -> dict[str, Any]:
    return {"requested": requested, "upstream_established": upstream, "client_legs_established": client_legs,
            "rss_before_kib": 10_000, "rss_after_kib": 10_000 + grown_kib}


def targets(derived: dict[str, Any], row: str) -> dict[str, dict[str, Any]]:
    return {t["what"]: t for t in derived["targets"] if t["row"] == row}


class PerRequest(unittest.TestCase):
    def run_(self) -> dict[str, Any]:
        return {"requests": 200_000, "busy_s": 10.0, "foreign_s": 1.0, "proxy_cpu_s": 2.0}

    def test_whole_machine_own_and_proxy(self) -> None:
        r = self.run_()
        sni.per_request(r, proxied=True)
        self.assertAlmostEqual(r["cpu_us_per_req"], 50.0)
        self.assertAlmostEqual(r["own_cpu_us_per_req"], 45.0)
        self.assertAlmostEqual(r["proxy_cpu_us_per_req"], 10.0)

    def test_no_proxy_figure_without_a_proxy(self) -> None:
        r = self.run_()
        sni.per_request(r, proxied=False)
        self.assertIsNone(r["proxy_cpu_us_per_req"])
        self.assertAlmostEqual(r["cpu_us_per_req"], 50.0)


class PerGib(unittest.TestCase):
    def cpu(self) -> dict[str, float]:
        return {"busy_s": 6.0, "foreign_s": 1.5, "proxy_cpu_s": 3.0}

    def test_best_run_and_cpu_per_gib_over_all_runs(self) -> None:
        speeds = [300.0, 350.0, 320.0]
        got = sni.per_gib(speeds, 3 * 256 * sni.MIB, self.cpu(), proxied=True)  # 0.75 GiB in all
        self.assertEqual(got["mib_s"], 350.0)
        self.assertEqual(got["runs_mib_s"], speeds)
        self.assertEqual(got["bytes"], 3 * 256 * sni.MIB)
        self.assertAlmostEqual(got["cpu_s_per_gib"], 8.0)
        self.assertAlmostEqual(got["own_cpu_s_per_gib"], 6.0)
        self.assertAlmostEqual(got["proxy_cpu_s_per_gib"], 4.0)
        self.assertAlmostEqual(got["foreign_frac"], 0.25)
        self.assertEqual(got["busy_s"], 6.0)  # the summed Meter figures stay in the measure

    def test_direct(self) -> None:
        got = sni.per_gib([400.0], sni.GIB, self.cpu(), proxied=False)
        self.assertIsNone(got["proxy_cpu_s_per_gib"])


class IdleConnections(unittest.TestCase):
    def test_all_held(self) -> None:
        got = sni.per_idle_connection(1000, {"rss_kib": 10_000, "pss_kib": 9_000},
                                      {"rss_kib": 17_000, "pss_kib": 15_000}, 1000, 1003)
        self.assertEqual(got, {"kib_per_conn": 7.0, "held": 1000, "kib_per_held_conn": 7.0, "pss_kib_per_conn": 6.0})

    def test_held_is_the_fewer_leg(self) -> None:
        got = sni.per_idle_connection(1000, {"rss_kib": 10_000, "pss_kib": 0}, {"rss_kib": 14_000, "pss_kib": 0},
                                      upstream=800, client_legs=900)
        self.assertEqual(got["held"], 800)
        self.assertEqual(got["kib_per_held_conn"], 5.0)
        self.assertEqual(got["kib_per_conn"], 4.0)  # per connection asked
        none = sni.per_idle_connection(1000, {"rss_kib": 1, "pss_kib": 0}, {"rss_kib": 2, "pss_kib": 0}, 0, 1000)
        self.assertIsNone(none["kib_per_held_conn"])

    def test_idle_held_and_kib(self) -> None:
        self.assertEqual(sni.idle_held(idle(1000, 1000, 990, 7000)), 990)
        self.assertAlmostEqual(sni.idle_kib(idle(1000, 1000, 1000, 7000)), 7.0)
        self.assertAlmostEqual(sni.idle_kib(idle(1000, 500, 1000, 4000)), 8.0)
        self.assertIsNone(sni.idle_kib(idle(1000, 0, 1000, 4000)))


class Derive(unittest.TestCase):
    def results(self) -> list[dict[str, Any]]:
        return [
            result("direct", 20_000, 50.0, 800, 1200.0, 400, 2.5),
            result("sni-proxy-copy", 19_000, 60.0, 700, 1250.0, 380, 3.0, idle(1000, 1000, 1000, 7000)),
            result("sni-proxy-splice", 18_000, 58.0, 790, 1240.0, 300, 2.9, idle(1000, 900, 1000, 4500)),
            result("haproxy", 19_500, 70.0, 760, 1300.0, 350, 3.5, idle(1000, 1000, 1000, 3000)),
            result("nginx", 18_500, 90.0, 740, 1250.0, 360, 3.3, idle(1000, 1000, 1000, 15000)),
        ]

    def test_ratios_and_overheads_against_direct(self) -> None:
        results = self.results()
        d = sni.derive(results)
        self.assertEqual(d["direct"], {"keepalive": 20_000, "newconn": 800, "bulk": 400, "cpu_req": 50.0,
                                       "cpu_conn": 1200.0, "cpu_gib": 2.5})
        copy = results[1]
        self.assertAlmostEqual(copy["ratio"]["keepalive"], 0.95)
        self.assertAlmostEqual(copy["ratio"]["newconn"], 0.875)
        self.assertAlmostEqual(copy["ratio"]["bulk"], 0.95)
        self.assertAlmostEqual(copy["cpu_overhead"]["cpu_req"], 10.0)
        self.assertAlmostEqual(copy["cpu_overhead"]["cpu_conn"], 50.0)
        self.assertAlmostEqual(copy["cpu_overhead"]["cpu_gib"], 0.5)
        self.assertEqual(results[0]["ratio"], {"keepalive": 1.0, "newconn": 1.0, "bulk": 1.0})
        self.assertEqual(results[0]["cpu_overhead"], {"cpu_req": 0.0, "cpu_conn": 0.0, "cpu_gib": 0.0})

    def test_best_peer_is_the_lowest_peer_overhead(self) -> None:
        d = sni.derive(self.results())
        self.assertEqual(d["best_peer_overhead"]["cpu_req"], (20.0, "haproxy"))  # not our 8.0 (splice)
        self.assertEqual(d["best_peer_overhead"]["cpu_conn"], (50.0, "nginx"))
        self.assertAlmostEqual(d["best_peer_overhead"]["cpu_gib"][0], 0.8)

    def test_targets(self) -> None:
        d = sni.derive(self.results())
        copy, splice = targets(d, "sni-proxy-copy"), targets(d, "sni-proxy-splice")
        self.assertEqual(copy["keep-alive req/s"]["met"], True)  # 0.95 is enough
        self.assertEqual(copy["new TLS conns/s"]["met"], False)
        self.assertEqual(copy["bulk MiB/s"]["met"], True)
        self.assertEqual(splice["bulk MiB/s"]["met"], False)  # 0.75 < 0.9
        # CPU: at most half the best peer's overhead; 10 = 0.5 x 20 is met, 0.5 > 0.5 x 0.8 is not
        self.assertEqual(copy["CPU overhead per request"]["met"], True)
        self.assertEqual(copy["CPU overhead per request"]["text"],
                         "10 us/request vs limit 10 us/request (0.5x HAProxy 20)")
        self.assertEqual(copy["CPU overhead per GiB"]["met"], False)
        self.assertEqual(copy["memory per idle connection"]["met"], True)
        self.assertEqual(copy["memory per idle connection"]["text"], "7.00 KiB")
        # 5 KiB per held connection, but it held only 900 of 1,000: not met
        self.assertEqual(splice["memory per idle connection"]["met"], False)
        self.assertIn("held only 900 of 1,000", splice["memory per idle connection"]["text"])
        self.assertEqual(len(d["targets"]), 2 * 6)  # no sockmap row: no targets for it

    def test_cpu_target_undetermined_when_the_best_peer_is_within_noise(self) -> None:
        results = self.results()
        results[3]["keepalive"]["cpu_us_per_req"] = 49.0  # HAProxy below direct: overhead -1
        t = targets(sni.derive(results), "sni-proxy-copy")["CPU overhead per request"]
        self.assertIsNone(t["met"])
        self.assertIn("within noise: undetermined", t["text"])

    def test_without_peers_or_direct(self) -> None:
        t = targets(sni.derive(self.results()[:2]), "sni-proxy-copy")
        self.assertIsNone(t["CPU overhead per request"]["met"])
        self.assertIn("no peer was measured", t["CPU overhead per request"]["text"])
        results = self.results()[1:]
        d = sni.derive(results)
        self.assertEqual(results[0]["ratio"], {"keepalive": None, "newconn": None, "bulk": None})
        self.assertIsNone(targets(d, "sni-proxy-copy")["keep-alive req/s"]["met"])

    def test_failed_measure_has_no_ratio(self) -> None:
        results = self.results()
        results[1]["status"] = "partial"
        del results[1]["bulk"]
        d = sni.derive(results)
        self.assertIsNone(results[1]["ratio"]["bulk"])
        self.assertIsNone(results[1]["cpu_overhead"]["cpu_gib"])
        self.assertEqual(targets(d, "sni-proxy-copy")["bulk MiB/s"]["text"], "not measured")


class ParseWrk(unittest.TestCase):
    OUT = """Running 2s test @ https://localhost:41234/version
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.95ms  412.31us   8.86ms   86.20%
    Req/Sec    21.70k     1.10k   23.10k    80.00%
  Latency Distribution
     50%  850.00us
     75%    3.05ms
     90%    3.36ms
     99%    1.20s
  43209 requests in 2.00s, 11.83MB read
  Socket errors: connect 0, read 3, write 0, timeout 1
Requests/sec:  21578.30
Transfer/sec:      5.91MB
"""

    def test_units_to_milliseconds(self) -> None:
        r = sni.parse_wrk(self.OUT)
        self.assertEqual(r["requests"], 43209)
        self.assertAlmostEqual(r["elapsed_s"], 2.0)
        self.assertAlmostEqual(r["per_s"], 21578.30)
        self.assertAlmostEqual(r["p50_ms"], 0.85)
        self.assertAlmostEqual(r["p75_ms"], 3.05)
        self.assertAlmostEqual(r["p99_ms"], 1200.0)
        self.assertEqual(r["socket_errors"], {"connect": 0, "read": 3, "write": 0, "timeout": 1})
        self.assertEqual(r["non_2xx"], 0)


if __name__ == "__main__":
    unittest.main()
