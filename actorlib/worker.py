"""The worker process: hosts one actor and serves its calls.

The fork server calls :func:`main` in a fresh child. The worker asks the head
for its class and constructor arguments, constructs the actor, binds its
socket and reports ALIVE. Then:

- sync methods (and sync generators) run one at a time, in arrival order, on
  one dedicated thread, so a long call never stalls the event loop. While it
  is idle, that thread reads the actor's socket itself, beside the loop, and
  takes the calls of sync methods it has seen before straight into its queue
  (``Endpoint.take_waiting``: only once the loop has queued everything it read
  earlier); everything else it reads goes to the loop, in order;
- async methods (and async generators) run as tasks on the loop, at most
  ``max_concurrency`` at once;
- generators stream items in batches, at most ``window`` items ahead of what
  the consumer has acknowledged, and stop when the consumer closes the stream;
- CANCEL cancels a running async call, or a queued call before it starts.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import inspect
import logging
import mmap
import os
import pickle
import queue
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any

import uvloop
import zmq

from transport import (
    DecodeError,
    EncodeError,
    Endpoint,
    Kind,
    Message,
    ProtocolError,
    TransportError,
    dumps,
    loads,
    pickle_dumps,
    send_event,
    set_cluster_key,
    wait_sent,
)
from transport.endpoint import BATCH_BYTES
from transport.protocol import decode

from . import broadcast, runtime as runtime_mod
from .broadcast import MAX_DIRECT_SLOTS, Slot, Slots
from .rank_program import RUN_METHOD, run_in_worker
from .runtime import Runtime
from .spin import Recent, poll_until

log = logging.getLogger(__name__)

__all__ = ["main"]

SYNC, ASYNC, GENERATOR, ASYNC_GENERATOR = 0, 1, 2, 3
RESERVED_PREFIX = "__actorlib_"  # methods of the runtime itself (compiled graphs), not of the actor's class
_FLUSH_AT = 256
_PROBE_EVERY_S = 1.0  # a producer waiting this long for credit checks that its consumer is still there


def method_kind(fn: Any) -> int:
    if inspect.isasyncgenfunction(fn):
        return ASYNC_GENERATOR
    if inspect.isgeneratorfunction(fn):
        return GENERATOR
    if inspect.iscoroutinefunction(fn):
        return ASYNC
    return SYNC


def error_record(exc: BaseException, actor: str, *, skip_frames: int = 0) -> dict[str, Any]:
    """The ERROR body for an exception raised by user code."""
    tb = exc.__traceback__
    for _ in range(skip_frames):
        if tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    try:
        exc_bytes = pickle_dumps(exc.with_traceback(None))
        pickle.loads(exc_bytes)  # it must also come back
    except Exception:
        exc_bytes = None
    cls = type(exc)
    return {
        "type": "task",
        "class": cls.__name__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}",
        "message": str(exc),
        "traceback": text,
        "exc": exc_bytes,
        "actor": actor,
    }


class _Producer:
    """The producing side of one stream: batches items and respects the consumer's credit."""

    def __init__(self, host: ActorHost, peer: bytes | None, req_id: int, window: int) -> None:
        self.host = host
        self.peer = peer
        self.req_id = req_id
        self.window = window
        self.sent = 0
        self.acked = 0
        self.closed = False
        self.batch: list[Any] = []
        self.flush_scheduled = False
        self.cond = threading.Condition()
        self.credit_event = asyncio.Event()

    # loop thread
    def on_credit(self, consumed: int) -> None:
        with self.cond:
            self.acked = max(self.acked, consumed)
            self.cond.notify_all()
        self.credit_event.set()

    def on_close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.credit_event.set()

    def flush(self) -> None:
        """Send what was produced (loop thread): buffer-less items together, items with arrays one by one."""
        with self.cond:
            items, self.batch = self.batch, []
            self.flush_scheduled = False
        if not items or self.closed:
            return
        plain: list[bytes] = []
        size = 0
        for body, buffers in items:
            if buffers or (plain and size + len(body) > BATCH_BYTES):  # one message must fit the peer's limit
                self._send_plain(plain)
                plain, size = [], 0
            if buffers:
                self.host.send_raw(Kind.STREAM_ITEM, self.req_id, _array_header(1) + body, buffers, self.peer)
                continue
            plain.append(body)
            size += len(body)
        self._send_plain(plain)

    def _send_plain(self, bodies: list[bytes]) -> None:
        if bodies:  # a msgpack array is its header and its elements, one after the other
            self.host.send_raw(Kind.STREAM_ITEM, self.req_id, _array_header(len(bodies)) + b"".join(bodies), [], self.peer)

    # producer side (thread or loop)
    def add(self, item: Any, from_thread: bool) -> None:
        """Encode the item now: the generator may change it once it moves on (arrays are copied)."""
        body, buffers = dumps(item)
        if buffers:
            buffers = [bytes(b) for b in buffers]
        with self.cond:
            self.batch.append((body, buffers))
            self.sent += 1
            schedule = not self.flush_scheduled
            self.flush_scheduled = True
        if schedule:
            if from_thread:
                self.host.loop.call_soon_threadsafe(self.flush)
            else:
                self.host.loop.call_soon(self.flush)

    def wait_credit_sync(self) -> bool:
        with self.cond:
            while self.sent - self.acked >= self.window and not self.closed:
                if not self.cond.wait(_PROBE_EVERY_S):
                    self.host.loop.call_soon_threadsafe(self.probe)
            return not self.closed

    async def wait_credit(self) -> bool:
        while self.sent - self.acked >= self.window and not self.closed:
            self.credit_event.clear()
            if len(self.batch) >= 1:
                self.flush()
            timer = self.host.loop.call_later(_PROBE_EVERY_S, self.credit_event.set)  # (not wait_for: 3.11's
            try:  # can swallow a cancel of this call)
                await self.credit_event.wait()
            finally:
                timer.cancel()
            if self.sent - self.acked >= self.window and not self.closed:  # woken by the timer
                self.probe()
        return not self.closed

    def probe(self) -> None:
        """End the stream if its consumer has gone (loop thread): no credit or close would ever come, and the
        generator would wait for ever. ZeroMQ forgets a peer whose connection ended, and a send to it fails
        (``ROUTER_MANDATORY``); the send is an empty batch of items, which a live consumer passes over."""
        ep = self.host.endpoint
        if self.closed or ep is None or ep.closed:
            return
        try:
            ep.send(Kind.STREAM_ITEM, self.req_id, _array_header(0), (), self.peer)
        except TransportError:
            if self.host._producers.get((self.peer, self.req_id)) is self:
                del self.host._producers[(self.peer, self.req_id)]
            self.on_close()


