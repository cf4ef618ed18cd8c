"""A cluster file (YAML) for ``actorlib up`` and ``init(cluster=...)``: the head, and the hosts to join over SSH.

::

    head:
      host: 10.0.0.1          # the address nodes and drivers reach the head at
      port: 6380              # 0: any free port
      num_cpus: 8
      num_gpus: 0
      resources: {}
    nodes:
      - host: 10.0.0.2
        user: ubuntu          # default: yours
        port: 22              # the SSH port
        identity_file: ~/.ssh/id_ed25519
        python: /opt/venv/bin/python
        env_vars: {NCCL_SOCKET_IFNAME: eth0}
        num_gpus: 8
        resources: {trainer: 1}
        ssh_options: ["-o", "UserKnownHostsFile=~/.ssh/cluster_hosts"]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from .session import DEFAULT_PORT
from .ssh import SSHNode, check_number, parse_nodes

__all__ = ["ClusterFile"]

_HEAD_KEYS = {"host", "port", "num_cpus", "num_gpus", "resources"}


@dataclass(frozen=True)
class ClusterFile:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    num_cpus: float | None = None
    num_gpus: int | None = None
    resources: dict[str, float] = field(default_factory=dict)
    nodes: tuple[SSHNode, ...] = ()

    @classmethod
    def load(cls, source: str | dict[str, Any]) -> ClusterFile:
        """Read a cluster file (a path, or the mapping it holds); errors name the file and the key at fault."""
        where = "cluster"
        if isinstance(source, str):
            where = source
            try:
                with open(source) as f:
                    data = yaml.safe_load(f)
            except OSError as exc:
                raise ValueError(f"cannot read cluster file {source}: {exc}") from None
            except yaml.YAMLError as exc:
                raise ValueError(f"cluster file {source} is not valid YAML: {exc}") from None
        else:
            data = source
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a mapping with 'head' and 'nodes'")
        unknown = set(data) - {"head", "nodes"}
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)} (known: head, nodes)")
        head = data.get("head")
        if head is None:
            head = {}
        if not isinstance(head, dict) or set(head) - _HEAD_KEYS:
            raise ValueError(f"{where}: 'head' must be a mapping with keys among {sorted(_HEAD_KEYS)}, not {head!r}")
        try:
            nodes = parse_nodes(data.get("nodes"))
            _check_head(head)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        resources = head.get("resources") or {}
        return cls(
            host=head.get("host", "127.0.0.1"),
            port=head.get("port", DEFAULT_PORT),
            num_cpus=head.get("num_cpus"),
            num_gpus=head.get("num_gpus"),
            resources=resources,
            nodes=tuple(nodes),
        )

    def node_dicts(self) -> list[dict[str, Any]]:
        """The nodes as the head's ``launch_nodes`` operation takes them."""
        out = []
        for n in self.nodes:
            d = {k: getattr(n, k) for k in n.__dataclass_fields__ if getattr(n, k) not in (None, {}, ())}
            if "ssh_options" in d:
                d["ssh_options"] = list(d["ssh_options"])
            out.append(d)
        return out


def _check_head(head: dict[str, Any]) -> None:
    """Refuse a ``head:`` value of the wrong type, naming its key."""
    host = head.get("host", "127.0.0.1")
    if not isinstance(host, str) or not host:
        raise ValueError(f"head.host must be a host name or address, not {host!r}")
    check_number(head.get("port", DEFAULT_PORT), "head.port", "a port number (0: any free one)", whole=True, high=65535)
    for key, whole in (("num_cpus", False), ("num_gpus", True)):
        if head.get(key) is not None:
            check_number(head[key], f"head.{key}", "a whole number >= 0" if whole else "a number >= 0", whole=whole)
    if not isinstance(head.get("resources") or {}, dict):
        raise ValueError("head.resources must be a mapping")
