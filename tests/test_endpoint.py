import asyncio
import os
import select
import threading
import time

import numpy as np
import pytest
import zmq

from transport import (
    ControlError,
    ControlServer,
    Endpoint,
    Kind,
    RemoteFailure,
    control_call,
    dumps,
    endpoint as endpoint_module,
    loads,
    shared_context,
)
from transport.protocol import VERSION, decode


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


class Echo:
    async def op_echo(self, peer, value):
        return value

    async def op_fail(self, peer):
        raise ControlError("ValueError", "no good")


@pytest.mark.parametrize("address", ["tcp://127.0.0.1:0", "ipc"])
def test_control_round_trip_and_errors(address, tmp_path):
    async def main():
        addr = f"ipc://{tmp_path}/s.sock" if address == "ipc" else address
        server = ControlServer(Echo())
        ep = Endpoint.bind(addr, on_message=server.handle, name="server")
        server.attach(ep)
        if address != "ipc":
            assert not ep.address.endswith(":0")
        client = Endpoint.connect(ep.address, on_message=None, name="client")
        try:
            assert await control_call(client, "echo", value={"a": [1, 2]}) == {"a": [1, 2]}
            with pytest.raises(RemoteFailure, match="no good"):
                await control_call(client, "fail")
            with pytest.raises(RemoteFailure, match="unknown control operation"):
                await control_call(client, "nope")
            with pytest.raises(RemoteFailure, match="bad arguments"):
                await control_call(client, "echo", wrong=1)
            # ping is answered by the endpoint itself
            pong = await client.call(Kind.PING, None, timeout=5)
            assert pong is None
        finally:
            client.close()
            ep.close()

    run(main())


def test_malformed_messages_are_dropped_and_requests_answered(tmp_path):
    async def main():
        server = ControlServer(Echo())
        ep = Endpoint.bind(f"ipc://{tmp_path}/s.sock", on_message=server.handle, name="server")
        server.attach(ep)
        raw = shared_context().socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(ep.address)
        try:
            for frames in ([b"garbage"], [b"\x94\x63\x01\x01\xc4\x00"], [b""], [bytes([0x94, VERSION, 11, 5]) + b"\xc4\x01\xc1"]):
                raw.send_multipart(frames)
            client = Endpoint.connect(ep.address, on_message=None, name="client")
            assert await control_call(client, "echo", value=3, timeout=10) == 3
            client.close()
            # the last garbage was a CONTROL request with a bad body: it was answered
            frames = await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, raw.recv_multipart), 10)
            assert frames
        finally:
            raw.close()
            ep.close()

    run(main())


def test_large_buffers_stream_through_zero_copy(tmp_path):
    async def main():
        got = asyncio.get_running_loop().create_future()

        def on_message(msg):
            got.set_result(loads(msg.body, msg.buffers))

        ep = Endpoint.bind(f"ipc://{tmp_path}/s.sock", on_message=on_message, name="server")
        client = Endpoint.connect(ep.address, on_message=None, name="client")
        payload = np.ones(8 << 20, dtype=np.uint8)
        body, buffers = dumps(payload)
        assert len(buffers) == 1
        client.send(Kind.CALL, 1, body, buffers)
        value = await asyncio.wait_for(got, 10)
        assert value.shape == (8 << 20,) and value.sum() == 8 << 20
        client.close()
        ep.close()

    run(main())


def send_soon_in_one_turn(tmp_path, values: list, max_message_size: int = -1) -> tuple[int, bool, int]:
    """Queue a message per value with ``send_soon`` in one loop turn; check they all arrive, in order. Returns
    how many messages went on the socket during the turn, whether some were still queued at its end, and how
    many in all. ``max_message_size``: the receiving socket's."""
    n = len(values)

    async def main():
        got = []
        done = asyncio.get_running_loop().create_future()

        def on_message(msg):
            got.append((msg.kind, msg.req_id, loads(msg.body)))
            if len(got) == n and not done.done():
                done.set_result(None)

        raw_frames = []
        server = Endpoint.bind(
            f"ipc://{tmp_path}/s.sock", on_message=on_message, name="server", max_message_size=max_message_size
        )
        client = Endpoint.connect(server.address, on_message=None, name="client")
        original = client.send_frames

        def spy(frames, peer=None, **kw):
            raw_frames.append(frames)
            return original(frames, peer, **kw)

        client.send_frames = spy
        try:
            for i, value in enumerate(values):
                body, _ = dumps(value)
                client.send_soon(Kind.CALL, i + 1, body)
            during, queued = len(raw_frames), client.has_outbox()
            await asyncio.wait_for(done, 10)
            assert got == [(Kind.CALL, i + 1, value) for i, value in enumerate(values)]  # all, in order
            return during, queued, len(raw_frames)
        finally:
            client.close()
            server.close()

    return run(main())


