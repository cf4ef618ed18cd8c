"""ZeroMQ + msgpack messaging. Knows nothing of actors."""

from .codec import dumps as dumps, loads as loads
from .control import (
    ControlError as ControlError,
    ControlServer as ControlServer,
    control_call as control_call,
    send_event as send_event,
)
from .endpoint import (
    Endpoint as Endpoint,
    EndpointBusy as EndpointBusy,
    RemoteFailure as RemoteFailure,
    shared_context as shared_context,
    wait_sent as wait_sent,
)
from .exceptions import (
    ConnectionClosedError as ConnectionClosedError,
    DecodeError as DecodeError,
    EncodeError as EncodeError,
    ProtocolError as ProtocolError,
    TransportError as TransportError,
)
from .protocol import VERSION as VERSION, Kind as Kind, Message as Message

__all__ = [
    "VERSION",
    "ConnectionClosedError",
    "ControlError",
    "ControlServer",
    "DecodeError",
    "EncodeError",
    "Endpoint",
    "EndpointBusy",
    "Kind",
    "Message",
    "ProtocolError",
    "RemoteFailure",
    "TransportError",
    "control_call",
    "dumps",
    "loads",
    "send_event",
    "shared_context",
    "wait_sent",
]
