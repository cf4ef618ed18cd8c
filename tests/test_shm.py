"""Large buffers between processes of one machine travel through /dev/shm: intact, writable, and nothing left behind."""

from __future__ import annotations

import gc
import glob
import mmap
import os
import secrets
import select
import subprocess
import sys

import msgpack
import numpy as np
import pytest
import zmq

from transport import shm
from transport.protocol import VERSION, Kind, decode
from transport.security import cluster_key

pytestmark = pytest.mark.skipif(not shm.ENABLED, reason="no /dev/shm here (or ACTORLIB_SHM=0)")


def ours() -> list[str]:
    return glob.glob(f"/dev/shm/actorlib-{os.getpid()}-*")


@pytest.fixture(autouse=True)
def pool(monkeypatch):
    """Each test's own kept files (the process's may hold other tests')."""
    own = shm._Pool(shm.POOL_BYTES)
    monkeypatch.setattr(shm, "_pool", own)
    yield own
    own.clear()


@pytest.fixture(scope="module")
def big(cluster):
    @cluster.remote
    class Big:
        def checksum(self, x):
            return float(x.sum()), x.flags.writeable

        def make(self, n):
            import torch

            return np.arange(n, dtype=np.float32), torch.arange(n, dtype=torch.bfloat16)

        def pid(self):
            return os.getpid()

    return Big.remote()


def test_large_arrays_go_through_shared_memory_both_ways(cluster, big, monkeypatch):
    worker = cluster.get(big.pid.remote())
    before = set(glob.glob(f"/dev/shm/actorlib-{worker}-*"))  # (files the worker kept for other tests' sizes)
    sent = []
    real_export = shm.export
    monkeypatch.setattr(shm, "export", lambda buffers: sent.append(1) or real_export(buffers))
    x = np.ones(3 << 20, dtype=np.float32)  # 12 MiB
    total, writable = cluster.get(big.checksum.remote(x), timeout=60)
    assert total == float(3 << 20) and writable and sent  # the worker got a writable array, by shared memory
    arr, tensor = cluster.get(big.make.remote(1 << 20), timeout=60)
    assert arr[-1] == (1 << 20) - 1 and arr.flags.writeable
    arr[0] = 42.0  # writable, and ours alone (a private mapping)
    assert tensor.shape == (1 << 20,) and float(tensor[10]) == 10.0
    assert not ours() and set(glob.glob(f"/dev/shm/actorlib-{worker}-*")) <= before  # claimed and unlinked


def test_a_bad_shared_memory_reference_is_refused_and_the_worker_keeps_serving(cluster, big):
    rt = cluster.api.runtime.current()
    (info,) = [a for a in rt.run(rt.control("list_actors")) if a["actor_id"] == big._actor_id]
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    cluster_key().apply(sock, server=False)
    sock.connect(info["address"])
    try:
        for name in ("actorlib-1-0123456789abcdef", "../../etc/passwd"):
            header = msgpack.packb((VERSION, int(Kind.CALL), 7, b"\x94\xa3pid\x90\x80\xc0", ((0, name, 10, False),)))
            sock.send_multipart([header, b""])
            assert sock.poll(10_000), "no answer to a call naming a missing file"
            reply = decode(sock.recv_multipart())
            assert reply.kind == Kind.ERROR
            assert b"shared-memory" in reply.body
    finally:
        sock.close()
    assert cluster.get(big.pid.remote(), timeout=30) > 0


def test_files_of_a_sender_that_died_are_swept():
    code = "from transport import shm; import numpy as np; print(shm.export([np.ones(1 << 20, dtype=np.uint8)])[1][0][1])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    name = out.stdout.strip()
    pid = int(name.split("-")[1])
    assert os.path.exists(f"/dev/shm/{name}")  # nobody claimed it
    assert shm.sweep(pid) == 1 and not os.path.exists(f"/dev/shm/{name}")


