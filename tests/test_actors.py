"""The core runtime end to end: real worker processes, real sockets."""

import asyncio
import os
import threading
import time

import msgpack
import numpy as np
import pytest
import zmq

from actorlib.exceptions import (
    ActorDiedError,
    ActorLibError,
    GetTimeoutError,
    RemoteError,
    SerializationError,
    TaskCancelledError,
)
from transport.protocol import VERSION
from transport.security import cluster_key

from .conftest import cpu_seconds, wait_for


class Boom(Exception):
    def __init__(self, code):
        super().__init__(f"boom {code}")
        self.code = code


class NeedsArguments(Exception):
    def __new__(cls, what, count):
        return super().__new__(cls, what, count)


class ArrivesUnreadable:
    """Pickles fine in the actor; fails to unpickle at the driver."""

    def __reduce__(self):
        return (_refuse_to_load, ())


def _refuse_to_load():
    raise RuntimeError("this value cannot be loaded here")


def make_classes(actorlib):
    @actorlib.remote
    class Counter:
        def __init__(self, start=0):
            self.n = start
            self.log = []

        def incr(self, by=1):
            self.n += by
            self.log.append(by)
            return self.n

        def history(self):
            return self.log

        def slow_incr(self, delay, by=1):
            time.sleep(delay)
            return self.incr(by)

        async def wait_then(self, delay, value):
            await asyncio.sleep(delay)
            return value

        async def sleep_forever(self):
            await asyncio.sleep(3600)

        def fail(self, code):
            raise Boom(code)

        def fail_with(self, kind):
            if kind == "memory":
                raise MemoryError("simulated")
            if kind == "exit":
                raise SystemExit(3)
            if kind == "key":
                raise KeyError("k")
            if kind == "os":
                open("/nonexistent/actorlib-test")
            raise NeedsArguments("several", 2)

        def relay_failure(self, other, kind):
            import actorlib

            return actorlib.get(other.fail_with.remote(kind), timeout=30)

        def echo(self, *args, **kwargs):
            return args, kwargs

        def pid(self):
            return os.getpid()

        def gen(self, n):
            yield from range(n)

        async def agen(self, n, delay=0.0):
            for i in range(n):
                if delay:
                    await asyncio.sleep(delay)
                yield i

        def gen_fail(self, n):
            yield from range(n)
            raise ValueError("mid-stream")

        async def counted_gen(self, n):
            self.produced = 0
            for i in range(n):
                self.produced = i + 1
                yield i

        async def produced_count(self):
            return getattr(self, "produced", 0)

        def gen_unreadable(self, n):
            yield 0
            yield ArrivesUnreadable()
            yield from range(2, n)

        async def endless(self):
            self.endless_closed = False
            try:
                i = 0
                while True:
                    yield i
                    i += 1
            finally:
                self.endless_closed = True

        def endless_was_closed(self):
            return getattr(self, "endless_closed", None)

        def context(self):
            import actorlib as al

            ctx = al.get_runtime_context()
            return (
                ctx.get_actor_id(),
                ctx.get_actor_name(),
                ctx.namespace,
                ctx.get_node_id(),
                al.get_gpu_ids(),
                os.environ.get("CUDA_VISIBLE_DEVICES"),
            )

        def call_other(self, handle, x):
            import actorlib as al

            return al.get(handle.incr.remote(x), timeout=30)

        async def call_other_async(self, handle, x):
            return await handle.incr.remote(x)

        async def blocking_get_of_a_list_with_a_failure_in_async(self, handle):
            import actorlib as al

            failed = handle.fail.remote(1)
            try:
                await failed
            except Boom:
                pass
            try:
                al.get([handle.incr.remote(1), failed])
            except ActorLibError as exc:
                return str(exc)
            return "no error"

        async def blocking_get_in_async(self, handle):
            import actorlib as al

            try:
                al.get(handle.incr.remote(1))
            except ActorLibError as exc:
                return str(exc)
            return "no error"

        def torch_loaded(self):
            import sys

            return "torch" in sys.modules

        def exit_after_writing_pieces(self, pieces):
            import sys

            for piece in pieces:  # apart: the node agent reads them one by one
                sys.stderr.write(piece)
                sys.stderr.flush()
                time.sleep(0.05)
            os._exit(1)

        def exit_after_writing(self, text):
            import sys

            sys.stderr.write(text)
            sys.stderr.flush()
            os._exit(1)

        def exit_now(self, code):
            import sys

            print("about to exit", file=sys.stderr, flush=True)
            os._exit(code)

    return Counter


