"""Large buffers between processes of one machine go through shared memory, not the socket.

A message's buffer frame of at least ``ACTORLIB_SHM_MIN_BYTES`` (1 MiB) sent
on a same-machine endpoint (``ipc://``, or TCP on a loopback address) is
written to a file in ``/dev/shm`` (mode 0600, named
``actorlib-<sender pid>-<random>``); the frame travels empty and the header
lists ``(frame index, file name, size, kept)``. The receiver maps the file
copy-on-write (so the array it gets is writable and costs no copy) and,
unless its sender keeps it (below), unlinks it at once: the memory lives as
long as the array does. One copy in all, instead of the socket's several,
and no encryption of bulk bytes.

Unmapping such a buffer frees the file's pages, which takes time (~14 ms for
64 MiB on the 2-vCPU VM, against ~0.3 ms for 64 MiB of a process's own
memory). So a received mapping is not unmapped by whichever thread drops
the last array on it, in the middle of the user's code: :class:`_Reaper`
unmaps it on a thread of its own once nothing uses it any more.

A size sent again soon is likely sent again and again (an actor's weights,
a batch of activations, W5's array): writing into a new file costs the
allocation of its pages, more than the copy (45 against 17 ms for 64 MiB
there), and unmapping it frees them again. So from the second time a size
is sent, its file is *kept* by the sender (:class:`_Pool`, at most
``ACTORLIB_SHM_POOL_BYTES``, 256 MiB, per process, and only while
``/dev/shm`` keeps a quarter free, and as much as the file's size) and
written again once its receiver is done with it. No message says so; the file itself does::

    WRITING --sent--> IN FLIGHT --claimed--> HELD --unmapped--> FREE --taken--> WRITING
      (sender: LOCK_EX, 0600)  (0600)   (receiver: LOCK_SH, 0400)  (0400)
    IN FLIGHT --not sent, or refused--> FREE
    IN FLIGHT --claimed by a receiver holding HOLD_MAX others--> GIVEN UP (0440)
    GIVEN UP --seen by its sender--> unlinked
    FREE or HELD --evicted for room, or not taken for IDLE_S: unlinked--> gone with its last mapping
    IN FLIGHT for STALE_S --evicted for room, or idle: forgotten, not unlinked--> removed by sweep() at exit

The receiver of a kept file takes a shared ``flock`` on it before marking
it claimed (mode 0400), keeps that descriptor while it maps the file, and
does not unlink it; the sender takes the file again only once it is marked
claimed *and* an exclusive ``flock`` succeeds: its receiver has unmapped it
(or died), or a message naming it was not sent or was refused (whoever
gives it up marks it 0400 unlocked). A receiver that already holds
``HOLD_MAX`` such descriptors (an eighth of its limit on open files,
between 16 and 256; each mapping costs one more) marks the file given up
instead, never to be written again. A file the header names as kept is
the sender's to remove. A sender's kept files stay while it sends their
sizes (a thread of the pool's drops those not taken for ``IDLE_S``, 30 s,
and ends when none is kept), and a forked child does not inherit them.

A file never claimed (its receiver died first) is removed by :func:`sweep`
once its sender has exited: the node agent sweeps its workers, a driver its
own; and by :func:`sweep_orphans`, when a session starts, if its sender died
before it could. Anything that fails on the way (no ``/dev/shm``, no space) falls back
to the socket. ``ACTORLIB_SHM=0`` turns the path off.
"""

from __future__ import annotations

import fcntl
import glob
import mmap
import os
import re
import resource
import secrets
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import msgpack

__all__ = ["ENABLED", "MIN_BYTES", "claim", "export", "local_address", "release_kept", "sweep", "sweep_orphans"]

SHM_DIR = "/dev/shm"
ENABLED = os.environ.get("ACTORLIB_SHM", "1") not in ("0", "off", "false") and os.path.isdir(SHM_DIR)
MIN_BYTES = int(os.environ.get("ACTORLIB_SHM_MIN_BYTES", str(1 << 20)))
POOL_BYTES = int(os.environ.get("ACTORLIB_SHM_POOL_BYTES", str(256 << 20)))
_NAME = re.compile(r"actorlib-[0-9]+-[0-9a-f]{16}")


