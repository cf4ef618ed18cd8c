"""``python -m scheduler node ...``: run a node agent as a process of its own."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import uuid

import uvloop

from .forkserver import set_parent_death_signal
from .node import NodeAgent
from .resources import node_resources


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scheduler")
    sub = parser.add_subparsers(dest="command", required=True)
    node = sub.add_parser("node", help="run a node agent that joins a head")
    node.add_argument("--head", required=True, help="the head's address, e.g. tcp://10.0.0.1:6380")
    node.add_argument("--session-dir", required=True)
    node.add_argument("--node-id", default=None)
    node.add_argument("--host", default="127.0.0.1", help="the address this node's workers bind to")
    node.add_argument("--num-cpus", type=float, default=None)
    node.add_argument("--num-gpus", type=int, default=None)
    node.add_argument("--resources", default="{}", help="custom resources as JSON")
    node.add_argument("--die-with-parent", action="store_true", help="exit when the process that started this one exits")
    node.add_argument("--worker-preload", default="actorlib.worker")
    node.add_argument("--worker-entry", default="actorlib.worker:main")
    args = parser.parse_args(argv)

    if args.die_with_parent:
        parent = os.getppid()
        set_parent_death_signal(signal.SIGTERM)
        if os.getppid() != parent:
            return 1
    resources = json.loads(args.resources)
    if not isinstance(resources, dict):
        parser.error("--resources must be a JSON object")
    totals, gpu_ids = node_resources(args.num_cpus, args.num_gpus, resources)
    agent = NodeAgent(
        head_address=args.head,
        node_id=args.node_id or uuid.uuid4().hex,
        resources=totals,
        gpu_ids=gpu_ids,
        session_dir=args.session_dir,
        worker_preload=[m for m in args.worker_preload.split(",") if m],
        worker_entry=args.worker_entry,
        host=args.host,
    )
    return uvloop.run(_run(agent))


async def _run(agent: NodeAgent) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await agent.start()
    print(f"node {agent.node_id} joined {agent.head_address}", flush=True)
    try:
        await stop.wait()
    finally:
        await agent.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
