"""Errors of the transport, by who is at fault.

ZeroMQ's own errors (``zmq.ZMQError``, ``zmq.Again``) are translated into
these at the transport boundary; nothing above this package sees them.
"""

from __future__ import annotations

__all__ = [
    "ConnectionClosedError",
    "DecodeError",
    "EncodeError",
    "ProtocolError",
    "TransportError",
]


class TransportError(Exception):
    """Base of every error the transport raises."""


class ProtocolError(TransportError):
    """A message that does not follow the wire protocol (bad version, kind, framing)."""


class EncodeError(TransportError):
    """A value this side could not serialize."""


class DecodeError(TransportError):
    """Bytes that could not be turned back into a value."""


class ConnectionClosedError(TransportError):
    """The endpoint was closed by this process (``by_us``) or broken from outside."""

    def __init__(self, message: str, *, by_us: bool) -> None:
        super().__init__(message)
        self.by_us = by_us
