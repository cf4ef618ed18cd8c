"""The cluster secret: who may speak to a cluster over TCP.

A cluster has one secret, a CURVE secret key (40 characters of Z85), made
when the cluster starts. Every process of the cluster — head, node agents,
workers, drivers, the command line — holds it. Each bound socket is a CURVE
server with that key, and each connecting socket a CURVE client presenting
the same key pair, so traffic is encrypted and a bound socket admits only
peers whose public key is the cluster's (checked by this process's ZAP
handler); refused handshakes are logged. This holds for ``ipc://`` sockets
too (they also live in a session directory of mode 0700), unless
``ACTORLIB_IPC_CURVE=0`` trades that second lock for speed on one machine.

The secret lives in a file of mode 0600 (``write_key_file``) and travels to
other machines over SSH's standard input, never on a command line.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable

import zmq
import zmq.utils.monitor
import zmq.utils.z85

__all__ = [
    "ClusterKey",
    "cluster_key",
    "generate_key",
    "read_key_file",
    "set_cluster_key",
    "watch_refusals",
    "write_key_file",
]

log = logging.getLogger(__name__)

_ZAP_ENDPOINT = "inproc://zeromq.zap.01"


class ClusterKey:
    """A cluster's key pair, derived from its secret."""

    def __init__(self, secret: str | bytes) -> None:
        raw = secret.encode() if isinstance(secret, str) else secret
        raw = raw.strip()
        if len(raw) != 40:
            raise ValueError(f"a cluster key is 40 characters of Z85, not {len(raw)} characters")
        try:
            self.public = zmq.curve_public(raw)
        except (zmq.ZMQError, ValueError) as exc:
            raise ValueError(f"not a valid cluster key: {exc}") from None
        self.secret = raw

    def apply(self, sock: zmq.Socket, *, server: bool) -> None:
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        if server:
            sock.curve_server = True
        else:
            sock.curve_serverkey = self.public


def generate_key() -> str:
    return zmq.curve_keypair()[1].decode()


def write_key_file(path: str, secret: str) -> None:
    """Write the secret to a new file of mode 0600 (created so, never widened then narrowed)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")


def read_key_file(path: str) -> str:
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o077:
        raise PermissionError(f"cluster key file {path} has mode {mode:o}: it must be readable by its owner only (0600)")
    with open(path) as f:
        return f.read().strip()


_key: ClusterKey | None = None
_zap_for_pid = 0
_zap_lock = threading.Lock()


def set_cluster_key(secret: str | bytes | None) -> None:
    """Use this secret for every ``tcp://`` socket this process opens from now on (None: no CURVE)."""
    global _key
    _key = None if secret is None else ClusterKey(secret)


def cluster_key() -> ClusterKey | None:
    return _key


_IPC_CURVE = os.environ.get("ACTORLIB_IPC_CURVE", "1") not in ("0", "off", "false")


def secure(sock: zmq.Socket, address: str, *, server: bool) -> None:
    """Make ``sock`` a CURVE server or client (once a cluster key is set) before it binds or connects to ``address``."""
    if _key is None or (address.startswith("ipc://") and not _IPC_CURVE) or address.startswith("inproc://"):
        return
    if server:
        _ensure_zap(sock.context)
    _key.apply(sock, server=server)


def _ensure_zap(ctx: zmq.Context) -> None:
    """Start this process's ZAP handler (once): it admits the cluster's public key and nothing else."""
    global _zap_for_pid
    with _zap_lock:
        if _zap_for_pid == os.getpid():
            return
        rep = ctx.socket(zmq.REP)
        rep.linger = 0
        rep.bind(_ZAP_ENDPOINT)
        threading.Thread(target=_serve_zap, args=(rep,), name="actorlib-zap", daemon=True).start()
        _zap_for_pid = os.getpid()


def _serve_zap(rep: zmq.Socket) -> None:
    """ZAP (RFC 27): ``[version, request id, domain, address, identity, mechanism, key]`` → status."""
    while True:
        try:
            frames = rep.recv_multipart()
        except zmq.ContextTerminated:
            return
        except zmq.ZMQError as exc:
            log.warning("ZAP handler: %s", exc)
            continue
        version, request_id = (frames + [b"", b""])[:2]
        key = _key
        ok = (
            len(frames) >= 7
            and frames[5] == b"CURVE"
            and key is not None
            and zmq.utils.z85.encode(frames[6]) == key.public
        )
        if not ok:
            peer = frames[3].decode(errors="replace") if len(frames) > 3 else "?"
            log.warning("refused a connection from %s: it does not hold the cluster key", peer)
        status = [b"200", b"OK"] if ok else [b"400", b"not a member of this cluster"]
        rep.send_multipart([version, request_id, *status, b"", b""])


_HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


_WHY: dict[int, str] = {
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "its handshake was not CURVE with this cluster's server key",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "its key is not the cluster's",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "the handshake failed: no CURVE, or it hung up",
}


def is_secured(sock: zmq.Socket) -> bool:
    return bool(sock.getsockopt(zmq.CURVE_SERVER))


def watch_refusals(sock: zmq.Socket, loop: asyncio.AbstractEventLoop, name: str) -> Callable[[], None]:
    """Log every connection a CURVE server refused (a peer without the cluster key); returns a stop function.

    The refusal itself is ZeroMQ's (the handshake fails before any message is
    read); this makes it visible. Logs are rate-limited per kind of refusal: a
    flood of attempts must not become a flood of lines, nor hide a refusal of
    another kind (a peer that retries a plaintext handshake many times a second
    must not hide one that offers a wrong key).
    """
    monitor = sock.get_monitor_socket(_HANDSHAKE_FAILED)
    fd = int(monitor.getsockopt(zmq.FD))
    counts: dict[int, int] = {}  # refusals so far, by kind (monitor event)

    def drain() -> None:
        while True:
            try:
                event = zmq.utils.monitor.recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError:
                return
            kind = int(event.get("event", 0))
            count = counts[kind] = counts.get(kind, 0) + 1
            if count <= 10 or count % 1000 == 0:
                where = event.get("endpoint", b"?")
                log.warning(
                    "%s: refused a connection on %s (%d of this kind so far): no proof it holds the cluster key (%s)",
                    name,
                    where.decode(errors="replace") if isinstance(where, bytes) else where,
                    count,
                    _WHY.get(kind, "the handshake failed"),
                )

    loop.add_reader(fd, drain)
    loop.call_soon(drain)  # edge-triggered: anything already queued

    def stop() -> None:
        try:
            loop.remove_reader(fd)
        except Exception:
            pass
        try:
            sock.disable_monitor()
        except zmq.ZMQError:
            pass
        monitor.close(linger=0)

    return stop
