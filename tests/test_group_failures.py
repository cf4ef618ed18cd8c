"""Worker groups under failure: structured reports, first failure by time, and SPMD runs restarted whole."""

from __future__ import annotations

import os
import signal
import sys

import pytest

import actorlib
from actorlib import NamedSharding, VirtualCluster, WorkerGroup
from actorlib.exceptions import GetTimeoutError
from actorlib.spmd import WorkerGroupError

from .conftest import local_cluster


class Rank:
    def rank(self):
        return int(os.environ["RANK"])

    def step(self, bad_rank):
        """Rank ``bad_rank`` raises at once; the others wait in a collective it never joins."""
        import torch
        import torch.distributed as dist

        if int(os.environ["RANK"]) == bad_rank:
            raise ZeroDivisionError(f"rank {bad_rank} divided by zero")
        if not dist.is_initialized():
            dist.init_process_group("gloo")
        dist.all_reduce(torch.ones(1))
        return int(os.environ["RANK"])


@pytest.fixture(scope="module")
def al():
    with local_cluster(num_cpus=4, num_gpus=12) as actorlib:
        yield actorlib


@pytest.fixture(scope="module")
def group(al):
    cluster = VirtualCluster([4], use_gpus=True, num_gpus_per_node=4, name="failing")
    g = WorkerGroup(cluster, Rank, sharding_annotations=NamedSharding([0, 1, 2, 3], ["dp"]))
    yield g
    g.shutdown(force=True)
    cluster.shutdown()


def test_one_failed_rank_fails_the_dispatch_with_a_report(group):
    future = group.run_all_workers_sharded_data("step", [2, 2, 2, 2], in_sharded_axes=["dp"])
    future.failure_grace_s = 1.0  # the others are stuck in all_reduce: don't wait for them long
    with pytest.raises(WorkerGroupError) as info:
        future.get_results(timeout=60)
    err = info.value
    assert err.first.rank == 2 and err.first.exception == "ZeroDivisionError: rank 2 divided by zero"
    assert err.first.pid == group.worker_metadata[2]["pid"] and err.first.node_id == group.worker_metadata[2]["node_id"]
    assert "1 of 4 workers failed this dispatch; first: rank 2" in str(err) and "divided by zero" in str(err)


def die_on(bad_rank):
    if int(os.environ["RANK"]) == bad_rank:
        os.kill(os.getpid(), signal.SIGKILL)
    return int(os.environ["RANK"])


def test_a_dead_rank_is_reported_with_its_signal(al):
    cluster = VirtualCluster([2], use_gpus=True, num_gpus_per_node=2, name="dying")
    g = WorkerGroup(cluster, Rank)
    try:
        result = g.run(die_on, 1, failure_grace_s=1.0)
        first = result.first_failure
        assert not result.ok and result.restarts == 0
        assert first.rank == 1 and first.signal == signal.SIGKILL and "its worker died" in first.exception
    finally:
        g.shutdown(force=True)
        cluster.shutdown()


def flaky_train(marker_dir):
    """Rank 1 fails on the first attempt only; every rank all-reduces its rank + 1."""
    import torch
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    first_try = not os.path.exists(os.path.join(marker_dir, "tried"))
    if rank == 1 and first_try:
        open(os.path.join(marker_dir, "tried"), "w").close()
        raise RuntimeError("lost a GPU")
    dist.init_process_group("gloo")
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    dist.destroy_process_group()
    return rank, t.item(), os.getpid()


def test_run_restarts_the_whole_group_after_a_failure(al, tmp_path):
    cluster = VirtualCluster([3], use_gpus=True, num_gpus_per_node=3, name="spmd")
    g = WorkerGroup(cluster, Rank)
    try:
        before = [m["pid"] for m in g.worker_metadata]
        result = g.run(flaky_train, str(tmp_path), max_restarts=2, failure_grace_s=1.0)
        assert result.ok and result.restarts == 1
        assert [r[:2] for r in result.return_values] == [(0, 6.0), (1, 6.0), (2, 6.0)]
        assert not {r[2] for r in result.return_values} & set(before)  # fresh processes: a new collective group
        (failed,) = [f for f in result.history[0] if f.exception and "RuntimeError" in f.exception]
        assert failed.rank == 1 and failed.pid == before[1]
    finally:
        g.shutdown(force=True)
        cluster.shutdown()


def test_run_a_command_line_and_give_up_after_max_restarts(al, tmp_path):
    cluster = VirtualCluster([2], use_gpus=True, num_gpus_per_node=2, name="cmd")
    g = WorkerGroup(cluster, Rank)
    try:
        ok = g.run([sys.executable, "-c", "import os, sys; sys.exit(0 if os.environ['WORLD_SIZE'] == '2' else 3)"])
        assert ok.ok and ok.return_values == [0, 0]
        script = "import os, sys; r = int(os.environ['RANK']); print('oops', r, file=sys.stderr); sys.exit(7 if r else 0)"
        bad = g.run([sys.executable, "-c", script], max_restarts=1, failure_grace_s=1.0)
        assert not bad.ok and bad.restarts == 1 and len(bad.history) == 1
        first = bad.first_failure
        assert first.rank == 1 and first.exit_code == 7 and "exited with code 7" in first.exception
        with pytest.raises(WorkerGroupError, match="first: rank 1"):
            bad.raise_on_failure()
    finally:
        g.shutdown(force=True)
        cluster.shutdown()