@pytest.fixture(scope="module")
def Counter(cluster):
    return make_classes(cluster)


def test_sync_and_async_calls(cluster, Counter):
    c = Counter.remote(10)
    assert cluster.get(c.incr.remote(), timeout=30) == 11
    assert cluster.get([c.incr.remote(2), c.incr.remote(3)], timeout=30) == [13, 16]

    async def main():
        return await c.wait_then.remote(0.01, "ok"), await c.incr.remote()

    assert asyncio.run(main()) == ("ok", 17)


def test_lifetime_non_detached_is_the_default_spelled_out(cluster, Counter):
    actor = Counter.options(lifetime="non_detached").remote()
    assert cluster.get(actor.incr.remote(), timeout=30) == 1
    cluster.kill(actor)


def test_sync_methods_run_in_call_order(cluster, Counter):
    c = Counter.remote()
    refs = [c.slow_incr.remote(0.01 if i % 3 == 0 else 0, i) for i in range(30)]
    cluster.get(refs, timeout=60)
    assert cluster.get(c.history.remote(), timeout=30) == list(range(30))


def test_a_burst_of_calls_from_an_event_loop_keeps_its_order_and_leaves_while_that_loop_is_blocked(cluster, Counter):
    """Calls made in one step of the caller's own loop go out batched; nothing waits for that loop to step again."""
    c = Counter.remote()
    cluster.get(c.incr.remote(0), timeout=30)  # connected: the next calls may go straight out

    async def main():
        first = [c.incr.remote(i) for i in range(1, 101)]
        # this loop is blocked from here (as a notebook cell blocks its kernel's loop): another thread waits
        waiter = threading.Thread(target=lambda: box.append(cluster.get(first, timeout=30)))
        waiter.start()
        waiter.join(timeout=40)
        assert box, "the batched calls never left while the caller's loop was blocked"
        second = [c.incr.remote(i) for i in range(101, 151)]
        blocked = cluster.get(second[-1], timeout=30)  # a blocking get in the same step
        third = [c.incr.remote(i) for i in range(151, 201)]
        return blocked, await asyncio.gather(*second, *third)

    box = []
    blocked, rest = asyncio.run(main())
    assert blocked == sum(range(151))
    assert cluster.get(c.history.remote(), timeout=30) == list(range(201))
    assert rest[-1] == sum(range(201))


def test_async_methods_run_concurrently_up_to_max_concurrency(cluster, Counter):
    c = Counter.remote()
    t0 = time.monotonic()
    assert cluster.get([c.wait_then.remote(0.5, i) for i in range(20)], timeout=60) == list(range(20))
    assert time.monotonic() - t0 < 5  # 20 x 0.5 s would be 10 s in sequence
    limited = Counter.options(max_concurrency=2).remote()
    cluster.get(limited.incr.remote(), timeout=30)
    t0 = time.monotonic()
    cluster.get([limited.wait_then.remote(0.3, i) for i in range(4)], timeout=60)
    assert time.monotonic() - t0 >= 0.55  # two rounds of two


def test_remote_error_is_instance_of_user_class_with_traceback(cluster, Counter):
    c = Counter.remote()
    with pytest.raises(Boom) as info:
        cluster.get(c.fail.remote(7), timeout=30)
    err = info.value
    assert isinstance(err, RemoteError) and err.code == 7
    assert "raise Boom(code)" in err.traceback_text and "boom 7" in str(err)
    # the actor keeps serving
    assert cluster.get(c.incr.remote(), timeout=30) == 1


def test_builtin_errors_that_resist_subclassing_still_reach_the_caller(cluster, Counter):
    """MemoryError's __new__ refuses a derived class it does not know; NeedsArguments's wants arguments."""
    c = Counter.remote()
    with pytest.raises(MemoryError) as info:
        cluster.get(c.fail_with.remote("memory"), timeout=30)
    assert isinstance(info.value, RemoteError) and "MemoryError: simulated" in str(info.value)
    with pytest.raises(NeedsArguments, match="several") as other:
        cluster.get(c.fail_with.remote("other"), timeout=30)
    assert isinstance(other.value, RemoteError) and "raise NeedsArguments" in other.value.traceback_text
    assert "queue.Empty" not in other.value.traceback_text  # nothing of the runtime's own in the user's traceback


