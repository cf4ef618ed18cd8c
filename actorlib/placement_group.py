"""Placement groups: reserve bundles of resources atomically, then place actors into them."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import sys
import uuid
import warnings
from typing import Any

from scheduler.placement import validate_bundles

from . import runtime
from .exceptions import ActorLibError, PlacementGroupError

__all__ = ["PlacementGroup", "placement_group", "placement_group_table", "remove_placement_group"]


class PlacementGroup:
    """A handle on a placement group. Serializable: actors can receive it."""

    def __init__(self, pg_id: str, bundles: list[dict[str, float]], strategy: str, name: str | None = None) -> None:
        self.id = pg_id
        self._bundles = bundles
        self.strategy = strategy
        self.name = name
        self._created: concurrent.futures.Future[dict[str, Any]] | None = None  # the head's answer, in the creator

    def _check_created(self) -> None:
        """Raise what the head refused, and warn when the group can never be placed."""
        if self._created is None:
            return
        view = self._created.result(timeout=60)  # raises the head's refusal (a taken name ...)
        reason = view.get("pending_reason", "")
        if reason.startswith("infeasible"):
            warnings.warn(f"placement group {self.id[:8]} is {reason}", stacklevel=3)

    @property
    def bundle_specs(self) -> list[dict[str, float]]:
        return [dict(b) for b in self._bundles]

    @property
    def bundle_count(self) -> int:
        return len(self._bundles)

    def wait(self, timeout_seconds: float | None = 30) -> bool:
        """Wait until every bundle is reserved: True, or False once ``timeout_seconds`` pass."""
        if timeout_seconds is not None and timeout_seconds < 0:
            raise ValueError(f"timeout_seconds must be >= 0, not {timeout_seconds!r}")
        rt = runtime.current()
        try:
            if rt.run(rt.control("wait_placement_group", pg_id=self.id, timeout_s=timeout_seconds)):
                return True
        except (ActorLibError, ValueError):
            self._check_created()  # the head's refusal of the group says more than "no such group"
            raise
        self._check_created()
        return False

    async def ready(self) -> PlacementGroup:
        """Await until every bundle is reserved (from any event loop); raise if the group was refused or removed."""
        rt = runtime.current()
        coro = rt.control("wait_placement_group", pg_id=self.id, timeout_s=None)
        try:
            if rt.in_loop():
                placed = await coro
            else:
                placed = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, rt.loop))
        except (ActorLibError, ValueError):
            if self._created is not None and self._created.done():
                self._created.result()
            raise
        if not placed:
            raise PlacementGroupError(f"placement group {self.id[:8]} was removed before it was placed")
        return self

    def __reduce__(self) -> Any:
        return (PlacementGroup, (self.id, self._bundles, self.strategy, self.name))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PlacementGroup) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        return f"PlacementGroup({self.id[:12]}, {self.strategy}, {self.bundle_count} bundles)"


def placement_group(
    bundles: list[dict[str, float]], strategy: str = "PACK", name: str | None = None, lifetime: str | None = None
) -> PlacementGroup:
    """Reserve ``bundles`` (e.g. ``[{"GPU": 1, "CPU": 1}] * 4``) all at once, by ``strategy``.

    Returns at once — the request goes to the head without a round trip —
    and the group may still be pending: ``pg.wait()`` or ``await pg.ready()``.
    A group that this cluster could never hold stays pending and is reported
    with a warning naming why, as soon as the head answers and again when
    ``wait()`` gives up; a refusal (a taken name) raises from ``wait()``.
    """
    checked = validate_bundles(bundles, strategy)
    if name is not None and (not isinstance(name, str) or not name):
        raise ValueError(f"name must be a non-empty string, not {name!r}")
    if lifetime not in (None, "detached"):
        raise ValueError(f"lifetime must be None or 'detached', not {lifetime!r}")
    rt = runtime.current()
    pg = PlacementGroup(uuid.uuid4().hex, checked, strategy, name)
    pg._created = concurrent.futures.Future()
    rt.post_control(
        "create_placement_group",
        pg._created,
        pg_id=pg.id,
        bundles=checked,
        strategy=strategy,
        name=name,
        lifetime=lifetime,
        creator=rt.actor_id,  # made by an actor: it goes with that actor's driver (see the head)
    )
    caller = sys._getframe(1)  # the warning names the user's line (not actorlib's, nor where the answer is read)
    while caller.f_back is not None and str(caller.f_globals.get("__name__", "")).startswith("actorlib."):
        caller = caller.f_back
    where = (caller.f_code.co_filename, caller.f_lineno, caller.f_globals.get("__name__", ""))
    pg._created.add_done_callback(functools.partial(_warn_if_infeasible, where))
    return pg


def _warn_if_infeasible(where: tuple[str, int, str], created: concurrent.futures.Future[dict[str, Any]]) -> None:
    if created.exception() is None and created.result().get("pending_reason", "").startswith("infeasible"):
        view = created.result()
        filename, lineno, module = where
        warnings.warn_explicit(f"placement group {view['id'][:8]} is {view['pending_reason']}", UserWarning, filename, lineno, module)


def remove_placement_group(pg: PlacementGroup) -> None:
    """Kill the actors in the group and free its resources.

    Returns at once; any later request from this thread (creating an actor,
    reading ``available_resources()``) is served after the removal.
    """
    if not isinstance(pg, PlacementGroup):
        raise TypeError(f"remove_placement_group() takes a PlacementGroup, not {type(pg).__name__}")
    runtime.current().post_control("remove_placement_group", concurrent.futures.Future(), pg_id=pg.id)


def placement_group_table(pg: PlacementGroup | None = None) -> dict[str, Any]:
    """One group's record (``id``, ``name``, ``state``, ``strategy``, ``bundles``,
    ``bundle_nodes``, and ``pending_reason`` while pending), or every group by id."""
    rt = runtime.current()
    if pg is not None and not isinstance(pg, PlacementGroup):
        raise TypeError(f"placement_group_table() takes a PlacementGroup or nothing, not {type(pg).__name__}")
    return rt.run(rt.control("placement_group_table", pg_id=None if pg is None else pg.id))
