"""A worker group's calls through shared-memory slots (actorlib.broadcast): the same answers, order and
failures as over ZeroMQ, a sleeping worker woken by its bell or poked, a call still in its slot cancelled,
no CPU when idle."""

import asyncio
import functools
import os
import struct
import threading
import time

import pytest

import actorlib
from actorlib import VirtualCluster, WorkerGroup, broadcast
from actorlib.exceptions import ActorDiedError, RemoteError, TaskCancelledError
from transport import Kind, dumps

from .conftest import cpu_seconds, local_cluster, wait_for

pytestmark = pytest.mark.skipif(not broadcast.ENABLED, reason="the shared-memory path is off on this machine")


class Recorder:
    def __init__(self):
        self.seen = []
        self.stamps = []  # when each ("call", i) ran

    def log(self, item):
        self.seen.append(item)
        if isinstance(item, tuple) and item[0] == "call":
            self.stamps.append(time.monotonic_ns())
        return int(os.environ["RANK"])

    def call_stamps(self):
        return list(self.stamps)

    def seen_items(self):
        return list(self.seen)

    def pid(self):
        return os.getpid()

    def refuse(self):
        raise ValueError(f"rank {os.environ['RANK']} refuses")

    def big(self, n):
        return b"y" * n

    def exit(self):
        os._exit(3)

    def slow(self, seconds, marker):
        open(marker, "w").close()
        time.sleep(seconds)
        return seconds

    def sleep_then_rank(self, seconds):
        time.sleep(seconds)
        return int(os.environ["RANK"])


@actorlib.remote
class Occupier:
    """Another caller, keeping a worker's sync thread busy."""

    def hold(self, worker, seconds, marker):
        return actorlib.get(worker.slow.remote(seconds, marker), timeout=60)


@pytest.fixture(scope="module")
def al():
    with local_cluster(num_cpus=8) as actorlib_:
        yield actorlib_


@pytest.fixture
def group(al):
    cluster = VirtualCluster([3], use_gpus=False)
    g = WorkerGroup(cluster, Recorder)
    yield g
    g.shutdown(force=True)
    cluster.shutdown()


def warm(group, rounds=50):
    for i in range(rounds):
        assert actorlib.get(group.run_all_workers_single_data("log", ("warm", i)), timeout=30) == [0, 1, 2]


def test_back_to_back_calls_go_through_the_slots(group):
    assert group._broadcast is not None
    sent = group._broadcast.sent
    warm(group, 300)
    # polling workers are awake for most of them (how many depends on the machine's load: the benchmark
    # counts them), and most answers come back the same way, get() polling for them
    counts = (group._broadcast.sent - sent, group._broadcast.replied)
    assert counts[0] > 0 and counts[1] > 0, counts
    seen = actorlib.get(group.run_all_workers_single_data("seen_items"), timeout=30)
    assert seen == [[("warm", i) for i in range(300)]] * 3


def test_calls_keep_their_order_both_ways(group, monkeypatch):
    """A call in a slot is never overtaken by a later one over ZeroMQ, nor overtakes an earlier one."""
    first = group.workers[0]
    _ready_if_taken(monkeypatch, group._broadcast)  # every group call that can goes through the slots
    sent = group._broadcast.sent
    refs, expected = [], []
    for i in range(300):
        refs += group.run_all_workers_single_data("log", ("group", i))
        refs.append(first.log.remote(("plain", i)))
        expected += [("group", i), ("plain", i)]
        if i % 2:
            actorlib.get(refs, timeout=30)
            refs = []
    actorlib.get(refs, timeout=30)
    assert group._broadcast.sent > sent
    seen = actorlib.get(group.run_all_workers_single_data("seen_items"), timeout=30)
    assert seen[0] == expected
    assert seen[1] == seen[2] == [e for e in expected if e[0] == "group"]


def test_answers_too_big_for_a_slot_and_to_asyncio_callers(group):
    """Answers go over ZeroMQ when they do not fit, or when nobody polls the slots (an asyncio caller, while
    another thread's get() polls them at the same time)."""
    warm(group)
    assert [len(b) for b in actorlib.get(group.run_all_workers_single_data("big", 200_000), timeout=30)] == [200_000] * 3
    assert [len(b) for b in actorlib.get(group.run_all_workers_single_data("big", 60_000), timeout=30)] == [60_000] * 3

    async def awaiting():
        for i in range(200):
            assert await asyncio.gather(*group.run_all_workers_single_data("log", ("async", i))) == [0, 1, 2]

    failures = []

    def getting():
        try:
            warm(group, 200)
        except BaseException as exc:
            failures.append(exc)

    other = threading.Thread(target=getting)
    other.start()
    try:
        asyncio.run(asyncio.wait_for(awaiting(), 60))
    finally:
        other.join(60)
    assert not other.is_alive() and not failures


