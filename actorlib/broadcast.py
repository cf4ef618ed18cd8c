"""A worker group's calls through shared memory, to the workers on the caller's machine that are awake.

``WorkerGroup.run_all_workers_single_data`` (and the other dispatches of one
call to several workers) sends one message per worker over ZeroMQ. Each
costs the caller a send (Python, a system call, a wake-up of ZeroMQ's I/O
thread) and the worker two wake-ups (its I/O thread, then the thread that
runs the call). For a group that is called back to back, the workers'
threads are usually awake already, polling between calls (see
:mod:`actorlib.spin`): for those, the caller writes the call into a slot
of a shared-memory file instead, which the worker's sync thread looks at
between its polls. Answers come back over ZeroMQ as usual, and everything
else (cancelling, a worker's death, a restart) goes as for any call.

The file (``/dev/shm/actorlib-<pid>-<random>``, mode 0600, unlinked as soon
as every worker has mapped it) holds a header (magic and a random token,
which a worker checks: a worker on another machine finds no such file and
the group goes without) and one slot per worker::

    slot + 0    seq      u64   written by the caller: bumped once the call below is in place
    slot + 8    req_id   u64   the call's request id on the caller's connection to this worker
    slot + 16   length   u64   of the encoded call (``[method, args, kwargs, options]``)
    slot + 64   awake    u64   written by the worker: 1 while it will look at the slot before it sleeps
    slot + 128  the encoded call (at most :data:`BODY_MAX` bytes)

The worker's side, a small state machine per slot:

- AWAKE (``awake`` = 1): the sync thread runs calls or polls; it looks at the
  slot before each call it takes from elsewhere and between polls.
- going to sleep: it writes ``awake`` = 0, fences, and looks at the slot once
  more (a call written meanwhile is taken: back to AWAKE); else it sleeps on
  its sockets and eventfd.
- woken by anything: ``awake`` = 1 again.

The caller's side, per call of the group, under the group's lock and each
target connection's lock: it writes a worker's slot only if that
connection has nothing of this process on its way to the actor (sent and
unanswered, queued, handed to the loop), so the call cannot overtake an
earlier one, and only if every target is AWAKE; else the whole call goes
over ZeroMQ. After writing, it fences and reads ``awake`` again: a worker
that fell asleep meanwhile (and may have missed the slot) is poked, with a
reserved call that wakes its sync thread. The two fences make the pair of
"write, then read the other's flag" safe (Dekker's pattern): at least one of
the two sees the other's write. The fence is an atomic instruction (a lock's
acquire), which orders stores before later loads on x86-64; the path is off
on other machines, whose weaker ordering would need more than that.

Since a worker's previous slot call was answered before the next is written
(the connection's rule above), a slot never holds a call its worker has not
read yet when it is written again.

``ACTORLIB_BROADCAST=0`` turns the path off.
"""

from __future__ import annotations

import logging
import mmap
import os
import platform
import secrets
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from transport import Kind, Message

from .spin import SPIN_S, Recent

if TYPE_CHECKING:
    from .connection import ActorConnection, Call
    from .worker import ActorHost

__all__ = ["BODY_MAX", "CONTROL", "ENABLED", "Broadcast", "Slot", "reserved_method"]

log = logging.getLogger(__name__)

CONTROL = "__actorlib_broadcast__"
ENABLED = (
    os.environ.get("ACTORLIB_BROADCAST", "1") not in ("0", "off", "false")
    and platform.machine().lower() in ("x86_64", "amd64")
    and SPIN_S > 0  # with one CPU nobody polls: every call would go over ZeroMQ anyway
    and os.path.isdir("/dev/shm")
)
BODY_MAX = 64 << 10
_MAGIC = b"actorlib-broadcast-1\0\0\0\0"  # 24 bytes, then the 16-byte token
_READING = 48  # in the header
_HEADER = 64
_SEQ, _REQ, _REPLY_TAKEN, _AWAKE, _TAKEN, _REPLY_SEQ, _REPLY, _BODY = 0, 8, 32, 64, 72, 128, 136, 192
_REPLY_BODY = _BODY + BODY_MAX
_SLOT = _REPLY_BODY + BODY_MAX
_WAIT_FOR_CALLER_S = 100e-6
_SKIP_MAX = 1024
_u64 = struct.Struct("<Q")
_u64x3 = struct.Struct("<QQQ")
_SLOT_KINDS = (Kind.CALL, Kind.EVENT)
_ANSWER_KINDS = (Kind.RESULT, Kind.ERROR, Kind.STREAM_ITEM)

