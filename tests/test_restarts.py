"""max_restarts and max_task_retries: workers killed with real signals; handles keep working."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

import actorlib
import actorlib.testing
from actorlib.api import driver

from .conftest import ROOT_DIR, alive, local_cluster, wait_for


@pytest.fixture(scope="module")
def al():
    with local_cluster(num_cpus=4, num_gpus=2) as al:
        yield al


@actorlib.remote
class Keeper:
    def __init__(self, start):
        self.value = start

    def add(self, n):
        self.value += n
        return self.value

    def pid(self):
        return os.getpid()

    def gpus(self):
        return os.environ["CUDA_VISIBLE_DEVICES"].split(",")

    def node(self):
        return actorlib.get_runtime_context().get_node_id()

    def wait_then_pid(self, path):
        """Block until ``path`` exists, then answer with this process's pid."""
        import time

        while not os.path.exists(path):
            time.sleep(0.01)
        return os.getpid()


def _restarts(al, actor_id):
    rt = driver().rt
    state = rt.run(rt.control("list_actors"))
    return next(a for a in state if a["actor_id"] == actor_id)["restarts"]


def test_a_restarted_actor_keeps_its_handles_and_constructor_arguments(al):
    k = Keeper.options(max_restarts=2).remote(10)
    assert al.get(k.add.remote(1)) == 11
    for incarnation in (1, 2):
        pid = al.get(k.pid.remote())
        os.kill(pid, signal.SIGKILL)
        # Once the head has seen the death (a call sent before that would fail: max_task_retries=0) ...
        wait_for(lambda n=incarnation: _restarts(al, k._actor_id) == n, what="the restart")
        # ... the same handle reaches the new worker, built again from the same arguments.
        assert al.get(k.add.remote(1), timeout=30) == 11
        assert al.get(k.pid.remote()) != pid
    pid = al.get(k.pid.remote())
    os.kill(pid, signal.SIGKILL)  # restarts used up: now it is dead for good
    with pytest.raises(actorlib.ActorDiedError, match="signal=SIGKILL"):
        al.get(k.add.remote(1), timeout=30)


def test_calls_in_flight_fail_or_are_retried(al, tmp_path):
    go = tmp_path / "go"
    plain = Keeper.options(max_restarts=1).remote(0)
    retried = Keeper.options(max_restarts=1, max_task_retries=1).remote(0)
    old = al.get([plain.pid.remote(), retried.pid.remote()])
    lost = plain.wait_then_pid.remote(str(go))
    kept = retried.wait_then_pid.remote(str(go))
    for pid in old:
        os.kill(pid, signal.SIGKILL)
    with pytest.raises(actorlib.ActorDiedError, match="restarting \\(1 of 1\\)"):
        al.get(lost, timeout=30)
    go.touch()
    new_pid = al.get(kept, timeout=30)  # sent again to the new worker, which answers
    assert new_pid not in old and new_pid == al.get(retried.pid.remote())


def test_restarts_forever_and_kill_still_ends_it(al):
    k = Keeper.options(max_restarts=-1, max_task_retries=-1).remote(0)
    for _ in range(3):
        pid = al.get(k.pid.remote(), timeout=30)
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda pid=pid: not alive(pid), what="the worker to die")
    assert al.get(k.add.remote(5), timeout=30) == 5
    pid = al.get(k.pid.remote(), timeout=30)  # (called back to back: later calls may go through a slot, at once)
    al.kill(k)  # a kill is final, whatever max_restarts says
    assert not alive(pid)  # kill() returns once the process is gone: no later call can reach it
    with pytest.raises(actorlib.ActorDiedError, match="killed") as info:
        al.get(k.add.remote(1), timeout=30)
    assert info.value.pid == pid  # the head's word on its death


def test_calls_from_many_threads_survive_a_restart(al):
    k = Keeper.options(max_restarts=1, max_task_retries=-1).remote(0)
    pid = al.get(k.pid.remote())
    results: list[int] = []
    errors: list[BaseException] = []

    def caller():
        try:
            results.extend(al.get([k.add.remote(1) for _ in range(50)], timeout=60))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=caller) for _ in range(4)]
    for t in threads:
        t.start()
    os.kill(pid, signal.SIGKILL)
    for t in threads:
        t.join(90)
    assert not errors and len(results) == 200  # every call answered once, by one incarnation or the other


def test_bad_restart_options_are_refused(al):
    with pytest.raises(ValueError, match="max_restarts must be an int >= -1"):
        Keeper.options(max_restarts=-2)
    with pytest.raises(ValueError, match="max_task_retries"):
        Keeper.options(max_task_retries="3")


