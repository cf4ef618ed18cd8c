"""A session's directory: sockets, logs, and what a later process needs to find the head."""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import tempfile
import threading
import time
from typing import Any

from transport import shm

__all__ = [
    "DEFAULT_PORT",
    "find_head",
    "forget_started",
    "hold_session",
    "locate_head",
    "new_session_dir",
    "normalize_address",
    "process_alive",
    "process_start_time",
    "prune_sessions",
    "read_started",
    "release_session",
    "record_started",
    "remove_sockets",
    "socket_dir",
]

DEFAULT_PORT = 6380


def session_root() -> str:
    return os.environ.get("ACTORLIB_TMPDIR") or os.path.join(tempfile.gettempdir(), "actorlib-sessions")


def new_session_dir() -> str:
    """Make ``<root>/session_<time>_<pid>_<random>/{logs,sockets}`` (mode 0700), held by this process (see
    :func:`hold_session`), and return its path. Ended sessions beyond the newest :data:`KEEP_SESSIONS` go."""
    root = session_root()
    os.makedirs(root, exist_ok=True)
    name = f"session_{time.strftime('%Y%m%d-%H%M%S')}_{os.getpid()}_{secrets.token_hex(4)}"
    path = os.path.join(root, name)
    os.mkdir(path, mode=0o700)  # fails if it exists: a session directory is never shared
    hold_session(path)
    os.mkdir(os.path.join(path, "logs"))
    inside = os.path.join(path, "sockets")
    if len(inside) + _LONGEST_SOCKET_NAME <= _IPC_PATH_MAX:
        os.mkdir(inside, mode=0o700)
    else:  # too long for a Unix socket path: a fresh private directory under /tmp, recorded in the session
        elsewhere = tempfile.mkdtemp(prefix=_ELSEWHERE_PREFIX, dir=_ELSEWHERE_ROOT)
        with open(os.path.join(path, _SOCKETS_LINK), "w") as f:
            f.write(elsewhere)
        with open(os.path.join(elsewhere, _SESSION_LINK), "w") as f:  # the way back: gone with its session
            f.write(path)
    # off the caller's path (init() waits for nothing of it); one cut short by the process ending is harmless
    threading.Thread(target=_tidy, args=(root,), name="actorlib-prune", daemon=True).start()
    return path


def _tidy(root: str) -> None:
    """What earlier sessions left: ended ones beyond the newest kept, and shared memory of senders that died."""
    prune_sessions(root, keep=KEEP_SESSIONS)
    shm.sweep_orphans()


# -- which sessions have ended ------------------------------------------------
#
# Every process that uses a session directory (the driver or ``actorlib start``
# that made it, a standalone head, node agents given it) holds a shared flock
# on its ``owner.lock`` for as long as it runs; the kernel lets go when the
# process ends, however it ends. A session nobody holds has ended: its logs
# stay for reading until it is one of more than ``KEEP_SESSIONS`` ended ones.

KEEP_SESSIONS = int(os.environ.get("ACTORLIB_KEEP_SESSIONS", "100"))
_PRUNE_AT_ONCE = 200  # a bounded cost for one process: a long backlog goes over several
_OWNER_LOCK = "owner.lock"
_held: dict[str, int] = {}  # session directory -> the fd whose flock this process holds


