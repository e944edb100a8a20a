"""logs: the generated CRI lines and tree, the acknowledgement latencies, the counters, targets."""

from __future__ import annotations

import random
import re
import tempfile
import unittest
from pathlib import Path

from .. import logs


class CriLines(unittest.TestCase):
    def test_timestamp_is_rfc3339_with_nanoseconds(self) -> None:
        self.assertEqual(logs.rfc3339_nanos(1_700_000_000_123_456_789), "2023-11-14T22:13:20.123456789Z")
        self.assertEqual(logs.rfc3339_nanos(0), "1970-01-01T00:00:00.000000000Z")

    def test_line_is_full_cri_with_its_sequence_number(self) -> None:
        rnd = random.Random(1)
        for seq in (0, 1, 999_999, 4_999_999):
            text = logs.apiserver_line(seq, rnd)
            self.assertIn(f" seq={seq} ;", text)
            self.assertEqual(re.findall(r"seq=(\d+) ;", text), [str(seq)])
            self.assertTrue(100 <= len(text) <= 220, len(text))
            line = logs.cri_line(1_000, "stdout", text)
            self.assertRegex(line, r"^\S+Z stdout F I1206 .*\n$")
            self.assertEqual(line.count("\n"), 1)

    def test_tree_spreads_containers_over_two_shoots_and_the_seed(self) -> None:
        with tempfile.TemporaryDirectory() as d:
            root = Path(d)
            written = logs.write_files(root, 6, 600)
            files = sorted(root.glob("*/*/0.log"))
            self.assertEqual(len(files), 6)
            namespaces = {f.parent.parent.name.split("_")[0] for f in files}
            self.assertEqual(namespaces, set(logs.NAMESPACES))
            self.assertEqual(sum(f.stat().st_size for f in files), written)
            seqs = sorted(int(s) for f in files for s in re.findall(r"seq=(\d+) ;", f.read_text()))
            self.assertEqual(seqs, list(range(600)))
            for f in files:
                pod_dir = f.parent.parent.name.split("_")
                self.assertEqual(len(pod_dir), 3, f)  # <namespace>_<pod>_<uid>


class Latency(unittest.TestCase):
    def test_fifo_reading_of_the_counter(self) -> None:
        writes = [0.0, 0.1, 0.2, 0.3]
        acks = [(0.05, 0), (0.15, 1), (0.35, 3), (0.5, 4)]
        got = logs.ack_latencies(writes, acks)
        self.assertEqual([round(x, 6) for x in got], [0.15, 0.25, 0.15, 0.2])

    def test_lines_never_counted_are_left_out(self) -> None:
        self.assertEqual(len(logs.ack_latencies([0.0, 1.0, 2.0], [(0.5, 1)])), 1)
        self.assertEqual(logs.ack_latencies([0.0], []), [])

    def test_percentile_nearest_rank(self) -> None:
        vals = [float(i) for i in range(1, 101)]
        self.assertEqual(logs.percentile(vals, 50), 50.0)
        self.assertEqual(logs.percentile(vals, 99), 99.0)
        self.assertEqual(logs.percentile([3.0], 99), 3.0)
        with self.assertRaises(ValueError):
            logs.percentile([], 50)


class Counters(unittest.TestCase):
    def test_prometheus_sum_over_labels_and_total_suffix(self) -> None:
        text = """# HELP log_shipper_entries_accepted_total x
# TYPE log_shipper_entries_accepted_total counter
log_shipper_entries_accepted_total{store="seed"} 10
log_shipper_entries_accepted_total{store="shoot"} 32
log_shipper_entries_accepted_bytes_total{store="seed"} 999
otelcol_exporter_sent_log_records_total{exporter="otlp_http",otel_scope_name="x"} 5 1700000000
"""
        self.assertEqual(logs.parse_prom(text, "log_shipper_entries_accepted"), 42)
        self.assertEqual(logs.parse_prom(text, "otelcol_exporter_sent_log_records"), 5)
        self.assertEqual(logs.parse_prom(text, "missing"), 0)

    def test_proc_stat_cpu(self) -> None:
        stat = "123 (log shipper) S 1 2 3 4 5 6 7 8 9 10 " + f"{logs.common.CLK_TCK * 3} {logs.common.CLK_TCK} 0 0"
        self.assertAlmostEqual(logs.proc_stat_cpu(stat), 4.0)


class Targets(unittest.TestCase):
    def results(self, ours: float, peer: float, lost: int) -> dict:
        return {"throughput": {
            "log-shipper/null": {"lines_per_s": ours, "lines_per_cpu_s": ours},
            "otelcol/null": {"lines_per_s": peer, "lines_per_cpu_s": peer}},
            "loss": {"log-shipper": {"lost": lost}}}

    def test_met(self) -> None:
        d = logs.derive(self.results(1_200_000, 300_000, 0))
        self.assertEqual((d["target_lines_per_core"], d["target_vs_peer"], d["target_zero_loss"]),
                         ("met", "met", "met"))
        self.assertAlmostEqual(d["ratio_per_core"], 4.0)

    def test_not_met(self) -> None:
        d = logs.derive(self.results(900_000, 400_000, 3))
        self.assertEqual((d["target_lines_per_core"], d["target_vs_peer"], d["target_zero_loss"]),
                         ("not met", "not met", "not met"))

    def test_missing_peer(self) -> None:
        d = logs.derive({"throughput": {"log-shipper/null": {"lines_per_s": 2e6, "lines_per_cpu_s": 2e6}}})
        self.assertEqual(d["target_vs_peer"], "–")
        self.assertEqual(d["target_zero_loss"], "–")
        md = logs.render_md({"date": "d", "commit": "c", "kernel": "k", "cpu_model": "m", "cores": 2,
                             "pinning": "p", "versions": {}, "files": "f"},
                            {"throughput": {"log-shipper/null": {"lines": 1, "lines_per_s": 2e6, "lines_per_cpu_s": 2e6,
                                                                 "cpu_us_per_line": 0.5, "vmhwm_kib": 2048}}}, d)
        self.assertIn("| log-shipper | null sink | 2,000,000 |", md)

    def test_svg_is_well_formed_with_a_failed_row(self) -> None:
        import xml.dom.minidom
        meta = {"date": "d", "commit": "c", "files": "f <&>"}
        res = {"throughput": {"log-shipper/null": {"lines_per_cpu_s": 1.5e6, "vmhwm_kib": 20_000},
                              "otelcol/vlogs": {"error": "x", "vmhwm_kib": 0}}}
        doc = xml.dom.minidom.parseString(logs.svg(meta, res))
        self.assertEqual(doc.documentElement.tagName, "svg")


if __name__ == "__main__":
    unittest.main()
