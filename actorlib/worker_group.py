"""Worker groups: one actor per bundle of a virtual cluster, called as a whole.

A ``WorkerGroup`` starts its workers concurrently, each with the environment
torch.distributed expects (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``, ``NODE_RANK``, and ``CUDA_VISIBLE_DEVICES``
from its bundle), then dispatches calls to all of them:

- ``run_single_worker_single_data``: one worker;
- ``run_all_workers_single_data``: the same arguments to every worker (encoded once);
- ``run_all_workers_multiple_data``: one entry of each argument per worker;
- ``run_all_workers_sharded_data``: arguments nested per sharded axis of the
  group's :class:`NamedSharding`; replicated axes get the same slice; *free*
  axes (neither) are called only at index 0 (or with ``None``, with
  ``make_dummy_calls_to_free_axes``); results come back once per coordinate
  not in ``output_is_replicated``.

Tied groups (``bundle_indices_list=[(node, [bundles...]), ...]``) are workers
that serve one model together; only each group's leader receives
``bundle_indices=(node, [bundles...])`` in its constructor.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from . import api, broadcast, runtime
from .actor import ActorClass, ActorHandle, remote
from .cluster import VirtualCluster
from .exceptions import ActorDiedError, ActorLibError, GetTimeoutError
from .object_ref import ObjectRef, ObjectRefGenerator
from .progress import Progress
from .rank_program import RUN_METHOD
from .sharding import NamedSharding
from .spmd import RunResult, WorkerFailure, WorkerGroupError, gather
from .worker import ASYNC_GENERATOR, GENERATOR, SYNC

log = logging.getLogger(__name__)

__all__ = ["MultiWorkerFuture", "WorkerGroup"]


@dataclass
class MultiWorkerFuture:
    """Futures of one dispatch to a group, and which workers' results count."""

    futures: list[Any]
    called_workers: list[int] = field(default_factory=list)
    return_from_workers: list[int] | None = None
    worker_metadata: list[dict[str, Any]] = field(default_factory=list)  # of the whole group, by rank
    failure_grace_s: float = 5.0

    def get_results(
        self, worker_group: WorkerGroup | None = None, return_generators_as_proxies: bool = False, timeout: float | None = None
    ) -> list[Any]:
        """One result per returned worker, in worker order.

        Generator methods: the items of every returned worker's stream, in
        order (or the ObjectRefGenerators themselves with ``return_generators_as_proxies``).
        """
        keep = self._kept()
        if return_generators_as_proxies:
            return [self.futures[i] for i in keep]
        kept = [self.futures[i] for i in keep]
        ranks = self.called_workers or list(range(len(self.futures)))
        if not any(isinstance(f, ObjectRefGenerator) for f in kept):
            # Every called worker is watched, not only the returned ones: one failure fails the whole dispatch.
            meta = self.worker_metadata or [{} for _ in range(max(ranks, default=-1) + 1)]
            values = gather(self.futures, ranks, meta, timeout, self.failure_grace_s, "this dispatch")
            return [values[i] for i in keep]
        # Every called worker's stream is read, all at once (a thread each): one worker's stream may only
        # progress while another's is read, as in a collective; the items of workers not returned are
        # dropped as they come, and their failures count. One that fails gives the others
        # failure_grace_s to finish (or fail) too, as for plain methods.
        returned = set(keep)
        items: list[list[Any]] = [[] for _ in self.futures]
        failures: list[WorkerFailure] = []
        ended = threading.Condition()
        streams = [(i, g) for i, g in enumerate(self.futures) if isinstance(g, ObjectRefGenerator)]
        left = [len(streams)]
        first_failure: list[float] = []

        def drain(i: int, gen: ObjectRefGenerator) -> None:
            try:
                for ref in gen:
                    value = api.get(ref)
                    if i in returned:
                        items[i].append(value)
            except BaseException as exc:  # (not only ActorLibError: nothing a stream raises may go unseen)
                rank = ranks[i]
                meta = self.worker_metadata[rank] if rank < len(self.worker_metadata) else {}
                failures.append(WorkerFailure.from_error(rank, meta, exc, time.time()))
                first_failure.append(time.monotonic())
            finally:
                with ended:
                    left[0] -= 1
                    ended.notify_all()

        for i, g in streams:
            threading.Thread(target=drain, args=(i, g), daemon=True, name="actorlib-stream").start()
        deadline = None if timeout is None else time.monotonic() + timeout
        with ended:
            while left[0]:
                limit = first_failure[0] + self.failure_grace_s if first_failure else deadline
                remaining = None if limit is None else limit - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                ended.wait(remaining)
            unfinished = left[0]
        if failures:
            raise WorkerGroupError(sorted(failures, key=lambda f: f.time), len(self.futures), "this dispatch")
        if unfinished:
            raise GetTimeoutError(f"{unfinished} of {len(streams)} streams did not finish within {timeout} s")
        out: list[Any] = []
        for i in keep:
            fut = self.futures[i]
            out.extend(items[i]) if isinstance(fut, ObjectRefGenerator) else out.append(api.get(fut, timeout=timeout))
        return out

    def _kept(self) -> list[int]:
        """Positions in ``futures`` whose results are returned."""
        if self.return_from_workers is None:
            return list(range(len(self.futures)))
        position = {worker: i for i, worker in enumerate(self.called_workers)}
        return [position[w] for w in self.return_from_workers if w in position]