def hold_session(session_dir: str) -> None:
    """Mark ``session_dir`` as in use by this process until it exits (best effort: never raises)."""
    if session_dir in _held:
        return
    try:
        fd = os.open(os.path.join(session_dir, _OWNER_LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    except OSError:
        os.close(fd)
        return
    _held[session_dir] = fd


def release_session(session_dir: str) -> None:
    """This process is done with ``session_dir`` (a driver's shutdown): it may end, and be pruned later."""
    fd = _held.pop(session_dir, None)
    if fd is not None:
        os.close(fd)  # and with it this process's lock


def prune_sessions(root: str, keep: int) -> list[str]:
    """Remove the oldest ended session directories under ``root`` (and the socket directories they recorded
    elsewhere) beyond the newest ``keep``, at most a few dozen per call; returns what was removed."""
    try:
        names = sorted((n for n in os.listdir(root) if n.startswith("session_")), reverse=True)  # newest first
    except OSError:
        return []
    removed: list[str] = []
    ended = 0
    for name in names:
        path = os.path.join(root, name)
        if path in _held or not _ended(path):
            continue
        ended += 1
        if ended <= keep:
            continue
        elsewhere = socket_dir(path)
        shutil.rmtree(path, ignore_errors=True)
        if _is_elsewhere(elsewhere):
            shutil.rmtree(elsewhere, ignore_errors=True)
        removed.append(path)
        if len(removed) >= _PRUNE_AT_ONCE:
            break
    _prune_elsewhere()
    return removed


def _is_elsewhere(path: str) -> bool:
    return os.path.dirname(path) == _ELSEWHERE_ROOT and os.path.basename(path).startswith(_ELSEWHERE_PREFIX)


def _prune_elsewhere() -> None:
    """Remove socket directories kept outside sessions that are gone (removed by hand, or with a test's tmp)."""
    try:
        names = [n for n in os.listdir(_ELSEWHERE_ROOT) if n.startswith(_ELSEWHERE_PREFIX)]
    except OSError:
        return
    for name in names:
        path = os.path.join(_ELSEWHERE_ROOT, name)
        try:
            with open(os.path.join(path, _SESSION_LINK)) as f:
                session = f.read().strip()
        except OSError:
            continue  # not one of ours, or not finished being made
        if session and not os.path.exists(session):
            shutil.rmtree(path, ignore_errors=True)


def _ended(session_dir: str) -> bool:
    """No process holds the session. One made before sessions were held: the process that made it (the pid
    in its name) is gone."""
    try:
        fd = os.open(os.path.join(session_dir, _OWNER_LOCK), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        parts = os.path.basename(session_dir).split("_")
        maker = int(parts[2]) if len(parts) > 3 and parts[2].isdigit() else 0
        return os.path.isdir(session_dir) and not process_alive(maker)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    finally:
        os.close(fd)  # and with it the lock, if it was taken
    return True


_IPC_PATH_MAX = 107
_LONGEST_SOCKET_NAME = len("/0123456789abcdef.sock")
_SOCKETS_LINK = "sockets_dir"
_SESSION_LINK = "session_dir"
_ELSEWHERE_ROOT, _ELSEWHERE_PREFIX = "/tmp", "actorlib-"


def socket_dir(session_dir: str) -> str:
    """Where the session's ``ipc://`` sockets live: ``<session>/sockets``, or where the session records."""
    try:
        with open(os.path.join(session_dir, _SOCKETS_LINK)) as f:
            return f.read().strip()
    except FileNotFoundError:
        return os.path.join(session_dir, "sockets")


def remove_sockets(session_dir: str) -> None:
    """Remove the session's socket files; logs stay for reading after the fact."""
    shutil.rmtree(socket_dir(session_dir), ignore_errors=True)


# -- what runs on this machine ------------------------------------------------
#
# ``<root>/head.json`` names the standalone head running here (its address,
# pid, session directory and cluster-key file); ``<root>/started/<pid>.json``
# every process ``actorlib start`` left running, for ``actorlib stop``.


def _head_file() -> str:
    return os.path.join(session_root(), "head.json")


def record_started(pid: int, info: dict[str, Any]) -> None:
    """Note a process ``actorlib start`` started (``role`` "head" or "node"), for ``actorlib stop`` and ``auto``."""
    folder = os.path.join(session_root(), "started")
    os.makedirs(folder, exist_ok=True)
    _write_json(os.path.join(folder, f"{pid}.json"), {"pid": pid, **info})
    if info.get("role") == "head":
        _write_json(_head_file(), {"pid": pid, **info})


def read_started() -> list[dict[str, Any]]:
    """The processes ``actorlib start`` left running here that still run (stale entries are dropped)."""
    folder = os.path.join(session_root(), "started")
    found = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        path = os.path.join(folder, name)
        info = _read_json(path)
        if info is not None and process_alive(int(info.get("pid", 0)), info.get("start_time")):
            found.append(info)
        else:
            _unlink(path)
    return found


def forget_started(pid: int) -> None:
    _unlink(os.path.join(session_root(), "started", f"{pid}.json"))
    head = _read_json(_head_file())
    if head is not None and head.get("pid") == pid:
        _unlink(_head_file())


def find_head() -> dict[str, Any] | None:
    """The standalone head running on this machine, if one is."""
    info = _read_json(_head_file())
    if info is None or not process_alive(int(info.get("pid", 0)), info.get("start_time")):
        return None
    return info


def normalize_address(address: str) -> str:
    """``HOST:PORT``, ``HOST`` or ``tcp://HOST:PORT`` → ``tcp://HOST:PORT``; anything else is refused."""
    rest = address[len("tcp://") :] if address.startswith("tcp://") else address
    host, sep, port = rest.rpartition(":")
    if not sep:
        host, port = rest, str(DEFAULT_PORT)
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in host:
        raise ValueError(f"not a head address: {address!r} (expected HOST:PORT, e.g. 10.0.0.1:{DEFAULT_PORT})")
    return f"tcp://{host}:{int(port)}"


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (with the pid, it names one process, never a later reuse).

    None if there is no such process, or only its zombie (it has exited; its parent has not reaped it).
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return fields[19]


def process_alive(pid: int, start_time: str | None = None) -> bool:
    if pid <= 0:
        return False
    now = process_start_time(pid)
    if now is None:
        return False
    return start_time is None or now == start_time


def _write_json(path: str, data: dict[str, Any]) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def locate_head(address: str, key_file: str | None = None) -> tuple[str, str | None]:
    """What a driver or ``actorlib`` was told (``auto``, ``HOST:PORT``) → the head's ``tcp://`` address and key file.

    ``auto`` is ``$ACTORLIB_ADDRESS``, else the head running on this machine.
    The key file is ``key_file`` when given (the environment does not
    override it), else ``$ACTORLIB_KEY_FILE``, else the one a head or node
    started here for that address recorded; None if none of these.
    """
    if address == "auto":
        address = os.environ.get("ACTORLIB_ADDRESS", "")
        if not address:
            head = find_head()
            if head is None:
                raise LookupError(
                    "address='auto': no actorlib head is running on this machine (start one with "
                    "`actorlib start --head`), and ACTORLIB_ADDRESS is not set"
                )
            address = head["address"]
    tcp = normalize_address(address)
    if key_file is not None:
        return tcp, key_file
    key_file = os.environ.get("ACTORLIB_KEY_FILE") or None
    if key_file is None:
        for info in read_started():
            if info.get("key_file") and info.get("address") == tcp:
                key_file = info["key_file"]
    return tcp, key_file
