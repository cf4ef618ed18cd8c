"""Cancelling calls at every stage, streams whose consumer goes away, and waits that give up: nothing hangs,
nothing piles up."""

import asyncio
import os
import time

import pytest

from actorlib.api import driver
from actorlib.exceptions import RemoteError, TaskCancelledError

from .conftest import wait_for


def _wait_path(path, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.005)


@pytest.fixture(scope="module")
def classes(cluster):
    @cluster.remote
    class Worker:
        def __init__(self):
            self.started = self.ended = 0

        async def hold_loop(self, started, release):
            """Block the actor's event loop (a sync sleep in an async method) until ``release`` exists."""
            open(started, "w").close()  # noqa: ASYNC230 (blocking the loop is the point)
            _wait_path(release)
            return "held"

        def hold_thread(self, started, release):
            open(started, "w").close()
            _wait_path(release)
            return "held"

        async def forever(self):
            await asyncio.sleep(3600)

        async def on_loop(self):
            return "loop"

        async def cancels_itself(self):
            inner = asyncio.ensure_future(asyncio.sleep(10))
            inner.cancel()
            await inner  # the method's own CancelledError: nobody cancelled this call

        def use(self, value):
            return value

        def ping(self):
            return "pong"

        def gen(self, n):
            self.started += 1
            yield from range(n)

        def endless(self):
            i = 0
            try:
                while True:
                    yield i
                    i += 1
            finally:
                self.ended += 1

        async def aendless(self):
            i = 0
            try:
                while True:
                    yield i
                    i += 1
            finally:
                self.ended += 1

        def streams_ended(self):
            return self.ended

        def generators_started(self):
            return self.started

    @cluster.remote
    class Consumer:
        def hold_open(self, producer, method):
            self.stream = getattr(producer, method).options(generator_backpressure=4).remote()
            return cluster.get(next(self.stream), timeout=30)  # then reads no more: the producer waits for credit

    return Worker, Consumer


def test_an_async_call_cancelled_before_its_first_step_is_answered(cluster, classes, tmp_path):
    """The call and its cancel reach the worker together while its loop is busy: the task was cancelled
    before it ran, its handlers never ran, and get() waited for ever."""
    Worker, _ = classes
    w = Worker.remote()
    started, release = str(tmp_path / "started"), str(tmp_path / "release")
    held = w.hold_loop.remote(started, release)
    _wait_path(started)
    ref = w.forever.remote()
    cluster.cancel(ref)
    open(release, "w").close()
    assert cluster.get(held, timeout=30) == "held"
    with pytest.raises(TaskCancelledError):
        cluster.get(ref, timeout=30)
    cluster.kill(w)


def test_a_call_cancelled_while_it_waits_for_its_arguments_holds_up_no_later_call(cluster, classes):
    Worker, _ = classes
    a, b = Worker.remote(), Worker.remote()
    never = b.forever.remote()
    waiting = a.use.remote(never)  # sent only once its argument is ready: never
    conns = driver().rt._conns
    wait_for(lambda: a._actor_id in conns and conns[a._actor_id]._flushing, 30, what="the call to wait for its argument")
    cluster.cancel(waiting)
    with pytest.raises(TaskCancelledError):
        cluster.get(waiting, timeout=30)
    assert cluster.get(a.ping.remote(), timeout=30) == "pong"
    cluster.cancel(never)
    cluster.kill(a)
    cluster.kill(b)


def test_a_stream_closed_before_it_started_never_runs_its_generator(cluster, classes, tmp_path):
    Worker, _ = classes
    w = Worker.remote()
    started, release = str(tmp_path / "started"), str(tmp_path / "release")
    held = w.hold_thread.remote(started, release)  # the sync thread is busy: the stream queues behind it
    _wait_path(started)
    stream = w.gen.remote(5)
    stream.close()
    assert cluster.get(w.on_loop.remote(), timeout=30) == "loop"  # the close was read before this (one socket)
    open(release, "w").close()
    assert cluster.get(held, timeout=30) == "held"
    assert cluster.get(w.generators_started.remote(), timeout=30) == 0
    cluster.kill(w)


@pytest.mark.parametrize("method", ["endless", "aendless"])
def test_a_producer_whose_consumer_died_stops_waiting_for_credit(cluster, classes, method):
    """Nobody would ever send credit or close: a sync generator held the actor's sync thread for good."""
    Worker, Consumer = classes
    producer, consumer = Worker.remote(), Consumer.remote()
    assert cluster.get(consumer.hold_open.remote(producer, method), timeout=30) == 0
    cluster.kill(consumer)
    wait_for(lambda: cluster.get(producer.streams_ended.remote(), timeout=30) == 1, 30, what="the generator to be closed")
    assert cluster.get(producer.ping.remote(), timeout=30) == "pong"
    cluster.kill(producer)


def test_waits_that_give_up_leave_no_callback_on_the_refs(cluster, classes):
    Worker, _ = classes
    w = Worker.remote()
    ref = w.forever.remote()
    for _ in range(50):
        cluster.wait([ref], timeout=0)
        cluster.wait([ref, w.ping.remote()], num_returns=1, timeout=30)

    async def give_up():
        for _ in range(50):
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(ref, 0.001)

    asyncio.run(give_up())
    assert not ref._fut._callbacks  # one per wait before
    cluster.cancel(ref)
    with pytest.raises(TaskCancelledError):
        cluster.get(ref, timeout=30)
    cluster.kill(w)


def test_a_cancelled_error_the_method_raises_itself_is_its_error_not_a_cancel(cluster, classes):
    Worker, _ = classes
    w = Worker.remote()
    with pytest.raises(RemoteError) as info:
        cluster.get(w.cancels_itself.remote(), timeout=30)
    assert not isinstance(info.value, TaskCancelledError) and isinstance(info.value.cause, asyncio.CancelledError)
    cluster.kill(w)
