"""Ray on the workloads of DESIGN.md, measured exactly as benchmarks/run.py measures actorlib.

Same sizes (tests/test_benchmarks.py checks they agree with run.py's), same
warm-up, same timing and percentiles; ``ray.init(num_cpus=4,
include_dashboard=False)`` as run.py's ``actorlib.init(num_cpus=4)``. Where
Ray needs another shape, it gets its best one:

- W1, W3, W5, W6 use a plain (sync) actor; W2 an async actor (``async def
  aping``) driven from asyncio, as run.py does (a window of refs awaited in
  order; and ``calls_per_s_gather``, a coroutine per call under a semaphore).
  Ray makes a whole actor async if one of its methods is, so the two live in
  two classes. W2 also reports a sync actor driven with ``ray.get`` on lists
  of 1000 (``calls_per_s_sync_lists``).
- W3's four actors sit one per bundle of a STRICT_PACK placement group of
  four 1-CPU bundles, which is what run.py's ``VirtualCluster([4])`` is.
- W6's generator is ``for i in range(n): yield i``: Ray 2.60 sends into
  generators, which ``yield from range(n)`` does not support.
- W7: a 64 MiB float32 tensor made once by actor A, passed by reference to
  actor B (through Ray's object store), timed to B's reply; also with
  ``RAY_ENABLE_ZERO_COPY_TORCH_TENSORS=1`` in both actors (``gib_per_s_zero_copy``).

Needs ``pip install ray`` (the ``bench`` extra); prints one JSON line per
figure with ``"system": "ray"``.

    python benchmarks/ray_workloads.py                 # every workload
    python benchmarks/ray_workloads.py -w W1,W6 --tiny
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Any

import numpy as np

WORKLOADS = ["W1", "W2", "W3", "W4", "W5", "W6", "W7"]
NUM_CPUS = 4
# run.py's sizes (tests/test_benchmarks.py checks they agree), and W7's
FULL = {
    "w1_warmup": 200,
    "w1_calls": 3000,
    "w2_calls": 20_000,
    "w2_inflight": 1000,
    "w3_rounds": 1000,
    "w4_rounds": 3,
    "w5_bytes": 64 << 20,
    "w5_rounds": 5,
    "w6_items": 10_000,
    "w6_rounds": 3,
    "w7_bytes": 64 << 20,
    "w7_rounds": 5,
}
TINY = {
    "w1_warmup": 5,
    "w1_calls": 20,
    "w2_calls": 200,
    "w2_inflight": 50,
    "w3_rounds": 20,
    "w4_rounds": 1,
    "w5_bytes": 1 << 20,
    "w5_rounds": 1,
    "w6_items": 100,
    "w6_rounds": 1,
    "w7_bytes": 1 << 20,
    "w7_rounds": 1,
}


class Bench:
    def ping(self) -> int:
        return 1

    def echo(self, data: bytes) -> int:
        return len(data)

    def consume(self, arr: Any) -> int:
        return int(arr.nbytes)

    def produce(self, nbytes: int) -> Any:
        # one array, made once and sent each time, as run.py's actor and the raw floor do
        big = getattr(self, "_big", None)
        if big is None or big.nbytes != nbytes:
            big = self._big = np.ones(nbytes, dtype=np.uint8)
        return big

    def stream(self, n: int) -> Any:
        for i in range(n):  # noqa: UP028 - Ray sends into generators, and range's iterator has no send()
            yield i

    def tensor(self, nbytes: int) -> Any:
        import torch

        t = getattr(self, "_tensor", None)
        if t is None or t.numel() * 4 != nbytes:
            t = self._tensor = torch.ones(nbytes // 4, dtype=torch.float32)
        return t

    def tensor_bytes(self, t: Any) -> int:
        return int(t.numel() * t.element_size())

    def pid(self) -> int:
        return os.getpid()


class AsyncBench:
    async def aping(self) -> int:
        return 1


def record(workload: str, metric: str, value: float, unit: str, **extra: Any) -> dict[str, Any]:
    return {"system": "ray", "workload": workload, "metric": metric, "value": round(value, 2), "unit": unit, **extra}


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def w1(ray: Any, actor: Any, size: dict[str, int]) -> list[dict[str, Any]]:
    for _ in range(size["w1_warmup"]):
        ray.get(actor.ping.remote())
    lat = []
    for _ in range(size["w1_calls"]):
        t0 = time.perf_counter()
        ray.get(actor.ping.remote())
        lat.append((time.perf_counter() - t0) * 1e6)
    return [record("W1", "p50_us", percentile(lat, 0.5), "us"), record("W1", "p99_us", percentile(lat, 0.99), "us")]


def w2(ray: Any, actor: Any, size: dict[str, int]) -> list[dict[str, Any]]:
    from run import timed_gather, timed_window  # run.py's own W2 drivers (this file's directory is on sys.path)

    total, window = size["w2_calls"], size["w2_inflight"]
    async_actor = ray.remote(AsyncBench).remote()
    ray.get(async_actor.aping.remote())

    def lists() -> float:
        t0 = time.perf_counter()
        for start in range(0, total, window):
            ray.get([actor.ping.remote() for _ in range(min(window, total - start))])
        return time.perf_counter() - t0

    elapsed = asyncio.run(timed_window(lambda: async_actor.aping.remote(), total, window))
    gathered = asyncio.run(timed_gather(lambda: async_actor.aping.remote(), total, window))
    lists()  # warm-up
    elapsed_lists = lists()
    ray.kill(async_actor)
    return [
        record("W2", "calls_per_s", total / elapsed, "calls/s"),
        record("W2", "calls_per_s_gather", total / gathered, "calls/s"),
        record("W2", "calls_per_s_sync_lists", total / elapsed_lists, "calls/s"),
    ]


def w3(ray: Any, size: dict[str, int]) -> list[dict[str, Any]]:
    """Fan-out to 4 actors of a placement group, interleaved block by block with W1 calls to the first (as run.py)."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pg = placement_group([{"CPU": 1}] * 4, strategy="STRICT_PACK")
    ray.get(pg.ready(), timeout=120)
    cls = ray.remote(Bench)
    workers = [
        cls.options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=i)
        ).remote()
        for i in range(4)
    ]
    try:
        payload = b"x" * 1024
        first = workers[0]
        for _ in range(size["w1_warmup"]):
            ray.get([w.echo.remote(payload) for w in workers])
            ray.get(first.ping.remote())
        fan, single = [], []
        rounds, block = size["w3_rounds"], max(1, size["w3_rounds"] // 10)
        for start in range(0, rounds, block):
            for _ in range(min(block, rounds - start)):
                t0 = time.perf_counter()
                ray.get([w.echo.remote(payload) for w in workers])
                fan.append((time.perf_counter() - t0) * 1e6)
            for _ in range(min(block, rounds - start)):
                t0 = time.perf_counter()
                ray.get(first.ping.remote())
                single.append((time.perf_counter() - t0) * 1e6)
    finally:
        for w in workers:
            ray.kill(w)
        remove_placement_group(pg)
    p50, w1_p50 = percentile(fan, 0.5), percentile(single, 0.5)
    return [
        record("W3", "p50_us", p50, "us"),
        record("W3", "w1_p50_us_interleaved", w1_p50, "us"),
        record("W3", "ratio_to_w1", p50 / w1_p50, "x"),
    ]


W4_SCRIPT = textwrap.dedent(
    """
    import time
    t0 = time.perf_counter()
    import os, sys, ray
    @ray.remote
    class A:
        def pid(self):
            return os.getpid()
    ray.init(num_cpus=4, include_dashboard=False, _temp_dir=sys.argv[1])
    try:
        pids = ray.get([A.remote().pid.remote() for _ in range(4)], timeout=60)
        assert len(set(pids)) == 4
        print(time.perf_counter() - t0, flush=True)
    finally:
        ray.shutdown()
    """
)


def w4(size: dict[str, int], temp_dir: str) -> list[dict[str, Any]]:
    inproc, wall = [], []
    for i in range(size["w4_rounds"]):
        t0 = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-c", W4_SCRIPT, os.path.join(temp_dir, f"w4-{i}")],
            capture_output=True,
            text=True,
            timeout=180,
            check=True,
        )
        wall.append(time.perf_counter() - t0)
        inproc.append(float(out.stdout.strip().splitlines()[-1]))
    return [
        record("W4", "in_process_s", statistics.median(inproc), "s"),
        record("W4", "whole_process_s", statistics.median(wall), "s"),
    ]