def _first_looks_awake(monkeypatch, slots, n):
    """The caller's next ``n`` looks at whether a worker is awake say it is (it writes the slot); later ones,
    as the one after writing, are true (a worker asleep is poked)."""
    lies = iter([True] * n)
    monkeypatch.setattr(slots, "_awake", lambda mm, i: next(lies, None) or broadcast.Broadcast._awake(mm, i))


def _ready_if_taken(monkeypatch, slots):
    """The caller writes a slot whenever its worker has taken what was there, awake or not (a worker asleep
    is poked, as the caller's look after writing is true)."""
    taken = broadcast._HEADER + broadcast._TAKEN
    monkeypatch.setattr(slots, "_ready_for", lambda w, i: w[(taken + i * broadcast._SLOT) >> 3] == slots._seq[i])


def test_an_error_and_a_death_through_the_slots(group, monkeypatch):
    warm(group)
    _ready_if_taken(monkeypatch, group._broadcast)  # (workers asleep on a slow machine would send them by ZeroMQ)
    sent = group._broadcast.sent
    refs = group.run_all_workers_single_data("refuse")
    for rank, ref in enumerate(refs):
        with pytest.raises(RemoteError, match=f"rank {rank} refuses"):
            actorlib.get(ref, timeout=30)
    warm(group, 5)  # the group goes on
    assert group._broadcast.sent >= sent + 6
    monkeypatch.undo()
    pids = actorlib.get(group.run_all_workers_single_data("pid"), timeout=30)
    sent = group._broadcast.sent
    _first_looks_awake(monkeypatch, group._broadcast, 3)  # (and one asleep is poked)
    refs = group.run_all_workers_single_data("exit")
    for ref in refs:
        with pytest.raises(ActorDiedError):
            actorlib.get(ref, timeout=30)
    assert group._broadcast.sent == sent + 1
    wait_for(lambda: not any(os.path.exists(f"/proc/{p}") for p in pids), what="the workers gone")


def _count_pokes(monkeypatch):
    pokes = []
    poke = broadcast.poke
    monkeypatch.setattr(broadcast, "poke", lambda rt, aid, cls: (pokes.append(aid), poke(rt, aid, cls)))
    return pokes


def test_workers_asleep_are_written_and_woken_by_their_bells(group, monkeypatch):
    """Workers asleep on a bell take the group's call through their slots: one byte each wakes them, no poke."""
    warm(group)
    slots = group._broadcast
    mm = slots._w
    assert all(slots._bells), slots._bells
    pokes = _count_pokes(monkeypatch)
    for round_ in range(3):
        wait_for(lambda: all(slots._asleep_with_bell(mm, i) for i in range(3)), what="the workers asleep")
        sent = slots.sent
        assert actorlib.get(group.run_all_workers_single_data("log", ("rung", round_)), timeout=30) == [0, 1, 2]
        assert slots.sent == sent + 1
    assert pokes == []
    assert all(("rung", r) in seen for seen in actorlib.get([w.seen_items.remote() for w in group.workers]) for r in range(3))
    pids = actorlib.get(group.run_all_workers_single_data("pid"), timeout=30)
    wait_for(lambda: all(slots._asleep_with_bell(mm, i) for i in range(3)), what="the workers asleep")
    before = [cpu_seconds(p) for p in pids]
    time.sleep(1.0)  # the measured idle window: a bell rung and never emptied would keep them polling
    used = [round(cpu_seconds(p) - b, 3) for p, b in zip(pids, before, strict=True)]
    assert all(u < 0.2 for u in used), f"CPU seconds used by the workers in 1 s idle: {used}"


def test_a_worker_fallen_asleep_meanwhile_is_poked(group, monkeypatch):
    """The caller saw the workers awake, then they slept before it wrote, and it has no bells to ring (another
    machine's abstract namespace ...): the reserved poke wakes them. Without the lie it does not write at all."""
    warm(group)
    slots = group._broadcast
    mm = slots._w
    monkeypatch.setattr(slots, "_bells", [None] * 3)
    pokes = _count_pokes(monkeypatch)
    wait_for(lambda: not any(slots._awake(mm, i) for i in range(3)), what="the workers asleep")
    sent = slots.sent
    assert actorlib.get(group.run_all_workers_single_data("log", "by zmq"), timeout=30) == [0, 1, 2]
    assert slots.sent == sent and pokes == []
    wait_for(lambda: not any(slots._awake(mm, i) for i in range(3)), what="the workers asleep")
    _first_looks_awake(monkeypatch, slots, 3)
    assert actorlib.get(group.run_all_workers_single_data("log", "poked"), timeout=30) == [0, 1, 2]
    assert slots.sent == sent + 1
    assert sorted(pokes) == sorted(w._actor_id for w in group.workers)


