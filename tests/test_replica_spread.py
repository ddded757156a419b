"""Step 4's spread of experts with more replicas than ranks (coordinator/replica_spread.py)."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb_service.coordinator.policy_migration import migration_phy2log
from eplb_service.coordinator.replica_spread import spread_search
from eplb_service.placement import (
    PlacementShape,
    initial_phy2log,
    logical_replica_count,
    rank_holdings,
    rank_loads,
    validate_phy2log,
)


def copies_per_rank(phy2log: np.ndarray, experts: int, ranks: int) -> np.ndarray:
    return rank_holdings(phy2log, experts, ranks)


def clumped_layer() -> tuple[np.ndarray, np.ndarray]:
    """4 ranks of 6 slots; expert 0 has 8 copies, 4 / 3 / 1 / 0 to a rank; every rank's planned
    load is the same (expert 0's replica weighs as much as expert 1's and 2's)."""
    ranks = [
        [0, 0, 0, 0, 3, 4],
        [0, 0, 0, 1, 5, 6],
        [0, 1, 1, 1, 7, 8],
        [1, 1, 1, 1, 2, 2],
    ]
    phy2log = np.array([sum(ranks, [])])
    load = np.array([[80.0, 80.0, 20.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0]])
    return phy2log, load


def test_an_expert_with_more_copies_than_ranks_ends_within_one_copy_on_every_rank():
    phy2log, load = clumped_layer()
    counts = logical_replica_count(phy2log, 9)
    out, room = spread_search(phy2log, load, counts, 4, room=np.array([24.0]), sigma=1.0)
    validate_phy2log(out, PlacementShape(1, 9, 24, 4))
    assert np.array_equal(logical_replica_count(out, 9), counts)  # exchanges keep every count
    held = copies_per_rank(out, 9, 4)[0]
    assert held[:, 0].max() - held[:, 0].min() <= 1, held[:, 0]
    assert held[:, 1].max() - held[:, 1].min() <= 1, held[:, 1]
    changed = int((out != phy2log).sum())
    assert changed == 24 - room[0] and changed % 2 == 0


def test_the_room_bounds_the_exchanges():
    phy2log, load = clumped_layer()
    counts = logical_replica_count(phy2log, 9)
    out, room = spread_search(phy2log, load, counts, 4, room=np.array([2.0]), sigma=1.0)
    assert int((out != phy2log).sum()) == 2 and room[0] == 0
    before = copies_per_rank(phy2log, 9, 4)[0, :, 0]
    after = copies_per_rank(out, 9, 4)[0, :, 0]
    # The one exchange takes a copy from the fullest rank to the emptiest.
    assert after[0] == before[0] - 1 and after[3] == before[3] + 1
    same, room = spread_search(phy2log, load, counts, 4, room=np.array([1.0]))
    assert np.array_equal(same, phy2log) and room[0] == 1


def test_experts_with_at_most_one_copy_per_rank_are_left_where_they_are():
    # Expert 0 has 4 copies on 4 ranks, two of them on rank 0 and none on rank 3: not crowded,
    # not the pass's job. Expert 9 (5 copies) is crowded but already even, so the layer is searched.
    phy2log = np.array([[0, 0, 1, 9, 0, 3, 4, 9, 0, 6, 7, 9, 9, 10, 11, 9]])
    load = np.array([[40.0, 10, 0, 10, 10, 0, 10, 10, 0, 50, 10, 10]])
    counts = logical_replica_count(phy2log, 12)
    assert counts[0, 0] == 4 and counts[0, 9] == 5
    out, room = spread_search(phy2log, load, counts, 4, room=np.array([16.0]), sigma=10.0)
    assert np.array_equal(out, phy2log) and room[0] == 16


def test_the_copy_goes_to_the_least_loaded_of_the_ranks_with_fewest_copies():
    """Expert 0 (5 copies on 4 ranks) sits 3 / 2 / 0 / 0; ranks 2 and 3 both lack it, and rank 3
    is the less loaded: the first exchange takes a copy from rank 0 there."""
    phy2log = np.array([[0, 0, 0, 1, 0, 0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]])
    load = np.array([[50.0, 10, 10, 10, 10, 10, 10, 10, 8, 8, 8, 8]])
    counts = logical_replica_count(phy2log, 12)
    before = rank_loads(phy2log, load, 4)[0]
    assert before[3] < before[2]
    out, _ = spread_search(phy2log, load, counts, 4, room=np.array([2.0]), sigma=1.0)
    held = copies_per_rank(out, 12, 4)[0, :, 0]
    assert held.tolist() == [2, 2, 0, 1], held


def test_an_expert_that_could_not_move_is_tried_again_once_the_layer_changed():
    """Expert 2 (the larger risk) cannot move first: its exchange would take rank 0 past the
    slack. Expert 1's exchange lowers rank 0, after which expert 2's fits."""
    phy2log = np.array([[0, 1, 1, 1, 2, 2, 2, 3]])
    load = np.array([[164.5, 4.54, 12.76, 0.42]])
    counts = logical_replica_count(phy2log, 4)
    out, _ = spread_search(phy2log, load, counts, 2, room=np.array([8.0]), sigma=0.5)
    held = copies_per_rank(out, 4, 2)[0]
    assert np.ptp(held[:, 1]) <= 1 and np.ptp(held[:, 2]) <= 1, held[:, 1:3]
    replica = load[0, 2] / counts[0, 2]
    assert rank_loads(out, load, 2).max() <= rank_loads(phy2log, load, 2).max() + 0.5 * replica + 1e-9


def test_no_layers_or_no_experts_change_nothing():
    for phy2log, load in (
        (np.zeros((0, 8), dtype=np.int64), np.zeros((0, 4))),
        (np.zeros((0, 4), dtype=np.int64), np.zeros((0, 0))),
    ):
        counts = np.zeros(load.shape, dtype=np.int64)
        out, room = spread_search(phy2log, load, counts, 2, room=np.zeros(0))
        assert out.shape == phy2log.shape and room.shape == (0,)


def test_exchanges_of_equal_replicas_are_free_and_made_without_slack():
    """In the clumped layer expert 1's replicas weigh as much as expert 0's: trading them evens
    expert 0 at no cost to any rank, so even ``sigma = 0`` does it."""
    phy2log, load = clumped_layer()
    counts = logical_replica_count(phy2log, 9)
    out, _ = spread_search(phy2log, load, counts, 4, room=np.array([24.0]), sigma=0.0)
    held = copies_per_rank(out, 9, 4)[0, :, 0]
    assert held.max() - held.min() <= 1, held
    assert np.allclose(rank_loads(out, load, 4), rank_loads(phy2log, load, 4))


def test_an_exchange_takes_its_pair_at_most_sigma_replicas_above_the_top():
    """3 ranks of 6 slots, each at load 60: expert 0 (7 copies of 10) sits 6 / 1 / 0 to a rank;
    the rank without it holds expert 1 (5 copies of 12) and an idle expert. Any exchange raises
    a rank: trading a copy of 0 for one of 1 takes the giver to 62."""
    phy2log = np.array([[0, 0, 0, 0, 0, 0, 0, 2, 3, 4, 5, 6, 1, 1, 1, 1, 1, 7]])
    load = np.array([[70.0, 60.0, 10.0, 10.0, 10.0, 10.0, 10.0, 0.0]])
    counts = logical_replica_count(phy2log, 8)
    assert rank_loads(phy2log, load, 3).tolist() == [[60.0, 60.0, 60.0]]
    out, room = spread_search(phy2log, load, counts, 3, room=np.array([18.0]), sigma=0.0)
    assert np.array_equal(out, phy2log) and room[0] == 18
    for sigma in (0.25, 0.5, 1.0):
        out, _ = spread_search(phy2log, load, counts, 3, room=np.array([18.0]), sigma=sigma)
        assert (out != phy2log).any()
        assert rank_loads(out, load, 3).max() <= 60.0 + sigma * 12.0 + 1e-9
        held = copies_per_rank(out, 8, 3)[0]
        before = copies_per_rank(phy2log, 8, 3)[0]
        assert np.ptp(held[:, 0]) < np.ptp(before[:, 0]) and np.ptp(held[:, 1]) <= np.ptp(before[:, 1])


@st.composite
def crowded_cases(draw):
    ranks = draw(st.integers(2, 6))
    per_rank = draw(st.integers(2, 8))
    experts = draw(st.integers(1, ranks * per_rank - ranks))
    layers = draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    slots = ranks * per_rank
    phy2log = np.stack(
        [
            rng.permutation(np.concatenate([np.arange(experts), rng.integers(0, experts, slots - experts)]))
            for _ in range(layers)
        ]
    )
    load = rng.gamma(0.5, 100.0, size=(layers, experts))
    room = rng.integers(0, slots + 1, size=layers).astype(float)
    return PlacementShape(layers, experts, slots, ranks), phy2log, load, room


@settings(max_examples=150, deadline=None)
@given(crowded_cases(), st.sampled_from([0.0, 0.5, 2.0]))
def test_invariants_on_random_placements(case, sigma):
    shape, phy2log, load, room = case
    counts = logical_replica_count(phy2log, shape.num_logical)
    out, left = spread_search(phy2log, load, counts, shape.num_ranks, room=room, sigma=sigma)
    validate_phy2log(out, shape)
    assert np.array_equal(logical_replica_count(out, shape.num_logical), counts)
    changed = (out != phy2log).sum(axis=1)
    assert (changed <= room - left).all() and (left >= 0).all() and ((room - left) % 2 == 0).all()
    # No expert with more replicas than ranks ends less even than it started.
    crowded = counts > shape.num_ranks
    held_before = copies_per_rank(phy2log, shape.num_logical, shape.num_ranks)
    held_after = copies_per_rank(out, shape.num_logical, shape.num_ranks)
    uneven_before = held_before.max(axis=1) - held_before.min(axis=1)
    uneven_after = held_after.max(axis=1) - held_after.min(axis=1)
    assert (uneven_after[crowded] <= np.maximum(uneven_before[crowded], 1)).all()
    peak = rank_loads(out, load, shape.num_ranks).max(axis=1)
    replica = load / load.sum(axis=1, keepdims=True) / np.maximum(counts, 1)
    slack = sigma * np.where(crowded, replica, 0.0).max(axis=1) * load.sum(axis=1)
    assert (peak <= rank_loads(phy2log, load, shape.num_ranks).max(axis=1) + slack + 1e-9 * load.sum(axis=1)).all()


def test_a_hot_expert_gaining_many_copies_is_spread_and_survives_its_cooling():
    """A cold expert takes 40% of a layer and gains 31 copies on 16 ranks; the next window it
    falls back to 20% and the former hottest expert rises. Left in the slots the shrinking experts
    freed, its copies sit 0 to 4 to a rank and the next window's largest rank is 1.34 times the
    mean; spread (within step 4's room and the pass's slack), 1 to 3 and 1.16. The room is the
    spend controller's widest (0.24 of the slots): at the default 0.08, steps 2-3 leave none."""
    rng = np.random.default_rng(0)
    experts, ranks, slots = 512, 16, 576
    shape = PlacementShape(1, experts, slots, ranks)
    base = 1.0 / np.arange(1, experts + 1) ** 1.4
    base = rng.permutation(base / base.sum())
    hot, cold = int(np.argmax(base)), int(np.argmin(base))
    tokens = 2**23
    # The placement as it was: planned for `base` by the policy itself from vLLM's layout.
    current = migration_phy2log(initial_phy2log(shape), base[None, :] * tokens, ranks)
    now = base.copy()
    now[cold] = 0.4 / 0.6 * (1 - base[cold])  # 40% of the layer
    now /= now.sum()
    after = now.copy()
    after[cold] = now[cold] / 2
    after[hot] = now[hot] * 1.3
    after /= after.sum()
    peak, uneven = {}, {}
    for spread in (True, False):
        planned = migration_phy2log(current, now[None, :] * tokens, ranks, fine_move_share=0.24, spread=spread)
        validate_phy2log(planned, shape)
        assert logical_replica_count(planned, experts)[0, cold] > ranks
        held = copies_per_rank(planned, experts, ranks)[0, :, cold]
        uneven[spread] = int(held.max() - held.min())
        next_window = rank_loads(planned, after[None, :], ranks)[0]
        peak[spread] = next_window.max() / next_window.mean()
        planned_load = rank_loads(planned, now[None, :], ranks)[0]
        assert planned_load.max() / planned_load.mean() < 1.01  # both balance the window planned for
    assert uneven[True] <= 2 < uneven[False], uneven
    assert peak[True] < peak[False] - 0.1, peak


def test_the_plan_time_benchmark_times_both_and_leaves_the_spread_on(capsys, monkeypatch):
    """``bench/plan_time_scales.py`` swaps the spread out for its "off" plans; it must put it back."""
    import sys

    from bench import plan_time_scales
    from eplb_service.coordinator import policy_migration

    monkeypatch.setattr(sys, "argv", ["plan_time_scales.py", "--plans", "2", "--skip", "1"])
    plan_time_scales.main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split("|")[1].strip() for row in rows] == ["1", "0.5", "0.25", "0.0625"]
    assert all(float(cell) > 0 for row in rows for cell in row.split("|")[2:4])
    assert policy_migration.spread_search is spread_search
