"""Nodes joined over SSH: a real ``sshd`` on 127.0.0.1, and two network namespaces each with its own.

Keys (host and client) are generated per test run; the client trusts exactly
the host key it was given (``StrictHostKeyChecking=yes``). The namespace test
builds two namespaces joined to this one by a bridge and veth pairs, runs an
``sshd`` in each, joins a node in each over SSH, and all-reduces over gloo
between actors on the two; it skips, saying why, where the machine does not
allow network namespaces.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import pytest
import yaml

from .conftest import ROOT_DIR, descendants, wait_for
from .machine import Machine

pytestmark = pytest.mark.slow

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"

if not os.path.exists(SSHD) or not shutil.which("ssh") or not shutil.which("ssh-keygen"):
    pytest.skip("openssh-server and openssh-client are needed (.ci/run installs them)", allow_module_level=True)


class Keys:
    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.host_key = os.path.join(folder, "host_ed25519")
        self.client_key = os.path.join(folder, "id_ed25519")
        for path in (self.host_key, self.client_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", path], check=True, timeout=30)
        shutil.copy(self.client_key + ".pub", os.path.join(folder, "authorized_keys"))
        with open(self.host_key + ".pub") as f:
            self.host_public = " ".join(f.read().split()[:2])
        self.known_hosts = os.path.join(folder, "known_hosts")
        open(self.known_hosts, "w").close()

    def trust(self, host: str, port: int) -> None:
        with open(self.known_hosts, "a") as f:
            f.write(f"{host if port == 22 else f'[{host}]:{port}'} {self.host_public}\n")


class Sshd:
    """One ``sshd -D`` (optionally inside a network namespace), a child of this test."""

    def __init__(self, keys: Keys, address: str, port: int, netns: str | None = None) -> None:
        name = f"sshd-{netns or 'root'}-{port}"
        config = os.path.join(keys.folder, name + ".conf")
        with open(config, "w") as f:
            f.write(
                f"Port {port}\nListenAddress {address}\nHostKey {keys.host_key}\n"
                f"PidFile {os.path.join(keys.folder, name + '.pid')}\n"
                f"AuthorizedKeysFile {os.path.join(keys.folder, 'authorized_keys')}\n"
                "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
                "PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\nLogLevel ERROR\n"
            )
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # its privilege-separation directory
        cmd = [SSHD, "-D", "-e", "-f", config]
        if netns:
            cmd = ["ip", "netns", "exec", netns, *cmd]
        self.log = os.path.join(keys.folder, name + ".log")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        self.address, self.port = address, port
        keys.trust(address, port)
        wait_for(self._listening, timeout=30, interval=0.05, what=f"sshd on {address}:{port} ({self.log})")

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"sshd exited with {self.proc.returncode}: {open(self.log).read()}")
        try:
            socket.create_connection((self.address, self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("sshd for these tests runs as root (it switches to the logged-in user)")
    return Keys(str(tmp_path_factory.mktemp("ssh")))


@pytest.fixture(scope="module")
def sshd(keys):
    server = Sshd(keys, "127.0.0.1", free_port())
    yield server
    server.stop()


@pytest.fixture
def machine(tmp_path, sshd):
    m = Machine(str(tmp_path), ACTORLIB_NODE_TIMEOUT_S="3")
    yield m
    m.stop_all()
    # What sshd started for this test (sessions, node agents, workers) is gone too.
    wait_for(lambda: not descendants(sshd.proc.pid), timeout=20, what="sshd's sessions to end")


def node_entry(machine: Machine, keys: Keys, host: str, port: int, **extra) -> dict:
    """A cluster file's node that runs this repository's code, in this test's session root, as root."""
    return {
        "host": host,
        "port": port,
        "user": "root",
        "identity_file": keys.client_key,
        "python": sys.executable,
        "env_vars": {"ACTORLIB_TMPDIR": machine.tmp, "PYTHONPATH": ROOT_DIR, "ACTORLIB_NODE_TIMEOUT_S": "3", **extra.pop("env_vars", {})},
        "ssh_options": ["-o", f"UserKnownHostsFile={keys.known_hosts}", "-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=15"],
        **extra,
    }


