"""Polling a while before sleeping: how long, and the poll itself.

A thread that waits for a message which comes within a few hundred
microseconds does better to poll for it than to sleep: the message is then
read by a thread that is on a CPU already, instead of waking a sleeping one
(on a VM, often an idle vCPU), which is most of what a short round trip
costs over the wire's own time. Two waits do this:

- a blocking ``get()`` (``object_ref.wait_reading``), for its answers;
- a compiled graph's stage (``ActorHost.poll_sync_once``), for the next
  execution's message, after it sent its last one;
- a worker group's worker, for the group's next call in its shared-memory
  slot (``ActorHost.poll_sync_once`` too; see :mod:`actorlib.broadcast`).

Each polls for about twice as long as its recent waits took (:class:`Recent`),
at most ``ACTORLIB_GET_SPIN_US`` (:data:`SPIN_S`), and not at all while they
take longer than that: a wait that ends in a sleep anyway would only burn CPU.
Waits for shared-memory slots are let take up to four times as long: see
:class:`Recent`.
"""

from __future__ import annotations

import os
import time
from typing import Any


def _spin_s() -> float:
    """The most a waiting thread polls before it sleeps (``ACTORLIB_GET_SPIN_US``, default 500), in seconds.

    Zero with one CPU: whatever the thread waits for needs that CPU.
    """
    raw = os.environ.get("ACTORLIB_GET_SPIN_US", "500")
    try:
        us = float(raw)
    except ValueError:
        raise ValueError(f"ACTORLIB_GET_SPIN_US must be a number of microseconds (0: never spin), not {raw!r}") from None
    if not 0 <= us <= 1e6:
        raise ValueError(f"ACTORLIB_GET_SPIN_US must be between 0 and 1000000 microseconds, not {raw!r}")
    return us / 1e6 if len(os.sched_getaffinity(0)) > 1 else 0.0


SPIN_S = _spin_s()


class Recent:
    """A moving average of how long one thread's waits of one kind took, and so how long the next polls.

    ``tolerance``: poll while the waits take up to that many times :data:`SPIN_S`. Above 1 for the waits
    that shared-memory slots end (see :mod:`actorlib.broadcast`): a message comes through a slot only while
    its reader polls, and then far sooner than over ZeroMQ; waits that went over ZeroMQ (on a machine slow to
    wake a thread, a group's round takes about 1 ms) would otherwise keep the polling, and the slots, off.
    """

    def __init__(self, tolerance: float = 1.0) -> None:
        self.limit = tolerance * SPIN_S
        self.typical = SPIN_S / 2  # seconds

    def spin_for(self) -> float:
        """About twice what such waits took lately, at most :data:`SPIN_S`; 0 while they take longer than the
        limit."""
        return 0.0 if self.typical > self.limit else min(SPIN_S, 2 * self.typical)

    def took(self, seconds: float) -> None:
        # one long wait (an idle spell) counts as just too long, so a few short ones bring the polling back
        self.typical += (min(seconds, 2 * self.limit) - self.typical) / 8


SLOT_TOLERANCE = 4.0  # see Recent


def poll_until(poller: Any, until: float, also: Any = None) -> list[Any]:
    """``poller.poll(0)`` until something is ready, ``also.ready()`` says so (a worker group's
    shared-memory slot: see :mod:`actorlib.broadcast`), or ``until`` (``time.monotonic()``) passes.

    It yields the CPU between polls (``sched_yield``): the threads the poller
    waits for (workers, stages, ZeroMQ's I/O threads) are often more than the
    CPUs, and a poller that does not yield holds its CPU until the scheduler's
    tick takes it, while the message it polls for may be the one waiting for
    that CPU. With nothing else to run, the yield returns at once.
    """
    while True:
        events: list[Any] = poller.poll(0)
        if events or (also is not None and also.ready()) or time.monotonic() >= until:
            return events
        os.sched_yield()
