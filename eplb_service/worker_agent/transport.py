"""How expert rows travel between agents: the interface every side transport implements.

The agent thread owns the transport; the serving thread never touches it. A transport is
built from the coordinator's rendezvous (:class:`~eplb_service.protocol.CommInit`), is
never the serving group, and can be torn down (``abort``) and rebuilt with a new
generation. Implementations: :mod:`.transport_gloo` (CPU, gloo) and
``transport_cupy_nccl`` (GPU, CuPy NCCL on a side stream).
"""

from __future__ import annotations

import abc
import contextlib
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from eplb_service.protocol import CommInit


class TransportError(RuntimeError):
    """The side communicator failed (peer gone, timeout, torn down)."""


@dataclass(frozen=True)
class P2POp:
    """One send (``is_send``) or receive of ``tensor`` with ``peer``; ``tag`` orders matching."""

    is_send: bool
    tensor: torch.Tensor
    peer: int
    tag: int


@dataclass(frozen=True)
class RecordLayout:
    """One expert's rows of every weight tensor side by side in one contiguous record.

    A batch's staging rows and the senders' packed blocks use this layout, so everything
    one rank sends another in one chunk is one contiguous buffer: one NCCL op.
    """

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    record_bytes: int

    ALIGN = 16

    @classmethod
    def of(cls, tensors: list[torch.Tensor]) -> "RecordLayout":
        """The layout for one layer's weight tensors (each ``[rows, ...]``)."""
        offsets, sizes, end = [], [], 0
        for t in tensors:
            end += -end % cls.ALIGN
            size = t[0].numel() * t.element_size()
            offsets.append(end)
            sizes.append(size)
            end += size
        return cls(tuple(offsets), tuple(sizes), end + (-end % cls.ALIGN))


def row_bytes(row: torch.Tensor) -> torch.Tensor:
    """A contiguous row as flat bytes (a view)."""
    return row.reshape(-1).view(torch.uint8)


