"""Everything actorlib raises, by who is at fault.

- :class:`RemoteError` — the user's code raised inside an actor. It is also an
  instance of the original exception's class, so ``except ValueError`` works.
- :class:`ActorDiedError` — the actor's process is gone (pid, exit code or
  signal, host, the last lines of its stderr).
- :class:`GetTimeoutError` — a ``get`` timeout passed; the call goes on.
- :class:`TaskCancelledError` — the call was cancelled.
- :class:`SerializationError` — a value could not be (de)serialized.
- :class:`ConnectionLostError` — the transport to a peer broke.
"""

from __future__ import annotations

import signal
from typing import Any, cast

__all__ = [
    "ActorDiedError",
    "ActorLibError",
    "AuthenticationError",
    "ConnectionLostError",
    "GetTimeoutError",
    "HeadUnreachableError",
    "InfeasibleError",
    "PlacementGroupError",
    "RemoteError",
    "SerializationError",
    "TaskCancelledError",
]


class ActorLibError(Exception):
    """Base of every error the runtime raises."""


class RemoteError(ActorLibError):
    """User code raised in an actor; ``cause`` is the original exception (when it could travel)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> RemoteError:
        try:
            return super().__new__(cls)  # a RemoteError[X]: X's own (OSError's sets up its fields)
        except TypeError:  # MemoryError's refuses a class it does not know: Exception's, then
            return Exception.__new__(cls)

    def __init__(
        self, class_name: str, message: str, traceback_text: str, *, actor: str = "", cause: BaseException | None = None
    ) -> None:
        Exception.__init__(self, message)  # never the user class's __init__, which may want other arguments
        self.class_name = class_name
        self.message = message
        self.traceback_text = traceback_text
        self.actor = actor
        self.cause = cause

    def __str__(self) -> str:
        where = f" in {self.actor}" if self.actor else ""
        return f"{self.class_name}: {self.message}\n\nRemote traceback{where}:\n{self.traceback_text.rstrip()}"

    def __reduce__(self) -> Any:
        return (_rebuild_remote_error, (self.class_name, self.message, self.traceback_text, self.actor, self.cause))


def _rebuild_remote_error(class_name: str, message: str, tb: str, actor: str, cause: BaseException | None) -> RemoteError:
    return make_remote_error(class_name, message, tb, actor=actor, cause=cause)


_derived: dict[type, type[RemoteError]] = {}


def make_remote_error(
    class_name: str, message: str, traceback_text: str, *, actor: str = "", cause: BaseException | None = None
) -> RemoteError:
    """A :class:`RemoteError` that is also an instance of ``type(cause)`` when Python allows it."""
    cls: type[RemoteError] = RemoteError
    if isinstance(cause, RemoteError):  # raised in an actor that called another: the innermost class still
        cls = type(cause)
    elif isinstance(cause, Exception):  # (not SystemExit, KeyboardInterrupt, CancelledError: the caller would
        base = type(cause)  # take them for its own: they stay a plain RemoteError)
        cls = _derived.get(base) or RemoteError
        if base not in _derived:
            try:
                cls = cast(
                    "type[RemoteError]", type(f"RemoteError[{base.__name__}]", (RemoteError, base), {"__module__": __name__})
                )
                cls.__new__(cls)  # some C types allow the class but not its instances (ExceptionGroup)
            except TypeError:  # incompatible layouts (rare C types): plain RemoteError
                cls = RemoteError
            _derived[base] = cls
    err = cls.__new__(cls)
    RemoteError.__init__(err, class_name, message, traceback_text, actor=actor, cause=cause)
    if cause is not None and cls is not RemoteError:
        ours = {"class_name", "message", "traceback_text", "actor", "cause"}
        err.__dict__.update({k: v for k, v in getattr(cause, "__dict__", {}).items() if k not in ours})
        err.args = cause.args  # (str() is the remote traceback either way)
        for base, fields in _SLOT_FIELDS.items():
            if isinstance(cause, base):
                for field in fields:
                    try:
                        setattr(err, field, getattr(cause, field))
                    except (AttributeError, TypeError):
                        pass
    return err


# What built-in exceptions keep outside their __dict__, copied too
_SLOT_FIELDS: dict[type, tuple[str, ...]] = {
    OSError: ("errno", "strerror", "filename", "filename2"),
    StopIteration: ("value",),
    SyntaxError: ("filename", "lineno", "offset", "text", "msg"),
    UnicodeError: ("encoding", "object", "start", "end", "reason"),
}


class ActorDiedError(ActorLibError):
    """The actor's process is gone; its pending and future calls fail with this."""

    def __init__(self, death: dict[str, Any]) -> None:
        self.death = death
        self.actor_id: str = death.get("actor_id", "")
        self.class_name: str = death.get("class_name", "")
        self.name: str | None = death.get("name")
        self.pid: int | None = death.get("pid")
        self.exit_code: int | None = death.get("exit_code")
        self.signal: int | None = death.get("signal")
        self.host: str | None = death.get("host")
        self.node_id: str | None = death.get("node_id")
        self.reason: str = death.get("reason", "the actor died")
        self.stderr_tail: list[str] = list(death.get("stderr_tail") or [])
        self.init_error: dict[str, Any] | None = death.get("init_error")
        super().__init__(self._describe())

    def _describe(self) -> str:
        who = self.class_name + (f" {self.name!r}" if self.name else "") + f" ({self.actor_id[:8]})"
        parts = [f"actor {who} died: {self.reason}"]
        facts = []
        if self.pid is not None:
            facts.append(f"pid={self.pid}")
        if self.signal is not None:
            try:
                facts.append(f"signal={signal.Signals(self.signal).name}")
            except ValueError:
                facts.append(f"signal={self.signal}")
        elif self.exit_code is not None:
            facts.append(f"exit_code={self.exit_code}")
        if self.host:
            facts.append(f"host={self.host}")
        if facts:
            parts[0] += " [" + ", ".join(facts) + "]"
        if self.init_error:
            parts.append(self.init_error.get("traceback", "") or self.init_error.get("message", ""))
        if self.stderr_tail:
            parts.append("last lines of its stderr:\n  " + "\n  ".join(self.stderr_tail))
        return "\n".join(p.rstrip() for p in parts if p)

    def __reduce__(self) -> Any:
        return (ActorDiedError, (self.death,))


