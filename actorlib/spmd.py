"""How each rank of a worker group ended a dispatch: results, or failures named first by time.

Failures are reported per rank as :class:`WorkerFailure` records, the first
one by time named first — the shape of torchelastic's ``ChildFailedError``.
:func:`gather` waits for one dispatch and fails soon after its first failure
(the other ranks are likely stuck in a collective); :class:`RunResult` is
what :meth:`WorkerGroup.run` returns.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from . import api
from .exceptions import ActorDiedError, ActorLibError, GetTimeoutError, RemoteError
from .rank_program import CommandFailedError

__all__ = ["RunResult", "WorkerFailure", "WorkerGroupError", "gather"]


@dataclass(frozen=True)
class WorkerFailure:
    """How one rank failed: its code raised (``exception``), or its process died (``exit_code`` / ``signal``)."""

    rank: int
    node_id: str | None
    pid: int | None
    time: float  # when the driver learnt of it (time.time())
    exception: str | None = None  # "TypeName: message" of what the rank's code raised
    traceback: str | None = None
    exit_code: int | None = None
    signal: int | None = None
    error: BaseException | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_error(cls, rank: int, meta: dict[str, Any], exc: BaseException, when: float) -> WorkerFailure:
        if isinstance(exc, ActorDiedError):
            return cls(
                rank=rank,
                node_id=exc.node_id or meta.get("node_id"),
                pid=exc.pid or meta.get("pid"),
                time=when,
                error=exc,
                exception=f"its worker died: {exc.reason}",
                exit_code=exc.exit_code,
                signal=exc.signal,
            )
        common: dict[str, Any] = {"rank": rank, "node_id": meta.get("node_id"), "pid": meta.get("pid"), "time": when, "error": exc}
        cause = exc.cause if isinstance(exc, RemoteError) else exc
        exit_code = cause.exit_code if isinstance(cause, CommandFailedError) else None
        name = exc.class_name if isinstance(exc, RemoteError) else type(exc).__name__
        message = exc.message if isinstance(exc, RemoteError) else str(exc)
        tb = exc.traceback_text if isinstance(exc, RemoteError) else None
        return cls(**common, exception=f"{name}: {message}", traceback=tb, exit_code=exit_code)

    def describe(self) -> str:
        how = []
        if self.signal is not None:
            how.append(f"signal {self.signal}")
        elif self.exit_code is not None:
            how.append(f"exit code {self.exit_code}")
        if self.exception:
            how.append(self.exception.splitlines()[0])
        stamp = time.strftime("%H:%M:%S", time.localtime(self.time)) + f".{int(self.time * 1000) % 1000:03d}"
        node = (self.node_id or "?")[:8]
        return f"rank {self.rank} (pid {self.pid}, node {node}) at {stamp}: {'; '.join(how) or 'failed'}"


class WorkerGroupError(ActorLibError):
    """One or more workers of a group failed one dispatch; ``failures`` by time, ``first`` the earliest."""

    def __init__(self, failures: list[WorkerFailure], total: int, what: str) -> None:
        self.failures = sorted(failures, key=lambda f: f.time)
        self.first = self.failures[0]
        self.total = total
        lines = [f"{len(self.failures)} of {total} workers failed {what}; first: {self.first.describe()}"]
        if self.first.traceback:
            lines.append(self.first.traceback.rstrip())
        lines += [f"  also {f.describe()}" for f in self.failures[1:]]
        super().__init__("\n".join(lines))


@dataclass
class RunResult:
    """What :meth:`WorkerGroup.run` ended with: every rank's return value, or the failures of its last attempt."""

    return_values: list[Any]
    failures: list[WorkerFailure]
    restarts: int
    history: list[list[WorkerFailure]] = field(default_factory=list)  # the failures of each attempt that was restarted

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def first_failure(self) -> WorkerFailure | None:
        return self.failures[0] if self.failures else None

    def raise_on_failure(self) -> list[Any]:
        """The return values, or raise :class:`WorkerGroupError` naming the first failure."""
        if self.failures:
            raise WorkerGroupError(self.failures, len(self.return_values), "run()")
        return self.return_values


def gather(refs: list[Any], ranks: list[int], metadata: list[dict[str, Any]], timeout: float | None, grace: float, what: str) -> list[Any]:
    """The results of ``refs`` (one per rank), or :class:`WorkerGroupError` soon after the first failure.

    A failed rank often leaves the others waiting forever in a collective: so
    once one fails, the others get ``grace`` seconds to finish or fail too,
    and the error lists every failure seen by then.
    """
    finished_at: dict[int, float] = {}
    for i, ref in enumerate(refs):
        ref._fut.add_done_callback(lambda _c, i=i: finished_at.setdefault(i, time.time()))
    deadline = None if timeout is None else time.monotonic() + timeout
    failures: list[WorkerFailure] = []
    values: list[Any] = [None] * len(refs)
    pending = list(range(len(refs)))
    failed_at: float | None = None
    while pending:
        if failed_at is not None:
            limit = failed_at + grace
        else:
            limit = deadline if deadline is not None else float("inf")
        remaining = max(0.0, limit - time.monotonic())
        ready, _ = api.wait([refs[i] for i in pending], num_returns=1, timeout=None if remaining == float("inf") else remaining)
        if not ready:
            break
        for i in list(pending):
            if not refs[i].done():
                continue
            pending.remove(i)
            try:
                values[i] = refs[i]._result(0)
            except ActorLibError as exc:  # raised, died, a result that cannot travel, cancelled ...
                rank = ranks[i]
                failures.append(WorkerFailure.from_error(rank, metadata[rank], exc, finished_at.get(i, time.time())))
                if failed_at is None:
                    failed_at = time.monotonic()
    if failures:
        raise WorkerGroupError(failures, len(refs), what)
    if pending:
        late = [_who(ranks[i], metadata[ranks[i]]) for i in pending[:8]] + (["..."] if len(pending) > 8 else [])
        raise GetTimeoutError(f"{len(pending)} of {len(refs)} workers had not answered {what} within {timeout} s: {', '.join(late)}")
    return values


def _who(rank: int, meta: dict[str, Any]) -> str:
    """``rank 3 (pid 1234, node 1a2b3c4d)``, with what is known."""
    facts = [f"pid {meta['pid']}"] if meta.get("pid") else []
    if meta.get("node_id"):
        facts.append(f"node {str(meta['node_id'])[:8]}")
    return f"rank {rank}" + (f" ({', '.join(facts)})" if facts else "")
