"""The benchmark runner works (tiny sizes); the figures themselves go in the notes, not in tests."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

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
        ("W1", "p50_us_interleaved"),
        ("W1", "floor_p50_us_interleaved"),
        ("W1", "ratio_to_floor"),
        ("W2", "calls_per_s"),
        ("W2", "calls_per_s_gather"),
        ("W2", "floor_calls_per_s_interleaved"),
        ("W2", "ratio_to_floor"),
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


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ray_and_floor_use_the_sizes_of_run_py():
    bench = os.path.join(ROOT, "benchmarks")
    run = _load("bench_run", os.path.join(bench, "run.py"))
    for other in (
        _load("bench_floor", os.path.join(bench, "floor.py")),
        _load("bench_ray", os.path.join(bench, "ray_workloads.py")),
    ):
        for mine, theirs in ((run.FULL, other.FULL), (run.TINY, other.TINY)):
            shared = {k for k in mine if k.startswith(("w1", "w2", "w3", "w4", "w5", "w6", "w7"))} & set(theirs)
            assert len(shared) >= 10
            assert {k: mine[k] for k in shared} == {k: theirs[k] for k in shared}, other.__file__


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_compare_runs_every_system_side_by_side(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT, "ACTORLIB_TMPDIR": str(tmp_path)}
    md = tmp_path / "compare.md"
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "compare.py"), "--tiny", "--repeat", "1", "--markdown", str(md)],
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    figures = {(r["system"], r["workload"], r["metric"]) for r in rows if r.get("rep") == 1}
    medians = {(r["system"], r["workload"], r["metric"]) for r in rows if r.get("stat") == "median"}
    assert figures == medians
    want = {
        ("W1", "p50_us"),
        ("W2", "calls_per_s"),
        ("W3", "p50_us"),
        ("W4", "in_process_s"),
        ("W5", "in_mib_per_s"),
        ("W6", "items_per_s"),
    }
    systems = ["actorlib", "floor-blocking"] + (["ray"] if importlib.util.find_spec("ray") else [])
    for system in systems:
        assert {(s, w, m) for s, w, m in figures if s == system} >= {(system, w, m) for w, m in want}, system
    assert ("floor-blocking", "W7", "gib_per_s") in figures
    assert ("actorlib", "DAG", "ratio_to_w1") in figures and not any(w == "DAG" and s != "actorlib" for s, w, _ in figures)
    if "ray" in systems:
        assert ("ray", "W7", "gib_per_s") in figures
    else:
        assert not any(s == "ray" for s, _, _ in figures)
        assert "Ray is not installed" in out.stdout
    # every figure is positive but W7's overhead_ms: a difference of medians, below zero when W7 beats raw gloo
    assert all(r["value"] > 0 for r in rows if "value" in r and r.get("metric") != "overhead_ms")
    assert all(math.isfinite(r["value"]) for r in rows if "value" in r)
    table = md.read_text()
    assert (
        "| W1 sync call p50 |" in table
        and "| W1 / floor (interleaved) |" in table
        and "| DAG / W1 (interleaved) |" in table
        and "Python" in table
        and "torch" in table
    )
