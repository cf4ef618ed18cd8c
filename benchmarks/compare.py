"""actorlib, Ray and the raw floor side by side: workloads W1-W7 of DESIGN.md (and DAG), in one run.

Each repetition runs every system once, one after the other (actorlib, Ray,
floor, actorlib, Ray, floor, ...), each in its own processes, so machine
noise lands on all of them alike:

- actorlib: ``benchmarks/run.py``, also DAG (a 2-stage compiled graph passing
  a tiny tensor, timed against W1 interleaved; actorlib only); it also times
  the floor's W1 and W2 loops itself, alternating with its own, for ratios
  under the same noise (separate processes here differ by up to ~20 %);
- Ray: ``benchmarks/ray_workloads.py``, the same workloads measured the same
  way, when ``ray`` is installed (``pip install -e '.[bench]'``); skipped with
  a note otherwise;
- the floor: ``benchmarks/floor.py``, bare blocking pyzmq + msgpack between
  processes, and raw torch.distributed gloo send/recv for W7.

Prints every figure as a JSON line (with ``"rep"``), then the medians as
JSON lines (``"stat": "median"``), then a table of medians and ratios
(actorlib/Ray, actorlib/floor) against the targets of issue #8.

    python benchmarks/compare.py --repeat 3 --markdown benchmarks/compare.md
    python benchmarks/compare.py -w W1,W2 --systems actorlib,ray
    python benchmarks/compare.py --tiny      # a quick check that it all runs
"""

from __future__ import annotations

import argparse
import ast
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKLOADS = ["W1", "W2", "W3", "W4", "W5", "W6", "W7", "DAG"]
ACTORLIB_ONLY = {"DAG"}  # a compiled graph's per-execution time against actorlib's own W1 (issue #6's target)
SYSTEMS = ["actorlib", "ray", "floor"]
SYSTEM_NAMES = {"actorlib": "actorlib", "ray": "ray", "floor": "floor-blocking"}  # the "system" of their JSON lines
SCRIPTS = {"actorlib": "run.py", "ray": "ray_workloads.py", "floor": "floor.py"}
TAG_VAR = "ACTORLIB_COMPARE_TAG"  # set in each run's environment: whatever carries it afterwards is a leftover of that run


@dataclass
class Target:
    against: str  # "ray", "floor", or "value" (an absolute figure)
    factor: float
    text: str


@dataclass
class Row:
    workload: str
    metric: str
    label: str
    lower_is_better: bool
    targets: list[Target] = field(default_factory=list)


# The figures of the table and issue #8's targets, as ratios actorlib/other in the figure's own terms.
ROWS = [
    Row("W1", "p50_us", "W1 sync call p50", True, [Target("ray", 0.25, "≤ 0.25× Ray"), Target("floor", 1.0, "≤ 1× floor")]),
    # run.py times the floor's loop too, block by block between its own: the same machine state for both
    Row("W1", "ratio_to_floor", "W1 / floor (interleaved)", True, [Target("value", 1.0, "≤ 1× floor")]),
    Row("W1", "p99_us", "W1 sync call p99", True),
    Row("W2", "calls_per_s", "W2 async pipelined", False, [Target("ray", 15, "≥ 15× Ray"), Target("floor", 1.0, "≥ 1× floor")]),
    Row("W2", "ratio_to_floor", "W2 / floor (interleaved)", False, [Target("value", 1.0, "≥ 1× floor")]),
    Row("W3", "p50_us", "W3 fan-out ×4 p50", True, [Target("ray", 0.12, "≤ 0.12× Ray")]),
    Row("W3", "ratio_to_w1", "W3 / W1 (interleaved)", True),
    Row("W4", "in_process_s", "W4 4 actors ready, in process", True, [Target("ray", 1 / 12, "≤ 1/12 × Ray")]),
    Row("W4", "whole_process_s", "W4 4 actors ready, whole process", True),
    Row("W5", "in_mib_per_s", "W5 64 MiB in", False, [Target("value", 1500, "≥ 1 500 MiB/s")]),
    Row("W5", "out_mib_per_s", "W5 64 MiB out", False, [Target("value", 1500, "≥ 1 500 MiB/s")]),
    Row("W6", "items_per_s", "W6 generator items", False, [Target("ray", 9, "≥ 9× Ray")]),
    Row("W7", "gib_per_s", "W7 64 MiB tensor A→B", False, [Target("floor", 0.95, "≥ 0.95× floor (gloo)")]),
    # run.py also times raw gloo itself, round by round between its own rounds: the same machine state for both
    Row("W7", "ratio_to_raw", "W7 / raw gloo (interleaved)", False, [Target("value", 0.95, "≥ 0.95× raw gloo")]),
    Row("DAG", "p50_us", "DAG 2 stages, tiny tensor, p50", True),
    Row("DAG", "ratio_to_w1", "DAG / W1 (interleaved)", True, [Target("value", 2.0, "≤ 2× W1")]),
]
LABELS = {"ray": "Ray", "floor": "floor"}
UNITS = {"us": "µs", "calls/s": "/s", "items/s": "/s", "MiB/s": "MiB/s", "GiB/s": "GiB/s", "s": "s", "x": "×"}


