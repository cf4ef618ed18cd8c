"""A compiled graph's tensor channel on its own: two real gloo groups in this process, one per end.

What the graph tests cannot see from outside: a big value goes into
receives posted for it beforehand (ahead of it, or before the receiver's
word), in order, while smaller ones go at once and never take a big one's receives;
split across a channel's connections, its bytes land where they belong;
and a closed channel takes no more sends and lets its poster thread end.
"""

from __future__ import annotations

import concurrent.futures
import threading

import pytest
import torch
import torch.distributed as dist

from actorlib import dag_channel
from actorlib.dag_channel import (
    HANDSHAKE_MIN_BYTES,
    SLOT_BYTES,
    BufferPool,
    Channel,
    _Handshake,
    capacity,
    make_group,
    meta_of,
    wait_all,
)

from .conftest import wait_for

TIMEOUT_S = 60.0  # every gloo wait here fails after this, instead of hanging


class Counted:
    """A process group whose sends and receives are counted, with their bytes: which connection carried what."""

    def __init__(self, group):
        self._group = group
        self.nbytes = 0

    def send(self, tensors, peer, tag):
        self.nbytes += sum(t.nbytes for t in tensors)
        return self._group.send(tensors, peer, tag)

    def recv(self, tensors, peer, tag):
        self.nbytes += sum(t.nbytes for t in tensors)
        return self._group.recv(tensors, peer, tag)


@pytest.fixture(params=[1, 2], ids=["one-connection", "striped"])
def ends(request):
    """A gloo channel's two ends: (sender, receiver), on two-rank groups made for this test: one, or two
    connections across which big values' tensors (here from 1 MiB) are split."""
    store = dist.HashStore()

    def groups(rank):
        return [
            Counted(make_group("gloo", dist.PrefixStore(f"t{stripe}/", store), rank, "127.0.0.1", TIMEOUT_S))
            for stripe in range(request.param)
        ]

    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # each rank's group waits for the other's
        made = [pool.submit(groups, rank) for rank in (0, 1)]
        g0, g1 = (f.result(timeout=TIMEOUT_S) for f in made)
    buffers = BufferPool(per_size=4)
    with pytest.MonkeyPatch.context() as patch:  # (apart from the tests' own monkeypatch, which they undo)
        patch.setattr(dag_channel, "STRIPE_MIN_BYTES", HANDSHAKE_MIN_BYTES)
        sender = Channel(g0[0], "gloo", 1, "send-test-gloo", buffers, role="send", slots=0, max_inflight=4, stripes=g0[1:])
        receiver = Channel(g1[0], "gloo", 0, "recv-test-gloo", buffers, role="recv", slots=2, max_inflight=4, stripes=g1[1:])
        yield sender, receiver
        sender.close()
        receiver.close()
        wait_for(lambda: not posters(), timeout=TIMEOUT_S, what="the poster thread to end")


def posters() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "actorlib-dag-send-test-gloo"]


def receive(receiver: Channel, tensors: list[torch.Tensor]) -> None:
    """Post the receives for one value as its announcing message would, wait, and check what came."""
    metas = [meta_of(t, "gloo") for t in tensors]
    received, works = receiver.post_recv(metas)
    wait_all(works, receiver.name)
    got = receiver.finish_recv(metas, received)
    assert [(g.shape, g.dtype) for g in got] == [(t.shape, t.dtype) for t in tensors]
    assert all(torch.equal(g, t) for g, t in zip(got, tensors, strict=True))


