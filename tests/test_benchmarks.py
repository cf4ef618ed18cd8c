"""The benchmark runner works (tiny sizes); the figures themselves go in the notes, not in tests."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_runner_prints_json_lines_for_every_workload(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT, "ACTORLIB_TMPDIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--tiny"],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        check=True,
    )
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    figures = {(r["workload"], r["metric"]) for r in rows if "workload" in r}
    assert figures == {
        ("W1", "p50_us"),
        ("W1", "p99_us"),
        ("W2", "calls_per_s"),
        ("W3", "p50_us"),
        ("W3", "w1_p50_us_interleaved"),
        ("W3", "ratio_to_w1"),
        ("W4", "in_process_s"),
        ("W4", "whole_process_s"),
        ("W5", "in_mib_per_s"),
        ("W5", "out_mib_per_s"),
        ("W6", "items_per_s"),
        ("PG", "create_remove_per_s"),
    }
    assert all(r["value"] > 0 and r["system"] == "actorlib" for r in rows if "workload" in r)


def test_soak_and_idle_runner_reports_cpu_and_memory(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "soak.py"), "--tiny"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=True,
    )
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    idle = {r["metric"] for r in rows if r["workload"] == "IDLE"}
    assert {"cpu_pct workers (4)", "cpu_pct node agent", "cpu_pct fork servers"} <= idle
    soak = {r["metric"]: r["value"] for r in rows if r["workload"] == "SOAK"}
    assert soak["calls_and_items"] > 0 and soak["rss_end head"] > 0 and soak["rss_start workers"] > 0
