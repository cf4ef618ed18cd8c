"""Compiled graphs (actorlib.dag): shapes of graphs, values, pipelining, failures, teardown.

Every test runs on gloo (CPU tensors); the ``nccl`` variants run the same
tests with CUDA tensors where CUDA devices are available and skip otherwise.
Where a test claims a value went actor to actor over a channel, it checks the
actors' own counters (``actorlib.dag_worker.stats()``), not just the result.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import os
import signal
import threading
import time

import pytest
import torch

import actorlib
from actorlib.dag import InputNode, MultiOutputNode
from actorlib.dag_channel import SLOT_BYTES

from .conftest import cpu_seconds, local_cluster, wait_for

CUDA_DEVICES = torch.cuda.device_count() if torch.cuda.is_available() else 0
TRANSPORTS = [
    "gloo",
    pytest.param("nccl", marks=pytest.mark.skipif(CUDA_DEVICES < 3, reason="NCCL needs 3 CUDA devices")),
]


class CopyFails(torch.Tensor):
    """A tensor whose contiguous copy fails, as one would when memory runs out."""

    def contiguous(self, *args, **kwargs):
        raise MemoryError("no memory for a contiguous copy (simulated)")


@dataclasses.dataclass
class IntermediateTensors:
    """Like vLLM's: the tensors one pipeline stage hands the next, by name."""

    tensors: dict[str, torch.Tensor]
    step: int = 0


class Stage:
    """A pipeline stage: every method takes and returns tensors on ``device`` (what the transport carries)."""

    def __init__(self, name: str, device: str) -> None:
        self.name = name
        self.device = device
        self.kept: list[torch.Tensor] = []
        self.calls = 0

    def add(self, x, k=1):
        return x.to(self.device) + k

    def mul(self, x, k=2):
        return x * k

    async def aadd(self, x, k=1):
        await asyncio.sleep(0)
        return x.to(self.device) + k

    async def acancel_on_negative(self, x):
        """Raises CancelledError of its own (it awaits a task that was cancelled) for a negative input."""
        if float(x.sum()) < 0:
            inner = asyncio.ensure_future(asyncio.sleep(10))
            inner.cancel()
            await inner
        return x + 1

    def concat(self, a, b):
        return torch.cat([a.to(self.device), b.to(self.device)])

    def to_host(self, x):
        return x.cpu()

    def first_stage(self, x):
        """Nested: a dataclass holding a dict of tensors of several dtypes, plus plain values and a shared tensor."""
        x = x.to(self.device)
        hidden = x * 2
        return {
            "it": IntermediateTensors({"hidden_states": hidden, "residual": x.to(torch.float64)}, step=int(x.numel())),
            "pair": (hidden, [x.to(torch.int32), "text"]),
            "meta": {"who": self.name, "n": 3},
        }

    def last_stage(self, out):
        it = out["it"]
        hidden, (as_int, text) = out["pair"]
        return {
            "same_object": hidden is it.tensors["hidden_states"],
            "hidden": it.tensors["hidden_states"].cpu(),
            "residual_dtype": str(it.tensors["residual"].dtype),
            "int_sum": int(as_int.sum()),
            "step": it.step,
            "text": text,
            "meta": out["meta"],
            "device": it.tensors["hidden_states"].device.type,
        }

    def make(self, spec):
        """A tensor of the asked shape and dtype (shapes and dtypes change from one execution to the next)."""
        shape, dtype, *offset = spec
        n = 1
        for d in shape:
            n *= d
        values = torch.arange(n, dtype=torch.float64) % 97 + (offset[0] if offset else 0)
        return values.to(getattr(torch, dtype)).reshape(shape).to(self.device)

    def make_or_break(self, spec):
        """``make(spec)``; or, for ``"broken"``, a tensor whose bytes cannot be taken."""
        return torch.ones(4, device=self.device).as_subclass(CopyFails) if spec == "broken" else self.make(spec)

    def check(self, t):
        """What arrived: shape, dtype, sum, a sum weighted by position (bytes in the wrong place change it), device."""
        flat = t.to(torch.float64).flatten().cpu()  # (integers: both sums are exact, in any order)
        weighted = float((flat * torch.arange(flat.numel(), dtype=torch.float64)).sum())
        return list(t.shape), str(t.dtype).removeprefix("torch."), float(flat.sum()), weighted, t.device.type

    def keep(self, t):
        """Hold on to what arrived: later executions must not change what is held."""
        self.kept.append(t)
        return float(t.to(torch.float64).sum())

    def kept_sums(self):
        return [float(t.to(torch.float64).sum()) for t in self.kept]

    def fail_on_negative(self, x):
        if float(x.sum()) < 0:
            raise ValueError(f"stage {self.name} refuses negative input")
        return x + 1

    def gate(self, x, path):
        """Wait (bounded) for ``path`` to exist; tell the test it is waiting by writing ``path + '.in'``."""
        with open(path + ".in", "w"):
            pass
        deadline = time.monotonic() + 60
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.01)
        return x

    def unreadable_at_the_driver(self, x):
        return ArrivesBroken()

    def lock_of(self, x):
        return threading.Lock()  # cannot be serialized: its execution fails at the driver

    def pid(self):
        return os.getpid()

    def ping(self):
        return self.name

    def stats(self):
        from actorlib import dag_worker

        return dag_worker.stats()

    def ask(self, x, other):
        """Call another actor from inside a stage (here: one that sends to this one) before answering."""
        actorlib.get(other.ping.remote(), timeout=60)
        return x

    def sabotage_next_setup(self):
        """Make this actor's part of the next graph compiled on it fail at once (its set-up raises)."""
        from actorlib import dag_worker

        original = dag_worker._Node.__init__

        def fail_once(node, spec, host):
            dag_worker._Node.__init__ = original
            raise RuntimeError("sabotaged set-up")

        dag_worker._Node.__init__ = fail_once
        return True

    def sabotage_next_run(self):
        """Make the runtime fail (not the method) on this actor's next execution of a node."""
        from actorlib import dag_worker

        original = dag_worker._first_failure

        def fail_once(values):
            dag_worker._first_failure = original
            raise RuntimeError("sabotaged run")

        dag_worker._first_failure = fail_once
        return True

    def posters(self):
        """The names of this actor's threads that post gloo sends once their receiver is ready."""
        return sorted(t.name for t in threading.enumerate() if t.name.startswith("actorlib-dag-send-"))

    def packed_sends_held(self):
        """How many packed sends each of this actor's channels still holds (they must not pile up)."""
        from actorlib import dag_worker

        return [len(ch._outgoing) for g in dag_worker._graphs.values() for ch in g.channels.values()]


