"""Placement groups and GPU assignment end to end: 8 logical GPUs, real workers."""

import asyncio
import os

import pytest

from actorlib.exceptions import ActorDiedError, GetTimeoutError, InfeasibleError

from .conftest import local_cluster, wait_for


@pytest.fixture(scope="module")
def al():
    with local_cluster(num_cpus=4, num_gpus=8) as actorlib:
        yield actorlib


@pytest.fixture(scope="module")
def Probe(al):
    @al.remote
    class Probe:
        def gpus(self):
            return os.environ.get("CUDA_VISIBLE_DEVICES"), al.get_gpu_ids()

        def exit(self):
            os._exit(1)

    return Probe


@pytest.fixture(autouse=True)
def everything_returned(al):
    """Each test leaves the cluster as it found it: resources must all come back."""
    yield
    totals = al.cluster_resources()
    wait_for(lambda: al.available_resources() == totals, 10, what="every resource to be released")


def test_strict_pack_bundle_i_gets_gpu_i(al, Probe):
    pg = al.placement_group([{"GPU": 1, "CPU": 0.5}] * 4, strategy="STRICT_PACK")
    assert pg.wait(timeout_seconds=10) and pg.bundle_count == 4
    assert pg.bundle_specs == [{"CPU": 0.5, "GPU": 1.0}] * 4
    table = al.placement_group_table(pg)
    assert table["state"] == "CREATED" and len(set(table["bundle_nodes"])) == 1 and "pending_reason" not in table
    assert al.available_resources() == {"CPU": 2.0, "GPU": 4.0}
    actors = [Probe.options(placement_group=pg, bundle_index=i, num_gpus=1).remote() for i in range(4)]
    assert al.get([a.gpus.remote() for a in actors], timeout=60) == [(str(i), [i]) for i in range(4)]
    al.remove_placement_group(pg)


def test_fractional_bundles_share_their_gpu(al, Probe):
    pg = al.placement_group([{"GPU": 0.5}] * 4, strategy="PACK")
    assert pg.wait(10)
    assert al.placement_group_table(pg)["bundle_gpu_ids"] == [["0"], ["0"], ["1"], ["1"]]
    a, b = (Probe.options(placement_group=pg, bundle_index=0, num_gpus=0.25).remote() for _ in range(2))
    c = Probe.options(placement_group=pg, bundle_index=3, num_gpus=0.5).remote()
    assert al.get([a.gpus.remote(), b.gpus.remote(), c.gpus.remote()], timeout=60) == [("0", [0]), ("0", [0]), ("1", [1])]
    al.remove_placement_group(pg)


def test_eight_gpus_packed_by_whole_and_fractional_bundles(al, Probe):
    pg = al.placement_group([{"GPU": 1}] * 6 + [{"GPU": 0.5}] * 4, strategy="STRICT_PACK")
    assert pg.wait(10)
    assert al.placement_group_table(pg)["bundle_gpu_ids"] == [[str(i)] for i in range(6)] + [["6"], ["6"], ["7"], ["7"]]
    assert al.available_resources().get("GPU", 0) == 0
    actors = [Probe.options(placement_group=pg, bundle_index=i, num_gpus=pg.bundle_specs[i]["GPU"]).remote() for i in range(10)]
    seen = al.get([a.gpus.remote() for a in actors], timeout=60)
    assert [s[0] for s in seen] == [str(i) for i in range(6)] + ["6", "6", "7", "7"]
    al.remove_placement_group(pg)


def test_eight_gpus_packed_by_whole_and_fractional_demands(al, Probe):
    whole = [Probe.options(num_gpus=1).remote() for _ in range(6)]
    halves = [Probe.options(num_gpus=0.5).remote() for _ in range(4)]
    seen = al.get([p.gpus.remote() for p in whole + halves], timeout=60)
    assert sorted(s[0] for s in seen[:6]) == [str(i) for i in range(6)]
    assert sorted(s[0] for s in seen[6:]) == ["6", "6", "7", "7"]
    assert al.available_resources().get("GPU", 0) == 0
    for p in whole + halves:
        al.kill(p)


def test_any_bundle_with_room_and_demands_beyond_a_bundle(al, Probe):
    pg = al.placement_group([{"GPU": 1}, {"GPU": 1}], strategy="PACK")
    assert pg.wait(10)
    x = Probe.options(placement_group=pg, num_gpus=1).remote()
    y = Probe.options(placement_group=pg, bundle_index=-1, num_gpus=1).remote()
    assert sorted(al.get([x.gpus.remote(), y.gpus.remote()], timeout=60)) == [("0", [0]), ("1", [1])]
    with pytest.raises(InfeasibleError, match="bundle 0"):
        Probe.options(placement_group=pg, bundle_index=0, num_gpus=2).remote()
    with pytest.raises(ValueError, match="out of range"):
        Probe.options(placement_group=pg, bundle_index=2)
    al.remove_placement_group(pg)


