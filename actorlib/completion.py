"""A minimal thread-safe future, one per call result.

``concurrent.futures.Future`` builds a Condition (an RLock and a deque) for
every instance; a call's result needs far less. A :class:`Completion` is set
once from any thread; threads wait on an Event made only if one actually
blocks, and callbacks serve event loops and :func:`wait_for`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["Completion", "wait_for"]

log = logging.getLogger(__name__)

_lock = threading.Lock()  # guards every Completion's state change: each is held for a few instructions


class Completion:
    __slots__ = ("_done", "_result", "_exception", "_event", "_callbacks")

    def __init__(self) -> None:
        self._done = False
        self._result: Any = None
        self._exception: BaseException | None = None
        self._event: threading.Event | None = None
        self._callbacks: list[Callable[[Completion], None]] | None = None

    def done(self) -> bool:
        return self._done

    def set_result(self, result: Any) -> bool:
        return self._finish(result, None)

    def set_exception(self, exc: BaseException) -> bool:
        return self._finish(None, exc)

    def _finish(self, result: Any, exc: BaseException | None) -> bool:
        with _lock:
            if self._done:
                return False
            self._result, self._exception, self._done = result, exc, True
            event, callbacks, self._callbacks = self._event, self._callbacks, None
        if event is not None:
            event.set()
        for callback in callbacks or ():
            try:
                callback(self)
            except Exception:
                log.exception("error in a completion callback")
        return True

    def add_done_callback(self, callback: Callable[[Completion], None]) -> None:
        """Call ``callback(self)`` once done (at once, here, if it already is)."""
        with _lock:
            if not self._done:
                if self._callbacks is None:
                    self._callbacks = []
                self._callbacks.append(callback)
                return
        callback(self)

    def discard_callback(self, callback: Callable[[Completion], None]) -> None:
        """Forget ``callback`` if it has not been called (a waiter that gave up)."""
        with _lock:
            if self._callbacks is not None:
                try:
                    self._callbacks.remove(callback)
                except ValueError:
                    pass

    def wait(self, timeout: float | None = None) -> bool:
        """Block until done or ``timeout`` passes; True if done."""
        if self._done:
            return True
        with _lock:
            if self._done:
                return True
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        return event.wait(timeout)

    def result(self, timeout: float | None = None) -> Any:
        """The result, raising what was set with :meth:`set_exception`; ``TimeoutError`` if not done in time."""
        if not self.wait(timeout):
            raise TimeoutError
        if self._exception is not None:
            raise self._exception
        return self._result

    def exception(self) -> BaseException | None:
        return self._exception if self._done else None


def wait_for(
    completions: Sequence[Completion], count: int, timeout: float | None, *, stop: Callable[[Completion], bool] | None = None
) -> None:
    """Block until ``count`` of ``completions`` are done (or one for which ``stop`` is true), or ``timeout`` passes."""
    if sum(1 for c in completions if c.done()) >= count:
        return
    left = [count]
    event = threading.Event()
    guard = threading.Lock()

    def one(c: Completion) -> None:
        with guard:
            left[0] -= 1
            if left[0] <= 0 or (stop is not None and stop(c)):
                event.set()

    # Every completion gets the callback, done or not (a done one calls it at once): counting the done
    # ones first and then registering only the others would lose one that finished in between.
    try:
        for c in completions:
            c.add_done_callback(one)
        event.wait(timeout)
    finally:  # (Ctrl-C too) those still pending must not keep a callback for each wait that gave up or had enough
        for c in completions:
            if not c.done():
                c.discard_callback(one)
