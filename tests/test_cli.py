"""The standalone head through the command line: start, status, drivers, detached actors, failures, stop."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from .conftest import alive, wait_for
from .machine import Machine, end_process

pytestmark = pytest.mark.slow

@pytest.fixture
def machine(tmp_path):
    m = Machine(str(tmp_path), ACTORLIB_NODE_TIMEOUT_S="2")
    yield m
    m.stop_all()


COUNTER = """
import os, actorlib

@actorlib.remote(resources={"other": 1})
class Counter:
    def __init__(self):
        self.n = 0
    def incr(self):
        self.n += 1
        return self.n
    def node(self):
        return actorlib.get_runtime_context().get_node_id()
    def spawn(self, name):
        self.child = Counter.options(name=name).remote()
        return actorlib.get(self.child.incr.remote())
"""


def test_command_line_round_trip_with_detached_actors(machine):
    out = machine.cli("start", "--head", "--host", "127.0.0.1", "--port", "0", "--num-cpus", "2").stdout
    assert "actorlib head started at 127.0.0.1:" in out and 'actorlib.init(address="auto")' in out
    head = json.load(open(os.path.join(machine.tmp, "head.json")))
    key_file = head["key_file"]
    assert os.stat(key_file).st_mode & 0o777 == 0o600

    out = machine.cli("start", "--address", "auto", "--num-cpus", "1", "--resources", '{"other": 2}').stdout
    assert "joined the head" in out
    st = machine.status()
    assert [n["alive"] for n in st["nodes"]] == [True, True]
    assert sorted(n["resources"].get("other", 0) for n in st["nodes"]) == [0, 2]
    text = machine.cli("status").stdout
    assert "Nodes: 2 alive, 0 dead" in text and "other 0/2" in text

    # Driver 1 (another process, joined by address and key): one detached named actor, one owned.
    first = machine.python(
        COUNTER
        + """
actorlib.init(address="auto", namespace="team")
keep = Counter.options(name="keeper", lifetime="detached").remote()
mine = Counter.options(name="mine").remote()
print(actorlib.get(keep.incr.remote()), actorlib.get(mine.incr.remote()))
"""
    )
    assert first.stdout.split() == ["1", "1"]
    # The actor this driver owned died with it; the detached one lives on.
    states = {a["name"]: a["state"] for a in machine.status()["actors"]}
    assert states == {"keeper": "ALIVE", "mine": "DEAD"}

    # Driver 2, by explicit address and key file: finds it by name in its namespace, and only there.
    second = machine.python(
        """
import actorlib
actorlib.init(address="ADDRESS", namespace="team")
keep = actorlib.get_actor("keeper")
print(actorlib.get(keep.incr.remote()))
try:
    actorlib.get_actor("keeper", namespace="elsewhere")
except ValueError as exc:
    print("elsewhere:", exc)
""".replace("ADDRESS", head["address"][len("tcp://") :]),
        ACTORLIB_TMPDIR=os.path.join(machine.tmp, "nowhere"),  # no local head to find: the key file must do
        ACTORLIB_KEY_FILE=key_file,
    )
    lines = second.stdout.splitlines()
    assert lines[0] == "2" and "no actor named 'keeper' in namespace 'elsewhere'" in lines[1]
    # Driver 3: address="auto" on a machine with no head of its own follows $ACTORLIB_ADDRESS.
    third = machine.python(
        'import actorlib\nactorlib.init(address="auto", namespace="team")\nprint(actorlib.get(actorlib.get_actor("keeper").incr.remote()))\n',
        ACTORLIB_TMPDIR=os.path.join(machine.tmp, "nowhere"),
        ACTORLIB_KEY_FILE=key_file,
        ACTORLIB_ADDRESS=head["address"][len("tcp://") :],
    )
    assert third.stdout.strip() == "3"

    pids = {head["pid"]} | {a["pid"] for a in machine.status()["actors"] if a["state"] == "ALIVE"}
    out = machine.cli("stop").stdout
    assert "stopped head" in out and "stopped node" in out
    assert not any(alive(p) for p in pids)
    assert machine.cli("status", check=False).returncode == 1


def test_errors_name_what_is_wrong(machine):
    bad = machine.cli("start", "--head", "--resources", "{not json", check=False)
    assert bad.returncode == 1 and "--resources is not JSON" in bad.stderr
    nothing = machine.cli("status", check=False)
    assert nothing.returncode == 1 and "no actorlib head is running on this machine" in nothing.stderr
    no_key = machine.python(
        """