def test_an_actor_of_a_placement_group_restarts_in_its_bundle(al):
    pg = al.placement_group([{"GPU": 1}, {"GPU": 1}], strategy="PACK")
    assert pg.wait(30)
    k = Keeper.options(placement_group=pg, bundle_index=1, num_gpus=1, max_restarts=1, max_task_retries=1).remote(0)
    before = al.get(k.gpus.remote())
    os.kill(al.get(k.pid.remote()), signal.SIGKILL)
    assert al.get(k.gpus.remote(), timeout=30) == before == al.placement_group_table(pg)["bundle_gpu_ids"][1]
    al.remove_placement_group(pg)


def test_an_actor_whose_node_is_lost_restarts_on_another(al):
    first = actorlib.testing.add_node(num_cpus=1, resources={"spot": 1})
    second = actorlib.testing.add_node(num_cpus=1, resources={"spot": 1})
    k = Keeper.options(resources={"spot": 1}, max_restarts=1, max_task_retries=1).remote(7)
    where = al.get(k.node.remote())
    assert where in (first, second)
    actorlib.testing.remove_node(where)
    other = second if where == first else first
    assert al.get(k.node.remote(), timeout=60) == other
    assert al.get(k.add.remote(0)) == 7
    actorlib.testing.remove_node(other)


def test_an_actor_of_a_group_moved_off_a_lost_node_restarts_once_with_a_gpu_of_its_own(al):
    """The group's bundles are given back before its actors restart: none is placed into an old bundle (whose
    GPU the group, placed again, may hand to another), and its restart is counted once (it was killed,
    restarts used up, when counted twice)."""
    nodes = [actorlib.testing.add_node(num_cpus=1, num_gpus=1, resources={"slot": 1}) for _ in range(3)]
    pg = al.placement_group([{"slot": 1, "GPU": 1}] * 2, strategy="STRICT_SPREAD")
    try:
        assert pg.wait(60)
        a = Keeper.options(placement_group=pg, bundle_index=-1, num_gpus=1, max_restarts=1).remote(0)
        lost = al.get(a.node.remote(), timeout=60)
        actorlib.testing.remove_node(lost)
        nodes.remove(lost)
        assert al.get(a.node.remote(), timeout=60) in nodes  # restarted, not killed
        assert _restarts(al, a._actor_id) == 1
        b = Keeper.options(placement_group=pg, bundle_index=-1, num_gpus=1).remote(1)
        where = al.get([a.node.remote(), b.node.remote()], timeout=60)
        gpus = al.get([a.gpus.remote(), b.gpus.remote()], timeout=60)
        assert where[0] != where[1] and all(len(g) == 1 for g in gpus)  # one bundle, one node, one GPU each
    finally:
        al.remove_placement_group(pg)
        for node in nodes:
            actorlib.testing.remove_node(node)


def test_an_actor_only_waiting_for_room_in_a_moved_group_is_not_charged_for_the_move(al):
    """Restarting the group's running actor placed the group again and started the waiting one, which the
    same pass then killed (no restarts left) as if it had run in the old placement."""
    nodes = [actorlib.testing.add_node(num_cpus=2, resources={"room": 1}) for _ in range(2)]
    pg = al.placement_group([{"CPU": 1, "room": 1}])
    try:
        assert pg.wait(60)
        running = Keeper.options(placement_group=pg, num_cpus=1, max_restarts=1).remote(0)
        lost = al.get(running.node.remote(), timeout=60)
        waiting = Keeper.options(placement_group=pg, num_cpus=1).remote(1)  # no room in the bundle: pending
        actorlib.testing.remove_node(lost)
        nodes.remove(lost)
        assert al.get(waiting.add.remote(1), timeout=60) == 2  # placed with the group, not killed
        assert _restarts(al, waiting._actor_id) == 0
    finally:
        al.remove_placement_group(pg)
        for node in nodes:
            actorlib.testing.remove_node(node)


def test_a_dead_fork_server_is_replaced_and_its_workers_reported_at_once(al):
    """Its workers die with it (parent-death signal): the agent says so at once, not the heartbeat timeout
    later, and a new server takes over the node's spawns."""
    node = driver().node
    k = Keeper.remote(5)
    worker = al.get(k.pid.remote(), timeout=60)
    old = node._forkserver.pid
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: not alive(old) and not alive(worker), timeout=10, what="the fork server and its worker to die")
    with pytest.raises(actorlib.ActorDiedError, match="fork server died"):
        al.get(k.add.remote(1), timeout=20)
    assert node._forkserver.pid != old
    assert al.get(Keeper.remote(1).add.remote(1), timeout=60) == 2