def test_remote_errors_keep_args_and_fields_and_their_class_through_actors(cluster, Counter):
    c, d = Counter.remote(), Counter.remote()
    with pytest.raises(KeyError) as key:
        cluster.get(c.fail_with.remote("key"), timeout=30)
    assert key.value.args == ("k",)
    with pytest.raises(FileNotFoundError) as missing:
        cluster.get(c.fail_with.remote("os"), timeout=30)
    assert missing.value.errno == 2 and missing.value.filename == "/nonexistent/actorlib-test"
    with pytest.raises(KeyError) as relayed:  # raised in d, uncaught in c: still a KeyError at the driver
        cluster.get(c.relay_failure.remote(d, "key"), timeout=30)
    assert "raise KeyError" in relayed.value.traceback_text
    # the caller must not take a remote SystemExit for its own (it would exit quietly, status 0)
    with pytest.raises(RemoteError) as exited:
        cluster.get(c.fail_with.remote("exit"), timeout=30)
    assert not isinstance(exited.value, SystemExit) and isinstance(exited.value.cause, SystemExit)


def test_a_stream_item_that_cannot_be_read_ends_the_stream_and_frees_the_actor(cluster, Counter):
    """The consumer ends the stream on an item it cannot read, and tells the producer: a sync generator
    waiting for credit would otherwise hold the actor's sync thread, and every later sync call, for good."""
    c = Counter.remote()
    items = c.gen_unreadable.options(generator_backpressure=2).remote(100)
    first = items.next(timeout=30)  # item 0, or the error if item 0 came in the same message as the bad one
    with pytest.raises(SerializationError, match="cannot be loaded here"):
        assert cluster.get(first, timeout=30) == 0
        cluster.get(items.next(timeout=30), timeout=30)
    with pytest.raises(StopIteration):
        items.next(timeout=30)
    assert cluster.get(c.incr.remote(), timeout=30) == 1


def test_a_stream_dropped_while_the_loop_holds_its_socket_is_closed_afterwards(cluster, Counter):
    """A generator whose last reference goes (say, in a garbage collection) on the I/O thread while it holds
    the connection's lock: its close is queued for the loop, never sent there and then (a deadlock)."""
    from actorlib import runtime

    c = Counter.remote()
    holder = [c.endless.options(generator_backpressure=2).remote()]
    assert cluster.get(holder[0].next(timeout=30), timeout=30) == 0
    rt = runtime.current()
    endpoint = rt._conns[c._actor_id].endpoint
    dropped = threading.Event()

    def drop_holding_the_lock():
        with endpoint._lock:
            holder.clear()  # the generator's __del__ runs here
        dropped.set()

    rt.call_soon(drop_holding_the_lock)
    assert dropped.wait(30)
    wait_for(lambda: cluster.get(c.endless_was_closed.remote(), timeout=30), timeout=30, what="the stream's close")


def test_get_of_a_list_raises_a_remote_error_without_waiting_for_the_refs_after_it(cluster, Counter):
    c, d = Counter.remote(), Counter.remote()
    slow = d.wait_then.remote(60, "late")
    with pytest.raises(Boom, match="boom 3"):
        cluster.get([c.fail.remote(3), slow], timeout=30)
    assert not slow.done()
    cluster.kill(d)


def test_an_answer_arrives_when_showing_the_workers_output_fails(cluster, Counter, monkeypatch):
    """In a notebook the loop shows a worker's output before its answer; a failure there (a full disk) is
    logged, and the answer still arrives."""
    from actorlib import runtime

    rt = runtime.current()

    def disk_full(actor_id):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rt, "direct_answers", False)
    monkeypatch.setattr(rt, "drain_output", disk_full)
    c = Counter.remote()
    assert cluster.get(c.incr.remote(), timeout=30) == 1


def test_an_actor_no_socket_can_be_opened_to_fails_its_calls(cluster, Counter, monkeypatch):
    from actorlib import connection

    class NoSockets:
        @staticmethod
        def connect(*args, **kwargs):
            raise zmq.ZMQError(24)  # EMFILE: too many open files

    c = Counter.remote()
    monkeypatch.setattr(connection, "Endpoint", NoSockets)
    with pytest.raises(ActorDiedError, match="could not connect to the actor"):
        cluster.get(c.incr.remote(), timeout=30)
    cluster.kill(c)