def local_address(address: str) -> bool:
    """Whether every peer of an endpoint at ``address`` is on this machine."""
    return address.startswith("ipc://") or address.startswith("tcp://127.") or address.startswith("tcp://localhost:")


def export(buffers: Sequence[Any]) -> tuple[list[Any], list[tuple[int, str, int, bool]]]:
    """Move the large buffers into shared-memory files: ``(frames to send, [(index, name, size, kept), ...])``.

    A buffer that cannot go (no room in ``/dev/shm`` ...) stays in the frames, for the socket."""
    out = list(buffers)
    moved: list[tuple[int, str, int, bool]] = []
    try:
        for i, buf in enumerate(buffers):
            view = memoryview(buf)
            if view.nbytes < MIN_BYTES:
                continue
            view = view.cast("B") if view.ndim != 1 or view.format != "B" else view
            name = _write_kept(view) or _write_new(view)
            if name is not None:
                out[i] = b""
                moved.append((i, name[0], view.nbytes, name[1]))
    except BaseException:  # (Ctrl-C) nobody will claim them
        discard(moved)
        raise
    return out, moved


def _write_kept(view: memoryview) -> tuple[str, bool] | None:
    name = ""
    try:
        kept = _pool.take(view.nbytes)
        if kept is None:
            return None
        name, fd = kept
        _write_all(fd, view)
        _pool.written(name)
    except BaseException as exc:  # (an interrupt, too: not to stay locked and "being written" for good)
        if name:
            _pool.evict(name)
        if isinstance(exc, OSError):  # e.g. /dev/shm is full
            return None
        raise
    return name, True


def _write_new(view: memoryview) -> tuple[str, bool] | None:
    name = f"actorlib-{os.getpid()}-{secrets.token_hex(8)}"
    path = os.path.join(SHM_DIR, name)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return None
    try:
        _write_all(fd, view)
    except BaseException as exc:
        _unlink(path)
        if isinstance(exc, OSError):  # e.g. /dev/shm is full: this one goes over the socket
            return None
        raise
    finally:
        os.close(fd)
    return name, False


def _write_all(fd: int, view: memoryview) -> None:
    done = 0
    while done < view.nbytes:
        done += os.pwrite(fd, view[done:], done)


def claim(moved: Any, buffers: list[Any]) -> None:
    """Map the shared-memory buffers a message names into ``buffers`` (in place), and unlink their files
    (mark them claimed, those their sender keeps).

    Raises ``ValueError`` for a malformed list and ``OSError`` for a file that is
    missing, not a regular file of ours, or of another size than announced.
    """
    if not isinstance(moved, tuple):
        raise ValueError("the shared-memory list is not an array")
    for n, item in enumerate(moved):
        try:
            _claim_one(item, buffers)
        except BaseException:
            discard(moved[n + 1 :])  # refused as a whole: nobody will claim the rest either
            raise


def _claim_one(item: Any, buffers: list[Any]) -> None:
    """Map one ``[index, name, size, kept]`` entry into ``buffers``; unlink its file, unless the sender keeps
    it (a FIFO, a link, another size or owner: refused)."""
    if not (isinstance(item, tuple) and len(item) == 4):
        raise ValueError("a shared-memory entry is not [index, name, size, kept]")
    index, name, size, kept = item
    if type(name) is str and _NAME.fullmatch(name):
        path = os.path.join(SHM_DIR, name)
    else:
        raise ValueError(f"bad shared-memory file name {name!r}")
    if type(index) is not int or not 0 <= index < len(buffers) or type(size) is not int or size < 0 or type(kept) is not bool:
        _let_go(path, kept is True)
        raise ValueError(f"bad shared-memory entry {item!r}")
    try:  # O_NONBLOCK: a FIFO put there would otherwise block this open until a writer came
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        _let_go(path, kept)  # (a link, or no file descriptor left: it is refused, and goes)
        raise
    mapped: mmap.mmap | bytes = b""
    hold = kept and _reaper.holding < HOLD_MAX
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_size != size or (kept and not size):
            raise OSError(f"{path} is not the {size}-byte file of ours that was announced")
        if hold:  # held while mapped: the sender writes it again only once this descriptor is closed
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            os.fchmod(fd, _CLAIMED)
        elif kept:  # holding enough descriptors: this one is never to be written again (its sender drops it)
            os.fchmod(fd, _GIVEN_UP)
        if size:
            mapped = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException as exc:
        os.close(fd)
        if not isinstance(exc, BlockingIOError):  # (its sender writes it now: this message is not its last)
            _let_go(path, kept)
        raise
    if not hold:
        os.close(fd)
    if not kept:
        _unlink(path)
    buffers[index] = memoryview(mapped)  # (viewed before the reaper sees it: it closes what nothing views)
    if isinstance(mapped, mmap.mmap):
        _reaper.adopt(mapped, fd if hold else None)


