"""``@remote`` classes, actor handles and their methods."""

from __future__ import annotations

import inspect
import sys
import uuid
from typing import Any, Generic, TypeVar

from scheduler.resources import normalize_demand

from . import runtime
from .object_ref import ObjectRef
from .placement_group import PlacementGroup
from .worker import ASYNC_GENERATOR, GENERATOR, SYNC, method_kind

__all__ = ["ActorClass", "ActorHandle", "ActorMethod", "remote"]

T = TypeVar("T")

_OPTION_DEFAULTS: dict[str, Any] = {
    "num_cpus": None,
    "num_gpus": None,
    "resources": None,
    "placement_group": None,
    "bundle_index": -1,
    "name": None,
    "namespace": None,
    "lifetime": None,
    "max_restarts": 0,
    "max_task_retries": 0,
    "max_concurrency": None,
    "env_vars": None,
    "py_executable": None,
}


def _validate_options(options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(_OPTION_DEFAULTS))
    if unknown:
        raise TypeError(f"unknown actor option(s) {unknown}; valid options: {sorted(_OPTION_DEFAULTS)}")
    normalize_demand(options.get("num_cpus"), options.get("num_gpus"), options.get("resources"))
    name = options.get("name")
    if name is not None and (not isinstance(name, str) or not name):
        raise ValueError(f"name must be a non-empty string, not {name!r}")
    ns = options.get("namespace")
    if ns is not None and (not isinstance(ns, str) or not ns):
        raise ValueError(f"namespace must be a non-empty string, not {ns!r}")
    if options.get("lifetime") not in (None, "detached", "non_detached"):
        raise ValueError(f"lifetime must be None, 'detached' or 'non_detached', not {options['lifetime']!r}")
    mc = options.get("max_concurrency")
    if mc is not None and (isinstance(mc, bool) or not isinstance(mc, int) or mc < 1):
        raise ValueError(f"max_concurrency must be an int >= 1, not {mc!r}")
    env = options.get("env_vars")
    if env is not None and (
        not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
    ):
        raise ValueError("env_vars must be a dict of str to str")
    for key in ("max_restarts", "max_task_retries"):
        n = options.get(key, 0)
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < -1):
            raise ValueError(f"{key} must be an int >= -1 (-1: without limit), not {n!r}")
    pg = options.get("placement_group")
    if pg is not None and not isinstance(pg, PlacementGroup):
        raise TypeError(f"placement_group must be a PlacementGroup, not {type(pg).__name__}")
    index = options.get("bundle_index", -1)
    if isinstance(index, bool) or not isinstance(index, int) or index < -1:
        raise ValueError(f"bundle_index must be an int >= -1, not {index!r}")
    if pg is None and index != -1:
        raise ValueError("bundle_index needs a placement_group")
    if pg is not None and index >= pg.bundle_count:
        raise ValueError(f"bundle_index {index} is out of range for a placement group of {pg.bundle_count} bundles")
    exe = options.get("py_executable")
    if exe is not None and exe != sys.executable:
        raise ValueError("py_executable other than this interpreter is not supported yet")
    return options


def remote(*args: Any, **options: Any) -> Any:
    """Make a class an actor class: ``@remote`` or ``@remote(num_gpus=1, ...)``."""
    if len(args) == 1 and not options and inspect.isclass(args[0]):
        return ActorClass(args[0], {})
    if args:
        raise TypeError("@actorlib.remote takes a class, or keyword options only")

    def wrap(cls: type[T]) -> ActorClass[T]:
        if not inspect.isclass(cls):
            raise TypeError(f"@actorlib.remote works on classes, not {type(cls).__name__}")
        return ActorClass(cls, _validate_options(options))

    return wrap


def _method_table(cls: type) -> dict[str, int]:
    table = {}
    for name in dir(cls):
        if name.startswith("__"):
            continue
        attr = getattr(cls, name, None)
        if callable(attr) and not inspect.isclass(attr):
            table[name] = method_kind(attr)
    return table


