"""One ZeroMQ socket speaking the protocol, driven by an asyncio loop.

An :class:`Endpoint` is either *bound* (a ROUTER: many peers, each message
carries the sender's routing id) or *connected* (a DEALER: one peer). Both
sides can send requests and both can answer them: responses are routed by
``req_id`` to the sink registered when the request went out; everything else
goes to the ``on_message`` handler.

The socket is read straight from the loop's reader callback (no future per
message) and drained without blocking, so a burst of messages costs one
wake-up. An endpoint made with ``read_on_loop=False`` is read instead by one
thread of its owner's choosing, which waits on :attr:`Endpoint.zmq_socket`
with a ``zmq.Poller`` and calls :meth:`Endpoint.read_available` (a compiled
graph's inbox, read by the actor's sync-method thread: no hop through the
loop). A loop-read endpoint can also be read by another thread beside the
loop (:meth:`Endpoint.take_waiting`): a thread blocked on a call's answer
reads it itself (:meth:`Endpoint.read_responses`), an actor's idle sync
thread takes sync calls while the loop stands aside
(:meth:`Endpoint.share_reading`), and whatever such a thread does not take
goes to the loop in order. Sending is allowed from any thread: every use of
the socket holds one lock (ZeroMQ allows a socket to move between threads
across a full memory barrier), so a caller's thread sends without waking the
loop. Everything else must be called on the loop's thread.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Container, Sequence
from typing import Any, cast

import zmq

from . import codec, security, shm
from .exceptions import ConnectionClosedError, ProtocolError, TransportError
from .protocol import FINAL_KINDS, RESPONSE_KINDS, Kind, Message, decode, decode_batch, encode_batch, encode_header, peek_request

__all__ = ["Endpoint", "EndpointBusy", "RemoteFailure", "shared_context", "wait_sent"]

log = logging.getLogger(__name__)

Sink = Callable[[Message], None]

_DRAIN_BATCH = 512
# the most messages one BATCH carries: the peer starts on the first ones while the rest are still being
# made (W2: ~60k -> ~90k calls/s against one BATCH per loop turn, however long)
BATCH_MAX = 64
# ... and the bodies of one BATCH stay under this many bytes: together they must fit every socket's
# MAXMSGSIZE, past which ZeroMQ drops the message and the connection without a word. A body this big leaves
# on its own (after what was queued before it).
BATCH_BYTES = min(1 << 20, codec.MAX_MESSAGE_BYTES // 2)
# plain ints: pyzmq's enum members cost an enum operation on every use, on every message
_NOBLOCK, _RCVMORE, _EVENTS, _POLLIN = int(zmq.NOBLOCK), int(zmq.RCVMORE), int(zmq.EVENTS), int(zmq.POLLIN)
_NOBLOCK_MORE = _NOBLOCK | int(zmq.SNDMORE)
_TICK = 0.002  # how often a loop that stands aside for a reading thread looks whether that thread got busy
COPY_BELOW = 64 << 10  # tracked sends copy buffers this small instead (as pyzmq's own copy threshold does untracked)
_context: zmq.Context | None = None
_context_pid = 0


def shared_context() -> zmq.Context:
    """This process's ZeroMQ context (a fresh one after ``fork``)."""
    global _context, _context_pid
    if _context is None or _context_pid != os.getpid():
        _context = zmq.Context()
        _context_pid = os.getpid()
    return _context


class EndpointBusy(TransportError):
    """A non-blocking send found the socket in use by another thread; nothing was sent."""


class RemoteFailure(TransportError):
    """The peer answered a request with an ERROR message; ``record`` is its body."""

    def __init__(self, record: dict[str, Any]) -> None:
        super().__init__(record.get("message", "remote error"))
        self.record = record


class _Box(list[tuple[Kind, int, bytes]]):
    """The messages :meth:`Endpoint.send_soon` holds for one peer, and how many bytes their bodies make."""

    __slots__ = ("nbytes",)

    def __init__(self) -> None:
        super().__init__()
        self.nbytes = 0


