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
            if len(tensors) != len(first_layer) or any(
                t.shape[1:] != f.shape[1:] or t.dtype != f.dtype for t, f in zip(tensors, first_layer)
            ):
                raise ValueError(
                    f"expert_weights[{layer}] differs in row shape or dtype from layer 0; staging needs uniform layers"
                )
        self.layout = RecordLayout.of(first_layer)
        self.buffer = torch.empty((count, self.layout.record_bytes), dtype=torch.uint8, device=first_layer[0].device)
        self.rows = [
            self.buffer[:, offset : offset + size].view(t.dtype).view(count, *t.shape[1:])
            for t, offset, size in zip(first_layer, self.layout.offsets, self.layout.sizes)
        ]

    def block(self, first: int, count: int) -> torch.Tensor:
        """Records ``[first, first + count)`` as one contiguous ``[count, record_bytes]`` uint8 view."""
        return self.buffer[first : first + count]

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()


def _to_device(arrays: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """The int64 ``arrays`` on ``device`` through one pinned buffer and one asynchronous copy.

    The agent thread never waits here. A synchronous copy from pageable memory would wait
    for everything queued on the current stream, which on the agent thread is the serving
    stream: if a serving collective there waits for a peer that is itself held at the
    commit fence, waiting for this rank's vote, the two ranks wait on each other
    (``docs/FAILURE_MODEL.md``, "What the decision record replaced"). One buffer instead of
    one per array: each pinned allocation and each copy is host work on the agent thread,
    which shares the GIL with the serving thread (``bench/RESULTS.md``: the cost per vote).
    """
    flat = [np.ascontiguousarray(a, dtype=np.int64) for a in arrays]
    host = torch.from_numpy(np.concatenate([a.ravel() for a in flat]))  # a fresh buffer, owned here
    whole = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host
    out, begin = [], 0
    for a in flat:
        out.append(whole[begin : begin + a.size].view(a.shape))
        begin += a.size
    return out


def prepare_commit(
    model: ExpertModel, plan_id: int, layers: list[int], new_rows: np.ndarray, area: StagingArea
) -> CommitAction:
    """Build the in-place copies that turn staged rows and new maps live at commit.

    Every device tensor here is filled by one non-blocking copy enqueued on the current
    stream (the agent's side stream), complete before the vote that precedes the commit.
    """
    device = model.device
    staging = area.work.staging
    spans: list[tuple[int, int, int]] = []  # (plan layer, first staging row, end)
    begin = 0
    while begin < len(staging):
        plan_layer = staging[begin].layer
        end = begin
        while end < len(staging) and staging[end].layer == plan_layer:
            end += 1
        spans.append((plan_layer, begin, end))
        begin = end
    num_logical = int(model.log2phy.shape[1])
    width = int(model.log2phy.shape[2])
    rows = np.asarray(new_rows, dtype=np.int64)
    dst_rows = [np.array([s.dst_row for s in staging[b:e]], dtype=np.int64) for _, b, e in spans]
    maps = [
        np.array(layers, dtype=np.int64),
        rows,
        logical_to_physical(rows, num_logical, width),
        logical_replica_count(rows, num_logical),
    ]
    on_device = _to_device(dst_rows + maps, device)
    weight_copies: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for (plan_layer, b, e), index in zip(spans, on_device):
        for k, live in enumerate(model.expert_weights[layers[plan_layer]]):
            weight_copies.append((live, index, area.rows[k][b:e]))
    layer_index, phy2log_rows, log2phy_rows, logcnt_rows = on_device[len(spans) :]
    return CommitAction(
        plan_id=plan_id,
        weight_copies=weight_copies,
        layer_index=layer_index,
        phy2log_rows=phy2log_rows,
        log2phy_rows=log2phy_rows,
        logcnt_rows=logcnt_rows,
    )


_WARMED_COPY_KINDS: set[tuple[torch.dtype, int, torch.device]] = set()
"""``(dtype, dims, device)`` of the in-place copies this process has already launched once."""


def warm_commit_kernels(action: CommitAction) -> int:
    """Launch, once per process, every kind of in-place copy ``action``'s commit will make, on
    scratch rows, from the calling (agent) thread; returns how many kinds were launched.

    Why: CUDA loads a kernel at its first launch in the process (lazy module loading), and the
    commit's ``index_copy_`` for a dtype the model never copied that way is such a launch. On an
    H200 the first commit of a process took tens of milliseconds of host time on the serving
    thread, the ones after it tens of microseconds (``bench/gpu/commit_cold.py``). Launched here
    first, on the agent's stream and off the serving path, the load is paid before the vote.
    Nothing on a CPU device needs it.
    """
    copies = [(live, rows) for live, rows, _ in action.weight_copies]
    copies += [(maps, action.layer_index) for maps in (action.phy2log_rows, action.log2phy_rows, action.logcnt_rows)]
    launched = 0
    for target, index in copies:
        kind = (target.dtype, target.dim(), target.device)
        if target.device.type == "cpu" or kind in _WARMED_COPY_KINDS:
            continue
        shape = (1,) * target.dim()
        scratch = torch.zeros((2,) + shape[1:], dtype=target.dtype, device=target.device)
        source = torch.zeros(shape, dtype=target.dtype, device=target.device)
        scratch.index_copy_(0, torch.zeros(1, dtype=index.dtype, device=index.device), source)
        _WARMED_COPY_KINDS.add(kind)
        launched += 1
    return launched
