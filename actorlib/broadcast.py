"""Calls and graph executions through shared memory, to the workers on the caller's machine that are awake.

A worker group's call to several workers (``run_all_workers_single_data``
and the like) sends one message per worker over ZeroMQ, a compiled graph's
execution one per input actor, a stage one per output it hands on, and a
thread calling an actor back to back one per call. Each costs the caller a send (Python,
a system call, a wake-up of ZeroMQ's I/O thread) and the worker two
wake-ups (its I/O thread, then the thread that runs the call); the answer
the same again. Workers called back to back are usually awake already,
polling between calls (see :mod:`actorlib.spin`): for those, the caller
writes the message into a slot of a shared-memory file instead, which the
worker's sync thread looks at between its polls; and while the caller's
``get()`` polls for answers, the worker writes its answer (a call's result
or error, a graph's output) into the slot too. Everything else (a message
too big for a slot, cancelling, a worker's death, a restart) goes as over
ZeroMQ.

Who writes which slots, and whose answers come back through them:

- a worker group's caller: one file, a slot per worker; answers too.
- a compiled graph's driver: one file, a slot per input or output actor
  (executions in, outputs out); and one file with a slot per pair of stages
  on this machine, which the sending stage writes (:meth:`Broadcast.link`,
  :meth:`Broadcast.adopt`) and the driver only makes.
- a connection from a thread to one actor (``ActorConnection.try_slot``):
  a one-slot file of its own (``direct``); answers too. A worker looks at
  no more than :data:`MAX_DIRECT_SLOTS` of those, and drops one whose
  caller has closed it or exited: the caller holds a shared ``flock`` on the
  file as long as it has it open (:meth:`Slot.caller_gone`).

The file (``/dev/shm/actorlib-<pid>-<random>``, mode 0600, unlinked as soon
as every worker has mapped it) holds a header (magic, a random token which a
worker checks: a worker on another machine finds no such file and goes
without; and ``reading``, set while some thread of the caller polls the
answers; and ``sleeping``, set while some thread of the caller sleeps on
its answers' bell) and one slot per worker. Each word below is written by one side
only, with one aligned 8-byte store (a ``memoryview`` cast to ``Q``:
``struct`` writes byte by byte, and a word read half-written could make a
call run twice)::

    slot + 0    seq          caller: bumped once the message below is in place
    slot + 8    req_id       caller: the call's request id on its connection to this worker (0: an EVENT)
    slot + 16   length       caller: of the encoded message
    slot + 24   kind         caller: CALL (a group's) or EVENT (a graph's execution)
    slot + 32   reply_taken  caller: the reply_seq it has taken
    slot + 64   awake        worker: 1 while it will look at the slot before it sleeps; 2 while it sleeps
                             and its bell wakes it; 0 otherwise (asleep, or the slot is not its any more)
    slot + 72   taken        worker: the seq it has taken
    slot + 128  reply_seq    worker: odd while it writes an answer, even once it is in place
    slot + 136  reply req_id, kind, length
    slot + 192  the message (at most :data:`BODY_MAX` bytes), then the answer (as much)

The worker's side, a small state machine per slot:

- AWAKE (``awake`` = 1): the sync thread runs calls or polls; it looks at the
  slot before each call it takes from elsewhere and between polls.
- going to sleep (ASLEEP): it writes ``awake`` = 2 (0 if it has no bell),
  fences, and looks at the slot once more (a message written meanwhile is
  taken: back to AWAKE); else it sleeps on its sockets, its eventfd and its
  bell.
- woken by anything: ``awake`` = 1 again.
- a slot it drops (replaced, its caller gone, its graph torn down): 0 for good.

The bell is a datagram socket of the worker's in the abstract namespace
(``\0actorlib-bell-<random>``; one per worker, its name in the answer to the
offer of a slot): one byte sent there wakes the sync thread itself, where a
message over ZeroMQ wakes the caller's I/O thread, then the worker's, then the
thread that reads it, and a reserved call the worker's event loop too.

The caller writes a slot only if its worker has taken what was written last
(``taken`` = its ``seq``) and is AWAKE, or ASLEEP with a bell the caller can
ring; for a group's call, only if every target is so, and the connection to
each has nothing of this process on its way to the actor (sent and
unanswered, queued, handed to the loop), so the call cannot overtake an
earlier one; else the message goes over ZeroMQ. After writing, it fences and
reads ``awake`` again: a worker asleep (and which may have missed the slot)
is woken by its bell, or, if it has none (or the byte could not be sent), by
a reserved call that wakes its sync thread. The two fences make the pair of
"write, then read the other's flag" safe (Dekker's pattern): at least one of
the two sees the other's write.

Answers: the worker writes one into its slot only if the caller has taken
the last (``reply_taken``) and ``reading`` is set (it waits up to 100 µs for
that: the caller is usually still writing the other workers' slots), or
``sleeping`` is and the caller told it its bell (the answers' bell, one per
file: a thread of the caller that stopped polling sleeps on it); then it
fences and reads ``reading`` again: if it is not set but ``sleeping`` is, it
rings the caller's bell; if neither (the caller stopped meanwhile) it sends
the answer over ZeroMQ as well: the second copy of a call's answer
finds no call waiting and is dropped; a graph's outputs, which all come on
one open call, are counted by output (``dag_compiled._Pending.arrived``). A polling thread that stops clears its share of
``reading``, fences, and takes what was written meanwhile, for whichever
thread's call it answers; one that goes to sleep on the answers' bell takes a
share of ``sleeping`` first, and gives it back the same way when it wakes for
good.

The fence is an atomic instruction (a lock's acquire), which orders stores
before later loads on x86-64; the path is off on other machines, whose
weaker ordering would need more than that. ``ACTORLIB_BROADCAST=0`` turns
it off.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import mmap
import os
import platform
import secrets
import socket
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from transport import Kind, Message

from .spin import SPIN_S, Recent

if TYPE_CHECKING:
    from .connection import ActorConnection, Call
    from .runtime import Runtime
    from .worker import ActorHost

__all__ = [
    "BELL_PREFIX",
    "BODY_MAX",
    "CONTROL",
    "ENABLED",
    "MAX_DIRECT_SLOTS",
    "Broadcast",
    "drain_bell",
    "is_bell",
    "make",
    "make_bell",
    "ReplyWatch",
    "ring_bell",
    "Slot",
    "Slots",
    "poke",
    "reserved_method",
]

log = logging.getLogger(__name__)

CONTROL = "__actorlib_broadcast__"
ENABLED = (
    os.environ.get("ACTORLIB_BROADCAST", "1") not in ("0", "off", "false")
    and platform.machine().lower() in ("x86_64", "amd64")
    and SPIN_S > 0  # with one CPU nobody polls: every call would go over ZeroMQ anyway
    and os.path.isdir("/dev/shm")
)
BODY_MAX = 64 << 10
MAX_DIRECT_SLOTS = 16  # callers' own slots a worker looks at; later callers' calls go over ZeroMQ
_MAGIC = b"actorlib-broadcast-2\0\0\0\0"  # 24 bytes, then the 16-byte token (2: the bells' ``awake`` = 2 and ``sleeping``)
_READING = 48  # in the header
_SLEEPING = 56  # and this: a thread of the caller sleeps on the answers' bell
_HEADER = 64
_SEQ, _REQ, _LENGTH, _KIND, _REPLY_TAKEN = 0, 8, 16, 24, 32  # written by the caller
_AWAKE, _TAKEN = 64, 72  # by the worker
_AWAKE_YES, _AWAKE_BELL = 1, 2  # awake; asleep, woken by its bell (0: neither)
BELL_PREFIX = "\0actorlib-bell-"
_REPLY_SEQ, _REPLY_REQ, _REPLY_KIND, _REPLY_LENGTH = 128, 136, 144, 152  # by the worker
_BODY = 192
_REPLY_BODY = _BODY + BODY_MAX
_SLOT = _REPLY_BODY + BODY_MAX
_WAIT_FOR_CALLER_S = 100e-6
_SKIP_MAX = 1024
_SLOT_KINDS = (Kind.CALL, Kind.EVENT)
_ANSWER_KINDS = (Kind.RESULT, Kind.ERROR, Kind.STREAM_ITEM)
_fence_lock = threading.Lock()


def fence() -> None:
    """A full memory barrier on x86-64: acquiring a lock is an atomic read-modify-write."""
    _fence_lock.acquire()
    _fence_lock.release()


def make(workers: int) -> Broadcast | None:
    """A file of ``workers`` slots, or None: the path is off here, or /dev/shm has no room (then everything
    goes over ZeroMQ)."""
    if not ENABLED:
        return None
    try:
        return Broadcast(workers)
    except OSError as exc:
        log.debug("no shared-memory slots: %s", exc)
        return None


def _words(mm: mmap.mmap) -> memoryview:
    """The file as 8-byte words: each read or write of one is a single aligned load or store."""
    return memoryview(mm).cast("Q")


class Broadcast:
    """The caller's side: the file, writing messages into the slots, taking answers out (see the module)."""

    def __init__(self, workers: int) -> None:
        token = secrets.token_bytes(16)
        path = f"/dev/shm/actorlib-{os.getpid()}-{secrets.token_hex(8)}"  # shm.sweep_orphans' pattern
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            # its memory now: a page first written through the mapping when /dev/shm is full would be a SIGBUS
            os.posix_fallocate(fd, 0, _HEADER + workers * _SLOT)
            mm = mmap.mmap(fd, _HEADER + workers * _SLOT)
            # held while the mapping is (its fd, a dup of this one, shares the lock): a worker sees us gone when
            # we close it or exit (Slot.caller_gone)
            fcntl.flock(fd, fcntl.LOCK_SH)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        mm[: len(_MAGIC) + 16] = _MAGIC + token
        self._init(path, token, mm, workers)

    def _init(self, path: str, token: bytes, mm: mmap.mmap, workers: int) -> None:
        self.token = token
        self.path = path
        self.pid = os.getpid()
        self.lock = threading.Lock()  # writing messages
        self._readers_lock = threading.Lock()  # taking answers, and the count of threads polling for them
        self._seq = [0] * workers
        self._endpoints: list[Any] = [None] * workers  # each worker's connection at attach time; None: not attached
        self.sent = 0  # messages that went through the slots
        self.replied = 0  # answers that came back through them
        self._replied = [0] * workers  # the last answer taken from each slot (its reply seq)
        self._readers = 0  # threads of ours polling the answers' slots (see ReplyWatch)
        self._sleepers = 0  # threads of ours asleep on the answers' bell
        self.answer_bell: socket.socket | None = None  # rung by a worker that wrote an answer while they sleep
        self._mm = mm
        self._w: memoryview | None = _words(mm)
        self._bells: list[str | None] = [None] * workers  # each worker's bell (see the module), if it has one

    async def offer(
        self, rt: Runtime, actors: Sequence[tuple[str, str, int]], timeout: float, graph: str | None = None, direct: bool = False
    ) -> bool:
        """Offer each actor ``(actor_id, class_name, slot index)`` its slot: for ``graph``'s events, for this
        process's ``direct`` calls to it (one actor), else for a worker group's calls. The file's name goes
        after. True if any took it; False (and then nothing to undo) if none did or something failed (an actor
        died meanwhile ...): their messages go by ZeroMQ."""
        if self.answer_bell is None:
            self.answer_bell = make_bell()
        bell = self.answer_bell.getsockname().decode() if self.answer_bell is not None else None
        try:
            attach = ("attach", self.path, self.token)
            refs, attached = await _ask(rt, [(aid, cls, (*attach, i, graph, direct, None, bell)) for aid, cls, i in actors], timeout)
        except Exception as exc:
            log.debug("going without shared-memory slots: %s", exc)
            return False
        finally:
            self.unlink()
        for (_, _, i), ref, yes in zip(actors, refs, attached, strict=True):
            source = getattr(ref, "_source", None)
            if yes and source is not None:
                self.attached(i, source[0][0], yes)
        return any(e is not None for e in self._endpoints)

    def attached(self, index: int, endpoint: Any, bell: Any = None) -> None:
        """Worker ``index`` has mapped its slot; its answers come on ``endpoint`` (the connection at that time).
        ``bell``: what its answer to the offer named (a bell's name, or True: none)."""
        self._endpoints[index] = endpoint
        self.set_bell(index, bell)

    def set_bell(self, index: int, name: Any) -> None:
        """Worker ``index`` may sleep with its slot taken: ``name``, its bell (see the module), wakes it. Anything
        but a bell's name is ignored (the worker then keeps its slot only while it is awake)."""
        if is_bell(name):
            with self.lock:
                self._bells[index] = name

    def is_attached(self, index: int) -> bool:
        return self._endpoints[index] is not None

    def unlink(self) -> None:
        """The file's name goes once every worker has it mapped (or could not): nothing is left if we crash."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        self.unlink()
        with self.lock, self._readers_lock:
            w, self._w = self._w, None
            self._endpoints = [None] * len(self._endpoints)
            self._bells = [None] * len(self._bells)
            answer_bell, self.answer_bell = self.answer_bell, None
            if w is not None:  # nobody of ours polls or sleeps here any more: workers answer over ZeroMQ
                w[_READING >> 3] = 0
                w[_SLEEPING >> 3] = 0
        fence()
        if answer_bell is not None:
            answer_bell.close()  # (a thread asleep on it is not woken by this: its calls end it)
        if w is not None:
            w.release()  # (a thread polling replies_ready() meanwhile sees a released view: see there)
            self._mm.close()  # (and with it our lock on the file: the workers may drop their slots)

    def try_send(self, conns: Sequence[ActorConnection], slots: Sequence[int], calls: Sequence[Call]) -> bool:
        """Write each call (already encoded, buffer-less) into its worker's slot; False (nothing written) if any
        worker or connection is not ready for it: then all go over ZeroMQ."""
        body = calls[0].frames[0] if calls[0].frames is not None else b""
        if len(body) > BODY_MAX or os.getpid() != self.pid or not self.lock.acquire(blocking=False):
            return False
        locked: list[ActorConnection] = []
        sleepy: list[ActorConnection] = []
        registered: list[tuple[ActorConnection, int]] = []
        try:
            w = self._w
            if w is None:
                return False
            for conn, i in zip(conns, slots, strict=True):
                endpoint = self._endpoints[i]
                if endpoint is None or not conn.lock_idle(endpoint):
                    return False
                locked.append(conn)
                if not self._ready_for(w, i):
                    return False
            for conn, i, call in zip(conns, slots, calls, strict=True):
                req_id = conn.register(call)
                registered.append((conn, req_id))
                if call.sink._source is not None:  # a thread blocked on it reads the sockets: and the answers' slots
                    call.sink._source = (*call.sink._source, (self, i, None))
                self._write(w, i, Kind.CALL, req_id, body)
                registered.pop()
            fence()
            sleepy = [c for c, i in zip(conns, slots, strict=True) if not self._rouse(w, i)]
            self.sent += 1
        finally:
            for conn, req_id in registered:  # (Ctrl-C) registered, never written: nobody would answer it
                conn.unregister(req_id)
            for conn in locked:
                conn.lock.release()
            self.lock.release()
        for conn in sleepy:  # asleep, with no bell to ring: it may not have seen its slot
            poke(conn.rt, conn.actor_id, conn.class_name)
        return True

    def try_post(self, index: int, body: bytes, wake: Callable[[], Any]) -> bool:
        """Write a compiled graph's one-way EVENT into slot ``index``, the actor's (it takes those in any order,
        by execution number); False (nothing written) if the actor is not ready for it. ``wake``: pokes it, if
        it fell asleep as this was written."""
        if len(body) > BODY_MAX or os.getpid() != self.pid:
            return False
        with self.lock:
            w = self._w
            if w is None or self._endpoints[index] is None or not self._ready_for(w, index):
                return False
            self._write(w, index, Kind.EVENT, 0, body)
            fence()
            sleepy = not self._rouse(w, index)
            self.sent += 1
        if sleepy:
            wake()
        return True

    async def link(self, rt: Runtime, edges: Sequence[tuple[tuple[str, str], tuple[str, str]]], timeout: float, graph: str) -> int:
        """Slot ``i`` for edge ``i`` of a compiled graph, ``((sender id, class), (receiver id, class))``: the
        receiver looks at it, the sender writes the outputs it hands on into it (``adopt``). The file's name
        goes after; this side writes nothing. How many edges took theirs."""
        taken = 0
        try:
            attach = ("attach", self.path, self.token)
            _, read = await _ask(rt, [(b, b_cls, (*attach, i, graph, False, a)) for i, ((a, _), (b, b_cls)) in enumerate(edges)], timeout)
            write = ("write", self.path, self.token)
            writers = [(a, a_cls, (*write, i, graph, b, read[i])) for i, ((a, a_cls), (b, _)) in enumerate(edges) if read[i]]
            taken = sum(bool(x) for x in (await _ask(rt, writers, timeout))[1])
        except Exception as exc:  # (a stage that took its slot and has no writer only looks at it in vain)
            log.debug("stages of graph %s go without shared-memory slots between them: %s", graph[:8], exc)
        finally:
            self.unlink()
        return taken

    @classmethod
    def adopt(cls, path: str, token: bytes, index: int) -> Broadcast | None:
        """Write into slot ``index`` of a file another process made (see :meth:`link`), or None if it is not
        on this machine."""
        mapped = _map(path, token, index)
        if mapped is None:
            return None
        mm, fd = mapped
        os.close(fd)  # (the mapping keeps a dup of it)
        self = cls.__new__(cls)
        self._init(path, token, mm, (len(mm) - _HEADER) // _SLOT)
        self._endpoints[index] = True  # (answers never come back this way)
        return self

    def _ready_for(self, w: memoryview, index: int) -> bool:
        """The worker has taken what was written last, and is awake, or asleep with a bell we can ring."""
        if w[(_HEADER + index * _SLOT + _TAKEN) >> 3] != self._seq[index]:
            return False
        return self._awake(w, index) or (self._bells[index] is not None and self._asleep_with_bell(w, index))

    def _rouse(self, w: memoryview, index: int) -> bool:
        """After writing worker ``index``'s slot (and a fence): True if it will look at it, awake or woken by its
        bell now; False if it must be poked (under ``lock``)."""
        if self._awake(w, index):
            return True
        name = self._bells[index]
        if name is None or not self._asleep_with_bell(w, index):
            return False
        rung = ring_bell(name)
        if rung is None:
            return False  # (our socket's buffer is full: a poke this time)
        if not rung:
            self._bells[index] = None  # gone, or out of reach (another network namespace): written while awake only
        return rung

    def _write(self, w: memoryview, index: int, kind: Kind, req_id: int, body: bytes) -> None:
        base = _HEADER + index * _SLOT
        self._mm[base + _BODY : base + _BODY + len(body)] = body
        k = base >> 3
        w[k + (_REQ >> 3)] = req_id
        w[k + (_LENGTH >> 3)] = len(body)
        w[k + (_KIND >> 3)] = int(kind)
        self._seq[index] += 1
        w[k] = self._seq[index]  # last: the worker reads the rest once it sees this (stores are ordered on x86-64)

    def reading(self, on: bool) -> None:
        """A thread of ours starts (or stops) polling the answers' slots; workers write answers there meanwhile."""
        with self._readers_lock:
            self._readers = max(0, self._readers + (1 if on else -1))
            if self._w is not None:
                self._w[_READING >> 3] = 1 if self._readers else 0

    def sleeping(self, on: bool) -> None:
        """A thread of ours goes to sleep on the answers' bell (or wakes for good): workers ring it meanwhile."""
        with self._readers_lock:
            self._sleepers = max(0, self._sleepers + (1 if on else -1))
            if self._w is not None:
                self._w[_SLEEPING >> 3] = 1 if self._sleepers else 0

    def replies_ready(self) -> bool:
        w = self._w
        if w is None:
            return False
        try:
            for i, last in enumerate(self._replied):
                seq = w[(_HEADER + i * _SLOT + _REPLY_SEQ) >> 3]
                if seq != last and not seq & 1:
                    return True
        except ValueError:  # closed meanwhile (the group shut down): its calls fail on their connections
            pass
        return False

    def take_replies(self) -> int:
        """Hand the answers written since the last look to their calls' sinks (as if read off their sockets);
        how many."""
        found = []
        with self._readers_lock:
            w = self._w
            if w is None:
                return 0
            for i, last in enumerate(self._replied):
                base = _HEADER + i * _SLOT
                k = base >> 3
                seq = w[k + (_REPLY_SEQ >> 3)]
                if seq == last or seq & 1:
                    continue  # nothing new, or being written: a later look takes it
                req_id, kind, n = w[k + (_REPLY_REQ >> 3)], w[k + (_REPLY_KIND >> 3)], w[k + (_REPLY_LENGTH >> 3)]
                body = self._mm[base + _REPLY_BODY : base + _REPLY_BODY + min(n, BODY_MAX)]
                if w[k + (_REPLY_SEQ >> 3)] != seq:
                    continue  # overwritten while read (an answer taken over ZeroMQ already, and the next call's)
                self._replied[i] = seq
                w[k + (_REPLY_TAKEN >> 3)] = seq  # the worker may write the next one
                if n <= BODY_MAX and kind in _ANSWER_KINDS and self._endpoints[i] is not None:
                    found.append((self._endpoints[i], Message(Kind(kind), req_id, body, [], None)))
        for n, (endpoint, msg) in enumerate(found):
            try:
                endpoint.deliver(msg)  # (its second copy, over ZeroMQ if the worker sent one too, finds no call)
            except BaseException:  # (Ctrl-C) the others are still handed over: nobody else has them
                for endpoint_, msg_ in found[n + 1 :]:
                    endpoint_.deliver(msg_)
                raise
            self.replied += 1
        return len(found)

    @staticmethod
    def _awake(w: memoryview, index: int) -> bool:
        return w[(_HEADER + index * _SLOT + _AWAKE) >> 3] == _AWAKE_YES

    @staticmethod
    def _asleep_with_bell(w: memoryview, index: int) -> bool:
        return w[(_HEADER + index * _SLOT + _AWAKE) >> 3] == _AWAKE_BELL