def test_a_received_mapping_is_unmapped_off_the_callers_thread_once_nothing_views_it(monkeypatch):
    """Unmapping frees the file's pages (~14 ms for 64 MiB here): the reaper thread does it, not the code that
    dropped the last array, and only once no view is left."""
    import torch

    from .conftest import wait_for

    reaper = shm._Reaper()  # this test's own: the process's may hold other tests' mappings
    monkeypatch.setattr(shm, "_reaper", reaper)
    frames, moved = shm.export([np.arange(1 << 18, dtype=np.float32)])  # 1 MiB
    buffers = list(frames)
    shm.claim(tuple(tuple(m) for m in moved), buffers)
    mapping = buffers[0].obj
    assert isinstance(mapping, mmap.mmap) and not ours()  # mapped, and its file unlinked at once
    arr = np.frombuffer(buffers[0], dtype=np.float32)
    tensor = torch.frombuffer(buffers[0], dtype=torch.float32)  # holds the view object, not a buffer export
    del buffers
    gc.collect()
    wait_for(lambda: reaper.rounds >= 2, timeout=10, what="the reaper to try the mapping twice")
    assert reaper.pending() == 1 and not mapping.closed and arr[-1] == (1 << 18) - 1  # views alive: mapped
    del arr
    gc.collect()
    tried = reaper.rounds
    wait_for(lambda: reaper.rounds >= tried + 2, timeout=10, what="the reaper to try it twice more")
    assert not mapping.closed and float(tensor[-1]) == (1 << 18) - 1  # the tensor alone keeps it mapped
    del tensor
    wait_for(lambda: mapping.closed, timeout=10, what="the reaper to unmap it")
    wait_for(lambda: reaper._thread is None, timeout=10, what="the reaper's thread to end")


def test_a_message_that_is_not_sent_or_not_taken_leaves_no_file(tmp_path):
    """Files are written before the send: one that fails (peer gone, socket busy) unlinks them. A refused
    message's files, and those after a bad entry, are unlinked by the receiver."""
    import asyncio

    from transport import ConnectionClosedError, Endpoint

    async def main():
        server = Endpoint.bind(f"ipc://{tmp_path}/s.sock", on_message=lambda msg: None, name="server")
        try:
            with pytest.raises(ConnectionClosedError):
                server.send(Kind.RESULT, 1, b"\xc0", [np.ones(2 << 20, dtype=np.uint8)], b"nobody")
        finally:
            server.close()

    asyncio.run(asyncio.wait_for(main(), 30))
    assert ours() == []
    # a bad first entry: the good file after it goes too
    ((_, good, size, kept),) = shm.export([np.ones(5 << 20, dtype=np.uint8)])[1]  # (sizes not sent before: not kept)
    with pytest.raises(OSError):
        shm.claim(((0, f"actorlib-{os.getpid()}-{'0' * 16}", 10, False), (1, good, size, kept)), [b"", b""])
    assert ours() == []
    # refused before its header was read (a version nobody speaks): the files it names go
    ((_, named, size, kept),) = shm.export([np.ones(3 << 20, dtype=np.uint8)])[1]
    shm.discard_announced(msgpack.packb((VERSION + 100, int(Kind.CALL), 7, b"\xc0", ((0, named, size, kept),))))
    assert ours() == []


def test_a_fifo_named_as_a_buffer_is_refused_without_blocking():
    """Opening a FIFO waits for a writer: the receiver must not open one it is sent the name of."""
    import threading

    name = f"actorlib-{os.getpid()}-{'f' * 16}"
    os.mkfifo(f"/dev/shm/{name}", 0o600)
    outcome = []
    try:
        claimer = threading.Thread(target=lambda: outcome.append(_claim_error(((0, name, 10, False),))), daemon=True)
        claimer.start()
        claimer.join(10)
        assert outcome and "not the 10-byte file" in outcome[0]
    finally:
        if os.path.exists(f"/dev/shm/{name}"):
            os.unlink(f"/dev/shm/{name}")
    assert not os.path.exists(f"/dev/shm/{name}")


def _claim_error(moved) -> str:
    try:
        shm.claim(moved, [b""])
    except (OSError, ValueError) as exc:
        return str(exc)
    return "claimed"


def test_files_of_senders_that_died_are_swept_when_a_session_starts():
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead = os.path.join(shm.SHM_DIR, f"actorlib-{int(gone.stdout)}-{secrets.token_hex(8)}")
    mine = os.path.join(shm.SHM_DIR, f"actorlib-{os.getpid()}-{secrets.token_hex(8)}")
    for path in (dead, mine):
        with open(path, "wb") as f:
            f.write(b"x")
    try:
        assert shm.sweep_orphans() >= 1
        assert not os.path.exists(dead) and os.path.exists(mine)
    finally:
        for path in (dead, mine):
            if os.path.exists(path):
                os.unlink(path)


# -- kept files: a size sent again is written again into its sender's file, once its receiver let go --


@pytest.fixture
def reaper(monkeypatch):
    own = shm._Reaper()  # this test's own: the process's may hold other tests' mappings
    monkeypatch.setattr(shm, "_reaper", own)
    return own


