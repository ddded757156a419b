"""Stop-the-world rearrangement on the serving group: what vLLM's sync EPLB mode does.

Between two steps, for every layer of the plan: local copies into a temporary buffer, one
batched send/recv (``torch.distributed.batch_isend_irecv``, a single NCCL group) of every
expert row that crosses ranks, then the copies into the live rows and the new maps. The
serving stream is synchronised before and after, and the wall time between is the stall.
The same global schedule as the agents' (:func:`build_schedule`) decides who sends what.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.distributed as dist

from eplb_service.placement import logical_replica_count, logical_to_physical
from eplb_service.worker_agent.expert_model import ExpertModel
from eplb_service.worker_agent.schedule import build_schedule


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def stop_the_world(
    model: ExpertModel, phy2log_host: np.ndarray, layers: list[int], new_rows: np.ndarray, rank: int
) -> dict:
    """Apply ``new_rows [len(layers), P]`` to ``layers`` now; returns ``{stall_s, bytes_sent, bytes_received}``.

    ``phy2log_host [L, P]`` is the caller's host copy of the live placement; it is updated.
    """
    device = model.device
    world = model.num_ranks
    _sync(device)
    t0 = time.perf_counter()
    sent = received = 0
    for i, layer in enumerate(layers):
        schedule = build_schedule(phy2log_host[layer : layer + 1], new_rows[i : i + 1], world)
        work = schedule.per_rank[rank]
        live = model.expert_weights[layer]
        staging = [torch.empty((len(work.staging), *t.shape[1:]), dtype=t.dtype, device=t.device) for t in live]
        for copy in work.local:
            for k, t in enumerate(live):
                staging[k][copy.dst_staging].copy_(t[copy.src_row])
        ops = []
        for op in schedule.remote:
            if op.src_rank == rank:
                ops.extend(dist.P2POp(dist.isend, t[op.src_row], op.dst_rank) for t in live)
                sent += sum(t[0].numel() * t.element_size() for t in live)
            elif op.dst_rank == rank:
                ops.extend(dist.P2POp(dist.irecv, staging[k][op.dst_staging], op.src_rank) for k in range(len(live)))
                received += sum(t[0].numel() * t.element_size() for t in live)
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()
        for dup in work.duplicates:
            for buf in staging:
                buf[dup.dst_staging].copy_(buf[dup.src_staging])
        if work.staging:
            dst_rows = torch.tensor([s.dst_row for s in work.staging], dtype=torch.int64, device=device)
            for t, buf in zip(live, staging):
                t.index_copy_(0, dst_rows, buf)
    rows = np.asarray(new_rows, dtype=np.int64)
    index = torch.tensor(layers, dtype=torch.int64, device=device)
    num_logical, width = int(model.log2phy.shape[1]), int(model.log2phy.shape[2])
    model.phy2log.index_copy_(0, index, torch.from_numpy(rows.copy()).to(device))
    model.log2phy.index_copy_(0, index, torch.from_numpy(logical_to_physical(rows, num_logical, width)).to(device))
    model.logcnt.index_copy_(0, index, torch.from_numpy(logical_replica_count(rows, num_logical)).to(device))
    _sync(device)
    stall = time.perf_counter() - t0
    phy2log_host[layers] = rows
    return {"stall_s": stall, "bytes_sent": sent, "bytes_received": received}