def test_send_soon_batches_what_one_loop_turn_sends(tmp_path):
    assert send_soon_in_one_turn(tmp_path, list(range(50))) == (0, True, 1)  # as one message, at the turn's end


def test_a_long_turn_sends_its_batches_as_they_fill(tmp_path):
    """A loop turn that queues many messages sends them BATCH_MAX at a time as it goes, so the peer can start
    on them: 3 full batches during the turn, the last 8 at its end."""
    assert send_soon_in_one_turn(tmp_path, list(range(3 * endpoint_module.BATCH_MAX + 8))) == (3, True, 4)


def test_a_batch_stays_under_the_largest_message_its_peer_takes(tmp_path, monkeypatch):
    """Bodies that fit one by one but not together go in several batches; one as big as a batch may be, alone.
    (ZeroMQ drops a message over the receiver's MAXMSGSIZE, and every message behind it, without a word.)"""
    monkeypatch.setattr(endpoint_module, "BATCH_BYTES", 100_000)
    chunk, big = b"c" * 60_000, b"B" * 120_000
    # [chunk, chunk] fill a batch; [chunk] leaves before big, which leaves alone; the ints at the turn's end
    assert send_soon_in_one_turn(tmp_path, [chunk, chunk, chunk, big, 1, 2, 3], max_message_size=250_000) == (3, True, 4)


def test_malformed_batches_are_refused():
    import msgpack

    from transport import ProtocolError
    from transport.protocol import decode_batch

    msg = decode([msgpack.packb([VERSION, 13, 0, msgpack.packb("nope")])])
    with pytest.raises(ProtocolError):
        decode_batch(msg)
    good = [1, 7, b"\xc0"]
    for entry in ([99, 1, b""], [13, 1, b""], [1, "x", b""], [1, 1]):  # one bad entry costs only itself
        msg = decode([msgpack.packb([VERSION, 13, 0, msgpack.packb([good, entry, good])])])
        messages, bad = decode_batch(msg)
        assert [m.req_id for m in messages] == [7, 7] and len(bad) == 1


def test_a_waiting_thread_reads_its_own_answer_and_hands_the_rest_to_the_loop_in_order(tmp_path):
    async def main():
        loop = asyncio.get_running_loop()
        peers = []
        arrived = loop.create_future()

        def on_message(msg):  # the server: learns the client's routing id from its first message
            peers.append(msg.peer)
            if not arrived.done():
                arrived.set_result(None)

        server = Endpoint.bind(f"ipc://{tmp_path}/s.sock", on_message=on_message, name="server")
        client = Endpoint.connect(server.address, on_message=None, name="client")
        stream, answer, loop_thread = [], [], threading.get_ident()
        stream_done = loop.create_future()

        def stream_sink(msg):
            stream.append((msg.kind, loads(msg.body), threading.get_ident()))
            if msg.kind == Kind.STREAM_END:
                stream_done.set_result(None)

        client.pending[1] = stream_sink
        client.pending[2] = lambda msg: answer.append((loads(msg.body), threading.get_ident()))
        client.send(Kind.CALL, 1, dumps(None)[0])
        await asyncio.wait_for(arrived, 10)
        client.stop_reading()  # while the thread reads, the loop does not: what it is handed waits for it
        peer = peers[0]
        for kind, req_id, value in [
            (Kind.STREAM_ITEM, 1, "a1"),
            (Kind.STREAM_ITEM, 1, "a2"),
            (Kind.RESULT, 2, "mine"),
            (Kind.STREAM_ITEM, 1, "a3"),
            (Kind.STREAM_END, 1, "end"),
        ]:
            server.send(kind, req_id, dumps(value)[0], peer=peer)
        server.send_frames([b"garbage"], peer)

        def wait_reading():
            deadline = time.monotonic() + 10
            while not answer and time.monotonic() < deadline:
                if client.zmq_socket.closed:
                    return
                select.select([client.fd], [], [], 0.1)
                client.read_responses((2,))

        await loop.run_in_executor(None, wait_reading)
        assert answer and answer[0][0] == "mine" and answer[0][1] != loop_thread  # handled on the waiting thread
        assert not stream  # handed over, not handled, while the loop was not reading
        client.start_reading()
        await asyncio.wait_for(stream_done, 10)
        assert [(k, v) for k, v, _ in stream] == [
            (Kind.STREAM_ITEM, "a1"),
            (Kind.STREAM_ITEM, "a2"),
            (Kind.STREAM_ITEM, "a3"),
            (Kind.STREAM_END, "end"),
        ]
        assert {t for _, _, t in stream} == {loop_thread}
        client.read_responses((99,))  # nothing waiting, nothing for it: returns at once
        client.close()
        client.read_responses((2,))  # closed: returns at once
        server.close()

    run(main())


