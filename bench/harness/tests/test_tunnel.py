"""Unit tests of the tunnel harness's pure functions (python3 -m unittest bench.harness.tests.test_tunnel)."""

from __future__ import annotations

import unittest
from typing import Any

from .. import tunnel


def result(row: str, gbit: float | None, rps: float | None, idle: list[tuple[int, int, float]] | None = None,
           iso: float | None = None) -> dict[str, Any]:
    r: dict[str, Any] = {"row": row, "label": tunnel.LABELS[row], "status": "ok", "errors": [], "background": {}}
    if gbit is not None:
        r["bulk"] = {"gbit_s": gbit, "cpu_s_per_gib": 1.0}
    if rps is not None:
        r["rps"] = {"per_s": rps, "cpu_us_per_req": 10.0, "p50_ms": 1.0, "p99_ms": 2.0}
    r["dial"] = {"dial": {"p50_ms": 0.1, "p99_ms": 0.3}, "first_byte": {"p50_ms": 0.2, "p99_ms": 0.4}}
    if idle is not None:
        r["idle"] = {"levels": [{"target": t, "opened": o, "kib_per_tunnel": k, "rss_before_kib": 1000,
                                 "rss_after_kib": 1000 + int(k * o)} for t, o, k in idle]}
    if iso is not None:
        r["isolation"] = {"ratio": iso, "alone_gbit_s": 10.0, "with_stalled_gbit_s": 10.0 * iso, "streams": 100,
                          "opened": 100, "stalled": 1}
    return r


def targets(derived: dict[str, Any], row: str = "ours") -> dict[str, dict[str, Any]]:
    return {f"{t['what']} {t['target']}": t for t in derived["targets"] if t["row"] == row}


class PerTunnel(unittest.TestCase):
    def test_growth_per_tunnel(self) -> None:
        self.assertEqual(tunnel.per_tunnel({"rss_kib": 1000}, {"rss_kib": 9000}, 1000), 8.0)

    def test_none_without_tunnels(self) -> None:
        self.assertIsNone(tunnel.per_tunnel({"rss_kib": 1000}, {"rss_kib": 9000}, 0))


class Derive(unittest.TestCase):
    def results(self) -> list[dict[str, Any]]:
        return [result("direct", 20.0, 100_000),
                result("ours", 13.0, 85_000, [(1000, 1000, 6.0), (10000, 10000, 7.5)], 0.95),
                result("anp", 4.0, 50_000, [(1000, 1000, 20.0)], 0.01),
                result("rathole", 8.0, 60_000)]

    def test_ratios_against_direct(self) -> None:
        rs = self.results()
        tunnel.derive(rs)
        self.assertAlmostEqual(rs[1]["ratio"]["bulk"], 0.65)
        self.assertAlmostEqual(rs[1]["ratio"]["rps"], 0.85)
        self.assertAlmostEqual(rs[2]["ratio"]["bulk"], 0.2)

    def test_targets_met(self) -> None:
        t = targets(tunnel.derive(self.results()))
        self.assertTrue(t["bulk Gbit/s >= 0.6x direct"]["met"])
        self.assertTrue(t["bulk Gbit/s >= 3.0x upstream ANP"]["met"])  # 13 / 4 = 3.25
        self.assertTrue(t["requests/s >= 0.8x direct"]["met"])
        self.assertTrue(t["memory per idle tunnel at 10,000 <= 8 KiB"]["met"])
        self.assertTrue(t["slow-reader isolation >= 0.9"]["met"])

    def test_each_of_our_transports_gets_its_own_targets(self) -> None:
        rs = self.results() + [result("quic", 10.0, 70_000, [(1000, 1000, 9.0)], 0.97)]
        derived = tunnel.derive(rs)
        q = targets(derived, "quic")
        self.assertFalse(q["bulk Gbit/s >= 0.6x direct"]["met"])  # 10 / 20 = 0.5
        self.assertFalse(q["requests/s >= 0.8x direct"]["met"])
        self.assertFalse(q["memory per idle tunnel at 1,000 <= 8 KiB"]["met"])
        self.assertTrue(q["slow-reader isolation >= 0.9"]["met"])
        self.assertIn("konnectivity (ours, QUIC): 0.97", q["slow-reader isolation >= 0.9"]["text"])
        self.assertTrue(targets(derived)["bulk Gbit/s >= 0.6x direct"]["met"])

    def test_targets_missed_and_unmeasured(self) -> None:
        rs = self.results()
        rs[1] = result("ours", 10.0, 70_000, [(1000, 900, 6.0)], 0.5)
        del rs[2]  # no upstream row
        t = targets(tunnel.derive(rs))
        self.assertFalse(t["bulk Gbit/s >= 0.6x direct"]["met"])
        self.assertIsNone(t["bulk Gbit/s >= 3.0x upstream ANP"]["met"])
        self.assertFalse(t["requests/s >= 0.8x direct"]["met"])
        # within the limit per tunnel, but it did not hold them all
        self.assertFalse(t["memory per idle tunnel at 1,000 <= 8 KiB"]["met"])
        self.assertFalse(t["slow-reader isolation >= 0.9"]["met"])

    def test_isolation_needs_every_stream_and_the_stalled_reader(self) -> None:
        rs = self.results()
        rs[1]["isolation"]["opened"] = 60
        t = targets(tunnel.derive(rs))
        self.assertFalse(t["slow-reader isolation >= 0.9"]["met"])

    def test_no_idle_is_undetermined(self) -> None:
        rs = self.results()
        rs[1] = result("ours", 13.0, 85_000)
        t = targets(tunnel.derive(rs))
        self.assertIsNone(t["memory per idle tunnel <= 8 KiB"]["met"])