def fmt_value(value: float, unit: str) -> str:
    if unit == "GiB/s" or unit == "x" or (unit == "s" and value < 100):
        text = f"{value:.2f}"
    else:
        text = f"{value:,.0f}".replace(",", " ")
    return f"{text} {UNITS.get(unit, unit)}".replace(" ×", "×")


def fmt_ratio(ratio: float) -> str:
    return f"{ratio:.3f}×" if ratio < 0.1 else f"{ratio:.2f}×" if ratio < 10 else f"{ratio:.1f}×"


def actorlib_workloads(timeout: float) -> tuple[list[str], str]:
    """The workloads run.py knows, from its own error message for an unknown one (without running anything)."""
    out = subprocess.run(
        [sys.executable, os.path.join(HERE, "run.py"), "-w", "?"],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env("probe"),
    )
    match = re.search(r"known: (\[[^\]]*\])", out.stderr)
    if match:
        return [w for w in ast.literal_eval(match.group(1)) if w in WORKLOADS], ""
    return WORKLOADS[:6], "could not ask run.py which workloads it has; assumed W1-W6"


def child_env(tag: str) -> dict[str, str]:
    path = ROOT + os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ROOT
    return {**os.environ, "PYTHONPATH": path, TAG_VAR: tag, "RAY_USAGE_STATS_ENABLED": "0"}


def tagged_processes(tag: str) -> list[int]:
    needle = f"{TAG_VAR}={tag}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        found.append(int(entry))
            except OSError:
                pass
    return found


def kill_leftovers(tag: str) -> list[str]:
    """Kill, by pid, every process that still carries this run's tag; return what they were."""
    killed = []
    for _ in range(3):
        pids = tagged_processes(tag)
        if not pids:
            break
        for pid in pids:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
                os.kill(pid, signal.SIGKILL)
                killed.append(f"{pid} {cmd[:80]}")
            except OSError:
                pass
        time.sleep(0.5)
    return killed


@dataclass
class Run:
    system: str
    rep: int
    rows: list[dict[str, Any]]
    seconds: float
    error: str = ""
    leftovers: list[str] = field(default_factory=list)


def run_system(system: str, workloads: list[str], rep: int, tiny: bool, timeout: float) -> Run:
    tag = f"{uuid.uuid4().hex[:12]}-{system}-{rep}"
    cmd = [sys.executable, os.path.join(HERE, SCRIPTS[system]), "-w", ",".join(workloads)] + (["--tiny"] if tiny else [])
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    error = ""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=child_env(tag), cwd=ROOT)
        stdout, stderr = out.stdout, out.stderr
        if out.returncode != 0:
            error = f"exit code {out.returncode}"
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout or ""
        stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
        error = f"timed out after {timeout:.0f} s"
    finally:
        leftovers = kill_leftovers(tag)
    for line in stdout.splitlines():
        if line.startswith("{"):
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if "workload" in row and row.get("system") == SYSTEM_NAMES[system]:
                rows.append({**row, "rep": rep})
    if error:
        error += ": " + " | ".join(stderr.strip().splitlines()[-5:])
    return Run(system, rep, rows, time.perf_counter() - t0, error, leftovers)


def medians(runs: list[Run]) -> dict[tuple[str, str, str], dict[str, Any]]:
    """(system, workload, metric) -> the median over the repetitions, with every value."""
    values: dict[tuple[str, str, str], list[float]] = {}
    units: dict[tuple[str, str, str], str] = {}
    for run in runs:
        for row in run.rows:
            key = (run.system, row["workload"], row["metric"])
            values.setdefault(key, []).append(row["value"])
            units[key] = row["unit"]
    return {
        key: {
            "system": SYSTEM_NAMES[key[0]],
            "workload": key[1],
            "metric": key[2],
            "value": round(statistics.median(vals), 2),
            "unit": units[key],
            "stat": "median",
            "values": vals,
        }
        for key, vals in values.items()
    }


def ratio_met(row: Row, target: Target, ratio: float | None, value: float | None) -> str:
    if target.against == "value":
        if value is None:
            return "—"
        return "yes" if (value <= target.factor if row.lower_is_better else value >= target.factor) else "NO"
    if ratio is None:
        return "—"
    met = ratio <= target.factor if row.lower_is_better else ratio >= target.factor
    return "yes" if met else "NO"


