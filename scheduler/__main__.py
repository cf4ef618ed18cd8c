"""``python -m scheduler head|node ...``: a standalone head, or a node agent, as a process of its own.

``actorlib start`` and ``actorlib up`` run these; so does the head, over SSH,
for nodes on other machines. The cluster secret comes from a key file
(``--key-file``, mode 0600) or the first line of standard input
(``--key-stdin``), never from the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import uuid
from typing import Any

import uvloop

from transport import read_key_file, set_cluster_key

from .forkserver import set_parent_death_signal
from .head import Head
from .node import NodeAgent
from .resources import node_resources
from .session import forget_started, hold_session, new_session_dir, process_start_time, record_started, remove_sockets, socket_dir

_JOIN_TIMEOUT = 60.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scheduler")
    sub = parser.add_subparsers(dest="command", required=True)

    head = sub.add_parser("head", help="run a standalone head and its local node")
    head.add_argument("--host", required=True, help="the address to bind and advertise, e.g. 10.0.0.1")
    head.add_argument("--port", type=int, required=True)
    head.add_argument("--session-dir", required=True)
    _die_with_parent(head)
    _node_options(head)

    node = sub.add_parser("node", help="run a node agent that joins a head")
    node.add_argument("--head", required=True, help="the head's address, e.g. tcp://10.0.0.1:6380")
    node.add_argument("--session-dir", default=None, help="default: a new session directory on this machine")
    node.add_argument("--node-id", default=None)
    node.add_argument("--host", default="127.0.0.1", help="the address this node's workers bind to")
    _die_with_parent(node)
    node.add_argument("--exit-with-stdin", action="store_true", help="exit when standard input closes (an SSH lifeline)")
    _node_options(node)
    args = parser.parse_args(argv)
    if args.key_file:
        args.key_file = os.path.abspath(args.key_file)
    if args.session_dir:
        hold_session(args.session_dir)  # in use while this process runs: never pruned meanwhile

    if args.die_with_parent is not None:
        parent = args.die_with_parent or os.getppid()  # the pid given: the parent may have died while this one started
        set_parent_death_signal(signal.SIGTERM)
        if os.getppid() != parent:
            return 1
    try:
        resources = json.loads(args.resources)
        if not isinstance(resources, dict):
            raise ValueError("not a JSON object")
        totals, gpu_ids = node_resources(args.num_cpus, args.num_gpus, resources)
        secret = sys.stdin.readline().strip() if args.key_stdin else read_key_file(args.key_file) if args.key_file else None
        set_cluster_key(secret or None)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    common: dict[str, Any] = {
        "resources": totals,
        "gpu_ids": gpu_ids,
        "worker_preload": [m for m in args.worker_preload.split(",") if m],
        "worker_entry": args.worker_entry,
    }
    if args.command == "head":
        return uvloop.run(_run_head(args, common))
    agent = NodeAgent(
        head_address=args.head,
        node_id=args.node_id or uuid.uuid4().hex,
        session_dir=args.session_dir or new_session_dir(),
        host=args.host,
        **common,
    )
    try:
        return uvloop.run(_run_node(agent, args.exit_with_stdin, args.ready_file))
    finally:
        try:  # its logs stay; its socket directory goes if nothing else (a head) still has a socket there
            os.rmdir(socket_dir(agent.session_dir))
        except OSError:
            pass


def _die_with_parent(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--die-with-parent",
        nargs="?",
        const=0,
        type=int,
        default=None,
        metavar="PID",
        help="exit when the process that started this one (pid PID, if given) exits",
    )


def _node_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-cpus", type=float, default=None)
    p.add_argument("--num-gpus", type=int, default=None)
    p.add_argument("--resources", default="{}", help="custom resources as JSON")
    p.add_argument("--key-file", default=None, help="the cluster key (a file of mode 0600)")
    p.add_argument("--key-stdin", action="store_true", help="read the cluster key from the first line of standard input")
    p.add_argument("--ready-file", default=None, help="write this file once serving (for whoever started this process)")
    p.add_argument("--worker-preload", default="actorlib.worker")
    p.add_argument("--worker-entry", default="actorlib.worker:main")


def _stop_signals() -> asyncio.Event:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def _first(*events: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


def _ready(path: str | None, info: dict[str, Any]) -> None:
    if path:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(info, f)
        os.replace(tmp, path)


async def _run_node(agent: NodeAgent, exit_with_stdin: bool, ready_file: str | None) -> int:
    stop = _stop_signals()
    if exit_with_stdin:  # the SSH channel closed: whoever launched this node is gone
        asyncio.get_running_loop().add_reader(sys.stdin.fileno(), _on_stdin, stop)
    joining = asyncio.ensure_future(agent.start(timeout=_JOIN_TIMEOUT))
    stopped = asyncio.ensure_future(stop.wait())  # SIGTERM (its parent's death too) while it joins: now, not then
    await asyncio.wait({joining, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not joining.done():
        joining.cancel()
        await asyncio.gather(joining, return_exceptions=True)
        await agent.stop()
        print(f"node {agent.node_id[:8]} was stopped while it joined {agent.head_address}", file=sys.stderr, flush=True)
        return 1
    try:
        joining.result()
    except Exception as exc:
        await agent.stop()
        print(f"node {agent.node_id[:8]} could not join {agent.head_address}: {exc}", file=sys.stderr, flush=True)
        return 1
    print(f"node {agent.node_id} joined {agent.head_address}", flush=True)
    _ready(ready_file, {"node_id": agent.node_id, "pid": os.getpid()})
    try:
        await _first(stop, agent.finished)
    finally:
        await agent.stop()
        forget_started(os.getpid())
    print(f"node {agent.node_id[:8]} stopped{': ' + agent.why_finished if agent.why_finished else ''}", flush=True)
    return 0


def _on_stdin(stop: asyncio.Event) -> None:
    try:
        data = os.read(sys.stdin.fileno(), 4096)
    except BlockingIOError:
        return
    except OSError:
        data = b""
    if not data:
        asyncio.get_running_loop().remove_reader(sys.stdin.fileno())
        stop.set()


async def _run_head(args: argparse.Namespace, common: dict[str, Any]) -> int:
    stop = _stop_signals()
    head = Head(session_dir=args.session_dir, address=f"tcp://{args.host}:{args.port}")
    try:
        head.start()
    except Exception as exc:
        print(f"the head could not start: {exc}", file=sys.stderr, flush=True)
        return 1
    agent = NodeAgent(
        head_address=head.address, node_id=uuid.uuid4().hex, session_dir=args.session_dir, host=args.host, is_head_node=True, **common
    )
    await agent.start(timeout=_JOIN_TIMEOUT)
    info = {
        "role": "head",
        "address": head.address,
        "session_dir": args.session_dir,
        "key_file": args.key_file,
        "start_time": process_start_time(os.getpid()),
    }
    record_started(os.getpid(), info)
    print(f"head serving at {head.address} (session {args.session_dir})", flush=True)
    _ready(args.ready_file, info)
    try:
        await stop.wait()
    finally:
        await agent.stop()
        await head.stop()
        remove_sockets(args.session_dir)
        forget_started(os.getpid())
    print("head stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
