import pickle
import threading

import msgpack
import numpy as np
import pytest
import torch

from transport import DecodeError, EncodeError, Kind, ProtocolError, dumps, loads
from transport.protocol import VERSION, decode, encode_header


def roundtrip(value):
    body, buffers = dumps(value)
    return loads(body, [memoryview(bytearray(b)) for b in buffers])


@pytest.mark.parametrize(
    "value",
    [None, True, 0, -(2**63), 2**64 - 1, 1.5, "héllo", b"\x00\xff", [1, [2, "x"]], {"a": {1: None}}, (1, (2, [3])), ()],
)
def test_plain_data_round_trips_exactly(value):
    out = roundtrip(value)
    assert out == value and type(out) is type(value)


def test_numpy_array_travels_out_of_band_without_copy():
    arr = np.arange(1_000_000, dtype=np.float32).reshape(1000, 1000)
    body, buffers = dumps({"x": arr})
    assert len(body) < 200 and len(buffers) == 1
    recv_buf = memoryview(bytearray(buffers[0]))
    out = loads(body, [recv_buf])["x"]
    assert out.dtype == arr.dtype and out.shape == arr.shape and np.array_equal(out, arr)
    assert np.shares_memory(out, np.frombuffer(recv_buf, dtype=np.uint8))


def test_non_contiguous_and_zero_size_arrays():
    arr = np.arange(20).reshape(4, 5)[:, ::2]
    assert np.array_equal(roundtrip(arr), arr)
    empty = np.zeros((0, 3), dtype=np.int16)
    out = roundtrip(empty)
    assert out.shape == (0, 3) and out.dtype == np.int16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool, torch.float16])
def test_torch_tensors_out_of_band(dtype):
    t = (torch.arange(24) % 2).to(dtype).reshape(2, 3, 4)
    body, buffers = dumps(t)
    assert len(buffers) == 1
    out = loads(body, [memoryview(bytearray(buffers[0]))])
    assert out.dtype == dtype and out.shape == t.shape and torch.equal(out, t)


def test_torch_tensor_with_grad_and_empty():
    t = torch.ones(3, requires_grad=True)
    assert torch.equal(roundtrip(t), torch.ones(3))
    assert roundtrip(torch.empty(0, 4)).shape == (0, 4)


@pytest.mark.parametrize(
    "t",
    [
        torch.tensor(2.5),  # 0-dim
        torch.arange(12.0).reshape(3, 4).t(),  # not contiguous
        torch.arange(10)[3:7],  # a view into a bigger storage
        torch.tensor([1 + 2j, 3 - 1j]).conj(),  # conjugate bit: the values as seen, not the storage
        -torch.tensor([1 + 2j]).conj().imag,  # negative bit
    ],
    ids=["0-dim", "transposed", "slice", "conj", "neg"],
)
def test_torch_tensor_views_travel_as_their_values(t):
    out = roundtrip(t)
    assert out.dtype == t.dtype and out.shape == t.shape and torch.equal(out, t.resolve_conj().resolve_neg())


class Point:
    def __init__(self, x):
        self.x = x

    def __eq__(self, other):
        return isinstance(other, Point) and other.x == self.x


def test_objects_go_through_cloudpickle_with_oob_buffers():
    def local_fn(y):
        return y * 2

    body, buffers = dumps([Point(3), local_fn, pickle.PickleBuffer(b"x" * 100)])
    out = loads(body, buffers)
    assert out[0] == Point(3) and out[1](4) == 8


def test_unpicklable_value_names_its_type():
    with pytest.raises(EncodeError, match="lock"):
        dumps({"k": threading.Lock()})


def test_plain_only_refuses_pickles_both_ways():
    with pytest.raises(EncodeError):
        dumps(Point(1), allow_pickle=False)
    body, buffers = dumps(Point(1))
    with pytest.raises(DecodeError):
        loads(body, buffers, allow_pickle=False)


@pytest.mark.parametrize("garbage", [b"", b"\xc1", b"\xd4\x63\x00", b"\x92\x01", b"\xc7\x05\x03abcde"])
def test_garbage_is_a_decode_error(garbage):
    with pytest.raises(DecodeError):
        loads(garbage, [])