WHERE = """
import os, actorlib

@actorlib.remote(resources={"over_ssh": 1})
class Where:
    def where(self):
        return actorlib.get_runtime_context().get_node_id(), os.getpid()
"""


def test_up_starts_a_node_over_ssh_and_down_stops_it(machine, keys, sshd):
    cluster = os.path.join(machine.tmp, "cluster.yaml")
    with open(cluster, "w") as f:
        yaml.safe_dump(
            {
                "head": {"host": "127.0.0.1", "port": 0, "num_cpus": 1},
                "nodes": [node_entry(machine, keys, "127.0.0.1", sshd.port, num_cpus=1, resources={"over_ssh": 1})],
            },
            f,
        )
    machine.env["ACTORLIB_PROGRESS"] = "1"  # as in a terminal: a progress line while nodes join
    up = machine.cli("up", cluster)
    assert "127.0.0.1: joined as node" in up.stdout, up.stdout
    assert "nodes joining over SSH" in up.stderr and "1/1" in up.stderr  # a tqdm bar, drawn on stderr
    remote = next(n for n in machine.status()["nodes"] if not n["is_head_node"])
    assert remote["alive"] and remote["resources"]["over_ssh"] == 1
    ran = machine.python(
        WHERE + 'actorlib.init(address="auto")\nw = Where.options(lifetime="detached").remote()\nprint(*actorlib.get(w.where.remote()))\n'
    )
    node_id, pid = ran.stdout.split()
    assert node_id == remote["node_id"]
    assert int(pid) in descendants(sshd.proc.pid)  # the worker really runs under the SSH session
    # The secret never appears on a command line.
    with open(os.path.join(machine.status()["session_dir"], "cluster.key")) as f:
        secret = f.read().strip()
    for p in machine.processes():
        with open(f"/proc/{p}/cmdline", "rb") as f:
            assert secret.encode() not in f.read()

    out = machine.cli("down", cluster).stdout
    assert "stopped the head" in out
    wait_for(lambda: not machine.processes(), timeout=30, what="every node and worker to stop after `down`")


def test_a_node_that_cannot_be_reached_is_reported_with_sshs_words(machine, keys, sshd):
    cluster = os.path.join(machine.tmp, "cluster.yaml")
    closed = free_port()
    with open(cluster, "w") as f:
        yaml.safe_dump({"head": {"host": "127.0.0.1", "port": 0}, "nodes": [node_entry(machine, keys, "127.0.0.1", closed)]}, f)
    up = machine.cli("up", cluster, check=False)
    assert up.returncode == 1
    assert "FAILED" in up.stdout and f"port {closed}" in up.stdout and "Connection refused" in up.stdout, up.stdout
    machine.cli("down", cluster)


def test_a_driver_brings_up_nodes_over_ssh_from_init(machine, keys, sshd):
    cluster = {"head": {"host": "127.0.0.1", "port": 0}, "nodes": [node_entry(machine, keys, "127.0.0.1", sshd.port, resources={"over_ssh": 1})]}
    ran = machine.python(
        WHERE
        + f"""
actorlib.init(cluster={cluster!r})
remote = [n for n in actorlib.nodes() if not n["is_head_node"]]
w = Where.remote()
node_id, pid = actorlib.get(w.where.remote())
print(node_id == remote[0]["node_id"], pid)
import signal
def remote_agent():
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{{p}}/cmdline", "rb").read().split(b"\\0")
        except OSError:
            continue
        if b"--exit-with-stdin" in cmd and remote[0]["node_id"].encode() in cmd:
            return int(p)
# The agent dies without a word (SIGKILL): its SSH session ends with it, and the head, seeing ssh exit, knows
# at once (it waited for the heartbeat timeout)
os.kill(remote_agent(), signal.SIGKILL)
import time
deadline = time.monotonic() + 30
while os.path.exists(f"/proc/{{pid}}") and time.monotonic() < deadline:  # its worker goes with the node
    time.sleep(0.01)
try:
    actorlib.get(w.where.remote(), timeout=30)
except actorlib.ActorDiedError as exc:
    print("lost its SSH session to" in str(exc))
actorlib.shutdown()
"""
    )
    same, pid, lost = ran.stdout.split()
    assert same == "True" and lost == "True", ran.stdout
    wait_for(lambda: not machine.processes(), timeout=30, what="the SSH node to stop with its driver")


