"""The driver's side of a compiled graph: compiling once, then executing many times.

::

    COMPILING ──▶ READY ──▶ TORN_DOWN
                    │           ▲
                    └─▶ FAILED ─┘   (an actor died; teardown() still cleans up)

Compiling (:func:`compile_graph`) walks the graph from its output, orders
its nodes, and for each participating actor writes a plan: the nodes it
hosts, where their outputs go, and the channels it is one end of (one
torch.distributed group per direction between two actors that exchange
values, gloo and/or NCCL). One actor hosts a ``TCPStore`` for the groups'
rendezvous; every actor then sets its part up (``setup``), and the driver
opens a results stream from each (:mod:`actorlib.dag_worker`).

``execute(*args)`` numbers the execution, sends one ``exec`` message to the
actors whose nodes read the input, and returns an ``ObjectRef`` completed
when every output has come back on the results streams. At most
``max_inflight`` executions are on their way; more wait for a slot.
A stage that raised fails its execution (``RemoteError`` with the remote
traceback); an actor that dies fails its stream, and with it every pending
and later execution, with ``ActorDiedError``.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import itertools
import logging
import threading
import uuid
from typing import Any

from transport import DecodeError, Endpoint, Kind, Message, TransportError, dumps, loads, wait_sent

from . import broadcast, runtime
from .actor import ActorHandle
from .completion import wait_for
from .connection import Call, encode_call
from .dag import ClassMethodNode, DAGNode, InputAttributeNode, InputNode, MultiOutputNode
from .dag_channel import inline, uninline
from .dag_worker import CONTROL, INPUT, event
from .exceptions import ActorDiedError, ActorLibError, SerializationError, error_from_record
from .object_ref import ObjectRef, ObjectRefGenerator

__all__ = ["CompiledDAG", "compile_graph"]

log = logging.getLogger(__name__)

_COPY_BELOW = 64 << 10
CHANNEL_ERROR_GRACE_S = 5.0  # a broken tensor channel usually means a dead actor: wait this long to say which


class GraphState(str, enum.Enum):
    COMPILING = "COMPILING"
    READY = "READY"
    FAILED = "FAILED"
    TORN_DOWN = "TORN_DOWN"


class _Pending:
    __slots__ = ("ref", "parts", "errors", "arrived")

    def __init__(self, ref: ObjectRef, outputs: int) -> None:
        self.ref = ref
        self.parts: list[Any] = [None] * outputs
        self.errors: dict[int, dict[str, Any]] = {}
        self.arrived = [False] * outputs  # an output can come twice: through a shared-memory slot and over ZeroMQ


def compile_graph(root: DAGNode, *, max_inflight: int = 8, timeout: float = 120.0) -> CompiledDAG:
    """Set ``root``'s graph up on its actors (see the module docstring)."""
    if isinstance(max_inflight, bool) or not isinstance(max_inflight, int) or max_inflight < 1:
        raise ValueError(f"max_inflight must be an int >= 1, not {max_inflight!r}")
    if not isinstance(timeout, int | float) or timeout <= 0:
        raise ValueError(f"timeout must be a number > 0, not {timeout!r}")
    graph = _Graph(root)
    rt = runtime.current()
    compiled = CompiledDAG(rt, graph, max_inflight)
    try:
        rt.run(compiled._setup(float(timeout)), timeout=timeout + 30)
    except BaseException:
        compiled._state = GraphState.TORN_DOWN
        try:
            rt.run(compiled._teardown_actors(10.0), timeout=40)
        except Exception:
            log.debug("cleaning up after a failed compile failed", exc_info=True)
        raise
    return compiled


