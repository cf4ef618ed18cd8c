"""The module-level API: ``init``, ``shutdown``, ``get``, ``wait``, ``cancel``, ``kill`` ..."""

from __future__ import annotations

import atexit
import inspect
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

from scheduler.cluster_file import ClusterFile
from scheduler.resources import normalize_demand
from scheduler.session import locate_head
from transport import ClusterKey, read_key_file, set_cluster_key

from . import runtime
from .actor import ActorHandle
from .completion import wait_for
from .driver import Driver
from .exceptions import ActorLibError, GetTimeoutError, HeadUnreachableError
from .object_ref import ObjectRef, ObjectRefGenerator, failed, wait_reading

__all__ = [
    "available_resources",
    "cancel",
    "cluster_resources",
    "get",
    "get_actor",
    "init",
    "is_initialized",
    "kill",
    "nodes",
    "shutdown",
    "wait",
]

_driver: Driver | None = None
_lock = threading.Lock()


def init(
    address: str | None = None,
    *,
    num_cpus: float | None = None,
    num_gpus: int | None = None,
    resources: dict[str, float] | None = None,
    namespace: str = "default",
    log_to_driver: bool = True,
    ignore_reinit_error: bool = False,
    cluster: str | dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Start actorlib in this process, or join a running cluster.

    Without ``address``: an embedded head and a local node, both stopped by
    :func:`shutdown` (or when this process exits). ``num_gpus=N`` declares N
    logical GPUs (on any machine); by default the GPUs the node can see are
    used. ``cluster`` (a cluster file's path, or its mapping) makes the
    embedded head reachable over TCP at the file's ``head.host`` and starts a
    node agent on each of its ``nodes`` over SSH.

    With ``address="HOST:PORT"`` (or ``"auto"``: ``$ACTORLIB_ADDRESS``, else
    the head running on this machine): join that standalone head as one more
    driver. Its cluster key comes from ``$ACTORLIB_KEY_FILE``, else from the
    head or node ``actorlib start`` started here. Actors this driver creates
    die with it unless created with ``lifetime="detached"``.

    Returns a summary of the session.
    """
    global _driver
    with _lock:
        current = runtime.current_or_none()
        if _driver is not None or (current is not None and current.mode == "worker"):
            if ignore_reinit_error:
                return _summary()
            if _driver is None:  # inside an actor: a second cluster would take over the actor's runtime
                raise ActorLibError("actorlib.init() inside an actor: it is part of its cluster already")
            raise ActorLibError("actorlib.init() was already called; call actorlib.shutdown() first")
        if address is not None:
            if num_cpus is not None or num_gpus is not None or resources or cluster is not None:
                raise ValueError(
                    "num_cpus, num_gpus, resources and cluster describe a new cluster; "
                    "with address=... this driver joins an existing one (give one or the other)"
                )
            if not isinstance(namespace, str) or not namespace:
                raise ValueError(f"namespace must be a non-empty string, not {namespace!r}")
            head_address, secret = _locate(address)
            set_cluster_key(secret)
            driver = Driver()
            driver.start_connected(head_address, namespace=namespace, log_to_driver=log_to_driver)
            _driver = driver
            runtime.set_current(driver.rt)
            return _summary()
        plan = ClusterFile.load(cluster) if cluster is not None else None
        if num_gpus is not None and (isinstance(num_gpus, bool) or not isinstance(num_gpus, int) or num_gpus < 0):
            raise ValueError(f"num_gpus must be a whole number >= 0, not {num_gpus!r}")
        normalize_demand(num_cpus, None, resources)
        if not isinstance(namespace, str) or not namespace:
            raise ValueError(f"namespace must be a non-empty string, not {namespace!r}")
        driver = Driver()
        driver.start_embedded(
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            resources=resources,
            namespace=namespace,
            log_to_driver=log_to_driver,
            head_host=plan.host if plan else None,
            head_port=plan.port if plan else 0,
        )
        if plan is not None and plan.nodes:
            try:
                driver.launch_nodes(plan.node_dicts())
            except BaseException:
                driver.stop()
                raise
        _driver = driver
        runtime.set_current(driver.rt)
        return _summary()


def _locate(address: str) -> tuple[str, str]:
    """``address`` → the head's tcp:// address and the cluster secret; errors say what to fix."""
    if not isinstance(address, str) or not address:
        raise ValueError(f"address must be 'HOST:PORT' or 'auto', not {address!r}")
    try:
        head_address, key_file = locate_head(address)
    except LookupError as exc:
        raise HeadUnreachableError(str(exc)) from None
    if key_file is None:
        raise HeadUnreachableError(
            f"no cluster key for the head at {head_address}: set ACTORLIB_KEY_FILE to a copy of its "
            "cluster.key (in the head's session directory; keep it mode 0600)"
        )
    try:
        secret = read_key_file(key_file)
        ClusterKey(secret)  # (checked here, where the file can still be named)
    except (OSError, ValueError) as exc:
        raise HeadUnreachableError(f"cannot use the cluster key file {key_file} (ACTORLIB_KEY_FILE or the one recorded here): {exc}") from None
    return head_address, secret


def driver() -> Driver:
    """This process's driver (for :mod:`actorlib.testing`)."""
    if _driver is None:
        raise ActorLibError("actorlib is not initialized: call actorlib.init() first")
    return _driver


def _summary() -> dict[str, Any]:
    rt = runtime.current()
    return {"session_dir": rt.session_dir, "node_id": rt.node_id, "namespace": rt.namespace, "job_id": rt.job_id}


def shutdown() -> None:
    """Stop every actor this driver started, its node and its head. Safe to call twice."""
    global _driver
    with _lock:
        driver, _driver = _driver, None
        if driver is None:
            return
        if runtime.current_or_none() is driver.rt:
            runtime.set_current(None)
        driver.stop()
        set_cluster_key(None)


atexit.register(shutdown)


def is_initialized() -> bool:
    return _driver is not None or (runtime.current_or_none() is not None and runtime.current().mode == "worker")


def get(refs: ObjectRef | Sequence[ObjectRef], *, timeout: float | None = None) -> Any:
    """The value of a ref (or a list of values), waiting at most ``timeout`` seconds in all."""
    rt = runtime.current()
    if isinstance(refs, ObjectRef):
        _check_timeout("get", timeout)
        if not refs.done():
            rt.check_can_block()
        return refs._result(timeout)
    if isinstance(refs, ObjectRefGenerator):
        raise TypeError("get() takes ObjectRefs; iterate over an ObjectRefGenerator to get its items' refs")
    if not isinstance(refs, list | tuple):
        if inspect.iscoroutine(refs):
            refs.close()  # (never awaited: no warning on top of this error)
            raise TypeError(
                "get() takes ObjectRefs, not a coroutine: await it in async code; for a placement group's "
                "ready(), use pg.wait(timeout_seconds=...)"
            )
        raise TypeError(f"get() takes an ObjectRef or a list of them, not {type(refs).__name__}")
    for r in refs:
        if not isinstance(r, ObjectRef):
            raise TypeError(f"get() takes ObjectRefs, not {type(r).__name__}")
    _check_timeout("get", timeout)
    deadline = None if timeout is None else time.monotonic() + timeout  # for the whole call
    pending_refs = [r for r in refs if not r.done()]
    pending = [r._fut for r in pending_refs]
    if pending:
        rt.check_can_block()
    if pending and not any(failed(r._fut) for r in refs):
        left = wait_reading(pending_refs, timeout)  # this thread reads the answers itself where it can
        wait_for(pending, len(pending), left, stop=failed)  # one wake-up for the whole list; a failure ends it
        if timeout is not None and not all(f.done() for f in pending) and not any(failed(f) for f in pending):
            late = sum(1 for f in pending if not f.done())
            raise GetTimeoutError(f"{late} of {len(refs)} results did not finish within {timeout} s")
    out = []  # in order: a failed ref's error once the refs before it are done (within what is left of timeout)
    for r in refs:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        out.append(r._result(left, timeout))
    return out


def _check_timeout(what: str, timeout: Any) -> None:
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout >= 0):
        raise ValueError(f"{what}() timeout must be a number of seconds >= 0 or None, not {timeout!r}")


def wait(
    refs: Sequence[ObjectRef], *, num_returns: int = 1, timeout: float | None = None
) -> tuple[list[ObjectRef], list[ObjectRef]]:
    """Wait until ``num_returns`` refs are done or ``timeout`` passes: ``(ready, not_ready)`` in order."""
    if isinstance(refs, ObjectRef | ObjectRefGenerator | str | bytes) or not isinstance(refs, Iterable):
        raise TypeError(f"wait() takes a list of ObjectRefs, not {type(refs).__name__}")
    refs = list(refs)
    if not refs:
        return [], []  # (as Ray's: whatever num_returns says)
    for r in refs:
        if not isinstance(r, ObjectRef):
            raise TypeError(f"wait() takes ObjectRefs, not {type(r).__name__}")
    if len({id(r) for r in refs}) != len(refs):
        raise ValueError("wait() got the same ObjectRef twice")
    if isinstance(num_returns, bool) or not isinstance(num_returns, int) or not 0 <= num_returns <= len(refs):
        raise ValueError(f"num_returns must be a whole number between 0 and {len(refs)}, not {num_returns!r}")
    _check_timeout("wait", timeout)
    pending = [r._fut for r in refs if not r.done()]
    needed = num_returns - (len(refs) - len(pending))
    if needed > 0:
        runtime.current().check_can_block()
        wait_for(pending, needed, timeout)
    ready = [r for r in refs if r.done()][: max(num_returns, 0)]
    chosen = {id(r) for r in ready}
    return ready, [r for r in refs if id(r) not in chosen]


def cancel(ref: ObjectRef) -> None:
    """Cancel a call: a queued one never runs; a running async one gets ``CancelledError``.

    Its ``get`` then raises :class:`TaskCancelledError`. A sync method already
    running cannot be interrupted and finishes normally.
    """
    if isinstance(ref, ObjectRefGenerator):
        ref.close()
        return
    if not isinstance(ref, ObjectRef):
        raise TypeError(f"cancel() takes an ObjectRef, not {type(ref).__name__}")
    cancel = ref._cancel  # (let go of once the call is done)
    if cancel is not None and not ref.done():
        runtime.current().call_soon(cancel)


def kill(actor: ActorHandle) -> None:
    """Kill the actor's process now, and return once it is gone; its pending and later calls fail with
    :class:`ActorDiedError`."""
    if not isinstance(actor, ActorHandle):
        raise TypeError(f"kill() takes an actor handle, not {type(actor).__name__}")
    rt = runtime.current()
    rt.run(rt.kill_actor(actor._actor_id))


def get_actor(name: str, namespace: str | None = None) -> ActorHandle:
    """The handle of the live actor called ``name`` (in this driver's namespace by default)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"actor name must be a non-empty string, not {name!r}")
    if namespace is not None and (not isinstance(namespace, str) or not namespace):
        raise ValueError(f"namespace must be a non-empty string or None, not {namespace!r}")
    rt = runtime.current()
    info = rt.run(rt.control("get_actor", name=name, namespace=namespace or rt.namespace))
    return ActorHandle(info["actor_id"], info["class_name"], info["methods"], info["name"], info["namespace"])


def nodes() -> list[dict[str, Any]]:
    """Every node: ``node_id``, ``alive``, ``address``, ``resources`` (totals) and ``available``."""
    rt = runtime.current()
    return rt.run(rt.control("nodes"))


def cluster_resources() -> dict[str, float]:
    rt = runtime.current()
    return rt.run(rt.control("cluster_resources"))


def available_resources() -> dict[str, float]:
    rt = runtime.current()
    return rt.run(rt.control("available_resources"))