def test_wait_and_get_timeout(cluster, Counter):
    c = Counter.remote()
    fast, slow = c.wait_then.remote(0, "fast"), c.wait_then.remote(30, "slow")
    ready, pending = cluster.wait([slow, fast], num_returns=1, timeout=20)
    assert ready == [fast] and pending == [slow]
    with pytest.raises(GetTimeoutError, match="within 0.2 s"):
        cluster.get(slow, timeout=0.2)
    failing = c.fail.remote(1)  # done, but after a ref that is not: that one's timeout, named as asked
    with pytest.raises(GetTimeoutError, match=r"wait_then\(\) did not finish within 0.2 s"):
        cluster.get([slow, failing], timeout=0.2)
    # other traffic on the same connection (a stream's items) does not keep a timed-out get waiting
    items = []
    consumer = threading.Thread(target=lambda: items.extend(cluster.get(r, timeout=30) for r in c.agen.remote(300, 0.01)))
    consumer.start()
    t0 = time.monotonic()
    with pytest.raises(GetTimeoutError):
        cluster.get(slow, timeout=0.3)
    assert time.monotonic() - t0 < 2.5  # bound: the stream goes on for 3 s
    consumer.join(60)
    assert items == list(range(300))
    ready, pending = cluster.wait([slow], timeout=0.1)
    assert ready == [] and pending == [slow]
    cluster.cancel(slow)


def test_get_wait_and_get_actor_refuse_bad_arguments_at_once(cluster, Counter):
    ref = Counter.remote().incr.remote()
    for bad in ("1", -1, True, float("nan")):
        with pytest.raises(ValueError, match="timeout must be a number"):
            cluster.get(ref, timeout=bad)
        with pytest.raises(ValueError, match="timeout must be a number"):
            cluster.wait([ref], timeout=bad)
    for bad in (1.5, True):
        with pytest.raises(ValueError, match="num_returns must be a whole number"):
            cluster.wait([ref], num_returns=bad)
    with pytest.raises(TypeError, match="takes a list of ObjectRefs"):
        cluster.wait(ref)
    assert cluster.wait([]) == ([], [])  # as Ray's
    pg = cluster.placement_group([{"CPU": 0.01}])
    with pytest.raises(TypeError, match="not a coroutine.*pg.wait"):
        cluster.get(pg.ready())  # Ray's ray.get(pg.ready())
    cluster.remove_placement_group(pg)
    for bad in ("", 5):
        with pytest.raises(ValueError, match="namespace must be"):
            cluster.get_actor("someone", namespace=bad)
    assert cluster.get(ref, timeout=30) == 1


def test_object_ref_arguments_are_resolved_first(cluster, Counter):
    a, b = Counter.remote(), Counter.remote(100)
    slow = a.wait_then.remote(0.3, 5)
    out = b.echo.remote(slow, 1, k=a.incr.remote())
    assert cluster.get(out, timeout=30) == ((5, 1), {"k": 1})
    # order is kept: a call behind one that waits on a ref runs after it
    r1 = b.incr.remote(a.wait_then.remote(0.3, 1))
    r2 = b.incr.remote(1000)
    assert cluster.get([r1, r2], timeout=30) == [101, 1101]
    # an error in the argument fails the call with that error
    with pytest.raises(Boom):
        cluster.get(b.echo.remote(a.fail.remote(3)), timeout=30)


def test_handles_pass_to_other_actors(cluster, Counter):
    a, b = Counter.remote(), Counter.remote()
    assert cluster.get(b.call_other.remote(a, 5), timeout=30) == 5
    assert cluster.get(b.call_other_async.remote(a, 5), timeout=30) == 10
    assert "await" in cluster.get(b.blocking_get_in_async.remote(a), timeout=30)
    # a list holding a failed ref still has a pending one before it: the same refusal, not a hang
    assert "await" in cluster.get(b.blocking_get_of_a_list_with_a_failure_in_async.remote(a), timeout=30)


def test_generators_stream_in_order_sync_and_async(cluster, Counter):
    c = Counter.remote()
    assert [cluster.get(r) for r in c.gen.remote(5000)] == list(range(5000))
    assert [cluster.get(r) for r in c.agen.remote(300)] == list(range(300))

    async def consume():
        return [await r async for r in c.agen.remote(50, 0.001)]

    assert asyncio.run(consume()) == list(range(50))
    assert list(c.gen.remote(0)) == []


def test_blocking_gets_beside_streams_from_the_same_actor_lose_and_reorder_nothing(cluster, Counter):
    # A thread blocked in get() reads its answer off the connection itself and hands the loop whatever
    # else it reads there (here: the stream's items, which must stay in order).
    c = Counter.remote()
    streamed = {}

    def consume(name, gen):
        streamed[name] = [cluster.get(r, timeout=30) for r in gen]

    threads = [
        threading.Thread(target=consume, args=("sync", c.gen.remote(2000))),
        threading.Thread(target=consume, args=("async", c.agen.remote(300, 0.001))),
    ]
    for t in threads:
        t.start()
    values = [cluster.get(c.wait_then.remote(0, i), timeout=30) for i in range(300)]
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert values == list(range(300))
    assert streamed == {"sync": list(range(2000)), "async": list(range(300))}