def _datagram_socket() -> socket.socket:
    return socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)


def make_bell() -> socket.socket | None:
    """A bell (see the module; a worker's, or a caller's answers' bell): a datagram socket bound to a random name
    in the abstract namespace, or None where there is none to be had (then its slots are written only while
    it is awake, or its answers go over ZeroMQ while it sleeps)."""
    try:
        sock = _datagram_socket()
    except OSError as exc:
        log.debug("no bell: %s", exc)
        return None
    try:
        sock.bind(BELL_PREFIX + secrets.token_hex(16))
    except OSError as exc:
        sock.close()
        log.debug("no bell: %s", exc)
        return None
    return sock


_ringer: socket.socket | None = None  # this process's one socket that rings bells (made with the first ring)
_ringer_lock = threading.Lock()


def _ringer_forked() -> None:
    global _ringer_lock
    _ringer_lock = threading.Lock()  # (another thread may have held it; the socket itself serves the child too)


os.register_at_fork(after_in_child=_ringer_forked)


def is_bell(name: Any) -> bool:
    """``name`` is a bell's (see :func:`make_bell`): where a caller or a worker may send one byte."""
    return isinstance(name, str) and name.startswith(BELL_PREFIX) and len(name) <= 100


def ring_bell(name: str) -> bool | None:
    """Send one byte to the bell ``name`` (a worker's, or a caller's answers' bell): True if sent; False if it is
    gone (its process exited) or out of reach (another network namespace), or this process can make no socket;
    None if it could not be sent now (``EAGAIN``: its queue, or ours, is full): the caller of this wakes it
    another way this time.

    Any process in the network namespace can send to a bell's name (``/proc/net/unix`` lists it): that only
    wakes its thread for nothing."""
    global _ringer
    sock = _ringer
    if sock is None:
        with _ringer_lock:
            if _ringer is None:
                try:
                    _ringer = _datagram_socket()
                except OSError as exc:
                    log.debug("no socket to ring bells with: %s", exc)
                    return False
            sock = _ringer
    try:
        sock.sendto(b"\0", name)
    except BlockingIOError:
        return None
    except OSError:
        return False
    return True


