"""The actor's side of a compiled graph: the nodes it hosts, run as their inputs arrive.

The worker routes the reserved method ``__actorlib_dag__(op, ...)`` here
(see ``ActorHost._lookup``); it runs on the loop and never waits behind the
actor's own calls:

- at compile time: ``probe`` (has this actor a GPU?), ``store`` (host the
  rendezvous ``TCPStore``), ``setup`` (this actor's plan: build its channels'
  process groups, resolve its peers), ``results`` (the driver's call that
  stays open for the graph's lifetime; each output comes back on it as a
  stream item, and if the actor dies the call fails with ``ActorDiedError``
  and so does the graph);
- ``teardown`` at the end.

Per execution, one-way EVENT messages (no reply, no task; see
:func:`on_event`): ``exec`` from the driver (the execution's arguments) and
``deliver`` from another actor (one node's output, whose tensors follow on a
channel), each on a socket of the graph's own to that actor.

Values are keyed by ``(source node, seq)``. When every input of a node for
the next ``seq`` it has to run has arrived, the node runs: a sync method on
the actor's sync-method thread (in order with the actor's other sync calls:
right there when that thread reads the graph's inbox itself, which it does
where all of the actor's nodes in the graph are sync; as a job otherwise),
which waits there for the tensors still on their way, calls the
method and hands the output on from that thread; an async method in the
node's task on the loop (tensor waits on a helper thread). Handing on means:
to this actor's nodes directly; to another actor a ``deliver`` message over
ZeroMQ and the tensors on the channel to it, posted (or, for big ones over
gloo, queued until the receiver is ready) together under one lock per peer
(so both ends post transfers in the same order); to the driver a
stream item on the ``results`` call. A stage that raised hands on its error
record instead; the nodes after it skip their call and pass it on, so that
execution fails at the driver and the next one runs normally. Nothing polls:
every wait is on a future, a queue, a socket or a transfer.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import datetime
import functools
import logging
import os
import threading
from typing import TYPE_CHECKING, Any

from transport import DecodeError, EncodeError, Endpoint, Kind, Message, TransportError, dumps, loads, wait_sent

from .dag_channel import (
    GLOO_STRIPES,
    BufferPool,
    Channel,
    Outgoing,
    choose_backend,
    from_bytes,
    inline,
    join,
    make_group,
    meta_of,
    small_value,
    split,
    uninline,
    wait_all,
)
from .exceptions import ActorLibError
from .worker import ASYNC, error_record, method_kind

if TYPE_CHECKING:
    from .broadcast import Broadcast, Slot
    from .worker import ActorHost

__all__ = ["CONTROL", "INPUT", "event", "on_event", "reserved_method", "stats"]

log = logging.getLogger(__name__)

CONTROL = "__actorlib_dag__"
INPUT = -1  # the source id of the execution's arguments
COPY_BELOW = 64 << 10  # buffers this small are copied rather than waited for until ZeroMQ has sent them
MAX_SLOTS = 4  # small transfers' receives posted ahead, per channel
_READ_BATCH = 16  # messages a sync-thread reader takes from an inbox before it looks at its other work
OP_TIMEOUT_S = 300.0  # a transfer is posted at both ends only once its sender is ready: this bounds a dead link

_graphs: dict[str, GraphRuntime] = {}  # this worker's graphs, by id
_inboxes: dict[str, Endpoint] = {}  # graphs' inboxes made by ``probe``, until ``setup`` takes them
_stores: dict[str, Any] = {}  # rendezvous stores this worker hosts, by graph id


def reserved_method(host: ActorHost, name: str) -> tuple[Any, int] | None:
    """``(function, kind)`` for a reserved method name, or None. The function takes the call's key first."""
    if name == CONTROL:
        return functools.partial(_control, host), ASYNC
    return None


class _Failed:
    """An execution's error travelling through the graph in place of a value."""

    __slots__ = ("record",)

    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record


class _Incoming:
    """A value from another actor whose tensors are on their way; :meth:`resolve` waits for them (any thread, once)."""

    def __init__(
        self,
        skeleton: bytes,
        parts: list[tuple[Channel, list[int], list[Any], list[Any], list[Any]]],
        ready: dict[int, Any],
        count: int,
        sender: str,
    ) -> None:
        self._skeleton = skeleton
        self._parts = parts  # (channel, indices, metas, tensors, transfers)
        self._ready = ready  # the tensors that came inside the message, by position
        self._count = count
        self._sender = sender
        self._lock = threading.Lock()
        self._value: Any = None
        self._done = False

    def resolve(self) -> Any:
        with self._lock:
            if not self._done:
                self._value = self._finish()
                self._done = True
                self._parts = []
            return self._value

    def _finish(self) -> Any:
        tensors: list[Any] = [self._ready.get(i) for i in range(self._count)]
        try:
            for channel, indices, metas, received, works in self._parts:
                wait_all(works, channel.name)
                for i, t in zip(indices, channel.finish_recv(metas, received), strict=True):
                    tensors[i] = t
        except ConnectionError as exc:
            return _Failed({"type": "dag_channel", "message": str(exc), "peer": self._sender})
        except Exception as exc:
            return _Failed({"type": "serialization", "message": f"could not rebuild the tensors from the previous stage: {exc}"})
        return _join(self._skeleton, tensors)


