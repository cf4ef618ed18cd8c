"""Worker groups end to end: layouts, dispatch modes, tied groups, environment, shutdown."""

import os
import time

import pytest

from actorlib import MultiWorkerFuture, NamedSharding, VirtualCluster, WorkerGroup
from actorlib.exceptions import PlacementGroupError

from .conftest import descendants, local_cluster, wait_for


class Plain:
    """A worker: records what it was given."""

    def __init__(self, tag, bundle_indices=None):
        self.tag = tag
        self.bundle_indices = bundle_indices

    def whoami(self):
        return int(os.environ["RANK"]), self.tag, self.bundle_indices

    def echo(self, *args, **kwargs):
        return int(os.environ["RANK"]), args, kwargs

    def env(self):
        keys = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "CUDA_VISIBLE_DEVICES"]
        return {k: os.environ.get(k) for k in keys}

    def count(self, n):
        rank = int(os.environ["RANK"])
        for i in range(n):
            yield (rank, i)

    def pid(self):
        return os.getpid()

    def getenv(self, names):
        return [os.environ.get(n) for n in names]

    def cleanup(self):
        with open(os.path.join(os.environ["CLEANUP_DIR"], f"clean-{os.environ['RANK']}"), "w") as f:
            f.write("ok")

    def hang(self):
        time.sleep(60)

    def all_reduce(self):
        import torch
        import torch.distributed as dist

        dist.init_process_group("gloo")
        t = torch.tensor([float(dist.get_rank() + 1)])
        dist.all_reduce(t)
        out = (dist.get_rank(), dist.get_world_size(), t.item())
        dist.destroy_process_group()
        return out


@pytest.fixture(scope="module")
def al():
    with local_cluster(num_cpus=4, num_gpus=16) as actorlib:
        yield actorlib


@pytest.fixture(scope="module")
def g2x2(al):
    cluster = VirtualCluster([2, 2], use_gpus=True, num_gpus_per_node=4, name="c2x2")
    group = WorkerGroup(cluster, Plain, "t", sharding_annotations=NamedSharding([[0, 1], [2, 3]], ["dp", "tp"]), name_prefix="p")
    yield group
    group.shutdown(force=True)
    cluster.shutdown()


def test_environment_and_gloo_all_reduce_from_it(al):
    cluster = VirtualCluster([2, 2], use_gpus=True, num_gpus_per_node=4)
    group = WorkerGroup(cluster, Plain, "t")
    try:
        envs = al.get(group.run_all_workers_single_data("env"), timeout=60)
        assert [e["RANK"] for e in envs] == ["0", "1", "2", "3"]
        assert [e["LOCAL_RANK"] for e in envs] == ["0", "1", "0", "1"]
        assert [e["NODE_RANK"] for e in envs] == ["0", "0", "1", "1"]
        assert {e["WORLD_SIZE"] for e in envs} == {"4"} and {e["MASTER_ADDR"] for e in envs} == {"127.0.0.1"}
        assert len({e["MASTER_PORT"] for e in envs}) == 1
        assert sorted(e["CUDA_VISIBLE_DEVICES"] for e in envs) == ["0", "1", "2", "3"]
        assert [m["gpu_ids"] for m in group.worker_metadata] == [[e["CUDA_VISIBLE_DEVICES"]] for e in envs]
        results = al.get(group.run_all_workers_single_data("all_reduce"), timeout=120)
        assert results == [(r, 4, 10.0) for r in range(4)]
    finally:
        assert group.shutdown(force=True)
        cluster.shutdown()