class _Reaper:
    """Unmaps received mappings once no array uses them, on a thread of its own (see the module's docstring).

    ``mmap.close()`` refuses while a view exists; the thread tries every
    mapping it holds (and closes a kept file's descriptor after it, which lets
    its sender write it again), at first every ``FIRST_S``, then less often (up to
    ``LAST_S``) while none was let go, and ends once it holds none.
    """

    # Soon after a mapping comes, as the array it replaces is often dropped then (W5's out: a kept file is
    # written again only once let go; at 20 ms its sender often made a new one, 1.7 against 2.3-2.9 GiB/s).
    FIRST_S = 0.002
    LAST_S = 1.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._maps: list[tuple[mmap.mmap, int | None]] = []  # (mapping, its kept file's descriptor)
        self._thread: threading.Thread | None = None
        self._soon = threading.Event()  # set by adopt(): look again at the shortest pause
        self.holding = 0  # kept files' descriptors held
        self.rounds = 0  # passes over the mappings so far (tests wait on it)

    def adopt(self, mapped: mmap.mmap, fd: int | None = None) -> None:
        with self._lock:
            self._maps.append((mapped, fd))
            self.holding += fd is not None
            if self._thread is None or not self._thread.is_alive():  # (none, or one that did not survive a fork)
                self._thread = threading.Thread(target=self._run, name="actorlib-shm-reaper", daemon=True)
                self._thread.start()
        self._soon.set()

    def pending(self) -> int:
        """How many mappings wait to be unmapped."""
        with self._lock:
            return len(self._maps)

    def _run(self) -> None:
        pause = self.FIRST_S
        while True:
            if self._soon.wait(pause):
                self._soon.clear()
                pause = self.FIRST_S
            with self._lock:
                maps = list(self._maps)
            released = 0
            for mapped, fd in maps:
                try:
                    mapped.close()  # unmaps (without the GIL); refused while a view exists
                except BufferError:
                    continue
                released += 1
                with self._lock:  # forgotten before its descriptor is closed (a fork in between must not close it again)
                    self._maps = [m for m in self._maps if m[0] is not mapped]
                    self.holding -= fd is not None
                if fd is not None:
                    try:
                        os.close(fd)  # (and with it the shared lock)
                    except OSError:
                        pass
            with self._lock:
                self.rounds += 1
                if not self._maps:
                    self._thread = None
                    return
            pause = self.FIRST_S if released else min(self.LAST_S, pause * 2)


_reaper = _Reaper()


def _reaper_forked() -> None:
    _reaper._lock = threading.Lock()  # (another thread may have held them)
    _reaper._soon = threading.Event()
    _reaper._thread = None


os.register_at_fork(after_in_child=_reaper_forked)


# A kept file's mode: 0600 while written or in flight; then _CLAIMED by a receiver that holds it while mapped,
# or _GIVEN_UP by one that does not (it holds HOLD_MAX descriptors already): never to be written again.
_CLAIMED = 0o400
_GIVEN_UP = 0o440
HOLD_MAX = max(16, min(256, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 8))


