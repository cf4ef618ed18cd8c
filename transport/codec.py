"""Values to bytes and back: msgpack for plain data, out-of-band frames for arrays.

``dumps(obj)`` returns ``(body, buffers)``: ``body`` is msgpack, ``buffers`` is a
list of buffer objects (memoryviews, pickle buffers) that travel as frames of
their own and are never copied into ``body``. ``loads(body, buffers)`` is the
inverse; arrays it returns are views on the received frames.

- Plain data (None, bool, int, float, str, bytes, list, dict) is msgpack.
- Tuples, numpy arrays and CPU torch tensors are msgpack extension types; an
  array's or tensor's memory is one out-of-band buffer.
- Anything else goes through cloudpickle (protocol 5), whose out-of-band
  buffers join the same list, so classes defined in ``__main__`` or a notebook
  cell work.

torch and numpy are never imported here: a value can only be a tensor if
torch is already loaded in this process, and a received tensor imports torch
only then.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import sys
import types
from typing import Any

import cloudpickle
import msgpack

from .exceptions import DecodeError, EncodeError

__all__ = ["MAX_MESSAGE_BYTES", "Pickler", "dumps", "loads", "pickle_dumps"]

# The largest message (header and buffers together) this process encodes, and each of its sockets
# accepts per frame: a bound on what one peer can make another allocate. Larger tensors belong to
# torch.distributed.
MAX_MESSAGE_BYTES = int(os.environ.get("ACTORLIB_MAX_MESSAGE_BYTES", str(1 << 30)))

# Extension type codes. Explicit values: they are part of the wire format.
_EXT_TUPLE = 1
_EXT_PICKLE = 2
_EXT_NDARRAY = 3
_EXT_TENSOR = 4


def dumps(obj: Any, *, allow_pickle: bool = True) -> tuple[bytes, list[Any]]:
    """Encode ``obj``; raise :class:`EncodeError` naming what could not be encoded."""
    default = _Encoder(allow_pickle)
    try:
        body = _pack(obj, default)
    except EncodeError:
        raise
    except Exception as exc:  # msgpack's own errors: int too large, recursion ...
        raise EncodeError(f"cannot encode value of type {type(obj).__qualname__}: {exc}") from exc
    buffers = default.buffers
    if buffers or len(body) > MAX_MESSAGE_BYTES:
        size = len(body) + sum(memoryview(b).nbytes for b in buffers)
        if size > MAX_MESSAGE_BYTES:
            raise EncodeError(
                f"a {type(obj).__qualname__} of {size:,} bytes is over the largest message actorlib sends "
                f"({MAX_MESSAGE_BYTES:,} bytes, set by ACTORLIB_MAX_MESSAGE_BYTES); move large tensors with torch.distributed"
            )
    return body, buffers


def loads(body: bytes | memoryview, buffers: list[Any] = (), *, allow_pickle: bool = True) -> Any:  # type: ignore[assignment]
    """Decode what :func:`dumps` made; raise :class:`DecodeError` on anything malformed."""
    try:
        return _unpack(body, _Decoder(buffers, allow_pickle))
    except DecodeError:
        raise
    except Exception as exc:
        raise DecodeError(f"{type(exc).__name__}: {exc}") from exc


# msgpack's hooks are objects, not closures: a closure that calls itself (tuples nest) is a reference
# cycle, which would keep every buffer of the message alive until the garbage collector next ran (for
# a shared-memory buffer, its mapping, whose unmapping then lands in a random collection) and give it
# garbage to collect on every call.


# Tuples nested in tuples: each level is a msgpack pack (or unpack) called from inside the one around it,
# ~40 KB of C stack each, and ~200 levels overflowed the stack before Python's recursion limit was reached
# (SIGSEGV). Deeper tuples are pickled when sent; a message nesting more is refused when read.
_MAX_NESTED = 64


class _Encoder:
    """msgpack's ``default`` for one :func:`dumps`: extension types, with the out-of-band buffers they take."""

    __slots__ = ("allow_pickle", "buffers", "depth")

    def __init__(self, allow_pickle: bool) -> None:
        self.allow_pickle = allow_pickle
        self.buffers: list[Any] = []
        self.depth = 0

    def __call__(self, o: Any) -> msgpack.ExtType:
        buffers = self.buffers
        t = type(o)
        if t is tuple and self.depth < _MAX_NESTED:
            self.depth += 1
            try:
                return msgpack.ExtType(_EXT_TUPLE, _pack(list(o), self, _NESTED_BUF))
            finally:
                self.depth -= 1
        np = sys.modules.get("numpy")
        if np is not None and t is np.ndarray and o.dtype.kind not in "OVT":  # (T: numpy 2's StringDType, references)
            arr = o if o.flags.c_contiguous else np.ascontiguousarray(o)
            buffers.append(memoryview(arr.reshape(-1).view(np.uint8)))
            meta = [arr.dtype.str, list(arr.shape), len(buffers) - 1]
            return msgpack.ExtType(_EXT_NDARRAY, _pack(meta, None, _NESTED_BUF))
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(o, torch.Tensor) and _plain_cpu_tensor(o, torch):
            buffers.append(_tensor_bytes(o, torch))
            meta = [str(o.dtype).removeprefix("torch."), list(o.shape), len(buffers) - 1]
            return msgpack.ExtType(_EXT_TENSOR, _pack(meta, None, _NESTED_BUF))
        if not self.allow_pickle:
            raise EncodeError(f"cannot encode a {t.__qualname__} here (plain data only)")
        first = len(buffers)
        try:
            data = pickle_dumps(o, buffers.append)
        except Exception as exc:
            raise EncodeError(f"cannot serialize {t.__module__}.{t.__qualname__}: {exc}") from exc
        return msgpack.ExtType(_EXT_PICKLE, _pack([data, first, len(buffers) - first], None, _NESTED_BUF))


