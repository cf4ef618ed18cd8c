"""actorlib's benchmark runner: workloads W1-W7 of DESIGN.md, PG and DAG.

PG is placement group create + remove per second. W7 sends a 64 MiB float32
tensor from actor A to actor B through a compiled graph (gloo channel), next
to raw torch.distributed gloo send/recv between two processes in the same
run. DAG is the per-execution time of a compiled 2-stage graph passing a tiny
tensor (driver -> A -> B -> driver), interleaved with W1 calls.

Prints one JSON object per line, e.g.
``{"system": "actorlib", "workload": "W1", "metric": "p50_us", "value": 142.0, "unit": "us"}``.

    python benchmarks/run.py                 # every workload, full size
    python benchmarks/run.py -w W1,W6        # some of them
    python benchmarks/run.py -w W7,DAG       # the compiled-graph workloads (not in the default list yet)
    python benchmarks/run.py --tiny          # a quick check that the runner works

Timings are medians over ``--repeat`` rounds. Compare systems side by side in
one run on one machine; absolute figures move between machines.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import actorlib
from actorlib.dag import InputNode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@actorlib.remote
class Bench:
    def ping(self) -> int:
        return 1

    def echo(self, data: bytes) -> int:
        return len(data)

    async def aping(self) -> int:
        return 1

    def consume(self, arr: Any) -> int:
        return int(arr.nbytes)

    def produce(self, nbytes: int) -> Any:
        # one array, made once and sent each time (as the raw floor does): the figure is the transfer,
        # not the page faults of a fresh 64 MiB allocation
        big = getattr(self, "_big", None)
        if big is None or big.nbytes != nbytes:
            big = self._big = np.ones(nbytes, dtype=np.uint8)
        return big

    def stream(self, n: int) -> Any:
        yield from range(n)

    def pid(self) -> int:
        return os.getpid()


@actorlib.remote
class Stage:
    """A stage of the compiled-graph workloads (W7, DAG)."""

    def produce(self, nbytes: int) -> Any:
        import torch

        big = getattr(self, "_big", None)  # made once and sent each time, as the raw floor does
        if big is None or big.nbytes != nbytes:
            big = self._big = torch.ones(nbytes // 4, dtype=torch.float32)
        return big

    def consume(self, tensor: Any) -> int:
        return int(tensor.numel())

    def add_one(self, tensor: Any) -> Any:
        return tensor + 1

    def double(self, tensor: Any) -> Any:
        return tensor * 2

    def make_tiny(self, value: int) -> Any:
        import torch

        return torch.full((4,), float(value))

    def first(self, tensor: Any) -> float:
        return float(tensor[0])


def record(workload: str, metric: str, value: float, unit: str, **extra: Any) -> dict[str, Any]:
    return {"system": "actorlib", "workload": workload, "metric": metric, "value": round(value, 2), "unit": unit, **extra}


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def w1(actor: Any, size: dict[str, int]) -> list[dict[str, Any]]:
    """Sequential calls: ``p50_us``/``p99_us`` in one block; then ``ratio_to_floor``, timed block by block.

    For the ratio, blocks of actorlib calls alternate with blocks of the raw
    floor's round trips (floor.py's blocking pyzmq + msgpack, to a server
    process of its own) in this process, so both see the same machine noise:
    figures of separate processes here differ by up to ~20 % from process to
    process.
    """
    for _ in range(size["w1_warmup"]):
        actorlib.get(actor.ping.remote())
    lat = []
    for _ in range(size["w1_calls"]):
        t0 = time.perf_counter()
        actorlib.get(actor.ping.remote())
        lat.append((time.perf_counter() - t0) * 1e6)
    import floor  # benchmarks/floor.py (this file's directory is on sys.path)

    ours, theirs = [], []
    with floor.server() as sock:
        for i in range(size["w1_warmup"]):
            floor.round_trip(sock, i)
        calls, block = size["w1_calls"], max(1, size["w1_calls"] // 10)
        for start in range(0, calls, block):
            for _ in range(min(block, calls - start)):
                t0 = time.perf_counter()
                actorlib.get(actor.ping.remote())
                ours.append((time.perf_counter() - t0) * 1e6)
            for i in range(min(block, calls - start)):
                t0 = time.perf_counter()
                floor.round_trip(sock, i)
                theirs.append((time.perf_counter() - t0) * 1e6)
    mine, raw = percentile(ours, 0.5), percentile(theirs, 0.5)
    return [
        record("W1", "p50_us", percentile(lat, 0.5), "us"),
        record("W1", "p99_us", percentile(lat, 0.99), "us"),
        record("W1", "p50_us_interleaved", mine, "us"),
        record("W1", "floor_p50_us_interleaved", raw, "us"),
        record("W1", "ratio_to_floor", mine / raw, "x"),
    ]


def w2(actor: Any, size: dict[str, int]) -> list[dict[str, Any]]:
    """Pipelined async calls from an asyncio driver, at most ``w2_inflight`` in flight.

    ``calls_per_s`` keeps a window of refs and awaits them in order, sending
    one call as each answer is taken: the raw floor's loop (floor.py), and
    Ray's in ray_workloads.py. ``calls_per_s_gather`` is the same calls as one
    coroutine each, ``gather``-ed under a ``Semaphore``: that harness alone
    (no actorlib) costs ~17-20 µs per call here, as much as actorlib does.
    """
    total, window = size["w2_calls"], size["w2_inflight"]
    elapsed = asyncio.run(timed_window(lambda: actor.aping.remote(), total, window))
    gathered = asyncio.run(timed_gather(lambda: actor.aping.remote(), total, window))
    # ratio_to_floor: 3 runs of calls_per_s's loop alternating with 3 of the floor's (floor.py), medians
    import floor

    ours, theirs = [], []
    with floor.server() as sock:
        floor.window_seconds(sock, total, window)  # warm-up
        for _ in range(3):
            ours.append(asyncio.run(timed_window(lambda: actor.aping.remote(), total, window)))
            theirs.append(floor.window_seconds(sock, total, window))
    return [
        record("W2", "calls_per_s", total / elapsed, "calls/s"),
        record("W2", "calls_per_s_gather", total / gathered, "calls/s"),
        record("W2", "floor_calls_per_s_interleaved", total / statistics.median(theirs), "calls/s"),
        record("W2", "ratio_to_floor", statistics.median(theirs) / statistics.median(ours), "x"),
    ]


async def timed_window(call: Callable[[], Any], total: int, window: int) -> float:
    """Seconds for ``total`` calls, at most ``window`` in flight, answers awaited in order (after a warm-up run)."""
    for _ in range(2):  # a warm-up run, then the timed one
        pending: collections.deque[Any] = collections.deque()
        t0 = time.perf_counter()
        for _ in range(total):
            if len(pending) >= window:
                await pending.popleft()
            pending.append(call())
        while pending:
            await pending.popleft()
    return time.perf_counter() - t0


async def timed_gather(call: Callable[[], Any], total: int, window: int) -> float:
    """Seconds for ``total`` calls, one coroutine each, ``window`` at once under a semaphore (after a warm-up run)."""
    sem = asyncio.Semaphore(window)

    async def one() -> None:
        async with sem:
            await call()

    for _ in range(2):
        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(total)))
    return time.perf_counter() - t0


def w3(actor: Any, size: dict[str, int]) -> list[dict[str, Any]]:
    """Tied-group fan-out: the same 1 KiB argument to 4 workers of a group, gather the 4 results.

    Interleaved, block by block, with W1 calls to the first worker, so the
    ratio W3/W1 is measured under the same machine noise.
    """
    cluster = actorlib.VirtualCluster([4], use_gpus=False)
    group = actorlib.WorkerGroup(cluster, Bench)
    try:
        payload = b"x" * 1024
        first = group.workers[0]
        for _ in range(size["w1_warmup"]):
            actorlib.get(group.run_all_workers_single_data("echo", payload))
            actorlib.get(first.ping.remote())
        fan, single = [], []
        rounds, block = size["w3_rounds"], max(1, size["w3_rounds"] // 10)
        for start in range(0, rounds, block):
            for _ in range(min(block, rounds - start)):
                t0 = time.perf_counter()
                actorlib.get(group.run_all_workers_single_data("echo", payload))
                fan.append((time.perf_counter() - t0) * 1e6)
            for _ in range(min(block, rounds - start)):
                t0 = time.perf_counter()
                actorlib.get(first.ping.remote())
                single.append((time.perf_counter() - t0) * 1e6)
    finally:
        group.shutdown(force=True)
        cluster.shutdown()
    p50, w1_p50 = percentile(fan, 0.5), percentile(single, 0.5)
    return [
        record("W3", "p50_us", p50, "us"),
        record("W3", "w1_p50_us_interleaved", w1_p50, "us"),
        record("W3", "ratio_to_w1", p50 / w1_p50, "x"),
    ]


def w4(size: dict[str, int]) -> list[dict[str, Any]]:
    script = textwrap.dedent(
        """
        import time
        t0 = time.perf_counter()
        import os, actorlib
        @actorlib.remote
        class A:
            def pid(self):
                return os.getpid()
        actorlib.init(num_cpus=4)
        pids = actorlib.get([A.remote().pid.remote() for _ in range(4)], timeout=60)
        assert len(set(pids)) == 4
        print(time.perf_counter() - t0, flush=True)
        actorlib.shutdown()
        """
    )
    inproc, wall = [], []
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for _ in range(size["w4_rounds"]):
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env, check=True)
        wall.append(time.perf_counter() - t0)
        inproc.append(float(out.stdout.strip().splitlines()[-1]))
    return [
        record("W4", "in_process_s", statistics.median(inproc), "s"),
        record("W4", "whole_process_s", statistics.median(wall), "s"),
    ]


def w5(actor: Any, size: dict[str, int]) -> list[dict[str, Any]]:
    nbytes = size["w5_bytes"]
    arr = np.ones(nbytes, dtype=np.uint8)
    actorlib.get(actor.consume.remote(arr))
    actorlib.get(actor.produce.remote(nbytes))
    ins, outs = [], []
    for _ in range(size["w5_rounds"]):
        t0 = time.perf_counter()
        actorlib.get(actor.consume.remote(arr))
        ins.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        back = actorlib.get(actor.produce.remote(nbytes))
        outs.append(time.perf_counter() - t0)
        assert back.nbytes == nbytes
    mib = nbytes / (1 << 20)
    return [
        record("W5", "in_mib_per_s", mib / statistics.median(ins), "MiB/s"),
        record("W5", "out_mib_per_s", mib / statistics.median(outs), "MiB/s"),
    ]


def pg(actor: Any, size: dict[str, int]) -> list[dict[str, Any]]:
    """Placement group create + remove per second (Ray's microbenchmark: about 780/s)."""
    n = size["pg_rounds"]
    for _ in range(10):
        actorlib.remove_placement_group(actorlib.placement_group([{"CPU": 0.01}]))
    t0 = time.perf_counter()
    for _ in range(n):
        group = actorlib.placement_group([{"CPU": 0.01}])
        actorlib.remove_placement_group(group)
    table = actorlib.placement_group_table()  # answered after every removal: the clock stops when all are done
    assert all(v["state"] == "REMOVED" for v in table.values())
    return [record("PG", "create_remove_per_s", n / (time.perf_counter() - t0), "1/s")]


def w6(actor: Any, size: dict[str, int]) -> list[dict[str, Any]]:
    n = size["w6_items"]
    rates = []
    for _ in range(size["w6_rounds"]):
        t0 = time.perf_counter()
        count = sum(1 for _ in actor.stream.remote(n))
        rates.append(count / (time.perf_counter() - t0))
        assert count == n
    return [record("W6", "items_per_s", statistics.median(rates), "items/s")]


_RAW_GLOO = textwrap.dedent(
    """
    import sys, time
    import torch, torch.distributed as dist
    init_file, rank, nbytes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=2)
    tensor = torch.ones(nbytes // 4, dtype=torch.float32) if rank == 0 else torch.empty(nbytes // 4, dtype=torch.float32)
    ack, go = torch.ones(1), torch.ones(1)
    # rank 0 is told by its parent when to send (one line each); rank 1 has its receive posted before then
    # (gloo is about half as fast when the receive is posted after the send started)
    while True:
        if rank == 0:
            line = sys.stdin.readline().strip()
            go.fill_(1.0 if line == "go" else 0.0)
            dist.send(go, 1, tag=0)
            t0 = time.perf_counter()
            dist.send(tensor, 1, tag=1)
            if line != "go":
                break
            dist.recv(ack, 1)
            print(time.perf_counter() - t0, flush=True)
        else:
            posted = dist.irecv(tensor, 0, tag=1)
            dist.recv(go, 0, tag=0)
            posted.wait()
            if go.item() != 1.0:
                break
            dist.send(ack, 0)
    dist.destroy_process_group()
    """
)


class RawGloo:
    """Raw torch.distributed gloo between two processes of their own: one send of ``nbytes`` + a 4-byte ack per round.

    The processes stay up, so rounds can be interleaved with actorlib's under the same machine noise.
    """

    def __init__(self, nbytes: int) -> None:
        import tempfile

        self._tmp = tempfile.TemporaryDirectory()
        init = os.path.join(self._tmp.name, "init")
        self._procs = [
            subprocess.Popen(
                [sys.executable, "-c", _RAW_GLOO, init, str(rank), str(nbytes)],
                stdin=subprocess.PIPE if rank == 0 else subprocess.DEVNULL,
                stdout=subprocess.PIPE if rank == 0 else subprocess.DEVNULL,
                text=True,
            )
            for rank in (0, 1)
        ]

    def round(self) -> float:
        sender = self._procs[0]
        assert sender.stdin is not None and sender.stdout is not None
        sender.stdin.write("go\n")
        sender.stdin.flush()
        line = sender.stdout.readline()
        if not line:
            raise RuntimeError("the raw gloo processes stopped")
        return float(line)

    def close(self) -> None:
        try:
            if self._procs[0].stdin is not None:
                self._procs[0].stdin.write("stop\n")
                self._procs[0].stdin.close()
            for p in self._procs:
                p.wait(timeout=30)
        except Exception:
            pass
        finally:
            for p in self._procs:
                p.kill()
                p.wait()
            self._tmp.cleanup()


def w7(actor: Any, size: dict[str, int]) -> list[dict[str, Any]]:
    """64 MiB float32 tensor actor A -> actor B in a compiled graph (gloo), and raw gloo, in one run.

    Both are timed the same way, round by round, interleaved (``w7_pairs``
    pairs): one transfer and a small answer back (actorlib: one execution, B's
    answer reaching the driver; raw: send, then a 4-byte ack). The ratio is of
    the medians. A single round here varies by a factor of two with the
    machine's memory bandwidth (deciles 22-46 ms), so the pairs are many:
    with 15 the ratio moved by 0.15 from one run to the next.
    ``overhead_ms`` is the median of each pair's difference: what an
    execution costs beyond the transfer, whatever the bandwidth did.
    ``gib_per_s_pipelined`` keeps several executions in flight (after a
    pipelined warm-up, so the receiver's buffers exist).
    """
    nbytes, rounds, pairs = size["w7_bytes"], size["w7_rounds"], size["w7_pairs"]
    raw = RawGloo(nbytes)
    a, b = Stage.remote(), Stage.remote()
    with InputNode() as inp:
        graph = b.consume.bind(a.produce.bind(inp).with_tensor_transport("gloo"))
    compiled = graph.compile()
    try:
        raw.round()  # warm-ups
        assert actorlib.get(compiled.execute(nbytes), timeout=120) == nbytes // 4
        ours, theirs = [], []
        for _ in range(pairs):  # more rounds than the floor's: these medians are compared with each other
            theirs.append(raw.round())
            t0 = time.perf_counter()
            actorlib.get(compiled.execute(nbytes), timeout=120)
            ours.append(time.perf_counter() - t0)
        count = 2 * rounds
        actorlib.get([compiled.execute(nbytes) for _ in range(count)], timeout=300)
        t0 = time.perf_counter()
        actorlib.get([compiled.execute(nbytes) for _ in range(count)], timeout=300)
        pipelined = (time.perf_counter() - t0) / count
    finally:
        compiled.teardown()
        actorlib.kill(a)
        actorlib.kill(b)
        raw.close()
    gib = nbytes / (1 << 30)
    mine, raw_rate = gib / statistics.median(ours), gib / statistics.median(theirs)
    return [
        record("W7", "gib_per_s", mine, "GiB/s"),
        record("W7", "gib_per_s_pipelined", gib / pipelined, "GiB/s"),
        record("W7", "raw_gloo_gib_per_s", raw_rate, "GiB/s"),
        record("W7", "ratio_to_raw", mine / raw_rate, "x"),
        record("W7", "overhead_ms", statistics.median(o - t for o, t in zip(ours, theirs, strict=True)) * 1e3, "ms"),
    ]


_BLOCK_PAUSE_S = 0.005  # before each timed block of dag(): every block starts with the machine's threads asleep


def dag(actor: Any, size: dict[str, int]) -> list[dict[str, Any]]:
    """Per-execution time of a compiled 2-stage graph passing a tiny tensor, against W1 in the same run.

    ``p50_us``: ``execute(x)`` sends a 4-element float32 tensor to stage A
    (``x + 1``), whose output goes to stage B (``* 2``) with the default
    transport (``auto``: a value this small travels inside the message from A
    to B), whose output tensor comes back to the driver. ``p50_us_gloo``: the
    same with the tensor forced onto a gloo channel between A and B.
    ``..._between_only``: gloo again, an int goes in, A makes the tiny tensor,
    B answers with a float: the tensor only crosses between the stages. Timed in blocks interleaved with W1
    calls (as W3 is), so the ratios are measured under the same machine noise. Each block starts after a
    short pause: the stages poll their inbox a while after their last message, and a block of W1 calls
    started meanwhile ran ~20 % slower throughout (a flattering denominator for the graph's ratio).
    """
    import torch

    a, b = Stage.remote(), Stage.remote()
    with InputNode() as inp:
        full = b.double.bind(a.add_one.bind(inp)).compile()
    with InputNode() as inp:
        gloo = b.double.bind(a.add_one.bind(inp).with_tensor_transport("gloo")).compile()
    with InputNode() as inp:
        between = b.first.bind(a.make_tiny.bind(inp).with_tensor_transport("gloo")).compile()
    try:
        x = torch.ones(4)
        for _ in range(size["w1_warmup"]):
            assert float(actorlib.get(full.execute(x), timeout=60)[0]) == 4.0
            assert float(actorlib.get(gloo.execute(x), timeout=60)[0]) == 4.0
            assert actorlib.get(between.execute(3), timeout=60) == 3.0
            actorlib.get(actor.ping.remote())
        runs: dict[str, list[float]] = {"full": [], "gloo": [], "between": [], "w1": []}
        rounds, block = size["dag_rounds"], max(1, size["dag_rounds"] // 10)
        for start in range(0, rounds, block):
            n = min(block, rounds - start)
            for name, call in (
                ("full", lambda: full.execute(x)),
                ("gloo", lambda: gloo.execute(x)),
                ("between", lambda: between.execute(3)),
                ("w1", lambda: actor.ping.remote()),
            ):
                time.sleep(_BLOCK_PAUSE_S)
                for _ in range(n):
                    t0 = time.perf_counter()
                    actorlib.get(call())
                    runs[name].append((time.perf_counter() - t0) * 1e6)
    finally:
        full.teardown()
        gloo.teardown()
        between.teardown()
        actorlib.kill(a)
        actorlib.kill(b)
    p50, w1_p50 = percentile(runs["full"], 0.5), percentile(runs["w1"], 0.5)
    between_p50 = percentile(runs["between"], 0.5)
    return [
        record("DAG", "p50_us", p50, "us"),
        record("DAG", "p99_us", percentile(runs["full"], 0.99), "us"),
        record("DAG", "w1_p50_us_interleaved", w1_p50, "us"),
        record("DAG", "ratio_to_w1", p50 / w1_p50, "x"),
        record("DAG", "p50_us_gloo", percentile(runs["gloo"], 0.5), "us"),
        record("DAG", "ratio_to_w1_gloo", percentile(runs["gloo"], 0.5) / w1_p50, "x"),
        record("DAG", "p50_us_between_only", between_p50, "us"),
        record("DAG", "ratio_to_w1_between_only", between_p50 / w1_p50, "x"),
    ]


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
    "pg_rounds": 2000,
    "w7_bytes": 64 << 20,
    "w7_rounds": 5,
    "w7_pairs": 80,
    "dag_rounds": 1000,
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
    "pg_rounds": 20,
    "w7_bytes": 1 << 20,
    "w7_rounds": 1,
    "w7_pairs": 3,
    "dag_rounds": 20,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-w", "--workloads", default="W1,W2,W3,W4,W5,W6,PG")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: checks the runner, measures nothing")
    args = parser.parse_args(argv)
    size = TINY if args.tiny else FULL
    chosen = [w.strip().upper() for w in args.workloads.split(",") if w.strip()]
    known = {"W1", "W2", "W3", "W4", "W5", "W6", "W7", "PG", "DAG"}
    if not set(chosen) <= known:
        parser.error(f"unknown workloads {sorted(set(chosen) - known)}; known: {sorted(known)}")
    print(json.dumps({"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()}), flush=True)
    emit: Callable[[list[dict[str, Any]]], None] = lambda rows: [print(json.dumps(r), flush=True) for r in rows]  # noqa: E731
    if "W4" in chosen:
        emit(w4(size))
    rest = [w for w in chosen if w != "W4"]
    if rest:
        actorlib.init(num_cpus=4)
        try:
            actor = Bench.remote()
            actorlib.get(actor.pid.remote(), timeout=60)
            table = {"W1": w1, "W2": w2, "W3": w3, "W5": w5, "W6": w6, "W7": w7, "PG": pg, "DAG": dag}
            for w in rest:
                emit(table[w](actor, size))
        finally:
            actorlib.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