class _Pool:
    """The files a sender keeps, to write again once their receivers are done (see the module's docstring).

    ``take(size)`` answers a FREE file of that size (least recently taken
    first), locked and marked unclaimed, or a new one if that size was sent
    lately and there is room: ``limit`` bytes, :data:`MAX_FILES` files
    (FREE, HELD and given-up files are evicted for it, least recently taken
    first); else None: a file of the message's own, unlinked by its
    receiver. ``written(name)`` unlocks it for its receiver. Anything that
    fails on the way drops that file (or gives None): never raises.
    """

    RECENT = 8  # sizes remembered as sent lately
    MAX_FILES = 64
    IDLE_S = 30.0  # a file not taken this long goes (but one in flight): a sender that stopped lets go of its memory
    # A file in flight this long is forgotten, not unlinked (its receiver may claim it yet; sweep() removes it
    # once this process exits): its receiver most likely died first.
    STALE_S = 300.0

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._files: OrderedDict[str, _Kept] = OrderedDict()  # least recently taken first
        self._sizes: OrderedDict[int, None] = OrderedDict()
        self._janitor: threading.Thread | None = None  # drops idle files; runs while any is kept
        self._wake = threading.Event()  # (set by clear(): the janitor looks at once)

    def take(self, size: int) -> tuple[str, int] | None:
        with self._lock:
            for f in list(self._files.values()):
                if f.size != size or f.writing:
                    continue
                try:
                    info = os.fstat(f.fd)
                    mode = info.st_mode & 0o777
                    if info.st_nlink == 0 or mode == _GIVEN_UP:  # unlinked by someone else, or never to be written
                        self._drop(f)
                    elif mode == _CLAIMED and f.lock():
                        os.fchmod(f.fd, 0o600)
                        break
                except OSError:
                    self._drop(f)
            else:
                new = self._new(size)
                if new is None:
                    return None
                f = new
            f.taken, f.writing = time.monotonic(), True
            self._files.move_to_end(f.name)
            return f.name, f.fd

    def _new(self, size: int) -> _Kept | None:
        seen = size in self._sizes
        self._sizes[size] = None
        self._sizes.move_to_end(size)
        if len(self._sizes) > self.RECENT:
            self._sizes.popitem(last=False)
        if not seen or not 0 < size <= self.limit:
            return None
        held = sum(f.size for f in self._files.values())
        now = time.monotonic()
        for old in list(self._files.values()):
            if held + size <= self.limit and len(self._files) < self.MAX_FILES and _room_for(size):
                break
            if not old.writing and self._evict(old, now):
                held -= old.size
        if held + size > self.limit or len(self._files) >= self.MAX_FILES or not _room_for(size):
            return None
        name = f"actorlib-{os.getpid()}-{secrets.token_hex(8)}"
        try:
            fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError:
            return None
        f = _Kept(name, fd, size)
        self._files[name] = f
        try:
            os.fchmod(fd, 0o600)  # (whatever the umask: 0400 would say it is claimed)
        except OSError:
            self._drop(f)
            return None
        if self._janitor is None:
            self._janitor = threading.Thread(target=self._drop_idle, name="actorlib-shm-pool", daemon=True)
            self._janitor.start()
        return f

    def _drop_idle(self) -> None:
        while True:
            self._wake.wait(self.IDLE_S / 2)
            with self._lock:
                self._wake.clear()
                now = time.monotonic()
                for f in list(self._files.values()):
                    if not f.writing and now - f.taken >= self.IDLE_S:
                        self._evict(f, now)
                if not self._files:
                    self._janitor = None
                    return

    def _evict(self, f: _Kept, now: float) -> bool:
        """Drop a file that is not in flight (one its receiver still maps keeps its pages until unmapped);
        forget one in flight past ``STALE_S``. Whether it went."""
        try:
            in_flight = os.fstat(f.fd).st_mode & 0o777 == 0o600
        except OSError:
            in_flight = False
        if not in_flight:
            self._drop(f)
        elif now - f.taken > self.STALE_S:
            self._forget(f)
        else:
            return False
        return True

    def written(self, name: str) -> None:
        """Its bytes are written: unlocked, for the receiver to take."""
        with self._lock:
            f = self._files.get(name)
            if f is not None:
                try:
                    fcntl.flock(f.fd, fcntl.LOCK_UN)
                except OSError:
                    self._forget(f)  # (in flight now: not to be unlinked)
                f.writing = False

    def evict(self, name: str) -> None:
        """Drop a file that was not written (nor sent)."""
        with self._lock:
            f = self._files.get(name)
            if f is not None:
                self._drop(f)

    def clear(self) -> None:
        """Unlink and close every file kept (their pages go with the last mapping of each), but those another
        thread is writing (:func:`sweep` removes them at exit)."""
        with self._lock:
            for f in list(self._files.values()):
                if not f.writing:
                    self._drop(f)
        self._wake.set()

    def forked(self) -> None:
        """In a forked child: the parent's files are the parent's (closed here, not unlinked)."""
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._janitor = None
        for f in list(self._files.values()):
            self._forget(f)
        self._sizes.clear()

    def held(self) -> int:
        """Bytes of /dev/shm kept."""
        with self._lock:
            return sum(f.size for f in self._files.values())

    def _drop(self, f: _Kept) -> None:
        self._forget(f)
        _unlink(os.path.join(SHM_DIR, f.name))

    def _forget(self, f: _Kept) -> None:
        self._files.pop(f.name, None)
        try:
            os.close(f.fd)
        except OSError:
            pass


