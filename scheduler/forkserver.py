"""A fork server: a small process with the worker runtime preloaded that forks workers on request.

Forking from the head's multi-threaded process is unsafe, and a fresh
interpreter per actor costs hundreds of milliseconds. So each node starts one
fork server, single-threaded, which
imports the worker runtime once — never torch, never CUDA — and forks a
worker per request in a millisecond or two.

It is started as ``python -c ... serve(fd, preload, entry)`` and talks to its node agent over a ``SOCK_SEQPACKET`` Unix socket pair,
one msgpack map per packet:

- agent → server ``{"op": "spawn", "id", "env", "config"}``; the server
  answers ``{"op": "spawned", "id", "pid"}`` with the read ends of the
  child's stdout and stderr pipes attached (``SCM_RIGHTS``), so the agent
  reads worker output without polling any file;
- server → agent ``{"op": "exited", "pid", "status"}`` for every child that
  ends (``status``: exit code, or ``-signal``).

Fate sharing: the server dies with its agent (``PR_SET_PDEATHSIG`` and EOF on
the socket), and its workers die with it (``PR_SET_PDEATHSIG`` again); when
the socket closes it kills every worker before exiting. Each worker leads a
process group of its own, which holds what it starts (``subprocess``,
``multiprocessing``): when the worker ends, however it ends, the server kills
that group too, so nothing an actor started outlives it (short of a process
that leaves the group itself, with ``setsid``).
"""

from __future__ import annotations

import asyncio
import ctypes
import importlib
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable
from typing import Any

import msgpack

from .threads import in_own_thread

__all__ = ["ForkServer", "kill_group", "set_parent_death_signal"]

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_MAX_PACKET = 1 << 20


