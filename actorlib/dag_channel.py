"""Tensor channels of compiled graphs: values split into tensors and the rest, moved by torch.distributed.

A value leaving a stage is pickled with every ``torch.Tensor`` in it — bare,
or anywhere inside lists, tuples, dicts, dataclasses or other objects —
replaced by a persistent id (:func:`split`). The pickle and each tensor's
shape, dtype and device travel over ZeroMQ; the tensors' bytes travel over a
:class:`Channel`: a two-rank torch.distributed process group dedicated to one
direction of one pair of actors, built from a ``PrefixStore`` over the
graph's ``TCPStore`` (so no default group and no collective ``new_group``).

Transfers are posted without blocking, in the same order at both ends (the
sender posts them together with the message announcing them, or for some big
gloo ones once the receiver says its receives are posted; the receiver when
that message arrives, or ahead of it), so sends and receives match by order
alone; the thread that needs the data waits for it (an actor's sync-method
thread, or a helper thread for async methods), never the event loop. Each tensor travels as its raw bytes (a ``uint8``
view), so every dtype goes over gloo. Receive buffers of 1 MiB or more come
from a :class:`BufferPool` that reuses a buffer once nothing references it
any more (as CUDA's caching allocator does for GPU memory).

With the ``auto`` transport, a value whose CPU tensors total at most
``INLINE_MAX`` carries them inside the ZeroMQ message itself (backend
``inline``): for a few KiB that costs less than gloo's rendezvous.

torch is imported only when a graph is set up, never by ``import actorlib``.
"""

from __future__ import annotations

import collections
import datetime
import io
import logging
import math
import pickle
import queue
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from transport import Pickler

__all__ = [
    "BufferPool",
    "Channel",
    "Outgoing",
    "TensorMeta",
    "choose_backend",
    "from_bytes",
    "inline",
    "join",
    "make_group",
    "meta_of",
    "small_value",
    "split",
    "uninline",
    "wait_all",
]

log = logging.getLogger(__name__)

# [shape, dtype name, device type, backend, offset in a packed slot or -1 | the bytes themselves for "inline"]:
# plain data, inside the ZeroMQ message that announces a value
TensorMeta = list
POOL_MIN_BYTES = 1 << 20
POOL_MAX_BYTES = 1 << 30  # a pool forgets its least recently used sizes past this
SLOT_BYTES = 64 << 10  # values whose tensors fit travel packed, into a receive posted ahead
SLOT_TAG = 1 << 20  # packed transfers' tag; tensors sent one by one are tagged by their position
READY_TAG = SLOT_TAG + 1  # a gloo receiver's word that a value's receives are posted (see Channel)
HANDSHAKE_MIN_BYTES = 1 << 20  # a value at least this big over gloo waits for that word
HANDSHAKE_TAG = 1 << 21  # added to the position of such a value's tensors: they never match one sent at once
GLOO_STRIPES = 2  # connections of a gloo channel: a big value's large tensors are split across them
STRIPE_MIN_BYTES = 8 << 20  # the size from which they are (see Channel)
_ALIGN = 64


class _Splitter(Pickler):
    def __init__(self, file: io.BytesIO, tensors: list[Any], tensor_type: type) -> None:
        super().__init__(file)
        self.tensors = tensors
        self.tensor_type = tensor_type
        self.seen: dict[int, int] = {}

    def persistent_id(self, obj: Any) -> int | None:  # noqa: D102 - pickle's hook
        if isinstance(obj, self.tensor_type):
            pid = self.seen.get(id(obj))
            if pid is None:  # pickle does not memoize persistent ids: a tensor met twice is sent once, and arrives as one
                pid = self.seen[id(obj)] = len(self.tensors)
                self.tensors.append(obj)
            return pid
        return None


class _Joiner(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, tensors: list[Any]) -> None:
        super().__init__(file)
        self.tensors = tensors

    def persistent_load(self, pid: Any) -> Any:  # noqa: D102 - pickle's hook
        if type(pid) is not int or not 0 <= pid < len(self.tensors):
            raise pickle.UnpicklingError(f"unknown tensor id {pid!r}")
        return self.tensors[pid]


def split(value: Any) -> tuple[bytes, list[Any]]:
    """``(pickle of value with tensors replaced by ids, the tensors in id order)``; one tensor seen twice is sent once.

    A bare tensor (the common case) is ``(b"", [tensor])``: nothing to pickle.
    """
    import torch

    if type(value) is torch.Tensor:
        return b"", [value]
    tensors: list[Any] = []
    buf = io.BytesIO()
    _Splitter(buf, tensors, torch.Tensor).dump(value)
    return buf.getvalue(), tensors