def test_big_values_go_into_receives_posted_beforehand_in_order_with_the_others(ends):
    sender, receiver = ends
    n = HANDSHAKE_MIN_BYTES // 4  # float32
    small = SLOT_BYTES // 4 + 1  # past a packed slot, so sent tensor by tensor, but not big
    values = [
        [torch.arange(n, dtype=torch.float32), torch.full((3, small), 2.0)],  # the first: waits for the word
        [torch.arange(small, dtype=torch.float32)],  # sent at once, while the big one before it waits
        [torch.arange(n, dtype=torch.float32) + 1, torch.full((3, small), 3.0)],  # fits the receives ahead
        [torch.arange(n - 1000, dtype=torch.float32), torch.ones(small)],  # smaller: fits them too
        [torch.full((small,), 5.0), torch.empty(0)],
        [torch.ones(2 * n, dtype=torch.float64), torch.empty(0), torch.full((small,), 7, dtype=torch.int32)],  # bigger
        [torch.zeros(2 * n, dtype=torch.float64), torch.empty(0), torch.full((small,), 8, dtype=torch.int32)],
        [torch.arange(4 * n, dtype=torch.int32), torch.empty(0), torch.full((small,), 9.0)],  # same bytes, other dtypes
        [torch.ones(n), torch.empty(0), torch.full((small,), 9.0)],  # under half the receive ahead: does not fit
    ]
    assert [sum(t.nbytes for t in v) >= HANDSHAKE_MIN_BYTES for v in values] == [True, False, True, True, False] + [True] * 4
    sent = []
    for seq, tensors in enumerate(values):  # all in flight before the receiver posts anything
        assert sender.offsets(tensors) is None
        sent.append(sender.post_send(sender.prepare_send(tensors, None), seq))
    (first,) = sent[0]
    assert isinstance(first, _Handshake)  # nothing can have told the sender to go: queued, not posted
    assert not (first.posted.is_set() or first.sends or first.is_completed())
    for tensors in values:
        receive(receiver, tensors)
    for works in sent:
        wait_all(works, sender.name)
    # both ends agree on the receives posted ahead for the next big value: the last one's, rounded up
    assert receiver._ahead_sizes == sender._ahead_sizes == [(0, capacity(4 * n)), (2, capacity(4 * small))]
    assert len(receiver._ahead_recvs) == 2
    # now nothing is queued, and the receives for the next one are posted already: sent at once
    same_shapes = [torch.arange(n, dtype=torch.float32), torch.empty(0), torch.full((small,), 9, dtype=torch.int32)]
    works = sender.post_send(sender.prepare_send(same_shapes, None), len(values))
    assert works and not any(isinstance(w, _Handshake) for w in works)
    receive(receiver, same_shapes)
    wait_all(works, sender.name)
    # split: every connection carried a share of the big tensors (each end counts what it posted)
    for end in (sender, receiver):
        big = sum(g.nbytes for g in end._groups) // len(end._groups) // 4
        assert all(g.nbytes > big for g in end._groups), [g.nbytes for g in end._groups]


