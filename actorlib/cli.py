"""``actorlib``: start, stop and inspect a standalone cluster.

::

    actorlib start --head [--port 6380] [--host ADDR] [--num-cpus N] [--num-gpus N] [--resources JSON] [--block]
    actorlib start --address HOST:PORT [--host ADDR] [...]      # a node that joins that head
    actorlib stop                                               # what `start` started on this machine
    actorlib status [--address HOST:PORT] [--json]
    actorlib up CLUSTER.yaml                                    # a head here, a node on each host over SSH
    actorlib down CLUSTER.yaml

Heads and nodes run as daemons (their own session, output in their session's
``logs/``); ``--block`` keeps one in the foreground instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from scheduler.cluster_file import ClusterFile
from scheduler.session import (
    DEFAULT_PORT,
    find_head,
    locate_head,
    new_session_dir,
    process_alive,
    process_start_time,
    read_started,
    record_started,
)
from transport import (
    ClusterKey,
    Endpoint,
    RemoteFailure,
    control_call,
    generate_key,
    read_key_file,
    set_cluster_key,
    write_key_file,
)

from .progress import gather_with_progress

__all__ = ["main"]

_READY_TIMEOUT = 75.0  # past a node's own join timeout (60 s), so that it can say why it did not join
_STOP_TIMEOUT = 20.0


class CLIError(Exception):
    """A failure the user can fix; printed without a traceback."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="actorlib", description="Start, stop and inspect actorlib clusters.")
    sub = parser.add_subparsers(dest="command", required=True)

    start = sub.add_parser("start", help="start a head (--head) or a node that joins one (--address)")
    role = start.add_mutually_exclusive_group(required=True)
    role.add_argument("--head", action="store_true", help="start a head and its local node")
    role.add_argument("--address", help="join the head at HOST:PORT as a node ('auto': the head running here)")
    start.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"the head's port (default {DEFAULT_PORT}; 0: any free port)")
    start.add_argument(
        "--host",
        default=None,
        help="the address to bind and advertise (default: 127.0.0.1 for a head; for a node, its address on the route to the head)",
    )
    start.add_argument("--num-cpus", type=float, default=None)
    start.add_argument("--num-gpus", type=int, default=None)
    start.add_argument("--resources", default="{}", help='custom resources as JSON, e.g. \'{"trainer": 1}\'')
    start.add_argument("--block", action="store_true", help="stay in the foreground until interrupted")

    stop = sub.add_parser("stop", help="stop the heads and nodes `actorlib start` started on this machine")
    stop.add_argument("--timeout", type=float, default=_STOP_TIMEOUT)

    status = sub.add_parser("status", help="nodes, actors, placement groups and pending demands")
    status.add_argument("--address", default="auto", help="HOST:PORT of the head (default: the one running here)")
    status.add_argument("--json", action="store_true", help="machine-readable output")

    up = sub.add_parser("up", help="start a head here and a node on each host of CLUSTER.yaml over SSH")
    up.add_argument("cluster_file")
    up.add_argument("--timeout", type=float, default=120.0, help="how long nodes may take to join")
    down = sub.add_parser("down", help="stop the cluster `actorlib up CLUSTER.yaml` started")
    down.add_argument("cluster_file")
    down.add_argument("--timeout", type=float, default=_STOP_TIMEOUT)

    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            return _start(args)
        if args.command == "stop":
            return _stop(args.timeout)
        if args.command == "status":
            return _status(args.address, args.json)
        if args.command == "up":
            return _up(args.cluster_file, args.timeout)
        return _down(args.cluster_file, args.timeout)
    except CLIError as exc:
        print(f"actorlib {args.command}: {exc}", file=sys.stderr)
        return 1


# -- start --------------------------------------------------------------------