def drain_bell(sock: socket.socket) -> None:
    """Take every byte sent to this bell (the worker's sync thread, woken by it)."""
    try:
        while True:
            sock.recv(64)
    except (BlockingIOError, InterruptedError):
        pass


class Slot:
    """A worker's side: its slot of the caller's file, read by its sync thread (and by the loop, for a cancel)."""

    def __init__(
        self,
        mapped: tuple[mmap.mmap, int],
        index: int,
        peer: bytes | None,
        graph: str | None = None,
        direct: bool = False,
        source: str | None = None,
    ) -> None:
        self._mm, self._fd = mapped
        weakref.finalize(self, os.close, self._fd)  # (the slot goes with its last reference: the loop may read it)
        self._w = _words(self._mm)
        self._base = _HEADER + index * _SLOT
        self._k = self._base >> 3
        self.peer = peer  # the caller's routing id on the actor's socket: where the answers go
        self.graph = graph  # a compiled graph's (its executions' EVENTs come here), or None: calls
        self.direct = direct  # the caller's own calls to this actor (else a worker group's)
        self.source = source  # the graph's stage that writes its outputs here (None: the caller, its executions)
        # which slot a new one replaces: a graph's, the caller's own, or the one worker group's this is in
        self.owner: tuple[Any, ...] = ("graph", graph, source) if graph is not None else ("direct", peer) if direct else ("group",)
        self._last = 0
        self._reply_seq = 0
        self._gone = False  # the caller is known to be gone (see caller_gone)
        self._skip = self._backoff = 0  # answers not to wait for the caller on, after misses (see _caller_polls)
        self._lock = threading.Lock()
        self.ring_caller: Callable[[], bool | None] | None = None  # rings the caller's answers' bell (see ring_bell)

    def ready(self) -> bool:
        return self._w[self._k] != self._last

    def take(self, req_id: int | None = None) -> Message | None:
        """The message written since the last take (a CALL, or a graph's EVENT), or None. With ``req_id``: only
        that call (the loop, cancelling it), else None and it stays."""
        w, k = self._w, self._k
        if w[k] == self._last:
            return None
        with self._lock:
            seq = w[k]
            if seq == self._last or (req_id is not None and w[k + (_REQ >> 3)] != req_id):
                return None
            self._last = seq
            req, n, kind = w[k + (_REQ >> 3)], w[k + (_LENGTH >> 3)], w[k + (_KIND >> 3)]
            body = self._mm[self._base + _BODY : self._base + _BODY + n] if n <= BODY_MAX else b""
            w[k + (_TAKEN >> 3)] = seq  # the caller may write the next one
        if n > BODY_MAX or kind not in _SLOT_KINDS:  # (our caller never writes such): answered as undecodable
            log.warning("a malformed message in a shared-memory slot (kind %d, %d bytes)", kind, n)
            kind, body = Kind.CALL, b""
        return Message(Kind(kind), req, body, [], self.peer)

    def answer(self, kind: Kind, req_id: int, body: bytes) -> bool:
        """Write an answer (a call's, or a graph's output as a stream item) into the slot if the caller polls
        for it, or sleeps on its answers' bell (then rung), and has taken the last one. False: send it over
        ZeroMQ (as well): the caller does neither (any more), or its bell could not be rung."""
        w, k = self._w, self._k
        if len(body) > BODY_MAX or w[k + (_REPLY_TAKEN >> 3)] != self._reply_seq or not self._caller_polls():
            return False
        with self._lock:  # (a graph's outputs may be answered from the loop too)
            if w[k + (_REPLY_TAKEN >> 3)] != self._reply_seq:
                return False  # another thread's answer got there first, not taken yet
            seq = self._reply_seq + 1
            w[k + (_REPLY_SEQ >> 3)] = seq  # odd while written: a reader skips it
            w[k + (_REPLY_REQ >> 3)] = req_id
            w[k + (_REPLY_KIND >> 3)] = int(kind)
            w[k + (_REPLY_LENGTH >> 3)] = len(body)
            self._mm[self._base + _REPLY_BODY : self._base + _REPLY_BODY + len(body)] = body
            self._reply_seq = seq + 1
            w[k + (_REPLY_SEQ >> 3)] = seq + 1
        fence()
        if w[_READING >> 3]:
            return True
        # it stopped polling meanwhile, and may not have looked: asleep on its bell, or gone to ZeroMQ
        ring = self.ring_caller
        if not w[_SLEEPING >> 3] or ring is None:
            return False
        rung = ring()
        if rung is False:
            self.ring_caller = None  # gone, or out of reach: its answers go over ZeroMQ when it does not poll
        return bool(rung)  # (None: not sent this time; over ZeroMQ as well)

    def _caller_polls(self) -> bool:
        """Whether the caller polls the slots for answers, or sleeps on a bell we can ring; if not yet, wait a
        little for it (it is usually still writing the other workers' slots), unless it lately did not come
        within that wait (an asyncio caller)."""
        w = self._w
        if w[_READING >> 3] or (w[_SLEEPING >> 3] and self.ring_caller is not None):
            return True
        if self._skip:
            self._skip -= 1
            return False
        until = time.monotonic() + _WAIT_FOR_CALLER_S
        while time.monotonic() < until:
            os.sched_yield()
            if w[_READING >> 3] or (w[_SLEEPING >> 3] and self.ring_caller is not None):
                self._backoff = 0
                return True
        self._backoff = self._skip = min(max(1, 2 * self._backoff), _SKIP_MAX)  # misses in a row: wait ever less often
        return False

    def awake(self, on: bool) -> None:
        """Awake (the sync thread looks at the slot before it sleeps), or the slot is dropped: written no more."""
        self._w[self._k + (_AWAKE >> 3)] = _AWAKE_YES if on else 0

    def sleep(self, bell: bool) -> None:
        """The sync thread is about to sleep: the caller may still write the slot, and ring the ``bell``."""
        self._w[self._k + (_AWAKE >> 3)] = _AWAKE_BELL if bell else 0

    def caller_gone(self) -> bool:
        """The caller closed the file, or exited: it holds a shared lock on it until then (see Broadcast).
        (Tried on our own open of the file, whose exclusive lock only the caller's shared one can stop.)"""
        if self._gone:
            return True
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._gone = True
        return True