def table(
    med: dict[tuple[str, str, str], dict[str, Any]], workloads: list[str]
) -> tuple[list[str], list[list[str]], list[list[str]]]:
    header = ["figure", "actorlib", "Ray", "floor", "actorlib/Ray", "actorlib/floor", "target", "met"]
    body = []
    shown = set()
    for row in ROWS:
        if row.workload not in workloads:
            continue
        cells = {s: med.get((s, row.workload, row.metric)) for s in SYSTEMS}
        if not any(cells.values()):
            continue
        shown.add((row.workload, row.metric))
        unit = next(c["unit"] for c in cells.values() if c)
        mine = cells["actorlib"]
        ratios: dict[str, float | None] = {}
        for other in ("ray", "floor"):
            theirs = cells[other]
            ratios[other] = mine["value"] / theirs["value"] if mine and theirs and theirs["value"] else None
        met = []
        for target in row.targets:
            verdict = ratio_met(row, target, ratios.get(target.against), mine["value"] if mine else None)
            met.append(f"{verdict} ({LABELS[target.against]})" if target.against != "value" else verdict)
        body.append(
            [
                row.label,
                *(fmt_value(cells[s]["value"], unit) if cells[s] else "—" for s in SYSTEMS),
                *(fmt_ratio(ratios[o]) if ratios[o] is not None else "—" for o in ("ray", "floor")),
                "; ".join(t.text for t in row.targets),
                "; ".join(met),
            ]
        )
    # every other figure the systems reported, medians only
    others = []
    for workload, metric in sorted({(k[1], k[2]) for k in med} - shown):
        if workload not in workloads:
            continue
        cells = {s: med.get((s, workload, metric)) for s in SYSTEMS}
        unit = next(c["unit"] for c in cells.values() if c)
        others.append([f"{workload} {metric}", *(fmt_value(cells[s]["value"], unit) if cells[s] else "—" for s in SYSTEMS)])
    return header, body, others


def every_repetition(med: dict[tuple[str, str, str], dict[str, Any]], workloads: list[str]) -> list[list[str]]:
    """One row per figure of the main table: each system's values, repetition by repetition."""
    body = []
    for row in ROWS:
        cells = {s: med.get((s, row.workload, row.metric)) for s in SYSTEMS}
        if row.workload in workloads and any(cells.values()):
            fmt = lambda c: " / ".join(f"{v:.2f}" if c["unit"] in ("s", "GiB/s", "x") else f"{v:.0f}" for v in c["values"])  # noqa: E731
            body.append(
                [
                    f"{row.label} ({UNITS.get(next(c for c in cells.values() if c)['unit'])})",
                    *(fmt(cells[s]) if cells[s] else "—" for s in SYSTEMS),
                ]
            )
    return body


def text_table(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))  # noqa: E731
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in body)])