class ActorClass(Generic[T]):
    """What ``@remote`` returns. ``.remote(*args)`` starts an actor; ``.options(...)`` overrides options."""

    def __init__(self, cls: type[T], options: dict[str, Any]) -> None:
        self._cls = cls
        self._options = options
        self._methods = _method_table(cls)
        self.__name__ = cls.__name__
        self.__qualname__ = cls.__qualname__
        self.__doc__ = cls.__doc__

    def options(self, **options: Any) -> ActorClass[T]:
        return ActorClass(self._cls, _validate_options({**self._options, **options}))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"actor class {self._cls.__name__} cannot be instantiated directly; use {self._cls.__name__}.remote(...)")

    def remote(self, *args: Any, **kwargs: Any) -> ActorHandle:
        rt = runtime.current()
        o = {**_OPTION_DEFAULTS, **self._options}
        actor_id = uuid.uuid4().hex
        class_name = self._cls.__name__
        demand = normalize_demand(o["num_cpus"], o["num_gpus"], o["resources"])
        cls = self._cls
        waits_for_refs = any(type(a) is ObjectRef for a in (*args, *kwargs.values()))
        if waits_for_refs:

            async def payload() -> bytes:
                a = [await x if type(x) is ObjectRef else x for x in args]
                k = {n: (await v if type(v) is ObjectRef else v) for n, v in kwargs.items()}
                return runtime.encode_payload((cls, tuple(a), k))

        else:
            ready = runtime.encode_payload((cls, args, kwargs))  # errors raise here, at the call site

            async def payload() -> bytes:
                return ready

        namespace = o["namespace"] or rt.namespace
        spec = {
            "actor_id": actor_id,
            "class_name": class_name,
            "methods": self._methods,
            "demand": demand,
            "name": o["name"],
            "namespace": namespace,
            "lifetime": "detached" if o["lifetime"] == "detached" else None,  # "non_detached" is the default
            "max_concurrency": o["max_concurrency"] or 1000,
            "env_vars": o["env_vars"] or {},
            "sys_path": [p for p in sys.path if isinstance(p, str)],
            "placement_group": o["placement_group"].id if o["placement_group"] is not None else None,
            "bundle_index": o["bundle_index"],
            "max_restarts": o["max_restarts"] or 0,
            "max_task_retries": o["max_task_retries"] or 0,
            "creator": rt.actor_id,  # made by an actor: it goes with that actor's driver (see the head)
        }
        rt.create_actor(spec, payload, waits_for_refs=waits_for_refs)
        return ActorHandle(actor_id, class_name, self._methods, o["name"], namespace)

    def __repr__(self) -> str:
        return f"ActorClass({self._cls.__module__}.{self._cls.__qualname__})"


class ActorHandle:
    """A reference to a running actor. Serializable: another actor that receives it can call it."""

    def __init__(
        self, actor_id: str, class_name: str, methods: dict[str, int], name: str | None = None, namespace: str = "default"
    ) -> None:
        self._actor_id = actor_id
        self._class_name = class_name
        self._methods = methods
        self._name = name
        self._namespace = namespace

    def __getattr__(self, name: str) -> ActorMethod:
        if name.startswith("_"):
            raise AttributeError(name)
        kind = self._methods.get(name)
        if kind is None:
            raise AttributeError(f"actor class {self._class_name!r} has no method {name!r}")
        method = ActorMethod(self, name, kind)
        self.__dict__[name] = method
        return method

    def __reduce__(self) -> Any:
        return (ActorHandle, (self._actor_id, self._class_name, self._methods, self._name, self._namespace))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ActorHandle) and other._actor_id == self._actor_id

    def __hash__(self) -> int:
        return hash(self._actor_id)

    def __repr__(self) -> str:
        return f"Actor({self._class_name}, {self._actor_id[:12]})"


class ActorMethod:
    """``handle.method``: ``.remote(*args, **kwargs)`` calls it; ``.options(...)`` tunes the call."""

    def __init__(self, handle: ActorHandle, name: str, kind: int, window: int | None = None) -> None:
        self._handle = handle
        self._name = name
        self._kind = kind
        self._window = window

    def options(self, *, generator_backpressure: int | None = None) -> ActorMethod:
        """``generator_backpressure``: how many items a generator may run ahead of its consumer."""
        if generator_backpressure is not None and (
            isinstance(generator_backpressure, bool) or not isinstance(generator_backpressure, int) or generator_backpressure < 1
        ):
            raise ValueError(f"generator_backpressure must be an int >= 1, not {generator_backpressure!r}")
        return ActorMethod(self._handle, self._name, self._kind, generator_backpressure)

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        h = self._handle
        stream = self._kind in (GENERATOR, ASYNC_GENERATOR)
        window = (self._window or runtime.DEFAULT_STREAM_WINDOW) if stream else None
        rt = runtime.current()
        return rt.submit(h._actor_id, h._class_name, self._name, args, kwargs, stream_window=window, sync=self._kind == SYNC)

    def bind(self, *args: Any, **kwargs: Any) -> Any:
        """A node of a compiled graph (:mod:`actorlib.dag`): this method, called with these arguments on each execution."""
        from .dag import ClassMethodNode

        return ClassMethodNode(self._handle, self._name, self._kind, args, kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"actor methods are called with .remote(): {self._handle._class_name}.{self._name}.remote(...)")

    def __repr__(self) -> str:
        return f"ActorMethod({self._handle._class_name}.{self._name})"
