"""Placement groups: bundles of resources reserved atomically, by strategy.

A group's bundles are placed all at once or not at all. Once placed, each
bundle is a small pool of its own (its share of a node's CPUs, GPU ids and
custom resources) that actors scheduled into the group draw from.

Strategies, as Ray has them:

- ``STRICT_PACK``: every bundle on one node.
- ``PACK``: on one node if any can hold them all, else filling the nodes
  already used first (in bundle order; if that misses, a bounded search).
- ``STRICT_SPREAD``: every bundle on a different node.
- ``SPREAD``: on different nodes where possible, doubling up only when not
  (the same bounded search if the fill in bundle order misses).

Bundles are placed in order and take GPU ids lowest-first, so on a fresh node
bundle *i* of a group of one-GPU bundles gets GPU *i*.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .resources import Allocation, NodePool, normalize_demand, to_float, to_units

__all__ = ["STRATEGIES", "Bundle", "PlacementGroupRecord", "PlacementGroupState", "infeasibility", "place", "validate_bundles"]

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


class PlacementGroupState(str, enum.Enum):
    """A placement group's lifecycle.

    ::

        PENDING ──▶ CREATED ──▶ REMOVED
           └────────────────────▲

    PENDING: not placeable yet (``pending_reason`` says why). CREATED: every
    bundle is reserved. REMOVED is final: its actors were killed and its
    resources returned.
    """

    PENDING = "PENDING"
    CREATED = "CREATED"
    REMOVED = "REMOVED"


def validate_bundles(bundles: Any, strategy: Any) -> list[dict[str, float]]:
    """Check a group's request; raise ``ValueError`` naming the bad part."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, not {strategy!r}")
    if not isinstance(bundles, list | tuple) or not bundles:
        raise ValueError("bundles must be a non-empty list of resource dicts")
    out = []
    for i, bundle in enumerate(bundles):
        if not isinstance(bundle, Mapping) or not bundle:
            raise ValueError(f"bundle {i} must be a non-empty dict of resources, not {bundle!r}")
        custom = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")}
        try:
            demand = normalize_demand(bundle.get("CPU"), bundle.get("GPU"), custom)
        except ValueError as exc:
            raise ValueError(f"bundle {i}: {exc}") from None
        if not demand:
            raise ValueError(f"bundle {i} asks for nothing: {dict(bundle)!r}")
        out.append(demand)
    return out


@dataclass
class Bundle:
    node_id: str
    allocation: Allocation
    pool: NodePool


@dataclass
class PlacementGroupRecord:
    pg_id: str
    name: str | None
    strategy: str
    bundles: list[dict[str, float]]
    owner: str
    lifetime: str | None = None
    state: PlacementGroupState = PlacementGroupState.PENDING
    placed: list[Bundle] = field(default_factory=list)
    pending_reason: str = ""
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def set_state(self, state: PlacementGroupState) -> None:
        self.state = state
        self.changed.set()
        self.changed = asyncio.Event()

    def view(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.pg_id,
            "name": self.name,
            "state": self.state.value,
            "strategy": self.strategy,
            "bundles": self.bundles,
            "bundle_nodes": [b.node_id for b in self.placed],
            "bundle_gpu_ids": [list(b.allocation.gpu_ids) for b in self.placed],
        }
        if self.state == PlacementGroupState.PENDING:
            out["pending_reason"] = self.pending_reason
        return out


def place(
    strategy: str, bundles: Sequence[Mapping[str, float]], pools: Mapping[str, NodePool]
) -> tuple[list[tuple[str, Allocation]] | None, str]:
    """Reserve every bundle or none: ``([(node_id, allocation) per bundle], "")`` or ``(None, why)``.

    ``pools`` (node id → pool, in preference order) are changed only on success.
    """
    trial = {node_id: pool.copy() for node_id, pool in pools.items()}
    order = list(trial)
    chosen: list[tuple[str, Allocation]] = []

    def take(node_id: str, bundle: Mapping[str, float]) -> bool:
        alloc = trial[node_id].reserve(bundle)
        if alloc is None:
            return False
        chosen.append((node_id, alloc))
        return True

    def one_node() -> bool:
        for node_id in order:
            chosen.clear()
            trial[node_id] = pools[node_id].copy()
            if all(take(node_id, b) for b in bundles):
                return True
        chosen.clear()
        return False

    if strategy == "STRICT_PACK":
        ok = one_node()
    elif strategy == "PACK":
        ok = one_node()
        if not ok:
            trial = {node_id: pool.copy() for node_id, pool in pools.items()}
            for b in bundles:
                used = [n for n, _ in chosen]
                preferred = sorted(order, key=lambda n: -used.count(n))  # nodes already used first
                if not any(take(n, b) for n in preferred):
                    break
            ok = len(chosen) == len(bundles)
    elif strategy == "STRICT_SPREAD":
        nodes = _distinct_nodes(bundles, order, lambda n, b: trial[n].fits(b))
        ok = nodes is not None and all(take(n, b) for n, b in zip(nodes, bundles, strict=True))
    else:  # SPREAD
        for b in bundles:
            counts = {n: sum(1 for c, _ in chosen if c == n) for n in order}
            preferred = sorted(order, key=lambda n: counts[n])  # least used first, stable
            if not any(take(n, b) for n in preferred):
                break
        ok = len(chosen) == len(bundles)
    if not ok and strategy in ("PACK", "SPREAD") and len(bundles) <= _SEARCH_BUNDLES:  # the greedy fill in
        # bundle order can miss a fit that exists
        nodes = _search(bundles, pools, order, most_used_first=strategy == "PACK")
        if nodes is not None:
            trial = {node_id: pool.copy() for node_id, pool in pools.items()}
            chosen.clear()
            ok = all(take(n, b) for n, b in zip(nodes, bundles, strict=True))  # in bundle order: GPU ids lowest-first
    if not ok:
        return None, _why(strategy, bundles, pools)
    for node_id, alloc in chosen:
        pools[node_id].take(alloc)
    return chosen, ""


