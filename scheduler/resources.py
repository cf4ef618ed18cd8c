"""Resource amounts and a node's pool of them.

Amounts are kept as integers in units of 1/10 000 (as Ray does), so that
``0.1 + 0.2`` GPUs free up exactly. ``CPU``, ``GPU`` and any custom name are
all just resources; GPUs also have *ids*: each physical (or logical) device
has a capacity of one, shared by fractional demands.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["Allocation", "NodePool", "detect_gpu_ids", "node_resources", "normalize_demand", "to_float", "to_units"]

UNIT = 10_000


def to_units(amount: float) -> int:
    return round(amount * UNIT)


def to_float(units: Mapping[str, int]) -> dict[str, float]:
    return {k: v / UNIT for k, v in units.items() if v}


def normalize_demand(
    num_cpus: float | None = None, num_gpus: float | None = None, resources: Mapping[str, float] | None = None
) -> dict[str, float]:
    """Validate a demand and return it as ``{name: amount}``; raise ``ValueError`` naming the bad part."""
    demand: dict[str, float] = {}
    given = [("CPU", "num_cpus", num_cpus), ("GPU", "num_gpus", num_gpus)]
    given += [(name, f"resources[{name!r}]", amount) for name, amount in (resources or {}).items()]
    for name, label, amount in given:
        if amount is None:
            continue
        if not isinstance(name, str) or not name:
            raise ValueError(f"resource names must be non-empty strings, not {name!r}")
        if isinstance(amount, bool) or not isinstance(amount, int | float) or not math.isfinite(amount) or amount < 0:
            raise ValueError(f"{label} must be a finite number >= 0, not {amount!r}")
        if amount and abs(to_units(amount) - amount * UNIT) > 1e-6:
            raise ValueError(f"{label}={amount} is finer than 1/{UNIT}")
        if name == "GPU" and amount > 1 and amount != int(amount):
            raise ValueError(f"num_gpus={amount}: more than one GPU must be a whole number")
        if amount:
            demand[name] = float(amount)
    if resources and ("CPU" in resources or "GPU" in resources):
        raise ValueError("give CPU and GPU as num_cpus/num_gpus, not in resources")
    return demand


def detect_gpu_ids() -> list[str]:
    """The GPUs this node may use, without creating a CUDA context.

    A ``CUDA_VISIBLE_DEVICES`` already set limits the node to exactly those
    devices; otherwise the devices the NVIDIA driver lists are counted.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    try:
        return [str(i) for i in range(len(os.listdir("/proc/driver/nvidia/gpus")))]
    except OSError:
        return []


def node_resources(
    num_cpus: float | None, num_gpus: int | None, resources: Mapping[str, float] | None
) -> tuple[dict[str, float], list[str]]:
    """A node's totals and GPU ids, declared or detected.

    ``num_gpus=None`` uses the GPUs the node can see (see :func:`detect_gpu_ids`);
    ``num_gpus=N`` declares N logical GPUs — the first N visible ids if there
    are that many, else ``0..N-1`` — which behave exactly like real ones.
    """
    normalize_demand(num_cpus, num_gpus, resources)
    visible = detect_gpu_ids()
    if num_gpus is None:
        gpu_ids = visible
    else:
        gpu_ids = visible[:num_gpus] if len(visible) >= num_gpus else [str(i) for i in range(num_gpus)]
    cpus = float(os.cpu_count() or 1) if num_cpus is None else float(num_cpus)
    return {"CPU": cpus, "GPU": float(len(gpu_ids)), **(resources or {})}, gpu_ids


@dataclass
class Allocation:
    """What one reservation took from a node: amounts and GPU ids."""

    units: dict[str, int]
    gpu_ids: list[str] = field(default_factory=list)
    gpu_units: int = 0  # per GPU id when fractional, else UNIT


class NodePool:
    """A pool's totals and what is free, with GPU ids handed out predictably.

    A node is a pool; so is each reserved placement-group bundle. Whole-GPU
    demands take the lowest free ids; fractional ones go to the most-used
    device they still fit on (so fractions pack together). ``gpu_capacity``
    gives each id's capacity in units (default: one whole GPU each).
    """

    def __init__(self, totals: Mapping[str, float], gpu_ids: list[str] | None = None, gpu_capacity: int = UNIT) -> None:
        self.total = {k: to_units(v) for k, v in totals.items() if v}
        self.free = dict(self.total)
        gpu_units = self.total.get("GPU", 0)
        if gpu_ids is None:
            gpu_ids = [str(i) for i in range(gpu_units // UNIT)]
        if len(gpu_ids) * gpu_capacity != gpu_units:
            raise ValueError(f"{gpu_units / UNIT} GPUs declared but {len(gpu_ids)} GPU ids given")
        self.gpu_cap: dict[str, int] = {gid: gpu_capacity for gid in gpu_ids}
        self.gpu_free: dict[str, int] = dict(self.gpu_cap)

    def copy(self, *, empty: bool = False) -> NodePool:
        """A twin to try reservations on; ``empty=True``: as if nothing were reserved."""
        twin = NodePool.__new__(NodePool)
        twin.total, twin.gpu_cap = dict(self.total), dict(self.gpu_cap)
        twin.free = dict(self.total if empty else self.free)
        twin.gpu_free = dict(self.gpu_cap if empty else self.gpu_free)
        return twin

    def fits(self, demand: Mapping[str, float], *, of_total: bool = False) -> bool:
        pool = self.total if of_total else self.free
        for name, amount in demand.items():
            if pool.get(name, 0) < to_units(amount):
                return False
        gpus = demand.get("GPU", 0)
        if gpus and not of_total:
            return self._pick_gpus(gpus) is not None
        return True

    def _pick_gpus(self, amount: float) -> list[str] | None:
        need = to_units(amount)
        if need >= UNIT:
            free = [g for g, units in self.gpu_free.items() if units == UNIT]
            count = need // UNIT
            return free[:count] if len(free) >= count else None
        fitting = [g for g, units in self.gpu_free.items() if units >= need]
        if not fitting:
            return None
        return [min(fitting, key=lambda g: self.gpu_free[g])]  # min() keeps the lowest id on ties

    def reserve(self, demand: Mapping[str, float]) -> Allocation | None:
        if not self.fits(demand):
            return None
        units = {k: to_units(v) for k, v in demand.items()}
        gpu_ids: list[str] = []
        per_gpu = 0
        if units.get("GPU"):
            gpu_ids = self._pick_gpus(demand["GPU"]) or []
            per_gpu = min(units["GPU"], UNIT)
            for g in gpu_ids:
                self.gpu_free[g] -= per_gpu
        for k, v in units.items():
            self.free[k] -= v
        return Allocation(units, gpu_ids, per_gpu)

    def take(self, alloc: Allocation) -> None:
        """Apply an allocation computed on a :meth:`copy` of this pool."""
        for k, v in alloc.units.items():
            self.free[k] -= v
        for g in alloc.gpu_ids:
            self.gpu_free[g] -= alloc.gpu_units

    def release(self, alloc: Allocation) -> None:
        for k, v in alloc.units.items():
            self.free[k] = min(self.free.get(k, 0) + v, self.total.get(k, 0))
        for g in alloc.gpu_ids:
            if g in self.gpu_free:
                self.gpu_free[g] = min(self.gpu_free[g] + alloc.gpu_units, self.gpu_cap[g])