def test_the_loop_stands_aside_while_a_thread_reads_and_reads_again_once_it_is_busy(tmp_path):
    async def main():
        loop = asyncio.get_running_loop()
        got = []
        server = Endpoint.bind(f"ipc://{tmp_path}/s.sock", on_message=lambda m: got.append(loads(m.body)), name="server")
        client = Endpoint.connect(server.address, on_message=None, name="client")
        await asyncio.sleep(0)  # the first look of a new endpoint's loop (scheduled when it was made) is over
        server.share_reading(True)  # a thread waits on the socket and reads it
        client.send(Kind.CALL, 1, dumps("a")[0])
        await until(lambda: server._paused, "paused")  # the loop woke, and stood aside without reading
        assert got == []
        taken = await loop.run_in_executor(None, lambda: server.take_waiting(lambda frames: True, after_loop=True))
        assert len(taken) == 1 and loads(decode(taken[0][1:]).body) == "a"
        await until(lambda: not server._ticking, "done looking")  # the thread took nothing since: no more wake-ups
        assert server._paused
        await loop.run_in_executor(None, server.share_reading, False)  # that thread got busy: the loop must read
        await until(lambda: not server._paused, "resumed")
        client.send(Kind.CALL, 2, dumps("b")[0])
        await until(lambda: got == ["b"], "read by the loop")
        client.close()
        server.close()

    run(main())


def test_a_thread_that_takes_a_whole_batch_leaves_the_rest_to_the_loop(monkeypatch):
    monkeypatch.setattr(endpoint_module, "_DRAIN_BATCH", 4)

    async def main():
        loop = asyncio.get_running_loop()
        peers, items = [], []
        address = f"inproc://batch-{os.getpid()}"  # inproc: a message sent is already there to read
        server = Endpoint.bind(address, on_message=lambda m: peers.append(m.peer), name="server")
        client = Endpoint.connect(address, on_message=None, name="client")
        client.pending[1] = lambda msg: items.append((loads(msg.body), threading.get_ident()))
        client.send(Kind.CALL, 1, dumps(None)[0])
        await until(lambda: peers, "the call arrived")
        client.share_reading(True)  # a thread reads this socket: the loop stands aside
        for i in range(10):
            server.send(Kind.STREAM_ITEM, 1, dumps(i)[0], peer=peers[0])
        # the thread takes the stream's items: a whole batch (4), and its look at the socket cleared the fd
        await loop.run_in_executor(None, lambda: client.read_responses((), streams=(1,)))
        assert sum(1 for _, reader in items if reader != threading.get_ident()) == 4  # on the thread
        await until(lambda: len(items) == 10, "the rest read by the loop")
        assert sorted(v for v, _ in items) == list(range(10))
        client.share_reading(False)
        client.close()
        server.close()

    run(main())


async def until(condition, what):
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, f"not {what} within 10 s"
        await asyncio.sleep(0.005)