def md_table(header: list[str], body: list[list[str]]) -> str:
    align = ["---"] + ["---:"] * (len(header) - 1)
    if header[-2:] == ["target", "met"]:
        align[-2:] = ["---", "---"]
    return "\n".join("| " + " | ".join(r) + " |" for r in [header, align, *body])


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kib = int(next(line.split()[1] for line in f if line.startswith("MemTotal:")))
            mem = f"{kib / (1 << 20):.0f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory": mem,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        **{name: version(name) for name in ("ray", "torch", "pyzmq", "msgpack", "numpy", "uvloop")},
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def markdown(
    info: dict[str, str],
    command: str,
    repeat: int,
    header: list[str],
    body: list[list[str]],
    others: list[list[str]],
    reps: list[list[str]],
    notes: list[str],
) -> str:
    parts = [
        "# actorlib, Ray and the raw floor, side by side",
        "",
        f"`{command}` on {info['date']}: each of {repeat} repetition{'s' if repeat > 1 else ''} ran actorlib (`benchmarks/run.py`), "
        "Ray (`benchmarks/ray_workloads.py`) and the raw floor (`benchmarks/floor.py`: blocking pyzmq + msgpack "
        "between processes, gloo send/recv for W7) one after the other, each in its own processes; "
        "the figures are medians over the repetitions, the ratios actorlib/Ray and actorlib/floor of those medians.",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory']}, {info['os']}; Python {info['python']}; "
        f"ray {info['ray']}, torch {info['torch']}, pyzmq {info['pyzmq']}, msgpack {info['msgpack']}, "
        f"numpy {info['numpy']}, uvloop {info['uvloop']}. Load average (1 min) {info['load_start']} at the start, "
        f"{info['load_end']} at the end: the machine is shared, so read the ratios of one run rather than absolute figures.",
        "",
        md_table(header, body),
        "",
        "Each system ran with its defaults: actorlib with CURVE on every socket and large buffers through "
        "`/dev/shm`; Ray with `ray.init(num_cpus=4, include_dashboard=False)` (token authentication on, as "
        "Ray 2.60 has it by default), a sync actor for W1/W3/W5/W6, an async actor for W2, its object store for W5 "
        "and W7. Targets are issue #8's; `met` compares actorlib's median with the other system's median of the same run.",
    ]
    if others:
        parts += ["", "Other figures (medians):", "", md_table(["figure", "actorlib", "Ray", "floor"], others)]
    if reps:
        parts += ["", "Every repetition, in the order run:", "", md_table(["figure", "actorlib", "Ray", "floor"], reps)]
    if notes:
        parts += ["", "Notes:", "", *(f"- {n}" for n in notes)]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-w", "--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="some of: actorlib, ray, floor")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions of every system (default 3)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: checks that everything runs, measures nothing")
    parser.add_argument("--markdown", metavar="PATH", help="also write the table as Markdown, with the machine")
    parser.add_argument("--timeout", type=float, help="seconds for one system's run (default 1200, 300 with --tiny)")
    args = parser.parse_args(argv)
    chosen = [w.strip().upper() for w in args.workloads.split(",") if w.strip()]
    systems = [s.strip().lower() for s in args.systems.split(",") if s.strip()]
    if not set(chosen) <= set(WORKLOADS):
        parser.error(f"unknown workloads {sorted(set(chosen) - set(WORKLOADS))}; known: {WORKLOADS}")
    if not set(systems) <= set(SYSTEMS) or not systems:
        parser.error(f"--systems takes some of {SYSTEMS}")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    timeout = args.timeout or (300.0 if args.tiny else 1200.0)
    notes: list[str] = ["--tiny: tiny sizes, the figures mean nothing"] if args.tiny else []

    plan: dict[str, list[str]] = {}
    if "actorlib" in systems:
        known, note = actorlib_workloads(timeout=120)
        notes += [note] if note else []
        plan["actorlib"] = [w for w in chosen if w in known]
        missing = [w for w in chosen if w not in known]
        if missing:
            notes.append(f"benchmarks/run.py has no {', '.join(missing)} yet: actorlib's figures for it are missing")
    if "ray" in systems:
        if importlib.util.find_spec("ray") is None:
            notes.append("Ray is not installed (`pip install -e '.[bench]'`): Ray's rows are skipped")
        else:
            plan["ray"] = [w for w in chosen if w not in ACTORLIB_ONLY]
    if "floor" in systems:
        plan["floor"] = [w for w in chosen if w not in ACTORLIB_ONLY]
    plan = {s: w for s, w in plan.items() if w}
    for note in notes:
        print(f"note: {note}", file=sys.stderr, flush=True)

    load_start = os.getloadavg()[0]
    runs: list[Run] = []
    for rep in range(1, args.repeat + 1):
        for system, workloads in plan.items():
            print(f"[{rep}/{args.repeat}] {system}: {','.join(workloads)} ...", file=sys.stderr, flush=True)
            run = run_system(system, workloads, rep, args.tiny, timeout)
            runs.append(run)
            for row in run.rows:
                print(json.dumps(row), flush=True)
            print(
                f"[{rep}/{args.repeat}] {system}: {run.seconds:.0f} s{' FAILED: ' + run.error if run.error else ''}",
                file=sys.stderr,
                flush=True,
            )
            if run.error:
                notes.append(f"{system}, repetition {rep}, failed: {run.error}")
            if run.leftovers:
                notes.append(
                    f"{system}, repetition {rep}, left {len(run.leftovers)} process(es) behind (killed): {run.leftovers[:3]}"
                )

    med = medians(runs)
    for row in med.values():
        print(json.dumps(row), flush=True)
    header, body, others = table(med, chosen)
    print()
    print(text_table(header, body))
    if others:
        print()
        print(text_table(["other figure (median)", "actorlib", "Ray", "floor"], others))
    if notes:
        print()
        print("\n".join(f"note: {n}" for n in notes))
    if args.markdown:
        command = "python benchmarks/compare.py " + " ".join(argv if argv is not None else sys.argv[1:])
        info = {**machine(), "load_start": f"{load_start:.1f}", "load_end": f"{os.getloadavg()[0]:.1f}"}
        with open(args.markdown, "w") as f:
            f.write(markdown(info, command.strip(), args.repeat, header, body, others, every_repetition(med, chosen), notes))
    return 1 if any(run.error for run in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
