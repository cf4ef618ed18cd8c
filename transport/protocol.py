"""The wire format, with no I/O.

A message is a ZeroMQ multipart message: one header frame, then zero or more
raw buffer frames. The header is msgpack ``[version, kind, req_id, body]``
where ``body`` is itself bytes made by :mod:`transport.codec` — so the
envelope can always be read (and a malformed request answered) without
running any of the body's decoding, which may unpickle user classes.

Kinds, and which way they go (caller → callee, callee → caller):

======================  ==========  ==============================================
kind                    direction   body
======================  ==========  ==============================================
CALL            1       →           [method, args, kwargs, options]
RESULT          2       ←  final    value
ERROR           3       ←  final    error record (dict)
STREAM_ITEM     4       ←           list of items (a batch), in order
STREAM_END      5       ←  final    None
STREAM_CREDIT   6       →           items consumed so far (int)
STREAM_CLOSE    7       →           None: the consumer is gone; stop producing
CANCEL          8       →           None: cancel request ``req_id``
PING            9       →           None
PONG            10      ←  final    None
CONTROL         11      →           [op, kwargs]: control-plane request
EVENT           12      either way  [topic, payload]: one-way notification
BATCH           13      either way  [[kind, req_id, body], ...]: several messages
                                    without buffer frames, sent as one
======================  ==========  ==============================================

``req_id`` is chosen by the side that sends the request; every response
carries the request's id back. Messages that refer to an earlier request
(credit, close, cancel) carry that request's id too.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any, NamedTuple

import msgpack

from .exceptions import ProtocolError

__all__ = [
    "VERSION",
    "Kind",
    "Message",
    "encode_header",
    "encode_batch",
    "decode",
    "decode_batch",
    "FINAL_KINDS",
    "RESPONSE_KINDS",
]

VERSION = 2  # 2: a shared-memory entry says whether its sender keeps the file


class Kind(IntEnum):
    CALL = 1
    RESULT = 2
    ERROR = 3
    STREAM_ITEM = 4
    STREAM_END = 5
    STREAM_CREDIT = 6
    STREAM_CLOSE = 7
    CANCEL = 8
    PING = 9
    PONG = 10
    CONTROL = 11
    EVENT = 12
    BATCH = 13


RESPONSE_KINDS = frozenset({Kind.RESULT, Kind.ERROR, Kind.STREAM_ITEM, Kind.STREAM_END, Kind.PONG})
FINAL_KINDS = frozenset({Kind.RESULT, Kind.ERROR, Kind.STREAM_END, Kind.PONG})
_KINDS = {int(k): k for k in Kind}


class Message(NamedTuple):
    kind: Kind
    req_id: int
    body: bytes
    buffers: list[Any]
    peer: bytes | None  # the sender's routing id, on a ROUTER socket
    shm: tuple[Any, ...] = ()  # buffers sent through shared memory: ((frame index, file name, size, kept), ...)


# One packer for every header, from any thread: a header holds only ints, str and bytes, so packing it runs
# no Python code and cannot be interleaved with another thread's (``msgpack.packb`` makes a packer per call,
# which costs more than packing a header does).
_pack_header = msgpack.Packer(use_bin_type=True).pack


# ... but a packer keeps the largest buffer it ever needed: a big body gets a packer of its own
_SHARED_PACKER_MAX = 64 << 10


def encode_header(kind: Kind, req_id: int, body: bytes, shm: list[tuple[int, str, int, bool]] | None = None) -> bytes:
    """The header frame; ``shm`` lists buffer frames whose bytes travel in shared memory (see ``transport.shm``)."""
    if type(body) is not bytes:  # anything else could run Python code while the shared packer is mid-way
        raise TypeError(f"a message body must be bytes, not {type(body).__name__}")
    pack = _pack_header if len(body) < _SHARED_PACKER_MAX else _pack_alone
    if shm:
        return pack((VERSION, kind, req_id, body, shm))
    return pack((VERSION, kind, req_id, body))


def _pack_alone(header: tuple[Any, ...]) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def decode(frames: list[Any], peer: bytes | None = None) -> Message:
    """Read the envelope of a received multipart message.

    ``frames`` are ``zmq.Frame`` objects or bytes. Raises :class:`ProtocolError`
    for anything that is not a well-formed message of this version.
    """
    if not frames:
        raise ProtocolError("empty message")
    head = frames[0]
    raw = head.bytes if hasattr(head, "bytes") else head
    try:
        envelope = msgpack.unpackb(raw, raw=False, use_list=False)
    except Exception as exc:
        raise ProtocolError(f"header is not msgpack: {exc}") from exc
    if type(envelope) is not tuple or len(envelope) not in (4, 5):
        raise ProtocolError("header is not a 4- or 5-element array")
    version, kind, req_id, body = envelope[:4]
    shm = envelope[4] if len(envelope) == 5 else ()
    if type(shm) is not tuple:
        raise ProtocolError("the shared-memory list is not an array")
    if version != VERSION:
        raise ProtocolError(f"protocol version {version!r} is not {VERSION}")
    k = _KINDS.get(kind) if type(kind) is int else None
    if k is None:
        raise ProtocolError(f"unknown message kind {kind!r}")
    if type(req_id) is not int or type(body) is not bytes:
        raise ProtocolError("request id must be an int and body bytes")
    buffers = [f.buffer if hasattr(f, "buffer") else f for f in frames[1:]]
    return Message(k, req_id, body, buffers, peer, shm)


def encode_batch(items: list[tuple[Kind, int, bytes]]) -> bytes:
    """One header frame carrying several buffer-less messages."""
    return encode_header(Kind.BATCH, 0, msgpack.packb(items, use_bin_type=True))


def decode_batch(msg: Message) -> tuple[list[Message], list[tuple[Any, Any, str]]]:
    """The messages inside a BATCH, and its malformed entries as ``(kind, req_id, why)`` (as sent: anything),
    which do not cost the others theirs. :class:`ProtocolError` if the body is not an array."""
    try:
        items = msgpack.unpackb(msg.body, raw=False, use_list=False)
    except Exception as exc:
        raise ProtocolError(f"batch body is not msgpack: {exc}") from exc
    if type(items) is not tuple:
        raise ProtocolError("batch body is not an array")
    out: list[Message] = []
    bad: list[tuple[Any, Any, str]] = []
    for item in items:
        if type(item) is not tuple or len(item) != 3:
            bad.append((None, None, "a batch entry is not [kind, req_id, body]"))
            continue
        kind, req_id, body = item
        k = _KINDS.get(kind) if type(kind) is int else None
        if k is None or k == Kind.BATCH or type(req_id) is not int or type(body) is not bytes:
            bad.append((kind, req_id, f"bad batch entry of kind {kind!r}"))
            continue
        out.append(Message(k, req_id, body, [], msg.peer))
    return out, bad


def peek_request(frames: list[Any]) -> tuple[int, int] | None:
    """Best-effort ``(kind, req_id)`` of a message that failed to decode, to answer it."""
    try:
        envelope = msgpack.unpackb(frames[0].bytes if hasattr(frames[0], "bytes") else frames[0])
        if isinstance(envelope, list | tuple) and len(envelope) >= 3 and type(envelope[2]) is int:
            return envelope[1], envelope[2]
    except Exception:
        pass
    return None