class Slots:
    """The slots a worker's sync thread looks at (a group's, compiled graphs'), as one."""

    def __init__(self) -> None:
        self.all: list[Slot] = []
        self.waits = Recent(slots=True)  # how long the sync thread's waits for them took (see actorlib.spin)
        self.bell = False  # the sync thread sleeps with a bell: callers may write the slots meanwhile

    def ready(self) -> bool:
        return any(slot.ready() for slot in self.all)

    def awake(self) -> None:
        for slot in self.all:
            slot.awake(True)

    def asleep_unless_ready(self) -> bool:
        """About to sleep: say so, then look once more. True: asleep; False: something came, awake again."""
        for slot in self.all:
            slot.sleep(self.bell)
        fence()
        if self.ready():
            self.awake()
            return False
        return True


class ReplyWatch:
    """A blocked ``get()`` polling the answers' slots of the groups its calls went through, or asleep on their
    answers' bells (see ``object_ref.wait_reading``): workers write the answers there, not on the socket,
    meanwhile.

    Made with no share of the groups' ``reading`` or ``sleeping`` flags; :meth:`start` and :meth:`sleep` take
    them and :meth:`stop` gives them back, one at a time, so a Ctrl-C anywhere in between leaves none behind
    once ``stop()`` has run."""

    def __init__(self, groups: set[Broadcast]) -> None:
        self.groups = list(groups)
        self._counted: list[Broadcast] = []  # whose ``reading`` this one holds a share of
        self._asleep: list[Broadcast] = []  # whose ``sleeping`` (see sleep)
        self._look_again = False  # shares given back: what was written meanwhile is still to be taken
        self.taken = 0  # answers taken out of the slots while (or right after) polling
        self.rung = 0  # and while asleep on their bells

    @property
    def on(self) -> bool:
        return bool(self._counted)

    def start(self) -> None:
        for group in self.groups:
            self._counted.append(group)  # first: stop() gives back a share at most once (reading() clamps at 0)
            group.reading(True)

    def ready(self) -> bool:
        return any(group.replies_ready() for group in self.groups)

    def take(self) -> None:
        self._take(bool(self._asleep))

    def _take(self, asleep: bool) -> None:
        n = sum(group.take_replies() for group in self.groups)
        if asleep:
            self.rung += n
        else:
            self.taken += n

    def sleep(self) -> list[socket.socket]:
        """About to sleep, polling no more (after :meth:`stop`): the answers' bells of the groups that have one,
        to sleep on. Workers write answers into the slots and ring them meanwhile; what one wrote before it saw
        this is taken here. :meth:`stop` ends it."""
        bells = []
        for group in self.groups:
            bell = group.answer_bell
            if bell is not None:
                self._asleep.append(group)  # first, as in start()
                group.sleeping(True)
                bells.append(bell)
        if bells:
            fence()
            self.take()
        return bells

    def stop(self) -> None:
        """Done, or about to sleep (then :meth:`sleep` follows): workers send on the sockets from now on, unless
        it does. What one wrote before it saw this is taken here (for whichever thread's call it answers): the
        same fenced pair as for the calls."""
        asleep = bool(self._asleep)
        if self._counted or self._asleep:
            self._look_again = True
        while self._counted:
            self._counted[-1].reading(False)
            self._counted.pop()
        while self._asleep:
            self._asleep[-1].sleeping(False)
            self._asleep.pop()
        if self._look_again:
            fence()
            self._take(asleep)
            self._look_again = False