class _Decoder:
    """msgpack's ``ext_hook`` for one :func:`loads`: extension types, arrays as views on the message's buffers."""

    __slots__ = ("allow_pickle", "buffers", "depth")

    def __init__(self, buffers: list[Any], allow_pickle: bool) -> None:
        self.buffers = buffers
        self.allow_pickle = allow_pickle
        self.depth = 0

    def __call__(self, code: int, data: bytes) -> Any:
        if code == _EXT_TUPLE:
            if self.depth >= _MAX_NESTED:
                raise DecodeError(f"tuples nested more than {_MAX_NESTED} deep (a sender pickles those)")
            self.depth += 1
            try:
                return tuple(_unpack(data, self))
            finally:
                self.depth -= 1
        if code == _EXT_NDARRAY:
            import numpy as np

            dtype, shape, index = _unpack(data, None)
            return np.frombuffer(self.buffers[index], dtype=np.uint8).view(np.dtype(dtype)).reshape(shape)
        if code == _EXT_TENSOR:
            import torch

            dtype, shape, index = _unpack(data, None)
            buf = self.buffers[index]
            if len(buf) == 0:  # (torch.frombuffer refuses an empty buffer) only for a tensor with no elements
                if any(n == 0 for n in shape):
                    return torch.empty(shape, dtype=getattr(torch, dtype))
                raise DecodeError(f"a tensor of shape {shape} arrived without its bytes")
            flat = torch.frombuffer(buf, dtype=getattr(torch, dtype))  # one torch call where it can be: see _tensor_bytes
            return flat if len(shape) == 1 and shape[0] == flat.numel() else flat.reshape(shape)
        if code == _EXT_PICKLE:
            if not self.allow_pickle:
                raise DecodeError("a pickled value arrived where only plain data is accepted")
            payload, first, count = _unpack(data, None)
            return pickle.loads(payload, buffers=self.buffers[first : first + count])
        raise DecodeError(f"unknown extension type {code}")


def _plain_cpu_tensor(t: Any, torch: Any) -> bool:
    return t.device.type == "cpu" and t.layout == torch.strided and not t.is_quantized and not t.is_nested


def _code_reduce(code: types.CodeType) -> Any:
    """cloudpickle's reduction of a code object, keeping its file name.

    cloudpickle 3.1 writes ``"<dynamic-code>"`` there for code pickled by value
    (classes and functions of ``__main__``, notebook cells, local ones): a
    remote traceback would no longer say which file the error was raised in.
    """
    ctor, args = _CLOUDPICKLE_CODE_REDUCE(code)
    return ctor, tuple(code.co_filename if a == "<dynamic-code>" and type(a) is str else a for a in args)


_CLOUDPICKLE_CODE_REDUCE = cloudpickle.Pickler.dispatch_table[types.CodeType]


class Pickler(cloudpickle.Pickler):
    """cloudpickle's pickler (protocol 5), except that code pickled by value keeps its file name."""

    dispatch_table = collections.ChainMap({types.CodeType: _code_reduce}, cloudpickle.Pickler.dispatch_table)

    def __init__(self, file: Any, buffer_callback: Any = None) -> None:
        super().__init__(file, protocol=5, buffer_callback=buffer_callback)


def pickle_dumps(obj: Any, buffer_callback: Any = None) -> bytes:
    """``obj`` pickled by :class:`Pickler`; buffers go to ``buffer_callback`` (out of band) if given."""
    file = io.BytesIO()
    Pickler(file, buffer_callback).dump(obj)
    return file.getvalue()


def _tensor_bytes(t: Any, torch: Any) -> memoryview:
    """A CPU tensor's bytes, flat, without a copy where it can be.

    The usual tensor (contiguous, no grad, a dtype numpy knows) takes one torch
    call: each torch call lets go of the GIL, and in a process whose event
    loop thread is busy each one costs a wait for it to come back.
    """
    try:
        return memoryview(t.numpy()).cast("B")
    except (TypeError, RuntimeError):  # bfloat16, requires grad, conjugate bit, not contiguous
        return memoryview(t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8).numpy())


# A msgpack packer starts with a 256 KiB buffer. With two alive at once (an extension type is packed from
# inside the outer pack's ``default``), glibc handed memory back to the system and took it again on every
# call: a value holding a tuple, array, tensor or pickle took ~12 µs more to encode (["ping", (1,), {}, None]:
# 12.7 against 1.9 µs). What is packed inside is mostly small (metadata, a tuple's items); a buffer grows
# when it must.
_NESTED_BUF = 4096


def _pack(obj: Any, default: Any, buf_size: int = 256 << 10) -> bytes:
    return msgpack.packb(obj, default=default, strict_types=True, use_bin_type=True, buf_size=buf_size)


def _unpack(data: bytes | memoryview, ext_hook: Any) -> Any:
    kwargs = {"ext_hook": ext_hook} if ext_hook is not None else {}
    return msgpack.unpackb(data, raw=False, strict_map_key=False, **kwargs)