def test_a_bell_that_is_gone_says_so():
    bell = broadcast.make_bell()
    assert bell is not None
    name = bell.getsockname().decode()
    caller = broadcast.Broadcast(1)
    try:
        caller.unlink()
        caller.set_bell(0, "not a bell")  # anything but a bell's name is ignored
        assert caller._bells == [None]
        caller.set_bell(0, name)
        assert caller._bells == [name]
        for _ in range(3):
            assert broadcast.ring_bell(name)
        broadcast.drain_bell(bell)
        with pytest.raises(BlockingIOError):
            bell.recv(64)
        bell.close()
        assert not broadcast.ring_bell(name)  # its worker died: the caller pokes instead
    finally:
        caller.close()
    assert caller._bells == [None]


def test_a_call_still_in_its_slot_is_cancelled(group, monkeypatch, tmp_path):
    """Worker 0 is busy with another caller's call; the group's call waits in its slot and is cancelled there."""
    warm(group)
    slots = group._broadcast
    occupier = Occupier.remote()
    try:
        marker = str(tmp_path / "busy")
        held = occupier.hold.remote(group.workers[0], 3.0, marker)
        wait_for(lambda: os.path.exists(marker), timeout=60, what="worker 0 busy")
        monkeypatch.setattr(slots, "_awake", lambda mm, i: True)  # the others may have fallen asleep
        sent = slots.sent
        refs = group.run_all_workers_single_data("log", "cancel me")
        assert slots.sent == sent + 1
        actorlib.cancel(refs[0])
        with pytest.raises(TaskCancelledError):
            actorlib.get(refs[0], timeout=30)
        assert actorlib.get(held, timeout=30) == 3.0
    finally:
        actorlib.kill(occupier)
    monkeypatch.undo()
    seen = actorlib.get(group.run_all_workers_single_data("seen_items"), timeout=30)
    assert "cancel me" not in seen[0]


def test_a_cancel_of_a_later_call_leaves_the_one_in_the_slot_first(group, tmp_path):
    """Every worker busy with other callers' calls: X waits in the slots, Y and Z follow over ZeroMQ, and Z is
    cancelled. Worker 0 still runs X before Y (the cancel takes only the call it cancels out of a slot)."""
    warm(group)
    slots = group._broadcast
    occupiers = [Occupier.remote() for _ in range(3)]
    try:
        markers = [str(tmp_path / f"busy{i}") for i in range(3)]
        held = [o.hold.remote(w, 2.0, m) for o, w, m in zip(occupiers, group.workers, markers, strict=True)]
        wait_for(lambda: all(os.path.exists(m) for m in markers), timeout=60, what="the workers busy")
        sent = slots.sent
        x = group.run_all_workers_single_data("log", "X")
        assert slots.sent == sent + 1
        first = group.workers[0]
        y, z = first.log.remote("Y"), first.log.remote("Z")
        actorlib.cancel(z)
        with pytest.raises(TaskCancelledError):
            actorlib.get(z, timeout=30)
        assert actorlib.get(x + [y], timeout=30) == [0, 1, 2, 0]
        actorlib.get(held, timeout=30)
    finally:
        for o in occupiers:
            actorlib.kill(o)
    seen = actorlib.get(group.workers[0].seen_items.remote(), timeout=30)
    assert [item for item in seen if item in ("X", "Y", "Z")] == ["X", "Y"]


def test_a_malformed_message_in_a_slot_does_not_stop_the_worker(group):
    warm(group)
    slots = group._broadcast
    with slots.lock:  # an event naming an unhashable graph, where the worker expected a call
        slots._write(slots._w, 0, Kind.EVENT, 0, dumps(["exec", ["not", "a", "graph id"], 1, None])[0])
    pid = actorlib.get(group.workers[0].pid.remote(), timeout=30)
    assert actorlib.get(group.run_all_workers_single_data("pid"), timeout=30)[0] == pid
    warm(group, 5)


