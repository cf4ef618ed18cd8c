"""The actor table's rows: what was asked (:class:`ActorSpec`) and what is (:class:`ActorRecord`)."""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field
from typing import Any

from .resources import Allocation, NodePool

__all__ = ["ActorRecord", "ActorSpec", "ActorState"]


class ActorState(str, enum.Enum):
    """An actor's lifecycle.

    ::

        PENDING ──▶ STARTING ──▶ ALIVE ──▶ DEAD
           │         ▲  │           │        ▲
           │         │  │           ▼        │  (constructor raised, worker died, killed)
           │      RESTARTING ◀──────┴────────┤  (worker or node lost, restarts left)
           └─────────────────────────────────┘  (killed while waiting)

    PENDING: waiting for resources. STARTING: a worker process is running the
    constructor. ALIVE: serving calls at ``address``. RESTARTING: its worker
    was lost and ``max_restarts`` allows another; it waits for resources (in
    the same bundle, for an actor of a placement group) like PENDING, and its
    constructor then runs again with the same arguments. DEAD is final.
    """

    PENDING = "PENDING"
    STARTING = "STARTING"
    ALIVE = "ALIVE"
    RESTARTING = "RESTARTING"
    DEAD = "DEAD"

    @property
    def waiting(self) -> bool:
        """Waiting to be placed."""
        return self in (ActorState.PENDING, ActorState.RESTARTING)


@dataclass(frozen=True)
class ActorSpec:
    """How the driver asked for the actor. ``payload`` is opaque: the head never unpickles it."""

    actor_id: str
    class_name: str
    methods: dict[str, int]
    payload: bytes
    demand: dict[str, float]
    owner: str  # job id of the driver that created it
    name: str | None = None
    namespace: str = "default"
    lifetime: str | None = None
    max_concurrency: int = 1000
    env_vars: dict[str, str] = field(default_factory=dict)
    sys_path: list[str] = field(default_factory=list)
    placement_group: str | None = None
    bundle_index: int = -1
    max_restarts: int = 0  # -1: forever
    max_task_retries: int = 0  # for callers: how often a call in flight when the worker died is sent again

    @classmethod
    def from_wire(cls, d: dict[str, Any], owner: str) -> ActorSpec:
        """The spec a peer sent; ``TypeError`` or ``ValueError`` naming the first field that is not what it
        must be (the head acts on every field later, from tasks a bad value must not bring down)."""
        if not isinstance(d, dict):
            raise TypeError("an actor spec is a map")
        fields = {k: d[k] for k in cls.__dataclass_fields__ if k in d and k != "owner"}
        for name, value in fields.items():
            _check_field(name, value)
        return cls(owner=owner, **fields)

    def public(self) -> dict[str, Any]:
        """What a handle needs; no payload."""
        return {
            "actor_id": self.actor_id,
            "class_name": self.class_name,
            "methods": self.methods,
            "name": self.name,
            "namespace": self.namespace,
            "max_task_retries": self.max_task_retries,
        }


def _is_int(value: Any) -> bool:
    return type(value) is int


# field -> (what it must be, the check)
_FIELD_CHECKS: dict[str, tuple[str, Any]] = {
    "actor_id": ("a string", lambda v: isinstance(v, str) and v != ""),
    "class_name": ("a string", lambda v: isinstance(v, str)),
    "methods": ("a map of names to ints", lambda v: isinstance(v, dict) and all(isinstance(k, str) and _is_int(n) for k, n in v.items())),
    "payload": ("bytes", lambda v: isinstance(v, bytes)),
    "demand": (
        "a map of resource names to amounts >= 0",
        lambda v: isinstance(v, dict) and all(isinstance(k, str) and type(n) in (int, float) and n >= 0 for k, n in v.items()),
    ),
    "name": ("a string or None", lambda v: v is None or isinstance(v, str)),
    "namespace": ("a string", lambda v: isinstance(v, str)),
    "lifetime": ('None or "detached"', lambda v: v in (None, "detached")),
    "max_concurrency": ("an int >= 1", lambda v: _is_int(v) and v >= 1),
    "env_vars": ("a map of strings to strings", lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str) for k, x in v.items())),
    "sys_path": ("a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)),
    "placement_group": ("a string or None", lambda v: v is None or isinstance(v, str)),
    "bundle_index": ("an int", _is_int),
    "max_restarts": ("an int >= -1", lambda v: _is_int(v) and v >= -1),
    "max_task_retries": ("an int >= -1", lambda v: _is_int(v) and v >= -1),
}


def _check_field(name: str, value: Any) -> None:
    what, ok = _FIELD_CHECKS[name]
    if not ok(value):
        raise ValueError(f"{name} must be {what}, not {value!r:.80}")


@dataclass
class ActorRecord:
    spec: ActorSpec
    state: ActorState = ActorState.PENDING
    node_id: str | None = None
    pid: int | None = None
    address: str | None = None
    allocation: Allocation | None = None
    pool: NodePool | None = None  # where ``allocation`` came from: a node, or a placement-group bundle
    death: dict[str, Any] | None = None
    kill_requested: bool = False
    restarts: int = 0
    last_seen: float = 0.0  # the loop time of its worker's last heartbeat
    retired_pids: set[int] = field(default_factory=set)  # earlier incarnations' processes
    job_namespace: str = ""  # its job's (driver's) namespace, which code in the actor runs in: not its name's
    children: set[str] = field(default_factory=set)  # actors this one made (not detached): they go when its worker goes
    child_groups: set[str] = field(default_factory=set)  # placement groups it made, likewise
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def set_state(self, state: ActorState) -> None:
        self.state = state
        self.changed.set()
        self.changed = asyncio.Event()

    def view(self) -> dict[str, Any]:
        return {
            **self.spec.public(),
            "state": self.state.value,
            "node_id": self.node_id,
            "pid": self.pid,
            "address": self.address,
            "death": self.death,
            "resources": self.spec.demand,
            "gpu_ids": list(self.allocation.gpu_ids) if self.allocation else [],
            "restarts": self.restarts,
            "max_restarts": self.spec.max_restarts,
        }

    def may_restart(self) -> bool:
        return not self.kill_requested and (self.spec.max_restarts == -1 or self.restarts < self.spec.max_restarts)