_fence_lock = threading.Lock()


def fence() -> None:
    """A full memory barrier on x86-64: acquiring a lock is an atomic read-modify-write."""
    _fence_lock.acquire()
    _fence_lock.release()


class Broadcast:
    """The caller's side: the file, and writing calls into the slots (see the module)."""

    def __init__(self, workers: int) -> None:
        self.token = secrets.token_bytes(16)
        self.path = f"/dev/shm/actorlib-{os.getpid()}-{secrets.token_hex(8)}"  # shm.sweep_orphans' pattern
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self._seq = [0] * workers
        self._endpoints: list[Any] = [None] * workers  # each worker's connection at attach time; None: not attached
        self.sent = 0  # calls that went through the slots
        self.replied = 0  # answers that came back through them
        self._replied = [0] * workers  # the last answer taken from each slot (its reply seq)
        self._readers = 0  # threads of ours polling the answers' slots (see ReplyWatch)
        self._readers_lock = threading.Lock()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, _HEADER + workers * _SLOT)
            self._mm: mmap.mmap | None = mmap.mmap(fd, _HEADER + workers * _SLOT)
        except BaseException:
            os.unlink(self.path)
            raise
        finally:
            os.close(fd)
        self._mm[: len(_MAGIC) + 16] = _MAGIC + self.token

    def attached(self, index: int, endpoint: Any) -> None:
        """Worker ``index`` has mapped its slot; its answers come on ``endpoint`` (the connection at that time)."""
        self._endpoints[index] = endpoint

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
        with self.lock:
            mm, self._mm = self._mm, None
            self._endpoints = [None] * len(self._endpoints)
        if mm is not None:
            mm.close()

    def try_send(self, conns: Sequence[ActorConnection], slots: Sequence[int], calls: Sequence[Call]) -> bool:
        """Write each call (already encoded, buffer-less) into its worker's slot; False (nothing written) if any
        worker or connection is not ready for it: then all go over ZeroMQ."""
        body = calls[0].frames[0] if calls[0].frames is not None else b""
        if len(body) > BODY_MAX or os.getpid() != self.pid or not self.lock.acquire(blocking=False):
            return False
        locked: list[ActorConnection] = []
        sleepy: list[ActorConnection] = []
        try:
            mm = self._mm
            if mm is None:
                return False
            for conn, i in zip(conns, slots, strict=True):
                endpoint = self._endpoints[i]
                if endpoint is None or not conn.lock_idle(endpoint):
                    return False
                locked.append(conn)
                if not self._ready_for(mm, i):
                    return False
            for conn, i, call in zip(conns, slots, calls, strict=True):
                req_id = conn.register(call)
                if call.sink._source is not None:  # a thread blocked on it reads the sockets: and the answers' slots
                    call.sink._source = (*call.sink._source, (self, i, None))
                self._write(mm, i, Kind.CALL, req_id, body)
            fence()
            sleepy = [c for c, i in zip(conns, slots, strict=True) if not self._awake(mm, i)]
            self.sent += 1
        finally:
            for conn in locked:
                conn.lock.release()
            self.lock.release()
        for conn in sleepy:  # it fell asleep after we looked, and may not have seen its slot: wake it
            conn.rt.submit(conn.actor_id, conn.class_name, CONTROL, ("poke",), {})
        return True

    def try_post(self, index: int, body: bytes, poke: Callable[[], Any]) -> bool:
        """Write a compiled graph's one-way EVENT into slot ``index`` (its actor takes those in any order, by
        execution number); False (nothing written) if the actor is not ready for it. ``poke()`` wakes it."""
        if len(body) > BODY_MAX or os.getpid() != self.pid:
            return False
        with self.lock:
            mm = self._mm
            if mm is None or self._endpoints[index] is None or not self._ready_for(mm, index):
                return False
            self._write(mm, index, Kind.EVENT, 0, body)
            fence()
            sleepy = not self._awake(mm, index)
            self.sent += 1
        if sleepy:
            poke()
        return True

    def _ready_for(self, mm: mmap.mmap, index: int) -> bool:
        """The worker is awake and has taken what was written last."""
        base = _HEADER + index * _SLOT
        return self._awake(mm, index) and _u64.unpack_from(mm, base + _TAKEN)[0] == self._seq[index]

    def _write(self, mm: mmap.mmap, index: int, kind: Kind, req_id: int, body: bytes) -> None:
        base = _HEADER + index * _SLOT
        mm[base + _BODY : base + _BODY + len(body)] = body
        _u64x3.pack_into(mm, base + _REQ, req_id, len(body), int(kind))
        self._seq[index] += 1
        _u64.pack_into(mm, base + _SEQ, self._seq[index])  # last: the worker reads the rest once it sees this

    def reading(self, on: bool) -> None:
        """A thread of ours starts (or stops) polling the answers' slots; workers write answers there meanwhile."""
        with self._readers_lock:
            self._readers += 1 if on else -1
            if self._mm is not None:
                _u64.pack_into(self._mm, _READING, 1 if self._readers else 0)

    def replies_ready(self) -> bool:
        mm = self._mm
        if mm is None:
            return False
        for i, last in enumerate(self._replied):
            seq = _u64.unpack_from(mm, _HEADER + i * _SLOT + _REPLY_SEQ)[0]
            if seq != last and not seq & 1:
                return True
        return False

    def take_replies(self) -> None:
        """Hand the answers written since the last look to their calls' sinks (as if read off their sockets)."""
        found = []
        with self._readers_lock:
            mm = self._mm
            if mm is None:
                return
            for i, last in enumerate(self._replied):
                base = _HEADER + i * _SLOT
                seq = _u64.unpack_from(mm, base + _REPLY_SEQ)[0]
                if seq == last or seq & 1:
                    continue  # nothing new, or being written: a later look takes it
                req_id, kind, n = _u64x3.unpack_from(mm, base + _REPLY)
                body = mm[base + _REPLY_BODY : base + _REPLY_BODY + min(n, BODY_MAX)]
                if _u64.unpack_from(mm, base + _REPLY_SEQ)[0] != seq:
                    continue  # overwritten while read (an answer taken over ZeroMQ already, and the next call's)
                self._replied[i] = seq
                _u64.pack_into(mm, base + _REPLY_TAKEN, seq)  # the worker may write the next one
                if n <= BODY_MAX and kind in _ANSWER_KINDS and self._endpoints[i] is not None:
                    found.append((self._endpoints[i], Message(Kind(kind), req_id, body, [], None)))
        for endpoint, msg in found:
            self.replied += 1
            endpoint.deliver(msg)  # (its second copy, over ZeroMQ if the worker sent one too, finds no call)

    @staticmethod
    def _awake(mm: mmap.mmap, index: int) -> bool:
        return bool(_u64.unpack_from(mm, _HEADER + index * _SLOT + _AWAKE)[0])


