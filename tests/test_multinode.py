"""Several node agents on one machine, each a process with its own declared resources."""

import os
import subprocess
import sys
import textwrap

import pytest

import actorlib.testing

from .conftest import ROOT_DIR, descendants, local_cluster, wait_for


@pytest.fixture(scope="module")
def three_nodes():
    """The head's node (1 CPU, no GPU) and two more with 2 CPUs and 2 GPUs each; one has resource "big"."""
    with local_cluster(num_cpus=1, num_gpus=0) as al:
        a = actorlib.testing.add_node(num_cpus=2, num_gpus=2, resources={"big": 1})
        b = actorlib.testing.add_node(num_cpus=2, num_gpus=2)
        yield al, a, b


@pytest.fixture(scope="module")
def Where(three_nodes):
    al = three_nodes[0]

    @al.remote
    class Where:
        def where(self):
            return al.get_runtime_context().get_node_id(), os.environ.get("CUDA_VISIBLE_DEVICES")

    return Where


def test_nodes_register_with_their_resources(three_nodes):
    al, a, b = three_nodes
    nodes = {n["node_id"]: n for n in al.nodes()}
    assert len(nodes) == 3 and all(n["alive"] for n in nodes.values())
    assert nodes[a]["resources"] == {"CPU": 2.0, "GPU": 2.0, "big": 1.0}
    assert al.cluster_resources() == {"CPU": 5.0, "GPU": 4.0, "big": 1.0}


def where_in(al, Where, pg):
    actors = [
        Where.options(placement_group=pg, bundle_index=i, num_gpus=pg.bundle_specs[i].get("GPU", 0)).remote()
        for i in range(pg.bundle_count)
    ]
    out = al.get([w.where.remote() for w in actors], timeout=60)
    al.remove_placement_group(pg)
    return out


def test_strict_spread_over_three_nodes(three_nodes, Where):
    al = three_nodes[0]
    pg = al.placement_group([{"CPU": 1}] * 3, strategy="STRICT_SPREAD")
    assert pg.wait(10)
    nodes = al.placement_group_table(pg)["bundle_nodes"]
    assert len(set(nodes)) == 3
    assert [w[0] for w in where_in(al, Where, pg)] == nodes
    with pytest.warns(UserWarning, match="infeasible"):
        pg = al.placement_group([{"CPU": 1}] * 4, strategy="STRICT_SPREAD")
        assert not pg.wait(0.2)
    assert "needs 4 nodes" in al.placement_group_table(pg)["pending_reason"]
    al.remove_placement_group(pg)


def test_spread_and_strict_pack_of_gpus(three_nodes, Where):
    al, a, b = three_nodes
    pg = al.placement_group([{"GPU": 1}] * 2, strategy="SPREAD")
    assert pg.wait(10)
    seen = where_in(al, Where, pg)
    assert {s[0] for s in seen} == {a, b} and [s[1] for s in seen] == ["0", "0"]
    pg = al.placement_group([{"GPU": 1}] * 2, strategy="STRICT_PACK")
    assert pg.wait(10)
    seen = where_in(al, Where, pg)
    assert seen[0][0] == seen[1][0] and [s[1] for s in seen] == ["0", "1"]
    with pytest.warns(UserWarning, match="infeasible"):
        pg = al.placement_group([{"GPU": 1}] * 3, strategy="STRICT_PACK")
        assert not pg.wait(0.2)
    assert "no single node" in al.placement_group_table(pg)["pending_reason"]
    al.remove_placement_group(pg)


def test_pack_spills_over_when_one_node_is_not_enough(three_nodes, Where):
    al, a, b = three_nodes
    pg = al.placement_group([{"GPU": 1}] * 3, strategy="PACK")
    assert pg.wait(10)
    nodes = al.placement_group_table(pg)["bundle_nodes"]
    assert sorted(nodes.count(n) for n in set(nodes)) == [1, 2]
    where_in(al, Where, pg)


def test_custom_resource_places_the_actor(three_nodes, Where):
    al, a, b = three_nodes
    w = Where.options(resources={"big": 1}).remote()
    assert al.get(w.where.remote(), timeout=60)[0] == a
    al.kill(w)