async def _ask(rt: Runtime, requests: Sequence[tuple[str, str, tuple[Any, ...]]], timeout: float) -> tuple[list[Any], list[Any]]:
    """Send each actor ``(actor_id, class_name, args)`` of ``requests`` a reserved call; their refs and
    answers (all of them within ``timeout``)."""
    refs = [rt.submit(aid, cls, CONTROL, args, {}) for aid, cls, args in requests]
    return refs, list(await asyncio.wait_for(asyncio.gather(*(_answer(ref) for ref in refs)), timeout))


async def _answer(ref: Any) -> Any:
    return await ref


def poke(rt: Runtime, actor_id: str, class_name: str) -> None:
    """Wake the actor's sync thread, which then looks at its slots (a reserved call, answered and dropped)."""
    rt.submit(actor_id, class_name, CONTROL, ("poke",), {})


def reserved_method(host: ActorHost, name: str) -> tuple[Any, int] | None:
    if name != CONTROL:
        return None
    from .worker import ASYNC

    async def control(key: tuple[bytes | None, int], op: str, *args: Any) -> Any:
        if op == "poke":
            host.wake_sync()
            return None
        if op == "attach":
            path, token, index, graph, direct, source, *bell = args  # (bell: the caller's answers' bell)
            if graph is not None and not isinstance(graph, str) or source is not None and not isinstance(source, str):
                raise TypeError(f"a graph's id and an actor's are str, not {type(graph).__name__}, {type(source).__name__}")
            return host.attach_slot(_map(path, token, index), index, key[0], graph, bool(direct), source, *bell[:1])
        if op == "write":
            path, token, index, graph, peer, *bell = args  # (bell: the receiver's answer to its offer)
            from . import dag_worker

            runtime = dag_worker.graph_runtime(graph) if isinstance(graph, str) else None
            writer = Broadcast.adopt(path, token, index) if runtime is not None and peer in runtime.peers else None
            if runtime is None or writer is None:
                return False
            if bell:
                writer.set_bell(index, bell[0])
            runtime.link_slots[peer] = (writer, index)
            return True
        raise ValueError(f"unknown broadcast operation {op!r}")

    return control, ASYNC


def _map(path: str, token: bytes, index: int) -> tuple[mmap.mmap, int] | None:
    """The caller's file, mapped, and an fd of it (see Slot.caller_gone), if it is on this machine and is the
    one meant (its token)."""
    if not ENABLED or not isinstance(path, str) or not path.startswith("/dev/shm/actorlib-") or "/" in path[9:]:
        return None
    if isinstance(index, bool) or not isinstance(index, int) or index < 0 or not isinstance(token, bytes):
        return None
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None  # another machine's
    try:
        size = os.fstat(fd).st_size
        mm = mmap.mmap(fd, size) if size >= _HEADER + (index + 1) * _SLOT else None
    except OSError:
        mm = None
    if mm is not None and mm[: len(_MAGIC) + 16] == _MAGIC + token:
        return mm, fd
    if mm is not None:
        mm.close()
    os.close(fd)
    return None