def test_an_idle_group_uses_no_cpu(group):
    warm(group, 300)
    pids = actorlib.get(group.run_all_workers_single_data("pid"), timeout=30)
    before = [cpu_seconds(p) for p in pids]
    time.sleep(1.0)  # the measured idle window
    used = [round(cpu_seconds(p) - b, 3) for p, b in zip(pids, before, strict=True)]
    assert all(u < 0.2 for u in used), f"CPU seconds used by the workers in 1 s idle: {used}"


class _Endpoint:
    """Where the caller's side hands answers (in place of a connection's endpoint, for the slots' protocol)."""

    def __init__(self):
        self.delivered = []

    def deliver(self, msg):
        self.delivered.append((msg.kind, msg.req_id, msg.body))


def _pair():
    """The caller's side of a one-worker file, and the worker's slot mapped from it (as attach does)."""
    slots = broadcast.Broadcast(1)
    mapped = broadcast._map(slots.path, slots.token, 0)
    slots.unlink()
    assert mapped is not None
    endpoint = _Endpoint()
    slots.attached(0, endpoint)
    return slots, broadcast.Slot(mapped, 0, b"peer"), endpoint


def test_an_answer_written_as_the_caller_stops_polling_is_taken_by_it():
    """The worker saw the caller polling and wrote its answer there; the caller stopped before looking again:
    stopping looks once more, so the answer is not lost (the worker sends nothing over ZeroMQ)."""
    slots, slot, endpoint = _pair()
    try:
        watch = broadcast.ReplyWatch({slots})
        watch.start()
        assert slot.answer(Kind.RESULT, 7, b"\x01")
        watch.stop()
        assert endpoint.delivered == [(Kind.RESULT, 7, b"\x01")]
        watch.stop()
        slots.take_replies()
        assert len(endpoint.delivered) == 1 and slots.replied == 1
    finally:
        slots.close()


def test_a_worker_waits_briefly_for_a_caller_that_does_not_poll_and_then_less_often():
    slots, slot, endpoint = _pair()
    try:
        assert not slot.answer(Kind.RESULT, 1, b"\x01")  # nobody polls: over ZeroMQ, after a short wait
        assert (slot._skip, slot._backoff) == (1, 1)
        assert not slot.answer(Kind.RESULT, 2, b"\x01")  # the next one does not wait
        assert slot._skip == 0
        assert not slot.answer(Kind.RESULT, 2, b"\x01")  # the one after waits again, and the next two do not
        assert (slot._skip, slot._backoff) == (2, 2)
        watch = broadcast.ReplyWatch({slots})
        watch.start()
        assert slot.answer(Kind.ERROR, 3, b"\x02")  # polled: through the slot
        assert not slot.answer(Kind.RESULT, 4, b"x" * (broadcast.BODY_MAX + 1))  # too big for it
        watch.stop()
        assert endpoint.delivered == [(Kind.ERROR, 3, b"\x02")]
    finally:
        slots.close()


def test_a_caller_asleep_on_its_answers_bell_is_rung_and_takes_the_answer():
    """A caller that stopped polling sleeps on its answers' bell: the worker writes its answer into the slot and
    rings it, or, with the bell gone, sends it over ZeroMQ from then on; one written as the caller wakes for
    good is taken by it."""
    slots, slot, endpoint = _pair()
    try:
        slots.answer_bell = broadcast.make_bell()
        name = slots.answer_bell.getsockname().decode()
        slot.ring_caller = functools.partial(broadcast.ring_bell, name)
        watch = broadcast.ReplyWatch({slots})
        assert watch.sleep() == [slots.answer_bell]
        assert slot.answer(Kind.RESULT, 1, b"\x01")  # asleep: written, and rung
        assert slots.answer_bell.recv(64) == b"\0"
        watch.take()
        assert endpoint.delivered == [(Kind.RESULT, 1, b"\x01")] and (watch.rung, watch.taken) == (1, 0)
        assert slot.answer(Kind.RESULT, 2, b"\x02")  # written as the caller wakes for good: stop() takes it
        watch.stop()
        assert endpoint.delivered[-1] == (Kind.RESULT, 2, b"\x02") and watch.rung == 2
        assert not slot.answer(Kind.RESULT, 3, b"\x03")  # nobody polls or sleeps: over ZeroMQ
        assert slots.answer_bell.recv(64) == b"\0"  # (the one rung for the second answer)
        with pytest.raises(BlockingIOError):
            slots.answer_bell.recv(64)

        watch = broadcast.ReplyWatch({slots})
        watch.sleep()
        slots.answer_bell.close()  # the bell gone (its caller exited ...): over ZeroMQ, and no more rings
        assert not slot.answer(Kind.RESULT, 4, b"\x04")
        assert slot.ring_caller is None
        watch.stop()
    finally:
        slots.close()