class WorkerGroup:
    def __init__(
        self,
        cluster: VirtualCluster,
        actor_class: Any,
        *init_args: Any,
        workers_per_node: int | list[int] | None = None,
        bundle_indices_list: list[tuple[int, list[int]]] | None = None,
        sharding_annotations: NamedSharding | None = None,
        env_vars: dict[str, str] | None = None,
        name_prefix: str = "",
        py_executable: str | None = None,
        start_timeout: float = 300.0,
        **init_kwargs: Any,
    ) -> None:
        self.cluster = cluster
        self.name_prefix = name_prefix
        self._cls = _actor_class(actor_class)
        self._workers: list[ActorHandle] = []
        self._worker_metadata: list[dict[str, Any]] = []
        self._broadcast: broadcast.Broadcast | None = None  # shared-memory slots for calls (actorlib.broadcast)
        self.tied_workers_groups: list[list[int]] = []
        env_vars = dict(env_vars or {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in env_vars.items()):
            raise ValueError("env_vars must be a dict of str to str")
        pgs = cluster.get_placement_groups()
        self._explicit_ties = bundle_indices_list is not None  # then every group's leader gets bundle_indices
        if bundle_indices_list is None:
            bundle_indices_list = _one_worker_per_bundle(pgs, cluster, workers_per_node)
        _check_bundle_indices(bundle_indices_list, pgs, cluster.use_unified_pg)
        self.world_size = sum(len(b) for _, b in bundle_indices_list)
        if sharding_annotations is not None and sharding_annotations.size != self.world_size:
            raise ValueError(
                f"the sharding annotations cover {sharding_annotations.size} ranks but the group has {self.world_size} workers"
            )
        self.sharding_annotations = sharding_annotations
        self._recipe = (bundle_indices_list, pgs, env_vars, py_executable, init_args, init_kwargs, start_timeout)
        self._start()

    def _start(self) -> None:
        """Create every worker (with a fresh rendezvous for torch.distributed) and wait until all have started."""
        bundle_indices_list, pgs, env_vars, py_executable, init_args, init_kwargs, start_timeout = self._recipe
        self.master_address, self.master_port = self.cluster.get_master_address_and_port()
        try:
            self._create(bundle_indices_list, pgs, env_vars, py_executable, init_args, init_kwargs)
            self._wait_started(start_timeout)
            self._offer_broadcast()
        except BaseException:
            self.shutdown(force=True)  # nothing half-started is left holding GPUs
            raise

    def _create(
        self,
        bundle_indices_list: list[tuple[int, list[int]]],
        pgs: list[Any],
        env_vars: dict[str, str],
        py_executable: str | None,
        init_args: tuple[Any, ...],
        init_kwargs: dict[str, Any],
    ) -> None:
        # a share of each GPU the scheduler can count (it counts in 1/10 000ths): 1/3 is 0.3333
        num_gpus = math.floor(10_000 / self.cluster.max_colocated_worker_groups) / 10_000 if self.cluster.use_gpus else 0
        class_env = self._cls._options.get("env_vars") or {}
        local_ranks: dict[int, int] = {}
        rank = 0
        for group_idx, (node_idx, bundles) in enumerate(bundle_indices_list):
            pg = pgs[0] if self.cluster.use_unified_pg else pgs[node_idx]
            tied = []
            for position, bundle in enumerate(bundles):
                local_rank = local_ranks.get(node_idx, 0)
                local_ranks[node_idx] = local_rank + 1
                env = {
                    **class_env,  # the class's own (@remote(env_vars=...)), then the group's
                    **env_vars,
                    "RANK": str(rank),
                    "LOCAL_RANK": str(local_rank),
                    "WORLD_SIZE": str(self.world_size),
                    "NODE_RANK": str(node_idx),
                    "MASTER_ADDR": self.master_address,
                    "MASTER_PORT": str(self.master_port),
                    "TORCHELASTIC_USE_AGENT_STORE": "True",
                }
                kwargs = dict(init_kwargs)
                leader_indices = (node_idx, list(bundles)) if position == 0 else None
                if leader_indices is not None and self._explicit_ties:
                    kwargs["bundle_indices"] = leader_indices
                name = (
                    (
                        f"{self.name_prefix}-grp{group_idx}-{position}"
                        if len(bundles) > 1
                        else f"{self.name_prefix}-{node_idx}-{bundle}"
                    )
                    if self.name_prefix
                    else None
                )
                options: dict[str, Any] = {"placement_group": pg, "bundle_index": bundle, "num_gpus": num_gpus, "env_vars": env}
                if name is not None:
                    options["name"] = name
                if py_executable is not None:
                    options["py_executable"] = py_executable
                self._workers.append(self._cls.options(**options).remote(*init_args, **kwargs))
                self._worker_metadata.append(
                    {
                        "node_idx": node_idx,
                        "local_rank": local_rank,
                        "global_rank": rank,
                        "name": name,
                        "bundle_index": bundle,
                        "bundle_indices": leader_indices,
                        "dp_shard_idx": group_idx,
                    }
                )
                tied.append(rank)
                rank += 1
            self.tied_workers_groups.append(tied)

    def _wait_started(self, timeout: float) -> None:
        rt = runtime.current()
        progress = Progress(len(self._workers), f"starting {self._cls.__name__} workers")

        started: set[int] = set()

        async def one(rank: int, handle: ActorHandle) -> dict[str, Any]:
            info = await rt.control("resolve_actor", actor_id=handle._actor_id)
            if info["state"] == "DEAD":  # at once: not after every other worker has started (or timed out)
                death = dict(info.get("death") or {})
                death["reason"] = f"rank {rank} of {len(self._workers)}: {death.get('reason') or 'it died'}"
                raise ActorDiedError(death)
            started.add(rank)
            progress.update()
            return info

        async def everyone() -> list[dict[str, Any]]:
            return await asyncio.wait_for(asyncio.gather(*(one(r, w) for r, w in enumerate(self._workers))), timeout)

        try:
            infos = rt.run(everyone())
        except (asyncio.TimeoutError, TimeoutError):
            waiting = [r for r in range(len(self._workers)) if r not in started]
            shown = ", ".join(map(str, waiting[:16])) + (" ..." if len(waiting) > 16 else "")
            raise GetTimeoutError(
                f"the workers of {self._cls.__name__} did not all start within {timeout} s: "
                f"rank(s) {shown} of {len(self._workers)} had not (actorlib status says why, if they wait for room)"
            ) from None
        finally:
            progress.close()
        for meta, info in zip(self._worker_metadata, infos, strict=True):
            meta["pid"] = info["pid"]
            meta["node_id"] = info["node_id"]
            meta["gpu_ids"] = info["gpu_ids"]

    def _offer_broadcast(self) -> None:
        """Give each worker on this machine a slot of a shared-memory file for the group's calls."""
        slots = broadcast.make(len(self._workers)) if len(self._workers) > 1 else None
        if slots is None:
            return  # (off here, or no room in /dev/shm): the calls go over ZeroMQ
        rt = runtime.current()
        actors = [(w._actor_id, w._class_name, i) for i, w in enumerate(self._workers)]
        try:
            taken = rt.run(slots.offer(rt, actors, timeout=60.0))
        except BaseException:
            slots.close()
            raise
        if taken:
            self._broadcast = slots
        else:
            slots.close()

    def _close_broadcast(self) -> None:
        if self._broadcast is not None:
            self._broadcast.close()
            self._broadcast = None

    # -- what the group is -------------------------------------------------------

    @property
    def workers(self) -> list[ActorHandle]:
        return list(self._workers)

    @property
    def worker_metadata(self) -> list[dict[str, Any]]:
        return [dict(m) for m in self._worker_metadata]

    @property
    def dp_size(self) -> int:
        """The number of tied groups (data-parallel shards)."""
        return len(self.tied_workers_groups)

    def get_dp_leader_worker_idx(self, dp_shard_idx: int) -> int:
        if not 0 <= dp_shard_idx < self.dp_size:
            raise ValueError(f"dp_shard_idx {dp_shard_idx} is out of range 0..{self.dp_size - 1}")
        return self.tied_workers_groups[dp_shard_idx][0]

    # -- dispatch ----------------------------------------------------------------

    def _method(self, method_name: str) -> int:
        if not isinstance(method_name, str):
            raise TypeError(f"method_name must be a str, not {type(method_name).__name__}")
        if not self._workers:
            raise ActorLibError("this worker group has been shut down")
        kind = self._workers[0]._methods.get(method_name)
        if kind is None:
            raise AttributeError(f"actor class {self._cls.__name__!r} has no method {method_name!r}")
        return kind

    def _call(self, indices: list[int], method_name: str, args: Sequence[Any], kwargs: dict[str, Any]) -> list[Any]:
        kind = self._method(method_name)
        window = runtime.DEFAULT_STREAM_WINDOW if kind in (GENERATOR, ASYNC_GENERATOR) else None
        targets = [(self._workers[i]._actor_id, self._cls.__name__) for i in indices]
        slots = (self._broadcast, indices) if self._broadcast is not None and kind == SYNC and len(indices) > 1 else None
        return runtime.current().submit_many(targets, method_name, tuple(args), kwargs, stream_window=window, broadcast=slots)

    def _selected(self, run_rank_0_only_axes: list[str] | None) -> list[int]:
        run_rank_0_only_axes = _axes("run_rank_0_only_axes", run_rank_0_only_axes)
        if not run_rank_0_only_axes:
            return list(range(len(self._workers)))
        sharding = self._need_sharding("run_rank_0_only_axes")
        for axis in run_rank_0_only_axes:
            sharding.get_axis_index(axis)  # raises on an unknown axis
        return [r for r in range(len(self._workers)) if all(sharding.get_worker_coords(r)[a] == 0 for a in run_rank_0_only_axes)]

    def _need_sharding(self, what: str) -> NamedSharding:
        if self.sharding_annotations is None:
            raise ValueError(f"{what} needs the group's sharding_annotations")
        return self.sharding_annotations

    def run_single_worker_single_data(self, method_name: str, worker_idx: int, *args: Any, **kwargs: Any) -> Any:
        """Call one worker; returns its ObjectRef (or ObjectRefGenerator)."""
        if isinstance(worker_idx, bool) or not isinstance(worker_idx, int) or not 0 <= worker_idx < len(self._workers):
            raise ValueError(f"worker_idx must be 0..{len(self._workers) - 1}, not {worker_idx!r}")
        return self._call([worker_idx], method_name, args, kwargs)[0]

    def run_all_workers_single_data(
        self, method_name: str, *args: Any, run_rank_0_only_axes: list[str] | None = None, **kwargs: Any
    ) -> list[Any]:
        """The same arguments to every worker (skipping non-zero coordinates of ``run_rank_0_only_axes``)."""
        self._method(method_name)
        return self._call(self._selected(run_rank_0_only_axes), method_name, args, kwargs)

    def run_all_workers_multiple_data(
        self,
        method_name: str,
        *args: Sequence[Any],
        run_rank_0_only_axes: list[str] | None = None,
        common_kwargs: dict[str, Any] | None = None,
        **kwargs: Sequence[Any],
    ) -> list[Any]:
        """Worker *i* (of those selected) gets entry *i* of every argument, plus ``common_kwargs``."""
        self._method(method_name)
        selected = self._selected(run_rank_0_only_axes)
        if not args and not kwargs:
            raise ValueError("run_all_workers_multiple_data needs per-worker arguments; use run_all_workers_single_data")
        for label, value in [
            *((f"argument {i}", a) for i, a in enumerate(args)),
            *((f"argument {k!r}", v) for k, v in kwargs.items()),
        ]:
            if not isinstance(value, Sequence) or isinstance(value, str | bytes):
                raise TypeError(f"{label} must be a list with one entry per worker")
            if len(value) != len(selected):
                raise ValueError(f"{label} has {len(value)} entries but {len(selected)} workers are called")
        common = dict(common_kwargs or {})
        clash = set(common) & set(kwargs)
        if clash:
            raise ValueError(f"{sorted(clash)} given both per worker and in common_kwargs")
        out = []
        for n, worker in enumerate(selected):
            call_kwargs = {k: v[n] for k, v in kwargs.items()} | common
            out.extend(self._call([worker], method_name, [a[n] for a in args], call_kwargs))
        return out

    def run_all_workers_sharded_data(
        self,
        method_name: str,
        *args: Any,
        in_sharded_axes: list[str] | None = None,
        replicate_on_axes: list[str] | None = None,
        output_is_replicated: list[str] | None = None,
        make_dummy_calls_to_free_axes: bool = False,
        common_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> MultiWorkerFuture:
        """Shard the arguments over named axes; see the module docstring."""
        self._method(method_name)
        sharding = self._need_sharding("run_all_workers_sharded_data")
        in_sharded_axes = _axes("in_sharded_axes", in_sharded_axes)
        replicate_on_axes = _axes("replicate_on_axes", replicate_on_axes)
        output_is_replicated = _axes("output_is_replicated", output_is_replicated)
        for axis in in_sharded_axes + replicate_on_axes + output_is_replicated:
            sharding.get_axis_index(axis)  # raises on an unknown axis
        both = set(in_sharded_axes) & set(replicate_on_axes)
        if both:
            raise ValueError(f"axes {sorted(both)} cannot be both sharded and replicated")
        common = dict(common_kwargs or {})
        if set(common) & set(kwargs):
            raise ValueError(f"{sorted(set(common) & set(kwargs))} given both sharded and in common_kwargs")
        for label, value in [
            *((f"argument {i}", a) for i, a in enumerate(args)),
            *((f"argument {k!r}", v) for k, v in kwargs.items()),
        ]:
            _check_nesting(label, value, [(a, sharding.get_axis_size(a)) for a in in_sharded_axes])
        free = [a for a in sharding.names if a not in in_sharded_axes and a not in replicate_on_axes]
        futures: list[Any] = []
        called: list[int] = []
        returned: list[int] = []
        for rank in range(len(self._workers)):
            coords = sharding.get_worker_coords(rank)
            on_free_zero = all(coords[a] == 0 for a in free)
            if on_free_zero and all(coords[a] == 0 for a in output_is_replicated):
                returned.append(rank)
            if on_free_zero:
                worker_args = [_slice(a, in_sharded_axes, coords) for a in args]
                worker_kwargs = {k: _slice(v, in_sharded_axes, coords) for k, v in kwargs.items()}
            elif make_dummy_calls_to_free_axes:
                worker_args = [None] * len(args)
                worker_kwargs = dict.fromkeys(kwargs)
            else:
                continue
            futures.extend(self._call([rank], method_name, worker_args, worker_kwargs | common))
            called.append(rank)
        return MultiWorkerFuture(
            futures, called_workers=called, return_from_workers=returned, worker_metadata=self._worker_metadata
        )

    def run(
        self,
        target: Any,
        *args: Any,
        max_restarts: int = 0,
        timeout: float | None = None,
        failure_grace_s: float = 5.0,
        **kwargs: Any,
    ) -> RunResult:
        """Run ``target`` on every worker at once (SPMD), torchelastic-style; restart the whole group on failure.

        ``target`` is a function (called as ``target(*args, **kwargs)`` in each
        worker, which has ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` ... in its
        environment) or a command line (a string or argv list; ``args`` and
        ``kwargs`` are appended as ``arg`` and ``--key=value``). When any rank
        fails (its code raises, its command exits non-zero, its process dies),
        the others get ``failure_grace_s`` to finish, then every worker is
        stopped and the group started again — fresh processes, a fresh
        rendezvous: its collective group is broken — up to ``max_restarts``
        times. Returns a :class:`RunResult`: each global rank's return value,
        or the last attempt's failures with the first one by time named first
        (``result.raise_on_failure()`` raises them as :class:`WorkerGroupError`).
        """
        if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
            raise ValueError(f"max_restarts must be an int >= 0, not {max_restarts!r}")
        if not (callable(target) or isinstance(target, str) or (isinstance(target, list | tuple) and target)):
            raise TypeError(f"run() takes a function or a command line (a str or a list of str), not {type(target).__name__}")
        if not self._workers:
            raise ActorLibError("this worker group has been shut down")
        history: list[list[WorkerFailure]] = []
        while True:
            ranks = list(range(len(self._workers)))
            targets = [(w._actor_id, self._cls.__name__) for w in self._workers]
            refs = runtime.current().submit_many(targets, RUN_METHOD, (target, *args), kwargs, stream_window=None)
            try:
                values = gather(refs, ranks, self._worker_metadata, timeout, failure_grace_s, "run()")
                return RunResult(values, [], len(history), history)
            except WorkerGroupError as exc:
                if len(history) == max_restarts:
                    if not all(r.done() for r in refs):  # ranks still in it (a collective, say) would hold the group
                        self._restart_all()
                    return RunResult([None] * len(ranks), exc.failures, len(history), history)
                history.append(exc.failures)
            except GetTimeoutError:
                self._restart_all()  # the ranks still running would hold the group: fresh ones take their place
                raise
            self._restart_all()

    def _restart_all(self) -> None:
        """Stop every worker, then start the group again from scratch (same bundles, same constructor arguments)."""
        rt = runtime.current()
        ids = [w._actor_id for w in self._workers]
        rt.run(rt.control("kill_actors", actor_ids=ids, wait_s=30.0))
        self._close_broadcast()
        self._workers, self._worker_metadata, self.tied_workers_groups = [], [], []
        self._release_store()
        self._start()

    def get_all_worker_results(
        self, future_bundle: MultiWorkerFuture, return_generators_as_proxies: bool = False, timeout: float | None = None
    ) -> list[Any]:
        """One result per tied group / unreplicated coordinate, in order."""
        return future_bundle.get_results(self, return_generators_as_proxies=return_generators_as_proxies, timeout=timeout)

    # -- the end -------------------------------------------------------------------

    def shutdown(self, cleanup_method: str | None = None, timeout: float | None = 30.0, force: bool = False) -> bool:
        """Call ``cleanup_method`` on every worker (bounded by ``timeout``), then kill them all.

        Returns True if the cleanup (when asked for) succeeded everywhere. With
        ``force``, skip the cleanup. Either way no worker is left running.
        """
        if not self._workers:
            self._release_store()
            return True
        ok = True
        if cleanup_method is not None and not force:
            try:
                refs = self.run_all_workers_single_data(cleanup_method)
                api.get([r for r in refs if isinstance(r, ObjectRef)], timeout=timeout)
            except Exception:  # a cleanup that fails in any way must not keep the workers alive
                ok = False
        rt = runtime.current()
        ids = [w._actor_id for w in self._workers]
        rt.run(rt.control("kill_actors", actor_ids=ids, wait_s=timeout if timeout is not None else 30.0))
        self._workers = []
        self._close_broadcast()
        self._release_store()
        return ok

    def _release_store(self) -> None:
        """The rendezvous store of this start goes (a restart, or the end, makes or needs none)."""
        port = getattr(self, "master_port", 0)
        if port:
            self.master_port = 0  # once: the port may be another group's store's later
            self.cluster.release_master_port(port)

    def __repr__(self) -> str:
        return f"WorkerGroup({self._cls.__name__}, {len(self._workers)} workers)"


def _axes(what: str, axes: Any) -> list[str]:
    """A list of axis names (None: none). A bare string is refused: ``list("dp")`` would be ``["d", "p"]``."""
    if axes is None:
        return []
    if isinstance(axes, str) or not isinstance(axes, list | tuple):
        raise TypeError(f"{what} must be a list of axis names, not {axes!r}")
    return list(axes)


def _actor_class(actor_class: Any) -> ActorClass[Any]:
    if isinstance(actor_class, ActorClass):
        return actor_class
    if isinstance(actor_class, str):
        module_name, _, class_name = actor_class.rpartition(".")
        if not module_name:
            raise ValueError(f"a class given by name must be 'module.Class', not {actor_class!r}")
        try:
            actor_class = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"cannot import actor class {actor_class!r}: {exc}") from None
        return _actor_class(actor_class)
    if isinstance(actor_class, type):
        return remote(actor_class)
    raise TypeError(
        f"actor_class must be an @actorlib.remote class, a class, or 'module.Class', not {type(actor_class).__name__}"
    )


def _one_worker_per_bundle(
    pgs: list[Any], cluster: VirtualCluster, workers_per_node: int | list[int] | None
) -> list[tuple[int, list[int]]]:
    counts = cluster.bundle_ct_per_node_list
    if workers_per_node is None:
        per_node = list(counts)
    elif isinstance(workers_per_node, int) and not isinstance(workers_per_node, bool):
        per_node = [workers_per_node] * len(counts)
    elif isinstance(workers_per_node, list) and len(workers_per_node) == len(counts):
        per_node = list(workers_per_node)
    else:
        raise ValueError(f"workers_per_node must be None, an int or a list of {len(counts)} ints, not {workers_per_node!r}")
    out: list[tuple[int, list[int]]] = []
    offset = 0
    for node, (n, cap) in enumerate(zip(per_node, counts, strict=True)):
        if not isinstance(n, int) or not 0 <= n <= cap:
            raise ValueError(f"node {node} has {cap} bundles; cannot place {n!r} workers there")
        base = offset if cluster.use_unified_pg else 0
        out.extend((node, [base + b]) for b in range(n))
        offset += cap
    return out


def _check_bundle_indices(bundle_indices_list: Any, pgs: list[Any], unified: bool) -> None:
    if not isinstance(bundle_indices_list, list) or not bundle_indices_list:
        raise ValueError("bundle_indices_list must be a non-empty list of (node_idx, [bundle indices])")
    seen = set()
    for entry in bundle_indices_list:
        if not (isinstance(entry, tuple | list) and len(entry) == 2 and isinstance(entry[1], list | tuple) and entry[1]):
            raise ValueError(f"each tied group must be (node_idx, [bundle indices]), not {entry!r}")
        node, bundles = entry
        if isinstance(node, bool) or not isinstance(node, int) or node < 0 or (not unified and node >= len(pgs)):
            raise ValueError(f"node index {node!r} is out of range 0..{len(pgs) - 1}")
        pg = pgs[0] if unified else pgs[node]
        for b in bundles:
            if not isinstance(b, int) or not 0 <= b < pg.bundle_count:
                raise ValueError(f"bundle index {b!r} is out of range for node {node} ({pg.bundle_count} bundles)")
            if (id(pg), b) in seen:
                raise ValueError(f"bundle {b} of node {node} is used twice")
            seen.add((id(pg), b))


def _check_nesting(label: str, value: Any, axes: list[tuple[str, int]]) -> None:
    """Sharded data must nest one list level per sharded axis, of that axis's size."""
    if not axes:
        return
    (axis, size), rest = axes[0], axes[1:]
    if not isinstance(value, Sequence) or isinstance(value, str | bytes):
        raise TypeError(f"{label} must be a list along sharded axis {axis!r}")
    if len(value) != size:
        raise ValueError(f"{label} has {len(value)} entries along axis {axis!r}, which has size {size}")
    for i, item in enumerate(value):
        _check_nesting(f"{label}[{i}]", item, rest)


def _slice(value: Any, axes: list[str], coords: dict[str, int]) -> Any:
    for axis in axes:
        value = value[coords[axis]]
    return value
