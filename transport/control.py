"""Control-plane requests: named operations with keyword arguments.

A CONTROL message's body is ``[op, kwargs]`` in plain data (never pickles:
the control plane carries user code only as opaque bytes). A
:class:`ControlServer` maps ``op`` to ``target.op_<op>(peer, **kwargs)``,
runs it as a task and answers RESULT, or ERROR with ``{"type", "message"}``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import Any

from . import codec
from .endpoint import Endpoint
from .exceptions import DecodeError, TransportError
from .protocol import Kind, Message

__all__ = ["ControlError", "ControlServer", "control_call", "send_event"]

log = logging.getLogger(__name__)


class ControlError(Exception):
    """Raised by an ``op_*`` handler to answer with a typed error."""

    def __init__(self, type_: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.type = type_
        self.extra = extra


class ControlServer:
    def __init__(self, target: Any, *, on_event: Any = None) -> None:
        self._target = target
        self._on_event = on_event
        self._tasks: set[asyncio.Task[None]] = set()
        self.endpoint: Endpoint | None = None

    def attach(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint

    def handle(self, msg: Message) -> None:
        """``on_message`` for the endpoint."""
        ep = self.endpoint
        assert ep is not None
        if msg.kind == Kind.EVENT:
            if self._on_event is not None:
                try:
                    topic, payload = codec.loads(msg.body, msg.buffers, allow_pickle=False)
                except (DecodeError, ValueError, TypeError) as exc:
                    log.warning("%s: malformed event from %r: %s", ep.name, msg.peer, exc)
                    return
                self._on_event(msg.peer, topic, payload)
            return
        try:
            if msg.kind != Kind.CONTROL:
                raise ControlError("ProtocolError", f"{msg.kind.name} not accepted here")
            try:
                op, kwargs = codec.loads(msg.body, msg.buffers, allow_pickle=False)
            except (DecodeError, ValueError, TypeError) as exc:
                raise ControlError("ProtocolError", f"malformed control request: {exc}") from None
            handler = getattr(self._target, f"op_{op}", None) if isinstance(op, str) else None
            if handler is None:
                raise ControlError("ValueError", f"unknown control operation {op!r}")
            if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
                raise ControlError("ValueError", "control arguments must be a map with string keys")
            try:  # here, not by catching TypeError from the call: one raised inside is a fault of ours
                inspect.signature(handler).bind(msg.peer, **kwargs)
            except TypeError as exc:
                raise ControlError("ValueError", f"bad arguments to {handler.__name__}: {exc}") from None
        except ControlError as exc:
            self._answer_error(msg, {"type": exc.type, "message": str(exc), **exc.extra})
            return
        task = asyncio.get_running_loop().create_task(self._run(handler, msg, kwargs))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _answer_error(self, msg: Message, record: dict[str, Any]) -> None:
        assert self.endpoint is not None
        try:
            self.endpoint.reply_error(msg.req_id, record, msg.peer)
        except TransportError as exc:
            log.debug("%s: could not answer %r: %s", self.endpoint.name, msg.peer, exc)

    async def _run(self, handler: Any, msg: Message, kwargs: dict[str, Any]) -> None:
        ep = self.endpoint
        assert ep is not None
        try:
            result = await handler(msg.peer, **kwargs)
        except ControlError as exc:
            record = {"type": exc.type, "message": str(exc), **exc.extra}
        except Exception as exc:
            log.exception("control operation %s failed", handler.__name__)
            record = {"type": "InternalError", "message": f"{type(exc).__name__}: {exc}"}
        else:
            try:
                body, buffers = codec.dumps(result, allow_pickle=False)
            except TransportError as exc:
                record = {"type": "InternalError", "message": f"could not encode the answer of {handler.__name__}: {exc}"}
            else:
                try:
                    ep.send(Kind.RESULT, msg.req_id, body, buffers, msg.peer)
                except TransportError as exc:
                    log.debug("%s: could not answer %s: %s", ep.name, handler.__name__, exc)
                return
        self._answer_error(msg, record)

    def cancel_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()


async def control_call(
    endpoint: Endpoint, op: str, *, peer: bytes | None = None, timeout: float | None = None, **kwargs: Any
) -> Any:
    """Send a CONTROL request and return its result; ERROR raises :class:`RemoteFailure`."""
    return await endpoint.call(Kind.CONTROL, [op, kwargs], peer=peer, timeout=timeout, allow_pickle=False)


def send_event(endpoint: Endpoint, topic: str, payload: Any, peer: bytes | None = None) -> None:
    body, buffers = codec.dumps([topic, payload], allow_pickle=False)
    endpoint.send(Kind.EVENT, 0, body, buffers, peer)
