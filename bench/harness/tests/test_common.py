"""common: merge_rounds (the median round, taken whole), the "Rounds" table, other_work."""

from __future__ import annotations

import unittest
from typing import Any

from .. import common

MEDIAN_KEY = {"keepalive": "per_s", "newconn": "per_s"}


def run(per_s: float, cpu: float) -> dict[str, Any]:
    """One measure of one round: the figure merge_rounds sorts by, and one it must carry along."""
    return {"per_s": per_s, "cpu_us_per_req": cpu}


def row(name: str = "a", status: str = "ok", errors: list[str] | None = None, **measures: Any) -> dict[str, Any]:
    res: dict[str, Any] = {"row": name, "label": name.upper(), "status": status, "errors": errors or [],
                           "background": {k: 0.01 for k in measures}}
    res.update(measures)
    return res


def merge(*rounds: list[dict[str, Any]], once: tuple[str, ...] = (), **kw: Any) -> list[dict[str, Any]]:
    return common.merge_rounds(list(rounds), MEDIAN_KEY, once, **kw)


class MergeRounds(unittest.TestCase):
    def test_one_round_is_returned_as_it_is(self) -> None:
        only = [row(keepalive=run(1, 2), newconn=run(3, 4))]
        self.assertIs(merge(only), only)
        self.assertNotIn("rounds", only[0])

    def test_odd_count_takes_the_median_run_whole(self) -> None:
        runs = [run(300, 30), run(100, 10), run(200, 20)]
        got = merge(*([row(keepalive=k, newconn=run(1, 1))] for k in runs))[0]
        self.assertIs(got["keepalive"], runs[2])  # the run itself: its CPU figure comes along
        self.assertEqual(got["keepalive"]["cpu_us_per_req"], 20)
        self.assertEqual(got["rounds"]["keepalive"], [100, 200, 300])
        self.assertEqual(got["status"], "ok")
        self.assertEqual(got["failed_measures"], [])

    def test_each_measure_has_its_own_median_round(self) -> None:
        rounds = [[row(keepalive=run(10, 1), newconn=run(30, 1))],
                  [row(keepalive=run(20, 2), newconn=run(10, 2))],
                  [row(keepalive=run(30, 3), newconn=run(20, 3))]]
        got = merge(*rounds)[0]
        self.assertIs(got["keepalive"], rounds[1][0]["keepalive"])
        self.assertIs(got["newconn"], rounds[2][0]["newconn"])

    def test_even_count_takes_the_lower_middle(self) -> None:
        two = merge([row(keepalive=run(200, 2), newconn=run(1, 1))], [row(keepalive=run(100, 1), newconn=run(1, 1))])
        self.assertEqual(two[0]["keepalive"]["per_s"], 100)
        four = merge(*([row(keepalive=run(v, v), newconn=run(1, 1))] for v in (40, 10, 30, 20)))
        self.assertEqual(four[0]["keepalive"]["per_s"], 20)
        self.assertEqual(four[0]["rounds"]["keepalive"], [10, 20, 30, 40])

    def test_spread_lists_another_figure_sorted_on_its_own(self) -> None:
        rounds = [[row(keepalive=run(10, 5), newconn=run(1, 1))],
                  [row(keepalive=run(20, None), newconn=run(1, 1))],  # type: ignore[arg-type]
                  [row(keepalive=run(30, 1), newconn=run(1, 1))]]
        got = merge(*rounds, spread={"cpu": ("keepalive", "cpu_us_per_req")})[0]
        self.assertEqual(got["rounds"]["cpu"], [1, 5])  # a figure a round lacks is left out
        self.assertEqual(got["rounds"]["keepalive"], [10, 20, 30])

    def test_measure_failing_in_one_round_takes_the_median_of_the_others(self) -> None:
        rounds = [[row(keepalive=run(30, 3), newconn=run(1, 1))],
                  [row(status="partial", errors=["keepalive: wrk exited 1"], newconn=run(2, 2))],
                  [row(keepalive=run(10, 1), newconn=run(3, 3))]]
        got = merge(*rounds)[0]
        self.assertEqual(got["keepalive"]["per_s"], 10)  # lower of the two that ran
        self.assertEqual(got["rounds"]["keepalive"], [10, 30])
        self.assertEqual(got["failed_measures"], [])
        self.assertEqual(got["status"], "partial")  # every figure is there, but a round failed
        self.assertEqual(got["errors"], ["keepalive: wrk exited 1"])

    def test_measure_failing_in_every_round_is_missing(self) -> None:
        rounds = [[row(status="partial", errors=[f"newconn: round {i}"], keepalive=run(i, i))] for i in (1, 2, 3)]
        got = merge(*rounds)[0]
        self.assertNotIn("newconn", got)
        self.assertEqual(got["failed_measures"], ["newconn"])
        self.assertEqual(got["status"], "partial")
        self.assertEqual(got["errors"], ["newconn: round 1", "newconn: round 2", "newconn: round 3"])
        nothing = merge(*([row(status="failed")] for _ in range(3)))[0]
        self.assertEqual(nothing["status"], "failed")
        self.assertEqual(nothing["failed_measures"], ["keepalive", "newconn"])

    def test_once_measures_come_from_round_one(self) -> None:
        idle = {"kib_per_conn": 7.0}
        first = row(keepalive=run(1, 1), newconn=run(1, 1), idle=idle)
        first["background"]["idle"] = 0.25
        later = row(keepalive=run(2, 2), newconn=run(2, 2))
        got = merge([first], [later], [later], once=("idle",))[0]
        self.assertIs(got["idle"], idle)
        self.assertEqual(got["background"]["idle"], 0.25)
        self.assertEqual(got["status"], "ok")
        # a row that never has the measure (direct has no idle test) does not need it
        direct = merge([later], [later], once=("idle",))[0]
        self.assertEqual(direct["status"], "ok")
        # a once measure that failed in round 1 is missing
        failed = row(status="partial", keepalive=run(1, 1), newconn=run(1, 1))
        failed["failed_measures"] = ["idle"]
        got = merge([failed], [later], [later], once=("idle",))[0]
        self.assertEqual((got["status"], got["failed_measures"]), ("partial", ["idle"]))

    def test_background_is_the_busiest_round(self) -> None:
        rounds = [[row(keepalive=run(i, i), newconn=run(i, i))] for i in (1, 2, 3)]
        for rnd, busy in zip(rounds, (0.05, 0.30, 0.10)):
            rnd[0]["background"]["keepalive"] = busy
        self.assertEqual(merge(*rounds)[0]["background"]["keepalive"], 0.30)

    def test_missing_rows_stay_missing(self) -> None:
        rounds = [[row("peer", status="missing", errors=["haproxy not installed"]),
                   row("ours", keepalive=run(i, i), newconn=run(i, i))] for i in (1, 2)]
        peer, ours = merge(*rounds)
        self.assertEqual(peer["status"], "missing")
        self.assertNotIn("failed_measures", peer)
        self.assertEqual(peer["errors"], ["haproxy not installed"] * 2)
        self.assertEqual((ours["row"], ours["keepalive"]["per_s"]), ("ours", 1))

    def test_rounds_are_not_changed(self) -> None:
        rounds = [[row(keepalive=run(i, i), newconn=run(i, i))] for i in (3, 1, 2)]
        before = repr(rounds)
        merge(*rounds)
        self.assertEqual(repr(rounds), before)