def join(skeleton: bytes, tensors: list[Any]) -> Any:
    """The inverse of :func:`split`."""
    if not skeleton:
        return tensors[0]
    return _Joiner(io.BytesIO(skeleton), tensors).load()


INLINE_MAX = 64 << 10  # bare tensors this small travel to and from the driver inside the message itself


def inline(value: Any) -> list[Any] | None:
    """A small bare tensor as plain data ``[dtype, shape, device, bytes]`` (None for anything else).

    Arguments and outputs that are bare tensors (the common case) skip the
    general codec between the driver and the graph: a few bytes inside the
    message cost less than a frame of their own. Anything else, including
    bigger tensors (zero-copy frames), goes through the codec as usual.
    (This and the helpers below run on every hop of an execution: each
    attribute they read is the cheapest one torch has for it.)
    """
    torch = sys.modules.get("torch")
    if torch is None or type(value) is not torch.Tensor or value.layout is not torch.strided or value.nbytes > INLINE_MAX:
        return None
    device = device_type(value)
    if device not in ("cpu", "cuda"):
        return None
    return [dtype_name(value.dtype), list(value.shape), device, raw_bytes(value)]


def device_type(tensor: Any) -> str:
    """``tensor.device.type``, without making a device object for the usual two."""
    return "cpu" if tensor.is_cpu else "cuda" if tensor.is_cuda else str(tensor.device.type)


def dtype_name(dtype: Any) -> str:
    """``"float32"`` for ``torch.float32``: the name :func:`from_bytes` takes."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype).removeprefix("torch.")
    return name


_DTYPE_NAMES: dict[Any, str] = {}
_DTYPES: dict[str, Any] = {}


def raw_bytes(tensor: Any) -> bytes:
    """A tensor's elements as bytes (through host memory), whatever its dtype."""
    import torch

    if type(tensor) is torch.Tensor and tensor.is_cpu and not tensor.requires_grad:
        try:
            return tensor.numpy().tobytes()  # one torch call, not five: this runs on every small hop
        except (TypeError, RuntimeError):
            pass  # a dtype numpy lacks (bfloat16 ...), a conjugate or negative bit
    flat = tensor.detach().cpu().resolve_conj().resolve_neg().contiguous().reshape(-1)
    return bytes(flat.view(torch.uint8).numpy().tobytes())


def from_bytes(dtype_name: str, shape: list[int], data: bytes) -> Any:
    """A CPU tensor of its own (writable) memory from :func:`raw_bytes`."""
    import torch

    dtype = _dtype(torch, dtype_name)
    if not data:
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(bytearray(data), dtype=dtype)
    return flat if len(shape) == 1 and shape[0] == flat.numel() else flat.reshape(shape)  # one torch call if it can


def uninline(spec: list[Any], cuda_device: Any = None) -> Any:
    """The inverse of :func:`inline`. A CUDA tensor comes back on ``cuda_device`` (or this process's current GPU),
    or on CPU where there is none."""
    import torch

    dtype_name, shape, device, data = spec
    t = from_bytes(dtype_name, shape, data)
    if device == "cuda" and torch.cuda.is_available():
        t = t.to(cuda_device if cuda_device is not None else "cuda")
    return t


def choose_backend(tensor: Any, transport: str, has_nccl: bool, small: bool = False) -> str:
    """Which channel carries ``tensor``: as forced, or for ``auto`` by device and size.

    ``auto``: NCCL for CUDA tensors when both ends have it; ``inline`` (inside
    the ZeroMQ message to the next actor) for CPU tensors of a ``small``
    value, whose bytes cost less there than a rendezvous of their own on
    gloo; gloo for the rest.
    """
    cuda = tensor.is_cuda
    if transport == "auto" and small and tensor.is_cpu:
        return "inline"
    if transport == "nccl":
        if not cuda:
            raise TypeError(
                f"with_tensor_transport('nccl') needs CUDA tensors, got a {tensor.device.type} tensor; "
                "use 'gloo' or 'auto' for CPU tensors"
            )
        return "nccl"
    if transport == "auto" and cuda and has_nccl:
        return "nccl"
    if tensor.device.type not in ("cpu", "cuda"):
        raise TypeError(f"cannot send a tensor on device {tensor.device} between actors")
    return "gloo"  # CUDA tensors over gloo go through host memory


def meta_of(tensor: Any, backend: str, offset: int = -1) -> TensorMeta:
    last: int | bytes = raw_bytes(tensor) if backend == "inline" else offset
    return [list(tensor.shape), dtype_name(tensor.dtype), device_type(tensor), backend, last]