class _Node:
    def __init__(self, spec: dict[str, Any], host: ActorHost) -> None:
        self.id: int = spec["id"]
        self.method: str = spec["method"]
        self.args: list[Any] = spec["args"]
        self.kwargs: dict[str, Any] = spec["kwargs"]
        self.srcs: list[int] = spec["srcs"]
        self.outputs: list[int] = spec["outputs"]
        self.remote: list[str] = spec["remote"]
        self.transport: str = spec["transport"]
        fn = getattr(host.instance, self.method, None)
        if fn is None or not callable(fn):
            raise AttributeError(f"actor {type(host.instance).__name__} has no method {self.method!r}")
        self.fn = fn
        self.is_async = method_kind(fn) == ASYNC
        self.what = f"{type(host.instance).__name__}.{self.method}"
        self.waiting: dict[int, dict[int, Any]] = {}  # seq -> the inputs arrived so far
        self.next_seq = 0  # the next execution this node runs: they run in order
        self.queue: asyncio.Queue[tuple[int, dict[int, Any]]] = asyncio.Queue()  # nodes run from the loop
        self.sending: list[Any] = []  # transfers of the last output: done before the method runs again
        self.sent: concurrent.futures.Future[None] | None = None  # a helper waiting for them (threaded graphs)


def event(topic: str, gid: str, seq: int, payload: Any) -> bytes:
    """The body of a one-way message of a graph: plain data only, so it can always be read."""
    return dumps([topic, gid, seq, payload], allow_pickle=False)[0]


def on_event(host: ActorHost, msg: Message) -> None:
    """An ``exec`` or ``deliver`` message, on the thread that reads the graph's inbox. The envelope is plain
    data; an execution's arguments are decoded apart, so arguments that cannot be decoded fail that execution,
    not the graph."""
    if msg.kind != Kind.EVENT:
        log.warning("%s: a compiled graph's inbox takes events only, not %s", host.label, msg.kind.name)
        return
    try:
        topic, gid, seq, payload = loads(msg.body, allow_pickle=False)
    except (DecodeError, TypeError, ValueError) as exc:
        log.warning("%s: dropped a malformed message: %s", host.label, exc)
        return
    graph = _graphs.get(gid)
    if graph is None or topic == "poke":
        return  # torn down: what was still on its way is dropped; or only there to wake this thread
    graph.events[topic] = graph.events.get(topic, 0) + 1
    if topic == "exec":
        try:
            args, kwargs, inlined = loads(payload, msg.buffers)
            for where, spec in inlined:  # small tensors that travelled inside the message
                if isinstance(where, int):
                    args[where] = uninline(spec, graph.cuda_device)
                else:
                    kwargs[where] = uninline(spec, graph.cuda_device)
            value: Any = (args, kwargs)
        except (DecodeError, TypeError, ValueError, IndexError) as exc:
            value = _Failed({"type": "serialization", "message": f"could not deserialize the execution's arguments: {exc}"})
        graph.arrive(INPUT, seq, value)
    elif topic == "deliver":
        src, metas, skeleton, record, sender = payload
        graph.on_deliver(seq, src, metas, skeleton, record, sender)


async def _control(host: ActorHost, key: tuple[bytes | None, int], op: str, *args: Any) -> Any:
    if op == "results":
        (gid,) = args
        graph = _graph(gid)
        graph.attach_results(key)
        await graph.done.wait()
        return None
    if op == "probe":
        import torch

        (gid,) = args
        inbox = _inboxes.get(gid)
        if inbox is None:
            inbox = _inboxes[gid] = _open_inbox(host, gid)
        cuda = bool(torch.cuda.is_available() and torch.cuda.device_count() > 0)
        return {"cuda": cuda, "pid": os.getpid(), "inbox": inbox.address}
    if op == "store":
        gid, address, timeout = args
        return await host.loop.run_in_executor(None, _host_store, gid, address, timeout)
    if op == "setup":
        (plan,) = args
        inbox = _inboxes.pop(plan["graph"], None)
        if inbox is None:
            raise ActorLibError(f"compiled graph {plan['graph'][:8]} was not probed on this actor")
        try:
            graph = GraphRuntime(host, plan, inbox)
        except BaseException:
            inbox.close()
            raise
        _graphs[graph.gid] = graph
        try:
            await graph.start()
        except BaseException:
            _graphs.pop(graph.gid, None)
            graph.close()
            raise
        return True
    if op == "teardown":
        (gid,) = args
        gone = _graphs.pop(gid, None)
        if gone is not None:
            gone.close()
        unused = _inboxes.pop(gid, None)
        if unused is not None:
            unused.close()
        _stores.pop(gid, None)
        return True
    raise ValueError(f"unknown compiled-graph operation {op!r}")


