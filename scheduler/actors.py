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
        fields = {k: d[k] for k in cls.__dataclass_fields__ if k in d and k != "owner"}
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
