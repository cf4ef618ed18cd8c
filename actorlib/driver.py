"""A driver process's runtime: the background I/O thread and, in embedded mode, the cluster in it.

``init()`` starts a thread running a uvloop event loop. In embedded mode that
loop also hosts the head and the local node agent (whose fork server is a
child process, and whose workers are that server's children), so nothing
outlives the driver: ``shutdown()`` stops them in order, and if the driver
dies without cleaning up, the kernel's parent-death signal takes the fork
server and then every worker with it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import uvloop

from scheduler import Head, NodeAgent, new_session_dir, release_session, remove_sockets, socket_dir
from scheduler.resources import node_resources
from scheduler.threads import in_own_thread
from transport import generate_key, set_cluster_key, shm
from transport.security import cluster_key

from .exceptions import ActorLibError, HeadUnreachableError
from .progress import gather_with_progress
from .runtime import Runtime

__all__ = ["Driver"]

log = logging.getLogger(__name__)

_START_TIMEOUT = 60.0
_STOP_TIMEOUT = 15.0
_CONNECT_TIMEOUT = float(os.environ.get("ACTORLIB_CONNECT_TIMEOUT_S", "15"))  # for a standalone head's first answer


class Driver:
    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run_loop, name="actorlib-io", daemon=True)
        self._thread.start()
        try:
            self._started.wait(_START_TIMEOUT)
        except BaseException:  # (Ctrl-C) no driver: nor its loop thread
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(_STOP_TIMEOUT)
            raise
        assert self._thread.ident is not None
        self.rt = Runtime(self.loop, self._thread.ident, mode="driver")
        self.head: Head | None = None
        self.node: NodeAgent | None = None
        self.extra_nodes: dict[str, subprocess.Popen[bytes]] = {}
        self._heartbeat: asyncio.Task[None] | None = None
        self._stopping = False
        self.head_address = ""

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._started.set)
        self.loop.run_forever()

    def start_embedded(
        self,
        *,
        num_cpus: float | None,
        num_gpus: int | None,
        resources: dict[str, float] | None,
        namespace: str,
        log_to_driver: bool,
        head_host: str | None = None,
        head_port: int = 0,
    ) -> None:
        """Start the head and the local node in this process: over ``ipc://``, or TCP when ``head_host`` is given.

        Either way the cluster gets a fresh key: every socket of it admits only its own processes.
        """
        set_cluster_key(generate_key())
        address = f"tcp://{head_host}:{head_port}" if head_host is not None else None
        try:
            self.rt.run(self._start_embedded(num_cpus, num_gpus, resources or {}, namespace, log_to_driver, address), _START_TIMEOUT)
        except BaseException:
            self.stop()
            raise

    async def _start_embedded(
        self,
        num_cpus: float | None,
        num_gpus: int | None,
        resources: dict[str, float],
        namespace: str,
        log_to_driver: bool,
        address: str | None,
    ) -> None:
        session_dir = new_session_dir()
        self.head = Head(session_dir=session_dir, address=address or f"ipc://{socket_dir(session_dir)}/head.sock")
        self.head.start()
        totals, gpu_ids = node_resources(num_cpus, num_gpus, resources)
        self.node = NodeAgent(
            head_address=self.head.address,
            node_id=uuid.uuid4().hex,
            resources=totals,
            gpu_ids=gpu_ids,
            session_dir=session_dir,
            worker_preload=["actorlib.worker"],
            worker_entry="actorlib.worker:main",
            is_head_node=True,
            host=address.rsplit(":", 1)[0][len("tcp://") :] if address else "127.0.0.1",
        )
        self.node.show_output = self.rt.show_local_output  # this driver's workers' lines, shown here at once
        self.rt.drain_output = self.node.drain_output
        await self.node.start()
        self.rt.node_id = self.node.node_id
        await self._register(self.head.address, namespace, log_to_driver, timeout=None)

    def start_connected(self, address: str, *, namespace: str, log_to_driver: bool) -> None:
        """Join the standalone head at ``address`` (``tcp://HOST:PORT``) as one more driver."""
        try:
            self.rt.run(self._register(address, namespace, log_to_driver, timeout=_CONNECT_TIMEOUT), _START_TIMEOUT)
        except BaseException:
            self.stop()
            raise

    async def _register(self, address: str, namespace: str, log_to_driver: bool, timeout: float | None) -> None:
        rt = self.rt
        self.head_address = address
        rt.connect_head(address)
        try:
            reply = await rt.control("register_driver", timeout=timeout, namespace=namespace, log_to_driver=log_to_driver)
        except asyncio.TimeoutError:
            raise HeadUnreachableError(
                f"no answer from an actorlib head at {address} within {timeout:g} s: is it running (actorlib status), "
                "is the address right, and does this process hold its cluster key (ACTORLIB_KEY_FILE)?"
            ) from None
        rt.job_id = reply["job_id"]
        rt.session_dir = reply["session_dir"]
        rt.namespace = namespace
        rt.log_to_driver = log_to_driver
        self._heartbeat = self.loop.create_task(self._beat(float(reply.get("heartbeat_s", 1.0))))

    async def _beat(self, every: float) -> None:
        """Tell the head this driver is alive: if it stops (SIGKILL too), its actors are reaped.

        A standalone head that answers none of them for as long as it waits for its nodes' heartbeats
        (``5 * every``) is gone, and its nodes stop their workers: every call fails then, naming it, instead
        of waiting for ever. (Counted in missed beats as well as in time: a pause of this process is no
        silence of the head's.)
        """
        rt = self.rt
        loop = asyncio.get_running_loop()
        last_answer, missed = loop.time(), 0
        while rt.head is not None and not rt.head.closed and not self._stopping:
            try:
                reply = await rt.control("heartbeat", timeout=every * 2)
                last_answer, missed = loop.time(), 0
                if self._stopping:
                    return
                if isinstance(reply, dict) and reply.get("revived"):
                    log.warning("the head had declared this driver dead (it sent nothing for a while): its actors were stopped")
                elif isinstance(reply, dict) and reply.get("rejoin"):
                    await self._rejoin(every)
            except (ActorLibError, asyncio.TimeoutError) as exc:
                log.debug("driver heartbeat: %s", exc)
                missed += 1
                silent = loop.time() - last_answer
                if self.head is None and missed >= 3 and silent > every * 5 and not self._stopping:
                    reason = f"lost the head at {self.head_address}: it has not answered for {silent:.0f} s (stopped or cut off)"
                    log.error("%s; its nodes stop their workers without it, so every call fails now", reason)
                    rt.head_lost(reason)
                    return
            await asyncio.sleep(every)

    async def _rejoin(self, every: float) -> None:
        """The head does not know this driver (it was restarted, say): join again under the same job id, so
        what this driver makes from now on goes with it."""
        rt = self.rt
        log.warning("the head no longer knew this driver: registering again")
        reply = await rt.control(
            "register_driver", timeout=every * 4, namespace=rt.namespace, log_to_driver=rt.log_to_driver, job_id=rt.job_id
        )
        rt.job_id = reply["job_id"]

    def add_node(self, num_cpus: float | None, num_gpus: int | None, resources: dict[str, float] | None) -> str:
        """Start another node agent, as a process of its own, and wait until it has joined."""
        if self.head is None:
            raise ActorLibError("add_node() needs the embedded head of actorlib.init()")
        return self.rt.run(self._add_node(num_cpus, num_gpus, resources or {}))  # (bounded inside, with a clear error)

    async def _add_node(self, num_cpus: float | None, num_gpus: int | None, resources: dict[str, float]) -> str:
        assert self.head is not None
        node_id = uuid.uuid4().hex
        cmd = [sys.executable, "-m", "scheduler", "node", "--head", self.head.address, "--session-dir", self.head.session_dir]
        cmd += ["--node-id", node_id, "--resources", json.dumps(resources), "--die-with-parent", str(os.getpid()), "--key-stdin"]
        if num_cpus is not None:
            cmd += ["--num-cpus", str(num_cpus)]
        if num_gpus is not None:
            cmd += ["--num-gpus", str(num_gpus)]
        key = cluster_key()
        log_path = os.path.join(self.head.session_dir, "logs", f"node-{node_id[:8]}.log")
        proc = self.extra_nodes[node_id] = _spawn(cmd, key.secret.decode() if key is not None else "", log_path)
        exited = in_own_thread(self.loop, proc.wait, then=lambda: self._node_exited(node_id, proc), name=f"actorlib-node-{proc.pid}")
        joined = asyncio.ensure_future(self.head.wait_for_node(node_id))
        await asyncio.wait({joined, exited}, timeout=_START_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        if joined.done():
            return node_id
        joined.cancel()
        self.extra_nodes.pop(node_id, None)
        if exited.done():
            why = f"exited ({_exit_status(proc.returncode)}) before it joined"
        else:
            _terminate(proc, 1.0)
            why = f"did not join within {_START_TIMEOUT:g} s"
        raise ActorLibError(f"the node agent (pid {proc.pid}) {why}; its output, in {log_path}:\n{_tail(log_path)}")

    def _node_exited(self, node_id: str, proc: subprocess.Popen[bytes]) -> None:
        """A node agent this driver started has exited (loop thread): unless stopped on purpose, its node is
        gone now, with the reason, not a heartbeat timeout later."""
        if self.extra_nodes.get(node_id) is not proc:
            return  # removed (remove_node, shutdown): it unregistered itself
        if self.head is not None:
            self.head.node_lost(node_id, f"lost its agent (pid {proc.pid}, {_exit_status(proc.returncode)})")

    def launch_nodes(self, nodes: list[dict[str, Any]], timeout: float = 120.0) -> list[str]:
        """Start a node agent on each host over SSH (see :mod:`scheduler.ssh`); raise naming every one that failed."""
        async def launch(node: dict[str, Any]) -> dict[str, Any]:
            (result,) = await self.rt.control("launch_nodes", nodes=[node], timeout_s=timeout)
            return result

        results = self.rt.run(gather_with_progress(nodes, launch, "nodes joining over SSH"), timeout + 30)  # (the head answers by timeout + a few s)
        failed = [r["error"] for r in results if not r["ok"]]
        if failed:
            raise ActorLibError(f"{len(failed)} of {len(results)} nodes did not join:\n" + "\n".join(failed))
        return [r["node_id"] for r in results]

    def remove_node(self, node_id: str, timeout: float = _STOP_TIMEOUT) -> None:
        """Stop a node started by :meth:`add_node` (its workers die with it)."""
        proc = self.extra_nodes.pop(node_id, None)
        if proc is None:
            raise ValueError(f"no node {node_id} was added by this driver")
        _terminate(proc, timeout)

    def stop(self) -> None:
        """Stop everything this driver started, bounded in time; safe to call twice."""
        if not self._thread.is_alive():
            return
        stopping = asyncio.run_coroutine_threadsafe(self._stop(), self.loop)
        deadline = time.monotonic() + _STOP_TIMEOUT
        interrupted: BaseException | None = None
        while True:
            try:
                stopping.result(max(0.0, deadline - time.monotonic()))
            except KeyboardInterrupt as exc:  # (Ctrl-C) stop first: cut short, it would leave processes running
                interrupted = exc
                if time.monotonic() < deadline:
                    continue
                stopping.cancel()
            except concurrent.futures.TimeoutError:
                stopping.cancel()
                log.warning("actorlib shutdown did not finish within %g s", _STOP_TIMEOUT)
            except Exception as exc:
                log.warning("actorlib shutdown did not finish cleanly: %s", exc)
            break
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(_STOP_TIMEOUT)
        if not self._thread.is_alive():
            self.loop.close()
        if interrupted is not None:
            raise interrupted

    async def _stop(self) -> None:
        rt = self.rt
        self._stopping = True  # first: a beat answered after driver_exit would make this driver join again
        if self._heartbeat is not None:
            self._heartbeat.cancel()  # (Python 3.11's wait_for can swallow a cancel: _beat checks the flag too)
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        if rt.head is not None and not rt.head.closed:
            try:
                await rt.control("driver_exit", timeout=_STOP_TIMEOUT / 3)
            except (ActorLibError, asyncio.TimeoutError) as exc:
                log.debug("driver_exit: %s", exc)
        rt.close_connections()
        procs, self.extra_nodes = list(self.extra_nodes.values()), {}
        # waited for off the loop: each unregisters with the head, which this loop runs
        await asyncio.gather(*(in_own_thread(self.loop, _terminate, proc, _STOP_TIMEOUT / 3) for proc in procs))
        if self.node is not None:
            await self.node.stop()
        if rt.head is not None and not rt.head.closed:
            try:  # the head answers after forwarding every log line the nodes sent before leaving
                await rt.control("nodes", timeout=2)
            except (ActorLibError, asyncio.TimeoutError):
                pass
            rt.head.close()
        if self.head is not None:
            await self.head.stop()
            remove_sockets(self.head.session_dir)
            release_session(self.head.session_dir)  # ended: a later session may prune it
        shm.release_kept()
        shm.sweep(os.getpid())  # buffers this driver sent that no worker lived to claim
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _terminate(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, then SIGKILL once ``timeout`` passes; always reaped."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _spawn(cmd: list[str], secret: str, log_path: str) -> subprocess.Popen[bytes]:
    """Start a node agent process (a fork+exec: quick enough to do on the loop), its output to ``log_path``;
    the secret goes on its stdin."""
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT)
    assert proc.stdin is not None
    with proc.stdin:  # one short line: the pipe buffer takes it without blocking
        proc.stdin.write((secret + "\n").encode())
    return proc


def _exit_status(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:]).rstrip() or "(nothing)"
    except OSError as exc:
        return f"(unreadable: {exc})"
