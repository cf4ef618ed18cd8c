"""Fixtures that own what they start: a cluster per module, and a check that no process is left."""

from __future__ import annotations

import contextlib
import os
import time

import pytest

import actorlib

ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def descendants(pid: int | None = None) -> set[int]:
    """Every living descendant of ``pid`` (default: this process), read from /proc."""
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
        if fields[0] == "Z":
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(condition, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def assert_no_descendants(timeout: float = 10.0) -> None:
    wait_for(lambda: not descendants(), timeout, what=f"child processes {sorted(descendants())} to exit")


@contextlib.contextmanager
def running(**init_kwargs):
    """actorlib initialised for the block; afterwards shut down, and no process left."""
    actorlib.init(**init_kwargs)
    try:
        yield actorlib
    finally:
        actorlib.shutdown()
        assert_no_descendants()


@pytest.fixture(scope="module")
def cluster():
    """An embedded cluster with 4 CPUs and 4 logical GPUs, shared by a test module."""
    with running(num_cpus=4, num_gpus=4) as al:
        yield al


@pytest.fixture
def fresh():
    """No cluster running before or after the test; the test calls init() itself."""
    actorlib.shutdown()
    yield actorlib
    actorlib.shutdown()
    assert_no_descendants()