def test_sync_calls_keep_their_order_whoever_reads_them(cluster, Counter):
    # An idle sync thread takes sync calls off the actor's socket itself; an async call makes it leave
    # the socket to the loop again until the next sync call. Each caller's sync calls still run in order.
    c = Counter.remote()

    def caller(base):
        refs = []
        for i in range(1, 201):
            refs.append(c.incr.remote(base + i))
            if i % 7 == 0:
                refs.append(c.wait_then.remote(0, i))
            if i % 50 == 0:
                cluster.get(refs[-1], timeout=30)  # the thread goes idle now and then
        cluster.get(refs, timeout=60)

    threads = [threading.Thread(target=caller, args=(base,)) for base in (10_000, 20_000)]
    for t in threads:
        t.start()
    caller(0)
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    history = cluster.get(c.history.remote(), timeout=30)
    for base in (0, 10_000, 20_000):
        assert [x - base for x in history if base < x <= base + 200] == list(range(1, 201))


def test_while_a_sync_call_runs_the_loop_serves_async_calls_and_cancels(cluster, Counter):
    c = Counter.remote()
    assert cluster.get([c.incr.remote() for _ in range(20)], timeout=30)[-1] == 20  # the thread now reads calls itself
    time.sleep(0.1)  # idle a while: the loop, standing aside, stops looking (the thread must wake it when it gets busy)
    slow = c.slow_incr.remote(4.0)
    fast = c.wait_then.remote(0, "fast")
    ready, _ = cluster.wait([fast, slow], num_returns=1, timeout=30)
    assert ready == [fast] and not slow.done()
    queued = c.incr.remote(100)
    cluster.cancel(queued)
    with pytest.raises(TaskCancelledError):
        cluster.get(queued, timeout=30)
    assert not slow.done()
    assert cluster.get(slow, timeout=30) == 21


def test_an_actor_idle_after_a_burst_of_sync_calls_uses_no_cpu(cluster, Counter):
    c = Counter.remote()
    pid = cluster.get(c.pid.remote(), timeout=30)
    for _ in range(300):
        cluster.get(c.incr.remote(), timeout=30)
    before = cpu_seconds(pid)
    time.sleep(1.0)  # the measured idle window
    used = cpu_seconds(pid) - before
    assert used < 0.2, f"{used:.3f} CPU seconds in 1 s idle"
    assert cluster.get(c.incr.remote(), timeout=30) == 301


def test_a_blocking_get_spins_briefly_then_sleeps(cluster, Counter):
    c = Counter.remote()
    assert cluster.get(c.incr.remote(), timeout=30) == 1
    ref = c.slow_incr.remote(0.5)
    before = time.thread_time()
    assert cluster.get(ref, timeout=30) == 2
    used = time.thread_time() - before
    # the spin is at most 1 ms; a thread that polled for the whole 0.5 s would use about that much CPU
    assert used < 0.1, f"get() used {used * 1000:.0f} ms of CPU waiting 500 ms: it must sleep after a short spin"


def test_the_get_spin_follows_how_long_recent_gets_took():
    from actorlib.spin import SPIN_S, Recent

    recent = Recent()
    for _ in range(100):
        recent.took(50e-6)  # short calls: poll about twice as long as they take
    assert recent.spin_for() == pytest.approx(min(SPIN_S, 100e-6), rel=0.01)
    for _ in range(100):
        recent.took(0.01)  # long calls: polling would only burn CPU
    assert recent.spin_for() == 0.0
    for _ in range(6):
        recent.took(50e-6)  # a long wait counts as just too long: a few short ones bring the polling back
    assert recent.spin_for() > 0.0
    for _ in range(100):
        recent.took(50e-6)
    recent.took(30.0)  # one idle spell among short waits does not stop it
    assert recent.spin_for() > 0.0


