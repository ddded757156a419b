"""The CuPy side transport with each peer's ops packed into one NCCL op: a benchmark variant.

The agent sends whole blocks (one op per peer per chunk, see ``staging_pipeline``), so the
product transport never needs this. The benchmarks still measure it against separate ops
(``bench.gpu.p2p``'s agent-shaped group) and can run the harness with it (``--pack on``):
it lives here, and reaches the product only through the transport's one seam for what goes
on the wire, :meth:`CupyNcclTransport._send_recv_group`.

Importing this module needs no GPU; building the transport does (CuPy, CUDA).
"""

from __future__ import annotations

import torch

from eplb_service.worker_agent.transport import P2POp, TransportError, row_bytes
from eplb_service.worker_agent.transport_cupy_nccl import CupyNcclTransport, copy_all

Unpack = list[tuple[list[torch.Tensor], list[torch.Tensor]]]
"""Copies to run after a group: ``(destinations, sources)`` pairs, one multi-tensor copy each."""


class PackedPerPeerTransport(CupyNcclTransport):
    """:class:`CupyNcclTransport` that sends one NCCL op per peer and direction per group.

    With :attr:`pack_per_peer` on, the rows for a peer are packed into one contiguous buffer
    on the side stream before the group, and received rows are unpacked after it. Every rank
    must use the same setting (the receiver's offsets are the sender's issue order). Off, it
    is the product transport unchanged; the benchmark flips it between measurements.

    Args:
        pack_per_peer: the initial setting of :attr:`pack_per_peer`.
        **kwargs: those of :class:`CupyNcclTransport`.
    """

    name = "cupy-nccl-packed"

    def __init__(self, device: torch.device | int | str, *, pack_per_peer: bool = True, **kwargs) -> None:
        super().__init__(device, **kwargs)
        self.pack_per_peer = pack_per_peer

    def _send_recv_group(self, comm, ops: list[P2POp]) -> tuple[int, int]:
        if not self.pack_per_peer:
            return super()._send_recv_group(comm, ops)
        for op in ops:
            if op.tensor.device != self.device or not op.tensor.is_contiguous():
                raise TransportError(f"op with peer {op.peer}: expected a contiguous tensor on {self.device}")
        wire, unpack = self._packed(ops)
        sent, received = super()._send_recv_group(comm, wire)
        stream = self.stream
        with torch.cuda.stream(stream):
            for dsts, srcs in unpack:
                copy_all(dsts, srcs)
        for op in wire:  # the caller marks the ops it passed; the packed buffers are ours
            op.tensor.record_stream(stream)
        return sent, received

    def _packed(self, ops: list[P2POp]) -> tuple[list[P2POp], Unpack]:
        """One op per (peer, direction); returns the ops and the unpack copies to run after them.

        Both sides concatenate a peer's ops in issue order, which the agent keeps the same
        on every rank, so the receiver's offsets match the sender's.
        """
        sends: dict[int, list[torch.Tensor]] = {}
        recvs: dict[int, list[torch.Tensor]] = {}
        for op in ops:
            (sends if op.is_send else recvs).setdefault(op.peer, []).append(op.tensor)
        out: list[P2POp] = []
        unpack: Unpack = []
        stream = self.stream
        with torch.cuda.stream(stream):
            for peer, tensors in sends.items():
                if len(tensors) == 1:
                    out.append(P2POp(True, tensors[0], peer, 0))
                    continue
                sizes = [t.numel() * t.element_size() for t in tensors]
                buf = torch.empty(sum(sizes), dtype=torch.uint8, device=self.device)
                copy_all(list(torch.split(buf, sizes)), [row_bytes(t) for t in tensors])
                for t in tensors:
                    t.record_stream(stream)
                out.append(P2POp(True, buf, peer, 0))
            for peer, tensors in recvs.items():
                if len(tensors) == 1:
                    out.append(P2POp(False, tensors[0], peer, 0))
                    continue
                sizes = [t.numel() * t.element_size() for t in tensors]
                buf = torch.empty(sum(sizes), dtype=torch.uint8, device=self.device)
                out.append(P2POp(False, buf, peer, 0))
                unpack.append(([row_bytes(t) for t in tensors], list(torch.split(buf, sizes))))
        return out, unpack