def stats() -> dict[str, Any]:
    """What this actor's compiled graphs have done, by graph id: messages taken (``exec`` from the driver,
    ``deliver`` from other actors) and, per channel, values moved and their tensors' bytes. Tensors that
    travelled inside the messages themselves (``auto``, small CPU values) count under ``(zmq)``, and
    ``through_slots`` counts, by peer, the outputs handed on through its shared-memory slot."""

    def name(peer: str, role: str, backend: str) -> str:
        return f"{role} {'to' if role == 'send' else 'from'} {peer} ({backend})"

    out = {}
    for gid, graph in _graphs.items():
        channels = {name(*key): {"transfers": ch.transfers, "bytes": ch.nbytes} for key, ch in graph.channels.items()}
        for (peer, role), (values, nbytes) in list(graph.inlined.items()):  # the sync thread may add one meanwhile
            channels[name(peer, role, "zmq")] = {"transfers": values, "bytes": nbytes}
        slots = {peer: writer.sent for peer, (writer, _) in list(graph.link_slots.items())}
        out[gid] = {"events": dict(graph.events), "channels": channels, "through_slots": slots}
    return out


def _graph(gid: str) -> GraphRuntime:
    graph = _graphs.get(gid)
    if graph is None:
        raise ActorLibError(f"compiled graph {gid[:8]} is not set up on this actor (torn down?)")
    return graph


def graph_runtime(gid: str) -> GraphRuntime | None:
    return _graphs.get(gid)


def _open_inbox(host: ActorHost, gid: str) -> Endpoint:
    """The socket this actor takes the graph's messages on, beside its own (same interface, a port or path of its own).

    Not read yet: ``setup`` decides which thread reads it."""
    assert host.endpoint is not None
    main = host.endpoint.address
    if main.startswith("tcp://"):
        address = main.rsplit(":", 1)[0] + ":0"
    else:
        address = main.removesuffix(".sock") + f"-{gid[:12]}.sock"
    return Endpoint.bind(address, on_message=functools.partial(on_event, host), name=f"graph {gid[:8]} inbox", read_on_loop=False)


def _host_store(gid: str, address: str, timeout: float) -> int:
    import torch.distributed as dist

    store = dist.TCPStore(address, 0, None, True, timeout=datetime.timedelta(seconds=timeout), wait_for_workers=False)
    _stores[gid] = store
    return int(store.port)