def test_the_get_spin_is_set_by_its_environment_variable(monkeypatch):
    from actorlib.spin import _spin_s

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setenv("ACTORLIB_GET_SPIN_US", "250")
    assert _spin_s() == pytest.approx(250e-6)
    monkeypatch.setenv("ACTORLIB_GET_SPIN_US", "0")
    assert _spin_s() == 0.0
    for bad in ("fast", "-5", "nan"):
        monkeypatch.setenv("ACTORLIB_GET_SPIN_US", bad)
        with pytest.raises(ValueError, match="ACTORLIB_GET_SPIN_US"):
            _spin_s()
    monkeypatch.setenv("ACTORLIB_GET_SPIN_US", "250")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert _spin_s() == 0.0  # one CPU: the answer needs it


def test_calls_and_streams_leave_no_reference_cycles_in_the_caller(cluster, Counter):
    """A cycle (a ref's cancel callback holds its call, which holds the ref) would keep each answer, and its
    buffers (a shared-memory mapping), until the garbage collector next ran."""
    import gc

    c = Counter.remote()
    assert cluster.get(c.incr.remote(), timeout=30) == 1
    gc.collect()
    gc.disable()
    try:
        for _ in range(100):
            cluster.get(c.incr.remote(), timeout=30)
        for _ in range(20):
            assert [cluster.get(r, timeout=30) for r in c.gen.remote(3)] == [0, 1, 2]
        cluster.get([c.incr.remote() for _ in range(10)], timeout=30)
        collected = gc.collect()
    finally:
        gc.enable()
    assert collected < 50, f"{collected} objects in reference cycles after 130 calls (13 a call with one)"


def test_in_a_notebook_a_workers_print_shows_before_its_answer(cluster, capsys, monkeypatch):
    """In a notebook kernel, answers go through the loop, which reads the worker's output first: a line the
    method printed is shown by the time get() returns (it would otherwise come by way of the head, later)."""

    @cluster.remote
    class Talker:
        def say(self, i):
            print(f"line {i}")
            return i

    rt = cluster.api.runtime.current()
    t = Talker.remote()
    assert cluster.get(t.say.remote(-1), timeout=30) == -1
    wait_for(lambda: "line -1" in capsys.readouterr().out, timeout=10, what="the first line")
    monkeypatch.setattr(rt, "direct_answers", False)  # as in a notebook kernel
    for i in range(20):
        assert cluster.get(t.say.remote(i), timeout=30) == i
        shown = capsys.readouterr().out
        assert f"line {i}\n" in shown and shown.count(f"line {i}\n") == 1, f"call {i}: {shown!r}"


def test_generator_exception_surfaces_on_next_item(cluster, Counter):
    c = Counter.remote()
    gen = c.gen_fail.remote(3)
    assert [cluster.get(next(gen)) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="mid-stream"):
        cluster.get(next(gen))
    with pytest.raises(StopIteration):
        next(gen)


def test_generator_backpressure_pauses_the_producer(cluster, Counter):
    c = Counter.remote()
    gen = c.counted_gen.options(generator_backpressure=8).remote(10_000)
    assert cluster.get(next(gen), timeout=30) == 0
    time.sleep(0.3)  # give a runaway producer the chance to run ahead
    produced = cluster.get(c.produced_count.remote(), timeout=30)
    assert produced <= 8 + 1, produced
    gen.close()
    # after close the actor is still fine and the producer stopped
    time.sleep(0.1)
    assert cluster.get(c.produced_count.remote(), timeout=30) <= 10


def test_cancel_running_async_call_and_queued_call(cluster, Counter):
    c = Counter.remote()
    ref = c.sleep_forever.remote()
    time.sleep(0.2)
    cluster.cancel(ref)
    with pytest.raises(TaskCancelledError):
        cluster.get(ref, timeout=30)
    busy = c.slow_incr.remote(0.5)
    queued = c.incr.remote(100)
    cluster.cancel(queued)
    with pytest.raises(TaskCancelledError):
        cluster.get(queued, timeout=30)
    assert cluster.get(busy, timeout=30) == 1


def test_kill_fails_pending_and_later_calls(cluster, Counter):
    c = Counter.remote()
    pid = cluster.get(c.pid.remote(), timeout=30)
    pending = c.sleep_forever.remote()
    t0 = time.monotonic()
    cluster.kill(c)
    with pytest.raises(ActorDiedError) as info:
        cluster.get(pending, timeout=30)
    assert time.monotonic() - t0 < 5
    assert info.value.pid == pid and "kill" in str(info.value)
    with pytest.raises(ActorDiedError):
        cluster.get(c.incr.remote(), timeout=30)