def test_answers_of_slow_calls_come_back_through_the_slots_while_the_caller_sleeps(group):
    """Calls that run longer than the caller polls: it sleeps on its answers' bell, and the answers come back
    through the slots (as a compiled graph's outputs do)."""
    warm(group)
    slots = group._broadcast
    assert slots.answer_bell is not None
    replied, sent = slots.replied, slots.sent
    for _ in range(3):
        assert actorlib.get(group.run_all_workers_single_data("sleep_then_rank", 0.1), timeout=30) == [0, 1, 2]
    # (each answer comes so unless the caller stalled for 0.1 s before it started waiting: over ZeroMQ then)
    assert slots.replied - replied >= 3, (slots.replied - replied, slots.sent - sent)


def test_an_answer_being_written_is_not_taken():
    slots, slot, endpoint = _pair()
    try:
        watch = broadcast.ReplyWatch({slots})
        watch.start()
        assert slot.answer(Kind.RESULT, 1, b"\x01")
        base = broadcast._HEADER + broadcast._REPLY_SEQ
        seq = struct.unpack_from("<Q", slot._mm, base)[0]
        struct.pack_into("<Q", slot._mm, base, seq + 1)  # odd: the worker is mid-way through the next answer
        assert not slots.replies_ready()
        slots.take_replies()
        assert endpoint.delivered == []
        watch.stop()
    finally:
        slots.close()


@actorlib.remote
class Stage:
    def add(self, x, k=1):
        return x + k

    def slow_add(self, x):
        time.sleep(0.02)
        return x + 1

    async def aadd(self, x, k=1):
        return x + k

    def graph_stats(self):
        from actorlib import dag_worker

        return dag_worker.stats()

    def answer_both_ways(self):
        """From now on every answer written into a slot is sent over ZeroMQ as well (as when the caller stops
        polling right after the worker wrote it)."""
        answer = broadcast.Slot.answer

        def both(slot, kind, req_id, body):
            answer(slot, kind, req_id, body)
            return False

        broadcast.Slot.answer = both


def test_a_compiled_graph_goes_through_the_slots_pipelined_and_poked(al, monkeypatch):
    """Executions in, outputs out through the slots, several in flight (a slot is written again only once
    its actor took what was there); a stage fallen asleep is poked; an actor with an async node gets none."""
    import torch

    from actorlib.dag import InputNode

    a, b = Stage.remote(), Stage.remote()
    with InputNode() as inp:
        dag = b.add.bind(a.add.bind(inp))
    compiled = dag.compile(max_inflight=4)
    try:
        slots = compiled._slots
        assert slots is not None and compiled._link_slots and compiled._output_slots
        for i in range(300):
            assert actorlib.get(compiled.execute(torch.tensor([float(i)])), timeout=30).item() == i + 2
        refs = [compiled.execute(torch.tensor([float(i)])) for i in range(4)]
        assert [r.item() for r in actorlib.get(refs, timeout=30)] == [2.0, 3.0, 4.0, 5.0]
        for _ in range(50):  # pipelined, each read as soon as it is there
            refs = refs[1:] + [compiled.execute(torch.tensor([1.0]))]
            actorlib.get(refs[0], timeout=30)
        actorlib.get(refs, timeout=30)
        assert slots.sent > 0 and slots.replied > 0, (slots.sent, slots.replied)

        index = compiled._link_slots[0][0]
        (gid,) = actorlib.get(a.graph_stats.remote(), timeout=30)
        handed_on = sum(actorlib.get(a.graph_stats.remote(), timeout=30)[gid]["through_slots"].values())
        for _ in range(3):  # both stages asleep: the execution goes in, and on to b, through their slots and bells
            wait_for(lambda: slots._asleep_with_bell(slots._w, index), what="the input stage asleep")
            sent = slots.sent
            assert actorlib.get(compiled.execute(torch.tensor([5.0])), timeout=30).item() == 7.0
            assert slots.sent == sent + 1
        assert sum(actorlib.get(a.graph_stats.remote(), timeout=30)[gid]["through_slots"].values()) == handed_on + 3

        monkeypatch.setattr(slots, "_bells", [None] * len(slots._bells))  # no bell: a stage asleep is poked
        wait_for(lambda: not slots._awake(slots._w, index), what="the input stage asleep")
        _first_looks_awake(monkeypatch, slots, 1)
        sent = slots.sent
        assert actorlib.get(compiled.execute(torch.tensor([5.0])), timeout=30).item() == 7.0
        assert slots.sent == sent + 1
    finally:
        compiled.teardown()
        for actor in (a, b):
            actorlib.kill(actor)

    a = Stage.remote()  # a slow stage: its slot is written while it runs, and not again until it took that
    with InputNode() as inp:
        dag = a.slow_add.bind(inp)
    compiled = dag.compile(max_inflight=4)
    try:
        for _ in range(3):
            actorlib.get(compiled.execute(torch.tensor([0.0])), timeout=30)
        slots = compiled._slots
        sent = slots.sent
        refs = [compiled.execute(torch.tensor([0.0]))]
        wait_for(lambda: slots._awake(slots._w, compiled._link_slots[0][0]), interval=0.001, what="the stage running")
        refs += [compiled.execute(torch.tensor([float(i)])) for i in range(1, 4)]
        assert [r.item() for r in actorlib.get(refs, timeout=30)] == [1.0, 2.0, 3.0, 4.0]
        assert compiled._slots.sent > sent
    finally:
        compiled.teardown()
        actorlib.kill(a)

    c = Stage.remote()
    with InputNode() as inp:
        dag = c.aadd.bind(inp)
    compiled = dag.compile()
    try:
        assert not compiled._link_slots or compiled._link_slots == [None]
        assert actorlib.get(compiled.execute(torch.tensor([1.0])), timeout=30).item() == 2.0
    finally:
        compiled.teardown()
        actorlib.kill(c)


