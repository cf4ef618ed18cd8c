"""Calls from this process to one actor.

::

    RESOLVING ──▶ CONNECTED ──▶ DEAD
        ▲ └───────────┼─────────▲
        └─────────────┘  (the actor is restarting)

RESOLVING: the head has not yet said where the actor lives (it may still be
starting); calls queue. CONNECTED: calls go straight to the worker's socket.
DEAD: every pending, queued and later call fails with ``ActorDiedError``.
When the head says the actor is restarting (``max_restarts``), calls in
flight fail with ``ActorDiedError``, or, within the actor's
``max_task_retries``, go first in the queue to be sent again; then the
connection resolves the actor's new address.

Calls leave in submission order. A call with ``ObjectRef`` arguments waits
for them, and every later call to the same actor queues behind it, so a sync
actor still runs its calls in the order they were made.

A call made from another thread goes straight onto the socket when nothing
is ahead of it (:meth:`ActorConnection.try_direct`); otherwise it is posted
to the loop and counted in ``posted`` until the loop has taken it, so no
later call can overtake it. ``lock`` guards that decision; counting a post
takes no lock (a deque's append and popleft are atomic), so a caller posting
a burst of calls never waits for the loop sending the previous ones.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
from collections import deque
from typing import TYPE_CHECKING, Any

from transport import EncodeError, Endpoint, EndpointBusy, Kind, TransportError, dumps, wait_sent

from . import broadcast
from .broadcast import Broadcast
from .exceptions import ActorDiedError, ActorLibError, SerializationError, TaskCancelledError
from .object_ref import ObjectRef, StreamState

if TYPE_CHECKING:
    from .runtime import Runtime

__all__ = ["ActorConnection", "Call"]

log = logging.getLogger(__name__)


class ConnState(str, enum.Enum):
    RESOLVING = "RESOLVING"
    CONNECTED = "CONNECTED"
    DEAD = "DEAD"


class Call:
    """One method call on its way out. ``sink`` is an ObjectRef or a StreamState."""

    __slots__ = ("method", "args", "kwargs", "options", "frames", "sink", "req_id", "deps", "cancelled", "retries")

    def __init__(
        self,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        options: Any,
        frames: tuple[bytes, list[Any]] | None,
        sink: ObjectRef | StreamState | None,
        deps: bool,
    ) -> None:
        self.method = method
        self.args = args
        self.kwargs = kwargs
        self.options = options
        self.frames = frames
        self.sink: Any = sink  # set before the call is submitted
        self.req_id = 0
        self.deps = deps
        self.cancelled = False
        self.retries = 0

    def fail(self, exc: BaseException) -> None:
        if isinstance(self.sink, StreamState):
            self.sink.fail(exc)
        else:
            self.sink._set_error(exc)

    def deliver(self, msg: Any) -> None:
        if isinstance(self.sink, StreamState):
            self.sink.on_message(msg)
        else:
            self.sink._set_message(msg)


class _Answers:
    """The endpoint's sink for one sent call's answers: one small object per call (a closure would be eight for
    the garbage collector, with its cells)."""

    __slots__ = ("_conn", "_call", "_inflight")

    def __init__(self, conn: ActorConnection, call: Call) -> None:
        self._conn = conn
        self._call = call
        self._inflight = conn._inflight  # this connection's: a restart makes a new one, whose ids start again

    def __call__(self, msg: Any) -> None:
        self._conn.on_answer(self._call, msg, self._inflight)


OFFER_SLOT_AFTER = 3  # the sync call from a thread that has the connection offer its slot (try_slot)
MAX_SLOTS_PER_PROCESS = 64  # connections of one process with a slot of their own

# The runtime's own methods that the actor's loop runs as they come (a compiled graph's control calls, among
# them its open results call; a shared-memory slot's attach and poke), never queued with the user's sync calls:
# nothing sent after them can overtake them. (WorkerGroup.run's __actorlib_run__ is queued: not one of these.)
_LOOP_METHODS = frozenset({"__actorlib_dag__", "__actorlib_broadcast__"})

_no_arg_calls: dict[tuple[str, Any], tuple[bytes, list[Any]]] = {}


def encode_call(method: str, args: tuple[Any, ...], kwargs: dict[str, Any], options: Any) -> tuple[bytes, list[Any]]:
    if not args and not kwargs and (options is None or type(options) is dict):
        key = (method, None if options is None else tuple(sorted(options.items())))
        cached = _no_arg_calls.get(key)
        if cached is None and len(_no_arg_calls) < 4096:
            cached = _no_arg_calls[key] = dumps([method, [], {}, options])
        if cached is not None:
            return cached
    try:  # the arguments as a list: msgpack's own array, where a tuple would be an extension type packed apart
        return dumps([method, list(args), kwargs, options])
    except EncodeError as exc:
        raise SerializationError(f"could not serialize the arguments of {method}(): {exc}") from None


class ActorConnection:
    def __init__(self, rt: Runtime, actor_id: str, class_name: str) -> None:
        self.rt = rt
        self.actor_id = actor_id
        self.class_name = class_name
        self.state = ConnState.RESOLVING
        self.endpoint: Endpoint | None = None
        self._queue: deque[Call] = deque()
        self._flushing = False
        self._death: dict[str, Any] | None = None
        self._inflight: dict[int, Call] = {}
        self.created: asyncio.Future[None] | None = None  # set while this process is creating the actor
        self.lock = threading.Lock()
        self.posted: deque[None] = deque()  # one per call handed to the loop from another thread, not yet submitted
        self.max_task_retries = 0  # the actor's, learnt when resolving it
        self._resolving = 0  # bumped by each restart: only the latest resolve connects
        self._awaiting_args: tuple[Call, asyncio.Task[None]] | None = None  # the call _flush waits on the arguments of
        self.slot: Broadcast | None = None  # a shared-memory slot for sync calls from threads (see try_slot)
        self._slot_calls = 0  # such calls made (to this worker) until the slot is offered
        self._slot_offered: Endpoint | None = None  # the connection to the worker last offered one
        self._close_barrier = 0  # a stream was closed: no slot until an answer to a call after it (send_close)
        rt.loop.create_task(self._resolve(0))

    # -- on the loop thread ------------------------------------------------

    def try_direct(self, call: Call) -> bool:
        """From a caller's thread: send now if nothing is ahead of this call; else False.

        A call carrying buffers returns once ZeroMQ is done reading them, so
        the caller may change its arrays as soon as ``.remote()`` returns.
        """
        if not self.lock.acquire(blocking=False):
            return False  # the loop is submitting to this actor: hand the call over, it sends them in one go
        try:
            if self.state is not ConnState.CONNECTED or self._queue or self._flushing or self.posted or call.deps:
                return False
            if self.endpoint is None or self.endpoint.has_outbox():
                return False  # calls queued by the loop leave first
            try:
                tracker = self._send(call, block=False)
            except EndpointBusy:  # the loop is reading this socket: same
                return False
        finally:
            self.lock.release()
        wait_sent(tracker, lambda: self.state is not ConnState.DEAD)
        return True

    def try_slot(self, call: Call) -> bool:
        """From a caller's thread with no event loop, a sync method's call: write it into this connection's
        shared-memory slot if the worker is polling it and nothing is ahead of the call (see
        ``actorlib.broadcast``); else False. The :data:`OFFER_SLOT_AFTER`-th such call to a worker has the
        loop offer it the slot: an actor called back to back from a thread."""
        slot = self.slot
        if slot is None:
            if self.state is ConnState.CONNECTED:
                self._slot_calls += 1  # (threads racing here may skip the count: that connection goes without)
                if self._slot_calls == OFFER_SLOT_AFTER and broadcast.ENABLED and self.rt.direct_answers:
                    self.rt.call_soon(self._offer_slot)
            return False
        return call.frames is not None and not call.frames[1] and slot.try_send((self,), (0,), (call,))

    def _offer_slot(self) -> None:
        endpoint = self.endpoint
        if self.state is not ConnState.CONNECTED or endpoint is None or self._slot_offered is endpoint:
            return
        if sum(c.slot is not None for c in list(self.rt._conns.values())) >= MAX_SLOTS_PER_PROCESS:
            return  # (each takes 128 KiB of /dev/shm and two file descriptors: the mapping and its answers' bell)
        self._slot_offered = endpoint  # once per worker: a second offer would replace the first in the worker
        slot = broadcast.make(1)
        if slot is None:
            return

        async def offer() -> None:
            taken = await slot.offer(self.rt, [(self.actor_id, self.class_name, 0)], timeout=60.0, direct=True)
            if taken and self.endpoint is endpoint and self.state is ConnState.CONNECTED and self.slot is None:
                self.slot = slot
            else:  # refused (another machine's worker ...), or the worker was lost meanwhile
                slot.close()

        self.rt.loop.create_task(offer())

    def _drop_slot(self) -> None:
        """The worker was lost: its slot goes (loop thread)."""
        slot, self.slot = self.slot, None
        self._slot_calls = 0  # a restarted one is offered a new one once called back to back again
        if slot is not None:
            slot.close()

    def post(self) -> None:
        """A caller's thread is about to hand a call to the loop (after :meth:`try_direct` said no)."""
        self.posted.append(None)  # atomic: no lock, which the loop may hold while it sends

    def submit_posted(self, call: Call) -> None:
        """Loop thread: a call handed over by another thread (see :meth:`post`)."""
        self.submit(call, posted=True)

    def submit(self, call: Call, *, posted: bool = False) -> None:
        """Loop thread. ``posted``: the call was counted by :meth:`post`; uncount it in the same step."""
        with self.lock:
            if posted and self.posted:
                self.posted.popleft()
            if call.cancelled:
                return  # cancelled while it waited to be handed over: already failed, never sent
            if self.state is ConnState.DEAD:
                pass
            elif self.state is ConnState.CONNECTED and not self._queue and not call.deps and not self._flushing:
                self._send(call)
                return
            else:
                self._queue.append(call)
                if self.state is ConnState.CONNECTED and not self._flushing:
                    self._flushing = True
                    self.rt.loop.create_task(self._flush())
                return
        call.fail(self._died())

    def _send(self, call: Call, block: bool = True) -> Any:
        """Put one encoded call on the socket (any thread, under ``lock``); returns its send tracker.

        ``block=False``: raise :class:`EndpointBusy`, with nothing registered, if the socket is in use.
        """
        ep = self.endpoint
        assert ep is not None and call.frames is not None
        body, buffers = call.frames
        req_id = self.register(call)
        try:
            if not buffers and self.rt.in_loop():
                ep.send_soon(Kind.CALL, req_id, body)  # with whatever else this loop turn sends: one message
                return None
            return ep.send(Kind.CALL, req_id, body, buffers, track=bool(buffers), block=block)
        except EndpointBusy:
            self._inflight.pop(req_id, None)
            ep.pending.pop(req_id, None)
            call.req_id = 0
            raise
        except TransportError as exc:
            self._inflight.pop(req_id, None)
            ep.pending.pop(req_id, None)
            call.fail(ActorLibError(f"could not send {call.method}() to {self.class_name}: {exc}"))
            return None

    def register(self, call: Call) -> int:
        """Give a call about to be sent its request id and wait for its answer (any thread, under ``lock``)."""
        ep = self.endpoint
        assert ep is not None
        req_id = call.req_id = ep.next_id()
        self._inflight[req_id] = call
        ep.pending[req_id] = _Answers(self, call)
        if type(call.sink) is ObjectRef and self.rt.direct_answers:
            call.sink._source = ((ep, req_id, False),)  # a thread blocking on it reads the socket itself
        return req_id

    def unregister(self, req_id: int) -> None:
        """Forget a registered call that was not sent after all (under ``lock``)."""
        self._inflight.pop(req_id, None)
        if self.endpoint is not None:
            self.endpoint.pending.pop(req_id, None)

    def lock_idle(self, endpoint: Endpoint) -> bool:
        """From a caller's thread: take ``lock`` if nothing of this process is on its way to the actor over
        ``endpoint`` (sent and unanswered, queued, handed to the loop): a call sent another way now cannot
        overtake one (see ``actorlib.broadcast``). The caller releases it."""
        if not self.lock.acquire(blocking=False):
            return False
        if (
            self.state is ConnState.CONNECTED
            and self.endpoint is endpoint
            and not (self._queue or self._flushing or self.posted)
            and not endpoint.has_outbox()
            and not self._close_barrier
            and all(c.method in _LOOP_METHODS for c in list(self._inflight.values()))
        ):
            return True
        self.lock.release()
        return False

    def on_answer(self, call: Call, msg: Any, inflight: dict[int, Call]) -> None:
        """An answer to ``call`` (a stream's item, its end, a result or an error), on the thread that read it.
        ``inflight``: the calls out on the connection it came by (not the next one's, after a restart)."""
        if msg.kind != Kind.STREAM_ITEM:
            inflight.pop(msg.req_id, None)
            if self._close_barrier and msg.req_id > self._close_barrier:
                self._close_barrier = 0
        rt = self.rt
        drain = None if rt.direct_answers else rt.drain_output  # in a notebook, with the head in this process
        if drain is not None and rt.in_loop():
            try:
                drain(self.actor_id)  # what the worker printed before this answer shows first
            except Exception:  # (its log file full ...): the answer must still arrive
                log.exception("could not show the output of actor %s", self.actor_id[:8])
        call.deliver(msg)

    async def _resolve(self, generation: int) -> None:
        try:
            if self.created is not None:
                await self.created
            info = await self.rt.control("resolve_actor", actor_id=self.actor_id)
        except Exception as exc:  # creation refused, head gone ...
            if generation == self._resolving:
                self.mark_dead({"actor_id": self.actor_id, "class_name": self.class_name, "reason": str(exc)})
            return
        if generation != self._resolving:
            return  # the actor restarted again meanwhile: a later resolve connects (to the new worker)
        if info["state"] == "DEAD":
            self.mark_dead(info.get("death") or {"actor_id": self.actor_id, "class_name": self.class_name})
            return
        self.max_task_retries = int(info.get("max_task_retries") or 0)
        with self.lock:
            if self.state is ConnState.DEAD:
                return
            try:
                self.endpoint = Endpoint.connect(info["address"], on_message=None, name=f"{self.class_name}:{self.actor_id[:8]}")
            except Exception as exc:  # no socket to be had (too many open files ...): fail the calls, never strand them
                failure: Exception | None = exc
            else:
                failure = None
                self.state = ConnState.CONNECTED
                flush = bool(self._queue) and not self._flushing
                if flush:
                    self._flushing = True
        if failure is not None:
            reason = f"could not connect to the actor at {info['address']}: {failure}"
            self.mark_dead({"actor_id": self.actor_id, "class_name": self.class_name, "reason": reason})
        elif flush:
            await self._flush()

    async def _flush(self) -> None:
        try:
            while True:
                with self.lock:
                    if not self._queue or self.state is not ConnState.CONNECTED:
                        break
                    call = self._queue[0]
                    if not call.deps or call.cancelled:
                        self._queue.popleft()
                        if not call.cancelled:
                            self._send(call)
                        continue
                resolving = self.rt.loop.create_task(self._resolve_args(call))
                self._awaiting_args = (call, resolving)  # cancel() of the call stops the wait: later calls go on
                try:
                    await resolving
                except BaseException as exc:
                    resolving.cancel()
                    with self.lock:
                        if self._queue and self._queue[0] is call:  # mark_dead may have emptied it meanwhile
                            self._queue.popleft()
                    call.fail(exc)
                finally:
                    self._awaiting_args = None
        finally:
            with self.lock:
                self._flushing = False
                leftover = self.state is not ConnState.CONNECTED and bool(self._queue)
            if leftover and self.state is ConnState.DEAD:
                self._fail_queue()

    async def _resolve_args(self, call: Call) -> None:
        args = [await a if type(a) is ObjectRef else a for a in call.args]
        kwargs = {k: (await v if type(v) is ObjectRef else v) for k, v in call.kwargs.items()}
        call.frames = encode_call(call.method, tuple(args), kwargs, call.options)
        call.deps = False

    def cancel(self, call: Call) -> None:
        if call.req_id == 0:  # not sent yet
            call.cancelled = True
            call.fail(TaskCancelledError(f"{self.class_name}.{call.method}() was cancelled before it was sent"))
            if self._awaiting_args is not None and self._awaiting_args[0] is call:
                self._awaiting_args[1].cancel()  # it waits for its ObjectRef arguments no more
        elif self.endpoint is not None and not self.endpoint.closed and call.req_id in self._inflight:
            self.endpoint.send(Kind.CANCEL, call.req_id, b"\xc0")

    def send_credit(self, req_id: int, consumed: int) -> None:
        if self.endpoint is not None and not self.endpoint.closed and req_id in self._inflight:
            self.endpoint.send_value(Kind.STREAM_CREDIT, req_id, consumed)

    def send_close(self, req_id: int) -> None:
        if self.endpoint is not None and not self.endpoint.closed and self._inflight.pop(req_id, None) is not None:
            self.endpoint.pending.pop(req_id, None)
            # no answer will say when the worker took the close: until one of a later call's does, the stream's
            # job may still be queued on its sync thread, and a call through the slot would overtake it
            self._close_barrier = self.endpoint.next_id()
            self.endpoint.send(Kind.STREAM_CLOSE, req_id, b"\xc0")

    def _died(self) -> ActorDiedError:
        return ActorDiedError(self._death or {"actor_id": self.actor_id, "class_name": self.class_name})

    def restarting(self, death: dict[str, Any]) -> None:
        """The actor's worker was lost and a new one is starting: settle the calls in flight, then resolve again."""
        with self.lock:
            if self.state is ConnState.DEAD:
                return
            self.state = ConnState.RESOLVING
            inflight, self._inflight = self._inflight, {}
            old, self.endpoint = self.endpoint, None
            self._close_barrier = 0  # (request ids start again on the next connection)
            again = []
            for _, call in sorted(inflight.items()):  # a copy: a thread reading its answer may pop from it
                retry = self.max_task_retries == -1 or call.retries < self.max_task_retries
                if retry and not isinstance(call.sink, StreamState) and not call.cancelled:
                    call.retries += 1
                    call.req_id = 0
                    again.append(call)
            self._queue.extendleft(reversed(again))
        self._drop_slot()
        if old is not None:
            old.pending.clear()
            old.close()
        err = ActorDiedError(death)
        for call in list(inflight.values()):  # a thread reading its answer may pop from it meanwhile
            if call.req_id != 0:
                call.fail(err)
        self._resolving += 1
        self.rt.loop.create_task(self._resolve(self._resolving))

    def mark_dead(self, death: dict[str, Any]) -> None:
        with self.lock:
            if self.state is ConnState.DEAD:
                return
            self.state = ConnState.DEAD
            self._death = death
            inflight, self._inflight = self._inflight, {}
        self._drop_slot()
        err = self._died()
        for call in list(inflight.values()):  # a thread reading its answer may pop from it meanwhile
            call.fail(err)
        self._fail_queue()
        if self.endpoint is not None:
            self.endpoint.pending.clear()
            self.endpoint.close()

    def _fail_queue(self) -> None:
        err = self._died()
        while True:
            with self.lock:
                if not self._queue:
                    return
                call = self._queue.popleft()
            call.fail(err)

    def close(self, reason: str = "actorlib was shut down") -> None:
        self.mark_dead({"actor_id": self.actor_id, "class_name": self.class_name, "reason": reason})