StageActor = actorlib.remote(Stage)


@pytest.fixture(scope="module")
def al():
    with local_cluster(num_cpus=4, num_gpus=max(CUDA_DEVICES, 0) or None) as actorlib_:
        yield actorlib_


@pytest.fixture(scope="module", params=TRANSPORTS)
def env(request, al):
    """Three stage actors shared by the module's tests, and the transport they use."""
    transport = request.param
    options = {"num_gpus": 1} if transport == "nccl" else {}
    device = "cuda" if transport == "nccl" else "cpu"
    stages = [StageActor.options(**options).remote(name, device) for name in "abc"]
    assert al.get([s.ping.remote() for s in stages], timeout=60) == ["a", "b", "c"]
    yield transport, stages
    for s in stages:
        al.kill(s)


def channel_bytes(actor, graph) -> dict[str, dict[str, int]]:
    return actorlib.get(actor.stats.remote(), timeout=30).get(graph.graph_id, {}).get("channels", {})


def events(actor, graph) -> dict[str, int]:
    return actorlib.get(actor.stats.remote(), timeout=30).get(graph.graph_id, {}).get("events", {})


# -- shapes of graphs ----------------------------------------------------------------


def test_one_stage(env):
    transport, (a, _, _) = env
    with InputNode() as inp:
        dag = a.add.bind(inp, 10).with_tensor_transport(transport)
    compiled = dag.compile()
    try:
        for i in range(3):
            assert actorlib.get(compiled.execute(torch.full((3,), float(i))), timeout=30).tolist() == [10.0 + i] * 3
        assert events(a, compiled) == {"exec": 3}
        assert channel_bytes(a, compiled) == {}  # nothing crosses between actors
    finally:
        compiled.teardown()


def test_two_stages_tensor_goes_actor_to_actor_on_the_channel(env):
    transport, (a, b, _) = env
    with InputNode() as inp:
        dag = b.to_host.bind(b.mul.bind(a.add.bind(inp).with_tensor_transport(transport)))
    compiled = dag.compile()
    try:
        x = torch.arange(4, dtype=torch.float32)
        for i in range(4):
            assert actorlib.get(compiled.execute(x + i), timeout=30).tolist() == ((x + i + 1) * 2).tolist()
        # each execute is one message to the input actor only; the stage's output reached b from a, never the driver
        assert events(a, compiled) == {"exec": 4}
        assert events(b, compiled) == {"deliver": 4}
        sent = channel_bytes(a, compiled)
        received = channel_bytes(b, compiled)
        backend = "nccl" if transport == "nccl" else "gloo"
        assert sent == {f"send to {b._actor_id} ({backend})": {"transfers": 4, "bytes": 4 * 16}}
        assert received == {f"recv from {a._actor_id} ({backend})": {"transfers": 4, "bytes": 4 * 16}}
    finally:
        compiled.teardown()


def test_three_stages_with_an_async_one(env):
    transport, (a, b, c) = env
    with InputNode() as inp:
        x = a.add.bind(inp, 1).with_tensor_transport(transport)
        y = b.aadd.bind(x, 10).with_tensor_transport(transport)
        dag = c.to_host.bind(c.mul.bind(y, 3))
    compiled = dag.compile()
    try:
        for i in range(3):
            assert actorlib.get(compiled.execute(torch.tensor([float(i)])), timeout=30).tolist() == [(i + 11) * 3.0]
        assert events(c, compiled) == {"deliver": 3} and "exec" not in events(b, compiled)
        # a fault of the runtime's own in the async stage fails that execution, and the stage goes on
        assert actorlib.get(b.sabotage_next_run.remote(), timeout=30)
        with pytest.raises(actorlib.ActorLibError, match="sabotaged run"):
            actorlib.get(compiled.execute(torch.tensor([0.0])), timeout=30)
        assert actorlib.get(compiled.execute(torch.tensor([1.0])), timeout=30).tolist() == [36.0]
    finally:
        compiled.teardown()