def test_a_graph_output_that_comes_both_ways_counts_once(al):
    """A MultiOutputNode's outputs, each sent through the slot and over ZeroMQ: every execution still waits for
    all of its outputs (a second copy of one must not stand in for another)."""
    import torch

    from actorlib.dag import InputNode, MultiOutputNode

    a = Stage.remote()
    actorlib.get(a.answer_both_ways.remote(), timeout=30)
    with InputNode() as inp:
        dag = MultiOutputNode([a.add.bind(inp), a.add.bind(inp, k=2)])
    compiled = dag.compile(max_inflight=2)
    try:
        for i in range(300):
            out = actorlib.get(compiled.execute(torch.tensor([float(i)])), timeout=30)
            assert [t.item() for t in out] == [i + 1, i + 2]
        assert compiled._slots.replied > 0
    finally:
        compiled.teardown()
        actorlib.kill(a)


def test_a_group_keeps_its_slots_while_its_workers_are_in_a_graph(group, monkeypatch):
    """A compiled graph's open results call to a worker is no call of the caller's on its way there."""
    from actorlib.dag import InputNode

    _ready_if_taken(monkeypatch, group._broadcast)  # (whether the workers poll is not what is tested here)

    with InputNode() as inp:
        dag = group.workers[1].log.bind(group.workers[0].log.bind(inp))
    compiled = dag.compile()
    try:
        assert actorlib.get(compiled.execute("through the graph"), timeout=30) == 1
        sent = group._broadcast.sent
        warm(group, 200)
        assert group._broadcast.sent > sent
    finally:
        compiled.teardown()


def test_a_ctrl_c_as_a_get_starts_polling_leaves_no_flag_set():
    """Interrupted between taking its share of two groups' 'reading' flags, a get() that then stops (its
    finally) leaves both flags down: a flag left up would keep workers answering into slots nobody reads."""
    (first, _, _), (second, _, _) = _pair(), _pair()
    try:
        watch = broadcast.ReplyWatch({first, second})
        late = watch.groups[1]
        real = late.reading

        def interrupted(on):
            if on:
                raise KeyboardInterrupt
            real(on)

        late.reading = interrupted
        with pytest.raises(KeyboardInterrupt):
            watch.start()
        watch.stop()
        for group in (first, second):
            assert group._readers == 0 and group._w[broadcast._READING >> 3] == 0
    finally:
        first.close()
        second.close()


def test_a_group_call_does_not_overtake_a_run_sent_before_it(group, tmp_path):
    """WorkerGroup.run's calls are queued with the user's: one still on its way keeps the next group call off
    the slots (only the runtime's loop-run calls, a graph's or a slot's, do not count)."""
    from actorlib import runtime
    from actorlib.rank_program import RUN_METHOD

    warm(group)
    targets = [(w._actor_id, w._class_name) for w in group.workers]
    for i in range(100):
        refs = runtime.current().submit_many(targets, RUN_METHOD, (_note_run, str(tmp_path), i), {})
        refs += group.run_all_workers_single_data("log", ("call", i))
        actorlib.get(refs, timeout=30)
    for rank in range(3):
        seen = actorlib.get(group.workers[rank].seen_items.remote(), timeout=30)
        calls = [item[1] for item in seen if isinstance(item, tuple) and item[0] == "call"]
        with open(tmp_path / f"runs.{rank}") as f:
            runs = [tuple(map(int, line.split())) for line in f]
        assert calls == [i for i, _ in runs] == list(range(100))
        stamps = [stamp for _, stamp in runs]
        called = actorlib.get(group.workers[rank].call_stamps.remote(), timeout=30)
        assert all(run_at < call_at for run_at, call_at in zip(stamps, called, strict=True)), rank