def small_value(tensors: list[Any]) -> bool:
    """The CPU tensors of one value fit inside a message (``auto`` sends them there, see :func:`choose_backend`)."""
    return sum(t.nbytes for t in tensors if t.is_cpu) <= INLINE_MAX


class BufferPool:
    """Receive buffers for CPU tensors, reused once no tensor refers to them (1 MiB and up).

    It keeps up to ``per_size`` buffers of each size, and forgets the sizes used
    longest ago once it holds more than ``max_bytes`` (values whose shapes change
    at every execution would otherwise each leave their buffers behind). A
    forgotten buffer that a tensor still uses lives on with that tensor.
    """

    def __init__(self, per_size: int, max_bytes: int = POOL_MAX_BYTES) -> None:
        import torch

        self._torch = torch
        self._per_size = per_size
        self._max_bytes = max_bytes
        self._free: collections.OrderedDict[int, list[Any]] = collections.OrderedDict()  # by size, last used last
        self._held = 0  # bytes of every buffer in _free
        self._lock = threading.Lock()
        self._use_count = getattr(torch._C, "_storage_Use_Count", None)

    def empty(self, shape: list[int], dtype: Any) -> Any:
        torch = self._torch
        nbytes = dtype.itemsize
        for n in shape:
            nbytes *= n
        if nbytes < POOL_MIN_BYTES or self._use_count is None:
            return torch.empty(shape, dtype=dtype)
        with self._lock:
            storages = self._free.get(nbytes)
            if storages is None:
                storages = self._free[nbytes] = []
            else:
                self._free.move_to_end(nbytes)
            storage = next((s for s in storages if self._use_count(s._cdata) == 1), None)
            if storage is None:
                storage = torch.UntypedStorage(nbytes)
                if len(storages) < self._per_size:
                    storages.append(storage)
                    self._held += nbytes
                    while self._held > self._max_bytes and next(iter(self._free)) != nbytes:
                        size, dropped = self._free.popitem(last=False)
                        self._held -= size * len(dropped)
            return torch.empty(0, dtype=dtype).set_(storage, 0, shape)

    def held(self) -> int:
        """Bytes of the buffers the pool keeps (in use or not)."""
        return self._held

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self._held = 0