# -- two hosts: network namespaces ----------------------------------------------------


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def two_hosts(keys):
    """Two network namespaces on a bridge of this one: (bridge address, [(namespace, interface, address)])."""
    tag = f"al{os.getpid() % 100000}"
    subnet = f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}"
    bridge = f"{tag}br"
    made: list[str] = []
    try:
        _ip("link", "add", bridge, "type", "bridge")
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        pytest.skip(f"this machine does not allow network namespaces and bridges here: {getattr(exc, 'stderr', exc)!r}")
    hosts = []
    try:
        _ip("addr", "add", f"{subnet}.1/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for i, name in enumerate("ab"):
            ns, outside, inside = f"{tag}-{name}", f"{tag}{name}0", f"{tag}{name}1"
            _ip("netns", "add", ns)
            made.append(ns)
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            _ip("link", "set", outside, "master", bridge, "up")
            _ip("link", "set", inside, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{subnet}.{i + 2}/24", "dev", inside)
            _ip("-n", ns, "link", "set", inside, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            hosts.append((ns, inside, f"{subnet}.{i + 2}"))
        servers = [Sshd(keys, address, 22, netns=ns) for ns, _, address in hosts]
        try:
            yield f"{subnet}.1", hosts
        finally:
            for server in servers:
                server.stop()
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True, timeout=30)


ALL_REDUCE = """
import actorlib, torch

def member(resource):
    @actorlib.remote(resources={resource: 1})
    class Member:
        def address(self):
            import socket, os
            return os.environ["GLOO_SOCKET_IFNAME"], actorlib.get_runtime_context().get_node_id()
        def open_store(self):
            import torch.distributed as dist
            self.store = dist.TCPStore("0.0.0.0", 0, 2, True, wait_for_workers=False)
            return self.store.port
        def join(self, host, port, rank):
            import torch.distributed as dist
            store = self.store if rank == 0 else dist.TCPStore(host, port, 2, False)
            dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
            return rank
        def all_reduce(self, value):
            import torch.distributed as dist
            t = torch.tensor([float(value)])
            dist.all_reduce(t)
            return t.item()
    return Member.remote()

actorlib.init(address="auto")
a, b = member("host_a"), member("host_b")
print(actorlib.get(a.address.remote()), actorlib.get(b.address.remote()))
port = actorlib.get(a.open_store.remote())
actorlib.get([a.join.remote(None, 0, 0), b.join.remote("HOST_A", port, 1)], timeout=60)
print(actorlib.get([a.all_reduce.remote(3), b.all_reduce.remote(4)], timeout=60))
"""


def test_gloo_all_reduce_across_two_hosts_joined_over_ssh(machine, keys, two_hosts):
    head_address, hosts = two_hosts
    nodes = [
        node_entry(machine, keys, address, 22, resources={f"host_{name}": 1}, env_vars={"GLOO_SOCKET_IFNAME": interface})
        for name, (ns, interface, address) in zip("ab", hosts, strict=True)
    ]
    cluster = os.path.join(machine.tmp, "cluster.yaml")
    with open(cluster, "w") as f:
        yaml.safe_dump({"head": {"host": head_address, "port": 0, "num_cpus": 0}, "nodes": nodes}, f)
    out = machine.cli("up", cluster).stdout
    assert out.count("joined as node") == 2, out
    by_address = {n["address"]: n["node_id"] for n in machine.status()["nodes"]}
    ran = machine.python(ALL_REDUCE.replace("HOST_A", hosts[0][2]))
    first, result = ran.stdout.splitlines()
    assert result == "[7.0, 7.0]"
    # Each member ran on the node in its own namespace, at that namespace's address.
    assert first == str((hosts[0][1], by_address[hosts[0][2]])) + " " + str((hosts[1][1], by_address[hosts[1][2]]))
    machine.cli("down", cluster)
    wait_for(lambda: not machine.processes(), timeout=30, what="both hosts' nodes to stop")
