"""What the command line says when it is given something wrong: one line naming the fault, nothing left behind.

Cluster files are checked by calling the loader; key files and ``up`` run the
CLI in a process of its own, on a private session root (``Machine``).
"""

from __future__ import annotations

import os

import pytest
import yaml

from scheduler.cluster_file import ClusterFile
from transport import generate_key, write_key_file

from .machine import Machine


@pytest.fixture
def machine(tmp_path):
    m = Machine(str(tmp_path), ACTORLIB_NODE_TIMEOUT_S="2")
    yield m
    m.stop_all()


def _sessions(machine: Machine) -> list[str]:
    return sorted(n for n in os.listdir(machine.tmp) if n.startswith("session_"))


def _one_line(proc, command: str) -> str:
    """The error ``actorlib COMMAND`` printed: exit code 1, one line, no traceback."""
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"actorlib {command}: "), proc.stderr
    return lines[0]


# -- cluster files: each value's type, named by its key ------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"nodes": [{"host": 5}]}, "nodes[0].host must be a host name or address, not 5"),
        ({"nodes": [{"host": "a", "user": 7}]}, "nodes[0].user must be a user name, not 7"),
        ({"nodes": [{"host": "a"}, {"host": "b", "python": 3}]}, "nodes[1].python must be a Python command or path, not 3"),
        ({"nodes": [{"host": "a", "identity_file": 5}]}, "nodes[0].identity_file must be a path to a key file, not 5"),
        ({"nodes": [{"host": "a", "node_address": 5}]}, "nodes[0].node_address must be a host name or address, not 5"),
        ({"nodes": [{"host": "a", "port": True}]}, "nodes[0].port must be an SSH port number (1-65535), not True"),
        ({"nodes": [{"host": "a", "port": "22"}]}, "nodes[0].port must be an SSH port number (1-65535), not '22'"),
        ({"nodes": [{"host": "a", "num_cpus": "eight"}]}, "nodes[0].num_cpus must be a number >= 0, not 'eight'"),
        ({"nodes": [{"host": "a", "num_gpus": 1.5}]}, "nodes[0].num_gpus must be a whole number >= 0, not 1.5"),
        ({"nodes": [{"host": "a", "num_gpus": False}]}, "nodes[0].num_gpus must be a whole number >= 0, not False"),
        ({"head": {"host": 10}}, "head.host must be a host name or address, not 10"),
        ({"head": {"num_cpus": "eight"}}, "head.num_cpus must be a number >= 0, not 'eight'"),
        ({"head": {"num_cpus": -1}}, "head.num_cpus must be a number >= 0, not -1"),
        ({"head": {"num_gpus": "1"}}, "head.num_gpus must be a whole number >= 0, not '1'"),
        ({"head": {"port": True}}, "head.port must be a port number (0: any free one), not True"),
        ({"head": []}, "'head' must be a mapping with keys among"),
    ],
)
def test_a_cluster_file_value_of_the_wrong_type_is_refused_naming_its_key(tmp_path, data, message):
    with pytest.raises(ValueError) as caught:
        ClusterFile.load(data)
    assert f"cluster: {message}" in str(caught.value)
    path = tmp_path / "cluster.yaml"  # from a file: the file's name first
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError) as caught:
        ClusterFile.load(str(path))
    assert f"{path}: {message}" in str(caught.value)


def test_well_typed_values_load_and_a_null_optional_string_is_its_default():
    plan = ClusterFile.load(
        {
            "head": {"host": "10.0.0.1", "port": 0, "num_cpus": 2.5, "num_gpus": 0},
            "nodes": [{"host": "b", "user": None, "identity_file": None, "port": 2222, "num_cpus": 4, "num_gpus": 8}],
        }
    )
    assert (plan.host, plan.port, plan.num_cpus, plan.num_gpus) == ("10.0.0.1", 0, 2.5, 0)
    (node,) = plan.nodes
    assert (node.user, node.identity_file, node.port, node.python, node.num_gpus) == (None, None, 2222, "python3", 8)
    with pytest.raises(ValueError, match=r"nodes\[0\]\.python must be"):  # python has a default, but null is not it
        ClusterFile.load({"nodes": [{"host": "b", "python": None}]})


def test_up_with_a_badly_typed_cluster_file_says_so_in_one_line_and_starts_nothing(machine):
    cluster = os.path.join(machine.tmp, "cluster.yaml")
    with open(cluster, "w") as f:
        f.write("head: {host: 127.0.0.1, port: 0}\nnodes: [{host: 127.0.0.1, identity_file: 5}]\n")
    line = _one_line(machine.cli("up", cluster, check=False), "up")
    assert line.endswith(f"{cluster}: nodes[0].identity_file must be a path to a key file, not 5")
    assert _sessions(machine) == []