def test_worker_death_reports_exit_code_and_stderr(cluster, Counter):
    c = Counter.remote()
    pid = cluster.get(c.pid.remote(), timeout=30)
    with pytest.raises(ActorDiedError) as info:
        cluster.get(c.exit_now.remote(3), timeout=30)
    err = info.value
    assert err.pid == pid and err.exit_code == 3 and "about to exit" in "\n".join(err.stderr_tail)
    assert "exit_code=3" in str(err)


def test_a_dying_workers_last_words_reach_the_driver_as_a_terminal_shows_them(cluster, Counter):
    """Its last line without a newline (often the error that ended it); a progress bar redrawn with \r as the
    line it ends as (its every redraw is not held: 20 000 of them)."""
    c = Counter.remote()
    with pytest.raises(ActorDiedError) as info:
        cluster.get(c.exit_after_writing.remote("started\nRuntimeError: CUDA out of memory"), timeout=30)
    assert info.value.stderr_tail[-2:] == ["started", "RuntimeError: CUDA out of memory"]
    c = Counter.remote()
    bar = "".join(f"\rstep {i}" for i in range(20_000)) + "\ndone\n"
    with pytest.raises(ActorDiedError) as info:
        cluster.get(c.exit_after_writing.remote(bar), timeout=30)
    assert info.value.stderr_tail[-2:] == ["step 19999", "done"]
    c = Counter.remote()  # redrawn by ending each drawing with \r (not starting it with one)
    with pytest.raises(ActorDiedError) as info:
        cluster.get(c.exit_after_writing_pieces.remote(["0%\r", "50%\r", "100%\r", "done\n"]), timeout=30)
    assert info.value.stderr_tail[-1] == "done"


def test_constructor_failure_is_actor_died_with_traceback(cluster):
    @cluster.remote
    class Bad:
        def __init__(self):
            raise RuntimeError("cannot start")

        def f(self):
            return 1

    b = Bad.remote()
    with pytest.raises(ActorDiedError, match="cannot start"):
        cluster.get(b.f.remote(), timeout=30)


def test_named_actors_and_runtime_context(cluster, Counter):
    c = Counter.options(name="counter-a").remote(1)
    with pytest.raises(ValueError, match="already taken"):
        Counter.options(name="counter-a").remote()
    same = cluster.get_actor("counter-a")
    assert cluster.get(same.incr.remote(), timeout=30) == 2
    with pytest.raises(ValueError, match="no actor named"):
        cluster.get_actor("counter-a", namespace="elsewhere")
    actor_id, name, ns, node_id, gpus, cvd = cluster.get(c.context.remote(), timeout=30)
    assert name == "counter-a" and ns == "default" and len(actor_id) == 32 and node_id
    assert gpus == [] and cvd == ""
    g = Counter.options(num_gpus=1).remote()
    _, _, _, _, gpus, cvd = cluster.get(g.context.remote(), timeout=30)
    assert len(gpus) == 1 and cvd == str(gpus[0])
    cluster.kill(c)
    wait = time.monotonic() + 10
    while time.monotonic() < wait:
        try:
            cluster.get_actor("counter-a")
        except ValueError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("a dead actor's name was not released")


def test_bad_input_errors_at_the_call_site(cluster, Counter):
    c = Counter.remote()
    with pytest.raises(SerializationError, match="lock"):
        c.echo.remote(threading.Lock())
    with pytest.raises(AttributeError, match="'Counter' has no method 'nope'"):
        c.nope.remote()
    with pytest.raises(TypeError, match="unknown actor option"):
        Counter.options(gpus=1)
    with pytest.raises(ValueError, match="num_gpus"):
        Counter.options(num_gpus=-1)
    with pytest.raises(TypeError, match=r"\.remote"):
        Counter()
    with pytest.raises(TypeError, match=r"\.remote"):
        c.incr()
    with pytest.raises(ValueError, match="never be placed"):
        Counter.options(num_gpus=64).remote()
    with pytest.raises(SerializationError, match="top-level"):
        c.echo.remote([c.incr.remote()])


