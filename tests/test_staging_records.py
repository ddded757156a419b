"""Records: a sender's packed block for a peer is byte for byte the receiver's staging block.

The GPU transport moves each (chunk, peer) block as one op; these tests pin the layout on
CPU: record offsets, staging views that alias one buffer, the base transport's gather and
digests, and the throttle's host-side gap of the gloo transport.
"""

from __future__ import annotations

import datetime
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import commit_through_serving, expert_row_value, free_port, make_model, rows_match_maps

from eplb_service.placement import PlacementShape, initial_phy2log
from eplb_service.protocol import CommInit
from eplb_service.worker_agent.schedule import build_schedule, chunk_transfers
from eplb_service.worker_agent.staging import StagingArea, prepare_commit
from eplb_service.worker_agent.transport import P2POp, RecordLayout, TransportError
from eplb_service.worker_agent.transport_gloo import GlooTransport


def test_record_layout_aligns_every_part_and_the_record():
    tensors = [
        torch.zeros(4, 3, dtype=torch.float32),
        torch.zeros(4, 5, dtype=torch.uint8),
        torch.zeros(4, 2, dtype=torch.bfloat16),
    ]
    layout = RecordLayout.of(tensors)
    assert layout.sizes == (12, 5, 4)
    assert layout.offsets == (0, 16, 32)
    assert layout.record_bytes == 48
    assert all(offset % RecordLayout.ALIGN == 0 for offset in layout.offsets)


def test_staging_views_alias_one_record_buffer(small_shape):
    model = make_model(0, small_shape)
    old = initial_phy2log(small_shape)[[0]]
    new = old.copy()
    new[0, :4] = new[0, 4:]  # rank 0's four slots take rank 1's experts: four received rows
    work = build_schedule(old, new, 2).per_rank[0]
    area = StagingArea(model, work)
    assert area.buffer.shape == (4, area.layout.record_bytes) and area.buffer.dtype == torch.uint8
    area.rows[1][2].fill_(7.0)
    record = area.block(2, 1)
    offset, size = area.layout.offsets[1], area.layout.sizes[1]
    assert torch.equal(record[0, offset : offset + size].view(torch.float32), torch.full((3,), 7.0))
    assert area.block(1, 3).is_contiguous() and area.block(1, 3).shape == (3, area.layout.record_bytes)


def test_a_gathered_block_lands_as_the_receivers_staging_and_commits(small_shape):
    """Rank 1 packs what rank 0 needs; copying the bytes into rank 0's staging block is the transfer."""
    shape = small_shape
    senders = {r: make_model(r, shape) for r in range(2)}
    receiver = senders[0]
    old = initial_phy2log(shape)[[1]]
    new = old.copy()
    new[0, [0, 2]] = old[0, [5, 4]]  # rank 0's rows 0 and 2 take experts 5 and 4, held only by rank 1
    sched = build_schedule(old, new, 2)
    bounds = sched.chunks(64, 1 << 30, 1)
    sched = sched.contiguous_by_source(bounds)
    transport = GlooTransport()
    area = StagingArea(receiver, sched.per_rank[0])
    for begin, end in bounds:
        to_0 = chunk_transfers(sched, 1, begin, end).sends[0]
        block = transport.gather([[t[row] for t in senders[1].expert_weights[1]] for _, row in to_0], area.layout)
        first, count = chunk_transfers(sched, 0, begin, end).receives[1]
        area.block(first, count).copy_(block)  # the NCCL op's effect
        assert np.array_equal(
            transport.collect([transport.block_digests(block)])[0],
            transport.collect([transport.block_digests(area.block(first, count))])[0],
        )
    assert commit_through_serving(receiver, 1, [1], new, area) == "committed"
    assert not sched.per_rank[0].local, "every row of this plan must come from rank 1"
    assert rows_match_maps(receiver)
    assert torch.all(receiver.expert_weights[1][0][0] == expert_row_value(1, 5))
    assert torch.all(receiver.expert_weights[1][1][2] == 2 * expert_row_value(1, 4))


def test_digests_change_with_one_byte_and_with_swapped_records():
    transport = GlooTransport()
    block = torch.arange(4 * 32, dtype=torch.int64).to(torch.uint8).reshape(4, 32).clone()
    base = transport.collect([transport.block_digests(block)])[0]
    flipped = block.clone()
    flipped[2, 5] += 1
    swapped = block[[1, 0, 2, 3]].clone()
    assert (transport.collect([transport.block_digests(flipped)])[0] != base).tolist() == [False, False, True, False]
    assert (transport.collect([transport.block_digests(swapped)])[0] == base[[1, 0, 2, 3]]).all()
    assert base[0] != base[1]


