"""Helpers for testing code that uses actorlib: more nodes on one machine."""

from __future__ import annotations

from . import api

__all__ = ["add_node", "remove_node"]


def add_node(*, num_cpus: float | None = None, num_gpus: int | None = None, resources: dict[str, float] | None = None) -> str:
    """Start another node agent on this machine, joined to the embedded head; returns its node id.

    Each node declares its own resources, so placement across several nodes
    can be tested on one machine. The node dies with the driver.
    """
    return api.driver().add_node(num_cpus, num_gpus, resources)


def remove_node(node_id: str) -> None:
    """Stop a node started by :func:`add_node`; its workers die with it."""
    api.driver().remove_node(node_id)