def test_garbage_on_a_worker_socket_leaves_it_serving(cluster, Counter):
    c = Counter.remote()
    cluster.get(c.incr.remote(), timeout=30)
    info = [
        a
        for a in cluster.api.runtime.current().run(cluster.api.runtime.current().control("list_actors"))
        if a["actor_id"] == c._actor_id
    ][0]
    ctx = zmq.Context.instance()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    cluster_key().apply(raw, server=False)  # a member of the cluster, sending garbage
    raw.connect(info["address"])
    try:
        # a call of a known sync method with a bad argument list: the idle sync thread takes such calls itself
        raw.send_multipart([msgpack.packb((VERSION, 1, 7, msgpack.packb(["incr", 5, {}, None])))])
        assert raw.poll(10_000), "the CALL with bad arguments was not answered"
        version, kind, req_id, body = msgpack.unpackb(raw.recv_multipart()[0])
        assert (kind, req_id) == (3, 7) and b"could not deserialize" in body  # an ERROR
        for frames in ([b"\xff" * 64], [b""], [bytes([0x94, VERSION, 1, 5]) + b"\xc4\x03abc"], [os.urandom(1000), os.urandom(10)]):
            raw.send_multipart(frames)
        assert raw.poll(10_000), "the CALL with a bad body was not answered"
        assert raw.recv_multipart()
    finally:
        raw.close()
    assert cluster.get(c.incr.remote(), timeout=30) == 2


def test_arrays_and_tensors_round_trip_through_an_actor(cluster, Counter):
    import torch

    c = Counter.remote()
    arr = np.random.default_rng(0).random((256, 256))
    t = torch.arange(1000, dtype=torch.bfloat16)
    (a2, t2), _ = cluster.get(c.echo.remote(arr, t), timeout=30)
    assert np.array_equal(a2, arr) and torch.equal(t2, t)


def test_workers_do_not_import_torch(cluster, Counter):
    c = Counter.remote()
    assert cluster.get(c.torch_loaded.remote(), timeout=30) is False


def test_blocking_get_inside_a_running_loop_like_jupyter(cluster, Counter):
    c = Counter.remote()

    async def cell():
        # a notebook cell: the thread runs a loop, and a blocking get still works
        value = cluster.get(c.incr.remote(), timeout=30)
        # this thread reads `first`'s answer, which the I/O loop waits for to send the second call:
        # it must be woken at once, not in a turn of this thread's loop (blocked in get)
        await asyncio.sleep(0)  # a new step of this loop: the next call leaves at once (not batched)
        first = c.wait_then.remote(0.2, 5)
        both = cluster.get([first, c.echo.remote(first)], timeout=30)
        return value, await c.incr.remote(), both

    assert asyncio.run(cell()) == (1, 2, [5, ((5,), {})])


def test_arrays_may_change_once_remote_returns(cluster):
    @cluster.remote
    class Keeper:
        def __init__(self):
            self.buf = np.zeros(1 << 20, dtype=np.uint8)

        def checksum(self, arr, extra=None):
            return int(arr.sum())

        def fill_and_return(self, value):
            self.buf[:] = value  # the previous result may still be on its way: it must not change
            return self.buf

    k = Keeper.remote()
    arr = np.ones(1 << 20, dtype=np.uint8)
    small = np.ones(8, dtype=np.uint8)  # a small last frame is copied by ZeroMQ: the big one must still be waited for
    refs = []
    for v in range(1, 6):
        arr[:] = v
        refs.append(k.checksum.remote(arr, small))  # then changed right away
    assert cluster.get(refs, timeout=60) == [v * (1 << 20) for v in range(1, 6)]
    results = [k.fill_and_return.remote(v) for v in range(1, 6)]
    assert [int(cluster.get(r, timeout=60)[0]) for r in results] == [1, 2, 3, 4, 5]


def test_streamed_arrays_are_snapshots(cluster):
    @cluster.remote
    class Filler:
        def frames(self, n):
            buf = np.zeros(1 << 16, dtype=np.uint8)
            for i in range(n):
                buf[:] = i  # the same array, changed in place after each yield
                yield buf
                yield {"i": i, "tag": "plain"}

    items = [cluster.get(r, timeout=30) for r in Filler.remote().frames.remote(20)]
    arrays, plain = items[0::2], items[1::2]
    assert [int(a[0]) for a in arrays] == list(range(20)) and all(a.min() == a.max() for a in arrays)
    assert plain == [{"i": i, "tag": "plain"} for i in range(20)]


def test_a_runtime_wait_that_gives_up_stops_what_it_waited_for(cluster):
    """``Runtime.run`` timing out (or interrupted) cancels the coroutine on the loop: a compile() given up
    on must not go on setting its graph up unwatched."""
    from actorlib import runtime

    rt = runtime.current()
    ended = []

    async def slow():
        try:
            await asyncio.sleep(30)
        finally:
            ended.append(True)

    with pytest.raises(TimeoutError):
        rt.run(slow(), timeout=0.2)
    wait_for(lambda: ended, timeout=10, what="the coroutine to be cancelled")
