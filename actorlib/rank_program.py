"""What a worker runs for :meth:`WorkerGroup.run`: a function, or a command line, with its rank environment.

Every worker answers :data:`RUN_METHOD` whatever its class: the group's
workers already carry ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT`` in their environment, so a function can
call ``torch.distributed.init_process_group()`` and a command line (a
``torchrun``-style script) sees them too.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["RUN_METHOD", "CommandFailedError", "run_in_worker"]

RUN_METHOD = "__actorlib_run__"
_TAIL = 20


class CommandFailedError(Exception):
    """A command run by :meth:`WorkerGroup.run` exited with a non-zero code (raised in the worker)."""

    def __init__(self, argv: list[str], exit_code: int, stderr_tail: list[str]) -> None:
        self.argv = argv
        self.exit_code = exit_code
        self.stderr_tail = stderr_tail
        text = f"{shlex.join(argv)} exited with code {exit_code}"
        if stderr_tail:
            text += "; last lines of its stderr:\n  " + "\n  ".join(stderr_tail)
        super().__init__(text)

    def __reduce__(self) -> Any:
        return (CommandFailedError, (self.argv, self.exit_code, self.stderr_tail))


def run_in_worker(target: Callable[..., Any] | str | Sequence[str], *args: Any, **kwargs: Any) -> Any:
    """In the worker: call ``target(*args, **kwargs)`` (awaited if async), or run it as a command line.

    A command inherits the worker's environment and output (which reaches the
    driver as the worker's); it returns 0, or raises :class:`CommandFailedError`.
    """
    if callable(target):
        result = target(*args, **kwargs)
        return asyncio.run(result) if inspect.iscoroutine(result) else result
    argv = shlex.split(target) if isinstance(target, str) else [str(a) for a in target]
    if args or kwargs:
        argv += [str(a) for a in args] + [f"--{k}={v}" for k, v in kwargs.items()]
    tail: collections.deque[str] = collections.deque(maxlen=_TAIL)
    with subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace") as proc:
        assert proc.stderr is not None
        for line in proc.stderr:
            sys.stderr.write(line)
            tail.append(line.rstrip("\n"))
    if proc.returncode != 0:
        raise CommandFailedError(argv, proc.returncode, list(tail))
    return 0