def _send(value: int, n: int = 1 << 20):
    """Export an ``n``-byte array of ``value`` and claim it here: (its entry, the array received)."""
    frames, moved = shm.export([np.full(n, value, dtype=np.uint8)])
    buffers = list(frames)
    shm.claim(tuple(tuple(m) for m in moved), buffers)
    return moved[0], np.frombuffer(buffers[0], dtype=np.uint8)


def test_a_size_sent_again_is_kept_and_written_again_only_once_its_receiver_let_go(pool, reaper):
    from .conftest import wait_for

    n = 1 << 20
    (_, _, _, kept), a = _send(1)
    assert not kept and not ours()  # sent once: the message's own file, unlinked by its receiver
    (_, name, _, kept), b = _send(2)
    assert kept and ours() == [f"/dev/shm/{name}"]  # sent again: the sender keeps it
    (_, other, _, kept), c = _send(3)
    assert kept and other != name  # b still maps the first: a second one
    c[:] = 7  # a receiver's writes are its own (a private mapping)
    assert (a == 1).all() and (b == 2).all() and (c == 7).all() and pool.held() == 2 * n and reaper.holding == 2
    del b
    gc.collect()
    wait_for(lambda: reaper.pending() == 2, timeout=10, what="the reaper to unmap b's mapping")
    (_, again, _, kept), d = _send(4)
    assert kept and again == name and (d == 4).all()  # written again, now that its receiver let go
    assert (a == 1).all() and (c == 7).all() and sorted(ours()) == sorted(f"/dev/shm/{x}" for x in (name, other))
    (_, third, _, kept), e = _send(5)
    assert kept and third not in (name, other) and pool.held() == 3 * n  # both held: a third
    pool.clear()
    assert not ours() and (c == 7).all() and (d == 4).all() and (e == 5).all()  # the mappings outlive the names


def test_kept_files_stay_within_the_pool_and_one_in_flight_is_never_taken(monkeypatch, reaper):
    """Files held by their receivers are evicted for room (unlinked: the mapping keeps its pages); one sent and
    not yet claimed is not, until it is stale: then it is forgotten, but not unlinked."""
    n = 1 << 20
    small = shm._Pool(2 * n)
    monkeypatch.setattr(shm, "_pool", small)
    try:
        _send(0)
        (_, first, _, _), a = _send(1)
        (_, second, _, _), b = _send(2)
        (_, third, _, kept), c = _send(3)  # no room: the least recently taken held file goes
        assert kept and small.held() == 2 * n and not os.path.exists(f"/dev/shm/{first}")
        assert os.path.exists(f"/dev/shm/{second}") and (a == 1).all() and (b == 2).all() and (c == 3).all()
        small.clear()  # (the size is still one sent lately)
        flying = [shm.export([np.zeros(n, dtype=np.uint8)])[1][0] for _ in range(3)]  # none claimed
        assert [m[3] for m in flying] == [True, True, False]  # no room, and neither kept one evicted
        assert all(os.path.exists(f"/dev/shm/{m[1]}") for m in flying)
        monkeypatch.setattr(shm._Pool, "STALE_S", 0.0)  # (their receivers died before claiming them)
        (_, _, _, kept) = shm.export([np.zeros(n, dtype=np.uint8)])[1][0]
        assert kept and small.held() == 2 * n  # the first forgotten to make room ...
        assert os.path.exists(f"/dev/shm/{flying[0][1]}")  # ... not unlinked: its receiver may claim it yet
        os.unlink(f"/dev/shm/{flying[0][1]}")  # (sweep() would, once this process exited)
        shm.discard([flying[2]])
    finally:
        small.clear()
    assert not ours()


def test_a_kept_file_not_sent_or_refused_is_given_back_to_its_sender(pool, reaper):
    _send(0)
    moved = shm.export([np.zeros(1 << 20, dtype=np.uint8)])[1]  # kept, in flight
    (_, name, _, kept) = moved[0]
    assert kept
    shm.discard(moved)  # the send failed: not unlinked (it is the sender's), free again
    assert os.path.exists(f"/dev/shm/{name}")
    moved = shm.export([np.zeros(1 << 20, dtype=np.uint8)])[1]
    assert moved[0][1] == name
    with pytest.raises(OSError):  # refused by its receiver (a bad entry before it): given back too
        shm.claim(((0, f"actorlib-{os.getpid()}-{'0' * 16}", 10, False), (1, name, 1 << 20, True)), [b"", b""])
    assert os.path.exists(f"/dev/shm/{name}") and shm.export([np.zeros(1 << 20, dtype=np.uint8)])[1][0][1] == name