import actorlib
try:
    actorlib.init(address="127.0.0.1:1")
except ConnectionError as exc:
    print(exc)
"""
    )
    assert "no cluster key for the head at tcp://127.0.0.1:1" in no_key.stdout
    cluster = os.path.join(machine.tmp, "cluster.yaml")
    with open(cluster, "w") as f:
        f.write("head: {host: 127.0.0.1}\nnodes: [{hots: a}]\n")
    up = machine.cli("up", cluster, check=False)
    assert up.returncode == 1 and "unknown keys ['hots']" in up.stderr

    machine.cli("start", "--head", "--host", "127.0.0.1", "--port", "0")
    again = machine.cli("start", "--head", "--host", "127.0.0.1", "--port", "0", check=False)
    assert again.returncode == 1 and "a head is already running on this machine" in again.stderr
    wrong_key = os.path.join(machine.tmp, "wrong.key")
    from transport import generate_key, write_key_file

    write_key_file(wrong_key, generate_key())
    refused = machine.cli("status", check=False)
    assert refused.returncode == 0
    machine.env["ACTORLIB_KEY_FILE"] = wrong_key  # a key that is not the cluster's: the head never answers it
    machine.env["ACTORLIB_CONNECT_TIMEOUT_S"] = "3"
    refused = machine.python(
        """
import actorlib
try:
    actorlib.init(address="auto")
except ConnectionError as exc:
    print(exc)
"""
    )
    assert "does this process hold its cluster key" in refused.stdout


def test_a_killed_driver_takes_its_actors_and_theirs_detached_ones_stay(machine):
    machine.cli("start", "--head", "--host", "127.0.0.1", "--port", "0", "--resources", '{"other": 4}')
    driver = machine.spawn_python(
        COUNTER
        + """
import sys
actorlib.init(address="auto")
keep = Counter.options(name="keeper", lifetime="detached").remote()
mine = Counter.remote()
actorlib.get([keep.incr.remote(), mine.incr.remote(), keep.spawn.remote("keep-child"), mine.spawn.remote("mine-child")])
print("ready", flush=True)
import time; time.sleep(600)
"""
    )
    try:
        assert driver.stdout.readline().strip() == "ready"
        # A second driver, connected at the same time, uses the first one's named actor.
        other = machine.python('import actorlib\nactorlib.init(address="auto")\nprint(actorlib.get(actorlib.get_actor("keeper").incr.remote()))\n')
        assert other.stdout.strip() == "2"
        actors = {a["name"]: a for a in machine.status()["actors"]}
        owned_pids = [actors[None]["pid"], actors["mine-child"]["pid"]]
        driver.kill()  # no goodbye: the head notices its silence
        driver.wait(10)
        # the actor its own actor made goes with the driver; the one a detached actor made stays
        wait_for(
            lambda: {a["name"]: a["state"] for a in machine.status()["actors"]}
            == {"keeper": "ALIVE", "keep-child": "ALIVE", None: "DEAD", "mine-child": "DEAD"},
            timeout=30,
            what="the killed driver's actors to be reaped",
        )
        wait_for(lambda: not any(alive(pid) for pid in owned_pids), timeout=10, what="their worker processes to exit")
    finally:
        end_process(driver)


def test_a_driver_declared_dead_that_speaks_again_owns_what_it_makes_next(machine):
    """A driver stopped (SIGSTOP, a suspended laptop) past the timeout loses its actors; once it runs again,
    the actors it makes are its own again: reaped when it goes, never left running ownerless."""
    machine.cli("start", "--head", "--host", "127.0.0.1", "--port", "0", "--resources", '{"other": 4}')
    driver = machine.spawn_python(
        COUNTER
        + """
import time
actorlib.init(address="auto")
first = Counter.options(name="first").remote()
actorlib.get(first.incr.remote())
print("ready", flush=True)
while True:  # until the head, having declared this driver dead, has stopped its actor
    try:
        actorlib.get(first.incr.remote(), timeout=30)
    except actorlib.ActorDiedError:
        break
    time.sleep(0.05)
