"""Placement groups: reserve bundles of resources atomically, then place actors into them."""

from __future__ import annotations

import asyncio
import uuid
import warnings
from typing import Any

from scheduler.placement import validate_bundles

from . import runtime

__all__ = ["PlacementGroup", "placement_group", "placement_group_table", "remove_placement_group"]


class PlacementGroup:
    """A handle on a placement group. Serializable: actors can receive it."""

    def __init__(self, pg_id: str, bundles: list[dict[str, float]], strategy: str, name: str | None = None) -> None:
        self.id = pg_id
        self._bundles = bundles
        self.strategy = strategy
        self.name = name

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
        return rt.run(rt.control("wait_placement_group", pg_id=self.id, timeout_s=timeout_seconds))

    async def ready(self) -> PlacementGroup:
        """Await until every bundle is reserved (from any event loop)."""
        rt = runtime.current()
        coro = rt.control("wait_placement_group", pg_id=self.id, timeout_s=None)
        if rt.in_loop():
            await coro
        else:
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, rt.loop))
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

    Returns at once; the group may still be pending: ``pg.wait()`` or
    ``await pg.ready()``. A group that this cluster could never hold stays
    pending and is reported with a warning naming why.
    """
    checked = validate_bundles(bundles, strategy)
    if name is not None and (not isinstance(name, str) or not name):
        raise ValueError(f"name must be a non-empty string, not {name!r}")
    if lifetime not in (None, "detached"):
        raise ValueError(f"lifetime must be None or 'detached', not {lifetime!r}")
    rt = runtime.current()
    pg_id = uuid.uuid4().hex
    view = rt.run(
        rt.control("create_placement_group", pg_id=pg_id, bundles=checked, strategy=strategy, name=name, lifetime=lifetime)
    )
    reason = view.get("pending_reason", "")
    if reason.startswith("infeasible"):
        warnings.warn(f"placement group {pg_id[:8]} is {reason}", stacklevel=2)
    return PlacementGroup(pg_id, checked, strategy, name)


def remove_placement_group(pg: PlacementGroup) -> None:
    """Kill the actors in the group and free its resources."""
    if not isinstance(pg, PlacementGroup):
        raise TypeError(f"remove_placement_group() takes a PlacementGroup, not {type(pg).__name__}")
    rt = runtime.current()
    rt.run(rt.control("remove_placement_group", pg_id=pg.id))


def placement_group_table(pg: PlacementGroup | None = None) -> dict[str, Any]:
    """One group's record (``id``, ``name``, ``state``, ``strategy``, ``bundles``,
    ``bundle_nodes``, and ``pending_reason`` while pending), or every group by id."""
    rt = runtime.current()
    if pg is not None and not isinstance(pg, PlacementGroup):
        raise TypeError(f"placement_group_table() takes a PlacementGroup or nothing, not {type(pg).__name__}")
    return rt.run(rt.control("placement_group_table", pg_id=None if pg is None else pg.id))