def _note_run(directory, i):
    with open(os.path.join(directory, f"runs.{os.environ['RANK']}"), "a") as f:
        f.write(f"{i} {time.monotonic_ns()}\n")


@actorlib.remote(max_restarts=1)
class Counter:
    """An actor of its own (no group): a thread's calls to it go through the connection's slot."""

    def __init__(self):
        self.seen = []

    def log(self, item):
        self.seen.append(item)
        return item

    async def alog(self, item):
        self.seen.append(item)
        return item

    def seen_items(self):
        return list(self.seen)

    def pid(self):
        return os.getpid()

    def exit(self):
        os._exit(3)

    def gen(self, n):
        for i in range(n):
            self.seen.append(("gen", i))
            yield i


def _own_slot(actor):
    from actorlib import runtime

    return runtime.current()._conns[actor._actor_id].slot


def _through_own_slot(actor, start, n=100):
    """Call ``actor.log`` back to back; True if some of those calls and answers went through its slot."""
    for i in range(start, start + n):
        assert actorlib.get(actor.log.remote(i), timeout=30) == i
        slot = _own_slot(actor)
        if slot is not None and slot.sent > 2 and slot.replied > 2:
            return True
    return False


def test_a_thread_calling_an_actor_back_to_back_goes_through_its_own_slot(al):
    """After a few sync calls from a thread, the next go through the connection's own slot; and they keep
    their order with calls that cannot (several in flight, an ObjectRef argument, an async method)."""
    a = Counter.remote()
    try:
        assert actorlib.get(a.log.remote("first"), timeout=30) == "first"
        assert _own_slot(a) is None  # not for an actor called once or twice
        assert _through_own_slot(a, 0, 500)
        expected = actorlib.get(a.seen_items.remote(), timeout=30)
        for i in range(200):
            item = ("mixed", i)
            if i % 4 == 0:
                refs = [a.log.remote(item)]
            elif i % 4 == 1:  # the first may go through the slot, the second (one in flight) cannot
                refs = [a.log.remote(item), a.log.remote((item, "second"))]
            elif i % 4 == 2:  # the third waits for the second's answer, and for nothing else
                refs = [a.log.remote(item), a.log.remote(a.log.remote((item, "by ref")))]
            else:
                refs = [a.alog.remote(item)]
            expected += {1: [item, (item, "second")], 2: [item, (item, "by ref"), (item, "by ref")]}.get(i % 4, [item])
            actorlib.get(refs, timeout=30)
        assert actorlib.get(a.seen_items.remote(), timeout=30) == expected
    finally:
        actorlib.kill(a)


def test_an_actor_restarted_gets_a_new_slot_and_a_dead_one_fails_the_call_in_it(al):
    from actorlib import runtime

    a = Counter.remote()
    try:
        assert _through_own_slot(a, 0, 500)
        conn = runtime.current()._conns[a._actor_id]
        first, pid = conn.slot, actorlib.get(a.pid.remote(), timeout=30)
        with pytest.raises(ActorDiedError):
            actorlib.get(a.exit.remote(), timeout=30)
        wait_for(lambda: actorlib.get(a.pid.remote(), timeout=30) != pid, what="the actor restarted")
        assert first._w is None  # closed with the lost worker
        assert _through_own_slot(a, 1000, 500)
        assert _own_slot(a) is not first
        sent = _own_slot(a).sent
        with pytest.raises(ActorDiedError):  # out of restarts: the call fails, wherever it went
            actorlib.get(a.exit.remote(), timeout=30)
        assert conn.slot is None and sent > 0
    finally:
        actorlib.kill(a)