_NOT_STARTED = {"type": "cancelled", "message": "the call was cancelled before it started"}  # its error record


def _NO_JOB() -> None:
    """The sync thread's job queue was empty."""


class ActorHost:
    def __init__(self, rt: Runtime, config: dict[str, Any]) -> None:
        self.rt = rt
        self.loop = rt.loop
        self.actor_id: str = config["actor_id"]
        self.label = f"{config.get('name') or config.get('class_name', 'Actor')}(pid={os.getpid()})"
        self.instance: Any = None
        self.endpoint: Endpoint | None = None
        self._methods: dict[str, tuple[Callable[..., Any], int]] = {RUN_METHOD: (run_in_worker, SYNC)}  # for WorkerGroup.run
        self._sync_jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._sync_thread = threading.Thread(target=self._sync_loop, name="actorlib-sync", daemon=True)
        # Sockets the sync thread reads itself (compiled graphs' inboxes), and how it is woken for a job meanwhile
        self._watched: dict[zmq.Socket, Callable[[], None]] = {}  # sync thread only
        self._poller: zmq.Poller | None = None
        self._calls_poller: zmq.Poller | None = None  # the same and the actor's socket (watch_calls)
        self._reading_calls = False  # the last call this thread ran was a sync call: read the socket when idle
        self._refused = False  # _take_call left a message to the loop
        self._polling = False  # the sync thread may be waiting in its poller: post_sync must wake it
        self._wake = -1  # an eventfd, made when the first socket is watched
        self._bell: socket.socket | None = None  # callers of a slot wake the sleeping sync thread here (actorlib.broadcast)
        self._inbox_waits = Recent()  # how long the waits that ended with a graph's message took (see actorlib.spin)
        self._after_inbox = False  # the last wake-up ran a graph's messages: the next wait may poll first
        self._calls_fd = -1  # the actor's socket, while the sync thread reads it too (watch_calls)
        self._slots: Slots | None = None  # shared-memory slots for calls and graphs' events (actorlib.broadcast)
        self._held: collections.deque[Any] = collections.deque()  # a job taken from the queue, run after a slot's
        self._max_concurrency = int(config.get("max_concurrency") or 1000)
        self._running = 0  # async calls running on the loop
        self._waiting: collections.deque[tuple[tuple[bytes | None, int], Any]] = collections.deque()
        self._tasks: dict[tuple[bytes | None, int], asyncio.Task[Any]] = {}
        self._queued: set[tuple[bytes | None, int]] = set()
        self._cancelling: set[tuple[bytes | None, int]] = set()  # async calls the caller cancelled
        self._producers: dict[tuple[bytes | None, int], _Producer] = {}
        self.stopped = asyncio.Event()

    # -- the sync thread -----------------------------------------------------

    def _sync_loop(self) -> None:
        """Jobs in order; while sockets are watched, wait on them and on the job queue at once.

        Waiting: on the queue alone (until the actor's socket is bound), or in
        a ``zmq.Poller`` on the watched inboxes, the actor's socket (after a
        sync call: :meth:`_read_calls` takes the next ones, the loop standing
        aside meanwhile) and an eventfd that :meth:`post_sync` writes once
        ``_polling`` is set (set before the queue is looked at, so a job
        queued after that look always writes it).
        """
        while True:
            if self._polling:
                job = self._next_job()
                if job is _NO_JOB:
                    if self._reading_calls:
                        self._share_reading(True)
                    self.poll_sync_once()
                    continue
            else:
                job = self._sync_jobs.get()
            if job is None:
                return
            self._share_reading(False)
            self._after_inbox = False  # a plain call or job in between: the graph is not running back to back
            try:
                job()
            except BaseException:  # never lose the thread: every later sync call would hang
                traceback.print_exc()

    def run_queued_jobs(self) -> None:
        """Run the jobs queued now (sync thread, from inside one that waits: see ``GraphRuntime._wait_serving``)."""
        while True:
            job = self._next_job()
            if job is _NO_JOB:
                return
            if job is None:  # the end: left for the thread's own loop (no wake-up: this waiter would take it again)
                self._sync_jobs.put(None)
                return
            self._after_inbox = False
            try:
                job()
            except BaseException:  # never lose the thread
                traceback.print_exc()

    def _next_job(self) -> Any:
        """The sync thread's next job without waiting, or ``_NO_JOB``. A call in a slot goes first: it was
        written after its caller's earlier calls were answered, and before any later one was sent (see
        actorlib.broadcast); so the slots are looked at again after a job is taken from the queue, which the
        loop may have filled just after the first look."""
        if self._held:
            return self._held.popleft()
        job = self._slot_job() if self._slots is not None else None
        if job is not None:
            return job
        try:
            job = self._sync_jobs.get_nowait()
        except queue.Empty:
            return _NO_JOB  # (waited for by the caller, out of this handler: a graph's node that raises while the
            # thread waits must not show the queue's Empty as its context in the user's traceback)
        earlier = self._slot_job(calls_only=True) if self._slots is not None else None
        if earlier is None:
            return job
        self._held.append(job)
        return earlier

    def wake_sync(self) -> None:
        """End the sync thread's :meth:`poll_sync_once` (any thread)."""
        if self._wake >= 0:
            os.eventfd_write(self._wake, 1)

    def poll_sync_once(self) -> None:
        """Wait until a watched socket has messages, a job is queued or :meth:`wake_sync` is called, and read
        what came (sync thread; jobs are left queued). Compiled graphs also wait so while their sends complete.

        Right after it ran a graph's messages, it polls a while first when
        the graph's next messages came soon after that lately: see
        :mod:`actorlib.spin`."""
        poller = self._calls_poller if self._reading_calls else self._poller
        assert poller is not None
        start = time.monotonic()
        spin = self._inbox_waits.spin_for() if self._after_inbox and self._watched else 0.0
        slots = self._slots
        if slots is not None:
            spin = max(spin, slots.waits.spin_for())
        self._after_inbox = False
        try:
            ready = poll_until(poller, start + spin, slots) if spin else []
            if not ready and slots is not None and (slots.ready() or not slots.asleep_unless_ready()):
                slots.waits.took(time.monotonic() - start, hit=True)
                return  # taken by _sync_loop
            if not ready:
                ready = poller.poll()
                if slots is not None:
                    slots.awake()
        except zmq.ZMQError as exc:
            self._drop_closed(str(exc))
            return
        waited = time.monotonic() - start
        if slots is not None:
            slots.waits.took(waited)
        for sock, _ in ready:
            if isinstance(sock, int):
                if sock == self._calls_fd:
                    self._read_calls()
                    continue
                if self._bell is not None and sock == self._bell.fileno():
                    broadcast.drain_bell(self._bell)  # a caller wrote a slot of ours while we slept
                    continue
                if sock != self._wake:  # a closed socket shows up as fd 0
                    self._drop_closed("a watched socket shows up as fd 0")
                    return
                try:
                    os.eventfd_read(self._wake)  # a job was queued
                except BlockingIOError:
                    pass
                continue
            reader = self._watched.get(sock)
            if reader is None:
                continue
            if waited >= 0:
                self._inbox_waits.took(waited)
                waited = -1.0
            self._after_inbox = True
            self._share_reading(False)  # it runs a graph's nodes: the loop reads the actor's socket meanwhile
            try:
                reader()
            except BaseException:  # never lose the thread
                traceback.print_exc()

    def attach_slot(
        self,
        mapped: tuple[mmap.mmap, int] | None,
        index: int,
        peer: bytes | None,
        graph: str | None,
        direct: bool,
        source: str | None,
        caller_bell: Any = None,
    ) -> bool | str:
        """A caller offers slot ``index`` of its shared-memory file: a worker group's, the caller's own for its
        calls to this actor (``direct``), or a compiled ``graph``'s whose nodes here are all sync, for its
        executions or (``source``) for what that stage hands on to this one (loop; see actorlib.broadcast). The
        sync thread may still leave it (too many callers): the caller then never finds it awake, and never
        writes to it. ``caller_bell``: the caller's answers' bell. Taken: our bell's name (or True: none)."""
        if mapped is None:
            return False  # not on this machine: its messages keep coming over ZeroMQ
        slot = Slot(mapped, index, peer, graph, direct, source)
        if direct and self._slots is not None:
            live = [s for s in self._slots.all if s.direct and s.peer != peer and not s.caller_gone()]
            if len(live) >= MAX_DIRECT_SLOTS:
                return False  # too many callers: theirs keep coming over ZeroMQ
        if graph is not None:
            from . import dag_worker

            runtime = dag_worker.graph_runtime(graph)
            if runtime is None or not runtime.threaded:
                return False  # its events are the loop's to take (the mapping goes with the slot)
            if source is None:
                runtime.slot = slot  # (its outputs go back to the driver through it)
        if self._bell is None:
            self._bell = broadcast.make_bell()  # (read by the sync thread once _attach_slot has run)
        if self._bell is not None and broadcast.is_bell(caller_bell):
            slot.ring_caller = functools.partial(broadcast.ring_bell, caller_bell)
        self.post_sync(functools.partial(self._attach_slot, slot))
        return self._bell.getsockname().decode() if self._bell is not None else True  # the caller rings it (see Broadcast)

    def _attach_slot(self, slot: Slot) -> None:
        if self._wake < 0:
            self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        if self._slots is None:
            self._slots = Slots()
        self._slots.bell = self._bell is not None
        kept = []
        for s in self._slots.all:
            if s.owner == slot.owner or (s.direct and s.caller_gone()):  # (one group's at a time)
                s.awake(False)  # (its caller writes no more there; the mapping goes with the slot)
            else:
                kept.append(s)
        if slot.direct and sum(s.direct for s in kept) >= MAX_DIRECT_SLOTS:  # (attach_slot mostly refused it)
            self._slots.all = kept
            return  # never awake: its caller's calls keep coming over ZeroMQ
        self._slots.all = [*kept, slot]
        self._remake_poller()
        slot.awake(True)

    def detach_slot(self, graph: str) -> None:
        """A compiled graph's slot goes with the graph (sync thread)."""
        if self._slots is not None:
            for s in self._slots.all:
                if s.graph == graph:
                    s.awake(False)  # written no more, even with a bell
            self._slots.all = [s for s in self._slots.all if s.graph != graph]

    def _slot_job(self, calls_only: bool = False) -> Callable[[], None] | None:
        """What came in the slots (sync thread): a graph's events are handled here, a call becomes the job
        returned. ``calls_only``: the graphs' slots are left for later (handling an event may run a node,
        and one waiting for its last transfers runs the queued jobs meanwhile: see ``_next_job``)."""
        assert self._slots is not None
        for slot in self._slots.all:
            if calls_only and slot.graph is not None:
                continue
            try:
                msg = slot.take()
                if msg is None:
                    continue
                if msg.kind == Kind.EVENT and slot.graph is None:  # (our callers write none there)
                    log.warning("%s: dropped an event that came in a caller's shared-memory slot", self.label)
                    continue
                if msg.kind == Kind.EVENT:
                    from . import dag_worker

                    self._share_reading(False)  # it runs a graph's nodes: the loop reads the actor's socket meanwhile
                    dag_worker.on_event(self, msg)
                    continue
                job = self._slot_call(slot, msg)
            except Exception:  # never lose the thread (a malformed message, a bug): the rest goes on
                log.exception("%s: could not handle a message from a shared-memory slot", self.label)
                continue
            if job is not None:
                return job
        return None

    def _slot_call(self, slot: Slot, msg: Message) -> Callable[[], None] | None:
        """The job running a call that came in a group's slot."""
        key = (msg.peer, msg.req_id)
        try:
            method, args, kwargs, _ = _parse_call(msg)
        except (DecodeError, ValueError, TypeError) as exc:
            error = _undecodable(exc)
            return lambda: self._send_from_thread(Kind.ERROR, key[1], error, key[0])
        found = self._lookup(method)
        if found is None or found[1] != SYNC:  # the caller sends sync methods only: let the loop answer it
            self.loop.call_soon_threadsafe(self._on_call, msg)
            return None
        fn = found[0]
        self._queued.add(key)
        return functools.partial(self._run_sync, key, fn, args, kwargs, slot)  # (a closure: six objects more per call)

    def _drop_closed(self, why: str) -> None:
        """A watched socket was closed under the poller (a bug, and it would spin): stop watching it."""
        log.error("%s: a socket the sync thread watched was closed under it (%s)", self.label, why)
        self._watched = {w: r for w, r in self._watched.items() if not w.closed}
        self._remake_poller()

    def watch_sync(self, sock: zmq.Socket, reader: Callable[[], None]) -> None:
        """From now on the sync thread calls ``reader()`` whenever ``sock`` has messages (sync thread)."""
        if sock.closed:
            return  # its graph was torn down before this thread got here
        if self._wake < 0:
            self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._watched[sock] = reader
        self._remake_poller()

    def unwatch_sync(self, sock: zmq.Socket) -> None:
        """Stop reading ``sock`` (sync thread)."""
        if self._watched.pop(sock, None) is not None:
            self._remake_poller()

    def watch_calls(self) -> None:
        """From now on the sync thread, while idle, reads the actor's socket too (sync thread; see the module)."""
        if self.endpoint is None or self.endpoint.closed:
            return
        if self._wake < 0:
            self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._calls_fd = self.endpoint.fd
        self._remake_poller()

    def _share_reading(self, idle: bool) -> None:
        if self._calls_fd >= 0 and self.endpoint is not None:
            self.endpoint.share_reading(idle)

    def _read_calls(self) -> None:
        """The actor's socket has messages: take the sync calls, the loop gets the rest (sync thread)."""
        ep = self.endpoint
        if ep is None or ep.closed:  # its fd may be another file's by now: never poll it again
            self._share_reading(False)
            self._calls_fd = -1
            self._reading_calls = False
            self._remake_poller()
            return
        self._refused = False
        ep.take_waiting(self._take_call, after_loop=True)
        if self._refused:  # not only sync calls come: the loop reads them all until the next sync call
            self._reading_calls = False
            self._share_reading(False)

    def _take_call(self, frames: list[Any]) -> bool:
        """Queue a call to a known sync method for this thread (under the socket's lock: no sends here)."""
        try:
            return self._take_call_or_refuse(frames)
        except Exception:  # never lose the frames read with it, nor the thread: the loop handles it
            log.exception("%s: could not take a call on the sync thread", self.label)
            self._refused = True
            return False

    def _take_call_or_refuse(self, frames: list[Any]) -> bool:
        msg = None
        name = _method_name(frames[1]) if len(frames) > 1 else None
        found = self._methods.get(name) if name is not None else None
        if found is not None and found[1] == SYNC:
            try:
                msg = decode(frames[1:], frames[0])
            except ProtocolError:
                pass
        if msg is None or found is None or msg.kind != Kind.CALL or msg.shm:
            self._refused = True
            return False
        key = (msg.peer, msg.req_id)
        self._queued.add(key)
        self._sync_jobs.put(functools.partial(self._run_taken, key, found[0], msg))
        return True

    def _run_taken(self, key: tuple[bytes | None, int], fn: Callable[..., Any], msg: Message) -> None:
        try:
            _, args, kwargs, _ = _parse_call(msg)
        except (DecodeError, ValueError, TypeError) as exc:
            if self._unqueue(key):
                self._send_from_thread(Kind.ERROR, key[1], _undecodable(exc), key[0])
            return
        self._run_sync(key, fn, args, kwargs)

    def _remake_poller(self) -> None:
        """Two pollers: the eventfd and the watched inboxes; and those and the actor's socket (watch_calls).
        While there is anything to poll, ``post_sync`` must write the eventfd (``_polling``)."""
        self._poller = self._poller_over(self._watched)
        self._calls_poller = self._poller_over([self._calls_fd, *self._watched]) if self._calls_fd >= 0 else None
        self._polling = bool(self._watched) or self._calls_fd >= 0 or self._slots is not None

    def _poller_over(self, sockets: Iterable[zmq.Socket | int]) -> zmq.Poller:
        poller = zmq.Poller()
        poller.register(self._wake, zmq.POLLIN)
        if self._bell is not None and self._slots is not None:
            poller.register(self._bell.fileno(), zmq.POLLIN)
        for sock in sockets:
            poller.register(sock, zmq.POLLIN)
        return poller

    async def construct(self, cls: type, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._sync_thread.start()
        fut: asyncio.Future[Any] = self.loop.create_future()

        def job() -> None:
            try:
                instance = cls(*args, **kwargs)
            except BaseException as exc:
                self.loop.call_soon_threadsafe(_settle, fut, None, exc)
            else:
                self.loop.call_soon_threadsafe(_settle, fut, instance, None)

        self.post_sync(job)
        self.instance = await fut

    def post_sync(self, job: Callable[[], None] | None) -> None:
        """Run ``job()`` on the sync-method thread, after the sync calls queued before it (None: end it)."""
        self._sync_jobs.put(job)
        if self._polling:
            os.eventfd_write(self._wake, 1)

    # -- sending ---------------------------------------------------------------

    def send_value(self, kind: Kind, req_id: int, value: Any, peer: bytes | None) -> None:
        """Encode and send (loop thread). A value that cannot be encoded becomes an ERROR."""
        assert self.endpoint is not None
        try:
            body, buffers = dumps(value)
        except EncodeError as exc:
            kind = Kind.ERROR
            body, buffers = dumps({"type": "serialization", "message": f"could not serialize the result: {exc}"})
        try:
            if buffers:
                self.endpoint.send(kind, req_id, body, buffers, peer)
            else:
                self.endpoint.send_soon(kind, req_id, body, peer)  # replies finished in one loop turn leave together
        except Exception:
            pass  # the caller is gone or we are closing

    def send_raw(self, kind: Kind, req_id: int, body: bytes, buffers: list[Any], peer: bytes | None) -> None:
        """Send an encoded message (loop thread); buffer-less ones leave with this loop turn's others."""
        if self.endpoint is None:
            return
        try:
            if buffers:
                self.endpoint.send(kind, req_id, body, buffers, peer)
            else:
                self.endpoint.send_soon(kind, req_id, body, peer)
        except Exception:
            pass  # the consumer is gone or we are closing

    def _send_from_thread(self, kind: Kind, req_id: int, value: Any, peer: bytes | None, slot: Slot | None = None) -> None:
        """Encode and send from the sync thread, straight onto the socket (no hop to the loop).

        A result with buffers (arrays) is waited for until ZeroMQ has read
        them, so the next call may change the actor's arrays freely. The
        answer to a call that came through a worker group's ``slot`` goes
        back through it, if small and the caller polls for it.
        """
        try:
            body, buffers = dumps(value)
        except EncodeError as exc:
            kind = Kind.ERROR
            body, buffers = dumps({"type": "serialization", "message": f"could not serialize the result: {exc}"})
        if slot is not None and not buffers and slot.answer(kind, req_id, body):
            return
        ep = self.endpoint
        if ep is not None:
            try:
                tracker = ep.send(kind, req_id, body, buffers, peer, track=bool(buffers))
            except Exception:
                return  # the caller is gone or we are closing
            wait_sent(tracker, lambda: not ep.closed)

    # -- receiving ---------------------------------------------------------------

    def on_message(self, msg: Message) -> None:
        key = (msg.peer, msg.req_id)
        if msg.kind == Kind.CALL:
            self._on_call(msg)
        elif msg.kind == Kind.STREAM_CREDIT:
            producer = self._producers.get(key)
            if producer is not None:
                try:
                    consumed = loads(msg.body, allow_pickle=False)
                except DecodeError:
                    return
                if type(consumed) is int:
                    producer.on_credit(consumed)
        elif msg.kind == Kind.STREAM_CLOSE:
            producer = self._producers.pop(key, None)
            if producer is not None:
                producer.on_close()
            self._unqueue(key)  # not started yet: never starts (the consumer expects nothing more)
            waiting = next((item for item in self._waiting if item[0] == key), None)
            if waiting is not None:
                self._waiting.remove(waiting)
                waiting[1].close()
        elif msg.kind == Kind.CANCEL:
            self._on_cancel(key)
        elif msg.kind == Kind.EVENT:  # one-way messages of compiled graphs: an execution's input, a stage's output
            from . import dag_worker

            dag_worker.on_event(self, msg)
        else:
            self._reply_error(msg, "ProtocolError", f"{msg.kind.name} is not accepted by an actor")

    def _reply_error(self, msg: Message, type_: str, message: str) -> None:
        self.send_value(Kind.ERROR, msg.req_id, {"type": type_, "message": message}, msg.peer)

    def _lookup(self, name: str) -> tuple[Callable[..., Any], int] | None:
        found = self._methods.get(name)
        if found is None:
            if isinstance(name, str) and name.startswith(RESERVED_PREFIX):
                if name == broadcast.CONTROL:
                    found = broadcast.reserved_method(self, name)
                else:
                    from . import dag_worker  # compiled graphs: imported only by actors that take part in one

                    found = dag_worker.reserved_method(self, name)
                if found is not None:
                    self._methods[name] = found
                return found
            if not isinstance(name, str) or name.startswith("__"):
                return None
            fn = getattr(self.instance, name, None)
            if fn is None or not callable(fn):
                return None
            found = self._methods[name] = (fn, method_kind(fn))
        return found

    def _on_call(self, msg: Message) -> None:
        try:
            method, args, kwargs, window = _parse_call(msg)
        except (DecodeError, ValueError, TypeError) as exc:
            self.send_value(Kind.ERROR, msg.req_id, _undecodable(exc), msg.peer)
            return
        found = self._lookup(method)
        if found is None:
            err = AttributeError(f"actor {type(self.instance).__name__} has no method {method!r}")
            self.send_value(Kind.ERROR, msg.req_id, error_record(err, self.label), msg.peer)
            return
        fn, kind = found
        key = (msg.peer, msg.req_id)
        if kind == SYNC:
            self._queued.add(key)
            self.post_sync(functools.partial(self._run_sync, key, fn, args, kwargs))
        elif kind == ASYNC:
            if method.startswith(RESERVED_PREFIX):  # the runtime's own: told which call it is, never queued behind the user's
                self._start_async(key, self._run_async(key, fn, (key, *args), kwargs), counted=False)
            else:
                self._start_async(key, self._run_async(key, fn, args, kwargs))
        else:
            producer = self._producers[key] = _Producer(self, msg.peer, msg.req_id, max(1, window))
            if kind == GENERATOR:
                self._queued.add(key)
                self.post_sync(lambda: self._run_generator(key, producer, fn, args, kwargs))
            else:
                self._start_async(key, self._run_async_generator(key, producer, fn, args, kwargs))

    def _start_async(self, key: tuple[bytes | None, int], coro: Any, counted: bool = True) -> None:
        """Run an async call now, or queue it while ``max_concurrency`` calls are running.

        Reserved (runtime) methods are not ``counted``: they never wait behind the user's calls.
        """
        if not counted:
            self._tasks[key] = self.loop.create_task(coro)
            return
        if self._running >= self._max_concurrency:
            self._waiting.append((key, coro))
            return
        self._running += 1
        task = self._tasks[key] = self.loop.create_task(coro)
        task.add_done_callback(self._async_done)

    def _async_done(self, task: asyncio.Task[Any]) -> None:
        self._running -= 1
        while self._waiting and self._running < self._max_concurrency:
            key, coro = self._waiting.popleft()
            self._start_async(key, coro)

    def _on_cancel(self, key: tuple[bytes | None, int]) -> None:
        if self._slots is not None:  # the call may still be in the group's slot: then it never runs
            for slot in self._slots.all:
                if slot.graph is None and slot.peer == key[0] and slot.take(req_id=key[1]) is not None:
                    self.send_value(
                        Kind.ERROR, key[1], _NOT_STARTED, key[0]
                    )
                    return
        task = self._tasks.get(key)
        waiting = next((item for item in self._waiting if item[0] == key), None)
        if task is not None:
            # After the task's first step (queued before this, run first): cancelled before it, the coroutine
            # would never run its handlers, and the caller would wait forever for an answer.
            self._cancelling.add(key)  # a CancelledError the method raises on its own is its error, not this
            self.loop.call_soon(task.cancel)
        elif waiting is not None:
            self._waiting.remove(waiting)
            waiting[1].close()
            self.send_value(
                Kind.ERROR, key[1], _NOT_STARTED, key[0]
            )
            self._producers.pop(key, None)
        elif self._unqueue(key):  # the sync thread has not started it, and now never will
            self.send_value(
                Kind.ERROR, key[1], _NOT_STARTED, key[0]
            )
            producer = self._producers.pop(key, None)
            if producer is not None:
                producer.on_close()

    # -- running calls -----------------------------------------------------------

    def _unqueue(self, key: tuple[bytes | None, int]) -> bool:
        """Take a queued sync call; exactly one of the sync thread and a cancel wins (set.remove is atomic)."""
        try:
            self._queued.remove(key)
        except KeyError:
            return False
        return True

    def _run_sync(
        self, key: tuple[bytes | None, int], fn: Callable[..., Any], args: Any, kwargs: Any, slot: Slot | None = None
    ) -> None:
        """Run a sync call and answer it (``slot``: it came through a worker group's, where the answer may go)."""
        if not self._unqueue(key):
            return  # cancelled while queued
        self._reading_calls = self._calls_fd >= 0  # sync calls come: take the next ones off the socket when idle
        try:
            value = fn(*args, **kwargs)
        except BaseException as exc:
            self._send_from_thread(Kind.ERROR, key[1], error_record(exc, self.label, skip_frames=1), key[0], slot)
        else:
            self._send_from_thread(Kind.RESULT, key[1], value, key[0], slot)

    async def _run_async(self, key: tuple[bytes | None, int], fn: Callable[..., Any], args: Any, kwargs: Any) -> None:
        try:
            value = await fn(*args, **kwargs)
        except asyncio.CancelledError as exc:
            if key in self._cancelling:
                self.send_value(Kind.ERROR, key[1], {"type": "cancelled", "message": "the call was cancelled"}, key[0])
            else:  # raised by the method itself (it awaited a task that was cancelled, say): its own error
                self.send_value(Kind.ERROR, key[1], error_record(exc, self.label, skip_frames=1), key[0])
        except BaseException as exc:
            self.send_value(Kind.ERROR, key[1], error_record(exc, self.label, skip_frames=1), key[0])
        else:
            self.send_value(Kind.RESULT, key[1], value, key[0])
        finally:
            self._tasks.pop(key, None)
            self._cancelling.discard(key)

    def _run_generator(self, key: tuple[bytes | None, int], p: _Producer, fn: Callable[..., Any], args: Any, kwargs: Any) -> None:
        if not self._unqueue(key):
            return
        error: dict[str, Any] | None = None
        try:
            gen = fn(*args, **kwargs)
            try:
                for item in gen:
                    p.add(item, from_thread=True)
                    if not p.wait_credit_sync():
                        break
            finally:
                gen.close()
        except BaseException as exc:
            error = error_record(exc, self.label, skip_frames=1)
        self.loop.call_soon_threadsafe(self._finish_stream, key, p, error)

    async def _run_async_generator(
        self, key: tuple[bytes | None, int], p: _Producer, fn: Callable[..., Any], args: Any, kwargs: Any
    ) -> None:
        error: dict[str, Any] | None = None
        try:
            agen = fn(*args, **kwargs)
            try:
                async for item in agen:
                    p.add(item, from_thread=False)
                    if len(p.batch) >= _FLUSH_AT:
                        p.flush()
                    if not await p.wait_credit():
                        break
            finally:
                await agen.aclose()
        except asyncio.CancelledError as exc:
            cancelled = key in self._cancelling  # else raised by the generator itself: its own error
            error = (
                {"type": "cancelled", "message": "the stream was cancelled"}
                if cancelled
                else error_record(exc, self.label, skip_frames=1)
            )
        except BaseException as exc:
            error = error_record(exc, self.label, skip_frames=1)
        finally:
            self._tasks.pop(key, None)
            self._cancelling.discard(key)
        self._finish_stream(key, p, error)

    def _finish_stream(self, key: tuple[bytes | None, int], p: _Producer, error: dict[str, Any] | None) -> None:
        p.flush()
        if self._producers.pop(key, None) is None:
            return  # closed by the consumer: it expects nothing more
        if error is not None:
            self.send_value(Kind.ERROR, p.req_id, error, p.peer)
        else:
            self.send_value(Kind.STREAM_END, p.req_id, None, p.peer)


def _parse_call(msg: Message) -> tuple[str, Any, dict[str, Any], int]:
    """``(method, args, kwargs, stream window)`` of a CALL; raises DecodeError, ValueError or TypeError."""
    method, args, kwargs, options = loads(msg.body, msg.buffers)
    if not isinstance(method, str) or not isinstance(args, tuple | list) or not isinstance(kwargs, dict):
        raise DecodeError("a call is [method name, argument list, keyword map, options]")
    if (kwargs and not all(isinstance(k, str) for k in kwargs)) or not isinstance(options, dict | None):
        raise DecodeError("keyword names must be strings and options a map")
    window = options.get("window") if options else None  # (no objects made for the usual call: this runs on each)
    return method, args, kwargs, int(window or runtime_mod.DEFAULT_STREAM_WINDOW)


def _undecodable(exc: BaseException) -> dict[str, Any]:
    return {"type": "serialization", "message": f"could not deserialize a call: {exc}"}


_UINT_BYTES = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}
_BIN_BYTES = {0xC4: 1, 0xC5: 2, 0xC6: 4}


