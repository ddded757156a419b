"""The global transfer schedule: executing it turns the old placement into the new one."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb_service.worker_agent.schedule import build_schedule, chunk_transfers


def execute(  # noqa: C901 - the agent's staging steps, replayed one by one
    old: np.ndarray, new: np.ndarray, ranks: int, ranks_per_node: int | None = None, max_ops: int | None = None
) -> np.ndarray:
    """Run a schedule on 'weights' that are the expert ids themselves; returns live slots.

    With ``max_ops``, the schedule is renumbered for whole-block transfers of chunks of at
    most that many ops, and executed block by block as the agent does: each sender gathers
    its rows for a peer in order, the receiver writes them to one contiguous staging block.
    """
    spr = old.shape[1] // ranks
    sched = build_schedule(old, new, ranks, ranks_per_node)
    if max_ops is not None:
        bounds = sched.chunks(max_ops, 1 << 60, 1)
        sched = sched.contiguous_by_source(bounds)
        staging = [np.full(len(w.staging), -1) for w in sched.per_rank]
        for rank, work in enumerate(sched.per_rank):
            for copy in work.local:
                staging[rank][copy.dst_staging] = old[copy.layer, rank * spr + copy.src_row]
        for begin, end in bounds:
            parts = [chunk_transfers(sched, rank, begin, end) for rank in range(ranks)]
            for rank, part in enumerate(parts):
                for peer, (first, count) in part.receives.items():
                    sent = parts[peer].sends[rank]
                    assert len(sent) == count
                    staging[rank][first : first + count] = [old[layer, peer * spr + row] for layer, row in sent]
                assert sum(len(v) for v in part.sends.values()) == sum(
                    op.src_rank == rank for op in sched.remote[begin:end]
                )
        for rank, work in enumerate(sched.per_rank):
            for dup in work.duplicates:
                staging[rank][dup.dst_staging] = staging[rank][dup.src_staging]
        live = old.copy()
        for rank, work in enumerate(sched.per_rank):
            assert [row.index for row in work.staging] == list(range(len(work.staging)))
            for row in work.staging:
                assert staging[rank][row.index] == row.expert, "staging row filled with the wrong expert"
                live[row.layer, rank * spr + row.dst_row] = staging[rank][row.index]
        return live
    staging = [np.full(len(w.staging), -1) for w in sched.per_rank]
    for rank, work in enumerate(sched.per_rank):
        for copy in work.local:
            staging[rank][copy.dst_staging] = old[copy.layer, rank * spr + copy.src_row]
    for op in sched.remote:
        assert op.src_rank != op.dst_rank
        source = old[op.layer, op.src_rank * spr + op.src_row]
        assert source == op.expert
        staging[op.dst_rank][op.dst_staging] = source
    for rank, work in enumerate(sched.per_rank):
        for dup in work.duplicates:
            staging[rank][dup.dst_staging] = staging[rank][dup.src_staging]
    live = old.copy()
    for rank, work in enumerate(sched.per_rank):
        for row in work.staging:
            assert staging[rank][row.index] == row.expert, "staging row filled with the wrong expert"
            live[row.layer, rank * spr + row.dst_row] = staging[rank][row.index]
    return live


@st.composite
def placements(draw):
    ranks = draw(st.integers(1, 6))
    spr = draw(st.integers(1, 5))
    physical = ranks * spr
    logical = draw(st.integers(1, physical))
    layers = draw(st.integers(1, 3))

    def one():
        rows = []
        for _ in range(layers):
            extra = draw(
                st.lists(st.integers(0, logical - 1), min_size=physical - logical, max_size=physical - logical)
            )
            row = np.array(list(range(logical)) + extra)
            rows.append(np.array(draw(st.permutations(row.tolist()))))
        return np.stack(rows).astype(np.int64)

    return one(), one(), ranks


@settings(max_examples=300, deadline=None)
@given(placements())
def test_executing_the_schedule_yields_the_new_placement(case):
    old, new, ranks = case
    assert np.array_equal(execute(old, new, ranks), new)


@settings(max_examples=300, deadline=None)
@given(placements(), st.integers(1, 7))
def test_block_transfers_of_the_renumbered_schedule_yield_the_new_placement(case, max_ops):
    old, new, ranks = case
    assert np.array_equal(execute(old, new, ranks, max_ops=max_ops), new)


def test_block_transfers_are_one_block_per_peer_and_chunk():
    # 4 ranks x 8 slots; every rank's last 4 slots take the experts of rank+1's first 4
    old = np.array([np.arange(32)])
    new = old.copy()
    for rank in range(4):
        new[0, rank * 8 + 4 : rank * 8 + 8] = old[0, ((rank + 1) % 4) * 8 : ((rank + 1) % 4) * 8 + 4]
    sched = build_schedule(old, new, 4)
    blocks = sched.contiguous_by_source(sched.chunks(64, 1 << 40, 1))
    part = chunk_transfers(blocks, 0, 0, len(blocks.remote))
    assert part.receives == {1: (0, 4)} and part.sends == {3: [(0, 0), (0, 1), (0, 2), (0, 3)]}
    with pytest.raises(ValueError, match="must cover remote ops"):
        sched.contiguous_by_source([(0, 3)])


def test_unrenumbered_schedule_is_refused_for_block_transfers():
    old = np.array([np.arange(8)])
    new = np.array([[4, 0, 5, 3, 4, 5, 6, 7]])  # rank 0: row 0 <- rank 1, row 1 <- its own row 0, row 2 <- rank 1
    sched = build_schedule(old, new, 2)
    with pytest.raises(ValueError, match=r"staging rows \[0, 2\] from peer 1 are not one contiguous block"):
        chunk_transfers(sched, 0, 0, len(sched.remote))
    blocks = sched.contiguous_by_source([(0, len(sched.remote))])
    assert chunk_transfers(blocks, 0, 0, len(blocks.remote)).receives == {1: (0, 2)}


@settings(max_examples=150, deadline=None)
@given(placements())
def test_remote_copies_only_when_no_local_replica_and_once_per_rank_and_expert(case):
    old, new, ranks = case
    spr = old.shape[1] // ranks
    sched = build_schedule(old, new, ranks)
    seen = set()
    for op in sched.remote:
        held_locally = op.expert in old[op.layer].reshape(ranks, spr)[op.dst_rank]
        assert not held_locally
        key = (op.layer, op.dst_rank, op.expert)
        assert key not in seen
        seen.add(key)


def test_unchanged_placement_moves_nothing():
    old = np.array([[0, 1, 2, 3, 0, 1]])
    sched = build_schedule(old, old.copy(), 3)
    assert sched.remote == () and all(not w.staging for w in sched.per_rank)


def test_schedule_is_deterministic_and_prefers_same_node_sources():
    # 4 ranks, 2 per node; expert 0 lives on rank 0 (node 0) and rank 2 (node 1).
    old = np.array([[0, 1, 2, 3, 0, 4, 5, 6]])
    new = np.array([[0, 1, 2, 3, 0, 4, 0, 0]])  # rank 3 (node 1) needs expert 0
    a = build_schedule(old, new, 4, ranks_per_node=2)
    b = build_schedule(old, new, 4, ranks_per_node=2)
    assert a == b
    assert [(op.src_rank, op.dst_rank) for op in a.remote] == [(2, 3)]
    assert len(a.per_rank[3].duplicates) == 1  # second slot copies the received row


def test_senders_are_spread_over_holders():
    old = np.array([[0, 0, 0, 0, 1, 2, 3, 4]])  # expert 0 on ranks 0 and 1 (2 slots per rank)
    new = np.array([[0, 0, 0, 0, 0, 1, 0, 2]])  # ranks 2 and 3 need expert 0
    sched = build_schedule(old, new, 4)
    assert sorted(op.src_rank for op in sched.remote if op.expert == 0) == [0, 1]


def test_chunks_cover_all_ops_in_order_within_bounds():
    rng = np.random.default_rng(0)
    old = np.stack([rng.permutation(np.arange(32) % 24) for _ in range(4)])
    new = np.stack([rng.permutation(np.arange(32) % 24) for _ in range(4)])
    sched = build_schedule(old, new, 8)
    bounds = sched.chunks(max_ops=5, max_bytes=3 * 100, bytes_per_expert=100)
    assert bounds[0][0] == 0 and bounds[-1][1] == len(sched.remote)
    for (_, e0), (b1, _) in zip(bounds, bounds[1:]):
        assert e0 == b1
    for b, e in bounds:
        assert 1 <= e - b <= 5
        ops = sched.remote[b:e]
        for rank in range(8):
            assert sum(op.src_rank == rank for op in ops) * 100 <= 300
            assert sum(op.dst_rank == rank for op in ops) * 100 <= 300


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="must both be"):
        build_schedule(np.zeros((1, 4)), np.zeros((2, 4)), 2)
    with pytest.raises(ValueError, match="num_ranks=3 must divide num_physical=4"):
        build_schedule(np.zeros((1, 4)), np.zeros((1, 4)), 3)


def test_ops_are_interleaved_over_sender_receiver_pairs():
    # 4 ranks, 4 slots each; every rank's slots all change to experts that live elsewhere
    old = np.array([np.arange(16)])
    new = np.array([np.roll(np.arange(16), 4)])
    sched = build_schedule(old, new, 4)
    pairs = [(op.src_rank, op.dst_rank) for op in sched.remote]
    assert len(pairs) == 16 and len(set(pairs[:4])) == 4, "the first chunk should touch every pair"
    assert all(pairs.count(pair) == 4 for pair in set(pairs)) and len(set(pairs)) == 4
    assert np.array_equal(execute(old, new, 4), new)


def test_chunk_cost_is_the_busiest_ranks_bytes():
    old = np.array([np.arange(16)])
    new = np.array([np.roll(np.arange(16), 4)])
    sched = build_schedule(old, new, 4)
    assert sched.chunk_cost_bytes(0, 4, 10) == 10  # four pairs in parallel, one op per rank each way
    assert sched.chunk_cost_bytes(0, 16, 10) == 40
    assert sched.chunk_cost_bytes(3, 3, 10) == 0
