"""Testing code that uses actorlib: clusters on one machine, leak checks, and a pytest plugin.

Helpers (no pytest needed)::

    with actorlib.testing.local_cluster(num_gpus=4) as al:   # init(), then shutdown() and a leak check
        node = actorlib.testing.add_node(num_gpus=2, resources={"trainer": 1})

The pytest plugin: put ``pytest_plugins = ["actorlib.testing"]`` in your
``conftest.py`` and use its fixtures::

    @pytest.mark.actorlib(num_gpus=8)              # init() arguments; default: 4 CPUs, 4 logical GPUs
    def test_tp(actorlib_cluster):
        ...                                        # actorlib is initialised here

    @pytest.mark.actorlib_nodes([{"num_gpus": 2}, {"num_gpus": 2, "resources": {"big": 1}}])
    def test_spread(actorlib_multinode):
        actorlib_multinode.node_ids                # the extra nodes, each a node agent process

Each fixture starts the cluster before the test and, after it, shuts it down,
waits (bounded) for every process the test started to exit, and fails the
test naming any process left running (then kills it). A test that runs longer
than ``@pytest.mark.actorlib_timeout(seconds)`` (default 120 s) fails with
its stack instead of hanging the run.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from . import api

__all__ = [
    "DeadlineExceeded",
    "ProcessLeakError",
    "add_node",
    "assert_no_leaks",
    "descendants",
    "local_cluster",
    "remove_node",
]

DEFAULT_CLUSTER: dict[str, Any] = {"num_cpus": 4, "num_gpus": 4}
DEFAULT_TIMEOUT = 120.0
LEAK_TIMEOUT = 15.0


class ProcessLeakError(AssertionError):
    """Processes started during a test were still running after it."""


def add_node(*, num_cpus: float | None = None, num_gpus: int | None = None, resources: dict[str, float] | None = None) -> str:
    """Start another node agent on this machine, joined to the embedded head; returns its node id.

    Each node declares its own resources, so placement across several nodes
    can be tested on one machine. The node dies with the driver.
    """
    return api.driver().add_node(num_cpus, num_gpus, resources)


def remove_node(node_id: str) -> None:
    """Stop a node started by :func:`add_node`; its workers die with it."""
    api.driver().remove_node(node_id)


def descendants(pid: int | None = None) -> set[int]:
    """Every living descendant of ``pid`` (default: this process), read from /proc; zombies excluded."""
    root = os.getpid() if pid is None else pid
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry))
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def assert_no_leaks(before: set[int] | None = None, timeout: float = LEAK_TIMEOUT, kill: bool = True) -> None:
    """Wait (at most ``timeout``) until this process has no descendants but ``before``; else raise, naming them.

    With ``kill``, what is left is killed after the check, so one leak does not spill into the next test.
    """
    keep = before or set()
    deadline = time.monotonic() + timeout
    while True:
        left = descendants() - keep
        if not left:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    described = ", ".join(f"{pid} ({_cmdline(pid)})" for pid in sorted(left))
    if kill:
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    raise ProcessLeakError(f"{len(left)} process(es) still running {timeout:g} s after the test: {described}")


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:120]
    except OSError:
        return "?"


@contextlib.contextmanager
def local_cluster(leak_timeout: float = LEAK_TIMEOUT, **init_kwargs: Any) -> Iterator[Any]:
    """``actorlib.init(**init_kwargs)`` for the block; then ``shutdown()`` and :func:`assert_no_leaks`."""
    import actorlib

    before = descendants()
    actorlib.init(**init_kwargs)
    try:
        yield actorlib
    finally:
        actorlib.shutdown()
        assert_no_leaks(before, timeout=leak_timeout)


@dataclass
class MultiNode:
    """What ``actorlib_multinode`` yields: the initialised module and the extra nodes' ids."""

    actorlib: Any
    head_node_id: str
    node_ids: list[str] = field(default_factory=list)


class DeadlineExceeded(BaseException):
    """A test ran longer than its ``actorlib_timeout``. Not an ``Exception``: a test's ``except Exception``
    (or actorlib's own handling of a ``TimeoutError``) must not swallow it."""


@contextlib.contextmanager
def _deadline(seconds: float, what: str) -> Iterator[None]:
    """Fail the running test with its stack if it takes longer than ``seconds`` (main thread, Unix).

    The alarm fires again every few seconds until the test ends (in case something caught it anyway).
    """
    if seconds <= 0 or not hasattr(signal, "setitimer"):
        yield
        return
    message = f"{what} took longer than {seconds:g} s (actorlib_timeout)"
    fired: list[bool] = []

    def expired(signum: int, frame: Any) -> None:
        if not fired:
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        fired.append(True)
        raise DeadlineExceeded(message)

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds, 5.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


try:
    import pytest
except ImportError:  # the helpers above work without pytest
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    def pytest_addoption(parser: Any) -> None:
        parser.addini("actorlib_leak_timeout", f"seconds to wait for a test's processes to exit (default {LEAK_TIMEOUT:g})", default=None)

    def pytest_configure(config: Any) -> None:
        config.addinivalue_line("markers", "actorlib(**init_kwargs): arguments for actorlib.init() in actorlib fixtures")
        config.addinivalue_line("markers", "actorlib_nodes(nodes): extra nodes for actorlib_multinode, a list of dicts")
        config.addinivalue_line("markers", "actorlib_timeout(seconds): fail a test using an actorlib fixture after this long")

    def _leak_timeout(request: Any) -> float:
        value = request.config.getini("actorlib_leak_timeout")
        return float(value) if value else LEAK_TIMEOUT

    def _marked(request: Any, name: str, default: Any) -> Any:
        marker = request.node.get_closest_marker(name)
        if marker is None:
            return default
        return marker.args[0] if marker.args else marker.kwargs

    @pytest.fixture
    def actorlib_cluster(request: Any) -> Iterator[Any]:
        """An embedded cluster on this machine (``@pytest.mark.actorlib(**init)``; default 4 CPUs, 4 logical GPUs)."""
        init = {**DEFAULT_CLUSTER, **_marked(request, "actorlib", {})}
        timeout = float(_marked(request, "actorlib_timeout", DEFAULT_TIMEOUT))
        with local_cluster(leak_timeout=_leak_timeout(request), **init) as al, _deadline(timeout, request.node.nodeid):
            yield al

    @pytest.fixture
    def actorlib_multinode(request: Any) -> Iterator[MultiNode]:
        """The head's node plus one node agent process per ``@pytest.mark.actorlib_nodes([...])`` entry (default: two)."""
        init = {**DEFAULT_CLUSTER, **_marked(request, "actorlib", {})}
        nodes = _marked(request, "actorlib_nodes", [{"num_cpus": 2, "num_gpus": 2}, {"num_cpus": 2, "num_gpus": 2}])
        if not isinstance(nodes, list) or not all(isinstance(n, dict) for n in nodes):
            raise TypeError(f"@pytest.mark.actorlib_nodes takes a list of dicts (add_node arguments), not {nodes!r}")
        timeout = float(_marked(request, "actorlib_timeout", DEFAULT_TIMEOUT))
        with local_cluster(leak_timeout=_leak_timeout(request), **init) as al, _deadline(timeout, request.node.nodeid):
            head = al.get_runtime_context().get_node_id()
            yield MultiNode(al, head, [add_node(**n) for n in nodes])
