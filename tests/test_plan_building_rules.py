"""Rules of turning a proposal into a plan that the suite let through under hand mutation.

Each test names the mutation of ``eplb_service/coordinator/policy.py`` it catches: batches cut in
gain-per-byte order, ``forced_layers`` and ``over_budget_need_bytes`` as documented, and the
deepseek policy's proposal permuted within each rank so experts already on a rank keep their slot
(README: ``--policy deepseek`` is DeepSeek's placement up to a permutation within each rank).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from eplb_service.coordinator.policy import build_plan, plan_rebalance, propose_phy2log
from eplb_service.coordinator.policy_deepseek import deepseek_phy2log
from eplb_service.placement import PlacementShape, layer_balancedness, rank_loads

# Three layers of 8 experts on 2 ranks of 4 slots; rank 0 holds experts 0-3, rank 1 experts 4-7.
SHAPE = PlacementShape(3, 8, 8, 2)
CURRENT = np.tile(np.arange(8), (3, 1))
LOAD = np.array(
    [
        [8.0, 8.0, 5.0, 5.0, 6.0, 6.0, 4.0, 4.0],  # A: two swaps, the largest gain
        [6.0, 5.0, 5.0, 5.0, 5.0, 4.0, 4.0, 4.0],  # B: one swap, the best gain per byte
        [5.5, 5.0, 5.0, 5.0, 5.0, 4.0, 4.0, 4.0],  # C: one swap, the least of both
    ]
)
PROPOSED = CURRENT.copy()
PROPOSED[0, [0, 1, 4, 5]] = [4, 5, 0, 1]
PROPOSED[1, [0, 4]] = [4, 0]
PROPOSED[2, [0, 4]] = [4, 0]


def test_batches_are_cut_in_gain_per_byte_order_not_gain_order():
    """Mutation: layers ordered by gain before cutting (``lexsort((layers, -ratio, -gain))``).

    With 2 staging slots per rank, B (best per byte) opens the first batch and A (two slots per
    rank) cannot join it; C then cannot join A. Cut in gain order, A would go alone and B and C
    together: a different plan, whose first batch is not the best use of the link."""
    gain = layer_balancedness(rank_loads(PROPOSED, LOAD, 2)) - layer_balancedness(rank_loads(CURRENT, LOAD, 2))
    per_byte = gain / np.array([4, 2, 2])
    assert gain[0] > gain[1] > gain[2] and per_byte[1] > per_byte[0] > per_byte[2]  # the premise
    plan = build_plan(CURRENT, PROPOSED, LOAD, SHAPE, staging_budget_bytes=2)
    assert [b.layers for b in plan.batches] == [(1,), (0,), (2,)]
    assert [b.bytes_moved for b in plan.batches] == [2, 4, 2]


def test_forced_layers_are_only_layers_the_plan_moves():
    """Mutation: ``forced_layers`` from ``required`` alone. A required layer that stays put
    (over the budget here) is not forced: the coordinator starts a plan below ``min_gain`` when
    any layer is forced, and would start one for layer 1's small gain alone."""
    required = np.array([True, False, False])
    plan = build_plan(
        CURRENT, PROPOSED, LOAD, SHAPE, staging_budget_bytes=1, skip_over_budget=True, required_layers=required
    )
    assert plan.over_budget_layers == (0,)
    assert plan.forced_layers == ()
    assert sorted(layer for b in plan.batches for layer in b.layers) == [1, 2]
    # Within the budget the same required layer is forced, and planned.
    fits = build_plan(CURRENT, PROPOSED, LOAD, SHAPE, staging_budget_bytes=2, required_layers=required)
    assert fits.forced_layers == (0,)


def test_over_budget_need_is_zero_without_over_budget_layers_and_the_layers_need_with_them():
    """Mutation: ``over_budget_need_bytes`` as the largest staging need of every layer."""
    fits = build_plan(CURRENT, PROPOSED, LOAD, SHAPE, bytes_per_expert=10, staging_budget_bytes=20)
    assert fits.over_budget_layers == () and fits.over_budget_need_bytes == 0
    over = build_plan(
        CURRENT, PROPOSED, LOAD, SHAPE, bytes_per_expert=10, staging_budget_bytes=10, skip_over_budget=True
    )
    assert over.over_budget_layers == (0,) and over.over_budget_need_bytes == 20


def _rank_multisets(phy2log: np.ndarray, num_ranks: int) -> list[list[Counter]]:
    return [[Counter(rank.tolist()) for rank in row.reshape(num_ranks, -1)] for row in phy2log]


def test_deepseek_keeps_experts_already_on_a_rank_in_their_slot():
    """Mutation: the deepseek proposal returned as DeepSeek's packer laid it out (no
    ``keep_slots_within_ranks``): every rank the same experts, but most slots change."""
    shape = PlacementShape(4, 16, 24, 4)
    rng = np.random.default_rng(3)
    load = rng.gamma(0.7, 100.0, size=(4, 16))
    fresh = deepseek_phy2log(load, 24, 1, 1, 4)
    # DeepSeek's own placement with each rank's slots shuffled: nothing needs to move.
    shuffled = fresh.reshape(4, 4, 6).copy()
    for layer in range(4):
        for rank in range(4):
            shuffled[layer, rank] = rng.permutation(shuffled[layer, rank])
    shuffled = shuffled.reshape(4, 24)
    assert (shuffled != fresh).any()  # the premise
    assert np.array_equal(propose_phy2log("deepseek", shuffled, load, shape), shuffled)
    # From another placement: DeepSeek's ranks, each slot keeping its expert where the rank keeps it.
    current = np.stack([rng.permutation(np.r_[np.arange(16), rng.integers(0, 16, 8)]) for _ in range(4)])
    plan = plan_rebalance("deepseek", current, load, shape)
    assert plan.experts_moved > 0  # the premise: a plan that moves something
    assert _rank_multisets(plan.target_phy2log, 4) == _rank_multisets(fresh, 4)
    kept = sum(
        (Counter(old.tolist()) & new).total()
        for row_old, row_new in zip(current, _rank_multisets(plan.target_phy2log, 4))
        for old, new in zip(row_old.reshape(4, 6), row_new)
    )
    assert plan.experts_moved == current.size - kept
