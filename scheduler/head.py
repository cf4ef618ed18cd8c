"""The head: the cluster's control plane.

It holds the node table, the actor table and the named-actor directory,
places actors on nodes, and tells the interested parties when an actor's
state changes. It never relays a method call or a result, and never unpickles
anything: actor classes and constructor arguments pass through as opaque bytes.

Peers speak to it over one ROUTER socket with CONTROL requests (``op_*``
below) and EVENT messages (``worker_exited``, ``log`` from node agents).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

from transport import ControlError, ControlServer, Endpoint, TransportError, control_call, send_event
from transport.security import cluster_key

from .actors import ActorRecord, ActorSpec, ActorState
from .node import NODE_TIMEOUT, WORKER_TIMEOUT
from .placement import Bundle, PlacementGroupRecord, PlacementGroupState, infeasibility, place, validate_bundles
from .resources import NodePool, to_float
from .session import socket_dir
from .ssh import SSHLaunch, parse_nodes

__all__ = ["Head"]

log = logging.getLogger(__name__)


@dataclass
class NodeRecord:
    node_id: str
    peer: bytes
    address: str
    hostname: str
    pool: NodePool
    is_head_node: bool
    alive: bool = True
    last_seen: float = 0.0

    def view(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "alive": self.alive,
            "address": self.address,
            "hostname": self.hostname,
            "resources": to_float(self.pool.total),
            "available": to_float(self.pool.free) if self.alive else {},
            "is_head_node": self.is_head_node,
        }


@dataclass
class DriverRecord:
    job_id: str
    peer: bytes
    namespace: str
    log_to_driver: bool
    actors: set[str] = field(default_factory=set)
    last_seen: float = 0.0


class Head:
    def __init__(
        self, *, session_dir: str, address: str, node_timeout: float = NODE_TIMEOUT, worker_timeout: float = WORKER_TIMEOUT
    ) -> None:
        self.session_dir = session_dir
        self.node_timeout = node_timeout
        self.worker_timeout = worker_timeout
        self._bind_address = address
        self.nodes: dict[str, NodeRecord] = {}
        self.actors: dict[str, ActorRecord] = {}
        self.named: dict[tuple[str, str], str] = {}
        self.drivers: dict[bytes, DriverRecord] = {}
        # drivers declared dead because they went silent: one that speaks again is its job again (see _driver)
        self._silent_drivers: dict[bytes, DriverRecord] = {}
        self._watchers: dict[str, set[bytes]] = {}
        self._pending: list[str] = []  # actor ids waiting for resources, in arrival order
        self.pgs: dict[str, PlacementGroupRecord] = {}
        self._pending_pgs: list[str] = []  # placement groups waiting for resources, in arrival order
        self._node_joined = asyncio.Event()
        self._actor_added = asyncio.Event()  # set (and replaced) each time an actor is created
        # Finished records stay readable for a while, then go: a long-lived head must not grow.
        self._dead_actors: collections.deque[str] = collections.deque()
        self._forgotten_actors: dict[str, None] = {}  # dead ones past KEEP_FINISHED (see _retire)
        self._removed_pgs: collections.deque[str] = collections.deque()
        self._control = ControlServer(self, on_event=self._on_event)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._launches: dict[str, SSHLaunch] = {}  # node agents this head started over SSH, by node id
        self.endpoint: Endpoint | None = None

    @property
    def address(self) -> str:
        assert self.endpoint is not None
        return self.endpoint.address

    @property
    def over_tcp(self) -> bool:
        """Whether peers reach this head over TCP (then workers bind TCP on their node's address too)."""
        return self._bind_address.startswith("tcp://")

    def start(self) -> None:
        self.endpoint = Endpoint.bind(self._bind_address, on_message=self._control.handle, name="head")
        self._control.attach(self.endpoint)
        self._spawn_task(self._watch_nodes())

    async def stop(self) -> None:
        """Stop serving; node agents of other processes are told to stop (they would notice anyway)."""
        for node in self.nodes.values():
            if node.alive and not node.is_head_node:
                self._notify(node.peer, "shutdown", {"reason": "the head is stopping"})
        launches, self._launches = list(self._launches.values()), {}
        await asyncio.gather(*(launch.stop() for launch in launches))
        self._control.cancel_all()
        for task in list(self._tasks):
            task.cancel()
        if self.endpoint is not None:
            self.endpoint.close()

    def _spawn_task(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- registration ---------------------------------------------------

    async def op_register_node(
        self,
        peer: bytes,
        node_id: str,
        resources: dict[str, float],
        gpu_ids: list[str],
        address: str,
        hostname: str,
        is_head_node: bool = False,
    ) -> dict[str, Any]:
        for what, value in (("node_id", node_id), ("address", address), ("hostname", hostname)):
            if not isinstance(value, str) or (what == "node_id" and not value):
                raise ControlError("ValueError", f"{what} must be a string, not {value!r:.80}")
        if not isinstance(gpu_ids, list) or not all(isinstance(g, str) for g in gpu_ids):
            raise ControlError("ValueError", f"gpu_ids must be a list of strings, not {gpu_ids!r:.80}")
        try:
            pool = NodePool(resources, gpu_ids)
        except (ValueError, TypeError, AttributeError) as exc:
            raise ControlError("ValueError", f"bad resources: {exc}") from None
        old = self.nodes.get(node_id)
        if old is not None and old.alive:  # the same node again: its earlier incarnation is over
            self._node_gone(old, "registered again")
        self.nodes[node_id] = NodeRecord(
            node_id, peer, address, hostname, pool, is_head_node, last_seen=asyncio.get_running_loop().time()
        )
        log.info("node %s registered: %s", node_id[:8], resources)
        self._node_joined.set()
        self._node_joined = asyncio.Event()
        self._schedule()
        return {"session_dir": self.session_dir}

    async def op_unregister_node(self, peer: bytes, node_id: str) -> bool:
        """A node agent is leaving: its actors are dead, its resources gone."""
        node = self.nodes.get(node_id)
        if node is None or node.peer != peer or not node.alive:
            return False
        self._node_gone(node, LEFT)
        return True

    def _node_gone(self, node: NodeRecord, how: str) -> None:
        node_id = node.node_id
        node.alive = False
        # First the groups that held bundles there: pending again, their other bundles given back, so that
        # no actor restarted below is placed into a bundle that is about to be placed again elsewhere.
        moved = []
        for pg in list(self.pgs.values()):
            if pg.state == PlacementGroupState.CREATED and any(b.node_id == node_id for b in pg.placed):
                for bundle in pg.placed:
                    other = self.nodes.get(bundle.node_id)
                    if other is not None and other.alive:
                        other.pool.release(bundle.allocation)
                pg.placed = []
                pg.pending_reason = f"waiting for resources: node {node_id[:8]} holding its bundles {how}"
                pg.set_state(PlacementGroupState.PENDING)
                self._pending_pgs.append(pg.pg_id)
                moved.append(pg.pg_id)
        # Then the actors: those on the node, and those of the moved groups (placed again, whole), once each.
        # Chosen first: restarting one places the moved groups again, and starts actors that were only
        # waiting for room in them, which have nothing to lose here.
        victims = [
            r
            for r in self.actors.values()
            if r.state in (ActorState.STARTING, ActorState.ALIVE) and (r.node_id == node_id or r.spec.placement_group in moved)
        ]
        for record in victims:
            if record.state not in (ActorState.STARTING, ActorState.ALIVE):
                continue  # ended meanwhile (a child of one handled before it)
            if record.node_id == node_id:
                self._lost(record, {"reason": f"its node {node_id[:8]} {how}", "host": node.address})
            elif record.spec.placement_group in moved:
                reason = f"a node of its placement group ({node_id[:8]}) {how}"
                if record.may_restart():  # its bundle moves: this incarnation ends, the next starts there
                    self._end_incarnation(record)
                    self._lost(record, {"reason": reason})
                else:
                    self._kill(record, reason)
        (log.info if how == LEFT else log.warning)("node %s %s", node_id[:8], how)
        self._schedule()

    def node_lost(self, node_id: str, how: str) -> None:
        """Its agent process is known to be gone (its parent saw it exit): gone now, not a heartbeat timeout later."""
        node = self.nodes.get(node_id)
        if node is not None and node.alive:
            self._node_gone(node, how)

    async def op_launch_nodes(self, peer: bytes, nodes: list[dict[str, Any]], timeout_s: float = 60.0) -> list[dict[str, Any]]:
        """Start a node agent on each host over SSH; answer once each joined or failed (with why)."""
        try:
            hosts = parse_nodes(nodes)
        except ValueError as exc:
            raise ControlError("ValueError", str(exc)) from None
        if not self.over_tcp:
            raise ControlError("ValueError", "nodes on other machines need a head reachable over TCP (init(..., head_host=...))")
        key = cluster_key()
        secret = key.secret.decode() if key is not None else None
        log_dir = f"{self.session_dir}/logs"
        launches = [SSHLaunch(node, self.address, secret, log_dir) for node in hosts]
        for launch in launches:
            self._launches[launch.node_id] = launch
        return list(await asyncio.gather(*(self._await_launch(launch, timeout_s) for launch in launches)))

    async def _await_launch(self, launch: SSHLaunch, timeout_s: float) -> dict[str, Any]:
        joined = asyncio.ensure_future(self.wait_for_node(launch.node_id))

        def ended(code: int | None) -> None:  # the lifeline is gone: so is the node, now (not a heartbeat later)
            if self._launches.get(launch.node_id) is launch:  # (not stopped on purpose)
                self.node_lost(launch.node_id, f"lost its SSH session to {launch.node.target} (ssh exited with code {code})")

        exited = launch.watch(asyncio.get_running_loop(), ended)
        try:
            await asyncio.wait([joined, exited], timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            joined.cancel()
        result: dict[str, Any] = {"host": launch.node.host, "node_id": launch.node_id, "log": launch.log_path}
        if launch.node_id in self.nodes and self.nodes[launch.node_id].alive:
            return {**result, "ok": True}
        self._launches.pop(launch.node_id, None)
        why = launch.failure()
        await launch.stop(joined=False)
        log.warning("could not start %s", why)
        return {**result, "ok": False, "error": why}

    async def op_heartbeat(self, peer: bytes, node_id: str | None = None) -> dict[str, Any]:
        """A node agent or a driver is alive. A node the head no longer knows is told to register again."""
        now = asyncio.get_running_loop().time()
        if node_id is None:
            revived = peer in self._silent_drivers
            driver = self._driver(peer)
            if driver is not None:
                driver.last_seen = now
            return {"rejoin": driver is None, "revived": revived}
        node = self.nodes.get(node_id)
        if node is None or not node.alive or node.peer != peer:
            return {"rejoin": True}
        node.last_seen = now
        return {"rejoin": False}

    async def _watch_nodes(self) -> None:
        """Declare dead a node or driver that has sent nothing for ``node_timeout`` seconds (e.g. SIGKILLed)."""
        loop = asyncio.get_running_loop()
        silent = f"stopped answering (no heartbeat for {self.node_timeout:g} s)"
        while True:
            await asyncio.sleep(self.node_timeout / 4)
            try:
                self._look_for_the_silent(loop.time(), silent)
            except Exception:  # a bug of ours with one of them: the watch goes on for all the others
                log.exception("while looking for silent nodes, workers and drivers")

    def _look_for_the_silent(self, now: float, silent: str) -> None:
        for node in list(self.nodes.values()):
            if node.alive and now - node.last_seen > self.node_timeout:
                self._node_gone(node, silent)
        for record in list(self.actors.values()):
            if record.state == ActorState.ALIVE and now - record.last_seen > self.worker_timeout:
                self._hung(record)
        for driver in list(self.drivers.values()):
            if now - driver.last_seen > self.node_timeout:
                log.warning("driver %s %s", driver.job_id, silent)
                self._driver_gone(driver, f"its driver {silent}")
                self._silent_drivers[driver.peer] = driver
                while len(self._silent_drivers) > 1000:  # killed ones never speak again
                    del self._silent_drivers[next(iter(self._silent_drivers))]

    async def wait_for_node(self, node_id: str) -> None:
        """Return once ``node_id`` has registered (callers bound this with a timeout)."""
        while node_id not in self.nodes:
            await self._node_joined.wait()

    async def op_register_driver(
        self, peer: bytes, namespace: str, log_to_driver: bool = True, job_id: str | None = None
    ) -> dict[str, Any]:
        """A driver joins; ``job_id``: one declared dead (silent too long) joins again under its old job id."""
        if not isinstance(job_id, str) or not job_id or any(d.job_id == job_id for d in self.drivers.values()):
            job_id = uuid.uuid4().hex[:8]
        self.drivers[peer] = DriverRecord(job_id, peer, namespace, log_to_driver, last_seen=asyncio.get_running_loop().time())
        return {"job_id": job_id, "session_dir": self.session_dir, "heartbeat_s": self.node_timeout / 5}

    async def op_driver_exit(self, peer: bytes, timeout: float = 10.0) -> int:
        """The driver is leaving: kill the actors it owns (detached ones stay)."""
        driver = self.drivers.get(peer)
        if driver is None:
            return 0
        doomed = self._driver_gone(driver, "its driver exited")
        await self._wait_dead(doomed, timeout)
        return len(doomed)

    def _driver(self, peer: bytes) -> DriverRecord | None:
        """The driver at ``peer``. One declared dead for its silence that speaks again (it was stopped, or
        suspended) is alive again, with its job id: what it makes from now on goes with it."""
        driver = self.drivers.get(peer)
        if driver is None:
            driver = self._silent_drivers.pop(peer, None)
            if driver is not None:
                log.warning("driver %s speaks again after it was declared dead; the actors it had stay stopped", driver.job_id)
                driver.actors = set()
                driver.last_seen = asyncio.get_running_loop().time()
                self.drivers[peer] = driver
        return driver

    def _driver_gone(self, driver: DriverRecord, reason: str) -> list[ActorRecord]:
        del self.drivers[driver.peer]
        doomed = [
            self.actors[a]
            for a in driver.actors
            if a in self.actors and self.actors[a].spec.lifetime != "detached" and self.actors[a].state != ActorState.DEAD
        ]
        for record in doomed:
            self._kill(record, reason)
        for pg in list(self.pgs.values()):
            if pg.owner == driver.job_id and pg.lifetime != "detached" and pg.state != PlacementGroupState.REMOVED:
                self._remove_group(pg)
        return doomed

    # -- actors ----------------------------------------------------------

    async def op_create_actor(self, peer: bytes, spec: dict[str, Any]) -> dict[str, Any]:
        creator = spec.get("creator") if isinstance(spec, dict) else None
        driver = self._driver(peer) or self._creators_driver(creator)
        owner = driver.job_id if driver else ""
        try:
            s = ActorSpec.from_wire(spec, owner=owner)
        except (TypeError, ValueError, KeyError) as exc:
            raise ControlError("ValueError", f"malformed actor spec: {exc}") from None
        if s.actor_id in self.actors:
            raise ControlError("ValueError", f"actor id {s.actor_id} already exists")
        parent = self._living_creator(creator)
        if s.name is not None:
            key = (s.namespace, s.name)
            other = self.named.get(key)
            if other is not None and self.actors[other].state != ActorState.DEAD:
                raise ControlError("ValueError", f"the name {s.name!r} is already taken in namespace {s.namespace!r}")
        self._check_placeable(s)
        record = ActorRecord(s)
        record.job_namespace = driver.namespace if driver else parent.job_namespace if parent else s.namespace
        self.actors[s.actor_id] = record
        if s.name is not None:
            self.named[(s.namespace, s.name)] = s.actor_id
        self._actor_added.set()
        self._actor_added = asyncio.Event()
        if driver is not None:
            driver.actors.add(s.actor_id)
        if parent is not None and s.lifetime != "detached":
            parent.children.add(s.actor_id)
        self._watchers.setdefault(s.actor_id, set()).add(peer)
        self._pending.append(s.actor_id)
        self._schedule()
        return {"actor_id": s.actor_id, "state": record.state.value}

    def _living_creator(self, creator: Any) -> ActorRecord | None:
        """The actor making an actor or placement group (None for a driver); refused if it has died meanwhile."""
        record = self.actors.get(creator) if isinstance(creator, str) else None
        if record is not None and record.state == ActorState.DEAD:
            raise ControlError("ValueError", f"the actor creating it ({record.spec.class_name} {creator[:8]}) has died")
        return record

    def _creators_driver(self, creator: Any) -> DriverRecord | None:
        """The driver that an actor's own actors and placement groups go with: its creator's (the actor
        ``creator``), unless that one is detached; None then, as for a peer that is no actor."""
        record = self.actors.get(creator) if isinstance(creator, str) else None
        if record is None or record.spec.lifetime == "detached":
            return None
        return next((d for d in self.drivers.values() if d.job_id == record.spec.owner), None)

    def _check_placeable(self, s: ActorSpec) -> None:
        """Refuse at once an actor that could never be placed; never a silent hang."""
        if s.placement_group is None:
            if not self._fits_a_node(s):
                raise ControlError("ResourceError", f"actor {s.class_name} can never be placed: {self._too_big(s)}")
            return
        pg = self.pgs.get(s.placement_group)
        if pg is None or pg.state == PlacementGroupState.REMOVED:
            raise ControlError("ValueError", f"placement group {s.placement_group} does not exist or was removed")
        if not -1 <= s.bundle_index < len(pg.bundles):
            raise ControlError(
                "ValueError", f"bundle_index {s.bundle_index} is out of range for a group of {len(pg.bundles)} bundles"
            )
        if pg.pending_reason.startswith("infeasible"):  # as an actor that fits no node: refused, not left waiting
            raise ControlError(
                "ResourceError",
                f"actor {s.class_name} can never be placed: its placement group {pg.pg_id[:8]} cannot be placed "
                f"on this cluster ({pg.pending_reason.removeprefix('infeasible: ')})",
            )
        candidates = range(len(pg.bundles)) if s.bundle_index == -1 else [s.bundle_index]
        if not any(all(pg.bundles[i].get(k, 0) >= v for k, v in s.demand.items()) for i in candidates):
            where = "any bundle" if s.bundle_index == -1 else f"bundle {s.bundle_index}"
            raise ControlError(
                "ResourceError",
                f"actor {s.class_name} can never be placed: it needs {s.demand or '{}'}, more than {where} of "
                f"placement group {pg.pg_id[:8]} holds (bundles: {pg.bundles})",
            )

    def _fits_a_node(self, s: ActorSpec) -> bool:
        """Some live node could hold the actor, were it empty."""
        return any(n.alive and n.pool.fits(s.demand, of_total=True) for n in self.nodes.values())

    def _too_big(self, s: ActorSpec) -> str:
        totals: dict[str, float] = {}
        for n in self.nodes.values():
            if n.alive:
                for k, v in to_float(n.pool.total).items():
                    totals[k] = totals.get(k, 0) + v
        largest = [to_float(n.pool.total) for n in self.nodes.values() if n.alive]
        return f"it needs {s.demand or '{}'}, but no node has that much (nodes: {largest}; cluster totals: {totals})"

    def _schedule(self) -> None:
        """Place what waits: placement groups first, then actors, each in arrival order."""
        waiting_pgs: list[str] = []
        for pg_id in self._pending_pgs:
            pg = self.pgs.get(pg_id)
            if pg is None or pg.state != PlacementGroupState.PENDING:
                continue
            try:
                placed = self._place_group(pg)
            except Exception:  # a bug of ours with one group: it waits, and everything else is still placed
                log.exception("while placing placement group %s", pg_id[:8])
                placed = False
            if not placed:
                waiting_pgs.append(pg_id)
        self._pending_pgs = waiting_pgs
        still: list[str] = []
        for actor_id in self._pending:
            record = self.actors.get(actor_id)
            if record is None or not record.state.waiting:
                continue
            found = self._find_pool(record.spec)
            if found is None:
                still.append(actor_id)
                continue
            pool, node = found
            record.allocation = pool.reserve(record.spec.demand)
            record.pool = pool
            record.node_id = node.node_id
            record.set_state(ActorState.STARTING)
            self._spawn_task(self._start(record, node))
        self._pending = still

    def _find_pool(self, s: ActorSpec) -> tuple[NodePool, NodeRecord] | None:
        if s.placement_group is None:
            node = next((n for n in self.nodes.values() if n.alive and n.pool.fits(s.demand)), None)
            return None if node is None else (node.pool, node)
        pg = self.pgs.get(s.placement_group)
        if pg is None or pg.state != PlacementGroupState.CREATED:
            return None
        candidates = range(len(pg.placed)) if s.bundle_index == -1 else [s.bundle_index]
        for i in candidates:
            bundle = pg.placed[i]
            node = self.nodes.get(bundle.node_id)
            if node is not None and node.alive and bundle.pool.fits(s.demand):
                return bundle.pool, node
        return None

    def _place_group(self, pg: PlacementGroupRecord) -> bool:
        pools = {n.node_id: n.pool for n in self.nodes.values() if n.alive}
        placed, why = place(pg.strategy, pg.bundles, pools)
        if placed is None:
            never = infeasibility(pg.strategy, pg.bundles, pools)
            pg.pending_reason = f"infeasible: {never}" if never else f"waiting for resources: {why}"
            return False
        pg.placed = [
            Bundle(node_id, alloc, NodePool(bundle, alloc.gpu_ids, gpu_capacity=alloc.gpu_units or 10_000))
            for (node_id, alloc), bundle in zip(placed, pg.bundles, strict=True)
        ]
        pg.pending_reason = ""
        pg.set_state(PlacementGroupState.CREATED)
        return True

    # -- placement groups --------------------------------------------------

    async def op_create_placement_group(
        self,
        peer: bytes,
        pg_id: str,
        bundles: list[dict[str, float]],
        strategy: str,
        name: str | None = None,
        lifetime: str | None = None,
        creator: str | None = None,
    ) -> dict[str, Any]:
        try:
            bundles = validate_bundles(bundles, strategy)
        except ValueError as exc:
            raise ControlError("ValueError", str(exc)) from None
        if pg_id in self.pgs:
            raise ControlError("ValueError", f"placement group id {pg_id} already exists")
        if name is not None and any(p.name == name and p.state != PlacementGroupState.REMOVED for p in self.pgs.values()):
            raise ControlError("ValueError", f"a placement group named {name!r} already exists")
        driver = self._driver(peer) or self._creators_driver(creator)
        parent = self._living_creator(creator)
        pg = PlacementGroupRecord(pg_id, name, strategy, bundles, owner=driver.job_id if driver else "", lifetime=lifetime)
        self.pgs[pg_id] = pg
        if parent is not None and lifetime != "detached":
            parent.child_groups.add(pg_id)
        if not self._place_group(pg):
            self._pending_pgs.append(pg_id)
        return pg.view()

    async def op_wait_placement_group(self, peer: bytes, pg_id: str, timeout_s: float | None = None) -> bool:
        pg = self._pg(pg_id)

        async def created() -> None:
            while pg.state == PlacementGroupState.PENDING:
                await pg.changed.wait()

        if pg.state != PlacementGroupState.PENDING:  # (wait_for with 0 would time out before looking)
            return pg.state == PlacementGroupState.CREATED
        try:
            await asyncio.wait_for(created(), timeout_s)
        except asyncio.TimeoutError:
            return False
        return pg.state == PlacementGroupState.CREATED

    async def op_remove_placement_group(self, peer: bytes, pg_id: str) -> bool:
        pg = self._pg(pg_id)
        if pg.state == PlacementGroupState.REMOVED:
            return False
        self._remove_group(pg)
        return True

    async def op_placement_group_table(self, peer: bytes, pg_id: str | None = None) -> dict[str, Any]:
        if pg_id is not None:
            return self._pg(pg_id).view()
        return {p.pg_id: p.view() for p in self.pgs.values()}

    def _pg(self, pg_id: str) -> PlacementGroupRecord:
        pg = self.pgs.get(pg_id)
        if pg is None:
            raise ControlError("ValueError", f"no placement group with id {pg_id}")
        return pg

    def _remove_group(self, pg: PlacementGroupRecord) -> None:
        placed, pg.placed = pg.placed, []
        pg.set_state(PlacementGroupState.REMOVED)  # first: nothing is scheduled into it from here on
        doomed = [r for r in self.actors.values() if r.spec.placement_group == pg.pg_id and r.state != ActorState.DEAD]
        for record in doomed:
            self._kill(record, "its placement group was removed")
        _retire(self.pgs, self._removed_pgs, pg.pg_id)
        doomed = [r for r in doomed if r.state != ActorState.DEAD]  # (those only waiting to be placed are dead now)
        if doomed:
            self._spawn_task(self._release_bundles(placed, doomed))
        else:  # no process to wait for: free now, so the remover's next request sees it
            self._release_now(placed)

    async def _release_bundles(self, placed: list[Bundle], doomed: list[ActorRecord]) -> None:
        """Give a removed group's resources back once its actors' processes are gone (GPU memory too)."""
        await self._wait_dead(doomed, 30.0)
        self._release_now(placed)

    def _release_now(self, placed: list[Bundle]) -> None:
        for bundle in placed:
            node = self.nodes.get(bundle.node_id)
            if node is not None:
                node.pool.release(bundle.allocation)
        self._schedule()

    async def _start(self, record: ActorRecord, node: NodeRecord) -> None:
        s = record.spec
        incarnation = record.restarts
        assert self.endpoint is not None and record.allocation is not None
        env = {
            "CUDA_VISIBLE_DEVICES": ",".join(record.allocation.gpu_ids),
            "ACTORLIB_ACTOR_ID": s.actor_id,
            "ACTORLIB_NODE_ID": node.node_id,
            **s.env_vars,
        }
        if self.over_tcp:  # reachable from other machines, like the head
            bind_address = f"tcp://{node.address}:0"
        else:
            bind_address = f"ipc://{socket_dir(self.session_dir)}/{s.actor_id[:16]}.sock"
        config = {
            "head_address": self.address,
            "actor_id": s.actor_id,
            "node_id": node.node_id,
            "job_id": s.owner,
            "namespace": record.job_namespace or s.namespace,
            "name": s.name,
            "class_name": s.class_name,
            "session_dir": self.session_dir,
            "bind_address": bind_address,
            "gpu_ids": record.allocation.gpu_ids,
            "sys_path": s.sys_path,
            "max_concurrency": s.max_concurrency,
            "heartbeat_s": self.worker_timeout / 5,
        }
        label = f"{s.name or s.class_name}"
        try:
            reply = await control_call(
                self.endpoint,
                "spawn_worker",
                peer=node.peer,
                timeout=SPAWN_TIMEOUT,
                actor_id=s.actor_id,
                label=label,
                env=env,
                config=config,
            )
            pid = int(reply["pid"])
        except Exception as exc:  # refused, timed out, node gone, malformed answer
            if record.restarts != incarnation or record.state != ActorState.STARTING:
                return  # restarted elsewhere (its node was lost meanwhile), or killed: this start is moot
            self._mark_dead(
                record, {"reason": f"the worker could not be started on node {node.node_id[:8]}: {type(exc).__name__}: {exc}"}
            )
            return
        if record.restarts != incarnation:  # lost (its node, say) while spawning: this worker is not wanted
            record.retired_pids.add(pid)
            await self._kill_pid(node, pid)
            return
        if record.state == ActorState.DEAD:  # killed, or its worker already exited, while spawning
            if record.pid is None:
                await self._kill_pid(node, pid)
            return
        record.pid = pid
        if record.kill_requested:
            await self._kill_pid(node, record.pid)

    async def op_worker_hello(self, peer: bytes, actor_id: str, pid: int) -> dict[str, Any]:
        record = self._record(actor_id)
        self._check_current(record, pid)
        record.pid = pid
        return {"payload": record.spec.payload}

    def _check_current(self, record: ActorRecord, pid: int | None) -> None:
        if pid is not None and pid in record.retired_pids:
            raise ControlError("ValueError", f"worker {pid} belongs to an earlier incarnation of actor {record.spec.actor_id[:8]}")

    async def op_actor_ready(self, peer: bytes, actor_id: str, address: str, pid: int | None = None) -> None:
        record = self._record(actor_id)
        self._check_current(record, pid)
        if record.state != ActorState.STARTING:
            return
        record.address = address
        record.last_seen = asyncio.get_running_loop().time()
        record.set_state(ActorState.ALIVE)

    async def op_actor_failed(self, peer: bytes, actor_id: str, error: dict[str, Any], pid: int | None = None) -> None:
        record = self._record(actor_id)
        self._check_current(record, pid)
        self._mark_dead(record, {"reason": "the actor's constructor raised", "init_error": error})

    async def op_resolve_actor(self, peer: bytes, actor_id: str) -> dict[str, Any]:
        """Answer once the actor is ALIVE or DEAD; the asker then hears of its death.

        An id the head does not know yet is waited for a while: an async actor method's ``remote()`` returns
        before the head is asked, and the handle may reach another process first.
        """
        if actor_id in self._forgotten_actors:
            return {"actor_id": actor_id, "state": "DEAD", "death": {"actor_id": actor_id, "reason": "it died long ago"}}
        if actor_id not in self.actors:
            try:
                await asyncio.wait_for(self._until_known(actor_id), UNKNOWN_ACTOR_WAIT)
            except asyncio.TimeoutError:
                pass
        record = self._record(actor_id)
        if record.state != ActorState.DEAD:
            self._watchers.setdefault(actor_id, set()).add(peer)
        while record.state in (ActorState.PENDING, ActorState.STARTING, ActorState.RESTARTING):
            await record.changed.wait()
        return record.view()

    async def _until_known(self, actor_id: str) -> None:
        while actor_id not in self.actors:
            await self._actor_added.wait()

    async def op_get_actor(self, peer: bytes, name: str, namespace: str) -> dict[str, Any]:
        actor_id = self.named.get((namespace, name))
        if actor_id is None or self.actors[actor_id].state == ActorState.DEAD:
            raise ControlError("ValueError", f"no actor named {name!r} in namespace {namespace!r}")
        return self.actors[actor_id].spec.public()

    async def op_kill_actor(self, peer: bytes, actor_id: str, wait_s: float = 0.0) -> bool:
        """Kill one actor; with ``wait_s``, answer once its process is gone (or that long has passed)."""
        record = self._record(actor_id)
        if record.state == ActorState.DEAD:
            return False
        self._kill(record, "killed by actorlib.kill()")
        if wait_s > 0:
            await self._wait_dead([record], wait_s)
        return True

    async def op_kill_actors(self, peer: bytes, actor_ids: list[str], wait_s: float = 30.0) -> int:
        """Kill several actors and wait (at most ``wait_s``) until their processes are gone."""
        records = [self.actors[a] for a in actor_ids if a in self.actors]  # long-retired ids are dead anyway
        doomed = [r for r in records if r.state != ActorState.DEAD]
        for record in doomed:
            self._kill(record, "killed by actorlib.kill()")
        await self._wait_dead(doomed, wait_s)
        return len(doomed)

    async def op_list_actors(self, peer: bytes) -> list[dict[str, Any]]:
        return [r.view() for r in self.actors.values()]

    async def op_waiting_reason(self, peer: bytes, actor_id: str) -> str:
        """Why the actor is not running yet ("" if it is, or is unknown): for a get() that timed out."""
        record = self.actors.get(actor_id) if isinstance(actor_id, str) else None
        if record is None:
            return ""
        if record.state.waiting:
            return self._why_waiting(record)
        return "its worker is starting" if record.state == ActorState.STARTING else ""

    def _why_waiting(self, record: ActorRecord) -> str:
        s = record.spec
        if s.placement_group is not None:
            return f"waiting for a bundle of placement group {s.placement_group[:8]} to have room"
        if not self._fits_a_node(s):  # (the node that could hold it left: it waits for one to join)
            return f"infeasible now: {self._too_big(s)}"
        return "waiting for resources: no node has that much free now"

    async def op_status(self, peer: bytes) -> dict[str, Any]:
        """Everything ``actorlib status`` shows: nodes, actors, placement groups, and what waits and why."""
        pending = []
        for actor_id in self._pending:
            record = self.actors.get(actor_id)
            if record is None or not record.state.waiting:
                continue
            s = record.spec
            why = self._why_waiting(record)
            pending.append({"actor_id": actor_id, "class_name": s.class_name, "name": s.name, "demand": s.demand, "reason": why})
        return {
            "session_dir": self.session_dir,
            "address": self.address,
            "nodes": [n.view() for n in self.nodes.values()],
            "actors": [r.view() for r in self.actors.values()],
            "placement_groups": [p.view() for p in self.pgs.values()],
            "pending": pending,
            "drivers": [{"job_id": d.job_id, "namespace": d.namespace, "actors": len(d.actors)} for d in self.drivers.values()],
        }

    async def op_nodes(self, peer: bytes) -> list[dict[str, Any]]:
        return [n.view() for n in self.nodes.values()]

    async def op_cluster_resources(self, peer: bytes) -> dict[str, float]:
        return self._sum(lambda n: n.pool.total)

    async def op_available_resources(self, peer: bytes) -> dict[str, float]:
        return self._sum(lambda n: n.pool.free)

    def _sum(self, which: Any) -> dict[str, float]:
        units: dict[str, int] = {}
        for n in self.nodes.values():
            if n.alive:
                for k, v in which(n).items():
                    units[k] = units.get(k, 0) + v
        return to_float(units)

    # -- deaths ----------------------------------------------------------

    def _record(self, actor_id: str) -> ActorRecord:
        record = self.actors.get(actor_id)
        if record is None:
            raise ControlError("ValueError", f"no actor with id {actor_id}")
        return record

    def _kill(self, record: ActorRecord, reason: str) -> None:
        record.kill_requested = True
        if record.state.waiting:
            self._mark_dead(record, {"reason": reason})
            return
        record.death = {"reason": reason}
        node = self.nodes.get(record.node_id or "")
        if node is not None and record.pid is not None:
            self._spawn_task(self._kill_pid(node, record.pid))

    async def _kill_pid(self, node: NodeRecord, pid: int) -> None:
        assert self.endpoint is not None
        try:
            await control_call(self.endpoint, "kill_worker", peer=node.peer, pid=pid, timeout=10)
        except (TransportError, asyncio.TimeoutError) as exc:  # the node may be gone: its workers die with it
            log.warning("could not kill worker %d on node %s: %s", pid, node.node_id[:8], exc)

    async def _wait_dead(self, records: list[ActorRecord], timeout: float) -> None:
        async def one(r: ActorRecord) -> None:
            while r.state != ActorState.DEAD:
                await r.changed.wait()

        if records:
            await asyncio.wait([asyncio.ensure_future(one(r)) for r in records], timeout=timeout)

    def _lost(self, record: ActorRecord, death: dict[str, Any]) -> None:
        """The actor's worker is gone (exited, or its node): restart it if ``max_restarts`` allows, else it is dead."""
        if record.state == ActorState.DEAD:
            return
        if not record.may_restart():
            self._mark_dead(record, death)
            return
        self._end_incarnation(record, kill=False)  # its process is gone, or its node is
        self._end_children(record)
        record.restarts += 1
        limit = "unlimited" if record.spec.max_restarts == -1 else str(record.spec.max_restarts)
        log.warning("actor %s restarting (%d of %s): %s", record.spec.actor_id[:8], record.restarts, limit, death.get("reason"))
        record.set_state(ActorState.RESTARTING)
        notice = {
            "class_name": record.spec.class_name,
            "name": record.spec.name,
            "actor_id": record.spec.actor_id,
            "node_id": death.get("node_id"),
            **death,
            "reason": f"{death.get('reason') or 'its worker was lost'}; restarting ({record.restarts} of {limit})",
        }
        for peer in self._watchers.get(record.spec.actor_id, set()):
            self._notify(peer, "actor_restarting", {"actor_id": record.spec.actor_id, "death": notice})
        self._pending.append(record.spec.actor_id)
        self._schedule()

    def _hung(self, record: ActorRecord) -> None:
        """An ALIVE actor's worker stopped sending heartbeats: kill it (it may be stopped or deadlocked), then restart or bury it."""
        node = self.nodes.get(record.node_id or "")
        pid = record.pid
        log.warning("actor %s: worker %s sent no heartbeat for %g s: killing it", record.spec.actor_id[:8], pid, self.worker_timeout)
        self._end_incarnation(record)  # SIGKILL through its node, if that node still answers
        self._lost(
            record,
            {
                "reason": f"its worker stopped answering (no heartbeat for {self.worker_timeout:g} s: hung, stopped or deadlocked)",
                "pid": pid,
                "host": node.address if node else None,
            },
        )

    def _end_incarnation(self, record: ActorRecord, *, kill: bool = True) -> None:
        """Forget the actor's current worker (killed, with ``kill``) and give back what it held."""
        if record.pid is not None:
            record.retired_pids.add(record.pid)
            node = self.nodes.get(record.node_id or "")
            if kill and node is not None and node.alive:
                self._spawn_task(self._kill_pid(node, record.pid))
        record.pid = None
        record.address = None
        if record.allocation is not None and record.pool is not None:
            record.pool.release(record.allocation)
        record.allocation = None
        record.pool = None

    def _mark_dead(self, record: ActorRecord, death: dict[str, Any]) -> None:
        if record.state == ActorState.DEAD:
            return
        previous = record.death or {}
        record.death = {
            "class_name": record.spec.class_name,
            "name": record.spec.name,
            "actor_id": record.spec.actor_id,
            "pid": record.pid,
            "node_id": record.node_id,
            **death,
            **({"reason": previous["reason"]} if "reason" in previous else {}),
        }
        record.address = None
        if record.allocation is not None and record.pool is not None:
            record.pool.release(record.allocation)
        record.allocation = None
        record.pool = None
        record.set_state(ActorState.DEAD)
        self._end_children(record)
        _retire(self.actors, self._dead_actors, record.spec.actor_id, self._forgotten_actors)
        if record.spec.name is not None and self.named.get((record.spec.namespace, record.spec.name)) == record.spec.actor_id:
            del self.named[(record.spec.namespace, record.spec.name)]
        for driver in self.drivers.values():
            driver.actors.discard(record.spec.actor_id)
        for peer in self._watchers.pop(record.spec.actor_id, set()):
            self._notify(peer, "actor_died", {"actor_id": record.spec.actor_id, "death": record.death})
        self._schedule()

    def _end_children(self, record: ActorRecord) -> None:
        """What an actor made goes with the worker that made it (as an owner's objects do in Ray), unless
        detached: its actors are killed, its placement groups removed. A restarted actor starts without them."""
        children, record.children = record.children, set()
        groups, record.child_groups = record.child_groups, set()
        reason = f"the actor that created it ({record.spec.class_name} {record.spec.actor_id[:8]}) died"
        for actor_id in children:
            child = self.actors.get(actor_id)
            if child is not None and child.state != ActorState.DEAD:
                self._kill(child, reason)
        for pg_id in groups:
            pg = self.pgs.get(pg_id)
            if pg is not None and pg.state != PlacementGroupState.REMOVED:
                self._remove_group(pg)

    def _notify(self, peer: bytes, topic: str, payload: dict[str, Any]) -> None:
        """One-way event to a peer; a peer that is gone is skipped."""
        assert self.endpoint is not None
        try:
            send_event(self.endpoint, topic, payload, peer)
        except TransportError as exc:
            log.debug("head: could not tell %r about %s: %s", peer, topic, exc)

    def _on_event(self, peer: bytes, topic: str, payload: dict[str, Any]) -> None:
        if not isinstance(payload, dict):
            log.warning("head: malformed %r event from %r", topic, peer)
            return
        if topic == "actor_heartbeat":
            record = self.actors.get(payload.get("actor_id", ""))
            if record is not None and record.pid == payload.get("pid"):
                record.last_seen = asyncio.get_running_loop().time()
            return
        if topic == "worker_exited":
            record = self.actors.get(payload.get("actor_id", ""))
            # pid None: the worker died before the spawn answer was read (one worker per actor at a time)
            pid = payload.get("pid")
            if record is None or record.pid not in (None, pid) or record.state.waiting or pid in record.retired_pids:
                return
            record.pid = pid
            self._lost(
                record,
                {
                    "reason": payload.get("reason") or "the worker process died",
                    "exit_code": payload.get("exit_code"),
                    "signal": payload.get("signal"),
                    "host": payload.get("host"),
                    "stderr_tail": payload.get("stderr_tail", []),
                },
            )
        elif topic == "log":
            record = self.actors.get(payload.get("actor_id", ""))
            if record is None:
                return
            for driver in list(self.drivers.values()):
                if driver.job_id == record.spec.owner and driver.log_to_driver:
                    self._notify(driver.peer, "log", payload)
        else:
            log.warning("head: unknown event %r from %r", topic, peer)


SPAWN_TIMEOUT = 60.0  # for a node to fork a worker
LEFT = "left the cluster"  # how a node that unregistered went: no cause for alarm
KEEP_FINISHED = 1000  # dead actors and removed placement groups kept for reading
UNKNOWN_ACTOR_WAIT = 10.0  # how long resolving an actor id not created yet waits for its creation
KEEP_FORGOTTEN = 100_000  # ids of dead actors no longer kept: resolving one says so at once


def _retire(table: dict[str, Any], finished: collections.deque[str], key: str, forgotten: dict[str, None] | None = None) -> None:
    """``key`` is finished: kept for reading among the last :data:`KEEP_FINISHED`; older ones are dropped
    (their keys noted in ``forgotten``, itself bounded)."""
    finished.append(key)
    while len(finished) > KEEP_FINISHED:
        old = finished.popleft()
        table.pop(old, None)
        if forgotten is not None:
            forgotten[old] = None
            if len(forgotten) > KEEP_FORGOTTEN:
                del forgotten[next(iter(forgotten))]
