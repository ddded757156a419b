"""The staging pipeline: one plan batch's rows from where they are to this rank's staging.

``Plan`` rows → the global schedule (every rank derives the same one) → chunk bounds →
this rank's staging area → local copies → per chunk, one group of whole blocks with every
peer (senders pack their records, receivers write straight into staging) and the same
throttle gap on every rank → duplicates → the digest of every remote record as this rank
sent or received it (compared inside the vote). Nothing here touches the maps: the serving
thread applies staged rows only at the commit step.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from eplb_service import protocol
from eplb_service.worker_agent.expert_model import ExpertModel
from eplb_service.worker_agent.schedule import build_schedule, chunk_transfers
from eplb_service.worker_agent.staging import StagingArea
from eplb_service.worker_agent.transport import P2POp, Transport

NO_DIGEST = -(1 << 62)
"""Vote entry of a rank that took no part in a remote op (below every real digest)."""


class CpuSections:
    """CPU time of this thread per section of a handler, added to ``stats[f"{prefix}_{name}_cpu_us"]``.

    The agent thread shares the GIL with the serving thread, so its CPU time is what it can
    take from serving; the sections say where it goes (``thread_time``: a few hundred ns a mark).
    """

    __slots__ = ("stats", "prefix", "last")

    def __init__(self, stats: collections.Counter, prefix: str) -> None:
        self.stats, self.prefix, self.last = stats, prefix, time.thread_time()

    def mark(self, name: str) -> None:
        now = time.thread_time()
        self.stats[f"{self.prefix}_{name}_cpu_us"] += int((now - self.last) * 1e6)
        self.last = now


def weights_row(tensors: list, row: int) -> list:
    """One expert's row of every weight tensor of a layer: one record."""
    return [t[row] for t in tensors]


@dataclass
class Staged:
    """A staged plan batch: what the vote and the commit need."""

    area: StagingArea
    digests: np.ndarray
    """``[K]`` digest of every remote op's record as this rank sent or received it (``NO_DIGEST``: no part)."""
    received_bytes: int


class StagingPipeline:
    """Stages plan batches for one rank over its side transport."""

    def __init__(
        self,
        model: ExpertModel,
        transport: Transport,
        rank: int,
        ranks_per_node: int | None,
        stats: collections.Counter,
    ) -> None:
        self.model, self.transport, self.rank = model, transport, rank
        self.ranks_per_node = ranks_per_node
        self.stats = stats

    def stage(
        self,
        plan: protocol.Plan,
        rows: np.ndarray,
        phy2log_host: np.ndarray,
        config: protocol.AgentConfig,
        pump: Callable[[], None],
    ) -> Staged:
        """Fill this rank's staging rows for ``plan`` (new ``rows`` over ``phy2log_host``).

        ``pump`` runs between chunks and while the transport waits on the host (heartbeats,
        an abort request: it raises to stop staging). Every rank of the plan runs the same
        chunks in the same order, each one group of whole blocks (one op per peer: records of
        every weight tensor), and the same throttle gap after each, even a rank with no part
        in a chunk: the gaps keep the ranks' groups starting together (see ``CupyNcclTransport``).
        """
        layers = list(plan.layers)
        bpe = self.model.bytes_per_expert
        cpu = CpuSections(self.stats, "stage")
        schedule = build_schedule(phy2log_host[layers], rows, self.model.num_ranks, self.ranks_per_node)
        bounds = schedule.chunks(config.max_ops_per_group, config.chunk_bytes, bpe)
        schedule = schedule.contiguous_by_source(bounds)
        work = schedule.per_rank[self.rank]
        area = StagingArea(self.model, work)
        weights = self.model.expert_weights
        transport = self.transport
        transport.poll_hook = pump
        cpu.mark("plan")
        try:
            transport.start_batch()
            for copy in work.local:
                for k, live in enumerate(weights[layers[copy.layer]]):
                    transport.copy_local(area.rows[k][copy.dst_staging], live[copy.src_row])
            cpu.mark("local")
            received = 0
            pending: list[tuple[list[int], object]] = []  # (remote op indices, their digests)
            for number, (begin, end) in enumerate(bounds):
                part = chunk_transfers(schedule, self.rank, begin, end)
                ops: list[P2POp] = []
                blocks = []
                for peer, sent in part.sends.items():
                    block = transport.gather(
                        [weights_row(weights[layers[layer]], row) for layer, row in sent], area.layout
                    )
                    ops.append(P2POp(True, block, peer, number))
                    blocks.append((part.send_ops[peer], block))
                for peer, (first, count) in part.receives.items():
                    block = area.block(first, count)
                    ops.append(P2POp(False, block, peer, number))
                    blocks.append((part.receive_ops[peer], block))
                    received += count * bpe
                cpu.mark("pack")
                # The throttle: the busiest rank's bytes in this chunk over the rate, the same
                # figure on every rank.
                pace_s = (
                    schedule.chunk_cost_bytes(begin, end, bpe) / config.throttle_bytes_per_s
                    if config.throttle_bytes_per_s > 0
                    else 0.0
                )
                transport.exchange(ops, pace_s)
                cpu.mark("exchange")
                pending.extend((indices, transport.block_digests(block)) for indices, block in blocks)
                cpu.mark("digest")
                pump()
                cpu.mark("pump")
            for dup in work.duplicates:
                transport.copy_local(area.block(dup.dst_staging, 1), area.block(dup.src_staging, 1))
            transport.synchronize()
            cpu.mark("synchronize")
            digests = self.remote_digests(len(schedule.remote), pending)
            cpu.mark("collect")
        finally:
            transport.poll_hook = None
        self.stats["bytes_received"] += received
        return Staged(area, digests, received)

    def remote_digests(self, num_remote: int, pending: list[tuple[list[int], object]]) -> np.ndarray:
        """Digest of every remote op's record as this rank sent or received it (sentinel if neither)."""
        digests = np.full(num_remote, NO_DIGEST, dtype=np.int64)
        if pending:
            for (indices, _), values in zip(pending, self.transport.collect([d for _, d in pending])):
                digests[indices] = values
        return digests