def test_single_and_multiple_data_dispatch_2x2(al, g2x2):
    assert al.get(g2x2.run_single_worker_single_data("echo", 2, "x", k=1), timeout=30) == (2, ("x",), {"k": 1})
    refs = g2x2.run_all_workers_single_data("echo", 5, k=6)
    assert al.get(refs, timeout=30) == [(r, (5,), {"k": 6}) for r in range(4)]
    refs = g2x2.run_all_workers_single_data("echo", 1, run_rank_0_only_axes=["tp"])
    assert [r[0] for r in al.get(refs, timeout=30)] == [0, 2]
    refs = g2x2.run_all_workers_multiple_data("echo", ["a", "b", "c", "d"], k=[1, 2, 3, 4], common_kwargs={"c": 0})
    assert al.get(refs, timeout=30) == [(r, ("abcd"[r],), {"k": r + 1, "c": 0}) for r in range(4)]
    refs = g2x2.run_all_workers_multiple_data("echo", ["a", "b"], run_rank_0_only_axes=["tp"])
    assert al.get(refs, timeout=30) == [(0, ("a",), {}), (2, ("b",), {})]


def test_sharded_dispatch_and_dedup_2x2(al, g2x2):
    mwf = g2x2.run_all_workers_sharded_data(
        "echo", ["d0", "d1"], in_sharded_axes=["dp"], replicate_on_axes=["tp"], output_is_replicated=["tp"], batch=[10, 11]
    )
    assert isinstance(mwf, MultiWorkerFuture) and mwf.called_workers == [0, 1, 2, 3] and mwf.return_from_workers == [0, 2]
    assert g2x2.get_all_worker_results(mwf, timeout=30) == [(0, ("d0",), {"batch": 10}), (2, ("d1",), {"batch": 11})]
    # tp free: only tp=0 is called; with dummy calls the others get None
    mwf = g2x2.run_all_workers_sharded_data("echo", ["d0", "d1"], in_sharded_axes=["dp"])
    assert mwf.called_workers == [0, 2] and g2x2.get_all_worker_results(mwf, timeout=30) == [(0, ("d0",), {}), (2, ("d1",), {})]
    mwf = g2x2.run_all_workers_sharded_data("echo", ["d0", "d1"], in_sharded_axes=["dp"], make_dummy_calls_to_free_axes=True)
    assert mwf.called_workers == [0, 1, 2, 3] and mwf.return_from_workers == [0, 2]
    assert [r[1] for r in al.get(mwf.futures, timeout=30)] == [("d0",), (None,), ("d1",), (None,)]
    # nested over both axes
    mwf = g2x2.run_all_workers_sharded_data("echo", [["a", "b"], ["c", "d"]], in_sharded_axes=["dp", "tp"])
    assert [r[1][0] for r in g2x2.get_all_worker_results(mwf, timeout=30)] == ["a", "b", "c", "d"]


def test_sharded_dispatch_2x2x2(al):
    cluster = VirtualCluster([8], use_gpus=True, num_gpus_per_node=8, placement_timeout=30)
    layout = [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]
    group = WorkerGroup(cluster, Plain, "t", sharding_annotations=NamedSharding(layout, ["dp", "pp", "tp"]))
    try:
        mwf = group.run_all_workers_sharded_data(
            "echo",
            [["x00", "x01"], ["x10", "x11"]],
            in_sharded_axes=["dp", "pp"],
            replicate_on_axes=["tp"],
            output_is_replicated=["tp"],
        )
        assert mwf.called_workers == list(range(8)) and mwf.return_from_workers == [0, 2, 4, 6]
        assert [(r[0], r[1][0]) for r in group.get_all_worker_results(mwf, timeout=30)] == [
            (0, "x00"),
            (2, "x01"),
            (4, "x10"),
            (6, "x11"),
        ]
        mwf = group.run_all_workers_sharded_data("echo", ["a", "b"], in_sharded_axes=["dp"], replicate_on_axes=["tp"])
        assert mwf.called_workers == [0, 1, 4, 5] and mwf.return_from_workers == [0, 1, 4, 5]
        refs = group.run_all_workers_single_data("echo", run_rank_0_only_axes=["pp", "tp"])
        assert [r[0] for r in al.get(refs, timeout=30)] == [0, 4]
    finally:
        group.shutdown(force=True)
        cluster.shutdown()