def test_fan_out_and_fan_in(env):
    transport, (a, b, c) = env
    with InputNode() as inp:
        left = a.add.bind(inp, 1).with_tensor_transport(transport)  # the input fans out to a and b
        right = b.mul.bind(b.add.bind(inp, 0), 10).with_tensor_transport(transport)
        joined = c.concat.bind(left, right)  # and fans in at c
        also = b.add.bind(left, 100)  # a's output fans out to c and b
        dag = MultiOutputNode([c.to_host.bind(joined), b.to_host.bind(also), left])
    compiled = dag.compile()
    try:
        x = torch.tensor([1.0, 2.0])
        joined_v, also_v, left_v = actorlib.get(compiled.execute(x), timeout=30)
        assert joined_v.tolist() == [2.0, 3.0, 10.0, 20.0]
        assert also_v.tolist() == [102.0, 103.0]
        assert left_v.cpu().tolist() == [2.0, 3.0]  # an output that is also an intermediate value
        assert events(a, compiled) == {"exec": 1} and events(b, compiled) == {"exec": 1, "deliver": 1}
        assert events(c, compiled) == {"deliver": 2}
        assert len(channel_bytes(a, compiled)) == 2  # a -> b and a -> c, one group each way used
    finally:
        compiled.teardown()


def test_inputs_by_position_and_keyword_and_constants(env):
    transport, (a, b, _) = env
    with InputNode() as inp:
        x = a.add.bind(inp[0], k=inp.k).with_tensor_transport(transport)
        dag = b.to_host.bind(b.concat.bind(x, inp["y"]))
    compiled = dag.compile()
    try:
        out = actorlib.get(compiled.execute(torch.zeros(2), k=5, y=torch.ones(1)), timeout=30)
        assert out.tolist() == [5.0, 5.0, 1.0]
        with pytest.raises(TypeError, match="keyword argument 'k'"):
            compiled.execute(torch.zeros(2), y=torch.ones(1))
    finally:
        compiled.teardown()


# -- values ----------------------------------------------------------------------------


def test_nested_tensor_structures(env):
    transport, (a, b, _) = env
    with InputNode() as inp:
        dag = b.last_stage.bind(a.first_stage.bind(inp).with_tensor_transport(transport))
    compiled = dag.compile()
    try:
        got = actorlib.get(compiled.execute(torch.arange(3, dtype=torch.float32)), timeout=30)
        assert got["hidden"].tolist() == [0.0, 2.0, 4.0]
        assert got["residual_dtype"] == "torch.float64" and got["int_sum"] == 3 and got["step"] == 3
        assert got["text"] == "text" and got["meta"] == {"who": "a", "n": 3}
        assert got["same_object"] is True  # one tensor referenced twice arrives once, as one object
        assert got["device"] == ("cuda" if transport == "nccl" else "cpu")
        # the three distinct tensors (float32, float64, int32) crossed on the channel: 12 + 24 + 12 bytes
        (received,) = channel_bytes(b, compiled).values()
        assert received == {"transfers": 1, "bytes": 48}
    finally:
        compiled.teardown()