class _Graph:
    """The graph's nodes in execution order, and what each actor must know about it."""

    def __init__(self, root: DAGNode) -> None:
        if isinstance(root, MultiOutputNode):
            self.outputs: list[ClassMethodNode] = [n for n in root._nodes if isinstance(n, ClassMethodNode)]
            self.multi = True
        elif isinstance(root, ClassMethodNode):
            self.outputs = [root]
            self.multi = False
        else:
            raise TypeError(f"compile() a method node (.bind(...)) or a MultiOutputNode, not {root!r}")
        self.order: list[ClassMethodNode] = []
        self.inputs: set[InputNode] = set()
        self.input_keys: set[int | str | None] = set()  # None: the InputNode itself
        seen: set[int] = set()
        for out in self.outputs:
            self._visit(out, seen)
        if len(self.inputs) > 1:
            raise ValueError("a graph has at most one InputNode")
        self.ids = {id(node): i for i, node in enumerate(self.order)}
        self.actors: dict[str, ActorHandle] = {}
        for node in self.order:
            self.actors.setdefault(node._handle._actor_id, node._handle)

    def _visit(self, node: ClassMethodNode, seen: set[int]) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        for arg in (*node._args, *node._kwargs.values()):
            if isinstance(arg, ClassMethodNode):
                self._visit(arg, seen)
            elif isinstance(arg, InputNode):
                self.inputs.add(arg)
                self.input_keys.add(None)
            elif isinstance(arg, InputAttributeNode):
                self.inputs.add(arg._root)
                self.input_keys.add(arg._key)
        self.order.append(node)  # after everything it reads: a topological order

    def spec(self, arg: Any) -> list[Any]:
        if isinstance(arg, ClassMethodNode):
            return ["n", self.ids[id(arg)]]
        if isinstance(arg, InputNode):
            return ["i", None]
        if isinstance(arg, InputAttributeNode):
            return ["i", arg._key]
        return ["c", arg]

    def sources(self, node: ClassMethodNode) -> list[int]:
        """What a node waits for: other nodes' outputs, and the input (a node reading nothing waits for the input)."""
        srcs: list[int] = []
        for arg in (*node._args, *node._kwargs.values()):
            src = (
                self.ids[id(arg)]
                if isinstance(arg, ClassMethodNode)
                else INPUT
                if isinstance(arg, InputNode | InputAttributeNode)
                else None
            )
            if src is not None and src not in srcs:
                srcs.append(src)
        return srcs or [INPUT]

    def plans(self, cuda: dict[str, bool]) -> tuple[dict[str, dict[str, Any]], list[str]]:
        """Each actor's plan (without the store's address), and the actors that read the input."""
        plans: dict[str, dict[str, Any]] = {
            aid: {"nodes": [], "consumers": {}, "peers": {}, "channels": []} for aid in self.actors
        }
        owner = {i: node._handle._actor_id for i, node in enumerate(self.order)}
        remote: dict[int, list[str]] = {i: [] for i in owner}
        pairs: dict[tuple[str, str], set[str]] = {}  # (from actor, to actor) -> backends
        input_actors: list[str] = []
        for i, node in enumerate(self.order):
            aid = owner[i]
            for src in self.sources(node):
                consumers = plans[aid]["consumers"]
                consumers[src] = consumers.get(src, 0) + 1
                if src == INPUT:
                    if aid not in input_actors:
                        input_actors.append(aid)
                    continue
                sender = owner[src]
                if sender == aid or aid in remote[src]:
                    continue
                remote[src].append(aid)
                transport = self.order[src]._transport
                both_cuda = cuda[sender] and cuda[aid]
                if transport == "nccl" and not both_cuda:
                    raise ValueError(
                        f"{self.order[src]!r} sends with transport 'nccl' but "
                        f"{'the sender' if not cuda[sender] else 'the receiver'} has no CUDA device"
                    )
                backends = pairs.setdefault((sender, aid), set())
                if transport in ("gloo", "auto"):
                    backends.add("gloo")
                if transport == "nccl" or (transport == "auto" and both_cuda):
                    backends.add("nccl")
        outputs: dict[int, list[int]] = {}
        for index, node in enumerate(self.outputs):
            outputs.setdefault(self.ids[id(node)], []).append(index)
        for i, node in enumerate(self.order):
            plans[owner[i]]["nodes"].append(
                {
                    "id": i,
                    "method": node._method,
                    "args": [self.spec(a) for a in node._args],
                    "kwargs": {k: self.spec(v) for k, v in node._kwargs.items()},
                    "srcs": self.sources(node),
                    "outputs": outputs.get(i, []),
                    "remote": remote[i],
                    "transport": node._transport,
                }
            )
        channel_ids = itertools.count()
        for (sender, receiver), backends in pairs.items():
            for backend in sorted(backends):
                cid = next(channel_ids)
                plans[sender]["channels"].append([cid, receiver, "send", backend])
                plans[receiver]["channels"].append([cid, sender, "recv", backend])
            plans[sender]["peers"][receiver] = True
        for plan in plans.values():
            plan["consumers"] = [[src, n] for src, n in plan["consumers"].items()]
        return plans, input_actors