def _one_rank_gloo() -> GlooTransport:
    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, 1, True, timeout=datetime.timedelta(seconds=10), wait_for_workers=False)
    transport = GlooTransport()
    transport._keep_store = store  # the server must outlive the group
    transport.connect(CommInit(generation=1, store_host="127.0.0.1", store_port=port, world_size=1), 0, 10.0)
    return transport


def test_gloo_throttle_gap_waits_on_the_host_and_keeps_pumping():
    transport = _one_rank_gloo()
    calls = []
    transport.poll_hook = lambda: calls.append(time.monotonic())
    t0 = time.monotonic()
    transport.exchange([], pace_s=0.06)
    elapsed = time.monotonic() - t0
    transport.abort()
    assert 0.06 <= elapsed < 1.0
    assert len(calls) >= 3, "the agent's socket must be pumped during a long gap"


def test_gloo_vote_polls_until_its_result():
    transport = _one_rank_gloo()
    try:
        assert transport.max_reduce(np.array([3, -1])).tolist() == [3, -1]
    finally:
        transport.abort()


@pytest.mark.parametrize("tensors", [1, 3])
def test_staging_area_handles_any_number_of_weight_tensors(tensors):
    shape = PlacementShape(num_layers=1, num_logical=4, num_physical=4, num_ranks=2)
    model = make_model(0, shape)
    model.expert_weights = [[torch.full((2, 5), float(k)) for k in range(tensors)]]
    old = initial_phy2log(shape)
    new = old[:, [2, 3, 0, 1]]
    area = StagingArea(model, build_schedule(old, new, 2).per_rank[0])
    assert len(area.rows) == tensors and all(r.shape == (2, 5) for r in area.rows)


def test_commit_warm_up_launches_nothing_on_cpu_and_leaves_the_model_alone():
    from eplb_service.worker_agent.staging import warm_commit_kernels

    shape = PlacementShape(2, 8, 12, 2)
    phy2log = initial_phy2log(shape)
    model = make_model(0, shape, phy2log)
    new = phy2log[[0]].copy()
    new[0, : shape.slots_per_rank] = new[0, : shape.slots_per_rank][::-1]
    area = StagingArea(model, build_schedule(phy2log[[0]], new, 2).per_rank[0])
    action = prepare_commit(model, 1, [0], new, area)
    weights = [t.clone() for t in model.expert_weights[0]]
    assert warm_commit_kernels(action) == 0
    assert all(torch.equal(a, b) for a, b in zip(weights, model.expert_weights[0]))
    assert np.array_equal(model.phy2log.numpy(), phy2log)


def test_bytes_per_expert_counts_bytes_of_every_weight_tensor(small_shape):
    """The staging budget, the chunk bounds and the throttle all count in these bytes: one
    element per weight would make every figure 2 (bf16) or 4 (float32) times too small."""
    model = make_model(0, small_shape)  # float32 rows of 6 and 3 elements
    assert model.bytes_per_expert == (6 + 3) * 4 == sum(RecordLayout.of(model.expert_weights[0]).sizes)
    model.expert_weights = [[t.to(torch.bfloat16) for t in layer] for layer in model.expert_weights]
    assert model.bytes_per_expert == (6 + 3) * 2


def test_an_expert_model_with_a_row_more_or_less_than_its_slots_is_refused(small_shape):
    """Row ``i`` of a layer's tensors is local slot ``i``: with one row too many, live slots and
    maps would no longer correspond, and the commit's row indices would miss."""
    from eplb_service.worker_agent.expert_model import ExpertModel

    good = make_model(0, small_shape)
    for rows in (small_shape.slots_per_rank + 1, small_shape.slots_per_rank - 1):
        weights = [list(layer) for layer in good.expert_weights]
        weights[1][0] = torch.zeros(rows, 6)
        with pytest.raises(
            ValueError, match=f"expert_weights\\[1\\]\\[0\\] has {rows} rows, expected slots_per_rank=4"
        ):
            ExpertModel(weights, good.phy2log, good.log2phy, good.logcnt, rank=0, num_ranks=small_shape.num_ranks)


def test_a_gloo_receive_that_fails_fails_the_exchange():
    """A receive that ended in an error (a peer reset) left its staging rows unwritten: the
    exchange must raise, never let the batch be reported staged."""

    class FailedWork:
        def wait(self) -> bool:
            raise RuntimeError("Connection reset by peer")

    class Group:
        def recv(self, tensors, peer, tag):
            return FailedWork()

    transport = GlooTransport()
    transport._group = Group()  # type: ignore[assignment]
    with pytest.raises(TransportError, match="gloo exchange of 1 ops failed: Connection reset by peer"):
        transport.exchange([P2POp(False, torch.zeros(4), 1, 0)])