def test_a_worker_keeps_a_bounded_number_of_callers_slots_and_drops_those_of_callers_gone():
    """Unit test of the worker's side (``ActorHost._attach_slot`` on a bare host): each caller's file is real,
    and so is its lock, which tells the worker the caller closed it (or exited)."""
    import types

    from actorlib.worker import ActorHost

    host = types.SimpleNamespace(_wake=-1, _bell=None, _slots=None, _remake_poller=lambda: None)
    callers, slots = [], []
    try:
        for n in range(broadcast.MAX_DIRECT_SLOTS + 1):
            caller = broadcast.Broadcast(1)
            callers.append(caller)
            mapped = broadcast._map(caller.path, caller.token, 0)
            caller.unlink()
            slots.append(broadcast.Slot(mapped, 0, b"peer%d" % n, None, True))
            ActorHost._attach_slot(host, slots[-1])
        awake = [caller._awake(caller._w, 0) for caller in callers]
        assert awake == [True] * broadcast.MAX_DIRECT_SLOTS + [False]  # the last caller's calls go over ZeroMQ
        assert not any(slot.caller_gone() for slot in slots[:-1])
        callers[3].close()  # that caller is done with it
        assert slots[3].caller_gone()
        again = broadcast.Broadcast(1)
        callers.append(again)
        mapped = broadcast._map(again.path, again.token, 0)
        again.unlink()
        ActorHost._attach_slot(host, broadcast.Slot(mapped, 0, b"peer-again", None, True))
        assert again._awake(again._w, 0) and slots[3] not in host._slots.all
        assert sum(s.direct for s in host._slots.all) == broadcast.MAX_DIRECT_SLOTS
    finally:
        for caller in callers:
            caller.close()
        if host._wake >= 0:
            os.close(host._wake)


def test_stages_hand_small_outputs_on_through_a_slot_and_transfers_over_zeromq_in_order(al):
    """Stage to stage: an output with its tensors inside goes through the next stage's slot (it may overtake
    one still on its way over ZeroMQ: the stage sorts them by execution); one with a gloo transfer goes over
    ZeroMQ, in the transfers' order. Several executions in flight, both kinds mixed."""
    import torch

    from actorlib.dag import InputNode

    a, b = Stage.remote(), Stage.remote()
    with InputNode() as inp:
        dag = b.add.bind(a.add.bind(inp).with_tensor_transport("auto"))
    compiled = dag.compile(max_inflight=4)
    try:
        assert compiled._linked == 1
        for i in range(200):
            assert actorlib.get(compiled.execute(torch.tensor([float(i)])), timeout=30).item() == i + 2
        handed = actorlib.get(a.graph_stats.remote(), timeout=30)[compiled.graph_id]["through_slots"]
        assert list(handed) == [b._actor_id] and handed[b._actor_id] > 0, handed
        sizes = [4 if i % 3 else 1 << 18 for i in range(60)]  # 16 B inside the message, or 1 MiB over gloo
        refs = []
        for i, n in enumerate(sizes):
            refs.append(compiled.execute(torch.full((n,), float(i))))
            if len(refs) == 4:
                out = actorlib.get(refs.pop(0), timeout=30)
                j = i - 3
                assert out.numel() == sizes[j] and bool((out == j + 2).all()), j
        for j, ref in zip(range(len(sizes) - len(refs), len(sizes)), refs, strict=True):
            out = actorlib.get(ref, timeout=30)
            assert out.numel() == sizes[j] and bool((out == j + 2).all()), j
    finally:
        compiled.teardown()
        for actor in (a, b):
            actorlib.kill(actor)


def test_a_call_after_a_closed_stream_waits_for_zeromq_to_say_the_close_was_taken(al, monkeypatch):
    """A stream closed by its consumer gets no last answer; until a later call's answer comes back over
    ZeroMQ, the stream's job may still be queued on the worker's sync thread: no call goes through the slot
    meanwhile (it would run first)."""
    a = Counter.remote()
    try:
        assert _through_own_slot(a, 0, 500)
        slot = _own_slot(a)
        from actorlib import runtime

        conn = runtime.current()._conns[a._actor_id]
        stream = a.gen.remote(3)
        stream.close()
        wait_for(lambda: all(c.method != "gen" for c in list(conn._inflight.values())), interval=0.001, what="closed")
        _ready_if_taken(monkeypatch, slot)
        sent = slot.sent
        assert actorlib.get(a.log.remote("after the close"), timeout=30) == "after the close"
        assert slot.sent == sent  # over ZeroMQ, behind the stream
        for i in range(3):  # (the close leaves from the loop: the answer to a call after it says it was taken)
            assert actorlib.get(a.log.remote(("later", i)), timeout=30) == ("later", i)
            if slot.sent > sent:
                break
        assert slot.sent == sent + 1  # the slot again
        seen = actorlib.get(a.seen_items.remote(), timeout=30)
        assert seen.index("after the close") < seen.index(("later", 0))
        assert all(seen.index(item) < seen.index("after the close") for item in seen if isinstance(item, tuple) and item[0] == "gen")
    finally:
        actorlib.kill(a)
