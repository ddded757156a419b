"""The benchmark's packed-per-peer transport, on CPU with a loopback communicator.

The CuPy transport needs CUDA; its one seam for what goes on the wire
(``CupyNcclTransport._send_recv_group``) and the bench subclass that packs each peer's
rows into one op are plain host logic around ``comm.send``/``comm.recv``. Here a fake
communicator moves the bytes (a rank sending to "peer 1" receives what it sent), so the
pack and unpack copies are checked byte for byte without a GPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import types

import pytest
import torch

from bench.gpu.packed_transport import PackedPerPeerTransport
from eplb_service.worker_agent.transport import P2POp, TransportError


class LoopbackComm:
    """``send`` queues the bytes per peer; ``recv`` from that peer writes them back."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []
        self.queued: dict[int, list[bytes]] = {}

    def send(self, ptr, nbytes, dtype, peer, stream) -> None:
        self.calls.append(("send", peer, nbytes))
        self.queued.setdefault(peer, []).append(ctypes.string_at(ptr, nbytes))

    def recv(self, ptr, nbytes, dtype, peer, stream) -> None:
        self.calls.append(("recv", peer, nbytes))
        data = self.queued[peer].pop(0)
        assert len(data) == nbytes, (len(data), nbytes)
        ctypes.memmove(ptr, data, nbytes)


@pytest.fixture
def transport(monkeypatch):
    """A PackedPerPeerTransport on CPU: no CuPy, no streams (their contexts are no-ops here)."""
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: None)
    t = PackedPerPeerTransport.__new__(PackedPerPeerTransport)
    t.device = torch.device("cpu")
    t.pack_per_peer = True
    t._stream = types.SimpleNamespace(cuda_stream=0)
    t._nccl = types.SimpleNamespace(groupStart=lambda: None, groupEnd=lambda: None)
    t._dtype_u8 = 1
    return t


def rows(seed: int, shapes) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 1000, shape, generator=g).to(torch.float32) for shape in shapes]


def test_packed_group_is_one_op_per_peer_and_direction_and_unpacks_exactly(transport):
    to1, to2 = rows(1, [(4, 3), (5,), (2, 2)]), rows(2, [(7,), (1, 3)])
    from1 = [torch.zeros_like(t) for t in to1]
    from2 = [torch.zeros_like(t) for t in to2]
    ops = [P2POp(True, t, 1, i) for i, t in enumerate(to1)] + [P2POp(True, t, 2, i) for i, t in enumerate(to2)]
    ops += [P2POp(False, t, 1, i) for i, t in enumerate(from1)] + [P2POp(False, t, 2, i) for i, t in enumerate(from2)]
    comm = LoopbackComm()
    sent, received = transport._send_recv_group(comm, ops)
    nbytes1 = sum(t.numel() * 4 for t in to1)
    nbytes2 = sum(t.numel() * 4 for t in to2)
    assert comm.calls == [("send", 1, nbytes1), ("send", 2, nbytes2), ("recv", 1, nbytes1), ("recv", 2, nbytes2)]
    assert sent == received == nbytes1 + nbytes2
    for got, want in zip(from1 + from2, to1 + to2):
        assert torch.equal(got, want)


def test_pack_off_is_the_product_group_one_op_per_tensor(transport):
    transport.pack_per_peer = False
    to1 = rows(3, [(4,), (6,)])
    from1 = [torch.zeros_like(t) for t in to1]
    ops = [P2POp(True, t, 1, i) for i, t in enumerate(to1)] + [P2POp(False, t, 1, i) for i, t in enumerate(from1)]
    comm = LoopbackComm()
    assert transport._send_recv_group(comm, ops) == (40, 40)
    assert comm.calls == [("send", 1, 16), ("send", 1, 24), ("recv", 1, 16), ("recv", 1, 24)]
    assert all(torch.equal(a, b) for a, b in zip(from1, to1))


def test_a_single_op_per_peer_goes_as_it_is(transport):
    (row,) = rows(4, [(8,)])
    into = torch.zeros_like(row)
    comm = LoopbackComm()
    transport._send_recv_group(comm, [P2POp(True, row, 1, 0), P2POp(False, into, 1, 0)])
    assert comm.calls == [("send", 1, 32), ("recv", 1, 32)] and torch.equal(into, row)


def test_a_strided_row_is_refused_with_its_peer(transport):
    strided = torch.zeros(4, 4)[:, 0]
    with pytest.raises(TransportError, match="op with peer 3: expected a contiguous tensor on cpu"):
        transport._send_recv_group(LoopbackComm(), [P2POp(True, strided, 3, 0)])