class GetTimeoutError(ActorLibError, TimeoutError):
    """``get``/``wait`` gave up waiting; the call itself goes on."""


class TaskCancelledError(ActorLibError):
    """The call was cancelled with ``actorlib.cancel``."""


class SerializationError(ActorLibError):
    """A value could not be serialized or deserialized."""


class ConnectionLostError(ActorLibError):
    """The transport to a peer broke (not the peer's code, not a timeout)."""


class PlacementGroupError(ActorLibError):
    """A placement group could not be created, or was removed."""


class AuthenticationError(ActorLibError):
    """A peer did not present the cluster's key."""


class HeadUnreachableError(ActorLibError, ConnectionError):
    """No actorlib head could be reached: none runs there, the address is wrong, or no cluster key was found.

    A head never answers a peer without its cluster key, so a wrong key looks like silence.
    """


class InfeasibleError(ActorLibError, ValueError):
    """A resource demand that no node of the cluster could ever satisfy."""


def error_from_record(record: dict[str, Any]) -> ActorLibError:
    """Turn an ERROR message's record into the exception to raise at the caller."""
    kind = record.get("type")
    message = record.get("message", "")
    if kind == "task":
        cause = None
        exc_bytes = record.get("exc")
        if exc_bytes:
            try:
                import pickle

                cause = pickle.loads(exc_bytes)
            except Exception:
                cause = None
        args = (record.get("class", "Exception"), message, record.get("traceback", ""))
        try:
            return make_remote_error(*args, actor=record.get("actor", ""), cause=cause)
        except Exception:  # a cause no class can be derived from: the error must still reach the caller
            return RemoteError(*args, actor=record.get("actor", ""), cause=cause)
    if kind == "cancelled":
        return TaskCancelledError(message or "the call was cancelled")
    if kind == "serialization":
        return SerializationError(message)
    if kind == "died":
        return ActorDiedError(record.get("death", {}))
    return ActorLibError(f"{kind}: {message}" if kind else message)
