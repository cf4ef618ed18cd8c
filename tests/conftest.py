"""Fixtures that own what they start: a cluster per module, and a check that no process is left (actorlib.testing)."""

from __future__ import annotations

import os
import sys
import time

import pytest

import actorlib
from actorlib.testing import assert_no_leaks, descendants, local_cluster

pytest_plugins = ["actorlib.testing", "pytester"]
__all__ = ["ROOT_DIR", "alive", "assert_no_leaks", "descendants", "local_cluster", "wait_for"]

ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def cpu_seconds(pid: int) -> float:
    """CPU time a process's live threads have run so far, to the nanosecond (``/proc/<pid>/stat`` counts in
    clock ticks of 10 ms, too coarse to tell a few hundred calls apart)."""
    total, read = 0, 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
            read += 1
        except FileNotFoundError:  # the thread ended meanwhile (or no schedstat here: see below)
            pass
    if read:
        return total / 1e9
    with open(f"/proc/{pid}/stat") as f:  # a kernel without schedstat: clock ticks it is
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for(condition, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="module")
def cluster():
    """An embedded cluster with 4 CPUs and 4 logical GPUs, shared by a test module."""
    with local_cluster(num_cpus=4, num_gpus=4) as al:
        yield al


@pytest.fixture
def fresh():
    """No cluster running before or after the test; the test calls init() itself."""
    actorlib.shutdown()
    yield actorlib
    actorlib.shutdown()
    assert_no_leaks()


def pytest_collection_finish(session):
    """No test module may import ipykernel into this process (see test_jupyter.py): the runtime would take
    itself for a notebook kernel's in every test."""
    assert "ipykernel" not in sys.modules, "a test module imported ipykernel at collection"
