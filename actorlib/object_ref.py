"""Futures for call results: :class:`ObjectRef` and :class:`ObjectRefGenerator`.

An ``ObjectRef`` wraps a :class:`~actorlib.completion.Completion` set with the
raw response by the I/O loop, or by a thread blocked on it that read the
response itself (:func:`wait_reading`); the value is decoded by whoever first
asks for it, in their own thread. It can be awaited from any event loop and waited on from
any thread — except the runtime's own loop, where blocking would deadlock it.

An ``ObjectRefGenerator`` yields one resolved ``ObjectRef`` per streamed item,
in order. Items arrive in batches; the consumer grants the producer credit as
it goes (the producer pauses ``window`` items ahead), and closing the
generator (or dropping it) tells the producer to stop.
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from transport import DecodeError, Kind, Message, loads

from .broadcast import ReplyWatch, drain_bell
from .completion import Completion
from .exceptions import ActorLibError, GetTimeoutError, SerializationError, error_from_record
from .spin import Recent, poll_until

__all__ = ["ObjectRef", "ObjectRefGenerator"]

_UNSET = object()


def _describe(what: Any) -> str:
    return f"{what[0]}.{what[1]}()" if type(what) is tuple else str(what)


# Why an actor call's answer has not come, when the actor is not even running yet: ``(actor id) -> " (...)"``
# or "" (set by the runtime, which knows the connections; asked only when a get() times out).
why_not_running: Callable[[str], str] = lambda actor_id: ""  # noqa: E731


_decode_lock = threading.Lock()


class ObjectRef:
    """The future result of one call. Users never construct one."""

    __slots__ = ("_fut", "_value", "_cancel", "_what", "_source", "__weakref__")

    def __init__(self, what: Any, cancel: Callable[[], None] | None = None) -> None:
        self._fut = Completion()
        self._value: Any = _UNSET
        self._cancel = cancel
        self._what = what  # a str, or (class name, method[, actor id]) formatted only when needed
        # once sent, where its answer comes: ((endpoint, request id, a stream's item?), ...); see wait_reading
        self._source: tuple[tuple[Any, int, bool | None], ...] | None = None  # see wait_reading

    @classmethod
    def resolved(cls, what: str, value: Any = None, error: BaseException | None = None) -> ObjectRef:
        ref = cls(what)
        if error is not None:
            ref._fut.set_exception(error)
        else:
            ref._value = value
            ref._fut.set_result(None)
        return ref

    # completion, from the I/O loop or a thread that read the answer. The cancel callback is let go of:
    # it holds the call, which holds this ref (a reference cycle, and with it the answer's buffers, would
    # otherwise last until the garbage collector next ran).
    def _set_message(self, msg: Message) -> None:
        self._cancel = None
        if not self._fut.done():
            self._fut.set_result(msg)

    def _set_error(self, exc: BaseException) -> None:
        self._cancel = None
        if not self._fut.done():
            self._fut.set_exception(exc)

    def done(self) -> bool:
        return self._fut.done()

    def _result(self, timeout: float | None, asked: float | None = None) -> Any:
        """The value, waiting at most ``timeout`` s (what is left of the caller's ``asked``, which errors name)."""
        if self._value is not _UNSET:
            return self._value
        left = timeout
        if self._source is not None and not self._fut.done():
            left = wait_reading((self,), timeout)
        try:
            msg = self._fut.result(left)
        except TimeoutError:
            asked = timeout if asked is None else asked
            why = why_not_running(self._what[2]) if type(self._what) is tuple and len(self._what) > 2 else ""
            raise GetTimeoutError(f"{_describe(self._what)} did not finish within {asked:g} s{why}") from None
        return self._decode(msg)

    def _decode(self, msg: Message | None) -> Any:
        with _decode_lock:  # one lock for all refs: decoding is short, and a lock per ref costs every call
            if self._value is not _UNSET:
                return self._value
            assert msg is not None
            try:
                value = loads(msg.body, msg.buffers)
            except DecodeError as exc:
                raise SerializationError(f"could not deserialize the result of {_describe(self._what)}: {exc}") from None
            if msg.kind == Kind.ERROR:
                raise error_from_record(value if isinstance(value, dict) else {"message": str(value)})
            self._value = value
            return value

    def __await__(self) -> Any:
        return self._aresult().__await__()

    async def _aresult(self) -> Any:
        if not self._fut.done():
            afut, wake = _loop_future(self._fut)
            try:
                await afut
            finally:
                if not self._fut.done():  # given up (asyncio.wait_for's timeout ...): the ref must not keep its callback
                    self._fut.discard_callback(wake)
        return self._result(0)

    def __reduce__(self) -> Any:
        raise TypeError(
            f"an ObjectRef ({_describe(self._what)}) can only be passed as a top-level argument of a call; "
            "get() its value to nest it in another value"
        )

    def __repr__(self) -> str:
        state = "done" if self._fut.done() else "pending"
        return f"ObjectRef({_describe(self._what)}, {state})"


class StreamState:
    """The consumer's side of one stream, shared by the I/O loop and the consuming thread."""

    def __init__(self, what: str, window: int, send_credit: Callable[[int], None], send_close: Callable[[], None]) -> None:
        self.what = what
        self.window = window
        self._send_credit = send_credit
        self._send_close = send_close
        self._lock = threading.Lock()
        self._items: deque[Any] = deque()
        self._finished = False
        self._error: BaseException | None = None
        self._waiter: Completion | None = None
        self._consumed = 0
        self._credited = 0
        self._closed = False

    # from the I/O loop
    def on_message(self, msg: Message) -> None:
        error: BaseException | None = None
        items: list[Any] = []
        try:
            value = loads(msg.body, msg.buffers)
        except DecodeError as exc:
            error = SerializationError(f"could not deserialize an item of {self.what}: {exc}")
            value = None
        if error is None:
            if msg.kind == Kind.STREAM_ITEM:
                items = value
            elif msg.kind == Kind.ERROR:
                error = error_from_record(value if isinstance(value, dict) else {"message": str(value)})
        producer_done = msg.kind != Kind.STREAM_ITEM
        self._push(items, error, producer_done or error is not None, producer_done)

    def fail(self, exc: BaseException) -> None:
        self._push([], exc, True, True)

    def _push(self, items: list[Any], error: BaseException | None, final: bool, producer_done: bool) -> None:
        close = None
        with self._lock:
            if self._finished:
                return
            self._items.extend(items)
            if error is not None:
                self._error = error
            self._finished = final
            if final:  # no credit or close to send after this. The callbacks hold the call, which holds
                if not producer_done:  # (this: a cycle, and the items' buffers.) An item we could not read
                    close = self._send_close  # ends the stream here: the producer, waiting for credit, is told
                self._send_credit = self._send_close = _ignore
            waiter, self._waiter = self._waiter, None
        if close is not None:
            close()
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # from the consumer
    def _take(self) -> tuple[bool, Any, Completion | None]:
        """``(True, ref)`` for the next item, ``(False, None)`` at the end, or a waiter to wait on."""
        with self._lock:
            if self._items:
                value = self._items.popleft()
                self._consumed += 1
                credit = self._consumed - self._credited >= max(1, self.window // 4)
                if credit:
                    self._credited = self._consumed
            elif self._finished:
                if self._error is not None:
                    err, self._error = self._error, None
                    return True, ObjectRef.resolved(self.what, error=err), None
                return False, None, None
            else:
                if self._waiter is None:
                    self._waiter = Completion()
                return False, None, self._waiter
        if credit:
            self._send_credit(self._consumed)
        return True, ObjectRef.resolved(self.what, value), None

    def next(self, timeout: float | None = None) -> ObjectRef:
        while True:
            ok, ref, waiter = self._take()
            if ok:
                return ref
            if waiter is None:
                raise StopIteration
            try:
                waiter.result(timeout)
            except TimeoutError:
                raise GetTimeoutError(f"no item of {self.what} within {timeout} s") from None

    async def anext(self) -> ObjectRef:
        while True:
            ok, ref, waiter = self._take()
            if ok:
                return ref
            if waiter is None:
                raise StopAsyncIteration
            afut, wake = _loop_future(waiter)
            try:
                await afut
            finally:
                if not waiter.done():
                    waiter.discard_callback(wake)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            finished = self._finished
            self._finished = True
            self._items.clear()
            self._error = None
            waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)  # a consumer waiting elsewhere sees the end
        if not finished:
            self._send_close()


def _ignore(*_: Any) -> None:
    pass


class ObjectRefGenerator:
    """Iterate (sync or async) over a generator method's items as ObjectRefs, in order."""

    def __init__(self, state: StreamState, check_thread: Callable[[], None]) -> None:
        self._state = state
        self._check_thread = check_thread

    def __iter__(self) -> ObjectRefGenerator:
        return self

    def __next__(self) -> ObjectRef:
        self._check_thread()
        return self._state.next()

    def next(self, timeout: float | None = None) -> ObjectRef:
        """The next item's ref, waiting at most ``timeout`` seconds (``GetTimeoutError``)."""
        self._check_thread()
        return self._state.next(timeout)

    def __aiter__(self) -> ObjectRefGenerator:
        return self

    async def __anext__(self) -> ObjectRef:
        return await self._state.anext()

    def close(self) -> None:
        """Stop the stream: the producer is told to stop; items not yet read are dropped."""
        self._state.close()

    def __del__(self) -> None:
        try:
            self._state.close()
        except Exception:
            pass

    def __reduce__(self) -> Any:
        raise TypeError("an ObjectRefGenerator cannot be sent to another process")

    def __repr__(self) -> str:
        return f"ObjectRefGenerator({self._state.what})"


class _Wakeup:
    """A thread's eventfd, written when a completion that thread polls for is set by another thread, and how
    long its recent blocking gets took (to choose how long the next one polls before it sleeps).

    Callbacks left on refs that outlived a wait (a timeout) hold it, so its fd stays this one's.
    """

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.poller = select.poll()
        self.poller.register(self.fd, select.POLLIN)
        self.thread = threading.get_ident()
        self.blocked = False  # the thread waits in wait_reading: a loop it runs is not running now
        self.gets = Recent()  # this thread's blocking gets of one ref (see actorlib.spin)
        self.list_gets = Recent()  # and of several: they take longer, and must not stop the others' polling
        self.slot_gets = Recent(slots=True)  # and of calls that went through shared-memory slots

    def wake(self, _: Completion) -> None:
        if threading.get_ident() != self.thread:
            os.eventfd_write(self.fd, 1)

    def __del__(self) -> None:
        os.close(self.fd)


_thread_state = threading.local()


def failed(fut: Completion) -> bool:
    """A ref's completion holds an error: one set here (the actor died ...), or an ERROR answer not decoded yet."""
    if not fut.done():
        return False
    msg = fut._result
    return fut._exception is not None or (type(msg) is Message and msg.kind == Kind.ERROR)


def wait_reading(refs: Sequence[ObjectRef], timeout: float | None) -> float | None:
    """Wait for calls' answers by reading their connections' sockets on this thread; returns the time left.

    The I/O loop stands aside meanwhile (``Endpoint.share_reading``) but may
    still read the same sockets: whoever reads an answer first delivers it
    (see ``Endpoint.read_responses``); when the loop does, it writes this
    thread's eventfd. This saves the loop -> caller wake-up, the
    thread hop of a blocking round trip that bare ZeroMQ does not have. Refs
    not sent yet are waited for through that eventfd alone. The first wait
    polls a while before it sleeps (see :mod:`actorlib.spin`). Calls that went
    through shared-memory slots are answered there while it polls, and while it
    sleeps too where their workers can ring its answers' bell (see
    :mod:`actorlib.broadcast`). Returns once all are done, or one failed, or
    ``timeout`` passed.
    """
    wakeup = getattr(_thread_state, "wakeup", None)
    if wakeup is None:  # made before endpoints are looked at: its fd is never one of theirs
        wakeup = _thread_state.wakeup = _Wakeup()
    by_endpoint: dict[Any, tuple[set[int], set[int]]] = {}  # endpoint: (calls' request ids, streams' request ids)
    groups = None  # worker groups whose answers' slots to poll too (actorlib.broadcast)
    for ref in refs:
        if ref._source is not None and not ref._fut.done():
            for endpoint, req_id, stream in ref._source:
                if stream is None:
                    groups = groups or set()
                    groups.add(endpoint)
                elif not endpoint.closed and endpoint.fd != wakeup.fd:  # (a closed one's fd may be reused)
                    by_endpoint.setdefault(endpoint, (set(), set()))[stream].add(req_id)
    if not by_endpoint:
        return timeout
    wake_fd, poller = wakeup.fd, wakeup.poller
    futs = [ref._fut for ref in refs]
    by_fd: dict[int, Any] = {}
    shared: list[Any] = []
    deadline = None if timeout is None else time.monotonic() + timeout
    # Nothing to read before the first poll: an answer that came already either left the socket's fd
    # readable, or was seen by a send's look at the socket, which then had the loop read it.
    to_read: list[Any] = []
    start = time.monotonic()
    recent = wakeup.slot_gets if groups else wakeup.gets if len(futs) == 1 else wakeup.list_gets
    spin = recent.spin_for()
    spin_until = 0.0 if not spin else start + spin if deadline is None else min(start + spin, deadline)
    slots = ReplyWatch(groups) if groups else None
    bells: dict[int, Any] = {}  # fd: the answers' bell of a group this thread sleeps on (see ReplyWatch.sleep)

    def sleep_on_bells() -> None:
        assert slots is not None
        for bell in slots.sleep():
            fd = bell.fileno()  # (once: another thread may close it meanwhile, its group shut down)
            if fd >= 0:
                bells[fd] = bell  # first: the end unregisters it, whatever comes in between (Ctrl-C)
                poller.register(fd, select.POLLIN)

    wakeup.blocked = True
    try:
        if slots is not None:
            if spin_until:
                slots.start()  # answers come there while this thread polls
            else:
                sleep_on_bells()  # and while it sleeps, if their workers can ring it
        for fut in futs:
            fut.add_done_callback(wakeup.wake)
        for ep in by_endpoint:
            poller.register(ep.fd, select.POLLIN)
            by_fd[ep.fd] = ep
            ep.share_reading(True)  # its loop stands aside: this thread reads (it would mostly lose the race)
            shared.append(ep)
        while True:
            for ep in to_read:
                if not ep.closed:
                    ep.read_responses(*by_endpoint[ep])
            if slots is not None:
                slots.take()
            if all(f.done() for f in futs) or any(failed(f) for f in futs):
                break
            for fd in [fd for fd, ep in by_fd.items() if ep.closed]:  # its fd may be another file's by now
                poller.unregister(fd)
                del by_fd[fd]
            if not by_fd:
                break  # the loop fails what is left: waiting for that goes on through the eventfd alone
            if deadline is not None and time.monotonic() >= deadline:
                break  # timed out (the fds may stay readable with others' traffic)
            events = None
            if spin_until:
                events = poll_until(poller, spin_until, slots)
                if not events and slots is not None and slots.ready() and time.monotonic() < spin_until:
                    to_read = []
                    continue  # an answer in a slot: taken above, and the polling goes on
                spin_until = 0.0  # once per wait
            if not events:
                if slots is not None and slots.on:
                    slots.stop()  # (it takes what was written meanwhile)
                    sleep_on_bells()
                    to_read = []
                    continue
                wait_ms = -1 if deadline is None else max(0, math.ceil((deadline - time.monotonic()) * 1000))
                events = poller.poll(wait_ms)
            if not events:
                break  # timed out
            to_read = []
            for fd, _ in events:
                if fd == wake_fd:
                    try:
                        os.eventfd_read(wake_fd)
                    except BlockingIOError:
                        pass
                elif fd in by_fd:
                    to_read.append(by_fd[fd])  # (closed since: skipped, then unregistered)
                elif fd in bells:  # an answer in a slot: taken at the top
                    try:
                        drain_bell(bells[fd])
                    except OSError:  # its group closed it (shut down): no more answers there
                        poller.unregister(fd)
                        del bells[fd]
        if all(f.done() for f in futs):
            recent.took(time.monotonic() - start, hit=slots is not None and slots.taken > 0)
    finally:
        if slots is not None:
            slots.stop()
        wakeup.blocked = False
        for fd in by_fd:
            poller.unregister(fd)
        for fd in bells:
            try:
                poller.unregister(fd)
            except (KeyError, ValueError):
                pass  # (interrupted before it was registered)
        for ep in shared:
            ep.share_reading(False)
        for fut in futs:
            fut.discard_callback(wakeup.wake)
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _loop_future(cf: Completion) -> tuple[asyncio.Future[None], Callable[[Completion], None]]:
    """An asyncio future on the running loop that completes when ``cf`` does, and the callback that completes
    it (for ``cf.discard_callback`` if the waiter gives up first).

    Unlike ``asyncio.wrap_future``, completions that happen in a burst on
    another loop's thread reach this loop in one wake-up (see :class:`_Waker`).
    """
    loop = asyncio.get_running_loop()
    afut: asyncio.Future[None] = loop.create_future()
    wake = functools.partial(_wake_loop, loop, afut)  # (a closure would be two more objects per await)
    cf.add_done_callback(wake)
    return afut, wake


def _wake_loop(loop: asyncio.AbstractEventLoop, afut: asyncio.Future[None], _: Completion) -> None:
    _waker.wake(loop, afut)


def _set_done(afuts: list[asyncio.Future[None]]) -> None:
    for afut in afuts:
        if not afut.done():
            afut.set_result(None)


class _Waker:
    """Wakes futures of other loops, one ``call_soon_threadsafe`` per loop per burst."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # (the loop batching, the loop to wake): a batch is flushed by the loop that made it
        self._pending: dict[tuple[asyncio.AbstractEventLoop, asyncio.AbstractEventLoop], list[asyncio.Future[None]]] = {}

    def wake(self, loop: asyncio.AbstractEventLoop, afut: asyncio.Future[None]) -> None:
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if here is loop:
            _set_done([afut])
            return
        wakeup = getattr(_thread_state, "wakeup", None)
        if here is None or (wakeup is not None and wakeup.blocked):  # no loop turn to batch in: wake it now
            _call_in(loop, [afut])
            return
        key = (here, loop)
        with self._lock:
            batch = self._pending.get(key)
            if batch is None:
                self._pending[key] = [afut]
                here.call_soon(self._flush, key)
            else:
                batch.append(afut)

    def _flush(self, key: tuple[asyncio.AbstractEventLoop, asyncio.AbstractEventLoop]) -> None:
        with self._lock:
            batch = self._pending.pop(key, [])
        _call_in(key[1], batch)


def _call_in(loop: asyncio.AbstractEventLoop, afuts: list[asyncio.Future[None]]) -> None:
    try:
        loop.call_soon_threadsafe(_set_done, afuts)
    except RuntimeError:
        pass  # that loop is closed: nobody is waiting any more


_waker = _Waker()


def check_not_blocking_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Raise if the caller would block ``loop``'s own thread (a deadlock)."""
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        return
    if running is loop:
        raise ActorLibError(
            "a blocking get() on the actor's own event loop would deadlock it "
            "(this is an async actor method); use `await ref` instead"
        )