class Idle(unittest.TestCase):
    def test_idle_at_and_largest(self) -> None:
        r = result("ours", 1.0, 1.0, [(1000, 1000, 6.0), (10000, 9000, 7.0)])
        self.assertEqual(tunnel.idle_at(r, 1000)["kib_per_tunnel"], 6.0)
        self.assertIsNone(tunnel.idle_at(r, 5))
        self.assertEqual(tunnel.idle_largest(r)["target"], 10000)
        self.assertIsNone(tunnel.idle_largest(result("direct", 1.0, 1.0)))


class Rounds(unittest.TestCase):
    def test_dial_p50_is_lifted_for_merge_rounds(self) -> None:
        rounds = [[result("direct", 1.0, 1.0)], [result("direct", 2.0, 1.0)]]
        rounds[1][0]["dial"]["dial"]["p50_ms"] = 0.05
        tunnel.add_dial_p50(rounds)
        merged = tunnel.common.merge_rounds(rounds, tunnel.MEDIAN_KEY, once=("idle", "isolation"))
        self.assertEqual(merged[0]["rounds"]["dial"], [0.05, 0.1])


class Render(unittest.TestCase):
    def test_markdown_and_svg(self) -> None:
        rs = Derive().results()
        rs.append({"row": "rathole", "label": "rathole", "status": "missing", "errors": ["not installed"],
                   "background": {}})
        meta = {"date": "d", "commit": "c", "kernel": "k", "cpu_model": "m", "cores": 2, "mode": "quick",
                "duration_s": 2, "warmup_s": 0, "bulk_gib": 0.125, "dials": 200, "idle_counts": [1000, 10000],
                "iso_streams": 100, "iso_seconds": 2.0, "elapsed_s": 1.0, "pinning": "p", "agent_plane": "a",
                "versions": {"wrk": "4"}}
        derived = tunnel.derive(rs)
        md = tunnel.render_md(meta, rs, derived)
        self.assertIn("| konnectivity (ours, gRPC) | 13.00 (0.65×) | 85,000 (0.85×) |", md)
        self.assertIn("**met**", md)
        self.assertIn("| rathole | missing |", md)
        self.assertTrue(tunnel.svg(rs, derived, meta).endswith("</svg>"))


if __name__ == "__main__":
    unittest.main()
