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

Waits for shared-memory slots (a worker's, and a ``get()``'s of calls that
went through one) also poll, for twice as long, while a slot ended one of
their last :data:`HITS_KEPT` waits, and during a probe window
(:data:`PROBE_WINDOW_S` of every :data:`PROBE_PERIOD_S` of the machine's
monotonic clock, the same for every process). A message comes through a slot
only while its reader polls, and then far sooner than over ZeroMQ: waits
measured over ZeroMQ (on a machine slow to wake threads, a group's round takes
about 1 ms) would otherwise keep the polling, and the slots, off for good. The
windows line up across the workers of a group, whose caller writes their slots
only when all of them poll; where the slots do not end the waits, the polling
is back to what it was after :data:`HITS_KEPT` waits, but for an eighth of
the time.
"""

from __future__ import annotations

import os
import time
from typing import Any


def _spin_s() -> float:
    """The most a waiting thread polls before it sleeps (``ACTORLIB_GET_SPIN_US``, default 1000), in seconds.

    Zero with one CPU: whatever the thread waits for needs that CPU.
    """
    raw = os.environ.get("ACTORLIB_GET_SPIN_US", "1000")
    try:
        us = float(raw)
    except ValueError:
        raise ValueError(f"ACTORLIB_GET_SPIN_US must be a number of microseconds (0: never spin), not {raw!r}") from None
    if not 0 <= us <= 1e6:
        raise ValueError(f"ACTORLIB_GET_SPIN_US must be between 0 and 1000000 microseconds, not {raw!r}")
    return us / 1e6 if len(os.sched_getaffinity(0)) > 1 else 0.0


SPIN_S = _spin_s()


PROBE_PERIOD_S = 0.4
PROBE_WINDOW_S = 0.05
HITS_KEPT = 8


class Recent:
    """A moving average of how long one thread's waits of one kind took, and so how long the next polls.

    ``slots``: waits that shared-memory slots may end (see the module)."""

    def __init__(self, slots: bool = False) -> None:
        self.typical = SPIN_S / 2  # seconds
        self.slots = slots
        self.hits = HITS_KEPT if slots else 0  # counts down at each wait a slot did not end; back up at one it did

    def spin_for(self) -> float:
        """About twice what such waits took lately, at most :data:`SPIN_S`; 0 while they take longer (but
        for slots' waits: see the module)."""
        if self.typical <= SPIN_S:
            return min(SPIN_S, 2 * self.typical)
        if self.slots and (self.hits or time.monotonic() % PROBE_PERIOD_S < PROBE_WINDOW_S):
            return 2 * SPIN_S  # long enough for a round over ZeroMQ, after which the slots may be used
        return 0.0

    def took(self, seconds: float, hit: bool = False) -> None:
        """A wait took ``seconds``; ``hit``: a slot ended it."""
        self.hits = HITS_KEPT if hit else max(0, self.hits - 1)
        # one long wait (an idle spell) counts as just too long, so a few short ones bring the polling back
        self.typical += (min(seconds, 2 * SPIN_S) - self.typical) / 8


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