def test_headers_packed_from_many_threads_at_once_stay_whole():
    # every header goes through one shared msgpack Packer (encode_header)
    errors = []

    def pack(t):
        for i in range(2000):
            body = bytes([t]) * (i % 300)
            msg = decode([encode_header(Kind.RESULT, t * 100_000 + i, body, [(1, f"s{t}", i)] if i % 2 else None)])
            if msg.req_id != t * 100_000 + i or msg.body != body or (msg.shm and msg.shm[0][1] != f"s{t}"):
                errors.append((t, i))

    threads = [threading.Thread(target=pack, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not errors and not any(th.is_alive() for th in threads)


def test_a_header_body_must_be_bytes():
    for body in ("text", bytearray(b"x"), memoryview(b"x"), None):
        with pytest.raises(TypeError, match="must be bytes"):
            encode_header(Kind.CALL, 1, body)
    assert decode([encode_header(Kind.CALL, 1, b"ok")]).body == b"ok"  # the packer is fine after a refusal


def test_header_round_trip_and_protocol_errors():
    msg = decode([encode_header(Kind.CALL, 7, b"\x90"), b"buf"])
    assert msg.kind is Kind.CALL and msg.req_id == 7 and msg.body == b"\x90" and msg.buffers == [b"buf"]
    bad = [
        [],
        [b"not msgpack \xc1"],
        [msgpack.packb([VERSION + 1, 1, 1, b""])],
        [msgpack.packb([VERSION, 99, 1, b""])],
        [msgpack.packb([VERSION, 1, "x", b""])],
        [msgpack.packb([VERSION, 1])],
        [msgpack.packb({"a": 1})],
    ]
    for frames in bad:
        with pytest.raises(ProtocolError):
            decode(frames)


def test_encoding_and_decoding_leave_no_reference_cycles():
    """A cycle would keep a message's buffers (a shared-memory mapping, a received frame) until the
    garbage collector ran, and give it garbage to collect on every call."""
    import gc

    arr = np.arange(1000, dtype=np.float32)
    value = {"a": (1, (2, arr)), "t": torch.ones(3), "o": threading.Lock}
    gc.collect()
    gc.disable()
    try:
        for _ in range(50):
            body, buffers = dumps(value)
            loads(body, buffers)
        assert gc.collect() == 0
    finally:
        gc.enable()


def test_a_calls_arguments_travel_as_msgpacks_own_array():
    """The argument list is a plain msgpack array (one unpack reads it), whatever the caller passed."""
    from actorlib.connection import encode_call

    for args in [(), (1, (2, 3), b"x")]:
        body, buffers = encode_call("f", args, {"k": 4}, None)
        raw = msgpack.unpackb(body, raw=False, ext_hook=lambda code, data: ("ext", code))
        assert raw[0] == "f" and type(raw[1]) is list and raw[2] == {"k": 4} and not buffers
        assert loads(body, buffers)[1] == list(args)  # nested tuples stay tuples


def test_deeply_nested_tuples_travel_and_a_message_nesting_too_deep_is_refused():
    """Each nested tuple was a msgpack call inside the last: ~200 levels overflowed the C stack (SIGSEGV)."""
    for depth in (3, 64, 65, 300):
        value = ()
        for _ in range(depth):
            value = (value, 1)
        body, buffers = dumps(value)
        assert loads(body, buffers) == value  # beyond 64 levels, the rest is pickled
    hostile = msgpack.packb(None)
    for _ in range(100):  # tuple extensions nested by hand, past what any sender makes
        hostile = msgpack.packb(msgpack.ExtType(1, msgpack.packb([msgpack.ExtType(1, hostile)])))
    with pytest.raises(DecodeError, match="nested more than 64 deep"):
        loads(hostile, [])


def test_a_tensor_without_its_bytes_is_refused_and_string_arrays_travel():
    body, buffers = dumps(torch.ones(4))
    with pytest.raises(DecodeError, match=r"shape \[4\] arrived without its bytes"):
        loads(body, [b""])  # was 4 floats of whatever memory held (or 16 GiB for a shape that asked)
    strings = np.array(["a", "bb"], dtype=np.dtypes.StringDType())
    body, buffers = dumps(strings)
    assert loads(body, buffers).tolist() == ["a", "bb"]
