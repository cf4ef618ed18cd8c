"""A session's directory: sockets, logs, and what a later process needs to find the head."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import time

__all__ = ["new_session_dir", "remove_sockets"]


def session_root() -> str:
    return os.environ.get("ACTORLIB_TMPDIR") or os.path.join(tempfile.gettempdir(), "actorlib")


def new_session_dir() -> str:
    """Make ``<root>/session_<time>_<pid>_<random>/{logs,sockets}`` and return its path."""
    name = f"session_{time.strftime('%Y%m%d-%H%M%S')}_{os.getpid()}_{secrets.token_hex(2)}"
    path = os.path.join(session_root(), name)
    os.makedirs(os.path.join(path, "logs"), exist_ok=True)
    os.makedirs(os.path.join(path, "sockets"), mode=0o700, exist_ok=True)
    return path


def remove_sockets(session_dir: str) -> None:
    """Remove the session's socket files; logs stay for reading after the fact."""
    shutil.rmtree(os.path.join(session_dir, "sockets"), ignore_errors=True)