def make_group(backend: str, store: Any, rank: int, address: str, timeout_s: float) -> Any:
    """A two-rank process group on ``store`` (a PrefixStore of its own); blocks until the peer joins.

    A gloo group has one device, so one TCP connection to its peer: a channel's handshake relies on
    that (see :class:`Channel`)."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]  # what init_process_group uses too
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=address)]
        opts._timeout = timeout
        return dist.ProcessGroupGloo(store, rank, 2, opts)
    if backend == "nccl":
        nccl_cls = getattr(dist, "ProcessGroupNCCL", None)
        if nccl_cls is None:
            raise RuntimeError("this torch has no NCCL support")
        opts = nccl_cls.Options()
        opts._timeout = timeout
        return nccl_cls(store, rank, 2, opts)
    raise ValueError(f"unknown backend {backend!r}")


class Channel:
    """One direction between two actors on one backend.

    Transfers are posted without blocking, by whichever thread has the data
    (torch's send/recv return at once); the sender posts them (or queues
    them, see below) together with the message that announces them, under
    its lock for that peer, so both ends post in the same order. Whoever
    needs the data waits with :func:`wait_all`.

    Small transfers skip gloo's rendezvous: the receiving end of a gloo
    channel keeps ``slots`` receives of ``SLOT_BYTES`` posted ahead, and a
    value whose tensors fit in one slot travels packed in one send that meets
    a receive already waiting for it (so the bytes are there before the
    message announcing them is read). Bigger ones are sent tensor by tensor,
    into buffers the receiver posts when the message arrives.

    Over gloo, a value of ``HANDSHAKE_MIN_BYTES`` or more ("big") is sent
    into receives posted for it beforehand. Posted before its receive, a gloo send
    of 64 MiB ran at about half the speed on a 2-vCPU VM (1.2-1.4 against
    2.1-2.6 GiB/s, raw gloo, receive posted just after the send against well
    before it; in a graph, 8 MiB took 7.3-8.3 ms without waiting, 3.6-4.9
    with): measured, not explained. gloo's TCP pair starts writing a send at
    once only if the receive's notice is already there; otherwise its network
    thread starts once the notice arrives. Under 1 MiB waiting costs more
    than it saves (256 KiB: ~0.9 ms without, ~1.1 with; 1 MiB: even).

    Both ends follow the same rule, value by value (:meth:`_fits`,
    :func:`capacity`): after each big value the receiver posts receives
    *ahead* for the next one, as large as this one's tensors rounded up
    (:func:`capacity`), when it reads this one's message. The next big value
    whose tensors fit them goes straight into them: the sender posts its
    sends at once, with no wait (if the receiver has not read the previous
    value's message yet, gloo takes its slow path for this one). One that
    does not fit gets zero-byte sends into them first, then waits for the
    receiver's word (a one-byte send on ``READY_TAG``) that it posted
    receives for it. The word travels on the same TCP connection as the
    receives' notices, after them (one gloo context per group:
    :func:`make_group`), so when it arrives the sender's gloo knows they are
    posted. Big values' tensors are tagged apart (``HANDSHAKE_TAG`` + their
    position), so smaller values sent at once meanwhile never take their
    receives. A thread of the channel's own (:class:`_Poster`) waits for the
    words and posts the sends queued behind them, in order; sends are posted
    at once only while nothing is queued. It ends when the channel is closed.

    A gloo channel has ``GLOO_STRIPES`` groups (TCP connections) to its peer,
    ``stripes`` beside ``group``. A big value's tensors of ``STRIPE_MIN_BYTES``
    or more are split across all of them (:meth:`_stripes`), at the same points
    at both ends. One gloo connection moves 64 MiB here at 2.3-2.7 GiB/s with
    a thread at each end busy copying, and leaves a CPU partly idle: in a
    graph, two connections took 9-20 % less time than one for 64 MiB, ~10 %
    for 16 MiB, -15 to +3 % for 8 MiB, but 11-14 % more for 4 MiB (per-round
    medians, interleaved, 2-vCPU VM). Everything else goes on ``group``
    alone. The receiver's word goes on every connection, each after that
    connection's receives.
    """

    def __init__(
        self,
        group: Any,
        backend: str,
        peer_rank: int,
        name: str,
        pool: BufferPool,
        *,
        role: str,
        slots: int,
        max_inflight: int = 1,
        cuda_device: Any = None,
        stripes: Sequence[Any] = (),
    ) -> None:
        import torch

        self._torch = torch
        self.group = group
        self._groups = [group, *stripes]  # a big value's large tensors go on all of them (see the class)
        self.backend = backend
        self.peer = peer_rank
        self.name = name
        self._pool = pool
        self._device = cuda_device if backend == "nccl" else None  # NCCL receives land on the actor's GPU
        self._cuda_device = cuda_device  # where CUDA tensors that came through host memory go
        self._slots: collections.deque[tuple[Any, Any]] = collections.deque()  # posted ahead, in order
        self._packs = backend == "gloo" and slots > 0
        # Packed sends not waited for yet, by execution. gloo says a send is complete only once waited for;
        # a send of an execution max_inflight before the one being sent now is done (see post_send).
        self._outgoing: collections.deque[tuple[int, Any]] = collections.deque()
        self._max_inflight = max_inflight
        self._slot_lock = threading.Lock()
        self._ahead = slots if role == "recv" and self._packs else 0
        self.transfers = 0  # values sent or received on this channel (for stats())
        self.nbytes = 0  # their tensors' bytes
        self._handshakes = backend == "gloo"  # big values go into receives posted already (see above)
        # Both ends: [(position, bytes)] of the receives posted ahead for the next big value, or None.
        self._ahead_sizes: list[tuple[int, int]] | None = None
        self._ahead_recvs: list[tuple[Any, list[Any]]] = []  # receiver: (buffer, its transfers) of each of them
        self._poster: _Poster | None = None
        self._closed = False
        self._broken: str | None = None  # why this end can no longer match the other's transfers
        self._orphans: list[Any] = []  # receives posted for a value that then failed: gloo still writes into them
        self._post_lock = threading.Lock()  # sends posted at once or queued, the poster, a teardown
        self._ready_word = torch.ones(1, dtype=torch.uint8)  # what a receiver sends on READY_TAG
        self._nothing = torch.empty(0, dtype=torch.uint8)  # what a sender sends into receives its value does not fit
        for _ in range(self._ahead):
            self._post_slot()

    # -- sending ------------------------------------------------------------------

    def offsets(self, tensors: list[Any]) -> list[int] | None:
        """Where each tensor goes in one packed slot, or None if they are sent one by one."""
        if not self._packs:
            return None
        offsets, end = [], 0
        for t in tensors:
            offsets.append(end)
            end += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
        return offsets if end <= SLOT_BYTES else None

    def prepare_send(self, tensors: list[Any], offsets: list[int] | None) -> Outgoing:
        """What :meth:`post_send` sends for ``tensors``: one packed copy (``offsets``), or each tensor's bytes.

        Whatever can fail short of the channel itself (out of memory, a CUDA copy, no thread for the
        poster, a broken or closed channel) fails here, before the value is announced to the receiver,
        which would otherwise post receives that nothing matches.
        """
        self._refuse_if_broken()
        torch = self._torch
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        if self._handshakes and offsets is None and nbytes >= HANDSHAKE_MIN_BYTES:
            with self._post_lock:
                if self._closed:
                    raise ConnectionError(f"tensor channel {self.name} is closed (the graph was torn down)")
                if self._poster is None:
                    try:
                        self._poster = _Poster(self)
                    except RuntimeError as exc:  # no thread to be had
                        raise ConnectionError(f"tensor channel {self.name}: {exc}") from exc
        if offsets is not None:
            size = max((o + t.numel() * t.element_size() for o, t in zip(offsets, tensors, strict=True)), default=0)
            packed = torch.empty(max(size, 1), dtype=torch.uint8)
            for o, t in zip(offsets, tensors, strict=True):
                n = t.numel() * t.element_size()
                if n:
                    packed[o : o + n].copy_(self._bytes(t))
            return Outgoing(nbytes, packed, [])
        return Outgoing(nbytes, None, [(i, self._bytes(t)) for i, t in enumerate(tensors) if t.numel()])

    def post_send(self, out: Outgoing, seq: int) -> list[Any]:
        """Send what :meth:`prepare_send` made for execution ``seq`` (in order): post it, or queue it for the
        poster (big values over gloo); returns the transfers to wait for before the tensors' memory may
        change. Raises only ``ConnectionError`` (a closed channel too); the value was announced already, so
        this end is broken from then on (the next :meth:`prepare_send` refuses).

        Packed: nothing of the caller's needs waiting for. The channel keeps the send until it is done:
        execution ``seq`` started only once every execution up to ``seq - max_inflight`` had completed,
        and those had received everything sent for them.
        """
        try:
            return self._post_send(out, seq)
        except ConnectionError as exc:
            if self._broken is None:
                self._broken = str(exc)
            raise

    def _post_send(self, out: Outgoing, seq: int) -> list[Any]:
        self.transfers += 1
        self.nbytes += out.nbytes
        if out.packed is not None:
            while self._outgoing and self._outgoing[0][0] <= seq - self._max_inflight:
                try:
                    self._outgoing.popleft()[1].wait()  # returns at once: it is done
                except Exception:
                    pass  # it failed, and so did its execution
            self._outgoing.append((seq, self._start(self.group.send, out.packed, SLOT_TAG)))  # kept: a dropped send is never made
            return []
        if self._handshakes and out.nbytes >= HANDSHAKE_MIN_BYTES and out.flats:
            return self._post_big(out.flats)
        return [self._start(self.group.send, flat, i) for i, flat in out.flats]

    def _post_big(self, flats: list[tuple[int, Any]]) -> list[Any]:
        """A big value's sends: into the receives posted ahead if it fits them, else after the receiver's words
        (see the class). Nothing is queued for a poster told to end, nor for one made after."""
        sizes = [(i, flat.numel()) for i, flat in flats]
        with self._post_lock:
            if self._closed:
                raise ConnectionError(f"tensor channel {self.name} is closed (the graph was torn down)")
            ahead = self._ahead_sizes
            fits = _fits(sizes, ahead)
            assert fits or self._poster is not None, "prepare_send makes the poster of a big value"
            self._ahead_sizes = [(i, capacity(n)) for i, n in sizes]
            if fits:
                assert ahead is not None
                caps = dict(ahead)  # each tensor is split as the receive it goes into was
                return self._send_or_queue([], self._big_sends(flats, caps))
            works = self._send_or_queue([], self._big_sends([(i, self._nothing) for i, _ in ahead], dict(ahead))) if ahead else []
            words = self._start_all([(g.recv, self._torch.empty(1, dtype=self._torch.uint8), READY_TAG) for g in self._groups])
            return works + self._send_or_queue(words, self._big_sends(flats, dict(sizes)))

    def _big_sends(self, flats: list[tuple[int, Any]], bases: dict[int, int]) -> list[tuple[Any, Any, int]]:
        """``(group, bytes, tag)`` of each send of a big value's tensors, split as receives of ``bases[position]``
        bytes are (see :meth:`_stripes`)."""
        return [(g, part, HANDSHAKE_TAG + i) for i, flat in flats for g, part in self._stripes(flat, bases[i])]

    def _stripes(self, flat: Any, basis: int) -> list[tuple[Any, Any]]:
        """``(group, part of flat)`` for each connection that ``flat``'s bytes go on.

        ``basis`` is the size of the receive they go into (a receive posted
        ahead's, or the tensor's own), which both ends know: from it, both
        split at the same points, so each part lands where it belongs in the
        receiver's buffer. The sender's parts may be shorter, or empty (sent
        all the same: the receiver posted one receive per connection).
        """
        groups = self._groups
        if len(groups) == 1 or basis < STRIPE_MIN_BYTES:
            return [(groups[0], flat)]
        per = -(-basis // len(groups))
        step = -(-per // _ALIGN) * _ALIGN
        n = flat.numel()
        return [(g, flat[min(n, j * step) : min(n, (j + 1) * step)]) for j, g in enumerate(groups)]

    def _send_or_queue(self, words: list[Any], sends: list[tuple[Any, Any, int]]) -> list[Any]:
        """Post these sends now if nothing is queued before them and no word is awaited; else queue them
        behind (under ``_post_lock``; words are awaited only once the poster exists)."""
        poster = self._poster
        if poster is None or (not words and not poster.pending):
            return self._start_all([(g.send, part, tag) for g, part, tag in sends])
        return [poster.post(words, sends)]

    def close(self) -> None:
        """A torn-down graph: sends are refused from now on, and the poster thread ends once each value queued
        for it has had its word or failed (a word that never comes fails at the group's timeout)."""
        with self._post_lock:
            self._closed = True
            if self._poster is not None:
                self._poster.close()
                self._poster = None  # (it refers to the channel: no cycle left for the collector)

    def _bytes(self, t: Any) -> Any:
        if self.backend == "gloo" and t.device.type != "cpu":
            t = t.cpu()  # CUDA tensors over gloo go through host memory
        return t.detach().contiguous().reshape(-1).view(self._torch.uint8)

    # -- receiving ------------------------------------------------------------------

    def repost(self) -> None:
        """Post receives in place of the slots packed transfers took (any thread; after the latency-critical work)."""
        with self._slot_lock:
            while len(self._slots) < self._ahead:
                self._post_slot()

    def _post_slot(self) -> None:
        buf = self._torch.empty(SLOT_BYTES, dtype=self._torch.uint8)
        self._slots.append((buf, self._start(self.group.recv, buf, SLOT_TAG)))

    def post_recv(self, metas: list[TensorMeta]) -> tuple[Any, list[Any]]:
        """Start receiving one tensor per ``[shape, dtype, device, backend, offset]``: ``(received, transfers)``.

        Once :func:`wait_all` has returned for the transfers, :meth:`finish_recv`
        makes the tensors. A packed transfer (offset >= 0) takes the next slot,
        whose receive was posted long before; :meth:`repost` replaces it. Only
        what must happen now happens here (on the loop): the rest is done by
        whoever waits for the data.
        """
        self._refuse_if_broken()
        posted: list[Any] = []  # transfers started for this value, kept alive if it fails
        try:
            return self._post_recv(metas, posted)
        except ConnectionError as exc:
            raise self._break(str(exc), posted) from exc
        except Exception as exc:  # out of memory, a dtype this torch does not have ...
            raise self._break(f"could not post a value's receives: {exc!r}", posted) from exc

    def _post_recv(self, metas: list[TensorMeta], posted: list[Any]) -> tuple[Any, list[Any]]:
        """The sender has sent this value already: an end that fails here can no longer match its transfers
        (:meth:`post_recv` breaks the channel). So every buffer is allocated before anything is posted."""
        torch = self._torch
        dtypes = [_dtype(torch, meta[1]) for meta in metas]
        nbytes = sum(dtype.itemsize * math.prod(meta[0]) for meta, dtype in zip(metas, dtypes, strict=True))
        self.transfers += 1
        self.nbytes += nbytes
        if metas and metas[0][4] >= 0:
            with self._slot_lock:
                if not self._slots:  # all taken (many executions in flight): the next in order, posted now
                    self._post_slot()
                buf, work = self._slots.popleft()
            return _Packed(buf), [work]
        if self._handshakes and nbytes >= HANDSHAKE_MIN_BYTES:
            return self._post_recv_big(metas, dtypes, posted)
        tensors = [
            torch.empty(meta[0], dtype=dtype, device=self._device) if self._device is not None else self._pool.empty(meta[0], dtype)
            for meta, dtype in zip(metas, dtypes, strict=True)
        ]
        for i, t in enumerate(tensors):
            if t.numel():
                posted.append(self._start(self.group.recv, t.reshape(-1).view(torch.uint8), i))
        return tensors, posted

    def _post_recv_big(self, metas: list[TensorMeta], dtypes: list[Any], posted: list[Any]) -> tuple[Any, list[Any]]:
        """A big value: into the receives posted ahead if it fits them; else into new ones, after which the
        words go (one per connection; the ones ahead get nothing: their transfers are waited for with this value's). Then the
        receives ahead for the next one. See the class."""
        torch = self._torch
        shapes = [meta[0] for meta in metas]
        sizes = [(i, n) for i, dtype in enumerate(dtypes) if (n := dtype.itemsize * math.prod(shapes[i]))]
        ahead, recvs = self._ahead_sizes, self._ahead_recvs
        fits = _fits(sizes, ahead)
        next_sizes = [(i, capacity(n)) for i, n in sizes]
        if fits:
            bufs = {i: buf for (i, _), (buf, _) in zip(ahead or [], recvs, strict=True)}
            tensors = [
                bufs[i][: dtype.itemsize * math.prod(shape)].view(dtype).reshape(shape) if i in bufs else torch.empty(shape, dtype=dtype)
                for i, (shape, dtype) in enumerate(zip(shapes, dtypes, strict=True))
            ]
        else:
            tensors = [self._pool.empty(shape, dtype) for shape, dtype in zip(shapes, dtypes, strict=True)]
        next_bufs = [self._pool.empty([n], torch.uint8) for _, n in next_sizes]
        self._ahead_sizes, self._ahead_recvs = None, []
        for _, ahead_works in recvs:  # the ones ahead: this value, or zero bytes before it
            posted.extend(ahead_works)
        if not fits:
            for i, t in enumerate(tensors):
                if t.numel():
                    self._big_recvs(t.reshape(-1).view(torch.uint8), i, t.numel() * t.element_size(), posted)
            for g in self._groups:  # the word, on each connection after its receives
                posted.append(self._start(g.send, self._ready_word, READY_TAG))
        works = list(posted)
        ahead_recvs: list[tuple[Any, list[Any]]] = []
        for (i, n), buf in zip(next_sizes, next_bufs, strict=True):
            ahead_recvs.append((buf, self._big_recvs(buf, i, n, posted)))
        self._ahead_sizes, self._ahead_recvs = next_sizes, ahead_recvs
        return tensors, works

    def _big_recvs(self, flat: Any, position: int, basis: int, posted: list[Any]) -> list[Any]:
        """Post the receives of one big tensor's parts (see :meth:`_stripes`), added to ``posted`` too."""
        works = self._start_all([(g.recv, part, HANDSHAKE_TAG + position) for g, part in self._stripes(flat, basis)])
        posted.extend(works)
        return works

    def _start_all(self, ops: list[tuple[Callable[..., Any], Any, int]]) -> list[Any]:
        """Start each ``(op, bytes, tag)`` in order. If one fails, those started before it are kept until the
        channel goes (gloo still moves their bytes), and its failure is raised."""
        works: list[Any] = []
        try:
            for op, flat, tag in ops:
                works.append(self._start(op, flat, tag))
        except ConnectionError:
            self._orphans.extend(works)
            raise
        return works

    def _refuse_if_broken(self) -> None:
        if self._broken is not None:
            raise ConnectionError(f"tensor channel {self.name} is broken: {self._broken}")

    def _break(self, why: str, posted: list[Any]) -> ConnectionError:
        """This end can no longer match the other's transfers: keep what was posted (gloo still writes into
        it), and fail every value from now on."""
        self._broken = why
        self._orphans.extend(posted)
        for _, works in self._ahead_recvs:
            self._orphans.extend(works)
        self._ahead_sizes, self._ahead_recvs = None, []
        return ConnectionError(f"tensor channel {self.name} is broken: {why}")

    def orphan(self, works: list[Any]) -> None:
        """Keep transfers of a value that failed elsewhere alive until the channel goes (gloo writes into
        their buffers whether or not anyone waits)."""
        self._orphans.extend(works)

    def finish_recv(self, metas: list[TensorMeta], received: Any) -> list[Any]:
        """The tensors, once their transfers are done (CUDA ones that came through host memory back on this GPU)."""
        torch = self._torch
        if isinstance(received, _Packed):
            tensors = []
            for shape, dtype_name, _, _, offset in metas:
                dtype = _dtype(torch, dtype_name)
                n = dtype.itemsize * math.prod(shape)
                tensors.append(received.buf[offset : offset + n].view(dtype).reshape(shape))
        else:
            tensors = received
        if self.backend != "gloo":
            return tensors
        cuda = self._cuda_device if self._cuda_device is not None else "cuda"
        return [t.to(cuda) if meta[2] == "cuda" else t for meta, t in zip(metas, tensors, strict=True)]

    def _start(self, op: Callable[..., Any], flat: Any, tag: int) -> Any:
        try:
            return op([flat], self.peer, tag)
        except Exception as exc:
            raise ConnectionError(f"tensor channel {self.name} ({self.backend}) failed: {exc}") from exc


def capacity(nbytes: int) -> int:
    """The size of a receive posted ahead for a tensor of ``nbytes`` (both ends compute it): rounded up to an
    eighth of its power of two, so that sizes which vary a little (a batch's number of tokens) still fit."""
    step = max(1, 1 << max(0, nbytes.bit_length() - 4))
    return -(-nbytes // step) * step


def _fits(sizes: list[tuple[int, int]], ahead: list[tuple[int, int]] | None) -> bool:
    """A big value's ``[(position, bytes)]`` of non-empty tensors fits the receives posted ahead: the same
    positions, each more than half and at most all of its receive (a small tensor kept by the user would
    otherwise keep a much larger buffer alive with it)."""
    return ahead is not None and len(sizes) == len(ahead) and all(
        i == j and cap // 2 < n <= cap for (i, n), (j, cap) in zip(sizes, ahead, strict=True)
    )


class _Poster:
    """A gloo channel's thread that posts sends queued behind a receiver's words (one per connection), in order."""

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self._queue: queue.SimpleQueue[_Handshake | None] = queue.SimpleQueue()
        self.pending = 0  # queued and not posted yet (under the channel's _post_lock)
        self._thread = threading.Thread(target=self._run, name=f"actorlib-dag-{channel.name}", daemon=True)
        self._thread.start()

    def post(self, words: list[Any], sends: list[tuple[Any, Any, int]]) -> _Handshake:
        """Queue sends ``(group, bytes, tag)``, after ``words`` (none: right after those queued before). Under
        ``_post_lock``."""
        shake = _Handshake(words, sends)
        self.pending += 1
        self._queue.put(shake)
        return shake

    def close(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        channel = self._channel
        while (shake := self._queue.get()) is not None:
            try:
                wait_all(shake.words, channel.name)
                # (nothing is posted at once meanwhile: pending counts this one until it is posted)
                shake.sends = channel._start_all([(g.send, part, tag) for g, part, tag in shake.ops])
            except ConnectionError as exc:
                shake.error = exc
            except Exception as exc:  # a bug of ours: that value fails, and whoever waits for it is told
                shake.error = ConnectionError(f"tensor channel {channel.name}: {exc!r}")
            finally:
                with channel._post_lock:
                    self.pending -= 1
                shake.ops = []
                shake.posted.set()


class _Handshake:
    """One value's sends waiting for the receiver's words; waited for like the transfer it stands for."""

    __slots__ = ("error", "ops", "posted", "sends", "words")

    def __init__(self, words: list[Any], ops: list[tuple[Any, Any, int]]) -> None:
        self.words = words
        self.ops = ops
        self.posted = threading.Event()
        self.sends: list[Any] = []
        self.error: ConnectionError | None = None

    def is_completed(self) -> bool:
        """Done and sent (a failed one is not: its waiter reports the failure)."""
        return self.posted.is_set() and self.error is None and all(w.is_completed() for w in self.sends)

    def wait(self) -> None:
        self.posted.wait()
        if self.error is not None:
            raise self.error
        for work in self.sends:
            work.wait()


class Outgoing:
    """A value's tensors ready to send (:meth:`Channel.prepare_send`): one packed buffer, or ``(tag, bytes)`` each."""

    __slots__ = ("flats", "nbytes", "packed")

    def __init__(self, nbytes: int, packed: Any, flats: list[tuple[int, Any]]) -> None:
        self.nbytes = nbytes
        self.packed = packed
        self.flats = flats


class _Packed:
    __slots__ = ("buf",)

    def __init__(self, buf: Any) -> None:
        self.buf = buf


def _dtype(torch: Any, name: Any) -> Any:
    """``torch.float32`` for ``"float32"`` (names come from the wire: anything else is refused)."""
    dtype = _DTYPES.get(name) if type(name) is str else None
    if dtype is None:
        dtype = getattr(torch, str(name), None)
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"not a dtype: {name!r}")
        _DTYPES[name] = dtype  # only real dtype names get here: the cache stays as small as torch's list
    return dtype


def wait_all(works: list[Any], name: str = "") -> None:
    """Block until every transfer is done; a failed one (its peer died ...) raises ``ConnectionError``."""
    for w in works:
        try:
            w.wait()
        except Exception as exc:
            raise ConnectionError(f"tensor transfer {name} failed: {exc}") from exc
