"""The resource model and the placement strategies, in one process (no sockets)."""

import pytest

from scheduler.placement import infeasibility, place, validate_bundles
from scheduler.resources import NodePool, node_resources, normalize_demand


def test_whole_gpus_take_lowest_free_ids_and_come_back():
    pool = NodePool({"CPU": 4, "GPU": 4})
    a = pool.reserve({"GPU": 2})
    b = pool.reserve({"GPU": 1})
    assert a.gpu_ids == ["0", "1"] and b.gpu_ids == ["2"]
    assert pool.reserve({"GPU": 2}) is None
    pool.release(a)
    assert pool.reserve({"GPU": 1}).gpu_ids == ["0"]


def test_fractional_gpus_pack_onto_the_most_used_device():
    pool = NodePool({"GPU": 2})
    first = pool.reserve({"GPU": 0.5})
    second = pool.reserve({"GPU": 0.25})
    third = pool.reserve({"GPU": 0.25})
    assert first.gpu_ids == second.gpu_ids == third.gpu_ids == ["0"]
    assert pool.reserve({"GPU": 0.5}).gpu_ids == ["1"]
    assert pool.reserve({"GPU": 1}) is None  # no whole GPU left
    pool.release(first)
    assert pool.reserve({"GPU": 0.5}).gpu_ids == ["0"]


def test_fractions_are_exact():
    pool = NodePool({"CPU": 1})
    allocs = [pool.reserve({"CPU": 0.1}) for _ in range(10)]
    assert all(allocs) and pool.reserve({"CPU": 0.1}) is None
    for a in allocs:
        pool.release(a)
    assert pool.free == pool.total


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_cpus": -1}, "num_cpus"),
        ({"num_gpus": float("nan")}, "num_gpus"),
        ({"num_gpus": 1.5}, "whole number"),
        ({"resources": {"x": "1"}}, r"resources\['x'\]"),
        ({"resources": {"GPU": 1}}, "num_gpus"),
        ({"num_cpus": 0.00001}, "finer"),
    ],
)
def test_bad_demands_name_the_bad_part(kwargs, match):
    with pytest.raises(ValueError, match=match):
        normalize_demand(**kwargs)