def w5(ray: Any, actor: Any, size: dict[str, int]) -> list[dict[str, Any]]:
    nbytes = size["w5_bytes"]
    arr = np.ones(nbytes, dtype=np.uint8)
    ray.get(actor.consume.remote(arr))
    ray.get(actor.produce.remote(nbytes))
    ins, outs = [], []
    for _ in range(size["w5_rounds"]):
        t0 = time.perf_counter()
        ray.get(actor.consume.remote(arr))
        ins.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        back = ray.get(actor.produce.remote(nbytes))
        outs.append(time.perf_counter() - t0)
        assert back.nbytes == nbytes
        del back  # let the object store free it
    mib = nbytes / (1 << 20)
    return [
        record("W5", "in_mib_per_s", mib / statistics.median(ins), "MiB/s"),
        record("W5", "out_mib_per_s", mib / statistics.median(outs), "MiB/s"),
    ]


def w6(ray: Any, actor: Any, size: dict[str, int]) -> list[dict[str, Any]]:
    n = size["w6_items"]
    rates = []
    for _ in range(size["w6_rounds"]):
        t0 = time.perf_counter()
        count = sum(1 for _ in actor.stream.remote(n))
        rates.append(count / (time.perf_counter() - t0))
        assert count == n
    return [record("W6", "items_per_s", statistics.median(rates), "items/s")]