class Slot:
    """A worker's side: its slot of the caller's file, read by its sync thread (and by the loop, for a cancel)."""

    def __init__(self, mm: mmap.mmap, index: int, peer: bytes | None, graph: str | None = None) -> None:
        self._mm = mm
        self._base = _HEADER + index * _SLOT
        self.peer = peer  # the caller's routing id on the actor's socket: where the answers go
        self.graph = graph  # a compiled graph's (its executions' EVENTs come here), or None: a worker group's calls
        self._last = 0
        self._reply_seq = 0
        self._skip = self._backoff = 0  # answers not to wait for the caller on, after misses (see _caller_polls)
        self._lock = threading.Lock()
        self.waits = Recent()  # how long the sync thread's waits for the slot took (see actorlib.spin)

    def ready(self) -> bool:
        return _u64.unpack_from(self._mm, self._base)[0] != self._last

    def take(self) -> Message | None:
        """The message written since the last take (a CALL, or a graph's EVENT), or None."""
        base = self._base
        if _u64.unpack_from(self._mm, base)[0] == self._last:
            return None
        with self._lock:
            seq = _u64.unpack_from(self._mm, base)[0]
            if seq == self._last:
                return None
            self._last = seq
            req_id, n, kind = _u64x3.unpack_from(self._mm, base + _REQ)
            body = self._mm[base + _BODY : base + _BODY + n] if n <= BODY_MAX else b""
            _u64.pack_into(self._mm, base + _TAKEN, seq)  # the caller may write the next one
        if n > BODY_MAX or kind not in _SLOT_KINDS:
            log.warning("dropped a malformed message in a shared-memory slot (kind %d, %d bytes)", kind, n)
            return None
        return Message(Kind(kind), req_id, body, [], self.peer)

    def answer(self, kind: Kind, req_id: int, body: bytes) -> bool:
        """Write an answer (a call's, or a graph's output as a stream item) into the slot if the caller polls
        for it and has taken the last one. False: send it over ZeroMQ (as well)."""
        mm, base = self._mm, self._base
        if len(body) > BODY_MAX or _u64.unpack_from(mm, base + _REPLY_TAKEN)[0] != self._reply_seq:
            return False
        if not self._caller_polls():
            return False
        with self._lock:  # (a graph's outputs may be answered from the loop too)
            seq = self._reply_seq + 1  # odd while written: a reader skips it
            _u64.pack_into(mm, base + _REPLY_SEQ, seq)
            _u64x3.pack_into(mm, base + _REPLY, req_id, int(kind), len(body))
            mm[base + _REPLY_BODY : base + _REPLY_BODY + len(body)] = body
            self._reply_seq = seq + 1
            _u64.pack_into(mm, base + _REPLY_SEQ, seq + 1)
        fence()
        return bool(_u64.unpack_from(mm, _READING)[0])  # it stopped meanwhile, and may not have looked

    def _caller_polls(self) -> bool:
        """Whether the caller polls the slots for answers; if not yet, wait a little for it (it is usually still
        writing the other workers' slots), unless it lately did not come within that wait (an asyncio caller)."""
        mm = self._mm
        if _u64.unpack_from(mm, _READING)[0]:
            return True
        if self._skip:
            self._skip -= 1
            return False
        until = time.monotonic() + _WAIT_FOR_CALLER_S
        while time.monotonic() < until:
            os.sched_yield()
            if _u64.unpack_from(mm, _READING)[0]:
                self._backoff = 0
                return True
        self._backoff = self._skip = min(max(1, 2 * self._backoff), _SKIP_MAX)  # misses in a row: wait ever less often
        return False

    def awake(self, on: bool) -> None:
        _u64.pack_into(self._mm, self._base + _AWAKE, 1 if on else 0)


