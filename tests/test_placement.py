"""The placement model: derived maps, loads, balancedness, validation, slot helpers."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb_service.placement import (
    PlacementError,
    PlacementShape,
    initial_phy2log,
    keep_slots_within_ranks,
    layer_balancedness,
    local_source_slots,
    logical_replica_count,
    logical_to_physical,
    model_balancedness,
    physical_to_logical_load,
    rank_holdings,
    rank_loads,
    validate_phy2log,
)


def test_shape_rejects_ranks_not_dividing_slots():
    with pytest.raises(PlacementError, match="num_ranks=3 must divide num_physical=16"):
        PlacementShape(2, 12, 16, 3)


def test_shape_rejects_fewer_slots_than_experts():
    with pytest.raises(PlacementError, match="num_physical=8"):
        PlacementShape(2, 12, 8, 4)


def test_initial_placement_is_round_robin():
    shape = PlacementShape(2, 6, 8, 2)
    phy2log = initial_phy2log(shape)
    assert phy2log.tolist()[0] == [0, 1, 2, 3, 4, 5, 0, 1]
    validate_phy2log(phy2log, shape)
    assert logical_replica_count(phy2log, 6).tolist()[1] == [2, 2, 1, 1, 1, 1]


def test_validate_names_layer_and_value():
    shape = PlacementShape(2, 4, 4, 2)
    bad = np.array([[0, 1, 2, 3], [0, 1, 2, 7]])
    with pytest.raises(PlacementError, match="layer 1: slot 3 holds expert 7"):
        validate_phy2log(bad, shape)
    missing = np.array([[0, 1, 2, 3], [0, 1, 2, 2]])
    with pytest.raises(PlacementError, match="layer 1: logical expert 3 has no replica"):
        validate_phy2log(missing, shape)
    with pytest.raises(PlacementError, match="shape"):
        validate_phy2log(np.zeros((2, 5), dtype=np.int64), shape)


def test_validate_refuses_the_first_expert_past_the_end():
    """Expert ``N_log`` is one past the last: counted as expert 0 of the next layer it would hide
    that layer's missing expert 0, and indexing a ``[.., N_log]`` map with it is out of range."""
    shape = PlacementShape(2, 4, 6, 2)
    with pytest.raises(PlacementError, match="layer 0: slot 5 holds expert 4, expected 0 <= expert < 4"):
        validate_phy2log(np.array([[0, 1, 2, 3, 0, 4], [1, 1, 2, 3, 1, 2]]), shape)


def test_rank_loads_split_evenly_over_replicas():
    phy2log = np.array([[0, 0, 1, 2]])  # expert 0 twice, ranks of 2 slots
    load = np.array([[10.0, 4.0, 6.0]])
    assert rank_loads(phy2log, load, 2).tolist() == [[10.0, 10.0]]
    assert layer_balancedness(rank_loads(phy2log, load, 2)).tolist() == [1.0]
    assert physical_to_logical_load(phy2log, np.array([[5.0, 5.0, 4.0, 6.0]]), 3).tolist() == [[10.0, 4.0, 6.0]]


def test_model_balancedness_is_sum_of_means_over_sum_of_maxes():
    per_rank = np.array([[1.0, 3.0], [2.0, 2.0]])
    assert model_balancedness(per_rank) == pytest.approx((2.0 + 2.0) / (3.0 + 2.0))
    assert model_balancedness(np.zeros((2, 2))) == 1.0


def test_log2phy_lists_slots_ascending():
    phy2log = np.array([[1, 0, 1, 2]])
    assert logical_to_physical(phy2log, 3, 2).tolist() == [[[1, -1], [0, 2], [3, -1]]]
    with pytest.raises(PlacementError, match="expert 1 has 2 replicas"):
        logical_to_physical(phy2log, 3, 1)


def test_log2phy_of_a_wide_layer_lists_every_slot_ascending_then_padding():
    """A layer of hundreds of slots: an unstable sort (numpy's default quicksort, stable only
    below 17 items) would list an expert's replicas in no fixed order."""
    rng = np.random.default_rng(5)
    phy2log = rng.integers(0, 16, size=(3, 512))
    phy2log[:, :16] = np.arange(16)
    width = int(logical_replica_count(phy2log, 16).max())
    log2phy = logical_to_physical(phy2log, 16, width + 1)
    for layer in range(3):
        for expert in range(16):
            slots = np.flatnonzero(phy2log[layer] == expert).tolist()
            assert log2phy[layer, expert].tolist() == slots + [-1] * (width + 1 - len(slots)), (layer, expert)


def changed_slots(old_phy2log: np.ndarray, new_phy2log: np.ndarray) -> np.ndarray:
    """``[L, P]`` bool: slots whose logical expert differs between the two placements."""
    return np.asarray(old_phy2log) != np.asarray(new_phy2log)


def test_local_source_and_changed_slots():
    old = np.array([[0, 1, 2, 3]])
    new = np.array([[1, 0, 3, 3]])  # rank 0 swaps in place; rank 1 slot 2 gets 3 (held) ...
    assert changed_slots(old, new).tolist() == [[True, True, True, False]]
    assert local_source_slots(old, new, 2).tolist() == [[True, True, True, False]]
    far = np.array([[2, 1, 0, 3]])
    assert local_source_slots(old, far, 2).tolist() == [[False, False, False, False]]
    assert rank_holdings(old, 4, 2)[0].tolist() == [[1, 1, 0, 0], [0, 0, 1, 1]]


