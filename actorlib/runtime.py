"""The per-process runtime: its event loop, its link to the head, its connections to actors.

A driver runs the loop in a background thread ("actorlib-io"), so replies,
streams and worker logs make progress whether or not the user is inside a
call, and a blocking ``get`` works from a Jupyter cell whose own thread
already runs an event loop. A worker runs the loop in its main thread.

Calls submitted from another thread reach the loop through an inbox drained
in batches: one wake-up for however many calls queued up meanwhile.

A call made from a thread that is not the loop's goes straight onto the
actor's socket (no hop at all) — unless it is part of a *burst*: code on the
caller's own event loop (asyncio, a notebook cell) that makes several calls
in one step of that loop. The first goes straight out; the rest of the step's
calls go through the inbox, and the loop sends what it finds there to one
actor as one BATCH message (one send, one wake-up of the worker) instead of
one send each. The burst ends when the caller's loop takes its next step, or
when the caller blocks in ``get``/``wait``.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextvars
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

from transport import (
    DecodeError,
    Endpoint,
    Kind,
    Message,
    RemoteFailure,
    TransportError,
    control_call,
    dumps,
    loads,
    pickle_dumps,
)
from transport.control import ControlServer

from . import object_ref
from .broadcast import Broadcast
from .connection import ActorConnection, Call, ConnState, encode_call
from .exceptions import ActorLibError, InfeasibleError, SerializationError, TaskCancelledError
from .object_ref import ObjectRef, ObjectRefGenerator, StreamState, check_not_blocking_loop

__all__ = ["Runtime", "current", "current_or_none", "set_current"]

log = logging.getLogger(__name__)

_current: Runtime | None = None
_current_lock = threading.Lock()

DEFAULT_STREAM_WINDOW = 1024
KILL_WAIT_S = 10.0  # how long kill() waits for the process to be gone (its node may be unreachable)


def current() -> Runtime:
    rt = _current
    if rt is None:
        raise ActorLibError("actorlib is not initialized: call actorlib.init() first")
    return rt


def current_or_none() -> Runtime | None:
    return _current


def set_current(rt: Runtime | None) -> None:
    global _current
    _current = rt


class Runtime:
    def __init__(self, loop: asyncio.AbstractEventLoop, loop_thread: int, *, mode: str) -> None:
        self.loop = loop
        self.loop_thread = loop_thread
        self.mode = mode  # "driver" | "worker"
        self.head: Endpoint | None = None
        self.lost_head: str | None = None  # why the head is gone, once it is (see head_lost)
        self.job_id = ""
        self.namespace = "default"
        self.session_dir = ""
        self.node_id = ""
        self.actor_id: str | None = None
        self.actor_name: str | None = None
        self.gpu_ids: list[str] = []
        self.log_to_driver = True
        # A thread blocked on a call's answer reads it itself (object_ref.wait_reading) -- except in a
        # notebook kernel: there a worker's print should show under the cell that made the call. With
        # the head in this process (init()), its node agent shows this driver's workers' lines here
        # (show_local_output), and the loop has it read a worker's pipe before taking each of that
        # worker's answers (drain_output): what the worker printed before answering shows first.
        # Workers on other nodes: their lines come by a longer way, best effort.
        self.direct_answers = "ipykernel" not in sys.modules
        self.drain_output: Callable[[str], None] | None = None  # set by an embedded driver: NodeAgent.drain_output
        self.owned: set[str] = set()  # actors this process created (their output is this driver's to show)
        self._conns: dict[str, ActorConnection] = {}
        self._inbox: collections.deque[tuple[Callable[..., Any], tuple[Any, ...]]] = collections.deque()
        self._inbox_scheduled = False
        self._bursting: set[asyncio.AbstractEventLoop] = set()  # callers' loops in a burst of calls (see above)
        self._control = ControlServer(self, on_event=self._on_event)

    # -- threads -------------------------------------------------------------

    def in_loop(self) -> bool:
        return threading.get_ident() == self.loop_thread

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop, in order with other such calls, from any thread."""
        if self.in_loop():
            fn(*args)
            return
        self.post(fn, *args)

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Like :meth:`call_soon`, but never now, even on the loop: for callers that may hold a lock the loop's
        sends take (a garbage collection running ``__del__`` in the middle of a receive)."""
        item = (fn, args)
        self._inbox.append(item)
        if not self._inbox_scheduled:
            self._inbox_scheduled = True
            try:  # in an empty context: see run()
                self.loop.call_soon_threadsafe(self._drain_inbox, context=contextvars.Context())
            except BaseException as exc:  # (Ctrl-C too) not scheduled: not to run some time later, unasked
                self._inbox_scheduled = False
                try:
                    self._inbox.remove(item)
                except ValueError:
                    pass
                if self._inbox and not isinstance(exc, RuntimeError):  # another thread's, which left it to this one
                    self._inbox_scheduled = True
                    try:
                        self.loop.call_soon_threadsafe(self._drain_inbox, context=contextvars.Context())
                    except BaseException:
                        self._inbox_scheduled = False
                if isinstance(exc, RuntimeError):
                    raise ActorLibError("actorlib has been shut down") from None
                raise

    def _drain_inbox(self) -> None:
        self._inbox_scheduled = False
        inbox = self._inbox
        while inbox:
            fn, args = inbox.popleft()
            try:
                fn(*args)
            except Exception:
                log.exception("error in a queued runtime operation")

    def run(self, coro: Any, timeout: float | None = None) -> Any:
        """Run a coroutine on the loop and wait for it, from a thread that is not the loop's."""
        if self.in_loop():
            coro.close()
            raise ActorLibError(
                "this blocking actorlib call would deadlock the actor's event loop "
                "(it was made from an async actor method); use its async form instead"
            )
        # In an empty context: the loop's work must not carry the caller's. In a notebook it would carry the
        # cell's, and what the head or a node agent started in it (for the whole session, for init()) writes
        # would be filed under that cell, not under the one running.
        fut = contextvars.Context().run(asyncio.run_coroutine_threadsafe, coro, self.loop)
        try:
            return fut.result(timeout)
        except BaseException:
            fut.cancel()  # a timeout or Ctrl-C here: the coroutine stops too, never goes on unwatched
            raise

    def check_can_block(self) -> None:
        """Called before every blocking wait for results: raises where it would deadlock; ends a burst of calls."""
        check_not_blocking_loop(self.loop)
        self.end_burst()

    # -- the head --------------------------------------------------------------

    def connect_head(self, address: str) -> None:
        self.head = Endpoint.connect(address, on_message=self._control.handle, name="head link")
        self._control.attach(self.head)

    async def control(self, op: str, timeout: float | None = None, **kwargs: Any) -> Any:
        """A control request to the head, with its errors turned into actorlib's."""
        if self.head is None or self.head.closed:
            raise ActorLibError(self.lost_head or "not connected to the head")
        try:
            return await control_call(self.head, op, timeout=timeout, **kwargs)
        except RemoteFailure as exc:
            raise control_error(op, exc.record) from None
        except TransportError as exc:
            raise ActorLibError(f"lost the head while doing {op}: {exc}") from None

    def post_control(self, op: str, reply: concurrent.futures.Future[Any], **kwargs: Any) -> None:
        """Send a control request without waiting (any thread); ``reply`` gets its answer.

        Requests posted from one thread reach the head in the order they were
        posted, before any later blocking request from that thread.
        """
        self.call_soon(self._post_control, op, reply, kwargs)

    def _post_control(self, op: str, reply: concurrent.futures.Future[Any], kwargs: dict[str, Any]) -> None:
        def sink(msg: Message) -> None:
            try:
                value = loads(msg.body, msg.buffers, allow_pickle=False)
            except DecodeError as exc:
                reply.set_exception(ActorLibError(f"malformed answer to {op}: {exc}"))
                return
            if msg.kind == Kind.ERROR:
                reply.set_exception(control_error(op, value if isinstance(value, dict) else {}))
            else:
                reply.set_result(value)

        try:
            if self.head is None or self.head.closed:
                raise ActorLibError("not connected to the head")
            body, buffers = dumps([op, kwargs], allow_pickle=False)
            self.head.request(Kind.CONTROL, body, buffers, sink=sink)
        except Exception as exc:
            reply.set_exception(exc if isinstance(exc, ActorLibError) else ActorLibError(f"could not send {op}: {exc}"))

    def _on_event(self, peer: bytes | None, topic: str, payload: Any) -> None:
        if topic == "actor_died":
            conn = self._conns.pop(payload.get("actor_id", ""), None)  # a later call asks the head again
            if conn is not None:
                conn.mark_dead(payload.get("death") or {})
        elif topic == "actor_restarting":
            conn = self._conns.get(payload.get("actor_id", ""))
            if conn is not None:
                conn.restarting(payload.get("death") or {})
        elif topic == "log":
            self._print_log(payload)

    def _print_log(self, payload: dict[str, Any]) -> None:
        if not self.log_to_driver or payload.get("shown_by") == os.getpid():
            return
        self._show_log(payload)

    def show_local_output(self, payload: dict[str, Any]) -> bool:
        """A worker's lines, from a node agent in this process (loop thread): shown here if they are this
        driver's to show; says whether they were (see ``NodeAgent.show_output``)."""
        if not self.log_to_driver or payload.get("actor_id") not in self.owned:
            return False
        self._show_log(payload)
        return True

    def _show_log(self, payload: dict[str, Any]) -> None:
        out = sys.stderr if payload.get("stream") == "stderr" else sys.stdout
        prefix = f"({payload.get('label')} pid={payload.get('pid')}) "
        text = "".join(prefix + line + "\n" for line in payload.get("lines", []))
        # In an empty context: the loop's callbacks carry the context of the cell that called init(),
        # and Jupyter would file the lines under that cell instead of the one running now.
        contextvars.Context().run(_write, out, text)

    # -- actors ------------------------------------------------------------------

    def connection(self, actor_id: str, class_name: str) -> ActorConnection:
        """This process's connection to an actor (loop thread only)."""
        conn = self._conns.get(actor_id)
        if conn is None:
            conn = self._conns[actor_id] = ActorConnection(self, actor_id, class_name)
        return conn

    def create_actor(self, spec: dict[str, Any], payload: Callable[[], Any], *, waits_for_refs: bool = False) -> None:
        """Ask the head for an actor; ``payload()`` is awaited for the pickled class and arguments.

        Blocks for the head's answer (so a taken name or an impossible demand
        raises here), unless called on the loop thread, where it cannot block,
        or from a running event loop while ``payload()`` waits for ObjectRefs
        (for as long as they take): then a refusal fails the actor's calls instead.
        """

        self.owned.add(spec["actor_id"])

        async def create() -> None:
            spec["payload"] = await payload()
            await self.control("create_actor", spec=spec)

        def start() -> None:  # loop thread
            conn = self.connection(spec["actor_id"], spec["class_name"])
            conn.created = self.loop.create_task(create())

        if self.in_loop():
            start()
        elif waits_for_refs and asyncio._get_running_loop() is not None:
            self.call_soon(start)  # before any call to the actor made after this returns (one queue, in order)
        else:
            self.run(create())

    async def kill_actor(self, actor_id: str) -> None:
        """Have the head kill an actor. One this process is still creating (waiting for its ObjectRef
        arguments) is never created: the head does not know it yet, and would have refused the kill."""
        conn = self._conns.get(actor_id)
        creating = conn.created if conn is not None else None
        if conn is None or creating is None or creating.done():
            # Until its process is gone, a call could still reach it (through a shared-memory slot, at once):
            # wait for that, and fail this process's calls to it from then on, with the head's word on its death.
            await self.control("kill_actor", actor_id=actor_id, wait_s=KILL_WAIT_S, timeout=KILL_WAIT_S + 10)
            if conn is None:
                return  # (a connection made later learns from the head that it is dead)
            try:
                info = await self.control("resolve_actor", actor_id=actor_id)
            except Exception:  # (the head is going away ...): what we know
                info = {}
            death = info.get("death") if info.get("state") == "DEAD" else None
            conn.mark_dead(death or {"actor_id": actor_id, "class_name": conn.class_name, "reason": "killed by actorlib.kill()"})
            return
        creating.cancel()
        try:
            await creating
        except BaseException:
            pass
        conn.mark_dead(
            {"actor_id": actor_id, "class_name": conn.class_name, "reason": "killed by actorlib.kill() before it was created"}
        )
        try:  # the head may have taken the request just before the cancel
            await self.control("kill_actor", actor_id=actor_id)
        except ValueError:
            pass  # it had not: nothing was made

    def submit(
        self,
        actor_id: str,
        class_name: str,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        stream_window: int | None = None,
        sync: bool = False,
    ) -> ObjectRef | ObjectRefGenerator:
        """Call ``method`` on one actor; returns its ObjectRef (or ObjectRefGenerator). ``sync``: a sync method,
        which may go through the connection's shared-memory slot (see ``ActorConnection.try_slot``)."""
        deps = _has_refs(args, kwargs)
        options = None if stream_window is None else {"window": stream_window}
        call = Call(method, args, kwargs, options, None if deps else encode_call(method, args, kwargs, options), None, deps)
        result = self._sink(actor_id, class_name, call, stream_window)
        self._dispatch(actor_id, class_name, call, sync)
        return result

    def submit_many(
        self,
        targets: list[tuple[str, str]],
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        stream_window: int | None = None,
        broadcast: tuple[Broadcast, list[int]] | None = None,
    ) -> list[Any]:
        """The same call on several actors (``(actor_id, class_name)`` each): encoded once, sent to each.

        ``broadcast``: a worker group's shared-memory slots and each target's slot, for a sync method's
        call (see :mod:`actorlib.broadcast`); the call goes through them when every target is ready for it.
        """
        deps = _has_refs(args, kwargs)
        options = None if stream_window is None else {"window": stream_window}
        frames = None if deps else encode_call(method, args, kwargs, options)
        calls = [Call(method, args, kwargs, options, frames, None, deps) for _ in targets]
        results = [
            self._sink(actor_id, class_name, call, stream_window)
            for (actor_id, class_name), call in zip(targets, calls, strict=True)
        ]
        if broadcast is not None and frames is not None and not frames[1] and stream_window is None and not self.in_loop():
            conns = [self._conns.get(actor_id) for actor_id, _ in targets]
            if all(c is not None for c in conns) and broadcast[0].try_send(conns, broadcast[1], calls):  # type: ignore[arg-type]
                return results
        for (actor_id, class_name), call in zip(targets, calls, strict=True):
            self._dispatch(actor_id, class_name, call)
        return results

    def _sink(self, actor_id: str, class_name: str, call: Call, stream_window: int | None) -> Any:
        """The call's ObjectRef (or, for a stream, its ObjectRefGenerator), set as its sink."""
        if stream_window is None:
            call.sink = ObjectRef((class_name, call.method, actor_id), cancel=_Cancel(self, actor_id, call))
            return call.sink
        call.sink = StreamState(
            f"{class_name}.{call.method}()",
            stream_window,
            send_credit=lambda n: self.call_soon(self._credit, actor_id, call, n),
            send_close=lambda: self.post(self._close_stream, actor_id, call),
        )
        return ObjectRefGenerator(call.sink, self.check_can_block)

    def _dispatch(self, actor_id: str, class_name: str, call: Call, sync: bool = False) -> None:
        if self.in_loop():
            _own_buffers(call)  # sent later, from the loop: the caller must be free to change its arrays
            self.connection(actor_id, class_name).submit(call)
            return
        conn = self._conns.get(actor_id)
        if conn is not None:
            caller_loop = asyncio._get_running_loop()
            if caller_loop is None and sync and conn.try_slot(call):
                return
            if caller_loop is None or caller_loop not in self._bursting:
                if conn.try_direct(call):
                    if caller_loop is not None:  # later calls in this step of the caller's loop: batched
                        self._bursting.add(caller_loop)
                        caller_loop.call_soon(self._bursting.discard, caller_loop)
                    return
            conn.post()
        _own_buffers(call)
        self.call_soon(self._submit_posted, actor_id, class_name, call, conn)

    def end_burst(self) -> None:
        """The caller is about to block: its next call goes straight out again (see the module's docstring)."""
        if self._bursting:
            loop = asyncio._get_running_loop()
            if loop is not None:
                self._bursting.discard(loop)

    def _submit_posted(self, actor_id: str, class_name: str, call: Call, counted: ActorConnection | None) -> None:
        if counted is not None:
            counted.submit_posted(call)  # the connection that counted it, even if it has died since
        else:
            self.connection(actor_id, class_name).submit(call)

    def _cancel(self, actor_id: str, call: Call) -> None:
        conn = self._conns.get(actor_id)
        if conn is not None:
            conn.cancel(call)
        elif call.req_id == 0:  # not even connected yet: it must never be sent
            call.cancelled = True
            call.fail(TaskCancelledError(f"{call.method}() was cancelled before it was sent"))

    def _credit(self, actor_id: str, call: Call, consumed: int) -> None:
        conn = self._conns.get(actor_id)
        if conn is not None:
            conn.send_credit(call.req_id, consumed)

    def _close_stream(self, actor_id: str, call: Call) -> None:
        conn = self._conns.get(actor_id)
        if conn is None:
            return
        if call.req_id == 0:
            call.cancelled = True
        else:
            conn.send_close(call.req_id)

    def close_connections(self, reason: str = "actorlib was shut down") -> None:
        for conn in self._conns.values():
            conn.close(reason)
        self._conns.clear()

    def head_lost(self, reason: str) -> None:
        """The head is gone (loop thread): its nodes stop their workers, so every call fails now with ``reason``,
        and later ones too (no actor can be found without the head)."""
        self.lost_head = reason
        if self.head is not None:
            body, _ = dumps({"type": "head_lost", "message": reason}, allow_pickle=False)
            self.head.fail_pending(lambda req_id: Message(Kind.ERROR, req_id, body, [], None))  # with that reason
            self.head.close()
        self.close_connections(reason)