class CompiledDAG:
    """A graph set up on its actors. ``execute()`` / ``execute_async()`` run it; ``teardown()`` ends it."""

    def __init__(self, rt: runtime.Runtime, graph: _Graph, max_inflight: int) -> None:
        self._rt = rt
        self._graph = graph
        self.graph_id = uuid.uuid4().hex
        self.max_inflight = max_inflight
        self._actors = {aid: h._class_name for aid, h in graph.actors.items()}
        self._links: list[Endpoint] = []  # this graph's own sockets to its input actors
        self._link_slots: list[tuple[int, str] | None] = []  # each input actor's slot in _slots, and its id
        self._linked = 0  # pairs of stages with a slot between them
        self._slots: broadcast.Broadcast | None = None  # executions in, outputs out, while both ends poll
        self._output_slots: list[int] = []
        self._outputs = len(graph.outputs)
        self._state = GraphState.COMPILING
        self._error: BaseException | None = None
        self._lock = threading.Lock()  # pending executions and slots: taken by callers and by the I/O loop
        self._slot_freed = threading.Condition(self._lock)
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._submit_lock = threading.Lock()  # numbers and sends executions one at a time
        self._next_seq = 0
        self._inflight = 0
        self._pending: dict[int, _Pending] = {}
        self._result_calls: list[tuple[str, Call]] = []  # the output actors' ``results`` calls
        self._sources: tuple[tuple[Any, int, bool | None], ...] | None = None  # where outputs come: see ObjectRef._source

    @property
    def state(self) -> GraphState:
        return self._state

    # -- compiling (on the I/O loop) --------------------------------------------------

    async def _call(self, aid: str, *args: Any, timeout: float | None = None) -> Any:
        ref = self._rt.submit(aid, self._actors[aid], CONTROL, args, {})
        assert isinstance(ref, ObjectRef)
        return await asyncio.wait_for(_await(ref), timeout)

    async def _setup(self, timeout: float) -> None:
        rt, gid = self._rt, self.graph_id
        aids = list(self._actors)
        infos = await asyncio.gather(*(rt.control("resolve_actor", actor_id=aid, timeout=timeout) for aid in aids))
        for info in infos:  # resolving also makes the head tell this driver if one of them dies
            if info["state"] == "DEAD":
                raise ActorDiedError(info.get("death") or {"actor_id": info.get("actor_id", "")})
        addresses = {n["node_id"]: n["address"] for n in await rt.control("nodes", timeout=timeout)}
        address = {aid: addresses.get(info["node_id"], "127.0.0.1") for aid, info in zip(aids, infos, strict=True)}
        probes = await asyncio.gather(*(self._call(aid, "probe", gid, timeout=timeout) for aid in aids))
        cuda = {aid: bool(p["cuda"]) for aid, p in zip(aids, probes, strict=True)}
        plans, input_actors = self._graph.plans(cuda)
        inbox = {aid: p["inbox"] for aid, p in zip(aids, probes, strict=True)}  # where each takes the graph's messages
        store_host = next((aid for aid, plan in plans.items() if plan["channels"]), aids[0])
        port = 0
        if any(plan["channels"] for plan in plans.values()):
            port = await self._call(store_host, "store", gid, address[store_host], timeout, timeout=timeout)
        for aid, plan in plans.items():
            plan["peers"] = {peer: inbox[peer] for peer in plan["peers"]}
            plan.update(
                cuda=cuda[aid],
                graph=gid,
                store=[address[store_host], port],
                address=address[aid],
                max_inflight=self.max_inflight,
                timeout=timeout,
            )
        await asyncio.gather(*(self._call(aid, "setup", plans[aid], timeout=timeout) for aid in aids))
        for aid in input_actors:  # read once set up: a round trip on each now, so executions leave at once
            self._links.append(Endpoint.connect(inbox[aid], on_message=None, name=f"graph {gid[:8]} to {aid[:8]}"))
        await asyncio.gather(*(link.call(Kind.PING, None, timeout=timeout) for link in self._links))
        for link in self._links:
            link.stop_reading()  # only sent on from now on (by callers' threads): its wake-ups would only cost the loop
        self._state = GraphState.READY
        outputs = {node._handle._actor_id for node in self._graph.outputs}
        for aid in aids:  # open for the graph's lifetime: outputs come back on it, and an actor's death fails it
            args = ("results", gid)
            sink: Any = _Results(self, aid)  # takes every answer to the call (Call only needs _set_message/_set_error)
            call = Call(CONTROL, args, {}, None, encode_call(CONTROL, args, {}, None), sink, False)
            rt.connection(aid, self._actors[aid]).submit(call)
            if aid in outputs:
                self._result_calls.append((aid, call))
        await self._offer_slots(aids, input_actors, outputs, timeout)
        await self._link_stages(plans, timeout)

    async def _offer_slots(self, aids: list[str], input_actors: list[str], outputs: set[str], timeout: float) -> None:
        """Shared-memory slots (actorlib.broadcast) to the input and output actors on this machine whose nodes
        are all sync: an execution's message goes in by one, its outputs come back by the other."""
        users = [aid for aid in aids if aid in outputs or aid in input_actors]
        slots = broadcast.make(len(aids)) if users else None
        if slots is None:
            return
        self._slots = slots  # closed by _teardown_actors, whatever happens
        index = {aid: i for i, aid in enumerate(aids)}
        if not await slots.offer(self._rt, [(aid, self._actors[aid], index[aid]) for aid in users], timeout, self.graph_id):
            return
        self._link_slots = [(index[aid], aid) if slots.is_attached(index[aid]) else None for aid in input_actors]
        self._output_slots = [index[aid] for aid, _ in self._result_calls if slots.is_attached(index[aid])]

    async def _link_stages(self, plans: dict[str, dict[str, Any]], timeout: float) -> None:
        """A shared-memory slot for each pair of stages on this machine, the receiver's nodes all sync: the
        outputs the sender hands on without a transfer (small tensors inside) go through it (see
        ``GraphRuntime._deliver``)."""
        edges = [((a, self._actors[a]), (b, self._actors[b])) for a, plan in plans.items() for b in plan["peers"]]
        slots = broadcast.make(len(edges)) if edges else None
        if slots is None:
            return
        try:
            self._linked = await slots.link(self._rt, edges, timeout, self.graph_id)
        finally:
            slots.close()  # (the stages keep their mappings)

    # -- results (on the I/O loop) --------------------------------------------------

    def _results_ended(self, aid: str, error: BaseException | None) -> None:
        if isinstance(error, ActorDiedError):
            err: BaseException = error
        else:
            reason = f": {error}" if error is not None else ""
            err = ActorLibError(f"{self._actors[aid]} ({aid[:8]}) left the compiled graph{reason}")
        if self._state is not GraphState.TORN_DOWN:
            self._fail(err)
        elif isinstance(error, ActorDiedError):  # it died while teardown() waits for the executions on their way:
            with self._lock:  # they fail now, and with that (not at the end of teardown's timeout)
                pending, self._pending = self._pending, {}
            for p in pending.values():
                _settle(p.ref, error=err)

    def _on_result(self, seq: int, index: int, ok: bool, value: Any, small: Any = None) -> None:
        if small is not None:
            value = uninline(small)
        with self._lock:
            pending = self._pending.get(seq)
            if pending is None or pending.arrived[index]:
                return  # (the second copy of an output that a worker sent both ways: see actorlib.broadcast)
            pending.arrived[index] = True
            if ok:
                pending.parts[index] = value
            else:
                pending.errors[index] = value
            if not all(pending.arrived):
                return
            del self._pending[seq]
            self._release_locked()
        if pending.errors:
            record = pending.errors[min(pending.errors)]
            if isinstance(record, dict) and record.get("type") == "dag_channel":
                self._channel_error(pending, record)
                return
            _settle(pending.ref, error=error_from_record(record if isinstance(record, dict) else {"message": str(record)}))
        else:
            _settle(pending.ref, value=pending.parts if self._graph.multi else pending.parts[0])

    def _channel_error(self, pending: _Pending, record: dict[str, Any]) -> None:
        """A tensor transfer broke, most likely because an actor died: fail with ActorDiedError once the head says so."""
        peer = str(record.get("peer", ""))

        async def decide() -> None:
            try:
                info = await self._rt.control("resolve_actor", actor_id=peer, timeout=CHANNEL_ERROR_GRACE_S)
            except Exception:
                info = {}
            if info.get("state") == "DEAD":
                err: BaseException = ActorDiedError(info.get("death") or {"actor_id": peer})
                self._fail(err)
            else:
                err = failed
            _settle(pending.ref, error=err)

        failed = ActorLibError(f"a tensor transfer of the compiled graph failed: {record.get('message')}")
        coro = decide()
        try:
            self._rt.call_soon(self._rt.loop.create_task, coro)  # from any thread: callers read outputs too
        except RuntimeError:  # actorlib was shut down meanwhile
            coro.close()
            _settle(pending.ref, error=failed)

    def _fail(self, err: BaseException) -> None:
        """An actor is gone: every pending and later execution fails with ``err``; the others drop the graph."""
        with self._lock:
            if self._state is not GraphState.READY:
                return
            self._state = GraphState.FAILED
            self._error = err
            pending, self._pending = self._pending, {}
            self._inflight = 0
            self._wake_all_locked()
        for p in pending.values():
            _settle(p.ref, error=err)
        if self._rt.in_loop():
            self._rt.loop.create_task(self._teardown_actors(10.0))

    # -- slots ------------------------------------------------------------------------

    def _check_usable_locked(self) -> None:
        if self._state is GraphState.FAILED:
            assert self._error is not None
            raise self._error
        if self._state is not GraphState.READY:
            raise ActorLibError(f"this compiled graph is {self._state.value.lower().replace('_', ' ')}")
        if runtime.current_or_none() is not self._rt:
            raise ActorLibError("actorlib was shut down since this graph was compiled: compile it again")

    def _release_locked(self) -> None:
        self._inflight -= 1
        self._slot_freed.notify()
        self._wake_async_locked()

    def _wake_all_locked(self) -> None:
        self._slot_freed.notify_all()
        self._wake_async_locked()

    def _wake_async_locked(self) -> None:
        waiters, self._async_waiters = self._async_waiters, []
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(_set_none, fut)
            except RuntimeError:
                pass  # that loop is closed

    def _reserve(self) -> None:
        with self._lock:
            while True:
                self._check_usable_locked()
                if self._inflight < self.max_inflight:
                    self._inflight += 1
                    return
                self._slot_freed.wait()

    async def _reserve_async(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                self._check_usable_locked()
                if self._inflight < self.max_inflight:
                    self._inflight += 1
                    return
                fut: asyncio.Future[None] = loop.create_future()
                self._async_waiters.append((loop, fut))
            await fut

    # -- executing ----------------------------------------------------------------------

    def _check_args(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        keys = self._graph.input_keys
        if None in keys and (len(args) != 1 or kwargs):
            raise TypeError(
                f"this graph reads its InputNode as one value: execute() takes exactly one positional argument "
                f"(got {len(args)} and {len(kwargs)} keyword); index it (inp[0], inp.name) to take several"
            )
        for key in keys:
            if isinstance(key, int) and key >= len(args):
                raise TypeError(f"the graph reads inp[{key}] but execute() got {len(args)} positional argument(s)")
            if isinstance(key, str) and key not in kwargs:
                raise TypeError(f"the graph reads the keyword argument {key!r}, which execute() did not get")
        for value in (*args, *kwargs.values()):
            if isinstance(value, ObjectRef | ObjectRefGenerator):
                raise TypeError("execute() takes values, not ObjectRefs: get() them first")

    def _submit(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> ObjectRef:
        """Number one execution (a slot is reserved) and send it to the input actors: one one-way message each."""
        try:
            args_list, kwargs = list(args), dict(kwargs)
            inlined: list[list[Any]] = []
            for i, value in enumerate(args_list):
                small = inline(value)
                if small is not None:
                    inlined.append([i, small])
                    args_list[i] = None
            for key, value in kwargs.items():
                small = inline(value)
                if small is not None:
                    inlined.append([key, small])
                    kwargs[key] = None
            inner, buffers = dumps([args_list, kwargs, inlined])
        except Exception as exc:  # (EncodeError, or a tensor torch cannot give the bytes of): the slot goes back
            with self._lock:
                self._release_locked()
            raise SerializationError(f"could not serialize the arguments of execute(): {exc}") from None
        # small arrays are copied now; larger ones are waited for until sent: the caller may change them on return
        buffers = [bytes(b) if memoryview(b).nbytes < _COPY_BELOW else b for b in buffers]
        with self._submit_lock:
            seq = self._next_seq
            self._next_seq = seq + 1
            ref = ObjectRef(("CompiledDAG", f"execute#{seq}"))
            if self._rt.direct_answers:
                ref._source = self._sources or self._find_sources()
            with self._lock:
                try:
                    self._check_usable_locked()
                except BaseException:
                    self._release_locked()
                    raise
                self._pending[seq] = _Pending(ref, self._outputs)
            body = event("exec", self.graph_id, seq, inner)
            links, link_slots = self._links, self._link_slots  # (torn down meanwhile: links is empty)
            for n, link in enumerate(links):
                slot = link_slots[n] if n < len(link_slots) else None
                if slot is not None and not buffers and self._post(slot, body):
                    continue
                try:
                    tracker = link.send(Kind.EVENT, 0, body, buffers, track=bool(buffers))
                    if tracker is not None:
                        wait_sent(tracker, functools.partial(_open, link))
                except TransportError as exc:
                    self._rt.call_soon(self._fail, ActorLibError(f"could not send an execution to its input actors: {exc}"))
                    break
        return ref

    def _post(self, slot: tuple[int, str], body: bytes) -> bool:
        slots = self._slots
        if slots is None:
            return False
        index, aid = slot
        return slots.try_post(index, body, functools.partial(broadcast.poke, self._rt, aid, self._actors[aid]))

    def _find_sources(self) -> tuple[tuple[Any, int, bool | None], ...] | None:
        """The output actors' streams of results, once every ``results`` call is on its socket: a thread
        blocked on an execution's ref reads its outputs there itself (``object_ref.wait_reading``)."""
        sources: list[tuple[Any, int, bool | None]] = []
        for aid, call in self._result_calls:
            conn = self._rt._conns.get(aid)
            if conn is None or conn.endpoint is None or call.req_id == 0:
                return None
            sources.append((conn.endpoint, call.req_id, True))
        if self._slots is not None:
            sources += [(self._slots, i, None) for i in self._output_slots]  # see ReplyWatch
        self._sources = tuple(sources)
        return self._sources

    def execute(self, *args: Any, **kwargs: Any) -> ObjectRef:
        """Start one execution with these arguments; returns its ObjectRef (``actorlib.get`` it, or ``await`` it).

        Waits first while ``max_inflight`` executions are on their way.
        """
        self._check_args(args, kwargs)
        if self._rt.in_loop():
            raise ActorLibError("execute() would block the event loop here; use `await compiled.execute_async(...)`")
        self._reserve()
        return self._submit(args, kwargs)

    async def execute_async(self, *args: Any, **kwargs: Any) -> Any:
        """Run one execution and return its result (waits, without blocking the loop, for a free slot first)."""
        self._check_args(args, kwargs)
        await self._reserve_async()
        return await self._submit(args, kwargs)

    # -- the end ------------------------------------------------------------------------------

    def teardown(self, timeout: float = 60.0) -> None:
        """Let running executions finish (at most ``timeout`` s), then stop the graph on every actor.

        Executions still running after that fail. Safe to call more than once, and after a failure.
        """
        if self._rt.in_loop():  # it waits for results that this very loop delivers
            raise ActorLibError(
                "teardown() would block the event loop here (an async actor method): "
                "call it from a thread, e.g. `await loop.run_in_executor(None, compiled.teardown)`"
            )
        with self._lock:
            if self._state is GraphState.TORN_DOWN:
                return
            was_ready = self._state is GraphState.READY
            self._state = GraphState.TORN_DOWN  # no new executions from here on
            pending = list(self._pending.values())
            self._wake_all_locked()
        if was_ready and pending:
            wait_for([p.ref._fut for p in pending], len(pending), timeout)
        if self._rt.loop.is_running():  # after actorlib.shutdown() the actors are gone already
            coro = self._teardown_actors(timeout)
            try:
                self._rt.run(coro, timeout=timeout + 10)
            except Exception:
                coro.close()
                log.debug("teardown of compiled graph %s", self.graph_id[:8], exc_info=True)
        with self._lock:
            left, self._pending = self._pending, {}
        for p in left.values():
            _settle(p.ref, error=ActorLibError("the compiled graph was torn down before this execution finished"))

    async def _teardown_actors(self, timeout: float) -> None:
        links, self._links = self._links, []
        for link in links:
            link.close()
        slots, self._slots = self._slots, None
        if slots is not None:
            slots.close()

        async def one(aid: str) -> None:
            try:
                await self._call(aid, "teardown", self.graph_id, timeout=timeout)
            except Exception:
                pass  # a dead actor has nothing left to tear down

        await asyncio.gather(*(one(aid) for aid in self._actors))

    def __repr__(self) -> str:
        return (
            f"CompiledDAG({self.graph_id[:8]}, {len(self._graph.order)} nodes on {len(self._actors)} actors, {self._state.value})"
        )


class _Results:
    """The sink of one actor's ``results`` call: its stream items are outputs; its end, or its failure, ends the graph."""

    def __init__(self, graph: CompiledDAG, aid: str) -> None:
        self._graph = graph
        self._aid = aid

    def _set_message(self, msg: Message) -> None:
        try:
            value = loads(msg.body, msg.buffers)
        except DecodeError as exc:
            if msg.kind == Kind.STREAM_ITEM:
                log.error("compiled graph %s: an undecodable output was dropped: %s", self._graph.graph_id[:8], exc)
                return
            value = {"message": str(exc)}
        if msg.kind == Kind.STREAM_ITEM:
            for item in value:
                try:
                    if len(item) == 6:  # [seq, index, True, None, None, the value encoded apart]
                        try:
                            item = [*item[:3], loads(item[5], msg.buffers)]
                        except DecodeError as exc:  # that execution fails, and only it
                            message = f"could not deserialize the graph's output {item[1]}: {exc}"
                            item = [item[0], item[1], False, {"type": "serialization", "message": message}]
                    self._graph._on_result(*item)
                except Exception as exc:  # (a value that cannot be rebuilt ...): that execution fails, the rest go on
                    log.exception("compiled graph %s: a malformed output", self._graph.graph_id[:8])
                    try:
                        failure = {"type": "serialization", "message": f"could not read the graph's output: {exc}"}
                        self._graph._on_result(item[0], item[1], False, failure)
                    except Exception:
                        pass  # not even its execution can be told apart
        elif msg.kind == Kind.ERROR:
            self._graph._results_ended(
                self._aid, error_from_record(value if isinstance(value, dict) else {"message": str(value)})
            )
        else:
            self._graph._results_ended(self._aid, None)

    def _set_error(self, exc: BaseException) -> None:
        self._graph._results_ended(self._aid, exc)


async def _await(ref: ObjectRef) -> Any:
    return await ref


def _settle(ref: ObjectRef, value: Any = None, error: BaseException | None = None) -> None:
    """Complete an ObjectRef made by the graph (not by a call)."""
    if error is not None:
        ref._set_error(error)
    else:
        ref._value = value
        ref._fut.set_result(None)


def _open(link: Endpoint) -> bool:
    return not link.closed


def _set_none(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