after = Counter.options(name="after").remote()
actorlib.get(after.incr.remote())
print("ready again", flush=True)
time.sleep(600)
"""
    )
    try:
        assert driver.stdout.readline().strip() == "ready"
        driver.send_signal(signal.SIGSTOP)
        wait_for(
            lambda: {a["name"]: a["state"] for a in machine.status()["actors"]} == {"first": "DEAD"},
            timeout=30,
            what="the stopped driver's actor to be reaped",
        )
        driver.send_signal(signal.SIGCONT)
        assert driver.stdout.readline().strip() == "ready again"
        assert [d["actors"] for d in machine.status()["drivers"]] == [1]  # its job again, with its new actor
        driver.kill()
        driver.wait(10)
        wait_for(
            lambda: {a["name"]: a["state"] for a in machine.status()["actors"]} == {"first": "DEAD", "after": "DEAD"},
            timeout=30,
            what="the actor made after it spoke again to be reaped with it",
        )
    finally:
        end_process(driver)


def test_node_death_and_rejoin(machine):
    machine.cli("start", "--head", "--host", "127.0.0.1", "--port", "0", "--num-cpus", "1")
    machine.cli("start", "--address", "auto", "--num-cpus", "1", "--resources", '{"other": 1}')
    node = next(i for i in _started(machine) if i["role"] == "node")
    machine.python(COUNTER + '\nactorlib.init(address="auto")\nc = Counter.options(lifetime="detached").remote()\nactorlib.get(c.incr.remote())\n')
    worker = next(a["pid"] for a in machine.status()["actors"])
    os.kill(node["pid"], signal.SIGSTOP)  # the agent goes silent; its worker keeps running
    try:
        wait_for(lambda: not _node_alive(machine, node), timeout=30, what="the head to declare the node dead")
        (actor,) = machine.status()["actors"]
        assert actor["state"] == "DEAD" and "stopped answering" in actor["death"]["reason"]
    finally:
        os.kill(node["pid"], signal.SIGCONT)
    wait_for(lambda: _node_alive(machine, node), timeout=30, what="the node to join again")
    wait_for(lambda: not alive(worker), timeout=10, what="the declared-dead worker to be killed on rejoin")
    after = machine.python(COUNTER + '\nactorlib.init(address="auto")\nc = Counter.remote()\nprint(actorlib.get(c.node.remote()))\n')
    assert after.stdout.strip() == node["node_id"]


def test_a_node_stopped_while_its_heartbeat_waits_for_an_answer_joins_again(machine):
    """The node's heartbeat timed out while the node itself was stopped: that is not the head's silence."""
    machine.cli("start", "--head", "--host", "127.0.0.1", "--port", "0", "--num-cpus", "1")
    machine.cli("start", "--address", "auto", "--num-cpus", "1")
    head = next(i for i in _started(machine) if i["role"] == "head")
    node = next(i for i in _started(machine) if i["role"] == "node")
    port = int(head["address"].rsplit(":", 1)[1])
    os.kill(head["pid"], signal.SIGSTOP)  # the node's next heartbeat stays unanswered in the head's socket
    try:
        wait_for(lambda: _bytes_waiting(port), timeout=10, what="a heartbeat to wait in the stopped head's socket")
        os.kill(node["pid"], signal.SIGSTOP)  # ... and the node stops while it waits for the answer
    finally:
        os.kill(head["pid"], signal.SIGCONT)
    try:
        wait_for(lambda: not _node_alive(machine, node), timeout=30, what="the head to declare the node dead")
    finally:
        os.kill(node["pid"], signal.SIGCONT)
    wait_for(lambda: _node_alive(machine, node), timeout=30, what="the node to join again")
    assert alive(node["pid"])


def test_killing_the_head_stops_its_nodes_and_workers(machine):
    machine.cli("start", "--head", "--host", "127.0.0.1", "--port", "0", "--num-cpus", "1")
    machine.cli("start", "--address", "auto", "--resources", '{"other": 1}')
    machine.python(COUNTER + '\nactorlib.init(address="auto")\nc = Counter.options(name="c", lifetime="detached").remote()\nactorlib.get(c.incr.remote())\n')
    assert len(machine.processes()) >= 5  # head + its fork server, node + its fork server, a worker
    head = next(i for i in _started(machine) if i["role"] == "head")
    os.kill(head["pid"], signal.SIGKILL)
    wait_for(lambda: not machine.processes(), timeout=30, what=f"every process to stop after the head died: {machine.processes()}")


def _started(machine: Machine) -> list[dict]:
    folder = os.path.join(machine.tmp, "started")
    return [json.load(open(os.path.join(folder, n))) for n in sorted(os.listdir(folder))]


def _bytes_waiting(port: int) -> bool:
    """Whether a connection to ``port`` on this machine holds received bytes nobody has read yet."""
    out = subprocess.run(["ss", "-tnH", "state", "established", f"( sport = :{port} )"], capture_output=True, text=True, check=True)
    return any(int(line.split()[0]) > 0 for line in out.stdout.splitlines())


def _node_alive(machine: Machine, node: dict) -> bool:
    st = machine.status()
    return any(n["node_id"] == node["node_id"] and n["alive"] for n in st["nodes"])


def test_start_block_stays_in_the_foreground_until_signalled(machine):
    import sys

    cli = subprocess.Popen(
        [sys.executable, "-m", "actorlib.cli", "start", "--head", "--block", "--host", "127.0.0.1", "--port", "0"],
        env=machine.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert "head serving at tcp://127.0.0.1:" in cli.stdout.readline()
        assert [n["alive"] for n in machine.status()["nodes"]] == [True]
        cli.send_signal(signal.SIGTERM)
        assert cli.wait(30) == 0
        assert "head stopped" in cli.stdout.read()
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
        cli.stdout.close()
    wait_for(lambda: not machine.processes(), timeout=20, what="the head to stop")


def test_a_driver_whose_head_dies_fails_its_calls_naming_it_and_shuts_down_at_once(machine):
    """Its nodes stop their workers without it: calls waited for ever, and shutdown() for 7 s."""
    machine.cli("start", "--head", "--host", "127.0.0.1", "--port", "0", "--resources", '{"other": 2}')
    head = json.load(open(os.path.join(machine.tmp, "head.json")))
    driver = machine.spawn_python(
        COUNTER
        + f"""