def _room_for(nbytes: int) -> bool:
    """Whether a file of ``nbytes`` would leave at least as much of /dev/shm free, and a quarter of it (a
    container's is often 64 MiB: kept files are not to fill it). A tmpfs without a size has room."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return False
    if st.f_blocks == 0:
        return True
    return st.f_bavail * st.f_frsize - nbytes >= max(nbytes, st.f_blocks * st.f_frsize // 4)


class _Kept:
    """A kept file: its name, the sender's descriptor (read-write), its size, when it was last taken, and
    whether it is being written."""

    __slots__ = ("fd", "name", "size", "taken", "writing")

    def __init__(self, name: str, fd: int, size: int) -> None:
        self.name, self.fd, self.size, self.taken, self.writing = name, fd, size, time.monotonic(), True

    def lock(self) -> bool:
        """Whether its receiver has let go (the lock is then ours, until ``written``)."""
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True


_pool = _Pool(POOL_BYTES)
os.register_at_fork(after_in_child=lambda: _pool.forked())


def release_kept() -> None:
    """Give up the files this process keeps for reuse (at shutdown; sweep() removes any left at exit)."""
    _pool.clear()


def discard(moved: Any) -> None:
    """Let go of the files a message named that will not be claimed (its send failed, or it was refused):
    unlinked, or given back to the sender that keeps them."""
    for item in moved if isinstance(moved, list | tuple) else ():
        name = item[1] if isinstance(item, list | tuple) and len(item) in (3, 4) else None  # (3: version 1's)
        if type(name) is str and _NAME.fullmatch(name):
            _let_go(os.path.join(SHM_DIR, name), len(item) == 4 and item[3] is True)


def _let_go(path: str, kept: bool) -> None:
    if not kept:
        _unlink(path)
        return
    try:  # marked claimed, and nobody holds it: FREE
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.fchmod(fd, _CLAIMED)
    except OSError:
        pass
    finally:
        os.close(fd)


def discard_announced(header: Any) -> None:
    """Best effort, for a message refused before its header was read: let go of the files it names, if any."""
    try:
        envelope = msgpack.unpackb(bytes(header), raw=False)
    except Exception:
        return
    if isinstance(envelope, list) and len(envelope) == 5:
        discard(envelope[4])


def sweep(pid: int) -> int:
    """Remove the files process ``pid`` sent that nobody claimed, and those it kept (call once it has exited);
    returns how many."""
    removed = 0
    for path in glob.glob(os.path.join(SHM_DIR, f"actorlib-{int(pid)}-*")):
        if _unlink(path):
            removed += 1
    return removed


def sweep_orphans() -> int:
    """Remove the files of senders that are gone (a driver killed before it could sweep its own); returns how
    many. A sender's pid reused since keeps its files: never a live process's."""
    removed = 0
    for path in glob.glob(os.path.join(SHM_DIR, "actorlib-*-*")):
        name = os.path.basename(path)
        if _NAME.fullmatch(name) and not os.path.exists(f"/proc/{name.split('-')[1]}") and _unlink(path):
            removed += 1
    return removed


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except OSError:
        return False
