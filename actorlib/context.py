"""What an actor (or the driver) can ask about where it runs."""

from __future__ import annotations

from dataclasses import dataclass

from . import runtime

__all__ = ["RuntimeContext", "get_gpu_ids", "get_runtime_context"]


@dataclass(frozen=True)
class RuntimeContext:
    node_id: str
    actor_id: str | None
    actor_name: str | None
    namespace: str
    job_id: str

    def get_node_id(self) -> str:
        return self.node_id

    def get_actor_id(self) -> str | None:
        """This actor's id; ``None`` in the driver."""
        return self.actor_id

    def get_actor_name(self) -> str | None:
        return self.actor_name

    def get_job_id(self) -> str:
        return self.job_id


def get_runtime_context() -> RuntimeContext:
    rt = runtime.current()
    return RuntimeContext(rt.node_id, rt.actor_id, rt.actor_name, rt.namespace, rt.job_id)


def get_gpu_ids() -> list[int | str]:
    """The GPU ids this actor was given (as in its ``CUDA_VISIBLE_DEVICES``); ``[]`` in the driver."""
    return [int(g) if g.isdigit() else g for g in runtime.current().gpu_ids]