def test_a_receiver_holding_enough_kept_files_gives_one_up_and_its_sender_drops_it(pool, reaper, monkeypatch):
    """A receiver holds at most HOLD_MAX descriptors: beyond, a kept file is marked never to be written again."""
    from .conftest import wait_for

    monkeypatch.setattr(shm, "HOLD_MAX", 0)
    _send(0)
    (_, name, _, kept), a = _send(1)
    assert kept and reaper.holding == 0 and os.path.exists(f"/dev/shm/{name}")  # mapped, not held, not unlinked
    del a
    gc.collect()
    wait_for(lambda: reaper.pending() == 0, timeout=10, what="the reaper to unmap every mapping")
    (_, other, _, kept), b = _send(2)
    assert kept and other != name and not os.path.exists(f"/dev/shm/{name}") and (b == 2).all()
    assert pool.held() == 1 << 20


_UMASK = """
import os
import numpy as np
from transport import shm
os.umask(0o277)  # (files would be created 0400: "claimed")
sent = [shm.export([np.zeros(1 << 20, dtype=np.uint8)])[1][0] for _ in range(3)]  # the last two kept, in flight
modes = [os.stat("/dev/shm/" + m[1]).st_mode & 0o777 for m in sent[1:]]
shm.discard(sent)
shm.release_kept()
print([m[3] for m in sent], sent[1][1] != sent[2][1], modes, flush=True)
"""