import threading, time, warnings
warnings.simplefilter("ignore")
actorlib.init(address="auto")
c = Counter.remote()
actorlib.get(c.incr.remote(), timeout=60)
waited = []
pg = actorlib.placement_group([{{"other": 100}}])  # never placed: its wait() waits on the head for ever
def wait_for_group():
    try:
        waited.append(pg.wait(None))
    except actorlib.ActorLibError as exc:
        waited.append(str(exc))
waiter = threading.Thread(target=wait_for_group)
waiter.start()
print("ready", flush=True)
while os.path.exists("/proc/{head['pid']}"):  # the test kills the head
    time.sleep(0.01)
try:
    actorlib.get(c.incr.remote(), timeout=60)
except actorlib.ActorDiedError as exc:
    print(str(exc).splitlines()[0], flush=True)
waiter.join(60)
print(waited[0], flush=True)
t0 = time.monotonic()
actorlib.shutdown()
print(round(time.monotonic() - t0, 1), flush=True)
"""
    )
    try:
        assert driver.stdout.readline().strip() == "ready"
        os.kill(head["pid"], signal.SIGKILL)
        assert driver.wait(timeout=60) == 0, driver.stderr.read()
        failure, group, took = driver.stdout.read().splitlines()
        assert f"lost the head at {head['address']}" in failure and group.startswith(f"lost the head at {head['address']}")
        assert float(took) < 5  # was 7 s: it waited for a head that would never answer
    finally:
        end_process(driver)
    wait_for(lambda: not machine.processes(), 30, what="the head's node and workers to stop without it")


def test_a_foreground_head_says_it_failed_and_goes_with_its_command(machine):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    with taken:  # a port in use: the head cannot start, and the command's status says so (it was 0)
        out = machine.cli("start", "--head", "--block", "--host", "127.0.0.1", "--port", str(taken.getsockname()[1]), check=False)
    assert out.returncode != 0 and "could not start" in out.stderr
    command = subprocess.Popen(
        [sys.executable, "-m", "actorlib.cli", "start", "--head", "--block", "--host", "127.0.0.1", "--port", "0"],
        env=machine.env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert "head serving at" in command.stdout.readline()
        command.kill()  # no chance to stop its head: the head goes by itself (it stayed)
        command.wait(timeout=30)
        wait_for(lambda: not machine.processes(), 30, what="the head and its node to go with the command")
    finally:
        end_process(command)