class Slots:
    """The slots a worker's sync thread looks at (a group's, compiled graphs'), as one."""

    def __init__(self) -> None:
        self.all: list[Slot] = []
        self.waits = Recent()  # how long the sync thread's waits for them took (see actorlib.spin)

    def ready(self) -> bool:
        return any(slot.ready() for slot in self.all)

    def awake(self) -> None:
        for slot in self.all:
            slot.awake(True)

    def asleep_unless_ready(self) -> bool:
        """About to sleep: say so, then look once more. True: asleep; False: something came, awake again."""
        for slot in self.all:
            slot.awake(False)
        fence()
        if self.ready():
            self.awake()
            return False
        return True


class ReplyWatch:
    """A blocked ``get()`` polling the answers' slots of the groups its calls went through (see
    ``object_ref.wait_reading``): workers write the answers there, not on the socket, while it does."""

    def __init__(self, groups: set[Broadcast]) -> None:
        self.groups = list(groups)
        self.on = True
        for group in self.groups:
            group.reading(True)

    def ready(self) -> bool:
        return any(group.replies_ready() for group in self.groups)

    def take(self) -> None:
        for group in self.groups:
            group.take_replies()

    def stop(self) -> None:
        """Done, or about to sleep on the sockets: workers send there from now on. What one wrote before it saw
        this is taken here (for whichever thread's call it answers): the same fenced pair as for the calls."""
        if self.on:
            self.on = False
            for group in self.groups:
                group.reading(False)
            fence()
            self.take()


def reserved_method(host: ActorHost, name: str) -> tuple[Any, int] | None:
    if name != CONTROL:
        return None
    from .worker import ASYNC

    async def control(key: tuple[bytes | None, int], op: str, *args: Any) -> Any:
        if op == "poke":
            host.wake_sync()
            return None
        if op == "attach":
            path, token, index = args[:3]
            graph = args[3] if len(args) > 3 else None
            return host.attach_slot(_map(path, token, index), index, key[0], graph)
        raise ValueError(f"unknown broadcast operation {op!r}")

    return control, ASYNC


def _map(path: str, token: bytes, index: int) -> mmap.mmap | None:
    """The caller's file, if it is on this machine and is the one meant (its token)."""
    if not ENABLED or not isinstance(path, str) or not path.startswith("/dev/shm/actorlib-") or "/" in path[9:]:
        return None
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None  # another machine's
    try:
        size = os.fstat(fd).st_size
        if size < _HEADER + (index + 1) * _SLOT:
            return None
        mm = mmap.mmap(fd, size)
    except OSError:
        return None
    finally:
        os.close(fd)
    if mm[: len(_MAGIC) + 16] != _MAGIC + token:
        mm.close()
        return None
    return mm
