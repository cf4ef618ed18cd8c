"""Bad input never kills a process: the decoder and a live worker fed random, truncated and malformed messages."""

import os
import subprocess
import sys
import textwrap

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings, strategies as st

from transport import DecodeError, Kind, ProtocolError, dumps, loads
from transport.protocol import VERSION, decode, decode_batch, encode_header
from transport.security import cluster_key

from .conftest import ROOT_DIR

plain = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text() | st.binary(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner, max_size=5) | st.tuples(inner, inner),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(plain)
def test_plain_values_round_trip(value):
    body, buffers = dumps(value)
    assert loads(body, buffers) == value


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.lists(st.binary(max_size=50), max_size=3))
def test_random_bytes_never_escape_as_anything_but_decode_errors(data, buffers):
    try:
        loads(data, buffers)
    except DecodeError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=100), min_size=0, max_size=4))
def test_random_frames_are_protocol_errors_or_messages(frames):
    try:
        msg = decode(frames)
    except ProtocolError:
        return
    if msg.kind == Kind.BATCH:
        try:
            messages, bad = decode_batch(msg)
        except ProtocolError:
            return
        assert all(isinstance(m.req_id, int) for m in messages) and isinstance(bad, list)


@settings(max_examples=200, deadline=None)
@given(st.integers(-(2**63), 2**64 - 1), st.integers(-(2**63), 2**64 - 1), st.binary(max_size=50))
def test_wrong_versions_and_kinds(version, kind, body):
    frames = [msgpack.packb([version, kind, 1, body])]
    if version == VERSION and kind in {int(k) for k in Kind}:
        assert decode(frames).body == body
    else:
        with pytest.raises(ProtocolError):
            decode(frames)


@pytest.fixture(scope="module")
def live(cluster):
    @cluster.remote
    class Target:
        def ping(self):
            return "pong"

    t = Target.remote()
    assert cluster.get(t.ping.remote(), timeout=60) == "pong"
    rt = cluster.api.runtime.current()
    info = next(a for a in rt.run(rt.control("list_actors")) if a["actor_id"] == t._actor_id)
    return cluster, t, info


def _sock(address):
    """A raw socket that holds the cluster key: a member of the cluster sending garbage."""
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 2000)  # closing waits (bounded) until the frames are out: they must really arrive
    cluster_key().apply(s, server=False)
    s.connect(address)
    return s


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=4))
def test_live_worker_survives_random_multipart_messages(live, frames):
    cluster, target, info = live
    s = _sock(info["address"])
    try:
        s.send_multipart(frames)
    finally:
        s.close()


@pytest.mark.parametrize(
    "frames",
    [
        [encode_header(Kind.CALL, 1, b"\x93\xa4ping\x90\x80")],  # 3 elements, not 4
        [encode_header(Kind.CALL, 2, b"\x94\x01\x90\x80\xc0")],  # method is not a str
        [encode_header(Kind.CALL, 3, b"\x94\xa4ping\x05\x80\xc0")],  # args not a list
        [encode_header(Kind.CALL, 4, b"\x94\xa4ping\x90\x81\x01\x02\xc0")],  # keyword names not str
        [encode_header(Kind.CALL, 5, b"\x94\xa4ping\x90\x80\x05")],  # options not a map
        [encode_header(Kind.CALL, 6, b"\xc7\x03\x02abc")],  # a truncated pickle
        [encode_header(Kind.CALL, 7, dumps(["nope", [], {}, None])[0])],  # no such method
        [encode_header(Kind.RESULT, 8, b"\xc0")],  # a response nobody asked for
        [encode_header(Kind.STREAM_CREDIT, 9, b"\xa1x")],  # credit for nothing, not an int
        [msgpack.packb([VERSION, int(Kind.BATCH), 0, msgpack.packb([[1, 10, b"\x01"], [99, 1, b""]])])],
    ],
)
def test_malformed_calls_are_answered_and_the_worker_keeps_serving(live, frames):
    cluster, target, info = live
    s = _sock(info["address"])
    try:
        s.send_multipart(frames)
        kind = msgpack.unpackb(frames[0])[1]
        if kind == Kind.CALL:
            assert s.poll(10_000), "a malformed call got no answer"
            reply = decode(s.recv_multipart())
            assert reply.kind == Kind.ERROR
    finally:
        s.close()
    assert cluster.get(target.ping.remote(), timeout=30) == "pong"


def test_a_bad_entry_of_a_batch_costs_only_itself(live):
    """The whole BATCH was refused: its good calls were never answered, and their callers waited for ever."""
    cluster, target, info = live
    ping = dumps(["ping", [], {}, None])[0]
    entries = [[1, 11, ping], [99, 12, b""], [1, 13, "not bytes"], [1, 14, ping]]
    s = _sock(info["address"])
    try:
        s.send_multipart([msgpack.packb([VERSION, int(Kind.BATCH), 0, msgpack.packb(entries)])])
        answers = {}
        while len(answers) < 3 and s.poll(10_000):
            reply = decode(s.recv_multipart())
            answers[reply.req_id] = reply.kind
        assert answers == {11: Kind.RESULT, 13: Kind.ERROR, 14: Kind.RESULT}  # (12 is no request: dropped)
    finally:
        s.close()