class Streamer:
    def stream(self, bad_rank):
        """Rank ``bad_rank`` raises after its first item; the others stay stuck (as in a collective it never joins)."""
        import time

        yield int(os.environ["RANK"])
        if int(os.environ["RANK"]) == bad_rank:
            raise ValueError(f"rank {bad_rank} gave up")
        time.sleep(600)
        yield -1


def hang_unless(good_rank):
    """Rank ``good_rank`` returns; rank 0 (if not good) raises; every other rank hangs."""
    import time

    rank = int(os.environ["RANK"])
    if rank == good_rank:
        return rank
    if rank == 0:
        raise RuntimeError("rank 0 failed")
    time.sleep(600)


def rank_of():
    return int(os.environ["RANK"])


def unsendable():
    import threading

    return threading.Lock()


@pytest.fixture
def pair(al):
    cluster = VirtualCluster([2], use_gpus=False, name="pair")
    g = WorkerGroup(cluster, Streamer, sharding_annotations=NamedSharding([0, 1], ["dp"]))
    yield cluster, g
    g.shutdown(force=True)
    cluster.shutdown()


def test_a_failed_stream_fails_its_dispatch_without_waiting_for_the_stuck_ones(pair):
    _, g = pair
    future = g.run_all_workers_sharded_data("stream", [0, 0], in_sharded_axes=["dp"])
    future.failure_grace_s = 1.0
    with pytest.raises(WorkerGroupError) as info:
        future.get_results(timeout=60)
    assert info.value.first.rank == 0 and "rank 0 gave up" in info.value.first.exception


def test_a_failed_or_timed_out_run_leaves_the_group_usable(pair):
    """Ranks still running after the last attempt (stuck in a collective, say) would hold every later call."""
    cluster, g = pair
    failed = g.run(hang_unless, -1, failure_grace_s=1.0)  # rank 0 raises, rank 1 hangs
    assert not failed.ok and failed.first_failure.rank == 0
    assert g.run(rank_of, timeout=60).return_values == [0, 1]
    with pytest.raises(GetTimeoutError, match=r"1 of 2 workers had not answered run\(\) within 2 s: rank 1 \(pid \d+, node"):
        g.run(hang_unless, 0, timeout=2)  # rank 0 returns, rank 1 hangs
    assert g.run(rank_of, timeout=60).return_values == [0, 1]
    assert len(cluster._stores) == 1  # each restart's rendezvous store replaced the last one


def test_a_rank_whose_result_cannot_travel_is_a_failure_of_the_run(pair):
    _, g = pair
    result = g.run(unsendable, failure_grace_s=1.0)
    assert not result.ok and {f.rank for f in result.failures} == {0, 1}
    assert all("SerializationError" in f.exception for f in result.failures)


def test_axes_given_as_a_bare_string_are_refused(group):
    with pytest.raises(TypeError, match="run_rank_0_only_axes must be a list of axis names"):
        group.run_all_workers_single_data("rank", run_rank_0_only_axes="dp")
    with pytest.raises(TypeError, match="in_sharded_axes must be a list"):
        group.run_all_workers_sharded_data("step", [0, 0, 0, 0], in_sharded_axes="dp")


class Replicas:
    def long(self, n):
        """The tp=1 replicas stream far past a stream's window; only the tp=0 ones' items are returned."""
        rank = int(os.environ["RANK"])
        for i in range(n if rank % 2 else 2):
            yield (rank, i)

    def fail_mid(self, _shard):
        rank = int(os.environ["RANK"])
        yield rank
        if rank == 1:
            raise RuntimeError("rank 1 failed mid-stream")
        yield rank

    def rank(self):
        return int(os.environ["RANK"])


@pytest.fixture
def replicas(al):
    cluster = VirtualCluster([4], use_gpus=True, num_gpus_per_node=4, name="replicas")
    g = WorkerGroup(cluster, Replicas, sharding_annotations=NamedSharding([[0, 1], [2, 3]], ["dp", "tp"]))
    yield g
    g.shutdown(force=True)
    cluster.shutdown()


def test_streams_of_workers_not_returned_are_read_and_watched(replicas):
    """Only the returned workers' streams were read: the others stopped at their window (a collective
    between them hung the dispatch), and a failure among them went unseen."""
    g = replicas
    sharded = {"in_sharded_axes": ["dp"], "replicate_on_axes": ["tp"], "output_is_replicated": ["tp"]}
    future = g.run_all_workers_sharded_data("long", [3000, 3000], **sharded)
    assert future.get_results(timeout=60) == [(0, 0), (0, 1), (2, 0), (2, 1)]
    assert actorlib.get(g.run_single_worker_single_data("rank", 1), timeout=30) == 1  # its stream ended
    future = g.run_all_workers_sharded_data("fail_mid", [None, None], **sharded)
    with pytest.raises(WorkerGroupError) as info:
        future.get_results(timeout=60)
    assert info.value.first.rank == 1 and "failed mid-stream" in info.value.first.exception


class BadOnRankTwo:
    def __init__(self):
        if os.environ["RANK"] == "2":
            raise ValueError("bad config on this rank")


def test_a_worker_that_cannot_start_is_named_by_its_rank(al):
    cluster = VirtualCluster([4], use_gpus=True, num_gpus_per_node=4, name="named-errors")
    try:
        with pytest.raises(actorlib.ActorDiedError, match="rank 2 of 4: the actor's constructor raised"):
            WorkerGroup(cluster, BadOnRankTwo)
    finally:
        cluster.shutdown()