def test_an_actor_waiting_for_a_node_that_left_says_so_in_status(al):
    node = actorlib.testing.add_node(num_cpus=1, resources={"rare": 1})
    k = Keeper.options(resources={"rare": 1}, max_restarts=1).remote(0)
    assert al.get(k.node.remote(), timeout=60) == node
    actorlib.testing.remove_node(node)
    rt = driver().rt

    def reason():
        waiting = [p for p in rt.run(rt.control("status"))["pending"] if p["actor_id"] == k._actor_id]
        return waiting[0]["reason"] if waiting else ""

    wait_for(lambda: reason().startswith("infeasible now"), timeout=30, what="the actor to wait, saying why")
    assert "it needs {'rare': 1" in reason() and "no node has that much" in reason()
    al.kill(k)


def test_a_hung_worker_is_found_by_missed_heartbeats(tmp_path):
    """SIGSTOP a worker: alive but silent. The head kills it and restarts it; with no restarts left, calls fail."""
    script = textwrap.dedent(
        """
        import os, signal, time, actorlib
        actorlib.init(num_cpus=1)

        @actorlib.remote(max_restarts=1, max_task_retries=1)
        class Sleeper:
            def pid(self):
                return os.getpid()

        def stop(pid):
            # kill() returns before the process is stopped: until each of its threads has stopped, one
            # may still answer a call sent meanwhile. Wait until they all have (bounded).
            os.kill(pid, signal.SIGSTOP)
            def state(tid):
                try:
                    return open(f"/proc/{pid}/task/{tid}/stat").read().rsplit(")", 1)[1].split()[0]
                except OSError:
                    return "T"
            def running():
                try:
                    return any(state(t) not in "Tt" for t in os.listdir(f"/proc/{pid}/task"))
                except OSError:
                    return False  # gone already
            deadline = time.monotonic() + 10
            while running() and time.monotonic() < deadline:
                time.sleep(0.001)

        s = Sleeper.remote()
        first = actorlib.get(s.pid.remote(), timeout=60)
        stop(first)
        t0 = time.monotonic()
        second = actorlib.get(s.pid.remote(), timeout=60)  # in flight while it hangs: retried on the new worker
        print("RESTARTED", second != first, round(time.monotonic() - t0, 1))
        stop(second)
        try:
            actorlib.get(s.pid.remote(), timeout=60)
        except actorlib.ActorDiedError as exc:
            print("DIED", exc.pid == second, "stopped answering" in str(exc))
        def gone(pid):
            try:
                return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
            except OSError:
                return True
        deadline = time.monotonic() + 10  # the kill goes through the node agent: wait for it, bounded
        while not (gone(first) and gone(second)) and time.monotonic() < deadline:
            time.sleep(0.02)
        print("GONE", gone(first), gone(second))
        actorlib.shutdown()
        """
    )
    env = {**os.environ, "PYTHONPATH": ROOT_DIR, "ACTORLIB_TMPDIR": str(tmp_path), "ACTORLIB_WORKER_TIMEOUT_S": "1.5"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert "RESTARTED True" in out.stdout, out.stdout + out.stderr
    assert "DIED True True" in out.stdout
    assert "GONE True True" in out.stdout


@actorlib.remote
class Maker:
    """Makes an actor, a detached actor and a placement group of its own (Ray's ownership: they are its)."""

    def make(self, detached_name):
        self.child = Keeper.remote(0)
        self.keep = Keeper.options(name=detached_name, lifetime="detached").remote(0)
        self.pg = actorlib.placement_group([{"CPU": 0.5}])
        assert self.pg.wait(30)
        return actorlib.get([self.child.pid.remote(), self.keep.pid.remote()]), self.pg

    def pid(self):
        return os.getpid()


def test_what_an_actor_made_goes_when_its_worker_goes_detached_ones_stay(al):
    free = actorlib.available_resources()["CPU"]
    maker = Maker.remote()
    (child_pid, keep_pid), pg = actorlib.get(maker.make.remote("keep-made"), timeout=60)
    actorlib.kill(maker)
    wait_for(lambda: not alive(child_pid), timeout=30, what="the actor it made to be killed")
    wait_for(lambda: actorlib.placement_group_table(pg)["state"] == "REMOVED", timeout=30, what="its group to be removed")
    keep = actorlib.get_actor("keep-made")
    assert actorlib.get(keep.pid.remote(), timeout=30) == keep_pid  # detached: not its
    actorlib.kill(keep)
    wait_for(lambda: not alive(keep_pid), timeout=30, what="the detached actor to be killed")
    wait_for(lambda: actorlib.available_resources()["CPU"] == free, timeout=30, what="every CPU to be free again")


def test_a_restarted_actor_starts_without_what_its_last_worker_made(al):
    maker = Maker.options(max_restarts=1).remote()
    (child_pid, keep_pid), _ = actorlib.get(maker.make.remote("keep-made-2"), timeout=60)
    os.kill(actorlib.get(maker.pid.remote(), timeout=30), signal.SIGKILL)
    wait_for(lambda: not alive(child_pid), timeout=30, what="the actor its first worker made to be killed")
    assert actorlib.get(maker.pid.remote(), timeout=60) != child_pid  # it came back
    keep = actorlib.get_actor("keep-made-2")
    actorlib.kill(maker)
    actorlib.kill(keep)
    wait_for(lambda: not alive(keep_pid), timeout=30, what="the detached actor to be killed")


@actorlib.remote
class Inside:
    """Code running in an actor, using the API as library code would."""

    def init_again(self):
        summary = actorlib.init(ignore_reinit_error=True)  # a no-op here, as in Ray
        try:
            actorlib.init()
        except actorlib.ActorLibError as exc:
            refused = str(exc)
        return summary["namespace"], refused, actorlib.get_runtime_context().get_actor_id()

    def namespace_and_find(self, name):
        return actorlib.get_runtime_context().namespace, actorlib.get(actorlib.get_actor(name).add.remote(0), timeout=30)

    async def share_at_once(self, user, other):
        child = Keeper.remote(other.later.remote(41, 0.5))  # the head hears of it only once that is done
        return await user.add_from.remote(child)

    async def later(self, value, delay):
        import asyncio

        await asyncio.sleep(delay)
        return value


@actorlib.remote
class User:
    def add_from(self, keeper):
        return actorlib.get(keeper.add.remote(1), timeout=30)


def test_code_in_an_actor_runs_in_its_jobs_namespace_and_cannot_start_a_cluster(al):
    keeper = Keeper.options(name="found-from-inside").remote(5)
    inside = Inside.options(name="named-elsewhere", namespace="elsewhere").remote()
    namespace, refused, actor_id = al.get(inside.init_again.remote(), timeout=30)
    assert namespace == "default" and "inside an actor" in refused and actor_id == inside._actor_id
    assert al.get(inside.namespace_and_find.remote("found-from-inside"), timeout=30) == ("default", 5)
    al.kill(inside)
    al.kill(keeper)


def test_a_handle_made_in_an_async_method_works_at_once_in_another_actor(al):
    maker, user, slow = Inside.remote(), User.remote(), Inside.remote()
    assert al.get(maker.share_at_once.remote(user, slow), timeout=60) == 42
    for a in (maker, user, slow):
        al.kill(a)


def test_an_actor_made_from_async_code_with_a_pending_argument_does_not_block_the_loop(al, tmp_path):
    path = str(tmp_path / "go")
    source = Keeper.remote(0)
    pending = source.wait_then_pid.remote(path)  # done only once `path` exists
    def release():
        with open(path, "w"):
            pass

    unblock = threading.Timer(20, release)  # in case remote() blocks after all
    unblock.start()

    async def main():
        keeper = Keeper.remote(pending)  # returns at once: the loop goes on
        killed = Keeper.remote(pending)
        returned_before_the_value = not unblock.finished.is_set()
        await asyncio.to_thread(al.kill, killed)  # before the head knows it: it is never made (it was made, unkillable)
        release()
        return returned_before_the_value, await keeper.add.remote(0), killed

    try:
        returned_first, value, killed = asyncio.run(main())
    finally:
        unblock.cancel()
    assert returned_first and value == al.get(source.pid.remote(), timeout=30)
    with pytest.raises(actorlib.ActorDiedError, match="killed by actorlib.kill.. before it was created"):
        al.get(killed.add.remote(0), timeout=30)
    rt = driver().rt
    assert killed._actor_id not in {a["actor_id"] for a in rt.run(rt.control("list_actors"))}
    al.kill(source)


def test_a_node_whose_agent_dies_fails_its_actors_at_once_naming_it(al):
    node = actorlib.testing.add_node(num_cpus=1, resources={"doomed": 1})
    k = Keeper.options(resources={"doomed": 1}).remote(0)
    assert al.get(k.node.remote(), timeout=60) == node
    worker = al.get(k.pid.remote(), timeout=60)
    agent = driver().extra_nodes[node]
    os.kill(agent.pid, signal.SIGKILL)
    wait_for(lambda: not alive(worker), 30, what="its worker to go with it")
    with pytest.raises(actorlib.ActorDiedError, match=rf"lost its agent \(pid {agent.pid}, killed by SIGKILL\)"):
        al.get(k.add.remote(1), timeout=30)  # not a heartbeat timeout later
    wait_for(lambda: agent.poll() is not None, 10, what="the agent to be reaped")  # no zombie left
    actorlib.testing.remove_node(node)


def test_a_node_agent_that_cannot_start_says_why_at_once(al):
    with pytest.raises(actorlib.ActorLibError, match=r"exited \(exit code 2\) before it joined(.|\n)*num_cpus"):
        driver().add_node(-1, None, None)