def test_malformed_actor_specs_are_refused_field_by_field(live):
    """The head checks every field of a spec a peer sends: a wrong type would otherwise surface later, in a
    task the head cannot lose (its health checks) or half way through starting the actor."""
    cluster, _, _ = live
    rt = cluster.api.runtime.current()
    good = {"actor_id": "f" * 32, "class_name": "X", "methods": {}, "payload": b"", "demand": {"CPU": 0.1}}
    for field, bad in [
        ("max_restarts", "1"),
        ("env_vars", ["A=1"]),
        ("env_vars", {"A": 1}),
        ("sys_path", "/tmp"),
        ("max_concurrency", 0),
        ("demand", {"CPU": -1}),
        ("lifetime", "forever"),
        ("methods", {"f": "sync"}),
        ("bundle_index", True),
    ]:
        with pytest.raises(ValueError, match=f"malformed actor spec: {field} must be"):
            rt.run(rt.control("create_actor", spec={**good, field: bad}))
    assert not [a for a in rt.run(rt.control("list_actors")) if a["actor_id"] == good["actor_id"]]  # none was made

    @cluster.remote
    class After:
        def ping(self):
            return "pong"

    assert cluster.get(After.remote().ping.remote(), timeout=60) == "pong"


def test_a_control_request_with_wrong_types_changes_nothing(live):
    """register_node with an int node id was refused only after the node was stored: a phantom node with 64
    CPUs, alive and schedulable. And a TypeError raised inside a handler is a fault of the head's, not the
    request's."""
    cluster, _, _ = live
    rt = cluster.api.runtime.current()
    before = cluster.cluster_resources()
    node = {"resources": {"CPU": 64.0}, "gpu_ids": [], "address": "127.0.0.1", "hostname": "x"}
    for bad in ({"node_id": 12345}, {"node_id": "n" * 32, "address": 5}, {"node_id": "n" * 32, "gpu_ids": "0,1"}):
        with pytest.raises(ValueError, match="must be a"):
            rt.run(rt.control("register_node", **{**node, **bad}))
    with pytest.raises(ValueError, match="bad arguments to op_register_node"):
        rt.run(rt.control("register_node", **node))  # no node_id at all
    assert cluster.cluster_resources() == before


def test_oversized_messages_are_refused_by_the_socket(tmp_path):
    import asyncio

    from transport import Endpoint

    async def main():
        got = []
        server = Endpoint.bind(f"ipc://{tmp_path}/s.sock", on_message=got.append, name="small", max_message_size=1024)
        client = Endpoint.connect(server.address, on_message=None, name="client")
        client.send(Kind.CALL, 1, b"\xc0", [os.urandom(4096)])  # over the limit: the peer is dropped
        client.close()
        client = Endpoint.connect(server.address, on_message=None, name="client2")
        body, _ = dumps(1)
        client.send(Kind.CALL, 2, body)
        for _ in range(500):
            if got:
                break
            await asyncio.sleep(0.01)
        assert [m.req_id for m in got] == [2]
        client.close()
        server.close()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_the_largest_message_is_configurable_and_a_call_over_it_fails_clearly(tmp_path):
    script = textwrap.dedent(
        """
        import numpy as np, actorlib
        actorlib.init(num_cpus=1)

        @actorlib.remote
        class A:
            def size(self, x):
                return x.nbytes
            def make(self, n):
                return np.zeros(n, dtype=np.uint8)
            async def chunks(self, count, n):  # yields without awaiting: its items queue up in one loop turn
                for i in range(count):
                    yield bytes([i]) * n
            async def blob(self, n):
                return b"b" * n

        a = A.remote()
        # under the limit one by one, over it together: each must still arrive (they are batched apart)
        items = a.chunks.remote(4, 300_000)
        print("STREAM", [len(actorlib.get(items.next(timeout=30), timeout=30)) for _ in range(4)])
        print("REPLIES", [len(b) for b in actorlib.get([a.blob.remote(400_000) for _ in range(3)], timeout=30)])
        try:
            a.size.remote(np.zeros(2_000_000, dtype=np.uint8))
        except actorlib.exceptions.SerializationError as exc:
            print("CALL", "over the largest message" in str(exc) and "1,000,000 bytes" in str(exc))
        try:
            actorlib.get(a.make.remote(2_000_000), timeout=30)
        except actorlib.RemoteError as exc:
            print("RESULT", "over the largest message" in str(exc))
        except Exception as exc:
            print("RESULT", type(exc).__name__, "over the largest message" in str(exc))
        print("SMALL", actorlib.get(a.size.remote(np.zeros(1000, dtype=np.uint8)), timeout=30))
        actorlib.shutdown()
        """
    )
    env = {**os.environ, "PYTHONPATH": ROOT_DIR, "ACTORLIB_TMPDIR": str(tmp_path), "ACTORLIB_MAX_MESSAGE_BYTES": "1000000"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert "CALL True" in out.stdout and "SMALL 1000" in out.stdout, out.stdout + out.stderr
    assert "STREAM [300000, 300000, 300000, 300000]" in out.stdout and "REPLIES [400000, 400000, 400000]" in out.stdout
    assert "RESULT" in out.stdout and out.stdout.split("RESULT")[1].split("\n")[0].strip().endswith("True"), out.stdout
