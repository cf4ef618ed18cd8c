"""The raw floor: bare pyzmq + msgpack between processes, no framework; raw gloo for W7.

Blocking sockets (DEALER ↔ ROUTER over ipc://), one msgpack message per
call, at run.py's sizes and with its warm-up and timing:

- W1: a round trip of a small message; p50 and p99 µs.
- W2: 20 000 round trips with at most 1000 in flight; calls/s.
- W3: the same 1 KiB message to 4 server processes, the 4 replies gathered;
  p50 µs, interleaved block by block with W1 round trips to the first.
- W4: fresh interpreters: a process that starts 4 Python interpreters which
  import zmq + msgpack, connect and send their pid; in-process and whole s.
- W5: a 64 MiB buffer each way; MiB/s.
- W6: one request, 10 000 small messages back; items/s.
- W7: a 64 MiB float32 tensor from one process to another with
  torch.distributed gloo send/recv (and a 4-byte ack back); GiB/s.

Prints the same JSON lines as run.py, with ``"system": "floor-blocking"``.

    python benchmarks/floor.py               # every workload
    python benchmarks/floor.py -w W1,W5      # some of them
    python benchmarks/floor.py --tiny        # a quick check that it runs
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np
import zmq

SYSTEM = "floor-blocking"
WORKLOADS = ["W1", "W2", "W3", "W4", "W5", "W6", "W7"]
# run.py's sizes (tests/test_benchmarks.py checks they agree), and W7's
FULL = {
    "w1_warmup": 200,
    "w1_calls": 3000,
    "w2_calls": 20_000,
    "w2_inflight": 1000,
    "w3_rounds": 1000,
    "w4_rounds": 3,
    "w5_bytes": 64 << 20,
    "w5_rounds": 5,
    "w6_items": 10_000,
    "w6_rounds": 3,
    "w7_bytes": 64 << 20,
    "w7_rounds": 5,
}
TINY = {
    "w1_warmup": 5,
    "w1_calls": 20,
    "w2_calls": 200,
    "w2_inflight": 50,
    "w3_rounds": 20,
    "w4_rounds": 1,
    "w5_bytes": 1 << 20,
    "w5_rounds": 1,
    "w6_items": 100,
    "w6_rounds": 1,
    "w7_bytes": 1 << 20,
    "w7_rounds": 1,
}


def serve(address: str) -> None:
    sock = zmq.Context().socket(zmq.ROUTER)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # block at the high-water mark instead of dropping (W6)
    sock.bind(address)
    big = None
    while True:
        frames = sock.recv_multipart(copy=False)
        ident, head = frames[0], msgpack.unpackb(frames[1].bytes)
        if head[0] == "stop":
            return
        if head[0] == "get":
            big = big if big is not None and big.nbytes == head[1] else np.ones(head[1], dtype=np.uint8)
            sock.send_multipart([ident, msgpack.packb(["ok"]), memoryview(big)], copy=False)
        elif head[0] == "stream":
            for i in range(head[1]):
                sock.send_multipart([ident, msgpack.packb([i])])
            sock.send_multipart([ident, msgpack.packb(None)])
        elif head[0] == "echo":
            sock.send_multipart([ident, msgpack.packb([1, len(head[1])])])
        else:
            sock.send_multipart([ident, msgpack.packb([1, head[1]])])


def gloo_peer(init_file: str, nbytes: int, count: int) -> None:
    """Rank 1 of W7: receive ``count`` tensors from rank 0, acknowledging each."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=1, world_size=2)
    buf, ack = torch.empty(nbytes // 4, dtype=torch.float32), torch.ones(1, dtype=torch.float32)
    for _ in range(count):
        dist.recv(buf, 0)
        dist.send(ack, 0)
    dist.destroy_process_group()


def record(workload: str, metric: str, value: float, unit: str) -> dict[str, Any]:
    return {"system": SYSTEM, "workload": workload, "metric": metric, "value": round(value, 2), "unit": unit}


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Servers:
    """Server processes, each a ROUTER on its own ipc:// address, and a blocking DEALER to each."""

    def __init__(self, tmpdir: str) -> None:
        self.tmpdir = tmpdir
        self.context = zmq.Context()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.socks: list[zmq.Socket[bytes]] = []

    def add(self) -> zmq.Socket[bytes]:
        address = f"ipc://{self.tmpdir}/floor{len(self.procs)}.sock"
        self.procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "serve", address]))
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(address)
        self.socks.append(sock)
        return sock

    def close(self) -> None:
        for sock, proc in zip(self.socks, self.procs, strict=True):
            try:
                sock.send(msgpack.packb(["stop", 0]), zmq.NOBLOCK)
                proc.wait(timeout=10)
            except (zmq.ZMQError, subprocess.TimeoutExpired):
                pass
            finally:
                proc.kill()
                proc.wait()
                sock.close()
        self.context.term()