def set_parent_death_signal(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


# ---------------------------------------------------------------- agent side


class ForkServer:
    """The node agent's handle on its fork server process (asyncio)."""

    def __init__(
        self,
        *,
        preload: list[str],
        entry: str,
        on_exit: Callable[[int, int], None],
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        """``on_exit(pid, status)`` for each worker that ends; ``on_lost()`` if the server itself dies (not
        stopped): its workers died with it, and no ``on_exit`` comes for them."""
        self._preload = preload
        self._entry = entry
        self._on_exit = on_exit
        self._on_lost = on_lost
        self._stopping = False
        self.was_ready = False  # the last server started got as far as loading the runtime
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._ready: asyncio.Future[None] | None = None
        self._spawns: dict[int, asyncio.Future[tuple[int, int, int]]] = {}
        self._next_id = 0
        self.pid = 0

    def start(self, python: str = sys.executable, env: dict[str, str] | None = None) -> None:
        """Start the server process; spawns wait until it has loaded the runtime."""
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (ours, theirs):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _MAX_PACKET)
        code = "import sys; from scheduler.forkserver import serve; serve(int(sys.argv[1]), sys.argv[2].split(','), sys.argv[3])"
        cmd = [python, "-c", code, str(theirs.fileno()), ",".join(self._preload), self._entry]
        self.was_ready = False
        self._proc = subprocess.Popen(cmd, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=env)
        theirs.close()
        self.pid = self._proc.pid
        ours.setblocking(False)
        self._sock = ours
        self._ready = loop.create_future()
        loop.add_reader(ours.fileno(), self._on_readable)

    async def spawn(self, env: dict[str, str], config: dict[str, Any]) -> tuple[int, int, int]:
        """Fork a worker; returns ``(pid, stdout_fd, stderr_fd)`` (the agent owns the fds)."""
        if self._sock is None or self._ready is None:
            raise RuntimeError("fork server is not running")
        await self._ready
        self._next_id += 1
        fut: asyncio.Future[tuple[int, int, int]] = asyncio.get_running_loop().create_future()
        self._spawns[self._next_id] = fut
        packet = msgpack.packb({"op": "spawn", "id": self._next_id, "env": env, "config": config})
        if len(packet) > _MAX_PACKET:
            raise ValueError(f"worker spawn request is {len(packet)} bytes, over {_MAX_PACKET}")
        self._sock.send(packet)
        return await fut

    def _on_readable(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self._sock, _MAX_PACKET, 2)
            except BlockingIOError:
                return
            except OSError as exc:
                data, fds = b"", []
                log.warning("fork server socket failed: %s", exc)
            if not data:
                self._lost()
                return
            msg = msgpack.unpackb(data)
            op = msg.get("op")
            if op == "ready":
                self.was_ready = True
                if self._ready is not None and not self._ready.done():
                    self._ready.set_result(None)
            elif op == "spawned":
                fut = self._spawns.pop(msg["id"], None)
                if fut is not None and not fut.done() and len(fds) == 2:
                    fut.set_result((msg["pid"], fds[0], fds[1]))
                else:
                    for fd in fds:
                        os.close(fd)
            elif op == "spawn_failed":
                fut = self._spawns.pop(msg["id"], None)
                if fut is not None and not fut.done():
                    fut.set_exception(OSError(msg.get("error", "fork failed")))
            elif op == "exited":
                self._on_exit(msg["pid"], msg["status"])

    def _lost(self) -> None:
        err = RuntimeError(f"fork server (pid {self.pid}) exited")
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(err)
            self._ready.exception()  # mark retrieved
        for fut in self._spawns.values():
            if not fut.done():
                fut.set_exception(err)
        self._spawns.clear()
        self._close_socket()
        if self._proc is not None:
            self._proc.poll()  # (reaped, if it is gone already)
        if self._on_lost is not None and not self._stopping:
            self._on_lost()

    def _close_socket(self) -> None:
        if self._sock is not None:
            try:
                asyncio.get_running_loop().remove_reader(self._sock.fileno())
            except Exception:
                pass
            self._sock.close()
            self._sock = None

    async def stop(self, timeout: float = 5.0) -> None:
        """Close the socket: the server kills its workers and exits. Bounded by ``timeout``."""
        self._stopping = True
        self._close_socket()
        proc = self._proc
        if proc is None:
            return
        def wait() -> None:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

        await in_own_thread(asyncio.get_running_loop(), wait, name="forkserver-reaper")


# --------------------------------------------------------------- server side


def serve(fd: int, preload: list[str], entry: str) -> None:
    parent = os.getppid()
    # A signal it handles, not SIGKILL: its parent (the node agent, or the driver) may die any way at all,
    # even by SIGKILL, and the ``finally`` below must still kill every worker's group (what they started).
    signal.signal(signal.SIGTERM, _exit_on_signal)
    set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent:
        os._exit(1)
    os.setpgrp()  # a terminal's Ctrl-C is for the driver, not for its workers
    sock = socket.socket(fileno=fd)
    sock.setblocking(True)
    for name in preload:
        if name:
            importlib.import_module(name)
    mod_name, _, func_name = entry.partition(":")
    entry_fn = getattr(importlib.import_module(mod_name), func_name)

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    children: set[int] = set()
    me = os.getpid()

    def send(msg: dict[str, Any], fds: list[int] = ()) -> None:  # type: ignore[assignment]
        try:
            socket.send_fds(sock, [msgpack.packb(msg)], list(fds)) if fds else sock.send(msgpack.packb(msg))
        except OSError:
            pass

    def reap() -> None:
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            children.discard(pid)
            kill_group(pid)  # what the worker started goes with it
            code = os.waitstatus_to_exitcode(status)
            send({"op": "exited", "pid": pid, "status": code})

    def spawn(req: dict[str, Any]) -> None:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            pid = os.fork()
        except OSError as exc:
            for f in (out_r, out_w, err_r, err_w):
                os.close(f)
            send({"op": "spawn_failed", "id": req["id"], "error": str(exc)})
            return
        if pid == 0:
            _child(me, (sock, sel, wake_r, wake_w, out_r, err_r), out_w, err_w, req, entry_fn)
        try:
            os.setpgid(pid, pid)  # as the child does: whichever runs first, the group exists from here on
        except OSError:
            pass  # it is gone already
        os.close(out_w)
        os.close(err_w)
        children.add(pid)
        send({"op": "spawned", "id": req["id"], "pid": pid}, [out_r, err_r])
        os.close(out_r)
        os.close(err_r)

    send({"op": "ready", "pid": me})
    try:
        while True:
            for key, _ in sel.select():
                if key.fileobj is sock:
                    try:
                        data = sock.recv(_MAX_PACKET)
                    except OSError:
                        data = b""
                    if not data:
                        return
                    try:
                        req = msgpack.unpackb(data)
                        if req.get("op") == "spawn":
                            spawn(req)
                    except Exception:
                        traceback.print_exc()
                else:
                    try:
                        os.read(wake_r, 4096)
                    except BlockingIOError:
                        pass
                    reap()
            reap()
    finally:
        for pid in list(children):
            kill_group(pid)
            try:
                os.kill(pid, signal.SIGKILL)  # (not reaped yet: the pid is still this child's)
            except ProcessLookupError:
                pass
        for pid in list(children):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


def _child(server_pid: int, close: tuple[Any, ...], out_w: int, err_w: int, req: dict[str, Any], entry_fn: Any) -> None:
    """Runs in the forked worker; never returns."""
    code = 1
    try:
        set_parent_death_signal(signal.SIGKILL)
        if os.getppid() != server_pid:
            os._exit(1)
        os.setpgid(0, 0)  # a group of its own: what it starts is killed with it (see kill_group)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sock, sel, *fds = close
        sel.close()
        sock.close()
        for f in fds:
            os.close(f)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        os.close(out_w)
        os.close(err_w)
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        sys.stderr.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        os.environ.update(req.get("env") or {})
        entry_fn(req.get("config") or {})
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _exit_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def kill_group(pid: int) -> None:
    """SIGKILL worker ``pid``'s process group: the worker, if still there, and what it started."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # nothing left in it