# -- key files: a bad one is one line naming it, before anything is made ---------------------------


def _bad_key(folder: str, fault: str) -> tuple[str, str]:
    """A key file with ``fault``, and what the error must say about it."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{fault}.key")
    if fault == "missing":
        return path, f"cluster key file {path} ($ACTORLIB_KEY_FILE): No such file or directory"
    if fault == "too-open":
        write_key_file(path, generate_key())
        os.chmod(path, 0o644)
        return path, f"cluster key file {path} has mode 644: it must be readable by its owner only (0600)"
    write_key_file(path, "short")
    return path, f"cluster key file {path} ($ACTORLIB_KEY_FILE): a cluster key is 40 characters of Z85, not 5 characters"


@pytest.mark.parametrize("fault", ["missing", "too-open", "short"])
@pytest.mark.parametrize("command", ["start", "status"])
def test_a_bad_key_file_is_one_line_naming_it_and_leaves_no_session(machine, command, fault):
    key_file, says = _bad_key(os.path.join(machine.tmp, "keys"), fault)
    machine.env["ACTORLIB_KEY_FILE"] = key_file
    # Nothing listens at 127.0.0.1:1: the key is read (and refused) before anything is connected or started.
    line = _one_line(machine.cli(command, "--address", "127.0.0.1:1", check=False), command)
    assert line == f"actorlib {command}: {says}"
    assert _sessions(machine) == []


# -- up: the head it started, with that head's key, whatever the environment names -----------------


@pytest.mark.parametrize("env", ["ACTORLIB_KEY_FILE", "ACTORLIB_ADDRESS"])
def test_up_asks_the_head_it_started_not_the_one_the_environment_names(machine, env):
    other_key = os.path.join(machine.tmp, "other.key")
    write_key_file(other_key, generate_key())  # valid, but not the new head's key
    machine.env[env] = other_key if env == "ACTORLIB_KEY_FILE" else "127.0.0.1:1"
    cluster = os.path.join(machine.tmp, "cluster.yaml")
    with open(cluster, "w") as f:  # one node whose ssh fails at once (no network): up reports it, from its head
        f.write("head: {host: 127.0.0.1, port: 0}\nnodes: [{host: 127.0.0.1, ssh_options: ['-o', 'ProxyCommand=false']}]\n")
    try:
        up = machine.cli("up", cluster, "--timeout", "5", check=False)
        assert "actorlib head started at 127.0.0.1:" in up.stdout, up.stderr
        assert "no answer from a head" not in up.stderr and "no cluster key" not in up.stderr, up.stderr
        assert "127.0.0.1: FAILED" in up.stdout and "ssh exited with code 255" in up.stdout, (up.stdout, up.stderr)
        assert up.returncode == 1 and "1 of 1 nodes did not join" in up.stderr
    finally:
        down = machine.cli("down", cluster, check=False)
    assert down.returncode == 0 and "stopped the head" in down.stdout, (down.stdout, down.stderr)


@pytest.mark.parametrize("fault", ["missing", "too-open", "short"])
def test_a_bad_key_file_makes_init_raise_head_unreachable_naming_it(machine, fault):
    """It was a raw FileNotFoundError, PermissionError or ValueError naming neither the file nor the variable."""
    key_file, _ = _bad_key(os.path.join(machine.tmp, "keys"), fault)
    out = machine.python(
        'import actorlib\ntry:\n    actorlib.init(address="127.0.0.1:1")\nexcept actorlib.HeadUnreachableError as exc:\n    print(exc)\n',
        ACTORLIB_KEY_FILE=key_file,
    )
    assert out.stdout.startswith(f"cannot use the cluster key file {key_file} (ACTORLIB_KEY_FILE"), out.stdout


def test_a_remote_path_from_home_is_left_for_the_remote_shell_to_expand():
    """shlex quoted '~/venv/bin/python' whole: the remote shell looked for a file named '~' ('No such file')."""
    from scheduler.ssh import parse_nodes

    (node,) = parse_nodes(
        [{"host": "h", "python": "~/venv/bin/python", "env_vars": {"DATA": "~/data set"}, "resources": {"a=~/b": 1}}]
    )
    remote = node.command("tcp://10.0.0.1:6380", "n" * 32)[-1]
    assert remote.startswith('env DATA="$HOME"/\'data set\' "$HOME"/venv/bin/python -m scheduler node')
    assert """--resources '{"a=~/b":1}'""" in remote  # only the python and env values: the rest is quoted whole