def _start(args: argparse.Namespace) -> int:
    try:
        resources = json.loads(args.resources)
    except ValueError as exc:
        raise CLIError(f"--resources is not JSON: {exc}") from None
    if not isinstance(resources, dict):
        raise CLIError("--resources must be a JSON object, e.g. '{\"trainer\": 1}'")
    options = _node_options(args.num_cpus, args.num_gpus, resources)
    if args.head:
        head = _start_head(args.host or "127.0.0.1", args.port, options, block=args.block)
        if isinstance(head, int):  # --block: the head's own exit status
            return head
        _print_head(head)
        return 0
    head_address, key_file = _locate(args.address)
    secret = read_key(key_file)  # before the session directory: a bad key leaves nothing behind
    host = args.host or default_host(towards=head_address)
    session_dir = new_session_dir()
    cmd = [sys.executable, "-m", "scheduler", "node", "--head", head_address, "--host", host, "--key-stdin"]
    cmd += ["--session-dir", session_dir, *options]
    if args.block:
        return _foreground(cmd + ["--die-with-parent", str(os.getpid())], secret)
    info = _daemon(cmd, "node", secret, session_dir)
    record_started(info["pid"], {"role": "node", "address": head_address, "key_file": key_file, **info})
    print(f"node {info['node_id'][:8]} (pid {info['pid']}) joined the head at {head_address}")
    return 0


def _node_options(num_cpus: float | None, num_gpus: int | None, resources: dict[str, Any]) -> list[str]:
    opts = ["--resources", json.dumps(resources)]
    if num_cpus is not None:
        opts += ["--num-cpus", str(num_cpus)]
    if num_gpus is not None:
        opts += ["--num-gpus", str(num_gpus)]
    return opts


def _start_head(host: str, port: int, options: list[str], *, block: bool, **record: Any) -> dict[str, Any] | int:
    """Start a head; its ready file's contents, or with ``block`` its exit status once it has stopped."""
    running = find_head()
    if running is not None:
        raise CLIError(f"a head is already running on this machine at {running['address']} (pid {running['pid']}); run `actorlib stop` first")
    session_dir = new_session_dir()
    key_file = os.path.join(session_dir, "cluster.key")
    write_key_file(key_file, generate_key())
    cmd = [sys.executable, "-m", "scheduler", "head", "--host", host, "--port", str(port), "--session-dir", session_dir]
    cmd += ["--key-file", key_file, *options]
    if block:
        return _foreground(cmd + ["--die-with-parent", str(os.getpid())], None)  # gone with this process, however it ends
    info = _daemon(cmd, "head", None, session_dir)
    if record:
        record_started(info["pid"], {**info, **record})
    return info


def _daemon(cmd: list[str], what: str, secret: str | None, session_dir: str) -> dict[str, Any]:
    """Start ``cmd`` in a session of its own; return what it wrote to its ready file, or raise with its output."""
    ready = os.path.join(session_dir, f"{what}.ready")
    log_path = os.path.join(session_dir, "logs", f"{what}.log")
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            [*cmd, "--ready-file", ready],
            stdin=subprocess.PIPE,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # not in this terminal's process group: Ctrl-C here does not reach it
        )
    assert proc.stdin is not None
    with proc.stdin:
        proc.stdin.write(((secret or "") + "\n").encode())
    deadline = time.monotonic() + _READY_TIMEOUT
    while not os.path.exists(ready):
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            raise CLIError(f"the {what} did not start (exit code {proc.returncode}); its output ({log_path}):\n{_tail(log_path)}")
        time.sleep(0.05)
    with open(ready) as f:
        info = json.load(f)
    return {**info, "pid": proc.pid, "start_time": process_start_time(proc.pid), "log": log_path}


def _tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:]).rstrip()
    except OSError as exc:
        return f"(unreadable: {exc})"


def _foreground(cmd: list[str], secret: str | None) -> int:
    """Run ``cmd`` until it exits; SIGINT or SIGTERM here stops it (cleanly: it gets the same signal)."""
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE)
    assert proc.stdin is not None
    with proc.stdin:
        proc.stdin.write(((secret or "") + "\n").encode())

    def forward(sig: int, _frame: Any) -> None:
        if proc.poll() is None:
            proc.send_signal(sig)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    return proc.wait()


def _print_head(info: dict[str, Any]) -> None:
    address = info["address"][len("tcp://") :]
    print(f"actorlib head started at {address} (pid {info['pid']})")
    print(f"  session:   {info['session_dir']}  (logs in logs/, cluster key in cluster.key, mode 0600)")
    print()
    print("Connect a driver on this machine:")
    print('    actorlib.init(address="auto")')
    if address.startswith("127.") or address.startswith("localhost:"):
        print("Other machines cannot reach it: it listens on loopback only (start it with --host <this machine's")
        print("address> to take drivers and nodes from elsewhere).")
    else:
        print("from another machine (copy the key there over SSH first; keep it mode 0600):")
        print(f'    ACTORLIB_KEY_FILE=/path/to/cluster.key python -c \'import actorlib; actorlib.init(address="{address}")\'')
        print("Join a node from another machine:")
        print(f"    ACTORLIB_KEY_FILE=/path/to/cluster.key actorlib start --address {address}")
    print("Status and stop:  actorlib status   actorlib stop")