@contextlib.contextmanager
def server() -> Iterator[zmq.Socket[bytes]]:
    """One server process and a blocking DEALER to it, for run.py's figures timed block by block against the floor's."""
    tmpdir = tempfile.mkdtemp(prefix="floor-")
    servers = Servers(tmpdir)
    try:
        yield servers.add()
    finally:
        servers.close()
        shutil.rmtree(tmpdir, ignore_errors=True)


def round_trip(sock: zmq.Socket[bytes], i: int) -> None:
    sock.send(msgpack.packb(["ping", i]))
    msgpack.unpackb(sock.recv())


def w1(sock: zmq.Socket[bytes], size: dict[str, int]) -> list[dict[str, Any]]:
    lat = []
    for i in range(size["w1_warmup"] + size["w1_calls"]):
        t0 = time.perf_counter()
        round_trip(sock, i)
        lat.append((time.perf_counter() - t0) * 1e6)
    lat = lat[size["w1_warmup"] :]
    return [record("W1", "p50_us", percentile(lat, 0.5), "us"), record("W1", "p99_us", percentile(lat, 0.99), "us")]


def window_seconds(sock: zmq.Socket[bytes], total: int, window: int) -> float:
    """Seconds for ``total`` round trips with at most ``window`` in flight: W2's loop (run.py times it too)."""
    sent = done = 0
    t0 = time.perf_counter()
    while done < total:
        while sent < total and sent - done < window:
            sock.send(msgpack.packb(["ping", sent]))
            sent += 1
        msgpack.unpackb(sock.recv())
        done += 1
    return time.perf_counter() - t0


def w2(sock: zmq.Socket[bytes], size: dict[str, int]) -> list[dict[str, Any]]:
    total, window = size["w2_calls"], size["w2_inflight"]
    window_seconds(sock, total, window)  # warm-up
    return [record("W2", "calls_per_s", total / window_seconds(sock, total, window), "calls/s")]