def test_receives_ahead_are_as_large_as_the_last_value_rounded_up():
    assert [capacity(n) for n in (1, 7, 8, 9, 1 << 20, (1 << 20) + 1, 3 << 20)] == [
        1,
        7,
        8,
        9,
        1 << 20,
        (1 << 20) + (1 << 17),
        3 << 20,
    ]
    assert all(n <= capacity(n) <= n * 9 // 8 + 1 for n in range(1, 5000))


def test_a_closed_channel_takes_no_more_sends_and_its_poster_ends(ends):
    sender, receiver = ends
    tensors = [torch.ones(HANDSHAKE_MIN_BYTES // 4)]
    shakes = sender.post_send(sender.prepare_send(tensors, None), 0)
    assert len(posters()) == 1
    metas = [meta_of(t, "gloo") for t in tensors]
    received, works = receiver.post_recv(metas)
    wait_all(works + shakes)
    sender.close()
    with pytest.raises(ConnectionError, match="closed"):
        sender.post_send(sender.prepare_send(tensors, None), 1)
    wait_for(lambda: not posters(), timeout=TIMEOUT_S, what="the poster thread to end")
    assert torch.equal(receiver.finish_recv(metas, received)[0], tensors[0])


def test_the_buffer_pool_reuses_free_buffers_only_and_stays_bounded_when_shapes_keep_changing():
    pool = BufferPool(per_size=2, max_bytes=8 << 20)
    mib = (1 << 20) // 4  # float32 elements in 1 MiB
    first = pool.empty([mib], torch.float32)
    ptr = first.data_ptr()
    second = pool.empty([mib], torch.float32)
    assert second.data_ptr() != ptr  # the first is still used
    view = first[10:]
    del first
    assert pool.empty([mib], torch.float32).data_ptr() not in (ptr, second.data_ptr())  # a view keeps it used
    del view
    again = pool.empty([2, mib // 2], torch.float32)  # free now: the same memory, in another shape
    assert again.data_ptr() == ptr and again.shape == (2, mib // 2)
    assert pool.held() == 2 << 20
    for k in range(1, 100):  # a new size at every execution, as when the number of tokens changes
        t = pool.empty([mib + k * 4096], torch.float32)
        assert pool.held() <= 8 << 20  # the sizes used longest ago are forgotten
    last = t.data_ptr()
    del t
    assert pool.empty([mib + 99 * 4096], torch.float32).data_ptr() == last  # the newest size is kept, and free
    big = pool.empty([9 * mib], torch.float32)  # one size past the cap: the pool keeps it alone
    assert pool.held() == big.nbytes
    assert pool.empty([mib // 4], torch.float32).nbytes == 1 << 18  # under 1 MiB: never pooled
    pool.clear()
    assert pool.held() == 0


def test_an_end_that_cannot_post_a_values_receives_breaks_its_channel(ends, monkeypatch):
    """Out of memory for a value's receives: the sender has sent it already, so the receiving end can no
    longer match transfers to values. Every value from then on fails at once, rather than taking another's
    bytes; and what was posted stays alive for gloo to write into."""
    sender, receiver = ends
    n = HANDSHAKE_MIN_BYTES // 4
    first = [torch.arange(n, dtype=torch.float32)]
    works = sender.post_send(sender.prepare_send(first, None), 0)
    receive(receiver, first)
    wait_all(works)

    def no_memory(shape, dtype):
        raise RuntimeError("DefaultCPUAllocator: not enough memory (simulated)")

    monkeypatch.setattr(receiver._pool, "empty", no_memory)
    second = [torch.arange(n, dtype=torch.float32) + 1]  # fits the receives ahead: sent into them at once
    works = sender.post_send(sender.prepare_send(second, None), 1)
    with pytest.raises(ConnectionError, match="broken: could not post .*not enough memory"):  # (for the receives ahead of the next one)
        receiver.post_recv([meta_of(t, "gloo") for t in second])
    monkeypatch.undo()
    with pytest.raises(ConnectionError, match="broken: could not post .*not enough memory"):
        receiver.post_recv([meta_of(t, "gloo") for t in first])
    assert receiver._orphans
    wait_all(works)  # the bytes landed in those receives, which nobody reads now


def test_a_sender_that_cannot_start_its_poster_fails_the_value_before_announcing_it(ends, monkeypatch):
    """No thread to be had for the poster: the value fails in prepare_send, before its message would have
    told the receiver to post receives for it, so the next value still matches its own receives."""
    sender, receiver = ends

    class NoThread:
        def __init__(self, channel):
            raise RuntimeError("can't start new thread (simulated)")

    monkeypatch.setattr(dag_channel, "_Poster", NoThread)
    first = [torch.full((HANDSHAKE_MIN_BYTES // 4,), 1.0)]
    with pytest.raises(ConnectionError, match="can't start new thread"):
        sender.prepare_send(first, None)
    assert sender._ahead_sizes is None and sender._broken is None
    monkeypatch.undo()
    second = [torch.full((HANDSHAKE_MIN_BYTES // 4,), 2.0)]
    works = sender.post_send(sender.prepare_send(second, None), 1)
    receive(receiver, second)  # its own bytes, not another value's
    wait_all(works)