def test_generators_stream_through_the_group(al, g2x2):
    mwf = g2x2.run_all_workers_sharded_data(
        "count", [2, 3], in_sharded_axes=["dp"], replicate_on_axes=["tp"], output_is_replicated=["tp"]
    )
    assert g2x2.get_all_worker_results(mwf, timeout=30) == [(0, 0), (0, 1), (2, 0), (2, 1), (2, 2)]
    mwf = g2x2.run_all_workers_sharded_data(
        "count", [1, 1], in_sharded_axes=["dp"], replicate_on_axes=["tp"], output_is_replicated=["tp"]
    )
    proxies = g2x2.get_all_worker_results(mwf, return_generators_as_proxies=True)
    assert len(proxies) == 2 and [al.get(r) for p in proxies for r in p] == [(0, 0), (2, 0)]


def test_tied_groups_only_leaders_get_bundle_indices(al):
    cluster = VirtualCluster([4], use_gpus=True, num_gpus_per_node=4)
    group = WorkerGroup(
        cluster, "tests.test_worker_group.Plain", "tied", bundle_indices_list=[(0, [0, 1]), (0, [2, 3])], name_prefix="gen"
    )
    try:
        assert group.dp_size == 2 and group.tied_workers_groups == [[0, 1], [2, 3]]
        assert [group.get_dp_leader_worker_idx(i) for i in range(2)] == [0, 2]
        who = al.get(group.run_all_workers_single_data("whoami"), timeout=30)
        assert who == [(0, "tied", (0, [0, 1])), (1, "tied", None), (2, "tied", (0, [2, 3])), (3, "tied", None)]
        meta = group.worker_metadata
        assert [m["name"] for m in meta] == ["gen-grp0-0", "gen-grp0-1", "gen-grp1-0", "gen-grp1-1"]
        assert [m["dp_shard_idx"] for m in meta] == [0, 0, 1, 1]
        assert al.get_actor("gen-grp1-0") == group.workers[2]
        with pytest.raises(ValueError, match="out of range"):
            group.get_dp_leader_worker_idx(2)
    finally:
        group.shutdown(force=True)
        cluster.shutdown()


def test_colocated_groups_share_gpus_fractionally(al):
    cluster = VirtualCluster([2], use_gpus=True, num_gpus_per_node=8, max_colocated_worker_groups=2)
    train = WorkerGroup(cluster, Plain, "train")
    gen = WorkerGroup(cluster, Plain, "gen")
    try:
        a = [e["CUDA_VISIBLE_DEVICES"] for e in al.get(train.run_all_workers_single_data("env"), timeout=30)]
        b = [e["CUDA_VISIBLE_DEVICES"] for e in al.get(gen.run_all_workers_single_data("env"), timeout=30)]
        assert a == b and len(set(a)) == 2
    finally:
        train.shutdown(force=True)
        gen.shutdown(force=True)
        cluster.shutdown()


def test_three_colocated_groups_and_the_class_env_vars(al):
    """1/3 of a GPU is finer than the scheduler counts: the groups failed to start. The class's own env_vars
    were dropped for the group's."""
    cluster = VirtualCluster([1], use_gpus=True, num_gpus_per_node=1, max_colocated_worker_groups=3, cpus_per_bundle=0.5)
    with_env = al.remote(env_vars={"FROM_CLASS": "yes", "BOTH": "class"})(Plain)
    groups = [WorkerGroup(cluster, with_env, str(i), env_vars={"BOTH": "group"}) for i in range(3)]
    try:
        envs = [al.get(g.run_all_workers_single_data("env"), timeout=30)[0] for g in groups]
        assert len({e["CUDA_VISIBLE_DEVICES"] for e in envs}) == 1  # one device, shared three ways
        found = al.get(groups[0].run_all_workers_single_data("getenv", ["FROM_CLASS", "BOTH"]), timeout=30)
        assert found == [["yes", "group"]]
    finally:
        for g in groups:
            g.shutdown(force=True)
        cluster.shutdown()
    cpu = VirtualCluster([2], use_gpus=False, cpus_per_bundle=1)
    try:  # plus cpus_per_bundle, as documented (it replaced the bundle's CPU)
        assert [pg.bundle_specs for pg in cpu._pgs] == [[{"CPU": 2.0}, {"CPU": 2.0}]]
    finally:
        cpu.shutdown()


