"""A virtual cluster: placement groups that worker groups are laid out on.

``VirtualCluster([4, 4])`` reserves two groups of four one-GPU bundles, one
placement group per "node" entry (``STRICT_PACK``: each entry's bundles on
one machine), or a single group over all bundles (``use_unified_pg=True``).
Worker groups then place one worker per bundle; colocated groups share a
bundle's GPU (each takes ``1 / max_colocated_worker_groups`` of it).

``get_master_address_and_port()`` starts a small rendezvous actor next to
bundle 0 that hosts a ``torch.distributed.TCPStore`` on a port the OS picked,
so workers can call ``torch.distributed.init_process_group()`` with no
arguments (they join it as clients: ``TORCHELASTIC_USE_AGENT_STORE=True``).
"""

from __future__ import annotations

from . import api
from .actor import ActorHandle, remote
from .exceptions import PlacementGroupError
from .placement_group import PlacementGroup, placement_group, placement_group_table, remove_placement_group
from .progress import Progress

__all__ = ["VirtualCluster"]


class RendezvousStore:
    """Hosts a TCPStore for one worker group's ``init_process_group()``."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.store = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False)

    def port(self) -> int:
        return int(self.store.port)


_RendezvousStore = remote(RendezvousStore)


class VirtualCluster:
    def __init__(
        self,
        bundle_ct_per_node_list: list[int],
        use_gpus: bool = True,
        num_gpus_per_node: int = 8,
        max_colocated_worker_groups: int = 1,
        name: str = "",
        *,
        use_unified_pg: bool = False,
        cpus_per_bundle: float = 0,
        placement_timeout: float = 180.0,
    ) -> None:
        if not isinstance(bundle_ct_per_node_list, list | tuple) or not bundle_ct_per_node_list:
            raise ValueError("bundle_ct_per_node_list must be a non-empty list of bundle counts")
        for i, n in enumerate(bundle_ct_per_node_list):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"bundle_ct_per_node_list[{i}] must be an int >= 1, not {n!r}")
            if use_gpus and n > num_gpus_per_node:
                raise ValueError(f"node {i} asks for {n} GPU bundles but num_gpus_per_node is {num_gpus_per_node}")
        if (
            isinstance(max_colocated_worker_groups, bool)
            or not isinstance(max_colocated_worker_groups, int)
            or max_colocated_worker_groups < 1
        ):
            raise ValueError(f"max_colocated_worker_groups must be an int >= 1, not {max_colocated_worker_groups!r}")
        self.bundle_ct_per_node_list = list(bundle_ct_per_node_list)
        self.use_gpus = use_gpus
        self.num_gpus_per_node = num_gpus_per_node
        self.max_colocated_worker_groups = max_colocated_worker_groups
        self.name = name
        self.use_unified_pg = use_unified_pg
        bundle: dict[str, float] = {"GPU": 1} if use_gpus else {"CPU": 1}
        if cpus_per_bundle:
            bundle["CPU"] = bundle.get("CPU", 0) + cpus_per_bundle
        self._stores: dict[int, ActorHandle] = {}  # rendezvous stores by port
        self._pgs: list[PlacementGroup] = []
        totals = api.cluster_resources()
        for resource, amount in bundle.items():
            need = amount * sum(self.bundle_ct_per_node_list)
            if need > totals.get(resource, 0):
                raise PlacementGroupError(
                    f"virtual cluster {name!r} can never be placed: its bundles need {need:g} {resource} in all, "
                    f"the cluster has {totals.get(resource, 0):g} (totals: {totals})"
                )
        if use_unified_pg:
            total = sum(self.bundle_ct_per_node_list)
            self._pgs = [placement_group([dict(bundle)] * total, strategy="PACK", name=f"{name}-all" if name else None)]
        else:
            self._pgs = [
                placement_group([dict(bundle)] * n, strategy="STRICT_PACK", name=f"{name}-{i}" if name else None)
                for i, n in enumerate(self.bundle_ct_per_node_list)
            ]
        try:
            self._wait(placement_timeout)
        except BaseException:
            self.shutdown()
            raise

    def _wait(self, timeout: float) -> None:
        """Wait for every group; fail at once, naming why, if one can never be placed."""
        with Progress(len(self._pgs), "reserving placement groups") as progress:
            for i, pg in enumerate(self._pgs):
                table = placement_group_table(pg)
                reason = table.get("pending_reason", "")
                if reason.startswith("infeasible"):
                    raise PlacementGroupError(f"virtual cluster {self.name!r}: placement group {i} is {reason}")
                if not pg.wait(timeout_seconds=timeout):
                    reason = placement_group_table(pg).get("pending_reason", "")
                    raise PlacementGroupError(
                        f"virtual cluster {self.name!r}: placement group {i} was not placed within {timeout} s: {reason}"
                    )
                progress.update()

    def get_placement_groups(self) -> list[PlacementGroup]:
        return list(self._pgs)

    def world_size(self) -> int:
        return sum(self.bundle_ct_per_node_list)

    def node_count(self) -> int:
        return len(self.bundle_ct_per_node_list)

    def bundle_node_addresses(self) -> list[list[str]]:
        """For each placement group, the address of the node each bundle is on."""
        addresses = {n["node_id"]: n["address"] for n in api.nodes()}
        return [[addresses[node] for node in placement_group_table(pg)["bundle_nodes"]] for pg in self._pgs]

    def get_master_address_and_port(self) -> tuple[str, int]:
        """A fresh rendezvous store next to bundle 0: ``(address, port)`` for ``MASTER_ADDR``/``MASTER_PORT``."""
        store = _RendezvousStore.options(placement_group=self._pgs[0], bundle_index=0, num_cpus=0).remote()
        try:
            port = api.get(store.port.remote(), timeout=120)
        except BaseException:
            api.kill(store)
            raise
        self._stores[port] = store
        return self.bundle_node_addresses()[0][0], port

    def release_master_port(self, port: int) -> None:
        """Stop the rendezvous store behind ``port`` (from :meth:`get_master_address_and_port`): its group is done."""
        store = self._stores.pop(port, None)
        if store is not None:
            api.kill(store)

    def shutdown(self) -> bool:
        """Remove the placement groups (their actors die with them) and the rendezvous stores."""
        ok = True
        for pg in getattr(self, "_pgs", []):
            try:
                remove_placement_group(pg)
            except Exception:
                ok = False
        self._pgs = []
        self._stores = {}
        return ok

    def __repr__(self) -> str:
        return f"VirtualCluster({self.name!r}, {self.bundle_ct_per_node_list}, use_gpus={self.use_gpus})"