class Transport(abc.ABC):
    """A side communicator among the agents of one deployment."""

    name: str = "abstract"

    poll_hook: Callable[[], None] | None = None
    """Called every few ms while a transport call waits on the host (the agent pumps its
    socket there: heartbeats, AbortPlan); an exception it raises ends the wait."""

    @abc.abstractmethod
    def connect(self, comm: CommInit, rank: int, timeout_s: float) -> None:
        """Join the communicator of ``comm.generation`` (collective over all ranks)."""

    @abc.abstractmethod
    def store_keys(self, comm: CommInit) -> list[str]:
        """Every key the rendezvous of ``comm`` writes in the store, on every rank.

        Rank 0 deletes them once every rank is past that generation (``store_janitor``); a
        key missing here stays in the store for the life of the deployment.
        """

    @abc.abstractmethod
    def exchange(self, ops: list[P2POp], pace_s: float = 0.0) -> None:
        """Issue one bounded group of sends and receives, then a pause of ``pace_s``.

        It may return before the group completes (the GPU transport keeps at most two groups
        in flight, so bytes in flight stay bounded); :meth:`synchronize` waits for all.
        ``pace_s`` is the throttle's gap after this group; every rank passes the same value
        for the same group, so the GPU transport runs the gap on the device, where it keeps
        the next group starting at the same moment on every rank (a host sleep would let the
        ranks drift apart, and the early side's NCCL kernel would spin on SMs meanwhile).
        """

    def start_batch(self) -> None:  # noqa: B027 - optional: only the GPU transport needs a start
        """Begin one plan batch's transfers; every rank of the communicator calls it.

        The GPU transport enqueues a tiny all-reduce here so that the batch's first group
        starts on every rank at the same moment; the CPU transport needs nothing.
        """

    def gather(self, records: list[list[torch.Tensor]], layout: RecordLayout) -> torch.Tensor:
        """Pack ``records`` (each: one expert's row of every weight tensor) into ``[n, record_bytes]`` uint8.

        What a sender packs so that one op carries all it sends one peer in a chunk. The
        GPU transport packs on a stream of its own, overlapping the group in flight; the
        result must go to the next :meth:`exchange`.
        """
        out = torch.zeros((len(records), layout.record_bytes), dtype=torch.uint8, device=records[0][0].device)
        for i, record in enumerate(records):
            for row, offset, size in zip(record, layout.offsets, layout.sizes):
                out[i, offset : offset + size] = row_bytes(row)
        return out

    def block_digests(self, block: torch.Tensor) -> torch.Tensor:
        """The digest of every row of ``block`` ``[n, bytes]``, enqueued after what was issued so far.

        Returns a tensor ``[n]`` (on the device for the GPU transport); :meth:`collect`
        brings a list of them to the host with one wait.
        """
        return torch.tensor([self.row_digest(row) for row in block], dtype=torch.int64)

    def collect(self, digests: list[torch.Tensor]) -> list[np.ndarray]:
        """:meth:`block_digests` results on the host (62-bit values)."""
        return [d.cpu().numpy() & ((1 << 62) - 1) for d in digests]

    def device_context(self) -> contextlib.AbstractContextManager:
        """Where the agent thread enqueues its own device work (the GPU transport's side
        stream: never the serving stream, never waiting behind serving collectives)."""
        return contextlib.nullcontext()

    @property
    def busy(self) -> bool:
        """True while transfers are queued and not yet waited for (an abandoned batch must
        then tear the communicator down: its peers may never match them)."""
        return False

    @abc.abstractmethod
    def copy_local(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Copy on the transport's own stream (plain copy on CPU)."""

    @abc.abstractmethod
    def max_reduce(self, values: np.ndarray) -> np.ndarray:
        """All-reduce (MAX) of a small int64 vector: the commit vote.

        The wait is bounded by the transport's timeout and calls :attr:`poll_hook` while it
        lasts; an exception the hook raises ends it. A vote must not be abandoned early while
        peers may still complete it: the agent leaves it only when its own serving thread
        has already given up at the fence.
        """

    def row_digest(self, row: torch.Tensor) -> int:
        """A 62-bit digest of one expert row, the same for the same bytes on any rank.

        Integer arithmetic that wraps mod 2^64 is order-independent, so the result does
        not depend on how the reduction is split. GPU transports may override this to run
        on their own stream.
        """
        data = row.detach().reshape(-1).view(torch.uint8).to(torch.int64)
        weights = _digest_weights(data.numel(), data.device)
        return int((data * weights).sum().item()) & ((1 << 62) - 1)

    def _poll(self) -> None:
        if self.poll_hook is not None:
            self.poll_hook()

    def _wait_on_host(self, seconds: float) -> None:
        """Sleep ``seconds`` on the host in slices of at most 5 ms, calling :attr:`poll_hook` in between."""
        deadline = time.monotonic() + seconds
        while seconds > 0 and time.monotonic() < deadline:
            self._poll()
            time.sleep(min(0.005, max(0.0, deadline - time.monotonic())))

    @abc.abstractmethod
    def synchronize(self) -> None:
        """Wait until everything issued on the transport's stream has finished."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Tear the communicator down now; pending and later calls fail. Idempotent."""

    @property
    def generation(self) -> int:
        """Generation of the communicator built last (``CommInit.generation``; -1 before any)."""
        return -1

    @property
    @abc.abstractmethod
    def connected(self) -> bool:
        """True between a successful ``connect`` and ``abort``."""


_WEIGHTS: dict[tuple[int, str], torch.Tensor] = {}


def _digest_weights(n: int, device: torch.device) -> torch.Tensor:
    key = (n, str(device))
    if key not in _WEIGHTS:
        gen = torch.Generator().manual_seed(0x5EED)
        _WEIGHTS[key] = (torch.randint(1, 2**62, (n,), generator=gen, dtype=torch.int64) | 1).to(device)
    return _WEIGHTS[key]
