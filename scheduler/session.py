"""A session's directory: sockets, logs, and what a later process needs to find the head."""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import tempfile
import time

__all__ = ["new_session_dir", "remove_sockets", "socket_dir"]


def session_root() -> str:
    return os.environ.get("ACTORLIB_TMPDIR") or os.path.join(tempfile.gettempdir(), "actorlib-sessions")


def new_session_dir() -> str:
    """Make ``<root>/session_<time>_<pid>_<random>/{logs,sockets}`` and return its path."""
    name = f"session_{time.strftime('%Y%m%d-%H%M%S')}_{os.getpid()}_{secrets.token_hex(2)}"
    path = os.path.join(session_root(), name)
    os.makedirs(os.path.join(path, "logs"), exist_ok=True)
    os.makedirs(socket_dir(path), mode=0o700, exist_ok=True)
    return path


_IPC_PATH_MAX = 107
_LONGEST_SOCKET_NAME = len("/0123456789abcdef.sock")


def socket_dir(session_dir: str) -> str:
    """Where the session's ``ipc://`` sockets live.

    ``<session>/sockets`` when that is short enough for a Unix socket path
    (107 bytes); otherwise a short directory under /tmp named after the session.
    """
    inside = os.path.join(session_dir, "sockets")
    if len(inside) + _LONGEST_SOCKET_NAME <= _IPC_PATH_MAX:
        return inside
    digest = hashlib.sha1(session_dir.encode()).hexdigest()[:16]
    return os.path.join("/tmp", f"actorlib-{digest}")


def remove_sockets(session_dir: str) -> None:
    """Remove the session's socket files; logs stay for reading after the fact."""
    shutil.rmtree(socket_dir(session_dir), ignore_errors=True)
