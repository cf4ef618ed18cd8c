"""ZeroMQ + msgpack messaging. Knows nothing of actors."""

from .codec import Pickler as Pickler, dumps as dumps, loads as loads, pickle_dumps as pickle_dumps
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
from .security import (
    ClusterKey as ClusterKey,
    generate_key as generate_key,
    read_key_file as read_key_file,
    set_cluster_key as set_cluster_key,
    write_key_file as write_key_file,
)

__all__ = [
    "VERSION",
    "ClusterKey",
    "ConnectionClosedError",
    "ControlError",
    "ControlServer",
    "DecodeError",
    "EncodeError",
    "Endpoint",
    "EndpointBusy",
    "Kind",
    "Message",
    "Pickler",
    "ProtocolError",
    "RemoteFailure",
    "TransportError",
    "control_call",
    "dumps",
    "generate_key",
    "loads",
    "pickle_dumps",
    "read_key_file",
    "send_event",
    "set_cluster_key",
    "shared_context",
    "wait_sent",
    "write_key_file",
]