class GraphRuntime:
    """One compiled graph on this actor: its nodes, its channels, the inputs that have arrived."""

    def __init__(self, host: ActorHost, plan: dict[str, Any], inbox: Endpoint) -> None:
        self.host = host
        self.inbox = inbox
        self.loop = host.loop
        self.gid: str = plan["graph"]
        self.plan = plan
        self.me: str = host.actor_id
        self.label = host.label
        self.nodes = [_Node(spec, host) for spec in plan["nodes"]]
        # Only sync nodes here: the sync-method thread reads the inbox itself and runs them (no hop through
        # the loop, which sleeps). Otherwise the loop reads it, as it reads the actor's calls.
        self.threaded = not any(node.is_async for node in self.nodes)
        self._ready: collections.deque[tuple[_Node, int, dict[int, Any]]] = collections.deque()  # threaded: runs due
        self._running = False  # threaded: a run is on the sync thread's stack (what arrives meanwhile queues)
        self.readers: dict[int, list[_Node]] = {}
        for node in self.nodes:
            for src in node.srcs:
                self.readers.setdefault(src, []).append(node)
        self.peers: dict[str, str] = plan["peers"]  # the actors this one sends to: their addresses
        self.send_locks = {peer: threading.Lock() for peer in self.peers}
        self.links: dict[str, Endpoint] = {}  # this graph's own sockets to them
        self.channels: dict[tuple[str, str, str], Channel] = {}
        self.tasks: list[asyncio.Task[Any]] = []
        self.pool = BufferPool(per_size=int(plan["max_inflight"]) + 2)
        self.closed = False
        self.done = asyncio.Event()
        self._results: tuple[bytes | None, int] | None = None  # (driver, request id) of the results call
        self._unsent: list[tuple[bytes, list[Any]]] = []  # outputs made before the results call arrived
        self._results_lock = threading.Lock()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self.events: dict[str, int] = {}  # messages taken, by kind (for stats())
        self.inlined: dict[tuple[str, str], list[int]] = {}  # (peer, role) -> [values, bytes] sent inside messages
        self.cuda_device: Any = None  # set by start() on an actor with a GPU
        self.slot: Slot | None = None  # the driver's shared-memory slot for this actor (threaded graphs: see attach_slot)
        self.link_slots: dict[str, tuple[Broadcast, int]] = {}  # peers' slots this one writes its outputs into

    # -- set up and torn down ---------------------------------------------------

    async def start(self) -> None:
        if self.plan.get("cuda"):  # the GPU the actor's sync methods use (vLLM-style workers pick it by local_rank)
            fut: asyncio.Future[Any] = self.loop.create_future()

            def current_device() -> None:
                import torch

                self.loop.call_soon_threadsafe(_settle_soon, fut, torch.device("cuda", torch.cuda.current_device()))

            self.host.post_sync(current_device)
            self.cuda_device = await fut
        groups = await self.loop.run_in_executor(None, self._build_groups)
        self._check_open()
        for (peer, role, backend), (group, *stripes) in groups.items():
            name = f"{role}-{peer[:8]}-{backend}"
            slots = min(int(self.plan["max_inflight"]), MAX_SLOTS)
            self.channels[(peer, role, backend)] = Channel(
                group,
                backend,
                1 if role == "send" else 0,
                name,
                self.pool,
                role=role,
                slots=slots,
                max_inflight=int(self.plan["max_inflight"]),
                cuda_device=self.cuda_device,
                stripes=stripes,
            )
        if self.threaded:  # reading starts before the pings below: two actors may ping each other
            self.host.post_sync(self._watch_inbox)
        else:
            self.inbox.start_reading()
        for peer, address in self.peers.items():
            self.links[peer] = Endpoint.connect(address, on_message=None, name=f"graph {self.gid[:8]} to {peer[:8]}")
        timeout = float(self.plan["timeout"])  # a round trip on each now, so the first execution's messages leave at once
        await asyncio.gather(*(link.call(Kind.PING, None, timeout=timeout) for link in self.links.values()))
        self._check_open()
        for link in self.links.values():
            link.stop_reading()  # only sent on from now on: its socket's wake-ups would only cost the loop
        self.tasks = [
            self.loop.create_task(self._node_loop(node))
            for node in self.nodes
            if node.is_async or not self.threaded
        ]

    def _check_open(self) -> None:
        if self.closed:  # torn down while setting up (another actor's set-up failed): do not go on
            raise ActorLibError(f"compiled graph {self.gid[:8]} was torn down while it was being set up")

    def _watch_inbox(self) -> None:
        """Have the sync thread read the inbox (sync thread; not once torn down: the loop closes the inbox then)."""
        if not self.closed:
            self.host.watch_sync(self.inbox.zmq_socket, self._read_inbox)

    def _read_inbox(self) -> None:
        self.inbox.read_available(_READ_BATCH)

    def _build_groups(self) -> dict[tuple[str, str, str], list[Any]]:
        """Every channel's process groups (a gloo channel's stripes after its first, see ``Channel``), in the
        graph's channel order (so no two actors wait on each other)."""
        channels = sorted(self.plan["channels"])
        if not channels:
            return {}
        import torch
        import torch.distributed as dist

        timeout = float(self.plan["timeout"])
        store = _stores.get(self.gid)
        if store is None:
            host, port = self.plan["store"]
            store = dist.TCPStore(host, int(port), None, False, timeout=datetime.timedelta(seconds=timeout))
        groups: dict[tuple[str, str, str], list[Any]] = {}
        for channel_id, peer, role, backend in channels:
            prefix = dist.PrefixStore(f"actorlib-dag/{self.gid}/{channel_id}/", store)
            rank = 0 if role == "send" else 1
            if backend == "nccl":
                torch.cuda.set_device(self.cuda_device)
            made = groups[(peer, role, backend)] = []
            for stripe in range(GLOO_STRIPES if backend == "gloo" else 1):
                store_of = prefix if stripe == 0 else dist.PrefixStore(f"stripe-{stripe}/", prefix)
                made.append(make_group(backend, store_of, rank, self.plan["address"], max(timeout, OP_TIMEOUT_S)))
            if backend == "nccl":  # NCCL makes its communicator on the first operation: do it now, at both ends
                t = torch.zeros(1, device=self.cuda_device)
                (made[0].send([t], 1, 0) if rank == 0 else made[0].recv([t], 0, 0)).wait()
        return groups

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.done.set()
        for task in self.tasks:
            task.cancel()
        for channel in self.channels.values():
            channel.close()
        self.channels.clear()  # a transfer still being waited for keeps its own channel alive
        for link in self.links.values():
            link.close()
        for writer, _ in self.link_slots.values():
            writer.close()
        self.pool.clear()
        if self.threaded:  # the sync thread owns the inbox and the inputs: it lets them go
            self.host.post_sync(self._close_on_thread)
        else:
            self.inbox.close()
            for node in self.nodes:
                node.waiting.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def _close_on_thread(self) -> None:
        self.host.unwatch_sync(self.inbox.zmq_socket)
        self.host.detach_slot(self.gid)
        for node in self.nodes:
            node.waiting.clear()
        try:
            self.loop.call_soon_threadsafe(self.inbox.close)
        except RuntimeError:
            pass  # the loop is closed: the process is ending

    def attach_results(self, key: tuple[bytes | None, int]) -> None:
        with self._results_lock:
            self._results = key
            unsent, self._unsent = self._unsent, []
            for body, buffers in unsent:
                self._send_result(body, buffers, track=False)

    # -- inputs ------------------------------------------------------------------

    def arrive(self, src: int, seq: int, value: Any) -> None:
        """``src``'s output (or the input) for execution ``seq`` is here, or on its way (loop thread)."""
        if self.closed:
            return
        for node in self.readers.get(src, ()):
            inputs = node.waiting.get(seq)
            if inputs is None:
                inputs = node.waiting[seq] = {}
            inputs[src] = value
            if seq == node.next_seq:
                self._dispatch(node)

    def _dispatch(self, node: _Node) -> None:
        while True:
            seq = node.next_seq
            inputs = node.waiting.get(seq)
            if inputs is None or len(inputs) < len(node.srcs):
                return
            del node.waiting[seq]
            node.next_seq = seq + 1
            if self.threaded:
                self._ready.append((node, seq, inputs))
                if not self._running:
                    self._run_ready()
            else:  # async nodes, and sync ones of an actor with async nodes too: see _node_loop
                node.queue.put_nowait((seq, inputs))

    def on_deliver(self, seq: int, src: int, metas: list[Any] | None, skeleton: bytes | None, record: Any, sender: str) -> None:
        """Another actor's output: post the receives for its tensors now, in arrival order (loop thread)."""
        if record is not None or metas is None or skeleton is None:
            self.arrive(src, seq, _Failed(record or {"type": "dag_channel", "message": "malformed delivery", "peer": sender}))
            return
        if not metas:
            self.arrive(src, seq, _join(skeleton, []))
            return
        by_backend: dict[str, list[int]] = {}
        for i, meta in enumerate(metas):
            by_backend.setdefault(str(meta[3]), []).append(i)
        parts = []
        ready: dict[int, Any] = {}
        failure: Exception | None = None
        try:
            inlined = by_backend.pop("inline", ())
            for i in inlined:
                shape, dtype_name, _, _, data = metas[i]
                ready[i] = from_bytes(dtype_name, shape, data)
            if inlined:
                self._count_inline(sender, "recv", [ready[i] for i in inlined])
        except (TypeError, ValueError, RuntimeError) as exc:
            failure = exc
        if not by_backend and failure is None:
            self.arrive(src, seq, _join(skeleton, [ready[i] for i in range(len(metas))]))
            return
        for backend, indices in by_backend.items():  # each channel posts its receives, whatever the others did:
            channel = self.channels.get((sender, "recv", backend))  # the sender has sent on each
            if channel is None:
                failure = failure or ConnectionError(f"no {backend} channel from {sender[:8]}")
                continue
            chosen = [metas[i] for i in indices]
            try:
                tensors, works = channel.post_recv(chosen)
            except (ConnectionError, TypeError, ValueError, RuntimeError) as exc:
                failure = failure or exc
                continue
            parts.append((channel, indices, chosen, tensors, works))
        if failure is not None:
            for channel, _, _, _, works in parts:
                channel.orphan(works)  # that value fails: what lands for it is dropped with the channel
            self.arrive(src, seq, _Failed({"type": "dag_channel", "message": str(failure), "peer": sender}))
            self._repost()
            return
        self.arrive(src, seq, _Incoming(skeleton, parts, ready, len(metas), sender))

    def _count_inline(self, peer: str, role: str, tensors: list[Any]) -> None:
        counts = self.inlined.setdefault((peer, role), [0, 0])
        counts[0] += 1
        counts[1] += sum(t.nbytes for t in tensors)

    # -- running a node -------------------------------------------------------------

    def _run_ready(self) -> None:
        """Run the nodes whose inputs are all here, in the order they became ready (threaded, sync thread)."""
        self._running = True
        try:
            while self._ready and not self.closed:
                self._run_sync(*self._ready.popleft())
        finally:
            self._running = False

    def _run_sync(self, node: _Node, seq: int, inputs: dict[int, Any]) -> None:
        """One execution of a sync node, on the actor's sync-method thread."""
        if self.closed:
            return
        try:
            values = {src: (v.resolve() if isinstance(v, _Incoming) else v) for src, v in inputs.items()}
            inputs.clear()  # nothing of ours keeps the inputs alive after the call (their buffers are reused)
            if node.sending:
                self._sent(node)
                if self.closed:
                    return  # torn down while waiting
            out = _first_failure(values) or self._invoke(node, values)
            del values
            node.sending = self._emit(node, seq, out, on_loop=False)
            if node.sending and self.threaded:
                node.sent = self._wait_soon(node.sending)
        except BaseException as exc:  # a bug of ours must fail the execution, not leave it hanging
            log.exception("%s: compiled graph node %s failed", self.label, node.what)
            self._emit(node, seq, _Failed(error_record(exc, self.label)), on_loop=False)
        self._repost()

    def _repost(self) -> None:
        """Replace the receive slots that packed transfers took, once their values have been handed on."""
        for (_, role, _), channel in list(self.channels.items()):
            if role == "recv":
                try:
                    channel.repost()
                except Exception as exc:  # the channel failed (or memory ran out): its next transfer fails
                    log.warning("%s: %s", self.label, exc)

    def _sent(self, node: _Node) -> None:
        """Wait until the last output's tensors have left: the method may change that memory once it runs again."""
        works, node.sending = node.sending, []
        waiting, node.sent = node.sent, None
        try:
            if waiting is not None:
                if not waiting.done():
                    self._wait_serving(waiting)
                if waiting.done():
                    waiting.result()
            elif not self.threaded:  # (threaded and no helper: torn down)
                wait_all(works)
        except ConnectionError as exc:
            log.warning("%s: %s", self.label, exc)  # the receiving end fails that execution
        except concurrent.futures.CancelledError:
            pass  # torn down meanwhile

    def _wait_soon(self, works: list[Any]) -> concurrent.futures.Future[None] | None:
        """Have a helper wait for these transfers from now on (threaded, sync thread).

        gloo calls a send complete only once it is waited for, so without
        this the next execution would start by waiting for the last one's
        sends (through a helper, see :meth:`_wait_serving`): ~0.1-0.2 ms of
        hand-overs on its way in, where the helper has usually been done since
        the transfer ended. Only for sends made one by one (big tensors, or
        NCCL's): packed ones are kept by their channel.
        """
        try:
            return self._helpers().submit(wait_all, works)
        except RuntimeError:
            return None  # torn down: the executor is shut down

    def _wait_serving(self, waiting: concurrent.futures.Future[None]) -> None:
        """Wait for a helper's wait for sends while this thread goes on serving (threaded, sync thread).

        A send completes once its receiver has posted the receive, which it
        does when its sync thread reads our message. That thread may be waiting
        for us: here for a send of its own to this actor, or in a method that
        calls one of ours. So a helper waits, and this thread meanwhile reads
        the inboxes (posting receives; nodes of this graph that become ready
        queue until this run is over) and runs the calls queued for it.
        """
        waiting.add_done_callback(lambda _: self.host.wake_sync())
        while not waiting.done() and not self.closed:
            self.host.poll_sync_once()
            self.host.run_queued_jobs()

    def _invoke(self, node: _Node, values: dict[int, Any]) -> Any:
        try:
            args, kwargs = _arguments(node, values)
        except Exception as exc:
            return _Failed(error_record(exc, self.label))
        try:
            return node.fn(*args, **kwargs)
        except BaseException as exc:
            return _Failed(error_record(exc, self.label, skip_frames=1))

    async def _node_loop(self, node: _Node) -> None:
        """A node's executions run from the loop (async nodes, and sync ones of an actor with async nodes too),
        one at a time, in order."""
        run_one = self._run_async if node.is_async else self._run_sync_from_loop
        while True:
            seq, inputs = await node.queue.get()
            try:
                await run_one(node, seq, inputs)
            except BaseException as exc:  # a bug of ours must fail the execution, not end this node's loop
                if self.closed:  # (the only cancel of this task is the graph's teardown)
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                    return
                log.exception("%s: compiled graph node %s failed", self.label, node.what)
                node.sending = self._emit(node, seq, _Failed(error_record(exc, self.label)), on_loop=True)
            self._repost()

    async def _run_sync_from_loop(self, node: _Node, seq: int, inputs: dict[int, Any]) -> None:
        """One execution of a sync node, as a job for the sync thread.

        The last execution's sends are waited for here, by a helper, before the next is handed to the sync
        thread: a send completes only once its receiver has posted the receive, and the receiver may be
        waiting for this actor's sync thread meanwhile (a method of ours it calls; a collective of a worker
        group), which would not come while that thread waited for the send.
        """
        if node.sending and not all(w.is_completed() for w in node.sending):
            await self.loop.run_in_executor(self._helpers(), self._sent, node)
        node.sending = []
        ran: concurrent.futures.Future[None] = concurrent.futures.Future()

        def job() -> None:
            try:
                self._run_sync(node, seq, inputs)
            finally:
                if ran.set_running_or_notify_cancel():  # (cancelled by a teardown meanwhile: nobody waits)
                    ran.set_result(None)

        self.host.post_sync(job)
        await asyncio.wrap_future(ran)

    async def _run_async(self, node: _Node, seq: int, inputs: dict[int, Any]) -> None:
        """One execution of an async node, on the loop (its transfers waited for by helpers)."""
        values = {}
        for src, v in inputs.items():
            values[src] = await self.loop.run_in_executor(self._helpers(), v.resolve) if isinstance(v, _Incoming) else v
        inputs.clear()  # nothing of ours keeps the inputs alive meanwhile (their buffers are reused)
        if node.sending and not all(w.is_completed() for w in node.sending):
            await self.loop.run_in_executor(self._helpers(), self._sent, node)
        node.sending = []
        out = _first_failure(values)
        if out is None:
            try:
                args, kwargs = _arguments(node, values)
            except Exception as exc:
                out = _Failed(error_record(exc, self.label))
            else:
                try:
                    out = await node.fn(*args, **kwargs)
                except BaseException as exc:  # a CancelledError too: the user's (an inner task's), unless torn down
                    if self.closed:
                        raise
                    out = _Failed(error_record(exc, self.label, skip_frames=1))
        node.sending = self._emit(node, seq, out, on_loop=True)

    def _helpers(self) -> concurrent.futures.ThreadPoolExecutor:
        if self.closed:
            raise RuntimeError("the compiled graph is torn down")
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="actorlib-dag")
            if self.closed:  # torn down meanwhile (close() runs on the loop): it may have looked before this existed
                self._executor.shutdown(wait=False, cancel_futures=True)
                raise RuntimeError("the compiled graph is torn down")
        return self._executor

    # -- handing an output on -----------------------------------------------------------

    def _emit(self, node: _Node, seq: int, out: Any, *, on_loop: bool) -> list[Any]:
        """Hand ``out`` to its readers here, on other actors and at the driver; returns the transfers started."""
        plans: list[tuple[str, list[Any], dict[str, tuple[Channel, Outgoing]]]] = []
        skeleton = b""
        if node.remote and not isinstance(out, _Failed):
            try:
                skeleton, tensors = split(out)
                small = small_value(tensors)
                inlined: list[Any] | None = None  # the metas when every tensor goes inside the message (any peer)
                for peer in node.remote:
                    has_nccl = (peer, "send", "nccl") in self.channels
                    backends = [choose_backend(t, node.transport, has_nccl, small) for t in tensors]
                    if all(b == "inline" for b in backends):  # the usual small value: no channel, made once
                        if inlined is None:
                            inlined = [meta_of(t, "inline") for t in tensors]
                        if tensors:
                            self._count_inline(peer, "send", tensors)
                        plans.append((peer, inlined, {}))
                        continue
                    metas: list[Any] = [None] * len(tensors)
                    by_backend = {}
                    if "inline" in backends:
                        sent = [t for t, b in zip(tensors, backends, strict=True) if b == "inline"]
                        for i, backend in enumerate(backends):
                            if backend == "inline":
                                metas[i] = meta_of(tensors[i], "inline")
                        self._count_inline(peer, "send", sent)
                    for backend in dict.fromkeys(b for b in backends if b != "inline"):
                        channel = self.channels.get((peer, "send", backend))
                        if channel is None:
                            raise RuntimeError(f"no {backend} channel to the next stage (transport {node.transport!r})")
                        indices = [i for i, b in enumerate(backends) if b == backend]
                        ts = [tensors[i] for i in indices]
                        offsets = channel.offsets(ts)
                        for n, i in enumerate(indices):
                            metas[i] = meta_of(tensors[i], backend, -1 if offsets is None else offsets[n])
                        by_backend[backend] = (channel, channel.prepare_send(ts, offsets))
                    plans.append((peer, metas, by_backend))
            except Exception as exc:
                record = error_record(exc, self.label)
                record["message"] = f"could not send the output of {node.what} to the next stage: {record['message']}"
                out = _Failed(record)
        works: list[Any] = []
        if isinstance(out, _Failed):
            for peer in node.remote:
                self._deliver(peer, seq, node.id, None, None, out.record, alone=True)
        else:
            for peer, metas, by_backend in plans:
                with self.send_locks[peer]:  # the message and its transfers, in one order at both ends
                    self._deliver(peer, seq, node.id, metas, skeleton, None, alone=not by_backend)
                    for channel, outgoing in by_backend.values():  # each, whatever another one did
                        try:
                            works.extend(channel.post_send(outgoing, seq))
                        except ConnectionError as exc:
                            log.warning("%s: %s", self.label, exc)  # the receiving end fails that execution
        if node.id in self.readers:
            if on_loop or self.threaded:
                self.arrive(node.id, seq, out)
            else:
                self.loop.call_soon_threadsafe(self.arrive, node.id, seq, out)
        for index in node.outputs:
            self._result(seq, index, out, on_loop=on_loop)
        return works

    def _deliver(self, peer: str, seq: int, src: int, metas: Any, skeleton: Any, record: Any, *, alone: bool) -> None:
        """Hand an output on to ``peer``. ``alone``: no transfer goes with it (its tensors, if any, are inside):
        it may go through the peer's slot (see actorlib.broadcast), overtaking those sent before it, which
        the peer sorts by execution; one with transfers goes over ZeroMQ, in the transfers' order."""
        body = event("deliver", self.gid, seq, [src, metas, skeleton, record, self.me])
        link = self.link_slots.get(peer) if alone else None
        if link is not None and link[0].try_post(link[1], body, functools.partial(self._poke, peer)):
            return
        try:
            self.links[peer].send(Kind.EVENT, 0, body)
        except TransportError as exc:
            log.warning("%s: could not hand an output on: %s", self.label, exc)  # torn down, or the peer is gone

    def _poke(self, peer: str) -> None:
        """Wake ``peer``, asleep as an output was written into its slot: any message on its inbox does."""
        try:
            self.links[peer].send(Kind.EVENT, 0, event("poke", self.gid, 0, None))
        except TransportError:
            pass  # torn down, or the peer is gone

    def _result(self, seq: int, index: int, out: Any, *, on_loop: bool) -> None:
        """One output for the driver, as a stream item of the results call (any thread)."""
        buffers: list[Any] = []
        if isinstance(out, _Failed):
            item: list[Any] = [seq, index, False, out.record]
        else:  # a list, not a tuple: msgpack packs a list itself, a tuple through the codec's hook
            small = inline(out)
            item = [seq, index, True, None, small]
            if small is None:
                try:  # the value encoded apart: a driver that cannot read it still reads which execution it was
                    encoded, buffers = dumps(out)
                    item = [seq, index, True, None, None, encoded]
                except EncodeError as exc:
                    record = {"type": "serialization", "message": f"could not serialize the graph's output {index}: {exc}"}
                    item = [seq, index, False, record]
        body, _ = dumps([item])
        with self._results_lock:
            if self._results is None:
                self._unsent.append((body, [bytes(b) for b in buffers]))
                return
        # small buffers are copied; big ones are waited for until sent (off the loop), or copied (on it)
        buffers = [bytes(b) if on_loop or memoryview(b).nbytes < COPY_BELOW else b for b in buffers]
        self._send_result(body, buffers, track=any(type(b) is not bytes for b in buffers))

    def _send_result(self, body: bytes, buffers: list[Any], *, track: bool) -> None:
        ep, target = self.host.endpoint, self._results
        if ep is None or target is None:
            return
        if self.slot is not None and not buffers and self.slot.answer(Kind.STREAM_ITEM, target[1], body):
            return  # through the driver's slot, which it polls (see actorlib.broadcast)
        try:
            tracker = ep.send(Kind.STREAM_ITEM, target[1], body, buffers, target[0], track=track)
        except TransportError:
            return  # the driver is gone
        if track:
            wait_sent(tracker, lambda: not ep.closed)


def _settle_soon(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _first_failure(values: dict[int, Any]) -> _Failed | None:
    return next((v for v in values.values() if isinstance(v, _Failed)), None)


def _arguments(node: _Node, values: dict[int, Any]) -> tuple[list[Any], dict[str, Any]]:
    return [_arg(spec, values) for spec in node.args], {k: _arg(spec, values) for k, spec in node.kwargs.items()}


def _arg(spec: list[Any], values: dict[int, Any]) -> Any:
    kind, value = spec
    if kind == "c":
        return value
    if kind == "n":
        return values[value]
    args, kwargs = values[INPUT]
    if value is None:
        return args[0]
    return args[value] if isinstance(value, int) else kwargs[value]


def _join(skeleton: bytes, tensors: list[Any]) -> Any:
    try:
        return join(skeleton, tensors)
    except Exception as exc:
        return _Failed({"type": "serialization", "message": f"could not deserialize a value from the previous stage: {exc}"})