def test_a_kept_file_is_never_taken_while_in_flight_whatever_the_umask():
    out = subprocess.run([sys.executable, "-c", _UMASK], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == f"[False, True, True] True {[0o600, 0o600]}", out.stderr


def test_a_kept_file_unlinked_by_someone_else_is_not_named_again(pool, reaper):
    from .conftest import wait_for

    _send(0)
    (_, name, _, kept), a = _send(1)
    del a
    gc.collect()
    wait_for(lambda: reaper.pending() == 0, timeout=10, what="the reaper to unmap every mapping")
    os.unlink(f"/dev/shm/{name}")  # (systemd's RemoveIPC, an rm, ...)
    (_, other, _, kept), b = _send(2)
    assert other != name and (b == 2).all() and pool.held() == 1 << 20


def test_a_kept_file_that_fails_is_dropped_and_the_buffer_still_goes(pool, monkeypatch):
    _send(0)
    (_, name, _, _), a = _send(1)
    del a
    gc.collect()

    def broken(self):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(shm._Kept, "lock", broken)
    (_, other, _, _), b = _send(2)
    assert other != name and (b == 2).all() and not os.path.exists(f"/dev/shm/{name}")


def test_no_file_is_kept_where_dev_shm_has_little_room(pool, monkeypatch):
    real = os.statvfs
    little = os.statvfs_result((4096, 4096, 100, 10, 10, 100, 10, 10, 0, 255))  # 40 KiB free
    monkeypatch.setattr(os, "statvfs", lambda path: little if path == shm.SHM_DIR else real(path))
    _send(0)
    (_, _, _, kept), array = _send(1)
    assert not kept and (array == 1).all() and pool.held() == 0 and not ours()
    unsized = os.statvfs_result((4096, 4096, 0, 0, 0, 0, 0, 0, 0, 255))  # a tmpfs without a size: room
    monkeypatch.setattr(os, "statvfs", lambda path: unsized if path == shm.SHM_DIR else real(path))
    (_, _, _, kept), array = _send(2)
    assert kept and (array == 2).all()


def test_a_receiver_that_finds_a_kept_file_locked_leaves_it_alone(pool, reaper):
    """Its sender writes it now (a stale or repeated message names it): refused, and not marked free."""
    import fcntl

    _send(0)
    moved = shm.export([np.full(1 << 20, 3, dtype=np.uint8)])[1]
    path = f"/dev/shm/{moved[0][1]}"
    writer = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(writer, fcntl.LOCK_EX)
        with pytest.raises(BlockingIOError):
            shm.claim(tuple(tuple(m) for m in moved), [b""])
        assert os.stat(path).st_mode & 0o777 == 0o600  # still in flight: not to be written again
    finally:
        os.close(writer)
    buffers = [b""]
    shm.claim(tuple(tuple(m) for m in moved), buffers)
    assert (np.frombuffer(buffers[0], dtype=np.uint8) == 3).all()


def test_kept_files_not_taken_for_a_while_go_and_so_does_the_thread_that_drops_them(monkeypatch, reaper):
    """A sender that stopped sending a size lets go of its files (one in flight only once stale, and without
    unlinking it); with none kept, the thread ends."""
    from .conftest import wait_for

    idle = shm._Pool(shm.POOL_BYTES)
    monkeypatch.setattr(shm, "_pool", idle)
    monkeypatch.setattr(shm._Pool, "IDLE_S", 0.2)
    try:
        _send(0)
        (_, flying, _, _) = shm.export([np.zeros(1 << 20, dtype=np.uint8)])[1][0]  # in flight (idle first)
        (_, held, _, _), a = _send(1)  # claimed, and held by its receiver (a)
        assert idle._janitor is not None and idle.held() == 2 << 20
        wait_for(lambda: not os.path.exists(f"/dev/shm/{held}"), timeout=10, what="the idle file unlinked")
        assert (a == 1).all() and os.path.exists(f"/dev/shm/{flying}")  # mapped still; one in flight stays
        assert idle.held() == 1 << 20 and idle._janitor is not None
        monkeypatch.setattr(shm._Pool, "STALE_S", 0.5)  # (its receiver died before claiming it)
        wait_for(lambda: idle._janitor is None, timeout=10, what="the janitor to forget it and end")
        assert os.path.exists(f"/dev/shm/{flying}") and idle.held() == 0  # forgotten, not unlinked
        os.unlink(f"/dev/shm/{flying}")  # (sweep() would, once this process exited)
        assert not ours()
    finally:
        idle.clear()


_FORKED = """
import os, sys
import numpy as np
from transport import shm
for _ in range(2):
    (_, name, _, kept), = shm.export([np.zeros(1 << 20, dtype=np.uint8)])[1]
shm.discard([(0, name, 1 << 20, True)])  # free again
pid = os.fork()
if pid == 0:
    moved = shm.export([np.zeros(1 << 20, dtype=np.uint8)])[1]
    shm.release_kept()
    shm.discard(moved)
    os._exit(0 if moved[0][1] != name and os.path.exists("/dev/shm/" + name) else 1)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status), os.path.exists("/dev/shm/" + name), flush=True)
shm.release_kept()
shm.sweep(os.getpid())
"""


def test_a_forked_child_leaves_its_parents_kept_files_alone():
    out = subprocess.run([sys.executable, "-c", _FORKED], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["0", "True"], out.stderr


_HOLDER = """
import sys, time
import numpy as np
from transport import shm
buffers = [b""]
shm.claim(((0, sys.argv[1], int(sys.argv[2]), True),), buffers)
print(int(np.frombuffer(buffers[0], dtype=np.uint8).sum()), flush=True)
time.sleep(120)
"""


def test_a_kept_file_whose_receiver_was_killed_while_holding_it_is_written_again(pool, reaper):
    """The receiver's lock goes with its process: a receiver that died frees the file for its sender."""
    n = 1 << 20
    _send(0)
    (_, name, _, kept) = shm.export([np.ones(n, dtype=np.uint8)])[1][0]
    assert kept
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, name, str(n)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        assert select.select([holder.stdout], [], [], 60)[0], "the other process did not map the file"
        assert holder.stdout.readline().strip() == str(n)  # mapped, and held
        (_, other, _, _), _array = _send(2)
        assert other != name  # held by the other process: not written
        holder.kill()
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(timeout=30)
        holder.stdout.close()
    (_, again, _, _), array = _send(3)
    assert again == name and (array == 3).all()


def test_arrays_sent_again_and_again_arrive_intact_both_ways(cluster, big, pool, monkeypatch):
    """Through an actor: whichever file each goes into (a kept one written again, or a new one), every array
    arrives as sent."""
    monkeypatch.setattr(shm, "_room_for", lambda nbytes: True)  # (however full /dev/shm is on this machine)
    for i in range(6):
        total, writable = cluster.get(big.checksum.remote(np.full(3 << 20, i, dtype=np.float32)), timeout=60)
        assert total == float(i * (3 << 20)) and writable
    assert pool.held() >= 12 << 20  # kept by this driver
    for _ in range(4):
        arr, tensor = cluster.get(big.make.remote(1 << 20), timeout=60)
        assert (arr == np.arange(1 << 20, dtype=np.float32)).all() and float(tensor[10]) == 10.0
