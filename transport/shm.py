"""Large buffers between processes of one machine go through shared memory, not the socket.

A message's buffer frame of at least ``ACTORLIB_SHM_MIN_BYTES`` (1 MiB) sent
on a same-machine endpoint (``ipc://``, or TCP on a loopback address) is
written to a new file in ``/dev/shm`` (mode 0600, named
``actorlib-<sender pid>-<random>``); the frame travels empty and the header
lists ``(frame index, file name, size)``. The receiver maps the file
copy-on-write (so the array it gets is writable and costs no copy) and
unlinks it at once: the memory lives as long as the array does. One copy in
all, instead of the socket's several, and no encryption of bulk bytes.

Unmapping such a buffer frees the file's pages, which takes time (~14 ms for
64 MiB on the 2-vCPU VM, against ~0.3 ms for 64 MiB of a process's own
memory). So a received mapping is not unmapped by whichever thread drops
the last array on it, in the middle of the user's code: :class:`_Reaper`
unmaps it on a thread of its own once nothing uses it any more.

A file never claimed (its receiver died first) is removed by :func:`sweep`
once its sender has exited: the node agent sweeps its workers, a driver its
own; and by :func:`sweep_orphans`, when a session starts, if its sender died
before it could. Anything that fails on the way (no ``/dev/shm``, no space) falls back
to the socket. ``ACTORLIB_SHM=0`` turns the path off.
"""

from __future__ import annotations

import glob
import mmap
import os
import re
import secrets
import stat
import threading
from collections.abc import Sequence
from typing import Any

import msgpack

__all__ = ["ENABLED", "MIN_BYTES", "claim", "export", "local_address", "sweep", "sweep_orphans"]

SHM_DIR = "/dev/shm"
ENABLED = os.environ.get("ACTORLIB_SHM", "1") not in ("0", "off", "false") and os.path.isdir(SHM_DIR)
MIN_BYTES = int(os.environ.get("ACTORLIB_SHM_MIN_BYTES", str(1 << 20)))
_NAME = re.compile(r"actorlib-[0-9]+-[0-9a-f]{16}")


def local_address(address: str) -> bool:
    """Whether every peer of an endpoint at ``address`` is on this machine."""
    return address.startswith("ipc://") or address.startswith("tcp://127.") or address.startswith("tcp://localhost:")


def export(buffers: Sequence[Any]) -> tuple[list[Any], list[tuple[int, str, int]]]:
    """Move the large buffers into shared-memory files: ``(frames to send, [(index, name, size), ...])``."""
    out = list(buffers)
    moved: list[tuple[int, str, int]] = []
    for i, buf in enumerate(buffers):
        view = memoryview(buf)
        if view.nbytes < MIN_BYTES:
            continue
        name = f"actorlib-{os.getpid()}-{secrets.token_hex(8)}"
        path = os.path.join(SHM_DIR, name)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError:
            continue
        try:
            _write_all(fd, view.cast("B") if view.ndim != 1 or view.format != "B" else view)
        except OSError:  # e.g. /dev/shm is full: this one goes over the socket
            os.close(fd)
            _unlink(path)
            continue
        os.close(fd)
        out[i] = b""
        moved.append((i, name, view.nbytes))
    return out, moved


def _write_all(fd: int, view: memoryview) -> None:
    done = 0
    while done < view.nbytes:
        done += os.write(fd, view[done:])


def claim(moved: Any, buffers: list[Any]) -> None:
    """Map the shared-memory buffers a message names into ``buffers`` (in place), and unlink their files.

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
    """Map one ``[index, name, size]`` entry into ``buffers`` and unlink its file (a FIFO, a link, another
    size or owner: refused)."""
    if not (isinstance(item, tuple) and len(item) == 3):
        raise ValueError("a shared-memory entry is not [index, name, size]")
    index, name, size = item
    if type(name) is str and _NAME.fullmatch(name):
        path = os.path.join(SHM_DIR, name)
    else:
        raise ValueError(f"bad shared-memory file name {name!r}")
    if type(index) is not int or not 0 <= index < len(buffers) or type(size) is not int or size < 0:
        _unlink(path)
        raise ValueError(f"bad shared-memory entry {item!r}")
    try:  # O_NONBLOCK: a FIFO put there would otherwise block this open until a writer came
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        _unlink(path)  # (a link, or no file descriptor left: it is refused, and goes)
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_size != size:
            raise OSError(f"{path} is not the {size}-byte file of ours that was announced")
        mapped = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE) if size else b""
    finally:
        os.close(fd)
        _unlink(path)
    buffers[index] = memoryview(mapped)  # (viewed before the reaper sees it: it closes what nothing views)
    if isinstance(mapped, mmap.mmap):
        _reaper.adopt(mapped)


class _Reaper:
    """Unmaps received mappings once no array uses them, on a thread of its own (see the module's docstring).

    ``mmap.close()`` refuses while a view exists; the thread tries every
    mapping it holds, at first every ``FIRST_S``, then less often (up to
    ``LAST_S``) while none was let go, and ends once it holds none.
    """

    FIRST_S = 0.02
    LAST_S = 1.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._maps: list[mmap.mmap] = []
        self._thread: threading.Thread | None = None
        self._soon = threading.Event()  # set by adopt(): look again at the shortest pause
        self.rounds = 0  # passes over the mappings so far (tests wait on it)

    def adopt(self, mapped: mmap.mmap) -> None:
        with self._lock:
            self._maps.append(mapped)
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
            for mapped in maps:
                try:
                    mapped.close()  # unmaps (without the GIL); refused while a view exists
                    released += 1
                except BufferError:
                    pass
            with self._lock:
                self.rounds += 1
                self._maps = [m for m in self._maps if not m.closed]
                if not self._maps:
                    self._thread = None
                    return
            pause = self.FIRST_S if released else min(self.LAST_S, pause * 2)


_reaper = _Reaper()


def discard(moved: Any) -> None:
    """Unlink the files a message named that will not be claimed (its send failed, or it was refused)."""
    for item in moved if isinstance(moved, list | tuple) else ():
        name = item[1] if isinstance(item, list | tuple) and len(item) == 3 else None
        if type(name) is str and _NAME.fullmatch(name):
            _unlink(os.path.join(SHM_DIR, name))


def discard_announced(header: Any) -> None:
    """Best effort, for a message refused before its header was read: unlink the files it names, if any."""
    try:
        envelope = msgpack.unpackb(bytes(header), raw=False)
    except Exception:
        return
    if isinstance(envelope, list) and len(envelope) == 5:
        discard(envelope[4])


def sweep(pid: int) -> int:
    """Remove the files process ``pid`` sent that nobody claimed (call once it has exited); returns how many."""
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