def test_node_gpus_from_cuda_visible_devices_or_declared(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    totals, ids = node_resources(2, None, None)
    assert totals["GPU"] == 2 and ids == ["3", "5"]
    assert NodePool(totals, ids).reserve({"GPU": 1}).gpu_ids == ["3"]
    assert node_resources(2, 1, None)[1] == ["3"]
    assert node_resources(2, 4, None)[1] == ["0", "1", "2", "3"]  # more than visible: logical ids
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert node_resources(1, None, None)[1] == []
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert node_resources(1, 8, {"x": 2})[0] == {"CPU": 1.0, "GPU": 8.0, "x": 2}


def pools(*specs):
    return {f"n{i}": NodePool(spec) for i, spec in enumerate(specs)}


def nodes_of(placed):
    return [node for node, _ in placed]


@pytest.mark.parametrize("n_nodes", [1, 2, 3])
def test_strict_pack_puts_everything_on_one_node(n_nodes):
    p = pools(*[{"CPU": 4, "GPU": 4}] * n_nodes)
    placed, _ = place("STRICT_PACK", [{"GPU": 1}] * 4, p)
    assert nodes_of(placed) == ["n0"] * 4
    assert [a.gpu_ids for _, a in placed] == [["0"], ["1"], ["2"], ["3"]]
    placed, why = place("STRICT_PACK", [{"GPU": 1}] * 4, p)
    if n_nodes == 1:
        assert placed is None and "lacks" in why
    else:
        assert nodes_of(placed) == ["n1"] * 4
    # two GPUs free on each of two nodes: enough in all, but not on one node
    p = pools(*[{"GPU": 2}] * max(n_nodes, 2))
    placed, why = place("STRICT_PACK", [{"GPU": 1}] * 3, p)
    assert placed is None and "no single node" in why


@pytest.mark.parametrize("n_nodes", [1, 2, 3])
def test_pack_prefers_one_node_then_fills_greedily(n_nodes):
    p = pools(*[{"CPU": 2}] * n_nodes)
    placed, why = place("PACK", [{"CPU": 1}] * 3, p)
    if n_nodes == 1:
        assert placed is None and "lacks" in why
        assert p["n0"].free == {"CPU": 20000}  # all or nothing
    else:
        assert sorted(nodes_of(placed)) == ["n0", "n0", "n1"]


@pytest.mark.parametrize("n_nodes", [1, 2, 3])
def test_spread_uses_distinct_nodes_when_it_can(n_nodes):
    p = pools(*[{"CPU": 4}] * n_nodes)
    placed, _ = place("SPREAD", [{"CPU": 1}] * 3, p)
    assert len(set(nodes_of(placed))) == n_nodes


@pytest.mark.parametrize("n_nodes", [1, 2, 3])
def test_strict_spread_needs_a_node_per_bundle(n_nodes):
    p = pools(*[{"CPU": 4}] * n_nodes)
    placed, why = place("STRICT_SPREAD", [{"CPU": 1}] * 3, p)
    if n_nodes < 3:
        assert placed is None and "needs 3 nodes" in why
        assert infeasibility("STRICT_SPREAD", [{"CPU": 1}] * 3, p) is not None
    else:
        assert sorted(nodes_of(placed)) == ["n0", "n1", "n2"]


def test_strict_spread_finds_a_node_per_bundle_whenever_there_is_a_choice():
    """Taking the first node that fits, bundle by bundle, gives the GPU node to the CPU bundle, and then the
    GPU bundle has nowhere to go: the group was called infeasible, for good, though it fits."""
    bundles = [{"CPU": 1}, {"GPU": 1}]
    assert infeasibility("STRICT_SPREAD", bundles, pools({"CPU": 2, "GPU": 1}, {"CPU": 2})) is None
    p = pools({"CPU": 2, "GPU": 1}, {"CPU": 2})
    placed, why = place("STRICT_SPREAD", bundles, p)
    assert nodes_of(placed) == ["n1", "n0"] and placed[1][1].gpu_ids == ["0"], why
    assert p["n0"].free["GPU"] == 0 and p["n1"].free["CPU"] == 10000
    p = pools({"CPU": 1}, {"CPU": 1, "tpu": 1}, {"tpu": 1})  # three bundles, each fitting two of three nodes
    placed, _ = place("STRICT_SPREAD", [{"tpu": 1}, {"CPU": 1}, {"CPU": 1}], p)
    assert sorted(nodes_of(placed)) == ["n0", "n1", "n2"] and nodes_of(placed)[0] in ("n1", "n2")


@pytest.mark.parametrize("strategy", ["PACK", "SPREAD"])
def test_pack_and_spread_find_a_fit_the_fill_in_bundle_order_misses(strategy):
    """Nodes of 3 and 2 CPUs, bundles of 2 then 3: filling in bundle order puts the 2 on the 3-CPU node, and
    then the 3 fits nowhere; the group was called infeasible, for good, though it fits."""
    bundles = [{"CPU": 2}, {"CPU": 3}]
    assert infeasibility(strategy, bundles, pools({"CPU": 3}, {"CPU": 2})) is None
    p = pools({"CPU": 3}, {"CPU": 2})
    placed, why = place(strategy, bundles, p)
    assert nodes_of(placed) == ["n1", "n0"], why
    assert p["n0"].free["CPU"] == 0 and p["n1"].free["CPU"] == 0
    p = pools({"GPU": 2}, {"GPU": 1})  # bundle order kept for GPU ids: bundle 0 and 1 share node 0 lowest-first
    placed, _ = place(strategy, [{"GPU": 1}, {"GPU": 1}, {"GPU": 1}], p)
    assert sorted(nodes_of(placed)) == ["n0", "n0", "n1"]
    placed, why = place(strategy, [{"CPU": 4}], pools({"CPU": 3}, {"CPU": 2}))
    assert placed is None and "do not fit" in why
    # 64 one-GPU nodes, the first also "big"; the fill puts a plain bundle there, the last needs it. The
    # search's bound counted every node tried, full ones too, and gave up before this first-try fit
    p = pools({"GPU": 1, "big": 1}, *[{"GPU": 1}] * 63)
    placed, why = place(strategy, [{"GPU": 1}] * 63 + [{"GPU": 1, "big": 1}], p)
    assert placed is not None and nodes_of(placed)[-1] == "n0", why


def test_infeasible_versus_waiting():
    p = pools({"GPU": 2}, {"GPU": 2})
    assert place("STRICT_PACK", [{"GPU": 1}] * 2, p)[0] is not None
    # now busy, but it could fit on an empty cluster: waiting, not infeasible
    assert place("STRICT_PACK", [{"GPU": 1}] * 2, p)[0] is not None
    assert place("STRICT_PACK", [{"GPU": 1}] * 2, p)[0] is None
    assert infeasibility("STRICT_PACK", [{"GPU": 1}] * 2, p) is None
    never = infeasibility("STRICT_PACK", [{"GPU": 1}] * 3, p)
    assert never and "no single node" in never


@pytest.mark.parametrize(
    "bundles, strategy, match",
    [
        ([], "PACK", "non-empty"),
        ([{}], "PACK", "bundle 0"),
        ([{"CPU": 0}], "PACK", "asks for nothing"),
        ([{"GPU": -1}], "PACK", "bundle 0"),
        ([{"CPU": 1}], "TIGHT", "strategy"),
        ("CPU", "PACK", "non-empty list"),
    ],
)
def test_bad_bundles(bundles, strategy, match):
    with pytest.raises(ValueError, match=match):
        validate_bundles(bundles, strategy)
