"""Progress for long waits: a bar in a terminal or a notebook, nothing when not interactive."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

__all__ = ["Progress", "gather_with_progress"]

T = TypeVar("T")
R = TypeVar("R")


def _interactive() -> bool:
    if os.environ.get("ACTORLIB_PROGRESS") in ("0", "off"):
        return False
    if os.environ.get("ACTORLIB_PROGRESS") in ("1", "on"):
        return True
    if "ipykernel" in sys.modules:
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _bar_class() -> Any:
    """tqdm's notebook widget in Jupyter when ipywidgets is there, its terminal bar otherwise; None without tqdm."""
    try:
        if "ipykernel" in sys.modules:
            import ipywidgets  # noqa: F401  (tqdm.notebook needs it; without it tqdm.auto only warns)
            from tqdm.notebook import tqdm as notebook_bar

            return notebook_bar
    except ImportError:
        pass
    try:
        from tqdm.std import tqdm as text_bar
    except ImportError:
        return None
    return text_bar


class Progress:
    """``with Progress(total, "starting workers") as p: ... p.update()``.

    Uses tqdm's auto mode (a widget in Jupyter, a bar in a terminal) when
    tqdm is installed, a one-line counter otherwise; silent when the output
    is not interactive (a log file, CI).
    """

    def __init__(self, total: int, desc: str) -> None:
        self.total = total
        self.desc = desc
        self.done = 0
        self._bar: Any = None
        self._text = False
        if total <= 0 or not _interactive():
            return
        bar = _bar_class()
        if bar is not None:
            self._bar = bar(total=total, desc=desc, leave=False)
        else:
            self._text = True
            self._draw()

    def _draw(self) -> None:
        sys.stderr.write(f"\r{self.desc}: {self.done}/{self.total}")
        sys.stderr.flush()

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._text:
            self._draw()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._text:
            sys.stderr.write("\r" + " " * (len(self.desc) + 24) + "\r")
            sys.stderr.flush()
            self._text = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def gather_with_progress(items: Sequence[T], fn: Callable[[T], Awaitable[R]], desc: str) -> list[R]:
    """``fn`` on every item at once; a bar counts them as they finish. Results in ``items``' order."""
    with Progress(len(items), desc) as progress:

        async def one(item: T) -> R:
            try:
                return await fn(item)
            finally:
                progress.update()

        return list(await asyncio.gather(*(one(item) for item in items)))