# bound the backtracking of _search (a group too hard to fit stays pending instead): the head runs it for every
# pending group each time it schedules, on its loop
_SEARCH_STEPS = 2_000
_SEARCH_LOOKS = 50_000  # nodes looked at in all (a big cluster: each costs a reservation attempt)
_SEARCH_BUNDLES = 64  # (one level of recursion per bundle)


def _search(
    bundles: Sequence[Mapping[str, float]], pools: Mapping[str, NodePool], order: list[str], *, most_used_first: bool
) -> list[str] | None:
    """A node per bundle such that every node holds its bundles; None if none was found within the bound.

    Depth first, biggest bundles first (GPUs, then custom resources, then CPUs), backtracking where a
    choice leaves a later bundle nowhere to go. Nodes are tried by how many bundles they hold already
    (PACK: most first; SPREAD: fewest first), then in ``order``.
    """
    trial = {node_id: pool.copy() for node_id, pool in pools.items()}
    biggest_first = sorted(range(len(bundles)), key=lambda i: _size(bundles[i]), reverse=True)
    could = [[n for n in order if pools[n].fits(b, of_total=True)] for b in bundles]  # nodes big enough at all
    node_of: list[str | None] = [None] * len(bundles)
    held = dict.fromkeys(order, 0)
    steps = looked = 0

    def go(k: int) -> bool:
        nonlocal steps, looked
        if k == len(biggest_first):
            return True
        i = biggest_first[k]
        for n in sorted(could[i], key=lambda n: -held[n] if most_used_first else held[n]):
            looked += 1
            if looked > _SEARCH_LOOKS:
                return False
            alloc = trial[n].reserve(bundles[i])
            if alloc is None:
                continue
            steps += 1  # placements tried (a node that cannot take the bundle now costs only a look)
            if steps > _SEARCH_STEPS:
                trial[n].release(alloc)
                return False
            node_of[i], held[n] = n, held[n] + 1
            if go(k + 1):
                return True
            trial[n].release(alloc)
            node_of[i], held[n] = None, held[n] - 1
        return False

    if not go(0):
        return None
    return [n for n in node_of if n is not None]


def _size(bundle: Mapping[str, float]) -> tuple[float, float, float]:
    return (bundle.get("GPU", 0), sum(v for k, v in bundle.items() if k not in ("CPU", "GPU")), bundle.get("CPU", 0))


def _distinct_nodes(
    bundles: Sequence[Mapping[str, float]], order: list[str], fits: Callable[[str, Mapping[str, float]], bool]
) -> list[str] | None:
    """A node per bundle, no two the same, each fitting its bundle; None if there is no such choice.

    A bipartite matching (augmenting paths): taking, bundle by bundle, the first node that fits can
    miss one that exists (a GPU node taken by a CPU bundle that any node could have held).
    Preferring ``order``.
    """
    holder: dict[str, int] = {}  # node -> the bundle it holds

    def assign(i: int, seen: set[str]) -> bool:
        for n in order:
            if n in seen or not fits(n, bundles[i]):
                continue
            seen.add(n)
            if n not in holder or assign(holder[n], seen):
                holder[n] = i
                return True
        return False

    if not all(assign(i, set()) for i in range(len(bundles))):
        return None
    node_of = {i: n for n, i in holder.items()}
    return [node_of[i] for i in range(len(bundles))]


def _why(strategy: str, bundles: Sequence[Mapping[str, float]], pools: Mapping[str, NodePool], label: str = "is free") -> str:
    need: dict[str, int] = {}
    for b in bundles:
        for k, v in b.items():
            need[k] = need.get(k, 0) + to_units(v)
    free: dict[str, int] = {}
    for pool in pools.values():
        for k, v in pool.free.items():
            free[k] = free.get(k, 0) + v
    nodes = len(pools)
    if strategy == "STRICT_SPREAD" and len(bundles) > nodes:
        return f"STRICT_SPREAD needs {len(bundles)} nodes, the cluster has {nodes}"
    if any(free.get(k, 0) < v for k, v in need.items()):
        return f"the cluster lacks resources: needs {to_float(need)} in all, {to_float(free)} {label}"
    if strategy == "STRICT_PACK":
        return f"no single node has {to_float(need)} ({label.removeprefix('is ')})"
    return f"the bundles {list(bundles)} do not fit the free resources of the {nodes} node(s) with strategy {strategy}"


def infeasibility(strategy: str, bundles: Sequence[Mapping[str, float]], pools: Mapping[str, NodePool]) -> str | None:
    """Why the group could never be placed, even on this cluster emptied; None if it could."""
    empty = {node_id: pool.copy(empty=True) for node_id, pool in pools.items()}
    placed, _ = place(strategy, bundles, empty)
    return None if placed is not None else _why(strategy, bundles, empty, label="in total")