class RoundsTable(unittest.TestCase):
    COLUMNS = [("keep-alive req/s", "keepalive", ",.0f"), ("CPU", "cpu", ".2f")]

    def test_nothing_after_one_round(self) -> None:
        lines: list[str] = []
        common.rounds_table(lines, [row(keepalive=run(1, 1))], self.COLUMNS)
        self.assertEqual(lines, [])

    def test_every_round_sorted_with_placement(self) -> None:
        got = merge(*([row(keepalive=run(v, v / 1000), newconn=run(1, 1))] for v in (12000, 9000, 10500)),
                    spread={"cpu": ("keepalive", "cpu_us_per_req")})
        got[0]["placement"] = "steered"
        lines: list[str] = []
        common.rounds_table(lines, got, self.COLUMNS + [("other", "absent", ".0f")], first="server", placement=True)
        self.assertEqual(lines, [
            "## Rounds (sorted; the median is reported)",
            "",
            "| server | placement | keep-alive req/s | CPU | other |",
            "|---|---|---|---|---|",
            "| A | steered | 9,000, 10,500, 12,000 | 9.00, 10.50, 12.00 | – |",
            "",
        ])


class OtherWork(unittest.TestCase):
    def meter(self, busy: float) -> dict[str, float]:
        return {"busy_s": busy, "irq_s": 0.5, "steal_s": 0.25, "proxy_cpu_s": 1.0, "backend_cpu_s": 2.0,
                "load_cpu_s": 3.0}

    def test_what_is_none_of_ours_is_other_work(self) -> None:
        r = self.meter(8.0)
        common.other_work(r)
        self.assertAlmostEqual(r["foreign_s"], 1.25)
        self.assertAlmostEqual(r["foreign_frac"], 1.25 / 8.0)

    def test_never_negative_and_no_share_of_nothing(self) -> None:
        r = self.meter(5.0)  # tick sampling can account more to the parts than to the whole
        common.other_work(r)
        self.assertEqual((r["foreign_s"], r["foreign_frac"]), (0.0, 0.0))
        r = self.meter(0.0)
        common.other_work(r)
        self.assertEqual(r["foreign_frac"], 0.0)


class Report(unittest.TestCase):
    def test_fmt(self) -> None:
        self.assertEqual(common.fmt(None), "–")
        self.assertEqual(common.fmt(1234567.891), "1,234,568")
        self.assertEqual(common.fmt(0.5, 2), "0.50")

    def test_figure(self) -> None:
        r = row(keepalive=run(7, 8))
        r["newconn"] = None
        self.assertEqual(common.figure(r, "keepalive", "per_s"), 7)
        self.assertIsNone(common.figure(r, "keepalive", "absent"))
        self.assertIsNone(common.figure(r, "newconn", "per_s"))
        self.assertIsNone(common.figure(None, "keepalive", "per_s"))


if __name__ == "__main__":
    unittest.main()
