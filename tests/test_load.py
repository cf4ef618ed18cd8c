"""Load: many calls from several drivers at once, and many streams at once; nothing lost, doubled or misrouted."""

from __future__ import annotations

import json
import os

import pytest

from .conftest import local_cluster
from .machine import Machine

pytestmark = pytest.mark.slow

ECHO = """
import actorlib

@actorlib.remote(num_cpus=0)
class Echo:
    def __init__(self, name):
        self.name = name
    def echo(self, driver, seq):
        return (self.name, driver, seq)
"""

DRIVER = ECHO + """
import sys, json
me, calls = int(sys.argv[1]), int(sys.argv[2])
actorlib.init(address="auto")
actors = [actorlib.get_actor(f"echo{i}") for i in range(4)]
bad = 0
done = 0
window = 2000
for start in range(0, calls, window):
    refs = [(seq, actors[seq % 4].echo.remote(me, seq)) for seq in range(start, min(calls, start + window))]
    values = actorlib.get([r for _, r in refs], timeout=120)
    for (seq, _), value in zip(refs, values):
        done += 1
        if tuple(value) != (f"echo{seq % 4}", me, seq):
            bad += 1
print(json.dumps({"driver": me, "done": done, "bad": bad}))
"""


@pytest.fixture
def machine(tmp_path):
    m = Machine(str(tmp_path))
    yield m
    m.stop_all()


@pytest.mark.timeout(900)  # about 25 s on 2 cores; bounded generously for a loaded machine
def test_100k_calls_from_4_drivers_to_4_actors(machine):
    machine.cli("start", "--head", "--host", "127.0.0.1", "--port", "0", "--num-cpus", "2")
    machine.python(
        ECHO + 'actorlib.init(address="auto")\n'
        'actors = [Echo.options(name=f"echo{i}", lifetime="detached").remote(f"echo{i}") for i in range(4)]\n'
        "actorlib.get([a.echo.remote(-1, -1) for a in actors], timeout=60)\n"
    )
    script = os.path.join(machine.tmp, "driver.py")
    with open(script, "w") as f:
        f.write(DRIVER)
    drivers = [machine.spawn_python_file(script, str(d), "25000") for d in range(4)]
    reports = []
    try:
        for d in drivers:
            out, err = d.communicate(timeout=600)
            assert d.returncode == 0, err
            reports.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for d in drivers:
            if d.poll() is None:
                d.kill()
                d.wait()
    assert sorted(r["driver"] for r in reports) == [0, 1, 2, 3]
    assert sum(r["done"] for r in reports) == 100_000 and sum(r["bad"] for r in reports) == 0


def test_1000_generators_streaming_at_once():
    with local_cluster(num_cpus=2) as al:

        @al.remote(num_cpus=0, max_concurrency=1000)
        class Streamer:
            async def count(self, tag, n):
                import asyncio

                for i in range(n):
                    yield (tag, i)
                    await asyncio.sleep(0)

        actors = [Streamer.remote() for _ in range(4)]
        gens = [actors[t % 4].count.remote(t, 20) for t in range(1000)]
        seen: dict[int, list[int]] = {}
        # Interleave: one item from each live stream in turn, so all 1000 are open at the same time.
        live = list(enumerate(gens))
        while live:
            still = []
            for tag, gen in live:
                try:
                    ref = next(gen)
                except StopIteration:
                    continue
                got_tag, i = al.get(ref, timeout=60)
                assert got_tag == tag
                seen.setdefault(tag, []).append(i)
                still.append((tag, gen))
            live = still
        assert len(seen) == 1000 and all(v == list(range(20)) for v in seen.values())