def default_host(towards: str) -> str:
    """This machine's address on the route to ``towards`` (a ``tcp://`` address); else loopback.

    A UDP ``connect`` only asks the kernel for a route: no packet is sent.
    """
    target = towards[len("tcp://") :].rsplit(":", 1)[0]
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((target, 9))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


# -- stop -----------------------------------------------------------------------


def _stop(timeout: float) -> int:
    started = read_started()
    if not started:
        print("nothing to stop: no head or node started by `actorlib start` runs on this machine")
        return 0
    stuck: set[int] = set()
    for heads in (False, True):  # nodes first (they leave their head cleanly), then heads
        group = [i for i in started if (i.get("role") == "head") == heads]
        stuck |= _terminate([(i["pid"], i.get("start_time"), f"{i.get('role', 'process')} (pid {i['pid']})") for i in group], timeout)
    for info in started:
        if info["pid"] not in stuck:
            print(f"stopped {info.get('role', 'process')} (pid {info['pid']})")
    return 1 if stuck else 0


def _terminate(procs: list[tuple[int, str | None, str]], timeout: float) -> set[int]:
    """SIGTERM each; SIGKILL what still runs after ``timeout``; return the pids that would not die."""
    for pid, start_time, _ in procs:
        if process_alive(pid, start_time):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(process_alive(p, t) for p, t, _ in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    stuck = set()
    for pid, start_time, what in procs:
        if process_alive(pid, start_time):
            print(f"{what} did not stop within {timeout:g} s: killing it", file=sys.stderr)
            os.kill(pid, signal.SIGKILL)
            stuck.add(pid)
    return stuck


# -- status ---------------------------------------------------------------------


def _locate(address: str, key_file: str | None = None) -> tuple[str, str]:
    try:
        head_address, key_file = locate_head(address, key_file)
    except (LookupError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    if key_file is None:
        raise CLIError(f"no cluster key for the head at {head_address}: set ACTORLIB_KEY_FILE to a copy of its cluster.key")
    return head_address, key_file


def ask_head(address: str, op: str, timeout: float = 15.0, **kwargs: Any) -> Any:
    """One control request to the head at ``address`` ('auto', HOST:PORT), as a client, not a driver."""
    return with_head(address, lambda ep: control_call(ep, op, timeout=timeout, **kwargs), timeout)


def read_key(key_file: str) -> str:
    """The cluster secret in ``key_file``, checked; a missing, unreadable, too open or malformed file is a :class:`CLIError`."""
    named = f"cluster key file {key_file}" + (" ($ACTORLIB_KEY_FILE)" if os.environ.get("ACTORLIB_KEY_FILE") == key_file else "")
    try:
        secret = read_key_file(key_file)
        ClusterKey(secret)
    except OSError as exc:  # missing, unreadable, or (PermissionError, naming the file) not mode 0600
        raise CLIError(f"{named}: {exc.strerror}" if exc.strerror else str(exc)) from None
    except ValueError as exc:  # not 40 characters of Z85, or not text
        raise CLIError(f"{named}: {exc}") from None
    return secret


def with_head(address: str, use: Callable[[Endpoint], Awaitable[Any]], timeout: float, key_file: str | None = None) -> Any:
    """Run ``use(endpoint)`` on a connection to the head at ``address`` (with ``key_file``, else the one
    :func:`locate_head` finds); its failures become :class:`CLIError`."""
    head_address, key_file = _locate(address, key_file)
    set_cluster_key(read_key(key_file))

    async def run() -> Any:
        ep = Endpoint.connect(head_address, on_message=None, name="actorlib cli")
        try:
            return await use(ep)
        finally:
            ep.close()

    try:
        return asyncio.run(run())
    except asyncio.TimeoutError:
        raise CLIError(
            f"no answer from a head at {head_address} within {timeout:g} s: is it running, and is the cluster key right?"
        ) from None
    except RemoteFailure as exc:
        raise CLIError(f"the head refused: {exc}") from None


def _status(address: str, as_json: bool) -> int:
    status = ask_head(address, "status")
    if as_json:
        print(json.dumps(status, indent=2, default=str))
    else:
        print(render_status(status))
    return 0


def render_status(st: dict[str, Any]) -> str:
    """The status as tables a terminal shows well."""
    nodes = st["nodes"]
    alive = sum(1 for n in nodes if n["alive"])
    out = [f"actorlib cluster at {st['address']}  (session {st['session_dir']})", ""]
    out.append(f"Nodes: {alive} alive, {len(nodes) - alive} dead")
    rows = []
    for n in nodes:
        used = ", ".join(_usage(k, v, n["available"].get(k, 0.0) if n["alive"] else None) for k, v in sorted(n["resources"].items()))
        rows.append([n["node_id"][:8], "ALIVE" if n["alive"] else "DEAD", n["address"], n["hostname"], "head" if n["is_head_node"] else "", used])
    out += _table(["NODE", "STATE", "ADDRESS", "HOSTNAME", "", "RESOURCES (used/total)"], rows)
    actors = st["actors"]
    out += ["", f"Actors: {len(actors)}"]
    rows = [
        [a.get("name") or "-", a["class_name"], a["state"], (a.get("node_id") or "-")[:8], str(a.get("pid") or "-"), str(a.get("restarts", 0))]
        for a in actors
    ]
    out += _table(["NAME", "CLASS", "STATE", "NODE", "PID", "RESTARTS"], rows)
    pgs = st["placement_groups"]
    out += ["", f"Placement groups: {len(pgs)}"]
    rows = [[p["id"][:8], p.get("name") or "-", p["state"], p["strategy"], str(len(p["bundles"])), p.get("pending_reason", "")] for p in pgs]
    out += _table(["ID", "NAME", "STATE", "STRATEGY", "BUNDLES", "WHY PENDING"], rows)
    out += ["", f"Pending demands: {len(st['pending'])}"]
    rows = [[d.get("name") or d["class_name"], json.dumps(d["demand"]), d["reason"]] for d in st["pending"]]
    out += _table(["ACTOR", "DEMAND", "WHY"], rows)
    return "\n".join(out)


def _usage(key: str, total: float, available: float | None) -> str:
    used = "?" if available is None else f"{total - available:g}"
    return f"{key} {used}/{total:g}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    if not rows:
        return ["  (none)"]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return ["  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]


# -- up / down --------------------------------------------------------------------


def _up(path: str, timeout: float) -> int:
    try:
        plan = ClusterFile.load(path)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    options = _node_options(plan.num_cpus, plan.num_gpus, plan.resources)
    head = _start_head(plan.host, plan.port, options, block=False, role="head", cluster_file=os.path.abspath(path))
    assert isinstance(head, dict)
    _print_head(head)
    if not plan.nodes:
        return 0
    print(f"\nstarting {len(plan.nodes)} node(s) over SSH ...", flush=True)

    async def launch_all(ep: Endpoint) -> list[dict[str, Any]]:
        async def launch(node: dict[str, Any]) -> dict[str, Any]:
            (result,) = await control_call(ep, "launch_nodes", timeout=timeout + 30, nodes=[node], timeout_s=timeout)
            return result

        return await gather_with_progress(plan.node_dicts(), launch, "nodes joining over SSH")

    # This head, with its own key: neither $ACTORLIB_ADDRESS nor $ACTORLIB_KEY_FILE names another one.
    results = with_head(head["address"], launch_all, timeout + 30, key_file=head["key_file"])
    for r in results:
        print(f"  {r['host']}: " + (f"joined as node {r['node_id'][:8]}" if r["ok"] else f"FAILED\n    {r['error']}"))
    failed = sum(1 for r in results if not r["ok"])
    if failed:
        print(f"{failed} of {len(results)} nodes did not join; the head keeps running (`actorlib down {path}` stops it)", file=sys.stderr)
        return 1
    return 0


def _down(path: str, timeout: float) -> int:
    wanted = os.path.abspath(path)
    heads = [i for i in read_started() if i.get("role") == "head" and i.get("cluster_file") == wanted]
    if not heads:
        print(f"no cluster started by `actorlib up {path}` runs on this machine")
        return 0
    stuck = _terminate([(h["pid"], h.get("start_time"), f"head (pid {h['pid']})") for h in heads], timeout)
    for h in heads:
        if h["pid"] not in stuck:
            print(f"stopped the head at {h['address']} (pid {h['pid']}) and the nodes it started over SSH")
    return 1 if stuck else 0


if __name__ == "__main__":
    sys.exit(main())