def test_removed_node_takes_its_workers(three_nodes, Where):
    al, a, b = three_nodes
    extra = actorlib.testing.add_node(num_cpus=1, resources={"only_here": 1})
    w = Where.options(resources={"only_here": 1}).remote()
    assert al.get(w.where.remote(), timeout=60)[0] == extra
    before = descendants()
    actorlib.testing.remove_node(extra)
    assert len(descendants()) < len(before)
    with pytest.raises(al.ActorDiedError, match="its node was stopped|left the cluster"):
        al.get(w.where.remote(), timeout=30)
    assert extra not in {n["node_id"] for n in al.nodes() if n["alive"]}
    assert al.cluster_resources() == {"CPU": 5.0, "GPU": 4.0, "big": 1.0}


def test_killed_node_agent_is_declared_dead_at_once(tmp_path):
    """SIGKILL a node agent: its workers die with it, and the driver that started it tells the head at once
    (nodes started otherwise are found by their silence: see test_cli)."""
    script = textwrap.dedent(
        """
        import os, signal, time, actorlib, actorlib.testing
        actorlib.init(num_cpus=1)
        node = actorlib.testing.add_node(num_cpus=1, resources={"doomed": 1})
        @actorlib.remote(resources={"doomed": 1})
        class Victim:
            def pid(self):
                return os.getpid()
        v = Victim.remote()
        pid = actorlib.get(v.pid.remote(), timeout=60)
        agent = actorlib.api.driver().extra_nodes[node]
        os.kill(agent.pid, signal.SIGKILL)
        t0 = time.monotonic()
        def gone():
            try:
                return open(f"/proc/{pid}/stat").read().split(")")[1].split()[0] == "Z"
            except OSError:
                return True
        while not gone() and time.monotonic() - t0 < 5:  # its worker dies with it (parent-death signals), within 5 s
            time.sleep(0.02)
        print("WORKER_GONE", gone())
        try:
            actorlib.get(v.pid.remote(), timeout=30)
        except actorlib.ActorDiedError as exc:
            print("DIED", round(time.monotonic() - t0, 1), f"lost its agent (pid {agent.pid}, killed by SIGKILL)" in str(exc))
        print("ALIVE", [n["alive"] for n in actorlib.nodes() if n["node_id"] == node])
        actorlib.shutdown()
        """
    )
    env = {**os.environ, "PYTHONPATH": ROOT_DIR, "ACTORLIB_TMPDIR": str(tmp_path), "ACTORLIB_NODE_TIMEOUT_S": "2"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    died = out.stdout.split("DIED ")[1].split()
    assert float(died[0]) < 10 and died[1] == "True"
    assert "ALIVE [False]" in out.stdout and "WORKER_GONE True" in out.stdout


def test_cuda_visible_devices_set_before_start_limits_the_node(tmp_path):
    script = textwrap.dedent(
        """
        import os, actorlib
        actorlib.init(num_cpus=1)
        @actorlib.remote(num_gpus=1)
        class G:
            def ids(self):
                return os.environ["CUDA_VISIBLE_DEVICES"], actorlib.get_gpu_ids()
        print(actorlib.cluster_resources()["GPU"], actorlib.get([G.remote().ids.remote(), G.remote().ids.remote()], timeout=60))
        actorlib.shutdown()
        """
    )
    env = {**os.environ, "PYTHONPATH": ROOT_DIR, "CUDA_VISIBLE_DEVICES": "3,5", "ACTORLIB_TMPDIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "2.0 [('3', [3]), ('5', [5])]"


def test_a_node_agent_stopped_while_it_joins_stops_at_once(tmp_path):
    """SIGTERM (also its parent-death signal) while no head answers: it waited for the 60 s join timeout."""
    agent = subprocess.Popen(
        [sys.executable, "-m", "scheduler", "node", "--head", f"ipc://{tmp_path}/nohead.sock", "--session-dir", str(tmp_path)]
        + ["--num-cpus", "1", "--key-stdin"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": ROOT_DIR},
    )
    try:
        agent.stdin.write("\n")
        agent.stdin.close()
        wait_for(lambda: descendants(agent.pid), 60, what="its fork server (it is joining now)")
        agent.terminate()
        assert agent.wait(timeout=30) == 1
        assert "was stopped while it joined" in agent.stdout.read()
    finally:
        if agent.poll() is None:
            agent.kill()
        agent.wait(timeout=30)
        agent.stdout.close()