class Endpoint:
    def __init__(
        self,
        sock: zmq.Socket,
        *,
        routed: bool,
        on_message: Callable[[Message], None] | None,
        name: str,
        loop: asyncio.AbstractEventLoop | None = None,
        read_on_loop: bool = True,
    ) -> None:
        self._sock = sock
        self._routed = routed
        self._on_message = on_message
        self.name = name
        self._loop = loop or asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.pending: dict[int, Sink] = {}
        self._closed = False
        self._drain_scheduled = False
        self._outbox: dict[bytes | None, _Box] = {}
        self._flushing = False
        self._refused = 0
        self._unwatch: Callable[[], None] | None = None  # stops the log of refused (keyless) connections
        self._shm = False  # large buffers through shared memory: every peer is on this machine
        self._fd = int(sock.getsockopt(zmq.FD))
        self._reading = False  # the loop's reader callback is on
        self._handoff: deque[list[Any]] = deque()  # messages another thread read for the loop (take_waiting)
        self._in_hand = 0  # messages the loop has read and not yet handled (written by the loop only)
        # A thread that reads this socket while it is idle (see share_reading): who reads, written under _lock
        self._thread_idle = False  # that thread waits on the socket and reads it: the loop stands aside
        self._paused = False  # the loop's reader is off for that (loop thread)
        self._ticking = False  # a check of a paused loop is due (loop thread)
        self._taken = 0  # messages that thread has taken: a paused loop checks again while this moves
        self.address: str = ""
        if read_on_loop:
            self.start_reading()

    # -- construction ---------------------------------------------------

    @classmethod
    def bind(
        cls,
        address: str,
        *,
        on_message: Callable[[Message], None] | None,
        name: str,
        max_message_size: int = -1,
        read_on_loop: bool = True,
    ) -> Endpoint:
        """Bind a ROUTER. ``tcp://HOST:0`` picks a port from the OS; see ``.address``."""
        sock = _socket(zmq.ROUTER, max_message_size)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        security.secure(sock, address, server=True)
        try:
            if address.startswith("tcp://") and address.endswith(":0"):
                port = sock.bind_to_random_port(address[: -len(":0")])
                bound = f"{address[: -len(':0')]}:{port}"
            else:
                sock.bind(address)
                bound = address
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise TransportError(f"cannot bind {address}: {exc}") from exc
        ep = cls(sock, routed=True, on_message=on_message, name=name, read_on_loop=read_on_loop)
        ep.address = bound
        ep._shm = shm.ENABLED and shm.local_address(bound)
        if security.is_secured(sock):
            ep._unwatch = security.watch_refusals(sock, ep._loop, name)
        return ep

    @classmethod
    def connect(
        cls,
        address: str,
        *,
        on_message: Callable[[Message], None] | None,
        name: str,
        max_message_size: int = -1,
    ) -> Endpoint:
        """Connect a DEALER to one peer. Messages queue until the peer is there."""
        sock = _socket(zmq.DEALER, max_message_size)
        security.secure(sock, address, server=False)
        try:
            sock.connect(address)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise TransportError(f"cannot connect to {address}: {exc}") from exc
        ep = cls(sock, routed=False, on_message=on_message, name=name)
        ep.address = address
        ep._shm = shm.ENABLED and shm.local_address(address)
        return ep

    # -- sending --------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def next_id(self) -> int:
        return next(self._ids)

    def send(
        self,
        kind: Kind,
        req_id: int,
        body: bytes,
        buffers: Sequence[Any] = (),
        peer: bytes | None = None,
        *,
        track: bool = False,
        block: bool = True,
    ) -> zmq.MessageTracker | None:
        if track:  # waiting for ZeroMQ to let go of a buffer costs thread hops (pyzmq's gc thread): copy small ones
            buffers = [bytes(b) if memoryview(b).nbytes < COPY_BELOW else b for b in buffers]
            track = any(type(b) is not bytes for b in buffers)
        if buffers and self._shm:
            frames, moved = shm.export(buffers)
            if moved:  # copied out already: the caller may change its arrays, nothing to track
                try:
                    return self.send_frames([encode_header(kind, req_id, body, moved), *frames], peer, block=block)
                except (TransportError, TypeError, ValueError):  # not sent (busy, closed, no peer ...): nobody will claim those files
                    shm.discard(moved)
                    raise
        return self.send_frames([encode_header(kind, req_id, body), *buffers], peer, track=track, block=block)

    def send_value(self, kind: Kind, req_id: int, value: Any, peer: bytes | None = None) -> None:
        body, buffers = codec.dumps(value)
        self.send(kind, req_id, body, buffers, peer)

    def send_frames(
        self, frames: list[Any], peer: bytes | None = None, *, track: bool = False, block: bool = True
    ) -> zmq.MessageTracker | None:
        """Send an already-encoded message, from any thread. Raises :class:`ConnectionClosedError`.

        Buffer frames go out without a copy: ZeroMQ reads them after this
        returns. With ``track`` the returned tracker says when it is done with
        them (see :func:`wait_sent`); until then they must not change.
        With ``block=False`` a socket busy in another thread raises
        :class:`EndpointBusy` at once (nothing is sent): the caller can hand
        the message to the loop instead of waiting for the lock.
        """
        if self._outbox and threading.get_ident() == self._loop_thread:
            self._flush_outbox()  # what was queued first leaves first
        if self._routed:
            if peer is None:
                raise ValueError("a bound endpoint needs the peer to send to")
            frames = [peer, *frames]
        if not self._lock.acquire(blocking=block):
            raise EndpointBusy(self.name)
        try:
            if self._closed:
                raise ConnectionClosedError(f"{self.name} is closed", by_us=True)
            try:
                if track:
                    tracker = self._send_tracked(frames)
                else:  # frame by frame: pyzmq's send_multipart costs twice as much (checks, an enum op per frame)
                    send, last = self._sock.send, len(frames) - 1
                    for i in range(last):
                        send(frames[i], _NOBLOCK_MORE, copy=False)
                    send(frames[last], _NOBLOCK, copy=False)
                    tracker = None
            except zmq.ZMQError as exc:
                if exc.errno == zmq.EHOSTUNREACH:
                    raise ConnectionClosedError(f"{self.name}: peer {peer!r} is not connected", by_us=False) from None
                raise ConnectionClosedError(f"{self.name}: send failed: {exc}", by_us=False) from exc
            # A send can swallow the socket's read edge: look again (a thread's zmq.Poller looks itself).
            readable = cast(int, self._sock.getsockopt(_EVENTS)) & _POLLIN if self._reading else 0
        finally:
            self._lock.release()
        if readable and not self._drain_scheduled:
            self._schedule_drain()
        return tracker

    def _send_tracked(self, frames: list[Any]) -> zmq.MessageTracker | None:
        """Send frame by frame and track every one sent without a copy (pyzmq's send_multipart
        tracks only the last frame, which may be a small copied one)."""
        pending = []
        last = len(frames) - 1
        for i, frame in enumerate(frames):
            tracker = self._sock.send(frame, zmq.NOBLOCK | (0 if i == last else zmq.SNDMORE), copy=False, track=True)
            if tracker is not None and not tracker.done:
                pending.append(tracker)
        return zmq.MessageTracker(*pending) if pending else None

    def send_soon(self, kind: Kind, req_id: int, body: bytes, peer: bytes | None = None) -> None:
        """Send a buffer-less message at the end of this loop iteration (loop thread).

        Everything queued for one peer in the meantime leaves as a single
        BATCH message: one wake-up of ZeroMQ and of the peer for the lot; or
        at once, :data:`BATCH_MAX` (or :data:`BATCH_BYTES`) at a time, while a
        long turn goes on queueing, so the two ends work at the same time.
        """
        if len(body) >= BATCH_BYTES:  # too big to share a BATCH: on its own, after what is queued for this peer
            queued = self._outbox.pop(peer, None)
            if queued:
                self._send_box(peer, queued)
            self._send_box(peer, [(kind, req_id, body)])
            return
        box = self._outbox.get(peer)
        if box is None:
            if not self._outbox:
                self._loop.call_soon(self._flush_outbox)
            box = self._outbox[peer] = _Box()
        box.append((kind, req_id, body))
        box.nbytes += len(body)
        if len(box) >= BATCH_MAX or box.nbytes >= BATCH_BYTES:
            del self._outbox[peer]  # all that is queued for this peer: its order holds
            self._send_box(peer, box)

    def has_outbox(self) -> bool:
        """Messages are waiting in :meth:`send_soon`'s outbox (later sends must not overtake them)."""
        return bool(self._outbox) or self._flushing

    def _flush_outbox(self) -> None:
        if self._flushing:
            return
        self._flushing = True  # has_outbox() stays true until the lot is on the socket
        try:
            outbox, self._outbox = self._outbox, {}
            for peer, items in outbox.items():
                self._send_box(peer, items)
        finally:
            self._flushing = False

    def _send_box(self, peer: bytes | None, items: list[tuple[Kind, int, bytes]]) -> None:
        try:
            if len(items) == 1:
                self.send(*items[0], peer=peer)
            else:
                self.send_frames([encode_batch(items)], peer)
        except TransportError as exc:
            log.debug("%s: %d queued message(s) to %r dropped: %s", self.name, len(items), peer, exc)

    def request(
        self,
        kind: Kind,
        body: bytes,
        buffers: Sequence[Any] = (),
        *,
        sink: Sink,
        peer: bytes | None = None,
        req_id: int | None = None,
    ) -> int:
        """Send a request whose responses go to ``sink``; returns its id (``next_id()`` unless given)."""
        if req_id is None:
            req_id = self.next_id()
        self.pending[req_id] = sink
        try:
            self.send(kind, req_id, body, buffers, peer)
        except BaseException:
            self.pending.pop(req_id, None)
            raise
        return req_id

    async def call(
        self,
        kind: Kind,
        value: Any,
        *,
        peer: bytes | None = None,
        timeout: float | None = None,
        allow_pickle: bool = True,
    ) -> Any:
        """Request/response with one final answer: returns the decoded RESULT.

        An ERROR answer raises :class:`RemoteFailure` with the error record.
        """
        fut: asyncio.Future[Message] = self._loop.create_future()

        def sink(msg: Message) -> None:
            if not fut.done():
                fut.set_result(msg)

        body, buffers = codec.dumps(value, allow_pickle=allow_pickle)
        req_id = self.request(kind, body, buffers, sink=sink, peer=peer)
        try:
            msg = await asyncio.wait_for(fut, timeout)
        finally:
            self.pending.pop(req_id, None)
        result = codec.loads(msg.body, msg.buffers, allow_pickle=allow_pickle)
        if msg.kind == Kind.ERROR:
            raise RemoteFailure(result if isinstance(result, dict) else {"message": str(result)})
        return result

    def reply_error(self, req_id: int, record: dict[str, Any], peer: bytes | None) -> None:
        body, buffers = codec.dumps(record, allow_pickle=False)
        self.send(Kind.ERROR, req_id, body, buffers, peer)

    # -- receiving ------------------------------------------------------

    def start_reading(self) -> None:
        """Read the socket from the loop's reader callback (loop thread)."""
        if self._reading or self._closed:
            return
        self._reading = True
        self._loop.add_reader(self._fd, self._on_fd)
        self._schedule_drain()  # edge-triggered FD: anything already queued must be read now

    def stop_reading(self) -> None:
        """Stop reading on the loop (loop thread): a socket that is only sent on no longer wakes it."""
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

    @property
    def zmq_socket(self) -> zmq.Socket:
        """The socket, for a ``zmq.Poller`` of the thread that reads an endpoint made with ``read_on_loop=False``."""
        return self._sock

    def read_available(self, limit: int = _DRAIN_BATCH) -> None:
        """Handle up to ``limit`` of the messages waiting now (the reading thread of a ``read_on_loop=False``
        endpoint; a ``zmq.Poller`` says at once that more are waiting)."""
        self._read_some(limit)

    def _schedule_drain(self) -> None:
        if not self._reading:
            return  # read by a thread of its own, whose poller says when messages wait
        self._drain_scheduled = True
        if threading.get_ident() == self._loop_thread:
            self._loop.call_soon(self._on_readable)
        else:
            self._loop.call_soon_threadsafe(self._on_readable)

    def _on_readable(self) -> None:
        self._drain_scheduled = False
        if self._read_some(_DRAIN_BATCH):
            self._schedule_drain()  # more waiting: yield to the loop, then go on

    def _on_fd(self) -> None:
        """The loop's reader callback: the socket may have messages."""
        if self._thread_idle:
            self._pause()  # the idle thread reads them (without a look here that would take its wake-up)
        else:
            self._on_readable()

    # -- sharing the reading with a thread ----------------------------------
    #
    # An actor's sync-method thread reads the actor's socket itself while it is
    # idle (take_waiting), so a sync call runs on the thread that received it;
    # a thread blocked on a call's answer reads its connection (read_responses).
    # Both would wake on every message and race for it; instead the loop stands
    # aside while the thread is idle, and reads again while the thread is busy
    # (for several threads blocked on one connection: until the first is done):
    #
    #   LOOP ──thread idle──▶ THREAD (the loop's reader still on)
    #   THREAD ──the loop wakes──▶ PAUSED (reader off; a check due in _TICK)
    #   PAUSED ──check: thread busy──▶ LOOP (reader on)
    #   PAUSED ──check: thread idle, took messages since──▶ PAUSED (check again)
    #   PAUSED ──check: idle, took nothing──▶ PAUSED, no check (an idle actor: no wake-ups)
    #   PAUSED, no check ──thread busy──▶ LOOP (the thread wakes the loop)
    #
    # So during a stream of sync calls the loop wakes once per _TICK, and a call
    # the thread does not take (async, cancel, ...) waits for the loop at most
    # _TICK while the thread runs a job.

    def share_reading(self, idle: bool) -> None:
        """The thread that reads this socket with :meth:`take_waiting` is now ``idle`` (waiting on :attr:`fd`
        and reading) or busy (the loop must read). From that thread; see the comment above."""
        with self._lock:
            if self._thread_idle == idle:
                return
            self._thread_idle = idle
            resume = not idle and self._paused and not self._ticking
            if resume:
                self._ticking = True  # one wake-up asked for
        if resume:
            try:
                self._loop.call_soon_threadsafe(self._check_paused)
            except RuntimeError:  # the loop is closed
                pass

    def _pause(self) -> None:
        with self._lock:
            if not self._thread_idle or self._closed:
                return
            self._paused = True
            self._loop.remove_reader(self._fd)
            if not self._ticking:
                self._ticking = True
                self._loop.call_later(_TICK, self._check_paused, self._taken)

    def _check_paused(self, taken: int = -1) -> None:
        with self._lock:
            self._ticking = False
            if not self._paused or self._closed:
                return
            if self._thread_idle:
                if self._taken != taken and taken != -1:  # still busy with calls: look again later
                    self._ticking = True
                    self._loop.call_later(_TICK, self._check_paused, self._taken)
                return
            self._paused = False
            if self._reading:
                self._loop.add_reader(self._fd, self._on_fd)
        self._schedule_drain()

    def _read_some(self, limit: int) -> bool:
        """Handle up to ``limit`` messages; True if there may be more."""
        for _ in range(limit):
            frames = self._next_frames()
            if frames is None:
                return False
            try:
                self._dispatch(frames)
            finally:
                self._in_hand -= 1
            if self._closed:
                return False
        return True

    def _next_frames(self) -> list[Any] | None:
        """The next message: one a waiting thread handed over first, then the socket's; None if none waits."""
        with self._lock:
            if self._closed:
                return None
            if self._handoff:
                self._in_hand += 1
                return self._handoff.popleft()
            try:
                frames = self._recv_locked()
            except zmq.Again:
                return None
            except zmq.ZMQError as exc:
                log.warning("%s: receive failed: %s", self.name, exc)
                return None
            self._in_hand += 1
        return frames

    def _recv_locked(self) -> list[Any]:
        """One message's frames, off the socket (under ``_lock``). Header frames are small: copied (cheaper
        than a Frame); buffer frames stay zero-copy."""
        sock = self._sock
        frames: list[Any] = [sock.recv(_NOBLOCK)]
        if self._routed:
            frames.append(sock.recv(_NOBLOCK))
        while sock.get(_RCVMORE):
            frames.append(sock.recv(_NOBLOCK, copy=False))
        return frames

    @property
    def fd(self) -> int:
        """The socket's notification descriptor: readable when something may be waiting (see :meth:`read_responses`)."""
        return self._fd

    def read_responses(self, req_ids: Container[int], streams: Container[int] = ()) -> None:
        """From a thread waiting for the answers to ``req_ids`` (a connected endpoint): read what is waiting now.

        Those answers, and the items of ``streams`` (requests whose sinks take
        items in any order, from any thread), if here on their own, are
        handled on this thread (their sinks run here): the waiting thread need
        not be woken by the loop after the loop was woken by the socket.
        Everything else goes to the loop (see :meth:`take_waiting`). A waiting
        thread polls :attr:`fd` and calls this again.
        """
        taken = self.take_waiting(lambda frames: _answers(frames[0], req_ids, streams), after_loop=False)
        for i, frames in enumerate(taken):
            try:
                self._dispatch(frames)
            except BaseException:  # (Ctrl-C in the waiting thread) what it read and has not handled goes to the loop
                with self._lock:
                    self._handoff.extend(taken[i + 1 :])
                try:
                    self._schedule_drain()
                except RuntimeError:
                    pass  # the loop is closed
                raise

    def take_waiting(self, take: Callable[[list[Any]], bool], *, after_loop: bool) -> list[list[Any]]:
        """From a thread other than the loop's: read the messages waiting on the socket now.

        Those for which ``take(frames)`` is true (called under the socket's
        lock: it must be short and must not use this endpoint) are the
        thread's, returned in order. Every other one is handed to the loop,
        which handles those first, in the order they were read. The loop goes
        on reading too: whoever reads a message handles it. ``after_loop``:
        take nothing while the loop holds messages it has read and not yet
        handled, or was handed some, so what the thread takes comes after all
        of those (a sync call the actor's thread takes must not overtake one
        the loop is about to queue for it).
        """
        taken: list[list[Any]] = []
        handed = more = False
        sock = self._sock
        with self._lock:
            if self._closed:
                return taken
            for _ in range(_DRAIN_BATCH):
                try:
                    if not cast(int, sock.getsockopt(_EVENTS)) & _POLLIN:  # cheaper than a recv raising zmq.Again
                        break
                    frames = self._recv_locked()
                except zmq.ZMQError as exc:
                    log.warning("%s: receive failed: %s", self.name, exc)
                    more = True  # the look above cleared the fd: the loop must look again
                    break
                if not (after_loop and (handed or self._in_hand or self._handoff)) and take(frames):
                    taken.append(frames)
                    self._taken += 1
                else:
                    self._handoff.append(frames)
                    handed = True
            else:  # the batch ran out: the look above cleared the fd, so have the loop read the rest
                more = True
        if handed or more:
            try:
                self._schedule_drain()
            except RuntimeError:  # the loop is closed: nobody reads any more
                pass
        return taken

    def deliver(self, msg: Message) -> None:
        """Handle a response that came another way (a worker group's shared-memory slot, see
        ``actorlib.broadcast``) as if read here, on the calling thread."""
        self._handle(msg)

    def _dispatch(self, frames: list[Any]) -> None:
        peer = None
        if self._routed:
            peer = frames[0]
            frames = frames[1:]
        try:
            msg = decode(frames, peer)
            batch, bad = decode_batch(msg) if msg.kind == Kind.BATCH else (None, ())
            if msg.shm:
                shm.claim(msg.shm, msg.buffers)
        except ProtocolError as exc:
            if frames:
                shm.discard_announced(frames[0])  # files a refused message names would stay until their sender exits
            self._refuse(frames, peer, exc)
            return
        except (OSError, ValueError) as exc:
            self._refuse(frames, peer, ProtocolError(f"its shared-memory buffer is unusable: {exc}"))
            return
        for kind, req_id, why in bad:  # answered, where they can be; the rest of the batch goes on
            self._refuse_request(kind, req_id, peer, ProtocolError(why))
        for one in batch if batch is not None else (msg,):
            self._handle(one)

    def _handle(self, msg: Message) -> None:
        try:
            if msg.kind in RESPONSE_KINDS:
                sink = self.pending.pop(msg.req_id, None) if msg.kind in FINAL_KINDS else self.pending.get(msg.req_id)
                if sink is not None:
                    sink(msg)
            elif msg.kind == Kind.PING:
                self.send(Kind.PONG, msg.req_id, b"\xc0", (), msg.peer)
            elif self._on_message is not None:
                self._on_message(msg)
        except Exception:
            log.exception("%s: error while handling a %s message", self.name, msg.kind.name)

    def _refuse(self, frames: list[Any], peer: bytes | None, exc: ProtocolError) -> None:
        kind, req_id = peek_request(frames) or (None, None)
        self._refuse_request(kind, req_id, peer, exc)

    def _refuse_request(self, kind: Any, req_id: Any, peer: bytes | None, exc: ProtocolError) -> None:
        """Drop a malformed message; a request (a call, a control request) is answered with the error."""
        self._refused += 1
        if self._refused <= 10 or self._refused % 1000 == 0:  # a flood must not become a flood of logs
            log.warning("%s: dropped a malformed message from %r (%d so far): %s", self.name, peer, self._refused, exc)
        if kind in (Kind.CALL, Kind.CONTROL) and type(kind) is int and type(req_id) is int:
            try:
                self.reply_error(req_id, {"type": "ProtocolError", "message": str(exc)}, peer)
            except TransportError:
                pass

    # -- teardown -------------------------------------------------------

    def fail_pending(self, make_message: Callable[[int], Message]) -> None:
        """Answer every outstanding request locally (e.g. with an error)."""
        pending, self.pending = self.pending, {}
        for req_id, sink in pending.items():
            try:
                sink(make_message(req_id))
            except Exception:
                log.exception("%s: error while failing request %d", self.name, req_id)

    def close(self) -> None:
        """Close the socket (loop thread, also for an endpoint read by a thread of its own: stop that first)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._reading:
                self._reading = False
                try:
                    self._loop.remove_reader(self._fd)
                except Exception:
                    pass
            if self._unwatch is not None:
                self._unwatch()
            self._sock.close(linger=0)


def _answers(head: bytes, req_ids: Container[int], streams: Container[int]) -> bool:
    """Whether a header frame is the final answer to one of ``req_ids`` or an item of one of ``streams``
    (a malformed one is neither: the loop refuses it)."""
    found = peek_request([head])
    if found is None:
        return False
    kind, req_id = found
    return (req_id in req_ids and kind in FINAL_KINDS) or (kind == Kind.STREAM_ITEM and req_id in streams)


def wait_sent(tracker: zmq.MessageTracker | None, still_wanted: Callable[[], bool]) -> None:
    """Block until ZeroMQ is done with a tracked message's buffers, or nobody wants it sent any more."""
    if tracker is None:
        return
    while not tracker.done:
        try:
            tracker.wait(1.0)
        except zmq.NotDone:
            if not still_wanted():
                return


def _socket(kind: int, max_message_size: int) -> zmq.Socket:
    """A socket for an Endpoint. ``max_message_size`` -1: what :data:`codec.MAX_MESSAGE_BYTES` allows (per frame)."""
    if max_message_size == -1:
        max_message_size = codec.MAX_MESSAGE_BYTES + 65536  # a frame may carry a little more than its payload
    sock = shared_context().socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_size)
    return sock