def w3(servers: Servers, size: dict[str, int]) -> list[dict[str, Any]]:
    while len(servers.socks) < 4:
        servers.add()
    socks, first = servers.socks[:4], servers.socks[0]
    payload = b"x" * 1024

    def fan_out() -> None:
        message = msgpack.packb(["echo", payload])
        for sock in socks:
            sock.send(message)
        for sock in socks:
            msgpack.unpackb(sock.recv())

    for i in range(size["w1_warmup"]):
        fan_out()
        round_trip(first, i)
    fan, single = [], []
    rounds, block = size["w3_rounds"], max(1, size["w3_rounds"] // 10)
    for start in range(0, rounds, block):
        for _ in range(min(block, rounds - start)):
            t0 = time.perf_counter()
            fan_out()
            fan.append((time.perf_counter() - t0) * 1e6)
        for i in range(min(block, rounds - start)):
            t0 = time.perf_counter()
            round_trip(first, i)
            single.append((time.perf_counter() - t0) * 1e6)
    p50, w1_p50 = percentile(fan, 0.5), percentile(single, 0.5)
    return [
        record("W3", "p50_us", p50, "us"),
        record("W3", "w1_p50_us_interleaved", w1_p50, "us"),
        record("W3", "ratio_to_w1", p50 / w1_p50, "x"),
    ]


W4_SCRIPT = textwrap.dedent(
    """
    import time
    t0 = time.perf_counter()
    import subprocess, sys, tempfile
    import msgpack, zmq
    address = f"ipc://{tempfile.mkdtemp()}/w4.sock"
    sock = zmq.Context().socket(zmq.ROUTER)
    sock.bind(address)
    child = "import os, sys, msgpack, zmq; s = zmq.Context().socket(zmq.DEALER); s.connect(sys.argv[1]); s.send(msgpack.packb(os.getpid())); s.recv()"
    procs = [subprocess.Popen([sys.executable, "-c", child, address]) for _ in range(4)]
    peers = [sock.recv_multipart() for _ in range(4)]
    assert len({msgpack.unpackb(p[1]) for p in peers}) == 4
    print(time.perf_counter() - t0, flush=True)
    for p in peers:
        sock.send_multipart([p[0], b""])
    for p in procs:
        p.wait(timeout=30)
    """
)


def w4(size: dict[str, int]) -> list[dict[str, Any]]:
    inproc, wall = [], []
    for _ in range(size["w4_rounds"]):
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", W4_SCRIPT], capture_output=True, text=True, timeout=120, check=True)
        wall.append(time.perf_counter() - t0)
        inproc.append(float(out.stdout.strip().splitlines()[-1]))
    return [
        record("W4", "in_process_s", statistics.median(inproc), "s"),
        record("W4", "whole_process_s", statistics.median(wall), "s"),
    ]


def w5(sock: zmq.Socket[bytes], size: dict[str, int]) -> list[dict[str, Any]]:
    nbytes, rounds = size["w5_bytes"], size["w5_rounds"]
    arr = np.ones(nbytes, dtype=np.uint8)
    ins, outs = [], []
    for _ in range(rounds + 1):
        t0 = time.perf_counter()
        sock.send_multipart([msgpack.packb(["put", 0]), memoryview(arr)], copy=False)
        sock.recv_multipart()
        t1 = time.perf_counter()
        sock.send(msgpack.packb(["get", nbytes]))
        sock.recv_multipart(copy=False)
        ins.append(t1 - t0)
        outs.append(time.perf_counter() - t1)
    mib = nbytes / (1 << 20)
    return [
        record("W5", "in_mib_per_s", mib / statistics.median(ins[1:]), "MiB/s"),
        record("W5", "out_mib_per_s", mib / statistics.median(outs[1:]), "MiB/s"),
    ]


def w6(sock: zmq.Socket[bytes], size: dict[str, int]) -> list[dict[str, Any]]:
    n = size["w6_items"]
    rates = []
    for _ in range(size["w6_rounds"]):
        t0 = time.perf_counter()
        sock.send(msgpack.packb(["stream", n]))
        count = 0
        while msgpack.unpackb(sock.recv()) is not None:
            count += 1
        rates.append(count / (time.perf_counter() - t0))
        assert count == n
    return [record("W6", "items_per_s", statistics.median(rates), "items/s")]


def w7(tmpdir: str, size: dict[str, int]) -> list[dict[str, Any]]:
    import torch
    import torch.distributed as dist

    nbytes, rounds = size["w7_bytes"], size["w7_rounds"]
    init_file = os.path.join(tmpdir, "gloo-init")
    peer = subprocess.Popen([sys.executable, os.path.abspath(__file__), "gloo", init_file, str(nbytes), str(rounds + 1)])
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=2)
        tensor, ack = torch.ones(nbytes // 4, dtype=torch.float32), torch.empty(1, dtype=torch.float32)
        times = []
        for _ in range(rounds + 1):  # the first is a warm-up
            t0 = time.perf_counter()
            dist.send(tensor, 1)
            dist.recv(ack, 1)
            times.append(time.perf_counter() - t0)
        dist.destroy_process_group()
        peer.wait(timeout=60)
    finally:
        peer.kill()
        peer.wait()
    return [record("W7", "gib_per_s", nbytes / (1 << 30) / statistics.median(times[1:]), "GiB/s")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-w", "--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: checks the runner, measures nothing")
    args = parser.parse_args(argv)
    size = TINY if args.tiny else FULL
    chosen = [w.strip().upper() for w in args.workloads.split(",") if w.strip()]
    if not set(chosen) <= set(WORKLOADS):
        parser.error(f"unknown workloads {sorted(set(chosen) - set(WORKLOADS))}; known: {WORKLOADS}")
    tmpdir = tempfile.mkdtemp(prefix="floor-")
    servers = Servers(tmpdir)
    try:
        for workload in chosen:
            if workload == "W4":
                rows = w4(size)
            elif workload == "W7":
                rows = w7(tmpdir, size)
            elif workload == "W3":
                rows = w3(servers, size)
            else:
                sock = servers.socks[0] if servers.socks else servers.add()
                rows = {"W1": w1, "W2": w2, "W5": w5, "W6": w6}[workload](sock, size)
            for row in rows:
                print(json.dumps(row), flush=True)
    finally:
        servers.close()
        shutil.rmtree(tmpdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2])
    elif sys.argv[1:2] == ["gloo"]:
        gloo_peer(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        sys.exit(main())