def test_remove_kills_the_groups_actors_and_frees_resources(al, Probe):
    pg = al.placement_group([{"GPU": 2, "CPU": 1}], strategy="STRICT_PACK")
    assert pg.wait(10)
    a = Probe.options(placement_group=pg, bundle_index=0, num_gpus=2).remote()
    assert al.get(a.gpus.remote(), timeout=60) == ("0,1", [0, 1])
    al.remove_placement_group(pg)  # returns at once; the kill follows
    assert al.placement_group_table(pg)["state"] == "REMOVED"

    def died():
        try:
            al.get(a.gpus.remote(), timeout=30)
        except ActorDiedError as exc:
            return "placement group was removed" in str(exc)
        return False

    wait_for(died, 10, what="the group's actor to die")
    with pytest.raises(ValueError, match="removed"):
        Probe.options(placement_group=pg).remote()


def test_pending_group_and_actor_proceed_when_resources_free(al, Probe):
    big = al.placement_group([{"GPU": 1}] * 7, strategy="PACK")
    assert big.wait(10)
    waiting = al.placement_group([{"GPU": 1}] * 4, strategy="STRICT_PACK")
    assert waiting.wait(timeout_seconds=0.3) is False
    table = al.placement_group_table()[waiting.id]
    assert table["state"] == "PENDING" and table["pending_reason"].startswith("waiting for resources")
    hungry = Probe.options(num_gpus=2).remote()  # one GPU is free: it waits too
    with pytest.raises(GetTimeoutError):
        al.get(hungry.gpus.remote(), timeout=0.3)
    al.remove_placement_group(big)

    async def ready():
        return await waiting.ready()

    assert asyncio.run(asyncio.wait_for(ready(), 10)) is waiting
    assert al.placement_group_table(waiting)["bundle_gpu_ids"] == [["0"], ["1"], ["2"], ["3"]]
    assert al.get(hungry.gpus.remote(), timeout=30) == ("4,5", [4, 5])
    al.kill(hungry)
    al.remove_placement_group(waiting)


def test_accounting_after_kills_and_deaths(al, Probe):
    totals = al.cluster_resources()
    assert totals == {"CPU": 4.0, "GPU": 8.0}
    a = Probe.options(num_cpus=1, num_gpus=1).remote()
    b = Probe.options(num_cpus=2, resources=None).remote()
    al.get([a.gpus.remote(), b.gpus.remote()], timeout=60)
    assert al.available_resources() == {"CPU": 1.0, "GPU": 7.0}
    node = al.nodes()[0]
    assert node["alive"] and node["resources"] == totals and node["available"] == {"CPU": 1.0, "GPU": 7.0}
    al.kill(a)
    with pytest.raises(ActorDiedError):
        al.get(b.exit.remote(), timeout=30)
    wait_for(lambda: al.available_resources() == totals, 10, what="resources to come back")


def test_infeasible_demands_are_reported_at_once(al, Probe):
    with pytest.raises(InfeasibleError) as info:
        Probe.options(num_gpus=16, resources={"tpu": 1}).remote()
    text = str(info.value)
    assert "'GPU': 16.0" in text and "'tpu': 1" in text and "cluster totals" in text and "'GPU': 8.0" in text
    with pytest.warns(UserWarning, match="STRICT_SPREAD needs 2 nodes") as warned:
        pg = al.placement_group([{"GPU": 1}] * 2, strategy="STRICT_SPREAD")
        assert pg.wait(0.1) is False
    assert {w.filename for w in warned} == {__file__}  # the user's line, not the thread that read the answer
    assert al.placement_group_table(pg)["pending_reason"] == "infeasible: STRICT_SPREAD needs 2 nodes, the cluster has 1"
    with pytest.raises(InfeasibleError, match="its placement group .* cannot be placed .*STRICT_SPREAD needs 2 nodes"):
        Probe.options(placement_group=pg, num_gpus=1).remote()  # it would wait for that group for ever
    al.remove_placement_group(pg)


def test_bad_placement_group_arguments(al):
    with pytest.raises(ValueError, match="strategy"):
        al.placement_group([{"CPU": 1}], strategy="pack")
    with pytest.raises(ValueError, match="bundle 1"):
        al.placement_group([{"CPU": 1}, {"CPU": -2}])
    with pytest.raises(TypeError):
        al.remove_placement_group("not a group")


def test_wait_zero_answers_for_a_placed_group_and_an_empty_group_frees_at_once(al):
    totals = al.cluster_resources()
    pg = al.placement_group([{"GPU": 1, "CPU": 1}] * 2)
    assert pg.wait(30)
    assert pg.wait(0)  # placed: True, not a timeout before looking
    al.remove_placement_group(pg)
    assert al.available_resources() == totals  # no actor to wait for: served after the removal
    assert not pg.wait(0)


def test_a_get_that_times_out_on_an_actor_not_placed_yet_says_so(al, Probe):
    """It said only that the call did not finish in time: the actor was waiting for room all along."""
    pg = al.placement_group([{"GPU": 8}])  # every GPU: the actor below waits
    assert pg.wait(30)
    waiting = Probe.options(num_gpus=1).remote()
    with pytest.raises(GetTimeoutError, match=r"did not finish within 0.5 s \(the actor is not running yet: waiting for resources"):
        al.get(waiting.gpus.remote(), timeout=0.5)
    al.remove_placement_group(pg)
    assert al.get(waiting.gpus.remote(), timeout=60)[1]  # placed once there is room, the call answered
    al.kill(waiting)