def test_graceful_and_forced_shutdown_leave_nothing(al, tmp_path):
    cluster = VirtualCluster([2], use_gpus=False)
    group = WorkerGroup(cluster, Plain, "t", env_vars={"CLEANUP_DIR": str(tmp_path)})
    pids = al.get(group.run_all_workers_single_data("pid"), timeout=30)
    assert group.shutdown(cleanup_method="cleanup", timeout=30) is True
    assert sorted(os.listdir(tmp_path)) == ["clean-0", "clean-1"]
    wait_for(lambda: not set(pids) & descendants(), 10, what="workers to exit")
    group = WorkerGroup(cluster, Plain, "t")
    pids = al.get(group.run_all_workers_single_data("pid"), timeout=30)
    t0 = time.monotonic()
    assert group.shutdown(cleanup_method="hang", timeout=0.5) is False
    assert time.monotonic() - t0 < 15
    wait_for(lambda: not set(pids) & descendants(), 10, what="hung workers to be killed")
    assert group.shutdown() is True  # twice is fine
    cluster.shutdown()


def test_error_cases_raise_before_anything_is_sent(al, g2x2):
    with pytest.raises(ValueError, match="has 3 entries along axis 'dp'"):
        g2x2.run_all_workers_sharded_data("echo", [1, 2, 3], in_sharded_axes=["dp"])
    with pytest.raises(ValueError, match="unknown axis 'pp'"):
        g2x2.run_all_workers_sharded_data("echo", [1, 2], in_sharded_axes=["pp"])
    with pytest.raises(ValueError, match="both sharded and replicated"):
        g2x2.run_all_workers_sharded_data("echo", [1, 2], in_sharded_axes=["dp"], replicate_on_axes=["dp"])
    with pytest.raises(ValueError, match="has 3 entries but 4 workers"):
        g2x2.run_all_workers_multiple_data("echo", [1, 2, 3])
    with pytest.raises(ValueError, match="unknown axis"):
        g2x2.run_all_workers_single_data("echo", run_rank_0_only_axes=["xx"])
    with pytest.raises(AttributeError, match="no method 'nope'"):
        g2x2.run_all_workers_single_data("nope")
    with pytest.raises(ValueError, match="worker_idx"):
        g2x2.run_single_worker_single_data("echo", 4)
    with pytest.raises(TypeError, match="sharded axis 'dp'"):
        g2x2.run_all_workers_sharded_data("echo", 7, in_sharded_axes=["dp"])


def test_bad_group_and_cluster_arguments(al):
    with pytest.raises(ValueError, match="bundle_ct_per_node_list"):
        VirtualCluster([])
    with pytest.raises(ValueError, match="num_gpus_per_node"):
        VirtualCluster([9], num_gpus_per_node=8)
    with pytest.raises(PlacementGroupError, match="need 24 GPU in all, the cluster has 16"):
        VirtualCluster([8, 8, 8], use_gpus=True)
    assert not [p for p in al.placement_group_table().values() if p["state"] == "PENDING"]
    cluster = VirtualCluster([2], use_gpus=False)
    try:
        with pytest.raises(ValueError, match="cannot place 3 workers"):
            WorkerGroup(cluster, Plain, "t", workers_per_node=3)
        with pytest.raises(ValueError, match="used twice"):
            WorkerGroup(cluster, Plain, "t", bundle_indices_list=[(0, [0]), (0, [0])])
        with pytest.raises(ValueError, match="cover 4 ranks"):
            WorkerGroup(cluster, Plain, "t", sharding_annotations=NamedSharding([[0, 1], [2, 3]], ["dp", "tp"]))
        with pytest.raises(ValueError, match="cannot import"):
            WorkerGroup(cluster, "tests.nowhere.Plain", "t")
    finally:
        cluster.shutdown()