def test_local_source_slots_memory_grows_with_slots_not_ranks_times_experts():
    """One slot per rank and many experts: a dense [layers, ranks, experts] table took 7.4 GB
    for 200 layers of 2048 experts on 2048 ranks (a MemoryError at 1000 layers); the answer only
    needs memory in proportion to the slots."""
    import tracemalloc

    rng = np.random.default_rng(0)
    layers, experts = 8, 1024
    old = np.stack([rng.permutation(experts) for _ in range(layers)])
    new = np.stack([rng.permutation(experts) for _ in range(layers)])
    tracemalloc.start()
    try:
        got = local_source_slots(old, new, experts)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not got.any()  # one slot per rank: a changed slot never has its new expert on its rank
    assert peak < 8 * 2**20, f"peak {peak} bytes for {layers * experts} slots"
    # Many slots per rank: the same answer as the per-rank holdings say.
    old2, new2 = old.reshape(layers, experts), np.roll(old, 3, axis=1)
    held = rank_holdings(old2, experts, 4) > 0
    rank = np.arange(experts) // (experts // 4)
    expect = held[np.arange(layers)[:, None], rank[None, :], new2] & (old2 != new2)
    assert local_source_slots(old2, new2, 4).tolist() == expect.tolist()


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    num_ranks=st.sampled_from([1, 2, 4, 8]),
    slots_per_rank=st.integers(1, 6),
    layers=st.integers(1, 6),
)
def test_local_source_slots_matches_the_per_rank_holdings(seed, num_ranks, slots_per_rank, layers):
    """Any two maps, repeats within a rank included: a changed slot is local exactly when its
    rank holds the new expert in ``old`` (the dense table says so directly)."""
    rng = np.random.default_rng(seed)
    slots = num_ranks * slots_per_rank
    experts = int(rng.integers(1, slots + 1))
    old = rng.integers(0, experts, (layers, slots))
    new = np.where(rng.random((layers, slots)) < 0.5, rng.integers(0, experts, (layers, slots)), old)
    held = rank_holdings(old, experts, num_ranks) > 0
    rank = np.arange(slots) // slots_per_rank
    expect = held[np.arange(layers)[:, None], rank[None, :], new] & (old != new)
    assert local_source_slots(old, new, num_ranks).tolist() == expect.tolist()


def test_local_source_slots_costs_about_as_much_as_a_rank_load():
    """``build_plan`` for 1000 layers x 2048 slots took 1.1 s, 80% of it deduplicating keys
    (``np.unique``) that the lookup only needs sorted; now it is a few ``rank_loads``' worth.
    Timed against ``rank_loads`` on the same maps, so a busy machine slows both alike."""
    import time

    rng = np.random.default_rng(0)
    layers, slots, experts, ranks = 400, 2048, 1792, 256
    old = np.tile(np.arange(slots) % experts, (layers, 1))
    new = np.stack([rng.permutation(row) for row in old])
    load = rng.random((layers, experts))

    def best_of_3(call):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        return min(times)

    lookup_s = best_of_3(lambda: local_source_slots(old, new, ranks))
    rank_load_s = best_of_3(lambda: rank_loads(new, load, ranks))
    # 34x with np.unique, 4x with a sort, on the 2-core CI machine
    assert lookup_s < 15 * rank_load_s, f"local_source_slots {lookup_s:.3f} s, rank_loads {rank_load_s:.3f} s"


def test_keep_slots_within_ranks_example():
    old = np.array([[0, 1, 2, 3, 4, 5]])
    new = np.array([[5, 1, 0, 4, 3, 3]])  # rank 0: {5,1,0}, rank 1: {4,3,3}
    kept = keep_slots_within_ranks(new, old, 2)
    assert kept.tolist() == [[0, 1, 5, 3, 4, 3]]


@settings(max_examples=60, deadline=None)
@given(
    layers=st.integers(1, 3),
    ranks=st.integers(1, 4),
    per_rank=st.integers(1, 5),
    logical=st.integers(1, 8),
    seed=st.integers(0, 2**31 - 1),
)
def test_keep_slots_within_ranks_is_a_per_rank_permutation(layers, ranks, per_rank, logical, seed):
    rng = np.random.default_rng(seed)
    num_physical = ranks * per_rank
    old = rng.integers(0, logical, size=(layers, num_physical))
    new = rng.integers(0, logical, size=(layers, num_physical))
    kept = keep_slots_within_ranks(new, old, ranks)
    assert np.array_equal(
        np.sort(kept.reshape(layers, ranks, per_rank), axis=2), np.sort(new.reshape(layers, ranks, per_rank), axis=2)
    )
    # No fewer unchanged slots than the unaligned proposal, and as many as the multisets allow.
    assert (kept == old).sum() >= (new == old).sum()
    best = 0
    for layer in range(layers):
        for rank in range(ranks):
            sl = slice(rank * per_rank, (rank + 1) * per_rank)
            a = np.bincount(old[layer, sl], minlength=logical)
            b = np.bincount(new[layer, sl], minlength=logical)
            best += int(np.minimum(a, b).sum())
    assert (kept == old).sum() == best
