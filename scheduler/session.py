"""A session's directory: sockets, logs, and what a later process needs to find the head."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import time

__all__ = ["new_session_dir", "remove_sockets", "socket_dir"]


def session_root() -> str:
    return os.environ.get("ACTORLIB_TMPDIR") or os.path.join(tempfile.gettempdir(), "actorlib-sessions")


def new_session_dir() -> str:
    """Make ``<root>/session_<time>_<pid>_<random>/{logs,sockets}`` (mode 0700) and return its path."""
    root = session_root()
    os.makedirs(root, exist_ok=True)
    name = f"session_{time.strftime('%Y%m%d-%H%M%S')}_{os.getpid()}_{secrets.token_hex(4)}"
    path = os.path.join(root, name)
    os.mkdir(path, mode=0o700)  # fails if it exists: a session directory is never shared
    os.mkdir(os.path.join(path, "logs"))
    inside = os.path.join(path, "sockets")
    if len(inside) + _LONGEST_SOCKET_NAME <= _IPC_PATH_MAX:
        os.mkdir(inside, mode=0o700)
    else:  # too long for a Unix socket path: a fresh private directory under /tmp, recorded in the session
        elsewhere = tempfile.mkdtemp(prefix="actorlib-", dir="/tmp")
        with open(os.path.join(path, _SOCKETS_LINK), "w") as f:
            f.write(elsewhere)
    return path


_IPC_PATH_MAX = 107
_LONGEST_SOCKET_NAME = len("/0123456789abcdef.sock")
_SOCKETS_LINK = "sockets_dir"


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