def _why_not_running(actor_id: str) -> str:
    """For a get() that timed out: " (the actor is not running yet: why)" if it is still waiting to be placed
    or started, else "" (asks the head, briefly; never from the loop)."""
    rt = current_or_none()
    conn = rt._conns.get(actor_id) if rt is not None else None
    if rt is None or conn is None or conn.state is not ConnState.RESOLVING or rt.in_loop():
        return ""
    try:  # one short question (a busy head must not hold a timed-out get long)
        reason = rt.run(rt.control("waiting_reason", timeout=0.5, actor_id=actor_id), 1.0)
    except Exception:  # (not a Ctrl-C: that goes on up) this only adds to an error already on its way
        return ""
    return f" (the actor is not running yet: {reason})" if reason else " (the actor is not running yet)"


object_ref.why_not_running = _why_not_running


def _own_buffers(call: Call) -> None:
    """Copy a call's buffer frames: it will be sent after ``.remote()`` has returned."""
    if call.frames is not None and call.frames[1]:
        call.frames = (call.frames[0], [bytes(b) for b in call.frames[1]])


def _write(out: Any, text: str) -> None:
    try:
        out.write(text)
        out.flush()
    except Exception:
        pass  # a closed or broken stdout must not stop the runtime


def control_error(op: str, record: dict[str, Any]) -> Exception:
    """The exception for a control request the head refused."""
    kind = record.get("type")
    message = record.get("message", f"{op} failed")
    if kind == "ValueError":
        return ValueError(message)
    if kind == "ResourceError":
        return InfeasibleError(message)
    if kind == "head_lost":
        return ActorLibError(message)
    return ActorLibError(f"the head refused {op}: {message}")


def encode_payload(obj: Any) -> bytes:
    """Pickle an actor's class and constructor arguments into one opaque blob."""
    try:
        return pickle_dumps(obj)
    except Exception as exc:
        raise SerializationError(f"could not serialize the actor's class or constructor arguments: {exc}") from None


class _Cancel:
    """A call's ``cancel()``, kept by its ObjectRef: one object (a partial of a bound method is three, each
    alive for as long as the call is out)."""

    __slots__ = ("_rt", "_actor_id", "_call")

    def __init__(self, rt: Runtime, actor_id: str, call: Call) -> None:
        self._rt = rt
        self._actor_id = actor_id
        self._call = call

    def __call__(self) -> None:
        self._rt._cancel(self._actor_id, self._call)


def _has_refs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """An ObjectRef among a call's top-level arguments (a plain loop: this runs on every call, and a generator
    expression is one more object for the garbage collector each time)."""
    for a in args:
        if type(a) is ObjectRef:
            return True
    for v in kwargs.values():
        if type(v) is ObjectRef:
            return True
    return False