def _method_name(head: bytes) -> str | None:
    """The method name of a CALL from its header frame, without decoding the rest; None if not that plain.

    The header is msgpack ``[version, kind, req_id, body]`` and the body
    ``[method, args, kwargs, options]``: a short name sits right after the
    body's array marker. Anything else (not a CALL, a long name) is None.
    """
    try:
        if head[0] != 0x94 or head[2] != Kind.CALL:
            return None
        at = 4 if head[3] < 0x80 else 4 + _UINT_BYTES[head[3]]  # past the request id
        at += 1 + _BIN_BYTES[head[at]]  # past the body's length
        if head[at] != 0x94:
            return None
        length = head[at + 1] - 0xA0
        if 0 < length < 32:
            return head[at + 2 : at + 2 + length].decode()
    except (KeyError, IndexError, UnicodeDecodeError):
        pass
    return None


def _array_header(n: int) -> bytes:
    """The msgpack header of an array of ``n`` elements."""
    if n < 16:
        return bytes([0x90 | n])
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def _settle(fut: asyncio.Future[Any], value: Any, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(value)


async def _serve(config: dict[str, Any]) -> int:
    loop = asyncio.get_running_loop()
    rt = Runtime(loop, threading.get_ident(), mode="worker")
    rt.actor_id = config["actor_id"]
    rt.actor_name = config.get("name")
    rt.node_id = config.get("node_id", "")
    rt.job_id = config.get("job_id", "")
    rt.namespace = config.get("namespace", "default")
    rt.session_dir = config.get("session_dir", "")
    rt.gpu_ids = list(config.get("gpu_ids") or [])
    set_cluster_key(config.get("cluster_key"))  # before any tcp:// socket opens
    rt.connect_head(config["head_address"])
    runtime_mod.set_current(rt)
    host = ActorHost(rt, config)
    hello = await rt.control("worker_hello", actor_id=rt.actor_id, pid=os.getpid())
    try:
        cls, args, kwargs = pickle.loads(hello["payload"])
        await host.construct(cls, args, kwargs)
    except BaseException as exc:
        traceback.print_exc()
        await rt.control("actor_failed", actor_id=rt.actor_id, error=_plain(error_record(exc, host.label)), pid=os.getpid())
        return 1
    host.endpoint = Endpoint.bind(config["bind_address"], on_message=host.on_message, name=host.label)
    host.post_sync(host.watch_calls)
    await rt.control("actor_ready", actor_id=rt.actor_id, address=host.endpoint.address, pid=os.getpid())
    beat = loop.create_task(_heartbeats(rt, float(config.get("heartbeat_s") or 0)))
    await host.stopped.wait()
    beat.cancel()
    return 0


async def _heartbeats(rt: Runtime, every: float) -> None:
    """Tell the head, from this loop, that the worker still answers: a hung worker goes silent."""
    if every <= 0:
        return
    payload = {"actor_id": rt.actor_id, "pid": os.getpid()}
    while rt.head is not None and not rt.head.closed:
        try:
            send_event(rt.head, "actor_heartbeat", payload)
        except TransportError:
            return
        await asyncio.sleep(every)


def _plain(record: dict[str, Any]) -> dict[str, Any]:
    """The control plane carries no pickles: drop the pickled exception."""
    return {k: v for k, v in record.items() if k != "exc"}


def main(config: dict[str, Any]) -> None:
    """Entry point, called by the fork server in the new child."""
    sys.path[:] = list(dict.fromkeys([*config.get("sys_path", []), *sys.path]))
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    code = loop.run_until_complete(_serve(config))
    raise SystemExit(code)
