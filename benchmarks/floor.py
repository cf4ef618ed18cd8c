"""The raw floor: bare pyzmq + msgpack between two processes, no framework.

W1 floor: a blocking DEALER ↔ ROUTER round trip of a small msgpack message.
W5 floor: a 64 MiB buffer each way over the same sockets (ipc://).
Prints the same JSON lines as run.py, with ``"system": "floor-blocking"``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import msgpack
import numpy as np
import zmq


def serve(address: str) -> None:
    sock = zmq.Context().socket(zmq.ROUTER)
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
        else:
            sock.send_multipart([ident, msgpack.packb([1, head[1]])])


def main(calls: int = 3000, warmup: int = 200, nbytes: int = 64 << 20, rounds: int = 5) -> None:
    address = f"ipc://{tempfile.mkdtemp()}/floor.sock"
    server = subprocess.Popen([sys.executable, __file__, "serve", address])
    sock = zmq.Context().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        lat = []
        for i in range(warmup + calls):
            t0 = time.perf_counter()
            sock.send(msgpack.packb(["ping", i]))
            msgpack.unpackb(sock.recv())
            lat.append((time.perf_counter() - t0) * 1e6)
        lat = sorted(lat[warmup:])
        rows = [("W1", "p50_us", lat[len(lat) // 2], "us"), ("W1", "p99_us", lat[int(len(lat) * 0.99)], "us")]
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
        rows += [
            ("W5", "in_mib_per_s", mib / statistics.median(ins[1:]), "MiB/s"),
            ("W5", "out_mib_per_s", mib / statistics.median(outs[1:]), "MiB/s"),
        ]
        for workload, metric, value, unit in rows:
            print(
                json.dumps(
                    {"system": "floor-blocking", "workload": workload, "metric": metric, "value": round(value, 2), "unit": unit}
                )
            )
        sock.send(msgpack.packb(["stop", 0]))
        server.wait(timeout=30)
    finally:
        server.kill()
        server.wait()
        os.unlink(address[len("ipc://") :]) if os.path.exists(address[len("ipc://") :]) else None


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2])
    else:
        main()