def test_auto_sends_small_cpu_values_inside_the_message_and_big_ones_over_gloo(al):
    a, b = StageActor.remote("a", "cpu"), StageActor.remote("b", "cpu")
    with InputNode() as inp:
        dag = b.last_stage.bind(a.first_stage.bind(inp).with_tensor_transport("auto"))
    compiled = dag.compile()
    try:
        small = torch.arange(6, dtype=torch.float32)  # the value: 6*4*2 + 6*8 + 6*4 bytes of tensors
        big = torch.ones((SLOT_BYTES // 4) * 2, dtype=torch.float32)  # 512 KiB hidden states: past what fits a message
        for x in (small, small + 1, big):
            got = actorlib.get(compiled.execute(x), timeout=60)
            assert got["hidden"].tolist() == (x * 2).tolist() and got["same_object"] is True
            assert got["residual_dtype"] == "torch.float64" and got["int_sum"] == int(x.sum()) and got["meta"]["who"] == "a"
        small_bytes = 6 * 4 + 6 * 8 + 6 * 4  # hidden (float32), residual (float64), as_int (int32): hidden once
        big_bytes = big.numel() * (4 + 8 + 4)
        assert channel_bytes(a, compiled) == {
            f"send to {b._actor_id} (zmq)": {"transfers": 2, "bytes": 2 * small_bytes},
            f"send to {b._actor_id} (gloo)": {"transfers": 1, "bytes": big_bytes},
        }
        assert channel_bytes(b, compiled) == {
            f"recv from {a._actor_id} (zmq)": {"transfers": 2, "bytes": 2 * small_bytes},
            f"recv from {a._actor_id} (gloo)": {"transfers": 1, "bytes": big_bytes},
        }
    finally:
        compiled.teardown()
        actorlib.kill(a)
        actorlib.kill(b)


def test_shapes_and_dtypes_change_between_executions(env):
    transport, (a, b, _) = env
    with InputNode() as inp:
        dag = b.check.bind(a.make.bind(inp).with_tensor_transport(transport))
    compiled = dag.compile()
    big = SLOT_BYTES // 4 + 1  # past the packed path: sent tensor by tensor
    specs = [
        ((4,), "float32"),
        ((2, 3), "int64"),
        ((0, 5), "float32"),
        ((3,), "bool"),
        ((big,), "float32"),
        ((2, 1 << 18), "float32"),  # 2 MiB: pooled receive buffers
        ((5, 2), "bfloat16"),
        ((2, 1 << 18), "float32"),
        ((1,), "float16"),
    ]
    local = Stage("local", "cuda" if transport == "nccl" else "cpu")
    try:
        for spec in specs:
            assert actorlib.get(compiled.execute(spec), timeout=60) == local.check(local.make(spec)), spec
    finally:
        compiled.teardown()


def test_received_tensors_stay_valid_while_held(env):
    """Receive buffers are reused only once nothing refers to them: what a stage keeps, stays."""
    transport, (a, b, _) = env
    with InputNode() as inp:
        dag = b.keep.bind(a.make.bind(inp).with_tensor_transport(transport))
    compiled = dag.compile()
    try:
        shape = (1 << 19,)  # 2 MiB of float32: the pooled path
        totals = [actorlib.get(compiled.execute((shape, "float32", i)), timeout=60) for i in range(4)]
        assert len(set(totals)) == 4
        assert actorlib.get(b.kept_sums.remote(), timeout=30)[-4:] == totals  # each still holds its own values
    finally:
        compiled.teardown()


# -- pipelining ----------------------------------------------------------------------------


def test_pipelined_executions_return_in_order(env):
    transport, (a, b, c) = env
    with InputNode() as inp:
        x = a.add.bind(inp, 1).with_tensor_transport(transport)
        y = b.mul.bind(x, 2).with_tensor_transport(transport)
        dag = c.to_host.bind(c.add.bind(y, 0))
    compiled = dag.compile(max_inflight=4)
    try:
        refs = [compiled.execute(torch.tensor([float(i)])) for i in range(24)]  # more than max_inflight: execute waits
        assert [v.item() for v in actorlib.get(refs, timeout=60)] == [(i + 1) * 2.0 for i in range(24)]

        async def many():
            return await asyncio.gather(*(compiled.execute_async(torch.tensor([float(i)])) for i in range(12)))

        assert [v.item() for v in asyncio.run(many())] == [(i + 1) * 2.0 for i in range(12)]
    finally:
        compiled.teardown()


@pytest.mark.parametrize("n, count", [(SLOT_BYTES // 4 + 1, 16), ((9 << 20) // 4, 6)], ids=["past-a-slot", "split-9MiB"])
def test_tensors_both_ways_between_two_actors_pipelined(env, n, count):
    """a -> b -> a with tensors too big for a packed slot (float32: one element over it; or 9 MiB, split across
    a gloo channel's two connections): every send completes only once its receiver has posted the receive.
    Pipelined, each actor's sync thread waits for its last sends while the other's may wait for its own; both
    must go on reading what arrives meanwhile."""
    transport, (a, b, _) = env
    with InputNode() as inp:
        x = a.add.bind(inp, 1).with_tensor_transport(transport)
        y = b.mul.bind(x, 2).with_tensor_transport(transport)
        dag = a.to_host.bind(a.add.bind(y, 0))
    compiled = dag.compile(max_inflight=4)
    try:
        refs = [compiled.execute(torch.full((n,), float(i))) for i in range(count)]
        got = actorlib.get(refs, timeout=120)
        assert [(float(v[0]), float(v[-1])) for v in got] == [((i + 1) * 2.0, (i + 1) * 2.0) for i in range(count)]
        backend = "nccl" if transport == "nccl" else "gloo"
        assert channel_bytes(b, compiled)[f"send to {a._actor_id} ({backend})"] == {"transfers": count, "bytes": count * 4 * n}
    finally:
        compiled.teardown()


def test_big_gloo_values_wait_for_their_receiver_whose_poster_ends_with_the_graph(al):
    """A value of 1 MiB or more over gloo goes into receives posted for it beforehand: the first one after its
    receiver's word, waited for by a thread of the sending channel's own, which ends at teardown; the next ones
    into receives posted ahead for them (shapes that change too). From 8 MiB, split across two connections."""
    a, b = StageActor.remote("a", "cpu"), StageActor.remote("b", "cpu")
    try:
        with InputNode() as inp:
            dag = b.check.bind(a.make.bind(inp).with_tensor_transport("gloo"))
        compiled = dag.compile(max_inflight=2)
        try:
            # 1 MiB four times (the first after the word, then into receives posted ahead), 3 MiB (past them),
            # 1 MiB as int32 (the same bytes, another dtype), 1.5 MiB (past them again); then, split across the
            # channel's two connections, 9 MiB twice (past them, then into them), 6 MiB (into them: split as they
            # are), 17 MiB (past them), 6 MiB (past the 17 MiB ones ahead: zero bytes into each of their parts)
            specs = [[[1 << 18], "float32", i] for i in range(4)] + [
                [[3, 1 << 17], "float64"],
                [[3, 1 << 17], "float64", 1],
                [[1 << 18], "int32", 5],
                [[3, 1 << 17], "float32", 2],
                [[9, 1 << 18], "float32", 3],
                [[9, 1 << 18], "float32", 4],
                [[6, 1 << 18], "float32", 6],
                [[17, 1 << 18], "float32", 7],
                [[6, 1 << 18], "float32", 8],
            ]
            got = actorlib.get([compiled.execute(spec) for spec in specs], timeout=60)
            here = Stage("here", "cpu")  # the same methods, run in this process
            assert [list(g) for g in got] == [list(here.check(here.make(spec))) for spec in specs]
            assert actorlib.get(a.posters.remote(), timeout=30) == [f"actorlib-dag-send-{b._actor_id[:8]}-gloo"]
        finally:
            compiled.teardown()
        wait_for(lambda: actorlib.get(a.posters.remote(), timeout=30) == [], timeout=30, what="the poster to end")
        # b let go of the receives it had posted ahead for the next value, and serves on
        assert actorlib.get([a.ping.remote(), b.ping.remote()], timeout=30) == ["a", "b"]
    finally:
        for actor in (a, b):
            al.kill(actor)


@pytest.mark.parametrize("mixed", [False, True], ids=["sync", "with-an-async-node"])
def test_a_stage_that_calls_the_actor_sending_to_it(env, mixed):
    """b's stage calls a while a's next executions wait for their sends to b: a must still serve the call.
    With an async node on a too, its sync nodes run as jobs of its sync thread, which waited for the sends."""
    transport, (a, b, _) = env
    n = SLOT_BYTES // 4 + 1  # sent tensor by tensor: complete only once b has posted its receive
    with InputNode() as inp:
        out = b.to_host.bind(b.ask.bind(a.add.bind(inp, 1).with_tensor_transport(transport), a))
        dag = MultiOutputNode([out, a.aadd.bind(inp, 0)]) if mixed else out
    compiled = dag.compile(max_inflight=4)
    try:
        refs = [compiled.execute(torch.full((n,), float(i))) for i in range(12)]
        values = [v[0] if mixed else v for v in actorlib.get(refs, timeout=60)]
        assert [float(v[0]) for v in values] == [i + 1.0 for i in range(12)]
    finally:
        compiled.teardown()


def test_small_gloo_sends_are_let_go(al):
    """gloo says a send is complete only once waited for: the packed sends a channel keeps stay bounded."""
    a, b = StageActor.remote("a", "cpu"), StageActor.remote("b", "cpu")
    with InputNode() as inp:
        dag = b.mul.bind(a.add.bind(inp).with_tensor_transport("gloo"))
    compiled = dag.compile(max_inflight=3)
    try:
        refs = [compiled.execute(torch.ones(2)) for _ in range(40)]
        assert all(v.tolist() == [4.0, 4.0] for v in actorlib.get(refs, timeout=60))
        assert actorlib.get(a.packed_sends_held.remote(), timeout=30) == [3]
    finally:
        compiled.teardown()
        al.kill(a)
        al.kill(b)


def test_max_inflight_bounds_executions(env, tmp_path):
    transport, (a, b, _) = env
    gate = str(tmp_path / "gate")
    with InputNode() as inp:
        dag = b.to_host.bind(b.add.bind(a.gate.bind(inp, gate).with_tensor_transport(transport), 0))
    compiled = dag.compile(max_inflight=2)
    try:
        first = [compiled.execute(torch.tensor([float(i)])) for i in range(2)]
        wait_for(lambda: os.path.exists(gate + ".in"), timeout=30, what="the first stage to start")
        third: list = []
        t = threading.Thread(target=lambda: third.append(compiled.execute(torch.tensor([2.0]))), daemon=True)
        t.start()
        t.join(0.5)  # the absence of an event: execute() must still be waiting for a slot
        assert t.is_alive() and not third and not any(r.done() for r in first)
        open(gate, "w").close()
        t.join(30)
        assert not t.is_alive()
        assert [v.item() for v in actorlib.get([*first, *third], timeout=30)] == [0.0, 1.0, 2.0]
    finally:
        open(gate, "w").close()
        compiled.teardown()


# -- failures -------------------------------------------------------------------------------


def test_a_stage_that_raises_fails_that_execution_only(env):
    transport, (a, b, c) = env
    with InputNode() as inp:
        x = a.add.bind(inp, 0).with_tensor_transport(transport)
        y = b.fail_on_negative.bind(x).with_tensor_transport(transport)
        dag = c.to_host.bind(c.mul.bind(y, 1))
    compiled = dag.compile(max_inflight=4)
    try:
        refs = [compiled.execute(torch.tensor([v])) for v in (1.0, -1.0, 2.0, -5.0, 3.0)]
        assert actorlib.get(refs[0], timeout=30).item() == 2.0
        with pytest.raises(ValueError, match="stage b refuses negative input") as info:
            actorlib.get(refs[1], timeout=30)
        assert isinstance(info.value, actorlib.RemoteError)
        assert "in fail_on_negative" in info.value.traceback_text and "raise ValueError" in info.value.traceback_text
        assert "queue.Empty" not in info.value.traceback_text  # nothing of the runtime's own
        assert actorlib.get(refs[2], timeout=30).item() == 3.0
        with pytest.raises(ValueError):
            actorlib.get(refs[3], timeout=30)
        assert actorlib.get(refs[4], timeout=30).item() == 4.0
        assert actorlib.get(compiled.execute(torch.tensor([7.0])), timeout=30).item() == 8.0  # and it goes on
    finally:
        compiled.teardown()
    with InputNode() as inp:  # an async stage's own CancelledError ended its node: every later execution hung
        dag = c.to_host.bind(b.acancel_on_negative.bind(a.add.bind(inp, 0).with_tensor_transport(transport)))
    compiled = dag.compile()
    try:
        with pytest.raises(actorlib.RemoteError, match="CancelledError"):
            actorlib.get(compiled.execute(torch.tensor([-1.0])), timeout=30)
        assert actorlib.get(compiled.execute(torch.tensor([1.0])), timeout=30).item() == 2.0
    finally:
        compiled.teardown()


def test_teardown_then_recompile(env):
    transport, (a, b, _) = env
    with InputNode() as inp:
        dag = b.to_host.bind(a.add.bind(inp, 1).with_tensor_transport(transport))
    first = dag.compile()
    assert actorlib.get(first.execute(torch.zeros(1)), timeout=30).item() == 1.0
    rt = actorlib.api.runtime.current()

    async def on_the_loop():  # as from an async actor method: it would wait for what this loop delivers
        first.teardown()

    with pytest.raises(actorlib.ActorLibError, match="would block the event loop"):
        rt.run(on_the_loop())
    first.teardown()
    first.teardown()  # twice is fine
    assert first.graph_id not in actorlib.get(a.stats.remote(), timeout=30)  # gone from the actors
    with pytest.raises(actorlib.ActorLibError, match="torn down"):
        first.execute(torch.zeros(1))
    second = dag.compile()  # the same graph again, and another on the same actors
    with InputNode() as inp:
        other = a.to_host.bind(b.mul.bind(inp, 3).with_tensor_transport(transport))
    third = other.compile()
    try:
        assert actorlib.get(second.execute(torch.ones(2)), timeout=30).tolist() == [2.0, 2.0]
        assert actorlib.get(third.execute(torch.ones(2)), timeout=30).tolist() == [3.0, 3.0]
        assert actorlib.get(a.ping.remote(), timeout=30) == "a"  # the actors still take ordinary calls
    finally:
        second.teardown()
        third.teardown()


@contextlib.contextmanager
def three_stages_run_back_to_back(env):
    """A 3-stage graph on the shared stages, after 200 executions back to back: the stages (and the driver's
    get) have learnt to poll a while before they sleep."""
    transport, (a, b, c) = env
    with InputNode() as inp:
        dag = c.to_host.bind(b.add.bind(a.add.bind(inp).with_tensor_transport(transport)).with_tensor_transport(transport))
    compiled = dag.compile()
    try:
        for _ in range(200):
            actorlib.get(compiled.execute(torch.zeros(1)), timeout=30)
        yield compiled
    finally:
        compiled.teardown()


def test_an_idle_compiled_graph_uses_no_cpu(env):
    _, stages = env
    with three_stages_run_back_to_back(env):
        pids = actorlib.get([s.pid.remote() for s in stages], timeout=30)
        before = [cpu_seconds(p) for p in pids] + [cpu_seconds(os.getpid())]
        time.sleep(1.0)  # the measured idle window
        after = [cpu_seconds(p) for p in pids] + [cpu_seconds(os.getpid())]
        used = [round(y - x, 3) for x, y in zip(before, after, strict=True)]
        assert all(u < 0.2 for u in used), f"CPU seconds used in 1 s idle (stages a, b, c, driver): {used}"


def test_a_stage_polls_after_its_graph_messages_only(env):
    """A stage polls its inbox a while after running a graph's messages (executions that come back to back),
    not after plain calls: an actor of a compiled graph that then serves calls polls after them no more than
    an actor in no graph does. The calls are made from an event loop, so neither actor gets them through a
    shared-memory slot, whose polling (for any actor called back to back) would blur the comparison: with bells,
    an actor in no graph called ~1 ms apart through its slot polls, or sleeps and is rung, by chance."""
    from actorlib import spin

    if spin.SPIN_S < 250e-6:
        pytest.skip("polling after each call would cost too little to tell apart (ACTORLIB_GET_SPIN_US < 250)")
    a = env[1][0]
    plain = StageActor.remote("plain", "cpu")
    try:
        with three_stages_run_back_to_back(env):
            used = []

            async def serve(actor):
                for _ in range(150):  # ~15 ms of the actor's CPU on a fast machine; 150 x SPIN_S more polling after each
                    await asyncio.wait_for(actor.ping.remote(), timeout=30)
                    await asyncio.sleep(0.001)

            for actor in (a, plain, a, plain):  # in turns, under the same machine load
                pid = actorlib.get(actor.pid.remote(), timeout=30)
                before = cpu_seconds(pid)
                asyncio.run(serve(actor))
                used.append(cpu_seconds(pid) - before)
        stage, alone = used[0] + used[2], used[1] + used[3]
        assert stage < alone + 150 * spin.SPIN_S, f"stage a used {stage * 1000:.0f} ms of CPU serving 300 plain calls, an actor " \
            f"in no graph {alone * 1000:.0f} ms: the stage polls after them"
    finally:
        actorlib.kill(plain)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_an_actor_killed_mid_graph_fails_the_graph(al, transport, tmp_path):
    options = {"num_gpus": 1} if transport == "nccl" else {}
    device = "cuda" if transport == "nccl" else "cpu"
    a, b, c = (StageActor.options(**options).remote(name, device) for name in "xyz")
    gate = str(tmp_path / "gate")
    with InputNode() as inp:
        x = a.add.bind(inp).with_tensor_transport(transport)
        y = b.gate.bind(x, gate).with_tensor_transport(transport)
        dag = c.to_host.bind(c.add.bind(y, 0))
    compiled = dag.compile()
    try:
        ref = compiled.execute(torch.zeros(1))
        wait_for(lambda: os.path.exists(gate + ".in"), timeout=30, what="the middle stage to start")
        os.kill(actorlib.get(c.pid.remote(), timeout=30), signal.SIGKILL)  # the last stage dies while b works
        with pytest.raises(actorlib.ActorDiedError):
            actorlib.get(ref, timeout=30)
        with pytest.raises(actorlib.ActorDiedError):
            compiled.execute(torch.zeros(1))
        assert compiled.state.value == "FAILED"
    finally:
        open(gate, "w").close()
        compiled.teardown()
    assert actorlib.get([a.ping.remote(), b.ping.remote()], timeout=30) == ["x", "y"]  # the others live on
    for s in (a, b, c):
        actorlib.kill(s)


def test_an_actor_killed_while_teardown_waits_fails_its_executions_at_once(al, tmp_path):
    a, b = (StageActor.remote(name, "cpu") for name in "uv")
    gate = str(tmp_path / "gate")
    with InputNode() as inp:
        compiled = b.to_host.bind(a.gate.bind(inp, gate).with_tensor_transport("gloo")).compile()
    try:
        ref = compiled.execute(torch.zeros(1))
        wait_for(lambda: os.path.exists(gate + ".in"), timeout=30, what="the first stage to start")
        pid = actorlib.get(b.pid.remote(), timeout=30)
        threading.Timer(0.5, os.kill, (pid, signal.SIGKILL)).start()
        compiled.teardown(timeout=60)  # returns once the execution failed, not after 60 s
        with pytest.raises(actorlib.ActorDiedError):
            actorlib.get(ref, timeout=1)
    finally:
        open(gate, "w").close()
        compiled.teardown()
        for s in (a, b):
            actorlib.kill(s)


def test_an_actor_killed_while_idle_fails_the_next_execution(al):
    a, b = (StageActor.remote(name, "cpu") for name in "pq")
    with InputNode() as inp:
        dag = b.to_host.bind(a.add.bind(inp).with_tensor_transport("gloo"))
    compiled = dag.compile()
    try:
        assert actorlib.get(compiled.execute(torch.zeros(1)), timeout=30).item() == 1.0
        os.kill(actorlib.get(a.pid.remote(), timeout=30), signal.SIGKILL)
        wait_for(lambda: compiled.state.value == "FAILED", timeout=30, what="the graph to notice the death")
        with pytest.raises(actorlib.ActorDiedError):
            compiled.execute(torch.zeros(1))
    finally:
        compiled.teardown()
        for s in (a, b):
            actorlib.kill(s)


class ArrivesBroken:
    """Pickles fine here, fails to unpickle in the actor."""

    def __reduce__(self):
        return (_refuse_to_load, ())


def _refuse_to_load():
    raise RuntimeError("this value cannot be loaded here")


def test_values_that_cannot_travel_fail_their_execution_only(env):
    transport, (a, b, _) = env
    with InputNode() as inp:
        dag = b.check.bind(a.make.bind(inp).with_tensor_transport(transport))
    compiled = dag.compile()
    with InputNode() as inp:
        unserializable = a.lock_of.bind(b.add.bind(inp, 0).with_tensor_transport(transport)).compile()
    try:
        with pytest.raises(actorlib.SerializationError, match="arguments"):
            actorlib.get(compiled.execute(ArrivesBroken()), timeout=30)
        assert actorlib.get(compiled.execute(((2,), "float32")), timeout=30)[0] == [2]
        with pytest.raises(actorlib.SerializationError, match="output"):
            actorlib.get(unserializable.execute(torch.ones(1)), timeout=30)
        assert actorlib.get(compiled.execute(((3,), "float32")), timeout=30)[0] == [3]
    finally:
        compiled.teardown()
        unserializable.teardown()


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_an_output_the_driver_cannot_read_or_an_argument_torch_cannot_send_fails_only_its_execution(env):
    """Each fails that execution and gives its slot back: with max_inflight=1, the next one would wait forever."""
    transport, (a, b, _) = env
    with InputNode() as inp:
        unreadable = b.unreadable_at_the_driver.bind(a.add.bind(inp, 0).with_tensor_transport(transport)).compile(
            max_inflight=1
        )
    with InputNode() as inp:
        plain = b.to_host.bind(a.add.bind(inp, 1).with_tensor_transport(transport)).compile(max_inflight=1)
    try:
        with pytest.raises(actorlib.SerializationError, match="could not deserialize the graph's output"):
            actorlib.get(unreadable.execute(torch.ones(1)), timeout=30)
        with pytest.raises(actorlib.SerializationError, match="graph's output"):
            actorlib.get(unreadable.execute(torch.ones(1)), timeout=30)
        nested = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])
        with pytest.raises(actorlib.SerializationError, match="arguments of execute"):
            plain.execute(nested)
        assert actorlib.get(plain.execute(torch.zeros(1)), timeout=30).tolist() == [1.0]
    finally:
        unreadable.teardown()
        plain.teardown()


def test_an_output_that_cannot_be_sent_fails_before_it_is_announced(env):
    """The receiver is told of a value only once its tensors are ready to go: one that fails on the way
    (here its copy runs out of memory) leaves no receives posted that a later execution's tensors would land in."""
    transport, (a, b, _) = env
    with InputNode() as inp:
        compiled = b.check.bind(a.make_or_break.bind(inp).with_tensor_transport(transport)).compile(max_inflight=2)
    try:
        for spec in ("broken", ((5,), "float32"), "broken", ((3, 2), "float64")):
            ref = compiled.execute(spec)
            if spec == "broken":
                with pytest.raises(actorlib.ActorLibError, match="could not send the output of"):
                    actorlib.get(ref, timeout=30)
            else:
                shape, dtype = spec
                n = 1
                for d in shape:
                    n *= d
                assert list(actorlib.get(ref, timeout=30)[:3]) == [list(shape), dtype, float(sum(range(n)))]
    finally:
        compiled.teardown()


def test_a_failed_compile_leaves_the_other_actors_idle_and_serving(al):
    """c's set-up fails while a and b are still building their channel: the driver tears the graph down on them
    mid-set-up, and they must neither go on setting it up nor keep a closed inbox (their sync threads idle)."""
    a, b, c = (StageActor.remote(name, "cpu") for name in "abc")
    try:
        al.get(c.sabotage_next_setup.remote(), timeout=30)
        with InputNode() as inp:
            dag = MultiOutputNode([b.mul.bind(a.add.bind(inp).with_tensor_transport("gloo")), c.add.bind(inp)])
        with pytest.raises(RuntimeError, match="sabotaged set-up"):
            dag.compile(timeout=30)
        pids = al.get([s.pid.remote() for s in (a, b, c)], timeout=30)
        wait_for(lambda: all(not al.get(s.stats.remote(), timeout=30) for s in (a, b, c)), timeout=30, what="teardown")
        before = [cpu_seconds(p) for p in pids]
        time.sleep(1.0)  # the measured idle window
        used = [round(cpu_seconds(p) - x, 3) for p, x in zip(pids, before, strict=True)]
        assert all(u < 0.2 for u in used), f"CPU seconds used in 1 s idle (a, b, c): {used}"
        assert al.get([s.ping.remote() for s in (a, b, c)], timeout=30) == ["a", "b", "c"]
        with InputNode() as inp:
            again = b.mul.bind(a.add.bind(inp).with_tensor_transport("gloo")).compile(timeout=30)
        try:
            assert al.get(again.execute(torch.ones(2)), timeout=30).tolist() == [4.0, 4.0]
        finally:
            again.teardown()
    finally:
        for s in (a, b, c):
            al.kill(s)


def test_compiling_with_a_dead_actor_raises(al):
    a, b = (StageActor.remote(name, "cpu") for name in "de")
    os.kill(actorlib.get(b.pid.remote(), timeout=30), signal.SIGKILL)
    wait_for(lambda: _dead(b), timeout=30, what="the actor to be known dead")
    with InputNode() as inp:
        dag = b.add.bind(a.add.bind(inp))
    with pytest.raises(actorlib.ActorDiedError):
        dag.compile(timeout=30)
    assert actorlib.get(a.stats.remote(), timeout=30) == {}  # nothing left behind on the living one
    actorlib.kill(a)


def _dead(actor) -> bool:
    try:
        actorlib.get(actor.ping.remote(), timeout=10)
    except actorlib.ActorDiedError:
        return True
    return False


# -- building graphs: errors raised before anything is sent ----------------------------------------


def test_bad_graphs_are_refused_at_bind_or_compile(al):
    @actorlib.remote
    class Gen:
        def stream(self, n):
            yield n

        def f(self, x):
            return x

    g, h = Gen.remote(), Gen.remote()
    with pytest.raises(TypeError, match="generator"):
        g.stream.bind(1)
    with InputNode() as inp:
        node = g.f.bind(inp)
        with pytest.raises(TypeError, match="top-level"):
            g.f.bind([node])
        with pytest.raises(ValueError, match="transport"):
            node.with_tensor_transport("tcp")
        with pytest.raises(TypeError):
            inp.with_tensor_transport("gloo")
    with pytest.raises(TypeError, match="method node"):
        inp.compile()
    with pytest.raises(ValueError, match="max_inflight"):
        node.compile(max_inflight=0)
    with pytest.raises(ValueError, match="at most one InputNode"):
        MultiOutputNode([g.f.bind(InputNode()), g.f.bind(InputNode())]).compile()
    if CUDA_DEVICES == 0:
        with pytest.raises(ValueError, match="no CUDA device"):
            h.f.bind(g.f.bind(inp).with_tensor_transport("nccl")).compile()
    compiled = node.compile()
    try:
        with pytest.raises(TypeError, match="exactly one positional argument"):
            compiled.execute(1, 2)
        assert actorlib.get(compiled.execute("plain values work too"), timeout=30) == "plain values work too"
    finally:
        compiled.teardown()
        actorlib.kill(g)
        actorlib.kill(h)


@pytest.mark.slow
def test_benchmark_workloads_run(tmp_path):
    """W7 and DAG in benchmarks/run.py work (tiny sizes; the figures go in the notes, not in tests)."""
    import json
    import subprocess
    import sys

    from .conftest import ROOT_DIR

    env = {**os.environ, "PYTHONPATH": ROOT_DIR, "ACTORLIB_TMPDIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT_DIR, "benchmarks", "run.py"), "--tiny", "-w", "W7,DAG"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=True,
    )
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    figures = {(r["workload"], r["metric"]) for r in rows if "workload" in r}
    assert figures == {
        ("W7", "gib_per_s"),
        ("W7", "gib_per_s_pipelined"),
        ("W7", "raw_gloo_gib_per_s"),
        ("W7", "ratio_to_raw"),
        ("W7", "overhead_ms"),
        ("DAG", "p50_us"),
        ("DAG", "p99_us"),
        ("DAG", "w1_p50_us_interleaved"),
        ("DAG", "ratio_to_w1"),
        ("DAG", "p50_us_gloo"),
        ("DAG", "ratio_to_w1_gloo"),
        ("DAG", "p50_us_between_only"),
        ("DAG", "ratio_to_w1_between_only"),
    }
    # every figure is positive but overhead_ms: a difference of medians, below zero when W7 beats raw gloo
    assert all(r["value"] > 0 for r in rows if "workload" in r and r["metric"] != "overhead_ms")
    assert all(math.isfinite(r["value"]) for r in rows if "workload" in r)
