"""Idle cost and a soak: a standalone cluster left alone, then worked for minutes; CPU and memory per process.

    python benchmarks/soak.py                      # 20 s idle, 3 min of load
    python benchmarks/soak.py --minutes 10
    python benchmarks/soak.py --tiny               # a quick check that it runs

1. Starts a head (``actorlib start --head``) and one more node
   (``actorlib start --address``) in a private session root, and four
   detached actors on them.
2. Idle: measures the CPU time each process (head, node agent, fork servers,
   workers) uses over ``--idle-seconds``, as a percentage of one core: an
   idle cluster must not poll.
3. Soak: for ``--minutes``, this process (a driver joined by address) keeps
   making calls to the four actors, streaming from them, creating and killing
   short-lived actors and placement groups; the resident memory of the head
   and of every long-lived process is taken after a warm-up and at the end.

Prints one JSON object per figure, then a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def cli(env: dict[str, str], *args: str) -> str:
    return subprocess.run([sys.executable, "-m", "actorlib.cli", *args], env=env, check=True, capture_output=True, text=True, timeout=120).stdout


def emit(rows: list[dict[str, Any]], **row: Any) -> None:
    row = {"system": "actorlib", **row}
    rows.append(row)
    print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    parser.add_argument("--tiny", action="store_true", help="a few seconds of each phase")
    args = parser.parse_args()
    if args.tiny:
        args.minutes, args.idle_seconds = 0.1, 2.0

    root = tempfile.mkdtemp(prefix="actorlib-soak-")
    env = {**os.environ, "ACTORLIB_TMPDIR": root, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    os.environ["ACTORLIB_TMPDIR"] = root  # this process is a driver of that cluster
    cli(env, "start", "--head", "--host", "127.0.0.1", "--port", "0", "--num-cpus", "4")
    cli(env, "start", "--address", "auto", "--num-cpus", "4", "--resources", '{"second": 4}')
    rows: list[dict[str, Any]] = []
    try:
        run(args, env, rows)
    finally:
        cli(env, "stop")
    print()
    for r in rows:
        print(f"{r['workload']:6} {r['metric']:28} {r['value']:>10} {r['unit']}")


def run(args: argparse.Namespace, env: dict[str, str], rows: list[dict[str, Any]]) -> None:
    import actorlib

    @actorlib.remote(num_cpus=0)
    class Echo:
        def echo(self, x: Any) -> Any:
            return x

        def stream(self, n: int) -> Any:
            yield from range(n)

    actorlib.init(address="auto", log_to_driver=False)
    actors = [
        Echo.options(name=f"echo{i}", lifetime="detached", resources={"second": 1} if i % 2 else None).remote()
        for i in range(4)
    ]
    actorlib.get([a.echo.remote(0) for a in actors], timeout=60)
    started = [json.load(open(os.path.join(os.environ["ACTORLIB_TMPDIR"], "started", n))) for n in os.listdir(os.path.join(os.environ["ACTORLIB_TMPDIR"], "started"))]
    head = next(i["pid"] for i in started if i["role"] == "head")
    node = next(i["pid"] for i in started if i["role"] == "node")
    status = json.loads(cli(env, "status", "--json"))
    workers = [a["pid"] for a in status["actors"] if a["state"] == "ALIVE"]
    forkservers = [p for p in children(head) + children(node) if p not in workers]
    groups = {"head (+ its node agent)": [head], "node agent": [node], "fork servers": forkservers, "workers (4)": workers}

    # -- idle ---------------------------------------------------------------------------
    time.sleep(1.0)  # let start-up work settle before measuring
    before = {name: sum(cpu_seconds(p) for p in pids) for name, pids in groups.items()}
    t0 = time.monotonic()
    time.sleep(args.idle_seconds)
    elapsed = time.monotonic() - t0
    for name, pids in groups.items():
        used = sum(cpu_seconds(p) for p in pids) - before[name]
        emit(rows, workload="IDLE", metric=f"cpu_pct {name}", value=round(100 * used / elapsed, 3), unit="% of a core")

    # -- soak ---------------------------------------------------------------------------
    def work(seconds: float) -> int:
        calls = 0
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end:
            refs = [actors[j % 4].echo.remote(j) for j in range(200)]
            assert actorlib.get(refs, timeout=60) == list(range(200))
            assert [actorlib.get(r) for r in actors[i % 4].stream.remote(100)] == list(range(100))
            short = Echo.remote()
            actorlib.get(short.echo.remote(1), timeout=60)
            actorlib.kill(short)
            pg = actorlib.placement_group([{"CPU": 1}] * 2)
            pg.wait(30)
            actorlib.remove_placement_group(pg)
            calls += 200 + 100 + 1
            i += 1
        return calls

    watched = {"head": [head], "node agent": [node], "workers": workers}
    work(min(10.0, args.minutes * 60 / 4))  # warm-up: caches, allocator pools
    start_rss = {name: sum(rss_mib(p) for p in pids) for name, pids in watched.items()}
    t0 = time.monotonic()
    calls = work(args.minutes * 60)
    elapsed = time.monotonic() - t0
    end_rss = {name: sum(rss_mib(p) for p in pids) for name, pids in watched.items()}
    emit(rows, workload="SOAK", metric="seconds", value=round(elapsed, 1), unit="s")
    emit(rows, workload="SOAK", metric="calls_and_items", value=calls, unit="count")
    for name in watched:
        emit(rows, workload="SOAK", metric=f"rss_start {name}", value=round(start_rss[name], 1), unit="MiB")
        emit(rows, workload="SOAK", metric=f"rss_end {name}", value=round(end_rss[name], 1), unit="MiB")
    for a in actors:
        actorlib.kill(a)
    actorlib.shutdown()


if __name__ == "__main__":
    main()
