"""Node agents on other machines, started over SSH.

For each host, the head runs ``ssh ... PYTHON -m scheduler node --head ...
--key-stdin --exit-with-stdin`` and writes the cluster secret to the SSH
channel's standard input (never on a command line, where ``ps`` shows it).
The channel then stays open as the node's lifeline: when the head stops, or
dies (the ``ssh`` client gets the parent-death signal), the channel closes,
the remote agent reads end-of-file and stops with its workers. Heartbeats
catch what the channel does not (a cut network).
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .forkserver import set_parent_death_signal
from .threads import in_own_thread

__all__ = ["SSHNode", "SSHLaunch", "check_number", "parse_nodes"]


@dataclass(frozen=True)
class SSHNode:
    """One machine of a cluster file's ``nodes:`` list."""

    host: str
    user: str | None = None
    port: int = 22
    identity_file: str | None = None
    python: str = "python3"
    env_vars: dict[str, str] = field(default_factory=dict)
    num_cpus: float | None = None
    num_gpus: int | None = None
    resources: dict[str, float] = field(default_factory=dict)
    node_address: str | None = None  # the address its workers bind to; the SSH host by default
    ssh_options: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, d: Any, where: str = "node") -> SSHNode:
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a mapping with at least 'host', not {d!r}")
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(known)})")
        args = dict(d)
        for key, what in _STRINGS.items():
            value = args.get(key)
            if key != "host" and (key not in args or (value is None and key in _OPTIONAL)):
                continue  # not set: its default
            if not isinstance(value, str) or not value:
                raise ValueError(f"{where}.{key} must be {what}, not {value!r}")
        if "port" in args:
            check_number(args["port"], f"{where}.port", "an SSH port number (1-65535)", whole=True, low=1, high=65535)
        for key, whole in (("num_cpus", False), ("num_gpus", True)):
            if args.get(key) is not None:
                check_number(args[key], f"{where}.{key}", "a whole number >= 0" if whole else "a number >= 0", whole=whole)
        for key in ("env_vars", "resources"):
            if not isinstance(args.get(key, {}), dict):
                raise ValueError(f"{where}.{key} must be a mapping")
        args["env_vars"] = {str(k): str(v) for k, v in args.get("env_vars", {}).items()}
        opts = args.get("ssh_options", [])
        if not isinstance(opts, list | tuple) or not all(isinstance(o, str) for o in opts):
            raise ValueError(f"{where}.ssh_options must be a list of strings")
        args["ssh_options"] = tuple(opts)
        if args.get("identity_file"):
            args["identity_file"] = os.path.expanduser(args["identity_file"])
        return cls(**args)

    @property
    def target(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    def command(self, head_address: str, node_id: str) -> list[str]:
        """The ``ssh`` command line that starts this node's agent (the secret is not in it)."""
        remote = [
            "-m",
            "scheduler",
            "node",
            "--head",
            head_address,
            "--node-id",
            node_id,
            "--host",
            self.node_address or self.host,
            "--resources",
            _json(self.resources),
            "--key-stdin",
            "--exit-with-stdin",
        ]
        if self.num_cpus is not None:
            remote += ["--num-cpus", str(self.num_cpus)]
        if self.num_gpus is not None:
            remote += ["--num-gpus", str(self.num_gpus)]
        ssh = ["ssh", "-T", "-o", "BatchMode=yes", "-o", "ServerAliveInterval=5", "-p", str(self.port)]
        if self.identity_file:
            ssh += ["-i", self.identity_file, "-o", "IdentitiesOnly=yes"]
        # for the remote shell: quoted, except that a path from home (~/) in the python or an env value is left
        # for it to expand (quoted whole, it looked for a file named '~')
        words = ["env", *(shlex.quote(f"{k}=") + _from_home(v) for k, v in self.env_vars.items()), _from_home(self.python)]
        return [*ssh, *self.ssh_options, self.target, " ".join([*words, *map(shlex.quote, remote)])]


_STRINGS = {
    "host": "a host name or address",
    "user": "a user name",
    "python": "a Python command or path",
    "identity_file": "a path to a key file",
    "node_address": "a host name or address",
}
_OPTIONAL = {"user", "identity_file", "node_address"}  # null: not set


def check_number(value: Any, name: str, what: str, *, whole: bool, low: float = 0, high: float = float("inf")) -> None:
    """Refuse ``value`` unless it is an int (or, unless ``whole``, a float) in ``[low, high]``: never a bool or a string."""
    number = isinstance(value, int) or (not whole and isinstance(value, float))
    if isinstance(value, bool) or not number or not low <= value <= high:
        raise ValueError(f"{name} must be {what}, not {value!r}")


def parse_nodes(nodes: Any) -> list[SSHNode]:
    if nodes is None:
        return []
    if not isinstance(nodes, list):
        raise ValueError(f"'nodes' must be a list of hosts, not {type(nodes).__name__}")
    return [SSHNode.from_dict(d, where=f"nodes[{i}]") for i, d in enumerate(nodes)]


class SSHLaunch:
    """One ``ssh`` process running one remote node agent; its output goes to a log file."""

    def __init__(self, node: SSHNode, head_address: str, secret: str | None, log_dir: str) -> None:
        self.node = node
        self.node_id = uuid.uuid4().hex
        self.log_path = os.path.join(log_dir, f"ssh-{node.host}-{self.node_id[:8]}.log")
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(
                node.command(head_address, self.node_id),
                stdin=subprocess.PIPE,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        assert self.proc.stdin is not None
        try:  # one short line: fits the pipe buffer, never blocks
            self.proc.stdin.write(((secret or "") + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # ssh already exited: the caller reads why from the log

    def failure(self) -> str:
        """Why the launch failed, from ssh's exit status and the last lines it wrote."""
        code = self.proc.poll()
        try:
            with open(self.log_path, errors="replace") as f:
                tail = "".join(f.readlines()[-8:]).strip()
        except OSError:
            tail = ""
        how = f"ssh exited with code {code}" if code is not None else "the node did not join in time"
        return f"node {self.node.target} (port {self.node.port}): {how}" + (f":\n{tail}" if tail else "")

    def watch(self, loop: asyncio.AbstractEventLoop, on_exit: Callable[[int | None], None]) -> asyncio.Future[None]:
        """A future done once ``ssh`` has exited, after ``on_exit(code)`` ran on the loop."""
        return in_own_thread(loop, self.proc.wait, then=lambda: on_exit(self.proc.returncode), name=f"ssh-{self.node.host}")

    async def stop(self, timeout: float = 10.0, *, joined: bool = True) -> None:
        """Close the lifeline (the remote agent stops), then make sure ``ssh`` is gone. One that never joined
        is terminated at once (an ``ssh`` still connecting pays no heed to its stdin)."""
        await asyncio.to_thread(self._stop, timeout, joined)

    def _stop(self, timeout: float, joined: bool = True) -> None:
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout if joined else 0.1)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _from_home(value: str) -> str:
    """``value`` quoted for the remote shell; one starting ``~/`` as the remote home's ``"$HOME"/...``."""
    return '"$HOME"/' + shlex.quote(value[2:]) if value.startswith("~/") else shlex.quote(value)


def _die_with_parent() -> None:
    os.setpgrp()  # a group of its own: a terminal's Ctrl-C is for the driver, not for the nodes' lifelines
    set_parent_death_signal(signal.SIGTERM)


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))
