"""Thresholds of the migration policy's steps that the suite let through under hand mutation.

Each is a documented rule of ``eplb_service/coordinator/policy_migration.py`` whose breaking still
gave valid placements and kept the matrix subset within its targets, while moving slots the
rule exists to save (measured on the 29 cells of ``tests/test_policy_matrix.py``: the swap gate
ignored moved 1% more slots in all, 8% more in DeepSeek-V3 EP16's swap cell, at -0.05 pp there;
the fine pass taking drops below its minimum, 2% more in all, 15% more in Qwen3-30B-A3B EP8's)
or changing the price step 6 puts on a move (per mean expert instead of mean replica: -0.33 pp
in Mixtral 8+4's swap cell).
"""

from __future__ import annotations

import numpy as np

from eplb_service.coordinator.policy_migration import priced_layers, soft_max_search, swap_search

# One layer of 4 experts on 2 ranks of 2 slots; rank 0 holds experts 0 and 1.
PHY2LOG = np.array([[0, 1, 2, 3]])
ONE_EACH = np.ones((1, 4), dtype=np.int64)


def test_a_swap_must_lower_its_hot_rank_by_a_quarter_of_the_tolerance():
    """Mutations: the pair exchange taken whatever it gains (``ok = gap / 2 - miss >= 0``), and
    the hottest rank's exchange with any rank gated by ``+ gate`` instead of ``- gate``.

    Rank 0 carries ~0.6 of the layer, far above the target (~0.53: the lower bound 0.5 plus the
    tolerance 0.025 of 2-slot ranks), but no packing of these replicas does better than ~0.59:
    the best exchange lowers it by ~0.005 of the layer, under the gate of 0.25 x 0.025. Tokens
    in the 10^5 keep the noise term below the tolerance."""
    tiny = np.array([[300000.0, 300000.0, 295000.0, 110000.0]])
    assert np.array_equal(swap_search(PHY2LOG, tiny, ONE_EACH, 2), PHY2LOG)
    # The same layer with an exchange worth 0.01 of it (above the gate) makes it.
    worth = np.array([[300000.0, 300000.0, 290000.0, 110000.0]])
    out = swap_search(PHY2LOG, worth, ONE_EACH, 2)
    assert (out != PHY2LOG).sum() == 2
    assert sorted(out[0, :2].tolist()) != [0, 1]


def test_the_fine_pass_makes_no_exchange_below_its_minimum_drop():
    """Mutation: ``drop > -min_drop`` instead of ``drop >= min_drop`` (an exchange evening a
    pair never raises the soft maximum, so this only drops the minimum): one evening two ranks
    0.0008 of a mean rank apart lowers it by ~3e-6 of a mean rank, under the 1e-4 minimum, and
    was made, two slots for nothing."""
    near_even = np.array([[260200.0, 240000.0, 260000.0, 239800.0]])
    room = np.array([4])
    assert np.array_equal(soft_max_search(PHY2LOG, near_even, ONE_EACH, 2, room=room), PHY2LOG)
    # Ranks 0.2 of a mean rank apart are evened by one exchange.
    apart = np.array([[300000.0, 250000.0, 250000.0, 200000.0]])
    out = soft_max_search(PHY2LOG, apart, ONE_EACH, 2, room=room)
    assert (out != PHY2LOG).sum() == 2


def test_the_move_price_is_per_mean_replica_not_per_mean_expert():
    """Mutation: ``mean_replica = load / N_log`` (a mean expert's load) instead of ``/ P``.

    4 experts with 2 replicas each on 2 ranks; the exchange of slots 1 and 4 drops the most
    loaded rank from 6 to 4 (gain 2) for 2 moved slots; a mean replica carries 8 / 8 = 1. At
    0.9 mean replicas per slot (1.8) the change pays, at 1.1 (2.2) it does not."""
    current = np.array([[0, 0, 1, 1, 2, 2, 3, 3]])
    proposed = np.array([[0, 2, 1, 1, 0, 2, 3, 3]])
    load = np.array([[5.0, 1.0, 1.0, 1.0]])
    assert np.array_equal(priced_layers(current, proposed, load, 2, 0.9), proposed)
    assert np.array_equal(priced_layers(current, proposed, load, 2, 1.1), current)
