"""The node agent: one per node; spawns and watches that node's workers.

It registers the node's resources with the head, forks workers through its
fork server when the head asks, reads their stdout/stderr pipes (each line
goes to the worker's log file and, as a ``log`` event, to the head), and
reports every worker's exit with its code or signal and the last lines it
wrote to stderr.

In embedded mode the agent is a set of asyncio tasks in the driver's
background loop; otherwise it runs as a process of its own
(``python -m scheduler.node``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from transport import ControlServer, Endpoint, control_call, send_event, shm
from transport.security import cluster_key

from .forkserver import ForkServer, kill_group

__all__ = ["NodeAgent"]

log = logging.getLogger(__name__)

STDERR_TAIL_LINES = 20
SHM_GRACE = 30.0  # after a worker exits, how long its receivers have to claim its last shared-memory buffers
# Silence after which the head declares a node (or driver) dead, and a node agent its head.
NODE_TIMEOUT = float(os.environ.get("ACTORLIB_NODE_TIMEOUT_S", "6"))
HEARTBEAT_EVERY = NODE_TIMEOUT / 5
# Silence after which the head declares a worker hung (its process alive, its event loop not answering).
# Longer than a node's: a C extension holding the GIL for seconds must not look hung.
WORKER_TIMEOUT = float(os.environ.get("ACTORLIB_WORKER_TIMEOUT_S", "30"))


_PARTIAL_MAX = 64 << 10  # bytes of a worker's line without its newline yet that the agent holds


def _shown(line: bytes) -> bytes:
    """What a terminal shows of a line redrawn with carriage returns (a progress bar): its last drawing."""
    return line.removesuffix(b"\r").rsplit(b"\r", 1)[-1]


@dataclass
class _Worker:
    actor_id: str
    label: str
    pid: int
    out_file: Any
    err_file: Any
    fds: list[int] = field(default_factory=list)  # [stdout, stderr], fixed
    open_fds: set[int] = field(default_factory=set)
    partial: dict[int, bytes] = field(default_factory=dict)
    tail: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=STDERR_TAIL_LINES))


class NodeAgent:
    def __init__(
        self,
        *,
        head_address: str,
        node_id: str,
        resources: dict[str, float],
        gpu_ids: list[str],
        session_dir: str,
        worker_preload: list[str],
        worker_entry: str,
        host: str = "127.0.0.1",
        is_head_node: bool = False,
    ) -> None:
        self.node_id = node_id
        self.head_address = head_address
        self.resources = resources
        self.gpu_ids = gpu_ids
        self.session_dir = session_dir
        self.log_dir = os.path.join(session_dir, "logs")
        self.host = host
        self.is_head_node = is_head_node
        self._workers: dict[int, _Worker] = {}
        self._unswept: set[int] = set()  # exited workers whose unclaimed shared-memory files are not removed yet
        self._early_exits: dict[int, int] = {}  # exits read before their spawn answer was handled
        self._forkserver = ForkServer(
            preload=worker_preload, entry=worker_entry, on_exit=self._on_exit, on_lost=self._forkserver_lost
        )
        self._forkserver_losses: list[float] = []  # when it died lately (monotonic): see _forkserver_lost
        self._control = ControlServer(self, on_event=self._on_event)
        self._head: Endpoint | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._stopping = False  # stop() has begun
        self.finished = asyncio.Event()  # the agent has stopped, or should: the head left or is gone
        self.why_finished = ""
        # In a driver's own process (an embedded head): shows a worker's output lines there and says whether it
        # did; those go on to the head marked ``shown_by`` this pid, so that driver does not show them twice.
        self.show_output: Callable[[dict[str, Any]], bool] | None = None

    async def start(self, timeout: float | None = None) -> None:
        os.makedirs(self.log_dir, exist_ok=True)
        self._forkserver.start()
        self._head = Endpoint.connect(self.head_address, on_message=self._control.handle, name=f"node {self.node_id[:8]}")
        self._control.attach(self._head)
        try:
            await self._register(timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(
                f"no answer from the head at {self.head_address} within {timeout:g} s: "
                "is it running there, and does this node hold its cluster key?"
            ) from None
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat())

    async def _register(self, timeout: float | None) -> None:
        assert self._head is not None
        await control_call(
            self._head,
            "register_node",
            node_id=self.node_id,
            resources=self.resources,
            gpu_ids=self.gpu_ids,
            address=self.host,
            hostname=socket.gethostname(),
            is_head_node=self.is_head_node,
            timeout=timeout,
        )

    async def _beat(self) -> None:
        """Tell the head this node is alive, a few times per its timeout (one tiny message: no busy loop).

        A head that has not answered for ``NODE_TIMEOUT`` is gone: the agent
        finishes (its owner then stops it, and its workers with it). A head
        that answers "rejoin" declared this node dead while it was silent
        (e.g. stopped or cut off): the workers it had are dead to the cluster,
        so they are killed, and the node registers again with all its resources.
        """
        loop = asyncio.get_running_loop()
        last_answer = loop.time()
        missed = 0  # heartbeats in a row the head left unanswered
        while self._head is not None and not self._head.closed and not self._stopping:
            try:
                reply = await control_call(self._head, "heartbeat", node_id=self.node_id, timeout=HEARTBEAT_EVERY)
            except asyncio.TimeoutError:
                # Both clocks: time alone would blame the head for a pause of this
                # process (SIGSTOP, a frozen VM) that let one heartbeat's wait expire.
                missed += 1
                if missed * HEARTBEAT_EVERY >= NODE_TIMEOUT and loop.time() - last_answer > NODE_TIMEOUT:
                    self._finish_agent(f"the head at {self.head_address} stopped answering for {NODE_TIMEOUT:g} s")
                    return
                continue
            except Exception as exc:
                log.debug("heartbeat not sent: %s", exc)
            else:
                last_answer = loop.time()
                missed = 0
                if isinstance(reply, dict) and reply.get("rejoin") and not self._stopping:
                    log.warning("node %s: the head had declared it dead; killing its workers and joining again", self.node_id[:8])
                    for pid in list(self._workers):
                        self._kill_quietly(pid)
                    try:
                        await self._register(timeout=NODE_TIMEOUT)
                    except Exception as exc:
                        log.warning("node %s could not join again: %s", self.node_id[:8], exc)
            await asyncio.sleep(HEARTBEAT_EVERY)

    def _kill_quietly(self, pid: int) -> None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _on_event(self, peer: bytes | None, topic: str, payload: Any) -> None:
        if topic == "shutdown":
            self._finish_agent(f"the head asked: {payload.get('reason') if isinstance(payload, dict) else payload}")
        else:
            log.warning("node %s: unknown event %r", self.node_id[:8], topic)

    def _finish_agent(self, why: str) -> None:
        if not self.finished.is_set():
            log.warning("node %s is stopping: %s", self.node_id[:8], why)
            self.why_finished = why
            self.finished.set()

    async def stop(self) -> None:
        """Leave the head, kill every worker (through the fork server), and close. Bounded in time.

        Leaving first means the head places nothing more here, and restarts
        this node's actors elsewhere, before their workers are gone.
        """
        self._stopping = True  # (Python 3.11's wait_for can swallow the cancel below: _beat checks this too)
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        if self._heartbeat is not None and self._head is not None and not self._head.closed:  # (it had joined)
            try:
                await control_call(self._head, "unregister_node", node_id=self.node_id, timeout=2)
            except Exception as exc:
                log.debug("could not unregister node %s: %s", self.node_id[:8], exc)
        await self._forkserver.stop()
        for pid in list(self._workers):
            self._finish(pid, -signal.SIGKILL, reason="its node was stopped")
        self._control.cancel_all()
        for pid in list(self._unswept):  # the node is going: nobody is left to claim them
            self._sweep(pid)
        if self._head is not None:
            self._head.close()
        self.finished.set()

    # -- requests from the head ---------------------------------------

    async def op_spawn_worker(
        self, peer: bytes | None, actor_id: str, label: str, env: dict[str, str], config: dict[str, Any]
    ) -> dict[str, Any]:
        config = {**config, "session_dir": self.session_dir}  # this node's, for its logs
        key = cluster_key()
        if key is not None:  # handed over the fork server's private socket, never in the environment
            config["cluster_key"] = key.secret.decode()
        pid, out_fd, err_fd = await self._forkserver.spawn(env, config)
        base = os.path.join(self.log_dir, f"worker-{actor_id[:12]}-{pid}")
        w = _Worker(actor_id, label, pid, *_open_logs(base))
        self._workers[pid] = w
        loop = asyncio.get_running_loop()
        for fd in (out_fd, err_fd):
            os.set_blocking(fd, False)
            w.fds.append(fd)
            w.open_fds.add(fd)
            loop.add_reader(fd, self._on_output, w, fd)
        early = self._early_exits.pop(pid, None)
        if early is not None:
            loop.call_soon(self._finish, pid, early)  # after the head has the pid
        return {"pid": pid, "log_prefix": base}

    async def op_kill_worker(self, peer: bytes | None, pid: int, sig: int = int(signal.SIGKILL)) -> bool:
        if pid not in self._workers:
            return False
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return False
        return True

    def _sweep(self, pid: int) -> None:
        if pid in self._unswept:
            self._unswept.discard(pid)
            shm.sweep(pid)

    # -- worker output and exits ----------------------------------------

    def _on_output(self, w: _Worker, fd: int) -> None:
        try:
            data = os.read(fd, 65536)  # one read per callback: a worker that floods its pipe must not hold the loop
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            if w.partial.get(fd):  # a last line without its newline (often the error that ended the worker)
                self._lines(w, fd, b"", final=True)
            self._close_fd(w, fd)
            return
        self._lines(w, fd, data)

    def drain_output(self, actor_id: str) -> None:
        """Handle now what the actor's worker has written so far (loop thread). A driver in this process calls it
        before it takes one of that worker's answers: the lines the worker wrote before answering are shown
        (:attr:`show_output`) before the answer is."""
        for w in list(self._workers.values()):
            if w.actor_id == actor_id:
                for fd in sorted(w.open_fds):
                    self._read_all(w, fd, limit=16)  # (bounded: the worker may be writing still)

    def _read_all(self, w: _Worker, fd: int, limit: int | None = None) -> None:
        """Handle what the pipe holds now (it is non-blocking), at most ``limit`` reads of 64 KiB; its end is
        left to the reader callback."""
        reads = 0
        while limit is None or reads < limit:
            reads += 1
            try:
                data = os.read(fd, 65536)
            except (BlockingIOError, OSError):
                return
            if not data:
                return
            self._lines(w, fd, data)

    def _lines(self, w: _Worker, fd: int, data: bytes, *, final: bool = False) -> None:
        is_err = fd == w.fds[1]
        (w.err_file if is_err else w.out_file).write(data)
        buf = w.partial.pop(fd, b"") + data
        *lines, rest = buf.split(b"\n")
        if b"\r" in rest:  # a progress bar redrawing its line: only its last drawing is held (and its \r, if it
            rest = rest[rest.rstrip(b"\r").rfind(b"\r") + 1 :]  # ends with one: the next drawing replaces it)
        if rest and (final or len(rest) >= _PARTIAL_MAX):  # (a line that long is shown in pieces)
            lines.append(rest)
        elif rest:
            w.partial[fd] = rest
        if not lines:
            return
        text = [(_shown(line) if b"\r" in line else line).decode("utf-8", "replace") for line in lines]
        if is_err:
            w.tail.extend(text)
        if self._head is not None and not self._head.closed:
            payload = {
                "actor_id": w.actor_id,
                "label": w.label,
                "pid": w.pid,
                "stream": "stderr" if is_err else "stdout",
                "lines": text,
            }
            if self.show_output is not None and self.show_output(payload):
                payload["shown_by"] = os.getpid()
            try:
                send_event(self._head, "log", payload)
            except Exception as exc:
                log.debug("could not forward worker output: %s", exc)

    def _close_fd(self, w: _Worker, fd: int) -> None:
        try:
            asyncio.get_running_loop().remove_reader(fd)
        except Exception:
            pass
        if fd in w.open_fds:
            w.open_fds.discard(fd)
            try:
                os.close(fd)
            except OSError:
                pass

    def _drain(self, w: _Worker) -> None:
        for fd in sorted(w.open_fds):
            self._read_all(w, fd)
            if w.partial.get(fd):
                self._lines(w, fd, b"", final=True)
            self._close_fd(w, fd)

    def _forkserver_lost(self) -> None:
        """The fork server died (killed, out of memory ...), and its workers with it: report them at once (the
        head would otherwise learn of it only from their silence), and start another server; unless it never
        started, or keeps dying: then this node stops (and the head places nothing more here)."""
        for pid in list(self._workers):
            kill_group(pid)  # what each had started, too
            self._finish(pid, -signal.SIGKILL, reason="its node's fork server died")
        now = time.monotonic()
        self._forkserver_losses = [t for t in self._forkserver_losses if now - t < 60.0] + [now]
        if not self._forkserver.was_ready or len(self._forkserver_losses) > 3:
            self._finish_agent(f"its fork server (pid {self._forkserver.pid}) could not start or keeps dying")
            return
        log.error("node %s: its fork server (pid %d) died; starting another", self.node_id[:8], self._forkserver.pid)
        self._forkserver.start()

    def _on_exit(self, pid: int, status: int) -> None:
        if pid not in self._workers:
            self._early_exits[pid] = status
            return
        self._finish(pid, status)

    def _finish(self, pid: int, status: int | None, reason: str = "the worker process died") -> None:
        w = self._workers.pop(pid, None)
        if w is None:
            return
        self._unswept.add(pid)
        asyncio.get_running_loop().call_later(SHM_GRACE, self._sweep, pid)
        self._drain(w)
        w.out_file.close()
        w.err_file.close()
        if status is None or self._head is None or self._head.closed:
            return
        payload = {
            "actor_id": w.actor_id,
            "pid": pid,
            "exit_code": status if status >= 0 else None,
            "signal": -status if status < 0 else None,
            "stderr_tail": list(w.tail),
            "node_id": self.node_id,
            "host": self.host,
            "reason": reason,
        }
        try:
            send_event(self._head, "worker_exited", payload)
        except Exception as exc:
            log.warning("could not report the exit of worker %d: %s", pid, exc)


def _open_logs(base: str) -> tuple[Any, Any]:
    """The worker's two log files, unbuffered (opening a local file does not stall the loop)."""
    return open(base + ".out", "ab", buffering=0), open(base + ".err", "ab", buffering=0)
