"""Blocking work an event loop hands to a thread of its own (waiting for a process, above all).

Not the loop's default executor: its few threads would be held by long waits (one per node), and it
refuses work while Python exits, when ``shutdown()`` may run from ``atexit``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["in_own_thread"]


def in_own_thread(
    loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any, then: Callable[[], None] | None = None, name: str = "actorlib-wait"
) -> asyncio.Future[None]:
    """Run ``fn(*args)`` on a daemon thread; the returned future (of ``loop``) is done once it has returned
    or raised, after ``then()`` ran on the loop. Nothing is done if the loop has closed meanwhile."""
    finished: asyncio.Future[None] = loop.create_future()

    def settle() -> None:
        try:
            if then is not None:
                then()
        finally:
            if not finished.done():
                finished.set_result(None)

    def run() -> None:
        try:
            fn(*args)
        finally:
            try:
                loop.call_soon_threadsafe(settle)
            except RuntimeError:
                pass  # the loop is closed: nobody waits

    threading.Thread(target=run, name=name, daemon=True).start()
    return finished