def w7(ray: Any, size: dict[str, int]) -> list[dict[str, Any]]:
    nbytes, rounds = size["w7_bytes"], size["w7_rounds"]
    cls = ray.remote(Bench)
    rows = []
    for metric, options in (
        ("gib_per_s", {}),
        ("gib_per_s_zero_copy", {"runtime_env": {"env_vars": {"RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1"}}}),
    ):
        a, b = cls.options(**options).remote(), cls.options(**options).remote()
        try:
            times = []
            for _ in range(rounds + 1):  # the first is a warm-up
                t0 = time.perf_counter()
                got = ray.get(b.tensor_bytes.remote(a.tensor.remote(nbytes)))
                times.append(time.perf_counter() - t0)
                assert got == nbytes
        finally:
            ray.kill(a)
            ray.kill(b)
        rows.append(record("W7", metric, nbytes / (1 << 30) / statistics.median(times[1:]), "GiB/s"))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-w", "--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: checks the runner, measures nothing")
    args = parser.parse_args(argv)
    size = TINY if args.tiny else FULL
    chosen = [w.strip().upper() for w in args.workloads.split(",") if w.strip()]
    if not set(chosen) <= set(WORKLOADS):
        parser.error(f"unknown workloads {sorted(set(chosen) - set(WORKLOADS))}; known: {WORKLOADS}")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    print(
        json.dumps(
            {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(), "ray": ray.__version__}
        )
    )
    emit = lambda rows: [print(json.dumps(r), flush=True) for r in rows]  # noqa: E731
    temp_dir = tempfile.mkdtemp(prefix="ray-bench-")  # Ray's session files and logs, removed at the end
    try:
        if "W4" in chosen:
            emit(w4(size, temp_dir))
        rest = [w for w in chosen if w != "W4"]
        if rest:
            ray.init(num_cpus=NUM_CPUS, include_dashboard=False, _temp_dir=os.path.join(temp_dir, "main"))
            try:
                actor = ray.remote(Bench).remote()
                ray.get(actor.pid.remote(), timeout=60)
                for w in rest:
                    if w == "W3":
                        emit(w3(ray, size))
                    elif w == "W7":
                        emit(w7(ray, size))
                    else:
                        emit({"W1": w1, "W2": w2, "W5": w5, "W6": w6}[w](ray, actor, size))
            finally:
                ray.shutdown()
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
