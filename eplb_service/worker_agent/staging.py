"""Staging: where a plan's incoming expert rows wait until the commit step.

Runs on the agent thread only. Staging rows are allocated per plan batch from the
budget the coordinator cut the plan to; the commit then needs only in-place copies,
prepared here as a :class:`~.serving_hooks.CommitAction`.
"""

from __future__ import annotations

import numpy as np
import torch

from eplb_service.placement import logical_replica_count, logical_to_physical
from eplb_service.worker_agent.expert_model import ExpertModel
from eplb_service.worker_agent.schedule import RankWork
from eplb_service.worker_agent.serving_hooks import CommitAction
from eplb_service.worker_agent.transport import RecordLayout


class StagingArea:
    """One buffer of ``n_staging`` records (:class:`RecordLayout`); ``rows[k]`` views weight tensor ``k``'s part.

    A record holds one expert's row of every weight tensor, so a run of staging rows is one
    contiguous block: it arrives as one op. ``rows[k]`` is ``[n_staging, ...]`` shaped like
    tensor ``k``'s rows (strided: the commit's ``index_copy_`` reads it as it is).
    """

    def __init__(self, model: ExpertModel, work: RankWork) -> None:
        self.work = work
        count = len(work.staging)
        first_layer = model.expert_weights[0]
        for layer, tensors in enumerate(model.expert_weights):
            if len(tensors) != len(first_layer) or any(t.shape[1:] != f.shape[1:] or t.dtype != f.dtype for t, f in zip(tensors, first_layer)):
                raise ValueError(f"expert_weights[{layer}] differs in row shape or dtype from layer 0; staging needs uniform layers")
        self.layout = RecordLayout.of(first_layer)
        self.buffer = torch.empty((count, self.layout.record_bytes), dtype=torch.uint8, device=first_layer[0].device)
        self.rows = [self.buffer[:, offset:offset + size].view(t.dtype).view(count, *t.shape[1:])
                     for t, offset, size in zip(first_layer, self.layout.offsets, self.layout.sizes)]

    def block(self, first: int, count: int) -> torch.Tensor:
        """Records ``[first, first + count)`` as one contiguous ``[count, record_bytes]`` uint8 view."""
        return self.buffer[first:first + count]

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """An asynchronous host-to-device copy (pinned source on CUDA): the agent thread never waits here.

    A synchronous copy from pageable memory would wait for everything queued on the
    current stream, which on the agent thread is the serving stream: if a serving
    collective there waits for a peer that is itself held at the commit fence, waiting
    for this rank's vote, the two ranks wait on each other (seen on 2x H200: a 5 s fence
    timeout, one rank committing while the other dropped the plan).
    """
    host = torch.from_numpy(np.ascontiguousarray(array))
    if device.type != "cuda":
        return host.clone()
    return host.pin_memory().to(device, non_blocking=True)


def prepare_commit(model: ExpertModel, plan_id: int, layers: list[int], new_rows: np.ndarray,
                   area: StagingArea) -> CommitAction:
    """Build the in-place copies that turn staged rows and new maps live at commit.

    Every device tensor here is filled by a non-blocking copy enqueued on the serving
    stream, which the commit's copies follow.
    """
    device = model.device
    weight_copies: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    staging = area.work.staging
    begin = 0
    while begin < len(staging):
        plan_layer = staging[begin].layer
        end = begin
        while end < len(staging) and staging[end].layer == plan_layer:
            end += 1
        dst_rows = _to_device(np.array([s.dst_row for s in staging[begin:end]], dtype=np.int64), device)
        for k, live in enumerate(model.expert_weights[layers[plan_layer]]):
            weight_copies.append((live, dst_rows, area.rows[k][begin:end]))
        begin = end
    num_logical = int(model.log2phy.shape[1])
    width = int(model.log2phy.shape[2])
    rows = np.asarray(new_rows, dtype=np.int64)
    return CommitAction(
        plan_id=plan_id,
        weight_copies=weight_copies,
        layer_index=_to_device(np.array(layers, dtype=np.int64), device),
        phy2log_rows=_to_device(rows.copy(), device),
        log2phy_rows=_to_device(logical_to_physical(rows, num_logical, width), device),
        logcnt_rows=_to_device(logical_replica_count(rows, num_logical), device),
    )
